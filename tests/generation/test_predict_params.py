"""README's table of predict inputs is checked against `PredictParams`, the one declaration of those inputs."""

from __future__ import annotations

import dataclasses

from generation.params import PredictParams
from tests.doc_tables import check_rows, table_rows
from tests.helpers import ROOT

TABLE_LEAD = "The CLI flags are the Cog inputs"


def check_table(text: str) -> list[str]:
    """README's predict table names every input, in the dataclass's order, each with its default."""
    rows = table_rows(text.split(TABLE_LEAD, 1)[1].split("\n\n", 2)[1])
    named = [name for names, _, _ in rows for name in names]
    fields = [f.name for f in dataclasses.fields(PredictParams)]
    problems = [] if named == fields else [f"inputs or order differ: README {named}"]
    return problems + check_rows(rows, PredictParams)


def test_readme_inputs_table_follows_the_dataclass():
    assert check_table((ROOT / "README.md").read_text()) == []


def test_the_table_check_sees_a_drifted_row():
    text = (ROOT / "README.md").read_text()
    assert check_table(text.replace("| `duration` | 8 |", "| `duration` | 10 |")) == [
        "duration: the table says '10', the dataclass 8"
    ]
    assert check_table(text.replace(", `tiny-t5`", "")) == ["model_version: the table does not name tiny-t5"]
    dropped = "\n".join(line for line in text.splitlines() if not line.startswith("| `lora_scale` |"))
    assert check_table(dropped)[0].startswith("inputs or order differ")
