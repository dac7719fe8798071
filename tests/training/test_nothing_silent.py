"""Training that cannot silently go wrong (issue 24, training side; issue 19.2 for train.py).

- Validation compared by content: the training tracks given again as validation_path under any name, path or
  container are refused (partly: warned by name), before anything is prepared; a validation set that does not exist
  or holds no audio is refused before the training set is prepared.
- Every check that needs no model runs before any work, and all problems are reported together.
- Resume checkpoints are verified (checksum, the state a resume needs) and a resume on other data is said.
- Settings given but dropped are warned.
- A full disk under the checkpoint writer is one line naming the file, with nothing left under its name.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
import soundfile as sf
import torch

from core.params import InputError
from preprocessing import PrepareParams, prepare
from tests.helpers import ROOT, tone
from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training.evaluate import split_by_track
from training.run import check_inputs, run_training

SR = 32000


def _wav_bytes(freq: float, seed: int, seconds: float = 6.0) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds, SR, 1, freq=freq, seed=seed), SR, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _zip(path: Path, tracks: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in tracks.items():
            archive.writestr(name, data)
    return path


TRACKS = {f"songs/track{i}.wav": _wav_bytes(200.0 + 70 * i, i) for i in range(3)}


# ------------------------------------------------------------------------------------------------ validation leaks


def _same_tracks_as(case: str, upload: Path, tmp_path: Path) -> Path:
    """The training upload given again as validation_path, as each careless case does."""
    if case == "the_upload_twice":  # Cog hands each file input over as its own temp file, without an extension
        return Path(shutil.copyfile(upload, tmp_path / "tmpk3j2_validation"))
    if case == "a_hard_link":
        os.link(upload, tmp_path / "link.zip")
        return tmp_path / "link.zip"
    if case == "another_archive":  # other container, other names, same audio
        other = tmp_path / "same.tar.gz"
        with tarfile.open(other, "w:gz") as archive:
            for i, data in enumerate(TRACKS.values()):
                info = tarfile.TarInfo(f"renamed/{i}.wav")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return other
    assert case == "the_prepared_training_clips"
    prepare(PrepareParams(dataset_path=str(upload), drop_vocals=False, auto_labeling=False), tmp_path / "prepared")
    return tmp_path / "prepared"


@pytest.mark.parametrize("case", ["the_upload_twice", "a_hard_link", "another_archive", "the_prepared_training_clips"])
def test_validating_on_the_training_tracks_is_refused_before_anything_is_prepared(case, tmp_path):
    upload = _zip(tmp_path / "songs.zip", TRACKS)
    validation = _same_tracks_as(case, upload, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        run_training(tiny_params(upload, validation_path=str(validation)), out)
    assert err.value.name == "validation_path", err.value
    assert "every one of its 3 track(s) is also in dataset_path" in str(err.value)
    assert not out.exists()  # refused before the training set was prepared: nothing made


def test_a_partly_shared_validation_set_is_warned_by_track_name(tmp_path, caplog):
    upload = _zip(tmp_path / "songs.zip", TRACKS)
    held_out = _zip(
        tmp_path / "held_out.zip",
        {"a/new.wav": _wav_bytes(700.0, 9), "a/again.wav": TRACKS["songs/track1.wav"]},
    )
    with caplog.at_level(logging.WARNING):
        check_inputs(tiny_params(upload, validation_path=str(held_out)))
    warned = [r.getMessage() for r in caplog.records if "also in dataset_path" in r.getMessage()]
    assert len(warned) == 1 and "1 of its 2 tracks" in warned[0] and "a/again.wav" in warned[0], warned
    assert "a/new.wav" not in warned[0]


@pytest.mark.parametrize("case", ["missing", "no_audio", "not_audio"])
def test_an_unusable_validation_set_is_refused_before_the_training_set_is_prepared(case, tmp_path):
    upload = _zip(tmp_path / "songs.zip", TRACKS)
    validation = tmp_path / "validation.zip"
    if case == "no_audio":
        _zip(validation, {"readme.txt": b"my validation tracks are elsewhere"})
    elif case == "not_audio":
        validation = tmp_path / "notes"
        validation.write_bytes(b"\x00\x01 these are not the tracks you are looking for" * 100)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        run_training(tiny_params(upload, validation_path=str(validation)), out)
    assert err.value.name == "validation_path", err.value
    assert not (out / "work").exists()  # the training set was not prepared


def test_copies_of_a_track_in_one_upload_stay_on_one_side_of_the_split():
    """A track uploaded twice under two names (same bytes, preparation records the source sha256): holding out one
    copy while the other trains would validate on training audio."""

    def clip(name: str, sha: str) -> types.SimpleNamespace:
        info = {"source": name, "source_sha256": sha}
        return types.SimpleNamespace(source=name, info=info, duration=5.0, path=Path(f"{name}.wav"))

    clips = [clip(f"t{i}.wav", f"{i:064x}") for i in range(6)] + [clip("t0 (copy).wav", f"{0:064x}")]
    for seed in range(40):
        split = split_by_track(clips, 0.2, seed)
        sides = {c.source for c in split.validation}
        assert ("t0.wav" in sides) == ("t0 (copy).wav" in sides), (seed, sides)


# ------------------------------------------------------------------------------------------------ fail fast, at once


def _refused_offline(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """train.py on an upload, offline with an empty Hugging Face cache: it must refuse with exit 2, one `error:`
    line and no traceback, leaving no output folder. Returns its stderr and that one line."""
    upload = _zip(tmp_path / "songs.zip", TRACKS)
    env = dict(env if env is not None else os.environ)
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--dataset_path", str(upload), "--output_dir", str(out), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert not out.exists()
    return done.stderr, errors[0]


def test_train_cli_reports_every_missing_piece_at_once_and_leaves_nothing(tmp_path):
    """`--model_version stereo-melody` offline, with no cached model and no demucs weights: one refusal naming both
    (not demucs after the preparation started, then the model after its retries), and no `out/work` left."""
    env = {k: v for k, v in os.environ.items() if k != "MGFT_DEMUCS_REPO"}
    env["TORCH_HOME"] = str(tmp_path / "torch")
    stderr, error = _refused_offline(tmp_path, "--model_version", "stereo-melody", env=env)
    assert "2 problems (ModelUnavailableError)" in error, stderr[-3000:]
    assert "facebook/musicgen-stereo-melody" in stderr and "hf download" in stderr
    assert "htdemucs" in stderr


def test_train_cli_refuses_an_uncached_style_model_before_preparing(tmp_path):
    """`--model_version style` offline with nothing cached: refused at once, naming the model, its text encoder and
    its style feature extractor (MERT) with the download commands; before, the check skipped style models and the
    load failed after the whole preparation."""
    stderr, error = _refused_offline(tmp_path, "--model_version", "style", "--drop_vocals", "false")
    assert "model_version 'style'" in error, stderr[-3000:]
    assert "facebook/musicgen-style" in stderr and "m-a-p/MERT-v1-95M" in stderr and "hf download" in stderr


# ------------------------------------------------------------------------------------------------ checkpoints


def _flip_tensor_byte(path: Path) -> None:
    """Change one byte inside the largest tensor's stored data (not the zip's structure: it still loads)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x5A]))


