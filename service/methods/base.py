"""The shape every attribution method shares (as in Captum: ``attribute(inputs, target, ...)``)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from service.engine import AttributionEngine


class AttributionMethod:
    """One attribution method. Stateless: one instance serves every request and thread.

    Subclasses implement :meth:`attribute` with keyword-only settings that have
    defaults; those keywords are the method's public parameters.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # gradient | modified backward | layer | perturbation | control
    stochastic: ClassVar[bool] = False  # takes ``seed``; same seed, same attribution

    def attribute(
        self, engine: AttributionEngine, x: np.ndarray, target: np.ndarray, **params: Any
    ) -> np.ndarray:
        """Attributions (B, 12, 600) for checked inputs ``x`` and per-ECG class indices ``target``."""
        raise NotImplementedError

    @classmethod
    def parameters(cls) -> dict[str, Any]:
        """Public settings and their defaults."""
        sig = inspect.signature(cls.attribute)
        return {
            p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        unknown = sorted(set(params) - set(cls.parameters()))
        if unknown:
            allowed = ", ".join(sorted(cls.parameters())) or "none"
            raise ValueError(f"method {cls.name!r} has no parameter(s) {unknown}; its parameters: {allowed}")


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_non_negative(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def rng_for(seed: int | None) -> np.random.Generator:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return np.random.default_rng(seed)


def per_ecg_array(name: str, value: Any, x: np.ndarray, default: float = 0.0) -> np.ndarray:
    """A baseline-like input: None (``default`` everywhere), a scalar, one (12, 600) ECG
    for all, or one per ECG (B, 12, 600); returned as (B, 12, 600) float32."""
    if value is None:
        value = default
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 0 or arr.shape == x.shape[1:]:
        return np.ascontiguousarray(np.broadcast_to(arr, x.shape))
    if arr.shape == x.shape:
        return arr
    raise ValueError(
        f"{name} must be a number, one ECG {x.shape[1:]} or one per ECG {x.shape}, got {arr.shape}"
    )


def check_finite(name: str, arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr
