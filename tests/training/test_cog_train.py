"""`cog train` end to end: the real Cog server in train mode, a zip upload, weights out, a predict server on them."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
import soundfile as sf
import torch

from core import weights
from tests.helpers import CogServer, data_uri, decode_data_uri, tone

pytestmark = pytest.mark.slow


def make_zip(path, sr=44100):
    """Two tracks (one stereo flac at 44.1 kHz, one mono wav) with a description text file for one."""
    with zipfile.ZipFile(path, "w") as z:
        for name, channels, fmt, freq in (("songs/a.flac", 2, "FLAC", 220.0), ("songs/b.wav", 1, "WAV", 330.0)):
            buffer = io.BytesIO()
            sf.write(buffer, tone(5.5, sr, channels, freq=freq), sr, format=fmt)
            z.writestr(name, buffer.getvalue())
        z.writestr("songs/b.txt", "warm bass groove")
    return path


def test_cog_train_then_predict_with_the_weights(tmp_path):
    upload = make_zip(tmp_path / "dataset.zip")
    held_out = tmp_path / "held_out.zip"  # validation_path: one other track, so the log has a validation headline
    with zipfile.ZipFile(held_out, "w") as z:
        buffer = io.BytesIO()
        sf.write(buffer, tone(5.5, 32000, 1, freq=275.0), 32000, format="WAV")
        z.writestr("c.wav", buffer.getvalue())
    inputs = {
        "dataset_path": data_uri(upload, "application/zip"),
        "validation_path": data_uri(held_out, "application/zip"),
        "model_version": "tiny",
        "auto_labeling": False,
        "drop_vocals": False,
        "trigger": "sks",
        "epochs": 1,
        "updates_per_epoch": 4,
        "batch_size": 2,
        "segment_duration": 2.0,
        "sample_duration": 0.5,
    }
    trainer = CogServer(tmp_path, train=True)
    try:
        assert trainer.wait_ready()["status"] == "READY", trainer.log()[-3000:]
        status, body = trainer.post("/trainings", {"input": inputs})
    finally:
        trainer.stop()
    assert status == 200 and body["status"] == "succeeded", (body.get("error"), trainer.log()[-4000:])
    logs = body["logs"]  # the training's progress and summary reach Cog's logs (logging configured in train())
    assert "step 1/4 loss" in logs and "step 4/4 loss" in logs and "ETA" in logs, logs[-3000:]
    assert "Training tiny (full) on" in logs and "Wrote" in logs, logs[-3000:]
    # the last lines: where the report is, and its headline (train.py, training/report.py: summary_lines)
    assert "/report.html (also report.html inside trained_model.tar)" in logs, logs[-3000:]
    headline = next(line for line in logs.splitlines() if "Result: validation loss" in line)
    assert "(base) -> " in headline and "(fine-tuned, exported step " in headline, headline
    tar = tmp_path / "trained_model.tar"
    tar.write_bytes(decode_data_uri(body["output"]["weights"]))
    with tarfile.open(tar) as archive:
        info = json.load(archive.extractfile("finetune.json"))
    assert info["base_model"] == "tiny" and info["trigger"] == "sks"
    assert info["descriptions"] == ["sks", "sks, warm bass groove"]  # the trigger word leads every description
    loaded = weights.load_trained_model(tar, device="cpu").lm.state_dict()
    stored = torch.load(weights.unpack(tar) / "state_dict.bin", weights_only=True)["best_state"]
    assert set(loaded) == set(stored)  # predict's loader holds exactly the weights the training wrote
    assert all(torch.equal(loaded[k].float(), v.float()) for k, v in stored.items())

    predictor = CogServer(tmp_path, env={"COG_WEIGHTS": str(tar), "MGFT_PRELOAD": ""})
    try:
        assert predictor.wait_ready()["status"] == "READY", predictor.log()[-3000:]
        status, body = predictor.post("/predictions", {"input": {"prompt": "sks, warm bass groove", "duration": 1}})
    finally:
        predictor.stop()
    assert body["status"] == "succeeded", (body.get("error"), predictor.log()[-4000:])
    output = body["output"]  # one file, as every MusicGen on Replicate returns
    audio, sr = sf.read(io.BytesIO(decode_data_uri(output)), always_2d=True)
    assert sr == 32000 and audio.shape == (32000, 1) and np.abs(audio).max() > 0


def test_cog_train_refuses_bad_inputs_naming_them(tmp_path):
    trainer = CogServer(tmp_path, train=True)
    try:
        assert trainer.wait_ready()["status"] == "READY", trainer.log()[-3000:]
        _, body = trainer.post("/trainings", {"input": {"dataset_path": "x.zip", "optimizer": "adamw", "lr": 1}})
        missing_status, missing = trainer.post("/trainings", {"input": {"model_version": "tiny"}})
    finally:
        trainer.stop()
    assert body["status"] == "failed" and "'lr'" in body["error"] and "1e-5" in body["error"]
    # The one required input: refused by coglet with the schema `cog build` writes, naming it.
    assert missing_status == 422 and "dataset_path" in json.dumps(missing), missing
