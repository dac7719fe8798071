"""Write `trained_model.tar`: the LM through `core.weights.write_trained_model`, plus the training report.

Besides the weights and `finetune.json` (every training input, the label vocabulary, the trigger, a summary of the
run), the tar carries `loss.png` and `samples/sample_<i>.wav`: short pieces generated with the fine-tuned model
from training descriptions.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import tarfile
import tempfile
import typing as tp
from pathlib import Path

import torch

from core import weights
from core.audio import save_audio
from core.params import secret_fields
from training.data import ClipTokens
from training.loop import TrainResult
from training.melody import restore_for_generation
from training.methods import get_method
from training.params import TrainParams
from training.report import plot_history

logger = logging.getLogger(__name__)

__all__ = ["export_trained_model", "label_vocabulary", "generate_samples", "N_SAMPLES"]

N_SAMPLES = 2
REPORT_FILES = ("loss.png", "samples/")
VOCAB_FIELDS = ("genre", "moods", "instrument", "key", "keywords")


def label_vocabulary(clips: tp.Sequence[ClipTokens], report: dict | None = None) -> dict[str, list[str]]:
    """The labels the training descriptions used, per field (genre, moods, ...), from the clips' info."""
    vocab: dict[str, set[str]] = {name: set() for name in VOCAB_FIELDS}
    for clip in clips:
        for name in VOCAB_FIELDS:
            value = clip.info.get(name)
            values = value if isinstance(value, list | tuple) else [value]
            vocab[name].update(str(v).strip() for v in values if v not in (None, "") and str(v).strip())
    out = {name: sorted(values) for name, values in vocab.items() if values}
    if report and isinstance(report.get("labels"), dict):
        for name, values in report["labels"].items():
            if isinstance(values, list | tuple):
                out[name] = sorted(set(out.get(name, [])) | {str(v) for v in values})
    return out


def sample_descriptions(clips: tp.Sequence[ClipTokens], n: int = N_SAMPLES) -> list[str]:
    """`n` training descriptions for the samples: distinct ones first, repeated if there are fewer."""
    distinct: list[str] = []
    for clip in clips:
        if clip.description and clip.description not in distinct:
            distinct.append(clip.description)
    distinct = distinct or [""]
    return [distinct[i % len(distinct)] for i in range(n)]


@torch.no_grad()
def generate_samples(model: tp.Any, descriptions: list[str], duration: float) -> list[bytes]:
    """WAV bytes of one sample per description, generated with `model` (its LM already holds the trained weights,
    LoRA adapters included), in one batch through predict's sampler (`generation.generate.generate_audio`)."""
    from generation.generate import generate_audio, quantize_setting

    restore_for_generation(model.lm)
    # The samples preview what predict will make of these weights, so they take predict's sampler and precision
    # (MGFT_QUANTIZE, default `auto`: int8 on CPU, ~7x faster than audiocraft's generate at a next-token KL of
    # ~0.0007 nats vs fp32, far below the sampling's own randomness; fp16 on CUDA). The int8/fp16 copy is built
    # from the trained weights for this call only; the training model is not modified.
    wav = generate_audio(model, descriptions, duration, quantize=quantize_setting())  # [B, C, T]
    out = []
    for one in wav:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_audio(Path(tmp) / "sample.wav", one.float().cpu(), model.sample_rate, "wav")
            out.append(path.read_bytes())
    return out


def export_trained_model(
    out_tar: Path,
    *,
    model: tp.Any,
    result: TrainResult,
    params: TrainParams,
    clips: tp.Sequence[ClipTokens],
    dataset_report: dict | None = None,
    run_info: dict | None = None,
) -> Path:
    """Write `out_tar` atomically: weights (fp16 LM + compression reference), finetune.json, loss.png, samples."""
    cfg = model.lm.cfg  # the base's config as audiocraft's loader read it (device/dtype dropped on export)
    prior_examples = [
        {"kind": c.info["prior"], "prompt": c.description, "file": Path(c.path).name, "track": c.info["prior_source"]}
        for c in clips
        if c.info.get("prior")
    ]
    clips = [c for c in clips if not c.info.get("prior")]  # the report and samples describe the user's clips
    # Never a credential in a file we hand out (wandb_api_key, hf_token: core.params.secret_fields).
    secrets = secret_fields(TrainParams)
    inputs = {k: v for k, v in dataclasses.asdict(params).items() if k not in secrets}
    inputs["dataset_path"] = Path(str(params.dataset_path)).name if params.dataset_path else None
    if params.resume_from:
        inputs["resume_from"] = Path(str(params.resume_from)).name
    history = result.history
    finetune = {
        "model_version": params.model_version,
        "method": params.method,
        "trigger": params.trigger,
        "training_inputs": inputs,
        "labels": label_vocabulary(clips, dataset_report),
        "descriptions": sorted({c.description for c in clips if c.description})[:200],
        "ema": params.ema,
        "training": {
            "steps": result.steps,
            "clips": len(clips),
            "precision": result.precision,
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "tokens_per_s": round(result.tokens_per_s, 1),
            "peak_memory_mb": round(result.peak_memory_mb, 1),
            "seconds": round(result.seconds, 1),
            **(run_info or {}),
        },
    }
    if prior_examples:
        finetune["prior_examples"] = prior_examples
    method_export = get_method(params.method).export(result.state_dict, model.lm, params)  # training/methods/
    finetune.update(method_export.info)
    extra: dict[str, bytes] = {"loss.png": plot_history(history)}
    if params.sample_duration > 0:
        model.lm.load_state_dict(result.state_dict)
        descriptions = sample_descriptions(clips)
        logger.info("Generating %d samples of %.1f s: %s", len(descriptions), params.sample_duration, descriptions)
        for i, data in enumerate(generate_samples(model, descriptions, params.sample_duration)):
            extra[f"samples/sample_{i}.wav"] = data
        finetune["samples"] = [
            {"file": f"samples/sample_{i}.wav", "description": d} for i, d in enumerate(descriptions)
        ]
    out_tar = Path(out_tar)
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".trained_model-", suffix=".tar", dir=out_tar.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        weights.write_trained_model(
            tmp,
            state_dict=method_export.state_dict,
            cfg=cfg,
            base_model=params.model_version,
            finetune=finetune,
            extra_files=method_export.extra_files,
        )
        with tarfile.open(tmp, "a") as tar:
            for name, data in extra.items():
                member = tarfile.TarInfo(name)
                member.size = len(data)
                member.mode = 0o644
                tar.addfile(member, io.BytesIO(data))
        os.replace(tmp, out_tar)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("Trained model written to %s (%.1f MB)", out_tar, out_tar.stat().st_size / 1e6)
    return out_tar
