"""One parser for every settings class: declared fields read from the environment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from refit.settings import (
    declaration,
    declare,
    field_for,
    from_env,
    nested,
    parse_choice,
    parse_optional_int,
    setting,
)

SHARED = declare("T_SHARED", "s", "read by two classes")


@dataclass(frozen=True)
class Inner:
    path: Path | None = setting("T_PATH", None, "a path", parse=Path)
    shared: str = field_for(SHARED)


@dataclass(frozen=True)
class Outer:
    count: int = setting("T_COUNT", 3, "an int")
    ratio: float = setting("T_RATIO", 0.5, "a float")
    flag: bool = setting("T_FLAG", False, "a bool")
    names: tuple[str, ...] = setting("T_NAMES", ("a",), "a list")
    text: str = setting("T_TEXT", "x", "a string")
    secret: str = setting("T_SECRET", "", "a secret", secret=True)
    inner: Inner = nested(Inner)
    plain: str = "kept"


def test_unset_variables_keep_the_defaults() -> None:
    assert from_env(Outer, {}) == Outer()


def test_each_type_is_parsed() -> None:
    env = {
        "T_COUNT": "7",
        "T_RATIO": "1.5",
        "T_FLAG": "yes",
        "T_NAMES": "a, b,,c",
        "T_TEXT": "y",
        "T_PATH": "/tmp/f",
        "T_SHARED": "t",
    }
    settings = from_env(Outer, env)
    assert (settings.count, settings.ratio, settings.flag) == (7, 1.5, True)
    assert (settings.names, settings.text) == (("a", "b", "c"), "y")
    assert settings.inner == Inner(Path("/tmp/f"), "t")


def test_empty_keeps_the_default_except_for_strings() -> None:
    settings = from_env(Outer, {"T_COUNT": "", "T_PATH": "", "T_TEXT": ""})
    assert (settings.count, settings.inner.path, settings.text) == (3, None, "")


@pytest.mark.parametrize(
    ("name", "value"), [("T_COUNT", "many"), ("T_RATIO", "1,5"), ("T_FLAG", "maybe")]
)
def test_a_bad_value_names_the_variable_and_the_value(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}='{value}' is not a valid"):
        from_env(Outer, {name: value})


def test_given_fields_are_taken_as_they_are() -> None:
    assert from_env(Outer, {"T_COUNT": "7"}, count=9).count == 9


def test_a_secret_is_left_out_of_the_repr() -> None:
    assert "hunter2" not in repr(from_env(Outer, {"T_SECRET": "hunter2"}))


def test_one_setting_read_alone() -> None:
    assert declaration(Outer, "count").value({"T_COUNT": "4"}) == 4
    assert SHARED.value({}) == "s"


def test_choices_and_optional_ints() -> None:
    mode = declare("T_MODE", "a", "a choice", parse=parse_choice("a", "b"))
    assert mode.type_name == "a or b"
    with pytest.raises(ValueError, match="expected one of a, b"):
        mode.value({"T_MODE": "c"})
    assert (parse_optional_int("auto"), parse_optional_int("2")) == (None, 2)
