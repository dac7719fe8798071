"""MusicGen-Style (arXiv 2407.12563): the style conditioner, double classifier-free guidance, and the loader.

audiocraft 1.3.0 (the last release on PyPI) predates MusicGen-Style, so this module implements the pieces it lacks,
with the parameter names and shapes of the released `facebook/musicgen-style` checkpoint (audiocraft's
`StyleConditioner` on its main branch; `tests/data/musicgen_style_keys.json` lists them):

    excerpt of the style audio (1.5-4.5 s, random start)  --frozen feature extractor (MERT-v1-95M, 75 Hz, 768-d)-->
    `embed` (Linear 768 -> d) --> `transformer` (8 layers, d = 512) --> `batch_norm` (no affine) -->
    `rvq` (6 codebooks of 1024; only the first `eval_q` are used at inference) --> keep 1 frame in `ds_factor` (15:
    75 Hz -> 5 Hz) --> `output_proj` (d -> LM dim) --> prepended to the LM input with the text condition.

The feature extractor is not part of the checkpoint (audiocraft downloads `m-a-p/MERT-v1-95M` separately); the
`tiny-style` model uses `TinyFeatureExtractor`, a small seeded stand-in with MERT's interface (24 kHz mono in,
`last_hidden_state` `[B, T_feat, D]` at 75 Hz out).

Everything but the style conditioner is built by audiocraft's own builders; `StyleLMModel` is audiocraft's
`LMModel` plus double classifier-free guidance:

    logits = l_null + cfg_coef * (l_style + beta * (l_text_style - l_style) - l_null)

which pushes the text condition `beta` times harder than the style; `beta = 1` is plain CFG.
"""

from __future__ import annotations

import copy
import logging
import random
import typing as tp
from pathlib import Path

import torch
from audiocraft.data.audio_utils import convert_audio
from audiocraft.models import builders
from audiocraft.models.lm import LMModel, LMOutput
from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout, ConditioningProvider, WaveformConditioner
from audiocraft.modules.transformer import StreamingTransformer
from audiocraft.quantization import ResidualVectorQuantizer
from audiocraft.utils import utils
from omegaconf import DictConfig, OmegaConf
from torch import nn

from core.errors import ModelUnavailableError
from core.hub import hf_cache_hint
from core.sampling import sample_next_token

logger = logging.getLogger(__name__)

STYLE_MODEL = "style"  # the conditioner's `model` name in an LM cfg (`conditioners.<attr>.model`)
STYLE_ATTRIBUTE = "self_wav"
MERT_NAME = "m-a-p/MERT-v1-95M"
MERT_DIM = 768
FEATURE_SAMPLE_RATE = 24000  # MERT's input rate
FEATURE_FRAME_RATE = 75  # MERT's output rate: 24 kHz / 320
EXCERPT_RANGE = (1.5, 4.5)  # seconds: the excerpt lengths MusicGen-Style was trained on

# audiocraft's StyleConditioner transformer scales; `tiny` is ours (tiny-style).
TRANSFORMER_SCALES: dict[str, dict[str, int]] = {
    "xsmall": {"d_model": 256, "num_heads": 8, "num_layers": 4},
    "default": {"d_model": 512, "num_heads": 8, "num_layers": 8},
    "large": {"d_model": 1024, "num_heads": 16, "num_layers": 24},
    "none": {"d_model": 512, "num_heads": 8, "num_layers": 0},
    "tiny": {"d_model": 32, "num_heads": 2, "num_layers": 1},
}


class FeatureOutput(tp.NamedTuple):
    last_hidden_state: torch.Tensor  # [B, T_feat, D]


