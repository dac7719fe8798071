"""Tiny MusicGen models, built deterministically from config in audiocraft's own checkpoint format.

They exist so that everything (loading through `MusicGen.get_pretrained`, generation, training, export, the Cog
server) runs offline on a CPU in seconds. Each is a folder holding `state_dict.bin` (`xp.cfg` + `best_state`) and
`compression_state_dict.bin`, exactly like a `facebook/musicgen-*` snapshot, built once and cached under
`$MGFT_CACHE/models/` (default `~/.cache/musicgen-ft/models/`).

- `tiny`: mono, LUT text conditioner (`tokenizer='noop'`: no download), delay pattern over 4 codebooks.
- `tiny-stereo`: 2 channels with interleaved codebooks (8 = 2 x 4, delays [0, 0, 1, 1, 2, 2, 3, 3]) like the real
  stereo models, on the same mono compression model.
- `tiny-melody`: adds audiocraft's chroma conditioner (`self_wav`, prepended). That conditioner loads demucs'
  `htdemucs` in its constructor, so the folder also carries a small HTDemucs as a demucs repo (`htdemucs_repo/`),
  which `tiny_demucs()` hands to that constructor during a load (the user's torch cache is never read or written).
- `tiny-t5`: `tiny` with audiocraft's T5 text conditioner (`t5-base`, frozen, word dropout 0.3), as the
  facebook/musicgen-* models have. The folder carries a tiny T5 encoder (d_model 768 as T5Conditioner requires for
  `t5-base`, 2 small layers, a 256-piece sentencepiece unigram vocabulary saved as `tokenizer.json`) in Hugging
  Face cache layout (`hf_hub/models--t5-base/...`); `tiny_hubs()` points huggingface_hub at it during a load.
- the tiny CLAP (`tiny_clap()`, `save_clap_hub()`): a random `transformers.ClapModel` + `ClapProcessor` of
  larger_clap_music's kinds of parts, a few layers wide, saved with `save_pretrained`; evaluation/clap.py loads it as
  it loads `laion/larger_clap_music` (not a MusicGen: no catalogue record).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import typing as tp
from pathlib import Path

import audiocraft
import torch
from audiocraft.models import builders
from omegaconf import OmegaConf

from core.catalogue import STYLE_TINY_VERSIONS, TINY_VERSIONS, ModelSpec, find
from core.families import core_hooks

logger = logging.getLogger(__name__)

# (TINY_VERSIONS: the tiny models audiocraft's own loaders build; STYLE_TINY_VERSIONS: the MusicGen-Style stand-in,
# built by core/style.py. Both are the catalogue's, importable from here as before.)
SEED = 1234
# Bump when a change to this file changes the weights it builds: the cache key includes it.
BUILDER_VERSION = 2
SAMPLE_RATE = 32000
CARD = 256  # >= the default top_k (250), so the Replicate defaults work on tiny models too.
N_Q = 4
HTDEMUCS_SIG = "955717e8"


def cache_root() -> Path:
    return Path(os.environ.get("MGFT_CACHE", Path.home() / ".cache" / "musicgen-ft"))


def compression_cfg() -> dict:
    """A small 32 kHz EnCodec: same ratios as facebook/encodec_32khz (hop 640 -> 50 Hz), far fewer filters."""
    return {
        "compression_model": "encodec",
        "device": "cpu",
        "dtype": "float32",
        "encodec": {
            "autoencoder": "seanet",
            "quantizer": "rvq",
            "sample_rate": SAMPLE_RATE,
            "channels": 1,
            "causal": False,
            "renormalize": False,
        },
        "seanet": {
            "dimension": 32,
            "channels": 1,
            "causal": False,
            "n_filters": 4,
            "n_residual_layers": 1,
            "ratios": [8, 5, 4, 4],
            "activation": "ELU",
            "activation_params": {"alpha": 1.0},
            "norm": "weight_norm",
            "norm_params": {},
            "kernel_size": 7,
            "last_kernel_size": 7,
            "residual_kernel_size": 3,
            "dilation_base": 2,
            "pad_mode": "constant",
            "true_skip": True,
            "compress": 2,
            "lstm": 0,
            "disable_norm_outer_blocks": 0,
            "encoder": {},
            "decoder": {},
        },
        "rvq": {
            "n_q": N_Q,
            "bins": CARD,
            "decay": 0.99,
            "kmeans_init": False,
            "kmeans_iters": 50,
            "threshold_ema_dead_code": 2,
            "orthogonal_reg_weight": 0.0,
            "orthogonal_reg_active_codes_only": False,
            "q_dropout": False,
        },
    }


def lm_cfg(name: str) -> dict:
    """The LM config, with the keys and values audiocraft's MusicGen configs use (small dims)."""
    spec = _tiny_spec(name)
    stereo = spec.stereo
    n_q = 2 * N_Q if stereo else N_Q
    delays = [d for d in range(N_Q) for _ in range(2)] if stereo else list(range(N_Q))
    dim = 64
    cfg: dict = {
        "lm_model": "transformer_lm",
        "device": "cpu",
        "dtype": "float32",
        "sample_rate": SAMPLE_RATE,
        "channels": 2 if stereo else 1,
        "dataset": {"segment_duration": 30.0},
        "codebooks_pattern": {
            "modeling": "delay",
            "delay": {"delays": delays, "flatten_first": 0, "empty_initial": 0},
        },
        "transformer_lm": {
            "n_q": n_q,
            "card": CARD,
            "dim": dim,
            "num_heads": 4,
            "num_layers": 2,
            "hidden_scale": 4,
            "dropout": 0.0,
            "emb_lr": None,
            "activation": "gelu",
            "norm_first": True,
            "bias_ff": False,
            "bias_attn": False,
            "bias_proj": False,
            "past_context": None,
            "causal": True,
            "custom": False,
            "memory_efficient": True,
            "attention_as_float32": False,
            "layer_scale": None,
            "positional_embedding": "sin",
            "xpos": False,
            "checkpointing": "none",
            "weight_init": "gaussian",
            "depthwise_init": "current",
            "zero_bias_init": True,
            "norm": "layer_norm",
            "cross_attention": False,
            "qk_layer_norm": False,
            "qk_layer_norm_cross": False,
            "attention_dropout": None,
            "kv_repeat": 1,
            "two_step_cfg": False,
        },
        "classifier_free_guidance": {"training_dropout": 0.3, "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {
            "cross_attention_pos_emb": False,
            "cross_attention_pos_emb_scale": 1,
            "sum": [],
            "prepend": [],
            "cross": ["description"],
            "input_interpolate": [],
        },
        "conditioners": {
            "description": {"model": "lut", "lut": {"n_bins": 4096, "dim": dim, "tokenizer": "noop", "pad_idx": 0}}
        },
    }
    if stereo:
        cfg["interleave_stereo_codebooks"] = {"use": True, "per_timestep": False}
    if spec.style:
        _add_style(cfg)
    if spec.text_encoder == "t5":
        cfg["conditioners"]["description"] = {"model": "t5", "t5": t5_conditioner_cfg()}
    if spec.melody:
        cfg["fuser"]["prepend"] = ["self_wav"]
        cfg["conditioners"]["self_wav"] = {
            "model": "chroma_stem",
            "chroma_stem": {
                "sample_rate": SAMPLE_RATE,
                "n_chroma": 12,
                "radix2_exp": 12,
                "argmax": True,
                "match_len_on_eval": False,
                "eval_wavs": None,
                "n_eval_wavs": 0,
                "cache_path": None,
            },
        }
    return cfg


