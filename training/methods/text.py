"""Methods that learn only the text side; everything else stays frozen. The tar carries the learned tensors
(`embeddings.safetensors`, KBs) and references the base model; `core.weights.load_trained_model` puts them in.

- `text_projection` (chavinlo's musicgen_trainer `tune_text`): trains the text conditioner's output projection
  (`condition_provider.conditioners.description.output_proj`, T5 768 -> LM dim, or the LUT's), so every prompt
  maps to the LM a little differently.
- `textual_inversion`: learns the embedding of the `trigger` word. With audiocraft's LUT conditioner the learned
  rows are the table rows the trigger's tokens hash to (`WhiteSpaceTokenizer`: one per word of the trigger). With
  the `noop` tokenizer (the tiny models) a whole description is a single token, so only the prompt made of the
  trigger alone can select a learned row: the examples are then conditioned on the trigger alone (logged), and
  prompting with exactly the trigger calls the style. T5 models (the facebook/musicgen-* checkpoints) would need
  new T5 vocabulary rows learned through the frozen encoder: not implemented yet; refused before any work.
"""

from __future__ import annotations

import logging
import typing as tp

import torch

from core import adapters
from core.params import InputError
from training.methods import Method, MethodExport, trainable_summary

logger = logging.getLogger(__name__)

TEXT_ATTRIBUTE = "description"
T5_MODELS = ("small", "medium", "large", "melody", "melody-large", "stereo-small", "stereo-medium", "stereo-large")
T5_MODELS = (*T5_MODELS, "stereo-melody", "stereo-melody-large")


def text_conditioner(lm: torch.nn.Module) -> tp.Any:
    conditioners = lm.condition_provider.conditioners
    if TEXT_ATTRIBUTE not in conditioners:
        raise InputError("method", f"this model has no text conditioner ({TEXT_ATTRIBUTE!r}): nothing to learn there")
    return conditioners[TEXT_ATTRIBUTE]


def _freeze(lm: torch.nn.Module) -> None:
    for p in lm.parameters():
        p.requires_grad_(False)


def _log_trainable(lm: torch.nn.Module, what: str) -> None:
    trainable, total = trainable_summary(lm)
    logger.info("%s: %d trainable parameters of %.1f M", what, trainable, total / 1e6)


class TextProjectionMethod(Method):
    name = "text_projection"

    def prepare(self, lm: torch.nn.Module, params: tp.Any) -> None:
        conditioner = text_conditioner(lm)
        _freeze(lm)
        for p in conditioner.output_proj.parameters():
            p.requires_grad_(True)
        _log_trainable(lm, "text_projection (the text conditioner's output projection)")

    def export(self, state_dict: dict[str, torch.Tensor], lm: torch.nn.Module, params: tp.Any) -> MethodExport:
        prefix = f"condition_provider.conditioners.{TEXT_ATTRIBUTE}.output_proj."
        tensors = {k: v.to(torch.float32) for k, v in state_dict.items() if k.startswith(prefix)}
        metadata = {"method": self.name, "base_model": str(params.model_version)}
        return MethodExport(
            state_dict={},
            extra_files={adapters.EMBEDDINGS_FILE: adapters.save_partial(tensors, metadata)},
            info={"embeddings": {"keys": sorted(tensors)}},
        )


class TextualInversionMethod(Method):
    name = "textual_inversion"

    def check(self, params: tp.Any) -> None:
        super().check(params)
        if not params.trigger or not params.trigger.strip():
            raise InputError("trigger", "method=textual_inversion learns the trigger word's embedding: give a trigger")
        if params.model_version in T5_MODELS:
            raise InputError(
                "method",
                f"textual_inversion is implemented for LUT text conditioners only; {params.model_version} uses T5. "
                "Use method=text_projection (trains T5's output projection) or lora",
            )

    def prepare(self, lm: torch.nn.Module, params: tp.Any) -> None:
        from audiocraft.modules.conditioners import LUTConditioner, NoopTokenizer

        conditioner = text_conditioner(lm)
        if not isinstance(conditioner, LUTConditioner):
            raise InputError("method", "textual_inversion needs a LUT text conditioner (T5 is not supported yet)")
        trigger = params.trigger.strip()
        tokens, mask = conditioner.tokenizer([trigger])
        rows = sorted({int(t) for t, m in zip(tokens[0].tolist(), mask[0].tolist(), strict=True) if m})
        _freeze(lm)
        conditioner.embed = adapters.RowTrainedEmbedding(conditioner.embed, rows)
        lm.condition_on_trigger_only = isinstance(conditioner.tokenizer, NoopTokenizer)
        lm.trigger_rows = rows
        _log_trainable(lm, f"textual_inversion of {trigger!r} (LUT rows {rows})")

    def adjust_clips(self, clips: list, lm: torch.nn.Module, params: tp.Any) -> list:
        if not getattr(lm, "condition_on_trigger_only", False):
            return clips
        trigger = params.trigger.strip()
        logger.info(
            "The text conditioner reads a whole description as one token (noop tokenizer): the examples are "
            "conditioned on the trigger %r alone, the prompt that selects the learned embedding",
            trigger,
        )
        for clip in clips:
            clip.description = trigger
        return clips

    def export(self, state_dict: dict[str, torch.Tensor], lm: torch.nn.Module, params: tp.Any) -> MethodExport:
        prefix = f"condition_provider.conditioners.{TEXT_ATTRIBUTE}.embed."
        key = prefix + "weight"
        tensors = {
            f"{key}@rows": state_dict[prefix + "trained_rows"].to(torch.float32),
            f"{key}@index": state_dict[prefix + "row_index"].to(torch.long),
        }
        metadata = {"method": self.name, "trigger": params.trigger.strip(), "base_model": str(params.model_version)}
        return MethodExport(
            state_dict={},
            extra_files={adapters.EMBEDDINGS_FILE: adapters.save_partial(tensors, metadata)},
            info={"embeddings": {"trigger": params.trigger.strip(), "rows": lm.trigger_rows}},
        )
