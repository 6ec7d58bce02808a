"""Perturbation faithfulness: does removing what a method calls relevant change the prediction?

The ECG is cut into lead x window segments. A segment's relevance is the sum of
the attribution inside it. Segments are removed in equal parts, most relevant
first (MoRF) or least relevant first (LeRF), and the target-class probability is
tracked. A faithful method makes the MoRF curve fall fast and the LeRF curve stay
high; its score per ECG is area(LeRF) - area(MoRF), compared with the random
control's on the same ECGs.

Removed samples are replaced in one of several ways, because each has its own
bias (zeros and means create edges the model may react to; interpolation can
leak the removed shape). ``noisy_linear`` is ROAD's noisy linear imputation
(Rong et al. 2022): in one dimension the neighbour-average system ROAD solves is
exactly linear interpolation between the kept edges, plus Gaussian noise so that
the imputed stretch does not reveal where segments were removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine import AttributionEngine
from service.methods.perturbation import segment_mask


@dataclass
class PerturbationCurves:
    """Mean target probability after each removal step, and per-ECG areas, per strategy."""

    fractions: list[float]
    morf: dict[str, list[float]]  # strategy -> mean curve
    lerf: dict[str, list[float]]
    score: dict[str, np.ndarray]  # strategy -> per-ECG area(LeRF) - area(MoRF)


def segment_relevance(attribution: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, n_segments) summed attribution per segment, and the (leads, samples) segment ids."""
    ids = segment_mask(window, attribution.shape[1], attribution.shape[2])
    n_seg = int(ids.max()) + 1
    flat = attribution.reshape(len(attribution), -1).astype(np.float64)
    onehot = np.zeros((ids.size, n_seg))
    onehot[np.arange(ids.size), ids.ravel()] = 1.0
    return flat @ onehot, ids


def removal_order(relevance: np.ndarray, rng: np.random.Generator, most_relevant_first: bool) -> np.ndarray:
    """Segment indices per ECG in removal order; ties are broken at random, not by lead order."""
    tie_break = rng.random(relevance.shape)
    primary = -relevance if most_relevant_first else relevance
    return np.lexsort((tie_break, primary), axis=-1)


def replace(
    x: np.ndarray, removed: np.ndarray, strategy: str, rng: np.random.Generator, noise_mv: float
) -> np.ndarray:
    """``x`` with the ``removed`` elements (boolean, same shape) replaced by ``strategy``."""
    if strategy == "zero":
        fill = np.zeros_like(x)
    elif strategy == "lead_mean":
        fill = np.broadcast_to(x.mean(axis=2, keepdims=True), x.shape)
    elif strategy in ("linear", "noisy_linear"):
        fill = linear_fill(x, removed)
        if strategy == "noisy_linear":
            fill = fill + rng.normal(0.0, noise_mv, x.shape).astype(np.float32)
    else:
        raise ValueError(f"unknown replacement strategy {strategy!r}")
    return np.where(removed, fill, x).astype(np.float32)


def linear_fill(x: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Per lead, straight lines across each removed stretch between the nearest kept samples;
    the nearest kept value at the ends; the lead mean where the whole lead is removed."""
    n = x.shape[-1]
    pos = np.arange(n)
    kept = ~removed
    prev = np.maximum.accumulate(np.where(kept, pos, -1), axis=-1)
    nxt = np.minimum.accumulate(np.where(kept, pos, n)[..., ::-1], axis=-1)[..., ::-1]
    left = np.take_along_axis(x, np.clip(prev, 0, n - 1), axis=-1)
    right = np.take_along_axis(x, np.clip(nxt, 0, n - 1), axis=-1)
    span = np.maximum(nxt - prev, 1)
    w = (pos - prev) / span
    fill = left + w * (right - left)
    fill = np.where(prev < 0, right, fill)
    fill = np.where(nxt >= n, left, fill)
    whole = ~kept.any(axis=-1, keepdims=True)
    return np.where(whole, x.mean(axis=-1, keepdims=True), fill).astype(np.float32)


def target_probability(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    logits = engine.logits(x)[np.arange(len(x)), target]
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def perturbation_curves(
    engine: AttributionEngine,
    x: np.ndarray,
    target: np.ndarray,
    attribution: np.ndarray,
    *,
    strategies: list[str],
    window: int,
    steps: int,
    noise_mv: float,
    seed: int,
) -> PerturbationCurves:
    """MoRF and LeRF curves of one method's ``attribution`` for every replacement strategy."""
    relevance, ids = segment_relevance(attribution, window)
    n_seg = relevance.shape[1]
    counts = np.round(np.linspace(0, n_seg, steps + 1)).astype(int)
    fractions = (counts / n_seg).tolist()
    start = target_probability(engine, x, target)
    curves = PerturbationCurves(fractions, {}, {}, {})
    for strategy in strategies:
        areas = {}
        for order_name, most_first in (("morf", True), ("lerf", False)):
            # One generator per (strategy, order): the draws do not depend on which methods run.
            rng = np.random.default_rng([seed, int(most_first), strategies.index(strategy)])
            order = removal_order(relevance, rng, most_first)
            probs = [start]
            for k in counts[1:]:
                removed_seg = np.zeros((len(x), n_seg), bool)
                np.put_along_axis(removed_seg, order[:, :k], True, axis=1)
                removed = removed_seg[:, ids]
                probs.append(target_probability(engine, replace(x, removed, strategy, rng, noise_mv), target))
            p = np.stack(probs, axis=1)
            getattr(curves, order_name)[strategy] = p.mean(axis=0).tolist()
            areas[order_name] = np.trapezoid(p, fractions, axis=1)
        curves.score[strategy] = areas["lerf"] - areas["morf"]
    return curves
