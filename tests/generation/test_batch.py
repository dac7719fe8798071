"""`num_outputs`: several samples of one request generated as one batch (tiny models, offline, CPU).

Each output is its own file; the outputs differ from each other; the same seed and num_outputs give the same files;
melody, continuation, stereo, windowed (> 30 s), style and MultiBand Diffusion decoding all take the batch.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import soundfile as sf
import torch

from core.params import InputError, from_kwargs
from generation.generate import Generator, ModelKey, generate_tokens, write_outputs
from generation.params import PredictParams
from generation.request import check_batch_memory, decode_bytes, kv_cache_bytes
from tests.helpers import write_wav

SR = 32000
FRAME = SR // 50


@pytest.fixture(scope="module")
def generator():
    return Generator(device="cpu")


def params(**kw) -> PredictParams:
    kw.setdefault("model_version", "tiny")
    kw.setdefault("prompt", "lofi beat")
    kw.setdefault("duration", 1)
    kw.setdefault("seed", 7)
    return from_kwargs(PredictParams, **kw)


def assert_all_differ(batch: torch.Tensor) -> None:
    for i, j in itertools.combinations(range(batch.shape[0]), 2):
        assert not torch.equal(batch[i], batch[j]), (i, j)


def test_three_outputs_are_three_different_files_reproduced_by_the_seed(generator, tmp_path):
    p = params(num_outputs=3, duration=2)
    result = generator.generate(p, progress=False)
    assert len(result) == 3 and result.wavs.shape == (3, 1, 2 * SR) and result.codes.shape == (3, 4, 100)
    assert torch.isfinite(result.wavs).all() and (result.wavs.abs().amax(dim=(1, 2)) > 0).all()
    assert_all_differ(result.codes)
    assert_all_differ(result.wavs)
    files = write_outputs(result, tmp_path / "a", "wav")
    assert [f.name for f in files] == ["output_0.wav", "output_1.wav", "output_2.wav"]
    for f in files:
        info = sf.info(str(f))
        assert (info.samplerate, info.channels, info.frames) == (SR, 1, 2 * SR)
    again = generator.generate(p, progress=False)
    assert torch.equal(again.codes, result.codes) and torch.equal(again.wavs, result.wavs)
    assert [f.read_bytes() for f in write_outputs(again, tmp_path / "b", "wav")] == [f.read_bytes() for f in files]
    other = generator.generate(dataclasses.replace(p, seed=8), progress=False)
    assert not torch.equal(other.codes, result.codes)


def test_one_output_is_a_single_file_named_as_before(generator, tmp_path):
    result = generator.generate(params(), progress=False)
    assert result.wavs.shape == (1, 1, SR) and result.wav.shape == (1, SR) and result.tokens.shape == (4, 50)
    assert [f.name for f in write_outputs(result, tmp_path, "mp3")] == ["output.mp3"]


def test_the_batch_is_one_sampler_call_per_window(generator):
    """All outputs go through the fast sampler together: one call, B = num_outputs (not one call per output)."""
    model = generator.model_for(ModelKey("version", "tiny")).musicgen
    sampler = generator.sampler()
    calls = []

    def recording(lm, prompt_tokens, attributes, **kw):
        calls.append(len(attributes))
        return sampler(lm, prompt_tokens, attributes, **kw)

    torch.manual_seed(0)
    tokens = generate_tokens(model, params(num_outputs=4), None, sample_fn=recording, progress=False)
    assert calls == [4] and tokens.shape == (4, 4, 50)
    assert_all_differ(tokens)


@pytest.mark.parametrize("version,channels", [("tiny-stereo", 2), ("tiny-melody", 1)])
def test_stereo_and_melody_models_batch(generator, version, channels):
    result = generator.generate(params(model_version=version, num_outputs=2), progress=False)
    assert result.wavs.shape == (2, channels, SR)
    assert_all_differ(result.codes)


@pytest.mark.slow  # demucs + chroma of the melody for each output
def test_the_same_melody_conditions_every_output(generator, tmp_path):
    melody = write_wav(tmp_path / "m.wav", 3.0, sr=44100, channels=2, freq=220.0)
    with_melody = generator.generate(
        params(model_version="tiny-melody", input_audio=str(melody), num_outputs=2), progress=False
    )
    without = generator.generate(params(model_version="tiny-melody", num_outputs=2), progress=False)
    assert with_melody.wavs.shape == (2, 1, SR)
    assert_all_differ(with_melody.codes)
    for i in range(2):
        assert not torch.equal(with_melody.codes[i], without.codes[i])


def test_a_melody_is_analysed_once_for_all_outputs(generator, tmp_path):
    """The `num_outputs` copies of one request share one demucs + chroma pass (conditional + null row), and the
    repeated condition tensors equal those computed for every row."""
    import random

    from generation.fast import _condition_tensors
    from generation.generate import build_conditions, load_input_audio, replicate

    model = generator.model_for(ModelKey("version", "tiny-melody")).musicgen
    melody = write_wav(tmp_path / "m.wav", 2.0, sr=32000, freq=330.0)
    p = params(model_version="tiny-melody", input_audio=str(melody), prompt="calm piano")
    attributes, _ = replicate(*build_conditions(model, p, load_input_audio(p)), 3)
    chroma_conditioner = model.lm.condition_provider.conditioners["self_wav"]
    batches = []
    hook = chroma_conditioner.chroma.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        random.seed(0)  # demucs shifts its input by a random offset
        shared = _condition_tensors(model.lm, attributes)
        assert batches == [2]  # one melody + its null condition, not 3 + 3
        # the same melody on 3 distinct rows (a different prompt each) is analysed per row
        distinct = [dataclasses.replace(a, text={"description": f"take {i}"}) for i, a in enumerate(attributes)]
        random.seed(0)
        per_row = _condition_tensors(model.lm, distinct)
        assert batches[1] == 6
    finally:
        hook.remove()
    emb, mask = shared["self_wav"]
    assert emb.shape[0] == 6 and torch.equal(mask, per_row["self_wav"][1])
    torch.testing.assert_close(emb, per_row["self_wav"][0], rtol=1e-4, atol=1e-5)


def test_continuation_continues_the_same_audio_in_every_output(generator, tmp_path):
    source = write_wav(tmp_path / "in.wav", 2.0, sr=48000, channels=2)
    p = params(input_audio=str(source), continuation=True, continuation_end=1, duration=2, num_outputs=3)
    result = generator.generate(p, progress=False)
    assert result.wavs.shape[:2] == (3, 1) and abs(result.wavs.shape[-1] - 2 * SR) <= FRAME
    # The first second is the encoded input (the same in every output); what follows differs.
    assert all(torch.equal(result.codes[0, :, :50], result.codes[i, :, :50]) for i in (1, 2))
    assert_all_differ(result.codes[:, :, 60:])


@pytest.mark.slow
def test_windowed_long_outputs_batch(generator):
    model = generator.model_for(ModelKey("version", "tiny")).musicgen
    sampler = generator.sampler()
    calls = []

    def recording(lm, prompt_tokens, attributes, *, max_gen_len, **kw):
        calls.append((len(attributes), None if prompt_tokens is None else tuple(prompt_tokens.shape), max_gen_len))
        return sampler(lm, prompt_tokens, attributes, max_gen_len=max_gen_len, **kw)

    torch.manual_seed(1)
    tokens = generate_tokens(model, params(duration=35, num_outputs=2), None, sample_fn=recording, progress=False)
    # Two windows, each one batch of 2; the second continues each output's own last 12 s.
    assert calls == [(2, None, 1500), (2, (2, 4, 600), 850)]
    assert tokens.shape == (2, 4, 35 * 50)
    assert_all_differ(tokens)
    assert not torch.equal(tokens[0, :, 1500:], tokens[1, :, 1500:])


def test_style_model_batches_with_its_own_generate(generator, tmp_path):
    style = write_wav(tmp_path / "style.wav", 5.0, sr=44100, channels=2, freq=196.0)
    p = params(model_version="tiny-style", style_audio=str(style), num_outputs=2)
    result = generator.generate(p, progress=False)
    again = generator.generate(p, progress=False)
    assert result.wavs.shape == (2, 1, SR)
    assert_all_differ(result.codes)
    assert torch.equal(result.codes, again.codes)


def test_multi_band_diffusion_decodes_a_stereo_batch():
    from generation.generate import decode
    from tests.generation.test_mbd import tiny_mbd

    model = generator_model("tiny-stereo")
    mbd = tiny_mbd(model.compression_model.model)
    tokens = torch.randint(0, 256, (3, 8, 25), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    wavs = decode(model, tokens, mbd)
    assert wavs.shape == (3, 2, 16000) and torch.isfinite(wavs).all()
    assert_all_differ(wavs)


def generator_model(version: str):
    from core.versions import load_musicgen

    return load_musicgen(version, device="cpu").musicgen


@pytest.mark.parametrize("value", [0, 9, 2.5])
def test_num_outputs_bounds(value):
    with pytest.raises(InputError) as err:
        params(num_outputs=value)
    assert err.value.name == "num_outputs"


def test_a_batch_that_cannot_fit_in_memory_is_refused_naming_the_fix(generator):
    model = generator.model_for(ModelKey("version", "tiny")).musicgen
    one = kv_cache_bytes(model, 8, 1)
    # tiny: 2 layers x 2 (k, v) x 2 rows (guidance) x (400 frames + 4 delay steps) x dim 64 x 4 bytes
    assert one == 2 * 2 * 2 * 404 * 64 * 4
    assert kv_cache_bytes(model, 8, 5) == 5 * one
    assert kv_cache_bytes(model, 60, 1) == kv_cache_bytes(model, 30, 1)  # one window at a time
    p = params(duration=8, num_outputs=8)
    decoding = decode_bytes(model, 8)  # one output's decode, whatever num_outputs (outputs decode one at a time)
    check_batch_memory(p, model, available=int(max(8 * one, decoding) / 0.8) + 1)  # fits
    # tiny's decode outweighs its attention cache: a single output that cannot be decoded is refused naming duration
    with pytest.raises(InputError) as err:
        check_batch_memory(params(duration=8), model, available=int(decoding / 2 / 0.8) + 2)
    assert err.value.name == "duration" and "use duration <= 4" in str(err.value)
