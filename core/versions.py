"""Model versions: the facebook/musicgen-* checkpoints, the tiny offline models, and local folders.

Everything loads through audiocraft's real `MusicGen.get_pretrained`; this module only decides *what* to hand it
and turns a missing checkpoint into one clear message.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from core import tiny
from core.errors import ModelUnavailableError

logger = logging.getLogger(__name__)

PRETRAINED: dict[str, str] = {
    "small": "facebook/musicgen-small",
    "medium": "facebook/musicgen-medium",
    "large": "facebook/musicgen-large",
    "melody": "facebook/musicgen-melody",
    "melody-large": "facebook/musicgen-melody-large",
    "stereo-small": "facebook/musicgen-stereo-small",
    "stereo-medium": "facebook/musicgen-stereo-medium",
    "stereo-large": "facebook/musicgen-stereo-large",
    "stereo-melody": "facebook/musicgen-stereo-melody",
    "stereo-melody-large": "facebook/musicgen-stereo-melody-large",
}
MODEL_VERSIONS: tuple[str, ...] = (*PRETRAINED, *tiny.TINY_VERSIONS)
# MusicGen-Style (core/style.py): loaded by our own loader (audiocraft 1.3.0 has no style conditioner), so listed
# apart from MODEL_VERSIONS (the models audiocraft's loaders, and so training and export, handle as they are).
STYLE_PRETRAINED: dict[str, str] = {"style": "facebook/musicgen-style"}
STYLE_VERSIONS: tuple[str, ...] = (*STYLE_PRETRAINED, *tiny.STYLE_TINY_VERSIONS)
ALL_MODEL_VERSIONS: tuple[str, ...] = (*MODEL_VERSIONS, *STYLE_VERSIONS)
# New LMs trained from scratch on an existing EnCodec (training/methods/scratch.py): trainable, not loadable.
SCRATCH_VERSIONS: tuple[str, ...] = ("micro", "tiny-micro")
# predict's "the weights this deployment was trained into" (COG_WEIGHTS / replicate_weights).
FINE_TUNED = "fine-tuned"
# The one `model_version` choice list of both predict and train. Cog names a choice list's schema component after
# the input, and `cog build` keeps one component per name for both modes: two different lists under one name
# would leave training with predict's. Each side refuses the choices that are not its own, naming the fix.
MODEL_VERSION_CHOICES: tuple[str, ...] = (FINE_TUNED, *ALL_MODEL_VERSIONS, *SCRATCH_VERSIONS)
TRAINABLE_VERSIONS: tuple[str, ...] = (*ALL_MODEL_VERSIONS, *SCRATCH_VERSIONS)
CHECKPOINT_FILES = ("state_dict.bin", "compression_state_dict.bin")


@dataclass(frozen=True)
class ModelSource:
    """Where a model version's checkpoint lives.

    `kind` is `hf` (a Hugging Face repo id), `tiny` (a cached tiny model folder) or `folder` (a local folder).
    """

    name: str
    location: str
    kind: str


def resolve(model_version: str) -> ModelSource:
    """Map a `model_version` input (a choice, a facebook/* id or a local folder) to where it is loaded from."""
    if model_version in PRETRAINED:
        return ModelSource(model_version, PRETRAINED[model_version], "hf")
    if model_version in tiny.TINY_VERSIONS:
        return ModelSource(model_version, str(tiny.ensure_tiny(model_version)), "tiny")
    if model_version in STYLE_PRETRAINED:
        return ModelSource(model_version, STYLE_PRETRAINED[model_version], "hf")
    if model_version in tiny.STYLE_TINY_VERSIONS:
        return ModelSource(model_version, str(tiny.ensure_tiny(model_version)), "tiny")
    path = Path(model_version).expanduser()
    if path.is_dir():
        missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
        if missing:
            raise ModelUnavailableError(
                f"Model folder {path} lacks {', '.join(missing)}. A model folder must hold both "
                f"{' and '.join(CHECKPOINT_FILES)} (audiocraft's checkpoint format)."
            )
        return ModelSource(str(path), str(path), "folder")
    if model_version.startswith("facebook/musicgen"):
        return ModelSource(model_version, model_version, "hf")
    raise ModelUnavailableError(
        f"Unknown model_version {model_version!r}: choose one of {', '.join(ALL_MODEL_VERSIONS)}, "
        "or give a local folder holding state_dict.bin and compression_state_dict.bin."
    )


def hf_cache_hint() -> str:
    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    hub = os.environ.get("HF_HUB_CACHE", str(Path(home) / "hub"))
    return hub


def hub_cached(repo_id: str, filenames: tuple[str, ...] = CHECKPOINT_FILES) -> bool:
    """Whether every file of `repo_id` is in the local Hugging Face cache. Reads only the disk
    (`huggingface_hub.try_to_load_from_cache`): no request, so it answers at once with no network."""
    from huggingface_hub import try_to_load_from_cache

    return all(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames)


@contextlib.contextmanager
def hub_offline():
    """Within: huggingface_hub (and transformers, which asks it) read only the local cache, as with
    `HF_HUB_OFFLINE=1`. Both read `huggingface_hub.constants.HF_HUB_OFFLINE` at each call, so flipping it here
    works after import. For loads known to be fully cached: no request, so no wait on an unreachable hub."""
    import huggingface_hub.constants as constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def load_musicgen(model_version: str, device: str | None = None):
    """Load a MusicGen (audiocraft's `MusicGen`) by model version, local folder or HF id.

    Raises `ModelUnavailableError` with the model, where it looked and the fix, instead of a hub stack trace.
    """
    from audiocraft.models import MusicGen

    source = resolve(model_version)
    device = device or default_device()
    logger.info("Loading MusicGen %s from %s on %s", source.name, source.location, device)
    if is_style_source(source):
        return _load_style(source, device)
    try:
        with tiny.tiny_hubs(Path(source.location)) if source.kind != "hf" else contextlib.nullcontext():
            model = MusicGen.get_pretrained(source.location, device=device)
    except ModelUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001 - turned into one actionable message below
        raise ModelUnavailableError(describe_load_failure(source, e)) from None
    model.name = source.name
    return model


def is_style_source(source: ModelSource) -> bool:
    """A MusicGen-Style checkpoint (its LM cfg has a style conditioner)? Hub ids are known by name."""
    if source.kind == "hf":
        return source.location in STYLE_PRETRAINED.values()
    from core.style import is_style_folder

    return is_style_folder(source.location)


def _load_style(source: ModelSource, device: str):
    from core.style import load_style_musicgen

    try:
        return load_style_musicgen(source.location, device, name=source.name)
    except ModelUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001 - turned into one actionable message below
        raise ModelUnavailableError(describe_load_failure(source, e)) from None


def describe_load_failure(source: ModelSource, error: Exception) -> str:
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if source.kind == "hf":
        return (
            f"Could not load model_version {source.name!r} ({source.location}): {reason}. "
            f"Looked in the Hugging Face cache {hf_cache_hint()} and on the network. Fix: connect to the "
            f"network so it can be downloaded, or download it once (`huggingface-cli download "
            f"{source.location}`) and point HF_HOME at that cache, or pass a local folder holding "
            f"{' and '.join(CHECKPOINT_FILES)}. Melody models also need demucs' htdemucs weights in the torch cache."
        )
    return (
        f"Could not load model {source.name!r} from {source.location}: {reason}. The folder must hold "
        f"{' and '.join(CHECKPOINT_FILES)} in audiocraft's format (see README, 'Weights format')."
    )


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
