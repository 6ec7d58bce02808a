"""``mul``: the element-wise product of a signal and a gate (squeeze-and-excitation, attention gates).

params: ``gate`` (0 or 1), the index of the input that gates the other (the *signal*). Per-sample
shapes: the signal is (C, L) or (F,); the gate has the signal's shape, or broadcasts over it:
(C, 1) or (1, L) for a (C, L) signal, or (C,), a per-channel vector (the SE branch's (B, C) made
(B, C, 1) by an unsqueeze or view the front ends read as this op's broadcast).

Which factor is the gate (:func:`gate_index`, the one place that decides; the front ends call it):

1. where the shapes differ, the factor that broadcasts (the smaller one: SE's (C, 1) weights);
2. where they are equal, the factor made by a gating activation (a sigmoid op): an attention gate;
3. otherwise (both or neither a sigmoid output) there is no clear gate and the export refuses:
   the rules below need to know which factor carries the signal.

The rules (each ``Rule``'s ``product`` hook in ``onnx_graphs`` / ``lrp_rules``):

* gradient, guided backprop, deconvolution, GradCAM: the product rule (gradient to both factors),
  as autograd and Captum compute it (Captum's overrides act at ReLUs only);
* LRP (epsilon and the composites): the signal takes all of the product's relevance, the gate
  none: the gate is a constant scale (Arras et al. 2017, "Explaining recurrent neural network
  predictions in sentiment analysis"; 2019, "Explaining and interpreting LSTMs");
* DeepLIFT: the product's difference from its reference split exactly between the factors,
  ``delta(s g) = mean(g) delta(s) + mean(s) delta(g)`` (``mean``: the midpoint of input and
  reference): each factor's multiplier is the other's midpoint (the Shapley split of a product of
  two, as SHAP's DeepExplainer treats two-input interactions). Summation-to-delta holds and nothing
  divides by a difference. The gate cannot simply be a constant here: with the gate detached
  (multiplier ``g`` of the input) the attributions no longer sum to the output's difference, and
  sending all of the difference to the signal (multiplier ``delta(s g) / delta(s)``) diverges where
  the signal's difference crosses zero, which it does at some time step of almost every ECG (float32
  and float64 then disagree by 5e-4 of the largest value on synthetic ECGs; the export refused
  DeepLIFT for one of six). The gate's share reaches the input through the gate's own branch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ecgx.training.export.ops.base import OpKind
from ecgx.training.export.ops.onnx_helpers import I64, GraphBuilder

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op
    from ecgx.training.export.onnx_graphs import Rule

# The LRP composites' role of a gate (``lrp_rules``, ``lrp_reference``): relevance to the signal.
GATE = "gate"
# Op kinds whose output is a gate (a factor in (0, 1) that scales another): rule 2 above.
GATING_KINDS = frozenset({"sigmoid"})


class NoClearGate(ValueError):
    """A product whose gate cannot be told from its signal (the front ends refuse it)."""


def gate_index(in_shapes: tuple[tuple[int, ...], ...], producer_kinds: tuple[str | None, ...]) -> int:
    """Which of a product's two factors is its gate (see the module docstring), or NoClearGate."""
    if len(in_shapes) != 2:
        raise NoClearGate(f"a product of {len(in_shapes)} tensors (only two: a signal and its gate)")
    sizes = [int(np.prod(s)) for s in in_shapes]
    if sizes[0] != sizes[1]:
        return int(sizes[1] < sizes[0])  # the factor that broadcasts
    gating = [kind in GATING_KINDS for kind in producer_kinds]
    if gating.count(True) == 1:
        return gating.index(True)
    made_by = ", ".join(kind or "the input" for kind in producer_kinds)
    raise NoClearGate(
        f"the two factors have one shape {in_shapes[0]} and {'both' if all(gating) else 'neither'} is a "
        f"sigmoid's output (made by {made_by}), so neither is clearly the gate: a product is supported as "
        "a signal times a gate (a sigmoid's output, or a per-channel or per-time factor that broadcasts)"
    )


def broadcast_problem(signal: tuple[int, ...], gate: tuple[int, ...]) -> str | None:
    """Why ``gate`` cannot scale ``signal`` (per-sample shapes), or None."""
    if gate == signal:
        return None
    if len(signal) == 2 and gate == (signal[0],):
        return None  # a per-channel vector, viewed as (C, 1)
    if len(signal) == 2 and len(gate) == 2 and all(g in (1, s) for g, s in zip(gate, signal, strict=True)):
        return None
    return f"a gate of shape {gate} does not broadcast over a signal of shape {signal}"


# Why a parameter matrix times the signal was refused (the front ends' message).
CHANNEL_MIX_ONLY = "a parameter matrix times the signal only as a channel mix: (R, C) @ (B, C, L)"


