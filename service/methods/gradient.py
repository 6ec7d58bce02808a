"""Methods built on the plain input gradient (guided backprop and deconvolution: modified.py)."""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Any

import numpy as np

from ecgx.core.errors import InvalidArgument, ResourceExhausted
from ecgx.service.limits import MAX_BASELINES, MAX_N_SAMPLES, MAX_N_STEPS, MAX_STDEV_MV
from ecgx.service.methods.base import (
    AttributionMethod,
    CheckContext,
    Param,
    Settings,
    broadcast_per_ecg,
    check_choice,
    check_non_negative,
    count,
    flag,
    numeric_array,
    per_ecg,
    rng_for,
    seed,
)
from ecgx.service.methods.registry import register

DEFAULT_SHAP_BASELINES = 8
DEFAULT_BASELINE_NOISE_MV = 0.05
PATH_METHODS = ("gausslegendre", "riemann_trapezoid")
_WHY_STEPS = "each step is one gradient pass per ECG; the cap bounds a request's time"
_WHY_SAMPLES = "each sample is one gradient pass per ECG; the cap bounds a request's time"


def check_stdev(value: Any) -> float:
    return check_non_negative("stdev", value, MAX_STDEV_MV, " mV (inputs are millivolts)")


def _stdev(name: str, value: Any, ctx: CheckContext) -> float:
    return check_stdev(value)


