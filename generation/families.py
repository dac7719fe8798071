"""Model families, generation's part: the inputs a family reads, its checks, its sampler arguments, its conditions.

One `GenerationHooks` per family of the catalogue (`ModelSpec.family`), in `GENERATION_HOOKS`; core's part is
`core.families`, training's `training.families`. `generation.generate.Generator` calls them instead of asking which
model it has:

- every family's `load_inputs`, `validate_request` and `validate_for_version` / `validate_for_model` see every
  request: each loads and checks the inputs only it reads, and refuses them for a model of another family;
- the loaded model's own family (`family_of`: the first whose `owns(model)` is true, else `text`) gives the sampler
  arguments (`gen_params`) and the conditions (`build_conditions`).

Adding a family: one module with its hooks, registered here (and in the other two rooms).
"""

from __future__ import annotations

import dataclasses
import typing as tp

from core.catalogue import MELODY_VERSIONS, ModelSpec
from core.params import InputError
from generation import style
from generation.conditions import Audio, is_melody_model, text_conditions
from generation.params import PredictParams

__all__ = [
    "GenerationHooks",
    "GENERATION_HOOKS",
    "family_of",
    "load_inputs",
    "validate_request",
    "validate_for_version",
    "validate_for_model",
]

Inputs = dict[str, tp.Any]  # the family inputs of a request, loaded: e.g. {"style_audio": (wav, sr) or None}


def _none(*args: tp.Any, **kwargs: tp.Any) -> None:
    return None


def _no_inputs(params: PredictParams) -> Inputs:
    return {}


def _no_params(model: tp.Any, params: PredictParams) -> dict[str, tp.Any]:
    return {}


def _never(model: tp.Any) -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class GenerationHooks:
    """What a prediction does differently for one family (defaults: a plain text-conditioned MusicGen).

    `load_inputs(params)`: the family's audio inputs, read and checked as files (`Inputs`). `validate_request(params,
    inputs)`: checks that need no model. `validate_for_version(params, spec, input_audio, inputs)`: the inputs
    against a model the catalogue knows, before loading. `validate_for_model(params, model, input_audio, inputs,
    name=)`: the same against the loaded model (`name`: what messages call it). `owns(model)`: the loaded model is
    of this family (its conditioners say so). `gen_params(model, params)`: extra `lm.generate` arguments.
    `build_conditions(model, params, input_audio, inputs)`: (attributes, prompt_tokens `[1, K, T]` or None) of one
    sample.
    """

    family: str
    load_inputs: tp.Callable[[PredictParams], Inputs] = _no_inputs
    validate_request: tp.Callable[[PredictParams, Inputs], None] = _none
    validate_for_version: tp.Callable[[PredictParams, ModelSpec, Audio | None, Inputs], None] = _none
    validate_for_model: tp.Callable[[PredictParams, tp.Any, Audio | None, Inputs], None] = _none
    owns: tp.Callable[[tp.Any], bool] = _never
    gen_params: tp.Callable[[tp.Any, PredictParams], dict[str, tp.Any]] = _no_params
    build_conditions: tp.Callable[..., tuple[list, tp.Any]] = text_conditions


def _melody_for_version(params: PredictParams, spec: ModelSpec, input_audio: Audio | None, inputs: Inputs) -> None:
    """`input_audio` without `continuation` is a melody: refused for a model without melody conditioning."""
    if input_audio is None or params.continuation or spec.melody:
        return
    raise InputError(
        "input_audio",
        f"melody conditioning needs a melody model ({', '.join(MELODY_VERSIONS)}), and {spec.name} is not one: "
        "set continuation=true to continue the audio instead, or pick a melody model_version",
    )


def _melody_owns(model: tp.Any) -> bool:
    return is_melody_model(model) and not style.is_style_model(model)


# Checked in this order: style's refusals (its own inputs, and a melody given to a style model) come before melody's.
GENERATION_HOOKS: dict[str, GenerationHooks] = {
    "style": GenerationHooks(
        "style",
        load_inputs=style.load_inputs,
        validate_request=style.validate_inputs,
        validate_for_version=style.validate_for_version,
        validate_for_model=style.validate_inputs_for_model,
        owns=style.is_style_model,
        gen_params=style.gen_params,
        build_conditions=style.build_conditions,
    ),
    "melody": GenerationHooks("melody", validate_for_version=_melody_for_version, owns=_melody_owns),
    "text": GenerationHooks("text"),
    # Trained from scratch: unconditional, generated like a text model without a prompt (`generation.request`
    # warns that a prompt is ignored, and refuses the bare architecture without its trained weights).
    "scratch": GenerationHooks("scratch"),
}


def family_of(model: tp.Any) -> GenerationHooks:
    """The hooks of a loaded model's family, read from its conditioners (a fine-tune's or a folder's name says
    nothing): the first family that owns it, else `text`."""
    return next((h for h in GENERATION_HOOKS.values() if h.owns(model)), GENERATION_HOOKS["text"])


def load_inputs(params: PredictParams) -> Inputs:
    """Every family's inputs of this request, loaded (before any model)."""
    inputs: Inputs = {}
    for hooks in GENERATION_HOOKS.values():
        inputs.update(hooks.load_inputs(params))
    return inputs


def validate_request(params: PredictParams, inputs: Inputs) -> None:
    for hooks in GENERATION_HOOKS.values():
        hooks.validate_request(params, inputs)


def validate_for_version(params: PredictParams, spec: ModelSpec, input_audio: Audio | None, inputs: Inputs) -> None:
    for hooks in GENERATION_HOOKS.values():
        hooks.validate_for_version(params, spec, input_audio, inputs)


def validate_for_model(
    params: PredictParams, model: tp.Any, input_audio: Audio | None, inputs: Inputs, *, name: str | None = None
) -> None:
    """`name`: what messages call the model (the loaded model's name, e.g. `fine-tuned`)."""
    for hooks in GENERATION_HOOKS.values():
        hooks.validate_for_model(params, model, input_audio, inputs, name=name)
