"""Vocal removal with demucs' htdemucs: each whole track is separated and drums + bass + other are summed.

The weights are never downloaded here. They come from a demucs *local repo* folder (`htdemucs.yaml` +
`955717e8-8726e21a.th`, or `955717e8.th`), given by `demucs_repo` / `$MGFT_DEMUCS_REPO`, or from the torch hub cache
(`$TORCH_HOME/hub/checkpoints/955717e8-8726e21a.th`, where `torch.hub` and the Cog build put it). A cache file is
loaded through a small repo folder made of links in the work folder, so demucs' own loader (and its checksum check)
is used either way and demucs never tries the network.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import torch

from core.devices import default_device
from core.errors import InputError, ModelUnavailableError

logger = logging.getLogger(__name__)

MODEL_NAME = "htdemucs"
SIG = "955717e8"
HUB_FILE = "955717e8-8726e21a.th"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/955717e8-8726e21a.th"
ENV_REPO = "MGFT_DEMUCS_REPO"
KEEP = ("drums", "bass", "other")
# demucs shifts each track by a random offset (shifts=1) drawn from the global `random`: seeded per track so that a
# track gives the same clips whichever process separates it, and after however many other tracks.
SHIFT_SEED = 0


def torch_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILE


def _repo_has_model(folder: Path) -> bool:
    return (folder / f"{MODEL_NAME}.yaml").is_file() and any(folder.glob(f"{SIG}*.th"))


def missing_weights(demucs_repo: str | None) -> str | None:
    """Why vocal removal could not load htdemucs on this machine (the message `resolve_repo` raises), or None when
    its weights are there. Reads only the disk: for the checks that run before any work."""
    return _locate(demucs_repo)[1]


def resolve_repo(demucs_repo: str | None, scratch: Path) -> Path:
    """The demucs repo folder to load htdemucs from; a clear error when the weights are not on this machine."""
    (weights, is_repo), missing = _locate(demucs_repo)
    if missing is not None:
        raise ModelUnavailableError(missing)
    return weights if is_repo else _link_repo(weights, scratch)


def _locate(demucs_repo: str | None) -> tuple[tuple[Path | None, bool], str | None]:
    """`((a repo folder, True) or (a weights file, False), None)`, or `((None, False), why not)`."""
    looked: list[str] = []
    for origin, value in (("demucs_repo", demucs_repo), (ENV_REPO, os.environ.get(ENV_REPO))):
        if not value:
            continue
        folder = Path(value).expanduser()
        if _repo_has_model(folder):
            return (folder, True), None
        if folder.is_dir() and any(folder.glob(f"{SIG}*.th")):
            # A folder holding only the weights file: given the one-line bag definition demucs expects when linked.
            return (next(folder.glob(f"{SIG}*.th")), False), None
        looked.append(f"{origin}={folder} (no {MODEL_NAME}.yaml + {SIG}*.th there)")
    cached = torch_cache_file()
    if cached.is_file():
        return (cached, False), None
    looked.append(f"the torch hub cache {cached} (missing)")
    return (None, False), (
        "Vocal removal (drop_vocals) needs demucs' htdemucs weights, which are not on this machine. Looked in: "
        + "; ".join(looked)
        + f". Fix: download {WEIGHTS_URL} into {cached.parent}/ (the Cog build step does this), or set "
        f"{ENV_REPO} to a folder holding {MODEL_NAME}.yaml (\"models: ['{SIG}']\") and {HUB_FILE}, "
        "or set drop_vocals to false."
    )


def _link_repo(weights: Path, scratch: Path) -> Path:
    repo = scratch / "demucs_repo"
    repo.mkdir(parents=True, exist_ok=True)
    # Named by signature only: demucs then skips its checksum, as torch.hub does for a file already cached.
    link = repo / f"{SIG}.th"
    if not link.exists():
        try:
            link.symlink_to(weights.resolve())
        except OSError:  # filesystems without symlinks: a hard link, else a copy
            try:
                os.link(weights, link)
            except OSError:
                import shutil

                shutil.copyfile(weights, link)
    (repo / f"{MODEL_NAME}.yaml").write_text(f"models: ['{SIG}']\n")
    return repo


def pick_device(device: str) -> str:
    if device == "auto":
        return default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device", "cuda was asked for but no GPU is visible; use auto or cpu")
    return device


class VocalRemover:
    """`remover(wav [C, T], sr) -> ([C, T'] without vocals, model sample rate 44.1 kHz)`. Mono stays mono."""

    def __init__(self, repo: Path, device: str = "cpu"):
        from demucs.api import Separator

        try:
            self.separator = Separator(model=MODEL_NAME, repo=Path(repo), device=device, progress=False)
        except Exception as e:  # noqa: BLE001 - demucs raises many types (ModelLoadingError, pickle, checksum)
            raise ModelUnavailableError(
                f"Could not load demucs {MODEL_NAME} from {repo}: {e}. Re-download {WEIGHTS_URL}."
            ) from e
        missing = [s for s in (*KEEP, "vocals") if s not in self.separator.model.sources]
        if missing:
            raise ModelUnavailableError(f"demucs model in {repo} lacks the sources {missing}; it is not htdemucs")
        self.device = device
        self.repo = Path(repo)
        logger.info("Vocal removal: demucs %s from %s on %s", MODEL_NAME, repo, device)

    @property
    def sample_rate(self) -> int:
        return int(self.separator.samplerate)

    @torch.inference_mode()
    def __call__(self, wav: torch.Tensor, sample_rate: int) -> tuple[torch.Tensor, int]:
        channels = wav.shape[0]
        # htdemucs works in stereo (demucs converts channels only when it also resamples): duplicate mono here
        # and fold it back below.
        stereo = wav.to(torch.float32)
        if channels == 1:
            stereo = stereo.expand(2, -1).contiguous()
        state = random.getstate()
        random.seed(SHIFT_SEED)
        try:
            _, stems = self.separator.separate_tensor(stereo, sample_rate)
        finally:
            random.setstate(state)  # the caller's random sequence goes on as if we had not been here
        kept = sum(stems[name] for name in KEEP)  # [2, T'] at 44.1 kHz
        kept = kept.to("cpu", torch.float32)
        if channels == 1:
            kept = kept.mean(dim=0, keepdim=True)
        return kept, self.sample_rate
