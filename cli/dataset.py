"""``refit dataset``: upload, inspect and pack ImageFolder datasets in the object store.

The store comes from the environment (``StorageSettings.from_env()``: MINIO_ENDPOINT etc.; no
endpoint means the embedded FileStore). Every command prints a readable summary, or JSON with
``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from refit.storage import ObjectStore, S3Uri, StorageError, StorageSettings

if TYPE_CHECKING:
    from trainer.data.index import PackIndex


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dataset", help="upload, inspect and pack training datasets")
    commands = parser.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)

    upload = commands.add_parser("upload", help="copy a local DIR/<class>/<image> tree (resumable)")
    upload.add_argument("source", type=Path, metavar="DIR")
    upload.add_argument("dst", type=S3Uri.parse, metavar="s3://BUCKET/PREFIX")
    upload.add_argument("--jobs", type=_positive, default=8, help="parallel uploads (default 8)")
    _common(upload, run_upload)

    stats = commands.add_parser("stats", help="classes, counts, bytes and bad files")
    stats.add_argument("uri", type=S3Uri.parse, metavar="s3://BUCKET/PREFIX")
    stats.add_argument("--val-fraction", type=float, default=0.2)
    stats.add_argument("--no-verify", action="store_true", help="don't decode every image")
    stats.add_argument("--jobs", type=_positive, default=8, help="parallel reads (default 8)")
    _common(stats, run_stats)

    pack = commands.add_parser("pack", help="write WebDataset tar shards and an index")
    pack.add_argument("src", type=S3Uri.parse, metavar="SRC")
    pack.add_argument("dst", type=S3Uri.parse, metavar="DST")
    pack.add_argument("--val-fraction", type=float, default=0.2)
    pack.add_argument("--shard-mb", type=float, default=64.0, help="max shard size (default 64)")
    pack.add_argument("--shard-samples", type=_positive, default=10_000)
    pack.add_argument("--seed", type=int, default=0, help="order of samples across shards")
    pack.add_argument("--jobs", type=_positive, default=8, help="parallel reads (default 8)")
    _common(pack, run_pack)


def _common(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(run=_reporting_errors(func))


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _reporting_errors(
    func: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Expected failures print one line (their ``message``) and exit 1; bugs keep a traceback."""

    def run(args: argparse.Namespace) -> int:
        from trainer.data import DatasetError

        try:
            return func(args)
        except (DatasetError, StorageError) as exc:
            print(f"refit dataset {args.dataset_command}: {exc.message}", file=sys.stderr)
            return 1
        except (FileNotFoundError, ValueError) as exc:
            print(f"refit dataset {args.dataset_command}: {exc}", file=sys.stderr)
            return 1

    return run


def _store() -> ObjectStore:
    return StorageSettings.from_env().open()


def run_upload(args: argparse.Namespace) -> int:
    from trainer.data.upload import upload_dir

    report = upload_dir(_store(), args.source, args.dst, jobs=args.jobs)
    if args.json:
        return _print_json(asdict(report))
    print(f"uploaded {report.uploaded} images ({_size(report.bytes_uploaded)}) to {args.dst}")
    print(f"skipped  {report.skipped} already present with the same content")
    if report.ignored:
        print(f"ignored  {len(report.ignored)} non-image files, e.g. {report.ignored[0]}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from trainer.data.open import read_index
    from trainer.data.retry import RetryPolicy
    from trainer.data.stats import dataset_stats

    store = _store()
    index = read_index(store, args.uri, RetryPolicy())
    if index is not None:
        return _print_pack(args, index)
    stats = dataset_stats(
        store, args.uri, val_fraction=args.val_fraction, verify=not args.no_verify, jobs=args.jobs
    )
    if args.json:
        return _print_json(asdict(stats))
    print(f"{stats.uri}  ({stats.split_mode} split, digest {stats.digest[:12]})")
    print(f"{stats.images} images, {_size(stats.bytes)}, {len(stats.class_names)} classes")
    width = max((len(name) for name in stats.class_names), default=5)
    print(f"  {'class':<{width}}  {'train':>8}  {'val':>8}")
    for name in stats.class_names:
        train, val = stats.counts["train"][name], stats.counts["val"][name]
        print(f"  {name:<{width}}  {train:>8}  {val:>8}")
    if stats.ignored:
        print(f"ignored {len(stats.ignored)} objects outside class folders or not images:")
        for key in stats.ignored[:10]:
            print(f"  {key}")
    if stats.bad is None:
        print("bad files: not checked (--no-verify)")
    else:
        print(f"bad files: {len(stats.bad)}")
        for bad in stats.bad:
            print(f"  {bad.key}: {bad.reason} ({bad.detail})")
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from trainer.data.pack import PackOptions, pack_dataset

    options = PackOptions(
        val_fraction=args.val_fraction,
        max_shard_bytes=int(args.shard_mb * 2**20),
        max_shard_samples=args.shard_samples,
        in_flight=args.jobs,
        seed=args.seed,
    )
    index = pack_dataset(_store(), args.src, args.dst, options)
    return _print_pack(args, index, destination=args.dst)


def _print_pack(
    args: argparse.Namespace, index: PackIndex, destination: S3Uri | None = None
) -> int:
    if args.json:
        return _print_json(asdict(index))
    where = destination or args.uri
    print(f"{where}  (packed from {index.source}, {index.split_mode} split)")
    for split, shards in index.splits.items():
        size = _size(sum(s.size for s in shards))
        print(f"  {split:<5} {index.count(split):>8} samples in {len(shards)} shards, {size}")
    print(f"  classes: {', '.join(index.class_names)}")
    return 0


def _print_json(payload: dict) -> int:
    json.dump(payload, sys.stdout, indent=2, default=str)
    print()
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
