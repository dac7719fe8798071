"""Text-to-music, melody, continuation, stereo and long outputs on audiocraft's MusicGen.

`Generator` owns the loaded model (swapped only when the requested weights change) and turns `PredictParams`
into audio: validate (`generation.request`) → pick the model → build conditions → sample tokens at the request's
`sampler_precision` (windowed beyond the model's 30 s: `generation.windows`) → decode (EnCodec or MultiBand
Diffusion) → normalize.

`num_outputs` samples of one request are one batch through the sampler (`[N, K, T]`): every step reads each weight
once for all of them. They are drawn from one random stream seeded by `seed`, so the same seed and `num_outputs`
give the same outputs again, and the outputs differ from each other.

`generate_audio(model, descriptions, duration, sampler_precision=...)` is the same path for the trainer (report
samples, prior-preservation examples, evaluation samples): the sampler predict uses (`sampler_for`), the same
windowing and decoding.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import audio, versions, weights
from core.catalogue import SAMPLER_PRECISIONS
from core.devices import default_device
from core.loaded import LoadedModel
from core.params import InputError
from generation import families
from generation.fast import FastSampler, default_quantize, unsupported_reason
from generation.params import DEFAULT_BASE, FINE_TUNED, PredictParams
from generation.request import (
    bounded_prompt,
    check_sampler_precision,
    load_input_audio,
    validate_for_model,
    validate_for_version,
    validate_request,
)
from generation.windows import SampleFn, lm_generate, sample_windows

logger = logging.getLogger(__name__)
LOUDNESS_BLOCK_S = 0.4  # the gating block of loudness measurement (ITU-R BS.1770), in seconds

__all__ = [
    "GenerationResult",
    "ModelKey",
    "model_key",
    "Generator",
    "sampler_quantize",
    "resolved_precision",
    "sampler_for",
    "generate_tokens",
    "build_conditions",
    "replicate",
    "decode",
    "normalize",
    "output_paths",
    "write_outputs",
    "generate_audio",
    # checks of a request, re-exported from generation.request (Generator.generate runs them)
    "bounded_prompt",
    "load_input_audio",
    "validate_request",
]


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


def resolve_seed(seed: int | None) -> int:
    if seed is None or seed == -1:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        logger.info("Random seed: %d", seed)
    return seed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sampler_quantize(sampler_precision: str) -> str | None:
    """The fast sampler's `quantize` for a `sampler_precision` choice (`none`: None, the LM's own precision)."""
    if sampler_precision not in SAMPLER_PRECISIONS:
        raise ValueError(f"sampler_precision={sampler_precision!r} is not one of: {', '.join(SAMPLER_PRECISIONS)}")
    return None if sampler_precision == "none" else sampler_precision


def resolved_precision(model, sampler_precision: str) -> str:
    """The precision `model`'s tokens are sampled at for a `sampler_precision` choice: `auto` resolved for the LM's
    device (`int8` on CPU, `fp16` on CUDA), and `none` where the fast sampler does not run (an LM with its own
    generate, such as MusicGen-Style's, or a configuration it does not implement). What finetune.json and the
    prior-example cache record."""
    quantize = sampler_quantize(sampler_precision)
    lm = model.lm
    if not _plain_lm(lm) or unsupported_reason(lm) is not None:
        return "none"
    if quantize == "auto":
        quantize = default_quantize(next(iter(lm.parameters())).device)
    return quantize or "none"


class Generator:
    """Loads models on demand (one at a time) and generates."""

    def __init__(
        self,
        device: str | None = None,
        setup_weights: str | None = None,
        *,
        min_free_bytes: int = weights.DEFAULT_MIN_FREE_BYTES,
        free_bytes: weights.FreeBytes | None = None,
    ):
        self.device = device or default_device()
        self.setup_weights = setup_weights
        # The weights cache keeps this much disk free (least-recently-used eviction, core.weights.evict); the
        # weights loaded now and the setup weights (COG_WEIGHTS) are never evicted.
        self.min_free_bytes = min_free_bytes
        self.free_bytes = free_bytes
        self._protected: set[Path] = set()
        self._key: ModelKey | None = None
        self._model: LoadedModel | None = None
        self._mbd = None
        self._sampler: FastSampler | None = None
        self._sampler_precision = "auto"  # what a model is prepared at when it loads: the last request's choice

    def sampler(self, sampler_precision: str | None = None) -> FastSampler:
        """The fast sampler (generation/fast.py) at `sampler_precision` (a `PredictParams.sampler_precision` choice;
        None: the current one, `auto` at first).

        One is kept at a time: a request at another precision replaces it, and its prepared copies of the model
        (int8 / half weights) go with it, so memory holds one copy whatever the requests ask.
        """
        precision = self._sampler_precision if sampler_precision is None else sampler_precision
        if self._sampler is None or precision != self._sampler_precision:
            if self._sampler is not None:
                logger.info(
                    "sampler_precision=%s (was %s): preparing the model at that precision",
                    precision,
                    self._sampler_precision,
                )
            self._sampler = FastSampler(quantize=sampler_quantize(precision))
            self._sampler_precision = precision
        return self._sampler

    def open_weights(self, key: ModelKey) -> weights.OpenedWeights | None:
        """Fetch, unpack and check the weights of `key` (`core.weights.open_weights`) while the model loaded now
        still serves: a reference that is not a tar, missing, corrupt or cancelled fails here and leaves it loaded.
        None when `key` needs no loading (loaded now, or not weights)."""
        if key.kind != "weights" or key == self._key:
            return None
        if self._key is not None and (self._key.kind, self._key.ref) == (key.kind, key.ref):
            return None  # only lora_scale changed: model_for re-folds the adapter (or ignores it) on the loaded model
        previous = self._model.weights_folder if self._model is not None else None
        keep = {*self._protected, *([previous] if previous else [])}
        return weights.open_weights(key.ref, keep=keep, min_free_bytes=self.min_free_bytes, free_bytes=self.free_bytes)

    def model_for(self, key: ModelKey, opened: weights.OpenedWeights | None = None) -> LoadedModel:
        """The model of `key`, loaded if it is not the one loaded now (`opened`: its weights from `open_weights`).
        A new `lora_scale` on the loaded LoRA weights re-folds their adapter on the loaded base (no reload).

        Whatever fails in a load, the next request finds the generator as if it were the first: either the model
        loaded before is untouched (a failure while the weights are fetched and checked) or no model and no key at
        all (a failure while the new model is built, after the old one was freed), so the next request loads again.
        """
        if key == self._key and self._model is not None:
            return self._model
        loaded = self._model
        if loaded is not None and self._key is not None and (self._key.kind, self._key.ref) == (key.kind, key.ref):
            if loaded.adapter is None:
                # Only lora_scale changed, and these weights are no LoRA adapter: nothing to re-apply.
                logger.warning("lora_scale=%g is ignored: %s are not LoRA weights", key.lora_scale, key.ref[:80])
            else:
                self._rescale(loaded, key)
            self._key = key
            return loaded
        if key.kind == "weights" and opened is None:
            opened = self.open_weights(key)
        # Free the previous model before building the next one (two may not fit on a GPU), and its key with it.
        if self._model is not None and self._sampler is not None:
            self._sampler.forget(self._model.lm)
        self._model, self._key = None, None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        model = None
        try:
            if opened is not None:
                model = weights.load_trained_model(opened, device=self.device, lora_scale=key.lora_scale)
            else:
                model = versions.load_musicgen(key.ref, device=self.device)
            if _plain_lm(model.lm):
                self.sampler().prepare(model.lm)  # quantize once here (setup), not in the first request
        except BaseException:
            if model is not None and self._sampler is not None:
                self._sampler.forget(model.lm)
            raise
        if opened is not None and key.ref == self.setup_weights:
            self._protected.add(Path(opened.folder))
        self._model, self._key = model, key
        _log_loaded(key, opened)
        return model

    def _rescale(self, loaded: LoadedModel, key: ModelKey) -> None:
        """Re-fold `loaded`'s LoRA adapter at `key.lora_scale` and re-prepare the sampler's copy of the LM (its
        int8 / half weights were made from the previous fold). A failure leaves no model loaded: the next request
        loads again."""
        logger.info("lora_scale changed to %g: re-folding the adapter on the loaded base", key.lora_scale)
        try:
            if self._sampler is not None:
                self._sampler.forget(loaded.lm)
            assert loaded.adapter is not None
            loaded.adapter.set_scale(key.lora_scale)
            if _plain_lm(loaded.lm):
                self.sampler().prepare(loaded.lm)
        except BaseException:
            self._model, self._key = None, None
            raise

    @property
    def loaded_weights(self) -> Path | None:
        """The folder of the fine-tuned weights loaded now (None for a base model): never evicted."""
        return self._model.weights_folder if self._model is not None else None

    def preload(self, base: str | None = DEFAULT_BASE) -> None:
        """Load what `setup()` should: the COG_WEIGHTS fine-tune (failing loudly: the deployment is unusable
        without it), else the model version `base` (predict.py reads it from `MGFT_PRELOAD`; empty or None: none).

        The base is preloaded only when it is already on disk (for hub models, the local Hugging Face cache is
        checked first, without any request), and then from the cache alone (`versions.hub_offline`): otherwise one
        line is logged and models load on the first request, so a setup with an unreachable hub takes no time
        waiting for it.
        """
        if self.setup_weights:
            self.model_for(ModelKey("weights", self.setup_weights))
            return
        if not base:
            return
        try:
            source = versions.resolve(base)
            if source.kind == "hf" and not versions.hub_cached(source.location):
                logger.warning(
                    "Not preloading %s: %s is not in the local Hugging Face cache (%s); models load on the first "
                    "request (set MGFT_PRELOAD= to skip this check)",
                    base,
                    source.location,
                    versions.hf_cache_hint(),
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
        inputs = families.load_inputs(params)  # what each family reads beyond the prompt: style_audio
        validate_request(params, input_audio)
        families.validate_request(params, inputs)
        check_sampler_precision(params.sampler_precision, self.device)
        key = model_key(params, self.setup_weights)
        if key.kind == "version":
            validate_for_version(params, key.ref, input_audio, inputs)
        opened = self.open_weights(key)  # the model loaded now serves on until these weights passed every check
        if opened is not None:
            validate_for_version(params, opened.base, input_audio, inputs)
        sampler = self.sampler(params.sampler_precision)  # before loading: a new model is prepared at this one
        loaded = self.model_for(key, opened)
        model = loaded.musicgen
        validate_for_model(params, model, input_audio, name=loaded.name)
        families.validate_for_model(params, model, input_audio, inputs, name=loaded.name)
        mbd = self.mbd(model) if params.multi_band_diffusion else None

        if sample_fn is None and _plain_lm(model.lm):  # LMs with their own generate (style: double CFG) keep it
            sample_fn = sampler
        seed = resolve_seed(params.seed)
        seed_everything(seed)
        tokens = generate_tokens(
            model, params, input_audio, sample_fn=sample_fn, progress=progress, inputs=inputs
        )  # [N, K, T]
        wavs = decode(model, tokens, mbd)  # [N, C, T]
        wavs = torch.stack([normalize(wav, params.normalization_strategy, model.sample_rate) for wav in wavs])
        return GenerationResult(wavs=wavs.cpu(), sample_rate=model.sample_rate, seed=seed, codes=tokens.cpu())


def _log_loaded(key: ModelKey, opened: weights.OpenedWeights | None) -> None:
    """One line per load: which weights (path, URL or repo as given), their base model and adapter."""
    if opened is None:
        logger.info("Loaded model_version %s", key.ref)
        return
    adapter = ""
    if opened.lora:
        adapter = f", LoRA adapter at lora_scale {key.lora_scale:g}"
    elif opened.adapter:
        adapter = ", learned embeddings on the base"
    logger.info(
        "Loaded weights %s (base model %s, method %s%s) from %s",
        opened.label,
        opened.base or "unknown",
        opened.method,
        adapter,
        opened.folder,
    )


def _plain_lm(lm) -> bool:
    from audiocraft.models.lm import LMModel

    return type(lm).generate is LMModel.generate


def sampler_for(model, sampler_precision: str = "auto") -> SampleFn:
    """The sampler predict uses for `model` at `sampler_precision`: the fast path (`generation.fast.FastSampler`,
    which itself falls back to `lm.generate` for configurations it does not implement) for plain LMs; the LM's own
    `generate` for LMs that override it (MusicGen-Style's double classifier-free guidance)."""
    if not _plain_lm(model.lm):
        return lm_generate
    return FastSampler(quantize=sampler_quantize(sampler_precision))


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
    inputs: dict | None = None,
):
    """(attributes, prompt_tokens `[1, K, T]` or None) for one sample, as the model's family builds them
    (`generation.families`; `inputs`: the family inputs `families.load_inputs` loaded)."""
    return families.family_of(model).build_conditions(model, params, input_audio, inputs or {})


@torch.no_grad()
def generate_tokens(
    model,
    params: PredictParams,
    input_audio: tuple[torch.Tensor, int] | None,
    *,
    sample_fn: SampleFn | None = None,
    progress: bool = True,
    inputs: dict | None = None,
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
        **families.family_of(model).gen_params(model, params),
    }
    attributes, prompt_tokens = build_conditions(model, params, input_audio, inputs)
    attributes, prompt_tokens = replicate(attributes, prompt_tokens, params.num_outputs)
    return sample_windows(
        model, attributes, prompt_tokens, params.duration, gen_params, sample_fn=sample_fn, progress=progress
    )


@torch.no_grad()
def decode(model, tokens: torch.Tensor, mbd=None) -> torch.Tensor:
    """`[B, K, T]` tokens to `[B, C, T_samples]` audio; MultiBand Diffusion decodes each stereo channel alone.

    One output at a time: the decoder's activations at the audio rate dominate memory (issue 24 measured 8 x 150 s
    decoded at once at 7.2 GB, 8 x 300 s at 13.6 GB), so the peak is one output's whatever the batch
    (`generation.request.decode_bytes`, which the request's memory check counts)."""
    if tokens.shape[0] > 1:
        return torch.cat([decode(model, tokens[i : i + 1], mbd) for i in range(tokens.shape[0])])
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
    if strategy == "loudness" and wav.shape[-1] < LOUDNESS_BLOCK_S * sample_rate:
        # ITU-R BS.1770 loudness is measured over 400 ms blocks: torchaudio refuses anything shorter
        logger.warning(
            "normalization_strategy=loudness: %.2f s of audio is shorter than loudness's %.1f s measurement "
            "block; normalized by peak instead",
            wav.shape[-1] / sample_rate,
            LOUDNESS_BLOCK_S,
        )
        strategy = "peak"
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
    sampler_precision: str = "auto",
    progress: bool = False,
    melody_wavs: tp.Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """`[B, C, T]` audio (decoded with EnCodec, not normalized) of one sample per description, for the trainer.

    The same path as predict: `sampler_for(model, sampler_precision)` (the fast sampler for plain LMs, LoRA-wrapped
    ones included: it reads through the adapters without touching the weights; the style LM's own generate), the
    same windowing beyond `max_duration`, one batch for all descriptions. Uses the global torch RNG (seed it before).
    The LM is put in eval mode for the call and back in its previous mode after. A prepared fast model is built
    per call (the weights may have changed since the last one). Empty descriptions are unconditional.
    `top_k` None: 250 or the codebook size if smaller. `melody_wavs`: one `[C, T]` audio (at the model's rate and
    channels) or None per description, the `self_wav` condition as predict gives it (a melody model's melody, a
    style model's style audio).
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
        texts = [d if d else None for d in descriptions]
        attributes, _ = model._prepare_tokens_and_attributes(texts, None, melody_wavs=melody_wavs)
        tokens = sample_windows(
            model,
            attributes,
            None,
            duration,
            gen_params,
            sample_fn=sampler_for(model, sampler_precision),
            progress=progress,
        )
        return decode(model, tokens)
    finally:
        lm.train(was_training)
