"""CLAP metrics on a tiny CLAP in the real format (transformers' ClapModel + ClapProcessor, saved with save_pretrained,
core/tiny.py): shapes, windows, determinism, loading from a folder and from the Hugging Face cache, the skip when it
is absent; Fréchet distance and KAD against their closed forms for Gaussians; the copy check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.audio import resample
from core.tiny import save_clap_hub, tiny_clap
from evaluation.clap import (
    CLAP_REPO,
    ClapLoadError,
    clap_skip_reason,
    copy_check,
    frechet,
    kad,
    load_clap,
    prompt_adherence,
    prompt_similarities,
)
from tests.helpers import tone

SR = 32000


@pytest.fixture(scope="module")
def clap():
    loaded = load_clap("cpu", tiny_clap())
    assert loaded is not None
    return loaded


def wav(seconds: float, channels: int = 1, freq: float = 220.0, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(tone(seconds, SR, channels, freq, seed)).float().reshape(channels, -1)


def test_embeddings_shapes_windows_and_determinism(clap):
    samples = [wav(3.0), wav(25.0, channels=2, freq=330.0), wav(0.5, freq=440.0)]
    audio = clap.embed_audio(samples, SR)
    assert audio.shape == (3, clap.dim) == (3, 32) and audio.dtype == torch.float32
    assert torch.allclose(audio.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(audio, clap.embed_audio(samples, SR))  # the same audio, the same embedding
    assert torch.allclose(clap.embed_audio(samples[1:2], SR)[0], audio[1], atol=1e-5)  # alone or in a batch
    # 25 s: three windows of CLAP's 10 s at 48 kHz (10, 10, 5 s), averaged and normalized again
    mono = resample(samples[1], SR, clap.sample_rate).mean(dim=0, keepdim=True)
    windows = [mono[:, i : i + clap.window] for i in range(0, mono.shape[1], clap.window)]
    assert [w.shape[1] / clap.sample_rate for w in windows] == pytest.approx([10.0, 10.0, 5.0], abs=1e-3)
    each = clap.embed_audio(windows, clap.sample_rate)
    assert torch.allclose(torch.nn.functional.normalize(each.mean(dim=0), dim=0), audio[1], atol=1e-5)
    # different audio, different embeddings
    assert not torch.allclose(audio[0], audio[2], atol=1e-3)

    text = clap.embed_text(["calm piano", "fast rock drums and electric guitar, 140 bpm", "é ☃ any text"])
    assert text.shape == (3, 32) and torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(
        text, clap.embed_text(["calm piano", "fast rock drums and electric guitar, 140 bpm", "é ☃ any text"])
    )
    long = clap.embed_text(["word " * 500])  # longer than the text encoder's positions: truncated, not an error
    assert long.shape == (1, 32)


def test_prompt_adherence_is_the_mean_similarity_to_its_own_prompt(clap):
    samples, prompts = [wav(2.0), wav(4.0, freq=550.0)], ["calm piano", "loud drums"]
    values = prompt_similarities(clap, samples, SR, prompts)
    expected = (clap.embed_audio(samples, SR) * clap.embed_text(prompts)).sum(-1)
    assert values == pytest.approx(expected.tolist(), abs=1e-6) and all(-1.0 <= v <= 1.0 for v in values)
    assert prompt_adherence(clap, samples, SR, prompts) == pytest.approx(float(expected.mean()), abs=1e-6)
    with pytest.raises(ValueError, match="one prompt per sample"):
        prompt_adherence(clap, samples, SR, prompts[:1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        clap.embed_audio([torch.full((1, SR), float("nan"))], SR)


def test_loaded_from_the_hub_cache_or_skipped_saying_how_to_add_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    reason = clap_skip_reason()
    assert reason is not None and CLAP_REPO in reason and str(tmp_path / "empty") in reason
    assert f"hf download {CLAP_REPO}" in reason and "bake" in reason
    assert load_clap("cpu") is None

    save_clap_hub(tmp_path / "hub")  # as the image bakes the real one
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert clap_skip_reason() is None
    clap = load_clap("cpu")
    assert clap is not None and clap.source == CLAP_REPO and clap.sample_rate == 48000
    reference = load_clap("cpu", tiny_clap())
    sample = [wav(3.0)]
    assert torch.allclose(clap.embed_audio(sample, SR), reference.embed_audio(sample, SR), atol=1e-6)

    broken = tmp_path / "broken"
    broken.mkdir()
    assert "holds no CLAP model" in clap_skip_reason(broken)
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ClapLoadError, match="does not load.*hf download"):
        load_clap("cpu", broken)


def _gaussian_kernel_mean(delta: np.ndarray, cov: np.ndarray, sigma: float) -> float:
    """E exp(-|X - Y|² / 2σ²) for X - Y ~ N(delta, cov)."""
    d = len(delta)
    det = np.linalg.det(np.eye(d) + cov / sigma**2)
    return float(det**-0.5 * np.exp(-0.5 * delta @ np.linalg.solve(sigma**2 * np.eye(d) + cov, delta)))


def test_kad_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.zeros(2), np.array([1.0, 0.0])
    s1, s2 = np.eye(2), np.diag([2.0, 0.5])
    sigma = 3.0  # wide: 100 x MMD² = 6.94 here, 10.46 with σ where σ² belongs
    mmd2 = (
        _gaussian_kernel_mean(np.zeros(2), 2 * s1, sigma)
        + _gaussian_kernel_mean(np.zeros(2), 2 * s2, sigma)
        - 2 * _gaussian_kernel_mean(mu1 - mu2, s1 + s2, sigma)
    )
    # the estimate's spread at 1500 vectors is below 1 (x 100): the mean of 12 draws is within 0.8 of the truth
    draws = [
        kad(rng.multivariate_normal(mu1, s1, size=1500), rng.multivariate_normal(mu2, s2, size=1500), sigma)
        for _ in range(12)
    ]
    assert np.mean(draws) == pytest.approx(100 * mmd2, abs=0.8)
    x, y = rng.multivariate_normal(mu1, s1, size=300), rng.multivariate_normal(mu2, s2, size=300)
    assert mmd2 > 0.05  # a real difference to find, far above the tolerance
    # the default bandwidth is the median pairwise distance within the reference (the second) set
    pairwise = np.sqrt(((y[:, None] - y[None, :]) ** 2).sum(-1))[np.triu_indices(300, 1)]
    assert kad(x, y) == pytest.approx(kad(x, y, bandwidth=float(np.median(pairwise))))


def test_kad_is_unbiased_on_small_sets_of_one_distribution():
    """Sets of 8 from one distribution: the mean over many draws is 0 within its standard error (the biased
    estimate, diagonal included, sits clearly above 0); identical sets are not above 0."""
    rng = np.random.default_rng(1)
    values = np.array([kad(rng.standard_normal((8, 4)), rng.standard_normal((8, 4)), 2.0) for _ in range(400)])
    assert abs(values.mean()) < 3 * values.std() / math.sqrt(len(values))
    x = rng.standard_normal((8, 4))
    assert kad(x, x, 2.0) <= 0.0 and kad(x, x, 2.0) == pytest.approx(0.0, abs=100 * 2 / 8)
    with pytest.raises(ValueError, match="at least 2 vectors"):
        kad(x[:1], x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        kad(np.full((3, 4), np.nan), x)


def test_frechet_matches_the_closed_form_and_is_zero_for_identical_sets():
    rng = np.random.default_rng(2)
    x = rng.normal([0.0, 0.0, 1.0], [1.0, 2.0, 1.0], size=(100_000, 3))
    y = rng.normal([1.0, 0.0, 1.0], [1.0, 1.0, 0.5], size=(100_000, 3))
    # diagonal covariances: |mu1 - mu2|² + sum (sd1 - sd2)²
    assert frechet(x, y) == pytest.approx(1.0 + 1.0 + 0.25, abs=0.05)
    assert frechet(torch.from_numpy(x[:500]), torch.from_numpy(x[:500])) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        frechet(x[0], y)


def test_copy_check_in_clap_space(clap):
    rng = np.random.default_rng(3)
    train = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((6, 16))).float(), dim=-1)
    replay = train[2] + 0.01 * torch.from_numpy(rng.standard_normal(16)).float()
    new = torch.from_numpy(rng.standard_normal(16)).float()
    result = copy_check(None, torch.stack([replay, new]), train, names=[f"clip{i}" for i in range(6)])
    assert [s["copy"] for s in result["samples"]] == [True, False] and result["copies"] == 1
    assert result["samples"][0]["nearest"] == "clip2" and result["samples"][0]["similarity"] > 0.99
    assert 0.0 < result["reference"] < 2.0
    # waveforms, embedded with CLAP: a replayed training clip is a copy
    clips = [wav(4.0, freq=f, seed=i) for i, f in enumerate((110.0, 220.0, 440.0, 880.0))]
    result = copy_check(clap, [clips[1]], clips, SR)
    assert result["samples"][0]["nearest"] == "1" and result["samples"][0]["copy"]
    # one training clip: no scale of "near", nothing flagged
    alone = copy_check(None, torch.stack([replay]), train[2:3])
    assert alone["reference"] is None and alone["copies"] == 0
    with pytest.raises(ValueError, match="waveforms need a loaded CLAP"):
        copy_check(None, clips, clips)
