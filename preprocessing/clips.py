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


_UNSAFE = re.compile(r"[^\w\-.()+,&@' ]+", re.UNICODE)


def _truncate_utf8(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


def base_name(relpath: str) -> str:
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
    return _truncate_utf8(name, MAX_NAME_BYTES).rstrip("._- ") or "track"


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
