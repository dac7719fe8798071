"""A checkpoint resumes under FSDP, DDP or one process alike (docs/training.md): torchrun with 2 CPU processes
(gloo), D-Adaptation (the default optimizer) with EMA, a tiny run of 4 steps.

One straight DDP run writes checkpoints at steps 2 and 4. Its step-2 checkpoint is resumed under DDP, under FSDP
and in one process; every resumed run must end where the straight run ended: the same losses, weights, EMA and
D-Adaptation state (one process with the same global batch computes what two do, tests/training/test_distributed.py).
The FSDP resume writes a checkpoint every step, and its step-3 checkpoint (written under FSDP) is resumed under DDP
and in one process in turn.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training.run import run_training

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("keep_global_random_state")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_matrix")
    specs = [{"seconds": 1.2 + 0.1 * i, "freq": 200.0 + 60 * i, "description": f"d{i}"} for i in range(4)]
    dataset = make_prepared(root / "prepared", specs)
    params = tiny_params(
        dataset, batch_size=4, epochs=2, updates_per_epoch=2, save_every=2, sample_duration=0.0, ema=True,
        segment_duration=1.0, parallel="ddp",
    )  # fmt: skip
    run_training(params, root / "ddp", nproc=2)
    return {"params": params, "out": root / "ddp", "root": root}


def _checkpoint(out, step: int) -> dict:
    return ckpt.load_checkpoint(out / "checkpoints" / f"checkpoint-{step:08d}.pt")


def _resume(straight, name: str, source, nproc: int, **changes) -> dict:
    out = straight["root"] / name
    params = dataclasses.replace(straight["params"], resume_from=str(source), **changes)
    run_training(params, out, nproc=nproc)
    return ckpt.load_checkpoint(ckpt.find_checkpoint(out / "checkpoints"))


def _assert_same_end(resumed: dict, reference: dict, atol: float) -> None:
    """The resumed run ended where the straight one did: step count, history, weights, EMA, D-Adaptation."""
    assert resumed["step"] == reference["step"] == 4 and len(resumed["history"]) == 4
    assert all(math.isfinite(h["loss"]) for h in resumed["history"])
    losses = [h["loss"] for h in resumed["history"]]
    assert losses == pytest.approx([h["loss"] for h in reference["history"]], abs=atol)
    assert set(resumed["model"]) == set(reference["model"])
    for k, v in reference["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert len(resumed["ema"]) == len(reference["ema"])
    for i, (a, b) in enumerate(zip(resumed["ema"], reference["ema"], strict=True)):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=lambda m, i=i: f"EMA {i}: {m}")
    ours, theirs = resumed["optimizer"]["param_groups"][0], reference["optimizer"]["param_groups"][0]
    assert float(ours["d"]) == pytest.approx(float(theirs["d"]), rel=1e-4)
    assert ours["k"] == theirs["k"]  # D-Adaptation counted every step once


def test_the_straight_run_moved(straight):
    """What the resumes are compared with is a run whose step 2 and step 4 differ (so resuming matters)."""
    mid, end = _checkpoint(straight["out"], 2), _checkpoint(straight["out"], 4)
    assert mid["world_size"] == end["world_size"] == 2 and mid["params"]["parallel"] == "ddp"
    assert any(not torch.equal(mid["model"][k], v) for k, v in end["model"].items())
    assert any(not torch.equal(a, b) for a, b in zip(mid["ema"], end["ema"], strict=True))


@pytest.mark.parametrize(
    "parallel,nproc,atol",
    [("ddp", 2, 1e-6), ("fsdp", 2, 1e-5), ("ddp", 1, 1e-5)],
    ids=["ddp-to-ddp", "ddp-to-fsdp", "ddp-to-one-process"],
)
def test_a_ddp_checkpoint_resumes_to_the_straight_end(straight, parallel, nproc, atol):
    # the FSDP resume keeps a checkpoint of every step: its step 3 is resumed in the test below
    save_every = 1 if parallel == "fsdp" else 2
    resumed = _resume(
        straight, f"from-ddp-{parallel}-{nproc}", straight["out"] / "checkpoints" / "checkpoint-00000002.pt", nproc,
        parallel=parallel, save_every=save_every,
    )  # fmt: skip
    assert resumed["world_size"] == nproc
    _assert_same_end(resumed, _checkpoint(straight["out"], 4), atol)


@pytest.mark.parametrize("nproc", [2, 1], ids=["fsdp-to-ddp", "fsdp-to-one-process"])
def test_an_fsdp_checkpoint_resumes_to_the_straight_end(straight, nproc):
    source = straight["root"] / "from-ddp-fsdp-2" / "checkpoints" / "checkpoint-00000003.pt"
    if not source.is_file():
        pytest.fail("the ddp-to-fsdp resume above did not leave its step-3 checkpoint")
    written = ckpt.load_checkpoint(source)
    assert written["world_size"] == 2 and written["params"]["parallel"] == "fsdp"
    resumed = _resume(straight, f"from-fsdp-{nproc}", source, nproc, parallel="ddp")
    _assert_same_end(resumed, _checkpoint(straight["out"], 4), 1e-5)
