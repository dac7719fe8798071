"""core.params: coercion, bounds and parsing shared by every command."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from core.params import InputError, build_parser, from_args, from_kwargs, param


@dataclass(frozen=True)
class Example:
    name: str = param("a", "a name", choices=("a", "b"))
    count: int = param(3, "a count", ge=1, le=10)
    ratio: float | None = param(None, "a ratio", ge=0)
    flag: bool = param(False, "a flag")


def test_defaults_and_none_fall_back():
    assert from_kwargs(Example) == Example()
    assert from_kwargs(Example, count=None).count == 3  # Cog passes missing inputs as None


def test_coercion():
    ex = from_kwargs(Example, count="4", ratio="0.5", flag="true")
    assert (ex.count, ex.ratio, ex.flag) == (4, 0.5, True)


@pytest.mark.parametrize(
    "kw,name",
    [({"name": "c"}, "name"), ({"count": 0}, "count"), ({"count": 11}, "count"), ({"count": 2.5}, "count"),
     ({"ratio": -1}, "ratio"), ({"flag": "maybe"}, "flag"), ({"other": 1}, "other")],
)  # fmt: skip
def test_errors_name_the_input(kw, name):
    with pytest.raises(InputError) as err:
        from_kwargs(Example, **kw)
    assert err.value.name == name and f"'{name}'" in str(err.value)


def test_cli():
    assert from_args(Example, ["--count", "5", "--flag", "yes", "--ratio", "none"]) == Example(count=5, flag=True)
    with pytest.raises(SystemExit):
        build_parser(Example).parse_args(["--name", "z"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", "1e999"])
def test_non_finite_floats_are_refused_naming_the_input(value):
    # `value < ge` is False for NaN, so before the finiteness rule NaN passed every bound.
    with pytest.raises(InputError) as err:
        from_kwargs(Example, ratio=value)
    assert err.value.name == "ratio"
    assert "give a finite value" in str(err.value) and ("nan" in str(err.value) or "inf" in str(err.value))


@pytest.mark.parametrize(
    "cls_name,kw,name",
    [
        ("train", {"weight_decay": float("nan")}, "weight_decay"),
        ("train", {"lr": "nan"}, "lr"),
        ("train", {"cfg_p": float("inf")}, "cfg_p"),
        ("predict", {"temperature": float("nan")}, "temperature"),
        ("predict", {"top_p": "nan"}, "top_p"),
        ("predict", {"classifier_free_guidance": float("nan")}, "classifier_free_guidance"),
        ("predict", {"classifier_free_guidance": float("inf")}, "classifier_free_guidance"),
        ("predict", {"classifier_free_guidance_beta": "inf"}, "classifier_free_guidance_beta"),
    ],
)
def test_train_and_predict_refuse_nan_and_inf(cls_name, kw, name):
    from generation.params import PredictParams
    from training.params import TrainParams

    cls, base = (TrainParams, {"dataset_path": "songs.zip"}) if cls_name == "train" else (PredictParams, {})
    with pytest.raises(InputError) as err:
        from_kwargs(cls, **base, **kw)
    assert err.value.name == name
    assert str(err.value).startswith(f"Invalid input '{name}': ") and "give a finite value" in str(err.value)


@pytest.mark.parametrize(
    "script,args,name",
    [
        ("train.py", ["--weight_decay", "nan"], "weight_decay"),
        ("train.py", ["--lr", "nan"], "lr"),
        ("predict.py", ["--temperature", "nan"], "temperature"),
        ("predict.py", ["--top_p", "nan"], "top_p"),
        ("predict.py", ["--classifier_free_guidance", "nan"], "classifier_free_guidance"),
        ("predict.py", ["--classifier_free_guidance", "inf"], "classifier_free_guidance"),
    ],
)
def test_clis_refuse_nan_and_inf_in_one_line(tmp_path, script, args, name):
    """The command lines: one line naming the input, exit 2, no traceback, nothing written (before any work)."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    extra = ["--dataset_path", str(tmp_path / "songs.zip"), "--output_dir", str(tmp_path / "out")]
    if script == "predict.py":
        extra = ["--model_version", "tiny", "--prompt", "x", "--duration", "1", "--output", str(tmp_path / "o.wav")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / script), *args, *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"Invalid input '{name}'" in lines[0] and "finite" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before any work: nothing was written
