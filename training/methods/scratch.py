"""From scratch: `model_version=micro` (like the micro-musicgen project) and `tiny-micro` (offline tests).

A new small LM (`lm_dim`, `lm_layers`, `lm_heads`; micro-musicgen's config by default: 2048 dims, 2 heads,
2 layers) with no conditioner at all (unconditional), randomly initialized, on a pretrained compression model:
`micro` uses the 32 kHz EnCodec of the facebook/musicgen models (`facebook/encodec_32khz`, from the Hugging Face
cache or the network), `tiny-micro` the tiny models' small EnCodec (`core/tiny.py`). Every weight trains
(`method=full`). The export is an ordinary full `trained_model.tar` (the LM; EnCodec by reference for `micro`, a
copy for `tiny-micro`); predict generates unconditionally from it and ignores a prompt with a warning.
"""

from __future__ import annotations

import logging

import torch
from audiocraft.models import MusicGen, builders
from audiocraft.models.loaders import load_compression_model
from omegaconf import OmegaConf

from core import tiny
from core.catalogue import PRETRAINED_COMPRESSION, SCRATCH_VERSIONS, SPEC
from core.errors import ModelUnavailableError
from core.params import InputError
from training.params import TrainParams

logger = logging.getLogger(__name__)

__all__ = ["SCRATCH_VERSIONS", "check", "build_scratch_musicgen", "scratch_lm_cfg"]


def check(params: TrainParams) -> None:
    known = SPEC.get(params.model_version)
    if known is None or not known.scratch:
        return
    if params.method != "full":
        raise InputError("method", f"model_version={params.model_version} trains a new model from scratch: use full")
    if params.prior_preservation:
        raise InputError(
            "prior_preservation", f"model_version={params.model_version} starts from random weights: nothing to keep"
        )
    if params.lm_dim % params.lm_heads:
        raise InputError("lm_heads", f"lm_dim ({params.lm_dim}) must be a multiple of lm_heads ({params.lm_heads})")


def scratch_lm_cfg(params: TrainParams, n_q: int, card: int) -> dict:
    """The LM config: audiocraft's MusicGen keys (as the tiny models'), no conditioners, delay pattern."""
    cfg = tiny.lm_cfg("tiny")
    cfg["transformer_lm"].update(
        n_q=n_q, card=card, dim=params.lm_dim, num_heads=params.lm_heads, num_layers=params.lm_layers
    )
    cfg["codebooks_pattern"]["delay"]["delays"] = list(range(n_q))
    cfg["conditioners"] = {}
    cfg["fuser"].update(cross=[], prepend=[], sum=[], input_interpolate=[])
    cfg["classifier_free_guidance"] = {"training_dropout": 0.0, "inference_coef": 1.0}
    return cfg


def build_scratch_musicgen(params: TrainParams, device: str) -> MusicGen:
    """A MusicGen with a new randomly initialized unconditional LM (seeded by `params.seed`)."""
    if SPEC[params.model_version].tiny:  # the tiny models' EnCodec, offline
        compression = load_compression_model(str(tiny.ensure_tiny("tiny")), device=device)
    else:
        try:
            compression = load_compression_model(PRETRAINED_COMPRESSION, device=device)
        except Exception as e:  # noqa: BLE001 - one actionable message instead of a hub stack trace
            raise ModelUnavailableError(
                f"model_version=micro needs the pretrained 32 kHz EnCodec ({PRETRAINED_COMPRESSION}), which could "
                f"not be loaded ({type(e).__name__}). Connect to the network or put it in the Hugging Face cache "
                "(`hf download facebook/encodec_32khz`); offline, tiny-micro trains on the tiny EnCodec."
            ) from None
    cfg = scratch_lm_cfg(params, n_q=compression.num_codebooks, card=compression.cardinality)
    cfg["device"] = device
    torch.manual_seed(params.seed)
    lm = builders.get_lm_model(OmegaConf.create(cfg)).to(device)
    lm.cfg = OmegaConf.create(cfg)
    n = sum(p.numel() for p in lm.parameters())
    logger.info(
        "New unconditional LM from scratch: %d dims, %d heads, %d layers, %.1f M parameters, on %d x %d codes",
        params.lm_dim,
        params.lm_heads,
        params.lm_layers,
        n / 1e6,
        compression.num_codebooks,
        compression.cardinality,
    )
    model = MusicGen(params.model_version, compression, lm, max_duration=30.0)
    return model
