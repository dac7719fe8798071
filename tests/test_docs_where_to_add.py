"""docs/architecture.md's "Where to add" names every file each task touches, found from the code itself.

Each paragraph of that section (**A model version.**, **A model family.**, **A training method.**, **An input.**)
names files in backquotes. The files a task touches are read from the registries and the sources, not typed here:

- a training method: the module of every registered method (`training.methods.get_method`) lies in
  `training/methods/`; the registration (`training/methods/__init__.py`), the catalogue's `METHODS`, and every
  product file holding a dict keyed by the method names or a string naming them all (a description, a choice
  list kept by hand, a card's wording);
- a model family: the catalogue, every product file holding a dict keyed by the family names (a hooks registry),
  and every file that branches on a family (a comparison with a family's or its versions' name, a test of a list,
  flag or predicate that only one family has: `MELODY_VERSIONS`, `spec(v).style`, `is_style_model(model)`);
- a model version of a known family: the catalogue, and every file keeping the `model_version` choices by hand;
- an input: the params dataclass's module, and every file keeping its inputs by hand (a Cog signature outside
  the markers of the command that writes it, README's inputs table).

A file the code says a task touches but the paragraph does not name fails the test; so does a named file that
does not exist.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from core import catalogue
from scripts import source_metrics

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
# Family tests a new family must be added to: lists and flags that hold one family's versions (not the stereo or
# size views, which any family's records fill by themselves).
FAMILY_LISTS = ("MELODY_VERSIONS", "STYLE_VERSIONS", "STYLE_PRETRAINED", "STYLE_TINY_VERSIONS", "SCRATCH_VERSIONS")
FAMILY_FLAGS = ("melody", "style", "scratch")
FAMILY_PREDICATE = r"^is_(melody|style|scratch)"


def paragraph(title: str) -> str:
    """The text of the "Where to add" paragraph that starts with **title**."""
    text = DOC.read_text()
    section = text.split("## Where to add", 1)[1].split("\n## ", 1)[0]
    found = [p for p in re.split(r"\n(?=\*\*)", section) if p.startswith(f"**{title}**")]
    assert found, f"docs/architecture.md: no **{title}** paragraph under 'Where to add'"
    return found[0]


def named_files(text: str) -> set[str]:
    return set(re.findall(r"`([\w./-]+\.(?:py|md|html))`", text))


def product_sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text()) for p in source_metrics.product_files(ROOT)}


def files_with_dict_keyed_by(names: set[str]) -> set[str]:
    """Product files with a dict literal whose string keys are exactly `names` (a registry or a per-name table)."""
    found = set()
    for rel, tree in product_sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                if keys == names:
                    found.add(rel)
    return found


def files_with_string_naming_all(names: set[str]) -> set[str]:
    """Product files with one string literal (a description, a sentence) or one list literal naming every name,
    outside the markers of a generated signature."""
    found = set()
    for rel, tree in product_sources().items():
        generated = _generated_lines(ROOT / rel)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in generated:
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                words = set(re.findall(r"[\w-]+", node.value))
            elif isinstance(node, (ast.List, ast.Tuple)):
                words = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            else:
                continue
            if names <= words:
                found.add(rel)
    return found - {"core/catalogue.py"}  # where the names are declared: named by every paragraph anyway


def _generated_lines(path: Path) -> set[int]:
    lines, inside = set(), False
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if source_metrics._BEGIN.search(text):
            inside = True
        elif source_metrics._END.search(text):
            inside = False
        elif inside:
            lines.add(number)
    return lines


def family_branch_files() -> set[str]:
    """Product files with a test (`if`, `elif`, `while`, `assert`, a conditional expression, a comprehension filter)
    that names a family: a family's name or one of its versions' names, a list or flag only that family fills, or a
    predicate named after it (`is_style_model`)."""
    families = {s.family for s in catalogue.SPECS} - {"text"}  # text: what every other test falls back to
    family_versions = {s.name for s in catalogue.SPECS if s.family in families}
    found = set()
    for rel, tree in product_sources().items():
        if rel == "core/catalogue.py":
            continue
        for node in ast.walk(tree):
            tests = [node.test] if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)) else []
            tests += node.ifs if isinstance(node, ast.comprehension) else []
            if any(_names_a_family(t, families, family_versions) for t in tests):
                found.add(rel)
    return found


def _names_a_family(test: ast.AST, families: set[str], family_versions: set[str]) -> bool:
    for sub in ast.walk(test):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value in families | family_versions:
            return True
        if isinstance(sub, ast.Name) and (sub.id in FAMILY_LISTS or re.search(FAMILY_PREDICATE, sub.id)):
            return True
        if isinstance(sub, ast.Attribute) and (
            sub.attr in FAMILY_LISTS or sub.attr in FAMILY_FLAGS or re.search(FAMILY_PREDICATE, sub.attr)
        ):
            return True
    return False


def _missing(required: set[str], text: str) -> list[str]:
    return sorted(required - named_files(text))


@pytest.mark.parametrize("title", ["A model version.", "A model family.", "A training method.", "An input."])
def test_every_file_a_paragraph_names_exists(title):
    missing = [f for f in named_files(paragraph(title)) if not (ROOT / f).exists()]
    assert not missing, f"**{title}** names files that do not exist: {missing}"


def test_a_training_method_names_every_file_a_new_method_touches():
    from training import methods

    names = set(catalogue.METHODS)
    assert set(methods.method_names()) == names
    homes = {Path(inspect.getfile(type(methods.get_method(n)))).relative_to(ROOT).parent.as_posix() for n in names}
    assert homes == {"training/methods"}, f"a method's module outside training/methods/: {homes}"
    text = paragraph("A training method.")
    assert "training/methods/" in text
    required = {"training/methods/__init__.py", "core/catalogue.py"}
    required |= files_with_dict_keyed_by(names) | files_with_string_naming_all(names)
    assert not _missing(required, text), f"**A training method.** does not name {_missing(required, text)}"


def test_a_model_family_names_every_file_a_new_family_touches():
    families = {s.family for s in catalogue.SPECS}
    required = {"core/catalogue.py"} | files_with_dict_keyed_by(families) | family_branch_files()
    text = paragraph("A model family.")
    assert not _missing(required, text), f"**A model family.** does not name {_missing(required, text)}"


def test_a_model_version_names_every_file_that_keeps_the_version_choices():
    required = {"core/catalogue.py"} | files_with_string_naming_all(set(catalogue.MODEL_VERSION_CHOICES))
    text = paragraph("A model version.")
    assert not _missing(required, text), f"**A model version.** does not name {_missing(required, text)}"


def test_an_input_names_the_params_modules_and_every_copy_kept_by_hand():
    from generation.params import PredictParams
    from training.params import TrainParams

    required = {Path(inspect.getfile(cls)).relative_to(ROOT).as_posix() for cls in (PredictParams, TrainParams)}
    for entry, qual in source_metrics.SIGNATURES:
        by_hand = source_metrics.signature_lines(ROOT).get(f"{entry}:{qual}", {}).get("by_hand", 0)
        if by_hand > 2:  # more than the `def` line and its closing: inputs are spelled out by hand there
            required.add(entry)
    # README keeps a table of predict's inputs: the first cells of its rows name every one (some rows name several)
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `")]
    first_cells = [row.split("|")[1] for row in rows]
    in_table = {name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)}
    if {f.name for f in dataclasses.fields(PredictParams) if f.metadata.get("cog", True)} <= in_table:
        required.add("README.md")
    text = paragraph("An input.")
    assert not _missing(required, text), f"**An input.** does not name {_missing(required, text)}"
