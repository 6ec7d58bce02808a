"""Bootstrap confidence intervals over ECGs (and weight draws), shared by the checks that compare means."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecgx.core.errors import InvalidArgument


@dataclass(frozen=True)
class Interval:
    """A mean over ECGs (and draws) and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float


def bootstrap_mean(values: np.ndarray, *, n_boot: int, confidence: float, seed: int) -> Interval:
    """Mean of ``values`` with a percentile interval from ``n_boot`` resamples.

    ``values`` is per ECG (1-D), or per weight draw and ECG (2-D, draws x ECGs): then the ECGs
    and the draws are resampled together (a two-way bootstrap), so the interval holds the
    draw-to-draw variance as well as the ECG-to-ECG one; averaging the draws first would hide it.
    """
    v = np.asarray(values, np.float64)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.size == 0 or not np.isfinite(v).all():
        raise InvalidArgument(
            "bootstrap needs a non-empty 1-D (ECGs) or 2-D (draws x ECGs) array of finite values"
        )
    rng = np.random.default_rng([seed, 7])
    draws, n = v.shape
    ecgs = rng.integers(0, n, size=(n_boot, n))
    if draws == 1:
        means = v[0][ecgs].mean(axis=1)
    else:
        rows = rng.integers(0, draws, size=(n_boot, draws))
        # Per ECG, the mean over a resampled set of draws; then the resampled ECGs of those.
        per_ecg = v[rows].mean(axis=1)  # (n_boot, ECGs)
        means = np.take_along_axis(per_ecg, ecgs, axis=1).mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(mean=float(v.mean()), low=float(low), high=float(high))


def bootstrap_difference(
    score: np.ndarray, control: np.ndarray, *, n_boot: int, confidence: float, seed: int
) -> Interval:
    """Paired bootstrap of mean(score - control) over the same ECGs (and draws)."""
    d = np.asarray(score, np.float64) - np.asarray(control, np.float64)
    return bootstrap_mean(d, n_boot=n_boot, confidence=confidence, seed=seed)