def _add_style(cfg: dict) -> None:
    """audiocraft's style2music conditioning (style excerpt and text both prepended, double-CFG ready) on the tiny
    LM, with a small transformer, 64-entry codebooks and `TinyFeatureExtractor` standing in for MERT."""
    cfg["classifier_free_guidance"] = {"training_dropout": 0.1, "inference_coef": 3.0}
    cfg["attribute_dropout"] = {"text": {"description": 0.4}, "wav": {"self_wav": 0.4}}
    cfg["fuser"]["prepend"] = ["self_wav", "description"]
    cfg["fuser"]["cross"] = []
    style = {
        "model_name": "tiny",
        "extractor": {"dim": 32, "channels": 16, "seed": SEED},
        "transformer_scale": "tiny",
        "sample_rate": SAMPLE_RATE,
        "length": 3.0,
        "ds_factor": 15,
        "n_q_out": 6,
        "eval_q": 3,
        "q_dropout": True,
        "bins": 64,
        "kmeans_init": False,  # random codebooks: the untrained bottleneck still varies with eval_q
        "varying_lengths": [1.5, 4.5],
        "batch_norm": True,
        "compute_mask": True,
        "num_codebooks_lm": N_Q,
        "ds_rate_compression": 640,
        "use_middle_of_segment": False,
        "rvq_threshold_ema_dead_code": 0.1,
    }
    cfg["conditioners"] = {"self_wav": {"model": "style", "style": style}, **cfg["conditioners"]}


