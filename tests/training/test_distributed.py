"""Data parallel training: torchrun with 2 CPU processes (gloo) against one process with the same global batch."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training.loop import plan_run
from training.run import run_training


@pytest.mark.parametrize(
    "batch_size,world_size,accumulation,expected",
    [(16, 8, 1, 16), (4, 8, 1, 8), (1, 2, 1, 2), (3, 2, 1, 4), (6, 2, 2, 8), (16, 1, 1, 16)],
)
def test_global_batch_rounds_up_to_a_multiple_of_the_processes(
    batch_size, world_size, accumulation, expected, tmp_path, caplog
):
    params = tiny_params(tmp_path, batch_size=batch_size, grad_accumulation=accumulation)
    with caplog.at_level(logging.WARNING):
        plan = plan_run(params, n_clips=10, longest_clip_frames=500, frame_rate=50, world_size=world_size, device="cpu")
    assert plan.global_batch == expected
    assert plan.per_rank_micro_batch(world_size) >= 1
    assert (f"batch_size {batch_size} rounded up to {expected}" in caplog.text) == (expected != batch_size)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, capfd):
    specs = [{"seconds": 2.2 + 0.1 * i, "freq": 200.0 + 60 * i, "description": f"d{i}"} for i in range(4)]
    dataset = make_prepared(tmp_path / "prepared", specs)
    params = tiny_params(dataset, batch_size=4, epochs=1, updates_per_epoch=4, save_every=4, sample_duration=0.0)
    run_training(params, tmp_path / "ddp", nproc=2)
    log = capfd.readouterr().err
    assert "All 2 ranks hold identical weights" in log, log[-3000:]
    assert "over 2 process(es)" in log
    run_training(params, tmp_path / "single", nproc=1)
    ddp = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "ddp" / "checkpoints"))
    single = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "single" / "checkpoints"))
    assert ddp["world_size"] == 2 and single["world_size"] == 1 and ddp["step"] == single["step"] == 4
    assert [h["loss"] for h in ddp["history"]] == pytest.approx([h["loss"] for h in single["history"]], abs=1e-5)
    for k, v in single["model"].items():
        torch.testing.assert_close(ddp["model"][k], v, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "ddp" / "trained_model.tar").is_file()
