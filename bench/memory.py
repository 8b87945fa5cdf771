"""Memory that does not grow with every version: 20 models x 5 versions on one machine.

One stack (bench/local_stack.py: embedded store, a real TorchServe, the service as its own
process; no trainer). imagenet v1's archive (EfficientNet-Lite0, the real served model) is
recorded as ``--models`` models with ``--versions`` versions each (the archive repackaged with
each version in its manifest), v1 the default of each. The service registers them as it ships:
defaults with a worker, within ``REFIT_MAX_WARM_WORKERS``, the rest without.

It then reports, for the stack's whole process tree (TorchServe's JVM, every worker, the service):
the sum of RSS (what the issue measured; it counts the torch libraries each worker maps once per
worker) and the sum of PSS (shared pages split between their users: the memory actually used),
after publishing and after one Predict naming every version (cold ones start a worker first: their
first-call latency, p50 and max). The naive way (every version its own worker) is measured on a
separate TorchServe for ``--naive`` versions and extrapolated to all of them, and says so.

Usage: .venv/bin/python bench/memory.py [--models 20] [--versions 5] [--max-warm 10] [--naive 10]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import statistics
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psutil
from running_stack import running_stack
from skimage import data

from cli.client import ClientSettings, connect
from local_stack.torchserve import TorchServePorts, TorchServeProcess, allowed_urls_for
from refit.netutil import free_port
from refit.registry import Registry, VersionRecord
from refit.storage import ObjectStore, StorageSettings
from refit.torchserve import TorchServeClient
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from trainer.base_model import publish_base_model

GiB = 1 << 30


def with_version(archive: bytes, version: str) -> bytes:
    """The same .mar with ``version`` in its manifest (TorchServe reads the version there)."""
    target = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            content = old.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(content)
                manifest["model"]["modelVersion"] = version
                content = json.dumps(manifest).encode()
            new.writestr(item, content)
    return target.getvalue()


def record_versions(data_dir: Path, models: int, versions: int) -> list[tuple[str, str]]:
    store = StorageSettings(data_dir=data_dir).open()
    registry = Registry(store, "refit")
    source = registry.get("imagenet", "1")
    archive = store.get("refit", source.archive_key)
    archives = {str(v): with_version(archive, str(v)) for v in range(1, versions + 1)}
    names = []
    for m in range(models):
        model = f"model-{m:02d}"
        for version, content in archives.items():
            key = Registry.archive_key(model, hashlib.sha256(content).hexdigest())
            store.put("refit", key, content)
            registry.add(VersionRecord(model, version, key, source.class_names))
            names.append((model, version))
        registry.set_default(model, "1")
    return names


def tree_memory(root: psutil.Process) -> tuple[int, int, int]:
    """(processes, sum of RSS, sum of PSS) over ``root``'s descendants."""
    count = rss = pss = 0
    for process in root.children(recursive=True):
        try:
            info = process.memory_full_info()
        except psutil.Error:
            continue
        count, rss, pss = count + 1, rss + info.rss, pss + info.pss
    return count, rss, pss


def show(label: str, memory: tuple[int, int, int]) -> None:
    count, rss, pss = memory
    print(f"{label:44s} {count:3d} processes  RSS sum {rss / GiB:6.2f} GiB  PSS sum "
          f"{pss / GiB:6.2f} GiB", flush=True)  # fmt: skip


