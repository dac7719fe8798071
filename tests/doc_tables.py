"""The `| input | default | meaning |` tables of README and docs/, read and checked against the dataclass that
declares those inputs (the one declaration: a table that drifts from it misleads whoever reads it)."""

from __future__ import annotations

import dataclasses
import re

# how the tables write "no value": empty, a random seed, the end of the file
NONE_CELLS = ("–", "random", "end", "empty")
HEADER = "| input | default | meaning |"


def table_rows(table: str) -> list[tuple[list[str], list[str], str]]:
    """(input names, default cells, meaning) of each row of one table (its header and rule lines included)."""
    rows = []
    for line in table.strip().splitlines()[2:]:
        names, defaults, meaning = (cell.strip() for cell in line.strip().strip("|").split(" | ", 2))
        rows.append((re.findall(r"`(\w+)`", names), [d.strip() for d in defaults.split(", ")], meaning))
    return rows


def input_tables(text: str) -> list[str]:
    """Every `| input | default | meaning |` table of a markdown text, each from its header to its last row."""
    tables = []
    for chunk in text.split(HEADER)[1:]:
        lines = [HEADER]
        for line in chunk.splitlines()[1:]:
            if not line.startswith("|"):
                break
            lines.append(line)
        tables.append("\n".join(lines))
    return tables


def default_mismatch(field: dataclasses.Field, cell: str) -> str | None:
    value = field.default
    if value is None:
        ok = cell in NONE_CELLS
    elif isinstance(value, bool):
        ok = cell == str(value).lower()
    elif isinstance(value, int | float):
        ok = re.fullmatch(r"-?[0-9.]+", cell) is not None and float(cell) == value
    else:
        ok = cell.strip("`") == value
    return None if ok else f"{field.name}: the table says {cell!r}, the dataclass {value!r}"


def check_rows(rows: list[tuple[list[str], list[str], str]], params: type, unnamed: tuple[str, ...] = ()) -> list[str]:
    """Every input a table names is a field of `params`, with the default the field has; a `model_version` row names
    every choice the field offers (but `unnamed`)."""
    by_name = {f.name: f for f in dataclasses.fields(params)}
    problems = []
    for names, defaults, meaning in rows:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            problems.append(f"{', '.join(unknown)}: not an input of {params.__name__}")
            continue
        if len(names) != len(defaults):
            problems.append(f"{names}: {len(defaults)} defaults for {len(names)} inputs")
            continue
        problems += [p for n, d in zip(names, defaults, strict=True) for p in [default_mismatch(by_name[n], d)] if p]
        if names == ["model_version"]:
            choices = by_name["model_version"].metadata.get("choices") or []
            named = set(re.findall(r"`([\w-]+)`", meaning))
            missing = [v for v in choices if v not in named and v not in unnamed]
            problems += [f"model_version: the table does not name {v}" for v in missing]
    return problems
