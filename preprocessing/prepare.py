"""`prepare(params, work_dir)`: an upload in, a training set out (see `preprocessing.dataset` for the format).

Stages: unpack safely -> per track: decode, (vocal removal on the whole track), resample to 32 kHz once, cut into
clips, write them, hand them to the essentia worker -> collect key/bpm/tags -> descriptions -> sidecars, manifest,
report. Every check that can fail on the user's input runs before the long work.
"""

from __future__ import annotations

import collections
import logging
import posixpath
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from core.audio import AudioDecodeError, load_audio, resample_fast
from core.params import InputError
from preprocessing import analysis, captions
from preprocessing.clips import SILENCE_DBFS, ClipNamer, peak_dbfs, plan_clips
from preprocessing.dataset import (
    CLIPS_DIR,
    MANIFEST,
    REPORT,
    SAMPLE_RATE,
    PreparedClip,
    PreparedDataset,
    write_manifest,
    write_report,
    write_sidecar,
)
from preprocessing.params import PrepareParams, validate
from preprocessing.unpack import Limits, Skipped, unpack

logger = logging.getLogger(__name__)

DATASET_DIR = "dataset"
UNPACK_DIR = "unpacked"
SCRATCH_DIR = "prepare-tmp"
MAX_TEXT_BYTES = 64 * 1024


@dataclass
class _Track:
    rel: str
    base: str
    seconds: float  # as uploaded
    sample_rate: int  # as uploaded
    channels: int
    text: str | None = None  # the description from `<track>.txt`
    clips: list[PreparedClip] = field(default_factory=list)


def _fresh_output(folder: Path) -> None:
    """The dataset folder must be new, or a previous preparation's output (replaced, with a log line)."""
    if folder.exists() and any(folder.iterdir()):
        if not ((folder / MANIFEST).exists() or (folder / REPORT).exists() or (folder / CLIPS_DIR).exists()):
            raise InputError("work_dir", f"{folder} exists and holds files that are not a prepared dataset")
        logger.warning("Replacing the previously prepared dataset in %s", folder)
        shutil.rmtree(folder)
    (folder / CLIPS_DIR).mkdir(parents=True, exist_ok=True)


def _read_description(path: Path) -> str | None:
    """First non-empty line of a text file (UTF-8, BOM tolerated, odd bytes replaced)."""
    with open(path, "rb") as f:
        raw = f.read(MAX_TEXT_BYTES)
    text = raw.decode("utf-8-sig", errors="replace")
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split())
    return None


def _text_index(texts: list[str]) -> dict[str, str]:
    """`a/song` -> `a/song.txt` (also `a/song.mp3` -> `a/song.mp3.txt`), case-insensitive on the extension."""
    return {posixpath.splitext(rel)[0]: rel for rel in texts}


def _description_file(rel: str, index: dict[str, str]) -> str | None:
    return index.get(posixpath.splitext(rel)[0]) or index.get(rel)


