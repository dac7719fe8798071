"""Loading weights: `open_weights` (fetch, unpack, check: no model built) and `load_trained_model` (a
`core.loaded.LoadedModel` built with audiocraft's loaders: a full LM, or the base with a LoRA adapter or learned
embeddings put in; or, from transformers' format, a MusicGen or a PEFT adapter on a facebook/musicgen-* base,
converted into the LM we sample with by `core.weights.transformers_format`)."""

from __future__ import annotations

import logging
import os
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch

from core import adapters, style, tiny, versions
from core.catalogue import SPEC, find
from core.devices import default_device
from core.errors import ModelUnavailableError, WeightsError
from core.loaded import LoadedModel
from core.weights.cache import DEFAULT_MIN_FREE_BYTES, FreeBytes, classify, unpack
from core.weights.format import FINETUNE_FILE, base_of, read_finetune_info
from core.weights.integrity import check_lm_config, verify_architecture
from core.weights.peft_format import check_peft_folder, is_peft_folder, merge_peft
from core.weights.transformers_format import (
    from_transformers,
    is_transformers_folder,
    to_transformers,
    unsupported_reason,
)

logger = logging.getLogger(__name__)


def _load_lm(folder: Path, device: str, load_lm_model: tp.Callable[..., tp.Any]) -> tp.Any:
    """audiocraft's loader, or ours for MusicGen-Style fine-tunes (audiocraft 1.3.0 has no style conditioner)."""
    if style.is_style_folder(folder):
        return style.load_style_lm(folder, device)
    return load_lm_model(str(folder), device=device)


def _base_compression(pkg: dict, device: str, load_compression_model: tp.Callable[..., tp.Any]):
    """The base model's own EnCodec when it is in the Hugging Face cache, else None. Only the cache is looked at:
    asking the hub about a model that is not there costs retries with no network (a trained version boots offline
    with only the reference EnCodec baked into the image)."""
    from huggingface_hub import try_to_load_from_cache

    base = pkg.get("base_model")
    if not ("pretrained" in pkg and base):
        return None
    if not isinstance(try_to_load_from_cache(base, "compression_state_dict.bin"), str):
        logger.info("Base EnCodec of %s not in the Hugging Face cache; using %s", base, pkg["pretrained"])
        return None
    try:
        return load_compression_model(base, device=device)
    except Exception as e:  # noqa: BLE001 - fall back to audiocraft's own reference
        logger.info("Base EnCodec of %s not available (%s); using %s", base, e, pkg["pretrained"])
        return None


@dataclass(frozen=True)
class OpenedWeights:
    """Weights fetched, unpacked and checked, nothing built yet (`open_weights`): what `load_trained_model` builds
    from. `adapter`: they reference their base (LoRA adapter or learned embeddings) instead of carrying a full LM."""

    folder: Path
    info: dict[str, tp.Any]
    base: str
    label: str
    adapter: bool
    format: str = "audiocraft"  # or `transformers` (a transformers MusicGen), `peft` (a PEFT adapter on one)

    @property
    def method(self) -> str:
        return str(self.info.get("method") or ("adapter" if self.adapter else "full"))

    @property
    def lora(self) -> bool:
        return self.format == "peft" or (
            self.format == "audiocraft" and (self.folder / adapters.ADAPTER_CONFIG_FILE).is_file()
        )