def _given(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """An explicit draw (noise, alphas) of exactly ``shape``: float32, finite."""
    arr = numeric_array(name, value)
    if arr.shape != shape:
        raise InvalidArgument(f"{name} must have shape {shape}, got {arr.shape}")
    return arr


def _noise(name: str, value: Any, ctx: CheckContext) -> np.ndarray | None:
    """Explicit noise (n_samples, B, 12, 600) replacing the random draw, or None."""
    n = ctx.checked["n_samples"]
    return None if value is None else _given(name, value, (n, *ctx.x.shape))


def _alphas(name: str, value: Any, ctx: CheckContext) -> np.ndarray | None:
    n = ctx.checked["n_samples"]
    return None if value is None else _given(name, value, (n, len(ctx.x)))


def _baseline_index(name: str, value: Any, ctx: CheckContext) -> np.ndarray | None:
    if value is None:
        return None
    shape = (ctx.checked["n_samples"], len(ctx.x))
    return _given_index(value, shape, n_baselines(ctx.checked["baselines"]))


def _given_index(value: Any, shape: tuple[int, ...], k: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != shape:
        raise InvalidArgument(f"baseline_index must have shape {shape}, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"baseline_index must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= k):
        raise InvalidArgument(f"baseline_index must lie in 0..{k - 1}")
    return arr


@register
class Saliency(AttributionMethod):
    """|d logit / d x| (Simonyan et al.); ``abs=False`` gives the signed gradient."""

    name, kind, graphs = "saliency", "gradient", ("gradient",)
    params = (Param("abs", True, flag),)

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        grad = engine.backward("gradient", x, target)
        return np.abs(grad) if s.abs else grad


@register
class InputXGradient(AttributionMethod):
    """x * d logit / d x."""

    name, kind, graphs = "input_x_gradient", "gradient", ("gradient",)

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        return x * engine.backward("gradient", x, target)


@functools.lru_cache(maxsize=16)
def path_coefficients(n_steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, step weights) of the path integral, as Captum's approximation methods.

    Cached (read-only arrays): Gauss-Legendre nodes cost O(n_steps^3) time to compute.
    """
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        alphas, weights = 0.5 * (1 + nodes), 0.5 * weights
    else:  # riemann_trapezoid
        if n_steps < 2:
            raise InvalidArgument("riemann_trapezoid needs n_steps >= 2")
        alphas = np.linspace(0, 1, n_steps)
        weights = np.full(n_steps, 1.0 / (n_steps - 1))
        weights[[0, -1]] /= 2
    alphas.flags.writeable = weights.flags.writeable = False
    return alphas, weights


def _path_method(name: str, value: Any, ctx: CheckContext) -> str:
    method = check_choice(name, value, PATH_METHODS)
    if method == "riemann_trapezoid" and ctx.checked["n_steps"] < 2:
        raise InvalidArgument("riemann_trapezoid needs n_steps >= 2")
    return method


@register
class IntegratedGradients(AttributionMethod):
    """(x - baseline) * integral of the gradient along the straight path (Sundararajan et al.).

    Same quadrature as Captum (Gauss-Legendre by default). The n_steps x B path
    points are built and run in batches of the engine's ``max_batch``.
    """

    name, kind, graphs = "integrated_gradients", "gradient", ("gradient",)
    params = (
        Param("baseline", None, per_ecg()),
        Param("n_steps", 50, count(MAX_N_STEPS, _WHY_STEPS)),
        Param("method", "gausslegendre", _path_method),
    )
    may_differ = MappingProxyType({"n_steps": "at_least"})  # more steps: a finer quadrature

    def cost(self, x, s: Settings) -> int:
        return s.n_steps

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        n_steps = s.n_steps
        base = broadcast_per_ecg(s.baseline, x)
        alphas, weights = (c.astype(np.float32) for c in path_coefficients(n_steps, s.method))
        delta = x - base
        seeds = engine.selectors(target)
        batch = len(x)

        def make_rows(rows: np.ndarray):
            step, ecg = rows // batch, engine.ecg_of_rows(rows, batch)  # a slice: views, no copies
            points = base[ecg] + alphas[step, None, None] * delta[ecg]
            return {"x": points, "seed": seeds[ecg]}, None

        def combine(rows: np.ndarray, grads: np.ndarray, _: None) -> np.ndarray:
            grads *= weights[rows // batch, None, None]
            return grads

        total = engine.accumulate("gradient", n_steps, x.shape, make_rows, combine)
        return delta * total


@register
class SmoothGrad(AttributionMethod):
    """Mean saliency over noisy copies x + N(0, stdev^2) (Smilkov et al.), as Captum's
    NoiseTunnel(Saliency) with nt_type="smoothgrad". ``noise`` (n_samples, B, 12, 600)
    replaces the random draw for exact reproduction. The noise is drawn chunk by chunk from
    ``default_rng(seed)`` in row order (row ``r``: sample ``r // B`` of ECG ``r % B``), the
    same numbers as one whole draw, which never exists."""

    name, kind, graphs, stochastic = "smoothgrad", "gradient", ("gradient",), True
    params = (
        Param("n_samples", 20, count(MAX_N_SAMPLES, _WHY_SAMPLES)),
        Param("stdev", 0.1, _stdev),
        Param("abs", True, flag),
        Param("seed", None, seed),
        Param("noise", None, _noise),
    )
    may_differ = MappingProxyType({"n_samples": "at_least"})  # more samples: a closer mean

    def cost(self, x, s: Settings) -> int:
        return s.n_samples

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        n, stdev, abs, noise = s.n_samples, s.stdev, s.abs, s.noise
        rng = rng_for(s.seed)
        batch, seeds = len(x), engine.selectors(target)

        def make_rows(rows: np.ndarray):
            # The noise of one chunk at a time, drawn in row order: independent of max_batch.
            sample, ecg = rows // batch, rows % batch
            eps = noise[sample, ecg] if noise is not None else rng.normal(0, stdev, (len(rows), *x.shape[1:]))
            return {"x": (x[ecg] + eps).astype(np.float32), "seed": seeds[ecg]}, None

        def combine(rows: np.ndarray, grads: np.ndarray, _: None) -> np.ndarray:
            return np.abs(grads) if abs else grads

        total = engine.accumulate("gradient", n, x.shape, make_rows, combine)
        return total / n


def check_baselines(baselines: Any, x: np.ndarray) -> np.ndarray | None:
    """Given baselines as (K, 12, 600) float32 (K <= MAX_BASELINES), or None for the default."""
    if baselines is None:
        return None
    arr = numeric_array("baselines", baselines)
    if arr.shape == x.shape[1:]:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != x.shape[1:] or len(arr) == 0:
        raise InvalidArgument(f"baselines must have shape (K, {x.shape[1]}, {x.shape[2]}), got {arr.shape}")
    if len(arr) > MAX_BASELINES:
        raise ResourceExhausted(
            f"baselines must number between 1 and {MAX_BASELINES}, got {len(arr)}: a baseline distribution "
            "that large adds nothing, and the cap bounds a request's time"
        )
    return arr


def baselines_param(name: str, value: Any, ctx: CheckContext) -> np.ndarray | None:
    return check_baselines(value, ctx.x)


def n_baselines(given: np.ndarray | None) -> int:
    """The size K of the baseline distribution, given checked ``baselines``."""
    return DEFAULT_SHAP_BASELINES if given is None else len(given)


def shap_baselines(given: np.ndarray | None, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The baseline distribution (K, 12, 600): the checked ``baselines`` given, or K flat lines
    with a little noise."""
    if given is None:
        shape = (DEFAULT_SHAP_BASELINES, *x.shape[1:])
        return rng.normal(0, DEFAULT_BASELINE_NOISE_MV, shape).astype(np.float32)
    return given


@register
class GradientShap(AttributionMethod):
    """Expected gradients (Lundberg & Lee), as Captum's GradientShap: for each of
    ``n_samples`` draws per ECG, a random baseline b, noise e and alpha ~ U(0, 1);
    attribution = mean of (x + e - b) * grad(b + alpha (x + e - b)).

    ``baseline_index`` (n_samples, B), ``alphas`` (n_samples, B) and ``noise``
    (n_samples, B, 12, 600) replace the random draws for exact reproduction.

    Memory stays bounded: the draws are made chunk by chunk (at most the engine's
    ``max_batch`` rows at a time), never as (n_samples, B, ...) arrays, and give the same
    numbers as drawing them whole: from ``default_rng(seed)``, first the default baselines,
    then three streams spawned from it (baseline index, alpha, noise), each drawn in row
    order, row ``r`` being sample ``r // B`` of ECG ``r % B``.
    """

    name, kind, graphs, stochastic = "gradient_shap", "gradient", ("gradient",), True
    params = (
        Param("baselines", None, baselines_param),
        Param("n_samples", 20, count(MAX_N_SAMPLES, _WHY_SAMPLES)),
        Param("stdev", 0.0, _stdev),
        Param("seed", None, seed),
        Param("baseline_index", None, _baseline_index),
        Param("alphas", None, _alphas),
        Param("noise", None, _noise),
    )
    may_differ = MappingProxyType({"n_samples": "at_least"})  # more samples: a closer expectation

    def cost(self, x, s: Settings) -> int:
        return s.n_samples

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        n, stdev = s.n_samples, s.stdev
        rng = rng_for(s.seed)
        base = shap_baselines(s.baselines, x, rng)
        k, batch = len(base), len(x)
        idx, alpha, eps = s.baseline_index, s.alphas, s.noise
        # Draws are made chunk by chunk, each from its own stream in row order, so that no
        # (n_samples, B, ...) array exists and the result does not depend on max_batch.
        idx_rng, alpha_rng, noise_rng = rng.spawn(3)
        seeds = engine.selectors(target)

        def make_rows(rows: np.ndarray):
            sample, ecg = rows // batch, rows % batch
            if idx is not None:
                i = idx[sample, ecg]
            else:
                i = np.minimum((idx_rng.random(len(rows)) * k).astype(np.int64), k - 1)
            a = alpha[sample, ecg] if alpha is not None else alpha_rng.random(len(rows)).astype(np.float32)
            if eps is not None:
                noisy = x[ecg] + eps[sample, ecg]
            elif stdev > 0:
                noisy = x[ecg] + noise_rng.normal(0, stdev, (len(rows), *x.shape[1:])).astype(np.float32)
            else:
                noisy = x[ecg]
            b = base[i]
            diff = noisy - b
            return {"x": b + a[:, None, None] * diff, "seed": seeds[ecg]}, diff

        def combine(rows: np.ndarray, grads: np.ndarray, diff: np.ndarray) -> np.ndarray:
            return diff * grads

        total = engine.accumulate("gradient", n, x.shape, make_rows, combine)
        return total / n
