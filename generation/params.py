"""`PredictParams`: the inputs of `predict.py`, as Cog inputs and as CLI flags (one definition; `predict.py`'s Cog
signature is written from it by `scripts/cog_signatures.py`)."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

from core.catalogue import FINE_TUNED, MODEL_VERSION_CHOICES, SAMPLER_PRECISIONS
from core.params import param

DEFAULT_BASE = "stereo-melody-large"
NORMALIZATION_STRATEGIES = ("loudness", "clip", "peak", "rms")
MAX_DURATION = 300
MAX_OUTPUTS = 8  # with guidance 16 sequences per step; memory grows with it (checked against free memory too)


def sampler_precision_param(purpose: str = "") -> tp.Any:
    """The `sampler_precision` input of predict, and of train for the audio it generates (`purpose` says which)."""
    return param(
        "auto",
        f"Precision of the token sampler{purpose}: auto (int8 on CPU, fp16 on GPU), int8 (CPU only), bf16, fp16, or "
        "none (the model's own precision: exactly audiocraft's tokens).",
        choices=SAMPLER_PRECISIONS,
    )


@dataclass(frozen=True)
class PredictParams:
    model_version: str = param(
        FINE_TUNED,
        "Model to use. `fine-tuned`: the weights this model was trained into (or `replicate_weights`); "
        f"without any fine-tuned weights it falls back to `{DEFAULT_BASE}`. The `tiny*` models are small random "
        "models for offline tests. `style`: MusicGen-Style (a prompt and/or `style_audio`). `micro`, `tiny-micro` are "
        "training choices (models trained from scratch): generate with their weights as `replicate_weights`.",
        choices=MODEL_VERSION_CHOICES,
    )
    prompt: str | None = param(None, "A description of the music you want to generate. Empty: unconditional.")
    input_audio: str | None = param(
        None,
        "An audio file that will influence the generated music. If `continuation` is true, the generated music "
        "continues the audio file. Otherwise it follows the audio file's melody (melody models only).",
        file=True,
    )
    duration: int = param(
        8,
        "Duration of the generated audio in seconds. Beyond the model's 30 s window, generation continues in "
        "overlapping windows.",
        ge=1,
        le=MAX_DURATION,
    )
    num_outputs: int = param(
        1,
        "Number of outputs to generate from the same inputs, in one batch (they share each step's weight reads: "
        "cheaper than separate predictions); one file each. They differ from each other; the same seed and "
        "num_outputs give the same files again. CLI and Python API only: on Cog a prediction returns one file, "
        "as every MusicGen on Replicate does.",
        ge=1,
        le=MAX_OUTPUTS,
        cog=False,
    )
    continuation: bool = param(
        False,
        "If true, the generated music continues `input_audio`. Otherwise it mimics `input_audio`'s melody.",
    )
    continuation_start: int = param(0, "Start time of the audio file to use for continuation (seconds).", ge=0)
    continuation_end: int | None = param(
        None,
        "End time of the audio file to use for continuation (seconds). Empty: the end of the file.",
        ge=0,
    )
    multi_band_diffusion: bool = param(
        False, "Decode the tokens with MultiBand Diffusion instead of EnCodec (needs its weights; slower)."
    )
    normalization_strategy: str = param(
        "loudness", "Strategy for normalizing the output audio.", choices=NORMALIZATION_STRATEGIES
    )
    top_k: int = param(250, "Reduces sampling to the k most likely tokens.", ge=0)
    top_p: float = param(
        0.0, "Reduces sampling to tokens with cumulative probability of p. When set to 0, top_k is used.", ge=0, le=1
    )
    temperature: float = param(
        1.0, "Controls the 'conservativeness' of the sampling process. Higher is more diverse.", ge=0
    )
    classifier_free_guidance: float = param(
        3.0, "Increases the influence of inputs on the output. Higher: closer to the inputs, less diverse.", ge=0
    )
    sampler_precision: str = sampler_precision_param()
    output_format: str = param("wav", "Output format for the generated audio.", choices=("wav", "mp3"))
    seed: int | None = param(None, "Seed for the random number generator. Empty or -1: a random seed.", ge=-1)
    replicate_weights: str | None = param(
        None,
        "The weights of a training: an https URL, a local path or a data: URI of a trained_model.tar, or a Hugging "
        "Face model repo id holding one (user/name). Empty: the weights this model was started with (COG_WEIGHTS), if "
        "any.",
    )
    lora_scale: float = param(
        1.0,
        "LoRA weights only: how strongly the adapter acts (0: the base model, 1: as trained, up to 2: stronger).",
        ge=0.0,
        le=2.0,
    )
    style_audio: str | None = param(
        None,
        "MusicGen-Style models (`style`, `tiny-style`): an audio file whose style the music follows (an excerpt of "
        "`style_excerpt_length` seconds is taken from it). With a prompt too: text + style.",
        file=True,
    )
    style_excerpt_length: float = param(
        3.0,
        "Style models: length in seconds of the excerpt of `style_audio` that sets the style (at most the length of "
        "`style_audio`).",
        ge=1.5,
        le=4.5,
    )
    style_eval_q: int = param(
        3,
        "Style models: how many of the style conditioner's quantization levels are kept. Fewer: the music follows "
        "`style_audio` more loosely.",
        ge=1,
        le=6,
    )
    classifier_free_guidance_beta: float | None = param(
        None,
        "Style models with a prompt and `style_audio`: double classifier-free guidance, pushing the prompt this many "
        "times more than the style (1 to 9 is typical; 1 = single guidance). Empty: single classifier-free guidance.",
        ge=0,
    )
