"""The shape every attribution method shares (as in Captum: ``attribute(inputs, target, ...)``).

A method is one class: its name, kind and graphs are class attributes, its settings one tuple of
:class:`Param` (name, default, check), and :func:`~ecgx.service.methods.registry.register` lists it.
Validation and the call both come from that one declaration: :meth:`AttributionMethod.settings`
fills in the defaults and checks each value, and ``attribute`` receives the checked values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ecgx.core.errors import InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    from ecgx.service.engine import AttributionEngine

# A method's checked settings, read as ``s.n_steps``: one per call, built by ``settings``.
Settings = SimpleNamespace
# Directions a gated setting may differ in when served (a method's ``may_differ``): "at_least"
# (more is as safe: more steps, samples), "at_most", or "any".
DIRECTIONS = ("any", "at_least", "at_most")


@dataclass(frozen=True)
class CheckContext:
    """What a setting's check may read besides its own value."""

    method: str
    x: np.ndarray  # the checked inputs (B, 12, 600)
    given: Mapping[str, Any]  # every setting as asked for, defaults filled in
    checked: dict[str, Any]  # the settings checked so far, in declaration order


# (setting name, value asked for, ctx) -> the value ``attribute`` receives; raises
# InvalidArgument for a bad value, ResourceExhausted over a cost cap, naming the setting.
Check = Callable[[str, Any, CheckContext], Any]


@dataclass(frozen=True)
class Param:
    """One setting of a method, declared once: its name, its default and its check."""

    name: str
    default: Any
    check: Check


class AttributionMethod:
    """One attribution method. Stateless: one instance serves every request and thread.

    A subclass sets ``name``, ``kind`` and ``graphs``, declares its settings in ``params``,
    implements :meth:`attribute` (and :meth:`cost` unless it runs one pass per ECG), and is
    listed by ``@register``.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # gradient | modified backward | layer | perturbation | control
    # The package graphs it runs with its default settings (a package may lack one: the method is
    # then unavailable for it, and the engine and the gate refuse it, saying why).
    graphs: ClassVar[tuple[str, ...]]
    # Graphs it runs only with some settings (lrp's composites): see :meth:`required_graphs`.
    setting_graphs: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[tuple[Param, ...]] = ()
    # Setting -> how it may differ, when served, from what the gate checked (DIRECTIONS): the
    # default gate policy's ``serving.may_differ`` entry for this method.
    may_differ: ClassVar[Mapping[str, str]] = MappingProxyType({})
    stochastic: ClassVar[bool] = False  # takes ``seed``; same seed, same attribution

    def attribute(
        self, engine: AttributionEngine, x: np.ndarray, target: np.ndarray, s: Settings
    ) -> np.ndarray:
        """Attributions (B, 12, 600) for checked inputs ``x``, per-ECG class indices ``target`` and
        checked settings ``s`` (from :meth:`settings`)."""
        raise NotImplementedError

    def cost(self, x: np.ndarray, s: Settings) -> int:
        """Model passes (forward or backward rows) per ECG with checked settings ``s``; may refuse
        (ResourceExhausted) a combination over a cost cap (:mod:`ecgx.service.limits`)."""
        return 1

    def required_graphs(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The package graphs a call with ``params`` (as asked for, not yet checked) runs; a
        method with ``setting_graphs`` says here which one a setting selects."""
        return self.graphs

    @classmethod
    def parameters(cls) -> dict[str, Any]:
        """Public settings and their defaults, in declaration order."""
        return {p.name: p.default for p in cls.params}

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        """Refuse (InvalidArgument) a setting the method does not declare."""
        unknown = sorted(set(params) - set(cls.parameters()))
        if unknown:
            allowed = ", ".join(sorted(cls.parameters())) or "none"
            raise InvalidArgument(
                f"method {cls.name!r} has no parameter(s) {unknown}; its parameters: {allowed}"
            )

    def settings(self, x: np.ndarray, params: Mapping[str, Any]) -> Settings:
        """Every setting checked for inputs ``x``: unknown names refused, defaults filled in, each
        value checked by its declared check in declaration order (a check may read the settings
        declared before it). Runs before any model pass, so a bad value fails at once."""
        self.check_params(params)
        ctx = CheckContext(self.name, x, {**self.parameters(), **params}, {})
        for p in self.params:
            ctx.checked[p.name] = p.check(p.name, ctx.given[p.name], ctx)
        return Settings(**ctx.checked)

    def check(self, x: np.ndarray, **params: Any) -> int:
        """Check ``params`` (any subset of the settings) for inputs ``x`` and return the model
        passes per ECG: InvalidArgument for a bad value, ResourceExhausted over a cost cap."""
        return self.cost(x, self.settings(x, params))


# ---------------------------------------------------------------------- checks of one setting


def flag(name: str, value: Any, ctx: CheckContext) -> bool:
    """A setting that is true or false."""
    return check_bool(name, value)


def seed(name: str, value: Any, ctx: CheckContext) -> int | None:
    """A random seed: a non-negative integer, or None for fresh entropy."""
    rng_for(value)
    return value


def one_of(choices: tuple[str, ...]) -> Check:
    """A setting that is one of ``choices``."""
    return lambda name, value, ctx: check_choice(name, value, choices)


def count(limit: int, why: str, minimum: int = 1) -> Check:
    """A whole number ``minimum``..``limit`` (a cost cap: ``why`` says what it bounds)."""
    return lambda name, value, ctx: check_count(name, value, limit, why, minimum)


def number(maximum: float | None = None, unit: str = "") -> Check:
    """A finite number >= 0 (at most ``maximum``)."""
    return lambda name, value, ctx: check_non_negative(name, value, maximum, unit)


def per_ecg(default: float = 0.0) -> Check:
    """A baseline-like input (:func:`check_per_ecg`): None (``default``), a number, one ECG or
    one per ECG; checked, not yet broadcast (:func:`broadcast_per_ecg`)."""
    return lambda name, value, ctx: check_per_ecg(name, value, ctx.x, default)


# ---------------------------------------------------------------------- value checks


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
    return broadcast_per_ecg(check_per_ecg(name, value, x, default), x)


def broadcast_per_ecg(arr: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A checked baseline-like input (:func:`check_per_ecg`) as (B, 12, 600) float32."""
    if arr.shape == x.shape:
        return arr
    return np.ascontiguousarray(np.broadcast_to(arr, x.shape))


def check_finite(name: str, arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{name} holds NaN or infinite values")
    return arr
