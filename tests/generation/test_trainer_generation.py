"""The trainer generates through predict's sampler: report samples (`training.export.generate_samples`) and
prior-preservation examples (`training.methods.prior.generate_prior_clips`) via `generation.generate.generate_audio`.

The proof is in the tokens: with the same seed, what they write is exactly the int8 fast path's output
(`generation.fast.generate_tokens(..., quantize='int8')`, decoded), which differs from audiocraft's fp32 generate;
with the training input `sampler_precision=none` it is audiocraft's own output.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import soundfile as sf
import torch

from core.audio import save_audio
from core.versions import load_musicgen
from generation import fast
from generation.generate import decode, generate_audio, normalize
from tests.training.conftest import make_prepared, tiny_params
from training.dist import DistInfo

SECONDS = 0.5
FRAMES = 25


@pytest.fixture(autouse=True)
def keep_random_state():
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def fast_path_tokens(model, descriptions: list[str], seed: int, quantize: str | None = "int8") -> torch.Tensor:
    """`[B, K, T]`: the fast sampler's tokens for these descriptions with this seed (the reference)."""
    lm = model.lm
    attrs, _ = model._prepare_tokens_and_attributes([d or None for d in descriptions], None)
    torch.manual_seed(seed)
    return fast.generate_tokens(lm, attrs, None, FRAMES, top_k=min(250, lm.card), cfg_coef=3.0, quantize=quantize)


def audiocraft_tokens(model, descriptions: list[str], seed: int) -> torch.Tensor:
    attrs, _ = model._prepare_tokens_and_attributes([d or None for d in descriptions], None)
    torch.manual_seed(seed)
    return model.lm.generate(None, attrs, max_gen_len=FRAMES, top_k=min(250, model.lm.card), cfg_coef=3.0)


def wav_bytes(wav: torch.Tensor, sample_rate: int, tmp_path) -> bytes:
    return save_audio(tmp_path / "ref.wav", wav.float().cpu(), sample_rate, "wav").read_bytes()


def test_generate_audio_is_the_fast_path_and_leaves_the_lm_as_it_was():
    model = load_musicgen("tiny", "cpu").musicgen
    lm = model.lm
    lm.train()
    descriptions = ["calm piano", ""]
    torch.manual_seed(11)
    ours = generate_audio(model, descriptions, SECONDS, sampler_precision="int8")
    assert lm.training  # back in training mode
    assert ours.shape == (2, 1, int(SECONDS * model.sample_rate))
    lm.eval()
    int8 = fast_path_tokens(model, descriptions, 11)
    assert torch.equal(ours, decode(model, int8))
    # Exact precision: audiocraft's own tokens (the fast path in fp32 is token-identical to LMModel.generate).
    torch.manual_seed(11)
    exact = generate_audio(model, descriptions, SECONDS, sampler_precision="none")
    theirs = audiocraft_tokens(model, descriptions, 11)
    assert torch.equal(exact, decode(model, theirs))
    assert not torch.equal(int8, theirs)  # so the first comparison really singles out the int8 path


def test_report_samples_go_through_the_fast_path_with_lora(tmp_path):
    """export's samples of a LoRA-trained LM (adapters live in the LM, as after training): int8 fast-path output of
    the adapted weights, in one batch; the LM's weights and mode are untouched."""
    from core.adapters import add_lora, lora_target_names
    from training.export import generate_samples

    model = load_musicgen("tiny", "cpu").musicgen
    lm = model.lm
    add_lora(lm, lora_target_names(lm), rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.5 * torch.randn_like(p))
    lm.train()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    descriptions = ["sks, warm bass", "sks"]
    torch.manual_seed(5)
    samples = generate_samples(model, descriptions, SECONDS, "auto")  # the default: int8 on this CPU
    assert lm.training
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
    lm.eval()
    int8 = fast_path_tokens(model, descriptions, 5)
    # normalized as predict's outputs are (its default, loudness): the report plays what predict would return
    expected = [normalize(one, "loudness", model.sample_rate) for one in decode(model, int8)]
    assert samples == [wav_bytes(one, model.sample_rate, tmp_path) for one in expected]
    # Not what audiocraft's fp32 generate would have drawn with that seed: the samples really took the int8 path.
    assert not torch.equal(int8, audiocraft_tokens(model, descriptions, 5))
    data, sr = sf.read(io.BytesIO(samples[0]))
    assert sr == 32000 and data.shape == (int(SECONDS * sr),)


def test_prior_examples_go_through_the_fast_path(tmp_path):
    from preprocessing import load_prepared
    from training.methods import prior

    dataset = make_prepared(
        tmp_path / "prepared",
        [{"seconds": 2.0, "freq": 220.0, "description": "zzq calm piano", "genre": "jazz", "moods": ["calm"]}],
    )
    clips = load_prepared(dataset).clips
    params = tiny_params(dataset, prior_preservation=True, trigger="zzq", class_samples=2, dissimilar_samples=1)
    model = load_musicgen("tiny", "cpu").musicgen
    out = prior.generate_prior_clips(model, clips, params, tmp_path / "prior", DistInfo(), SECONDS)
    assert [c.info["prior"] for c in out] == ["class", "class", "dissimilar"]
    prompts = [c.description for c in out]
    assert prompts[0] == "jazz, calm"
    # One batch (at most MAX_GENERATE_BATCH), seeded with the first example's seed.
    expected = decode(model, fast_path_tokens(model, prompts, params.seed * 1000))
    for clip, wav in zip(out, expected, strict=True):
        written, sr = sf.read(str(clip.path), always_2d=True)
        reference, _ = sf.read(io.BytesIO(wav_bytes(wav, model.sample_rate, tmp_path)), always_2d=True)
        assert sr == 32000 and written.shape == (int(SECONDS * sr), 1)
        np.testing.assert_array_equal(written, reference)


def test_prior_examples_follow_sampler_precision_and_are_cached_apart(tmp_path):
    """`sampler_precision=none`: the examples are audiocraft's own fp32 samples, under other cache names than the
    default's int8 ones (a cache made at one precision is never reused for another)."""
    from preprocessing import load_prepared
    from training.methods import prior

    dataset = make_prepared(tmp_path / "prepared", [{"seconds": 2.0, "freq": 220.0, "description": "zzq calm piano"}])
    clips = load_prepared(dataset).clips
    model = load_musicgen("tiny", "cpu").musicgen
    cache = tmp_path / "prior"
    runs = {}
    for precision in ("auto", "none"):
        params = tiny_params(dataset, prior_preservation=True, class_samples=1, sampler_precision=precision)
        runs[precision] = prior.generate_prior_clips(model, clips, params, cache, DistInfo(), SECONDS)
    auto_files = {c.path.name for c in runs["auto"]}
    exact_files = {c.path.name for c in runs["none"]}
    assert len(exact_files) == 2 and not auto_files & exact_files
    assert len(list(cache.glob("*.wav"))) == 4  # the int8 examples are still there, the fp32 ones beside them
    prompts = [c.description for c in runs["none"]]
    model.lm.eval()
    expected = decode(model, audiocraft_tokens(model, prompts, params.seed * 1000))
    for clip, wav in zip(runs["none"], expected, strict=True):
        written, _ = sf.read(str(clip.path), always_2d=True)
        reference, _ = sf.read(io.BytesIO(wav_bytes(wav, model.sample_rate, tmp_path)), always_2d=True)
        np.testing.assert_array_equal(written, reference)
