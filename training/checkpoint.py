"""Resume checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint is one file `checkpoint-<step>.pt` (step = optimizer steps done) holding plain containers only
(loads with `weights_only=True`): the LM weights (fp32), optimizer and loss-scaler state, EMA weights, the
condition-dropout RNG states, torch's RNG state, the loss history and the training inputs. It is written to a
temporary file and renamed, so a crash never leaves a truncated checkpoint under the final name; the newest
`KEEP` are kept. A full disk (or any failed write) is one `DiskError` naming the file.

Each checkpoint carries `sha256`, a digest of everything else it holds (every tensor's bytes, dtype and shape, and
the plain values), as the weights tar carries its members' (core/weights.py): a resume recomputes it and refuses a
checkpoint whose content changed since it was written. It also carries `data` (the fingerprints of the training
and validation sets, preprocessing/fingerprint.py), so a resume on other data is said (`check_resume_data`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tarfile
import tempfile
import typing as tp
from pathlib import Path

import torch

from core.errors import write_failed
from core.files import current_umask
from core.params import InputError
from core.weights.cache import HF_REPO_ID
from core.weights.peft_format import is_peft_folder
from core.weights.transformers_format import is_transformers_folder

logger = logging.getLogger(__name__)

__all__ = [
    "KEEP",
    "FORMAT",
    "save_checkpoint",
    "find_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "newest_checkpoint",
    "checkpoint_step",
    "first_non_finite",
    "current_umask",
    "state_sha256",
    "check_resume_data",
    "check_complete",
]

KEEP = 2
FORMAT = "musicgen-ft-resume-1"
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
CHECKSUM = "sha256"
# What `training.loop._resume` reads without a default: a file with the format tag but without these is refused
# by name before the dataset is prepared (not a KeyError after it).
_REQUIRED = {"step": int, "model": dict, "rng": dict}
_REQUIRED_RNG = ("torch", "cfg_dropout", "att_dropout")


def first_non_finite(tensors: tp.Iterable[tuple[str, tp.Any]]) -> tuple[str, str] | None:
    """`(name, what)` of the first floating-point tensor holding NaN or inf (`what`: e.g. "3 NaN of 4096"),
    or None when every one is finite."""
    for name, t in tensors:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            nan = int(torch.isnan(t).sum())
            inf = int((~finite).sum()) - nan
            counts = ", ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
            return name, f"{counts} of {t.numel()} values"
    return None


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint's name (`checkpoint-<step>.pt`), or None for another name."""
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def newest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _feed(h: tp.Any, value: tp.Any) -> None:
    """Hash `value` into `h`: tensors by dtype, shape and bytes; containers in a fixed order; the rest by repr.
    Lists and tuples hash alike (a tuple may come back from `torch.load` as either)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f"D{len(value)};".encode())
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, list | tuple):
        h.update(f"L{len(value)};".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"V{value!r};".encode())


def state_sha256(state: dict[str, tp.Any]) -> str:
    """The checksum of a checkpoint's content (every key but `sha256` itself)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != CHECKSUM})
    return h.hexdigest()


