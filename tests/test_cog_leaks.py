"""A long-running Cog server does not fill its disk: nothing accumulates under the temp dir across many requests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import CogServer, data_uri, write_wav
from tests.training.test_cog_train import make_zip

pytestmark = pytest.mark.slow


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def serve(tmp_path: Path, train: bool) -> tuple[CogServer, Path]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # MGFT_CACHE (tiny models, weights) is a cache meant to persist; the temp dir is what must not grow.
    env = {"TMPDIR": str(tmp), "MGFT_PRELOAD": "tiny", "OMP_NUM_THREADS": "1"}
    srv = CogServer(tmp_path, train=train, env=env)
    assert srv.wait_ready()["status"] == "READY", srv.log()[-3000:]
    return srv, tmp


def test_twenty_predictions_leave_no_files_behind(tmp_path):
    audio = data_uri(write_wav(tmp_path / "in.wav", 1.5), "audio/wav")
    srv, tmp = serve(tmp_path, train=False)
    counts = []
    try:
        for i in range(20):
            inputs = {"model_version": "tiny", "prompt": f"take {i}", "duration": 1, "seed": i}
            if i % 4 == 3:  # an uploaded file too (coglet stores it under the temp dir)
                inputs.update(input_audio=audio, continuation=True, duration=2)
            status, body = srv.post("/predictions", {"input": inputs})
            assert status == 200 and body["status"] == "succeeded", body
            counts.append(len(files_under(tmp)))
    finally:
        srv.stop()
    # One request's output lives until the next: the count stays at what one request leaves, whatever the number.
    assert max(counts[1:]) <= max(counts[:4]), (counts, files_under(tmp))


def test_three_trainings_leave_no_files_behind(tmp_path):
    upload = data_uri(make_zip(tmp_path / "dataset.zip"), "application/zip")
    inputs = {"dataset_path": upload, "model_version": "tiny", "auto_labeling": False, "drop_vocals": False,
              "epochs": 1, "updates_per_epoch": 2, "batch_size": 2, "segment_duration": 2.0,
              "sample_duration": 0.0}  # fmt: skip
    srv, tmp = serve(tmp_path, train=True)
    sizes = []
    try:
        for seed in range(3):
            status, body = srv.post("/trainings", {"input": {**inputs, "seed": seed}})
            assert status == 200 and body["status"] == "succeeded", (body.get("error"), srv.log()[-3000:])
            sizes.append(sum(os.path.getsize(tmp / f) for f in files_under(tmp)))
    finally:
        srv.stop()
    assert sizes[2] <= sizes[0] * 1.1, (sizes, files_under(tmp))
