"""Every bench command the docs quote names a script in bench/ that exists and a flag its parser
defines, so a figure's command still runs after the script changes (docs/benchmarks.md, *Where
each figure comes from*). Read from the sources: nothing is imported or run."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `bench/x.py` and what follows it on its line; not tests/bench/..., and up to a closing backtick.
COMMAND = re.compile(r"(?<![\w/])bench/(\w+)\.py([^`\n]*)")


def documented_commands() -> list[tuple[str, str, str]]:
    """(doc, script, flag) for every flag after a bench script in the docs."""
    found = []
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())  # shell continuation lines joined
        for script, rest in COMMAND.findall(text):
            flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", rest.split("#")[0])
            found += [(doc.name, script, flag) for flag in flags] or [(doc.name, script, "")]
    return found


def parser_flags(script: str) -> set[str]:
    tree = ast.parse((ROOT / "bench" / f"{script}.py").read_text())
    return {
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")
    } | {"--help"}


COMMANDS = documented_commands()


def test_the_docs_quote_bench_commands() -> None:
    assert {script for _, script, _ in COMMANDS} >= {"retrain_timing", "predict_latency"}


@pytest.mark.parametrize(("doc", "script", "flag"), sorted(set(COMMANDS)))
def test_each_documented_flag_exists_in_its_script(doc: str, script: str, flag: str) -> None:
    assert (ROOT / "bench" / f"{script}.py").is_file(), f"{doc}: no bench/{script}.py"
    if flag:
        assert flag in parser_flags(script), f"{doc}: bench/{script}.py has no {flag}"
