"""Model versions: the facebook/musicgen-* checkpoints, the tiny offline models, and local folders.

Everything loads through audiocraft's real `MusicGen.get_pretrained`; this module only decides *what* to hand it
and turns a missing checkpoint into one clear message.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from audiocraft.models import MusicGen

from core import tiny
from core.catalogue import (
    ALL_MODEL_VERSIONS,
    CHECKPOINT_FILES,
    FINE_TUNED,
    MODEL_VERSION_CHOICES,
    MODEL_VERSIONS,
    PRETRAINED,
    SCRATCH_VERSIONS,
    STYLE_PRETRAINED,
    STYLE_TINY_VERSIONS,
    STYLE_VERSIONS,
    TINY_VERSIONS,
    TRAINABLE_VERSIONS,
)
from core.devices import default_device
from core.errors import ModelUnavailableError
from core.hub import hf_cache_hint, hub_cached, hub_offline
from core.style import is_style_folder, load_style_musicgen

logger = logging.getLogger(__name__)

# The catalogue's names and the hub helpers stay importable from here, where callers have always found them.
__all__ = [
    "ALL_MODEL_VERSIONS",
    "CHECKPOINT_FILES",
    "FINE_TUNED",
    "MODEL_VERSION_CHOICES",
    "MODEL_VERSIONS",
    "PRETRAINED",
    "SCRATCH_VERSIONS",
    "STYLE_PRETRAINED",
    "STYLE_VERSIONS",
    "TRAINABLE_VERSIONS",
    "ModelUnavailableError",
    "ModelSource",
    "resolve",
    "hf_cache_hint",
    "hub_cached",
    "hub_offline",
    "load_musicgen",
    "is_style_source",
    "describe_load_failure",
    "default_device",
]


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
    if model_version in TINY_VERSIONS:
        return ModelSource(model_version, str(tiny.ensure_tiny(model_version)), "tiny")
    if model_version in STYLE_PRETRAINED:
        return ModelSource(model_version, STYLE_PRETRAINED[model_version], "hf")
    if model_version in STYLE_TINY_VERSIONS:
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


def load_musicgen(model_version: str, device: str | None = None):
    """Load a MusicGen (audiocraft's `MusicGen`) by model version, local folder or HF id.

    Raises `ModelUnavailableError` with the model, where it looked and the fix, instead of a hub stack trace.
    """
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
    return is_style_folder(source.location)


def _load_style(source: ModelSource, device: str):
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
