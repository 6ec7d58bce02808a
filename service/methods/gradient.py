"""Methods built on the input gradient (plain or with modified ReLU rules)."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.engine import ecg_of_rows
from service.methods.base import (
    AttributionMethod,
    check_choice,
    check_finite,
    check_non_negative,
    check_positive_int,
    per_ecg_array,
    rng_for,
)

DEFAULT_SHAP_BASELINES = 8
DEFAULT_BASELINE_NOISE_MV = 0.05


class Saliency(AttributionMethod):
    """|d logit / d x| (Simonyan et al.); ``abs=False`` gives the signed gradient."""

    name, kind = "saliency", "gradient"

    def attribute(self, engine, x, target, *, abs: bool = True) -> np.ndarray:
        grad = engine.backward("gradient", x, target)
        return np.abs(grad) if abs else grad


class InputXGradient(AttributionMethod):
    """x * d logit / d x."""

    name, kind = "input_x_gradient", "gradient"

    def attribute(self, engine, x, target) -> np.ndarray:
        return x * engine.backward("gradient", x, target)


class GuidedBackprop(AttributionMethod):
    """Gradient where each ReLU passes only positive gradient, and only where it was active."""

    name, kind = "guided_backprop", "modified backward"

    def attribute(self, engine, x, target) -> np.ndarray:
        return engine.backward("guided_backprop", x, target)


class Deconvolution(AttributionMethod):
    """Deconvnet (Zeiler & Fergus): each ReLU passes the positive part of the gradient."""

    name, kind = "deconvolution", "modified backward"

    def attribute(self, engine, x, target) -> np.ndarray:
        return engine.backward("deconvolution", x, target)


def path_coefficients(n_steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, step weights) of the path integral, as Captum's approximation methods."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return 0.5 * (1 + nodes), 0.5 * weights
    # riemann_trapezoid
    if n_steps < 2:
        raise ValueError("riemann_trapezoid needs n_steps >= 2")
    alphas = np.linspace(0, 1, n_steps)
    weights = np.full(n_steps, 1.0 / (n_steps - 1))
    weights[[0, -1]] /= 2
    return alphas, weights


class IntegratedGradients(AttributionMethod):
    """(x - baseline) * integral of the gradient along the straight path (Sundararajan et al.).

    Same quadrature as Captum (Gauss-Legendre by default). The n_steps x B path
    points are built and run in batches of the engine's ``max_batch``.
    """

    name, kind = "integrated_gradients", "gradient"

    def attribute(
        self, engine, x, target, *, baseline: Any = None, n_steps: int = 50, method: str = "gausslegendre"
    ) -> np.ndarray:
        n_steps = check_positive_int("n_steps", n_steps)
        check_choice("method", method, ("gausslegendre", "riemann_trapezoid"))
        base = check_finite("baseline", per_ecg_array("baseline", baseline, x))
        alphas, weights = (c.astype(np.float32) for c in path_coefficients(n_steps, method))
        delta = x - base
        seeds = engine.seeds(target)
        batch = len(x)

        def make_rows(rows: np.ndarray):
            step, ecg = rows // batch, ecg_of_rows(rows, batch)  # a slice: views, no copies
            points = base[ecg] + alphas[step, None, None] * delta[ecg]
            return points, seeds[ecg], None

        def combine(rows: np.ndarray, grads: np.ndarray, _: None) -> np.ndarray:
            grads *= weights[rows // batch, None, None]
            return grads

        total = engine.accumulate("gradient", n_steps, x.shape, make_rows, combine)
        return delta * total


class SmoothGrad(AttributionMethod):
    """Mean saliency over noisy copies x + N(0, stdev^2) (Smilkov et al.), as Captum's
    NoiseTunnel(Saliency) with nt_type="smoothgrad". ``noise`` (n_samples, B, 12, 600)
    replaces the random draw for exact reproduction."""

    name, kind, stochastic = "smoothgrad", "gradient", True

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
        n = check_positive_int("n_samples", n_samples)
        stdev = check_non_negative("stdev", stdev)
        rng = rng_for(seed)
        if noise is not None:
            noise = check_finite("noise", np.asarray(noise, dtype=np.float32))
            if noise.shape != (n, *x.shape):
                raise ValueError(
                    f"noise must have shape (n_samples, *inputs.shape) = {(n, *x.shape)}, got {noise.shape}"
                )
        batch, seeds = len(x), engine.seeds(target)

        def make_rows(rows: np.ndarray):
            sample, ecg = rows // batch, rows % batch
            eps = noise[sample, ecg] if noise is not None else rng.normal(0, stdev, (len(rows), *x.shape[1:]))
            return (x[ecg] + eps).astype(np.float32), seeds[ecg], None

        def combine(rows: np.ndarray, grads: np.ndarray, _: None) -> np.ndarray:
            return np.abs(grads) if abs else grads

        total = engine.accumulate("gradient", n, x.shape, make_rows, combine)
        return total / n


def shap_baselines(baselines: Any, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The baseline distribution (K, 12, 600): given, or K flat lines with a little noise."""
    if baselines is None:
        shape = (DEFAULT_SHAP_BASELINES, *x.shape[1:])
        return rng.normal(0, DEFAULT_BASELINE_NOISE_MV, shape).astype(np.float32)
    arr = np.asarray(baselines, dtype=np.float32)
    if arr.shape == x.shape[1:]:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != x.shape[1:] or len(arr) == 0:
        raise ValueError(f"baselines must have shape (K, {x.shape[1]}, {x.shape[2]}), got {arr.shape}")
    return check_finite("baselines", arr)


