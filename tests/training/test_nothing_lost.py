"""Issue 12, training and export side: nothing lost, nothing silently wrong.

A finished training survives a failed export (a resume checkpoint that exports without training again); no tar or
checkpoint holds NaN/inf weights; the output folder is checked before any work; Ctrl-C ends like SIGTERM; checkpoints
are the user's files (0644 under the usual umask).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile

import pytest
import torch
from safetensors.torch import save as save_safetensors

from core import weights
from core.errors import InputError
from preprocessing import load_prepared
from tests.helpers import ROOT
from tests.training.conftest import make_prepared, tiny_params
from tests.training.test_train_cli import signal_after
from training import checkpoint as ckpt
from training import export as export_mod
from training import run as run_mod
from training.dist import DistInfo
from training.export import ExportFailed, check_exported_finite
from training.loop import NonFiniteError, TrainingInterrupted, train_loop
from training.methods import MethodExport
from training.run import run_training, setup_training


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("nothing_lost")
    specs = [{"seconds": 2.2, "freq": 220.0, "description": "calm piano"}, {"seconds": 2.1, "description": "drums"}]
    return make_prepared(root / "prepared", specs)


def quick(dataset, **overrides):
    """A few steps of the tiny model, no samples, no checkpoints (the default save_every 0)."""
    values = {"epochs": 1, "updates_per_epoch": 3, "sample_duration": 0.0, "save_every": 0}
    values.update(overrides)
    return tiny_params(dataset, **values)


def after_training(monkeypatch, action):
    """Run `action(output_dir, result)` between the end of the training and the export: the disk or folder
    changes after the start-of-run checks passed (a full disk, a folder made read-only meanwhile)."""
    original = run_mod.train_loop

    def wrapped(lm, tokens, params, plan, dist, checkpoint_dir, **kw):
        result = original(lm, tokens, params, plan, dist, checkpoint_dir, **kw)
        action(checkpoint_dir.parent, result)
        return result

    monkeypatch.setattr(run_mod, "train_loop", wrapped)


def make_unwritable(folder) -> bool:
    """Make `folder` refuse new files, even for root (chattr +i) where chmod cannot; False if nothing works here."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
    else:
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


def make_writable(folder) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def tar_weights(tar):
    return weights.load_trained_model(tar, device="cpu").lm.state_dict()


# ------------------------------------------------------------------------------------------------ output_dir


