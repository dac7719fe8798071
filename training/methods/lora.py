"""`method=lora`: low-rank adapters (`core.adapters`) on the LM's attention (q, k, v of the bare `in_proj_weight`,
`out_proj`) and feed-forward (`linear1`, `linear2`), optionally the output heads (`linears.*`); every base weight
frozen. The tar carries `adapter.safetensors` (fp16) + `adapter_config.json` and references the base model, or
(`lora_merge=true`) the merged full LM.
"""

from __future__ import annotations

import logging

import torch

from core import adapters
from core.catalogue import LM_LAYOUTS
from core.params import InputError
from training.methods.base import Method, MethodExport, Prepared, trainable_parameters, trainable_summary
from training.params import TrainParams

logger = logging.getLogger(__name__)


def layout_target_names(n_layers: int, n_q: int) -> list[str]:
    """The LoRA target names of a MusicGen LM with `n_layers` layers (cross-attention on) and `n_q` heads."""
    names = []
    for i in range(n_layers):
        for attn in ("self_attn", "cross_attention"):
            prefix = f"transformer.layers.{i}.{attn}"
            names += [f"{prefix}.q", f"{prefix}.k", f"{prefix}.v", f"{prefix}.out_proj"]
            if attn == "self_attn":
                names += [f"transformer.layers.{i}.linear1", f"transformer.layers.{i}.linear2"]
    return names + [f"linears.{k}" for k in range(n_q)]


def check_targets(patterns: str, names: list[str]) -> list[str]:
    try:
        return adapters.match_targets(names, patterns)
    except ValueError as e:
        raise InputError("lora_targets", str(e)) from None


class LoRAMethod(Method):
    name = "lora"
    foreign_inputs: tuple[str, ...] = ()

    def check(self, params: TrainParams) -> None:
        if params.lora_rank < 1:
            raise InputError("lora_rank", f"{params.lora_rank}: method=lora needs a rank of at least 1 (try 16)")
        if params.lora_alpha <= 0:
            raise InputError("lora_alpha", f"{params.lora_alpha} must be above 0 (the update scale is alpha/rank)")
        layout = LM_LAYOUTS.get(params.model_version)  # none for local folders: checked on the loaded model
        if layout is not None:
            check_targets(params.lora_targets, layout_target_names(*layout))

    def prepare(self, lm: torch.nn.Module, params: TrainParams) -> Prepared:
        try:
            targets = adapters.select_targets(lm, params.lora_targets)
        except ValueError as e:
            raise InputError("lora_targets", str(e)) from None
        for p in lm.parameters():
            p.requires_grad_(False)
        added = adapters.add_lora(lm, targets, params.lora_rank, params.lora_alpha)
        for p in added:
            p.requires_grad_(True)
        config = {
            "rank": params.lora_rank,
            "alpha": params.lora_alpha,
            "targets": targets,
            "patterns": params.lora_targets,
        }
        trained = trainable_parameters(lm)  # the adapter factors, and nothing else
        trainable, total = trainable_summary(lm)
        logger.info(
            "LoRA rank %d alpha %g on %d modules: %.2f M trainable of %.1f M parameters (%.2f%%)",
            params.lora_rank,
            params.lora_alpha,
            len(targets),
            trainable / 1e6,
            total / 1e6,
            100 * trainable / total,
        )
        # the adapter's tensors are the export (`lora_merge`: folded into the whole LM, see `export`)
        return Prepared(trained, exports=tuple(trained), record={"lora_config": config})

    def export(self, state_dict: dict[str, torch.Tensor], prepared: Prepared, params: TrainParams) -> MethodExport:
        learned = prepared.record["lora_config"]
        config = {"format": "musicgen-ft-lora", "version": 1, "base_model": params.model_version, **learned}
        if params.lora_merge:
            merged = adapters.merge_lora_state(state_dict, params.lora_alpha / params.lora_rank)
            return MethodExport(state_dict=merged, info={"adapter": {**config, "merged": True}})
        return MethodExport(
            state_dict={},
            extra_files=adapters.save_adapter(prepared.exported(state_dict), config),
            info={"adapter": {**config, "merged": False}},
        )
