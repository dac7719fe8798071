"""Weights integrity: finetune.json records a sha256 per weights member and the base architecture's fingerprint;
loading checks both (a flipped byte, an adapter pointed at another base); old tars still load; the tar is 0644
less the umask."""

from __future__ import annotations

import json
import logging
import os
import stat
import tarfile

import pytest

from core import weights
from core.versions import load_musicgen
from tests.core.lora_tars import edit_finetune, lora_tar, rewrite_tar


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private weights cache: unpacked folders of these tests cannot leak into others (content-keyed)."""
    from pathlib import Path

    root = tmp_path / "mgft-cache"
    root.mkdir()
    shared = Path.home() / ".cache" / "musicgen-ft" / "models"
    if shared.is_dir():
        (root / "models").symlink_to(shared)
    monkeypatch.setenv("MGFT_CACHE", str(root))
    return root


def full_tar(path):
    model = load_musicgen("tiny", device="cpu").musicgen
    return weights.write_trained_model(
        path, state_dict=model.lm.state_dict(), cfg=model.lm.cfg, base_model="tiny", finetune={"method": "full"}
    )


def finetune_of(tar) -> dict:
    with tarfile.open(tar) as archive:
        return json.load(archive.extractfile(weights.FINETUNE_FILE))


def test_finetune_json_records_checksums_and_fingerprint(cache, tmp_path):
    import hashlib

    tar = lora_tar(tmp_path / "lora.tar")
    integrity = finetune_of(tar)["integrity"]
    with tarfile.open(tar) as archive:
        for name in ("state_dict.bin", "compression_state_dict.bin", "adapter.safetensors", "adapter_config.json"):
            data = archive.extractfile(name).read()
            assert integrity["sha256"][name] == hashlib.sha256(data).hexdigest()
    assert integrity["base_architecture"] == weights.architecture_fingerprint(load_musicgen("tiny", "cpu").lm.cfg)
    assert integrity["base_architecture"] != weights.architecture_fingerprint(load_musicgen("tiny-t5", "cpu").lm.cfg)


def test_flipped_bytes_in_state_dict_are_refused(cache, tmp_path):
    tar = full_tar(tmp_path / "good.tar")

    def flip(name: str, data: bytes) -> bytes:
        if name != "state_dict.bin":
            return data
        middle = len(data) // 2  # inside the tensor storage (the zip's central directory is at the end)
        return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 8]) + data[middle + 8 :]

    bad = rewrite_tar(tar, tmp_path / "flipped.tar", flip)
    with pytest.raises(weights.WeightsError, match=r"flipped.tar: state_dict.bin is corrupt \(sha256"):
        weights.load_trained_model(bad, device="cpu")
    assert weights.load_trained_model(tar, device="cpu").lm.n_q == 4


def test_adapter_never_goes_into_another_base(cache, tmp_path):
    """tiny-t5 has tiny's transformer (every LoRA target has the same shape) but a T5 text conditioner: without
    the fingerprint the adapter merged into it silently."""
    tar = lora_tar(tmp_path / "lora.tar")
    moved = rewrite_tar(tar, tmp_path / "moved.tar", edit_finetune(lambda info: info.update(base_model="tiny-t5")))
    with pytest.raises(weights.WeightsError, match="trained on another architecture than base model tiny-t5"):
        weights.load_trained_model(moved, device="cpu")
    assert weights.load_trained_model(tar, device="cpu").is_lora


def test_old_tars_without_the_fields_still_load(cache, tmp_path, caplog):
    tar = lora_tar(tmp_path / "lora.tar", seed=3)
    old = rewrite_tar(tar, tmp_path / "old.tar", edit_finetune(lambda info: info.pop("integrity")))
    with caplog.at_level(logging.INFO, logger="core.weights"):
        model = weights.load_trained_model(old, device="cpu")
    assert model.is_lora
    assert "records no checksums" in caplog.text and "records no base architecture fingerprint" in caplog.text


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_trained_model_tar_is_0644_less_the_umask(cache, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        tar = full_tar(tmp_path / "trained_model.tar")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(tar.stat().st_mode) == mode