def test_output_dir_that_is_a_file_is_refused_before_any_work(clips, tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(InputError) as err:
        run_training(quick(clips), target)
    assert err.value.name == "output_dir" and "is a file" in str(err.value) and str(target) in str(err.value)
    assert target.read_text() == "not a folder"


def test_output_dir_that_cannot_be_created_is_refused(clips, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError) as err:
        run_training(quick(clips), tmp_path / "file" / "out")
    assert err.value.name == "output_dir" and "cannot create" in str(err.value)


@pytest.mark.parametrize("sub", ["checkpoints", "work", "cache"])
def test_a_file_in_the_way_of_a_folder_the_trainer_writes_is_refused(clips, tmp_path, sub):
    out = tmp_path / "out"
    out.mkdir()
    (out / sub).write_text("mine")
    with pytest.raises(InputError) as err:
        run_training(quick(clips), out)
    assert err.value.name == "output_dir" and f"{out / sub} is a file" in str(err.value)
    assert (out / sub).read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [sub]


def test_tar_path_that_is_a_folder_is_refused_before_training(clips, tmp_path):
    out = tmp_path / "out"
    (out / "trained_model.tar").mkdir(parents=True)
    with pytest.raises(InputError) as err:
        run_training(quick(clips), out)
    assert err.value.name == "output_dir" and "trained_model.tar is a folder" in str(err.value)
    assert not (out / "work").exists()  # nothing was prepared


@pytest.mark.parametrize("which", ["output_dir", "checkpoints"])
def test_read_only_output_folders_are_refused_before_any_work(clips, tmp_path, which):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    folder = out if which == "output_dir" else out / "checkpoints"
    if not make_unwritable(folder):
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    try:
        with pytest.raises(InputError) as err:
            run_training(quick(clips), out)
    finally:
        make_writable(folder)
    assert err.value.name == "output_dir" and f"{folder} is not writable" in str(err.value)
    assert not (out / "work").exists()


def test_cli_output_dir_a_file_is_one_line_exit_2(clips, tmp_path):
    target = tmp_path / "out"
    target.write_text("x")
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--dataset_path", str(clips), "--model_version", "tiny",
         "--drop_vocals", "false", "--output_dir", str(target)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'output_dir'" in errors[0] and "is a file" in errors[0]
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------ failed export


def test_failed_export_keeps_the_training_and_resume_exports_without_training(clips, tmp_path, monkeypatch, caplog):
    """Default save_every 0: the tar path became a folder after the checks (the write fails with an OSError). The
    finished state is kept in output_dir/checkpoints, and resuming it exports the same weights with no step."""
    out = tmp_path / "out"
    params = quick(clips)
    trained = {}

    def block_the_tar(output_dir, result):
        trained["state"] = {k: v.detach().clone() for k, v in result.state_dict.items()}
        (output_dir / "trained_model.tar").mkdir()

    after_training(monkeypatch, block_the_tar)
    with pytest.raises(ExportFailed) as err:
        run_training(params, out)
    message = str(err.value)
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert [p.name for p in saved] == ["checkpoint-00000003.pt"]
    assert err.value.name == "output_dir" and "after the training finished (3 steps)" in message
    assert "IsADirectoryError" in message and f"make {out} writable" in message
    assert str(saved[0]) in message and f"--resume_from {out / 'checkpoints'}" in message
    state = ckpt.load_checkpoint(saved[0])
    assert state["step"] == 3 and len(state["history"]) == 3 and state["finished"] is True
    for k, v in trained["state"].items():
        assert torch.equal(state["model"][k], v.cpu())
    assert oct(stat.S_IMODE(saved[0].stat().st_mode)) == oct(0o666 & ~ckpt.current_umask())

    # fixed: resume the kept checkpoint -> the export only (no training step: the loss history is the same)
    monkeypatch.undo()
    (out / "trained_model.tar").rmdir()
    caplog.set_level("INFO")
    caplog.clear()
    tar = run_training(quick(clips, resume_from=str(out / "checkpoints")), out)
    assert "already completed all 3 steps: nothing left to train, exporting its weights" in caplog.text
    assert "step 1/3" not in caplog.text
    with tarfile.open(tar) as archive:
        info = json.load(archive.extractfile("finetune.json"))
    assert info["training"]["steps"] == 3 and info["training"]["final_loss"] == state["history"][-1]["loss"]
    exported = tar_weights(tar)
    for k, v in trained["state"].items():
        torch.testing.assert_close(exported[k], v.cpu().half().float(), rtol=0, atol=0)


def test_full_disk_with_checkpoints_unwritable_keeps_the_state_in_a_temp_folder(clips, tmp_path, monkeypatch):
    """The disk is full when the tar is written (ENOSPC), and output_dir/checkpoints cannot take the rescue either:
    it goes to a new temporary folder, named in the message, and resuming from there exports."""
    out = tmp_path / "out"
    fallback_root = tmp_path / "tmp"
    fallback_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fallback_root))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def checkpoints_blocked(output_dir, result):
        (output_dir / "checkpoints").write_text("in the way")

    monkeypatch.setattr(export_mod.weights, "write_trained_model", full_disk)
    after_training(monkeypatch, checkpoints_blocked)
    with pytest.raises(ExportFailed) as err:
        run_training(quick(clips), out)
    kept = list(fallback_root.glob("musicgen-ft-checkpoints-*/checkpoint-00000003.pt"))
    assert len(kept) == 1 and str(kept[0]) in str(err.value) and "No space left on device" in str(err.value)
    assert not (out / "trained_model.tar").exists()

    monkeypatch.undo()
    (out / "checkpoints").unlink()
    tar = run_training(quick(clips, resume_from=str(kept[0].parent)), out)
    assert tar.is_file() and tar_weights(tar)


def test_read_only_output_dir_after_training_keeps_the_state(clips, tmp_path, monkeypatch):
    """A real read-only folder (not a simulated error): output_dir stops taking files after the checks."""
    out = tmp_path / "out"
    fallback_root = tmp_path / "tmp"
    fallback_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fallback_root))
    locked = []

    def lock(output_dir, result):
        if make_unwritable(output_dir):
            locked.append(output_dir)

    after_training(monkeypatch, lock)
    try:
        with pytest.raises(ExportFailed) as err:
            run_training(quick(clips), out)
    except pytest.fail.Exception:
        if not locked:
            pytest.skip("cannot make a folder read-only here (root without chattr)")
        raise
    finally:
        for folder in locked:
            make_writable(folder)
    assert locked
    kept = list(fallback_root.glob("musicgen-ft-checkpoints-*/checkpoint-00000003.pt"))
    assert len(kept) == 1 and str(kept[0]) in str(err.value)
    assert ckpt.load_checkpoint(kept[0])["step"] == 3


