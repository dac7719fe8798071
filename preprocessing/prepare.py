"""`prepare(params, work_dir)`: an upload in, a training set out (see `preprocessing.dataset` for the format).

Stages: unpack safely -> per track: decode, (vocal removal on the whole track), resample to 32 kHz once, cut into
clips, write them, hand them to the essentia worker -> collect key/bpm/tags -> descriptions -> sidecars, manifest,
report. Every check that can fail on the user's input runs before the long work.

What is deleted: only what a preparation made. Its work folders (`unpacked/`, `prepare-tmp/`) carry a marker file
(`OWNED_MARKER`) from the moment they are made; `dataset/` is replaced only when it holds nothing but what a
preparation writes. Anything else in the way is an error naming it, raised before anything is touched.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import posixpath
import shutil
import tempfile
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

# Submodules by their full names: `from preprocessing import ...` would read from the package whose __init__ is
# importing this module (a preprocessing <-> preprocessing.prepare cycle).
import preprocessing.analysis as analysis
import preprocessing.captions as captions
import preprocessing.descriptions as descriptions
import preprocessing.vocals as vocals
import preprocessing.workers as workers
from core.audio import AudioDecodeError, load_audio, resample_fast
from core.errors import USER_ERRORS, write_failed
from core.params import InputError
from core.progress import progress_bar
from preprocessing.clips import (
    MAX_NAME_BYTES,
    SILENCE_DBFS,
    ClipNamer,
    base_name,
    clip_silence,
    dc_offset,
    plan_clips,
    signal_dbfs,
)
from preprocessing.dataset import (
    CLIPS_DIR,
    MANIFEST,
    REPORT,
    SAMPLE_RATE,
    TMP_PREFIX,
    PreparedClip,
    PreparedDataset,
    write_manifest,
    write_report,
    write_sidecar,
)
from preprocessing.fingerprint import SOURCE_KEY, file_sha256
from preprocessing.params import PrepareParams, validate
from preprocessing.unpack import Limits, Skipped, Unpacked, unpack

if tp.TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DATASET_DIR = "dataset"
UNPACK_DIR = "unpacked"
SCRATCH_DIR = "prepare-tmp"
UNPACKED_FILES = "files"  # the upload's files, inside UNPACK_DIR (the marker sits beside them, never among them)
OWNED_MARKER = ".musicgen-ft-owned"
MARKER_TEXT = (
    "Made by musicgen-ft's dataset preparation (python -m preprocessing, or train), which deletes or replaces this "
    "folder. Do not keep your own files here.\n"
)
OUTPUT = "output_dir"


@dataclass
class _Track:
    rel: str
    base: str
    seconds: float  # as uploaded
    sample_rate: int  # as uploaded
    channels: int
    text: str | None = None  # the description from `<track>.txt`
    sha256: str | None = None  # of the track's file as uploaded (preprocessing/fingerprint.py)
    clips: list[PreparedClip] = field(default_factory=list)


def _mark(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OWNED_MARKER).write_text(MARKER_TEXT, encoding="utf-8")


def _output_folder(work_dir: str | Path) -> Path:
    """`work_dir`, created when missing and proven writable; a clear error (naming it) instead of a traceback."""
    work_dir = Path(work_dir).expanduser()
    if work_dir.exists() and not work_dir.is_dir():
        raise InputError(OUTPUT, f"{work_dir} is a file, not a folder; give a folder to write into (made if missing)")
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        message = f"cannot make the folder {work_dir}: a part of that path is a file; give another folder"
        raise InputError(OUTPUT, message) from None
    except OSError as e:
        message = f"cannot make the folder {work_dir} ({e.strerror or e}); give a folder you can write to"
        raise InputError(OUTPUT, message) from None
    try:  # os.access() says yes to root on a read-only filesystem: write for real
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, dir=work_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        message = f"{work_dir} is not writable ({e.strerror or e}); give a folder you can write to"
        raise InputError(OUTPUT, message) from None
    return work_dir


def _refuse_dataset_inside(dataset_path: str, folders: tuple[Path, ...]) -> None:
    """A dataset inside a folder this run deletes or replaces would be destroyed by the run itself."""
    source = Path(str(dataset_path)).expanduser().resolve()
    for folder in folders:
        if source.is_relative_to(folder.resolve()):
            raise InputError(
                "dataset_path",
                f"{dataset_path} lies inside {folder}, which this preparation deletes or replaces; move the dataset "
                f"out of {folder} (or give another output folder) first. Nothing was touched",
            )


def _empty(folder: Path) -> bool:
    return not any(folder.iterdir())


def _check_work_folder(folder: Path) -> None:
    """A work folder in the way may go only when a preparation made it (its marker) or when it is empty."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir() or not ((folder / OWNED_MARKER).is_file() or _empty(folder)):
        kind = "a link" if folder.is_symlink() else "a file" if not folder.is_dir() else "a folder"
        raise InputError(
            OUTPUT,
            f"{folder} is {kind} that a preparation did not make (no {OWNED_MARKER} marker), so it is left alone; "
            f"preparation uses {folder.name}/ as its work folder and deletes it when done. Move it away, or give "
            "another output folder. Nothing was touched",
        )


