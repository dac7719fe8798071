"""A fine-tuned melody model still follows a melody: after a few real training steps on tiny-melody, the loaded
model's LM logits depend on the chroma condition (two melodies: different logits; the same melody twice: the same
logits), and predict.py runs on it with `input_audio` as a melody and as a continuation prompt.

(tests/training/test_models.py covers the chroma cache during training; this covers what comes out of it.)"""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from core import weights
from core.params import from_kwargs
from core.versions import load_musicgen
from generation.generate import Generator
from generation.params import PredictParams
from tests.helpers import ROOT, moved_beyond_fp16, tone, write_wav
from tests.training.conftest import make_prepared, tiny_params
from training.run import run_training

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("keep_global_random_state")]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("melody_follow")
    dataset = make_prepared(root / "prepared", [{"seconds": 3.0, "description": "calm piano"}])
    params = tiny_params(
        dataset,
        model_version="tiny-melody",
        epochs=1,
        updates_per_epoch=4,
        save_every=4,
        segment_duration=1.5,
        sample_duration=0.0,
        optimizer="adamw",
        lr=1e-3,
    )
    tar = run_training(params, root / "out")
    return {"tar": tar, "model": weights.load_trained_model(tar, device="cpu").musicgen, "root": root}


def melody(freq: float, seed: int) -> torch.Tensor:
    """`[C=1, T]` 2 s of a four-note melody starting at `freq`."""
    return torch.from_numpy(tone(2.0, 32000, 1, freq=freq, seed=seed)).T.contiguous()


def logits(model, wav: torch.Tensor) -> torch.Tensor:
    """The LM's logits `[1, K, T, card]` on fixed codes, conditioned on "calm piano" and the chroma of `wav` (0
    where the delay pattern has no valid step)."""
    lm = model.lm
    lm.eval()
    attributes, _ = model._prepare_tokens_and_attributes(["calm piano"], None, melody_wavs=[wav])
    codes = torch.randint(0, lm.card, (1, lm.num_codebooks, 50), generator=torch.Generator().manual_seed(0))
    random.seed(0)  # demucs (inside the chroma conditioner) draws a random shift
    torch.manual_seed(0)
    with torch.no_grad():
        out = lm.compute_predictions(codes, attributes)
    assert out.mask[..., :40].all()
    return torch.where(out.mask[..., None], out.logits, torch.zeros(()))


def test_the_fine_tuned_model_follows_the_chroma(tuned):
    model = tuned["model"]
    base = load_musicgen("tiny-melody", "cpu").musicgen
    trained_state, base_state = model.lm.state_dict(), base.lm.state_dict()
    moved = moved_beyond_fp16(trained_state, base_state, "transformer.")
    assert len(moved) > len([k for k in base_state if k.startswith("transformer.")]) // 2  # it did fine-tune
    a, b = melody(220.0, 0), melody(311.0, 1)
    on_a, on_b, on_a_again = logits(model, a), logits(model, b), logits(model, a)
    assert torch.isfinite(on_a).all()
    assert torch.equal(on_a, on_a_again)
    assert (on_a - on_b).abs().max() > 1e-3
    # the chroma reaches the prediction of every codebook
    assert ((on_a - on_b).abs().amax(dim=(0, 2, 3)) > 1e-4).all()


def test_predict_runs_on_the_fine_tuned_melody_model(tuned, tmp_path):
    tar = str(tuned["tar"])
    first = write_wav(tmp_path / "a.wav", 2.0, freq=220.0)
    second = write_wav(tmp_path / "b.wav", 2.0, freq=311.0, seed=1)
    out = tmp_path / "melody.wav"
    run = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), "--replicate_weights", tar, "--prompt", "calm piano",
         "--input_audio", str(first), "--duration", "1", "--top_k", "50", "--seed", "3", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    audio, sr = sf.read(str(out))
    assert sr == 32000 and audio.shape == (32000,) and np.abs(audio).max() > 0

    generator = Generator(device="cpu")

    def generate(duration: int = 1, **kw) -> torch.Tensor:
        request = from_kwargs(
            PredictParams, replicate_weights=tar, prompt="calm piano", duration=duration, top_k=50, seed=3, **kw
        )
        wav = generator.generate(request, progress=False).wav
        assert wav.shape[-1] == duration * 32000 and torch.isfinite(wav).all()
        return wav

    # melody mode: the same seed with another melody gives other music
    assert not torch.equal(generate(input_audio=str(first)), generate(input_audio=str(second)))
    # continuation of the input's first second
    generate(duration=2, input_audio=str(first), continuation=True, continuation_end=1)
