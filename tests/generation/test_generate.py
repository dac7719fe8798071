"""Generation with the tiny models through audiocraft's real loaders (offline, CPU)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from core.params import InputError, from_kwargs
from generation.generate import LOUDNESS_BLOCK_S, Generator, generate_tokens, normalize
from generation.params import PredictParams
from tests.helpers import write_wav

SR = 32000
FRAME = SR // 50  # samples per EnCodec frame of the tiny models


@pytest.fixture(scope="module")
def generator():
    return Generator(device="cpu")


def params(**kw) -> PredictParams:
    kw.setdefault("prompt", "lofi beat")
    kw.setdefault("duration", 1)
    kw.setdefault("seed", 7)
    return from_kwargs(PredictParams, **kw)


@pytest.mark.parametrize("version,channels", [("tiny", 1), ("tiny-stereo", 2), ("tiny-melody", 1)])
def test_shape_channels_rate_duration(generator, version, channels):
    result = generator.generate(params(model_version=version, duration=2), progress=False)
    assert result.sample_rate == SR
    assert result.wav.dim() == 2 and result.wav.shape[0] == channels
    assert abs(result.wav.shape[-1] - 2 * SR) <= FRAME
    assert torch.isfinite(result.wav).all() and result.wav.abs().max() > 0
    assert result.tokens.shape == (4 * channels, 2 * 50)


def test_same_seed_same_audio_different_seed_different(generator):
    a = generator.generate(params(model_version="tiny", seed=11), progress=False)
    b = generator.generate(params(model_version="tiny", seed=11), progress=False)
    c = generator.generate(params(model_version="tiny", seed=12), progress=False)
    assert torch.equal(a.wav, b.wav) and torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_random_seed_is_reported_and_reproduces(generator):
    first = generator.generate(params(model_version="tiny", seed=-1), progress=False)
    again = generator.generate(params(model_version="tiny", seed=first.seed), progress=False)
    assert torch.equal(first.tokens, again.tokens)


def test_empty_prompt_is_unconditional(generator):
    result = generator.generate(params(model_version="tiny", prompt=""), progress=False)
    assert result.wav.shape[-1] == SR


def test_prompt_changes_the_music(generator):
    a = generator.generate(params(model_version="tiny", prompt="lofi beat"), progress=False)
    b = generator.generate(params(model_version="tiny", prompt="metal riff"), progress=False)
    assert not torch.equal(a.tokens, b.tokens)


@pytest.mark.slow
def test_long_output_is_windowed(generator):
    model = generator.model_for(generator_key("tiny")).musicgen
    sampler = generator.sampler()  # the fast sampler predict uses (audiocraft's generate takes minutes here)
    calls = []

    def counting_sample(lm, prompt_tokens, attributes, *, max_gen_len, callback, **gen):
        calls.append((None if prompt_tokens is None else prompt_tokens.shape[-1], max_gen_len))
        return sampler(lm, prompt_tokens, attributes, max_gen_len=max_gen_len, callback=callback, **gen)

    p = params(model_version="tiny", duration=35)
    torch.manual_seed(0)
    tokens = generate_tokens(model, p, None, sample_fn=counting_sample, progress=False)
    assert tokens.shape == (1, 4, 35 * 50)
    # First window: 30 s from nothing; second: the last 12 s as prompt, up to 35 - 18 = 17 s.
    assert calls == [(None, 1500), (600, 850)]
    result = generator.generate(p, progress=False)
    assert abs(result.wav.shape[-1] - 35 * SR) <= FRAME


def generator_key(version):
    from generation.generate import ModelKey

    return ModelKey("version", version)


def test_melody_conditioning_follows_the_input(generator, tmp_path):
    melody_a = write_wav(tmp_path / "a.wav", 3.0, sr=44100, channels=2, freq=220.0)
    melody_b = write_wav(tmp_path / "b.wav", 3.0, sr=44100, channels=2, freq=311.0, seed=3)
    a = generator.generate(params(model_version="tiny-melody", input_audio=str(melody_a)), progress=False)
    b = generator.generate(params(model_version="tiny-melody", input_audio=str(melody_b)), progress=False)
    none = generator.generate(params(model_version="tiny-melody"), progress=False)
    assert a.wav.shape == (1, SR)
    assert not torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, none.tokens)


def test_continuation_keeps_the_prompt_and_extends_it(generator, tmp_path):
    source = write_wav(tmp_path / "in.wav", 4.0, sr=48000, channels=2)
    p = params(
        model_version="tiny",
        input_audio=str(source),
        continuation=True,
        continuation_start=1,
        continuation_end=2,
        duration=3,
    )
    result = generator.generate(p, progress=False)
    assert abs(result.wav.shape[-1] - 3 * SR) <= FRAME
    # The first second of tokens is the encoded prompt (input_audio[1 s:2 s]), identical whatever the seed.
    other = generator.generate(dataclasses.replace(p, seed=99), progress=False)
    assert torch.equal(result.tokens[:, :50], other.tokens[:, :50])
    assert not torch.equal(result.tokens[:, 60:], other.tokens[:, 60:])


def test_stereo_model_continues_a_mono_file(generator, tmp_path):
    source = write_wav(tmp_path / "mono.flac", 2.0, sr=22050, channels=1)
    p = params(model_version="tiny-stereo", input_audio=str(source), continuation=True, duration=3)
    result = generator.generate(p, progress=False)
    assert result.wav.shape[0] == 2 and abs(result.wav.shape[-1] - 3 * SR) <= FRAME


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"model_version": "tiny", "top_k": 300}, "top_k"),
        ({"model_version": "tiny", "continuation": True}, "continuation"),
        ({"model_version": "tiny", "input_audio": "MELODY"}, "input_audio"),
        (
            {"model_version": "tiny", "input_audio": "MELODY", "continuation": True, "continuation_end": 9},
            "continuation_end",
        ),
        ({"model_version": "tiny", "input_audio": "MELODY", "continuation": True, "duration": 2}, "duration"),
        ({"model_version": "tiny", "input_audio": "NOTAUDIO"}, "input_audio"),
        ({"model_version": "tiny", "multi_band_diffusion": True}, "multi_band_diffusion"),
    ],
)
def test_bad_inputs_name_the_input(generator, tmp_path, kw, name):
    melody = write_wav(tmp_path / "m.wav", 3.0)
    junk = tmp_path / "notes.txt"
    junk.write_text("not audio")
    kw = {k: (str(melody) if v == "MELODY" else str(junk) if v == "NOTAUDIO" else v) for k, v in kw.items()}
    with pytest.raises(InputError) as err:
        generator.generate(params(**kw), progress=False)
    assert err.value.name == name
    assert name in str(err.value)


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"duration": 0}, "duration"),
        ({"top_p": 1.5}, "top_p"),
        ({"model_version": "huge"}, "model_version"),
        ({"output_format": "ogg"}, "output_format"),
        ({"normalization_strategy": "loud"}, "normalization_strategy"),
        ({"temperature": "hot"}, "temperature"),
        ({"voice": "x"}, "voice"),
        # NaN passes every `ge`/`le` comparison: refused by the finiteness rule (issue 12)
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"classifier_free_guidance": float("nan")}, "classifier_free_guidance"),
        ({"classifier_free_guidance": float("inf")}, "classifier_free_guidance"),
        ({"sampler_precision": "fp8"}, "sampler_precision"),
    ],
)
def test_out_of_range_inputs_are_refused_before_loading(kw, name):
    with pytest.raises(InputError) as err:
        params(**kw)
    assert err.value.name == name


def test_output_formats(generator, tmp_path):
    import soundfile as sf

    from generation.generate import write_outputs

    result = generator.generate(params(model_version="tiny-stereo"), progress=False)
    (wav,) = write_outputs(result, tmp_path, "wav")
    (mp3,) = write_outputs(result, tmp_path, "mp3")
    info = sf.info(str(wav))
    assert (info.samplerate, info.channels, info.frames) == (SR, 2, SR)
    decoded, sr = sf.read(str(mp3))
    assert sr == SR and decoded.shape[1] == 2 and decoded.shape[0] >= SR


def test_sampler_precision_reaches_the_sampler():
    """`none`: exactly the tokens of audiocraft's own `LMModel.generate` with the same seed; `int8` (the CPU's
    `auto`): the quantized path's, which differ. One sampler is kept, at the last request's precision."""
    from generation.generate import seed_everything
    from generation.windows import lm_generate

    generator = Generator(device="cpu")
    exact_params = params(model_version="tiny", seed=5, sampler_precision="none")
    exact = generator.generate(exact_params, progress=False)
    assert generator.sampler().quantize is None
    model = generator.model_for(generator_key("tiny")).musicgen
    seed_everything(5)
    theirs = generate_tokens(model, exact_params, None, sample_fn=lm_generate, progress=False)
    assert torch.equal(exact.codes, theirs.cpu())
    int8 = generator.generate(dataclasses.replace(exact_params, sampler_precision="int8"), progress=False)
    assert generator.sampler().quantize == "int8"
    assert not torch.equal(int8.codes, exact.codes)
    auto = generator.generate(dataclasses.replace(exact_params, sampler_precision="auto"), progress=False)
    assert torch.equal(auto.codes, int8.codes)  # auto is int8 on CPU


def test_int8_on_a_gpu_is_refused_before_loading():
    """int8 kernels are CPU-only: a GPU generator refuses the request naming the input, before any model loads
    (so this runs without a GPU)."""
    generator = Generator(device="cuda")
    with pytest.raises(InputError) as err:
        generator.generate(params(model_version="tiny", sampler_precision="int8"), progress=False)
    assert err.value.name == "sampler_precision" and "fp16" in str(err.value)
    assert generator._model is None


def test_loudness_normalization_of_audio_shorter_than_its_block_falls_back_to_peak_and_says_so(caplog):
    """Loudness is measured over 400 ms blocks (torchaudio raises on less): a shorter sample (a training's
    `sample_duration` of 0.3) is peak-normalized, with a warning, instead of failing the export."""
    rate = 32000
    short = torch.sin(torch.arange(int(0.3 * rate)) / 10.0)[None] * 0.1  # [C, T]
    with caplog.at_level(logging.WARNING):
        out = normalize(short, "loudness", rate)
    assert out.shape == short.shape and torch.isfinite(out).all()
    assert out.abs().max().item() == pytest.approx(10 ** (-1 / 20), abs=1e-3)  # peak at 1 dB of headroom
    assert "normalized by peak instead" in caplog.text
    caplog.clear()
    long = torch.sin(torch.arange(int(2 * LOUDNESS_BLOCK_S * rate)) / 10.0)[None] * 0.1
    with caplog.at_level(logging.WARNING):
        normalize(long, "loudness", rate)
    assert "peak instead" not in caplog.text  # long enough: loudness, as asked
