"""Vocal removal through demucs' real loading path (a small random HTDemucs saved as a demucs repo)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import soundfile as sf

from core.audio import load_audio, resample_fast
from core.params import from_kwargs
from core.tiny import save_htdemucs_repo
from core.versions import ModelUnavailableError
from preprocessing import PrepareParams, prepare
from preprocessing import vocals as vocals_mod
from preprocessing.vocals import VocalRemover, resolve_repo
from tests.preprocessing.audio_files import track, write_audio

SR = 32000


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return save_htdemucs_repo(tmp_path_factory.mktemp("htdemucs"))


def params(path, **kw) -> PrepareParams:
    kw.setdefault("auto_labeling", False)
    return from_kwargs(PrepareParams, dataset_path=str(path), drop_vocals=True, **kw)


def test_whole_track_is_separated_before_chunking(tmp_path, repo):
    """Clips are slices of ONE separation of the whole track (not one separation per clip): equal, sample for
    sample, to separating the track ourselves and cutting it."""
    song = write_audio(tmp_path / "song.wav", track(7, 44100, 1, seed=5), 44100)  # one demucs segment
    random.seed(0)  # demucs' random time shift (shifts=1) draws from `random`
    dataset = prepare(params(song, demucs_repo=str(repo), chunk_seconds=3, min_clip_seconds=0.5), tmp_path / "w")
    assert [c.duration for c in dataset.clips] == [3.0, 3.0, 1.0]
    assert all(c.channels == 1 for c in dataset.clips)  # mono in, mono out

    wav, sr = load_audio(song)
    random.seed(0)
    separated, model_sr = VocalRemover(repo, "cpu")(wav, sr)
    assert model_sr == 44100 and separated.shape[0] == 1
    expected = resample_fast(separated, model_sr, SR).numpy().T
    got = np.concatenate([sf.read(str(c.path), dtype="float32", always_2d=True)[0] for c in dataset.clips])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, np.clip(expected, -1, 1), atol=2 / 32768)  # 16-bit rounding
    # ... and it is not the input: the vocals stem was taken out.
    plain = resample_fast(wav, sr, SR).numpy().T
    assert np.abs(got - plain).max() > 0.01


def test_short_stereo_file_is_separated_too(tmp_path, repo):
    """A track shorter than one clip still goes through demucs (sakemin's trainer skipped those)."""
    song = write_audio(tmp_path / "short.flac", track(6, 48000, 2, seed=6), 48000)
    dataset = prepare(params(song, demucs_repo=str(repo)), tmp_path / "w")
    (clip,) = dataset.clips
    assert clip.duration == pytest.approx(6.0, abs=1e-3) and clip.channels == 2
    got, _ = sf.read(str(clip.path), dtype="float32")
    wav, sr = load_audio(song)
    plain = resample_fast(wav, sr, SR).numpy().T
    assert np.abs(got - plain[: len(got)]).max() > 0.01  # separated, not copied
    assert dataset.report["settings"]["drop_vocals"] is True


def test_weights_from_the_torch_cache_and_env_var(tmp_path, repo, monkeypatch):
    home = tmp_path / "torch_home"
    cached = home / "hub" / "checkpoints" / vocals_mod.HUB_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes((repo / "955717e8.th").read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv(vocals_mod.ENV_REPO, raising=False)
    linked = resolve_repo(None, tmp_path / "scratch")
    assert linked.parent == tmp_path / "scratch" and (linked / "htdemucs.yaml").is_file()
    assert VocalRemover(linked, "cpu").sample_rate == 44100  # loads through demucs' LocalRepo
    monkeypatch.setenv(vocals_mod.ENV_REPO, str(repo))
    assert resolve_repo(None, tmp_path / "scratch2") == repo


def test_missing_weights_fail_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.delenv(vocals_mod.ENV_REPO, raising=False)
    song = write_audio(tmp_path / "song.wav", track(6, 44100, 2), 44100)
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        prepare(params(song), tmp_path / "w")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    for needed in (vocals_mod.WEIGHTS_URL, "MGFT_DEMUCS_REPO", "drop_vocals", str(tmp_path / "empty_torch_home")):
        assert needed in message
    assert not (tmp_path / "w" / "dataset").exists() and not (tmp_path / "w" / "unpacked").exists()
    with pytest.raises(ModelUnavailableError, match="demucs_repo="):
        prepare(params(song, demucs_repo=str(tmp_path)), tmp_path / "w2")
