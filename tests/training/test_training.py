"""The training loop end to end on the tiny models: loss, weights out, resume, accumulation, EMA, divergence."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from core import weights
from core.versions import load_musicgen
from preprocessing import load_prepared
from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training.dist import DistInfo
from training.loop import NonFiniteError, train_loop
from training.params import EMA_DECAY
from training.run import run_training, setup_training


def final_checkpoint(out):
    return ckpt.load_checkpoint(ckpt.find_checkpoint(out / "checkpoints"))


def test_loss_goes_down_overfitting_two_clips(tiny_run):
    history = final_checkpoint(tiny_run["out"])["history"]
    losses = [h["loss"] for h in history]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
    for h in history:  # everything the loop logs
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb", "dadapt_d"} <= set(h)
        assert h["tokens_per_s"] > 0 and h["peak_memory_mb"] > 0
    # D-Adaptation finds its step size: d grows from its tiny initial value
    assert history[-1]["dadapt_d"] > 100 * history[0]["dadapt_d"]


def test_checkpoints_keep_the_last_two(tiny_run):
    names = [p.name for p in ckpt.list_checkpoints(tiny_run["out"] / "checkpoints")]
    assert names == ["checkpoint-00000020.pt", "checkpoint-00000030.pt"]
    assert not list((tiny_run["out"] / "checkpoints").glob(".*"))  # no temporary leftovers


def test_trained_model_tar_loads_and_generates(tiny_run):
    tar = tiny_run["tar"]
    with tarfile.open(tar) as archive:
        names = archive.getnames()
        info = json.load(archive.extractfile("finetune.json"))
        png = archive.extractfile("loss.png").read()
        samples = [archive.extractfile(f"samples/sample_{i}.wav").read() for i in range(2)]
    assert {"state_dict.bin", "compression_state_dict.bin", "finetune.json", "loss.png"} <= set(names)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    for data in samples:
        audio, sr = sf.read(io.BytesIO(data))
        assert sr == 32000 and len(audio) == 16000 and np.abs(audio).max() > 0
    assert info["base_model"] == "tiny" and info["method"] == "full" and info["model_version"] == "tiny"
    assert info["training_inputs"]["epochs"] == 2 and info["training_inputs"]["dataset_path"] == "prepared"
    assert info["labels"] == {"genre": ["jazz", "rock"], "moods": ["calm", "energetic"]}
    assert info["descriptions"] == ["calm piano", "fast drums"]
    assert [s["description"] for s in info["samples"]] == ["calm piano", "fast drums"]
    assert info["training"]["steps"] == 30 and info["training"]["final_loss"] < info["training"]["first_loss"]

    # predict.py's loader and audiocraft's own loader both take it
    model = weights.load_trained_model(tar, device="cpu").musicgen
    model.set_generation_params(duration=0.5, top_k=50)
    wav = model.generate(["calm piano"])
    assert wav.shape == (1, 1, 16000) and torch.isfinite(wav).all()
    from audiocraft.models import MusicGen

    folder = weights.unpack(tar)
    theirs = MusicGen.get_pretrained(str(folder), device="cpu").lm.state_dict()
    trained = final_checkpoint(tiny_run["out"])["model"]  # step 30, the weights the tar exports (no EMA)
    assert set(theirs) == set(model.lm.state_dict()) == set(trained)
    for k, v in model.lm.state_dict().items():
        assert torch.equal(theirs[k].float(), v.float()) and torch.equal(v.float(), trained[k].half().float()), k
    # the LM changed (fp16 export of the trained weights), the compression model did not
    base = load_musicgen("tiny", "cpu").musicgen
    trained = model.lm.state_dict()
    changed = [k for k, v in base.lm.state_dict().items() if not torch.equal(v.half().float(), trained[k].float())]
    assert len(changed) > len(trained) // 2
    for k, v in base.compression_model.state_dict().items():
        assert torch.equal(v, model.compression_model.state_dict()[k])


def test_resume_continues_the_same_run(tiny_run, tmp_path):
    """Stop at step 20 of 30 and resume: the same losses and the same final weights as the straight run."""
    straight = final_checkpoint(tiny_run["out"])
    mid = tiny_run["out"] / "checkpoints" / "checkpoint-00000020.pt"
    params = dataclasses.replace(tiny_run["params"], resume_from=str(mid), sample_duration=0.0)
    run_training(params, tmp_path / "resumed")
    resumed = final_checkpoint(tmp_path / "resumed")
    assert resumed["step"] == straight["step"] == 30
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-5)
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, atol=1e-6, rtol=1e-5)
    assert resumed["optimizer"]["param_groups"][0]["d"] == pytest.approx(straight["optimizer"]["param_groups"][0]["d"])


@pytest.fixture(scope="module")
def four_clips(tmp_path_factory):
    """Four clips, all at least as long as the crop: every example has the same number of valid tokens."""
    root = tmp_path_factory.mktemp("four")
    specs = [{"seconds": 2.2 + 0.1 * i, "freq": 200.0 + 60 * i, "description": f"d{i}"} for i in range(4)]
    make_prepared(root / "prepared", specs)
    return root / "prepared"


@pytest.fixture(scope="module")
def shared_work(tmp_path_factory):
    """One output folder for the tests below: its token cache is filled once."""
    return tmp_path_factory.mktemp("work")


def train_direct(dataset, work, tmp_path, **overrides):
    """setup_training + train_loop in this process (what run_worker does, without export)."""
    params = tiny_params(dataset, **overrides)
    setup = setup_training(params, load_prepared(dataset), work, DistInfo())
    result = train_loop(setup.model.lm, setup.tokens, params, setup.plan, DistInfo(), tmp_path / "checkpoints")
    return setup.model.lm, result


def test_gradient_accumulation_matches_the_full_batch(four_clips, shared_work, tmp_path):
    common = {"batch_size": 4, "epochs": 1, "updates_per_epoch": 3, "cfg_p": 0.0, "optimizer": "adamw", "lr": 1e-3}
    _, full = train_direct(four_clips, shared_work, tmp_path / "a", grad_accumulation=1, **common)
    _, accumulated = train_direct(four_clips, shared_work, tmp_path / "b", grad_accumulation=2, **common)
    assert [h["loss"] for h in accumulated.history] == pytest.approx([h["loss"] for h in full.history], abs=1e-5)
    for k, v in full.state_dict.items():
        torch.testing.assert_close(accumulated.state_dict[k], v, atol=1e-5, rtol=1e-4)


def test_ema_weights_are_exported(four_clips, shared_work, tmp_path):
    snapshots = []
    lm_holder = {}

    def remember(metrics):
        snapshots.append({k: v.detach().clone() for k, v in lm_holder["lm"].named_parameters()})

    params = tiny_params(four_clips, epochs=1, updates_per_epoch=3, ema=True, optimizer="adamw", lr=1e-3)
    setup = setup_training(params, load_prepared(four_clips), shared_work, DistInfo())
    lm_holder["lm"] = setup.model.lm
    initial = {k: v.detach().clone() for k, v in setup.model.lm.named_parameters()}
    lm, tokens, plan = setup.model.lm, setup.tokens, setup.plan
    result = train_loop(lm, tokens, params, plan, DistInfo(), tmp_path / "ck", on_metrics=remember)
    assert len(snapshots) == 3
    for name, w0 in initial.items():
        expected = w0
        for snap in snapshots:
            expected = EMA_DECAY * expected + (1 - EMA_DECAY) * snap[name]
        torch.testing.assert_close(result.state_dict[name], expected, atol=1e-6, rtol=1e-5)
        assert not torch.equal(result.state_dict[name], snapshots[-1][name]) or torch.equal(w0, snapshots[-1][name])


def test_non_finite_loss_stops_naming_the_step_and_saves_nothing(four_clips, shared_work, tmp_path):
    params = tiny_params(four_clips, epochs=1, updates_per_epoch=3, save_every=1)
    setup = setup_training(params, load_prepared(four_clips), shared_work, DistInfo())
    with torch.no_grad():
        next(setup.model.lm.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="step 1: the loss is nan"):
        train_loop(setup.model.lm, setup.tokens, params, setup.plan, DistInfo(), tmp_path / "checkpoints")
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == []


def test_a_cancel_between_steps_saves_the_completed_steps(four_clips, shared_work, tmp_path):
    """Cog cancels by raising CancelationException (a BaseException) in the training thread: it goes on as itself
    after the checkpoint. (Ctrl-C, which becomes a one-line TrainingInterrupted: tests/training/test_nothing_lost.py)"""
    from coglet import CancelationException

    params = tiny_params(four_clips, epochs=1, updates_per_epoch=10, save_every=0)
    setup = setup_training(params, load_prepared(four_clips), shared_work, DistInfo())

    def cancel_at_step_3(metrics):
        if metrics["step"] == 3:
            raise CancelationException()

    with pytest.raises(CancelationException):
        train_loop(
            setup.model.lm,
            setup.tokens,
            params,
            setup.plan,
            DistInfo(),
            tmp_path / "checkpoints",
            on_metrics=cancel_at_step_3,
        )
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == ["checkpoint-00000003.pt"]
    state = ckpt.load_checkpoint(saved[0])
    for k, v in setup.model.lm.state_dict().items():
        assert torch.equal(state["model"][k], v)