class TinyFeatureExtractor(nn.Module):
    """A MERT stand-in for offline tests: wav2vec2/MERT's convolutional front end (kernels 10,3,3,3,3,2,2,
    strides 5,2,2,2,2,2,2: 320 samples per frame, so 75 Hz at 24 kHz) with few channels, then a projection.

    Input `[B, T]` at 24 kHz; output `FeatureOutput(last_hidden_state=[B, T_feat, dim])` like MERT's model output.
    Its weights come from `seed` alone (they are not stored in checkpoints, as MERT's are not).
    """

    KERNELS = (10, 3, 3, 3, 3, 2, 2)
    STRIDES = (5, 2, 2, 2, 2, 2, 2)

    def __init__(self, dim: int = 32, channels: int = 16, seed: int = 1234):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # deterministic weights without touching the caller's RNG
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            in_ch = 1
            for kernel, stride in zip(self.KERNELS, self.STRIDES, strict=True):
                layers += [nn.Conv1d(in_ch, channels, kernel, stride, bias=False), nn.GELU()]
                in_ch = channels
            self.conv = nn.Sequential(*layers)
            self.norm = nn.LayerNorm(channels)
            self.proj = nn.Linear(channels, dim)
        self.requires_grad_(False)
        self.eval()

    def forward(self, input_values: torch.Tensor) -> FeatureOutput:
        x = self.conv(input_values[:, None, :])  # [B, channels, T_feat]
        return FeatureOutput(self.proj(self.norm(x.transpose(1, 2))))