def _foreign_entries(folder: Path) -> list[str]:
    """What is in `folder` that a preparation does not write there (the manifest, report, marker, clips + sidecars,
    and the temp files of an interrupted write)."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif name == CLIPS_DIR and entry.is_dir():
            for clip in sorted(entry.iterdir()):
                ours = clip.suffix in (".wav", ".json") or clip.name.startswith(TMP_PREFIX)
                if clip.is_symlink() or not clip.is_file() or not ours:
                    foreign.append(f"{CLIPS_DIR}/{clip.name}")
        elif not (entry.is_file() and (name in (MANIFEST, REPORT, OWNED_MARKER) or name.startswith(TMP_PREFIX))):
            foreign.append(name)
    return foreign


def _check_dataset_folder(folder: Path) -> None:
    """`dataset/` is replaced only when it holds just what a preparation writes (marked, or an earlier version's
    output: manifest or report present)."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        kind = "a link" if folder.is_symlink() else "a file"
        message = f"{folder} is {kind}, not a prepared dataset; move it away or give another output folder"
        raise InputError(OUTPUT, message + ". Nothing was touched")
    if not folder.exists() or _empty(folder):
        return
    ours = (folder / OWNED_MARKER).is_file() or (folder / MANIFEST).is_file() or (folder / REPORT).is_file()
    foreign = _foreign_entries(folder)
    if not ours or foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(
            OUTPUT,
            f"{folder} exists and holds files that are not a prepared dataset ({listed or 'no manifest'}); "
            "preparation replaces that folder, so it is left alone. Move those files away, or give another output "
            "folder. Nothing was touched",
        )


def _fresh_output(folder: Path) -> None:
    """The dataset folder (checked by `_check_dataset_folder`): a previous preparation's output is replaced."""
    if folder.exists() and not _empty(folder):
        logger.warning("Replacing the previously prepared dataset in %s", folder)
        shutil.rmtree(folder)
    (folder / CLIPS_DIR).mkdir(parents=True, exist_ok=True)
    _mark(folder)


def _text_index(texts: list[str]) -> dict[str, str]:
    """`a/song` -> `a/song.txt` (also `a/song.mp3` -> `a/song.mp3.txt`), case-insensitive on the extension."""
    return {posixpath.splitext(rel)[0]: rel for rel in texts}


def _description_file(rel: str, index: dict[str, str]) -> str | None:
    return index.get(posixpath.splitext(rel)[0]) or index.get(rel)