def open_weights(
    weights: str | os.PathLike[str],
    *,
    keep: tp.Iterable[str | Path] = (),
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
    free_bytes: FreeBytes | None = None,
) -> OpenedWeights:
    """Everything about weights that needs no model: fetch and unpack (`unpack`), verify the members' checksums,
    read finetune.json (typed and bounded), and for a full LM check its config against its base's architecture.
    A caller can do this while another model still serves, and build only weights that passed."""
    label = classify(weights).label
    folder = unpack(weights, keep=keep, min_free_bytes=min_free_bytes, free_bytes=free_bytes)
    if is_peft_folder(folder):
        return OpenedWeights(folder, *_peft_base(folder, label), label, True, "peft")
    if is_transformers_folder(folder) and not (folder / "state_dict.bin").is_file():
        info = {"method": "transformers", "format": "transformers"}
        return OpenedWeights(folder, info, "", label, False, "transformers")
    info = read_finetune_info(folder, label)
    base = base_of(folder, info)
    adapter = (folder / adapters.ADAPTER_CONFIG_FILE).is_file() or (folder / adapters.EMBEDDINGS_FILE).is_file()
    if adapter:
        if not base:
            raise WeightsError(f"{FINETUNE_FILE} of {label} names no base_model: its adapter cannot be applied.")
        return OpenedWeights(folder, info, base, label, adapter)
    try:
        # mmap: only the config is read here, not gigabytes of weights
        pkg = torch.load(folder / "state_dict.bin", map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(
            f"state_dict.bin of {label} is not a readable torch checkpoint ({type(e).__name__})."
        ) from None
    if not isinstance(pkg, dict) or "xp.cfg" not in pkg:
        raise WeightsError(f"state_dict.bin of {label} is not an audiocraft LM checkpoint (no 'xp.cfg').")
    check_lm_config(pkg["xp.cfg"], base, label)
    verify_architecture(info, pkg["xp.cfg"], base, label)
    return OpenedWeights(folder, info, base, label, adapter)


def _peft_base(folder: Path, label: str) -> tuple[dict[str, tp.Any], str]:
    """(info, base model_version) of a PEFT adapter: its base must be a model we can load and write in transformers'
    format (a facebook/musicgen-* model, or a model version such as `tiny-t5`)."""
    named = check_peft_folder(folder, label)
    spec = find(named)
    reason = unsupported_reason(spec) if spec is not None else None
    if spec is None or reason:
        raise WeightsError(
            f"Weights {label}: a PEFT adapter on {named!r}, "
            + (f"which has no transformers form here ({reason})" if reason else "which is not a MusicGen we know")
            + ". A PEFT adapter must be trained on a facebook/musicgen-* model (text, stereo or melody)."
        )
    return {"method": "lora", "format": "peft", "base_model": named}, spec.name


def load_trained_model(
    weights: str | Path | OpenedWeights,
    device: str | None = None,
    *,
    lora_scale: float = 1.0,
    keep: tp.Iterable[str | Path] = (),
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
    free_bytes: FreeBytes | None = None,
) -> LoadedModel:
    """A fine-tuned MusicGen from a `trained_model.tar` (any reference `unpack` takes), its extracted folder, or
    weights `open_weights` already opened.

    Uses audiocraft's loaders. For a facebook/musicgen-* base, the base's own EnCodec is used when it is in the
    Hugging Face cache; otherwise audiocraft's reference (`facebook/encodec_32khz`) is followed. The members are
    checked against finetune.json's checksums, a full LM's config against its base's architecture, and an
    adapter's base against the recorded architecture. `lora_scale` scales a LoRA adapter's update (0: the base
    exactly, 1: as trained; the returned model's `adapter.set_scale` changes it later); for other weights a value
    other than 1 is ignored with a warning. `keep`, `min_free_bytes`, `free_bytes`: the cache eviction (`evict`).
    """
    from audiocraft.models import MusicGen
    from audiocraft.models.loaders import load_compression_model, load_lm_model

    if not isinstance(weights, OpenedWeights):
        weights = open_weights(weights, keep=keep, min_free_bytes=min_free_bytes, free_bytes=free_bytes)
    folder, info, base, label = weights.folder, weights.info, weights.base, weights.label
    device = device or default_device()
    if weights.format != "audiocraft":
        return _load_transformers(weights, device, lora_scale)
    if weights.adapter:
        return _load_with_adapter(folder, info, base, device, label=label, lora_scale=lora_scale)
    if lora_scale != 1.0:
        logger.warning(
            "lora_scale=%g is ignored: %s are %s weights, not a LoRA adapter",
            lora_scale,
            label,
            info.get("method", "full"),
        )
    spec = SPEC.get(base)
    # a tiny base's conditioners answer their model names from its own folder (core.tiny.tiny_hubs)
    model_home = tiny.ensure_tiny(base) if spec is not None and spec.loader == "tiny" else folder
    try:
        with tiny.tiny_hubs(model_home):
            lm = _load_lm(folder, device, load_lm_model)
        pkg = torch.load(folder / "compression_state_dict.bin", map_location="cpu", weights_only=True)
        compression = _base_compression(pkg, device, load_compression_model)
        if compression is None:
            compression = load_compression_model(str(folder), device=device)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelUnavailableError(
            f"Could not load the fine-tuned weights {label} (base {base or 'unknown'}): {type(e).__name__}: {e}. "
            "If the base is a facebook/musicgen-* model, its EnCodec must be downloadable or in the HF cache."
        ) from None
    _as_get_pretrained_sets(lm)
    name = f"fine-tune of {base}" if base else label
    return LoadedModel(MusicGen(name, compression, lm), name, spec, label, info, folder)


def _load_with_adapter(
    folder: Path, info: dict[str, tp.Any], base: str, device: str, *, label: str, lora_scale: float = 1.0
) -> LoadedModel:
    """A fine-tune that references its base (LoRA, textual inversion, text projection): the base model (by its
    model_version, as trained) with the adapter merged into its LM (scaled by `lora_scale`, kept as a
    `MergedLoRA` to change it later) and/or the learned tensors put in. The base's architecture must match the
    fingerprint finetune.json records."""
    lora = (folder / adapters.ADAPTER_CONFIG_FILE).is_file()
    if lora and not (folder / adapters.ADAPTER_FILE).is_file():
        raise WeightsError(f"{adapters.ADAPTER_CONFIG_FILE} without {adapters.ADAPTER_FILE} in {label}.")
    base_model = versions.load_musicgen(base, device)
    lm = base_model.lm
    verify_architecture(info, lm.cfg, base, label)  # every loader of load_musicgen gives the LM its cfg
    if not lora and lora_scale != 1.0:
        logger.warning("lora_scale=%g is ignored: %s hold %s weights, not a LoRA adapter", lora_scale, label,
                       info.get("method", "learned embedding"))  # fmt: skip
    adapter = None
    try:
        if lora:
            adapter = adapters.MergedLoRA(lm, folder, lora_scale)
        if (folder / adapters.EMBEDDINGS_FILE).is_file():
            adapters.apply_partial_file(lm, folder)
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, ArithmeticError, OSError) as e:
        raise WeightsError(
            f"The learned weights of {label} do not fit base model {base} ({type(e).__name__}: {e}); "
            "was it trained on another model_version?"
        ) from None
    name = f"{info.get('method', 'adapter')} fine-tune of {base}"
    return LoadedModel(base_model.musicgen, name, base_model.spec, label, info, folder, adapter)


