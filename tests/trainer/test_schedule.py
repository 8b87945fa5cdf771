"""The phase plan and the one-cycle LR schedule."""

from __future__ import annotations

import itertools

import pytest

from tests.trainer.fitting import small_config
from trainer.schedule import OneCycle, Phase, plan_phases


def test_one_cycle_warms_up_peaks_and_anneals() -> None:
    schedule = OneCycle(total_steps=100, pct_start=0.2, div=25, final_div=1000)
    values = [schedule(step) for step in range(101)]
    assert values[0] == pytest.approx(1 / 25)
    assert max(values) == pytest.approx(1.0) and values.index(max(values)) == 20
    assert values[100] == pytest.approx(1 / 1000)
    assert schedule(500) == pytest.approx(1 / 1000)  # a longer epoch than estimated is safe
    assert all(a >= b for a, b in itertools.pairwise(values[20:]))


def test_two_phase_plan_freezes_everything_then_unfreezes_at_a_lower_lr() -> None:
    config = small_config(epochs=5, head_epochs=2, lr=1e-3, finetune_lr_scale=0.1)
    assert plan_phases(config, freeze=10, max_depth=17) == [
        Phase(0, 0, 2, 17, 1e-3),
        Phase(1, 2, 5, 10, pytest.approx(1e-4)),
    ]
    assert plan_phases(small_config(epochs=3), 10, 17) == [Phase(0, 0, 3, 10, 3e-3)]
