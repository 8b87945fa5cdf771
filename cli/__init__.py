"""The ``refit`` command. Each command group lives in its own module with a ``register`` function;
modules are imported only when their group runs, so ``refit predict`` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module that implements it (module.register(subparsers) adds the parser).
COMMAND_MODULES = {
    "predict": "cli.serving",
    "models": "cli.serving",
    "dataset": "cli.dataset",
    "train": "cli.train",
    "retrain": "cli.jobs",
    "jobs": "cli.jobs",
    "job": "cli.jobs",
    "cancel": "cli.jobs",
    "promote": "cli.jobs",
    "rollback": "cli.jobs",
    "versions": "cli.jobs",
    "gc": "cli.gc",
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refit", description="Serve and retrain image classifiers."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else COMMAND_MODULES.values()
    for name in dict.fromkeys(modules):
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
