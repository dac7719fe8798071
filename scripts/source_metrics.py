"""Source metrics of issue #21 ("one source of truth"), measured from the tree, for its before -> after note.

    .venv/bin/python scripts/source_metrics.py [--json OUT] [--root DIR]

Reads the product code (every .py outside tests/, bench/, scripts/, .venv) with `ast`, imports nothing of ours but
`core.catalogue` (the version and family names, a leaf module), and prints:

- `duplicates` pairs whose two sides are both product code (the `duplicates` tool, when it is on PATH);
- lines of signature kept by hand: the `Input(...)` signatures of `train.py:train` and `predict.py:Predictor.run`,
  less any lines between the markers a command writes them between (`# <cog-signature ...>` ... `# </cog-signature>`
  of scripts/cog_signatures.py, or `# begin generated` ... `# end generated`);
- side lists: module-level assignments of `RESUME_MUST_MATCH` / `PREPARE_FIELDS` and their lines;
- attributes stamped on library objects: assignments `x.attr = ...` / `setattr(x, "attr", ...)` whose receiver is a
  model-like object (its expression names lm, model, conditioner, compression, mbd) and whose attribute audiocraft
  itself never sets (`self.attr =` anywhere in the installed audiocraft); `x.__class__ = ...` (any receiver but
  `self`) listed apart as class swaps;
- private writes and calls into library objects: `x._name = ...` (any receiver but `self` / `cls`) and `x._name(...)`
  (a model-like receiver) where audiocraft defines `_name` (its own private state and methods);
- `getattr(` fallbacks on models: `getattr(<model-like>, "name", default)`;
- branch sites on version names: tests (`if`, `elif`, conditional expressions, comprehension filters, `assert`)
  that compare with a version or family name (`"melody"`, `"tiny-style"`, ...), call `.startswith` with one, or
  read a name list of core/catalogue.py (`MELODY_VERSIONS`, ...); spec flag tests (`spec(v).melody`, ...) counted
  apart;
- the longest functions (lines from `def` to the end of the body).

No torch: it runs in a second. Rerun on merged main for the "after" column and diff with
bench/results/source-metrics-before.json.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_PRODUCT = ("tests", "bench", "scripts", ".venv", "docs", ".git")
MODEL_LIKE = re.compile(r"\b(lm|model|conditioner|compression|mbd|cond|attn)\w*\b|\b\w*_(lm|model)\b")
SPEC_FLAGS = ("stereo", "melody", "style", "scratch", "tiny")
SIDE_LISTS = ("RESUME_MUST_MATCH", "PREPARE_FIELDS")
SIGNATURES = (("train.py", "train"), ("predict.py", "Predictor.run"))
# Markers around a signature a command writes: scripts/cog_signatures.py's `# <cog-signature ...>` ...
# `# </cog-signature>`, or any `# begin generated` / `# end generated` pair.
_BEGIN = re.compile(r"#\s*<cog-signature\b|#.*(begin|start).*generat|#.*generat.*(begin|start)", re.IGNORECASE)
_END = re.compile(r"#\s*</cog-signature>|#.*end.*generat|#.*generat.*end", re.IGNORECASE)


def product_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*.py") if p.relative_to(root).parts[0] not in NOT_PRODUCT and ".venv" not in p.parts
    )


def catalogue_names(root: Path) -> tuple[set[str], set[str]]:
    """(version and family names, the name lists) of core/catalogue.py."""
    sys.path.insert(0, str(root))
    from core import catalogue

    specs = catalogue.SPECS.values() if isinstance(catalogue.SPECS, dict) else catalogue.SPECS
    names = {s.name for s in specs} | {s.family for s in specs} | {catalogue.FINE_TUNED, "micro", "stereo"}
    lists = {n for n in catalogue.__all__ if n.isupper() and (n.endswith("VERSIONS") or n in (
        "PRETRAINED", "STYLE_PRETRAINED", "LM_LAYOUTS", "LM_WIDTHS"))}  # fmt: skip
    return names, lists


def audiocraft_attributes() -> set[str]:
    """Every attribute name audiocraft's own code assigns on `self` or defines as a method or class attribute."""
    found = importlib.util.find_spec("audiocraft")
    if found is None or not found.submodule_search_locations:
        return set()
    names: set[str] = set()
    for path in Path(next(iter(found.submodule_search_locations))).rglob("*.py"):
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.Assign, ast.AnnAssign)):
                        for t in item.targets if isinstance(item, ast.Assign) else [item.target]:
                            if isinstance(t, ast.Name):
                                names.add(t.id)
    return names


def _receiver_is_model(node: ast.AST) -> bool:
    text = ast.unparse(node)
    return bool(MODEL_LIKE.search(text)) and text not in ("self", "cls")


