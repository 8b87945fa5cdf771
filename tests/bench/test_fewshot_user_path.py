"""bench/fewshot_user_path.py's data picks and report: the picks a user path depends on."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest

from tests.bench.conftest import load_bench_script


@pytest.fixture(scope="module")
def fewshot() -> Iterator[ModuleType]:
    yield from load_bench_script("fewshot_user_path")


LABELS = np.repeat(np.arange(10), 50)


def test_a_pick_is_n_per_class_and_the_same_for_a_seed(fewshot: ModuleType) -> None:
    chosen = fewshot.pick(LABELS, 10, seed=1)
    assert np.bincount(LABELS[chosen], minlength=10).tolist() == [10] * 10
    assert len(set(chosen)) == 100
    assert fewshot.pick(LABELS, 10, seed=1) == chosen
    assert fewshot.pick(LABELS, 10, seed=2) != chosen


def test_the_table_summarises_each_shot_count(fewshot: ModuleType) -> None:
    rows = [
        {"shots": 10, "pick": 0, "accuracy": 0.70, "job_s": 100.0},
        {"shots": 10, "pick": 1, "accuracy": 0.80, "job_s": 120.0},
    ]
    summary = fewshot.table(rows).splitlines()[-1]
    assert summary == "| 10 | 75.0% | 70.0% | 80.0% | 110 | 120 |"
