"""The Cog surface as `cog build` and Replicate see it: the schema written from our signatures, and coglet serving
with that schema (it refuses what the schema does not allow, before our code runs)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest
import soundfile as sf

from tests import cog_schema
from tests.helpers import decode_data_uri

# What a Replicate client sends: only the inputs the user set (the rest take the schema's defaults).
REPLICATE_PREDICTION = {"model_version": "tiny", "prompt": "lofi beat", "duration": 1}


def schemas() -> dict:
    return cog_schema.combined_schema()["components"]["schemas"]


def test_signatures_follow_the_schema_generators_rules():
    assert cog_schema.rule_violations() == []


def test_signatures_are_written_from_the_dataclasses():
    """The one check a contributor meets: `--check` fails on a stale file and names the command that fixes it."""
    from tests.helpers import ROOT

    done = subprocess.run(
        [sys.executable, "scripts/cog_signatures.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_a_stale_signature_is_found_and_rewritten(tmp_path, monkeypatch, capsys):
    """A signature edited by hand (or a dataclass changed without running the command) is found, the message names
    the command, and the command writes back exactly what the dataclass makes, formatted as ruff formats it."""
    from tests.helpers import ROOT

    generator = cog_schema.signature_generator()
    for name in ("predict.py", "train.py", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.setattr(generator, "ROOT", tmp_path)
    assert generator.stale() == []
    original = (tmp_path / "predict.py").read_text()
    edited = original.replace("default=250, ge=0", "default=200, ge=0")
    assert edited != original
    (tmp_path / "predict.py").write_text(edited)
    (tmp_path / "train.py").write_text((tmp_path / "train.py").read_text().replace("default=3, ge=1,", "ge=1,"))
    assert generator.stale() == ["predict.py", "train.py"]
    capsys.readouterr()
    assert generator.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert f"predict.py: its Cog signature differs from the params dataclass; run `{generator.COMMAND}`" in err, err
    assert generator.main([]) == 0
    assert generator.stale() == []
    assert (tmp_path / "predict.py").read_text() == original


def test_required_inputs_are_only_the_training_data():
    s = schemas()
    assert "required" not in s["Input"]
    assert s["TrainingInput"]["required"] == ["dataset_path"]


def test_every_input_has_its_description_verbatim():
    from core.params import cog_fields
    from generation.params import PredictParams
    from training.params import TrainParams

    s = schemas()
    for key, cls in (("Input", PredictParams), ("TrainingInput", TrainParams)):
        props = s[key]["properties"]
        assert list(props) == [f.name for f in cog_fields(cls)]
        for f in cog_fields(cls):
            assert props[f.name]["description"] == f.metadata["description"], f.name


def test_train_keeps_its_own_model_versions_in_the_combined_schema():
    s = schemas()
    enum = s["model_version"]["enum"]
    assert {"fine-tuned", "micro", "tiny-micro", "stereo-melody"} <= set(enum)
    assert s["TrainingInput"]["properties"]["model_version"]["default"] == "stereo-melody"
    assert s["Input"]["properties"]["model_version"]["default"] == "fine-tuned"


def test_outputs_are_one_file():
    s = schemas()
    assert s["Output"] == {"type": "string", "format": "uri", "title": "Output"}
    assert s["TrainingOutput"]["properties"]["weights"]["format"] == "uri"


def test_secrets_are_secret_and_optional():
    props = schemas()["TrainingInput"]["properties"]
    for name in ("wandb_api_key", "hf_token"):
        assert props[name]["format"] == "password" and props[name]["x-cog-secret"] is True
        assert props[name]["nullable"] is True


def test_the_generator_reads_the_old_signatures_as_the_issue_measured(tmp_path, monkeypatch):
    """The rules check is not vacuous: on a signature written the old way it finds what broke the pushed model."""
    old = tmp_path / "predict.py"
    old.write_text(
        "from cog import BasePredictor, Input, Path\n"
        "class Predictor(BasePredictor):\n"
        "    def predict(\n"
        "        self,\n"
        '        prompt: str = Input(description="A prompt.", default=None),\n'
        '        duration: int = Input(description="Seconds of audio. "\n'
        '            "Beyond 30 s, windows.", default=8),\n'
        '        top_k: int = Input(description=("Sampling."), default=250),\n'
        "    ) -> Path:\n"
        "        ...\n"
    )
    monkeypatch.setattr(cog_schema, "ROOT", tmp_path)
    schema = cog_schema.mode_schema("predict.py:Predictor", train=False)["components"]["schemas"]["Input"]
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["duration"]["description"] == 'Seconds of audio. "\n            "Beyond 30 s, windows.'
    assert "description" not in schema["properties"]["top_k"]


# ------------------------------------------------------------------ coglet serving the schema


def _expected_property(field) -> dict:
    """What Replicate must be told about one predict input, from the dataclass alone (not from the schema file the
    server was given): JSON type, default, whether it may be left empty, choices and bounds."""
    from core.params import base_type

    base, optional = base_type(field.type)
    meta = field.metadata
    if meta.get("choices"):
        return {"choices": list(meta["choices"]), "default": field.default}
    kind = {bool: "boolean", int: "integer", float: "number", str: "string"}[base]
    expected = {"type": kind, "default": field.default, "nullable": optional}
    if meta.get("file"):
        expected["format"] = "uri"
    for key, bound in (("minimum", "ge"), ("maximum", "le")):
        if meta[bound] is not None:
            expected[key] = meta[bound]
    return expected


def test_openapi_json_serves_our_inputs(server):
    """What coglet serves (and so what Replicate's form and API offer) against the predict inputs themselves: every
    input, in signature order, none required, with its type, default, choices and bounds."""
    from core.params import cog_fields
    from generation.params import PredictParams

    served = server.get("/openapi.json")["components"]["schemas"]
    spec = served["Input"]
    assert "required" not in spec  # a Replicate client may send only the inputs a user set
    fields = cog_fields(PredictParams)
    # coglet serves the properties sorted by name; `x-order` keeps the signature's order for Replicate's form
    assert sorted(spec["properties"], key=lambda name: spec["properties"][name]["x-order"]) == [f.name for f in fields]
    for f in fields:
        prop, expected = spec["properties"][f.name], _expected_property(f)
        if "choices" in expected:
            enum = served[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]["enum"]
            assert (enum, prop["default"]) == (expected["choices"], expected["default"]), f.name
            continue
        seen = {
            "type": prop.get("type"),
            "default": prop.get("default"),
            "nullable": prop.get("nullable", False),
            **{key: prop[key] for key in ("format", "minimum", "maximum") if key in prop},
        }
        assert seen == expected, f.name
    assert served["Output"] == {"type": "string", "format": "uri", "title": "Output"}  # one file


def test_a_replicate_prediction_with_only_the_inputs_a_user_sets(server):
    status, body = server.post("/predictions", {"input": REPLICATE_PREDICTION})
    assert status == 200 and body["status"] == "succeeded", body
    assert isinstance(body["output"], str)  # one file, as meta/musicgen returns
    data, sr = sf.read(io.BytesIO(decode_data_uri(body["output"])), always_2d=True)
    assert sr == 32000 and data.shape == (32000, 1)
    assert "Random seed:" in body["logs"], body["logs"]  # the random seed used reaches the prediction's logs
    assert "Loading MusicGen tiny" in server.log()  # setup()'s lines reach the server's log


def test_an_optional_input_is_left_out_not_sent_as_null(server):
    """coglet 0.23.1 validates with a JSON-Schema validator that ignores OpenAPI's `nullable`: an explicit `null`
    is a 422 for every input, nullable or not (measured on a bare predictor too). Replicate's clients leave unset
    inputs out, which works; a `null` is refused by name before any work, never a traceback."""
    status, body = server.post("/predictions", {"input": {**REPLICATE_PREDICTION, "seed": None}})
    assert status == 422 and "seed" in json.dumps(body), body
    status, body = server.post("/predictions", {"input": {**REPLICATE_PREDICTION, "seed": 4}})
    assert status == 200 and body["status"] == "succeeded", body
    assert "seed 4" in body["logs"], body["logs"]


@pytest.mark.parametrize(
    "inputs,name",
    [
        ({"duration": 0}, "duration"),
        ({"top_p": 1.5}, "top_p"),
        ({"normalization_strategy": "loud"}, "normalization_strategy"),
        ({"model_version": "tiny-nope"}, "model_version"),
    ],
)
def test_a_bad_or_unknown_input_is_a_422_naming_it(server, inputs, name):
    status, body = server.post("/predictions", {"input": {**REPLICATE_PREDICTION, **inputs}})
    assert status == 422, (status, body)
    assert name in json.dumps(body), body


def test_coglet_drops_an_unknown_input_before_our_code(server):
    """Measured on coglet 0.23.1 with the schema: a misspelt input (`promt`) or a CLI-only one (`num_outputs`) is
    dropped, not refused (the schema `cog build` writes has no `additionalProperties: false`), so the prediction
    runs as if it had not been sent. README says so; this test notices when coglet starts refusing them."""
    base = {"model_version": "tiny", "duration": 1, "seed": 11}
    outputs = []
    for extra in ({}, {"promt": "lofi beat"}, {"num_outputs": 2}):
        status, body = server.post("/predictions", {"input": {**base, **extra}})
        assert status == 200 and body["status"] == "succeeded", body
        outputs.append(decode_data_uri(body["output"]))
    assert outputs[0] == outputs[1] == outputs[2]


def _check_against(schema_key: str, inputs: dict) -> list[str]:
    """What coglet would refuse in `inputs` under the combined schema (types, choices, bounds, required)."""
    s = schemas()
    spec = s[schema_key]
    problems = [f"missing {name}" for name in spec.get("required", []) if name not in inputs]
    json_types = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
    for name, value in inputs.items():
        prop = spec["properties"].get(name)
        if prop is None:
            problems.append(f"unknown input {name}")
            continue
        if "allOf" in prop:
            enum = s[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]["enum"]
            if value not in enum:
                problems.append(f"{name}={value!r} not a choice")
            continue
        if not isinstance(value, json_types[prop["type"]]) or isinstance(value, bool) != (prop["type"] == "boolean"):
            problems.append(f"{name}={value!r} is not {prop['type']}")
        if "minimum" in prop and value < prop["minimum"] or "maximum" in prop and value > prop["maximum"]:
            problems.append(f"{name}={value!r} out of range")
    return problems


def test_the_readme_replicate_api_flow_sends_valid_inputs():
    import ast

    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    code = readme.split("<!-- replicate-api -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    calls = {}
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            for kw in node.keywords:
                if kw.arg == "input":
                    calls[node.func.attr] = ast.literal_eval(kw.value)
    assert set(calls) == {"create", "run"}, calls
    assert _check_against("TrainingInput", calls["create"]) == []
    assert _check_against("Input", calls["run"]) == []
    # ... and the checker is not blind: what coglet refuses, it refuses.
    assert _check_against("TrainingInput", {"model_version": "tiny"}) == ["missing dataset_path"]
    assert _check_against("Input", {"duration": 0, "model_version": "huge"}) != []