def load_mert(device: str | torch.device) -> nn.Module:
    """MERT-v1-95M through transformers (remote code, as audiocraft loads it), or a clear error."""
    try:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(MERT_NAME, trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - one actionable message instead of a hub stack trace
        raise ModelUnavailableError(
            f"MusicGen-Style's feature extractor {MERT_NAME} could not be loaded ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}). Looked in the Hugging Face cache "
            f"{hf_cache_hint()} and on the network. Fix: connect to the network, or download it once "
            f"(`hf download {MERT_NAME}`, into $HF_HOME/hub)."
        ) from None
    model.requires_grad_(False)
    return model.eval().to(device)


class StyleConditioner(WaveformConditioner):
    """The style conditioner, with the submodule names of audiocraft's `StyleConditioner`.

    Args:
        feature_extractor: frozen module mapping `[B, T]` audio at `feature_sample_rate` to an object with
            `last_hidden_state` `[B, T_feat, feature_dim]` at `feature_frame_rate` (MERT, or the tiny stand-in).
            Kept out of the state dict, like audiocraft's.
        feature_dim: its output size (768 for MERT).
        output_dim: the LM's dim. `device`: where conditions are computed.
        sample_rate: rate of the wav conditions (the LM's). `length`: default excerpt length (s).
        transformer_scale: one of `TRANSFORMER_SCALES`. `ds_factor`: keep 1 step in `ds_factor` (75 Hz -> 5 Hz).
        n_q_out, bins, q_dropout, rvq_threshold_ema_dead_code, kmeans_init: the RVQ bottleneck.
        eval_q: codebooks used at inference (1..n_q_out); fewer = a narrower bottleneck, looser style.
        varying_lengths: excerpt length range (s) sampled while training. batch_norm: normalize before the RVQ.
        compute_mask: while training, remember which LM frames the excerpt covers (`excerpt_mask`), so the
            loss can skip them (otherwise the LM learns to copy the excerpt).
        use_middle_of_segment: take the middle excerpt instead of a random one.
        ds_rate_compression: audio samples per LM frame (640 for EnCodec 32 kHz). num_codebooks_lm: LM's K.
    """

    def __init__(
        self,
        *,
        feature_extractor: nn.Module,
        feature_dim: int,
        output_dim: int,
        device: str | torch.device,
        sample_rate: int = 32000,
        length: float = 3.0,
        transformer_scale: str = "default",
        ds_factor: int = 15,
        n_q_out: int = 6,
        eval_q: int = 3,
        q_dropout: bool = True,
        bins: int = 1024,
        varying_lengths: tp.Sequence[float] | None = EXCERPT_RANGE,
        batch_norm: bool = True,
        rvq_threshold_ema_dead_code: float = 0.1,
        kmeans_init: bool = True,
        compute_mask: bool = True,
        use_middle_of_segment: bool = False,
        ds_rate_compression: int = 640,
        num_codebooks_lm: int = 4,
        feature_sample_rate: int = FEATURE_SAMPLE_RATE,
        feature_frame_rate: int = FEATURE_FRAME_RATE,
    ):
        if transformer_scale not in TRANSFORMER_SCALES:
            raise ValueError(f"transformer_scale {transformer_scale!r} is not one of {list(TRANSFORMER_SCALES)}")
        scale = TRANSFORMER_SCALES[transformer_scale]
        dim = scale["d_model"]
        super().__init__(dim=dim, output_dim=output_dim, device=device)  # -> `output_proj`
        # Registered in audiocraft's order (embed, transformer, rvq, batch_norm): the state dict lists the same.
        self.embed = nn.Linear(feature_dim, dim)
        self.transformer: nn.Module | None = None
        if scale["num_layers"] > 0:
            self.transformer = StreamingTransformer(
                d_model=dim,
                num_heads=scale["num_heads"],
                num_layers=scale["num_layers"],
                dim_feedforward=4 * dim,
                memory_efficient=True,
                activation="gelu",
                norm_first=True,
                causal=False,
                layer_scale=None,
                bias_ff=False,
                bias_attn=False,
            )
        self.rvq: nn.Module | None = None
        if n_q_out > 0:
            self.rvq = ResidualVectorQuantizer(
                dim,
                n_q=n_q_out,
                q_dropout=q_dropout,
                bins=bins,
                threshold_ema_dead_code=rvq_threshold_ema_dead_code,
                kmeans_init=kmeans_init,
            )
        self.batch_norm = nn.BatchNorm1d(dim, affine=False) if batch_norm else None
        # Not a submodule: frozen, not in checkpoints, and never moved by dtype casts of the LM.
        self.__dict__["feature_extractor"] = feature_extractor.to(device)
        self.feature_dim = feature_dim
        self.sample_rate = sample_rate
        self.feature_sample_rate = feature_sample_rate
        self.feature_frame_rate = feature_frame_rate
        self.length_subwav = int(length * sample_rate)
        self.ds_factor = ds_factor
        self.n_q_out = n_q_out
        self.eval_q = eval_q
        self.q_dropout = q_dropout
        self.varying_lengths = tuple(varying_lengths) if varying_lengths else None
        self.compute_mask = compute_mask
        self.use_middle_of_segment = use_middle_of_segment
        self.ds_rate_compression = ds_rate_compression
        self.num_codebooks_lm = num_codebooks_lm
        self.frozen = False
        # (start, length) in samples of the last excerpt, per forward pass (one excerpt window per batch).
        self.last_excerpt: tuple[int, int] | None = None
        # Training: a callable WavCondition -> WavCondition putting each example's audio into the batch (whose
        # wav conditions carry only the clip path and crop start); see training/style.py.
        self.audio_source: tp.Callable[[tp.Any], tp.Any] | None = None

    # ---------------------------------------------------------------------------------------- settings

    def set_params(self, eval_q: int | None = None, excerpt_length: float | None = None) -> None:
        """Inference settings: `eval_q` codebooks (1..n_q_out), excerpt of `excerpt_length` seconds."""
        if eval_q is not None:
            if not 1 <= eval_q <= max(self.n_q_out, 1):
                raise ValueError(f"eval_q must be in 1..{self.n_q_out}, got {eval_q}")
            self.eval_q = int(eval_q)
        if excerpt_length is not None:
            if excerpt_length <= 0:
                raise ValueError(f"excerpt_length must be positive, got {excerpt_length}")
            self.length_subwav = int(excerpt_length * self.sample_rate)

    def freeze(self) -> None:
        """Fine-tuning: no gradients, no BatchNorm/codebook updates, no dropout; the excerpt stays random
        (random start and length in `varying_lengths`) and, with `q_dropout`, so does the number of
        codebooks, as when the model was trained."""
        self.frozen = True
        self.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> StyleConditioner:
        super().train(mode)
        if self.frozen:
            for module in self.children():
                module.eval()
        return self

    def tokenize(self, x: tp.Any) -> tp.Any:
        if self.training and self.audio_source is not None:
            x = self.audio_source(x)
        return super().tokenize(x)

    def _downsampling_factor(self) -> float:
        """Audio samples per condition step."""
        return self.sample_rate / self.feature_frame_rate * self.ds_factor

    # ------------------------------------------------------------------------------------------ forward

    def _excerpt(self, wav: torch.Tensor) -> torch.Tensor:
        """`[B, C, T]` -> `[B, C, L]`: one excerpt window for the whole batch, as audiocraft takes it."""
        total = wav.shape[-1]
        length = self.length_subwav
        if self.training and self.varying_lengths:
            length = int(random.uniform(*self.varying_lengths) * self.sample_rate)
            length = min(length, total)  # a short training clip: the whole clip is the excerpt
        elif length > total:
            raise ValueError(
                f"the style excerpt ({length / self.sample_rate:.2f} s) is longer than the style audio "
                f"({total / self.sample_rate:.2f} s): shorten the excerpt or give a longer audio"
            )
        start = (total - length) // 2 if self.use_middle_of_segment else random.randint(0, total - length)
        self.last_excerpt = (start, length)
        return wav[..., start : start + length]

    def style_embedding(self, x: tp.Any) -> torch.Tensor:
        """`WavCondition` -> `[B, S, dim]` quantized style steps at `sample_rate / _downsampling_factor()` Hz."""
        wav = x.wav
        if wav.shape[-1] <= 1:  # every item is a null condition: one step, masked out by forward()
            self.last_excerpt = None
            return torch.zeros(wav.shape[0], 1, self.dim, device=wav.device, dtype=self.embed.weight.dtype)
        excerpt = self._excerpt(wav)
        rate = int(x.sample_rate[0]) if x.sample_rate else self.sample_rate
        extractor = self.__dict__["feature_extractor"]
        with torch.no_grad():
            first = next(extractor.parameters(), None)
            if first is not None and first.device != excerpt.device:
                extractor.to(excerpt.device)
            mono = convert_audio(excerpt.float(), rate, self.feature_sample_rate, 1)[:, 0]  # [B, L']
            feats = extractor(mono.to(first.dtype if first is not None else torch.float32)).last_hidden_state
        z = self.embed(feats.to(self.embed.weight))
        if self.transformer is not None:
            z = self.transformer(z)
        if self.batch_norm is not None:
            z = self.batch_norm(z.transpose(1, 2)).transpose(1, 2)
        if self.rvq is not None:
            if self.training and self.q_dropout and self.frozen:
                # The frozen RVQ runs in eval mode (no codebook updates), so its own q_dropout is off: draw it.
                n_q = int(torch.randint(1, self.n_q_out + 1, (1,)).item())
            elif self.training:
                n_q = self.n_q_out  # the RVQ draws 1..n_q_out itself when q_dropout is set
            else:
                n_q = self.eval_q
            self.rvq.set_num_codebooks(n_q)
            z = self.rvq(z.transpose(1, 2), frame_rate=1).x.transpose(1, 2)
        return z[:, :: self.ds_factor]

    def forward(self, x: tp.Any) -> tuple[torch.Tensor, torch.Tensor]:
        """`WavCondition` (`wav` `[B, 1, T]`, `length` `[B]`) -> (`[B, S, output_dim]`, mask `[B, S]`)."""
        embeds = self.style_embedding(x)
        embeds = self.output_proj(embeds.to(self.output_proj.weight))
        lengths = x.length.to(embeds.device) / self._downsampling_factor()
        mask = utils.length_to_mask(lengths, max_len=embeds.shape[1]).int()
        return embeds * mask.unsqueeze(-1), mask

    def excerpt_mask(self, batch: int, n_frames: int) -> torch.Tensor | None:
        """`[B, K, T]` bool, False on the LM frames the last training excerpt covered (None when unknown)."""
        if self.last_excerpt is None or not self.compute_mask:
            return None
        start, length = self.last_excerpt
        mask = torch.ones(batch, self.num_codebooks_lm, n_frames, dtype=torch.bool)
        first = start // self.ds_rate_compression
        mask[:, :, first : first + length // self.ds_rate_compression] = False
        return mask


def style_conditioners(lm: tp.Any) -> dict[str, StyleConditioner]:
    return {k: v for k, v in lm.condition_provider.conditioners.items() if isinstance(v, StyleConditioner)}


# --------------------------------------------------------------------------------------------- builders

# Keys of audiocraft's style config that do not apply to the MERT / tiny feature extractors we support.
_IGNORED_KEYS = ("model_name", "encodec_checkpoint", "encodec_n_q", "feature_dim", "extractor")


def build_style_conditioner(
    style_cfg: dict,
    output_dim: int,
    device: str | torch.device,
    feature_extractor: tuple[nn.Module, int] | None = None,
) -> StyleConditioner:
    """The builder hook: a `StyleConditioner` from `conditioners.<attr>.style` of an LM cfg.

    `model_name: mert` loads MERT-v1-95M (the released model); `model_name: tiny` builds `TinyFeatureExtractor`
    from `extractor: {dim, channels, seed}`. `feature_extractor` = (module, feature_dim) uses a ready extractor
    instead (e.g. a MERT already in memory).
    """
    cfg = dict(style_cfg)
    name = cfg.get("model_name", "mert")
    if feature_extractor is not None:
        extractor, feature_dim = feature_extractor
    elif name == "mert":
        extractor, feature_dim = load_mert(device), MERT_DIM
    elif name == "tiny":
        params = dict(cfg.get("extractor") or {})
        extractor = TinyFeatureExtractor(**params)
        feature_dim = int(params.get("dim", 32))
    else:
        raise ValueError(
            f"style feature extractor {name!r} is not supported (only 'mert', as in facebook/musicgen-style, "
            "and 'tiny' for tests)"
        )
    kwargs = {k: v for k, v in cfg.items() if k not in _IGNORED_KEYS}
    if kwargs.get("varying_lengths") is not None:
        kwargs["varying_lengths"] = list(kwargs["varying_lengths"])
    return StyleConditioner(
        feature_extractor=extractor, feature_dim=feature_dim, output_dim=output_dim, device=device, **kwargs
    )


def _plain(cfg: tp.Any) -> dict:
    if isinstance(cfg, DictConfig):
        return tp.cast(dict, OmegaConf.to_container(cfg, resolve=True))
    if isinstance(cfg, str):
        return tp.cast(dict, OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
    return copy.deepcopy(dict(cfg))


def is_style_cfg(cfg: tp.Any) -> bool:
    """Whether an LM cfg (dict, DictConfig or YAML string) has a style conditioner."""
    conditioners = (_plain(cfg).get("conditioners") or {}).items()
    return any(isinstance(c, dict) and c.get("model") == STYLE_MODEL for _, c in conditioners)


def build_style_lm(cfg: tp.Any, feature_extractor: tuple[nn.Module, int] | None = None) -> StyleLMModel:
    """A `StyleLMModel` from an LM cfg: audiocraft's builders make the fuser, the other conditioners, the
    pattern and the transformer arguments exactly as `builders.get_lm_model` does; we add the style conditioner.

    `cfg.device` and `cfg.dtype` are used as given; `feature_extractor` as in `build_style_conditioner`.
    """
    plain = _plain(cfg)
    if plain.get("lm_model", "transformer_lm") != "transformer_lm":
        raise ValueError(f"style models are transformer_lm models, got lm_model={plain.get('lm_model')!r}")
    device = plain.get("device", "cpu")
    all_conditioners = plain.get("conditioners") or {}
    style_names = [k for k, c in all_conditioners.items() if isinstance(c, dict) and c.get("model") == STYLE_MODEL]
    others = {k: v for k, v in all_conditioners.items() if k not in style_names}
    full = OmegaConf.create(plain)
    kwargs = utils.dict_from_config(full.transformer_lm)
    n_q = kwargs["n_q"]
    q_modeling = kwargs.pop("q_modeling", None)
    dropout_cfg = utils.dict_from_config(full.classifier_free_guidance)
    attribute_dropout = utils.dict_from_config(full.attribute_dropout) if full.get("attribute_dropout") else {}
    fuser = builders.get_condition_fuser(full)
    if len(fuser.fuse2cond["cross"]) > 0:
        kwargs["cross_attention"] = True

    rest_cfg = OmegaConf.create({**plain, "conditioners": others})
    rest = builders.get_conditioner_provider(kwargs["dim"], rest_cfg)
    conditioners: dict[str, nn.Module] = {}
    for name in all_conditioners:
        if name in style_names:
            style_cfg = {"num_codebooks_lm": n_q, **all_conditioners[name][STYLE_MODEL]}
            conditioners[name] = build_style_conditioner(style_cfg, kwargs["dim"], device, feature_extractor)
        elif name in rest.conditioners:
            conditioners[name] = rest.conditioners[name]
    provider = ConditioningProvider(conditioners, device=device).to(device)

    pattern_cfg = full.codebooks_pattern
    if pattern_cfg.modeling is None:
        if q_modeling is None:
            raise ValueError("the LM cfg defines neither codebooks_pattern.modeling nor transformer_lm.q_modeling")
        pattern_cfg = OmegaConf.create({"modeling": q_modeling, "delay": {"delays": list(range(n_q))}})
    pattern_provider = builders.get_codebooks_pattern_provider(n_q, pattern_cfg)
    return StyleLMModel(
        pattern_provider=pattern_provider,
        condition_provider=provider,
        fuser=fuser,
        cfg_dropout=dropout_cfg["training_dropout"],
        cfg_coef=dropout_cfg["inference_coef"],
        attribute_dropout=attribute_dropout,
        dtype=getattr(torch, plain.get("dtype", "float32")),
        device=device,
        **kwargs,
    ).to(device)


# --------------------------------------------------------------------------------------- double CFG


def double_cfg_logits(
    cond: torch.Tensor, style: torch.Tensor, null: torch.Tensor, cfg_coef: float, beta: float
) -> torch.Tensor:
    """MusicGen-Style's double classifier-free guidance (paper section 4.3).

    `l_null + cfg_coef * (l_style + beta * (l_cond - l_style) - l_null)`, written as
    `l_null + cfg_coef * ((l_cond - l_null) + (beta - 1) * (l_cond - l_style))` so that beta = 1 gives exactly
    the single-CFG value `l_null + cfg_coef * (l_cond - l_null)`, bit for bit.
    """
    return null + cfg_coef * ((cond - null) + (beta - 1.0) * (cond - style))


def drop_text(conditions: list) -> list:
    """Copies of `conditions` without any text (style only): the `l_style` branch of double CFG."""
    out = copy.deepcopy(conditions)
    for attributes in out:
        for name in attributes.text:
            attributes.text[name] = None
    return out


class StyleLMModel(LMModel):
    """audiocraft's `LMModel` plus `cfg_coef_beta` (double classifier-free guidance) in `generate`, and, while
    training, no loss on the frames the style excerpt was taken from (`compute_predictions`' mask)."""

    _double_cfg: tuple[dict, float, float] | None = None

    def compute_predictions(  # type: ignore[override]
        self,
        codes: torch.Tensor,
        conditions: list,
        condition_tensors: dict | None = None,
        stage: int = -1,
        keep_only_valid_steps: bool = True,
    ) -> LMOutput:
        """As `LMModel.compute_predictions`; in training, the mask `[B, K, T]` is also False where the style
        excerpt of this batch lies (audiocraft's solver does the same: otherwise the LM learns to copy it).
        Call it after computing this batch's `condition_tensors`."""
        output = super().compute_predictions(codes, conditions, condition_tensors, stage, keep_only_valid_steps)
        if not self.training:
            return output
        mask = output.mask
        for conditioner in style_conditioners(self).values():
            excerpt = conditioner.excerpt_mask(codes.shape[0], codes.shape[-1])
            if excerpt is not None:
                mask = mask & excerpt.to(mask.device)
        return LMOutput(output.logits, mask)

    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        prompt: torch.Tensor | None = None,
        conditions: list | None = None,
        num_samples: int | None = None,
        max_gen_len: int = 256,
        use_sampling: bool = True,
        temp: float = 1.0,
        top_k: int = 250,
        top_p: float = 0.0,
        cfg_coef: float | None = None,
        two_step_cfg: bool | None = None,
        remove_prompts: bool = False,
        check: bool = False,
        callback: tp.Callable[[int, int], None] | None = None,
        cfg_coef_beta: float | None = None,
        **kwargs: tp.Any,
    ) -> torch.Tensor:
        """`[B, K, T]` tokens; `cfg_coef_beta=None`: audiocraft's generation (single CFG), else double CFG
        with three conditions per item: text + style, style only, none."""
        conditions = list(conditions or [])
        common = {
            "max_gen_len": max_gen_len,
            "use_sampling": use_sampling,
            "temp": temp,
            "top_k": top_k,
            "top_p": top_p,
            "cfg_coef": cfg_coef,
            "remove_prompts": remove_prompts,
            "check": check,
            "callback": callback,
        }
        if cfg_coef_beta is None or not conditions:
            return super().generate(prompt, conditions, num_samples, two_step_cfg=two_step_cfg, **common)
        if two_step_cfg:
            logger.info("two_step_cfg is ignored with double classifier-free guidance")
        null = ClassifierFreeGuidanceDropout(p=1.0)(conditions)
        tokenized = self.condition_provider.tokenize(conditions + drop_text(conditions) + null)
        tensors = self.condition_provider(tokenized)
        coef = self.cfg_coef if cfg_coef is None else cfg_coef
        self._double_cfg = (tensors, float(coef), float(cfg_coef_beta))
        try:
            samples = len(conditions) if prompt is None else None
            return super().generate(prompt, [], samples, two_step_cfg=False, **common)
        finally:
            self._double_cfg = None

    def _sample_next_token(  # type: ignore[override]
        self,
        sequence: torch.Tensor,
        cfg_conditions: tp.Any,
        unconditional_state: tp.Any,
        use_sampling: bool = False,
        temp: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        cfg_coef: float | None = None,
        two_step_cfg: bool | None = None,
    ) -> torch.Tensor:
        """`[B, K, S]` -> next token `[B, K, 1]`; one forward pass over the three condition sets."""
        if self._double_cfg is None:
            return super()._sample_next_token(
                sequence, cfg_conditions, unconditional_state, use_sampling, temp, top_k, top_p,
                cfg_coef=cfg_coef, two_step_cfg=two_step_cfg,
            )  # fmt: skip
        tensors, coef, beta = self._double_cfg
        batch = sequence.shape[0]
        model = self if self._fsdp is None else self._fsdp
        all_logits = model(torch.cat([sequence] * 3, dim=0), conditions=[], condition_tensors=tensors)
        cond, style, null = all_logits.split(batch, dim=0)  # [B, K, S, card] each
        logits = double_cfg_logits(cond, style, null, coef, beta)
        logits = logits.permute(0, 1, 3, 2)[..., -1]  # [B, K, card]
        # The same sampling as LMModel._sample_next_token (same RNG draws): beta = 1 reproduces it.
        return sample_next_token(logits, use_sampling, temp, top_k, top_p)


# ----------------------------------------------------------------------------------------------- loading


def read_lm_package(location: str | Path) -> dict:
    """`state_dict.bin`'s package from a model folder, a file, or a Hugging Face id (audiocraft's loader)."""
    path = Path(location)
    if path.is_dir():
        path = path / "state_dict.bin"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    from audiocraft.models.loaders import load_lm_model_ckpt

    return load_lm_model_ckpt(str(location))


def peek_lm_cfg(folder: str | Path) -> dict | None:
    """The LM cfg of a model folder without reading its weights into memory (None when unreadable)."""
    path = Path(folder) / "state_dict.bin"
    try:
        pkg = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return _plain(pkg["xp.cfg"])
    except Exception:  # noqa: BLE001 - an unreadable folder is reported by the regular loader
        return None


def is_style_folder(folder: str | Path) -> bool:
    cfg = peek_lm_cfg(folder)
    return cfg is not None and is_style_cfg(cfg)


def load_style_lm(location: str | Path, device: str | torch.device = "cpu", pkg: dict | None = None) -> tp.Any:
    """A `StyleLMModel` in eval mode with the checkpoint's weights (strict: every name and shape must match)."""
    pkg = pkg if pkg is not None else read_lm_package(location)
    cfg = _plain(pkg["xp.cfg"])
    cfg["device"] = str(device)
    cfg["dtype"] = "float32" if str(device) == "cpu" else "float16"  # as audiocraft's load_lm_model
    lm = build_style_lm(cfg)
    lm.load_state_dict(pkg["best_state"])
    lm.eval()
    lm.cfg = OmegaConf.create(cfg)
    return lm


def load_style_musicgen(location: str, device: str | torch.device = "cpu", name: str | None = None) -> tp.Any:
    """audiocraft's `MusicGen` around a `StyleLMModel` and the checkpoint's compression model."""
    from audiocraft.models import MusicGen
    from audiocraft.models.loaders import load_compression_model

    lm = load_style_lm(location, device)
    compression = load_compression_model(str(location), device=device)
    return MusicGen(name or str(location), compression, lm)


def freeze_style_conditioners(lm: tp.Any) -> dict[str, StyleConditioner]:
    """Freeze the style conditioners of `lm` for fine-tuning (see `StyleConditioner.freeze`); returns them."""
    conditioners = style_conditioners(lm)
    for conditioner in conditioners.values():
        conditioner.freeze()
    return conditioners
