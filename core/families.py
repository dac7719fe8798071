"""Model families, core's part: how a family's LM is built and what loading one reads beyond its checkpoint.

A family is a way of conditioning (`ModelSpec.family` in core/catalogue.py): `text`, `melody`, `style`, `scratch`.
Each has one hooks object per room, registered under the family's name: this module's `CoreHooks` (building,
loading), `generation.families.GenerationHooks` (inputs, checks, conditions of a prediction) and
`training.families.TrainingHooks` (the base model of a run, its conditioners' training set-up). Imports only go
down, so each room keeps its own part; `tests/test_families.py` proves every family of the catalogue has all three.

Adding a family: its hooks in each room's registry (this module's `CORE_HOOKS` and the other two), and its
versions' records in the catalogue.
"""

from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path

from core.catalogue import ModelSpec
from core.hub import HTDEMUCS_HUB_FILE, HTDEMUCS_URL
from core.style import MERT_NAME, build_style_lm

__all__ = ["CoreHooks", "CORE_HOOKS", "core_hooks", "HubNeed"]

# (repo, files loading reads from it, what it is, the `hf download` arguments that fetch it: empty for the whole repo)
HubNeed = tuple[str, tuple[str, ...], str, tuple[str, ...]]


def _audiocraft_lm(cfg: dict) -> tp.Any:
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    return builders.get_lm_model(OmegaConf.create(cfg))


def _no_note() -> str:
    return ""


def _htdemucs_note() -> str:
    """audiocraft's chroma conditioner loads demucs' htdemucs through torch.hub, from the network when the torch
    cache lacks it: where to put it, when it is missing."""
    import torch

    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if (checkpoints / HTDEMUCS_HUB_FILE).is_file():
        return ""
    return f" A melody model also needs demucs' htdemucs weights: put {HTDEMUCS_URL} in {checkpoints}."


@dataclasses.dataclass(frozen=True)
class CoreHooks:
    """What core does differently for one family.

    `build_lm(cfg)`: a `LMModel` from an LM cfg dict (audiocraft's builders, or ours where audiocraft 1.3.0 lacks
    the conditioner). `hub_needs`: repos beyond the checkpoint and its text encoder that loading a hub model of the
    family reads (checked in the cache before loading). `load_note()`: a sentence for the "cannot load" messages
    about files read from outside the Hugging Face cache (empty when none is missing).
    """

    family: str
    build_lm: tp.Callable[[dict], tp.Any] = _audiocraft_lm
    hub_needs: tuple[HubNeed, ...] = ()
    load_note: tp.Callable[[], str] = _no_note


_MERT_WHAT = "its style feature extractor"
CORE_HOOKS: dict[str, CoreHooks] = {
    "text": CoreHooks("text"),
    "melody": CoreHooks("melody", load_note=_htdemucs_note),
    # MERT loads with its remote code and weights: the whole (small) repo.
    "style": CoreHooks(
        "style", build_lm=build_style_lm, hub_needs=((MERT_NAME, ("config.json",), "its style feature extractor", ()),)
    ),
    "scratch": CoreHooks("scratch"),
}


def core_hooks(spec: ModelSpec) -> CoreHooks:
    return CORE_HOOKS[spec.family]
