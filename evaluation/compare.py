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
  than training clips are to each other (`evaluation.embed.copy_check`);
- in CLAP's space (evaluation/clap.py, `laion/larger_clap_music` or the folder `clap` names; skipped, saying why and
  how to add it, when it is not on the disk): `clap_prompt_adherence` (the mean similarity of each sample to its
  prompt), `clap_frechet` and `clap_kad` to the held-out clips (2 samples and 2 clips at least), and with
  `training` `clap_copy_check`;
- sample health (evaluation/health.py): each sample's flags and measures (`samples[i].health_flags`, `.health`),
  their counts (`health_flags`), and for every weights after the first, `indistinguishable_from_first`: its samples
  cannot be told from the first weights' (the same prompts and seeds: each batch is generated from seed `SEED` +
  its first index, the same for every weights).

Settings left out are those of the training report of the first `trained_model.tar` given (`report_settings`): the
validation loss on crops of its `segment_duration`, samples of its `sample_duration`, so that the numbers are the
report's. Samples are generated in batches that fit free memory (predict's check,
`generation.request.check_batch_memory`), and with `samples_dir` written as WAV files normalized as predict's
outputs are.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import typing as tp
from pathlib import Path

import numpy as np
import torch

from core.audio import load_audio, resample
from core.catalogue import find
from core.devices import default_device
from core.params import InputError
from core.versions import load_musicgen
from core.weights import classify, load_trained_model, read_finetune_info, unpack
from core.weights.peft_format import is_peft_folder
from core.weights.transformers_format import is_transformers_folder
from evaluation.clap import CLAP_REPO, Clap, ClapLoadError, clap_skip_reason, kad, load_clap
from evaluation.clap import copy_check as clap_copy_check
from evaluation.clap import frechet as clap_frechet
from evaluation.effnet import effnet_frechet
from evaluation.embed import copy_check, encodec_latents
from evaluation.frechet import embedding_frechet, fmt_distance
from evaluation.health import indistinguishable, sample_health
from generation.generate import generate_audio
from generation.params import MAX_DURATION, MAX_OUTPUTS, PredictParams
from generation.request import check_batch_memory, check_sampler_precision
from preprocessing.dataset import load_prepared
from preprocessing.params import PrepareParams
from preprocessing.prepare import prepare
from training import fsdp as fsdp_mod
from training.data import TokenDataset, encode_clips
from training.dist import DistInfo
from training.evaluate import EvalContext, Evaluator
from training.export import wav_bytes, write_beside
from training.families import prepare_conditions
from training.loop import TrainStep

logger = logging.getLogger(__name__)

__all__ = [
    "load_weights",
    "load_dataset",
    "validation_metrics",
    "compare",
    "format_table",
    "report_settings",
    "check_destination",
    "sample_batch",
    "MAX_SAMPLES",
    "DEFAULT_SEGMENT",
    "DEFAULT_DURATION",
]

# Samples per weights: each is kept as audio and as embeddings until its weights are measured (64 x 300 s of stereo
# is ~5 GB of audio); the Fréchet distance of more says little more.
MAX_SAMPLES = 64
DEFAULT_SEGMENT = 30.0  # without a trained tar: audiocraft's training crop
DEFAULT_DURATION = 8.0
SEED = 0  # the samples' seed: every weights generates from the same seeds, so that their samples pair up