class _Visitor(ast.NodeVisitor):
    def __init__(self, rel: str, versions: set[str], lists: set[str], library: set[str]):
        self.rel, self.versions, self.lists, self.library = rel, versions, lists, library
        self.stamped: list[tuple[str, int, str]] = []
        self.class_swaps: list[tuple[str, int]] = []
        self.private: list[tuple[str, int, str]] = []
        self.getattr_models: list[tuple[str, int, str]] = []
        self.branches: list[tuple[str, int, str]] = []
        self.flag_branches: list[tuple[str, int, str]] = []
        self.functions: list[tuple[int, str, int]] = []
        self._stack: list[str] = []

    # --- functions
    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        qual = ".".join([*self._stack, node.name])
        self.functions.append((node.end_lineno - node.lineno + 1, f"{self.rel}:{qual}", node.lineno))
        self._stack.append(node.name)
        self.generic_visit(node)
        self._stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._stack.append(node.name)
        self.generic_visit(node)
        self._stack.pop()

    # --- writes on library objects
    def _store(self, target: ast.AST, line: int) -> None:
        if not isinstance(target, ast.Attribute) or ast.unparse(target.value) in ("self", "cls"):
            return
        if target.attr == "__class__":  # on any object: ours never need it
            self.class_swaps.append((self.rel, line))
        elif target.attr.startswith("_") and target.attr in self.library:
            self.private.append((self.rel, line, f"write {target.attr}"))
        elif _receiver_is_model(target.value) and target.attr not in self.library:
            self.stamped.append((self.rel, line, target.attr))

    def visit_Assign(self, node: ast.Assign) -> None:
        for t in node.targets:
            for sub in t.elts if isinstance(t, ast.Tuple) else [t]:
                self._store(sub, node.lineno)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._store(node.target, node.lineno)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("setattr", "getattr") and len(node.args) >= 2:
            obj, name = node.args[0], node.args[1]
            literal = name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else None
            if func.id == "setattr" and literal and _receiver_is_model(obj) and literal not in self.library:
                self.stamped.append((self.rel, node.lineno, literal))
            if func.id == "getattr" and len(node.args) == 3 and _receiver_is_model(obj):
                self.getattr_models.append((self.rel, node.lineno, ast.unparse(node)[:90]))
        if (
            isinstance(func, ast.Attribute)
            and func.attr.startswith("_")
            and not func.attr.startswith("__")
            and func.attr in self.library
            and _receiver_is_model(func.value)
        ):
            self.private.append((self.rel, node.lineno, f"call {func.attr}"))
        self.generic_visit(node)

    # --- branch sites
    def _test(self, test: ast.AST, line: int) -> None:
        on_name = on_flag = False
        for sub in ast.walk(test):
            if isinstance(sub, ast.Compare):
                operands = [sub.left, *sub.comparators]
                for op in operands:
                    if isinstance(op, ast.Constant) and op.value in self.versions:
                        on_name = True
                    if isinstance(op, (ast.Tuple, ast.List, ast.Set)) and any(
                        isinstance(e, ast.Constant) and e.value in self.versions for e in op.elts
                    ):
                        on_name = True
            if isinstance(sub, ast.Name) and sub.id in self.lists:
                on_name = True
            if isinstance(sub, ast.Attribute) and sub.attr in self.lists:
                on_name = True
            if (
                isinstance(sub, ast.Call)
                and isinstance(sub.func, ast.Attribute)
                and sub.func.attr in ("startswith", "endswith")
                and any(isinstance(a, ast.Constant) and a.value in self.versions for a in sub.args)
            ):
                on_name = True
            if isinstance(sub, ast.Attribute) and sub.attr in SPEC_FLAGS and "spec" in ast.unparse(sub.value):
                on_flag = True
        text = ast.unparse(test)[:90]
        if on_name:
            self.branches.append((self.rel, line, text))
        elif on_flag:
            self.flag_branches.append((self.rel, line, text))

    def visit_If(self, node: ast.If) -> None:
        self._test(node.test, node.lineno)
        self.generic_visit(node)

    visit_While = visit_If

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self._test(node.test, node.lineno)
        self.generic_visit(node)

    def visit_Assert(self, node: ast.Assert) -> None:
        self._test(node.test, node.lineno)
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        for cond in node.ifs:
            self._test(cond, cond.lineno)
        self.generic_visit(node)


def signature_lines(root: Path) -> dict[str, dict[str, int]]:
    """{file:function: {"signature": lines from `def` to the line before the body, "by_hand": less generated}}."""
    out = {}
    for rel, qual in SIGNATURES:
        path = root / rel
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        node = _find(tree, qual.split("."))
        if node is None:
            continue
        first, last = node.lineno, node.body[0].lineno - 1  # 1-based, inclusive
        generated_in_signature = 0
        inside = False
        for number, text in enumerate(lines, start=1):
            if _BEGIN.search(text):
                inside = True
            elif _END.search(text):
                inside = False
            elif inside and first <= number <= last:
                generated_in_signature += 1
        total = last - first + 1
        out[f"{rel}:{qual}"] = {"signature": total, "by_hand": total - generated_in_signature}
    return out


