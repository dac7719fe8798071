"""Write the Cog signatures of `predict.py` (`Predictor.run`) and `train.py` (`train`) from the params dataclasses.

The inputs are declared once, as `param(...)` fields of `generation.params.PredictParams` and
`training.params.TrainParams`. Cog's schema generator (`cog build`) does not import the model: it reads the
signature's source, so each input must be a literal `Input(...)` there (one plain string literal per description,
`X | None` for a None default; tests/cog_schema.py lists the rules). This command writes those literals between
the markers of each file, formatted as `ruff format` formats them:

    .venv/bin/python scripts/cog_signatures.py           # rewrite the signatures
    .venv/bin/python scripts/cog_signatures.py --check   # exit 1 and say so when a file is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shutil
import subprocess
import sys
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages are importable from its root
    sys.path.insert(0, str(ROOT))

from core.params import base_type, cog_fields  # noqa: E402

COMMAND = ".venv/bin/python scripts/cog_signatures.py"
MARK = "# <cog-signature"
BEGIN = MARK + " of {params}: edit the dataclass, then run {command}>"
END = "# </cog-signature>"


@dataclasses.dataclass(frozen=True)
class Target:
    file: str
    params: str  # module:class of the dataclass
    header: str  # `def run(` / `def train(`
    leading: tuple[str, ...]  # parameters before the inputs (`self`)
    returns: str
    body: str  # the one line that hands the inputs to hand-written code


TARGETS = (
    Target(
        "predict.py", "generation.params:PredictParams", "def run(", ("self",), "Path", "return self._run(locals())"
    ),
    Target("train.py", "training.params:TrainParams", "def train(", (), "TrainingOutput", "return _train(locals())"),
)


def _string(text: str, where: str) -> str:
    # Cog's generator reads the raw text between the quotes: an escape would reach Replicate as written.
    if any(c in text for c in '"\\\n'):
        raise ValueError(f"{where}: a Cog literal cannot hold a double quote, a backslash or a newline: {text!r}")
    return f'"{text}"'


def _literal(value: tp.Any, where: str) -> str:
    if isinstance(value, str):
        return _string(value, where)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_literal(v, where) for v in value) + "]"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    raise ValueError(f"{where}: {value!r} is no literal Cog can read")


def _input(f: dataclasses.Field) -> str:
    """`name: type = Input(description=..., default=..., ge=..., le=..., choices=[...])` for one field."""
    base, optional = base_type(f.type)
    meta = f.metadata
    type_name = "Path" if meta["file"] else "Secret" if meta["secret"] else base.__name__
    if f.default is None and not optional:
        raise ValueError(f"{f.name}: a None default on `{f.type}`: Cog would require it; annotate it `X | None`")
    annotation = f"{type_name} | None" if optional and not meta["required"] else type_name
    args = [f"description={_string(meta['description'], f.name)}"]
    if not meta["required"]:
        args.append(f"default={_literal(f.default, f.name)}")
    for key in ("ge", "le", "choices"):
        if meta[key] is not None:
            args.append(f"{key}={_literal(meta[key], f.name)}")
    return f"{f.name}: {annotation} = Input({', '.join(args)}),"


def signature(target: Target, indent: str) -> str:
    """The generated lines of `target`, markers included, before formatting."""
    module, name = target.params.split(":")
    cls = getattr(importlib.import_module(module), name)
    inner = indent + "    "
    lines = [indent + BEGIN.format(command=COMMAND, params=target.params), indent + target.header]
    lines += [f"{inner}{p}," for p in target.leading]
    lines += [inner + _input(f) for f in cog_fields(cls)]
    lines += [f"{indent}) -> {target.returns}:", inner + target.body, inner + END]
    return "\n".join(lines)


def _ruff_format(source: str, file: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(ROOT / file), "-"],
        input=source,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ruff format failed on the generated {file}:\n{done.stderr}")
    return done.stdout


def generated(target: Target) -> str:
    """`target.file` as it must be: its signature block written from the dataclass, the file formatted by ruff."""
    text = (ROOT / target.file).read_text()
    lines = text.split("\n")
    begins = [i for i, line in enumerate(lines) if line.lstrip().startswith(MARK)]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ValueError(f"{target.file}: expected one `{MARK} ...>` line and one `{END}` after it")
    begin, end = begins[0], ends[0]
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    new = "\n".join([*lines[:begin], signature(target, indent), *lines[end + 1 :]])
    return _ruff_format(new, target.file)


def stale() -> list[str]:
    """The files whose signature is not what the dataclasses make."""
    return [t.file for t in TARGETS if generated(t) != (ROOT / t.file).read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say which files are stale (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        files = stale()
        for file in files:
            print(f"{file}: its Cog signature differs from the params dataclass; run `{COMMAND}`", file=sys.stderr)
        return 1 if files else 0
    for target in TARGETS:
        path = ROOT / target.file
        new = generated(target)
        if new != path.read_text():
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(new)
            shutil.copymode(path, tmp)
            tmp.replace(path)
            print(f"Wrote {target.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
