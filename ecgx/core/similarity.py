"""Per-ECG similarity of attribution maps, the measures every check is built from.

All functions take maps of shape (B, 12, 600) (or any (B, ...)) and return one
value per ECG. A map that is constant (all zeros, say, when a randomised model's
gradient dies) has no ranking and no correlation: those ECGs get NaN, and the
checks count them instead of guessing a value.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter
from scipy.stats import rankdata

from ecgx.core.errors import InvalidArgument

# SSIM constants of Wang et al. (2004), as in scikit-image's defaults.
SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1)


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each ECG's map in ``a`` with its map in ``b``; NaN where one is constant."""
    a, b = _rows(a), _rows(b)
    if a.shape != b.shape:
        raise InvalidArgument(f"maps to compare must have the same shape, got {a.shape} and {b.shape}")
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / norm
    r[norm <= 1e-30] = np.nan
    return np.clip(r, -1.0, 1.0)


def spearman_rows(a: np.ndarray, b: np.ndarray, absolute: bool = True) -> np.ndarray:
    """Spearman rank correlation per ECG (ties get their average rank).

    ``absolute`` ranks magnitudes, as Adebayo et al. do, so a method whose sign
    flips under randomisation but keeps its shape still counts as similar.
    """
    a, b = _rows(a), _rows(b)
    if absolute:
        a, b = np.abs(a), np.abs(b)
    return pearson_rows(rankdata(a, axis=1), rankdata(b, axis=1))


def _unit_magnitude(m: np.ndarray) -> np.ndarray:
    m = np.abs(np.asarray(m, dtype=np.float64))
    peak = m.reshape(len(m), -1).max(axis=1).reshape((-1,) + (1,) * (m.ndim - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(peak > 0, m / np.where(peak > 0, peak, 1), np.nan)


def ssim_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Structural similarity per ECG of the absolute maps, each scaled to [0, 1].

    Maps are (B, leads, samples) and compared as images with a 7 x 7 uniform window
    and the sample covariance, like ``skimage.metrics.structural_similarity`` with
    ``data_range=1``; NaN where a map is all zero.
    """
    a, b = _unit_magnitude(a), _unit_magnitude(b)
    if a.shape != b.shape or a.ndim != 3:
        raise InvalidArgument(
            f"SSIM needs two (B, leads, samples) arrays of one shape, got {a.shape}, {b.shape}"
        )
    out = np.full(len(a), np.nan)
    ok = np.isfinite(a).all(axis=(1, 2)) & np.isfinite(b).all(axis=(1, 2))
    if not ok.any():
        return out
    a, b = a[ok], b[ok]
    win = SSIM_WINDOW
    size = (1, win, win)
    n = win * win
    cov_norm = n / (n - 1)
    mu_a, mu_b = uniform_filter(a, size), uniform_filter(b, size)
    var_a = cov_norm * (uniform_filter(a * a, size) - mu_a * mu_a)
    var_b = cov_norm * (uniform_filter(b * b, size) - mu_b * mu_b)
    cov = cov_norm * (uniform_filter(a * b, size) - mu_a * mu_b)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    pad = (win - 1) // 2  # skimage drops the border where the window leaves the image
    out[ok] = s[:, pad:-pad, pad:-pad].mean(axis=(1, 2))
    return out


def segment_sums(maps: np.ndarray, window: int) -> np.ndarray:
    """(B, segments) summed (signed) attribution per lead x ``window`` segment, in the order of
    :func:`ecgx.service.methods.perturbation.segment_mask` (lead-major; the last window of a lead
    may be shorter): the unit the perturbation check removes."""
    maps = np.asarray(maps, np.float64)
    starts = np.arange(0, maps.shape[2], window)
    return np.add.reduceat(maps, starts, axis=2).reshape(len(maps), -1)


SIMILARITY_MEASURES = {
    "spearman_abs": lambda a, b: spearman_rows(a, b, absolute=True),
    "spearman": lambda a, b: spearman_rows(a, b, absolute=False),
    "ssim": ssim_rows,
}


def mean_pairwise_pearson(maps: list[np.ndarray]) -> np.ndarray:
    """Per ECG, the mean Pearson correlation over all pairs of maps (e.g. one per model seed)."""
    if len(maps) < 2:
        raise InvalidArgument(f"pairwise correlation needs at least 2 sets of maps, got {len(maps)}")
    n = len(maps)
    pairs = np.stack([pearson_rows(maps[i], maps[j]) for i in range(n) for j in range(i + 1, n)])
    defined = np.isfinite(pairs)
    with np.errstate(invalid="ignore"):
        return np.where(defined, pairs, 0).sum(axis=0) / defined.sum(axis=0)


def auroc_rows(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per ECG, AUROC of ``scores`` ranking the elements where ``truth`` is set above the
    others (Mann-Whitney U with average ranks); NaN where truth is all or nothing."""
    s, t = _rows(scores), _rows(truth).astype(bool)
    ranks = rankdata(s, axis=1)
    pos = t.sum(axis=1)
    neg = t.shape[1] - pos
    u = np.where(t, ranks, 0).sum(axis=1) - pos * (pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (pos * neg)
    auc[(pos == 0) | (neg == 0)] = np.nan
    return auc


def mass_inside(attribution: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per ECG, the share of absolute relevance that falls where ``truth`` is set; NaN when
    the map is all zero or the mask empty."""
    a, t = np.abs(_rows(attribution)), _rows(truth).astype(bool)
    total = a.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(t, a, 0).sum(axis=1) / total
    share[(total <= 0) | (t.sum(axis=1) == 0)] = np.nan
    return share