def test_ctrl_c_during_the_export_keeps_the_state_and_exits_130(clips, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod.weights, "write_trained_model", ctrl_c)
    with pytest.raises(TrainingInterrupted) as err:
        run_training(quick(clips), out)
    assert err.value.exit_code == 130
    assert "Ctrl-C stopped the export after the training finished (3 steps)" in str(err.value)
    assert str(out / "checkpoints" / "checkpoint-00000003.pt") in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_any_other_export_failure_keeps_the_state_and_says_where(clips, tmp_path, monkeypatch):
    """Not a disk error (here: out of memory while generating the samples): the error itself goes on, with a note
    naming the kept checkpoint."""
    out = tmp_path / "out"

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(export_mod, "generate_samples", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as err:
        run_training(quick(clips, sample_duration=0.5), out)
    kept = out / "checkpoints" / "checkpoint-00000003.pt"
    assert kept.is_file() and ckpt.load_checkpoint(kept)["finished"] is True
    assert any(str(kept) in note and "--resume_from" in note for note in err.value.__notes__)


def test_export_with_a_save_every_checkpoint_points_at_it(clips, tmp_path, monkeypatch):
    """save_every already wrote the last step: that checkpoint is named, no second copy is written."""
    out = tmp_path / "out"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_mod.weights, "write_trained_model", full_disk)
    with pytest.raises(ExportFailed) as err:
        run_training(quick(clips, save_every=2), out)
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names == ["checkpoint-00000002.pt", "checkpoint-00000003.pt"]
    assert str(out / "checkpoints" / "checkpoint-00000003.pt") in str(err.value)
    assert "finished" not in ckpt.load_checkpoint(out / "checkpoints" / "checkpoint-00000003.pt")  # the loop's own


# ------------------------------------------------------------------------------------------------ finite weights


def test_non_finite_weights_are_not_exported_and_the_last_finite_checkpoint_is_named(clips, tmp_path, monkeypatch):
    out = tmp_path / "out"
    poisoned = {}

    def poison(output_dir, result):
        name = next(k for k, v in result.state_dict.items() if v.is_floating_point() and v.numel() > 1)
        result.state_dict[name].view(-1)[:2] = float("nan")
        poisoned["name"] = name

    after_training(monkeypatch, poison)
    with pytest.raises(NonFiniteError) as err:
        run_training(quick(clips, updates_per_epoch=4, save_every=2, sample_duration=0.5), out)
    message = str(err.value)
    assert f"after step 4 (the last): '{poisoned['name']}' (state_dict.bin) holds 2 NaN of" in message
    assert "no trained_model.tar was written" in message and "Lower lr" in message
    # the newest checkpoint (step 4, written by the loop before the weights were poisoned here) is named
    assert str(out / "checkpoints" / "checkpoint-00000004.pt") in message
    assert not (out / "trained_model.tar").exists() and not list(out.glob(".trained_model-*"))


def test_weights_past_the_fp16_range_are_refused(tmp_path):
    """state_dict.bin stores fp16: a finite 1e5 would be inf in the tar."""
    big = MethodExport(state_dict={"w": torch.tensor([1.0, 1e5]), "steps": torch.tensor([3])})
    with pytest.raises(NonFiniteError, match=r"'w' \(state_dict.bin\) holds 1 inf of 2 values once stored in fp16"):
        check_exported_finite(big, 7, tmp_path / "none")
    check_exported_finite(MethodExport(state_dict={"w": torch.tensor([1.0, 6e4])}), 7, None)  # in range


def test_adapter_tensors_are_checked_too(tmp_path):
    data = save_safetensors({"layer.lora_A": torch.tensor([0.5, float("nan")], dtype=torch.float16)})
    adapter = MethodExport(state_dict={}, extra_files={"adapter.safetensors": data})
    with pytest.raises(NonFiniteError, match=r"'layer.lora_A' \(adapter.safetensors\) holds 1 NaN of 2"):
        check_exported_finite(adapter, 5, None)


def test_a_checkpoint_with_non_finite_weights_is_never_written(clips, tmp_path):
    """Weights that went NaN (the loss of that step was still finite) are refused by the periodic checkpoint, so
    the newest checkpoint on disk is the last finite state, and the error names it."""
    params = quick(clips, updates_per_epoch=6, save_every=2)
    setup = setup_training(params, load_prepared(clips), tmp_path / "work", DistInfo())
    lm = setup.model.lm
    name = "condition_provider.conditioners.description.embed.weight"

    def poison_at_step_4(metrics):
        if metrics["step"] == 4:
            with torch.no_grad():
                dict(lm.named_parameters())[name][-1] = float("nan")  # after step 4's update, before its checkpoint

    with pytest.raises(NonFiniteError) as err:
        train_loop(lm, setup.tokens, params, setup.plan, DistInfo(), tmp_path / "ck", on_metrics=poison_at_step_4)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "ck")] == ["checkpoint-00000002.pt"]
    assert f"diverged at step 4: the weights are not finite ('{name}' holds" in str(err.value)
    assert str(tmp_path / "ck" / "checkpoint-00000002.pt") in str(err.value)


