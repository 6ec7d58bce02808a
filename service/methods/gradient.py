"""Methods built on the input gradient (plain or with modified ReLU rules)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ecgx.core.errors import InvalidArgument, ResourceExhausted
from ecgx.service.limits import MAX_BASELINES, MAX_N_SAMPLES, MAX_N_STEPS, MAX_STDEV_MV
from ecgx.service.methods.base import (
    AttributionMethod,
    check_bool,
    check_choice,
    check_count,
    check_non_negative,
    check_per_ecg,
    numeric_array,
    per_ecg_array,
    rng_for,
)

DEFAULT_SHAP_BASELINES = 8
DEFAULT_BASELINE_NOISE_MV = 0.05
PATH_METHODS = ("gausslegendre", "riemann_trapezoid")
_WHY_STEPS = "each step is one gradient pass per ECG; the cap bounds a request's time"
_WHY_SAMPLES = "each sample is one gradient pass per ECG; the cap bounds a request's time"


def check_stdev(value: Any) -> float:
    return check_non_negative("stdev", value, MAX_STDEV_MV, " mV (inputs are millivolts)")


class _OnePass(AttributionMethod):
    """A method with no settings that runs one backward pass per ECG."""

    def check(self, x, **params: Any) -> int:
        return 1


class Saliency(AttributionMethod):
    """|d logit / d x| (Simonyan et al.); ``abs=False`` gives the signed gradient."""

    name, kind = "saliency", "gradient"

    def check(self, x, *, abs: bool = True) -> int:
        check_bool("abs", abs)
        return 1

    def attribute(self, engine, x, target, *, abs: bool = True) -> np.ndarray:
        grad = engine.backward("gradient", x, target)
        return np.abs(grad) if abs else grad


class InputXGradient(_OnePass):
    """x * d logit / d x."""

    name, kind = "input_x_gradient", "gradient"

    def attribute(self, engine, x, target) -> np.ndarray:
        return x * engine.backward("gradient", x, target)


class GuidedBackprop(_OnePass):
    """Gradient where each ReLU passes only positive gradient, and only where it was active."""

    name, kind = "guided_backprop", "modified backward"

    def attribute(self, engine, x, target) -> np.ndarray:
        return engine.backward("guided_backprop", x, target)


class Deconvolution(_OnePass):
    """Deconvnet (Zeiler & Fergus): each ReLU passes the positive part of the gradient."""

    name, kind = "deconvolution", "modified backward"

    def attribute(self, engine, x, target) -> np.ndarray:
        return engine.backward("deconvolution", x, target)


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


class IntegratedGradients(AttributionMethod):
    """(x - baseline) * integral of the gradient along the straight path (Sundararajan et al.).

    Same quadrature as Captum (Gauss-Legendre by default). The n_steps x B path
    points are built and run in batches of the engine's ``max_batch``.
    """

    name, kind = "integrated_gradients", "gradient"

    def check(self, x, *, baseline: Any = None, n_steps: int = 50, method: str = "gausslegendre") -> int:
        n = check_count("n_steps", n_steps, MAX_N_STEPS, _WHY_STEPS)
        check_choice("method", method, PATH_METHODS)
        if method == "riemann_trapezoid" and n < 2:
            raise InvalidArgument("riemann_trapezoid needs n_steps >= 2")
        check_per_ecg("baseline", baseline, x)
        return n

    def attribute(
        self, engine, x, target, *, baseline: Any = None, n_steps: int = 50, method: str = "gausslegendre"
    ) -> np.ndarray:
        n_steps = self.check(x, baseline=baseline, n_steps=n_steps, method=method)
        base = per_ecg_array("baseline", baseline, x)
        alphas, weights = (c.astype(np.float32) for c in path_coefficients(n_steps, method))
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


class SmoothGrad(AttributionMethod):
    """Mean saliency over noisy copies x + N(0, stdev^2) (Smilkov et al.), as Captum's
    NoiseTunnel(Saliency) with nt_type="smoothgrad". ``noise`` (n_samples, B, 12, 600)
    replaces the random draw for exact reproduction. The noise is drawn chunk by chunk from
    ``default_rng(seed)`` in row order (row ``r``: sample ``r // B`` of ECG ``r % B``), the
    same numbers as one whole draw, which never exists."""

    name, kind, stochastic = "smoothgrad", "gradient", True

    def check(
        self,
        x,
        *,
        n_samples: int = 20,
        stdev: float = 0.1,
        abs: bool = True,
        seed: int | None = None,
        noise: Any = None,
    ) -> int:
        n = check_count("n_samples", n_samples, MAX_N_SAMPLES, _WHY_SAMPLES)
        check_stdev(stdev)
        check_bool("abs", abs)
        rng_for(seed)
        if noise is not None:
            _given("noise", noise, (n, *x.shape))
        return n

    def attribute(
        self,
        engine,
        x,
        target,
        *,
        n_samples: int = 20,
        stdev: float = 0.1,
        abs: bool = True,
        seed: int | None = None,
        noise: Any = None,
    ) -> np.ndarray:
        n = self.check(x, n_samples=n_samples, stdev=stdev, abs=abs, seed=seed, noise=noise)
        stdev = float(stdev)
        rng = rng_for(seed)
        if noise is not None:
            noise = _given("noise", noise, (n, *x.shape))
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


def n_baselines(baselines: Any, x: np.ndarray) -> int:
    given = check_baselines(baselines, x)
    return DEFAULT_SHAP_BASELINES if given is None else len(given)


def shap_baselines(baselines: Any, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The baseline distribution (K, 12, 600): given, or K flat lines with a little noise."""
    given = check_baselines(baselines, x)
    if given is None:
        shape = (DEFAULT_SHAP_BASELINES, *x.shape[1:])
        return rng.normal(0, DEFAULT_BASELINE_NOISE_MV, shape).astype(np.float32)
    return given


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

    name, kind, stochastic = "gradient_shap", "gradient", True

    def check(
        self,
        x,
        *,
        baselines: Any = None,
        n_samples: int = 20,
        stdev: float = 0.0,
        seed: int | None = None,
        baseline_index: Any = None,
        alphas: Any = None,
        noise: Any = None,
    ) -> int:
        n = check_count("n_samples", n_samples, MAX_N_SAMPLES, _WHY_SAMPLES)
        check_stdev(stdev)
        rng_for(seed)
        k = n_baselines(baselines, x)
        if baseline_index is not None:
            _given_index(baseline_index, (n, len(x)), k)
        if alphas is not None:
            _given("alphas", alphas, (n, len(x)))
        if noise is not None:
            _given("noise", noise, (n, *x.shape))
        return n

    def attribute(
        self,
        engine,
        x,
        target,
        *,
        baselines: Any = None,
        n_samples: int = 20,
        stdev: float = 0.0,
        seed: int | None = None,
        baseline_index: Any = None,
        alphas: Any = None,
        noise: Any = None,
    ) -> np.ndarray:
        n = self.check(
            x,
            baselines=baselines,
            n_samples=n_samples,
            stdev=stdev,
            seed=seed,
            baseline_index=baseline_index,
            alphas=alphas,
            noise=noise,
        )
        stdev = float(stdev)
        rng = rng_for(seed)
        base = shap_baselines(baselines, x, rng)
        k, batch = len(base), len(x)
        idx = None if baseline_index is None else _given_index(baseline_index, (n, batch), k)
        alpha = None if alphas is None else _given("alphas", alphas, (n, batch))
        eps = None if noise is None else _given("noise", noise, (n, *x.shape))
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


def _given(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """An explicit draw (noise, alphas) of exactly ``shape``: float32, finite."""
    arr = numeric_array(name, value)
    if arr.shape != shape:
        raise InvalidArgument(f"{name} must have shape {shape}, got {arr.shape}")
    return arr


def _given_index(value: Any, shape: tuple[int, ...], k: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != shape:
        raise InvalidArgument(f"baseline_index must have shape {shape}, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"baseline_index must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= k):
        raise InvalidArgument(f"baseline_index must lie in 0..{k - 1}")
    return arr
