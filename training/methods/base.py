"""The interface every fine-tuning method implements (`Method`), and `full`, the method that is the interface's
defaults: every LM weight trains and the export is the whole LM. See `training/methods/__init__.py`."""

from __future__ import annotations

import logging
import typing as tp
from dataclasses import dataclass, field

import torch

from training.params import TrainParams, used_only_by

logger = logging.getLogger(__name__)

__all__ = ["Method", "MethodExport", "trainable_summary"]


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

    def prepare(self, lm: torch.nn.Module, params: TrainParams) -> None:
        """Nothing to change: every LM weight already trains (except what the model kind freezes itself, e.g. the
        MusicGen-Style conditioner)."""

    def adjust_clips(self, clips: list, lm: torch.nn.Module, params: TrainParams) -> list:
        """The training examples (`training.data.ClipTokens`), changed or extended as the method needs."""
        return clips

    def export(self, state_dict: dict[str, torch.Tensor], lm: torch.nn.Module, params: TrainParams) -> MethodExport:
        return MethodExport(state_dict=state_dict)


def trainable_summary(lm: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters) of `lm`."""
    total = sum(p.numel() for p in lm.parameters())
    return sum(p.numel() for p in lm.parameters() if p.requires_grad), total