def test_a_corrupted_checkpoint_is_refused_by_name(tiny_run, tmp_path):
    newest = ckpt.newest_checkpoint(tiny_run["out"] / "checkpoints")
    params = dataclasses.replace(tiny_run["params"], resume_from=str(newest))
    check_inputs(params)  # the intact checkpoint resumes
    damaged = Path(shutil.copyfile(newest, tmp_path / newest.name))
    _flip_tensor_byte(damaged)
    torch.load(damaged, weights_only=True)  # still a loadable file: only its content changed
    with pytest.raises(InputError) as err:
        check_inputs(dataclasses.replace(params, resume_from=str(damaged)))
    assert err.value.name == "resume_from" and f"{damaged.name} is corrupted" in str(err.value)


def test_a_checkpoint_with_the_tag_but_no_state_is_refused_before_preparing(tmp_path):
    upload = _zip(tmp_path / "songs.zip", TRACKS)
    hollow = tmp_path / "checkpoint-00000003.pt"
    torch.save({"format": ckpt.FORMAT, "step": 3}, hollow)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        run_training(tiny_params(upload, resume_from=str(hollow)), out)
    assert err.value.name == "resume_from" and "not the state a resume needs (model, rng" in str(err.value)
    assert not (out / "work").exists()


def _other_tones(folder: Path, freqs: tuple[float, ...]) -> Path:
    return make_prepared(folder, [{"seconds": 3.0, "freq": f, "description": f"tone {f:g}"} for f in freqs])


