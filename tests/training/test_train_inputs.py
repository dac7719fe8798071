"""train.py's inputs: one definition for Cog and the CLI, and bad inputs refused before any long work."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import zipfile

import pytest

import train
from core.params import InputError, from_kwargs
from core.versions import MODEL_VERSIONS
from tests.cog_schema import signature_generator
from tests.helpers import ROOT
from tests.training.conftest import make_prepared, tiny_params
from training.params import TrainParams
from training.run import check_inputs, run_training


def test_cog_signature_is_written_from_the_dataclass():
    generator = signature_generator()
    assert "train.py" not in generator.stale(), f"train.py's Cog signature is stale: run {generator.COMMAND}"


def test_defaults_follow_the_issue():
    p = TrainParams()
    assert (p.model_version, p.epochs, p.updates_per_epoch, p.batch_size) == ("stereo-melody", 3, 100, 16)
    assert (p.optimizer, p.lr, p.lr_scheduler, p.warmup, p.cfg_p) == ("dadam", 1.0, "cosine", 8, 0.3)
    assert (p.grad_accumulation, p.precision, p.weight_decay, p.ema, p.use_wandb, p.method) == (
        1,
        "auto",
        0.01,
        False,
        False,
        "full",
    )
    field = {f.name: f for f in dataclasses.fields(TrainParams)}
    # One choice list for predict and train (Cog's combined schema has one `model_version` component).
    assert field["model_version"].metadata["choices"] == ["fine-tuned", *MODEL_VERSIONS, "style", "tiny-style",
                                                          "micro", "tiny-micro"]  # fmt: skip
    assert field["lr_scheduler"].metadata["choices"] == [
        "cosine",
        "exponential",
        "polynomial_decay",
        "inverse_sqrt",
        "linear_warmup",
    ]


def test_cli_help_lists_every_input():
    out = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    for f in dataclasses.fields(TrainParams):
        assert f"--{f.name}" in out
    assert "--output_dir" in out


def test_cli_refuses_adamw_with_lr_1(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--dataset_path", "x.zip", "--optimizer", "adamw", "--lr", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "'lr'" in proc.stderr and "1e-5" in proc.stderr
    assert not (tmp_path / "output").exists()


@pytest.mark.parametrize(
    "inputs,name,words",
    [
        ({"model_version": "huge"}, "model_version", "not one of"),
        ({"epochs": 0}, "epochs", "minimum"),
        ({"batch_size": 0}, "batch_size", "minimum"),
        ({"cfg_p": 1.5}, "cfg_p", "maximum"),
        ({"optimizer": "sgd"}, "optimizer", "not one of"),
        ({"updates_per_epoch": "many"}, "updates_per_epoch", "integer"),
    ],
)
def test_bad_values_are_refused_naming_the_input(inputs, name, words):
    with pytest.raises(InputError) as err:
        from_kwargs(TrainParams, dataset_path="x.zip", **inputs)
    assert err.value.name == name and words in str(err.value)


@pytest.mark.parametrize(
    "inputs,name,words",
    [
        ({"optimizer": "adamw", "lr": 1.0}, "lr", "1e-5"),
        ({"optimizer": "adamw", "lr": 0.1}, "lr", "1e-5"),
        ({"lr": 0.0}, "lr", "above 0"),
        ({"dataset_path": None}, "dataset_path", "no training data"),
        ({"precision": "fp16"}, "precision", "GPU"),
        ({"use_wandb": True}, "use_wandb", "wandb"),
        ({"resume_from": "/nonexistent/checkpoint-00000010.pt"}, "resume_from", "does not exist"),
    ],
)
def test_inconsistent_inputs_are_refused_before_any_work(inputs, name, words):
    params = from_kwargs(TrainParams, **{"dataset_path": "x.zip", **inputs})
    started = time.perf_counter()
    with pytest.raises(InputError) as err:
        check_inputs(params)
    # every problem is reported at once (x.zip is missing too): this input's is one of them
    found = getattr(err.value, "errors", [err.value])
    assert any(getattr(e, "name", None) == name and words in str(e) for e in found), str(err.value)
    assert time.perf_counter() - started < 5


def test_adamw_with_a_small_lr_is_accepted(two_clips):
    check_inputs(tiny_params(two_clips, optimizer="adamw", lr=1e-5))


def test_a_dataset_that_prepares_to_nothing_is_refused(tmp_path):
    upload = tmp_path / "notes.zip"
    with zipfile.ZipFile(upload, "w") as z:
        z.writestr("readme.txt", "no audio in here")
        z.writestr("broken.wav", b"RIFF....WAVEfmt garbage")
    started = time.perf_counter()
    with pytest.raises(InputError) as err:
        run_training(tiny_params(upload), tmp_path / "out")
    assert err.value.name == "dataset_path"
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "out" / "trained_model.tar").exists()


def test_a_resume_checkpoint_from_other_inputs_is_refused(tiny_run, tmp_path):
    checkpoint = sorted((tiny_run["out"] / "checkpoints").glob("checkpoint-*.pt"))[0]
    params = dataclasses.replace(tiny_run["params"], lr=0.5, resume_from=str(checkpoint))
    with pytest.raises(InputError) as err:
        check_inputs(params)
    assert err.value.name == "resume_from" and "lr=1.0" in str(err.value)


def test_a_weights_tar_is_not_a_resume_checkpoint(tiny_run):
    params = dataclasses.replace(tiny_run["params"], resume_from=str(tiny_run["tar"]))
    with pytest.raises(InputError) as err:
        check_inputs(params)
    assert err.value.name == "resume_from" and "trained_model.tar cannot be resumed" in str(err.value)


def test_an_empty_prepared_folder_is_refused(tmp_path):
    folder = make_prepared(tmp_path / "prepared", [])
    with pytest.raises(InputError) as err:
        run_training(tiny_params(folder), tmp_path / "out")
    assert err.value.name == "dataset_path"


def test_train_called_from_python_takes_the_defaults_of_omitted_inputs():
    with pytest.raises(InputError) as err:
        train.train(dataset_path="x.zip", optimizer="adamw", lr=1.0)
    assert "lr" in err.value.name.split(", ")  # with the missing x.zip and model: all problems at once


def test_fine_tuned_is_refused_for_training_naming_the_fix(tmp_path):
    with pytest.raises(InputError, match="model_version.*predict's choice.*resume_from"):
        check_inputs(from_kwargs(TrainParams, dataset_path=str(tmp_path), model_version="fine-tuned"))


def test_one_pass_per_epoch_is_zero_and_lora_rank_starts_at_one():
    assert from_kwargs(TrainParams, updates_per_epoch=0).updates_per_epoch == 0
    with pytest.raises(InputError, match="lora_rank"):
        from_kwargs(TrainParams, lora_rank=0)