# ------------------------------------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_in_the_loop_saves_and_raises_the_one_line_interrupt(clips, tmp_path):
    params = quick(clips, updates_per_epoch=10)
    setup = setup_training(params, load_prepared(clips), tmp_path / "work", DistInfo())

    def ctrl_c_at_step_3(metrics):
        if metrics["step"] == 3:
            raise KeyboardInterrupt

    folder = tmp_path / "checkpoints"
    with pytest.raises(TrainingInterrupted) as err:
        train_loop(setup.model.lm, setup.tokens, params, setup.plan, DistInfo(), folder, on_metrics=ctrl_c_at_step_3)
    assert err.value.exit_code == 130 and err.value.__suppress_context__
    assert str(err.value) == (
        f"Training stopped by Ctrl-C after step 3; resume checkpoint: {folder / 'checkpoint-00000003.pt'}. "
        f"Continue with the same inputs and --resume_from {folder} (Cog: resume_from=<that file>)"
    )


@pytest.mark.parametrize("presses,stopped_after", [(1, 2), (2, 2)])
def test_sigint_finishes_the_step_and_a_second_one_stops_at_once(clips, tmp_path, presses, stopped_after):
    """A real SIGINT in this process: the first one lets step 2 finish and checkpoints it (like SIGTERM); the second
    one, sent right after, stops at once (KeyboardInterrupt), still keeping the completed steps."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    params = quick(clips, updates_per_epoch=10)
    setup = setup_training(params, load_prepared(clips), tmp_path / "work", DistInfo())

    def ctrl_c_at_step_2(metrics):
        if metrics["step"] == 2:
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)

    folder = tmp_path / "checkpoints"
    with pytest.raises(TrainingInterrupted) as err:
        train_loop(setup.model.lm, setup.tokens, params, setup.plan, DistInfo(), folder, on_metrics=ctrl_c_at_step_2)
    assert err.value.exit_code == 130
    assert str(err.value).startswith(f"Training stopped by Ctrl-C after step {stopped_after}; resume checkpoint: ")
    assert [p.name for p in ckpt.list_checkpoints(folder)] == [f"checkpoint-{stopped_after:08d}.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back after the loop


def test_ctrl_c_before_any_step_says_there_is_nothing_to_resume(clips, tmp_path):
    params = quick(clips)
    setup = setup_training(params, load_prepared(clips), tmp_path / "work", DistInfo())
    lm = setup.model.lm

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    lm.compute_predictions = ctrl_c  # the first forward
    with pytest.raises(TrainingInterrupted) as err:
        train_loop(lm, setup.tokens, params, setup.plan, DistInfo(), tmp_path / "checkpoints")
    assert err.value.exit_code == 130
    assert "after step 0, with no checkpoint of it (no step completed)" in str(err.value)
    assert "there is no resume checkpoint" in str(err.value)
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == []


@pytest.mark.slow
def test_cli_ctrl_c_saves_a_checkpoint_prints_one_line_and_exits_130(tmp_path):
    """A real train.py process and a real SIGINT (what Ctrl-C sends), like the SIGTERM test; then resume."""
    dataset = make_prepared(
        tmp_path / "prepared",
        [{"seconds": 2.5, "description": "calm piano"}, {"seconds": 2.0, "freq": 330.0, "description": "fast drums"}],
    )
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "train.py"), "--dataset_path", str(dataset), "--model_version", "tiny",
            "--epochs", "1", "--updates_per_epoch", "40", "--batch_size", "2", "--segment_duration", "2",
            "--sample_duration", "0", "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code, text = signal_after(args, tmp_path / "first.log", signal.SIGINT, "step 1/40", tmp_path)
    assert code == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "Training stopped by Ctrl-C after step" in lines[0], text[-3000:]
    assert f"--resume_from {out / 'checkpoints'}" in lines[0]
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and str(saved[0]) in lines[0] and not (out / "trained_model.tar").exists()
    state = ckpt.load_checkpoint(saved[0])
    assert 1 <= state["step"] < 40 and len(state["history"]) == state["step"]

    done = subprocess.run(
        [*args, "--resume_from", str(out / "checkpoints")], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resumed at step {state['step']} of 40" in done.stderr
    assert (out / "trained_model.tar").is_file()


# ------------------------------------------------------------------------------------------------ file modes


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_are_0644_subject_to_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = ckpt.save_checkpoint(tmp_path / "ck", 1, {"model": {"w": torch.zeros(2)}})
    finally:
        os.umask(previous)
    assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(mode)
    assert ckpt.load_checkpoint(path)["model"]["w"].shape == (2,)