def wait_registered(stub: refit_pb2_grpc.RefitStub, expected: int, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        models = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        done = sum(v.registration == pb.ModelVersion.REGISTERED for m in models for v in m.versions)
        if done >= expected:
            return time.monotonic() - start
        time.sleep(2)
    raise TimeoutError(f"not every version registered within {timeout_s:.0f}s")


def predict_each(stub, names: list[tuple[str, str]], image: bytes) -> list[tuple[str, float]]:
    """One Predict naming each version: (kind, seconds); kind 'default' or 'other'."""
    timings = []
    for model, version in names:
        start = time.perf_counter()
        answer = stub.Predict(
            pb.PredictRequest(image=image, model=model, version=version), timeout=180
        )
        seconds = time.perf_counter() - start
        assert answer.version == version and 281 <= answer.predictions[0].index <= 285, answer
        timings.append(("default" if version == "1" else "other", seconds))
    return timings


@contextlib.contextmanager
def torchserve_alone(
    prefix: str, versions: int
) -> Iterator[tuple[ObjectStore, TorchServeClient, list[VersionRecord]]]:
    """A TorchServe of its own (no service), and imagenet v1's archive recorded as ``versions``
    versions of one model: (store, client, records)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        home = Path(tmp)
        store = StorageSettings(data_dir=home).open()
        publish_base_model(store, "refit")
        registry = Registry(store, "refit")
        records = [registry.get(m, v) for m, v in record_versions(home, 1, versions)]
        ports = TorchServePorts(*(free_port() for _ in range(5)))
        torchserve = TorchServeProcess(
            home / "ts", ports, allowed_urls_for((home / "objects").as_uri())
        )
        torchserve.start()
        client = TorchServeClient(
            f"127.0.0.1:{ports.grpc_inference}",
            f"127.0.0.1:{ports.grpc_management}",
            keys=torchserve.key_source(),
        )
        try:
            time.sleep(3)  # the gRPC ports open a moment after /ping answers
            yield store, client, records
        finally:
            client.close()
            torchserve.stop()


def naive(count: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """TorchServe alone, then with ``count`` versions with a worker each (no service)."""
    with torchserve_alone("refit-naive-", count) as (store, client, records):
        alone = tree_memory(psutil.Process())
        for record in records:
            url = store.url("refit", record.archive_key)
            client.register(record.model, record.version, url, workers=1)
        return alone, tree_memory(psutil.Process())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--max-warm", type=int, default=10, help="REFIT_MAX_WARM_WORKERS")
    parser.add_argument("--naive", type=int, default=10, help="versions measured the naive way")
    args = parser.parse_args()
    total = args.models * args.versions
    available = psutil.virtual_memory().available / GiB
    print(f"machine: {os.cpu_count()} cores, {available:.1f} GiB available at start", flush=True)
    env = {"REFIT_MAX_WARM_WORKERS": str(args.max_warm)}
    with running_stack(env=env) as stack:
        names = record_versions(stack.data_dir, args.models, args.versions)
        settings = ClientSettings(stack.address, token=stack.admin_token)
        with connect(settings) as channel:
            stub = refit_pb2_grpc.RefitStub(channel)
            took = wait_registered(stub, total + 1, timeout_s=1800)  # + imagenet v1
            print(f"{total} versions (+ imagenet v1) registered {took:.0f}s after recording")
            time.sleep(5)
            published = tree_memory(psutil.Process())
            show(f"after publishing {args.models}x{args.versions}", published)
            image = _cat_jpeg()
            start = time.monotonic()
            timings = predict_each(stub, names, image)
            print(f"one Predict naming each of the {total} versions: all answered "
                  f"(cat, the right version) in {time.monotonic() - start:.0f}s")  # fmt: skip
            for kind in ("default", "other"):
                seconds = sorted(s for k, s in timings if k == kind)
                print(f"  {kind:8s} versions: {len(seconds)} calls, p50 "
                      f"{statistics.median(seconds):.2f}s, max {max(seconds):.2f}s")  # fmt: skip
            after = tree_memory(psutil.Process())
            show("after one Predict per version", after)
    if args.naive:
        alone, measured = naive(args.naive)
        show("naive: TorchServe alone", alone)
        show(f"naive: {args.naive} versions, a worker each", measured)
        per_rss = (measured[1] - alone[1]) / args.naive
        per_pss = (measured[2] - alone[2]) / args.naive
        print(f"naive, per worker: RSS {per_rss / GiB:.2f} GiB, PSS {per_pss / GiB:.2f} GiB; "
              f"extrapolated to {total} versions (not measured): RSS sum "
              f"{(alone[1] + total * per_rss) / GiB:.1f} GiB, PSS sum "
              f"{(alone[2] + total * per_pss) / GiB:.1f} GiB")  # fmt: skip


def _cat_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, "JPEG")
    return buffer.getvalue()


if __name__ == "__main__":
    main()
