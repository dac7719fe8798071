"""Fréchet distance between two sets of embeddings (FAD-style): each set is summarised as a Gaussian (mean and
covariance of its vectors) and the distance between the two Gaussians is

    d² = |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½)

(Fréchet / Wasserstein-2 between normal distributions). A few lines on numpy/scipy rather than a package: the
FAD packages in reach (frechet_audio_distance, fadtk) embed audio with their own downloaded models, and we pass our
own embeddings (EnCodec latents, evaluation/embed.py). Tested against the closed form for two Gaussians.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gaussian_stats", "frechet_distance", "embedding_frechet", "fmt_distance"]


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
    """Fréchet distance between the Gaussians fitted to embeddings `x` `[N, D]` and `y` `[M, D]`.

    With fewer vectors than dimensions (a few seconds of discogs-effnet's 1280-d, ~1 per second) it is computed
    from the vectors themselves, exactly and without any D x D matrix: with `A`, `B` the centred vectors scaled by
    1/sqrt(N-1), S1 = AᵀA, S2 = BᵀB, and the eigenvalues of S1 S2 are the squared singular values of A Bᵀ, so
    tr((S1 S2)^½) is the nuclear norm of the small N x M matrix A Bᵀ (sqrtm of 1280 x 1280 takes ~10 s here).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    for v in (x, y):
        if v.ndim != 2 or len(v) < 2:
            raise ValueError(f"need at least 2 vectors as an [N, D] array, got shape {v.shape}")
    if min(len(x), len(y)) >= x.shape[1]:
        return frechet_distance(*gaussian_stats(x), *gaussian_stats(y))
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    a, b = (x - mu1) / np.sqrt(len(x) - 1), (y - mu2) / np.sqrt(len(y) - 1)
    nuclear = float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
    diff = mu1 - mu2
    return max(float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2.0 * nuclear), 0.0)


def fmt_distance(value: float | None) -> str:
    """A distance as the report and the log print it: 3 decimals from 0.1 up, else 3 significant digits (the EnCodec
    Fréchet distance of a tiny model is about 0.0007: `0.001 -> 0.001` hid every change)."""
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) >= 0.1 or value == 0 else f"{value:#.3g}"