def prepare(params: PrepareParams, work_dir: str | Path, processes: int | None = None) -> PreparedDataset:
    """Turn `params.dataset_path` into 32 kHz clips + manifest under `work_dir/dataset`. Raises `InputError`
    (naming the input) for bad uploads, `ModelUnavailableError` when vocal removal has no weights.

    `processes`: how many processes prepare the tracks (and analyse them); None picks one per GPU, or on the CPU
    as many as cores and memory allow (`preprocessing.workers.plan`, logged). The dataset is the same either way.

    Phases: check the folders -> load what can refuse the job (vocal model, label models) -> unpack -> per track
    (`prepare_track`, here or in the track processes: decode, separate, resample, clip, write; then in upload order
    `_take_track`: name and move the clips; `_analyse`: its text file, key/bpm/tags) -> collect the analysis ->
    describe (`_describe`: descriptions, sidecars, manifest) -> report."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if processes is not None and processes < 1:
        raise ValueError(f"processes must be at least 1 (or None: chosen from the machine), got {processes}")
    validate(params)
    work_dir = _output_folder(work_dir)
    folder, scratch, unpack_dir = work_dir / DATASET_DIR, work_dir / SCRATCH_DIR, work_dir / UNPACK_DIR
    _claim_work_folders(params, folder, scratch, unpack_dir)
    warnings: list[str] = []
    remover = None
    analyzer = None
    pool = None
    try:
        # Everything that can refuse the job runs first: inputs, vocal model, label models, then the archive.
        remover = _vocal_remover(params, scratch)
        _fresh_output(folder)
        t0 = time.perf_counter()
        unpacked = _unpack(params, unpack_dir)
        timings["unpack"] = time.perf_counter() - t0
        if not unpacked.audio:
            raise InputError("dataset_path", _nothing_usable(params, unpacked, list(unpacked.skipped)))
        device = remover.device if remover is not None else "cpu"
        plan = workers.plan(params.drop_vocals, device, len(unpacked.audio), processes)
        logger.info(plan.why)
        if _labels_needed(params, unpacked):
            tagger_config = _tagger_config(params, unpacked, warnings)
            analyzer = analysis.Analyzer(scratch, tagger_config, processes=plan.essentia)
        else:
            logger.info(
                "Key/bpm analysis skipped: auto_labeling is off and every track has a description of its own "
                "(set auto_labeling=true to have key and bpm measured and written into the clips' info)"
            )
        run = _Run(params, unpacked, folder / CLIPS_DIR, analyzer, warnings)
        jobs = [
            {"rel": rel, "path": str(unpacked.path(rel)), "out": str(scratch / "tracks" / f"{i:05d}")}
            for i, rel in enumerate(unpacked.audio)
        ]

        t0 = time.perf_counter()
        if plan.processes > 1:
            repo, held = (remover.repo, remover.device) if remover is not None else (None, None)
            remover = None  # each track process loads its own
            _empty_gpu_cache(held)
            pool = workers.TrackPool(plan.devices, plan.threads, repo, dataclasses.asdict(params), scratch)
            pool.wait_ready()
            outcomes = (TrackOutcome(**o) for o in pool.outcomes(jobs))
        else:
            outcomes = (_prepare_here(job, params, remover) for job in jobs)
        tracks: list[_Track] = []
        for outcome in progress_bar(outcomes, total=len(jobs), desc="Preparing tracks", unit="track", mininterval=1):
            track = _take_track(outcome, run)
            if track is not None:
                tracks.append(track)
                _analyse(track, run)
        timings["tracks"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = _collect_analysis(analyzer, warnings) if analyzer is not None else {}
        timings["analysis_wait"] = time.perf_counter() - t0

        if not tracks:
            report = _report(params, unpacked, tracks, run.skipped, run.clips_skipped, {}, warnings, timings, started)
            write_report(folder, {**report, **run.extra})
            raise InputError("dataset_path", _nothing_usable(params, unpacked, run.skipped))
        dataset, sources = _describe(folder, tracks, results, run)
        dataset.report = _final_report(run, tracks, results, sources, timings, started)
        write_report(folder, dataset.report)
    finally:
        # The processes first: none may still write into the scratch folder when it goes.
        if pool is not None:
            pool.close()
        if analyzer is not None:
            analyzer.close()
        held = remover.device if remover is not None else None
        remover = None
        _empty_gpu_cache(held)  # give the GPU back to training, which starts right after
        # Both were made (and marked) by this run.
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(unpack_dir, ignore_errors=True)
    logger.info(summary(dataset))
    return dataset


def _prepare_here(job: dict, params: PrepareParams, remover: vocals.VocalRemover | None) -> TrackOutcome:
    """`prepare_track` in this process; an unexpected error names the track, as a track process's does."""
    try:
        return prepare_track(job["rel"], Path(job["path"]), Path(job["out"]), params, remover)
    except USER_ERRORS:
        raise
    except Exception as e:
        raise workers.TrackFailed(f"preparing {job['rel']} failed: {type(e).__name__}: {e}") from e


