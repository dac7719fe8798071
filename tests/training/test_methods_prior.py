"""DreamBooth prior preservation on the tiny model: the base model's class and dissimilar examples are generated and
cached, enter the batches, and the loss is split (instance + prior_loss_weight x prior)."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from core.params import InputError, from_kwargs
from preprocessing import load_prepared
from tests.helpers import reported_problem
from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training.dist import DistInfo
from training.loop import TrainStep
from training.methods import prior
from training.params import TrainParams
from training.run import check_inputs, run_training, setup_training

pytestmark = pytest.mark.usefixtures("keep_global_random_state")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior_data")
    return make_prepared(
        root / "prepared",
        [
            {"seconds": 2.5, "freq": 220.0, "description": "zzq calm piano", "genre": "jazz", "moods": ["calm"]},
            {"seconds": 2.0, "freq": 330.0, "description": "zzq fast drums", "genre": "rock"},
        ],
    )


def prior_params(dataset, **overrides):
    values = {
        "prior_preservation": True,
        "trigger": "zzq",
        "class_samples": 2,
        "dissimilar_samples": 1,
        "optimizer": "adamw",
        "lr": 3e-3,
        "warmup": 1,
        "epochs": 1,
        "updates_per_epoch": 10,
        "batch_size": 4,
        "save_every": 10,
        "cfg_p": 0.0,
        **overrides,
    }
    return tiny_params(dataset, **values)


def test_prior_examples_are_generated_cached_trained_and_listed(dataset, tmp_path):
    params = prior_params(dataset, method="lora")
    out = tmp_path / "out"
    tar = run_training(params, out)
    with tarfile.open(tar) as archive:
        info = json.load(archive.extractfile("finetune.json"))
    examples = info["prior_examples"]
    assert [e["kind"] for e in examples] == ["class", "class", "dissimilar"] * 2
    assert [e["prompt"] for e in examples[:2]] == ["jazz, calm"] * 2  # labels without the trigger
    assert examples[3]["prompt"] == "rock"
    dissimilar = {examples[2]["prompt"], examples[5]["prompt"]}
    assert all(p.endswith(" music") and "jazz" not in p and "rock" not in p for p in dissimilar)
    for e in examples:
        audio, sr = sf.read(out / "cache" / "prior" / e["file"])
        assert sr == 32000 and len(audio) == 64000 and np.abs(audio).max() > 0  # 2 s: the crop length
    assert info["descriptions"] == ["zzq calm piano", "zzq fast drums"]  # the report describes the user's clips
    assert info["training"]["clips"] == 2
    # the samples and prior examples were drawn at the default sampler_precision: auto, which is int8 on this CPU
    assert info["sampler_precision"] == "int8" and info["training_inputs"]["sampler_precision"] == "auto"

    history = ckpt.load_checkpoint(ckpt.find_checkpoint(out / "checkpoints"))["history"]
    assert any("loss_instance" in h for h in history) and any("loss_prior" in h for h in history)
    for h in history:  # the logged loss is the weighted sum of its parts (a batch may hold only one kind)
        assert h["loss"] == pytest.approx(h.get("loss_instance", 0.0) + h.get("loss_prior", 0.0), rel=1e-5)
    instance = [h["loss_instance"] for h in history if "loss_instance" in h]
    assert np.mean(instance[-3:]) < instance[0] - 0.2, instance

    # a second run reuses the cached examples: nothing is generated again
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cache" / "prior").glob("*.wav")}
    setup = setup_training(params, load_prepared(dataset), out, DistInfo())
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cache" / "prior").glob("*.wav")} == stamps
    assert sum(1 for c in setup.clips if c.info.get("prior")) == 6


def test_the_loss_is_split_and_weighted(dataset, tmp_path):
    params = prior_params(dataset, class_samples=1, dissimilar_samples=0)
    setup = setup_training(params, load_prepared(dataset), tmp_path, DistInfo())
    lm = setup.model.lm
    lm.cfg_dropout.p = 0.0
    flags = [bool(c.info.get("prior")) for c in setup.clips]
    assert flags == [False, False, True, True]
    mixed = setup.tokens.make_batch([(0, 0), (2, 0), (1, 0), (3, 0)])
    instance = setup.tokens.make_batch([(0, 0), (1, 0)])
    prior_only = setup.tokens.make_batch([(2, 0), (3, 0)])
    step = TrainStep(lm, prior_weight=0.5)
    with torch.no_grad():
        split = step(mixed.codes, mixed.mask, mixed.attributes, torch.tensor([False, True, False, True]))
        parts = dict(step.parts)
        plain_instance = step(instance.codes, instance.mask, instance.attributes)
        plain_prior = step(prior_only.codes, prior_only.mask, prior_only.attributes)
    torch.testing.assert_close(parts["instance"], plain_instance)
    torch.testing.assert_close(parts["prior"], plain_prior)
    torch.testing.assert_close(split, plain_instance + 0.5 * plain_prior)


@pytest.mark.parametrize(
    "inputs,name,words",
    [
        ({"prior_preservation": True, "auto_labeling": False}, "class_prompt", "give class_prompt"),
        (
            {"prior_preservation": True, "class_prompt": "lofi", "class_samples": 0, "dissimilar_samples": 0},
            "class_samples",
            "above 0",
        ),
    ],
)
def test_bad_prior_inputs_fail_early(inputs, name, words):
    params = from_kwargs(TrainParams, **{"dataset_path": "x.zip", "model_version": "tiny", **inputs})
    with pytest.raises(InputError) as err:
        check_inputs(params)
    assert words in str(reported_problem(err.value, name))


def test_class_prompt_defaults_to_labels_without_the_trigger(dataset):
    clips = load_prepared(dataset).clips
    params = from_kwargs(TrainParams, dataset_path="x", trigger="zzq", prior_preservation=True)
    assert prior.class_prompt_of(clips[0], params) == "jazz, calm"
    clips[1].info["genre"] = None
    assert prior.class_prompt_of(clips[1], params) == "fast drums"
