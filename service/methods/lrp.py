"""Layer-wise relevance propagation: the epsilon rule, and Zennit's standard composites."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ecgx.core.errors import InvalidArgument
from ecgx.service.methods.base import (
    AttributionMethod,
    CheckContext,
    Param,
    Settings,
    _show,
    check_choice,
    check_non_negative,
    numeric_array,
    one_of,
)
from ecgx.service.methods.registry import register

# Zennit's default stabiliser; the export checks the package's LRP graph at this value too.
DEFAULT_EPSILON = 1e-6
# Float32 in the graph: a larger epsilon absorbs all relevance (a zero map) or overflows.
MAX_EPSILON = 1e6
# The ``composite`` parameter -> the package graph computing it. "epsilon" is the original
# ``lrp`` graph (Captum's EpsilonRule everywhere); the others are Zennit's composites
# (training/export/lrp_rules.py builds them).
COMPOSITE_GRAPHS: dict[str, str] = {
    "epsilon": "lrp",
    "epsilon_plus": "lrp_epsilon_plus",
    "epsilon_alpha2_beta1": "lrp_epsilon_alpha2_beta1",
}
# The ``input_rule`` parameter -> the composite graphs' int64 ``input_rule`` input.
INPUT_RULES: dict[str, int] = {"default": 0, "flat": 1, "zbox": 2}
# ZBox bounds are millivolts, like the inputs (the engine refuses ECGs beyond 50 mV).
MAX_ABS_BOUND_MV = 1e3


def _epsilon(name: str, value: Any, ctx: CheckContext) -> np.ndarray:
    """The stabiliser as the graphs' float32 scalar input."""
    return np.array(check_non_negative(name, value, MAX_EPSILON), np.float32)


def _input_rule(name: str, value: Any, ctx: CheckContext) -> str:
    rule = check_choice(name, value, tuple(INPUT_RULES))
    if ctx.checked["composite"] == "epsilon" and rule != "default":
        raise InvalidArgument(
            f"input_rule={rule!r} needs a composite ('epsilon_plus' or 'epsilon_alpha2_beta1'); "
            "composite 'epsilon' applies the epsilon rule to every layer"
        )
    return rule


def _low(name: str, value: Any, ctx: CheckContext) -> np.ndarray:
    """The zbox lower bound as (B,) float32 (default: each ECG's own minimum)."""
    _zbox_only(ctx)
    flat = ctx.x.reshape(len(ctx.x), -1)
    return _bound(name, value, flat.min(axis=1), len(ctx.x))


def _high(name: str, value: Any, ctx: CheckContext) -> np.ndarray:
    """The zbox upper bound as (B,) float32 (default: each ECG's own maximum), above ``low``."""
    _zbox_only(ctx)
    flat = ctx.x.reshape(len(ctx.x), -1)
    high = _bound(name, value, flat.max(axis=1), len(ctx.x))
    if ctx.given["low"] is not None or value is not None:
        low = ctx.checked["low"]
        bad = np.flatnonzero(low >= high)
        if bad.size:
            raise InvalidArgument(
                f"low must be below high (zbox bounds, mV); ECG(s) {bad.tolist()} have low "
                f"{low[bad].tolist()} >= high {high[bad].tolist()}"
            )
    return high


def _zbox_only(ctx: CheckContext) -> None:
    """Refuse zbox bounds without the zbox input rule (naming every bound given)."""
    given = [n for n in ("low", "high") if ctx.given[n] is not None]
    if given and ctx.checked["input_rule"] != "zbox":
        raise InvalidArgument(
            f"{' and '.join(given)} are the zbox input rule's bounds: set input_rule='zbox'"
        )


@register
class Lrp(AttributionMethod):
    """LRP (Bach et al.) on the BatchNorm-folded network; relevance starts at the target logit.

    ``composite`` picks the rules:

    * ``"epsilon"`` (default): the epsilon rule on every convolution, dense, pooling and
      addition layer, as Captum's LRP with EpsilonRule. With a small epsilon this is input x
      gradient (LRP-0 on a ReLU network).
    * ``"epsilon_plus"``: Zennit's EpsilonPlus: ZPlus on convolutions, epsilon on dense layers,
      Zennit's Norm rule on additions and average pooling, relevance passed through ReLUs and
      unfolded BatchNorms, routed through max pooling.
    * ``"epsilon_alpha2_beta1"``: Zennit's EpsilonAlpha2Beta1: AlphaBeta(2, 1) on convolutions,
      otherwise as epsilon_plus.

    ``input_rule`` (composites only) is the rule of the layer(s) reading the ECG:
    ``"default"`` (the composite's own), ``"flat"``, or ``"zbox"`` (z-beta with bounds ``low``
    and ``high`` in mV: numbers or one per ECG; default each ECG's own minimum and maximum).
    ``epsilon`` is the dense layers' (composites) or every layer's (``"epsilon"``) stabiliser;
    the composites' other rules use Zennit's fixed 1e-6.

    Relevance is *not* conserved in general: it is conserved layer by layer except for what
    biases absorb (including folded BatchNorm shifts: a layer's bias takes its share
    ``R_j * b_j / z_j``), what epsilon and the stabiliser absorb, and, in the composites, at
    units where a rule's part is empty (a ZPlus unit without positive contribution drops its
    relevance; AlphaBeta passes 2x or -1x it where one part is empty). At additions relevance
    is split in proportion to each branch's contribution. So attributions sum to about the
    target logit on bias-free networks only (tests/training/test_lrp_rules.py checks each statement).
    """

    name, kind, graphs = "lrp", "modified backward", (COMPOSITE_GRAPHS["epsilon"],)
    setting_graphs = tuple(g for c, g in COMPOSITE_GRAPHS.items() if c != "epsilon")
    params = (
        Param("epsilon", DEFAULT_EPSILON, _epsilon),
        Param("composite", "epsilon", one_of(tuple(COMPOSITE_GRAPHS))),
        Param("input_rule", "default", _input_rule),
        Param("low", None, _low),
        Param("high", None, _high),
    )

    def required_graphs(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The one graph the chosen ``composite`` runs."""
        composite = check_choice("composite", params.get("composite", "epsilon"), tuple(COMPOSITE_GRAPHS))
        return (COMPOSITE_GRAPHS[composite],)

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        graph = COMPOSITE_GRAPHS[s.composite]
        if s.composite == "epsilon":
            return engine.backward(graph, x, target, output="attribution", epsilon=s.epsilon)
        rule = np.array(INPUT_RULES[s.input_rule], np.int64)
        return engine.backward(
            graph, x, target, output="attribution", epsilon=s.epsilon, input_rule=rule, low=s.low, high=s.high
        )


def _bound(name: str, value: Any, default: np.ndarray, n: int) -> np.ndarray:
    """A zbox bound as (B,) float32: None (``default``: each ECG's own extreme), a number for
    every ECG, or one number per ECG."""
    if value is None:
        return default.astype(np.float32)
    arr = numeric_array(name, value)
    if arr.ndim == 0:
        arr = np.full(n, arr, np.float32)
    elif arr.shape != (n,):
        raise InvalidArgument(
            f"{name} must be a number (mV) or one number per ECG ({n}), got shape {arr.shape}: {_show(value)}"
        )
    if np.abs(arr).max() > MAX_ABS_BOUND_MV:
        raise InvalidArgument(f"{name} must be within +-{MAX_ABS_BOUND_MV:g} mV, got {_show(value)}")
    return np.ascontiguousarray(arr, np.float32)