def _load_transformers(weights: OpenedWeights, device: str, lora_scale: float) -> LoadedModel:
    """A transformers MusicGen, or a PEFT adapter merged (at `lora_scale`) into the transformers form of its base,
    converted into audiocraft's LM and EnCodec (`from_transformers`)."""
    from audiocraft.models import MusicGen

    folder, label = weights.folder, weights.label
    spec = None
    try:
        if weights.format == "peft":
            base = versions.load_musicgen(weights.base, device)
            spec = base.spec
            model = to_transformers(base.lm, base.musicgen.compression_model)
            del base
            model = merge_peft(model, folder, label, lora_scale)
            source: tp.Any = model
        else:
            if lora_scale != 1.0:
                logger.warning("lora_scale=%g is ignored: %s is a whole transformers model, not an adapter",
                               lora_scale, label)  # fmt: skip
            source = folder
        lm, compression, _cfg = from_transformers(source, device)
    except (WeightsError, ModelUnavailableError):
        raise
    except Exception as e:  # noqa: BLE001 - anyone's files: one message naming them
        raise WeightsError(
            f"Could not convert the transformers weights {label} into a MusicGen ({type(e).__name__}: "
            f"{str(e)[:300]}). Give a folder or repo saved by transformers' MusicgenForConditionalGeneration (or "
            "MusicgenMelodyForConditionalGeneration), or a PEFT LoRA adapter on a facebook/musicgen-* model."
        ) from None
    _as_get_pretrained_sets(lm)
    name = f"PEFT LoRA fine-tune of {weights.base}" if weights.format == "peft" else f"transformers model {label}"
    logger.info("Converted %s from transformers' format", label)
    return LoadedModel(MusicGen(name, compression, lm), name, spec, label, weights.info, folder)


def _as_get_pretrained_sets(lm: tp.Any) -> None:
    """The melody conditioner's eval settings `MusicGen.get_pretrained` sets after loading an LM."""
    if "self_wav" in lm.condition_provider.conditioners:
        lm.condition_provider.conditioners["self_wav"].match_len_on_eval = True
        lm.condition_provider.conditioners["self_wav"]._use_masking = False
