"""Cutting a track into clips, and naming clips after their track (unicode kept, unique, filesystem-safe)."""

from __future__ import annotations

import posixpath
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

SILENCE_DBFS = -60.0
# Bytes, not characters: filesystems limit a name to 255 bytes; leave room for the index, suffix and `.json`.
MAX_NAME_BYTES = 150


@dataclass(frozen=True)
class Span:
    index: int
    start: int  # sample
    end: int  # sample (exclusive)


def plan_clips(
    n_samples: int, sample_rate: int, chunk_seconds: float, min_clip_seconds: float
) -> tuple[list[Span], int]:
    """Consecutive `chunk_seconds` spans; a last piece shorter than `min_clip_seconds` is dropped.

    Returns `(spans, dropped_tail_samples)`. A track shorter than a chunk but at least `min_clip_seconds` long is
    one clip; a shorter track gives no clip.
    """
    chunk = max(1, round(chunk_seconds * sample_rate))
    minimum = round(min_clip_seconds * sample_rate)
    spans: list[Span] = []
    dropped = 0
    for start in range(0, n_samples, chunk):
        end = min(start + chunk, n_samples)
        if end - start < minimum:
            dropped = end - start
            break
        spans.append(Span(len(spans), start, end))
    return spans, dropped


def peak_dbfs(data: np.ndarray) -> float:
    peak = float(np.max(np.abs(data))) if data.size else 0.0
    return -float("inf") if peak <= 0 else 20.0 * float(np.log10(peak))


def signal_dbfs(data: np.ndarray, axis: int = 0) -> float:
    """Peak level of what varies: the DC offset (the mean along `axis`, the time axis) taken out first, so a
    constant level (a DC-only file, a stuck converter) reads as the silence it is, however far from zero."""
    if not data.size:
        return -float("inf")
    # max |x - mean| per channel from the extremes: no copy of the track (a long track is hundreds of MB).
    mean = data.mean(axis=axis, dtype=np.float64)
    peak = float(max(np.max(data.max(axis=axis) - mean), np.max(mean - data.min(axis=axis))))
    return -float("inf") if peak <= 0 else 20.0 * float(np.log10(peak))


def dc_offset(data: np.ndarray, axis: int = 0) -> float:
    return float(np.max(np.abs(data.mean(axis=axis, dtype=np.float64)))) if data.size else 0.0


# A clip sitting on a constant level whose variation averages below this is "no signal" even when a few samples
# ring higher: resampling a step (music ending in a DC tail, the track's last sample) leaves a short ripple of
# about -40 dBFS that a peak meter takes for sound.
NEAR_CONSTANT_DBFS = -70.0


def clip_silence(segment: np.ndarray) -> str | None:
    """Why a `[T, C]` clip counts as silent ("silent", "silent (DC offset only)"), or None when it has signal."""
    offset = dc_offset(segment)
    has_offset = offset >= 10 ** (SILENCE_DBFS / 20)
    if signal_dbfs(segment) < SILENCE_DBFS:
        return "silent (DC offset only)" if has_offset else "silent"
    if has_offset:  # only then: the RMS costs a pass over the clip
        rms = float(np.max(segment.std(axis=0, dtype=np.float64)))
        if rms <= 0 or 20.0 * np.log10(rms) < NEAR_CONSTANT_DBFS:
            return "silent (DC offset only)"
    return None


_UNSAFE = re.compile(r"[^\w\-.()+,&@' ]+", re.UNICODE)


def _truncate_utf8(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


def base_name(relpath: str, max_bytes: int | None = MAX_NAME_BYTES) -> str:
    """`Album/Sóng ♪ 1.mp3` -> `Album__Sóng_1`: folders joined by `__`, letters of any script kept, everything
    else that a shell or a filesystem could trip on replaced."""
    stem = posixpath.splitext(relpath)[0]
    parts = []
    for part in stem.split("/"):
        part = unicodedata.normalize("NFC", part)
        part = _UNSAFE.sub("_", part)
        part = re.sub(r"\s+", "_", part)
        part = re.sub(r"_{2,}", "_", part).strip("._- ")
        if part:
            parts.append(part)
    name = "__".join(parts) or "track"
    if max_bytes is None:
        return name
    return _truncate_utf8(name, max_bytes).rstrip("._- ") or "track"


class ClipNamer:
    """Unique base names per track (case-insensitively: macOS and Windows filesystems fold case)."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def track_base(self, relpath: str) -> str:
        base = base_name(relpath)
        candidate, n = base, 1
        while candidate.casefold() in self._taken:
            n += 1
            candidate = f"{base}-{n}"
        self._taken.add(candidate.casefold())
        return candidate

    @staticmethod
    def clip_name(track_base: str, index: int) -> str:
        return f"{track_base}_{index:03d}.wav"
