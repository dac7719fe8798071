"""DreamBooth prior preservation (`prior_preservation=true`, with any method).

Before training, the *base* model generates examples the fine-tune should not forget, as the DreamBooth-for-MusicGen
recipe does: per training track, `class_samples` from its class prompt (`class_prompt`, or the track's labels
without the trigger: genre, moods, instruments, else its description without the trigger) and `dissimilar_samples`
from prompts of genres the dataset does not have (`metadata.GENRES`), with predict's sampler at `sampler_precision`.
They are decoded to WAV files, cached (`cache/prior/`, keyed by model, prompt, length, seed and the sampler's
precision: a rerun reuses them), and enter training as ordinary clips (tokens encoded once; melody models get their
chroma like any clip), flagged `info["prior"]`. The loss of a batch is split: `instance + prior_loss_weight x prior`
(`training.loop.TrainStep`), both logged; the generated examples are listed in `finetune.json` (`prior_examples`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import typing as tp
from pathlib import Path

import torch

from core.audio import save_audio
from core.params import InputError
from generation.generate import generate_audio, resolved_precision
from metadata import GENRES
from preprocessing.dataset import PreparedClip
from training.dist import DistInfo, barrier
from training.melody import restore_for_generation
from training.params import TrainParams

logger = logging.getLogger(__name__)

__all__ = ["check", "plan_prompts", "generate_prior_clips", "class_prompt_of"]

LABEL_FIELDS = ("genre", "moods", "instrument")
MAX_GENERATE_BATCH = 8


def check(params: TrainParams) -> None:
    """Early checks of the prior-preservation inputs (no model, no data needed)."""
    if not params.prior_preservation:
        return
    if params.class_samples + params.dissimilar_samples == 0:
        raise InputError("class_samples", "prior_preservation needs class_samples or dissimilar_samples above 0")
    has_prompt = bool(params.class_prompt and params.class_prompt.strip())
    labelled = has_prompt or params.auto_labeling or params.one_same_description
    if not labelled and not _is_prepared_folder(params.dataset_path):
        raise InputError(
            "class_prompt",
            "prior_preservation needs a class prompt: give class_prompt (e.g. 'lofi hip hop'), or turn "
            "auto_labeling on so each track's labels give one",
        )


def _is_prepared_folder(path: tp.Any) -> bool:
    source = Path(str(path or "")).expanduser()
    return (source / "data.jsonl").is_file() or (source / "dataset" / "data.jsonl").is_file()


def _strip_trigger(text: str, trigger: str | None) -> str:
    if trigger and trigger.strip():
        text = " ".join(w for w in text.replace(",", " , ").split() if w != trigger.strip())
        text = text.replace(" , ", ", ").strip(" ,")
    return text.strip()


def class_prompt_of(clip: tp.Any, params: TrainParams) -> str:
    """The class prompt of a track: `class_prompt`, else its labels without the trigger, else its description."""
    if params.class_prompt and params.class_prompt.strip():
        return params.class_prompt.strip()
    info = getattr(clip, "info", {}) or {}
    labels: list[str] = []
    for name in LABEL_FIELDS:
        value = info.get(name)
        values = value if isinstance(value, list | tuple) else [value]
        labels += [str(v).strip() for v in values if v not in (None, "") and str(v).strip()]
    text = ", ".join(labels) if labels else (clip.description or "")
    return _strip_trigger(text, params.trigger)


def plan_prompts(clips: tp.Sequence[tp.Any], params: TrainParams) -> list[dict[str, str]]:
    """`[{kind: class|dissimilar, prompt, source}]`: `class_samples` + `dissimilar_samples` per track."""
    tracks: dict[str, tp.Any] = {}
    for clip in clips:
        tracks.setdefault(str(getattr(clip, "source", "") or clip.path), clip)
    present = set()
    for clip in clips:
        value = (getattr(clip, "info", {}) or {}).get("genre")
        for v in value if isinstance(value, list | tuple) else [value]:
            if v:
                present.add(str(v).strip().lower())
    others = [g for g in GENRES if g not in present and not any(g in p or p in g for p in present)]
    rng = random.Random(params.seed)
    rng.shuffle(others)
    plan = []
    for t, (source, clip) in enumerate(tracks.items()):
        prompt = class_prompt_of(clip, params)
        if not prompt and params.class_samples:
            raise InputError(
                "class_prompt",
                f"track {source} has no labels or description to make a class prompt from; give class_prompt",
            )
        plan += [{"kind": "class", "prompt": prompt, "source": source} for _ in range(params.class_samples)]
        for i in range(params.dissimilar_samples):
            genre = others[(t * params.dissimilar_samples + i) % len(others)]
            plan.append({"kind": "dissimilar", "prompt": f"{genre} music", "source": source})
    return plan


def example_key(model_version: str, prompt: str, seconds: float, seed: int, precision: str) -> str:
    """The cache name of one example the base model generates (here, and the forgetting check's in
    training/evaluate.py): everything its audio depends on, the sampler's precision included (int8 and fp16 draw
    different examples from the same seed)."""
    text = f"{model_version}|{prompt}|{seconds:.3f}|{seed}|{precision}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def save_examples(files: tp.Sequence[str | Path], wav: torch.Tensor, sample_rate: int) -> None:
    """Each `[C, T]` of `wav` `[B, C, T]` to its cache file, whole or not at all (written beside, then renamed)."""
    for file, one in zip(files, wav, strict=True):
        tmp = Path(file).with_suffix(".tmp.wav")
        save_audio(tmp, one.float().cpu(), sample_rate, "wav")
        tmp.replace(file)


def generate_prior_clips(
    model: tp.Any, clips: tp.Sequence[tp.Any], params: TrainParams, cache_dir: Path, dist: DistInfo, seconds: float
) -> list[tp.Any]:
    """Generate (rank 0; cached) and return the prior examples as preprocessing `PreparedClip`s."""
    plan = plan_prompts(clips, params)
    # Predict's sampler at `sampler_precision` (`auto`: int8 on CPU / fp16 on CUDA): the examples are samples of the
    # base model's distribution, which int8 keeps within ~0.0007 nats/token of fp32 (far below the sampling's own
    # randomness) at ~7x audiocraft's speed on CPU, where generating them dominates set-up.
    precision = resolved_precision(model, params.sampler_precision)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(plan):
        item["seed"] = params.seed * 1000 + i
        key = example_key(str(params.model_version), item["prompt"], seconds, item["seed"], precision)
        item["file"] = str(cache_dir / f"{key}.wav")
    todo = [item for item in plan if not Path(item["file"]).is_file()]
    if dist.is_main and todo:
        logger.info(
            "Prior preservation: generating %d of %d examples of %.1f s with the base model (sampler %s; %d cached)",
            len(todo),
            len(plan),
            seconds,
            precision,
            len(plan) - len(todo),
        )
        restore_for_generation(model.lm)
        for start in range(0, len(todo), MAX_GENERATE_BATCH):
            chunk = todo[start : start + MAX_GENERATE_BATCH]
            torch.manual_seed(chunk[0]["seed"])
            prompts = [c["prompt"] for c in chunk]
            wav = generate_audio(model, prompts, seconds, sampler_precision=precision)  # [B, C, T]
            save_examples([c["file"] for c in chunk], wav, model.sample_rate)
    barrier(dist)
    out = []
    for item in plan:
        info = {"description": item["prompt"], "prior": item["kind"], "prior_source": item["source"]}
        if dist.is_main:
            Path(item["file"]).with_suffix(".json").write_text(json.dumps(info))
        out.append(
            PreparedClip(
                path=Path(item["file"]),
                duration=seconds,
                sample_rate=int(model.sample_rate),
                channels=int(model.audio_channels),
                description=item["prompt"],
                info=info,
                source=f"prior:{item['kind']}:{item['source']}",
            )
        )
    if dist.is_main:
        logger.info(
            "Prior examples: %s",
            "; ".join(f"{c.info['prior']} {c.description!r} -> {Path(c.path).name}" for c in out),
        )
    return out
