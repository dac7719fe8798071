"""What Cog's `logs` of a prediction and of a training hold: a few KB a person reads, not thousands of redraws of a
progress bar, library warnings nobody can act on, or the same line twice (issue 19, point 3)."""

from __future__ import annotations

import collections
import re

import pytest

from tests.helpers import CogServer, data_uri
from tests.training.test_cog_train import make_zip

pytestmark = pytest.mark.slow

TIME = re.compile(r"^\d\d:\d\d:\d\d ")  # core/logs.py's time stamp: lines differing only by it are repeats
NOISE = ("FutureWarning", "weight_norm", "New pattern", "Using decoupled weight decay", "it/s]", "step/s]")


def repeated_lines(logs: str) -> dict[str, int]:
    counts = collections.Counter(TIME.sub("", line) for line in logs.splitlines() if line.strip())
    return {line: n for line, n in counts.items() if n > 1}


def check_readable(logs: str, max_bytes: int) -> None:
    assert "\r" not in logs, logs[-3000:]  # no progress-bar redraws
    assert len(logs.encode()) <= max_bytes, (len(logs.encode()), logs[-3000:])
    assert not [n for n in NOISE if n in logs], logs[-3000:]
    assert repeated_lines(logs) == {}, logs[-3000:]


def test_a_prediction_logs_a_few_lines(server):
    """Two windows (35 s) of two models (so one of them loads inside the request): progress as a few lines with an
    ETA, the model load and the output, and nothing else."""
    for version in ("tiny-stereo", "tiny"):
        status, body = server.post("/predictions", {"input": {"model_version": version, "duration": 35, "seed": 3}})
        assert status == 200 and body["status"] == "succeeded", body.get("error")
        logs = body["logs"]
        check_readable(logs, max_bytes=4000)
        assert "generating: " in logs and "ETA" in logs and "Wrote " in logs, logs


def test_a_training_logs_a_few_lines(tmp_path):
    """A short `cog train` (D-Adaptation, the default optimizer): its steps, summary and outputs, each said once."""
    inputs = {
        "dataset_path": data_uri(make_zip(tmp_path / "dataset.zip"), "application/zip"),
        "model_version": "tiny",
        "auto_labeling": False,
        "drop_vocals": False,
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
    logs = body["logs"]
    (tmp_path / "training-logs.txt").write_text(logs)
    check_readable(logs, max_bytes=12000)
    assert "step 4/4 loss" in logs, logs[-3000:]
    lines = logs.splitlines()
    # one announcement per output: the tar where it is written, the report in the summary
    assert sum("/trained_model.tar" in line for line in lines) == 1, logs[-3000:]
    assert sum("/report.html" in line for line in lines) == 1, logs[-3000:]
