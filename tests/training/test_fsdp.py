"""FSDP (torch's fully_shard): torchrun with 2 CPU processes (gloo) against one process with the same global batch,
and an FSDP run stopped halfway and resumed against the straight one."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training.dist import DistInfo
from training.fsdp import resolve_parallel
from training.run import run_training


def _dataset(tmp_path):
    specs = [{"seconds": 2.2 + 0.1 * i, "freq": 200.0 + 60 * i, "description": f"d{i}"} for i in range(4)]
    return make_prepared(tmp_path / "prepared", specs)


def _assert_same_run(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a["step"] == b["step"]
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], abs=atol)
    assert set(a["model"]) == set(b["model"])
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize(
    "parallel,version,world_size,expected",
    [
        ("auto", "tiny", 2, "ddp"),
        ("auto", "small", 8, "ddp"),
        ("auto", "medium", 8, "fsdp"),
        ("auto", "stereo-melody-large", 8, "fsdp"),
        ("auto", "melody", 2, "fsdp"),
        ("auto", "large", 1, "single"),
        ("fsdp", "tiny", 2, "fsdp"),
        ("ddp", "large", 8, "ddp"),
        ("fsdp", "tiny", 1, "single"),
    ],
)
def test_auto_picks_fsdp_for_medium_and_large(parallel, version, world_size, expected, caplog):
    with caplog.at_level(logging.INFO):
        assert resolve_parallel(parallel, version, DistInfo(world_size=world_size)) == expected
    if world_size > 1:
        assert f"Data parallelism over {world_size} processes: {expected.upper()}" in caplog.text


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(tmp_path, capfd):
    """Full fine-tune with dadam, gradient clipping and EMA: same losses, weights, optimizer state and EMA."""
    dataset = _dataset(tmp_path)
    params = tiny_params(
        dataset, batch_size=4, epochs=1, updates_per_epoch=4, save_every=4, sample_duration=0.5, ema=True
    )
    run_training(dataclasses.replace(params, parallel="fsdp"), tmp_path / "fsdp", nproc=2)
    log = capfd.readouterr().err
    assert "Data parallelism over 2 processes: FSDP" in log, log[-3000:]
    assert "All 2 ranks hold identical weights" in log, log[-3000:]
    run_training(params, tmp_path / "single", nproc=1)
    sharded = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "fsdp" / "checkpoints"))
    single = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "single" / "checkpoints"))
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    _assert_same_run(sharded, single)
    for a, b in zip(sharded["ema"], single["ema"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the optimizer state is whole, in the single-process layout (a checkpoint resumes under any `parallel`)
    assert sharded["optimizer"]["param_groups"][0]["d"] == pytest.approx(single["optimizer"]["param_groups"][0]["d"])
    # D-Adaptation's own flag is saved as it was under FSDP (loading it elsewhere resets it: the test below)
    assert sharded["optimizer"]["param_groups"][0]["fsdp_in_use"] is True
    for index, state in single["optimizer"]["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(sharded["optimizer"]["state"][index][key], value, atol=1e-5, rtol=1e-3)
    # the export gathered the whole (EMA) LM on rank 0: same fp16 weights in both tars
    from core.weights import read_finetune_info, unpack

    assert read_finetune_info(unpack(tmp_path / "fsdp" / "trained_model.tar"))["training"]["parallel"] == "fsdp"
    exported = torch.load(unpack(tmp_path / "fsdp" / "trained_model.tar") / "state_dict.bin", weights_only=True)
    reference = torch.load(unpack(tmp_path / "single" / "trained_model.tar") / "state_dict.bin", weights_only=True)
    for k, v in reference["best_state"].items():
        torch.testing.assert_close(exported["best_state"][k].float(), v.float(), atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_fsdp_resume_continues_the_same_run(tmp_path):
    """adamw under FSDP: 6 steps straight == 3 steps, stop, resume for the last 3 (from the sharded run's
    checkpoint, gathered whole and sharded again)."""
    dataset = _dataset(tmp_path)
    params = tiny_params(
        dataset,
        batch_size=4,
        epochs=2,
        updates_per_epoch=3,
        save_every=3,
        sample_duration=0.0,
        optimizer="adamw",
        lr=1e-3,
        warmup=1,
        parallel="fsdp",
    )
    run_training(params, tmp_path / "straight", nproc=2)
    mid = tmp_path / "straight" / "checkpoints" / "checkpoint-00000003.pt"
    assert mid.is_file()
    run_training(dataclasses.replace(params, resume_from=str(mid)), tmp_path / "resumed", nproc=2)
    straight = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "straight" / "checkpoints"))
    resumed = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert straight["step"] == resumed["step"] == 6
    _assert_same_run(resumed, straight, atol=1e-6)
    for index, state in straight["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][index]["exp_avg_sq"], state["exp_avg_sq"])


def test_weights_with_fewer_rows_than_processes_are_cut_along_another_dim():
    """Textual inversion trains `[n_trigger_tokens, dim]` rows: cut by rows, a rank would hold nothing (and
    D-Adaptation's sum over ranks would wait for it forever); they are cut along `dim` instead."""
    from torch.distributed.tensor import Shard

    from training.fsdp import _placement_fn

    placement = _placement_fn(8)
    assert placement(torch.nn.Parameter(torch.zeros(1, 64))) == Shard(1)
    assert placement(torch.nn.Parameter(torch.zeros(3, 5, 16))) == Shard(2)
    assert placement(torch.nn.Parameter(torch.zeros(64, 64))) is None  # FSDP's default: rows
    assert placement(torch.nn.Parameter(torch.zeros(3, 5))) is None  # nothing divides: rows, some ranks empty


def test_a_dadam_checkpoint_of_fsdp_steps_in_one_process():
    """D-Adaptation keeps `fsdp_in_use` in its param groups and a checkpoint written under FSDP holds it True:
    loaded as it is by one process, the next step would all-reduce over a process group that is not there."""
    from dadaptation import DAdaptAdam

    from training.parallel import SingleProcess

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    saved = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": DAdaptAdam(model.parameters(), lr=1.0, fsdp_in_use=True).state_dict(),
        "ema": None,
    }
    parallel = SingleProcess(DistInfo())
    parallel.wrap(model, model)
    optimizer = parallel.build_optimizer(lambda tensors, sharded: DAdaptAdam(tensors, lr=1.0, fsdp_in_use=sharded))
    parallel.load(saved, None)
    assert [group["fsdp_in_use"] for group in optimizer.param_groups] == [False]
    before = model.weight.detach().clone()
    model(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.weight, before)
