"""Measure several weights on the same held-out tracks with the trainer's metrics (`python -m evaluation`).

For each weights (a base version such as `small` or `tiny`, or a `trained_model.tar`, LoRA tars included):

- `val_loss`, `val_loss_uncond`, per codebook: exactly the validation loss of a training run
  (`training.evaluate.Evaluator`: the training loss without condition dropout on fixed crops of every clip);
- `frechet`: Fréchet distance between EnCodec latents (before quantization) of samples generated from the clips'
  descriptions and of the held-out clips themselves; every model is embedded with the *first* weights' EnCodec so
  that the numbers compare (lower: closer to the held-out music);
- `frechet_effnet`: the same in essentia's discogs-effnet space when its model file is present
  (evaluation/effnet.py; else `frechet_effnet_skipped` says why);
- `copy_check` (with `training`): each generated sample's nearest training clip, flagged when it is closer to it
  than training clips are to each other (`evaluation.embed.copy_check`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import typing as tp
from pathlib import Path

import numpy as np
import torch

from core.audio import load_audio
from core.devices import default_device
from core.params import InputError
from core.versions import load_musicgen
from core.weights import load_trained_model
from evaluation.effnet import effnet_frechet
from evaluation.embed import copy_check, encodec_latents
from evaluation.frechet import embedding_frechet
from generation.generate import generate_audio
from generation.request import check_sampler_precision
from preprocessing.dataset import load_prepared
from preprocessing.params import PrepareParams
from preprocessing.prepare import prepare
from training import fsdp as fsdp_mod
from training.data import TokenDataset, encode_clips
from training.dist import DistInfo
from training.evaluate import EvalContext, Evaluator
from training.loop import TrainStep
from training.melody import melody_conditioners, prepare_melody_training
from training.style import prepare_style_training

logger = logging.getLogger(__name__)

__all__ = ["load_weights", "load_dataset", "validation_metrics", "compare", "format_table"]


def load_weights(spec: str, device: str) -> tp.Any:
    """A MusicGen from a base version name, a local model folder or a `trained_model.tar`."""
    path = Path(spec).expanduser()
    if path.is_file():
        return load_trained_model(path, device)
    return load_musicgen(spec, device)


def load_dataset(spec: str, work: Path, name: str = "dataset") -> tp.Any:
    """A prepared folder as is, anything else (archive, audio file) through `preprocessing.prepare` (no vocal
    removal, no automatic labels: the tracks' own descriptions, or none)."""
    source = Path(spec).expanduser()
    if source.is_dir() and (source / "data.jsonl").is_file():
        return load_prepared(source)
    if source.is_dir() and (source / "dataset" / "data.jsonl").is_file():
        return load_prepared(source / "dataset")
    try:
        return prepare(PrepareParams(dataset_path=spec, drop_vocals=False, auto_labeling=False), work / name)
    except InputError as e:
        if e.name != "dataset_path":
            raise
        raise InputError(name, str(e).split(": ", 1)[-1]) from None


def validation_metrics(model: tp.Any, clips: tp.Sequence[tp.Any], segment: float, work: Path, key: str) -> dict:
    """The trainer's validation metrics of `model` on prepared `clips` (one process)."""
    device = str(next(model.lm.parameters()).device)
    dist = DistInfo(device=device)
    compression, lm = model.compression_model, model.lm
    lm.float()  # get_pretrained loads fp16 on GPUs; the loss is computed as in training (fp32 weights)
    tokens = encode_clips(compression, clips, work / "codes", dist, device)
    melody = melody_conditioners(lm)
    if melody:
        prepare_melody_training(lm, tokens, work, dist, model_key=key)
    styled = prepare_style_training(lm, seed=0)
    dataset = TokenDataset(
        tokens,
        segment_frames=int(segment * compression.frame_rate),
        special_token_id=lm.special_token_id,
        frame_rate=compression.frame_rate,
        sample_rate=compression.sample_rate,
        text_conditions=lm.condition_provider.text_conditions,
        wav_conditions=[*melody, *styled],
    )
    evaluator = Evaluator(dataset, {}, every=1, keep_best=False, patience=0)
    step = TrainStep(lm)
    ctx = EvalContext(
        forward=lambda codes, mask, attributes: step(codes, mask, attributes, None, True),
        modules=step,
        dist=dist,
        device=device,
        micro_batch=4,
        autocast=contextlib.nullcontext(),
        weights=[],
        exported=[],
        params=[],
        sharded=False,
        gather=lambda piece, p: piece,
        shard_of=fsdp_mod.shard_of,
    )
    metrics = evaluator.evaluate(0, ctx)
    return {k: v for k, v in metrics.items() if k not in ("step", "best")} | {"crops": len(evaluator.crops)}


def _clip_audio(clip: tp.Any) -> tuple[torch.Tensor, int]:
    return load_audio(clip.path)


def compare(
    weights: tp.Sequence[str],
    dataset: str,
    *,
    training: str | None = None,
    samples: int = 4,
    duration: float = 8.0,
    segment: float = 30.0,
    device: str | None = None,
    work_dir: Path | None = None,
    sampler_precision: str = "auto",
) -> dict[str, tp.Any]:
    """Every metric for every weights on `dataset`; see the module docstring."""
    if not weights:
        raise InputError("weights", "give at least one: a base version (e.g. small) or a trained_model.tar")
    device = device or default_device()
    check_sampler_precision(sampler_precision, device)  # before any model loads
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eval-")))
        held_out = load_dataset(dataset, work, "dataset")
        train_set = load_dataset(training, work, "training") if training else None
        descriptions = [c.description for c in held_out.clips]
        prompts = [descriptions[i % len(descriptions)] for i in range(samples)] if samples else []
        reference = None  # the first weights' EnCodec embeds everything
        clip_latents: list[np.ndarray] = []
        train_latents: list[np.ndarray] = []
        results = []
        for i, spec in enumerate(weights):
            model = load_weights(spec, device)
            name = Path(spec).name if Path(spec).expanduser().is_file() else spec
            logger.info("Evaluating %s on %d held-out clips", name, len(held_out.clips))
            row: dict[str, tp.Any] = {"weights": name}
            row.update(validation_metrics(model, held_out.clips, segment, work / f"model-{i}", key=f"{i}-{name}"))
            if reference is None:
                reference = model.compression_model
                for clip in held_out.clips:
                    clip_latents.append(encodec_latents(reference, *_clip_audio(clip)))
                if train_set is not None:
                    train_latents = [encodec_latents(reference, *_clip_audio(c)) for c in train_set.clips]
            if prompts:
                wav = generate_audio(
                    model, prompts, duration, sampler_precision=sampler_precision
                )  # [B, C, T] at the model's rate
                generated = [encodec_latents(reference, w.float().cpu(), int(model.sample_rate)) for w in wav]
                row["frechet"] = embedding_frechet(np.concatenate(generated), np.concatenate(clip_latents))
                # in discogs-effnet space too when its model file is present (essentia, in its worker process)
                held_files = [c.path for c in held_out.clips]
                effnet = effnet_frechet({"samples": list(wav)}, int(model.sample_rate), held_files)
                row["frechet_effnet"] = effnet.get("frechet_samples")
                if "skipped" in effnet:
                    row["frechet_effnet_skipped"] = effnet["skipped"]
                row["samples"] = [{"prompt": p} for p in prompts]
                if train_latents:
                    names = [Path(str(c.path)).name for c in train_set.clips]
                    row["copy_check"] = copy_check(generated, train_latents, names)
            results.append(row)
            del model
    return {
        "dataset": Path(dataset).name,
        "clips": len(held_out.clips),
        "training": Path(training).name if training else None,
        "samples": samples,
        "sample_duration": duration,
        "segment": segment,
        "models": results,
    }


def format_table(report: dict[str, tp.Any]) -> str:
    """One line per weights: validation loss (conditional, unconditional), Fréchet distance, copies."""
    header = f"{'weights':32s} {'val_loss':>9s} {'uncond':>9s} {'frechet':>9s} {'effnet':>9s} {'copies':>7s}"
    lines = [f"held-out: {report['dataset']} ({report['clips']} clips)", header, "-" * len(header)]
    for row in report["models"]:
        frechet = f"{row['frechet']:9.3f}" if "frechet" in row else f"{'-':>9s}"
        effnet = f"{row['frechet_effnet']:9.3f}" if row.get("frechet_effnet") is not None else f"{'-':>9s}"
        checked = row.get("copy_check")
        copies = f"{checked['copies']}/{len(checked['samples'])}" if checked else "-"
        losses = f"{row['val_loss']:9.4f} {row['val_loss_uncond']:9.4f}"
        lines.append(f"{row['weights'][:32]:32s} {losses} {frechet} {effnet} {copies:>7s}")
    skipped = next((r["frechet_effnet_skipped"] for r in report["models"] if "frechet_effnet_skipped" in r), None)
    if skipped:
        lines.append(f"effnet: skipped ({skipped})")
    return "\n".join(lines)
