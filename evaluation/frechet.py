"""Fréchet distance between two sets of embeddings (FAD-style): each set is summarised as a Gaussian (mean and
covariance of its vectors) and the distance between the two Gaussians is

    d² = |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½)

(Fréchet / Wasserstein-2 between normal distributions). A few lines on numpy/scipy rather than a package: the
FAD packages in reach (frechet_audio_distance, fadtk) embed audio with their own downloaded models, and we pass our
own embeddings (EnCodec latents, evaluation/embed.py). Tested against the closed form for two Gaussians.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gaussian_stats", "frechet_distance", "embedding_frechet"]


def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean `[D]` and covariance `[D, D]` (unbiased) of `x` `[N, D]`, in float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 vectors as an [N, D] array, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, s1) and N(mu2, s2)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(s1).astype(np.float64), np.atleast_2d(s2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"shapes differ: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product (fewer vectors than dimensions): regularise, as FID does
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):  # numerical noise of sqrtm on a (theoretically) PSD product
        covmean = covmean.real
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)  # rounding can take an identical pair just below 0


def embedding_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to embeddings `x` `[N, D]` and `y` `[M, D]`."""
    return frechet_distance(*gaussian_stats(x), *gaussian_stats(y))
