"""Model families, training's part: the base model of a run and its conditioners' training set-up.

One `TrainingHooks` per family of the catalogue (`ModelSpec.family`), in `TRAINING_HOOKS`; core's part is
`core.families`, generation's `generation.families`. `training.run.setup_training`, `evaluation.compare` and
`bench/train_step.py` call them instead of asking which model they have:

- `load_base(params, device)`: the MusicGen a run starts from, by the family of `model_version` (`scratch`: a new
  LM from random init; the others: `core.versions.load_musicgen`, which also loads local folders);
- `prepare_conditions(lm, clips, cache_dir, dist, model_key, seed)`: every family sets up the conditioners of its
  own kind that `lm` has (melody: chroma computed once per clip; style: frozen, fed each example's own audio), and
  returns them by attribute name: the `wav_conditions` of `training.data.TokenDataset`. A fine-tune or a folder
  names no family; its conditioners do.

Adding a family: one module with its hooks, registered here (and in the other two rooms).
"""

from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path

from core import versions
from core.catalogue import find
from training.data import ClipTokens
from training.dist import DistInfo
from training.melody import prepare_melody_training
from training.methods import scratch
from training.params import TrainParams
from training.style import prepare_style_training

__all__ = ["TrainingHooks", "TRAINING_HOOKS", "training_hooks", "load_base", "prepare_conditions"]


def _load_version(params: TrainParams, device: str) -> tp.Any:
    return versions.load_musicgen(params.model_version, device).musicgen


def _no_conditions(
    lm: tp.Any, clips: list[ClipTokens], cache_dir: Path, dist: DistInfo, model_key: str, seed: int
) -> dict[str, tp.Any]:
    return {}


def _melody_conditions(
    lm: tp.Any, clips: list[ClipTokens], cache_dir: Path, dist: DistInfo, model_key: str, seed: int
) -> dict[str, tp.Any]:
    """The chroma of every clip, once (`training.melody`): the `ChromaCache` of each melody conditioner."""
    return prepare_melody_training(lm, clips, cache_dir, dist, model_key=model_key)


def _style_conditions(
    lm: tp.Any, clips: list[ClipTokens], cache_dir: Path, dist: DistInfo, model_key: str, seed: int
) -> dict[str, tp.Any]:
    """The style conditioners frozen and fed each example's audio (`training.style`); `seed` draws the excerpts."""
    return prepare_style_training(lm, seed=seed)


@dataclasses.dataclass(frozen=True)
class TrainingHooks:
    """What a training run does differently for one family (defaults: a plain text-conditioned MusicGen).

    `load_base(params, device)`: the MusicGen the run starts from. `prepare_conditions(lm, clips, cache_dir, dist,
    model_key, seed)`: set up the conditioners of this family's kind that `lm` has, for training on `clips`;
    returns them by attribute name (empty when `lm` has none).
    """

    family: str
    load_base: tp.Callable[[TrainParams, str], tp.Any] = _load_version
    prepare_conditions: tp.Callable[..., dict[str, tp.Any]] = _no_conditions


# prepare_conditions runs in this order (the order of the batches' wav conditions): melody, then style.
TRAINING_HOOKS: dict[str, TrainingHooks] = {
    "text": TrainingHooks("text"),
    "melody": TrainingHooks("melody", prepare_conditions=_melody_conditions),
    "style": TrainingHooks("style", prepare_conditions=_style_conditions),
    "scratch": TrainingHooks("scratch", load_base=scratch.build_scratch_musicgen),
}


def training_hooks(model_version: str) -> TrainingHooks:
    """The hooks of `model_version`'s family; a version the catalogue does not know (a local folder) loads as its
    checkpoint says, as `text` does."""
    spec = find(model_version)
    return TRAINING_HOOKS[spec.family if spec is not None else "text"]


def load_base(params: TrainParams, device: str) -> tp.Any:
    """The MusicGen a run of `params.model_version` starts from."""
    return training_hooks(params.model_version).load_base(params, device)


def prepare_conditions(
    lm: tp.Any, clips: list[ClipTokens], cache_dir: Path, dist: DistInfo, model_key: str, seed: int
) -> dict[str, tp.Any]:
    """Every family's conditioner set-up on `lm` (each one only touches conditioners of its own kind): the wav
    conditions of the training batches, by attribute name."""
    conditions: dict[str, tp.Any] = {}
    for hooks in TRAINING_HOOKS.values():
        conditions.update(hooks.prepare_conditions(lm, clips, cache_dir, dist, model_key, seed))
    return conditions