def _empty_gpu_cache(device: str | None) -> None:
    """Give back the GPU memory of a vocal remover on `device` once the last reference to it is gone."""
    if device is not None and device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ set-up


def _claim_work_folders(params: PrepareParams, folder: Path, scratch: Path, unpack_dir: Path) -> None:
    """Nothing is deleted before every folder in the way is known to be ours; then an interrupted run's leftovers
    go and a fresh, marked scratch folder is made."""
    _refuse_dataset_inside(params.dataset_path, (folder, scratch, unpack_dir))
    for work in (scratch, unpack_dir):
        _check_work_folder(work)
    _check_dataset_folder(folder)
    for leftover in (scratch, unpack_dir):  # ours (marked or empty), from an interrupted run
        if leftover.exists():
            shutil.rmtree(leftover)
    _mark(scratch)


def _vocal_remover(params: PrepareParams, scratch: Path) -> vocals.VocalRemover | None:
    """The vocal remover with `drop_vocals` (raises `ModelUnavailableError` without its weights), else None."""
    if not params.drop_vocals:
        return None
    device = vocals.pick_device(params.device)
    return vocals.VocalRemover(vocals.resolve_repo(params.demucs_repo, scratch), device)


def _tagger_config(params: PrepareParams, unpacked: Unpacked, warnings: list[str]) -> dict | None:
    """The essentia worker's label models with `auto_labeling`, when all are there (else a warning: no tags).
    Tags describe only the tracks with no description of their own: when every track has one (its text file, or
    `one_same_description`), missing label models change nothing and are not mentioned."""
    if not params.auto_labeling:
        return None
    texts = _text_index(unpacked.texts)
    if (params.one_same_description or "").strip() or all(_description_file(rel, texts) for rel in unpacked.audio):
        return None
    models = analysis.resolve_models(params.essentia_models)
    if models.complete:
        return models.worker_config()
    message = analysis.missing_models_message(models)
    logger.warning(message)
    warnings.append(message)
    return None


def _labels_needed(params: PrepareParams, unpacked: Unpacked) -> bool:
    """Whether the essentia worker has anything to do: key and bpm go into the clips' info and into auto-labels,
    so they are skipped only when auto-labeling is off and every track has a description (one_same_description, or
    a text file with a line of text) that the labels could not replace."""
    if params.auto_labeling:
        return True
    if (params.one_same_description or "").strip():
        return False
    texts = _text_index(unpacked.texts)
    for rel in unpacked.audio:
        text_file = _description_file(rel, texts)
        if not text_file:
            return True
        with open(unpacked.path(text_file), "rb") as f:  # a quiet look: `_analyse` reads it (and warns) later
            if not f.read(descriptions.MAX_TEXT_BYTES).decode("utf-8", "replace").lstrip("\ufeff").strip():
                return True
    return False


