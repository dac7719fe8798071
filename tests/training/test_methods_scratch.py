"""From scratch: tiny-micro (a new unconditional LM on the tiny EnCodec) trains from random init, exports, and
predict generates unconditionally (a prompt is ignored with a warning); micro's real path fails clearly offline."""

from __future__ import annotations

import json
import logging
import random
import tarfile

import numpy as np
import pytest
import torch

from core import weights
from core.params import InputError, from_kwargs
from core.versions import ModelUnavailableError
from generation.generate import Generator
from generation.params import PredictParams
from tests.helpers import reported_problem
from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training.methods.scratch import build_scratch_musicgen
from training.params import TrainParams
from training.run import check_inputs, run_training


@pytest.fixture(autouse=True)
def keep_global_random_state():
    """predict's Generator seeds the global generators; later tests must not depend on this file having run."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def test_tiny_micro_trains_from_scratch_and_generates_unconditionally(tmp_path, caplog):
    dataset = make_prepared(
        tmp_path / "prepared",
        [{"seconds": 2.5, "freq": 220.0, "description": "calm piano"}, {"seconds": 2.0, "freq": 330.0}],
    )
    params = tiny_params(
        dataset,
        model_version="tiny-micro",
        lm_dim=64,
        lm_heads=2,
        lm_layers=2,
        optimizer="adamw",
        lr=3e-3,
        warmup=2,
        epochs=1,
        updates_per_epoch=15,
        save_every=15,
    )
    out = tmp_path / "out"
    tar = run_training(params, out)
    losses = [h["loss"] for h in ckpt.load_checkpoint(ckpt.find_checkpoint(out / "checkpoints"))["history"]]
    assert losses[0] > 5.0 and np.mean(losses[-3:]) < losses[0] - 1.0, losses  # from random init (ln 256 = 5.5)
    with tarfile.open(tar) as archive:
        info = json.load(archive.extractfile("finetune.json"))
    assert info["base_model"] == "tiny-micro" and info["method"] == "full"

    model = weights.load_trained_model(tar, device="cpu").musicgen
    assert not model.lm.condition_provider.conditioners and model.lm.dim == 64 and len(model.lm.transformer.layers) == 2
    request = from_kwargs(PredictParams, replicate_weights=str(tar), prompt="calm piano", duration=1, seed=1)
    with caplog.at_level(logging.WARNING):
        result = Generator(device="cpu").generate(request, progress=False)
    assert result.wav.shape == (1, 32000) and torch.isfinite(result.wav).all()
    assert "the prompt is ignored" in caplog.text


def test_micro_needs_the_pretrained_encodec(tmp_path):
    params = from_kwargs(TrainParams, dataset_path="x.zip", model_version="micro")
    with pytest.raises(ModelUnavailableError, match="encodec_32khz"):
        build_scratch_musicgen(params, "cpu")


@pytest.mark.parametrize(
    "inputs,name",
    [
        ({"method": "lora"}, "method"),
        ({"prior_preservation": True, "class_prompt": "x"}, "prior_preservation"),
        ({"lm_dim": 100, "lm_heads": 3}, "lm_heads"),
    ],
)
def test_bad_scratch_inputs_fail_early(inputs, name):
    params = from_kwargs(TrainParams, **{"dataset_path": "x.zip", "model_version": "tiny-micro", **inputs})
    with pytest.raises(InputError) as err:
        check_inputs(params)
    reported_problem(err.value, name)
