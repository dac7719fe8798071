"""Checks of a prediction request that need no model run before any model loads (issue 24 bounds, issue 19 fail
fast): the seed's range, a melody or style input against the model's family (from the catalogue, or from a
fine-tune's finetune.json once unpacked), and the memory of what runs (attention cache, then one output's decode).
Predict logs once which weights, base and adapter it loaded."""

from __future__ import annotations

import logging

import pytest

from core import tiny
from core.params import InputError, from_kwargs
from core.versions import load_musicgen
from generation.generate import Generator, ModelKey
from generation.params import PredictParams
from generation.request import MAX_SEED, check_batch_memory, decode_bytes, kv_cache_bytes
from tests.core.lora_tars import lora_tar
from tests.helpers import write_wav


def params(**kw) -> PredictParams:
    kw.setdefault("model_version", "tiny")
    kw.setdefault("duration", 1)
    return from_kwargs(PredictParams, **kw)


@pytest.mark.parametrize("seed", [2**63, 2**64 + 5, 10**30])
def test_a_seed_beyond_64_bits_is_refused_by_name_before_loading(seed):
    generator = Generator(device="cpu")
    with pytest.raises(InputError) as err:
        generator.generate(params(seed=seed), progress=False)
    assert err.value.name == "seed" and str(MAX_SEED) in str(err.value)
    assert generator._model is None  # nothing was loaded for it


def test_the_largest_seed_generates():
    result = Generator(device="cpu").generate(params(seed=MAX_SEED), progress=False)
    assert result.seed == MAX_SEED and result.wav.shape[-1] == 32000


@pytest.mark.parametrize(
    ("inputs", "name"),
    [
        ({"model_version": "small", "input_audio": "melody.wav"}, "input_audio"),
        ({"model_version": "stereo-large", "input_audio": "melody.wav"}, "input_audio"),
        ({"model_version": "style", "input_audio": "melody.wav"}, "input_audio"),
        ({"model_version": "medium", "style_audio": "melody.wav"}, "style_audio"),
        ({"model_version": "melody", "style_audio": "melody.wav"}, "style_audio"),
        ({"model_version": "large", "classifier_free_guidance_beta": 3.0}, "classifier_free_guidance_beta"),
    ],
)
def test_inputs_of_another_model_family_are_refused_before_loading(tmp_path, inputs, name):
    """Offline these models are not cached: a load would fail with ModelUnavailableError (after the hub's retries);
    the family check answers first, naming the input."""
    write_wav(tmp_path / "melody.wav", 3.0)
    inputs = {k: str(tmp_path / v) if k.endswith("audio") else v for k, v in inputs.items()}
    generator = Generator(device="cpu")
    with pytest.raises(InputError) as err:
        generator.generate(params(**inputs), progress=False)
    assert err.value.name == name, str(err.value)
    assert generator._model is None


def test_a_fine_tunes_family_comes_from_its_finetune_json(tmp_path, monkeypatch):
    """A LoRA on tiny with a melody input: refused once the tar is unpacked, before its base is built."""
    import core.versions

    tar = lora_tar(tmp_path / "lora.tar")
    write_wav(tmp_path / "melody.wav", 3.0)
    built = []
    monkeypatch.setattr(core.versions, "load_musicgen", lambda *a, **k: built.append(a) or load_musicgen(*a, **k))
    generator = Generator(device="cpu")
    with pytest.raises(InputError) as err:
        generator.generate(params(replicate_weights=str(tar), input_audio=str(tmp_path / "melody.wav")), progress=False)
    assert err.value.name == "input_audio" and "tiny is not one" in str(err.value)
    assert built == [] and generator._model is None


def test_the_loaded_weights_are_logged_once(tmp_path, caplog):
    tar = lora_tar(tmp_path / "lora.tar", seed=2)
    generator = Generator(device="cpu")
    with caplog.at_level(logging.INFO, logger="generation.generate"):
        generator.generate(params(replicate_weights=str(tar), lora_scale=0.5, seed=1), progress=False)
        generator.generate(params(replicate_weights=str(tar), lora_scale=0.5, seed=2), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Loaded weights")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Loaded weights {tar} (base model tiny, method lora, LoRA adapter at lora_scale 0.5)")


def test_the_memory_check_counts_the_attention_cache_of_the_batch(tmp_path):
    """A wider tiny LM (dim 512, 8 layers), where the batch's attention cache outweighs one output's decode: the
    batch is refused naming num_outputs and how many fit."""
    wide = tiny.build_variant(tmp_path / "wide", dim=512, num_heads=8, num_layers=8)
    model = load_musicgen(str(wide), "cpu").musicgen
    one, decoding = kv_cache_bytes(model, 1, 1), decode_bytes(model, 1)
    assert 8 * one > decoding > one
    check_batch_memory(params(num_outputs=8), model, available=int(8 * one / 0.8) + 8)
    with pytest.raises(InputError) as err:
        check_batch_memory(params(num_outputs=8), model, available=int(3 * one / 0.8) + 8)
    assert err.value.name == "num_outputs" and "use num_outputs <= 3" in str(err.value)


def test_decode_memory_is_one_outputs_whatever_the_batch():
    """The check counts one output's decode; the decode runs one output at a time, and gives the batch's audio."""
    import torch

    from generation.generate import decode

    model = Generator(device="cpu").model_for(ModelKey("version", "tiny")).musicgen
    tokens = torch.randint(0, 256, (3, 4, 50), generator=torch.Generator().manual_seed(0))
    batch = decode(model, tokens)
    assert batch.shape == (3, 1, 32000)
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], model.compression_model.decode(tokens[i : i + 1], None))
    assert decode_bytes(model, 300) == 300 * decode_bytes(model, 1)
