"""Text-to-music, melody, continuation, stereo and long outputs on audiocraft's MusicGen.

`Generator` owns the loaded model (swapped only when the requested weights change) and turns `PredictParams`
into audio: validate → pick the model → build conditions → sample tokens (windowed beyond the model's 30 s) →
decode (EnCodec or MultiBand Diffusion) → normalize.

`num_outputs` samples of one request are one batch through the sampler (`[N, K, T]`): every step reads each weight
once for all of them. They are drawn from one random stream seeded by `seed`, so the same seed and `num_outputs`
give the same outputs again, and the outputs differ from each other.

`generate_audio(model, descriptions, duration)` is the same path for the trainer (report samples, prior-preservation
examples): the sampler predict uses (`sampler_for`), the same windowing and decoding.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import random
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core import audio, versions, weights
from core.params import InputError
from generation import style
from generation.params import DEFAULT_BASE, FINE_TUNED, PredictParams

logger = logging.getLogger(__name__)

EXTEND_STRIDE = 18.0  # seconds of new audio per window beyond the first; audiocraft's default
SampleFn = tp.Callable[..., torch.Tensor]


@dataclass
class GenerationResult:
    wavs: torch.Tensor  # [N, C, T] float32, one row per output (num_outputs), each normalized on its own
    sample_rate: int
    seed: int
    codes: torch.Tensor  # [N, K, T_frames]

    def __len__(self) -> int:
        return self.wavs.shape[0]

    @property
    def wav(self) -> torch.Tensor:
        """`[C, T]`: the first output (the only one when num_outputs=1)."""
        return self.wavs[0]

    @property
    def tokens(self) -> torch.Tensor:
        """`[K, T_frames]`: the first output's codes."""
        return self.codes[0]


@dataclass(frozen=True)
class ModelKey:
    """What to load: `kind` is `weights` (a trained_model.tar reference: path, URL, data: URI, HF repo id) or
    `version` (a model_version/folder). `lora_scale`: the LoRA adapter's strength the model was built with (a
    change re-applies the adapter; always 1 for model versions)."""

    kind: str
    ref: str
    lora_scale: float = 1.0


def model_key(params: PredictParams, setup_weights: str | None) -> ModelKey:
    scale = float(getattr(params, "lora_scale", 1.0))
    if params.replicate_weights:
        if params.model_version != FINE_TUNED:
            logger.warning(
                "replicate_weights is set: using those weights; model_version=%s is ignored", params.model_version
            )
        return ModelKey("weights", params.replicate_weights, scale)
    if params.model_version == FINE_TUNED and setup_weights:
        return ModelKey("weights", setup_weights, scale)
    if params.model_version == FINE_TUNED:
        logger.warning("model_version=%s but no fine-tuned weights were given: using %s", FINE_TUNED, DEFAULT_BASE)
    version = DEFAULT_BASE if params.model_version == FINE_TUNED else params.model_version
    if scale != 1.0:
        logger.warning("lora_scale=%g is ignored: %s is a base model, not LoRA weights", scale, version)
    return ModelKey("version", version)


PRELOAD_ENV = "MGFT_PRELOAD"
MIN_FREE_ENV = "MGFT_WEIGHTS_MIN_FREE_GB"


def min_free_setting() -> int:
    """Bytes of disk the weights cache keeps free (`MGFT_WEIGHTS_MIN_FREE_GB`, GiB; default 10 as flux-fine-tuner)."""
    value = os.environ.get(MIN_FREE_ENV, "").strip()
    if not value:
        return weights.DEFAULT_MIN_FREE_BYTES
    try:
        gib = float(value)
    except ValueError:
        raise ValueError(f"{MIN_FREE_ENV}={value!r} is not a number of GiB (e.g. 10)") from None
    if not gib >= 0 or gib == float("inf"):
        raise ValueError(f"{MIN_FREE_ENV}={value!r}: give a finite number of GiB >= 0")
    return int(gib * 2**30)


QUANTIZE_ENV = "MGFT_QUANTIZE"


