"""The OpenAPI schema `cog build` writes to `.cog/openapi_schema.json`, computed here the way Cog computes it.

`cog build` (Cog >= 0.17) does not import the model: a static generator written in Go (replicate/cog
`pkg/schema`) reads `predict.py` / `train.py` with a parser and writes the schema that coglet then enforces
(422 for a missing required input, a `null` for a non-nullable one, an unknown input, a value out of range).
That generator is not available here (no Go toolchain, no Docker), so this module reproduces the rules it follows,
read from its source (v0.22.0), with Python's own parser:

- A parameter is **required** when it has no effective default. `x: str = Input(default=None)` has none: a None
  default on a non-nullable type is dropped (only `Secret` is excused), so it is required. `x: str | None` is
  nullable and has the default `null`.
- Literals are read from the source text, not evaluated: a string's value is the raw text between its outer
  quotes (no escape processing); a parenthesised expression or an f-string is no literal and is dropped; an
  implicitly concatenated string keeps the quotes and the whitespace between its pieces.
- A `choices=` list becomes a component schema named after the *input*; when predict and train are merged into
  one file, a train component whose name predict already uses is dropped (predict's wins).

`rule_violations()` lists the places where our signatures would be read differently from what they mean (the
rules above); `combined_schema()` is what the pushed model serves; `python tests/cog_schema.py > out.json`
writes it.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import sys
import tokenize
import types
import typing as tp
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

_PRIMITIVES: dict[str, dict[str, tp.Any]] = {
    "bool": {"type": "boolean"},
    "float": {"type": "number"},
    "int": {"type": "integer"},
    "str": {"type": "string"},
    "Path": {"type": "string", "format": "uri"},
    "File": {"type": "string", "format": "uri"},
    "Secret": {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True},
}
_NO_VALUE = object()


def title_case(name: str) -> str:
    return " ".join(p[:1].upper() + p[1:] for p in name.split("_"))


class Field(tp.NamedTuple):
    name: str
    type_name: str  # a key of _PRIMITIVES, or "list[<key>]"
    nullable: bool
    default: tp.Any  # _NO_VALUE: no default at all; None: a None default
    description: str | None
    description_problem: str | None  # why the generator reads the description differently, if it does
    ge: float | None
    le: float | None
    choices: list[tp.Any] | None


def _literal(node: ast.expr, source: str) -> tuple[tp.Any, str | None]:
    """(value as Cog's generator reads it, problem or None). `_NO_VALUE` when it reads no literal."""
    text = ast.get_source_segment(source, node) or ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        tokens = [
            t
            for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER, tokenize.COMMENT, tokenize.INDENT)
        ]
        if not text.startswith(("'", '"', "r'", 'r"')):
            return _NO_VALUE, "not a plain string literal (parenthesised or prefixed): dropped"
        if len(tokens) != 1:
            raw = text[3:-3] if text.startswith(('"""', "'''")) else text[1:-1] if text[0] in "'\"" else text[2:-1]
            return raw, "implicitly concatenated: the raw text between the pieces is kept"
        raw = text[3:-3] if text.startswith(('"""', "'''")) else text[1:-1] if text[0] in "'\"" else text[2:-1]
        problem = None if raw == node.value else "has escapes or a prefix: read as raw text"
        return raw, problem
    if isinstance(node, ast.JoinedStr):
        return _NO_VALUE, "an f-string: dropped"
    if isinstance(node, ast.Constant):
        return node.value, None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value, None
    if isinstance(node, ast.List | ast.Tuple):
        values = [_literal(e, source)[0] for e in node.elts]
        if any(v is _NO_VALUE for v in values):
            return _NO_VALUE, "a list holding a non-literal: dropped"
        return values, None
    return _NO_VALUE, f"not a literal ({type(node).__name__}): dropped"


def _annotation(node: ast.expr | None) -> tuple[str, bool]:
    """(type name, nullable) of `int`, `int | None`, `Optional[int]`, `list[Path]`."""
    if node is None:
        raise ValueError("every input needs a type annotation")
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        return _annotation(ast.parse(node.value, mode="eval").body)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        parts = [node.left, node.right]
        rest = [p for p in parts if not (isinstance(p, ast.Constant) and p.value is None)]
        if len(rest) != 1:
            raise ValueError(f"unsupported union {ast.unparse(node)}")
        return _annotation(rest[0])[0], True
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        if node.value.id == "Optional":
            return _annotation(node.slice)[0], True
        if node.value.id in ("list", "List"):
            return f"list[{_annotation(node.slice)[0]}]", False
    if isinstance(node, ast.Name) and node.id in _PRIMITIVES:
        return node.id, False
    if isinstance(node, ast.Attribute) and node.attr in _PRIMITIVES:
        return node.attr, False
    raise ValueError(f"unsupported input type {ast.unparse(node)}")


