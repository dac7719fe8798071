"""Multi-node training, proven on loopback: docs/training.md's `torchrun --nnodes 2` command, run as it is written
there by two launchers on this machine (c10d rendezvous on 127.0.0.1, one CPU process each on gloo), trains `tiny`
to the losses and weights of one process with the same global batch."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, free_port
from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training.run import run_training

DOC = ROOT / "docs" / "training.md"


def documented_torchrun() -> str:
    """The multi-node `torchrun` command of docs/training.md (its continuation lines joined), as written there."""
    text = DOC.read_text()
    match = re.search(r"^torchrun --nnodes 2 .*?(?<!\\)$", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no `torchrun --nnodes 2 ...` command in {DOC}"
    return match.group(0).replace("\\\n", " ")


def test_the_documented_command_is_the_one_this_test_runs():
    command = documented_torchrun()
    for part in ("--nproc_per_node $GPUS", "--rdzv_backend c10d", "--rdzv_endpoint $NODE0", "-m training.worker"):
        assert part in command, command
    assert "RUN=/shared/run NODE0=node0:29500 GPUS=8" in DOC.read_text()  # the variables it names, documented


def _launch(command: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(
            ["bash", "-c", command], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.mark.slow
def test_two_nodes_on_loopback_train_to_the_weights_of_one_process(tmp_path):
    run = tmp_path / "run"
    specs = [{"seconds": 2.2 + 0.1 * i, "freq": 200.0 + 60 * i, "description": f"d{i}"} for i in range(4)]
    dataset = make_prepared(run / "work" / "dataset", specs)
    params = tiny_params(dataset, batch_size=4, epochs=1, updates_per_epoch=4, save_every=4, sample_duration=0.0)
    (run / "train_params.json").write_text(json.dumps(dataclasses.asdict(params)))
    env = {
        **os.environ,
        "RUN": str(run),
        "NODE0": f"127.0.0.1:{free_port()}",
        "GPUS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the venv's torchrun
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = documented_torchrun()
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [_launch(command, env, log) for log in logs]
    deadline = time.monotonic() + 400
    try:
        for node in nodes:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
                node.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    # The assertions read the whole logs, the messages only their tails: a launcher that leaves the rendezvous after
    # the store's host has closed it prints a long c10d traceback (a warning; it still exits 0), which pushed the
    # result lines out of a 3000-character tail in CI.
    tails = "\n".join(f"--- {log.name}\n{text[-3000:]}" for log, text in zip(logs, texts, strict=True))
    assert [node.returncode for node in nodes] == [0, 0], tails
    assert any("All 2 ranks hold identical weights" in text for text in texts), tails
    assert (run / "trained_model.tar").is_file()

    run_training(params, tmp_path / "single", nproc=1)
    nodes_state = ckpt.load_checkpoint(ckpt.find_checkpoint(run / "checkpoints"))
    single = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "single" / "checkpoints"))
    assert nodes_state["world_size"] == 2 and single["world_size"] == 1
    assert nodes_state["step"] == single["step"] == 4
    # Within 1e-5, not bitwise: the all-reduce adds the two ranks' half-batch gradients, one process averages the
    # whole batch in one sum; the float rounding differs in the last bits and AdamW carries it through the steps.
    losses = [h["loss"] for h in nodes_state["history"]]
    assert losses == pytest.approx([h["loss"] for h in single["history"]], abs=1e-5)
    for k, v in single["model"].items():
        torch.testing.assert_close(nodes_state["model"][k], v, atol=1e-5, rtol=1e-4)
