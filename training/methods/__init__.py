"""Fine-tuning methods: what the model learns and what the weights tar carries.

Each method is one small module with the same interface (`Method`); the engine calls it at three points and
nowhere else:

- `check(params)`: input checks that need no model, in `training.run.check_inputs` (before any long work);
- `adjust_clips(clips, lm, params)`: after `prepare`, the encoded training examples, changed or extended;
- `prepare(lm, params)`: after the base model is loaded (`training.run.setup_training`): change the model (add
  adapters) and decide what trains (`requires_grad`); the loop optimizes exactly the parameters that require grad;
- `export(state_dict, lm, params)`: the files of `trained_model.tar` (`training.export.export_trained_model`):
  either the full LM (`state_dict`), or only what was learned, with the base model referenced by name.

`full` trains every LM weight; `lora` trains low-rank adapters (`training/methods/lora.py`); `textual_inversion`
and `text_projection` learn only the text side (`training/methods/text.py`).
"""

from __future__ import annotations

import logging
import typing as tp
from dataclasses import dataclass, field

import torch

from core.params import InputError

logger = logging.getLogger(__name__)

__all__ = ["Method", "MethodExport", "get_method", "method_names", "enable_gradient_checkpointing"]


@dataclass
class MethodExport:
    """What a method puts in the weights tar.

    `state_dict`: the LM weights for `state_dict.bin` (empty when the tar references its base and carries only
    `extra_files`); `extra_files`: e.g. `adapter.safetensors`; `info`: added to `finetune.json`.
    """

    state_dict: dict[str, torch.Tensor]
    extra_files: dict[str, bytes] = field(default_factory=dict)
    info: dict[str, tp.Any] = field(default_factory=dict)


class Method:
    """`full`: every weight of the language model trains; the export is the whole LM."""

    name = "full"
    # inputs that belong to other methods: a non-default value with this method is logged as ignored
    foreign_inputs: tuple[str, ...] = ("lora_rank", "lora_alpha", "lora_targets", "lora_merge")

    def check(self, params: tp.Any) -> None:
        from training.params import TrainParams

        defaults = TrainParams()
        for name in self.foreign_inputs:
            if getattr(params, name) != getattr(defaults, name):
                logger.warning("%s=%r is ignored with method=%s", name, getattr(params, name), self.name)

    def prepare(self, lm: torch.nn.Module, params: tp.Any) -> None:
        """Nothing to change: every LM weight already trains (except what the model kind freezes itself, e.g. the
        MusicGen-Style conditioner)."""

    def adjust_clips(self, clips: list, lm: torch.nn.Module, params: tp.Any) -> list:
        """The training examples (`training.data.ClipTokens`), changed or extended as the method needs."""
        return clips

    def export(self, state_dict: dict[str, torch.Tensor], lm: torch.nn.Module, params: tp.Any) -> MethodExport:
        return MethodExport(state_dict=state_dict)


def _registry() -> dict[str, Method]:
    from training.methods.lora import LoRAMethod
    from training.methods.text import TextProjectionMethod, TextualInversionMethod

    return {m.name: m for m in (Method(), LoRAMethod(), TextualInversionMethod(), TextProjectionMethod())}


def method_names() -> tuple[str, ...]:
    return tuple(_registry())


def get_method(name: str) -> Method:
    methods = _registry()
    if name not in methods:
        raise InputError("method", f"{name!r} is not one of: {', '.join(methods)}")
    return methods[name]


def enable_gradient_checkpointing(lm: torch.nn.Module) -> None:
    """Recompute each transformer layer in the backward pass (audiocraft's own `checkpointing='torch'`)."""
    lm.transformer.checkpointing = "torch"
    logger.info("Gradient checkpointing on: each of %d layers is recomputed in backward", len(lm.transformer.layers))


def trainable_summary(lm: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters) of `lm`."""
    total = sum(p.numel() for p in lm.parameters())
    return sum(p.numel() for p in lm.parameters() if p.requires_grad), total
