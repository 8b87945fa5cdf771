"""bench/gpu_check.py without a GPU: it refuses with a clear message, and its pure parts work.
Its CPU dry run (`bench/gpu_check.py --cpu`: the same steps at tiny sizes) takes minutes on this
machine, so it is run by hand, not in the suite (docs/benchmarks.md, *GPU check*)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_without_cuda_it_exits_2_saying_why() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "no CUDA device is visible" in done.stderr and "--cpu" in done.stderr
    assert done.stdout == ""  # nothing started


def test_the_table_shows_failures_on_one_line(gpu_check) -> None:
    ctx = gpu_check.Context(cpu=True, sizes=None, storage=None, workdir=Path("."))
    ctx.steps = [
        gpu_check.Step("fine-tune", ok=True, images_per_s=1234.4, seconds=61, detail="fine"),
        gpu_check.Step("torchrun", ok=False, seconds=3, detail="FAILED: two\nlines"),
    ]
    assert gpu_check.table(ctx).splitlines()[2:] == [
        "| fine-tune | ok | 1234 | 61 | fine |",
        "| torchrun | **failed** | - | 3 | FAILED: two lines |",
    ]


def test_last_error_is_the_childs_exception(gpu_check) -> None:
    stderr = "Traceback ...\nValueError: bad batch\n[rank0]: launcher noise\nChildFailedError:\n"
    assert gpu_check.last_error(stderr) == "ValueError: bad batch"
