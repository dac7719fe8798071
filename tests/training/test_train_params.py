"""TrainParams' per-input facts (`param(...)` metadata) and the inputs it shares with preparation and predict."""

from __future__ import annotations

import dataclasses

import pytest

from core.catalogue import METHODS
from core.params import InputError, names_where
from generation.params import PredictParams
from preprocessing.params import PrepareParams
from training.params import (
    FEATURE_OFF,
    PREPARE_FIELDS,
    RESUME_MUST_MATCH,
    TrainParams,
    dropped_settings,
    prepare_kwargs,
    used_only_by,
)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def test_preparation_inputs_are_preparations_own():
    """The 5 preparation inputs of train are PrepareParams' fields: same annotation, default and facts; the
    description is the same, train adding one sentence of its own to dataset_path."""
    train, prepare = _fields(TrainParams), _fields(PrepareParams)
    assert PREPARE_FIELDS == ("dataset_path", "auto_labeling", "drop_vocals", "one_same_description", "trigger")
    assert names_where(PrepareParams, "prepare") == PREPARE_FIELDS
    for name in PREPARE_FIELDS:
        ours, theirs = train[name], prepare[name]
        assert (ours.type, ours.default) == (theirs.type, theirs.default), name
        assert {**ours.metadata, "description": None} == {**theirs.metadata, "description": None}, name
        assert ours.metadata["description"].startswith(theirs.metadata["description"]), name
    extra = train["dataset_path"].metadata["description"][len(prepare["dataset_path"].metadata["description"]) :]
    assert extra == " Locally, a folder already prepared by `python -m preprocessing` works too."
    kwargs = prepare_kwargs(TrainParams(dataset_path="songs.zip", trigger="zzq", drop_vocals=False))
    assert PrepareParams(**kwargs) == PrepareParams(dataset_path="songs.zip", trigger="zzq", drop_vocals=False)


def test_sampler_precision_is_predicts():
    train, predict = _fields(TrainParams)["sampler_precision"], _fields(PredictParams)["sampler_precision"]
    assert (train.type, train.default, train.metadata["choices"]) == (
        predict.type,
        predict.default,
        predict.metadata["choices"],
    )
    choices_text = predict.metadata["description"].split(": ", 1)[1]
    assert train.metadata["description"].endswith(f"(as predict's sampler_precision): {choices_text}")


def test_resume_inputs_are_the_marked_ones():
    """The inputs that shape the data order, the schedule, the update or what is exported (as before they were
    `param(...)` facts); paths differ between machines, and secrets or where results go change nothing trained."""
    assert set(RESUME_MUST_MATCH) == set(
        [
            "model_version",
            "epochs",
            "updates_per_epoch",
            "batch_size",
            "optimizer",
            "lr",
            "lr_scheduler",
            "warmup",
            "cfg_p",
            "grad_accumulation",
            "seed",
            "segment_duration",
            "max_grad_norm",
            "weight_decay",
            "ema",
            "method",
            "lora_rank",
            "lora_alpha",
            "lora_targets",
            "prior_preservation",
            "class_prompt",
            "class_samples",
            "dissimilar_samples",
            "prior_loss_weight",
            "lm_dim",
            "lm_layers",
            "lm_heads",
            "validation_split",
            "eval_every",
            "keep_best",
        ]
    )


@pytest.mark.parametrize("name,value", [("lr", 0.5), ("lora_targets", "q,v"), ("keep_best", False)])
def test_resume_refuses_a_changed_input_that_must_match(name, value):
    from training.loop import check_resume_compatible

    saved = dataclasses.asdict(TrainParams(dataset_path="a.zip"))
    check_resume_compatible({"params": saved}, TrainParams(dataset_path="b.zip", sample_duration=2.0))
    with pytest.raises(InputError) as err:
        check_resume_compatible({"params": saved}, TrainParams(dataset_path="a.zip", **{name: value}))
    assert err.value.name == "resume_from" and f"{name}=" in str(err.value)


def test_every_used_by_feature_says_when_it_is_off():
    features = {feature for f in dataclasses.fields(TrainParams) for feature in f.metadata["used_by"]}
    assert features <= set(FEATURE_OFF) | set(METHODS), features - set(FEATURE_OFF) - set(METHODS)
    assert used_only_by("lora") == ("lora_rank", "lora_alpha", "lora_targets", "lora_merge")


# A run in which each feature is off, and a non-default value for one input of it.
OFF = {
    "prior_preservation": ({}, "class_samples", 3),
    "scratch": ({"model_version": "tiny"}, "lm_layers", 3),
    "split_validation": ({"validation_path": "held.zip"}, "validation_split", 0.2),
    "validation": ({"validation_split": 0.0}, "early_stop_patience", 2),
}


@pytest.mark.parametrize("feature", sorted(OFF))
def test_an_input_of_a_feature_that_is_off_is_reported(feature):
    base, name, value = OFF[feature]
    assert feature in _fields(TrainParams)[name].metadata["used_by"]
    params = TrainParams(dataset_path="a.zip", **base, **{name: value})
    assert dropped_settings(params) == [f"{name}={value!r} is ignored: {FEATURE_OFF[feature][1]}"]
    assert dropped_settings(TrainParams(dataset_path="a.zip", **base)) == []
