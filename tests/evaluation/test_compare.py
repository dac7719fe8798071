"""`python -m evaluation`: the trainer's validation loss reproduced on any weights, the Fréchet distance of samples,
the copy check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.versions import load_musicgen
from evaluation.__main__ import main
from evaluation.embed import copy_check, encodec_latents
from evaluation.frechet import fmt_distance
from preprocessing.analysis import ENV_MODELS
from tests.preprocessing import fake_essentia
from tests.training.conftest import make_prepared, tiny_params
from training.run import run_training


def test_the_copy_check_flags_a_sample_that_replays_a_training_clip():
    rng = np.random.default_rng(0)
    training = [rng.normal(size=(120, 8)) + 3.0 * i for i in range(4)]  # four distinct clips
    replay = training[2][30:90] + 0.01 * rng.normal(size=(60, 8))  # a part of clip 2, barely changed
    new = rng.normal(size=(60, 8)) + 1.5  # between clips 0 and 1: near neither
    out = copy_check([replay, new], training, ["c0", "c1", "c2", "c3"])
    assert out["reference"] > 0 and out["copies"] == 1
    assert out["samples"][0]["nearest"] == "c2" and out["samples"][0]["copy"]
    assert not out["samples"][1]["copy"]


def test_encodec_latents_are_the_encoder_output_before_quantization():
    model = load_musicgen("tiny", "cpu").musicgen
    wav = torch.randn(1, 32000)
    latents = encodec_latents(model.compression_model, wav, 32000)
    assert latents.shape == (50, 32)  # 50 Hz frames of the tiny EnCodec's 32-dim latent
    with torch.no_grad():
        expected = model.compression_model.encoder(wav[None])[0].T.numpy()
    np.testing.assert_allclose(latents, expected, rtol=1e-6)
    stereo = load_musicgen("tiny-stereo", "cpu").musicgen  # the interleaved stereo wrapper: the inner mono EnCodec
    assert encodec_latents(stereo.compression_model, torch.randn(2, 16000), 16000).shape == (50, 32)


def test_python_m_evaluation_reproduces_the_trainers_validation(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV_MODELS, str(fake_essentia.write_models(tmp_path / "essentia")))  # the stand-in graph
    specs = [{"seconds": 2.5, "freq": 200.0 + 60 * i, "description": f"tone {i}"} for i in range(3)]
    train = make_prepared(tmp_path / "train", specs)
    held = make_prepared(tmp_path / "held", [{"seconds": 3.0, "freq": 290.0, "description": "tone 9"}])
    params = tiny_params(
        train, validation_path=str(held), epochs=1, updates_per_epoch=6, eval_every=3, optimizer="adamw", lr=3e-3
    )
    tar = run_training(params, tmp_path / "out")
    validation = json.loads((tmp_path / "out" / "metrics.json").read_text())["validation"]
    out = tmp_path / "report.json"
    argv = ["--dataset", str(held), "--weights", "tiny", str(tar), "--training", str(train)]
    argv += ["--samples", "2", "--duration", "1", "--segment", "2", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "tiny" in table and "trained_model.tar" in table and "frechet" in table
    report = json.loads(out.read_text())
    base, tuned = report["models"]
    assert report["clips"] == 1 and base["crops"] == tuned["crops"] == 2
    # the same numbers as the training run's evaluations: the base before step 1, the exported (fp16) weights
    assert base["val_loss"] == pytest.approx(validation["base_loss"], rel=1e-5)
    assert tuned["val_loss"] == pytest.approx(validation["best_loss"], abs=2e-3)
    assert tuned["val_loss"] < base["val_loss"] - 0.5
    for row in (base, tuned):
        assert row["frechet"] >= 0 and np.isfinite(row["frechet"]) and len(row["samples"]) == 2
        assert len(row["copy_check"]["samples"]) == 2 and row["copy_check"]["reference"] > 0
        assert row["frechet_effnet"] > 0 and "frechet_effnet_skipped" not in row  # discogs-effnet space
    assert "effnet" in table and f"{tuned['frechet_effnet']:9.3f}" in table
    # the EnCodec distances with their significant digits (these are about 0.003: 3 decimals said 0.003 for both)
    assert all(f" {fmt_distance(row['frechet']):>9s} " in table for row in (base, tuned))
    assert main(["--dataset", str(tmp_path / "missing.zip"), "--weights", "tiny"]) == 2  # names the input


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--duration", "nan"], "--duration"),
        (["--duration", "inf"], "--duration"),
        (["--sampler_precision", "int8", "--device", "cuda"], "sampler_precision"),
    ],
)
def test_python_m_evaluation_refuses_bad_flags_before_loading(tmp_path, capsys, flags, named):
    # the dataset does not exist: a refusal naming the flag proves the check ran before anything was read or loaded
    argv = ["--dataset", str(tmp_path / "missing.zip"), "--weights", "tiny", *flags]
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def test_python_m_evaluation_measures_clap_and_sample_health(tmp_path, capsys):
    """The same weights twice: their samples (the same seeds) are flagged indistinguishable; CLAP prompt adherence,
    Fréchet, KAD and copy check come from the tiny real-format CLAP; every sample has its health flags. Without
    CLAP, the table says it was skipped and why."""
    from core.tiny import tiny_clap
    from evaluation.health import FLAGS

    held = make_prepared(
        tmp_path / "held", [{"seconds": 2.0, "freq": f, "description": f"tone {f}"} for f in (290, 350)]
    )
    train = make_prepared(tmp_path / "train", [{"seconds": 2.0, "freq": f, "description": "t"} for f in (200, 260)])
    out = tmp_path / "report.json"
    argv = ["--dataset", str(held), "--weights", "tiny", "tiny", "--training", str(train), "--samples", "2"]
    argv += ["--duration", "1", "--segment", "2", "--clap", str(tiny_clap()), "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    first, second = report["models"]
    assert report["clap"] == {"source": str(tiny_clap())}
    assert "indistinguishable_from_first" not in first and second["indistinguishable_from_first"] is True
    assert "indistinguishable from tiny" in table and f"clap: {tiny_clap()}" in table
    for row in (first, second):
        assert -1.0 <= row["clap_prompt_adherence"] <= 1.0
        assert row["clap_frechet"] >= 0 and np.isfinite(row["clap_kad"])
        assert len(row["clap_copy_check"]["samples"]) == 2 and row["clap_copy_check"]["reference"] is not None
        for sample in row["samples"]:
            assert set(sample["health_flags"]) <= set(FLAGS) and "spectral_flatness" in sample["health"]
            assert -1.0 <= sample["clap_similarity"] <= 1.0
        assert sum(row["health_flags"].values()) == sum(len(s["health_flags"]) for s in row["samples"])
        assert f"{row['clap_kad']:8.3f}" in table
    assert first["clap_prompt_adherence"] == pytest.approx(second["clap_prompt_adherence"], abs=1e-6)

    (tmp_path / "no-clap").mkdir()
    argv = ["--dataset", str(held), "--weights", "tiny", "--samples", "2", "--duration", "1", "--segment", "2"]
    assert main([*argv, "--clap", str(tmp_path / "no-clap")]) == 0
    table = capsys.readouterr().out
    assert f"clap: skipped ({tmp_path / 'no-clap'} holds no CLAP model" in table
