"""Bootstrap confidence intervals over ECGs, shared by the checks that compare means."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean over ECGs and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float


def bootstrap_mean(values: np.ndarray, *, n_boot: int, confidence: float, seed: int) -> Interval:
    """Mean of per-ECG ``values`` with a percentile interval from ``n_boot`` resamples of the ECGs."""
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or len(v) == 0 or not np.isfinite(v).all():
        raise ValueError("bootstrap needs a non-empty 1-D array of finite per-ECG values")
    rng = np.random.default_rng([seed, 7])
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(mean=float(v.mean()), low=float(low), high=float(high))


def bootstrap_difference(
    score: np.ndarray, control: np.ndarray, *, n_boot: int, confidence: float, seed: int
) -> Interval:
    """Paired bootstrap of mean(score - control) over the same ECGs."""
    d = np.asarray(score, np.float64) - np.asarray(control, np.float64)
    return bootstrap_mean(d, n_boot=n_boot, confidence=confidence, seed=seed)
