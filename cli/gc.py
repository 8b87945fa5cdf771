"""``refit gc [--dry-run]``: remove archives no version record needs and checkpoints of ended
jobs (refit/gc.py says exactly what is kept). Works on the object store directly, configured from
the environment like ``refit dataset`` (REFIT_DATA_DIR or MINIO_ENDPOINT; REFIT_BUCKET)."""

from __future__ import annotations

import argparse
import json
import os

from refit.gc import collect_garbage
from refit.shared_settings import BUCKET
from refit.storage import StorageSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("gc", help="remove archives and checkpoints nothing needs")
    parser.add_argument("--bucket", default=BUCKET.value(os.environ))
    parser.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(run=run_gc)


def run_gc(args: argparse.Namespace) -> int:
    store = StorageSettings.from_env().open()
    garbage = collect_garbage(store, args.bucket, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **vars(garbage)}, indent=1))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for key in garbage.all():
        print(f"{verb} s3://{args.bucket}/{key}")
    print(
        f"{verb} {len(garbage.archives)} archives, {len(garbage.weights)} weights, "
        f"{len(garbage.checkpoints)} checkpoints"
    )
    return 0
