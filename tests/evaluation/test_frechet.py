"""The Fréchet distance against the closed form for two Gaussians."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.frechet import embedding_frechet, frechet_distance, gaussian_stats


def test_diagonal_gaussians_match_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    # diagonal covariances commute: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(v1) - sqrt(v2))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_full_covariances_match_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4))
    s = a @ a.T + 0.1 * np.eye(4)
    # the same covariance: only the means count; a scaled one: tr((1 + c - 2 sqrt(c)) S) = (1 - sqrt(c))^2 tr(S)
    assert frechet_distance(np.zeros(4), s, np.ones(4), s) == pytest.approx(4.0, rel=1e-7)
    assert frechet_distance(np.zeros(4), s, np.zeros(4), 9.0 * s) == pytest.approx(4.0 * np.trace(s), rel=1e-7)
    assert frechet_distance(np.zeros(4), s, np.zeros(4), s) == pytest.approx(0.0, abs=1e-9)


def test_samples_converge_to_the_distance_of_their_gaussians():
    rng = np.random.default_rng(1)
    x = rng.normal([0.0, 0.0], [1.0, 2.0], size=(200_000, 2))
    y = rng.normal([1.0, 0.0], [1.0, 1.0], size=(200_000, 2))
    assert embedding_frechet(x, y) == pytest.approx(1.0 + (2.0 - 1.0) ** 2, abs=0.03)
    mu, cov = gaussian_stats(x)
    assert mu == pytest.approx([0.0, 0.0], abs=0.02) and np.diag(cov) == pytest.approx([1.0, 4.0], rel=0.02)
    with pytest.raises(ValueError, match="at least 2 vectors"):
        gaussian_stats(x[:1])


def test_few_vectors_in_many_dimensions_match_the_covariance_form():
    """Fewer vectors than dimensions (discogs-effnet's 1280-d): the nuclear-norm form equals sqrtm's."""
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((6, 40)), 2.0 * rng.standard_normal((9, 40)) + 0.3
    expected = frechet_distance(*gaussian_stats(x), *gaussian_stats(y))
    assert embedding_frechet(x, y) == pytest.approx(expected, rel=1e-7)
    assert embedding_frechet(x, x) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2 vectors"):
        embedding_frechet(x, y[:1])