def _fields(func: ast.FunctionDef, source: str) -> list[Field]:
    args = [a for a in func.args.args if a.arg != "self"]
    defaults: list[ast.expr | None] = [None] * (len(args) - len(func.args.defaults)) + list(func.args.defaults)
    out = []
    for arg, default in zip(args, defaults, strict=True):
        type_name, nullable = _annotation(arg.annotation)
        kw: dict[str, ast.expr] = {}
        if isinstance(default, ast.Call) and getattr(default.func, "id", getattr(default.func, "attr", "")) == "Input":
            kw = {k.arg: k.value for k in default.keywords if k.arg}
            value = _literal(kw["default"], source)[0] if "default" in kw else _NO_VALUE
        elif default is not None:
            value = _literal(default, source)[0]
        else:
            value = _NO_VALUE
        description, problem = _literal(kw["description"], source) if "description" in kw else (None, None)
        if "description" in kw and _parenthesised(default, "description", source):
            description, problem = _NO_VALUE, "parenthesised (no string node to the parser): dropped"
        choices = _literal(kw["choices"], source)[0] if "choices" in kw else None
        out.append(
            Field(
                name=arg.arg,
                type_name=type_name,
                nullable=nullable,
                default=value,
                description=None if description is _NO_VALUE else description,
                description_problem=problem,
                ge=_literal(kw["ge"], source)[0] if "ge" in kw else None,
                le=_literal(kw["le"], source)[0] if "le" in kw else None,
                choices=None if choices is _NO_VALUE else choices,
            )
        )
    return out


def _parenthesised(call: ast.expr | None, name: str, source: str) -> bool:
    """Is keyword `name` of `call` written `name=( ... )`? (ast drops the parentheses; the parser does not.)"""
    keyword = next(k for k in tp.cast(ast.Call, call).keywords if k.arg == name)
    text = ast.get_source_segment(source, keyword) or ""
    return text.split("=", 1)[1].lstrip().startswith("(")


def _type_schema(type_name: str) -> dict[str, tp.Any]:
    if type_name.startswith("list["):
        return {"type": "array", "items": dict(_PRIMITIVES[type_name[5:-1]])}
    return dict(_PRIMITIVES[type_name])


def _find(ref: str) -> tuple[ast.FunctionDef, str, ast.expr | None]:
    """The `predict`/`run` method of a class or the function a cog.yaml reference names."""
    file_name, name = ref.split(":")
    source = (ROOT / file_name).read_text()
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            methods = {m.name: m for m in node.body if isinstance(m, ast.FunctionDef)}
            method = methods.get("run") or methods.get("predict")
            if method is None:
                raise ValueError(f"{ref}: no run() or predict() method")
            return method, source, method.returns
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node, source, node.returns
    raise ValueError(f"{ref} not found")


def _output_schema(returns: ast.expr | None, source: str) -> dict[str, tp.Any]:
    if isinstance(returns, ast.Name) and returns.id not in _PRIMITIVES:  # a BaseModel output
        tree = ast.parse(source)
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == returns.id)
        props, required = {}, []
        for item in cls.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                type_name, nullable = _annotation(item.annotation)
                prop = _type_schema(type_name) | {"title": title_case(item.target.id)}
                if nullable:
                    prop["nullable"] = True
                props[item.target.id] = prop
                if item.value is None and not nullable:
                    required.append(item.target.id)
        schema: dict[str, tp.Any] = {"type": "object", "properties": props}
        if required:
            schema["required"] = required
        return schema | {"title": "Output"}
    type_name, nullable = _annotation(returns)
    schema = _type_schema(type_name) | {"title": "Output"}
    if nullable:
        schema["nullable"] = True
    return schema


