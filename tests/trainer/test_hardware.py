"""Device selection and rank agreement. A real 2-process DDP run on CPU (torchrun, gloo) is
tests/cli/test_train.py's ``refit train --nproc-per-node 2``."""

from __future__ import annotations

import pytest
import torch

from trainer.hardware import Hardware, check_ranks_agree, loader_workers, setup_hardware


def test_cpu_fallback_uses_fp32_and_no_process_group() -> None:
    hw = setup_hardware("cpu")
    assert hw.device.type == "cpu" and hw.amp_dtype is None and hw.channels_last
    assert not hw.distributed and hw.is_main and not hw.pin_memory


def test_loader_workers_by_host_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = Hardware(device=torch.device("cpu"), amp_dtype=None, channels_last=True)
    gpu = Hardware(device=torch.device("cuda", 0), amp_dtype=torch.bfloat16, channels_last=True)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [loader_workers(cpu, cpus=n) for n in (1, 2, 4, 16)] == [0, 0, 0, 2]
    assert [loader_workers(gpu, cpus=n) for n in (1, 2, 16, 64)] == [1, 1, 8, 8]
    assert loader_workers(cpu, requested=3, cpus=2) == 3 and loader_workers(gpu, 0, 64) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: the host's cores are shared by ranks
    assert loader_workers(gpu, cpus=16) == 3 and loader_workers(cpu, cpus=16) == 0


def test_weights_digest_changes_with_any_tensor() -> None:
    hw = Hardware(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    model = torch.nn.BatchNorm2d(3)
    before = check_ranks_agree(model, hw)
    model.running_mean[1] = 0.5
    assert check_ranks_agree(model, hw) != before
