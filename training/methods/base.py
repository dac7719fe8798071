"""The interface every fine-tuning method implements (`Method`), and `full`, the method that is the interface's
defaults: every LM weight trains and the export is the whole LM. See `training/methods/__init__.py`."""

from __future__ import annotations

import logging
import typing as tp
from dataclasses import dataclass, field

import torch

from training.params import TrainParams, used_only_by

logger = logging.getLogger(__name__)

__all__ = ["Method", "MethodExport", "Prepared", "trainable_summary"]


@dataclass
class Prepared:
    """What a method made of the LM (`Method.prepare`), as torchtune's `get_adapter_params` names it: `trainable`,
    the parameters the optimizer steps, by state-dict name (exactly those require grad; everything else is
    frozen); `exports`, the state-dict keys the tar carries of what was learned (None: the whole LM); `record`,
    what the method learned about the model that its export needs (the LoRA config, the trigger's tokens or rows).
    """

    trainable: dict[str, torch.nn.Parameter]
    exports: tuple[str, ...] | None = None
    record: dict[str, tp.Any] = field(default_factory=dict)

    def exported(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of a trained `state_dict` the tar carries (`exports`; the whole of it when None)."""
        if self.exports is None:
            return state_dict
        return {k: state_dict[k] for k in self.exports}


def trainable_parameters(lm: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """`lm`'s parameters that require grad, by name, in model order."""
    return {n: p for n, p in lm.named_parameters() if p.requires_grad}


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
    # inputs that belong to other methods (`used_by` in training/params.py): a non-default value with this method is
    # logged as ignored
    foreign_inputs: tuple[str, ...] = used_only_by("lora")

    def check(self, params: TrainParams) -> None:
        defaults = TrainParams()
        for name in self.foreign_inputs:
            if getattr(params, name) != getattr(defaults, name):
                logger.warning("%s=%r is ignored with method=%s", name, getattr(params, name), self.name)

    def prepare(self, lm: torch.nn.Module, params: TrainParams) -> Prepared:
        """Nothing to change: every LM weight trains (except what the model kind froze itself, e.g. the
        MusicGen-Style conditioner), and the export is the whole LM."""
        return Prepared(trainable_parameters(lm))

    def adjust_clips(self, clips: list, prepared: Prepared, params: TrainParams) -> list:
        """The training examples (`training.data.ClipTokens`), changed or extended as the method needs."""
        return clips

    def export(self, state_dict: dict[str, torch.Tensor], prepared: Prepared, params: TrainParams) -> MethodExport:
        return MethodExport(state_dict=prepared.exported(state_dict))


def trainable_summary(lm: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters) of `lm`."""
    total = sum(p.numel() for p in lm.parameters())
    return sum(p.numel() for p in lm.parameters() if p.requires_grad), total
