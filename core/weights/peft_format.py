"""LoRA fine-tunes as PEFT adapters on the transformers MusicGen (`core.weights.transformers_format`), both ways.

Out: our LoRA adapter (`core/adapters.py`: `<attn>.in_proj_lora.{q,k,v}.lora_A` `[rank, in]` / `lora_B` `[out,
rank]`, `<module>.lora_A` / `lora_B` for linears, one `alpha / rank` scale) becomes the files
`PeftModel.from_pretrained(base, folder)` reads: `adapter_config.json` (`peft_type: LORA`, `r`, `lora_alpha`,
`target_modules` by full module name) and `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`).
audiocraft keeps q, k and v as one `in_proj_weight`; transformers has `q_proj`, `k_proj`, `v_proj`, so each of our
q/k/v factors is exactly one PEFT module's. Names map as:

    transformer.layers.<i>.self_attn.{q,k,v,out_proj}        decoder.model.decoder.layers.<i>.self_attn.{q,k,v,out}_proj
    transformer.layers.<i>.cross_attention.{q,k,v,out_proj}  decoder.model.decoder.layers.<i>.encoder_attn.{...}_proj
    transformer.layers.<i>.linear1 / linear2                 decoder.model.decoder.layers.<i>.fc1 / fc2
    linears.<k>                                              decoder.lm_heads.<k>

In: a folder (or hub repo) holding a PEFT adapter whose `base_model_name_or_path` is a facebook/musicgen-* model
(or a model version we name) is applied with peft itself on the transformers form of that base and merged
(`merge_peft`): whatever variant of LoRA peft wrote (rsLoRA, per-module ranks, DoRA), peft computes the merge.
"""

from __future__ import annotations

import json
import logging
import typing as tp
from pathlib import Path

import torch

from core.errors import WeightsError

logger = logging.getLogger(__name__)

PEFT_CONFIG_FILE = "adapter_config.json"  # the same name as ours (core.adapters.ADAPTER_CONFIG_FILE): told apart
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"  # by `peft_type`, which only peft's config has
# What a hub repo of a transformers model or a PEFT adapter holds that the conversion reads (tokenizer and
# processor files included: a textual inversion's added tokens are in the tokenizer).
TRANSFORMERS_PATTERNS = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
)
_DECODER = "decoder.model.decoder.layers"
_ATTENTION = {"self_attn": "self_attn", "cross_attention": "encoder_attn"}
_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out_proj": "out_proj"}
_MLP = {"linear1": "fc1", "linear2": "fc2"}


def read_peft_config(folder: Path) -> dict[str, tp.Any] | None:
    """`adapter_config.json` of `folder` when it is peft's (it has `peft_type`), else None (ours, or none)."""
    path = Path(folder) / PEFT_CONFIG_FILE
    if not path.is_file() or path.stat().st_size > 1 << 20:
        return None
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) and "peft_type" in config else None


def is_peft_folder(folder: Path) -> bool:
    return read_peft_config(folder) is not None


def check_peft_folder(folder: Path, label: str) -> str:
    """A PEFT LoRA adapter we can apply: its weights file is there and its base is named. Returns the base."""
    config = read_peft_config(folder)
    if config is None:
        raise WeightsError(f"Weights {label}: {PEFT_CONFIG_FILE} is not a PEFT adapter config (no peft_type).")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise WeightsError(
            f"Weights {label}: a PEFT {config.get('peft_type')!r} adapter; only LoRA adapters (peft_type LORA) on a "
            "facebook/musicgen-* model can be applied. Merge it into the model and give the merged model instead."
        )
    if not (Path(folder) / PEFT_WEIGHTS_FILE).is_file():
        raise WeightsError(f"Weights {label}: {PEFT_CONFIG_FILE} without {PEFT_WEIGHTS_FILE}.")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise WeightsError(
            f"Weights {label}: the PEFT adapter's {PEFT_CONFIG_FILE} names no base_model_name_or_path; it cannot be "
            "applied. Set it to the facebook/musicgen-* model the adapter was trained on."
        )
    return base.strip()


def transformers_module(name: str) -> str:
    """The transformers `MusicgenForConditionalGeneration` module our LoRA target `name` adapts (see the table)."""
    parts = name.split(".")
    if parts[0] == "linears" and len(parts) == 2:
        return f"decoder.lm_heads.{parts[1]}"
    if parts[:2] == ["transformer", "layers"] and len(parts) >= 4:
        layer, rest = parts[2], parts[3:]
        if len(rest) == 1 and rest[0] in _MLP:
            return f"{_DECODER}.{layer}.{_MLP[rest[0]]}"
        if len(rest) == 2 and rest[0] in _ATTENTION and rest[1] in _PROJ:
            return f"{_DECODER}.{layer}.{_ATTENTION[rest[0]]}.{_PROJ[rest[1]]}"
    raise ValueError(f"LoRA target {name} has no module in transformers' MusicGen")


def _target_of(key: str) -> tuple[str, str]:
    """(our target name, `lora_A`/`lora_B`) of an adapter tensor key of `core.adapters.lora_state_dict`."""
    stem, factor = key.rsplit(".", 1)
    if ".in_proj_lora." in stem:
        attn, part = stem.split(".in_proj_lora.")
        return f"{attn}.{part}", factor
    return stem, factor


def peft_adapter_files(
    tensors: tp.Mapping[str, torch.Tensor], config: tp.Mapping[str, tp.Any], base_model: str
) -> dict[str, bytes]:
    """`adapter_config.json` and `adapter_model.safetensors` (fp32) of our LoRA adapter `tensors` (keys as
    `core.adapters.lora_state_dict`) with `config` (`rank`, `alpha`), for the transformers model of `base_model`
    (a hub id such as facebook/musicgen-small, or the model version's name where it has none)."""
    from safetensors.torch import save

    out: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    for key, value in tensors.items():
        target, factor = _target_of(key)
        module = transformers_module(target)
        modules.add(module)
        out[f"base_model.model.{module}.{factor}.weight"] = value.detach().to("cpu", torch.float32).contiguous()
    rank, alpha = int(config["rank"]), float(config["alpha"])
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        # full names, each matched as a whole: the fused and unfused attentions differ only in their names
        "target_modules": sorted(modules),
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    metadata = {"format": "pt"}
    return {
        PEFT_CONFIG_FILE: json.dumps(peft_config, indent=2, sort_keys=True).encode(),
        PEFT_WEIGHTS_FILE: save(out, metadata=metadata),
    }


def merge_peft(model: tp.Any, folder: Path, label: str, scale: float = 1.0) -> tp.Any:
    """The transformers MusicGen `model` with the PEFT LoRA adapter in `folder` merged into its weights (peft's own
    `merge_and_unload`); `scale` multiplies the adapter's update (predict's `lora_scale`)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except Exception as e:  # noqa: BLE001 - a module it names that the base lacks, a shape that differs: one message
        raise WeightsError(
            f"The PEFT adapter {label} does not fit its base model ({type(e).__name__}: {str(e)[:300]}); was it "
            "trained on another facebook/musicgen-* model?"
        ) from None
    if scale != 1.0:
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.scale_layer(scale)
    n = sum(isinstance(m, LoraLayer) for m in peft_model.modules())
    merged = peft_model.merge_and_unload()
    logger.info("Merged the PEFT LoRA adapter %s (%d modules, strength %g) into its base", label, n, scale)
    return merged
