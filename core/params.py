"""One definition per command: a frozen dataclass whose fields are both the Cog inputs and the CLI flags.

Each input is declared once, as a `param(...)` field carrying everything known about it: Cog's `Input()` metadata
(description, bounds, choices, file, secret) and our own facts (`used_by`, `must_match_on_resume`, `prepare`).
Cog needs literal `Input(...)` defaults in the `predict`/`train` signature (its schema is read statically), so
`scripts/cog_signatures.py` writes those signatures from the dataclasses; `build_parser` makes the CLI from them.
An input two commands share is declared in one and reused in the other with `same_as`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing as tp

from core.errors import InputError

__all__ = [
    "InputError",
    "param",
    "build_parser",
    "from_args",
    "from_kwargs",
    "check_bounds",
    "cog_fields",
    "secret_fields",
    "names_where",
    "same_as",
]


def param(
    default: tp.Any,
    description: str,
    *,
    ge: float | None = None,
    le: float | None = None,
    choices: tp.Sequence[str | int] | None = None,
    file: bool = False,
    secret: bool = False,
    cog: bool = True,
    required: bool = False,
    used_by: tp.Sequence[str] = (),
    must_match_on_resume: bool = False,
    prepare: bool = False,
) -> tp.Any:
    """A dataclass field carrying the metadata Cog's `Input()` carries, and what else the code needs to know of it.

    `file=True`: a Cog `Path` input (a local path or URL string on the command line). `secret=True`: a Cog
    `Secret` (masked in Replicate's UI and never logged; a plain string here). `cog=False`: a CLI and Python-API
    input that the Cog signature leaves out (it would break the Cog contract). `required=True`: the Cog signature
    gives it no default, so Cog refuses a request without it (the dataclass keeps `None`, which `validate` refuses
    with our own message on the CLI). `used_by`: the only features that read it (a command's params module says
    when each is off; a value given while it is off is reported as ignored). `must_match_on_resume`: it shapes
    the data order, the schedule or the update, so a resumed run must use the checkpoint's value. `prepare`: a
    dataset-preparation input that training passes on to `preprocessing`.
    """
    meta = {"description": description, "ge": ge, "le": le, "choices": list(choices) if choices else None}
    meta.update(file=file, secret=secret, cog=cog, required=required, used_by=tuple(used_by))
    meta.update(must_match_on_resume=must_match_on_resume, prepare=prepare)
    return dataclasses.field(default=default, metadata=meta)


def same_as(cls: type, name: str, *, also: str = "") -> tp.Any:
    """The input `name` of `cls`, reused by another command: same default, description and facts (one declaration;
    the annotation is written again and a test proves it equal). `also`: a sentence that holds only for the
    command reusing it, appended to the shared description."""
    source = {f.name: f for f in dataclasses.fields(cls)}[name]
    metadata = dict(source.metadata)
    if also:
        metadata["description"] = f"{metadata['description']} {also}"
    return dataclasses.field(default=source.default, metadata=metadata)


def names_where(cls: type, fact: str) -> tuple[str, ...]:
    """The names of the inputs of `cls` whose `param(...)` sets `fact` (e.g. `must_match_on_resume`), in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(fact))


def cog_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that are Cog inputs, in signature order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cog", True)]


def secret_fields(cls: type) -> tuple[str, ...]:
    """Names of the inputs that hold credentials: never logged, never written to a file we hand out."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("secret"))


def _range_text(ge: float | None, le: float | None) -> str:
    if ge is not None and le is not None:
        return f" [range {ge}..{le}]"
    return f" [>= {ge}]" if ge is not None else f" [<= {le}]"


def base_type(annotation: tp.Any) -> tuple[type, bool]:
    """(`int`, optional?) from `int | None` and the like; annotations may be strings (PEP 563)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"tp": tp})  # noqa: S307 - our own annotations only
    optional = False
    args = tp.get_args(annotation)
    if tp.get_origin(annotation) in (tp.Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0]
    return annotation, optional


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(convert: tp.Callable[[str], tp.Any]) -> tp.Callable[[str], tp.Any]:
    def parse(text: str) -> tp.Any:
        return None if text.strip().lower() in ("", "none", "null") else convert(text)

    return parse


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one `--name` flag per field, same names and defaults as the Cog inputs."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for f in dataclasses.fields(cls):
        base, optional = base_type(f.type)
        convert: tp.Callable[[str], tp.Any] = parse_bool if base is bool else base
        if optional:
            convert = _optional(convert)
        meta = f.metadata
        help_text = meta.get("description", "")
        if meta.get("ge") is not None or meta.get("le") is not None:
            help_text += _range_text(meta.get("ge"), meta.get("le"))
        parser.add_argument(
            f"--{f.name}",
            type=convert,
            default=f.default,
            choices=meta.get("choices"),
            help=help_text.replace("%", "%%"),
            metavar=None if meta.get("choices") else base.__name__.upper(),
        )
    return parser


