"""Perturbation faithfulness: does removing what a method calls relevant change the prediction?

The ECG is cut into segments: a window of samples in one of the 8 independent
leads (I, II, V1-V6). The 12 leads span only 8 dimensions: III, aVR, aVL and
aVF are fixed combinations of I and II, so a segment removed from one limb lead
alone survives in the others and the model can still read it. Removal therefore
happens in the independent leads and the derived leads follow (their recorded
values plus the change the combination implies, so what is kept stays exactly
as recorded). A method's relevance for an independent-lead segment is the sum
of its attribution over every lead that segment feeds, weighted by how much
it feeds it.

Segments are removed in equal parts, most relevant first (MoRF) or least
relevant first (LeRF), and the target class's logit (its log-odds: the model's
outputs are independent sigmoids) is tracked; a logit keeps its range where a
probability saturates. A faithful method makes the MoRF curve fall fast and
the LeRF curve stay high; its score per ECG is area(LeRF) - area(MoRF), in
logit units, compared with the random control's on the same ECGs.

Removed samples are replaced in one of several ways, because each has its own
bias (zeros and means create edges the model may react to; interpolation can
leak the removed shape). ``noisy_linear`` is ROAD's noisy linear imputation
(Rong et al. 2022): in one dimension the neighbour-average system ROAD solves is
exactly linear interpolation between the kept edges, plus Gaussian noise at the
ECG's own high-frequency noise level (:mod:`ecgx.core.ecg_noise`), so the
imputed stretch does not reveal where segments were removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ecgx.core.ecg_noise import high_frequency_sd
from ecgx.core.errors import InvalidArgument
from ecgx.core.similarity import segment_sums
from ecgx.service.engine import AttributionEngine

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# Each derived limb lead as (coefficient of I, coefficient of II) (Einthoven and Goldberger).
_DERIVED = {"III": (-1.0, 1.0), "aVR": (-0.5, -0.5), "aVL": (1.0, -0.5), "aVF": (-0.5, 1.0)}


@dataclass(frozen=True)
class LeadBasis:
    """The independent leads of a lead set and how every lead follows from them.

    ``leads = matrix @ independent`` for each sample: ``matrix`` is (leads, independent)
    and ``independent`` the indices of the independent leads among ``names``.
    """

    names: tuple[str, ...]
    independent: tuple[int, ...]
    matrix: np.ndarray

    @property
    def derived(self) -> bool:
        return len(self.independent) < len(self.names)

    def describe(self) -> str:
        kept = ", ".join(self.names[i] for i in self.independent)
        if not self.derived:
            return f"every lead on its own ({kept}): the leads are not the standard 12"
        return f"the {len(self.independent)} independent leads ({kept}); the others are derived from I and II"


def lead_basis(names: Sequence[str]) -> LeadBasis:
    """The standard 12 leads reduce to I, II, V1-V6; any other lead set is taken as it is."""
    names = tuple(names)
    if names != STANDARD_LEADS:
        return LeadBasis(names, tuple(range(len(names))), np.eye(len(names)))
    independent = tuple(i for i, n in enumerate(names) if n not in _DERIVED)
    matrix = np.zeros((len(names), len(independent)))
    for row, name in enumerate(names):
        if name in _DERIVED:
            matrix[row, 0], matrix[row, 1] = _DERIVED[name]  # I and II are the first two
        else:
            matrix[row, independent.index(row)] = 1.0
    return LeadBasis(names, independent, matrix)


@dataclass
class PerturbationCurves:
    """Mean target logit after each removal step, and per-ECG areas, per strategy."""

    fractions: list[float]
    morf: dict[str, list[float]]  # strategy -> mean curve
    lerf: dict[str, list[float]]
    score: dict[str, np.ndarray]  # strategy -> per-ECG area(LeRF) - area(MoRF)


def segment_relevance(attribution: np.ndarray, window: int, basis: LeadBasis) -> np.ndarray:
    """(B, independent leads x windows) relevance of each removable segment: the attribution
    of every lead, weighted by how strongly the independent lead feeds it, summed."""
    per_independent = np.einsum("lk,bls->bks", np.abs(basis.matrix), np.asarray(attribution, np.float64))
    return segment_sums(per_independent, window)


def removal_order(relevance: np.ndarray, rng: np.random.Generator, most_relevant_first: bool) -> np.ndarray:
    """Segment indices per ECG in removal order; ties are broken at random, not by lead order."""
    tie_break = rng.random(relevance.shape)
    primary = -relevance if most_relevant_first else relevance
    return np.lexsort((tie_break, primary), axis=-1)


# The strategies whose fill starts from the straight lines of :func:`linear_fill`.
LINEAR_STRATEGIES = ("linear", "noisy_linear")


def replace(
    x: np.ndarray,
    removed: np.ndarray,
    strategy: str,
    rng: np.random.Generator,
    noise_sd: np.ndarray,
    linear: np.ndarray | None = None,
) -> np.ndarray:
    """``x`` with the ``removed`` elements (boolean, same shape) replaced by ``strategy``;
    ``noise_sd`` (broadcast to ``x``) is the noise level of ``noisy_linear``; ``linear`` is
    ``linear_fill(x, removed)`` when the caller has it already."""
    if strategy == "zero":
        fill = np.zeros_like(x)
    elif strategy == "lead_mean":
        fill = np.broadcast_to(x.mean(axis=2, keepdims=True), x.shape)
    elif strategy in LINEAR_STRATEGIES:
        fill = linear_fill(x, removed) if linear is None else linear
        if strategy == "noisy_linear":
            fill = fill + rng.standard_normal(x.shape) * noise_sd
    else:
        raise InvalidArgument(f"unknown replacement strategy {strategy!r}")
    return np.where(removed, fill, x).astype(np.float32)


def remove_segments(
    x: np.ndarray,
    removed: np.ndarray,
    basis: LeadBasis,
    strategy: str,
    rng: np.random.Generator,
    noise_sd: np.ndarray,
    linear: np.ndarray | None = None,
) -> np.ndarray:
    """``x`` (B, leads, samples) with the ``removed`` samples of the independent leads (B,
    independent, samples) replaced, and every derived lead changed by what follows from them.
    ``linear``: :func:`independent_linear_fill` of ``x`` and ``removed`` when known."""
    kept = x[:, basis.independent].astype(np.float64)
    filled = replace(kept, removed, strategy, rng, noise_sd, linear).astype(np.float64)
    change = np.einsum("lk,bks->bls", basis.matrix, filled - kept)
    return (x + change).astype(np.float32)


def independent_linear_fill(x: np.ndarray, removed: np.ndarray, basis: LeadBasis) -> np.ndarray:
    """:func:`linear_fill` of ``x``'s independent leads, as :func:`remove_segments` computes it."""
    return linear_fill(x[:, basis.independent].astype(np.float64), removed)


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


