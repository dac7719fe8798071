"""predict's `lora_scale`: the LoRA adapter's update scaled at load (0: the base model exactly, 1: as trained, 0.5
in between); the Generator's model key holds it (a change re-folds the adapter on the loaded base, the same scale
reuses); other weights ignore it with a warning."""

from __future__ import annotations

import logging

import pytest
import torch

from core import adapters, tiny, weights
from core.params import from_kwargs
from core.versions import load_musicgen
from generation.generate import Generator, ModelKey, model_key
from generation.params import PredictParams
from tests.core.lora_tars import lm_logits, lora_tar


@pytest.fixture(scope="module")
def tar(tmp_path_factory):
    return lora_tar(tmp_path_factory.mktemp("lora") / "trained_model.tar", seed=1)


@pytest.fixture(scope="module")
def codes():
    return torch.randint(0, tiny.CARD, (2, tiny.N_Q, 30), generator=torch.Generator().manual_seed(0))


def unmerged(tar, strength: float):
    """The base with the adapter kept as modules at `strength` (the reference the merged model must match)."""
    model = load_musicgen("tiny", "cpu")
    adapters.apply_lora_files(model.lm, weights.unpack(tar), merge=False, strength=strength)
    return model


def test_scale_0_is_the_base_1_the_adapter_and_half_in_between(tar, codes):
    base = lm_logits(load_musicgen("tiny", "cpu"), codes)
    at = {s: lm_logits(weights.load_trained_model(tar, device="cpu", lora_scale=s), codes) for s in (0.0, 0.5, 1.0)}
    assert torch.equal(at[0.0], base)  # exactly the base model
    assert torch.equal(at[1.0], lm_logits(weights.load_trained_model(tar, device="cpu"), codes))  # as trained
    for s in (0.5, 1.0):
        torch.testing.assert_close(at[s], lm_logits(unmerged(tar, s), codes), atol=1e-4, rtol=1e-4)
    distance = {s: (at[s] - base).abs().mean().item() for s in at}
    assert 0 < distance[0.5] < distance[1.0]
    assert (at[0.5] - at[1.0]).abs().mean().item() > 0


def test_generator_key_holds_lora_scale(tar, codes, caplog):
    params = from_kwargs(PredictParams, model_version="fine-tuned", lora_scale=0.5)
    assert model_key(params, str(tar)) == ModelKey("weights", str(tar), 0.5)
    generator = Generator(device="cpu", setup_weights=str(tar))
    one = generator.model_for(ModelKey("weights", str(tar), 1.0))
    assert generator.model_for(ModelKey("weights", str(tar), 1.0)) is one  # same scale: reused
    half = generator.model_for(ModelKey("weights", str(tar), 0.5))
    assert half is one and half.adapter.strength == 0.5  # re-folded on the loaded base, not loaded again
    torch.testing.assert_close(lm_logits(half, codes), lm_logits(unmerged(tar, 0.5), codes), atol=1e-4, rtol=1e-4)
    assert generator.model_for(ModelKey("weights", str(tar), 0.5)) is half
    # base model versions: lora_scale is ignored (warned), the key carries 1
    with caplog.at_level(logging.WARNING):
        key = model_key(from_kwargs(PredictParams, model_version="tiny", lora_scale=0.5), None)
    assert key == ModelKey("version", "tiny") and "lora_scale=0.5 is ignored" in caplog.text


def test_non_lora_weights_ignore_lora_scale_with_a_warning(tmp_path, caplog):
    model = load_musicgen("tiny", device="cpu")
    full = weights.write_trained_model(
        tmp_path / "full.tar", state_dict=model.lm.state_dict(), cfg=model.lm.cfg, base_model="tiny", finetune={}
    )
    generator = Generator(device="cpu")
    first = generator.model_for(ModelKey("weights", str(full), 1.0))
    with caplog.at_level(logging.WARNING):
        again = generator.model_for(ModelKey("weights", str(full), 0.3))
    assert again is first and "lora_scale=0.3 is ignored" in caplog.text


def test_a_new_lora_scale_refolds_the_adapter_without_reloading_the_base(tar, monkeypatch):
    """Between predictions, a new lora_scale changes the loaded LoRA model in place: the base is not loaded again
    (every base load goes through core.versions.load_musicgen, counted here as it runs), and the weights and the
    prediction equal those of a fresh load at that scale, bit for bit (the sampler's int8 copy is re-made too)."""
    import core.versions

    loads = []
    real = core.versions.load_musicgen
    monkeypatch.setattr(core.versions, "load_musicgen", lambda *a, **k: loads.append(a[0]) or real(*a, **k))

    def request(scale: float) -> PredictParams:
        return from_kwargs(PredictParams, replicate_weights=str(tar), duration=1, seed=7, lora_scale=scale)

    generator = Generator(device="cpu")
    generator.generate(request(1.0), progress=False)
    musicgen = generator._model.musicgen
    assert loads == ["tiny"]
    for scale in (0.5, 0.0, 1.0):
        result = generator.generate(request(scale), progress=False)
        assert loads == ["tiny"] and generator._model.musicgen is musicgen  # the same base, loaded once
        fresh_state = weights.load_trained_model(tar, device="cpu", lora_scale=scale).lm.state_dict()
        state = musicgen.lm.state_dict()
        assert state.keys() == fresh_state.keys()
        assert all(torch.equal(state[k], fresh_state[k]) for k in state), scale
        fresh = Generator(device="cpu").generate(request(scale), progress=False)
        assert torch.equal(result.codes, fresh.codes) and torch.equal(result.wavs, fresh.wavs), scale
        loads.clear()
        loads.append("tiny")  # the fresh loads above are not the generator's