def save_checkpoint(folder: Path, step: int, state: dict[str, tp.Any], keep: int = KEEP) -> Path:
    """Write `folder/checkpoint-<step>.pt` atomically and delete all but the newest `keep`. A failed write (full
    disk, quota, file size limit) is a `DiskError` naming the file; nothing is left under the final name."""
    target = folder / f"checkpoint-{step:08d}.pt"
    full = {"format": FORMAT, "step": step, **state}
    full[CHECKSUM] = state_sha256(full)
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
        os.close(fd)
        # mkstemp creates the file 0600; a checkpoint is the user's file like any other: 0666 less the umask.
        os.chmod(tmp, 0o666 & ~current_umask())
        torch.save(full, tmp)
        os.replace(tmp, target)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError from its zip writer
        raise write_failed(target, e, "the resume checkpoint") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    logger.info("Saved resume checkpoint %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return target


def find_checkpoint(resume_from: str | Path) -> Path:
    """The checkpoint file `resume_from` names: the file itself, or the newest checkpoint in a folder."""
    path = Path(resume_from).expanduser()
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        if not found and (is_transformers_folder(path) or is_peft_folder(path)):
            raise InputError("resume_from", f"{path} {_NOT_RESUMABLE}")
        if not found:
            raise InputError("resume_from", f"no checkpoint-*.pt in {path}; give a checkpoint file or its folder")
        return found[-1]
    if not path.is_file():
        if HF_REPO_ID.match(str(resume_from).strip()) and not str(resume_from).strip().endswith((".pt", ".tar")):
            raise InputError(
                "resume_from",
                f"{resume_from} does not exist as a path, and Hugging Face repo ids are not resumed: a repo holds a "
                f"trained model, not the optimizer state of a run; give a checkpoint-*.pt file or its folder",
            )
        raise InputError("resume_from", f"{path} does not exist; give a checkpoint-*.pt file or its folder")
    if path.suffix == ".safetensors" or path.name == "config.json":
        raise InputError("resume_from", f"{path.name} is a transformers weights file: {path.parent} {_NOT_RESUMABLE}")
    return path


_NOT_RESUMABLE = (
    "is a model in Hugging Face transformers' format (or a PEFT adapter): a resume continues a run of this trainer "
    "from its checkpoint-*.pt (weights, optimizer, schedule and data order), which such a model does not hold. "
    "Generate with it as replicate_weights / --weights; give resume_from a checkpoint-*.pt of the run"
)


def load_checkpoint(path: Path, mmap: bool = False, verify: bool = True) -> dict[str, tp.Any]:
    """Read a checkpoint (CPU tensors); refuses a file that is not one of ours, one without the state a resume
    needs, and (`verify`) one whose content does not match its checksum, with a message naming the input.

    `mmap=True` maps the tensors instead of reading them (for checking a checkpoint before the run).
    """
    if tarfile.is_tarfile(path):
        raise InputError(
            "resume_from",
            f"{path.name} is a tar archive: a trained_model.tar cannot be resumed; use a checkpoint-*.pt from the "
            "run's checkpoints folder",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputError(
            "resume_from", f"{path.name} is not a readable resume checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(
            "resume_from",
            f"{path.name} is not a resume checkpoint written by this trainer; use a checkpoint-*.pt from the run's "
            "checkpoints folder",
        )
    if verify:
        _verify(path, state)
    return state


def check_complete(path: Path, state: dict[str, tp.Any]) -> None:
    """Refuse a checkpoint with the format tag but without the state a resume reads (before any work)."""
    missing = [k for k, kind in _REQUIRED.items() if not isinstance(state.get(k), kind) or isinstance(state[k], bool)]
    if not missing:
        missing = [f"rng.{k}" for k in _REQUIRED_RNG if not isinstance(state["rng"].get(k), torch.Tensor)]
    if not missing and (state["step"] < 0 or not state["model"]):
        missing = ["step" if state["step"] < 0 else "model"]
    if missing:
        raise InputError(
            "resume_from",
            f"{path.name} has the resume checkpoint's format tag but not the state a resume needs ({', '.join(missing)}"
            " missing or of the wrong type: a damaged or hand-made file); resume from another checkpoint-*.pt of the "
            "run, or start again without resume_from",
        )


def _verify(path: Path, state: dict[str, tp.Any]) -> None:
    saved = state.get(CHECKSUM)
    if saved is None:
        logger.warning(
            "%s carries no checksum (written by an earlier version of this trainer): its content cannot be verified",
            path.name,
        )
        return
    if not isinstance(saved, str) or state_sha256(state) != saved:
        raise InputError(
            "resume_from",
            f"{path.name} is corrupted: its content does not match the sha256 it was saved with (a damaged copy, or "
            "a disk error); resume from another checkpoint-*.pt of the run (the previous one is kept beside it), "
            "or start again without resume_from",
        )


def check_resume_data(state: dict[str, tp.Any], identity: dict[str, tp.Any], resume_from: str) -> None:
    """Say in one line when a resume's data differs from what the checkpoint trained on (by content, not path);
    refuse where continuing would mix two validation sets in one evaluation history.

    `identity`: `{"dataset": {"sha256", "tracks"}, "validation": {"kind": "path" | "split" | "off", "sha256",
    "tracks"}}` of this run (training.run.data_identity); the checkpoint holds its run's under `data`."""
    saved = state.get("data")
    if not isinstance(saved, dict):
        logger.warning(
            "%s records no fingerprint of its data (written by an earlier version): whether dataset_path and "
            "validation_path hold the same tracks as before cannot be checked",
            Path(resume_from).name,
        )
        return
    evaluation = state.get("evaluation")
    has_history = isinstance(evaluation, dict) and bool(evaluation.get("history"))
    before, now = saved.get("dataset") or {}, identity["dataset"]
    before_val, now_val = saved.get("validation") or {}, identity["validation"]
    other_data = before.get("sha256") != now["sha256"]
    if before_val.get("kind") != now_val["kind"] and has_history and now_val["kind"] != "off":
        raise InputError(
            "resume_from",
            f"the checkpoint's validation history was measured on {_validation_words(before_val)}, this run "
            f"validates on {_validation_words(now_val)}: one history would mix two validation sets. Resume with the "
            "same validation inputs, or start a new run",
        )
    if now_val["kind"] == "path" and before_val.get("sha256") != now_val["sha256"] and has_history:
        raise InputError(
            "validation_path",
            f"holds other tracks ({now_val['tracks']}) than the validation set the checkpoint's history was measured "
            f"on ({before_val.get('tracks')} tracks): one history would mix two validation sets. Resume with the same "
            "validation audio, or start a new run",
        )
    if other_data and now_val["kind"] == "split" and has_history:
        raise InputError(
            "dataset_path",
            f"holds other tracks ({now['tracks']}) than the checkpoint was trained on ({before.get('tracks')} tracks), "
            "and validation_split holds out a share of dataset_path's tracks: one history would mix two validation "
            "sets. Resume with the same dataset_path, give the validation audio as validation_path both times, or "
            "start a new run",
        )
    if other_data:
        logger.warning(
            "Resuming on other data: dataset_path holds other tracks (%s) than the checkpoint was trained on (%s "
            "tracks); training continues on this data",
            now["tracks"],
            before.get("tracks"),
        )


def _validation_words(v: dict) -> str:
    kind = v.get("kind")
    if kind == "path":
        return f"validation_path ({v.get('tracks')} tracks)"
    return "a share of dataset_path (validation_split)" if kind == "split" else "no validation set"
