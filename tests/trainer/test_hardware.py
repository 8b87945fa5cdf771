"""Device selection, and a real 2-process DDP run on CPU (torchrun, gloo, free port)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from refit.registry import Registry
from refit.storage import S3Store
from tests.conftest import MotoServer, free_port
from tests.trainer.synthetic import upload_colours
from trainer.hardware import Hardware, check_ranks_agree, loader_workers, setup_hardware

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.integration
def test_two_process_ddp_run_completes_and_ranks_agree(moto_server: MotoServer) -> None:
    store = S3Store(moto_server.settings)
    bucket = f"ddp-{uuid.uuid4().hex[:10]}"
    uri = upload_colours(store, bucket, "colours", train=8, val=4, size=32)
    settings = moto_server.settings
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MINIO_ENDPOINT": settings.endpoint,
        "MINIO_ACCESS_KEY": settings.access_key,
        "MINIO_SECRET_KEY": settings.secret_key,
        "OMP_NUM_THREADS": "1",
    }
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    command = [
        torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "trainer.train",
        "--dataset", uri, "--out", "ddp", "--bucket", bucket, "--epochs", "2",
        "--batch-size", "4", "--crop-size", "32", "--workers", "0", "--device", "cpu",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d)/2: trained weights sha256 (\w+)", done.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    archives = [o.key for o in store.list(bucket, "archives/ddp/")]
    assert len(archives) == 1 and archives[0] == Registry.archive_key("ddp", archives[0][-68:-4])
    assert store.stat(bucket, next(store.list(bucket, "checkpoints/")).key) is not None
