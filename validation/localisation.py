"""Ground-truth localisation of attribution maps: how much of a map falls on the feature.

Every synthetic beat carries a mask of where each class's feature lies
(:mod:`ecgx.training.data.synth`); for the class a map explains, pass that class's bits,
``(masks >> c) & 1``. Per ECG, :func:`localisation_scores` gives

- ``mass``: the share of ``|a|`` inside the mask (Arras et al.'s relevance mass);
- ``pointing_game``: whether the largest ``|a|`` falls inside the mask (Zhang et al.);
- ``top_k_precision``: the share of the ``k`` largest ``|a|`` inside the mask, ``k`` the
  mask's size (Arras et al.'s relevance rank accuracy);
- ``auroc``: how well ``|a|`` ranks mask elements above the others.

Chance levels depend on the mask's area (a random map scores about the area on the first
three and 0.5 on AUROC), so compare a method with a baseline scored the same way: the
input itself, ``localisation_scores(signals, masks)``, is the ``|x|`` baseline, and a
method that does no better than it only highlights large voltages.

Ties are settled by their expected value under a uniformly random choice among the tied
elements, so the scores do not depend on element order: the pointing game scores the
share of the tied maxima inside the mask (1.0 or 0.0 when the maximum is unique), and
top-k precision counts the elements tied at the k-th largest value by the share of them
inside the mask, like the average ranks of the AUROC. Each score is NaN for an ECG whose
mask is empty, whose map is all zero or not finite, and AUROC also where the mask covers
the whole map.
"""

from __future__ import annotations

import numpy as np

from ecgx.core.errors import InvalidArgument
from ecgx.core.similarity import auroc_rows, mass_inside

SCORES = ("mass", "pointing_game", "top_k_precision", "auroc")


def _flat(attribution: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, t = np.asarray(attribution, dtype=np.float64), np.asarray(masks)
    if a.shape != t.shape or a.ndim < 2:
        raise InvalidArgument(
            f"attribution and masks must have one shape (B, ...), got {a.shape} and {t.shape}"
        )
    return np.abs(a.reshape(len(a), -1)), t.reshape(len(t), -1) != 0


def pointing_game(a: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Per row of ``|a|`` (B, N): the share of the maxima that lie ``inside`` (B, N) bool."""
    at_max = a == a.max(axis=1, keepdims=True)
    return (at_max & inside).sum(axis=1) / at_max.sum(axis=1)


def top_k_precision(a: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Per row of ``|a|`` (B, N): share of the ``k = inside.sum()`` largest inside; NaN if k is 0."""
    k = inside.sum(axis=1)
    ordered = -np.sort(-a, axis=1)
    kth = ordered[np.arange(len(a)), np.maximum(k, 1) - 1][:, None]
    above, tied = a > kth, a == kth
    n_above, n_tied = above.sum(axis=1), tied.sum(axis=1)
    in_above, in_tied = (above & inside).sum(axis=1), (tied & inside).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # (k - n_above) of the tied elements make the top k; on average in_tied / n_tied of them are inside.
        return (in_above + (k - n_above) * in_tied / n_tied) / k


def localisation_scores(attribution: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per ECG, mass, pointing game, top-k precision and AUROC of ``|attribution|`` against ``masks``.

    Both arrays are (B, ...) of one shape, e.g. (B, 12, 600); ``masks`` is nonzero where
    the feature lies. Returns float64 arrays of length B under the keys in ``SCORES``
    (module docstring for ties and NaN).
    """
    a, inside = _flat(attribution, masks)
    undefined = ~np.isfinite(a).all(axis=1) | (inside.sum(axis=1) == 0)
    a = np.where(np.isfinite(a), a, 0.0)
    undefined |= a.sum(axis=1) <= 0
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = {
            "mass": mass_inside(a, inside),
            "pointing_game": pointing_game(a, inside),
            "top_k_precision": top_k_precision(a, inside),
            "auroc": auroc_rows(a, inside),
        }
    for values in scores.values():
        values[undefined] = np.nan
    return scores