def _unpack(params: PrepareParams, unpack_dir: Path) -> Unpacked:
    limits = Limits(
        max_bytes=int(params.max_unpacked_gb * 2**30),
        max_files=params.max_files,
        max_ratio=params.max_compression_ratio,
    )
    _mark(unpack_dir)
    return unpack(params.dataset_path, unpack_dir / UNPACKED_FILES, limits)


@dataclass
class _Run:
    """One preparation as its per-track steps see it: the inputs, the analyzer, and what the report lists
    (skipped files and clips, shortened names and normalized tracks in `extra`, warnings), filled track by track.
    Not the vocal remover: `prepare` alone holds it, so that dropping it frees the GPU."""

    params: PrepareParams
    unpacked: Unpacked
    clips_dir: Path
    analyzer: analysis.Analyzer | None  # None: no key/bpm/tags wanted (`_labels_needed`)
    warnings: list[str]
    skipped: list[Skipped] = field(init=False)
    extra: dict[str, list] = field(init=False)
    text_index: dict[str, str] = field(init=False)
    one_same: str | None = field(init=False)
    clips_skipped: list[dict] = field(default_factory=list)
    namer: ClipNamer = field(default_factory=ClipNamer)
    written: set[str] = field(default_factory=set)  # clip names, casefolded: never one written twice

    def __post_init__(self) -> None:
        self.skipped = list(self.unpacked.skipped)
        self.extra = {"names_shortened": list(self.unpacked.renamed), "normalized": []}
        self.text_index = _text_index(self.unpacked.texts)
        self.one_same = (self.params.one_same_description or "").strip() or None


# ------------------------------------------------------------------------------------------------ one track


@dataclass
class TrackOutcome:
    """What preparing one track gave, in this process or in a track process (`preprocessing.track_worker`): plain
    values, so that a worker can send it as JSON. The preparing process takes outcomes in upload order
    (`_take_track`): it names and moves the clips, and logs the worker's lines, so nothing depends on which process
    finished first."""

    rel: str
    decoded: bool = False  # False: skipped before it was named (corrupt, too short, silent as uploaded)
    seconds: float = 0.0  # as uploaded
    sample_rate: int = 0
    channels: int = 0
    sha256: str | None = None
    clips: list[list] = field(default_factory=list)  # [clip index, start, end (samples at 32 kHz), channels, file]
    skipped: list[str] | None = None  # [category, reason]
    clips_skipped: list[dict] = field(default_factory=list)
    normalized: dict | None = None
    logs: list[list] = field(default_factory=list)  # [level, message]

    def log(self, level: int, message: str, *args: tp.Any) -> None:
        self.logs.append([level, message % args if args else message])

    def skip(self, category: str, reason: str) -> TrackOutcome:
        self.skipped = [category, reason]
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def prepare_track(
    rel: str, path: Path, out_dir: Path, params: PrepareParams, remover: vocals.VocalRemover | None
) -> TrackOutcome:
    """Decode track `rel` (the file `path`), separate it with `remover`, resample, cut and write its clips into
    `out_dir` (named after the track, numbered). What a skipped track was skipped for is in the outcome."""
    out = TrackOutcome(rel)
    decoded = _decode(rel, path, params, out)
    if decoded is None:
        return out
    wav, sr, source_peak = decoded
    out.decoded, out.seconds, out.sample_rate, out.channels = True, wav.shape[-1] / sr, int(sr), int(wav.shape[0])
    out.sha256 = file_sha256(path)  # what a validation set is compared with (by content)
    data = _separate_and_resample(rel, wav, sr, remover, out)
    del wav  # the decoded track: only its 32 kHz copy is needed from here
    if data is None:
        return out
    out.normalized = _fit_full_scale(data, source_peak, rel, out)
    _write_clips(rel, data, params, out_dir, out)
    if not out.clips:
        out.skip("silent", "every clip was silent")
    return out


