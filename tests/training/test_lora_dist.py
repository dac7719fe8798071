"""method=lora with several processes and across a resume: torchrun with 2 CPU processes (gloo), DDP and FSDP, ends
with the adapters of a single-process run of the same global batch; a run stopped halfway and resumed ends with
the adapters of the straight run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core import adapters
from core.weights import read_finetune_info, unpack
from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training.run import run_training

pytestmark = pytest.mark.usefixtures("keep_global_random_state")


@pytest.fixture(scope="module")
def lora_params(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_dist")
    specs = [{"seconds": 2.2 + 0.1 * i, "freq": 200.0 + 60 * i, "description": f"d{i}"} for i in range(4)]
    dataset = make_prepared(root / "prepared", specs)
    return tiny_params(
        dataset,
        method="lora",
        lora_rank=4,
        lora_alpha=8.0,
        optimizer="adamw",
        lr=3e-3,
        warmup=1,
        batch_size=4,
        epochs=2,
        updates_per_epoch=3,
        save_every=3,
        sample_duration=0.0,
    )


@pytest.fixture(scope="module")
def single_run(lora_params, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_single")
    run_training(lora_params, out, nproc=1)
    return out


def _adapter_of(checkpoint: dict) -> dict[str, torch.Tensor]:
    return adapters.lora_state_dict(checkpoint["model"])


def _final(out) -> dict:
    return ckpt.load_checkpoint(ckpt.find_checkpoint(out / "checkpoints"))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_two_processes_match_one_process(parallel, lora_params, single_run, tmp_path, capfd):
    out = tmp_path / parallel
    run_training(dataclasses.replace(lora_params, parallel=parallel), out, nproc=2)
    log = capfd.readouterr().err
    assert f"Data parallelism over 2 processes: {parallel.upper()}" in log, log[-3000:]
    assert "All 2 ranks hold identical weights" in log, log[-3000:]
    distributed, single = _final(out), _final(single_run)
    assert distributed["world_size"] == 2 and distributed["step"] == single["step"] == 6
    assert [h["loss"] for h in distributed["history"]] == pytest.approx(
        [h["loss"] for h in single["history"]], abs=1e-5
    )
    trained, reference = _adapter_of(distributed), _adapter_of(single)
    assert trained and set(trained) == set(reference)
    # AdamW moves every weight by about lr whatever its gradient's size: where a gradient is ~0 (cross-attention
    # on a 4-clip LUT vocabulary), summation-order noise between 1 and 2 processes shows up as ~1e-4 in weights
    # of size ~1e-2, while the losses above agree to 1e-5.
    for k, v in reference.items():
        torch.testing.assert_close(trained[k], v, atol=3e-4, rtol=1e-3, msg=lambda m, k=k: f"{k}: {m}")
    # the base weights stayed frozen on every rank: the same as the single run's (= the base model's)
    for k, v in single["model"].items():
        if not adapters.is_adapter_key(k):
            torch.testing.assert_close(distributed["model"][k], v, atol=0, rtol=0)
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k), "the adapters did not train"
    # the tar rank 0 wrote holds the adapter (not a full LM) with the single run's values
    folder, reference_folder = unpack(out / "trained_model.tar"), unpack(single_run / "trained_model.tar")
    assert read_finetune_info(folder)["training"]["parallel"] == parallel
    exported, config = adapters.read_adapter(folder)
    expected, _ = adapters.read_adapter(reference_folder)
    assert config["rank"] == 4 and set(exported) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(exported[k].float(), v.float(), atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_lora_resume_continues_the_same_run(lora_params, single_run, tmp_path):
    """6 steps straight == 3 steps, stop, resume from the step-3 checkpoint for the last 3: same adapters, same
    optimizer state, same losses."""
    mid = single_run / "checkpoints" / "checkpoint-00000003.pt"
    assert mid.is_file()
    run_training(dataclasses.replace(lora_params, resume_from=str(mid)), tmp_path / "resumed", nproc=1)
    straight, resumed = _final(single_run), _final(tmp_path / "resumed")
    assert resumed["step"] == straight["step"] == 6
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-6)
    assert set(_adapter_of(resumed)) == set(_adapter_of(straight))
    for k, v in _adapter_of(straight).items():
        torch.testing.assert_close(_adapter_of(resumed)[k], v, atol=1e-6, rtol=1e-5)
    assert len(resumed["optimizer"]["state"]) == len(_adapter_of(straight))  # only the adapters had an optimizer
    for index, state in straight["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][index]["exp_avg"], state["exp_avg"])
    merged, _ = adapters.read_adapter(unpack(tmp_path / "resumed" / "trained_model.tar"))
    assert merged.keys() == adapters.read_adapter(unpack(single_run / "trained_model.tar"))[0].keys()
