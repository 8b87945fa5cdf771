"""Prints the pinned requirements of one container role, read from pyproject.toml, so that the
images install exactly what `make install` does and cannot drift from it.

    requirements.py PYPROJECT GROUP...     the requirements of these groups, one per line
    requirements.py PYPROJECT --pins NAME...  the pins of these packages, wherever they appear
    requirements.py PYPROJECT --all        every pin of every group, without extras: a pip
                                           constraints file, so that transitive dependencies
                                           (Pillow under torchserve) get the project's pins

GROUP is ``core`` (the project's own dependencies) or an extra; an extra that names
``refit[a,b]`` includes those extras.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SELF_REFERENCE = re.compile(r"^refit\[(?P<extras>[^\]]+)\]$")
EXTRAS = re.compile(r"\[[^\]]*\]")


def groups(pyproject: Path) -> dict[str, list[str]]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return {"core": project["dependencies"], **project.get("optional-dependencies", {})}


def requirements(table: dict[str, list[str]], names: list[str]) -> list[str]:
    """The requirements of ``names``, self-references expanded, first occurrence kept."""
    found: list[str] = []
    for name in names:
        if name not in table:
            raise SystemExit(f"unknown group {name!r}; known: {', '.join(sorted(table))}")
        for requirement in table[name]:
            nested = SELF_REFERENCE.match(requirement)
            expanded = requirements(table, nested["extras"].split(",")) if nested else [requirement]
            found += [r for r in expanded if r not in found]
    return found


def main(argv: list[str]) -> None:
    pyproject, *names = argv
    table = groups(Path(pyproject))
    pins = sorted({EXTRAS.sub("", r) for r in requirements(table, list(table))})
    if names == ["--all"]:
        print(*pins, sep="\n")
    elif names[:1] == ["--pins"]:
        print(*(p for p in pins if p.partition("==")[0] in names[1:]), sep="\n")
    else:
        print(*requirements(table, names), sep="\n")


if __name__ == "__main__":
    main(sys.argv[1:])
