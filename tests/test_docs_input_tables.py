"""The input tables of docs/ follow the dataclasses that declare those inputs: names, defaults and, for
`model_version`, every choice. (README's predict table: tests/generation/test_predict_params.py.)"""

from __future__ import annotations

import pytest

from core.catalogue import FINE_TUNED
from generation.params import PredictParams
from preprocessing.params import PrepareParams
from tests.doc_tables import check_rows, input_tables, table_rows
from tests.helpers import ROOT
from training.params import TrainParams

# which command's inputs each page's tables describe; training refuses `fine-tuned`, so its tables need not name it
PAGES = {
    "docs/training.md": (TrainParams, (FINE_TUNED,)),
    "docs/methods.md": (TrainParams, (FINE_TUNED,)),
    "docs/preprocessing.md": (PrepareParams, ()),
    "docs/style.md": (PredictParams, ()),
}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_a_pages_input_tables_follow_the_dataclass(page):
    params, unnamed = PAGES[page]
    tables = input_tables((ROOT / page).read_text())
    assert tables, f"{page} has no input table"
    problems = [p for table in tables for p in check_rows(table_rows(table), params, unnamed)]
    assert problems == [], page


def test_every_page_with_an_input_table_is_checked():
    pages = [p for p in sorted((ROOT / "docs").glob("*.md")) if input_tables(p.read_text())]
    assert [str(p.relative_to(ROOT)) for p in pages] == sorted(PAGES)


def test_the_check_sees_a_drifted_default_an_unknown_input_and_a_missing_version():
    text = (ROOT / "docs/methods.md").read_text()
    rows = [r for t in input_tables(text.replace("| `lora_rank` | 16 |", "| `lora_rank` | 8 |")) for r in table_rows(t)]
    assert check_rows(rows, TrainParams) == ["lora_rank: the table says '8', the dataclass 16"]
    rows = [r for t in input_tables(text.replace("`class_samples`", "`class_sample`")) for r in table_rows(t)]
    assert check_rows(rows, TrainParams) == ["class_sample: not an input of TrainParams"]
    rows = table_rows("| input | default | meaning |\n|---|---|---|\n| `model_version` | `stereo-melody` | `small` |")
    assert "model_version: the table does not name medium" in check_rows(rows, TrainParams, (FINE_TUNED,))
