"""The Fréchet distance in discogs-effnet space (evaluation/effnet.py), with the small stand-in graph that has the
real model's node names, run by essentia in its worker process."""

from __future__ import annotations

import numpy as np
import soundfile as sf
import torch

from evaluation.effnet import effnet_frechet
from preprocessing.analysis import ENV_MODELS
from tests.preprocessing import fake_essentia

RATE = 32000


def _chords(seconds: float, freqs: tuple[float, ...], seed: int) -> torch.Tensor:
    t = np.arange(int(seconds * RATE)) / RATE
    noise = 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    wav = sum(0.2 * np.sin(2 * np.pi * f * t * (1 + 0.01 * seed)) for f in freqs) + noise
    return torch.from_numpy(wav.astype(np.float32))[None]


def test_effnet_frechet_ranks_samples_by_their_closeness_to_the_held_out_clips(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_MODELS, str(fake_essentia.write_models(tmp_path / "models")))
    held = [_chords(3.0, (220.0, 277.0, 330.0), seed) for seed in range(2)]
    files = []
    for i, wav in enumerate(held):
        files.append(tmp_path / f"held_{i}.wav")
        sf.write(files[-1], wav[0].numpy(), RATE)
    alike = [_chords(3.0, (220.0, 277.0, 330.0), seed) for seed in (5, 6)]
    unlike = [_chords(0.5, (1500.0, 2200.0), seed) for seed in (5, 6)]  # shorter than one patch: repeated
    out = effnet_frechet({"same": held, "alike": alike, "unlike": unlike}, RATE, files)
    assert "skipped" not in out, out
    assert out["vectors"]["held_out"] >= 2 and out["vectors"]["unlike"] == 2
    assert out["frechet_same"] < 1e-3 * out["frechet_unlike"]  # the held-out clips themselves (16-bit rounding)
    assert out["frechet_alike"] < out["frechet_unlike"]


def test_without_the_model_file_it_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_MODELS, str(tmp_path / "empty"))
    out = effnet_frechet({"base": [_chords(1.0, (220.0,), 0)]}, RATE, [])
    assert set(out) == {"skipped"}
    assert "discogs-effnet-bs64-1.pb is not in" in out["skipped"] and ENV_MODELS in out["skipped"]
