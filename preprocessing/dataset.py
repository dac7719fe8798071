"""The prepared dataset: 32 kHz WAV clips, an audiocraft manifest (`data.jsonl`, one `AudioMeta` per line), a
MusicInfo sidecar (`<clip>.json`) beside each clip and `report.json`. This is the whole contract with training:
`prepare()` writes it, `load_prepared()` reads it back (also for a folder prepared earlier)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import write_failed
from core.params import InputError
from preprocessing.descriptions import MAX_DESCRIPTION_CHARS, shorten

logger = logging.getLogger(__name__)

MANIFEST = "data.jsonl"
REPORT = "report.json"
CLIPS_DIR = "clips"
SAMPLE_RATE = 32000
TMP_PREFIX = ".mgft-tmp-"  # a file being written (renamed into place when complete)
# Every MusicInfo field audiocraft's MusicDataset requires (`info_fields_required=True`), with None when unknown.
MUSIC_INFO_FIELDS = ("title", "artist", "key", "bpm", "genre", "moods", "keywords", "description", "name", "instrument")


@dataclass
class PreparedClip:
    path: Path  # 32 kHz WAV clip written under work_dir
    duration: float  # seconds
    sample_rate: int  # 32000
    channels: int  # 1 or 2 (stereo kept as stereo; the trainer converts)
    description: str  # final text condition ("" = unconditional), trigger already prepended
    info: dict  # the sidecar: MusicInfo fields (title, key, bpm, genre, moods, instrument, description, ...)
    source: str  # the track (relative path in the upload) this clip came from


@dataclass
class PreparedDataset:
    folder: Path  # work_dir/dataset
    manifest: Path  # folder/data.jsonl
    clips: list[PreparedClip] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(c.duration for c in self.clips)


def manifest_line(clip: PreparedClip) -> dict:
    """audiocraft's AudioMeta fields, in its order."""
    return {
        "path": str(clip.path.resolve()),
        "duration": clip.duration,
        "sample_rate": clip.sample_rate,
        "amplitude": None,
        "weight": None,
        "info_path": None,
    }


def _umask() -> int:
    """The process umask. Linux shows it in /proc (reading it through os.umask means setting it for a moment,
    which another thread could see); elsewhere, set and restore."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> Path:
    """Write through a temporary file renamed into place: an interrupted run never leaves a half-written manifest or
    report behind. The file gets the mode any new file gets (0644 under the usual umask 022), not mkstemp's 0600:
    these files are handed to the user."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    except OSError as e:
        raise write_failed(path, e) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk: one line naming the file, not a traceback
            raise write_failed(path, e) from None
        raise
    return path


def write_manifest(dataset: PreparedDataset) -> None:
    lines = [json.dumps(manifest_line(c), ensure_ascii=False) for c in dataset.clips]
    write_text_atomic(dataset.manifest, "".join(line + "\n" for line in lines))


def write_sidecar(clip: PreparedClip) -> Path:
    return write_text_atomic(clip.path.with_suffix(".json"), json.dumps(clip.info, ensure_ascii=False, indent=1))


def write_report(folder: Path, report: dict) -> Path:
    return write_text_atomic(folder / REPORT, json.dumps(report, ensure_ascii=False, indent=1))


def _bounded(description: str, clip: Path) -> str:
    """A folder prepared elsewhere (or edited by hand) may hold a description longer than the text encoder reads:
    cut it as preparation does (preprocessing/descriptions.py), saying so."""
    if len(description) <= MAX_DESCRIPTION_CHARS:
        return description
    short = shorten(description)
    logger.warning(
        "The description of %s is %d characters; the text encoder reads at most 512 tokens: using its first %d",
        clip.name,
        len(description),
        len(short),
    )
    return short


def load_prepared(folder: str | Path) -> PreparedDataset:
    """Read a prepared folder back: `data.jsonl` + each clip's sidecar (+ `report.json` when present).

    Clip paths are absolute in the manifest; a clip present under `folder/clips/` is taken from there (so a copied
    or moved folder reads its own clips), else from the manifest's path.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise InputError(
            "dataset_path",
            f"{folder} is not a prepared dataset (no {MANIFEST}); prepare one with `python -m preprocessing`",
        )
    import soundfile as sf

    clips: list[PreparedClip] = []
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
            path = Path(meta["path"])
        except (ValueError, KeyError, TypeError) as e:
            raise InputError("dataset_path", f"{manifest} line {n} is not an AudioMeta record ({e})") from None
        local = folder / CLIPS_DIR / path.name  # the folder's own copy wins (a copied or moved folder)
        if local.is_file():
            path = local
        elif not path.is_file():
            raise InputError("dataset_path", f"{manifest} line {n}: clip {path} is missing")
        sidecar = path.with_suffix(".json")
        info = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
        channels = info.get("channels")
        if channels is None:
            channels = sf.info(str(path)).channels
        clips.append(
            PreparedClip(
                path=path,
                duration=float(meta["duration"]),
                sample_rate=int(meta.get("sample_rate", SAMPLE_RATE)),
                channels=int(channels),
                description=_bounded(info.get("description") or "", path),
                info=info,
                source=info.get("source") or path.name,
            )
        )
    report_path = folder / REPORT
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    logger.info("Loaded prepared dataset %s: %d clips", folder, len(clips))
    return PreparedDataset(folder=folder, manifest=manifest, clips=clips, report=report)