def from_kwargs(cls: type, **kwargs: tp.Any) -> tp.Any:
    """Build the dataclass from keyword inputs (Cog's or the CLI's), checking choices and bounds first.

    Unknown names are refused with the list of valid ones; `None` for a non-optional input falls back to the
    default (the Cog server without a schema passes missing inputs as None).
    """
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise InputError(unknown[0], f"unknown input; valid inputs are: {', '.join(known)}")
    values = {}
    for name, f in known.items():
        value = kwargs.get(name, f.default)
        base, optional = base_type(f.type)
        if value is None and not optional:
            value = f.default
        if value is not None:
            value = _coerce(name, value, base)
        values[name] = value
    obj = cls(**values)
    check_bounds(obj)
    return obj


def from_args(cls: type, argv: tp.Sequence[str] | None = None, **parser_kwargs: tp.Any) -> tp.Any:
    namespace = build_parser(cls, **parser_kwargs).parse_args(argv)
    return from_kwargs(cls, **vars(namespace))


def _coerce(name: str, value: tp.Any, base: type) -> tp.Any:
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return parse_bool(value)
            except argparse.ArgumentTypeError as e:
                raise InputError(name, str(e)) from None
        raise InputError(name, f"expected true or false, got {value!r}")
    if base in (int, float):
        if isinstance(value, bool):
            raise InputError(name, f"expected a number, got {value!r}")
        try:
            converted = base(value)
        except (TypeError, ValueError):
            raise InputError(name, f"expected {'an integer' if base is int else 'a number'}, got {value!r}") from None
        if base is int and isinstance(value, float) and not value.is_integer():
            raise InputError(name, f"expected an integer, got {value!r}")
        return converted
    if base is str:
        return str(value)
    return value


def _check_finite(name: str, value: tp.Any, meta: tp.Mapping[str, tp.Any], default: tp.Any) -> None:
    """NaN and inf are refused for every float input: a comparison with NaN is always False, so `ge`/`le` alone
    let it through (`--weight_decay nan` trained to all-NaN weights, `temperature nan` became greedy sampling).
    No input of ours documents inf as a meaning, so inf is refused too."""
    if not isinstance(value, float) or math.isfinite(value):
        return
    what = "is not a number" if math.isnan(value) else "is not a finite number"
    ge, le = meta.get("ge"), meta.get("le")
    hints = [_range_text(ge, le).strip()[1:-1]] if ge is not None or le is not None else []
    if isinstance(default, int | float) and not isinstance(default, bool):
        hints.append(f"default {default}")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise InputError(name, f"{value} {what}; give a finite value{hint}")


def check_bounds(obj: tp.Any) -> None:
    """Finiteness, choices and ge/le of every field, with a message naming the input."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        meta = f.metadata
        _check_finite(f.name, value, meta, f.default)
        if meta.get("choices") and value not in meta["choices"]:
            raise InputError(f.name, f"{value!r} is not one of: {', '.join(map(str, meta['choices']))}")
        if meta.get("ge") is not None and value < meta["ge"]:
            raise InputError(f.name, f"{value} is below the minimum {meta['ge']}")
        if meta.get("le") is not None and value > meta["le"]:
            raise InputError(f.name, f"{value} is above the maximum {meta['le']}")
