"""The transformers format: a MusicGen as Hugging Face transformers' `MusicgenForConditionalGeneration` (text and
stereo) or `MusicgenMelodyForConditionalGeneration` (melody), out and in.

Beside the tar format (`core/weights/format.py`), this is the other way our fine-tunes travel: a folder holding
`config.json` + `model.safetensors` (+ the T5 tokenizer and the feature extractor, as the facebook/musicgen-* repos
on the hub hold them), which `from_pretrained`, the `text-to-audio` pipeline and PEFT read.

How audiocraft's modules correspond to transformers' (weights are copied, never recomputed):
- LM (`LMModel`, audiocraft's names) -> `decoder` (`MusicgenForCausalLM`): `emb[k]` -> `embed_tokens[k]` (card + 1
  rows: the special token is `card` in both), each layer's packed `in_proj_weight` `[3 * dim, dim]` -> `q_proj`,
  `k_proj`, `v_proj`, `norm1/norm_cross/norm2` -> `self_attn/encoder_attn/final_layer_norm`, `linear1/2` ->
  `fc1/2`, `out_norm` -> `layer_norm`, `linears[k]` -> `lm_heads[k]`. Both use the same sinusoidal positions.
- The T5 conditioner: its `t5` -> `text_encoder`, its `output_proj` -> `enc_to_dec_proj`. The chroma conditioner
  (melody): its `output_proj` -> `audio_enc_to_dec_proj`; transformers prepends chroma then text, as audiocraft's
  fuser does with `prepend: [self_wav, description]`.
- EnCodec (`EncodecModel` with SEANet + RVQ) -> `audio_encoder` (transformers' `EncodecModel`): the SEANet layers in
  order (`conv.conv` / `convtr.convtr` -> `conv`, weight norm's `weight_g/weight_v` -> `parametrizations.weight.
  original0/1`), `quantizer.vq.layers[i]._codebook` -> `quantizer.layers[i].codebook`. transformers' SEANet always
  has its LSTM (a residual `lstm(x) + x`); a SEANet without one (`lstm: 0`) is written as a 1-layer LSTM whose
  weights are all zero (its output is exactly 0, so the layer is the identity) and read back as `lstm: 0`.
- Stereo: audiocraft's interleaved codebooks (`[B, 2 * K, T]`, left/right per codebook, delays `[0, 0, 1, 1, ...]`)
  are transformers' `audio_channels=2` with the same `2 * K` codebooks on the same mono EnCodec.

What transformers cannot hold (`unsupported_reason` says which and why): MusicGen-Style, LMs without a T5 text
encoder (the LUT conditioner of the offline tiny models, the unconditional scratch models), and LM or fuser
settings transformers' decoder does not have.

One difference is in the models, not the conversion: transformers masks padded text tokens out of cross-attention,
audiocraft attends to them as zero vectors. A batch of descriptions of one token length (or a batch of one) gives
the same logits in both; padding changes transformers' logits slightly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import typing as tp
from pathlib import Path

import torch
from torch import nn

from core.catalogue import ModelSpec
from core.tiny import tiny_demucs

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MODEL_TYPES = ("musicgen", "musicgen_melody")
# The T5 conditioner names audiocraft knows, by the encoder width they require (T5Conditioner.MODELS_DIMS).
_T5_BY_WIDTH = {512: "t5-small", 768: "t5-base", 1024: "t5-large"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json")
_FRAME_RATE = 50  # 32 kHz EnCodec, hop 640: the frame rate of every MusicGen LM


# ------------------------------------------------------------------------------------------- what fits
# audiocraft `transformer_lm` settings that transformers' MusicGen decoder has built in: an LM with any other value
# cannot be exported, and an imported LM gets exactly these.
_DECODER_FIXED: dict[str, tp.Any] = {
    "norm_first": True,
    "bias_ff": False,
    "bias_attn": False,
    "bias_proj": False,
    "activation": "gelu",
    "positional_embedding": "sin",
    "norm": "layer_norm",
    "layer_scale": None,
    "qk_layer_norm": False,
    "qk_layer_norm_cross": False,
    "xpos": False,
    "kv_repeat": 1,
}


def unsupported_reason(spec_or_lm_cfg: tp.Any) -> str | None:
    """None when a model can be written in transformers' format, else one sentence saying why not.

    Takes a `ModelSpec` (what the catalogue knows before loading) or an LM config (`lm.cfg`, a dict or OmegaConf:
    the authoritative check, also for local folders the catalogue does not name).
    """
    if isinstance(spec_or_lm_cfg, ModelSpec):
        return _spec_reason(spec_or_lm_cfg)
    return _cfg_reason(_plain(spec_or_lm_cfg))


def _spec_reason(spec: ModelSpec) -> str | None:
    if spec.style:
        return (
            f"{spec.name} is MusicGen-Style: transformers has no style conditioner (MERT features), so it cannot be "
            "written in transformers' format"
        )
    if spec.text_encoder == "none":
        return f"{spec.name} has no text encoder, and transformers' MusicGen is always conditioned on T5 text"
    if spec.text_encoder != "t5":
        return (
            f"{spec.name}'s text conditioner is a lookup table ({spec.text_encoder}), not the T5 encoder "
            "transformers' MusicGen requires"
        )
    return None


def _plain(cfg: tp.Any) -> dict:
    if isinstance(cfg, dict):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _cfg_reason(cfg: dict) -> str | None:
    conditioners = cfg.get("conditioners") or {}
    models = {name: (c or {}).get("model") for name, c in conditioners.items()}
    if "style" in models.values():
        return "MusicGen-Style's style conditioner has no counterpart in transformers"
    text = models.get("description")
    if text is None:
        return "the LM has no text conditioner, and transformers' MusicGen is always conditioned on T5 text"
    if text != "t5":
        return f"the text conditioner is {text!r}, not the T5 encoder transformers' MusicGen requires"
    melody = models.get("self_wav") == "chroma_stem"
    others = set(models) - {"description", "self_wav"} | (
        {"self_wav"} if "self_wav" in models and not melody else set()
    )
    if others:
        return f"transformers' MusicGen has no counterpart for the conditioner(s) {sorted(others)}"
    fuser = cfg.get("fuser") or {}
    layout = {op: list(fuser.get(op) or []) for op in ("cross", "prepend", "sum", "input_interpolate")}
    want = (
        {"cross": [], "prepend": ["self_wav", "description"], "sum": [], "input_interpolate": []}
        if melody
        else {"cross": ["description"], "prepend": [], "sum": [], "input_interpolate": []}
    )
    if layout != want:
        kind = "MusicgenMelody" if melody else "Musicgen"
        return f"the fuser layout {layout} differs from the one transformers' {kind} has ({want})"
    if fuser.get("cross_attention_pos_emb"):
        return "the LM adds positions to the cross-attention input, which transformers' MusicGen does not"
    lm = cfg.get("transformer_lm") or {}
    for key, value in _DECODER_FIXED.items():
        if lm.get(key, value) != value:
            return f"the LM's transformer_lm.{key} is {lm.get(key)!r}; transformers' MusicGen decoder has {value!r}"
    if float(lm.get("hidden_scale", 4)) * lm["dim"] != int(float(lm.get("hidden_scale", 4)) * lm["dim"]):
        return "the LM's feed-forward width is not a whole number"
    t5_name = (conditioners["description"].get("t5") or {}).get("name", "")
    t5_width = {v: k for k, v in _T5_BY_WIDTH.items()}.get(t5_name.removeprefix("google/flan-"))
    if t5_width is not None and t5_width == lm["dim"]:
        return (
            f"the LM is as wide as its T5 encoder ({t5_width}), where transformers' MusicGen drops the text "
            "projection the LM has"
        )
    pattern = cfg.get("codebooks_pattern") or {}
    n_q, channels = lm["n_q"], cfg.get("channels", 1)
    stereo = bool((cfg.get("interleave_stereo_codebooks") or {}).get("use"))
    delays = (pattern.get("delay") or {}).get("delays")
    want_delays = [d for d in range(n_q // 2) for _ in range(2)] if stereo else list(range(n_q))
    if pattern.get("modeling") != "delay" or list(delays or []) != want_delays:
        return f"the codebook pattern is not the delay pattern {want_delays} transformers' MusicGen samples with"
    if stereo and (cfg["interleave_stereo_codebooks"].get("per_timestep") or channels != 2):
        return "the stereo codebooks are interleaved per time step, not per codebook as transformers' MusicGen has"
    return None


# ------------------------------------------------------------------------------------------- key maps
def _lm_pairs(n_layers: int, n_q: int, melody: bool) -> list[tuple[str, tuple[str, ...]]]:
    """(audiocraft LM key, transformers key(s)) for every decoder weight; a packed `in_proj_weight` `[3 * dim, dim]`
    is three transformers keys (q, k, v in that order)."""
    dec = "decoder.model.decoder."
    pairs: list[tuple[str, tuple[str, ...]]] = []
    for k in range(n_q):
        pairs.append((f"emb.{k}.weight", (f"{dec}embed_tokens.{k}.weight",)))
        pairs.append((f"linears.{k}.weight", (f"decoder.lm_heads.{k}.weight",)))
    attentions = [("self_attn", "self_attn")] + ([] if melody else [("cross_attention", "encoder_attn")])
    norms = [("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm")]
    norms += [] if melody else [("norm_cross", "encoder_attn_layer_norm")]
    for i in range(n_layers):
        ours, theirs = f"transformer.layers.{i}.", f"{dec}layers.{i}."
        for a, t in attentions:
            pairs.append((f"{ours}{a}.in_proj_weight", tuple(f"{theirs}{t}.{p}_proj.weight" for p in "qkv")))
            pairs.append((f"{ours}{a}.out_proj.weight", (f"{theirs}{t}.out_proj.weight",)))
        pairs.append((f"{ours}linear1.weight", (f"{theirs}fc1.weight",)))
        pairs.append((f"{ours}linear2.weight", (f"{theirs}fc2.weight",)))
        for a, t in norms:
            pairs += [(f"{ours}{a}.{p}", (f"{theirs}{t}.{p}",)) for p in ("weight", "bias")]
    pairs += [(f"out_norm.{p}", (f"{dec}layer_norm.{p}",)) for p in ("weight", "bias")]
    cond = "condition_provider.conditioners."
    pairs += [(f"{cond}description.output_proj.{p}", (f"enc_to_dec_proj.{p}",)) for p in ("weight", "bias")]
    if melody:
        pairs += [(f"{cond}self_wav.output_proj.{p}", (f"audio_enc_to_dec_proj.{p}",)) for p in ("weight", "bias")]
    return pairs


def _seanet_suffix(key: str) -> str:
    """A SEANet layer's key (below its index) in transformers' naming."""
    key = key.replace("conv.conv.", "conv.").replace("convtr.convtr.", "conv.")
    return key.replace("weight_g", "parametrizations.weight.original0").replace(
        "weight_v", "parametrizations.weight.original1"
    )


def _encodec_pairs(ours: nn.Module, theirs: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """(audiocraft key, transformers key) for every EnCodec weight, and the transformers keys audiocraft has no
    weight for (the LSTM of a SEANet without one: written as zeros, the identity)."""
    pairs: list[tuple[str, str]] = []
    zeros: list[str] = []
    for part in ("encoder", "decoder"):
        ours_layers = [(i, m) for i, m in enumerate(getattr(ours, part).model) if not isinstance(m, nn.ELU)]
        theirs_layers = [(i, m) for i, m in enumerate(getattr(theirs, part).layers) if not isinstance(m, nn.ELU)]
        j = 0
        for ti, tm in theirs_layers:
            oi, om = ours_layers[j] if j < len(ours_layers) else (None, None)
            if type(tm).__name__ == "EncodecLSTM" and type(om).__name__ != "StreamableLSTM":
                zeros += [f"{part}.layers.{ti}.{k}" for k in tm.state_dict()]
                continue
            if om is None:
                raise ValueError(f"EnCodec {part}: transformers has more layers than audiocraft's SEANet")
            for k in om.state_dict():
                pairs.append((f"{part}.model.{oi}.{k}", f"{part}.layers.{ti}.{_seanet_suffix(k)}"))
            j += 1
        if j != len(ours_layers):
            raise ValueError(f"EnCodec {part}: audiocraft's SEANet has layers transformers' EncodecModel lacks")
    for i, _ in enumerate(ours.quantizer.vq.layers):
        for name in ("inited", "cluster_size", "embed", "embed_avg"):
            pairs.append((f"quantizer.vq.layers.{i}._codebook.{name}", f"quantizer.layers.{i}.codebook.{name}"))
    return pairs, zeros


# ------------------------------------------------------------------------------------------- configs
def _mono(compression_model: tp.Any) -> tp.Any:
    """The mono EnCodec inside audiocraft's stereo wrapper (`InterleaveStereoCompressionModel.model`)."""
    return getattr(compression_model, "model", compression_model)