def _take_track(outcome: TrackOutcome, run: _Run) -> _Track | None:
    """A track's outcome into the dataset, in upload order: its log lines, its name (unique among the tracks before
    it), its clips moved under their final names. None when it was skipped (recorded in `run.skipped`)."""
    rel = outcome.rel
    for level, message in outcome.logs:
        logger.log(level, "%s", message)
    if not outcome.decoded:
        run.skipped.append(Skipped(rel, *outcome.skipped))
        return None
    track = _Track(rel, run.namer.track_base(rel), outcome.seconds, outcome.sample_rate, outcome.channels)
    track.sha256 = outcome.sha256
    if len(base_name(rel, None).encode("utf-8")) > MAX_NAME_BYTES:
        run.extra["names_shortened"].append(
            {"file": rel, "clips": f"{track.base}_NNN.wav", "reason": f"clip names are cut to "
             f"{MAX_NAME_BYTES} bytes (a file name may hold 255, with room kept for the index and .json)"}
        )  # fmt: skip
    if outcome.normalized:
        run.extra["normalized"].append(outcome.normalized)
    run.clips_skipped.extend(outcome.clips_skipped)
    if outcome.skipped:
        run.skipped.append(Skipped(rel, *outcome.skipped))
        return None
    for index, start, end, channels, written in outcome.clips:
        name = ClipNamer.clip_name(track.base, index)
        if name.casefold() in run.written:  # ClipNamer makes this impossible; never overwrite a clip
            raise RuntimeError(f"clip name collision: {name}")
        run.written.add(name.casefold())
        clip_path = run.clips_dir / name
        try:
            os.replace(written, clip_path)  # the scratch folder lies beside the dataset: a rename
        except OSError as e:
            raise write_failed(clip_path, e, "the clip") from None
        track.clips.append(
            PreparedClip(
                path=clip_path,
                duration=(end - start) / SAMPLE_RATE,
                sample_rate=SAMPLE_RATE,
                channels=channels,
                description="",
                info={"start_seconds": round(start / SAMPLE_RATE, 3), "clip_index": index},
                source=rel,
            )
        )
    return track


def _decode(rel: str, path: Path, params: PrepareParams, out: TrackOutcome) -> tuple[torch.Tensor, int, float] | None:
    """Track `rel` decoded (`[C, T]` tensor, its sample rate) and its peak; None when it cannot be decoded, is
    shorter than min_clip_seconds or is silent (the reason in `out`)."""
    try:
        wav, sr = load_audio(path)
    except AudioDecodeError as e:
        out.log(logging.WARNING, "Skipping %s: cannot be decoded (%s)", rel, e)
        out.skip("corrupt", f"cannot be decoded as audio ({e})")
        return None
    seconds = wav.shape[-1] / sr
    if seconds < params.min_clip_seconds:
        out.log(logging.WARNING, "Skipping %s: %.1f s is shorter than min_clip_seconds", rel, seconds)
        out.skip("too_short", f"{seconds:.1f} s, shorter than min_clip_seconds={params.min_clip_seconds:g}")
        return None
    samples = wav.numpy()  # [C, T], no copy
    level = signal_dbfs(samples, axis=-1)
    if level < SILENCE_DBFS:
        reason = _silence_reason(samples, level)
        out.log(logging.WARNING, "Skipping %s: %s", rel, reason)
        out.skip("silent", reason)
        return None
    return wav, sr, float(max(samples.max(), -samples.min()))


