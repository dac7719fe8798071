"""Real audio files in real formats for the preparation tests: soundfile writes wav/flac/ogg/opus/mp3/aiff,
PyAV (its bundled FFmpeg) writes m4a/aac."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from tests.helpers import tone

# extension -> (soundfile format, subtype) ; None = written with PyAV
FORMATS: dict[str, tuple[str, str] | None] = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_24"),
    ".ogg": ("OGG", "VORBIS"),
    ".opus": ("OGG", "OPUS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
    ".aiff": ("AIFF", "PCM_16"),
    ".m4a": None,
    ".aac": None,
}


def write_audio(path: Path, data: np.ndarray, sr: int, subtype: str | None = None) -> Path:
    """`data` is `[T, C]` float32. The format comes from the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = FORMATS[path.suffix.lower()]
    if spec is None:
        _write_av(path, data, sr)
    else:
        fmt, default_subtype = spec
        sf.write(str(path), data, sr, format=fmt, subtype=subtype or default_subtype)
    return path


def _write_av(path: Path, data: np.ndarray, sr: int) -> None:
    import av

    channels = data.shape[1]
    container_format = "adts" if path.suffix.lower() == ".aac" else "ipod"
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream("aac", rate=sr)
        stream.layout = "stereo" if channels == 2 else "mono"
        planar = np.ascontiguousarray(data.T.astype(np.float32))  # [C, T]
        frame_size = 1024
        for start in range(0, planar.shape[1], frame_size):
            chunk = np.ascontiguousarray(planar[:, start : start + frame_size])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=stream.layout.name)
            frame.sample_rate = sr
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def track(seconds: float, sr: int = 44100, channels: int = 2, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    return tone(seconds, sr, channels, freq=freq, seed=seed)


def chord_with_beat(
    notes: tuple[float, ...], bpm: float, seconds: float = 20.0, sr: int = 44100, seed: int = 0
) -> np.ndarray:
    """A held chord (known key) with a noise-burst beat (known tempo): `[T, 1]` float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    sig = sum(0.15 * np.sin(2 * np.pi * f * t) + 0.05 * np.sin(4 * np.pi * f * t) for f in notes)
    period = 60.0 / bpm
    n = int(0.03 * sr)
    envelope = np.exp(-np.arange(n) / (0.005 * sr))
    clicks = np.zeros_like(t)
    for k in range(int(seconds / period) + 1):
        i = int(k * period * sr)
        if i + n <= len(t):
            clicks[i : i + n] += 0.6 * rng.standard_normal(n) * envelope
    return (sig + clicks).astype(np.float32)[:, None]
