"""GPU check: the CUDA paths of refit, exercised once, with images/s for each (under 8 minutes).

1. fine-tune in this process on CUDA: bf16 autocast and channels_last (trainer/hardware.py),
   DataLoader workers streaming a generated dataset from an S3 server (moto, as the tests use;
   bench/gpu_dataset.py);
   images/s and the fraction of step time spent waiting for data (target < 10%);
2. the same training as a ``torchrun --nproc-per-node 1 -m trainer.train`` job;
3. an NCCL all-reduce under ``torchrun --nproc-per-node 1`` (trainer.train joins a process group
   only when WORLD_SIZE > 1, so step 2 alone never reaches NCCL on one GPU);
4. a TorchServe GPU worker answering Predict for the archive step 1 built (registered with the
   default batching), 32 requests in flight; images/s;
5. that archive's ONNX model under ONNX Runtime's TensorRT, CUDA and CPU providers
   (bench/gpu_onnx.py; on a GPU host install ``onnxruntime-gpu`` in place of ``onnxruntime``).

Prints a Markdown table for docs/benchmarks.md; exits 0 when every step passed, 1 when one
failed, 2 without CUDA. ``--cpu`` runs the same code on the CPU with tiny sizes (a dry run that
proves the script, not the GPU). Needs Java 17 for TorchServe, and nothing from the network.

Usage: .venv/bin/python bench/gpu_check.py [--cpu]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gpu_dataset import BUCKET, moto_server, shape_image, upload_dataset  # bench/, beside this

from refit.netutil import free_port
from refit.registry import Batching
from refit.storage import ObjectStore, StorageSettings
from refit.torchserve import Keys

NO_CUDA = (
    "gpu_check: no CUDA device is visible to torch (torch.cuda.is_available() is False). "
    "Run it on a GPU host, or pass --cpu for a dry run of the same steps on the CPU."
)
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    classes: int
    per_class: int  # training images; whole batches (a last batch of one image fails BatchNorm)
    val_per_class: int
    image_px: int
    crop: int
    batch: int
    epochs: int
    predicts: int

    @classmethod
    def for_device(cls, cpu: bool) -> Sizes:
        if cpu:
            return cls(classes=3, per_class=16, val_per_class=4, image_px=48, crop=32, batch=8,
                       epochs=1, predicts=32)  # fmt: skip
        return cls(classes=10, per_class=384, val_per_class=64, image_px=160, crop=224,
                   batch=128, epochs=3, predicts=2000)  # fmt: skip


@dataclass
class Step:
    name: str
    ok: bool = False
    images_per_s: float = 0.0
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Context:
    cpu: bool
    sizes: Sizes
    storage: StorageSettings
    workdir: Path
    dataset: str = f"s3://{BUCKET}/data"
    archive_key: str = ""
    steps: list[Step] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    def env(self) -> dict[str, str]:
        """The environment of child processes: the same object store."""
        return {
            **os.environ,
            "MINIO_ENDPOINT": self.storage.endpoint,
            "MINIO_ACCESS_KEY": self.storage.access_key,
            "MINIO_SECRET_KEY": self.storage.secret_key,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }


# --- the steps ---------------------------------------------------------------------------------


def run_step(ctx: Context, name: str, step: Callable[[Context, Step], None]) -> Step:
    result = Step(name)
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        step(ctx, result)
        result.ok = True
    except Exception as exc:
        traceback.print_exc()
        result.detail = f"FAILED: {type(exc).__name__}: {str(exc)[:300]}"
    result.seconds = time.perf_counter() - start
    ctx.steps.append(result)
    return result


def train_config(ctx: Context, out: str):
    from trainer.config import TrainConfig

    s = ctx.sizes
    return TrainConfig(dataset=ctx.dataset, out=out, epochs=s.epochs, batch_size=s.batch,
                       crop_size=s.crop, device=ctx.device, bucket=BUCKET, version="1",
                       resume=False, log_every=1_000_000)  # fmt: skip


def finetune(ctx: Context, step: Step) -> None:
    from trainer.hardware import setup_hardware, teardown
    from trainer.train import train_and_package

    hw = setup_hardware(ctx.device)
    teardown(hw)
    if not ctx.cpu and (hw.amp_dtype is None or str(hw.amp_dtype) != "torch.bfloat16"):
        raise RuntimeError(f"expected bf16 autocast on CUDA, got {hw.amp_dtype}")
    if not hw.channels_last:
        raise RuntimeError("channels_last is off")
    epochs = []
    result = train_and_package(
        train_config(ctx, "gpucheck"),
        ctx.storage.open(),
        on_event=lambda e: epochs.append(e) if e.kind == "epoch" else None,
    )
    last = epochs[-1]  # the first epoch pays cuDNN's kernel search and the workers' start
    ctx.archive_key = result.archive_key
    step.images_per_s = last.images_per_second
    verdict = "met" if last.data_wait_ratio < 0.10 else "MISSED"
    step.detail = (
        f"{hw.device}, autocast {hw.amp_dtype}, channels_last {hw.channels_last}; "
        f"data wait {100 * last.data_wait_ratio:.1f}% of step time (target < 10%: {verdict}); "
        f"val_accuracy {result.metrics['val_accuracy']:.3f}"
    )


def torchrun_train(ctx: Context, step: Step) -> None:
    s = ctx.sizes
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", str(free_port()), "-m", "trainer.train",
               "--dataset", ctx.dataset, "--out", "gpucheck-torchrun", "--bucket", BUCKET,
               "--epochs", str(s.epochs), "--batch-size", str(s.batch),
               "--crop-size", str(s.crop), "--device", ctx.device, "--version", "1",
               "--no-resume"]  # fmt: skip
    done = subprocess.run(
        command, env=ctx.env(), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited {done.returncode}: {last_error(done.stderr)}")
    meta = archive_meta(ctx.storage.open(), "gpucheck-torchrun")
    step.images_per_s = meta["metrics"]["images_per_second"]
    step.detail = f"val_accuracy {meta['metrics']['val_accuracy']:.3f}; mean over all epochs"


def last_error(stderr: str) -> str:
    """The child's own exception line, not torchrun's wrapper traceback after it."""
    errors = [line for line in stderr.splitlines() if "Error:" in line or "error:" in line]
    return (errors[0] if errors else stderr[-300:]).strip()


def archive_meta(store: ObjectStore, model: str) -> dict:
    (info,) = list(store.list(BUCKET, f"archives/{model}/"))
    with zipfile.ZipFile(io.BytesIO(store.get(BUCKET, info.key))) as mar:
        return json.loads(mar.read("refit.json"))


def nccl_all_reduce(ctx: Context, step: Step) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", str(free_port()), str(Path(__file__).resolve()),
               "--all-reduce-probe"] + (["--cpu"] if ctx.cpu else [])  # fmt: skip
    done = subprocess.run(command, env=ctx.env(), capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or "all-reduce ok" not in done.stdout:
        raise RuntimeError(f"probe exited {done.returncode}: {last_error(done.stderr)}")
    step.detail = done.stdout.strip().splitlines()[-1]


def all_reduce_probe(cpu: bool) -> None:
    """Runs under torchrun: one rank joins the group and all-reduces 64 MiB on its device."""
    import torch
    import torch.distributed as dist

    backend = "gloo" if cpu else "nccl"
    device = torch.device("cpu") if cpu else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    tensor = torch.ones(16 << 20, device=device)
    dist.all_reduce(tensor)
    if not cpu:
        torch.cuda.synchronize()
    ok = bool((tensor == dist.get_world_size()).all())
    dist.destroy_process_group()
    if not ok:
        raise SystemExit("all-reduce returned wrong values")
    print(f"all-reduce ok: backend {backend}, device {device}, world size 1")


def torchserve_predict(ctx: Context, step: Step) -> None:
    from local_stack.torchserve import TorchServePorts, TorchServeProcess, allowed_urls_for
    from refit.torchserve import TorchServeClient

    if shutil.which("java") is None:
        raise RuntimeError("java is not on PATH: TorchServe needs Java 17")
    if not ctx.archive_key:
        raise RuntimeError("no archive: the fine-tuning step failed")
    ports = TorchServePorts(*(free_port() for _ in range(5)))
    torchserve = TorchServeProcess(
        ctx.workdir / "torchserve", ports, allowed_urls_for(ctx.storage.endpoint)
    )
    torchserve.start()
    client = TorchServeClient(
        f"127.0.0.1:{ports.grpc_inference}",
        f"127.0.0.1:{ports.grpc_management}",
        timeout_s=60,
        keys=torchserve.key_source(),
    )
    try:
        deadline = time.monotonic() + 60
        while not client.ping():  # its gRPC ports open a moment after its REST ping answers
            if time.monotonic() > deadline:
                raise RuntimeError("TorchServe's gRPC API did not answer within 60 s")
            time.sleep(0.5)
        store = ctx.storage.open()
        client.register("gpucheck", "1", store.url(BUCKET, ctx.archive_key), batching=Batching())
        key = Keys.parse(torchserve.key_file.read_text()).management
        workers = describe(ports.management, key, "gpucheck")["workers"]
        on_gpu = any(w.get("gpu") for w in workers)
        if not ctx.cpu and not on_gpu:
            raise RuntimeError(f"TorchServe's worker is not on a GPU: {workers}")
        rng = np.random.default_rng(1)
        images = [shape_image(i % ctx.sizes.classes, rng, 224) for i in range(64)]
        client.predict("gpucheck", "1", images[0], 1)  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            answers = list(
                pool.map(
                    lambda n: client.predict("gpucheck", "1", images[n % 64], 1),
                    range(ctx.sizes.predicts),
                )
            )
        seconds = time.perf_counter() - start
    finally:
        client.close()
        torchserve.stop()
    right = sum(
        a["predictions"][0]["label"] == f"class{n % 64 % ctx.sizes.classes}"
        for n, a in enumerate(answers)
    )
    step.images_per_s = len(answers) / seconds
    batching = Batching()
    step.detail = (
        f"worker on GPU: {on_gpu}; batch_size {batching.batch_size}, max_batch_delay "
        f"{batching.max_batch_delay_ms} ms, 32 in flight; {right}/{len(answers)} labelled right"
    )


def describe(management_port: int, key: str, model: str) -> dict:
    url = f"http://127.0.0.1:{management_port}/models/{model}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)[0]


def onnx_providers(ctx: Context, step: Step) -> None:
    from gpu_onnx import provider_figures  # bench/, beside this script

    if not ctx.archive_key:
        raise RuntimeError("no archive: the fine-tuning step failed")
    archive = ctx.storage.open().get(BUCKET, ctx.archive_key)
    step.detail = provider_figures(archive, ctx.sizes.crop, ctx.cpu)


# --- the report --------------------------------------------------------------------------------


def table(ctx: Context) -> str:
    lines = ["| step | result | images/s | seconds | detail |", "|---|---|---|---|---|"]
    for s in ctx.steps:
        rate = f"{s.images_per_s:.0f}" if s.images_per_s else "-"
        verdict = "ok" if s.ok else "**failed**"
        detail = " ".join(s.detail.split())
        lines.append(f"| {s.name} | {verdict} | {rate} | {s.seconds:.0f} | {detail} |")
    return "\n".join(lines)


def describe_host(cpu: bool) -> str:
    import torch

    if cpu:
        return f"CPU dry run (--cpu), torch {torch.__version__}, {os.cpu_count()} CPUs"
    name = torch.cuda.get_device_name(0)
    return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU, tiny sizes")
    parser.add_argument("--all-reduce-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    if args.all_reduce_probe:
        all_reduce_probe(args.cpu)
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpucheck-") as tmp, moto_server() as storage:
        ctx = Context(args.cpu, Sizes.for_device(args.cpu), storage, Path(tmp))
        upload_dataset(storage.open(), ctx.sizes)
        name = "fine-tune, bf16 autocast + channels_last" if not args.cpu else "fine-tune"
        images = ctx.sizes.classes * ctx.sizes.per_class
        run_step(ctx, f"{name}, {images} training images from S3", finetune)
        run_step(ctx, "torchrun --nproc-per-node 1 -m trainer.train", torchrun_train)
        run_step(ctx, "all-reduce under torchrun (nccl)" if not args.cpu else "all-reduce under "
                 "torchrun (gloo)", nccl_all_reduce)  # fmt: skip
        run_step(ctx, "TorchServe worker: Predict", torchserve_predict)
        run_step(ctx, "ONNX Runtime providers (bench/gpu_onnx.py)", onnx_providers)
    print()
    print(f"{describe_host(args.cpu)}; total {time.perf_counter() - started:.0f} s")
    print()
    print(table(ctx))
    return 0 if all(s.ok for s in ctx.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