def _encodec_config(compression_model: tp.Any):
    from audiocraft.models.encodec import EncodecModel
    from transformers import EncodecConfig

    model = _mono(compression_model)
    if not isinstance(model, EncodecModel):
        raise ValueError(f"the compression model is {type(model).__name__}, not the EnCodec transformers' MusicGen has")
    enc, quantizer = model.encoder, model.quantizer
    convs = [m for m in enc.model if type(m).__name__ == "StreamableConv1d"]
    first = convs[0]  # StreamableConv1d -> NormConv1d (.conv) -> nn.Conv1d (.conv.conv)
    blocks = [m for m in enc.model if type(m).__name__ == "SEANetResnetBlock"]
    lstms = [m for m in enc.model if type(m).__name__ == "StreamableLSTM"]
    if not hasattr(first.conv.conv, "weight_g"):
        raise ValueError("the EnCodec's convolutions are not weight-normed, as transformers' EncodecModel needs")
    n_q, bins = quantizer.total_codebooks, quantizer.bins
    nbits = math.ceil(math.log2(bins))
    frame_rate = math.ceil(model.sample_rate / enc.hop_length)
    residual = blocks[0].block[1].conv.conv if blocks else None
    n_residual = len(blocks) // len(enc.ratios)
    dilation_base = blocks[1].block[1].conv.conv.dilation[0] if n_residual > 1 else 2
    return EncodecConfig(
        # the bandwidth whose quantizer count (transformers: 1000 * bandwidth // (frame_rate * nbits)) is n_q
        target_bandwidths=[(n_q * frame_rate * nbits + 0.5) / 1000],
        sampling_rate=model.sample_rate,
        audio_channels=model.channels,
        normalize=bool(model.renormalize),
        chunk_length_s=None,
        overlap=None,
        hidden_size=enc.dimension,
        num_filters=enc.n_filters,
        num_residual_layers=n_residual,
        upsampling_ratios=list(model.decoder.ratios),
        norm_type="weight_norm",
        kernel_size=first.conv.conv.kernel_size[0],
        last_kernel_size=convs[-1].conv.conv.kernel_size[0],
        residual_kernel_size=residual.kernel_size[0] if residual is not None else 3,
        dilation_growth_rate=dilation_base,
        use_causal_conv=bool(first.causal),
        pad_mode=first.pad_mode,
        compress=(blocks[0].block[1].conv.conv.in_channels // blocks[0].block[1].conv.conv.out_channels)
        if blocks
        else 2,
        num_lstm_layers=lstms[0].lstm.num_layers if lstms else 1,
        trim_right_ratio=1.0,
        codebook_size=bins,
        codebook_dim=enc.dimension,
        use_conv_shortcut=bool(blocks) and not isinstance(blocks[0].shortcut, nn.Identity),
    )


def _decoder_kwargs(cfg: dict) -> dict:
    lm = cfg["transformer_lm"]
    card, stereo = lm["card"], bool((cfg.get("interleave_stereo_codebooks") or {}).get("use"))
    return {
        "vocab_size": card,
        "max_position_embeddings": 2048,
        "num_hidden_layers": lm["num_layers"],
        "ffn_dim": int(float(lm.get("hidden_scale", 4)) * lm["dim"]),
        "num_attention_heads": lm["num_heads"],
        "hidden_size": lm["dim"],
        "activation_function": "gelu",
        "dropout": float(lm.get("dropout", 0.0) or 0.0),
        "num_codebooks": lm["n_q"],
        "audio_channels": 2 if stereo else 1,
        "pad_token_id": card,
        "bos_token_id": card,
        "scale_embedding": False,
        "tie_word_embeddings": False,
    }


def _chroma_length(cfg: dict) -> int:
    """Chroma frames over the LM's segment (transformers' `chroma_length`: 235 for facebook/musicgen-melody)."""
    chroma = cfg["conditioners"]["self_wav"]["chroma_stem"]
    hop = 2 ** chroma["radix2_exp"] // 4  # audiocraft's ChromaExtractor: winhop = n_fft // 4
    # as ChromaStemConditioner._get_chroma_len: the centred STFT of the segment has samples // hop + 1 frames
    return int(cfg["dataset"]["segment_duration"] * chroma["sample_rate"]) // hop + 1


# ------------------------------------------------------------------------------------------- export
def to_transformers(lm: tp.Any, compression_model: tp.Any, *, dtype: torch.dtype = torch.float32):
    """audiocraft's `LMModel` (with its condition provider: T5 and its projection, the chroma projection for melody)
    and its EnCodec -> transformers' `MusicgenForConditionalGeneration` (`MusicgenMelodyForConditionalGeneration`
    for melody), every weight copied exactly; in `dtype`, in eval mode, on the CPU.

    A model `unsupported_reason` refuses raises ValueError with that reason.
    """
    from transformers import (
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig,
        MusicgenMelodyForConditionalGeneration,
    )

    cfg = _plain(lm.cfg)
    reason = _cfg_reason(cfg)
    if reason:
        raise ValueError(f"This model cannot be written in transformers' format: {reason}.")
    from transformers.initialization import no_init_weights

    melody = "self_wav" in cfg["conditioners"]
    t5 = lm.condition_provider.conditioners["description"].t5
    audio_config = _encodec_config(compression_model)
    parts = {"text_encoder": t5.config.to_dict(), "audio_encoder": audio_config.to_dict()}
    if melody:
        chroma = cfg["conditioners"]["self_wav"]["chroma_stem"]
        config = MusicgenMelodyConfig(
            decoder=MusicgenMelodyDecoderConfig(**_decoder_kwargs(cfg)).to_dict(),
            num_chroma=chroma["n_chroma"],
            chroma_length=_chroma_length(cfg),
            **parts,
        )
        cls = MusicgenMelodyForConditionalGeneration
    else:
        config = MusicgenConfig(decoder=MusicgenDecoderConfig(**_decoder_kwargs(cfg)).to_dict(), **parts)
        cls = MusicgenForConditionalGeneration
    # every weight is overwritten below (`_check_cover` proves it): skip the random init, as from_pretrained does
    # (3/4 of the conversion time at musicgen-small's size)
    with no_init_weights():
        model = cls(config)
    _set_generation_config(model, cfg)

    ours = {k: v for k, v in lm.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    lm_cfg = cfg["transformer_lm"]
    for key, targets in _lm_pairs(lm_cfg["num_layers"], lm_cfg["n_q"], melody):
        for target, value in zip(targets, ours[key].chunk(len(targets), dim=0), strict=True):
            state[target] = value
    state.update({f"text_encoder.{k}": v for k, v in t5.state_dict().items()})
    pairs, zeros = _encodec_pairs(_mono(compression_model), model.audio_encoder)
    compression = _mono(compression_model).state_dict()
    state.update({f"audio_encoder.{t}": compression[o] for o, t in pairs})
    theirs = model.state_dict()
    state.update({f"audio_encoder.{t}": torch.zeros_like(theirs[f"audio_encoder.{t}"]) for t in zeros})
    _check_cover(state, theirs, "transformers' model")
    with torch.no_grad():  # load_state_dict copies into the model's own tensors: nothing is shared with `lm`
        model.load_state_dict(state, strict=True)
    model.tie_weights()  # what the skipped init would have done: T5's input embedding is one shared tensor
    return model.to(dtype).eval()


def _set_generation_config(model: tp.Any, cfg: dict) -> None:
    """Sampling as audiocraft's MusicGen defaults: top-k 250, CFG at the LM's `inference_coef`, 30 s."""
    gen = model.generation_config
    card = cfg["transformer_lm"]["card"]
    gen.do_sample = True
    gen.top_k = min(250, card)
    gen.guidance_scale = float(cfg.get("classifier_free_guidance", {}).get("inference_coef", 3.0))
    gen.max_length = int(cfg["dataset"]["segment_duration"] * _FRAME_RATE)  # 1500 for 30 s, as facebook's repos
    gen.pad_token_id = gen.bos_token_id = gen.decoder_start_token_id = card


def _check_cover(state: dict, reference: dict, what: str) -> None:
    """Every weight of `reference` is filled, no other, each with its shape: a conversion never guesses."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    wrong = [k for k in state if k in reference and tuple(state[k].shape) != tuple(reference[k].shape)]
    if missing or extra or wrong:
        raise ValueError(
            f"{what}: the conversion does not fit (missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shape {wrong[:5]})"
        )


def text_tokenizer(lm: tp.Any) -> tp.Any:
    """The T5 tokenizer of `lm`'s text conditioner (what `save_transformers` writes beside the weights)."""
    return lm.condition_provider.conditioners["description"].t5_tokenizer


def _processor(model: tp.Any, tokenizer: tp.Any) -> tp.Any:
    """transformers' processor for `model` (the tokenizer with the audio feature extractor its pipeline reads)."""
    config = model.config
    rate = config.audio_encoder.sampling_rate
    if config.model_type == "musicgen_melody":
        from transformers import MusicgenMelodyFeatureExtractor, MusicgenMelodyProcessor

        seconds = _seconds(model.generation_config)
        hop = round(seconds * rate / config.chroma_length)
        n_fft = 2 ** round(math.log2(4 * hop))
        extractor = MusicgenMelodyFeatureExtractor(
            feature_size=config.num_chroma,
            sampling_rate=rate,
            hop_length=n_fft // 4,
            chunk_length=int(seconds),
            n_fft=n_fft,
            num_chroma=config.num_chroma,
        )
        return MusicgenMelodyProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    from transformers import EncodecFeatureExtractor, MusicgenProcessor

    extractor = EncodecFeatureExtractor(feature_size=config.audio_encoder.audio_channels, sampling_rate=rate)
    return MusicgenProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def save_transformers(model: tp.Any, folder: Path, *, tokenizer: tp.Any = None) -> Path:
    """Write `model` as transformers saves it (`config.json`, `generation_config.json`, `model.safetensors`) and,
    given its T5 `tokenizer` (`text_tokenizer(lm)`), the processor files its pipeline reads; to a temp folder
    beside `folder`, then renamed. A `folder` already there is replaced only when it is a transformers MusicGen
    folder (an earlier export); anything else there is refused, never deleted. Returns `folder`."""
    folder = Path(folder)
    if folder.exists() and not is_transformers_folder(folder) and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not a transformers MusicGen folder: not replacing it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    old = None
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            _processor(model, tokenizer).save_pretrained(tmp)
        if folder.exists():
            old = folder.with_name(f"{tmp.name}-old")
            folder.rename(old)
        tmp.rename(folder)
    except BaseException:
        if old is not None and not folder.exists():
            old.rename(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


# ------------------------------------------------------------------------------------------- import
def is_transformers_folder(folder: Path) -> bool:
    """A folder holding a transformers Musicgen(Melody) `config.json`."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") in MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def _load_model(folder: Path) -> tp.Any:
    from transformers import MusicgenForConditionalGeneration, MusicgenMelodyForConditionalGeneration

    kind = json.loads((Path(folder) / CONFIG_FILE).read_text()).get("model_type")
    cls = MusicgenMelodyForConditionalGeneration if kind == "musicgen_melody" else MusicgenForConditionalGeneration
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def _seconds(generation_config: tp.Any) -> float:
    """The LM's segment, whole seconds, from transformers' `max_length` in frames (facebook's repos: 1500, 30 s;
    some count the start token: 1501)."""
    frames = generation_config.max_length or 0
    return float(round(frames / _FRAME_RATE)) if frames >= _FRAME_RATE else 30.0


def _lm_cfg(model: tp.Any) -> dict:
    """audiocraft's LM config (the keys its builders read) for a transformers MusicGen."""
    config, gen = model.config, model.generation_config
    dec, t5 = config.decoder, config.text_encoder
    melody = config.model_type == "musicgen_melody"
    stereo = dec.audio_channels == 2
    n_q, card = dec.num_codebooks, dec.vocab_size
    if dec.ffn_dim % dec.hidden_size:
        raise ValueError(f"the decoder's ffn_dim {dec.ffn_dim} is not a multiple of its width {dec.hidden_size}")
    if t5.d_model not in _T5_BY_WIDTH:
        raise ValueError(f"the text encoder's width {t5.d_model} is none of T5's {sorted(_T5_BY_WIDTH)}")
    seconds = _seconds(gen)
    cfg: dict = {
        "lm_model": "transformer_lm",
        "device": "cpu",
        "dtype": "float32",
        "sample_rate": config.audio_encoder.sampling_rate,
        "channels": 2 if stereo else 1,
        "dataset": {"segment_duration": float(seconds)},
        "codebooks_pattern": {
            "modeling": "delay",
            "delay": {
                "delays": [d for d in range(n_q // 2) for _ in range(2)] if stereo else list(range(n_q)),
                "flatten_first": 0,
                "empty_initial": 0,
            },
        },
        "transformer_lm": {
            "n_q": n_q,
            "card": card,
            "dim": dec.hidden_size,
            "num_heads": dec.num_attention_heads,
            "num_layers": dec.num_hidden_layers,
            "hidden_scale": dec.ffn_dim // dec.hidden_size,
            "dropout": float(dec.dropout),
            "emb_lr": None,
            **_DECODER_FIXED,
            "past_context": None,
            "causal": True,
            "custom": False,
            "memory_efficient": True,
            "attention_as_float32": False,
            "checkpointing": "none",
            "weight_init": "gaussian",
            "depthwise_init": "current",
            "zero_bias_init": True,
            "cross_attention": not melody,
            "attention_dropout": None,
            "two_step_cfg": False,
        },
        "classifier_free_guidance": {"training_dropout": 0.2, "inference_coef": float(gen.guidance_scale or 3.0)},
        "attribute_dropout": {},
        "fuser": {
            "cross_attention_pos_emb": False,
            "cross_attention_pos_emb_scale": 1,
            "sum": [],
            "prepend": ["self_wav", "description"] if melody else [],
            "cross": [] if melody else ["description"],
            "input_interpolate": [],
        },
        "conditioners": {
            "description": {
                "model": "t5",
                "t5": {
                    "name": _T5_BY_WIDTH[t5.d_model],
                    "finetune": False,
                    "word_dropout": 0.3,
                    "normalize_text": False,
                },
            }
        },
    }
    if stereo:
        cfg["interleave_stereo_codebooks"] = {"use": True, "per_timestep": False}
    if melody:
        hop = seconds * config.audio_encoder.sampling_rate / max(config.chroma_length - 1, 1)
        cfg["conditioners"]["self_wav"] = {
            "model": "chroma_stem",
            "chroma_stem": {
                "sample_rate": config.audio_encoder.sampling_rate,
                "n_chroma": config.num_chroma,
                "radix2_exp": round(math.log2(4 * hop)),
                "argmax": True,
                "match_len_on_eval": False,
                "eval_wavs": None,
                "n_eval_wavs": 0,
                "cache_path": None,
            },
        }
    return cfg


def _compression_cfg(model: tp.Any, lstm: int) -> dict:
    """audiocraft's EnCodec config for transformers' `audio_encoder` (`lstm`: its layers, 0 for the identity)."""
    c = model.config.audio_encoder
    if c.norm_type != "weight_norm":
        raise ValueError(f"the EnCodec's norm_type is {c.norm_type!r}; audiocraft's MusicGen EnCodec is weight-normed")
    if c.codebook_dim != c.hidden_size:
        raise ValueError("the EnCodec's codebook_dim differs from its hidden_size, which audiocraft's RVQ cannot hold")
    return {
        "compression_model": "encodec",
        "device": "cpu",
        "dtype": "float32",
        "encodec": {
            "autoencoder": "seanet",
            "quantizer": "rvq",
            "sample_rate": c.sampling_rate,
            "channels": c.audio_channels,
            "causal": bool(c.use_causal_conv),
            "renormalize": bool(c.normalize),
        },
        "seanet": {
            "dimension": c.hidden_size,
            "channels": c.audio_channels,
            "causal": bool(c.use_causal_conv),
            "n_filters": c.num_filters,
            "n_residual_layers": c.num_residual_layers,
            "ratios": list(c.upsampling_ratios),
            "activation": "ELU",
            "activation_params": {"alpha": 1.0},
            "norm": "weight_norm",
            "norm_params": {},
            "kernel_size": c.kernel_size,
            "last_kernel_size": c.last_kernel_size,
            "residual_kernel_size": c.residual_kernel_size,
            "dilation_base": c.dilation_growth_rate,
            "pad_mode": c.pad_mode,
            "true_skip": not c.use_conv_shortcut,
            "compress": c.compress,
            "lstm": lstm,
            "disable_norm_outer_blocks": 0,
            "encoder": {},
            "decoder": {},
        },
        "rvq": {
            "n_q": c.num_quantizers,
            "bins": c.codebook_size,
            "decay": 0.99,
            "kmeans_init": False,
            "kmeans_iters": 50,
            "threshold_ema_dead_code": 2,
            "orthogonal_reg_weight": 0.0,
            "orthogonal_reg_active_codes_only": False,
            "q_dropout": False,
        },
    }


@contextlib.contextmanager
def _t5_hub(model: tp.Any, name: str, folder: Path | None, tokenizer: tp.Any) -> tp.Iterator[None]:
    """While audiocraft's T5Conditioner loads `name` by its hub name, huggingface_hub (and transformers through it)
    reads it, offline, from a temp cache holding `model`'s text encoder and its tokenizer (from `folder`, else the
    `tokenizer` object, else `name`'s own from the user's cache or the hub): the weights are the fine-tune's, not
    the hub's. The switch is huggingface_hub's own setting, for this call only (as core/tiny.py does)."""
    from huggingface_hub import constants
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory(prefix="mgft-t5-") as hub:
        repo = Path(hub) / f"models--{name.replace('/', '--')}"
        snapshot = repo / "snapshots" / "transformers-format"
        snapshot.mkdir(parents=True)
        model.text_encoder.save_pretrained(snapshot)
        files = [f for f in _TOKENIZER_FILES if folder is not None and (Path(folder) / f).is_file()]
        if files:
            for f in files:
                shutil.copy2(Path(folder) / f, snapshot / f)
        else:
            (tokenizer if tokenizer is not None else T5Tokenizer.from_pretrained(name)).save_pretrained(snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("transformers-format")
        saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = hub, True
        try:
            yield
        finally:
            constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved


def _lstm_is_identity(model: tp.Any) -> bool:
    """True when every LSTM weight of the EnCodec is zero: the `lstm: 0` SEANet `to_transformers` writes."""
    lstms = [
        m.lstm for part in (model.encoder, model.decoder) for m in part.layers if type(m).__name__ == "EncodecLSTM"
    ]
    return all(not p.detach().any() for m in lstms for p in m.parameters())


def from_transformers(
    folder_or_model: tp.Any, device: str = "cpu", *, tokenizer: tp.Any = None
) -> tuple[tp.Any, tp.Any, dict]:
    """A transformers MusicGen (a folder `is_transformers_folder` accepts, or the model object) -> audiocraft's
    `LMModel`, its mono EnCodec (as audiocraft's loaders give it: `MusicGen` wraps it for stereo) and the LM
    config (a plain dict, also set as `lm.cfg` as audiocraft's loaders do), in eval mode on `device`; they sample
    as the transformers model does (`MusicGen(name, compression_model, lm)`).

    The T5 tokenizer comes from the folder, else `tokenizer`, else the hub's `t5-base` (cached or downloaded).
    """
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    folder = None
    if isinstance(folder_or_model, (str, Path)):
        folder = Path(folder_or_model)
        if not is_transformers_folder(folder):
            raise ValueError(f"{folder} holds no transformers MusicGen ({CONFIG_FILE} with model_type {MODEL_TYPES})")
        model = _load_model(folder)
    else:
        model = folder_or_model.float().eval()  # (in place: the conversion reads fp32 weights)
    cfg = _lm_cfg(model)
    melody = "self_wav" in cfg["conditioners"]

    lstm = 0 if _lstm_is_identity(model.audio_encoder) else model.config.audio_encoder.num_lstm_layers
    ccfg = _compression_cfg(model, lstm)
    compression = builders.get_compression_model(OmegaConf.create(ccfg))
    pairs, zeros = _encodec_pairs(compression, model.audio_encoder)
    theirs = model.state_dict()
    state = {o: theirs[f"audio_encoder.{t}"] for o, t in pairs}
    _check_cover(state, compression.state_dict(), "audiocraft's EnCodec")
    compression.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)

    name = cfg["conditioners"]["description"]["t5"]["name"]
    # a tiny model's folder carries its own htdemucs for the chroma conditioner (core/tiny.py); others use demucs'
    with _t5_hub(model, name, folder, tokenizer), tiny_demucs(folder) if folder else contextlib.nullcontext():
        lm = builders.get_lm_model(OmegaConf.create(cfg))
    ours = lm.state_dict()
    state = {}
    for key, targets in _lm_pairs(cfg["transformer_lm"]["num_layers"], cfg["transformer_lm"]["n_q"], melody):
        state[key] = torch.cat([theirs[t] for t in targets], dim=0)
    # what audiocraft's LM computes itself (the chroma extractor's filter bank) is kept as built
    derived = {k: v for k, v in ours.items() if k not in state and ".chroma." in k}
    _check_cover({**state, **derived}, ours, "audiocraft's LM")
    lm.load_state_dict({**{k: v.detach().clone() for k, v in state.items()}, **derived}, strict=True)
    lm.cfg = OmegaConf.create(cfg)
    return lm.to(device).eval(), compression.to(device).eval(), cfg