def _find(tree: ast.AST, parts: list[str]) -> ast.FunctionDef | None:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == parts[0]:
            return node if len(parts) == 1 else _find(node, parts[1:])
    return None


def side_lists(root: Path, files: list[Path]) -> dict[str, int]:
    found = {}
    for path in files:
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                if isinstance(t, ast.Name) and t.id in SIDE_LISTS:
                    found[f"{path.relative_to(root)}:{t.id}"] = node.end_lineno - node.lineno + 1
    return found


def duplicate_pairs(root: Path) -> dict:
    tool = shutil.which("duplicates")
    if tool is None:
        return {"available": False}
    run = subprocess.run([tool, "--most", "200", "--seconds", "120", "--repo", str(root)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    rows = [line for line in run.stdout.splitlines() if re.match(r"^D\d+ ", line)]

    def product(place: str) -> bool:
        return place.split("/")[0] not in NOT_PRODUCT and not place.startswith(NOT_PRODUCT)

    pairs = []
    for row in rows:
        sides = re.findall(r"(\S+?\.\w+):\d+-\d+", row)
        if len(sides) == 2 and all(product(s) for s in sides):
            pairs.append(row)
    return {"available": True, "all_pairs": len(rows), "product_pairs": len(pairs), "product_rows": pairs,
            "header": run.stdout.splitlines()[0] if run.stdout else ""}  # fmt: skip


def measure(root: Path) -> dict:
    files = product_files(root)
    versions, lists = catalogue_names(root)
    library = audiocraft_attributes()
    visitors = []
    for path in files:
        rel = str(path.relative_to(root))
        visitor = _Visitor(rel, versions, lists, library if rel != "core/catalogue.py" else library)
        visitor.visit(ast.parse(path.read_text()))
        if rel == "core/catalogue.py":  # the records and their views are where the names belong
            visitor.branches, visitor.flag_branches = [], []
        visitors.append(visitor)

    def gather(attr: str) -> list:
        return [item for v in visitors for item in getattr(v, attr)]

    stamped = gather("stamped")
    branches = gather("branches")
    functions = sorted(gather("functions"), reverse=True)
    return {
        "duplicates": duplicate_pairs(root),
        "signature_lines": signature_lines(root),
        "side_lists": side_lists(root, files),
        "stamped_attributes": sorted({name for _, _, name in stamped}),
        "stamped_sites": [f"{f}:{n} {a}" for f, n, a in stamped],
        "class_swaps": [f"{f}:{n}" for f, n in gather("class_swaps")],
        "private_library_access": [f"{f}:{n} {a}" for f, n, a in gather("private")],
        "getattr_fallbacks_on_models": [f"{f}:{n} {t}" for f, n, t in gather("getattr_models")],
        "branch_sites_on_version_names": len(branches),
        "branch_sites_by_file": dict(Counter(f for f, _, _ in branches).most_common()),
        "branch_sites": [f"{f}:{n} {t}" for f, n, t in branches],
        "spec_flag_branch_sites": [f"{f}:{n} {t}" for f, n, t in gather("flag_branches")],
        "longest_functions": [f"{lines} {name}" for lines, name, _ in functions[:12]],
    }


def summary(m: dict) -> list[str]:
    dup = m["duplicates"]
    sig = m["signature_lines"]
    return [
        f"duplicates pairs in product code: {dup.get('product_pairs', 'n/a')} "
        f"(all pairs {dup.get('all_pairs', 'n/a')})",
        "lines of signature kept by hand: "
        + ", ".join(f"{k} {v['by_hand']}/{v['signature']}" for k, v in sig.items())
        + f" (total {sum(v['by_hand'] for v in sig.values())})",
        f"side lists: {', '.join(f'{k} ({v} lines)' for k, v in m['side_lists'].items()) or 'none'}",
        f"attributes stamped on library objects: {len(m['stamped_attributes'])} "
        f"({', '.join(m['stamped_attributes'])}) at {len(m['stamped_sites'])} sites",
        f"__class__ swaps: {len(m['class_swaps'])}; private library writes/calls: {len(m['private_library_access'])}",
        f"getattr( fallbacks on models: {len(m['getattr_fallbacks_on_models'])}",
        f"branch sites on version names: {m['branch_sites_on_version_names']} in {len(m['branch_sites_by_file'])} "
        f"files ({', '.join(f'{k} {v}' for k, v in list(m['branch_sites_by_file'].items())[:8])}); "
        f"spec flag tests: {len(m['spec_flag_branch_sites'])}",
        "longest functions: " + "; ".join(m["longest_functions"][:6]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    parser.add_argument("--json", type=Path, default=None, help="also write every site found as JSON")
    args = parser.parse_args(argv)
    metrics = measure(args.root.resolve())
    for line in summary(metrics):
        print(line)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(metrics, indent=1) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
