"""core.params: coercion, bounds and parsing shared by every command."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from core.params import InputError, build_parser, from_args, from_kwargs, param


@dataclass(frozen=True)
class Example:
    name: str = param("a", "a name", choices=("a", "b"))
    count: int = param(3, "a count", ge=1, le=10)
    ratio: float | None = param(None, "a ratio", ge=0)
    flag: bool = param(False, "a flag")


def test_defaults_and_none_fall_back():
    assert from_kwargs(Example) == Example()
    assert from_kwargs(Example, count=None).count == 3  # Cog passes missing inputs as None


def test_coercion():
    ex = from_kwargs(Example, count="4", ratio="0.5", flag="true")
    assert (ex.count, ex.ratio, ex.flag) == (4, 0.5, True)


@pytest.mark.parametrize(
    "kw,name",
    [({"name": "c"}, "name"), ({"count": 0}, "count"), ({"count": 11}, "count"), ({"count": 2.5}, "count"),
     ({"ratio": -1}, "ratio"), ({"flag": "maybe"}, "flag"), ({"other": 1}, "other")],
)  # fmt: skip
def test_errors_name_the_input(kw, name):
    with pytest.raises(InputError) as err:
        from_kwargs(Example, **kw)
    assert err.value.name == name and f"'{name}'" in str(err.value)


def test_cli():
    assert from_args(Example, ["--count", "5", "--flag", "yes", "--ratio", "none"]) == Example(count=5, flag=True)
    with pytest.raises(SystemExit):
        build_parser(Example).parse_args(["--name", "z"])