def quantize_setting() -> str | None:
    """The sampler precision from `MGFT_QUANTIZE` (predict and the trainer's samples both follow it).

    `auto` (default): int8 weights on CPU, fp16 on CUDA (`generation.fast.default_quantize`); `none` / `fp32`: the
    LM's own precision (identical tokens to audiocraft's `LMModel.generate`); or `int8`, `bf16`, `fp16`.
    """
    from generation.fast import QUANTIZE_CHOICES

    value = os.environ.get(QUANTIZE_ENV, "auto").strip().lower()
    if value in ("", "none", "fp32"):
        return None
    allowed = ("auto", *(q for q in QUANTIZE_CHOICES if q))
    if value not in allowed:
        raise ValueError(f"{QUANTIZE_ENV}={value!r} is not one of: {', '.join(allowed)}, none")
    return value


def resolve_seed(seed: int | None) -> int:
    if seed is None or seed == -1:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        logger.info("Random seed: %d", seed)
    return seed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def bounded_prompt(params: PredictParams) -> PredictParams:
    """The prompt cut to what MusicGen's T5 reads (512 tokens; audiocraft tokenizes untruncated, so a 100 KB prompt
    costs tens of GB), at a word boundary, with a warning: never a silent change, never an out-of-memory kill."""
    from preprocessing.descriptions import MAX_DESCRIPTION_CHARS, shorten

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
    if not params.input_audio:
        return None
    try:
        return audio.load_audio(params.input_audio)
    except audio.AudioDecodeError as e:
        raise InputError("input_audio", f"{e}. Give a wav, mp3, flac, ogg, m4a or aiff file.") from None


def validate_request(params: PredictParams, input_audio: tuple[torch.Tensor, int] | None) -> None:
    """Checks that need no model (run before any loading)."""
    if params.model_version in versions.SCRATCH_VERSIONS and not params.replicate_weights:
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


def is_melody_model(model) -> bool:
    return "self_wav" in model.lm.condition_provider.conditioners


