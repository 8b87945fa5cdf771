"""docs/configuration.md is the generator's output, and the settings it lists are exactly the
ones the project reads: every REFIT_* name in the tracked source is declared, and every declared
setting is read somewhere."""

from __future__ import annotations

import re
import subprocess
from fnmatch import fnmatch
from pathlib import Path

from refit import settings_doc
from refit.settings import Setting, declared

REPO = Path(__file__).resolve().parents[2]
REGISTRY = "refit/settings_doc.py"
# Where configuration is read: code outside the tests, and what builds and deploys it.
SOURCE_PATTERNS = (
    "*.py",
    "Dockerfile",
    "*.Dockerfile",
    "docker-compose*.yml",
    "deploy/*.yaml",
    "deploy/*.yml",
    "deploy/*.sh",
    "deploy/*.conf",
    "deploy/*.properties",
    "Makefile",
)
# A name, not a prefix such as REFIT_TLS_* (its trailing underscore).
NAME = re.compile(r"\bREFIT_[A-Z0-9_]*[A-Z0-9]\b(?!_|\*)")


def source_files() -> dict[str, str]:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    return {
        path: (REPO / path).read_text()
        for path in listed
        if not path.startswith("tests/")
        and any(fnmatch(path, pattern) for pattern in SOURCE_PATTERNS)
        and (REPO / path).is_file()
    }


def test_the_reference_is_the_generators_output() -> None:
    assert settings_doc.DOC.read_text() == settings_doc.render(), (
        f"docs/configuration.md is stale: run `{settings_doc.COMMAND}`"
    )


def test_every_refit_variable_in_the_source_is_declared() -> None:
    declared = set(settings_doc.every_setting())
    named = {
        name: path
        for path, text in source_files().items()
        if path != REGISTRY
        for name in NAME.findall(text)
    }
    undeclared = {name: path for name, path in named.items() if name not in declared}
    assert not undeclared, (
        "declare these (refit.settings.setting or declare) and list them in refit/settings_doc.py: "
        f"{undeclared}"
    )


def test_every_declared_setting_is_read_somewhere() -> None:
    files = {path: text for path, text in source_files().items() if path != REGISTRY}
    read = {s.name for s in settings_of_built_classes(files)}
    unread = [
        s.name
        for s in settings_doc.every_setting().values()
        if s.name not in read and not named_outside_its_declaration(s, files)
    ]
    assert not unread, f"declared and documented, but nothing reads them: {unread}"


def settings_of_built_classes(files: dict[str, str]) -> list[Setting]:
    """The fields of the listed settings classes that some process builds (``from_env``), and of
    the settings nested in them."""
    code = "\n".join(text for path, text in files.items() if path.endswith(".py"))
    return [
        setting
        for component in settings_doc.COMPONENTS
        for cls in component.classes
        if re.search(rf"\b{cls.__name__}\.from_env\(|from_env\({cls.__name__}\b", code)
        for setting in declared(cls)
    ]


def named_outside_its_declaration(setting: Setting, files: dict[str, str]) -> bool:
    """Its name in a file that reads it (compose, a script), or the Python name it is declared
    under read (``NAME.value(env)``)."""
    declaration = re.compile(rf'(\w+) = declare\(\s*"{setting.name}"')
    for text in files.values():
        declared = declaration.search(text)
        if declared and any(f"{declared[1]}.value(" in other for other in files.values()):
            return True
        if setting.name in declaration.sub("", text):
            return True
    return False