def channel_mix_params(weight: np.ndarray, in_shape: tuple[int, ...]) -> dict | None:
    """``W @ x`` with a parameter ``W`` ((R, C), or (1, R, C) broadcast over the batch) on a (C, L)
    signal, as the conv op it is (kernel 1, no bias): the PTB-XL benchmark's SqueezeExcite1d mixes
    the gate's channels this way instead of with nn.Linear. None if it is not one."""
    w = np.asarray(weight, np.float64)
    w = w[0] if w.ndim == 3 and w.shape[0] == 1 else w
    if w.ndim != 2 or len(in_shape) != 2 or w.shape[1] != in_shape[0]:
        return None
    return {
        "weight": w[:, :, None].copy(),
        "bias": None,
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "groups": 1,
    }


def _four_d(op: Op, gate: str, b: GraphBuilder) -> str:
    """The gate as the graphs hold signals ((B, C, 1, L)); a (C,) vector becomes (B, C, 1, 1)."""
    if op.in_shapes[op.params["gate"]] == (op.out_shape[0],) and len(op.out_shape) == 2:
        return b.op("Unsqueeze", [gate, b.const([2, 3], I64)], "gate4")
    return gate


def signal_and_gate(op: Op, ins: list):
    """``(signal, gate)`` from a product's inputs (tensor names or tensors), by ``params["gate"]``."""
    k = op.params["gate"]
    return ins[1 - k], ins[k]


def in_order(op: Op, signal_part, gate_part) -> list:
    """Per-input contributions in the op's input order."""
    return [gate_part, signal_part] if op.params["gate"] == 0 else [signal_part, gate_part]


class GateProduct(nn.Module):
    """``signal * gate`` on (B, C, L) or (B, F), a (B, C) gate viewed as (B, C, 1); inputs in the
    IR op's order (``gate`` is the gate's index)."""

    def __init__(self, gate: int) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        signal, gate = (a, b) if self.gate == 1 else (b, a)
        return signal * as_broadcast(gate, signal)


def as_broadcast(gate: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """A (B, C) per-channel gate as (B, C, 1) against a (B, C, L) signal; other gates unchanged."""
    return gate.unsqueeze(-1) if gate.dim() == 2 and signal.dim() == 3 else gate


class Mul(OpKind):
    kind = "mul"
    lrp_role = GATE

    def validate(self, op: Op) -> str | None:
        if len(op.inputs) != 2 or op.params.get("gate") not in (0, 1):
            return "a product needs two inputs and the index of its gate (params['gate'])"
        signal, gate = signal_and_gate(op, list(op.in_shapes))
        if op.out_shape != signal:
            return f"the product's shape {op.out_shape} must be its signal's {signal}"
        return broadcast_problem(signal, gate)

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        signal, gate = signal_and_gate(op, ins)
        return b.op("Mul", [signal, _four_d(op, gate, b)], op.name)

    def emit_transpose(self, b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
        raise NotImplementedError("a product's gradient needs its factors: see Mul.product_gradient")

    def emit_backward(
        self, rule: Rule, b: GraphBuilder, op: Op, g: str, ins: list[str], out: str
    ) -> list[str]:
        return rule.product(b, op, g, ins, out)

    def product_gradient(self, b: GraphBuilder, op: Op, g: str, ins: list[str]) -> list[str]:
        """The product rule: ``g * gate`` at the signal, ``g * signal`` summed over the gate's
        broadcast axes at the gate."""
        signal, gate = signal_and_gate(op, ins)
        return self.product_rule(b, op, g, signal, gate)

    def product_rule(self, b: GraphBuilder, op: Op, g: str, signal: str, gate: str) -> list[str]:
        """``g * gate`` at the signal and ``g * signal`` (summed over the gate's broadcast axes) at
        the gate, for the given factor values (DeepLIFT passes the factors' midpoints)."""
        at_signal = b.op("Mul", [g, _four_d(op, gate, b)], "mul.T")
        at_gate = b.op("Mul", [g, signal], "mul.T")
        axes = self._broadcast_axes(op)
        if axes:
            flat = op.in_shapes[op.params["gate"]] == (op.out_shape[0],) and len(op.out_shape) == 2
            at_gate = b.op("ReduceSum", [at_gate, b.const(axes, I64)], "mul.T", keepdims=0 if flat else 1)
        return in_order(op, at_signal, at_gate)

    def _broadcast_axes(self, op: Op) -> list[int]:
        """Axes of the graphs' (B, C, 1, L) layout over which the gate is broadcast."""
        signal, gate = signal_and_gate(op, list(op.in_shapes))
        if gate == signal:
            return []
        if gate == (signal[0],):
            return [2, 3]
        pairs = zip((1, 3), zip(gate, signal, strict=True), strict=True)
        return [axis for axis, (gs, ss) in pairs if gs != ss]

    def torch_module(self, op: Op) -> nn.Module:
        return GateProduct(op.params["gate"])

    def zero_exact(self, inputs_exact: bool) -> bool:
        return inputs_exact  # a product of non-negative factors is zero exactly where one of them is