def validate_for_model(params: PredictParams, model, input_audio: tuple[torch.Tensor, int] | None) -> None:
    """Checks that depend on the loaded model (still before any generation)."""
    card = model.lm.card
    if params.prompt and params.prompt.strip() and not model.lm.condition_provider.conditioners:
        logger.warning("This model is unconditional (trained from scratch without text): the prompt is ignored")
    if params.top_k > card:
        raise InputError("top_k", f"{params.top_k} exceeds this model's codebook size ({card}); use at most {card}")
    if input_audio is not None and not params.continuation and not is_melody_model(model):
        raise InputError(
            "input_audio",
            f"melody conditioning needs a melody model (melody, melody-large, stereo-melody, ...), and {model.name} "
            "is not one: set continuation=true to continue the audio instead, or pick a melody model_version",
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


def check_batch_memory(params: PredictParams, model, available: int | None = None) -> None:
    """Refuse a `num_outputs` whose attention cache cannot fit in free memory (before any generation).

    Only batches are checked (num_outputs > 1): one output is what the model is for, and the estimate is a bound.
    `available`: free bytes (default: measured on the model's device).
    """
    if params.num_outputs <= 1:
        return
    available = available_memory(model.device) if available is None else available
    if available is None:
        return
    budget = 0.8 * available  # leave room for activations, decoding and the rest of the process
    need = kv_cache_bytes(model, params.duration, params.num_outputs)
    if need <= budget:
        return
    per_output = kv_cache_bytes(model, params.duration, 1)
    fits = int(budget // per_output)
    fix = f"use num_outputs <= {fits}" if fits >= 1 else "use num_outputs=1"
    raise InputError(
        "num_outputs",
        f"{params.num_outputs} outputs of {min(params.duration, model.max_duration):.0f} s windows need about "
        f"{need / 2**30:.1f} GiB of attention cache on {model.device}, and about {available / 2**30:.1f} GiB is "
        f"free: {fix}, or run several predictions",
    )


class Generator:
    """Loads models on demand (one at a time) and generates."""

    def __init__(
        self,
        device: str | None = None,
        setup_weights: str | None = None,
        *,
        min_free_bytes: int | None = None,
        free_bytes: weights.FreeBytes | None = None,
    ):
        self.device = device or versions.default_device()
        self.setup_weights = setup_weights
        # The weights cache keeps this much disk free (least-recently-used eviction, core.weights.evict); the
        # weights loaded now and the setup weights (COG_WEIGHTS) are never evicted.
        self.min_free_bytes = min_free_setting() if min_free_bytes is None else min_free_bytes
        self.free_bytes = free_bytes
        self._protected: set[Path] = set()
        self._key: ModelKey | None = None
        self._model = None
        self._mbd = None
        # The fast sampler (generation/fast.py): int8 weights on CPU, fp16 on CUDA ("auto"); MGFT_QUANTIZE=none
        # keeps exact fp32 (identical tokens to audiocraft's LMModel.generate).
        self.quantize = quantize_setting()
        self._sampler = None

    def sampler(self):
        if self._sampler is None:
            from generation.fast import FastSampler

            self._sampler = FastSampler(quantize=self.quantize)
        return self._sampler

    def model_for(self, key: ModelKey):
        if key == self._key:
            return self._model
        same_weights = self._key is not None and (self._key.kind, self._key.ref) == (key.kind, key.ref)
        if same_weights and not getattr(self._model, "is_lora", False):
            # Only lora_scale changed, and these weights are no LoRA adapter: nothing to re-apply.
            logger.warning("lora_scale=%g is ignored: %s are not LoRA weights", key.lora_scale, key.ref[:80])
            self._key = key
            return self._model
        previous = getattr(self._model, "weights_folder", None)
        if self._model is not None and self._sampler is not None:
            self._sampler.forget(self._model.lm)
        self._model = None  # free the previous model before loading the next one
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if key.kind == "weights":
            if same_weights:
                logger.info("lora_scale changed to %g: re-applying the adapter on its base", key.lora_scale)
            keep = {*self._protected, *([previous] if previous else [])}
            self._model = weights.load_trained_model(
                key.ref,
                device=self.device,
                lora_scale=key.lora_scale,
                keep=keep,
                min_free_bytes=self.min_free_bytes,
                free_bytes=self.free_bytes,
            )
            if key.ref == self.setup_weights:
                self._protected.add(Path(self._model.weights_folder))
        else:
            self._model = versions.load_musicgen(key.ref, device=self.device)
        if _plain_lm(self._model.lm):
            self.sampler().prepare(self._model.lm)  # quantize once here (setup), not in the first request
        self._key = key
        return self._model

    @property
    def loaded_weights(self) -> Path | None:
        """The folder of the fine-tuned weights loaded now (None for a base model): never evicted."""
        folder = getattr(self._model, "weights_folder", None)
        return Path(folder) if folder else None

    def preload(self) -> None:
        """Load what `setup()` should: the COG_WEIGHTS fine-tune (failing loudly: the deployment is unusable
        without it), else the default base (`MGFT_PRELOAD`, default stereo-melody-large; empty: none).

        The base is preloaded only when it is already on disk (for hub models, the local Hugging Face cache is
        checked first, without any request), and then from the cache alone (`versions.hub_offline`): otherwise one
        line is logged and models load on the first request, so a setup with an unreachable hub takes no time
        waiting for it.
        """
        if self.setup_weights:
            self.model_for(ModelKey("weights", self.setup_weights))
            return
        base = os.environ.get(PRELOAD_ENV, DEFAULT_BASE)
        if not base:
            return
        try:
            source = versions.resolve(base)
            if source.kind == "hf" and not versions.hub_cached(source.location):
                logger.warning(
                    "Not preloading %s: %s is not in the local Hugging Face cache (%s); models load on the first "
                    "request (set %s= to skip this check)",
                    base,
                    source.location,
                    versions.hf_cache_hint(),
                    PRELOAD_ENV,
                )
                return
            # Cached: load from the cache alone. Asking the hub whether the files changed would wait on it when
            # it is unreachable; a file the cache lacks (e.g. T5) fails fast here and loads on the first request.
            with versions.hub_offline() if source.kind == "hf" else contextlib.nullcontext():
                self.model_for(ModelKey("version", base))
        except versions.ModelUnavailableError as e:
            logger.warning("Could not preload %s; models will load on the first request. %s", base, e)

    def mbd(self, model):
        compression = model.compression_model
        per_channel_q = compression.num_codebooks // compression.channels
        if compression.cardinality != 2048 or per_channel_q != 4 or compression.sample_rate != 32000:
            raise InputError(
                "multi_band_diffusion",
                "MultiBand Diffusion is trained for the 32 kHz EnCodec of the facebook/musicgen-* models (4 codebooks "
                f"of 2048); this model has {per_channel_q} codebooks of {compression.cardinality}: set "
                "multi_band_diffusion=false",
            )
        if self._mbd is None:
            from audiocraft.models import MultiBandDiffusion

            try:
                self._mbd = MultiBandDiffusion.get_mbd_musicgen(device=self.device)
            except Exception as e:  # noqa: BLE001 - one actionable message instead of a hub stack trace
                raise InputError(
                    "multi_band_diffusion",
                    f"the MultiBand Diffusion weights (facebook/multiband-diffusion, with facebook/musicgen-small's "
                    f"EnCodec) could not be loaded ({type(e).__name__}). Connect to the network or put them in the "
                    f"Hugging Face cache ({versions.hf_cache_hint()}), or set multi_band_diffusion=false",
                ) from None
        return self._mbd

    def generate(
        self, params: PredictParams, *, sample_fn: SampleFn | None = None, progress: bool = True
    ) -> GenerationResult:
        params = bounded_prompt(params)
        input_audio = load_input_audio(params)
        style_audio = style.load_style_audio(params)
        validate_request(params, input_audio)
        style.validate_request(params, style_audio)
        model = self.model_for(model_key(params, self.setup_weights))
        validate_for_model(params, model, input_audio)
        style.validate_for_model(params, model, style_audio, input_audio)
        mbd = self.mbd(model) if params.multi_band_diffusion else None

        if sample_fn is None and _plain_lm(model.lm):  # LMs with their own generate (style: double CFG) keep it
            sample_fn = self.sampler()
        seed = resolve_seed(params.seed)
        seed_everything(seed)
        tokens = generate_tokens(
            model, params, input_audio, sample_fn=sample_fn, progress=progress, style_audio=style_audio
        )  # [N, K, T]
        wavs = decode(model, tokens, mbd)  # [N, C, T]
        wavs = torch.stack([normalize(wav, params.normalization_strategy, model.sample_rate) for wav in wavs])
        return GenerationResult(wavs=wavs.cpu(), sample_rate=model.sample_rate, seed=seed, codes=tokens.cpu())


def _plain_lm(lm) -> bool:
    from audiocraft.models.lm import LMModel

    return type(lm).generate is LMModel.generate


def sampler_for(model, quantize: str | None = "auto") -> SampleFn:
    """The sampler predict uses for `model`: the fast path (`generation.fast.FastSampler`, which itself falls back
    to `lm.generate` for configurations it does not implement) for plain LMs; the LM's own `generate` for LMs that
    override it (MusicGen-Style's double classifier-free guidance)."""
    if not _plain_lm(model.lm):
        return _lm_generate
    from generation.fast import FastSampler

    return FastSampler(quantize=quantize)


def replicate(attributes: list, prompt_tokens: torch.Tensor | None, n: int) -> tuple[list, torch.Tensor | None]:
    """`n` copies of one sample's conditions: independent attribute objects (the windowed loop rewrites each
    one's melody) and `[n, K, T]` prompt tokens (encoded once)."""
    if n == 1:
        return attributes, prompt_tokens
    if len(attributes) != 1:
        raise ValueError(f"expected the conditions of one sample, got {len(attributes)}")
    attributes = [attributes[0]] + [copy.deepcopy(attributes[0]) for _ in range(n - 1)]
    if prompt_tokens is not None:
        prompt_tokens = prompt_tokens.expand(n, -1, -1).contiguous()
    return attributes, prompt_tokens


def build_conditions(
    model,
    params: PredictParams,
    input_audio: tuple[torch.Tensor, int] | None,
    style_audio: tuple[torch.Tensor, int] | None = None,
):
    """(attributes, prompt_tokens `[1, K, T]` or None) for one sample, as audiocraft's MusicGen builds them."""
    from audiocraft.data.audio_utils import convert_audio

    if style.is_style_model(model):
        return style.build_conditions(model, params, input_audio, style_audio)

    description = params.prompt if params.prompt and params.prompt.strip() else None
    if input_audio is None:
        return model._prepare_tokens_and_attributes([description], None)
    wav, sr = input_audio
    if params.continuation:
        start = int(params.continuation_start * sr)
        end = int(params.continuation_end * sr) if params.continuation_end is not None else wav.shape[-1]
        prompt = convert_audio(wav[:, start:end], sr, model.sample_rate, model.audio_channels)
        return model._prepare_tokens_and_attributes([description], prompt[None])
    melody = convert_audio(wav, sr, model.sample_rate, model.audio_channels)
    return model._prepare_tokens_and_attributes([description], None, melody_wavs=[melody])


def _lm_generate(lm, prompt_tokens, attributes, *, max_gen_len: int, callback, **gen_params) -> torch.Tensor:
    return lm.generate(prompt_tokens, attributes, max_gen_len=max_gen_len, callback=callback, **gen_params)


@torch.no_grad()
def generate_tokens(
    model,
    params: PredictParams,
    input_audio: tuple[torch.Tensor, int] | None,
    *,
    sample_fn: SampleFn | None = None,
    progress: bool = True,
    style_audio: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Sample `[N, K, T]` tokens (N = `params.num_outputs`) for `params.duration` seconds, prompt tokens included.

    The N samples share one set of conditions (text, melody, style, continued audio) and go through the sampler as
    one batch.
    """
    gen_params = {
        "use_sampling": True,
        "temp": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "cfg_coef": params.classifier_free_guidance,
        "two_step_cfg": False,
        **style.gen_params(model, params),
    }
    attributes, prompt_tokens = build_conditions(model, params, input_audio, style_audio)
    attributes, prompt_tokens = replicate(attributes, prompt_tokens, params.num_outputs)
    return sample_windows(
        model, attributes, prompt_tokens, params.duration, gen_params, sample_fn=sample_fn, progress=progress
    )


@torch.no_grad()
def sample_windows(
    model,
    attributes: list,
    prompt_tokens: torch.Tensor | None,
    duration: float,
    gen_params: dict[str, tp.Any],
    *,
    sample_fn: SampleFn | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample `[B, K, T]` tokens for `duration` seconds (one sample per attribute), prompt tokens included.

    Beyond the model's window (`max_duration`, 30 s) each new window is conditioned on the last
    `max_duration - EXTEND_STRIDE` seconds of what came before; a melody is tiled to follow the window.
    """
    from audiocraft.modules.conditioners import WavCondition

    sample_fn = sample_fn or _lm_generate
    frame_rate, window = model.frame_rate, model.max_duration
    total_len = int(duration * frame_rate)
    bar = tqdm(total=total_len, desc="generating", unit="step", disable=not progress, leave=False)
    offset = 0  # frames of final output before the current window's prompt

    def callback(generated: int, _to_generate: int) -> None:
        bar.n = min(total_len, offset + generated)
        bar.refresh()

    try:
        if duration <= window:
            with model.autocast:
                return sample_fn(
                    model.lm, prompt_tokens, attributes, max_gen_len=total_len, callback=callback, **gen_params
                )
        melodies = [attr.wav.get("self_wav") for attr in attributes]
        pieces: list[torch.Tensor] = []
        stride = int(EXTEND_STRIDE * frame_rate)
        prompt_len = 0 if prompt_tokens is None else prompt_tokens.shape[-1]
        if prompt_tokens is not None:
            pieces.append(prompt_tokens)
        while offset + prompt_len < total_len:
            window_len = int(min(duration - offset / frame_rate, window) * frame_rate)
            for attr, melody in zip(attributes, melodies, strict=True):
                if melody is None or int(melody.length.item()) == 0:
                    continue
                # The chroma conditioner sees one window: tile the melody from this window's start.
                start = int(offset / frame_rate * model.sample_rate)
                target = int(window * model.sample_rate)
                positions = torch.arange(start, start + target, device=melody.wav.device) % int(melody.length.item())
                attr.wav["self_wav"] = WavCondition(
                    melody.wav[..., positions],
                    torch.full_like(melody.length, target),
                    melody.sample_rate,
                    [None],
                    [0.0],
                )
            with model.autocast:
                out = sample_fn(
                    model.lm, prompt_tokens, attributes, max_gen_len=window_len, callback=callback, **gen_params
                )
            pieces.append(out if prompt_tokens is None else out[..., prompt_tokens.shape[-1] :])
            prompt_tokens = out[..., stride:]
            prompt_len = prompt_tokens.shape[-1]
            offset += stride
        return torch.cat(pieces, dim=-1)[..., :total_len]
    finally:
        bar.close()


@torch.no_grad()
def decode(model, tokens: torch.Tensor, mbd=None) -> torch.Tensor:
    """`[B, K, T]` tokens to `[B, C, T_samples]` audio; MultiBand Diffusion decodes each stereo channel alone."""
    if mbd is None:
        return model.compression_model.decode(tokens, None)
    compression = model.compression_model
    if compression.channels == 2:
        left, right = compression.get_left_right_codes(tokens)
        return torch.cat([mbd.tokens_to_wav(left), mbd.tokens_to_wav(right)], dim=1)
    return mbd.tokens_to_wav(tokens)


def normalize(wav: torch.Tensor, strategy: str, sample_rate: int) -> torch.Tensor:
    """audiocraft's output normalization (`loudness` with its soft compressor, as Replicate's MusicGen does)."""
    from audiocraft.data.audio_utils import normalize_audio

    wav = wav.float()
    if wav.abs().max() == 0:
        return wav  # nothing to scale; loudness of silence is undefined
    return normalize_audio(
        wav,
        strategy=strategy,
        sample_rate=sample_rate,
        loudness_compressor=True,
        peak_clip_headroom_db=1,
        rms_headroom_db=18,
        loudness_headroom_db=14,
    )


def output_paths(target: str | Path, n: int) -> list[Path]:
    """Where `n` outputs go for a requested file name: `target` itself for one, `<stem>_<i><suffix>` for several."""
    target = Path(target)
    if n == 1:
        return [target]
    return [target.with_name(f"{target.stem}_{i}{target.suffix}") for i in range(n)]


def write_outputs(result: GenerationResult, out_dir: str | Path, fmt: str) -> list[Path]:
    """One file per output: `output.<fmt>`, or `output_<i>.<fmt>` for num_outputs > 1."""
    paths = output_paths(Path(out_dir) / f"output.{fmt}", len(result))
    return [audio.save_audio(path, wav, result.sample_rate, fmt) for path, wav in zip(paths, result.wavs, strict=True)]


@torch.no_grad()
def generate_audio(
    model,
    descriptions: tp.Sequence[str | None],
    duration: float,
    *,
    top_k: int | None = None,
    top_p: float = 0.0,
    temperature: float = 1.0,
    cfg_coef: float = 3.0,
    quantize: str | None = "auto",
    progress: bool = False,
) -> torch.Tensor:
    """`[B, C, T]` audio (decoded with EnCodec, not normalized) of one sample per description, for the trainer.

    The same path as predict: `sampler_for(model, quantize)` (the fast sampler for plain LMs, LoRA-wrapped ones
    included: it reads through the adapters without touching the weights; the style LM's own generate), the same
    windowing beyond `max_duration`, one batch for all descriptions. Uses the global torch RNG (seed it before).
    The LM is put in eval mode for the call and back in its previous mode after. A prepared fast model is built
    per call (the weights may have changed since the last one). Empty descriptions are unconditional.
    `top_k` None: 250 or the codebook size if smaller.
    """
    lm = model.lm
    was_training = lm.training
    lm.eval()
    try:
        gen_params = {
            "use_sampling": True,
            "temp": temperature,
            "top_k": min(250, lm.card) if top_k is None else top_k,
            "top_p": top_p,
            "cfg_coef": cfg_coef,
            "two_step_cfg": False,
        }
        attributes, _ = model._prepare_tokens_and_attributes([d if d else None for d in descriptions], None)
        tokens = sample_windows(
            model, attributes, None, duration, gen_params, sample_fn=sampler_for(model, quantize), progress=progress
        )
        return decode(model, tokens)
    finally:
        lm.train(was_training)
