"""Audio embeddings in the compression model's continuous latent space, and the copy check.

`encodec_latents`: EnCodec's encoder output *before* quantization, one `D`-dim vector per frame (50 Hz for
MusicGen's 32 kHz EnCodec): the model is already loaded for training or generation, nothing to download, and the
space is the one the LM's codes quantize. Stereo models (audiocraft's interleaved stereo wrapper) embed the mono
downmix with the inner mono EnCodec.

`copy_check`: for each generated sample, its nearest training clip by the mean distance from each of the sample's
frames to the clip's closest frame (a directed Chamfer distance: a sample that replays a clip, even a part of it,
is near 0 there). It is flagged as a possible copy when that distance is below `ratio` x the distance between the
two halves of a training clip (median over the clips): closer to a training clip than the rest of the same track
is to its first half, which is as close as new music in that track's style gets.
"""

from __future__ import annotations

import typing as tp

import numpy as np
import torch

from core.audio import convert_channels, resample

__all__ = ["encodec_latents", "chamfer", "copy_check", "COPY_RATIO"]

COPY_RATIO = 0.5


def _encoder(compression_model: tp.Any) -> tuple[torch.nn.Module, int]:
    inner = compression_model if hasattr(compression_model, "encoder") else getattr(compression_model, "model", None)
    if inner is None or not hasattr(inner, "encoder"):
        raise TypeError(f"{type(compression_model).__name__} has no EnCodec encoder to embed with")
    return inner.encoder, int(inner.channels)


@torch.no_grad()
def encodec_latents(compression_model: tp.Any, wav: torch.Tensor, sample_rate: int) -> np.ndarray:
    """`[frames, D]` float32 latents of `wav` `[C, T]` (any rate and channels; resampled, downmixed as needed)."""
    encoder, channels = _encoder(compression_model)
    wav = convert_channels(resample(wav.float(), sample_rate, int(compression_model.sample_rate)), channels)
    device = next(encoder.parameters()).device
    latents = encoder(wav[None].to(device))  # [1, D, frames]
    return latents[0].T.float().cpu().numpy()


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over `a`'s frames of the distance to the closest frame of `b` (`[N, D]`, `[M, D]`)."""
    d = torch.cdist(torch.from_numpy(np.asarray(a, np.float32)), torch.from_numpy(np.asarray(b, np.float32)))
    return float(d.min(dim=1).values.mean())


def copy_check(
    generated: tp.Sequence[np.ndarray],
    training: tp.Sequence[np.ndarray],
    names: tp.Sequence[str],
    ratio: float = COPY_RATIO,
) -> dict[str, tp.Any]:
    """For each generated sample: the nearest training clip (`names`), its distance, and `copy` when it is closer
    than `ratio` x `reference` (the median distance between the halves of a training clip)."""
    if not training:
        raise ValueError("no training clips to compare with")
    # The scale of "near": how close the second half of a training clip is to its first half, i.e. new music of the
    # very same track and style, which a sample may well resemble. A replayed clip is far closer than that.
    halves = [chamfer(t[len(t) // 2 :], t[: len(t) // 2]) for t in training if len(t) >= 4]
    reference = float(np.median(halves)) if halves else None
    samples = []
    for g in generated:
        distances = [chamfer(g, t) for t in training]
        best = int(np.argmin(distances))
        flagged = reference is not None and distances[best] < ratio * reference
        samples.append({"nearest": names[best], "distance": distances[best], "copy": bool(flagged)})
    return {"reference": reference, "ratio": ratio, "samples": samples, "copies": sum(s["copy"] for s in samples)}
