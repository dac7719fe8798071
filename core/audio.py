"""Audio I/O without a system ffmpeg: soundfile (libsndfile) first, PyAV (bundled FFmpeg) as the fallback.

Shapes follow audiocraft: a waveform is a float32 tensor `[C, T]` in [-1, 1].
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch

from core.errors import DiskError, InputError

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("wav", "mp3")


class AudioDecodeError(ValueError):
    """A file is not audio we can decode; the message names the file."""


def load_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Decode any common audio file to `([C, T] float32, sample_rate)`, whatever its name or extension says."""
    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(f"{path}: no such file")
    try:
        import soundfile as sf

        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [T, C]
        wav = torch.from_numpy(np.ascontiguousarray(data.T))
    except Exception as sf_error:  # noqa: BLE001 - any libsndfile failure means "try FFmpeg"
        try:
            wav, sr = _load_with_av(path)
        except Exception as av_error:  # noqa: BLE001
            raise AudioDecodeError(
                f"{path.name}: not a decodable audio file (soundfile: {sf_error}; PyAV: {av_error})"
            ) from None
    if wav.numel() == 0:
        raise AudioDecodeError(f"{path.name}: the file holds no audio samples")
    if not torch.isfinite(wav).all():
        raise AudioDecodeError(f"{path.name}: the audio holds NaN or infinite samples")
    return wav, int(sr)


def load_audio_input(name: str, path: str | Path | None) -> tuple[torch.Tensor, int] | None:
    """The audio file of the request input `name` (`input_audio`, `style_audio`), or None when it is not given; a
    file that does not decode is an `InputError` naming the input and the formats that work."""
    if not path:
        return None
    try:
        return load_audio(path)
    except AudioDecodeError as e:
        raise InputError(name, f"{e}. Give a wav, mp3, flac, ogg, m4a or aiff file.") from None


def _load_with_av(path: Path) -> tuple[torch.Tensor, int]:
    import av

    with av.open(str(path)) as container:
        streams = container.streams.audio
        if not streams:
            raise ValueError("no audio stream")
        stream = streams[0]
        sr = stream.codec_context.sample_rate or stream.rate
        channels = stream.codec_context.channels or 1
        # Resample to planar float32 at the native rate so every codec gives one layout.
        resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=sr)
        chunks: list[np.ndarray] = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        raise ValueError("no audio frames decoded")
    data = np.concatenate(chunks, axis=1).astype(np.float32)
    if data.shape[0] != channels and channels > 0:
        data = data[:channels]
    return torch.from_numpy(np.ascontiguousarray(data)), int(sr)


def resample(wav: torch.Tensor, from_sr: int, to_sr: int) -> torch.Tensor:
    """`[C, T]` at `from_sr` to `to_sr` (julius' windowed-sinc: the resampler audiocraft itself uses)."""
    if from_sr == to_sr:
        return wav
    import julius

    return julius.resample_frac(wav, int(from_sr), int(to_sr))


def convert_channels(wav: torch.Tensor, channels: int) -> torch.Tensor:
    """`[C, T]` to `[channels, T]`: mean to mono, duplicate mono to stereo, first channels otherwise."""
    if wav.shape[0] == channels:
        return wav
    if channels == 1:
        return wav.mean(dim=0, keepdim=True)
    if wav.shape[0] == 1:
        return wav.expand(channels, -1).contiguous()
    if wav.shape[0] > channels:
        return wav[:channels]
    raise ValueError(f"cannot convert {wav.shape[0]} channels to {channels}")


def save_audio(path: str | Path, wav: torch.Tensor, sample_rate: int, fmt: str | None = None) -> Path:
    """Write `[C, T]` as 16-bit WAV (soundfile) or 320 kbps MP3 (lameenc). Returns the path written.

    Written to a temp name in the same folder, then renamed: a failed write (a full disk, an I/O error) leaves no
    truncated file under `path`, and is a `DiskError` naming the path (libsndfile's own error is no
    OSError, so it is translated here)."""
    import soundfile as sf

    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".") or "wav").lower()
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format {fmt!r} is not one of {OUTPUT_FORMATS}")
    data = wav.detach().to(torch.float32).cpu().clamp(-1.0, 1.0).numpy().T  # [T, C]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "wav":
            sf.write(str(tmp), data, sample_rate, subtype="PCM_16", format="WAV")
        else:
            tmp.write_bytes(encode_mp3(data, sample_rate))
        os.replace(tmp, path)
    except (OSError, sf.LibsndfileError) as e:
        reason = getattr(e, "strerror", None) or getattr(e, "error_string", None) or str(e)
        raise DiskError(
            f"Could not write {path}: {reason}. Free disk space there, check that the folder is writable, or write "
            "the output elsewhere."
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def encode_mp3(data: np.ndarray, sample_rate: int, bitrate_kbps: int = 320) -> bytes:
    """`[T, C]` float in [-1, 1] to MP3 bytes with lameenc (mono or stereo)."""
    import lameenc

    channels = data.shape[1]
    if channels > 2:
        data = data[:, :2]
        channels = 2
    pcm = (data * 32767.0).round().astype("<i2")
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(bitrate_kbps)
    encoder.set_in_sample_rate(int(sample_rate))
    encoder.set_channels(channels)
    encoder.set_quality(2)
    buffer = io.BytesIO()
    buffer.write(encoder.encode(pcm.tobytes()))
    buffer.write(encoder.flush())
    return buffer.getvalue()


def duration_seconds(wav: torch.Tensor, sample_rate: int) -> float:
    return wav.shape[-1] / float(sample_rate)


def peak_dbfs(wav: torch.Tensor) -> float:
    peak = float(wav.abs().max()) if wav.numel() else 0.0
    return -float("inf") if peak <= 0 else 20.0 * float(np.log10(peak))


def resample_fast(wav: torch.Tensor, from_sr: int, to_sr: int, quality: str = "HQ") -> torch.Tensor:
    """`[C, T]` at `from_sr` to `to_sr` with soxr (much faster than julius on a CPU for odd ratios like
    44.1k -> 32k; the same band-limited quality class). Used by dataset preparation, where every second of
    every upload is resampled once."""
    if from_sr == to_sr:
        return wav
    import soxr

    data = np.ascontiguousarray(wav.detach().to(torch.float32).cpu().numpy().T)  # [T, C]
    out = soxr.resample(data, int(from_sr), int(to_sr), quality=quality)
    return torch.from_numpy(np.ascontiguousarray(out.T))