def _separate_and_resample(
    rel: str, wav: torch.Tensor, sr: int, remover: vocals.VocalRemover | None, out: TrackOutcome
) -> np.ndarray | None:
    """`[T, C]` at 32 kHz, at most two channels, vocals removed with a remover; None when nothing is left."""
    if wav.shape[0] > 2:
        out.log(logging.INFO, "%s has %d channels: keeping the first two (front left/right)", rel, wav.shape[0])
        wav = wav[:2]
    if remover is not None:
        wav, sr = remover(wav, sr)
    data = resample_fast(wav, sr, SAMPLE_RATE).numpy().T  # [T, C]
    del wav
    if remover is not None and signal_dbfs(data) < SILENCE_DBFS:
        out.log(logging.WARNING, "Skipping %s: nothing left after vocal removal", rel)
        out.skip("silent", "silent once vocals were removed (an a cappella track?)")
        return None
    return data


def _write_clips(rel: str, data: np.ndarray, params: PrepareParams, out_dir: Path, out: TrackOutcome) -> None:
    """Cut `data` (`[T, C]` at 32 kHz) into clips, write the non-silent ones as 16-bit WAV into `out_dir`."""
    spans, dropped = plan_clips(len(data), SAMPLE_RATE, params.chunk_seconds, params.min_clip_seconds)
    if dropped:
        out.clips_skipped.append(
            {"track": rel, "reason": f"last {dropped / SAMPLE_RATE:.1f} s shorter than min_clip_seconds"}
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for span in spans:
        # The track fits full scale already (`_fit_full_scale`); the clip only guards float rounding.
        segment = np.clip(data[span.start : span.end], -1.0, 1.0)
        silence = clip_silence(segment)
        if silence:
            out.clips_skipped.append({"track": rel, "clip": span.index, "reason": silence})
            continue
        # Named after the track already (errors name a file the user knows); `_take_track` adds a suffix when
        # another track took the name first.
        clip_path = out_dir / ClipNamer.clip_name(base_name(rel), span.index)
        _write_clip(clip_path, segment)
        out.clips.append([int(span.index), int(span.start), int(span.end), int(data.shape[1]), str(clip_path)])


def _analyse(track: _Track, run: _Run) -> None:
    """The track's own description (`<track>.txt`), and its clips handed to the essentia worker (key, bpm and,
    where no description will come from elsewhere, tags)."""
    text_file = _description_file(track.rel, run.text_index)
    if text_file:
        track.text, text_warnings = descriptions.read_text_description(run.unpacked.path(text_file), text_file)
        run.warnings.extend(text_warnings)
        if not track.text:
            logger.warning("%s is empty: %s gets no description from it", text_file, track.rel)
    if run.analyzer is None:
        return
    needs_tags = run.params.auto_labeling and not run.one_same and not track.text
    run.analyzer.submit(track.rel, [c.path for c in track.clips], tags=needs_tags)


# ------------------------------------------------------------------------------------------------ describe


def _collect_analysis(analyzer: analysis.Analyzer, warnings: list[str]) -> dict:
    """The essentia worker's results per track; what it could not do becomes a warning."""
    results, status, analysis_warnings = analyzer.collect()
    for family, error in (status.get("errors") or {}).items():
        analysis_warnings.append(f"auto-labeling: the {family} model could not be used ({error}); skipped")
    for message in analysis_warnings:
        logger.warning(message)
    warnings.extend(analysis_warnings)
    return results


def _describe(
    folder: Path, tracks: list[_Track], results: dict, run: _Run
) -> tuple[PreparedDataset, collections.Counter[str]]:
    """Each track's description (one_same_description, else its text file, else its auto-labels, else none; the
    trigger added) and labels into its clips' sidecars, then the manifest. Returns the dataset and how many tracks
    took their description from where."""
    params = run.params
    dataset = PreparedDataset(folder=folder, manifest=folder / MANIFEST)
    sources: collections.Counter[str] = collections.Counter()
    cut_warnings: dict[str, None] = {}  # each once (one_same_description would repeat it per track)
    for track in tracks:
        fields = captions.label_fields(results.get(track.rel))
        if run.one_same:
            description, origin, label = run.one_same, "one_same_description", "one_same_description"
        elif track.text:
            description, origin = track.text, "text_file"
            label = _description_file(track.rel, run.text_index) or track.rel
        elif params.auto_labeling and captions.caption(fields):
            description, origin, label = captions.caption(fields), "auto_labels", f"auto-labels of {track.rel}"
        else:
            description, origin, label = "", "none", track.rel
        description, notes = descriptions.compose(description, params.trigger, label)
        cut_warnings.update(dict.fromkeys(notes))
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
                SOURCE_KEY: track.sha256,
                "description_source": origin,
                "channels": clip.channels,
                **clip.info,
            }
            write_sidecar(clip)
            dataset.clips.append(clip)
    for message in cut_warnings:
        logger.warning(message)
    run.warnings.extend(cut_warnings)
    write_manifest(dataset)
    return dataset, sources


