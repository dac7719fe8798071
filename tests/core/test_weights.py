"""The trained_model.tar contract: write, extract, load with audiocraft's own loader; bad files."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile

import pytest
import torch
from audiocraft.models import MusicGen
from audiocraft.modules.conditioners import ConditioningAttributes

from core import tiny, weights
from core.versions import load_musicgen


def logits(model, codes: torch.Tensor, text: str = "lofi beat") -> torch.Tensor:
    """LM logits `[B, K, T, card]` for fixed codes and a text condition (eval mode, no dropout)."""
    lm = model.lm.eval()
    attrs = [ConditioningAttributes(text={"description": text})]
    for attr in attrs:  # melody models expect a (possibly empty) self_wav condition
        if "self_wav" in lm.condition_provider.conditioners:
            from audiocraft.modules.conditioners import WavCondition

            attr.wav["self_wav"] = WavCondition(torch.zeros(1, 1, 1), torch.tensor([0]), [32000], [None])
    with torch.no_grad():
        tokenized = lm.condition_provider.tokenize(attrs)
        cond = lm.condition_provider(tokenized)
        out = lm.compute_predictions(codes, [], condition_tensors=cond)
        return out.logits.masked_fill(~out.mask[..., None].bool(), 0.0)  # invalid pattern steps are NaN


def perturbed(version: str):
    """A base tiny model whose LM weights moved, standing in for a fine-tune."""
    model = load_musicgen(version, device="cpu").musicgen
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.lm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("version", ["tiny", "tiny-stereo", "tiny-melody"])
def test_round_trip_identical_logits(tmp_path, version):
    model = perturbed(version)
    out = weights.write_trained_model(
        tmp_path / "trained_model.tar",
        state_dict=model.lm.state_dict(),
        cfg=model.lm.cfg,
        base_model=version,
        finetune={"method": "full", "trigger": "zzq", "labels": ["lofi"], "inputs": {"epochs": 1}},
    )
    assert tarfile.is_tarfile(out)
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == ["compression_state_dict.bin", "finetune.json", "state_dict.bin"]
    folder = weights.unpack(out)
    pkg = torch.load(folder / "state_dict.bin", weights_only=True)
    assert pkg["exported"] is True and pkg["version"] == "1.3.0"
    assert all(v.dtype == torch.float16 for v in pkg["best_state"].values() if v.is_floating_point())
    info = weights.read_finetune_info(folder)
    assert info["base_model"] == version and info["trigger"] == "zzq" and info["format_version"] == 1

    codes = torch.randint(0, 256, (1, model.lm.n_q, 20), generator=torch.Generator().manual_seed(0))
    with tiny.tiny_demucs(tiny.ensure_tiny(version)):
        theirs = MusicGen.get_pretrained(str(folder), device="cpu")  # audiocraft's own loader
    ours = weights.load_trained_model(out, device="cpu").musicgen
    expected = logits(theirs, codes)
    assert torch.equal(logits(ours, codes), expected)
    # fp16 storage: close to the fp32 model it came from, not identical.
    torch.testing.assert_close(logits(model, codes), expected, atol=5e-2, rtol=5e-2)
    assert ours.audio_channels == (2 if version == "tiny-stereo" else 1)


def test_unpack_is_cached_by_content(tmp_path):
    model = load_musicgen("tiny", device="cpu").musicgen
    kw = dict(state_dict=model.lm.state_dict(), cfg=model.lm.cfg, base_model="tiny", finetune={"method": "full"})
    a = weights.unpack(weights.write_trained_model(tmp_path / "a.tar", **kw))
    b = weights.unpack(weights.write_trained_model(tmp_path / "b.tar", **kw))
    assert a == b and (a / "state_dict.bin").is_file()


def test_the_tar_writer_report_members_modes_and_same_bytes(tmp_path, caplog):
    """One writer for the whole tar: the report after the weights (not hashed), every member a 0644 file with
    mtime 0, the file 0644 less the umask, no temp file left, and the same inputs give the same bytes."""
    model = load_musicgen("tiny", device="cpu").musicgen
    report = {"loss.png": b"png", "samples/sample_0.wav": b"RIFF", "metrics.json": b"{}", "report.html": b"<html>"}
    kw = dict(state_dict=model.lm.state_dict(), cfg=model.lm.cfg, base_model="tiny", finetune={"method": "full"})
    written = {}
    for umask, name in ((0o077, "private.tar"), (0o022, "out/usual.tar")):
        previous = os.umask(umask)
        try:
            written[umask] = weights.write_trained_model(tmp_path / name, **kw, report_files=report)
        finally:
            os.umask(previous)
    private, usual = written[0o077], written[0o022]
    assert oct(stat.S_IMODE(private.stat().st_mode)) == oct(0o600)
    assert oct(stat.S_IMODE(usual.stat().st_mode)) == oct(0o644)
    assert private.read_bytes() == usual.read_bytes()
    with tarfile.open(usual) as tar:
        members = tar.getmembers()
        info = json.load(tar.extractfile("finetune.json"))
    assert [m.name for m in members] == [
        "state_dict.bin",
        "compression_state_dict.bin",
        "finetune.json",
        "loss.png",
        "samples/sample_0.wav",
        "metrics.json",
        "report.html",
    ]
    assert all(m.isfile() and m.mode == 0o644 and m.mtime == 0 for m in members)
    assert set(info["integrity"]["sha256"]) == {"state_dict.bin", "compression_state_dict.bin"}
    caplog.clear()
    assert sorted(p.name for p in weights.unpack(usual).iterdir()) == [
        "compression_state_dict.bin",
        "finetune.json",
        "state_dict.bin",
    ]
    assert "Ignoring" not in caplog.text  # the report is the tar's own, not a stray file worth a warning
    assert not list(tmp_path.rglob(".trained_model-*"))
    with pytest.raises(ValueError, match="state_dict.bin is a weights member"):
        weights.write_trained_model(tmp_path / "bad.tar", **kw, report_files={"state_dict.bin": b""})
    assert not (tmp_path / "bad.tar").exists()


def test_pretrained_base_references_its_encodec(tmp_path):
    pkg = weights.compression_package("small")
    assert pkg["pretrained"] == "facebook/encodec_32khz" and pkg["base_model"] == "facebook/musicgen-small"


def test_not_a_tar(tmp_path):
    bad = tmp_path / "weights.tar"
    bad.write_bytes(b"PK\x03\x04 definitely not a tar" * 100)
    with pytest.raises(weights.WeightsError, match="not a trained_model.tar"):
        weights.unpack(bad)


def test_foreign_tar_missing_files(tmp_path):
    bad = tmp_path / "foreign.tar"
    with tarfile.open(bad, "w") as tar:
        data = json.dumps({"hello": 1}).encode()
        info = tarfile.TarInfo("config.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(weights.WeightsError, match="lack state_dict.bin"):
        weights.unpack(bad)


def test_corrupt_state_dict(tmp_path):
    bad = tmp_path / "corrupt.tar"
    with tarfile.open(bad, "w") as tar:
        for name in ("state_dict.bin", "compression_state_dict.bin"):
            data = b"\x00garbage" * 64
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(weights.WeightsError, match="not a readable torch checkpoint"):
        weights.unpack(bad)


def test_links_and_unknown_members_are_not_extracted(tmp_path):
    model = load_musicgen("tiny", device="cpu").musicgen
    good = weights.write_trained_model(
        tmp_path / "good.tar", state_dict=model.lm.state_dict(), cfg=model.lm.cfg, base_model="tiny", finetune={}
    )
    evil = tmp_path / "evil.tar"
    with tarfile.open(good) as src, tarfile.open(evil, "w") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        link = tarfile.TarInfo("finetune.json.link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        dst.addfile(link)
        outside = tarfile.TarInfo("../../escape.txt")
        outside.size = 3
        dst.addfile(outside, io.BytesIO(b"bad"))
    folder = weights.unpack(evil)
    assert sorted(p.name for p in folder.iterdir()) == [
        "compression_state_dict.bin",
        "finetune.json",
        "state_dict.bin",
    ]
    assert not (tmp_path / "escape.txt").exists()


def test_missing_weights_path(tmp_path):
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.unpack(tmp_path / "nope.tar")
