"""`python -m evaluation` measures as the training report did unless told otherwise (and says which), writes its
samples on request, refuses unbounded work before any, and never loses its JSON report."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import soundfile as sf

import evaluation.__main__ as cli
from core.versions import load_musicgen
from generation import request
from tests.training.conftest import make_prepared, tiny_params
from tests.training.test_outputs import loudness
from training.run import run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny fine-tune whose report measured on 2 s crops (segment_duration 2) of one held-out track of 3 s."""
    root = tmp_path_factory.mktemp("evaluation")
    specs = [{"seconds": 2.5, "freq": 200.0 + 60 * i, "description": f"tone {i}"} for i in range(3)]
    train = make_prepared(root / "train", specs)
    held = make_prepared(root / "held", [{"seconds": 3.0, "freq": 290.0, "description": "tone 9"}])
    params = tiny_params(train, validation_path=str(held), epochs=1, updates_per_epoch=4, sample_duration=0.5)
    tar = run_training(params, root / "out")
    validation = json.loads((root / "out" / "metrics.json").read_text())["validation"]
    return {"root": root, "held": held, "tar": tar, "validation": validation}


def test_the_defaults_are_the_reports_and_the_samples_are_written(trained, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "report.json"  # a folder that does not exist yet: created first
    samples = tmp_path / "samples"
    argv = ["--dataset", str(trained["held"]), "--weights", "tiny", str(trained["tar"]), "--samples", "2"]
    assert cli.main([*argv, "--json", str(out), "--samples_dir", str(samples)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    base, tuned = report["models"]
    # no --segment: the training's 2 s crops, so the base model's loss is the report's, exactly
    assert report["segment"] == 2.0 and base["crops"] == 2
    assert base["val_loss"] == pytest.approx(trained["validation"]["base_loss"], rel=1e-5)
    assert "--segment 2 (trained_model.tar's segment_duration, as its report)" in table
    assert report["sample_duration"] == 0.5 and "--duration 0.5" in table
    # the samples as files, side by side per prompt, at predict's loudness (-14 LUFS), named in the JSON
    files = sorted(p.name for p in samples.iterdir())
    assert files == [f"sample_{j:02d}_{i}-{w}.wav" for j in range(2) for i, w in enumerate(["tiny", "trained_model"])]
    assert [s["file"] for s in tuned["samples"]] == ["sample_00_1-trained_model.wav", "sample_01_1-trained_model.wav"]
    for name in files:
        assert sf.info(str(samples / name)).frames == 16000
        assert loudness(samples / name) == pytest.approx(-14.0, abs=1.5), name
    # an explicit other segment is used, and the table says how to match the report
    assert cli.main([*argv[:-2], "--samples", "0", "--segment", "3"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"--segment 3 \(given; trained_model.tar's report used 2: pass that to match it\)", table)


def test_the_report_is_kept_when_writing_it_fails_after_the_work(trained, tmp_path, capsys, monkeypatch):
    def disk_full(folder, files):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "write_beside", disk_full)
    target = tmp_path / "report.json"
    argv = ["--dataset", str(trained["held"]), "--weights", "tiny", "--samples", "0", "--json", str(target)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    kept = re.search(r"the report is kept in (\S+\.json)", err)
    assert kept and "No space left on device" in err and str(target) in err
    report = json.loads(Path(kept.group(1)).read_text())
    Path(kept.group(1)).unlink()
    assert report["models"][0]["weights"] == "tiny" and report["segment"] == 30.0  # no tar: audiocraft's default


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--duration", "3600"], "--duration"),  # an hour per sample
        (["--samples", "3000"], "--samples"),  # one batch of 3000
        (["--segment", "nan"], "--segment"),
    ],
)
def test_unbounded_work_is_refused_before_any(tmp_path, capsys, flags, named):
    # the dataset does not exist: a refusal naming the flag proves the check ran before anything was read or loaded
    assert cli.main(["--dataset", str(tmp_path / "missing.zip"), "--weights", "tiny", *flags]) == 2
    assert named in capsys.readouterr().err


def test_an_unwritable_destination_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for flag, value in (("--json", blocker / "report.json"), ("--json", tmp_path), ("--samples_dir", blocker)):
        argv = ["--dataset", str(tmp_path / "missing.zip"), "--weights", "tiny", flag, str(value)]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"'{flag.lstrip('-')}'" in err and "missing.zip" not in err, err


def test_samples_are_generated_in_batches_that_fit_free_memory(monkeypatch, tmp_path):
    from core import tiny
    from evaluation.compare import sample_batch

    # A wider tiny LM, where the batch's attention cache (not one output's decode) decides what fits.
    wide = tiny.build_variant(tmp_path / "wide", dim=512, num_heads=8, num_layers=8)
    model = load_musicgen(str(wide), "cpu").musicgen
    assert request.decode_bytes(model, 2.0) < 3 * request.kv_cache_bytes(model, 2.0, 1)
    per_output = request.kv_cache_bytes(model, 2.0, 1)
    monkeypatch.setattr(request, "available_memory", lambda device: int(3.5 * per_output / 0.8))
    assert sample_batch(model, 8, 2.0) == 3  # predict's check: 3 outputs' attention cache fit, 4 do not
    assert sample_batch(model, 2, 2.0) == 2 and sample_batch(model, 1, 2.0) == 1
    monkeypatch.setattr(request, "available_memory", lambda device: 10**15)
    assert sample_batch(model, 64, 2.0) == 8  # never more than predict's num_outputs at once