def target_logit(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The target class's logit per ECG (float64)."""
    return engine.logits(x)[np.arange(len(x)), target].astype(np.float64)


def perturbation_curves(
    engine: AttributionEngine,
    x: np.ndarray,
    target: np.ndarray,
    attribution: np.ndarray,
    *,
    strategies: list[str],
    window: int,
    steps: int,
    noise_scale: float,
    seed: int,
    basis: LeadBasis,
    start: np.ndarray | None = None,
) -> PerturbationCurves:
    """MoRF and LeRF curves of one method's ``attribution`` for every replacement strategy,
    removing segments of ``basis``'s independent leads. ``start``: the clean target logits
    (:func:`target_logit` of ``engine`` on ``x``) when the caller has them already."""
    return perturbation_curves_on(
        [engine],
        x,
        target,
        attribution,
        strategies=strategies,
        window=window,
        steps=steps,
        noise_scale=noise_scale,
        seed=seed,
        basis=basis,
        starts=None if start is None else [start],
    )[0]


def perturbation_curves_on(
    engines: Sequence[AttributionEngine],
    x: np.ndarray,
    target: np.ndarray,
    attribution: np.ndarray,
    *,
    strategies: list[str],
    window: int,
    steps: int,
    noise_scale: float,
    seed: int,
    basis: LeadBasis,
    starts: Sequence[np.ndarray | None] | None = None,
    reuse: bool = False,
) -> list[PerturbationCurves]:
    """:func:`perturbation_curves` of one ``attribution`` on each of ``engines`` (one per model):
    the perturbed copies depend only on the map and the ECGs, so they are built once and every
    model scores them; each result equals that model's own :func:`perturbation_curves`.
    ``starts[i]``: engine ``i``'s clean target logits on ``x`` when known (None: computed).
    ``reuse``: where two strategies of :data:`LINEAR_STRATEGIES` remove segments in the same
    order (a map without ties), the second takes the first's straight lines instead of drawing
    them again; the curves are the same either way."""
    relevance = segment_relevance(attribution, window, basis)
    n_ind, n_samples = len(basis.independent), x.shape[2]
    n_seg = relevance.shape[1]
    window_starts = np.arange(0, n_samples, window)
    window_of = np.searchsorted(window_starts, np.arange(n_samples), side="right") - 1
    counts = np.round(np.linspace(0, n_seg, steps + 1)).astype(int)
    fractions = (counts / n_seg).tolist()
    noise_sd = high_frequency_sd(x[:, basis.independent]) * noise_scale
    starts = list(starts) if starts is not None else [None] * len(engines)
    start = [target_logit(e, x, target) if s is None else s for e, s in zip(engines, starts, strict=True)]
    all_curves = [PerturbationCurves(fractions, {}, {}, {}) for _ in engines]
    tiled = np.tile(target, len(counts) - 1)
    build = _StepBuilder(x, basis, noise_sd, window) if reuse else None
    # order name -> (removal order, the straight lines of each step) of a linear strategy
    lines: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    for strategy in strategies:
        areas: list[dict[str, np.ndarray]] = [{} for _ in engines]
        for order_name, most_first in (("morf", True), ("lerf", False)):
            # One generator per (strategy, order): the draws do not depend on which methods run.
            rng = np.random.default_rng([seed, int(most_first), strategies.index(strategy)])
            order = removal_order(relevance, rng, most_first)
            known = lines.get(order_name) if reuse and strategy in LINEAR_STRATEGIES else None
            if known is not None and not np.array_equal(known[0], order):
                known = None
            # Every step in one batch: one model call per curve instead of one per step.
            if build is None:
                batch = np.concatenate(
                    [
                        remove_segments(x, removed, basis, strategy, rng, noise_sd)
                        for removed in _removed_steps(order, counts, n_ind, window_of)
                    ]
                )
            else:
                batch, drawn = build.steps(order, counts, strategy, rng, None if known is None else known[1])
                if drawn and known is None:
                    lines[order_name] = (order, drawn)
            for i, engine in enumerate(engines):
                after = target_logit(engine, batch, tiled)
                z = np.concatenate([start[i][:, None], after.reshape(len(counts) - 1, len(x)).T], axis=1)
                getattr(all_curves[i], order_name)[strategy] = z.mean(axis=0).tolist()
                areas[i][order_name] = np.trapezoid(z, fractions, axis=1)
        for curves, area in zip(all_curves, areas, strict=True):
            curves.score[strategy] = area["lerf"] - area["morf"]
    return all_curves


def _removed_steps(order: np.ndarray, counts: np.ndarray, n_ind: int, window_of: np.ndarray):
    """The removed samples (B, independent leads, samples) of each step: the first ``counts[j]``
    segments of ``order``."""
    for k in counts[1:]:
        removed_seg = np.zeros(order.shape, bool)
        np.put_along_axis(removed_seg, order[:, :k], True, axis=1)
        yield removed_seg.reshape(len(order), n_ind, -1)[:, :, window_of]


class _StepBuilder:
    """The perturbed ECGs of every removal step, equal to :func:`remove_segments` of each step
    with less work: the ECGs' float64 independent leads, lead means and window geometry are
    computed once, and the straight lines find their nearest kept samples per window (segments
    are removed whole) instead of scanning every sample twice."""

    def __init__(self, x: np.ndarray, basis: LeadBasis, noise_sd: np.ndarray, window: int) -> None:
        self.x, self.basis, self.noise_sd = x, basis, noise_sd
        kept = x[:, basis.independent].astype(np.float64)
        self.kept = np.ascontiguousarray(kept)  # the same numbers, faster to walk
        n = x.shape[2]
        self.starts = np.arange(0, n, window)
        self.ends = np.append(self.starts[1:], n)
        self.window_of = np.searchsorted(self.starts, np.arange(n), side="right") - 1
        # Every window's sample positions, the last window padded to a whole one.
        self.grid = self.starts[:, None] + np.arange(window)
        # As linear_fill and replace compute them, on the same array: the same numbers.
        self.lead_mean = kept.mean(axis=2, keepdims=True)

    def steps(
        self,
        order: np.ndarray,
        counts: np.ndarray,
        strategy: str,
        rng: np.random.Generator,
        lines: list[np.ndarray] | None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Every step's perturbed ECGs in one batch (step after step) and, for a linear strategy,
        each step's straight lines (``lines``: those of an earlier strategy removing the same
        segments, taken instead of drawn)."""
        if strategy not in (*LINEAR_STRATEGIES, "zero", "lead_mean"):
            raise InvalidArgument(f"unknown replacement strategy {strategy!r}")
        b, n_ind = order.shape[0], len(self.basis.independent)
        batch = np.empty((b * (len(counts) - 1), *self.x.shape[1:]), np.float32)
        # Buffers used again at every step: fresh arrays this large cost page faults each time.
        filled, noise = np.empty(self.kept.shape), np.empty(self.kept.shape)
        change, single = np.empty(self.x.shape, np.float64), np.empty(self.kept.shape, np.float32)
        drawn = []
        for step, k in enumerate(counts[1:]):
            removed_seg = np.zeros(order.shape, bool)
            np.put_along_axis(removed_seg, order[:, :k], True, axis=1)
            removed_win = removed_seg.reshape(b, n_ind, -1)
            fill: np.ndarray | float = 0.0 if strategy == "zero" else self.lead_mean
            if strategy in LINEAR_STRATEGIES:
                fill = self.linear(removed_win) if lines is None else lines[step]
                drawn.append(fill)
                if strategy == "noisy_linear":
                    rng.standard_normal(out=noise)
                    fill = np.add(fill, np.multiply(noise, self.noise_sd, out=noise), out=noise)
            # remove_segments' arithmetic, each operation the same, into the buffers.
            np.copyto(filled, self.kept)
            np.copyto(filled, fill, where=removed_win[:, :, self.window_of])
            np.copyto(single, filled, casting="same_kind")  # replace's float32
            np.copyto(filled, single)
            np.subtract(filled, self.kept, out=filled)
            np.einsum("lk,bks->bls", self.basis.matrix, filled, out=change)
            batch[step * b : (step + 1) * b] = np.add(self.x, change, out=change)
        return batch, drawn

    def linear(self, removed_win: np.ndarray) -> np.ndarray:
        """:func:`linear_fill` of the independent leads where ``removed_win`` (B, leads, windows)
        is removed, the same numbers there (elsewhere the fill is never used). Each removed
        window's nearest kept samples, their values and the lead mean are found per window;
        only the line itself is drawn per sample, on a grid of whole windows."""
        n_win, n = removed_win.shape[-1], self.kept.shape[-1]
        kept_win = ~removed_win
        index = np.arange(n_win)
        prev_win = np.maximum.accumulate(np.where(kept_win, index, -1), axis=-1)
        next_win = np.minimum.accumulate(np.where(kept_win, index, n_win)[..., ::-1], axis=-1)[..., ::-1]
        # The nearest kept sample before a removed window is the last of the kept window before it.
        prev = np.where(prev_win >= 0, self.ends[np.clip(prev_win, 0, n_win - 1)] - 1, -1)
        nxt = np.where(next_win < n_win, self.starts[np.clip(next_win, 0, n_win - 1)], n)
        left = np.take_along_axis(self.kept, np.clip(prev, 0, n - 1), axis=-1)[..., None]
        right = np.take_along_axis(self.kept, np.clip(nxt, 0, n - 1), axis=-1)[..., None]
        span = np.maximum(nxt - prev, 1)[..., None]
        w = (self.grid - prev[..., None]) / span
        fill = left + w * (right - left)
        # linear_fill's edge cases, in its order: before the first kept sample the next kept
        # value, after the last the previous one, a lead removed whole its mean.
        whole = ~kept_win.any(axis=-1, keepdims=True)
        edge = np.where(nxt >= n, left[..., 0], right[..., 0])
        edge = np.where(whole, self.lead_mean, edge)[..., None]
        fill = np.where(((prev < 0) | (nxt >= n) | whole)[..., None], edge, fill)
        return fill.reshape(*fill.shape[:-2], -1)[..., :n].astype(np.float32)