def test_a_resume_on_other_data_is_said_and_on_another_validation_set_refused(tmp_path, caplog):
    train = _other_tones(tmp_path / "train", (220.0, 330.0))
    validation = _other_tones(tmp_path / "validation", (500.0,))
    params = tiny_params(train, validation_path=str(validation), epochs=1, updates_per_epoch=4, save_every=2)
    run_training(dataclasses.replace(params, sample_duration=0.0), tmp_path / "out")
    resume = dataclasses.replace(params, resume_from=str(tmp_path / "out" / "checkpoints"))

    other_validation = _other_tones(tmp_path / "other_validation", (600.0,))
    with pytest.raises(InputError) as err:
        check_inputs(dataclasses.replace(resume, validation_path=str(other_validation)))
    assert err.value.name == "validation_path" and "mix two validation sets" in str(err.value)

    with pytest.raises(InputError) as err:  # validation_split's share instead of validation_path: another kind
        check_inputs(dataclasses.replace(resume, validation_path=None))
    assert err.value.name == "resume_from" and "mix two validation sets" in str(err.value)

    copy = Path(shutil.copytree(train, tmp_path / "train_copy"))  # the same data elsewhere: nothing to say
    other_train = _other_tones(tmp_path / "other_train", (250.0, 370.0))
    with caplog.at_level(logging.WARNING):
        check_inputs(dataclasses.replace(resume, dataset_path=str(copy)))
        assert not [r for r in caplog.records if "other data" in r.getMessage()]
        check_inputs(dataclasses.replace(resume, dataset_path=str(other_train)))
    said = [r.getMessage() for r in caplog.records if "Resuming on other data" in r.getMessage()]
    assert len(said) == 1 and "dataset_path holds other tracks (2)" in said[0], said


def test_an_explicit_forgetting_check_that_cannot_run_is_warned(two_clips, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        check_inputs(tiny_params(two_clips, validation_split=0.0, forgetting_check="on", class_samples=3))
    warned = [r.getMessage() for r in caplog.records]
    assert any("forgetting_check='on' is ignored: validation is off" in m for m in warned), warned
    assert any("class_samples=3 is ignored: prior_preservation is off" in m for m in warned), warned
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # 2 tracks: validation_split finds no validation set at run time
        run_training(tiny_params(two_clips, forgetting_check="on", epochs=1, updates_per_epoch=1), tmp_path / "out")
    warned = [r.getMessage() for r in caplog.records]
    assert any("forgetting_check='on' is ignored: there is no validation set" in m for m in warned), warned


# ------------------------------------------------------------------------------------------------ a full disk


def _file_size_limit(limit: int):
    def apply() -> None:
        # The writer then gets EFBIG, as on a full disk it gets ENOSPC (SIGXFSZ would kill it instead).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_checkpoint_that_does_not_fit_is_one_line_and_no_file(two_clips, tmp_path):
    """The tiny model's checkpoint is ~8.5 MB, everything else the run writes before it < 1 MB: a 4 MB file size
    limit fails the checkpoint writer (torch.save's RuntimeError), for real."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--dataset_path", str(two_clips), "--model_version", "tiny",
         "--auto_labeling", "false", "--drop_vocals", "false", "--epochs", "1", "--updates_per_epoch", "2",
         "--batch_size", "2", "--segment_duration", "2", "--sample_duration", "0", "--save_every", "1",
         "--output_dir", str(out)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
        preexec_fn=_file_size_limit(4 << 20),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    target = out / "checkpoints" / "checkpoint-00000001.pt"
    assert len(errors) == 1 and f"could not write the resume checkpoint {target}" in errors[0], done.stderr[-3000:]
    assert "Free space" in errors[0]
    assert not list((out / "checkpoints").iterdir())  # neither a truncated checkpoint nor its temp file
