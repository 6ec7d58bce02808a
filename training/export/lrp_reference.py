"""A PyTorch reference for the LRP composite graphs (``ecgx.training.export.lrp_rules``).

Written independently of the ONNX graph builder and without Zennit (which imports
torchvision, so it cannot be a runtime dependency): the IR-rebuilt module
(``ecgx.training.export.ir_torch.ir_module``) is run with each op replaced by a custom autograd
function whose backward pass applies the op's LRP rule, and the attribution is the
gradient at the input for output relevance ``one_hot(target) * logits``. Each rule's
backward is the vector-Jacobian product of the layer evaluated with its modified inputs
and weights (PyTorch autograd computes the transposed convolutions), so nothing here
shares code with the graphs' hand-written transposes.

By default the reference computes in float64, so it is the better-rounded of the two.
Only the export and tests import this module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecgx.core.errors import InvalidArgument
from ecgx.training.export.ir import ExportError, Op
from ecgx.training.export.ir_torch import IRModule, target_indices
from ecgx.training.export.lrp_rules import COMPOSITE_GRAPH_NAMES, INPUT_RULES, STABILIZER, input_layers
from ecgx.training.export.ops import OP_SPECS
from ecgx.training.export.ops.base import CONV_RULE, DENSE_RULE, NORM, PASS
from ecgx.training.export.ops.op_mul import GATE, in_order
from ecgx.training.export.parity import (
    MAX_OUTLIER_FRACTION,
    REL_TOL,
    moved_by_float32_rounding,
    within_float32_spread,
)

# Graph name -> composite name (``lrp_epsilon_plus`` -> ``epsilon_plus``).
GRAPH_COMPOSITES = {graph: composite for composite, graph in COMPOSITE_GRAPH_NAMES.items()}
CONV_RULES = {"epsilon_plus": "zplus", "epsilon_alpha2_beta1": "alpha2beta1"}

Backward = Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], list[torch.Tensor]]


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps * sign(z), sign(0) = +1."""
    return z + eps * torch.where(z < 0, -1.0, 1.0).to(z)


class _RuleFunction(torch.autograd.Function):
    """Forward: the op itself. Backward: the op's LRP rule on the incoming relevance."""

    @staticmethod
    def forward(ctx, forward: Callable, backward: Backward, *inputs: torch.Tensor) -> torch.Tensor:
        out = forward(*inputs)
        ctx.backward_rule = backward
        ctx.save_for_backward(*inputs, out)
        return out

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):
        *inputs, out = ctx.saved_tensors
        with torch.enable_grad():
            shares = ctx.backward_rule(inputs, out, relevance)
        return (None, None, *shares)


