"""README's table of predict inputs is checked against `PredictParams`, the one declaration of those inputs."""

from __future__ import annotations

import dataclasses
import re

from core.catalogue import MODEL_VERSION_CHOICES
from generation.params import PredictParams
from tests.helpers import ROOT

TABLE_LEAD = "The CLI flags are the Cog inputs"
NONE_CELLS = ("–", "random", "end")  # how the table writes "no value": empty, a random seed, the end of the file


def readme_rows(text: str) -> list[tuple[list[str], list[str], str]]:
    """(input names, default cells, meaning) of each row of README's predict inputs table."""
    table = text.split(TABLE_LEAD, 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines()[2:]:
        names, defaults, meaning = (cell.strip() for cell in line.strip("|").split(" | ", 2))
        rows.append((re.findall(r"`(\w+)`", names), [d.strip() for d in defaults.split(", ")], meaning))
    return rows


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
    return None if ok else f"{field.name}: README says {cell!r}, the dataclass {value!r}"


def check_table(text: str) -> list[str]:
    fields = dataclasses.fields(PredictParams)
    rows = readme_rows(text)
    named = [name for names, _, _ in rows for name in names]
    problems = [] if named == [f.name for f in fields] else [f"inputs or order differ: README {named}"]
    by_name = {f.name: f for f in fields}
    for names, defaults, meaning in rows:
        if len(names) != len(defaults):
            problems.append(f"{names}: {len(defaults)} defaults for {len(names)} inputs")
            continue
        problems += [
            p
            for n, d in zip(names, defaults, strict=True)
            if n in by_name
            for p in [default_mismatch(by_name[n], d)]
            if p
        ]
        if names == ["model_version"]:
            problems += [
                f"model_version: README does not name {v}" for v in MODEL_VERSION_CHOICES if f"`{v}`" not in meaning
            ]
    return problems


def test_readme_inputs_table_follows_the_dataclass():
    assert check_table((ROOT / "README.md").read_text()) == []


def test_the_table_check_sees_a_drifted_row():
    text = (ROOT / "README.md").read_text()
    assert check_table(text.replace("| `duration` | 8 |", "| `duration` | 10 |")) == [
        "duration: README says '10', the dataclass 8"
    ]
    assert check_table(text.replace(", `tiny-t5`", "")) == ["model_version: README does not name tiny-t5"]
    dropped = "\n".join(line for line in text.splitlines() if not line.startswith("| `lora_scale` |"))
    assert check_table(dropped)[0].startswith("inputs or order differ")
