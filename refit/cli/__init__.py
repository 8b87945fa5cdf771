"""The ``refit`` command. Each command group lives in its own module with a ``register`` function;
modules are imported only when their group runs, so ``refit predict`` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module that implements it (module.register(subparsers) adds the parser).
COMMAND_MODULES = {
    "predict": "refit.cli.serving",
    "models": "refit.cli.serving",
    "dataset": "refit.cli.dataset",
    "train": "refit.cli.train",
    "retrain": "refit.cli.jobs",
    "jobs": "refit.cli.jobs",
    "job": "refit.cli.jobs",
    "cancel": "refit.cli.jobs",
    "promote": "refit.cli.jobs",
    "rollback": "refit.cli.jobs",
    "versions": "refit.cli.jobs",
    "gc": "refit.cli.gc",
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
