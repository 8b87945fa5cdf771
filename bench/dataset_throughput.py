"""Images per second delivered to a training loop by five ways of reading the same images.

    (a) refit per-object streaming dataset      (trainer.data, bounded concurrent GETs)
    (b) refit packed shards                     (trainer.data, WebDataset tar shards)
    (c) naive map-style Dataset                 (one blocking GET per __getitem__)
    (d) the webdataset library, same shards     (curl on presigned URLs)
    (e) torchvision ImageFolder on local disk   (the ceiling)
    (b') (b) from the embedded FileStore        (same local disk as (e): the format's own cost)

Same images, decode (PIL -> RGB), transform, batch size and worker count for all five. An epoch
is timed from creating the DataLoader iterator (worker start included) to the last batch; each
case runs whole epochs until --min-seconds have passed (at least one) and reports the median
epoch, since sub-second epochs on a shared 2-core machine are noisy. By default it starts a moto
S3 server (single-threaded: a few hundred GETs/s at most, which caps (a) and (c)); pass
--endpoint to measure a real MinIO instead. --latency-ms puts a loopback proxy in front of the
server that delays every request, like an object store across a network. Images: the first N of
Fashion-MNIST when /usr/share/datasets/fashion-mnist is present (apt package
dataset-fashion-mnist), else generated.

    PYTHONPATH=. .venv/bin/python bench/dataset_throughput.py --images 3000 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from refit.storage import FileStore, ObjectStore, S3Store, S3Uri, StorageSettings
from trainer.data import ReadOptions, open_dataset
from trainer.data.decode import DecodeOptions, decode_image
from trainer.data.pack import PackOptions, pack_dataset
from trainer.data.upload import upload_dir

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "tshirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "boot",
)  # fmt: skip
TARGETS = {"(a)/(c)": 3.0, "(b)/(e)": 0.8, "(b)/(d)": 1.0, "(b')/(e)": 0.8}


@dataclass(frozen=True)
class BenchConfig:
    images: int = 3000
    workers: int = 2
    batch_size: int = 64
    in_flight: int = 8
    image_size: int = 32
    endpoint: str = ""
    latency_ms: float = 0.0
    min_seconds: float = 3.0


@dataclass(frozen=True)
class Result:
    name: str
    images: int  # per epoch
    seconds: tuple[float, ...]  # one per epoch

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        return self.images / self.median_seconds


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--in-flight", type=int, default=8, help="(a): GETs in flight per worker")
    parser.add_argument("--image-size", type=int, default=32, help="transform's output size")
    parser.add_argument("--endpoint", default="", help="S3 endpoint; empty: start moto")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="per case (see above)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    config = BenchConfig(
        images=args.images,
        workers=args.workers,
        batch_size=args.batch_size,
        in_flight=args.in_flight,
        image_size=args.image_size,
        endpoint=args.endpoint,
        latency_ms=args.latency_ms,
        min_seconds=args.min_seconds,
    )
    return config, args.json


def labelled_images(n: int) -> Iterator[tuple[bytes, str]]:
    """PNG bytes and class name: Fashion-MNIST if installed, else generated noise images."""
    images_gz = FASHION_MNIST / "train-images-idx3-ubyte.gz"
    if images_gz.exists():
        raw_pixels = gzip.decompress(images_gz.read_bytes())
        pixels = np.frombuffer(raw_pixels, np.uint8, offset=16).reshape(-1, 28, 28)
        raw_labels = gzip.decompress((FASHION_MNIST / "train-labels-idx1-ubyte.gz").read_bytes())
        labels = np.frombuffer(raw_labels, np.uint8, offset=8)
        for i in range(n):
            yield _png(Image.fromarray(pixels[i], mode="L")), FASHION_CLASSES[labels[i]]
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        array = rng.integers(0, 255, (28, 28), dtype=np.uint8)
        yield _png(Image.fromarray(array, mode="L")), FASHION_CLASSES[i % 10]


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_local(root: Path, n: int) -> int:
    total = 0
    for i, (data, cls) in enumerate(labelled_images(n)):
        path = root / cls / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        total += len(data)
    return total


class NaiveObjects(Dataset):
    """(c): what a first attempt looks like: a map-style Dataset, one blocking GET per item."""

    def __init__(
        self,
        store: ObjectStore,
        bucket: str,
        keys: list[str],
        labels: list[int],
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        self.store, self.bucket, self.keys, self.labels = store, bucket, keys, labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = decode_image(self.store.get(self.bucket, self.keys[i]), DecodeOptions())
        return self.transform(image), self.labels[i]


class LatencyProxy:
    """TCP proxy on a free loopback port; every client->server chunk (a request) waits
    ``delay_s`` first, so each request costs at least one simulated network delay. It runs in
    its own process so that it does not take the GIL from the training loop being measured."""

    def __init__(self, target: str, delay_s: float) -> None:
        host, _, port = target.removeprefix("http://").partition(":")
        self.target_host, self.target_port, self.delay_s = host, int(port), delay_s
        ports: multiprocessing.Queue = multiprocessing.Queue()
        self.process = multiprocessing.Process(target=self._serve, args=(ports,), daemon=True)
        self.process.start()
        self.port = ports.get(timeout=30)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, ports: multiprocessing.Queue) -> None:
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        ports.put(server.sockets[0].getsockname()[1])
        loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        await asyncio.gather(
            self._pump(reader, up_writer, self.delay_s), self._pump(up_reader, writer, 0.0)
        )

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
        try:
            while data := await src.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()

    def close(self) -> None:
        self.process.terminate()
        self.process.join(10)


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"http://127.0.0.1:{port}"
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("moto_server did not start")


def time_epoch(loader: Iterable) -> tuple[int, float]:
    started, count = time.perf_counter(), 0
    for images, _ in loader:
        count += len(images)  # a real loop would train here; this measures delivery only
    return count, time.perf_counter() - started


def time_cases(
    cases: list[tuple[str, Callable[[int], Iterable]]], min_seconds: float
) -> list[Result]:
    """Rounds of one epoch per case, round-robin so that load from elsewhere on the machine
    falls on every case alike; a case leaves once its epochs add up to ``min_seconds``."""
    seconds: dict[str, list[float]] = {name: [] for name, _ in cases}
    counts: dict[str, int] = {}
    while pending := [(n, m) for n, m in cases if sum(seconds[n]) < min_seconds or not seconds[n]]:
        for name, make_loader in pending:
            counts[name], elapsed = time_epoch(make_loader(len(seconds[name])))
            seconds[name].append(elapsed)
    results = [Result(name, counts[name], tuple(seconds[name])) for name, _ in cases]
    for r in results:
        print(
            f"  {r.name:<50} {r.images:>5} images {r.median_seconds:>7.2f} s "
            f"{r.rate:>7.0f} img/s  (median of {len(r.seconds)} epochs)"
        )
    return results


def run(config: BenchConfig, workdir: Path) -> list[Result]:
    transform = transforms.Compose([transforms.Resize(config.image_size), transforms.ToTensor()])
    settings = StorageSettings(endpoint=config.endpoint, access_key="bench", secret_key="bench")
    store = S3Store(settings)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    local = workdir / "images"
    size = write_local(local, config.images)
    print(f"{config.images} PNG images, {size / config.images:.0f} B each on average")

    started = time.perf_counter()
    upload_dir(store, local, S3Uri(bucket, "ds"), jobs=8)
    print(f"upload: {time.perf_counter() - started:.1f} s")
    per_shard = max(1, config.images // (4 * max(1, config.workers)))
    started = time.perf_counter()
    options = PackOptions(val_fraction=0.0, max_shard_samples=per_shard)
    index = pack_dataset(store, S3Uri(bucket, "ds"), S3Uri(bucket, "packed"), options)
    shards = index.splits["train"]
    elapsed = time.perf_counter() - started
    print(f"pack: {len(shards)} shards of <= {per_shard} images, {elapsed:.1f} s")

    def loader(dataset: Dataset, shuffle: bool | None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=config.batch_size, num_workers=config.workers, shuffle=shuffle
        )

    read = ReadOptions(in_flight=config.in_flight, batch_size=config.batch_size)

    def refit_loader(uri: str, epoch: int) -> DataLoader:
        ds = open_dataset(uri, store=store, transform=transform, val_fraction=0.0, options=read)
        ds.set_epoch(epoch)
        return loader(ds, shuffle=None)

    keys = sorted(o.key for o in store.list(bucket, "ds/"))
    classes = sorted({k.split("/")[1] for k in keys})
    labels = [classes.index(k.split("/")[1]) for k in keys]
    urls = [store.url(bucket, f"packed/{s.key}") for s in shards]
    webdataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .shuffle(2000)
        .decode("pil")
        .to_tuple("png", "cls")
        .map_tuple(lambda image: transform(image.convert("RGB")), int)
    )
    naive = NaiveObjects(store, bucket, keys, labels, transform)
    folder = datasets.ImageFolder(str(local), transform=transform)
    local_store = FileStore(workdir / "objects")  # (b) again, from local disk like (e)
    upload_dir(local_store, local, S3Uri("local", "ds"), jobs=2)
    pack_dataset(local_store, S3Uri("local", "ds"), S3Uri("local", "packed"), options)

    def local_packed(epoch: int) -> DataLoader:
        ds = open_dataset(
            "s3://local/packed", store=local_store, transform=transform, val_fraction=0.0
        )
        ds.set_epoch(epoch)
        return loader(ds, shuffle=None)

    cases: list[tuple[str, Callable[[int], Iterable]]] = [
        ("(a) refit per-object streaming", lambda e: refit_loader(f"s3://{bucket}/ds", e)),
        ("(b) refit packed shards", lambda e: refit_loader(f"s3://{bucket}/packed", e)),
        ("(c) naive map-style, one GET per item", lambda e: loader(naive, shuffle=True)),
        ("(d) webdataset library, same shards", lambda e: loader(webdataset, shuffle=None)),
        ("(e) torchvision ImageFolder, local disk", lambda e: loader(folder, shuffle=True)),
        ("(b') refit packed shards, FileStore on local disk", local_packed),
    ]
    return time_cases(cases, config.min_seconds)


def report(results: list[Result]) -> dict[str, float]:
    rate = {r.name.split()[0]: r.rate for r in results}
    ratios = {
        "(a)/(c)": rate["(a)"] / rate["(c)"],
        "(b)/(e)": rate["(b)"] / rate["(e)"],
        "(b)/(d)": rate["(b)"] / rate["(d)"],
        "(b')/(e)": rate["(b')"] / rate["(e)"],
    }
    print("ratios (target):")
    for name, value in ratios.items():
        verdict = "met" if value >= TARGETS[name] else "MISSED"
        print(f"  {name} = {value:.2f}  (>= {TARGETS[name]:g}: {verdict})")
    return ratios


def main(argv: list[str] | None = None) -> int:
    config, json_path = parse_args(argv)
    moto = proxy = None
    if not config.endpoint:
        moto, endpoint = start_moto()
        config = replace(config, endpoint=endpoint)
        print(f"S3 server: moto at {endpoint} (single-threaded)")
    if config.latency_ms:
        proxy = LatencyProxy(config.endpoint, config.latency_ms / 1000)
        config = replace(config, endpoint=proxy.endpoint)
        print(f"every request delayed {config.latency_ms:g} ms by a proxy at {proxy.endpoint}")
    print(
        f"workers={config.workers} batch_size={config.batch_size} in_flight={config.in_flight} "
        f"torch threads={torch.get_num_threads()} load average={os.getloadavg()[0]:.1f}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="refit-bench-"))
    try:
        results = run(config, workdir)
        ratios = report(results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if proxy is not None:
            proxy.close()
        if moto is not None:
            moto.terminate()
            moto.wait(10)
    if json_path:
        rates = {r.name: {"img_per_s": round(r.rate, 1), "epochs_s": r.seconds} for r in results}
        payload = {"config": asdict(config), "rates": rates, "ratios": ratios}
        json_path.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
