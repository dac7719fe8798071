"""Methods that learn only the text side; everything else stays frozen. The tar carries the learned tensors
(`embeddings.safetensors`, KBs) and references the base model; `core.weights.load_trained_model` puts them in.

- `text_projection` (chavinlo's musicgen_trainer `tune_text`): trains the text conditioner's output projection
  (`condition_provider.conditioners.description.output_proj`, T5 768 -> LM dim, or the LUT's), so every prompt
  maps to the LM a little differently.
- `textual_inversion`: learns the embedding of the `trigger` word.
  - T5 text conditioners (every facebook/musicgen-* model, and `tiny-t5`): the trigger becomes new T5 vocabulary,
    one placeholder token per sentencepiece piece of the trigger (`core.adapters.add_t5_trigger`), whose input
    embeddings start as those pieces' and are learned through the frozen T5 encoder; nothing else changes (T5,
    its output projection and the LM stay frozen). Every training example carries the trigger (prepended, logged,
    where a description lacks it; prior-preservation examples are left without it). Prompts holding the trigger
    (whole word, any case) use the learned rows; all other prompts are encoded exactly as by the base model.
  - audiocraft's LUT conditioner: the learned rows are the table rows the trigger's tokens hash to
    (`WhiteSpaceTokenizer`: one per word of the trigger). With the `noop` tokenizer (the LUT tiny models) a whole
    description is a single token, so only the prompt made of the trigger alone can select a learned row: the
    examples are then conditioned on the trigger alone (logged), and prompting with exactly the trigger calls the
    style.
"""

from __future__ import annotations

import json
import logging
import typing as tp

import torch
from audiocraft.modules.conditioners import LUTConditioner, NoopTokenizer

from core import adapters
from core.params import InputError
from training.methods.base import Method, MethodExport, Prepared, trainable_parameters, trainable_summary
from training.params import TrainParams

logger = logging.getLogger(__name__)

TEXT_ATTRIBUTE = "description"


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

    def prepare(self, lm: torch.nn.Module, params: TrainParams) -> Prepared:
        conditioner = text_conditioner(lm)
        _freeze(lm)
        for p in conditioner.output_proj.parameters():
            p.requires_grad_(True)
        _log_trainable(lm, "text_projection (the text conditioner's output projection)")
        trained = trainable_parameters(lm)  # condition_provider.conditioners.description.output_proj.{weight,bias}
        return Prepared(trained, exports=tuple(trained))

    def export(self, state_dict: dict[str, torch.Tensor], prepared: Prepared, params: TrainParams) -> MethodExport:
        tensors = {k: v.to(torch.float32) for k, v in prepared.exported(state_dict).items()}
        metadata = {"method": self.name, "base_model": str(params.model_version)}
        return MethodExport(
            state_dict={},
            extra_files={adapters.EMBEDDINGS_FILE: adapters.save_partial(tensors, metadata)},
            info={"embeddings": {"keys": sorted(tensors)}},
        )


class TextualInversionMethod(Method):
    name = "textual_inversion"

    def check(self, params: TrainParams) -> None:
        super().check(params)
        if not params.trigger or not params.trigger.strip():
            raise InputError("trigger", "method=textual_inversion learns the trigger word's embedding: give a trigger")

    def prepare(self, lm: torch.nn.Module, params: TrainParams) -> Prepared:
        conditioner = text_conditioner(lm)
        trigger = params.trigger.strip()
        prefix = f"condition_provider.conditioners.{TEXT_ATTRIBUTE}."
        _freeze(lm)
        if adapters.is_t5_conditioner(conditioner):
            try:
                tokens = adapters.add_t5_trigger(conditioner, trigger)
            except ValueError as e:
                raise InputError("method", f"textual_inversion cannot learn {trigger!r} on this model: {e}") from None
            _log_trainable(lm, f"textual_inversion of {trigger!r} (T5 tokens {''.join(tokens)})")
            record = {"trigger_tokens": tokens, "trigger_pieces": conditioner.trigger_pieces}
            return Prepared(trainable_parameters(lm), exports=(prefix + adapters.T5_TRIGGER_PARAM,), record=record)
        if not isinstance(conditioner, LUTConditioner):
            raise InputError(
                "method",
                f"textual_inversion needs a T5 or LUT text conditioner; this model's is {type(conditioner).__name__}. "
                "Use method=text_projection or lora",
            )
        tokens, mask = conditioner.tokenizer([trigger])
        rows = sorted({int(t) for t, m in zip(tokens[0].tolist(), mask[0].tolist(), strict=True) if m})
        conditioner.embed = adapters.RowTrainedEmbedding(conditioner.embed, rows)
        _log_trainable(lm, f"textual_inversion of {trigger!r} (LUT rows {rows})")
        record = {"trigger_rows": rows, "condition_on_trigger_only": isinstance(conditioner.tokenizer, NoopTokenizer)}
        exports = (prefix + "embed.trained_rows", prefix + "embed.row_index")  # the rows, and which rows they are
        return Prepared(trainable_parameters(lm), exports=exports, record=record)

    def adjust_clips(self, clips: list, prepared: Prepared, params: TrainParams) -> list:
        trigger = params.trigger.strip()
        if prepared.record.get("trigger_tokens"):
            return _carry_trigger(clips, trigger)
        if not prepared.record.get("condition_on_trigger_only"):
            return clips
        logger.info(
            "The text conditioner reads a whole description as one token (noop tokenizer): the examples are "
            "conditioned on the trigger %r alone, the prompt that selects the learned embedding",
            trigger,
        )
        for clip in clips:
            clip.description = trigger
        return clips

    def export(self, state_dict: dict[str, torch.Tensor], prepared: Prepared, params: TrainParams) -> MethodExport:
        trigger = params.trigger.strip()
        metadata = {"method": self.name, "trigger": trigger, "base_model": str(params.model_version)}
        prefix = f"condition_provider.conditioners.{TEXT_ATTRIBUTE}."
        learned = prepared.exported(state_dict)
        record = prepared.record
        if record.get("trigger_tokens"):
            key = prefix + adapters.T5_TRIGGER_PARAM
            tensors = {key: learned[key].to(torch.float32)}
            metadata["trigger_tokens"] = json.dumps(record["trigger_tokens"])
            info = {"trigger": trigger, "tokens": record["trigger_tokens"], "pieces": record["trigger_pieces"]}
        else:
            key = prefix + "embed.weight"
            tensors = {
                f"{key}@rows": learned[prefix + "embed.trained_rows"].to(torch.float32),
                f"{key}@index": learned[prefix + "embed.row_index"].to(torch.long),
            }
            info = {"trigger": trigger, "rows": record["trigger_rows"]}
        return MethodExport(
            state_dict={},
            extra_files={adapters.EMBEDDINGS_FILE: adapters.save_partial(tensors, metadata)},
            info={"embeddings": info},
        )


def _carry_trigger(clips: list, trigger: str) -> list:
    """Every instance example's description holds the trigger (the learned tokens see gradients only there);
    prior-preservation examples (`info['prior']`) keep their class prompts without it."""
    pattern = adapters.trigger_pattern(trigger)
    added = 0
    for clip in clips:
        if clip.info.get("prior") or pattern.search(clip.description or ""):
            continue
        clip.description = f"{trigger} {clip.description}".strip() if clip.description else trigger
        added += 1
    if added:
        logger.info("The trigger %r was prepended to %d description(s) that lacked it", trigger, added)
    return clips