def _vjp(f: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], s: Callable) -> list[torch.Tensor]:
    """Gradients of ``f(*inputs)`` at each input for output gradient ``s(z)`` (z = f(*inputs))."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    z = f(*leaves)
    return list(torch.autograd.grad(z, leaves, s(z.detach())))


def _layer_function(module: nn.Module) -> Callable:
    """``(input, weight, bias) -> output`` of a conv or dense module with other parameters."""
    if isinstance(module, nn.Conv1d):
        m = module
        return lambda a, w, b: F.conv1d(a, w, b, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(module, nn.Linear):
        return lambda a, w, b: F.linear(a, w, b)
    raise ExportError(f"no LRP layer rule for {type(module).__name__}")


class _Rules:
    """The backward rules of one composite with its settings."""

    def __init__(self, composite: str, epsilon: float, input_rule: str, low, high) -> None:
        self.conv_rule = CONV_RULES[composite]
        self.epsilon, self.input_rule, self.low, self.high = epsilon, input_rule, low, high

    def backward_for(self, op: Op, module: nn.Module, first: bool) -> Backward | None:
        role = OP_SPECS[op.kind].lrp_role  # the op's place in Zennit's layer map
        if role == PASS:  # relevance unchanged
            return lambda inputs, out, r: [r]
        if role == GATE:  # a gating product: all relevance to the signal, none to the gate (Arras et al.)
            return lambda inputs, out, r: in_order(op, r, None)
        if role == NORM:
            return lambda inputs, out, r: self.norm(module, inputs, r)
        if role in (CONV_RULE, DENSE_RULE):
            fn, w, b = _layer_function(module), module.weight.detach(), module.bias
            b = None if b is None else b.detach()
            rule = self.input_rule if first else "default"
            if rule == "flat":
                return lambda inputs, out, r: [self.flat(fn, w, inputs[0], r)]
            if rule == "zbox":
                return lambda inputs, out, r: [self.zbox(fn, w, inputs[0], r)]
            if role == DENSE_RULE:
                return lambda inputs, out, r: [self.epsilon_rule(fn, w, b, inputs[0], r)]
            return lambda inputs, out, r: [self.conv(fn, w, b, inputs[0], r)]
        return None  # max pooling, flatten, concatenation: the module's own gradient

    def norm(self, module: nn.Module, inputs: list[torch.Tensor], r: torch.Tensor) -> list[torch.Tensor]:
        grads = _vjp(lambda *a: module(*a), inputs, lambda z: r / _stab(z, STABILIZER))
        return [a * g for a, g in zip(inputs, grads, strict=True)]

    def epsilon_rule(self, fn, w, b, a, r) -> torch.Tensor:
        (g,) = _vjp(lambda x: fn(x, w, b), [a], lambda z: r / _stab(z, self.epsilon))
        return a * g

    def conv(self, fn, w, b, a, r) -> torch.Tensor:
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        bp = None if b is None else b.clamp(min=0)
        bn = None if b is None else b.clamp(max=0)
        ap, an = a.clamp(min=0), a.clamp(max=0)

        def part(w1, w2, b1) -> torch.Tensor:
            # z = w1 a+ + w2 a- + b1; relevance a+ * w1^T s + a- * w2^T s with s = r / stab(z)
            g1, g2 = _vjp(
                lambda x, y: fn(x, w1, b1) + fn(y, w2, None), [ap, an], lambda z: r / _stab(z, STABILIZER)
            )
            return ap * g1 + an * g2

        if self.conv_rule == "zplus":
            return part(wp, wn, bp)
        return 2.0 * part(wp, wn, bp) - part(wn, wp, bn)

    def flat(self, fn, w, a, r) -> torch.Tensor:
        ones_w = torch.ones_like(w)
        (g,) = _vjp(lambda x: fn(x, ones_w, None), [torch.ones_like(a)], lambda z: r / _stab(z, STABILIZER))
        return g

    def zbox(self, fn, w, a, r) -> torch.Tensor:
        view = (-1,) + (1,) * (a.dim() - 1)
        low = self.low.to(a).view(view).expand_as(a)
        high = self.high.to(a).view(view).expand_as(a)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        ga, gl, gh = _vjp(
            lambda x, lo, hi: fn(x, w, None) - fn(lo, wp, None) - fn(hi, wn, None),
            [a, low, high],
            lambda z: r / _stab(z, STABILIZER),
        )
        # autograd's gl, gh already carry the minus signs of z's low and high terms
        return a * ga + low * gl + high * gh


def _bounds(value, x: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    if value is None:
        return default
    arr = torch.as_tensor(np.asarray(value, np.float64), dtype=x.dtype)
    return arr.expand(len(x)) if arr.dim() == 0 else arr.reshape(len(x))


def lrp_reference(
    module: IRModule,
    composite: str,
    x: np.ndarray,
    target: np.ndarray | int,
    *,
    epsilon: float,
    input_rule: str = "default",
    low: float | np.ndarray | None = None,
    high: float | np.ndarray | None = None,
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """Relevance at the input (B, C, L) of Zennit's ``composite`` ("epsilon_plus" or
    "epsilon_alpha2_beta1") on the IR module, as the ``lrp_*`` composite graphs compute it.

    ``input_rule`` ("default", "flat", "zbox") applies to the layers reading the ECG; ZBox's
    ``low``/``high`` are numbers or one per ECG (default: each ECG's own minimum/maximum).
    Output relevance is ``one_hot(target) * logits`` (the service's lrp convention).
    """
    if composite not in CONV_RULES:
        raise InvalidArgument(f"composite must be one of {sorted(CONV_RULES)}, got {composite!r}")
    if input_rule not in INPUT_RULES:
        raise InvalidArgument(f"input_rule must be one of {sorted(INPUT_RULES)}, got {input_rule!r}")
    model = module if next(module.parameters()).dtype == dtype else copy.deepcopy(module).to(dtype)
    xt = torch.as_tensor(np.asarray(x), dtype=dtype)
    flat = xt.reshape(len(xt), -1)
    rules = _Rules(
        composite,
        float(epsilon),
        input_rule,
        _bounds(low, xt, flat.min(dim=1).values),
        _bounds(high, xt, flat.max(dim=1).values),
    )
    first = input_layers(model.ir)

    def substitute(op: Op, mod: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        backward = rules.backward_for(op, mod, op.name in first)
        if backward is None:
            return None
        return _RuleFunction.apply(lambda *a: mod(*a).detach(), backward, *inputs)

    xt = xt.clone().requires_grad_()
    logits = model.evaluate(xt, substitute)
    target_t = target_indices(target, len(xt))
    seed = F.one_hot(target_t, logits.shape[1]).to(dtype) * logits.detach()
    (attribution,) = torch.autograd.grad(logits, xt, seed)
    return attribution.detach().numpy()


def float32_deviation(
    module: IRModule,
    composite: str,
    x: np.ndarray,
    target: np.ndarray | int,
    *,
    epsilon: float,
    input_rule: str = "default",
    low: float | np.ndarray | None = None,
    high: float | np.ndarray | None = None,
    exact: np.ndarray | None = None,
) -> np.ndarray:
    """Per sample, how far float32 arithmetic may move the composite map: the largest
    deviation from the float64 map (``exact``, computed when not given) of (a) the reference
    run in float32 and (b) the float64 map of the input moved by one float32 rounding (a
    fixed pseudo-random relative 2^-24 per value; the same effect rounding has on every
    intermediate sum). Two estimates, because one float32 run may round luckily: ONNX
    Runtime's error on the Ribeiro network was measured at up to 10x the float32 run's alone.
    """
    kwargs = {"epsilon": epsilon, "input_rule": input_rule, "low": low, "high": high}
    if exact is None:
        exact = lrp_reference(module, composite, x, target, dtype=torch.float64, **kwargs)
    n = len(x)
    single = lrp_reference(module, composite, x, target, dtype=torch.float32, **kwargs)
    moved = lrp_reference(module, composite, moved_by_float32_rounding(x, 0), target, **kwargs)
    dev_single = np.abs(single - exact).reshape(n, -1).max(axis=1)
    dev_moved = np.abs(moved - exact).reshape(n, -1).max(axis=1)
    return np.maximum(dev_single, dev_moved)


def float32_sensitive_samples(
    module: IRModule,
    composite: str,
    x: np.ndarray,
    target: np.ndarray | int,
    *,
    epsilon: float,
    input_rule: str = "default",
    low: float | np.ndarray | None = None,
    high: float | np.ndarray | None = None,
    tol: float = 1e-5,
) -> np.ndarray:
    """Samples whose composite map float32 arithmetic does not pin down: the reference run in
    float32 and in float64 differ by more than ``tol`` of the sample's largest magnitude.

    The rules divide by sums (Norm at additions and average pools, Epsilon at dense layers,
    ZPlus/AlphaBeta parts). Where a sum nearly cancels and the relevance reaching it does not
    vanish with it, the division amplifies the float32 rounding of the sum: two correct
    float32 implementations (ONNX Runtime, Zennit, this reference in float32) then differ.
    The typical case is a pre-activation residual block: the addition's output feeds an
    unfolded BatchNorm whose shift keeps the ReLU path's relevance alive where the sum is 0.
    ``float32_deviation`` measures that sensitivity; ``tol`` (default a tenth of the
    export's 1e-4) leaves room for another implementation's different rounding.
    Returns one bool per sample (True: sensitive).
    """
    kwargs = {"epsilon": epsilon, "input_rule": input_rule, "low": low, "high": high}
    exact = lrp_reference(module, composite, x, target, dtype=torch.float64, **kwargs)
    scale = np.abs(exact).reshape(len(x), -1).max(axis=1)
    error = float32_deviation(module, composite, x, target, exact=exact, **kwargs)
    return error > tol * np.where(scale > 0, scale, 1.0)


# A composite map agrees with the float64 reference when its error is within REL_TOL, or within
# this many times what the reference itself deviates by in float32 (the sample's own rounding
# sensitivity), provided float32 pins the sample down to MAX_FLOAT32_DEVIATION at all
# (a construction error is of the order of the map, 1e-1 to 1). Beyond that float32 does not pin
# the sample down: it is excused (``float32_spread``) when within FLOAT32_SPREAD_FACTOR times its
# deviation, and counts towards "at least half agree" as the other checks' samples within float32's
# spread do (``graph_checks.judge``).
FLOAT32_FACTOR = 10.0
MAX_FLOAT32_DEVIATION = 1e-2


def composite_parity(
    got: np.ndarray,
    module: IRModule,
    composite: str,
    x: np.ndarray,
    target: np.ndarray | int,
    *,
    epsilon: float,
    input_rule: str = "default",
    low: float | np.ndarray | None = None,
    high: float | np.ndarray | None = None,
    excused: dict[str, np.ndarray] | None = None,
) -> dict:
    """Per-sample parity of a composite graph's maps ``got`` with the float64 reference,
    tolerant of the rules' own float32 conditioning (the export check for the composite graphs).

    Norm at an addition that nearly cancels amplifies float32 rounding. On networks whose sums
    feed an unfolded BatchNorm-ReLU path (pre-activation blocks: the Ribeiro network) that
    happens on nearly every sample, so any float32 implementation, Zennit and this reference
    in float32 included, differs from the exact map by 1e-4 to 1e-3 of its largest value. A
    sample agrees when its map is within ``REL_TOL`` of the float64 reference on all but
    ``MAX_OUTLIER_FRACTION`` of the elements (the export's criterion), or within
    ``FLOAT32_FACTOR`` times the sample's ``float32_deviation``, when that deviation is below
    ``MAX_FLOAT32_DEVIATION``: a construction error is of the order of the map itself. A sample
    float32 does not pin down that closely is excused as ``float32_spread`` when the engine is
    within ``within_float32_spread`` of its deviation (largest error only: the deviation is one),
    and counts towards the half that must agree.
    ``excused`` (reason -> one bool per sample, e.g. near max-pool ties) may excuse a sample
    that does not agree. ``ok`` needs every other sample to agree, and at least half to agree or
    be within float32's spread.
    Same keys as ``package.per_sample_parity``, plus ``float32_deviation`` (per sample) and
    ``agreeing_within_float32`` (samples agreeing only within their float32 sensitivity).
    """
    kwargs = {"epsilon": epsilon, "input_rule": input_rule, "low": low, "high": high}
    exact = lrp_reference(module, composite, x, target, dtype=torch.float64, **kwargs)
    n = len(x)
    scale = np.abs(exact).reshape(n, -1).max(axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    deviation = float32_deviation(module, composite, x, target, exact=exact, **kwargs) / scale
    rel = np.abs(np.asarray(got, np.float64) - exact).reshape(n, -1) / scale[:, None]
    strict = (rel > REL_TOL).mean(axis=1) <= MAX_OUTLIER_FRACTION
    tol = np.maximum(REL_TOL, FLOAT32_FACTOR * deviation)[:, None]
    loose = ((rel > tol).mean(axis=1) <= MAX_OUTLIER_FRACTION) & (deviation <= MAX_FLOAT32_DEVIATION)
    agree = strict | loose
    reasons = {k: np.asarray(v, bool) for k, v in (excused or {}).items()}
    spread = [
        within_float32_spread(
            {"max_rel_error": r.max(), "outlier_fraction": 0.0}, {"max_rel_error": d, "outlier_fraction": 0.0}
        )
        for r, d in zip(rel, deviation, strict=True)
    ]
    reasons["float32_spread"] = (deviation > MAX_FLOAT32_DEVIATION) & np.asarray(spread, bool)
    any_excuse = np.zeros(n, bool)
    for flags in reasons.values():
        any_excuse |= flags
    unexplained = ~agree & ~any_excuse
    figures = [
        {"max_rel_error": float(rel[i].max()), "outlier_fraction": float((rel[i] > REL_TOL).mean())}
        for i in range(n)
    ]
    agreeing = [figures[i] for i in np.flatnonzero(agree)]
    return {
        "samples": n,
        "agreeing": int(agree.sum()),
        "agreeing_within_float32": np.flatnonzero(agree & ~strict).tolist(),
        "float32_deviation": [float(d) for d in deviation],
        "max_rel_error": max((f["max_rel_error"] for f in agreeing), default=None),
        "outlier_fraction": max((f["outlier_fraction"] for f in agreeing), default=None),
        "excused": {k: np.flatnonzero(~agree & v).tolist() for k, v in reasons.items()},
        "failing": [{"sample": int(i), **figures[i]} for i in np.flatnonzero(unexplained)],
        "within_float32_spread": np.flatnonzero(~agree & reasons["float32_spread"]).tolist(),
        "ok": bool((agree | reasons["float32_spread"]).sum() >= n / 2 and not unexplained.any()),
    }
