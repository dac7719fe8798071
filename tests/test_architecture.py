"""The import structure (issue 13): no import cycle, leaf modules that stay leaves, and no function-local import of a
project module unless it defers a heavy optional dependency (and says which).

Read from the source with `ast` (nothing is imported), so a cycle hidden in a function body counts as much as one
at the top of a file: it is the same tangle, only broken at run time instead of import time.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("core", "training", "generation", "preprocessing", "evaluation")
ROOT_MODULES = ("train", "predict", "metadata")
# Leaves: each may import only the project modules listed (all leaves themselves), so everything can import them.
LEAVES: dict[str, tuple[str, ...]] = {
    "core.errors": (),
    "core.catalogue": (),
    "core.devices": (),
    "core.files": (),
    "metadata": (),  # shared vocabularies (GENRES), data only
    "core.params": ("core.errors",),
    "core.hub": ("core.catalogue",),
    "training.params": ("core.params", "core.errors", "core.catalogue", "generation.params", "preprocessing.params"),
    "generation.params": ("core.params", "core.errors", "core.catalogue"),
    "preprocessing.params": ("core.params", "core.errors", "core.catalogue"),
}
# The rooms of docs/architecture.md, bottom up: a module imports only modules of its own room or of rooms below it.
# The first matching prefix decides (leaves first: `training.params` is a leaf, not training).
ROOMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaves", tuple(LEAVES)),
    ("core", ("core",)),
    ("preprocessing", ("preprocessing",)),
    ("generation", ("generation",)),
    (
        "evaluation metrics",
        ("evaluation.embed", "evaluation.frechet", "evaluation.effnet", "evaluation.clap", "evaluation.health"),
    ),
    ("training", ("training",)),
    ("tools", ("evaluation",)),
    ("entry points", ("train", "predict")),
)
# A function-local import of a project module must say what heavy optional dependency it defers, on its line or
# the line above: `# defers demucs`. (module, imported module) pairs that may do without, each with its reason:
LOCAL_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}
DEFERS = re.compile(r"#.*\bdefers\s+\S+")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the project module imported
    line: int
    local: bool  # inside a function body (run at call time, not import time)
    comment: str  # the import line and the line above it, for the `defers` note


def project_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for name in ROOT_MODULES:
        if (root / f"{name}.py").is_file():
            modules[name] = root / f"{name}.py"
    return modules


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The project modules an import statement depends on.

    `from pkg import name` reads `name` from the package `pkg` (its __init__ runs first), and from the submodule
    `pkg.name` when there is one: both count. So a submodule that its package's __init__ imports must not import
    its siblings through the package (`from pkg import sibling` reads a half-initialized `pkg`); `import
    pkg.sibling as sibling` does not read the package."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    targets = [origin] if origin in known else []
    return targets + [f"{origin}.{alias.name}" for alias in node.names if f"{origin}.{alias.name}" in known]


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                comment = "\n".join(lines[max(child.lineno - 2, 0) : child.end_lineno])
                for target in _targets(child, module, path.name == "__init__.py", known):
                    if target != module:
                        found.append(Import(module, target, child.lineno, local, comment))
            visit(child, local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(source), False)
    return found


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[Import]]:
    modules = project_modules(root)
    every = [i for name, path in modules.items() for i in imports_of(name, path, set(modules))]
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for i in every:
        graph[i.source].add(i.target)
    return graph, every


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _describe(component: list[str], imports: tp.Iterable[Import]) -> str:
    inside = set(component)
    edges = [f"{i.source}:{i.line} -> {i.target}" for i in imports if i.source in inside and i.target in inside]
    return " | ".join(sorted(set(edges)))


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, set[str]], list[Import]]:
    return import_graph(ROOT)


def test_no_import_cycle_counting_function_local_imports(project):
    graph, imports = project
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(_describe(c, imports) for c in found)


def test_leaf_modules_import_only_leaves(project):
    graph, _ = project
    for leaf, allowed in LEAVES.items():
        assert leaf in graph, f"{leaf} is listed as a leaf but does not exist"
        assert set(allowed) <= set(LEAVES), f"{leaf} may import only leaves, but its list names {allowed}"
        extra = graph[leaf] - set(allowed)
        assert not extra, f"{leaf} is a leaf but imports {sorted(extra)} (allowed: {list(allowed) or 'nothing ours'})"


def test_function_local_project_imports_say_what_they_defer(project):
    _, imports = project
    bare = sorted(
        {
            f"{i.source}:{i.line} imports {i.target}"
            for i in imports
            if i.local and (i.source, i.target) not in LOCAL_IMPORTS_ALLOWED and not DEFERS.search(i.comment)
        }
    )
    assert not bare, (
        "function-local imports of project modules without a '# defers <dependency>' note (import it at the top, "
        "or say which heavy optional dependency the import defers): " + "; ".join(bare)
    )
    unused = set(LOCAL_IMPORTS_ALLOWED) - {(i.source, i.target) for i in imports if i.local}
    assert not unused, f"LOCAL_IMPORTS_ALLOWED lists imports that no longer exist: {sorted(unused)}"


def room_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(ROOMS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no room of ROOMS: add it there and to docs/architecture.md")


def upward_imports(imports: tp.Iterable[Import]) -> list[str]:
    return sorted(
        f"{i.source}:{i.line} ({ROOMS[room_of(i.source)][0]}) imports {i.target} ({ROOMS[room_of(i.target)][0]})"
        for i in imports
        if room_of(i.target) > room_of(i.source)
    )


def test_imports_only_go_down_the_rooms(project):
    graph, imports = project
    for module in graph:
        room_of(module)
    upward = upward_imports(imports)
    assert not upward, "imports up the rooms of docs/architecture.md: " + "; ".join(upward)


def test_the_rooms_check_sees_an_upward_import():
    up = Import(source="core.weights", target="training.export", line=3, local=True, comment="")
    down = Import(source="training.export", target="core.weights", line=3, local=False, comment="")
    assert upward_imports([up, down]) == ["core.weights:3 (core) imports training.export (training)"]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_checks_see_a_cycle_through_a_function_local_import(tmp_path):
    """The checks themselves: a cycle closed only inside a function body, one through a package's __init__, and a
    leaf importing a non-leaf."""
    _write(
        tmp_path,
        {
            "core/__init__.py": "",
            "core/errors.py": "from core import versions\n",
            "core/versions.py": "from core import style\n",
            "core/style.py": "def load():\n    from core.versions import resolve\n\n    return resolve\n",
            "preprocessing/__init__.py": "from preprocessing.prepare import prepare\n",
            "preprocessing/prepare.py": "from preprocessing import vocals\n",
            "preprocessing/vocals.py": "",
            "training/methods/__init__.py": "from training.methods.lora import LoRA\n",
            "training/methods/lora.py": "import training.methods.base as base\n\n\ndef f():\n"
            "    from training.methods import text  # defers torch\n",
            "training/methods/base.py": "",
            "training/methods/text.py": "",
        },
    )
    graph, imports = import_graph(tmp_path)
    assert cycles(graph) == [
        ["core.style", "core.versions"],
        ["preprocessing", "preprocessing.prepare"],
        ["training.methods", "training.methods.lora"],
    ]
    assert "core.style:2 -> core.versions" in _describe(["core.style", "core.versions"], imports)
    assert graph["core.errors"] == {"core", "core.versions"}  # a leaf importing a non-leaf is seen
    # `import pkg.sub as sub` depends on the submodule alone; `from pkg import sub` on the package too
    assert graph["training.methods.lora"] == {"training.methods.base", "training.methods", "training.methods.text"}
    local = sorted({(i.source, i.target, bool(DEFERS.search(i.comment))) for i in imports if i.local})
    assert local == [
        ("core.style", "core.versions", False),
        ("training.methods.lora", "training.methods", True),
        ("training.methods.lora", "training.methods.text", True),
    ]


def test_the_catalogue_families_name_its_versions():
    from core import catalogue

    versions = set(catalogue.ALL_MODEL_VERSIONS)
    assert len(catalogue.MODEL_VERSION_CHOICES) == len(set(catalogue.MODEL_VERSION_CHOICES))
    assert set(catalogue.MELODY_VERSIONS) | set(catalogue.STEREO_VERSIONS) <= versions
    assert set(catalogue.FSDP_AUTO_VERSIONS) <= set(catalogue.PRETRAINED) | set(catalogue.STYLE_PRETRAINED)
    assert set(catalogue.LM_LAYOUTS) <= set(catalogue.MODEL_VERSIONS)
    for version, (_, n_q) in catalogue.LM_LAYOUTS.items():  # stereo interleaves two channels' codebooks
        assert (n_q == 8) == (version in catalogue.STEREO_VERSIONS), version
    assert not set(catalogue.SCRATCH_VERSIONS) & versions  # trained from scratch: trainable, not loadable


def test_the_methods_are_the_catalogue_s():
    from core import catalogue
    from training.methods import method_names
    from training.params import TrainParams

    assert method_names() == catalogue.METHODS
    field = next(f for f in dataclasses.fields(TrainParams) if f.name == "method")
    assert tuple(field.metadata["choices"]) == catalogue.METHODS
