"""Model versions: tiny models load through the real loader; missing checkpoints fail with one clear message."""

from __future__ import annotations

import shutil

import pytest
import torch

from core import catalogue, tiny, versions


def test_every_version_is_listed():
    assert versions.MODEL_VERSIONS[:10] == (
        "small", "medium", "large", "melody", "melody-large", "stereo-small", "stereo-medium", "stereo-large",
        "stereo-melody", "stereo-melody-large",
    )  # fmt: skip
    assert versions.MODEL_VERSIONS[10:] == ("tiny", "tiny-stereo", "tiny-melody", "tiny-t5")


def test_tiny_models_are_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("MGFT_CACHE", str(tmp_path))
    folder = tiny.ensure_tiny("tiny")
    assert folder.parent == tmp_path / "models"
    rebuilt = tmp_path / "again"
    rebuilt.mkdir()
    tiny._build("tiny", rebuilt)
    a = torch.load(folder / "state_dict.bin", weights_only=True)["best_state"]
    b = torch.load(rebuilt / "state_dict.bin", weights_only=True)["best_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "version,channels,n_q,melody",
    [("tiny", 1, 4, False), ("tiny-stereo", 2, 8, False), ("tiny-melody", 1, 4, True)],
)
def test_tiny_models_load(version, channels, n_q, melody):
    model = versions.load_musicgen(version, device="cpu").musicgen
    assert model.sample_rate == 32000 and model.audio_channels == channels and model.lm.n_q == n_q
    assert model.frame_rate == 50 and model.max_duration == 30
    assert ("self_wav" in model.lm.condition_provider.conditioners) is melody
    # the catalogue's families and layouts (core/catalogue.py) say the same of the models it names
    assert (version in catalogue.STEREO_VERSIONS) is (channels == 2)
    assert (version in catalogue.MELODY_VERSIONS) is melody
    assert catalogue.LM_LAYOUTS[version] == (len(model.lm.transformer.layers), n_q)


def test_local_folder_is_a_model(tmp_path):
    folder = tmp_path / "my-model"
    shutil.copytree(tiny.ensure_tiny("tiny"), folder)
    model = versions.load_musicgen(str(folder), device="cpu").musicgen
    assert model.lm.n_q == 4


def test_folder_missing_files(tmp_path):
    (tmp_path / "state_dict.bin").write_bytes(b"")
    with pytest.raises(versions.ModelUnavailableError, match="compression_state_dict.bin"):
        versions.load_musicgen(str(tmp_path))


def test_unknown_version():
    with pytest.raises(versions.ModelUnavailableError, match="choose one of small, medium"):
        versions.resolve("giant")


def test_missing_pretrained_checkpoint_is_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(versions.ModelUnavailableError) as err:
        versions.load_musicgen("small", device="cpu")
    message = str(err.value)
    assert "'small'" in message and "facebook/musicgen-small" in message
    assert "Hugging Face cache" in message and "local folder" in message and "network" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no hub stack trace attached