def mode_schema(ref: str, train: bool) -> dict[str, tp.Any]:
    """The schema of one mode (predict or train), as Cog's generator writes it."""
    func, source, returns = _find(ref)
    properties: dict[str, tp.Any] = {}
    required: list[str] = []
    enums: dict[str, tp.Any] = {}
    for order, f in enumerate(_fields(func, source)):
        prop: dict[str, tp.Any] = {"x-order": order}
        if f.choices:
            json_type = _PRIMITIVES.get(f.type_name, {"type": "string"})["type"]
            enums[f.name] = {"title": f.name, "description": "An enumeration.", "enum": f.choices, "type": json_type}
            prop["allOf"] = [{"$ref": f"#/components/schemas/{f.name}"}]
        else:
            prop["title"] = title_case(f.name)
            prop.update(_type_schema(f.type_name))
        nullable = f.nullable or (f.type_name == "Secret" and f.default is None)
        has_default = f.default is not _NO_VALUE and not (f.default is None and not nullable)
        if not has_default and not nullable:
            required.append(f.name)
        if has_default:
            prop["default"] = f.default
        if nullable:
            prop["nullable"] = True
        if f.description is not None:
            prop["description"] = f.description
        if f.ge is not None:
            prop["minimum"] = f.ge
        if f.le is not None:
            prop["maximum"] = f.le
        properties[f.name] = prop
    input_key, output_key = ("TrainingInput", "TrainingOutput") if train else ("Input", "Output")
    request, response = (
        ("TrainingRequest", "TrainingResponse") if train else ("PredictionRequest", "PredictionResponse")
    )
    endpoint = "/trainings" if train else "/predictions"
    input_schema: dict[str, tp.Any] = {"title": input_key, "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    ref_in, ref_out = f"#/components/schemas/{input_key}", f"#/components/schemas/{output_key}"
    components: dict[str, tp.Any] = {input_key: input_schema, output_key: _output_schema(returns, source), **enums}
    components[request] = {
        "title": request,
        "type": "object",
        "properties": {"id": {"title": "Id", "type": "string"}, "input": {"$ref": ref_in}},
    }
    components[response] = {
        "title": response,
        "type": "object",
        "properties": {
            "input": {"$ref": ref_in},
            "output": {"$ref": ref_out},
            **{k: {"title": title_case(k), "type": "string"} for k in ("id", "version")},
            **{
                k: {"title": title_case(k), "type": "string", "format": "date-time"}
                for k in ("created_at", "started_at", "completed_at")
            },  # fmt: skip
            **{k: {"title": title_case(k), "type": "string"} for k in ("status", "error", "logs")},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    }
    components["Status"] = {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    }
    components["HTTPValidationError"] = {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {"title": "Detail", "type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}
        },
    }
    components["ValidationError"] = {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {
                "title": "Location",
                "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            },
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    }
    ok = {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}
    invalid = {
        "description": "Validation Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
    }
    cancel_param = "training_id" if train else "prediction_id"
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": ok}}},
        "/health-check": {
            "get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": {"200": ok}}
        },
        endpoint: {
            "post": {
                "summary": "Train" if train else "Predict",
                "description": f"Run a single {'training' if train else 'prediction'} on the model",
                "operationId": "train_trainings_post" if train else "predict_predictions_post",
                "requestBody": {
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}}
                },
                "responses": {
                    "200": {
                        "description": "Successful Response",
                        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}}},
                    },
                    "422": invalid,
                },
            }
        },
        f"{endpoint}/{{{cancel_param}}}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": f"cancel_{endpoint.strip('/')}__{cancel_param}__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": title_case(cancel_param), "type": "string"},
                        "name": cancel_param,
                        "in": "path",
                    }
                ],
                "responses": {"200": ok, "422": invalid},
            }
        },
    }
    return {"openapi": "3.0.2", "info": {"title": "Cog", "version": "0.22.0"}, "paths": paths,
            "components": {"schemas": components}}  # fmt: skip


def signature_generator() -> types.ModuleType:
    """`scripts/cog_signatures.py`, the command that writes our signatures from the params dataclasses."""
    spec = importlib.util.spec_from_file_location("cog_signatures", ROOT / "scripts" / "cog_signatures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def refs() -> tuple[str, str]:
    cfg = yaml.safe_load((ROOT / "cog.yaml").read_text())
    return cfg.get("run") or cfg["predict"], cfg["train"]


def combined_schema() -> dict[str, tp.Any]:
    """Predict and train merged as `cog build` merges them: predict's paths and components win."""
    predict_ref, train_ref = refs()
    merged = mode_schema(predict_ref, train=False)
    train = mode_schema(train_ref, train=True)
    for key, value in train["paths"].items():
        merged["paths"].setdefault(key, value)
    for key, value in train["components"]["schemas"].items():
        merged["components"]["schemas"].setdefault(key, value)
    return merged


def rule_violations() -> list[str]:
    """Each place where the generator would read our signatures differently from what they say."""
    problems = []
    modes = {}
    for ref, train in zip(refs(), (False, True), strict=True):
        func, source, _ = _find(ref)
        fields = _fields(func, source)
        modes[train] = {f.name: f for f in fields}
        for f in fields:
            where = f"{ref} {f.name}"
            if f.default is None and not f.nullable and f.type_name != "Secret":
                problems.append(f"{where}: default None on a non-nullable type is read as required; annotate X | None")
            if f.default is _NO_VALUE and not (train and f.name == "dataset_path"):
                problems.append(f"{where}: no default, so required (only train's dataset_path may be)")
            if f.description is None:
                problems.append(f"{where}: no description the generator can read (one plain string literal)")
            elif f.description_problem:
                problems.append(f"{where}: description {f.description_problem}")
    for name in set(modes[False]) & set(modes[True]):
        a, b = modes[False][name].choices, modes[True][name].choices
        if (a or b) and a != b:
            problems.append(f"{name}: choices differ between predict and train; one component '{name}' holds predict's")
    return problems


if __name__ == "__main__":
    json.dump(combined_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
