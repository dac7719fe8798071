"""MusicGen-Style in generation: the style inputs, their checks, the conditions, and double CFG.

A style model (`style` = facebook/musicgen-style, `tiny-style`) takes a text prompt, a style audio, or both:

- `style_audio`: the music follows the style of an excerpt of it (`style_excerpt_length` seconds, 1.5-4.5, from a
  random start drawn from the seed);
- `style_eval_q` (1-6): how many of the style bottleneck's codebooks pass; fewer = looser adherence to the style;
- `classifier_free_guidance_beta`: double classifier-free guidance (`core.style.double_cfg_logits`), which pushes
  the prompt `beta` times more than the style; empty = single CFG. It matters when both a prompt and a style audio
  are given.

This module is imported by `generation.generate` at start-up: it imports audiocraft (through `core.style`) only
inside functions, once a model is loaded.
"""

from __future__ import annotations

import logging
import math
import typing as tp

import torch

from core import audio
from core import style as core_style
from core.catalogue import ModelSpec
from core.params import InputError
from generation.conditions import Audio, continued_section, description
from generation.params import PredictParams

logger = logging.getLogger(__name__)

STYLE_MODELS_HINT = "style (facebook/musicgen-style) or tiny-style"


def style_conditioners(model) -> dict[str, tp.Any]:
    """The `core.style.StyleConditioner`s of a loaded MusicGen (empty for other models)."""
    return core_style.style_conditioners(model.lm)


def is_style_model(model) -> bool:
    return bool(style_conditioners(model))


def load_style_audio(params: PredictParams) -> Audio | None:
    return audio.load_audio_input("style_audio", params.style_audio)


def load_inputs(params: PredictParams) -> dict[str, Audio | None]:
    """The style family's inputs of a request (`generation.families`): `style_audio`, loaded."""
    return {"style_audio": load_style_audio(params)}


def validate_inputs(params: PredictParams, inputs: dict[str, tp.Any]) -> None:
    validate_request(params, inputs["style_audio"])


def validate_for_version(params: PredictParams, spec: ModelSpec, input_audio: Audio | None, inputs: dict) -> None:
    """The style inputs against a model the catalogue knows, before it loads: refused for a model without a style
    conditioner; a style model takes no melody."""
    if spec.style:
        if input_audio is not None and not params.continuation:
            raise InputError(
                "input_audio",
                f"{spec.name} takes its audio condition from style_audio (a style, not a melody): pass the file as "
                "style_audio, or set continuation=true to continue input_audio",
            )
        return
    if inputs["style_audio"] is not None:
        raise InputError(
            "style_audio",
            f"style conditioning needs a MusicGen-Style model ({STYLE_MODELS_HINT}), and {spec.name} is not "
            "one: pick model_version=style, or leave style_audio empty",
        )
    if params.classifier_free_guidance_beta is not None:
        raise InputError(
            "classifier_free_guidance_beta",
            f"double classifier-free guidance balances text against style: only MusicGen-Style models "
            f"({STYLE_MODELS_HINT}) have it. Leave it empty for {spec.name}",
        )


def validate_inputs_for_model(
    params: PredictParams, model, input_audio: Audio | None, inputs: dict, *, name: str | None = None
) -> None:
    validate_for_model(params, model, inputs["style_audio"], input_audio, name=name)


def validate_request(params: PredictParams, style_audio: Audio | None) -> None:
    """Checks that need no model (run before any loading)."""
    beta = params.classifier_free_guidance_beta
    if style_audio is None:
        if beta is not None:
            logger.warning(
                "classifier_free_guidance_beta=%s without style_audio: on a style model this scales the guidance "
                "of the prompt to classifier_free_guidance * beta",
                beta,
            )
        return
    wav, sr = style_audio
    length = wav.shape[-1] / sr
    if wav.shape[-1] == 0 or not torch.isfinite(wav).all():
        raise InputError("style_audio", "the file holds no usable audio (empty, or NaN/inf samples)")
    if params.style_excerpt_length > length + 1e-6:
        most = math.floor(length * 10) / 10
        fix = f"use at most {most}" if most >= 1.5 else "give a style_audio of at least 1.5 s"
        raise InputError(
            "style_excerpt_length",
            f"{params.style_excerpt_length} s is longer than style_audio ({length:.2f} s): {fix}",
        )
    has_text = bool(params.prompt and params.prompt.strip())
    if beta is not None and not has_text:
        logger.info("classifier_free_guidance_beta has no effect without a prompt (style only): single CFG")


def validate_for_model(
    params: PredictParams, model, style_audio: Audio | None, input_audio: Audio | None, *, name: str | None = None
) -> dict[str, tp.Any]:
    """Checks that depend on the loaded model (audiocraft's MusicGen; `name`: what messages call it, by default its
    own `name`); returns its style conditioners (empty for other models)."""
    conditioners = style_conditioners(model)
    name = name or model.name
    if not conditioners:
        if style_audio is not None:
            raise InputError(
                "style_audio",
                f"style conditioning needs a MusicGen-Style model ({STYLE_MODELS_HINT}), and {name} is not one: "
                "pick model_version=style, or leave style_audio empty",
            )
        if params.classifier_free_guidance_beta is not None:
            raise InputError(
                "classifier_free_guidance_beta",
                f"double classifier-free guidance balances text against style: only MusicGen-Style models "
                f"({STYLE_MODELS_HINT}) have it. Leave it empty for {name}",
            )
        return conditioners
    n_q_out = min(c.n_q_out for c in conditioners.values())
    if params.style_eval_q > n_q_out:
        raise InputError("style_eval_q", f"{params.style_eval_q} exceeds this model's {n_q_out} style codebooks")
    if input_audio is not None and not params.continuation:
        raise InputError(
            "input_audio",
            f"{name} takes its audio condition from style_audio (a style, not a melody): pass the file as "
            "style_audio, or set continuation=true to continue input_audio",
        )
    return conditioners


def configure(model, params: PredictParams) -> None:
    """Put this request's style settings on the model's style conditioners (they persist on the model)."""
    for conditioner in style_conditioners(model).values():
        conditioner.set_params(eval_q=params.style_eval_q, excerpt_length=params.style_excerpt_length)


def build_conditions(model, params: PredictParams, input_audio: Audio | None, inputs: dict[str, tp.Any]):
    """(attributes, prompt_tokens `[1, K, T]` or None) for one sample: text and/or style (`self_wav`, from
    `inputs["style_audio"]`), and the continued section of `input_audio` when `continuation` is set."""
    from audiocraft.data.audio_utils import convert_audio

    configure(model, params)
    prompt = None
    if input_audio is not None and params.continuation:
        prompt = continued_section(model, params, input_audio)[None]
    styles = None
    style_audio = inputs.get("style_audio")
    if style_audio is not None:
        wav, sr = style_audio
        styles = [convert_audio(wav, sr, model.sample_rate, model.audio_channels)]
    return model._prepare_tokens_and_attributes([description(params)], prompt, melody_wavs=styles)


def gen_params(model, params: PredictParams) -> dict[str, tp.Any]:
    """Extra `lm.generate` arguments for style models (`cfg_coef_beta`); none for the others."""
    if not is_style_model(model):
        return {}
    return {"cfg_coef_beta": params.classifier_free_guidance_beta}
