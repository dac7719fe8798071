"""The conditions of one sample for models conditioned by text and, for melody models, a melody: audiocraft's own
`MusicGen._prepare_tokens_and_attributes`, given the prompt, the continued section of `input_audio` or its melody.

Families whose conditions differ (MusicGen-Style: `generation.style.build_conditions`) give their own builder in
their `generation.families.GenerationHooks`.
"""

from __future__ import annotations

import typing as tp

import torch

from generation.params import PredictParams

__all__ = ["Audio", "description", "continued_section", "text_conditions", "is_melody_model"]

Audio = tuple[torch.Tensor, int]  # ([C, T] float32, sample rate)


def is_melody_model(model) -> bool:
    """The loaded model has an audio conditioner at `self_wav` (melody chroma; MusicGen-Style's style too)."""
    return "self_wav" in model.lm.condition_provider.conditioners


def description(params: PredictParams) -> str | None:
    """The prompt, or None (unconditional) when it is empty or blank."""
    return params.prompt if params.prompt and params.prompt.strip() else None


def continued_section(model, params: PredictParams, input_audio: Audio) -> torch.Tensor:
    """`[C, T]` of `input_audio` from `continuation_start` to `continuation_end` (or its end), at the model's rate
    and channels."""
    from audiocraft.data.audio_utils import convert_audio

    wav, sr = input_audio
    start = int(params.continuation_start * sr)
    end = int(params.continuation_end * sr) if params.continuation_end is not None else wav.shape[-1]
    return convert_audio(wav[:, start:end], sr, model.sample_rate, model.audio_channels)


def text_conditions(
    model, params: PredictParams, input_audio: Audio | None, inputs: dict[str, tp.Any]
) -> tuple[list, torch.Tensor | None]:
    """(attributes, prompt_tokens `[1, K, T]` or None) for one sample: the prompt, and `input_audio` continued
    (`continuation`) or as the melody (melody models; `generation.request` refused it for the others)."""
    from audiocraft.data.audio_utils import convert_audio

    text = description(params)
    if input_audio is None:
        return model._prepare_tokens_and_attributes([text], None)
    if params.continuation:
        return model._prepare_tokens_and_attributes([text], continued_section(model, params, input_audio)[None])
    wav, sr = input_audio
    melody = convert_audio(wav, sr, model.sample_rate, model.audio_channels)
    return model._prepare_tokens_and_attributes([text], None, melody_wavs=[melody])