class GradientShap(AttributionMethod):
    """Expected gradients (Lundberg & Lee), as Captum's GradientShap: for each of
    ``n_samples`` draws per ECG, a random baseline b, noise e and alpha ~ U(0, 1);
    attribution = mean of (x + e - b) * grad(b + alpha (x + e - b)).

    ``baseline_index`` (n_samples, B), ``alphas`` (n_samples, B) and ``noise``
    (n_samples, B, 12, 600) replace the random draws for exact reproduction.
    """

    name, kind, stochastic = "gradient_shap", "gradient", True

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
        n = check_positive_int("n_samples", n_samples)
        stdev = check_non_negative("stdev", stdev)
        rng = rng_for(seed)
        base = shap_baselines(baselines, x, rng)
        batch = len(x)
        idx = _draws("baseline_index", baseline_index, (n, batch), lambda s: rng.integers(0, len(base), s))
        if idx.min() < 0 or idx.max() >= len(base):
            raise ValueError(f"baseline_index must lie in 0..{len(base) - 1}")
        alpha = _draws("alphas", alphas, (n, batch), lambda s: rng.uniform(0, 1, s)).astype(np.float32)
        eps = (
            None
            if noise is None and stdev == 0
            else _draws("noise", noise, (n, *x.shape), lambda s: rng.normal(0, stdev, s).astype(np.float32))
        )
        seeds = engine.seeds(target)

        def make_rows(rows: np.ndarray):
            sample, ecg = rows // batch, rows % batch
            noisy = x[ecg] if eps is None else x[ecg] + eps[sample, ecg]
            b = base[idx[sample, ecg]]
            return b + alpha[sample, ecg][:, None, None] * (noisy - b), seeds[ecg], noisy - b

        def combine(rows: np.ndarray, grads: np.ndarray, diff: np.ndarray) -> np.ndarray:
            return diff * grads

        total = engine.accumulate("gradient", n, x.shape, make_rows, combine)
        return total / n


def _draws(name: str, given: Any, shape: tuple[int, ...], draw) -> np.ndarray:
    if given is None:
        return draw(shape)
    arr = np.asarray(given)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return check_finite(name, arr) if np.issubdtype(arr.dtype, np.floating) else arr
