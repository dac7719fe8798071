"""`python train.py ... --output_dir`: the same run as `cog train`, stopped by SIGTERM and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from core import weights
from tests.helpers import ROOT
from tests.training.conftest import make_prepared
from training import checkpoint as ckpt

pytestmark = pytest.mark.slow


def wait_for(path, text, proc, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {text!r}:\n{path.read_text()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"no {text!r} after {timeout} s:\n{path.read_text()[-3000:]}")


def signal_after(args: list[str], log, sig: int, text: str, cwd) -> tuple[int, str]:
    """Run a `train.py` command, send it `sig` once `text` is in its output; `(exit code, output)`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_for(log, text, proc)
            proc.send_signal(sig)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    return code, log.read_text()


def test_cli_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    dataset = make_prepared(
        tmp_path / "prepared",
        [{"seconds": 2.5, "description": "calm piano"}, {"seconds": 2.0, "freq": 330.0, "description": "fast drums"}],
    )
    out = tmp_path / "out"
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "--dataset_path",
        str(dataset),
        "--model_version",
        "tiny",
        "--epochs",
        "1",
        "--updates_per_epoch",
        "40",
        "--batch_size",
        "2",
        "--segment_duration",
        "2",
        "--sample_duration",
        "0",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code, text = signal_after(args, tmp_path / "first.log", signal.SIGTERM, "step 1/40", tmp_path)
    assert code == 143, text[-3000:]
    assert "Training stopped by SIGTERM after step" in text and "--resume_from" in text
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and not (out / "trained_model.tar").exists()
    state = ckpt.load_checkpoint(saved[0])
    assert 1 <= state["step"] < 40 and len(state["history"]) == state["step"]

    done = subprocess.run(
        [*args, "--resume_from", str(out / "checkpoints"), "--save_every", "40"],  # a checkpoint of the end too
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resumed at step {state['step']} of 40" in done.stderr
    tar = out / "trained_model.tar"
    with tarfile.open(tar) as archive:
        info = json.load(archive.extractfile("finetune.json"))
    assert info["training"]["steps"] == 40
    assert info["training"]["first_loss"] == pytest.approx(state["history"][0]["loss"])
    loaded = weights.load_trained_model(tar, device="cpu").lm.state_dict()
    final = ckpt.load_checkpoint(ckpt.find_checkpoint(out / "checkpoints"))
    assert final["step"] == 40 and set(loaded) == set(final["model"])
    for k, v in final["model"].items():  # the tar stores the LM in fp16
        assert torch.equal(loaded[k].float(), v.half().float()), k