def _final_report(
    run: _Run,
    tracks: list[_Track],
    results: dict,
    sources: collections.Counter[str],
    timings: dict[str, float],
    started: float,
) -> dict:
    """report.json of a preparation that made a dataset: `_report`, where the descriptions came from, the text files
    no track matched, and the shortened names and normalized tracks."""
    report = _report(
        run.params, run.unpacked, tracks, run.skipped, run.clips_skipped, results, run.warnings, timings, started
    )
    report["descriptions"] = dict(sources)
    used = {_description_file(t.rel, run.text_index) for t in tracks}
    report["unmatched_text_files"] = [t for t in run.unpacked.texts if t not in used]
    report.update(run.extra)
    return report


def _silence_reason(samples: np.ndarray, level: float) -> str:
    """Why a track counts as silent: nothing at all, or a constant level (DC) that a peak meter takes for music."""
    offset = dc_offset(samples, axis=-1)
    if offset >= 10 ** (SILENCE_DBFS / 20):
        return (
            f"silent: no signal, only a constant level (DC offset {offset:.3g}); what varies peaks at "
            f"{level:.1f} dBFS, below {SILENCE_DBFS:g}"
        )
    return f"silent (peak {level:.1f} dBFS, below {SILENCE_DBFS:g})"


def _fit_full_scale(data: np.ndarray, source_peak: float, rel: str, out: TrackOutcome) -> dict | None:
    """Scale a track peaking above full scale (float sources can hold values over 1.0; resampling and vocal
    removal can overshoot too) down to peak at 1.0, in place, instead of hard-clipping it into 16-bit clips (a
    float source at 1.2 would have a third of its samples clipped). One gain for the whole track: its dynamics are
    kept. Returns the report entry, or None when it fits."""
    peak = float(max(data.max(), -data.min())) if data.size else 0.0
    if peak <= 1.0:
        return None
    gain = 1.0 / peak
    data *= np.float32(gain)
    gain_db = 20.0 * float(np.log10(gain))
    if source_peak > 1.0:
        why = f"the source's float samples peak at {source_peak:.3f}, above full scale (1.0)"
        out.log(logging.WARNING, "%s: %s; the track was scaled by %.2f dB so nothing is clipped", rel, why, gain_db)
    else:
        why = "resampling or vocal removal overshot full scale (1.0)"
        out.log(logging.INFO, "%s: %s (peak %.3f); scaled by %.2f dB so nothing is clipped", rel, why, peak, gain_db)
    return {"file": rel, "source_peak": round(source_peak, 4), "peak": round(peak, 4), "gain_db": round(gain_db, 2),
            "reason": why}  # fmt: skip


def _write_clip(path: Path, segment: np.ndarray) -> None:
    """A 16-bit WAV clip written under a temporary name and renamed: a full disk leaves no truncated clip under its
    name, and is one `DiskError` naming the clip (libsndfile says 'System error', which is no OSError)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        sf.write(str(tmp), _to_pcm16(segment), SAMPLE_RATE, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except (sf.LibsndfileError, OSError) as e:
        raise write_failed(path, e, "the clip") from None
    finally:
        tmp.unlink(missing_ok=True)


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
