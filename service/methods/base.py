"""The shape every attribution method shares (as in Captum: ``attribute(inputs, target, ...)``)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ecgx.core.errors import InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    from ecgx.service.engine import AttributionEngine


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

    def check(self, x: np.ndarray, **params: Any) -> int:
        """Check every parameter value for checked inputs ``x`` (the engine passes all of them,
        defaults filled in) and return the model passes (forward or backward rows) per ECG.

        Runs before any model pass, so a bad value or a request over a cost cap
        (:mod:`ecgx.service.limits`) fails at once, naming the parameter: InvalidArgument for a
        bad value, ResourceExhausted over a cost cap (:mod:`ecgx.core.errors`).
        """
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
            raise InvalidArgument(
                f"method {cls.name!r} has no parameter(s) {unknown}; its parameters: {allowed}"
            )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgument(f"{name} must be a positive integer, got {_show(value)}")
    return int(value)


def check_count(name: str, value: Any, limit: int, why: str, minimum: int = 1) -> int:
    """A whole number of passes, samples or steps, ``minimum``..``limit`` (a cost cap, see
    :mod:`ecgx.service.limits`); ``why`` says what the cap bounds."""
    n = check_positive_int(name, value)
    if n > limit:  # over a cost cap: RESOURCE_EXHAUSTED over gRPC
        raise ResourceExhausted(f"{name} must be between {minimum} and {limit}, got {n}: {why}")
    if n < minimum:
        raise InvalidArgument(f"{name} must be between {minimum} and {limit}, got {n}: {why}")
    return n


def check_non_negative(name: str, value: Any, maximum: float | None = None, unit: str = "") -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidArgument(f"{name} must be a number, got {_show(value)}")
    v = float(value)
    if not np.isfinite(v) or v < 0:
        raise InvalidArgument(f"{name} must be a finite number >= 0, got {_show(value)}")
    if maximum is not None and v > maximum:
        raise InvalidArgument(f"{name} must be at most {maximum}{unit}, got {_show(value)}")
    return v


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgument(f"{name} must be true or false, got {_show(value)}")
    return bool(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgument(f"{name} must be one of {list(choices)}, got {_show(value)}")
    return value


def rng_for(seed: int | None) -> np.random.Generator:
    if seed is not None and (
        isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0
    ):
        raise InvalidArgument(f"seed must be a non-negative integer or None, got {_show(seed)}")
    return np.random.default_rng(seed)


def numeric_array(name: str, value: Any, dtype: type = np.float32) -> np.ndarray:
    """``value`` as a real-valued array of ``dtype`` (no copy when it already is one), or a
    ValueError naming ``name``; NaN and infinities are refused."""
    try:
        arr = np.asarray(value) if not isinstance(value, np.ndarray) else value
    except (ValueError, TypeError, OverflowError):  # ragged lists, numbers too big for any dtype
        raise InvalidArgument(
            f"{name} must be a number or a rectangular array of numbers (every row of the same length), "
            f"got {_show(value)}"
        ) from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InvalidArgument(f"{name} must hold real numbers, got {_show(value)}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise InvalidArgument(f"{name} must hold real numbers, got complex values")
    return check_finite(name, arr.astype(dtype, copy=False))


def check_per_ecg(name: str, value: Any, x: np.ndarray, default: float = 0.0) -> np.ndarray:
    """A validated baseline-like input, not yet broadcast: None (``default``), a number, one
    (12, 600) ECG for all, or one per ECG (B, 12, 600); float32, finite."""
    arr = numeric_array(name, default if value is None else value)
    if arr.ndim == 0 or arr.shape in (x.shape[1:], x.shape):
        return arr
    raise InvalidArgument(
        f"{name} must be a number, one ECG {x.shape[1:]} or one per ECG {x.shape}, got shape {arr.shape}"
    )


def per_ecg_array(name: str, value: Any, x: np.ndarray, default: float = 0.0) -> np.ndarray:
    """A baseline-like input (see :func:`check_per_ecg`) as (B, 12, 600) float32."""
    arr = check_per_ecg(name, value, x, default)
    if arr.shape == x.shape:
        return arr
    return np.ascontiguousarray(np.broadcast_to(arr, x.shape))


def check_finite(name: str, arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{name} holds NaN or infinite values")
    return arr
