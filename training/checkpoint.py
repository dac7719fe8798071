"""Resume checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint is one file `checkpoint-<step>.pt` (step = optimizer steps done) holding plain containers only
(loads with `weights_only=True`): the LM weights (fp32), optimizer and loss-scaler state, EMA weights, the
condition-dropout RNG states, torch's RNG state, the loss history and the training inputs. It is written to a
temporary file and renamed, so a crash never leaves a truncated checkpoint under the final name; the newest
`KEEP` are kept.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import tempfile
import typing as tp
from pathlib import Path

import torch

from core.files import current_umask
from core.params import InputError

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
]

KEEP = 2
FORMAT = "musicgen-ft-resume-1"
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


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


def save_checkpoint(folder: Path, step: int, state: dict[str, tp.Any], keep: int = KEEP) -> Path:
    """Write `folder/checkpoint-<step>.pt` atomically and delete all but the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"checkpoint-{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        # mkstemp creates the file 0600; a checkpoint is the user's file like any other: 0666 less the umask.
        os.chmod(tmp, 0o666 & ~current_umask())
        torch.save({"format": FORMAT, "step": step, **state}, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
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
        if not found:
            raise InputError("resume_from", f"no checkpoint-*.pt in {path}; give a checkpoint file or its folder")
        return found[-1]
    if not path.is_file():
        raise InputError("resume_from", f"{path} does not exist; give a checkpoint-*.pt file or its folder")
    return path


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, tp.Any]:
    """Read a checkpoint (CPU tensors); refuses a file that is not one of ours with a message naming the input.

    `mmap=True` maps the tensors instead of reading them (cheap, for checking a checkpoint before the run).
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
    return state
