"""Classification metrics without a scikit-learn dependency."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half).

    Returns None when only one class is present: the AUROC is undefined, and
    reporting 0.5 or 1.0 instead would be a silent guess.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_auroc(labels: np.ndarray, scores: np.ndarray) -> list[float | None]:
    """AUROC of every column of (N, C) multi-label targets and scores."""
    return [auroc(labels[:, c], scores[:, c]) for c in range(labels.shape[1])]
