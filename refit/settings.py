"""One way to read configuration. Each setting is a field of a frozen dataclass, declared once
with its variable, default and a line of documentation (``setting``); ``from_env`` reads them
all, nested settings included (``nested``), and the class's ``__post_init__`` validates.
docs/configuration.md is generated from these declarations (refit/settings_doc.py).

A variable that is unset keeps the field's default; so does an empty one, except for strings
(an empty string is a value). A value that does not parse is a ValueError naming both."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
SETTING = "refit.setting"  # the dataclass field metadata key of a Setting
NESTED = "refit.nested"  # ... of a settings dataclass read from the same environment
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in TRUE + FALSE:
        raise ValueError(f"expected one of {', '.join(TRUE + FALSE)}")
    return value in TRUE


def parse_list(raw: str) -> tuple[str, ...]:
    """Comma-separated; blanks dropped."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def parse_optional_int(raw: str) -> int | None:
    """``auto`` (or empty): None, the caller chooses."""
    return None if raw.strip().lower() in ("", "auto") else int(raw)


def parse_choice(*choices: str) -> Callable[[str], str]:
    """One of ``choices``; the docs name them as the type."""

    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return raw

    parse.__name__ = " or ".join(choices)
    return parse


TYPE_NAMES: dict[Callable[[str], Any], str] = {
    str: "string",
    int: "integer",
    float: "number",
    parse_bool: "boolean",
    Path: "path",
    parse_list: "list (comma-separated)",
    parse_optional_int: "integer or auto",
}
_BY_DEFAULT: dict[type, Callable[[str], Any]] = {
    str: str,
    int: int,
    float: float,
    bool: parse_bool,
    tuple: parse_list,
}


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, default, what it does and how its value is parsed.
    ``shown`` replaces the default in the docs where it is computed or absent."""

    name: str
    default: Any
    doc: str
    parse: Callable[[str], Any] = str
    shown: str | None = None
    secret: bool = False

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.parse, getattr(self.parse, "__name__", "string"))

    @property
    def shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, tuple):
            return ",".join(self.default)
        return "" if self.default is None else str(self.default)

    def value(self, env: Mapping[str, str]) -> Any:
        """The parsed value ``env`` gives, or the default."""
        raw = env.get(self.name)
        if raw is None or (raw == "" and self.parse is not str):
            return self.default
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{self.name}={raw!r} is not a valid {self.type_name}: {exc}") from exc


def declare(
    name: str,
    default: Any,
    doc: str,
    *,
    parse: Callable[[str], Any] | None = None,
    shown: str | None = None,
    secret: bool = False,
) -> Setting:
    """A setting parsed by its default's type unless ``parse`` is given (Path for a Path
    default; a None default needs ``parse``)."""
    if parse is None:
        parse = Path if isinstance(default, Path) else _BY_DEFAULT[type(default)]
    return Setting(name, default, doc, parse, shown, secret)


def setting(name: str, default: Any, doc: str, **options: Any) -> Any:
    """A dataclass field read from the variable ``name`` (``declare``'s options)."""
    return field_for(declare(name, default, doc, **options))


def field_for(declared: Setting) -> Any:
    """A dataclass field read from a setting declared elsewhere (one several processes read).
    A secret is left out of the repr."""
    return field(default=declared.default, repr=not declared.secret, metadata={SETTING: declared})


def nested(cls: type) -> Any:
    """A field holding another settings dataclass, read from the same environment (by its own
    ``from_env`` when it has one)."""
    return field(default_factory=cls, metadata={NESTED: cls})


def declared(cls: type) -> list[Setting]:
    """The settings ``cls`` reads, its nested classes' included, in declaration order."""
    found: list[Setting] = []
    for f in fields(cls):
        if SETTING in f.metadata:
            found.append(f.metadata[SETTING])
        elif NESTED in f.metadata:
            found += declared(f.metadata[NESTED])
    return found


def declaration(cls: type, name: str) -> Setting:
    """The setting behind ``cls``'s field ``name``: to read that one variable alone."""
    return next(f.metadata[SETTING] for f in fields(cls) if f.name == name)


def from_env(cls: type[T], env: Mapping[str, str] | None = None, **given: Any) -> T:
    """``cls`` built from ``env`` (the process's environment by default); ``given`` fields are
    taken as they are."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in given:
            continue
        if SETTING in f.metadata:
            values[f.name] = f.metadata[SETTING].value(env)
        elif NESTED in f.metadata:
            sub = f.metadata[NESTED]
            values[f.name] = sub.from_env(env) if hasattr(sub, "from_env") else from_env(sub, env)
    return cls(**values, **given)
