"""Generation with MusicGen-Style (tiny-style, offline, CPU): text, style, both, double CFG, input checks."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import soundfile as sf
import torch

from core.params import InputError, from_kwargs
from generation.generate import Generator
from generation.params import PredictParams
from tests.helpers import ROOT, write_wav

SR = 32000


@pytest.fixture(scope="module")
def generator():
    return Generator(device="cpu")


@pytest.fixture(scope="module")
def style_wav(tmp_path_factory):
    return write_wav(tmp_path_factory.mktemp("style") / "style.wav", 5.0, sr=44100, channels=2, freq=196.0)


def params(**kw) -> PredictParams:
    kw.setdefault("model_version", "tiny-style")
    kw.setdefault("duration", 1)
    kw.setdefault("seed", 7)
    return from_kwargs(PredictParams, **kw)


def test_text_style_and_both_generate(generator, style_wav):
    text = generator.generate(params(prompt="lofi beat"), progress=False)
    styled = generator.generate(params(style_audio=str(style_wav)), progress=False)
    both = generator.generate(params(prompt="lofi beat", style_audio=str(style_wav)), progress=False)
    for result in (text, styled, both):
        assert result.sample_rate == SR and result.wav.shape == (1, SR)
        assert torch.isfinite(result.wav).all() and result.wav.abs().max() > 0
        assert result.tokens.shape == (4, 50)
    assert not torch.equal(text.tokens, both.tokens)  # the style condition changes the music
    # Same seed: same excerpt, same music.
    again = generator.generate(params(style_audio=str(style_wav)), progress=False)
    assert torch.equal(again.tokens, styled.tokens)


def test_double_cfg_with_beta_1_is_single_cfg(generator, style_wav):
    base = params(prompt="lofi beat", style_audio=str(style_wav), seed=11)
    single = generator.generate(base, progress=False)
    beta_1 = generator.generate(dataclasses.replace(base, classifier_free_guidance_beta=1.0), progress=False)
    beta_6 = generator.generate(dataclasses.replace(base, classifier_free_guidance_beta=6.0), progress=False)
    assert torch.equal(single.tokens, beta_1.tokens)
    assert not torch.equal(single.tokens, beta_6.tokens)


def test_style_settings_reach_the_conditioner(generator, style_wav):
    loose = generator.generate(params(style_audio=str(style_wav), style_eval_q=1), progress=False)
    conditioner = generator.model_for(generator._key).lm.condition_provider.conditioners["self_wav"]
    assert conditioner.eval_q == 1
    short = generator.generate(params(style_audio=str(style_wav), style_excerpt_length=1.5), progress=False)
    assert conditioner.eval_q == 3 and conditioner.length_subwav == int(1.5 * SR)
    assert conditioner.last_excerpt[1] == int(1.5 * SR)
    assert not torch.equal(loose.tokens, short.tokens)


def test_continuation_with_style(generator, style_wav, tmp_path):
    source = write_wav(tmp_path / "in.wav", 2.0, sr=48000, channels=1)
    p = params(input_audio=str(source), continuation=True, continuation_end=1, duration=2, style_audio=str(style_wav))
    result = generator.generate(p, progress=False)
    other = generator.generate(dataclasses.replace(p, seed=99), progress=False)
    assert result.tokens.shape == (4, 100)
    assert torch.equal(result.tokens[:, :50], other.tokens[:, :50])  # the encoded section of input_audio


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"model_version": "tiny", "style_audio": "STYLE"}, "style_audio"),
        ({"model_version": "tiny", "classifier_free_guidance_beta": 3.0}, "classifier_free_guidance_beta"),
        ({"input_audio": "STYLE"}, "input_audio"),  # a style model takes no melody
        ({"style_audio": "SHORT", "style_excerpt_length": 3.0}, "style_excerpt_length"),
        ({"style_audio": "NOT_AUDIO"}, "style_audio"),
    ],
)
def test_bad_style_inputs_name_the_input(generator, style_wav, tmp_path, kw, name):
    files = {"STYLE": style_wav, "SHORT": write_wav(tmp_path / "short.wav", 2.0), "NOT_AUDIO": tmp_path / "x.wav"}
    (tmp_path / "x.wav").write_text("not audio")
    kw = {k: str(files[v]) if v in files else v for k, v in kw.items()}
    with pytest.raises(InputError) as err:
        generator.generate(params(prompt="lofi", **kw), progress=False)
    assert err.value.name == name


def test_bounds_of_the_style_inputs():
    for kw, name in [
        ({"style_excerpt_length": 1.0}, "style_excerpt_length"),
        ({"style_excerpt_length": 5.0}, "style_excerpt_length"),
        ({"style_eval_q": 0}, "style_eval_q"),
        ({"style_eval_q": 7}, "style_eval_q"),
        ({"classifier_free_guidance_beta": -1}, "classifier_free_guidance_beta"),
    ]:
        with pytest.raises(InputError) as err:
            params(**kw)
        assert err.value.name == name


def test_excerpt_check_comes_before_loading(tmp_path):
    """A too-short style audio is refused before the (unavailable, offline) facebook/musicgen-style is loaded."""
    short = write_wav(tmp_path / "short.wav", 2.0)
    with pytest.raises(InputError) as err:
        Generator(device="cpu").generate(params(model_version="style", style_audio=str(short)), progress=False)
    assert err.value.name == "style_excerpt_length" and "at most 2.0" in str(err.value)


def test_cli_text_and_style(style_wav, tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), "--model_version", "tiny-style", "--prompt", "lofi beat",
         "--style_audio", str(style_wav), "--classifier_free_guidance_beta", "5", "--style_eval_q", "2",
         "--duration", "1", "--seed", "3", "--output", str(tmp_path / "out.wav")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    info = sf.info(str(tmp_path / "out.wav"))
    assert (info.samplerate, info.channels, info.frames) == (SR, 1, SR)