def _seconds(value: tp.Any, low: float, high: float) -> float | None:
    """`value` as seconds within `low..high`, None for anything else (a finetune.json is read as untrusted)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value) if low <= value <= high else None


def report_settings(weights: tp.Sequence[str]) -> dict[str, tp.Any]:
    """What the training report of the first `trained_model.tar` among `weights` measured with: its validation
    loss on crops of `segment` seconds (the training's `segment_duration`), samples of `sample_duration` seconds,
    held-out tracks `held_out`; `source` names that tar. Empty without a local tar (base versions only)."""
    for spec in weights:
        path = Path(spec).expanduser()
        if not path.is_file():
            continue
        info = read_finetune_info(unpack(path), spec)
        inputs = info.get("training_inputs") if isinstance(info, dict) else None
        if not isinstance(inputs, dict):
            continue
        validation = info.get("validation")
        split = validation.get("split") if isinstance(validation, dict) else None
        tracks = split.get("validation_tracks") if isinstance(split, dict) else None
        return {
            "source": path.name,
            "segment": _seconds(inputs.get("segment_duration"), 1.0, 30.0),
            "sample_duration": _seconds(inputs.get("sample_duration"), 0.1, 30.0),
            "held_out": [str(t) for t in tracks] if isinstance(tracks, list) else [],
        }
    return {}


def check_destination(path: str | os.PathLike[str], flag: str, *, folder: bool) -> Path:
    """A file (`folder` False) or folder we can write to, checked before any work: the folder (or the file's
    folder) is created; a file or folder in the way, or one we cannot write to, is an InputError naming `flag`."""
    target = Path(path).expanduser()
    where = target if folder else target.parent
    if folder and target.exists() and not target.is_dir():
        raise InputError(flag, f"{target} is a file; give a folder (created if missing)")
    if not folder and target.is_dir():
        raise InputError(flag, f"{target} is a folder; give a file name, e.g. {target / 'evaluation.json'}")
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(flag, f"cannot write in {where} ({e.strerror or e}); give a place you can write to") from None
    return target


def sample_batch(model: tp.Any, samples: int, duration: float) -> int:
    """How many samples to generate at once: at most predict's `num_outputs` limit, fewer when their attention
    cache does not fit free memory (predict's own check)."""
    size = min(samples, MAX_OUTPUTS)
    while size > 1:
        try:
            check_batch_memory(PredictParams(duration=math.ceil(duration), num_outputs=size), model)
            return size
        except InputError:
            size -= 1
    return max(size, 1)


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem if name.endswith(".tar") else name) or "weights"


def load_weights(spec: str, device: str) -> tp.Any:
    """A MusicGen (audiocraft's) from a base version name, a local audiocraft model folder, a `trained_model.tar`,
    or a fine-tune in transformers' format (a MusicGen folder or PEFT adapter folder, or a Hugging Face repo id of
    either), converted on load as `replicate_weights` is."""
    path = Path(spec).expanduser()
    if path.is_file() or (path.is_dir() and (is_transformers_folder(path) or is_peft_folder(path))):
        return load_trained_model(path, device).musicgen
    if find(spec) is None and not spec.startswith("facebook/") and classify(spec).kind == "hf":
        return load_trained_model(spec, device).musicgen
    return load_musicgen(spec, device).musicgen


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
    conditions = prepare_conditions(lm, tokens, work, dist, model_key=key, seed=0)  # as setup_training does
    dataset = TokenDataset(
        tokens,
        segment_frames=int(segment * compression.frame_rate),
        special_token_id=lm.special_token_id,
        frame_rate=compression.frame_rate,
        sample_rate=compression.sample_rate,
        text_conditions=lm.condition_provider.text_conditions,
        wav_conditions=list(conditions),
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
    duration: float | None = None,
    segment: float | None = None,
    device: str | None = None,
    work_dir: Path | None = None,
    sampler_precision: str = "auto",
    samples_dir: str | os.PathLike[str] | None = None,
    clap: str | os.PathLike[str] | None = CLAP_REPO,
) -> dict[str, tp.Any]:
    """Every metric for every weights on `dataset`; see the module docstring. `duration` / `segment` None: the
    first trained tar's report's (`report_settings`), else `DEFAULT_DURATION` / `DEFAULT_SEGMENT`. With
    `samples_dir`, each weights' samples are written there as `sample_<j>_<i>-<weights>.wav`. `clap`: the CLAP
    model's Hugging Face repo or local folder (None: no CLAP metrics)."""
    if not weights:
        raise InputError("weights", "give at least one: a base version (e.g. small) or a trained_model.tar")
    if not 0 <= samples <= MAX_SAMPLES:
        raise InputError("samples", f"{samples} is out of range: give 0..{MAX_SAMPLES} samples per weights")
    # written as `not low <= x <= high`: a NaN fails every comparison
    if duration is not None and not 0 < duration <= MAX_DURATION:
        raise InputError("duration", f"{duration} is out of range: give seconds > 0, at most {MAX_DURATION}")
    if segment is not None and not 1.0 <= segment <= 30.0:
        raise InputError("segment", f"{segment} is out of range: give 1..30 seconds")
    device = device or default_device()
    check_sampler_precision(sampler_precision, device)  # before any model loads
    out_dir = check_destination(samples_dir, "samples_dir", folder=True) if samples_dir is not None else None
    settings = report_settings(weights)
    source = settings.get("source")
    chosen = {
        "segment": _setting(segment, settings.get("segment"), DEFAULT_SEGMENT, "segment_duration", source),
        "duration": _setting(duration, settings.get("sample_duration"), DEFAULT_DURATION, "sample_duration", source),
    }
    segment, duration = chosen["segment"]["value"], chosen["duration"]["value"]
    clap_model, clap_skipped = _load_clap(clap, device) if samples else (None, "no samples (--samples 0)")
    logger.info(
        "Settings: %s",
        "; ".join(f"{k} {v['value']:g} s ({v['from']})" for k, v in chosen.items()),
    )
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eval-")))
        held_out = load_dataset(dataset, work, "dataset")
        train_set = load_dataset(training, work, "training") if training else None
        descriptions = [c.description for c in held_out.clips]
        prompts = [descriptions[i % len(descriptions)] for i in range(samples)] if samples else []
        reference = None  # the first weights' EnCodec embeds everything
        clip_latents: list[np.ndarray] = []
        train_latents: list[np.ndarray] = []
        clap_clips = _clap_embed(clap_model, held_out.clips)
        clap_train = _clap_embed(clap_model, train_set.clips) if train_set is not None else None
        first: tuple[list[torch.Tensor], int] | None = None  # the first weights' samples and rate
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
                batch = sample_batch(model, len(prompts), duration)
                if batch < min(len(prompts), MAX_OUTPUTS):
                    logger.info("Generating in batches of %d samples: that many fit in free memory", batch)
                pieces = []
                for j in range(0, len(prompts), batch):
                    torch.manual_seed(SEED + j)  # the same seeds for every weights: their samples pair up
                    pieces.append(
                        generate_audio(model, prompts[j : j + batch], duration, sampler_precision=sampler_precision)
                    )
                wav = torch.cat(pieces)  # [B, C, T] at the model's rate
                generated = [encodec_latents(reference, w.float().cpu(), int(model.sample_rate)) for w in wav]
                row["frechet"] = embedding_frechet(np.concatenate(generated), np.concatenate(clip_latents))
                # in discogs-effnet space too when its model file is present (essentia, in its worker process)
                held_files = [c.path for c in held_out.clips]
                effnet = effnet_frechet({"samples": list(wav)}, int(model.sample_rate), held_files)
                row["frechet_effnet"] = effnet.get("frechet_samples")
                if "skipped" in effnet:
                    row["frechet_effnet_skipped"] = effnet["skipped"]
                row["samples"] = [{"prompt": p} for p in prompts]
                first = _sample_measures(row, wav, int(model.sample_rate), prompts, first, clap_model, clap_clips)
                if clap_model is not None and clap_train is not None:
                    names = [Path(str(c.path)).name for c in train_set.clips]
                    row["clap_copy_check"] = clap_copy_check(None, row.pop("_clap"), clap_train, names=names)
                row.pop("_clap", None)
                if out_dir is not None:
                    rate = int(model.sample_rate)
                    files = {
                        f"sample_{j:02d}_{i}-{_file_part(name)}.wav": wav_bytes(w, rate) for j, w in enumerate(wav)
                    }
                    write_beside(out_dir, files)
                    for entry, file in zip(row["samples"], files, strict=True):
                        entry["file"] = file
                    logger.info("Wrote %d samples of %s to %s", len(files), name, out_dir)
                if train_latents:
                    names = [Path(str(c.path)).name for c in train_set.clips]
                    row["copy_check"] = copy_check(generated, train_latents, names)
            results.append(row)
            del model
    return {
        "dataset": Path(dataset).name,
        "clips": len(held_out.clips),
        "clap": {"source": clap_model.source} if clap_model is not None else {"skipped": clap_skipped},
        "training": Path(training).name if training else None,
        "samples": samples,
        "sample_duration": duration,
        "segment": segment,
        "settings": chosen,
        "report_held_out": settings.get("held_out") or [],
        "samples_dir": str(out_dir) if out_dir is not None else None,
        "models": results,
    }


def _load_clap(clap: str | os.PathLike[str] | None, device: str) -> tuple[Clap | None, str | None]:
    """CLAP, or None and why not (not asked for, not on the disk, or there but unloadable: the run goes on)."""
    if clap is None:
        return None, "not asked for"
    try:
        model = load_clap(device, clap)
    except ClapLoadError as e:
        logger.warning("CLAP metrics skipped: %s", e)
        return None, str(e)
    return model, None if model is not None else clap_skip_reason(clap)


def _clap_embed(clap: Clap | None, clips: tp.Sequence[tp.Any]) -> torch.Tensor | None:
    """`[N, D]` CLAP embeddings of prepared clips (each at its own rate), None without CLAP."""
    if clap is None:
        return None
    return torch.cat([clap.embed_audio([wav], rate) for wav, rate in map(_clip_audio, clips)])


def _sample_measures(
    row: dict[str, tp.Any],
    wav: torch.Tensor,
    rate: int,
    prompts: tp.Sequence[str],
    first: tuple[list[torch.Tensor], int] | None,
    clap: Clap | None,
    clap_clips: torch.Tensor | None,
) -> tuple[list[torch.Tensor], int]:
    """Health and CLAP metrics of one weights' samples `wav` `[B, C, T]` into `row`; returns the first weights'
    samples (these, when `first` is None) to compare the next weights with. `row['_clap']`: the samples' CLAP
    embeddings, for the copy check."""
    wavs = [w.float().cpu() for w in wav]
    flags: dict[str, int] = {}
    for entry, w in zip(row["samples"], wavs, strict=True):
        health = sample_health(w, rate)
        entry["health_flags"], entry["health"] = list(health.flags), health.measures
        for flag in health.flags:
            flags[flag] = flags.get(flag, 0) + 1
    row["health_flags"] = flags
    if first is None:
        first = (wavs, rate)
    else:
        base = first[0]
        tuned = [resample(w, rate, first[1]) for w in wavs] if rate != first[1] else wavs
        row["indistinguishable_from_first"] = indistinguishable(base, tuned, first[1])
    if clap is not None and clap_clips is not None:
        audio = clap.embed_audio(wavs, rate)
        row["_clap"] = audio
        similarities = (audio * clap.embed_text(prompts)).sum(dim=-1)
        row["clap_prompt_adherence"] = float(similarities.mean())
        for entry, value in zip(row["samples"], similarities.tolist(), strict=True):
            entry["clap_similarity"] = value
        if len(audio) >= 2 and len(clap_clips) >= 2:
            row["clap_frechet"] = clap_frechet(audio, clap_clips)
            row["clap_kad"] = kad(audio, clap_clips)
        else:
            row["clap_distance_skipped"] = "needs at least 2 samples and 2 held-out clips"
    return first


def _setting(given: float | None, report: float | None, default: float, field: str, source: str | None) -> dict:
    """The value used and where it came from, saying how to match the training report when it is not its."""
    if given is not None:
        if report is not None and given != report:
            return {"value": given, "from": f"given; {source}'s report used {report:g}: pass that to match it"}
        return {"value": given, "from": "given"}
    if report is not None:
        return {"value": report, "from": f"{source}'s {field}, as its report"}
    hint = f" (a trained_model.tar's report uses its {field})" if source is None else ""
    return {"value": default, "from": f"default{hint}"}


def format_table(report: dict[str, tp.Any]) -> str:
    """One line per weights: validation loss (conditional, unconditional), Fréchet distances, copies, CLAP prompt
    adherence and KAD, the samples' health flags; then what was skipped and why."""
    header = (
        f"{'weights':32s} {'val_loss':>9s} {'uncond':>9s} {'frechet':>9s} {'effnet':>9s} {'copies':>7s} "
        f"{'clap':>7s} {'kad':>8s}  flags"
    )
    lines = [f"held-out: {report['dataset']} ({report['clips']} clips)"]
    for name, flag in (("segment", "--segment"), ("duration", "--duration")):
        chosen = (report.get("settings") or {}).get(name)
        if chosen:
            lines.append(f"{flag} {chosen['value']:g} ({chosen['from']})")
    if report.get("report_held_out"):
        lines.append(f"the report's held-out tracks: {', '.join(report['report_held_out'])}")
    lines += [header, "-" * len(header)]
    for row in report["models"]:
        frechet = f"{fmt_distance(row.get('frechet')):>9s}"  # a tiny model's 0.0007 keeps its digits
        effnet = f"{fmt_distance(row.get('frechet_effnet')):>9s}"
        checked = row.get("copy_check")
        copies = f"{checked['copies']}/{len(checked['samples'])}" if checked else "-"
        losses = f"{row['val_loss']:9.4f} {row['val_loss_uncond']:9.4f}"
        adherence = f"{row['clap_prompt_adherence']:7.3f}" if "clap_prompt_adherence" in row else f"{'-':>7s}"
        kad_value = f"{row['clap_kad']:8.3f}" if "clap_kad" in row else f"{'-':>8s}"
        flags = [f"{name} {count}/{len(row['samples'])}" for name, count in (row.get("health_flags") or {}).items()]
        clap_copies = row.get("clap_copy_check")
        if clap_copies and clap_copies["copies"]:
            flags.append(f"copies in CLAP space {clap_copies['copies']}/{len(clap_copies['samples'])}")
        if row.get("indistinguishable_from_first"):
            flags.append(f"indistinguishable from {report['models'][0]['weights']}")
        line = f"{row['weights'][:32]:32s} {losses} {frechet} {effnet} {copies:>7s} {adherence} {kad_value}"
        lines.append(f"{line}  {', '.join(flags) or ('healthy' if 'health_flags' in row else '-')}")
    skipped = next((r["frechet_effnet_skipped"] for r in report["models"] if "frechet_effnet_skipped" in r), None)
    if skipped:
        lines.append(f"effnet: skipped ({skipped})")
    clap = report.get("clap") or {}
    if clap.get("skipped"):
        lines.append(f"clap: skipped ({clap['skipped']})")
    elif clap.get("source"):
        lines.append(f"clap: {clap['source']} (clap: prompt adherence, higher is better; kad: to the held-out clips)")
    if report.get("samples_dir"):
        lines.append(f"samples: {report['samples_dir']}")
    return "\n".join(lines)
