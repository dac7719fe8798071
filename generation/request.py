"""Checks of a prediction request before any long work: `validate_request` (no model needed, before loading),
`validate_for_model` (the loaded model, before generating), and the memory a batch of outputs needs.

Each refusal is an `InputError` naming the input and the fix; what is only ignored is logged.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from core import audio
from core.catalogue import MELODY_VERSIONS, find
from core.params import InputError
from generation import families, style
from generation.conditions import is_melody_model
from generation.params import PredictParams
from generation.windows import EXTEND_STRIDE
from preprocessing.descriptions import MAX_DESCRIPTION_CHARS, shorten

logger = logging.getLogger(__name__)


def bounded_prompt(params: PredictParams) -> PredictParams:
    """The prompt cut to what MusicGen's T5 reads (512 tokens; audiocraft tokenizes untruncated, so a 100 KB prompt
    costs tens of GB), at a word boundary, with a warning: never a silent change, never an out-of-memory kill."""
    if not params.prompt or len(params.prompt) <= MAX_DESCRIPTION_CHARS:
        return params
    short = shorten(params.prompt)
    logger.warning(
        "prompt is %d characters; the text encoder reads at most 512 tokens: using its first %d (%r...)",
        len(params.prompt),
        len(short),
        short[:60],
    )
    return dataclasses.replace(params, prompt=short)


def load_input_audio(params: PredictParams) -> tuple[torch.Tensor, int] | None:
    return audio.load_audio_input("input_audio", params.input_audio)


def validate_request(params: PredictParams, input_audio: tuple[torch.Tensor, int] | None) -> None:
    """Checks that need no model (run before any loading)."""
    if params.seed is not None and not -1 <= params.seed <= MAX_SEED:
        raise InputError(
            "seed",
            f"{params.seed} is outside -1..{MAX_SEED}: give a seed in that range, or -1 / empty for a random one",
        )
    known = find(params.model_version)
    if known is not None and known.scratch and not params.replicate_weights:
        raise InputError(
            "model_version",
            f"{params.model_version} is an architecture that train.py trains from scratch, not a model to generate "
            "with: pass the trained_model.tar of such a training as replicate_weights, or choose another model_version",
        )
    if params.continuation and input_audio is None:
        raise InputError("continuation", "continuation=true needs an input_audio to continue")
    if input_audio is None:
        for name in ("continuation_end",):
            if getattr(params, name) is not None:
                logger.warning("%s is ignored without input_audio", name)
        return
    wav, sr = input_audio
    length = wav.shape[-1] / sr
    if params.continuation:
        end = params.continuation_end if params.continuation_end is not None else length
        if params.continuation_end is not None and params.continuation_end > length + 1e-6:
            raise InputError(
                "continuation_end",
                f"{params.continuation_end} s is past the end of input_audio ({length:.2f} s); use at most "
                f"{int(length)} or leave it empty",
            )
        if params.continuation_start >= end:
            raise InputError(
                "continuation_start",
                f"{params.continuation_start} s must be before continuation_end ({end:.2f} s)",
            )
        if end - params.continuation_start >= params.duration:
            raise InputError(
                "duration",
                f"{params.duration} s must be longer than the continued section of input_audio "
                f"({end - params.continuation_start:.2f} s): raise duration or shorten the section",
            )
    elif params.continuation_end is not None or params.continuation_start:
        logger.warning("continuation_start/continuation_end are ignored when continuation=false")


MAX_SEED = 2**63 - 1  # torch's generator takes a signed 64-bit seed


def validate_for_version(
    params: PredictParams,
    version: str,
    input_audio: tuple[torch.Tensor, int] | None,
    inputs: dict,
) -> None:
    """The audio inputs against the family of model `version` (a model_version, or the hub id of the base a
    fine-tune names), from the catalogue alone: each family's hooks (`generation.families`) refuse the inputs only
    it reads for a model of another family (a melody input on a model without melody conditioning, style audio on a
    model without a style conditioner) before anything loads. A base the catalogue does not know (a local folder)
    is checked on the loaded model (`validate_for_model`)."""
    spec = find(version)
    if spec is not None:
        families.validate_for_version(params, spec, input_audio, inputs)


def validate_for_model(
    params: PredictParams, model, input_audio: tuple[torch.Tensor, int] | None, *, name: str | None = None
) -> None:
    """Checks that depend on the loaded model (audiocraft's MusicGen; `name`: what messages call it, by default
    its own `name`), still before any generation."""
    card = model.lm.card
    if params.prompt and params.prompt.strip() and not model.lm.condition_provider.conditioners:
        logger.warning("This model is unconditional (trained from scratch without text): the prompt is ignored")
    if params.top_k > card:
        raise InputError("top_k", f"{params.top_k} exceeds this model's codebook size ({card}); use at most {card}")
    if input_audio is not None and not params.continuation and not is_melody_model(model):
        raise InputError(
            "input_audio",
            f"melody conditioning needs a melody model ({', '.join(MELODY_VERSIONS)}), and "
            f"{name or model.name} is not one: set continuation=true to continue the audio instead, or pick a melody "
            "model_version",
        )
    if params.duration > model.max_duration and model.max_duration <= EXTEND_STRIDE:
        raise InputError(
            "duration",
            f"this model generates at most {model.max_duration:.0f} s per window, too short for windowed "
            f"generation; use duration <= {int(model.max_duration)}",
        )
    check_batch_memory(params, model)


def kv_cache_bytes(model, duration: float, num_outputs: int) -> int:
    """Estimated bytes of the sampler's attention cache for `num_outputs` outputs of `duration` seconds.

    Keys and values `[rows, heads, steps, head_dim]` per layer, where rows = num_outputs x 2 (conditional and
    unconditional; x 3 for MusicGen-Style's double guidance) and steps = one window (at most `max_duration`) plus
    the frames a melody's chroma prepends. This is what grows with `num_outputs`; the weights do not.
    """
    lm = model.lm
    window = min(float(duration), float(model.max_duration))
    steps = int(window * model.frame_rate) + lm.num_codebooks  # + the delay pattern's extra steps
    chroma = dict(lm.condition_provider.conditioners.items()).get("self_wav")  # a ModuleDict has no .get
    factor = getattr(chroma, "_downsampling_factor", None)
    if callable(factor) and not style.is_style_model(model):
        steps += int(window * model.sample_rate / factor())
    rows = num_outputs * (3 if style.is_style_model(model) else 2 if lm.condition_provider.conditioners else 1)
    dtype = next(iter(lm.parameters())).dtype
    itemsize = 2 if str(model.device).startswith("cuda") else torch.empty((), dtype=dtype).element_size()
    return 2 * len(lm.transformer.layers) * rows * steps * lm.dim * itemsize


def available_memory(device: str | torch.device) -> int | None:
    """Free bytes where the sampler allocates: CUDA free memory, or the host's MemAvailable; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Peak bytes per output sample of EnCodec's decoder, `4 * (DECODE_PER_FILTER * n_filters + DECODE_FIXED)`: its last
# blocks hold activations of `n_filters` channels at the audio rate. Measured (peak RSS of a no-grad decode, CPU):
# 5.3-6.5 x n_filters floats per sample for facebook/encodec_32khz's 64 filters, ~46 floats for the tiny models' 4;
# this bound covers both.
DECODE_PER_FILTER = 7
DECODE_FIXED = 32


def decode_bytes(model, duration: float) -> int:
    """Estimated peak bytes of decoding one output of `duration` seconds (`generation.generate.decode` decodes the
    outputs one at a time, and a stereo EnCodec its two channels one after the other, so this is the decode's peak
    whatever `num_outputs`)."""
    compression = model.compression_model
    inner = getattr(compression, "model", compression)  # the interleaved-stereo wrapper holds a mono EnCodec
    n_filters = int(getattr(getattr(inner, "decoder", None), "n_filters", 64))
    samples = int(float(duration) * model.sample_rate)
    return 4 * (DECODE_PER_FILTER * n_filters + DECODE_FIXED) * samples


def check_batch_memory(params: PredictParams, model, available: int | None = None) -> None:
    """Refuse a request whose generation cannot fit in free memory, before any of it runs: the sampler's attention
    cache for `num_outputs` outputs (`kv_cache_bytes`), then the decode of each output (`decode_bytes`). The two
    phases do not overlap (the cache is freed before decoding), so the larger one is what must fit.

    `available`: free bytes (default: measured on the model's device). The estimates are bounds, so 80 % of the
    free memory is the budget (the rest: activations, the weights' working copies, the process).
    """
    available = available_memory(model.device) if available is None else available
    if available is None:
        return
    budget = 0.8 * available
    decoding = decode_bytes(model, params.duration)
    need = max(kv_cache_bytes(model, params.duration, params.num_outputs), decoding)
    if need <= budget:
        return
    per_output = kv_cache_bytes(model, params.duration, 1)
    if decoding > budget or per_output > budget:
        seconds = int(params.duration * budget / max(decoding, 1))
        raise InputError(
            "duration",
            f"decoding {params.duration} s of audio needs about {max(decoding, per_output) / 2**30:.1f} GiB on "
            f"{model.device}, and about {available / 2**30:.1f} GiB is free: use duration <= {max(seconds, 1)} "
            "and continue the audio in another prediction (continuation=true), or free memory",
        )
    fits = int(budget // per_output)
    raise InputError(
        "num_outputs",
        f"{params.num_outputs} outputs of {min(params.duration, model.max_duration):.0f} s windows need about "
        f"{need / 2**30:.1f} GiB of attention cache on {model.device}, and about {available / 2**30:.1f} GiB is "
        f"free: use num_outputs <= {fits}, or run several predictions",
    )


def check_sampler_precision(sampler_precision: str, device: str | torch.device) -> None:
    """`int8` runs on CPU only (its kernels are fbgemm/oneDNN's): refused, naming the fix, for a model on a GPU."""
    if sampler_precision == "int8" and torch.device(device).type != "cpu":
        raise InputError(
            "sampler_precision",
            f"int8 runs on CPU only and the model is on {device}: use auto (fp16 there), fp16, bf16 or none",
        )