def prepare(params: PrepareParams, work_dir: str | Path) -> PreparedDataset:
    """Turn `params.dataset_path` into 32 kHz clips + manifest under `work_dir/dataset`. Raises `InputError`
    (naming the input) for bad uploads, `ModelUnavailableError` when vocal removal has no weights."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    validate(params)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    folder = work_dir / DATASET_DIR
    scratch = work_dir / SCRATCH_DIR
    unpack_dir = work_dir / UNPACK_DIR
    for leftover in (scratch, unpack_dir):  # ours, from an interrupted run
        shutil.rmtree(leftover, ignore_errors=True)
    warnings: list[str] = []

    # Everything that can refuse the job runs first: inputs, vocal model, label models, then the archive.
    remover = None
    if params.drop_vocals:
        from preprocessing import vocals

        device = vocals.pick_device(params.device)
        remover = vocals.VocalRemover(vocals.resolve_repo(params.demucs_repo, scratch), device)
    tagger_config = None
    if params.auto_labeling:
        models = analysis.resolve_models(params.essentia_models)
        if models.complete:
            tagger_config = models.worker_config()
        else:
            message = analysis.missing_models_message(models)
            logger.warning(message)
            warnings.append(message)
    _fresh_output(folder)
    clips_dir = folder / CLIPS_DIR
    limits = Limits(
        max_bytes=int(params.max_unpacked_gb * 2**30),
        max_files=params.max_files,
        max_ratio=params.max_compression_ratio,
    )
    analyzer = None
    try:
        t0 = time.perf_counter()
        unpacked = unpack(params.dataset_path, unpack_dir, limits)
        timings["unpack"] = time.perf_counter() - t0
        skipped: list[Skipped] = list(unpacked.skipped)
        text_index = _text_index(unpacked.texts)
        one_same = (params.one_same_description or "").strip() or None
        if not unpacked.audio:
            raise InputError("dataset_path", _nothing_usable(params, unpacked, skipped))
        analyzer = analysis.Analyzer(scratch, tagger_config)

        t0 = time.perf_counter()
        tracks: list[_Track] = []
        clips_skipped: list[dict] = []
        namer = ClipNamer()
        written: set[str] = set()
        for rel in tqdm(unpacked.audio, desc="Preparing tracks", unit="track", mininterval=1):
            path = unpacked.root / rel
            try:
                wav, sr = load_audio(path)
            except AudioDecodeError as e:
                logger.warning("Skipping %s: cannot be decoded (%s)", rel, e)
                skipped.append(Skipped(rel, "corrupt", f"cannot be decoded as audio ({e})"))
                continue
            seconds = wav.shape[-1] / sr
            if seconds < params.min_clip_seconds:
                logger.warning("Skipping %s: %.1f s is shorter than min_clip_seconds", rel, seconds)
                reason = f"{seconds:.1f} s, shorter than min_clip_seconds={params.min_clip_seconds:g}"
                skipped.append(Skipped(rel, "too_short", reason))
                continue
            level = peak_dbfs(wav.numpy())
            if level < SILENCE_DBFS:
                logger.warning("Skipping %s: silent (peak %.1f dBFS)", rel, level)
                skipped.append(Skipped(rel, "silent", f"silent (peak {level:.1f} dBFS, below {SILENCE_DBFS:g})"))
                continue
            track = _Track(rel, namer.track_base(rel), seconds, sr, wav.shape[0])
            if wav.shape[0] > 2:
                logger.info("%s has %d channels: keeping the first two (front left/right)", rel, wav.shape[0])
                wav = wav[:2]
            if remover is not None:
                wav, sr = remover(wav, sr)
            data = resample_fast(wav, sr, SAMPLE_RATE).numpy().T  # [T, C]
            del wav
            if remover is not None and peak_dbfs(data) < SILENCE_DBFS:
                logger.warning("Skipping %s: nothing left after vocal removal", rel)
                skipped.append(Skipped(rel, "silent", "silent once vocals were removed (an a cappella track?)"))
                continue
            spans, dropped = plan_clips(len(data), SAMPLE_RATE, params.chunk_seconds, params.min_clip_seconds)
            if dropped:
                clips_skipped.append(
                    {"track": rel, "reason": f"last {dropped / SAMPLE_RATE:.1f} s shorter than min_clip_seconds"}
                )
            for span in spans:
                segment = np.clip(data[span.start : span.end], -1.0, 1.0)
                if peak_dbfs(segment) < SILENCE_DBFS:
                    clips_skipped.append({"track": rel, "clip": span.index, "reason": "silent"})
                    continue
                name = ClipNamer.clip_name(track.base, span.index)
                if name.casefold() in written:  # ClipNamer makes this impossible; never overwrite a clip
                    raise RuntimeError(f"clip name collision: {name}")
                written.add(name.casefold())
                clip_path = clips_dir / name
                sf.write(str(clip_path), _to_pcm16(segment), SAMPLE_RATE, subtype="PCM_16", format="WAV")
                track.clips.append(
                    PreparedClip(
                        path=clip_path,
                        duration=(span.end - span.start) / SAMPLE_RATE,
                        sample_rate=SAMPLE_RATE,
                        channels=int(data.shape[1]),
                        description="",
                        info={"start_seconds": round(span.start / SAMPLE_RATE, 3), "clip_index": span.index},
                        source=rel,
                    )
                )
            if not track.clips:
                skipped.append(Skipped(rel, "silent", "every clip was silent"))
                continue
            tracks.append(track)
            text_file = _description_file(rel, text_index)
            if text_file:
                track.text = _read_description(unpacked.root / text_file)
                if not track.text:
                    logger.warning("%s is empty: %s gets no description from it", text_file, rel)
            needs_tags = params.auto_labeling and not one_same and not track.text
            analyzer.submit(track.rel, [c.path for c in track.clips], tags=needs_tags)
        timings["tracks"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        results, status, analysis_warnings = analyzer.collect()
        timings["analysis_wait"] = time.perf_counter() - t0
        for family, error in (status.get("errors") or {}).items():
            analysis_warnings.append(f"auto-labeling: the {family} model could not be used ({error}); skipped")
        for message in analysis_warnings:
            logger.warning(message)
        warnings += analysis_warnings

        if not tracks:
            report = _report(params, unpacked, tracks, skipped, clips_skipped, {}, warnings, timings, started)
            write_report(folder, report)
            raise InputError("dataset_path", _nothing_usable(params, unpacked, skipped))

        dataset = PreparedDataset(folder=folder, manifest=folder / MANIFEST)
        sources: collections.Counter[str] = collections.Counter()
        for track in tracks:
            fields = captions.label_fields(results.get(track.rel))
            if one_same:
                description, origin = one_same, "one_same_description"
            elif track.text:
                description, origin = track.text, "text_file"
            elif params.auto_labeling and captions.caption(fields):
                description, origin = captions.caption(fields), "auto_labels"
            else:
                description, origin = "", "none"
            description = captions.with_trigger(description, params.trigger)
            sources[origin] += 1
            title = posixpath.splitext(posixpath.basename(track.rel))[0]
            for clip in track.clips:
                clip.description = description
                clip.info = {
                    "title": title,
                    "artist": None,
                    **{k: fields[k] for k in ("key", "bpm", "genre", "moods", "keywords", "instrument")},
                    "description": description,
                    "name": clip.path.stem,
                    "source": track.rel,
                    "description_source": origin,
                    "channels": clip.channels,
                    **clip.info,
                }
                write_sidecar(clip)
                dataset.clips.append(clip)
        write_manifest(dataset)
        report = _report(params, unpacked, tracks, skipped, clips_skipped, results, warnings, timings, started)
        report["descriptions"] = dict(sources)
        used = {_description_file(t.rel, text_index) for t in tracks}
        report["unmatched_text_files"] = [t for t in unpacked.texts if t not in used]
        dataset.report = report
        write_report(folder, report)
    finally:
        if analyzer is not None:
            analyzer.close()
        if remover is not None and remover.device.startswith("cuda"):
            import torch

            del remover  # give the GPU back to training, which starts right after
            torch.cuda.empty_cache()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(unpack_dir, ignore_errors=True)
    logger.info(summary(dataset))
    return dataset


def _to_pcm16(segment: np.ndarray) -> np.ndarray:
    """`[T, C]` float in [-1, 1] to int16, rounded (numpy does it ~3x cheaper than libsndfile's converter)."""
    scaled = segment * 32767.0
    np.rint(scaled, out=scaled)
    return scaled.astype(np.int16)


def summary(dataset: PreparedDataset) -> str:
    r = dataset.report
    skipped = ", ".join(f"{n} {k}" for k, n in sorted(r.get("skipped_counts", {}).items())) or "none"
    return (
        f"Prepared {r['clips']} clips ({r['total_seconds'] / 60:.1f} min) from {r['tracks_used']} of "
        f"{r['tracks_found']} tracks in {r['seconds_taken']:.1f} s ({r['real_time_factor']:.0f}x real time); "
        f"skipped files: {skipped}; descriptions: "
        + (", ".join(f"{n} {k}" for k, n in sorted(r.get("descriptions", {}).items())) or "none")
        + f" -> {dataset.manifest}"
    )


def _report(params, unpacked, tracks, skipped, clips_skipped, results, warnings, timings, started) -> dict:
    elapsed = time.perf_counter() - started
    timings["total"] = elapsed
    source_seconds = sum(t.seconds for t in tracks)
    clip_seconds = sum(c.duration for t in tracks for c in t.clips)
    labels: dict[str, collections.Counter] = {k: collections.Counter() for k in ("genre", "moods", "instrument", "key")}
    bpms = []
    for t in tracks:
        fields = captions.label_fields(results.get(t.rel))
        for g in (fields["genre"] or "").split(", "):
            if g:
                labels["genre"][g] += 1
        for m in fields["moods"] or []:
            labels["moods"][m] += 1
        for i in (fields["instrument"] or "").split(", "):
            if i:
                labels["instrument"][i] += 1
        if fields["key"]:
            labels["key"][fields["key"]] += 1
        if fields["bpm"]:
            bpms.append(fields["bpm"])
    return {
        "dataset": Path(str(params.dataset_path)).name,
        "format": unpacked.kind,
        "files_in_upload": unpacked.files_in_upload,
        "tracks_found": len(unpacked.audio),
        "tracks_used": len(tracks),
        "clips": sum(len(t.clips) for t in tracks),
        "total_seconds": round(clip_seconds, 3),
        "source_seconds": round(source_seconds, 3),
        "seconds_taken": round(elapsed, 3),
        "real_time_factor": round(source_seconds / elapsed, 2) if elapsed > 0 else None,
        "skipped": [s.to_dict() for s in skipped],
        "skipped_counts": dict(collections.Counter(s.category for s in skipped)),
        "clips_skipped": clips_skipped,
        "tracks": [
            {
                "file": t.rel,
                "seconds": round(t.seconds, 3),
                "sample_rate": t.sample_rate,
                "channels": t.channels,
                "clips": [c.path.name for c in t.clips],
            }
            for t in tracks
        ],
        "labels": {
            **{k: dict(v.most_common()) for k, v in labels.items()},
            "bpm": {"min": min(bpms), "max": max(bpms)} if bpms else None,
        },
        "settings": {
            "drop_vocals": params.drop_vocals,
            "auto_labeling": params.auto_labeling,
            "one_same_description": params.one_same_description,
            "trigger": params.trigger,
            "chunk_seconds": params.chunk_seconds,
            "min_clip_seconds": params.min_clip_seconds,
            "sample_rate": SAMPLE_RATE,
        },
        "warnings": warnings,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _nothing_usable(params: PrepareParams, unpacked, skipped: list[Skipped]) -> str:
    name = Path(str(params.dataset_path)).name
    if not unpacked.audio and not skipped:
        return f"{name} is empty: no files found"
    if unpacked.kind == "audio" and skipped and skipped[0].category == "corrupt":
        return (
            f"{name} is neither an archive (zip, tar, tar.gz, tgz, gz) nor an audio file we can decode "
            f"({skipped[0].reason}). Upload a zip of your tracks or a single wav/mp3/flac/ogg/opus/m4a/aac/aiff file."
        )
    counts = collections.Counter(s.category for s in skipped)
    lines = [
        f"no usable audio in {name}: {unpacked.files_in_upload} file(s) found, "
        + ", ".join(f"{n} {k}" for k, n in counts.most_common())
        + ". Details:"
    ]
    for s in skipped[:25]:
        lines.append(f"  - {s.path}: {s.reason}")
    if len(skipped) > 25:
        lines.append(f"  ... and {len(skipped) - 25} more (see report.json)")
    lines.append(
        "Upload wav, mp3, flac, ogg, opus, m4a, aac or aiff tracks, each at least "
        f"{params.min_clip_seconds:g} s long and not silent."
    )
    return "\n".join(lines)
