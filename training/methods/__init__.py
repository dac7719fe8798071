"""Fine-tuning methods: what the model learns and what the weights tar carries.

Each method is one small module with the same interface (`Method`, in `training/methods/base.py`); the engine
calls it at four points and nowhere else:

- `check(params)`: input checks that need no model, in `check_inputs` (run by `training.run.check_inputs` before
  any long work);
- `prepare(lm, params)`: after the base model is loaded (`training.run.setup_training`): change the model (add
  adapters), freeze the rest, and return a `Prepared`: the parameters that train (by name; exactly those that
  require grad, which the loop optimizes), the state-dict keys the export carries, and what the export needs to
  remember (LoRA config, trigger tokens);
- `adjust_clips(clips, prepared, params)`: after `prepare`, the encoded training examples, changed or extended;
- `export(state_dict, prepared, params)`: the files of `trained_model.tar` (`training.export.export_trained_model`):
  either the full LM (`state_dict`), or only what was learned (`prepared.exports`), with the base model referenced
  by name.

`full` trains every LM weight; `lora` trains low-rank adapters (`training/methods/lora.py`); `textual_inversion`
and `text_projection` learn only the text side (`training/methods/text.py`).
"""

from __future__ import annotations

import logging

import torch

from core.params import InputError
from training.methods import prior, scratch
from training.methods.base import Method, MethodExport, Prepared, trainable_summary
from training.methods.lora import LoRAMethod
from training.methods.text import TextProjectionMethod, TextualInversionMethod
from training.params import TrainParams

logger = logging.getLogger(__name__)

__all__ = [
    "Method",
    "MethodExport",
    "Prepared",
    "get_method",
    "method_names",
    "check_inputs",
    "enable_gradient_checkpointing",
    "trainable_summary",
]

# One instance per method (they hold no state), in the order of the catalogue's METHODS (the `method` input's
# choices); tests/test_architecture.py proves both name the same methods.
_METHODS: dict[str, Method] = {
    m.name: m for m in (Method(), LoRAMethod(), TextualInversionMethod(), TextProjectionMethod())
}


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise InputError("method", f"{name!r} is not one of: {', '.join(_METHODS)}")
    return _METHODS[name]


def check_inputs(params: TrainParams) -> None:
    """The method-specific input checks that need no model (after `training.params.validate`): from scratch,
    the chosen method's own, prior preservation."""
    scratch.check(params)
    get_method(params.method).check(params)
    prior.check(params)


def enable_gradient_checkpointing(lm: torch.nn.Module) -> None:
    """Recompute each transformer layer in the backward pass (audiocraft's own `checkpointing='torch'`)."""
    lm.transformer.checkpointing = "torch"
    logger.info("Gradient checkpointing on: each of %d layers is recomputed in backward", len(lm.transformer.layers))
