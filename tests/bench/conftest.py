"""Bench scripts loaded as ``python bench/<name>.py`` loads them: bench/ first on the path."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench_script(name: str) -> Iterator[ModuleType]:
    """The script, imported under its own name (dataclasses look their module up there); on
    exit the path and every bench module it imported are gone again."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
            yield module
        finally:
            for loaded in [n for n, m in sys.modules.items() if _in_bench(m)]:
                del sys.modules[loaded]


def _in_bench(module: ModuleType | None) -> bool:
    return Path(getattr(module, "__file__", None) or "/").parent == BENCH


@pytest.fixture(scope="module")
def gpu_check() -> Iterator[ModuleType]:
    yield from load_bench_script("gpu_check")


@pytest.fixture(scope="module")
def gpu_dataset() -> Iterator[ModuleType]:
    yield from load_bench_script("gpu_dataset")
