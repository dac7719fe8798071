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
    SPEC,
    STYLE_PRETRAINED,
    STYLE_VERSIONS,
    TRAINABLE_VERSIONS,
    find,
)
from core.devices import default_device
from core.errors import ModelUnavailableError
from core.families import core_hooks
from core.hub import (
    TEXT_ENCODER,
    TEXT_ENCODER_DOWNLOAD,
    TEXT_ENCODER_FILES,
    download_command,
    hf_cache_hint,
    hub_cached,
    hub_endpoint,
    hub_offline,
    hub_unreachable,
    missing_from_cache,
)
from core.loaded import LoadedModel
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
    "check_available",
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
    spec = find(model_version)
    if spec is not None and spec.name == model_version and not spec.scratch:  # scratch versions are not loadable
        if spec.tiny:
            return ModelSource(model_version, str(tiny.ensure_tiny(model_version)), "tiny")
        return ModelSource(model_version, spec.hub_id, "hf")
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


def load_musicgen(model_version: str, device: str | None = None) -> LoadedModel:
    """Load a MusicGen (audiocraft's `MusicGen`, in a `LoadedModel`) by model version, local folder or HF id.

    Raises `ModelUnavailableError` with the model, where it looked and the fix, instead of a hub stack trace: at
    once (one request) when a hub model is not cached and the hub cannot be reached. A hub model whose files are
    all cached loads from the cache alone, without asking the hub whether they changed.
    """
    source = resolve(model_version)
    device = device or default_device()
    cached = True
    if source.kind == "hf":
        uncached = _uncached(source)
        problem = _unreachable_problem(source, uncached)
        if problem:
            raise ModelUnavailableError(problem) from None
        cached = not uncached
    logger.info("Loading MusicGen %s from %s on %s", source.name, source.location, device)
    with hub_offline() if source.kind == "hf" and cached else contextlib.nullcontext():
        if is_style_source(source):
            return LoadedModel(_load_style(source, device), source.name, SPEC.get(source.name), source.location)
        try:
            with tiny.tiny_hubs(Path(source.location)) if source.kind != "hf" else contextlib.nullcontext():
                model = MusicGen.get_pretrained(source.location, device=device)
        except ModelUnavailableError:
            raise
        except Exception as e:  # noqa: BLE001 - turned into one actionable message below
            raise ModelUnavailableError(describe_load_failure(source, e)) from None
    return LoadedModel(model, source.name, SPEC.get(source.name), source.location)


def check_available(model_version: str) -> list[str]:
    """What would stop `load_musicgen(model_version)` from finding the model, found in seconds and without loading
    it, for the all-at-once checks before long work: an unknown version or a folder that is not a model, or a hub
    model not in the local cache while the hub cannot be reached (one request, `core.hub.hub_unreachable`). Empty:
    nothing found (a hub that answers will be downloaded from). Tiny models are built offline: always available."""
    spec = find(model_version)
    if spec is not None and spec.tiny and not spec.scratch:
        return []
    try:
        source = resolve(model_version)
    except ModelUnavailableError as e:
        return [str(e)]
    if source.kind != "hf":
        return []
    problem = _unreachable_problem(source, _uncached(source))
    return [problem] if problem else []


# (repo, its files the Hugging Face cache lacks, what it is, the `hf download` arguments that fetch it)
_Need = tuple[str, list[str], str, tuple[str, ...]]


def _uncached(source: ModelSource) -> list[_Need]:
    """What loading the hub model `source` reads and the cache lacks, one `_Need` per repo."""
    needs = [
        (source.location, CHECKPOINT_FILES, "the model", CHECKPOINT_FILES),
        (TEXT_ENCODER, TEXT_ENCODER_FILES, "its text encoder", TEXT_ENCODER_DOWNLOAD),
    ]
    spec = find(source.name) or find(source.location)
    if spec is not None:
        needs.extend(core_hooks(spec).hub_needs)
    found = [(repo, missing_from_cache(repo, files), what, args) for repo, files, what, args in needs]
    return [need for need in found if need[1]]


def _unreachable_problem(source: ModelSource, uncached: list[_Need]) -> str | None:
    """One message when files are missing from the cache and the hub cannot be reached; None otherwise."""
    if not uncached:
        return None
    repo, missing, _, _ = uncached[0]
    reason = hub_unreachable(repo, missing[0])
    if reason is None:
        return None
    lacks = "; ".join(f"{repo} ({what}): {', '.join(missing)}" for repo, missing, what, _ in uncached)
    commands = [download_command(repo, args) for repo, _, _, args in uncached]
    message = (
        f"model_version {source.name!r} ({source.location}) is not in the local Hugging Face cache "
        f"{hf_cache_hint()} (missing {lacks}), and {reason}. "
        f"Fix: connect to the network and run again (the files download once); or download them with "
        f"`{'` and `'.join(commands)}` (into $HF_HOME/hub; from another machine, copy that folder here); or give "
        f"model_version a local folder holding {' and '.join(CHECKPOINT_FILES)}."
    )
    return message + _melody_note(source)


def _melody_note(source: ModelSource) -> str:
    """What the family of a known version reads from outside the Hugging Face cache and lacks (melody models:
    demucs' htdemucs weights, which audiocraft's chroma conditioner loads through torch.hub)."""
    spec = find(source.name) or find(source.location)
    return core_hooks(spec).load_note() if spec is not None else ""


def is_style_source(source: ModelSource) -> bool:
    """A MusicGen-Style checkpoint (its LM cfg has a style conditioner)? Hub ids are known by name."""
    if source.kind == "hf":
        spec = find(source.location)
        return spec is not None and spec.loader == "style"
    return is_style_folder(source.location)


def _load_style(source: ModelSource, device: str):
    try:
        return load_style_musicgen(source.location, device, name=source.name)
    except ModelUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001 - turned into one actionable message below
        raise ModelUnavailableError(describe_load_failure(source, e)) from None


def describe_load_failure(source: ModelSource, error: Exception) -> str:
    text = str(error).strip()
    reason = f"{type(error).__name__}: {text.splitlines()[0].rstrip('.') if text else ''}"
    if source.kind == "hf":
        commands = (
            download_command(source.location, CHECKPOINT_FILES),
            download_command(TEXT_ENCODER, TEXT_ENCODER_DOWNLOAD),
        )
        return (
            f"Could not load model_version {source.name!r} ({source.location}): {reason}. Looked in the Hugging "
            f"Face cache {hf_cache_hint()} and on the hub {hub_endpoint()}. Fix: connect to the network so it can "
            f"be downloaded, or download it once (`{'` and `'.join(commands)}`, into $HF_HOME/hub), or pass a "
            f"local folder holding {' and '.join(CHECKPOINT_FILES)}.{_melody_note(source)}"
        )
    return (
        f"Could not load model {source.name!r} from {source.location}: {reason}. The folder must hold "
        f"{' and '.join(CHECKPOINT_FILES)} in audiocraft's format (see README, 'Weights format')."
    )