def _tiny_spec(name: str) -> ModelSpec:
    """The catalogue record of tiny model `name` (what it is built with: channels, family, text encoder)."""
    spec = find(name)
    if spec is None or not spec.tiny or spec.scratch:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {(*TINY_VERSIONS, *STYLE_TINY_VERSIONS)}")
    return spec


def _build_lm(name: str, cfg: dict):
    return core_hooks(_tiny_spec(name)).build_lm(copy.deepcopy(cfg))


def htdemucs_kwargs() -> dict:
    """A ~1 M parameter HTDemucs with htdemucs' interface (4 sources, stereo 44.1 kHz): fast enough for tests."""
    return {
        "sources": ["drums", "bass", "other", "vocals"],
        "audio_channels": 2,
        "samplerate": 44100,
        "segment": 10,
        "channels": 16,
        "t_layers": 0,
    }


def _fingerprint(name: str) -> str:
    spec = _tiny_spec(name)
    blob = json.dumps(
        {
            "lm": lm_cfg(name),
            "compression": compression_cfg(),
            "seed": SEED,
            "builder": BUILDER_VERSION,
            "htdemucs": htdemucs_kwargs() if spec.melody else None,
            **({"t5": [t5_encoder_cfg(), T5_CORPUS, T5_VOCAB]} if spec.text_encoder == "t5" else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tiny_dir(name: str) -> Path:
    return cache_root() / "models" / f"{name}-{_fingerprint(name)}"


def save_htdemucs_repo(folder: Path, seed: int = SEED, kwargs: dict | None = None) -> Path:
    """Write a small random HTDemucs as a demucs *local repo* (`htdemucs.yaml` + `955717e8.th`); `kwargs`
    replaces the small size (bench/prepare.py: htdemucs' real size, `HTDemucs`' defaults).

    `demucs.pretrained.get_model('htdemucs', repo=folder)` and `demucs.api.Separator(model='htdemucs',
    repo=folder)` load it through demucs' real loading code.
    """
    from demucs.htdemucs import HTDemucs

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    kwargs = kwargs if kwargs is not None else htdemucs_kwargs()
    model = HTDemucs(**kwargs)
    package = {"klass": HTDemucs, "args": (), "kwargs": kwargs, "state": model.state_dict()}
    torch.save(package, folder / f"{HTDEMUCS_SIG}.th")
    (folder / "htdemucs.yaml").write_text(f"models: ['{HTDEMUCS_SIG}']\n")
    return folder


@contextlib.contextmanager
def tiny_demucs(model_dir: Path) -> tp.Iterator[None]:
    """While a tiny melody model is built, its chroma conditioner's `htdemucs` comes from the model's own repo.

    audiocraft's `ChromaStemConditioner` calls `demucs.pretrained.get_model('htdemucs')`, which asks the Hugging
    Face hub first and then the torch cache; offline that costs ~30 s of retries, and the user's real htdemucs
    (if any) is not the one this model was built with. Inside this block that call reads the local repo instead.
    Outside it (and for every other model) demucs behaves as usual.
    """
    repo = model_dir / "htdemucs_repo"
    if not (repo / "htdemucs.yaml").is_file():
        yield
        return
    from demucs import pretrained

    original = pretrained.get_model

    def get_model(name: str, repo_arg: Path | None = None, **kwargs: tp.Any):
        if name == "htdemucs" and repo_arg is None:
            return original(name, repo=repo, **kwargs)
        return original(name, repo_arg, **kwargs)

    pretrained.get_model = get_model
    try:
        yield
    finally:
        pretrained.get_model = original


def _build(name: str, folder: Path, cfg: dict | None = None) -> None:
    version = audiocraft.__version__
    torch.manual_seed(SEED)
    ccfg = compression_cfg()
    compression = builders.get_compression_model(OmegaConf.create(ccfg))
    torch.save(
        {"xp.cfg": ccfg, "best_state": compression.state_dict(), "version": version, "exported": True},
        folder / "compression_state_dict.bin",
    )
    spec = _tiny_spec(name)
    if spec.melody:  # audiocraft's chroma conditioner loads htdemucs by name: the folder carries its own
        save_htdemucs_repo(folder / "htdemucs_repo")
    cfg = cfg if cfg is not None else lm_cfg(name)
    if cfg["conditioners"]["description"]["model"] == "t5":  # likewise t5-base
        save_t5_hub(folder / T5_HUB_DIR)
    torch.manual_seed(SEED + 1)
    with tiny_hubs(folder):
        lm = _build_lm(name, cfg)
    torch.save(
        {"xp.cfg": cfg, "best_state": lm.state_dict(), "version": version, "exported": True},
        folder / "state_dict.bin",
    )
    (folder / "README.txt").write_text(
        f"{name}: a tiny random-weight MusicGen built by musicgen-fine-tuner (core/tiny.py) for offline use.\n"
    )


def ensure_tiny(name: str) -> Path:
    """The cached folder of tiny model `name`, built on first use (atomically: safe under torchrun)."""
    folder = tiny_dir(name)
    if (folder / "state_dict.bin").is_file() and (folder / "compression_state_dict.bin").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Building tiny model %s in %s", name, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        _build(name, tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "state_dict.bin").is_file():  # someone else won the race: theirs is identical
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_variant(folder: Path, base: str = "tiny", **transformer: tp.Any) -> Path:
    """A model folder built like tiny model `base` with `transformer_lm` keys overridden (e.g. `dim=512,
    num_layers=4`): a bigger or differently shaped model for tests and measurements, loadable as a model folder."""
    cfg = lm_cfg(base)
    cfg["transformer_lm"].update(transformer)
    folder = Path(folder)
    if not (folder / "state_dict.bin").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        _build(base, folder, cfg)
    return folder


def t5_variant_cfg(base: str) -> dict:
    """`base`'s LM config with `tiny-t5`'s T5 text conditioner; for a melody base also facebook/musicgen-melody's
    fuser layout (chroma and text both prepended, no cross-attention), the one transformers' MusicgenMelody has."""
    cfg = lm_cfg(base)
    cfg["conditioners"]["description"] = {"model": "t5", "t5": t5_conditioner_cfg()}
    if _tiny_spec(base).melody:
        cfg["fuser"]["prepend"] = ["self_wav", "description"]
        cfg["fuser"]["cross"] = []
    return cfg


def build_t5_variant(folder: Path, base: str) -> Path:
    """A model folder built like tiny model `base` but conditioned on text through T5 (`t5_variant_cfg`): the
    T5-conditioned stereo and melody models the transformers-format tests need, loadable as a model folder."""
    folder = Path(folder)
    if not (folder / "state_dict.bin").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        _build(base, folder, t5_variant_cfg(base))
    return folder


def save_transformers_tiny(folder: Path, *, stereo: bool = False, melody: bool = False, seed: int = SEED) -> Path:
    """A random tiny MusicGen written by transformers itself (`save_pretrained` of `MusicgenForConditionalGeneration`,
    or `MusicgenMelodyForConditionalGeneration` for `melody`; `stereo`: `audio_channels=2` over 8 codebooks), with
    the tiny T5 tokenizer and the processor files, as a fine-tune made with transformers would be shared. The
    shapes are the tiny models' (dim 64, 2 layers, card 256 over a small 32 kHz EnCodec with its 2-layer LSTM, as
    facebook/encodec_32khz has). Returns `folder`."""
    from transformers import (
        EncodecConfig,
        EncodecFeatureExtractor,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig,
        MusicgenMelodyFeatureExtractor,
        MusicgenMelodyForConditionalGeneration,
        MusicgenMelodyProcessor,
        MusicgenProcessor,
        T5Config,
        T5Tokenizer,
    )

    tokenizer = T5Tokenizer(vocab=_t5_vocab())
    audio = EncodecConfig(
        target_bandwidths=[(N_Q * 50 * 8 + 0.5) / 1000],  # 4 codebooks of 8 bits at 50 Hz
        sampling_rate=SAMPLE_RATE,
        audio_channels=1,
        normalize=False,
        hidden_size=32,
        num_filters=4,
        num_residual_layers=1,
        upsampling_ratios=[8, 5, 4, 4],
        use_causal_conv=False,
        pad_mode="constant",
        num_lstm_layers=2,
        codebook_size=CARD,
        codebook_dim=32,
        use_conv_shortcut=False,
    )
    n_q = 2 * N_Q if stereo else N_Q
    decoder = dict(
        vocab_size=CARD,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=256,
        num_codebooks=n_q,
        audio_channels=2 if stereo else 1,
        pad_token_id=CARD,
        bos_token_id=CARD,
    )
    parts = {"text_encoder": T5Config(vocab_size=len(tokenizer), **t5_encoder_cfg()).to_dict(), "audio_encoder": audio}
    torch.manual_seed(seed)
    if melody:
        decoder_config = MusicgenMelodyDecoderConfig(**decoder).to_dict()
        config = MusicgenMelodyConfig(decoder=decoder_config, chroma_length=235, **parts)
        model = MusicgenMelodyForConditionalGeneration(config)
        extractor = MusicgenMelodyFeatureExtractor(sampling_rate=SAMPLE_RATE)  # n_fft 16384, hop 4096: 235 for 30 s
        processor = MusicgenMelodyProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    else:
        config = MusicgenConfig(decoder=MusicgenDecoderConfig(**decoder).to_dict(), **parts)
        model = MusicgenForConditionalGeneration(config)
        processor = MusicgenProcessor(EncodecFeatureExtractor(sampling_rate=SAMPLE_RATE), tokenizer)
    gen = model.generation_config
    gen.do_sample, gen.guidance_scale, gen.max_length, gen.top_k = True, 3.0, 1500, 250
    gen.pad_token_id = gen.bos_token_id = gen.decoder_start_token_id = CARD
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if melody:  # the chroma conditioner audiocraft builds on import asks demucs for htdemucs (see `tiny_demucs`)
        save_htdemucs_repo(folder / "htdemucs_repo")
    return folder


# ------------------------------------------------------------------------------------------------- tiny T5
T5_NAME = "t5-base"  # the name audiocraft's musicgen configs use; T5Conditioner requires d_model 768 for it
T5_HUB_DIR = "hf_hub"
T5_VOCAB = 256
# The tiny tokenizer's training text: music words, and every printable ASCII character so that any trigger string
# splits into known pieces (as with the real T5 vocabulary).
T5_CORPUS = (
    "calm piano with soft drums",
    "fast rock drums and electric guitar",
    "lofi hip hop beat with vinyl crackle",
    "jazz saxophone solo over upright bass",
    "ambient synth pad, slow and dreamy",
    "energetic techno with a heavy kick",
    "acoustic folk song with strings",
    "orchestral strings, cinematic and epic",
    "funky bass line and brass section",
    "happy pop melody, bright vocals",
    "sad blues guitar in a minor key",
    "reggae rhythm at 90 bpm",
    " ".join(chr(c) for c in range(33, 127)),
)


def t5_conditioner_cfg() -> dict:
    """audiocraft's text2music conditioner settings (`conditioners.description.t5`), as in the MusicGen configs."""
    return {"name": T5_NAME, "finetune": False, "word_dropout": 0.3, "normalize_text": False}


def t5_encoder_cfg() -> dict:
    """`transformers.T5Config` fields of the tiny encoder (vocab_size is the tokenizer's length, set at build)."""
    return {
        "d_model": 768,
        "d_kv": 32,
        "d_ff": 256,
        "num_layers": 2,
        "num_heads": 2,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "feed_forward_proj": "relu",
        "is_encoder_decoder": False,
        "use_cache": False,
    }


def _t5_vocab() -> list[tuple[str, float]]:
    """A sentencepiece unigram model trained on `T5_CORPUS` (deterministic: one thread, fixed text), as
    `(piece, score)` pairs with T5's special ids (pad 0, eos 1, unk 2)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(T5_CORPUS * 4),
        model_writer=model,
        vocab_size=T5_VOCAB,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]


def save_t5_hub(hub: Path, seed: int = SEED) -> Path:
    """Write a tiny random T5 encoder + its tokenizer as `t5-base` in Hugging Face cache layout under `hub`
    (`models--t5-base/refs/main` naming `snapshots/<revision>/`: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json). Returns the snapshot folder."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tokenizer = T5Tokenizer(vocab=_t5_vocab())
    torch.manual_seed(seed)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **t5_encoder_cfg()))
    repo = hub / f"models--{T5_NAME.replace('/', '--')}"
    revision = hashlib.sha1(json.dumps([T5_CORPUS, t5_encoder_cfg(), seed]).encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@contextlib.contextmanager
def tiny_t5_hub(model_dir: Path) -> tp.Iterator[None]:
    """While a `tiny-t5` model loads, huggingface_hub (and transformers through it) reads `t5-base` from the model's
    own cache, offline; elsewhere (and for every other model) the user's cache and settings apply as usual.

    huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE into `huggingface_hub.constants` at import, and
    both it and transformers look the values up there at call time: those module attributes are what is switched.
    """
    hub = Path(model_dir) / T5_HUB_DIR
    if not hub.is_dir():
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(hub), True
    try:
        yield
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def tiny_hubs(model_dir: Path) -> tp.Iterator[None]:
    """`tiny_demucs` and `tiny_t5_hub` together: what any tiny model folder needs while it loads."""
    with tiny_demucs(model_dir), tiny_t5_hub(model_dir):
        yield


# ------------------------------------------------------------------------------------------------- tiny CLAP
CLAP_NAME = "laion/larger_clap_music"  # the repo evaluation/clap.py loads; the tiny one stands in for it offline
CLAP_HUB_DIR = "hf_hub"


def clap_configs() -> dict:
    """The tiny CLAP's `transformers.ClapConfig` fields: larger_clap_music's kinds of parts (RoBERTa text encoder,
    unfused HTSAT audio encoder on 64 mel bins of 10 s at 48 kHz, 2-layer projections), each a few layers wide."""
    return {
        "text_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 80,
            "projection_dim": 32,
        },
        "audio_config": {
            "patch_embeds_hidden_size": 16,
            "depths": [1, 1],
            "num_attention_heads": [1, 2],
            "hidden_size": 32,  # patch_embeds_hidden_size x 2 per stage after the first
            "window_size": 8,
            "spec_size": 256,
            "num_mel_bins": 64,
            "enable_fusion": False,
            "projection_dim": 32,
        },
        "projection_dim": 32,
    }


def clap_feature_extractor_cfg() -> dict:
    """`transformers.ClapFeatureExtractor` settings, those of larger_clap_music (48 kHz, 10 s windows, 64 mels)."""
    return {
        "feature_size": 64,
        "sampling_rate": 48000,
        "hop_length": 480,
        "max_length_s": 10,
        "fft_window_size": 1024,
        "frequency_min": 50,
        "frequency_max": 14000,
        "truncation": "rand_trunc",
        "padding": "repeatpad",
    }


def save_clap(folder: Path, seed: int = SEED) -> Path:
    """Write a tiny random `ClapModel` and its `ClapProcessor` (byte-level BPE tokenizer, as RoBERTa's, with no
    merges: every text splits into known pieces; the feature extractor of larger_clap_music) into `folder` with
    `save_pretrained`: what `ClapModel.from_pretrained(folder)` and `ClapProcessor.from_pretrained(folder)` read."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    pieces = ["<s>", "<pad>", "</s>", "<unk>", *sorted(ByteLevel.alphabet()), "<mask>"]
    tokenizer = RobertaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], model_max_length=77)
    extractor = ClapFeatureExtractor(**clap_feature_extractor_cfg())
    processor = ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    cfg = clap_configs()
    cfg["text_config"]["vocab_size"] = len(tokenizer)
    torch.manual_seed(seed)
    model = ClapModel(ClapConfig(**cfg)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_clap() -> Path:
    """The tiny CLAP's folder, built once under `$MGFT_CACHE/models/` (a temporary folder, then renamed)."""
    key = hashlib.sha1(json.dumps([clap_configs(), clap_feature_extractor_cfg(), SEED]).encode()).hexdigest()[:12]
    folder = cache_root() / "models" / f"tiny-clap-{key}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-clap-", dir=folder.parent))
    try:
        save_clap(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # another process may have built it first: keep that one
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_clap_hub(hub: Path, seed: int = SEED) -> Path:
    """The tiny CLAP as `laion/larger_clap_music` in Hugging Face cache layout under `hub` (`models--laion--
    larger_clap_music/refs/main` naming `snapshots/<revision>/`), as the image bakes the real one. Returns the
    snapshot folder."""
    repo = hub / f"models--{CLAP_NAME.replace('/', '--')}"
    revision = hashlib.sha1(json.dumps([clap_configs(), clap_feature_extractor_cfg(), seed]).encode()).hexdigest()
    snapshot = save_clap(repo / "snapshots" / revision, seed)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
