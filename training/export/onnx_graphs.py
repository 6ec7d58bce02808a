"""Emit ONNX forward and backward graphs from the model IR.

ONNX Runtime has no autograd, so each attribution graph spells out its own
backward pass: transposed convolutions, ReLU masks, max-pool index routing,
the transposed linear layer. A *rule* (as in Zennit: a small object) decides
what happens at the steps where methods differ: at ReLUs (gradient, guided,
deconvnet, DeepLIFT rescale), at max pooling (DeepLIFT), and around linear
layers (LRP's epsilon rule). Every graph reads the same named parameter
initialisers, so randomising a weight affects all methods alike.

Inside a graph every (batch, channels, time) tensor is held as (batch, channels,
1, time) and every Conv1d runs as a 1 x k Conv: ONNX Runtime's blocked (NCHWc)
convolution kernels apply only to 2-D convolutions, and were measured 1.7x faster
than its 1-D path on this network family. Graph inputs and outputs keep their
1-D shapes; the 4-D weight views are constant-folded when a session loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from ecgx.training.export.ir import INPUT, ExportError, ModelIR, Op
from ecgx.training.export.ops import OP_SPECS
from ecgx.training.export.ops.onnx_helpers import (
    FLOAT,
    I64,
    OPSET,
    GraphBuilder,
    bias,
    param_names,
    weight,
)
from ecgx.training.export.ops.op_mul import in_order, signal_and_gate

# Re-exported: the package writer, the LRP composites and tests import these from here.
__all__ = ["FLOAT", "I64", "OPSET", "GraphBuilder", "bias", "param_names", "weight"]

DEEPLIFT_EPS = 1e-10  # Captum's DeepLift default: below this |delta in|, the plain gradient is used


# --------------------------------------------------------------------------- forward


def emit_forward(b: GraphBuilder, ir: ModelIR, x: str) -> dict[str, str]:
    """Forward pass from the (B, C, L) input ``x``; returns IR tensor name -> ONNX tensor name
    ((B, C, 1, L) for signals, (B, F) for flat features)."""
    t = {INPUT: b.op("Unsqueeze", [x, b.const([2], I64)], "x4")}
    for op in ir.ops:
        t[op.output] = forward_op(b, op, [t[i] for i in op.inputs])
    return t


def to_3d(b: GraphBuilder, t4: str) -> str:
    """(B, C, 1, L) -> (B, C, L) for graph outputs."""
    return b.op("Squeeze", [t4, b.const([2], I64)])


def forward_op(
    b: GraphBuilder, op: Op, ins: list[str], weight_t: str | None = None, bias_t: str | None = ""
) -> str:
    """One op's forward pass. ``weight_t``/``bias_t`` replace a parameterised op's own weight and
    bias tensors (LRP rules evaluate layers with modified weights; ``bias_t=None`` drops the bias)."""
    spec = OP_SPECS[op.kind]
    if spec.has_parameters:
        weight_t = weight_t or weight(b, op)
        bias_t = bias(b, op) if bias_t == "" else bias_t
    return spec.emit_forward(b, op, ins, weight_t, bias_t)


# --------------------------------------------------------------------------- rules


class Rule:
    """Plain gradient. Subclasses override the steps where a method differs.

    ``relu`` acts at each ReLU, ``maxpool`` at each max or global max pool, and
    ``layer`` at each other op with weights or a sum (conv, linear, affine, pooling,
    addition): it returns the contribution for each of the op's inputs, so a rule that
    needs an input's activation applies it on that edge alone (a tensor that feeds an
    addition and a ReLU path gets it once per consumer). Which hook applies at an op is
    its kind's ``emit_backward`` (``ops/``).
    """

    name = "gradient"
    doubled = False  # True: input and reference travel as one batch of 2B (DeepLIFT)

    def relu(self, b: GraphBuilder, g: str, z: str, out: str) -> str:
        return relu_mask(b, g, out)

    def maxpool(self, b: GraphBuilder, g: str, a: str, y: str, op: Op) -> str:
        return route_max(b, g, a, op)

    def layer(self, b: GraphBuilder, op: Op, g: str, ins: list[str], out: str) -> list[str]:
        return transpose_op(b, op, g)

    def product(self, b: GraphBuilder, op: Op, g: str, ins: list[str], out: str) -> list[str | None]:
        """At a gating product (``ops/op_mul.py``): the product rule, the gradient to both factors
        (what autograd, and so Captum's gradient, guided backprop and deconvolution, compute)."""
        return OP_SPECS[op.kind].product_gradient(b, op, g, ins)

    def activation(self, b: GraphBuilder, op: Op, g: str, z: str, out: str) -> str:
        """An activation other than ReLU (``ops/activation.py``): the exact derivative. Guided
        backprop and deconvolution keep it too (their rules are defined on ReLUs; Captum overrides
        ``nn.ReLU`` modules only)."""
        return activation_gradient(b, op, g, z, out)


class GuidedRule(Rule):
    """Guided backprop: only positive gradient passes a ReLU, and only where it was active."""

    name = "guided_backprop"

    def relu(self, b, g, z, out):
        return b.op("Relu", [relu_mask(b, g, out)], "guided")


class DeconvRule(Rule):
    """Deconvnet: a ReLU passes the positive part of the gradient, whatever its input was."""

    name = "deconvolution"

    def relu(self, b, g, z, out):
        return b.op("Relu", [g], "deconv")


def stabilise(b: GraphBuilder, z: str, eps: str) -> str:
    """``z + eps * sign(z)`` with sign(0) = +1 (Captum's and Zennit's stabiliser), as
    1 - 2 * [z < 0] (cheaper than Where on CPU)."""
    negative = b.op("Cast", [b.op("Less", [z, b.const(0.0)])], to=FLOAT)
    sign = b.op("Sub", [b.const(1.0), b.op("Mul", [negative, b.const(2.0)])], "sign")
    return b.op("Add", [z, b.op("Mul", [sign, eps])], "stabilised")


class EpsilonRule(Rule):
    """LRP-epsilon, as Captum's EpsilonRule: ``R_in = a * W^T (R_out / (z + eps*sign(z)))``.

    ReLUs pass relevance unchanged; every other layer with weights or a sum (conv, dense,
    affine, pooling, addition) divides by its stabilised output and multiplies each input's
    share by that input (on each edge: an addition splits relevance in proportion to each
    branch's contribution). Concatenation and flattening only move relevance. The rule
    conserves relevance where layers have no bias and ``eps`` is 0; a bias (including a
    folded BatchNorm's shift) absorbs its share, and ``eps`` absorbs some more.
    ``eps`` is a graph input, so one graph serves every epsilon.
    """

    name = "lrp"

    def __init__(self, eps: str):
        self.eps = eps

    def relu(self, b, g, z, out):
        return g

    def activation(self, b, op, g, z, out):
        return g  # relevance passes every activation unchanged, as it passes ReLUs

    def layer(self, b, op, g, ins, out):
        s = b.op("Div", [g, stabilise(b, out, self.eps)], "lrp_s")
        return [b.op("Mul", [c, a], "lrp_r") for c, a in zip(transpose_op(b, op, s), ins, strict=True)]

    def maxpool(self, b, g, a, y, op):
        s = b.op("Div", [g, stabilise(b, y, self.eps)], "lrp_s")
        return b.op("Mul", [route_max(b, s, a, op), a], "lrp_r")

    def product(self, b, op, g, ins, out):
        return relevance_to_signal(op, g)


def relevance_to_signal(op: Op, g: str) -> list[str | None]:
    """LRP at a gating product: the signal takes all of the product's relevance, the gate none (a
    constant scale: Arras et al. 2017/2019, LRP for LSTMs). None: no contribution on that edge."""
    return in_order(op, g, None)


class RescaleRule(Rule):
    """DeepLIFT rescale, as Captum's DeepLift at ReLUs, with the cross-max rescale rule at max
    pooling (Captum's ``deep_lift.maxpool``), which keeps DeepLIFT's summation-to-delta exact.

    Tensors hold the input (first half) and the reference (second half) in one batch; a
    ReLU's multiplier is delta-out / delta-in, or the plain gradient where |delta-in| < 1e-10.
    The max-pool rule sums the routed deltas of both halves, so both halves travel backwards.
    """

    name = "deeplift"
    doubled = True

    def relu(self, b, g, z, out):
        d_in, d_out = _halves_delta(b, z), _halves_delta(b, out)
        return _rescale(b, b.op("Mul", [g, d_out]), d_in, relu_mask(b, g, out))

    def activation(self, b, op, g, z, out):
        z_in, z_ref = b.op("Split", [z], "split", n_out=2, axis=0)
        out_in, out_ref = b.op("Split", [out], "split", n_out=2, axis=0)
        ratio = _activation_multiplier(b, op, z_in, z_ref, out_in, out_ref)
        small = _halves_small(b, z_in, z_ref)
        small2 = b.op("Concat", [small, small], axis=0)
        derivative = OP_SPECS[op.kind].emit_derivative(b, op, z, out)
        return b.op("Mul", [g, _blend(b, b.op("Concat", [ratio, ratio], axis=0), derivative, small2)])

    def maxpool(self, b, g, a, y, op):
        # Captum: route g * (cross-max deltas) through each half's argmax, sum the halves, divide by delta-in.
        y_in, y_ref = b.op("Split", [y], "split", n_out=2, axis=0)
        cross = b.op("Max", [y_in, y_ref], "xmax")
        delta_out = b.op("Concat", [b.op("Sub", [cross, y_ref]), b.op("Sub", [y_in, cross])], axis=0)
        routed = route_max(b, b.op("Mul", [g, delta_out]), a, op)
        r_in, r_ref = b.op("Split", [routed], "split", n_out=2, axis=0)
        summed = b.op("Add", [r_in, r_ref])
        plain = route_max(b, g, a, op)
        return _rescale(b, b.op("Concat", [summed, summed], axis=0), _halves_delta(b, a), plain)

    def product(self, b, op, g, ins, out):
        # delta(s * g) = mean(g) * delta(s) + mean(s) * delta(g) exactly: each factor's multiplier is
        # the other's midpoint between input and reference (ops/op_mul.py says why not the gate as a
        # constant), so summation-to-delta holds and nothing divides by a small delta.
        signal, gate = (_halves_mean(b, t) for t in signal_and_gate(op, ins))
        return OP_SPECS[op.kind].product_rule(b, op, g, signal, gate)


class RescaleGradientMaxRule(Rule):
    """DeepLIFT rescale at ReLUs, the plain gradient through each window's maximum at max pooling
    (what Captum 0.9's DeepLift computes in practice: its max-pool hook does not take effect).

    Nothing then mixes the halves on the way back, and only the input half's multipliers make the
    attribution, so the gradient travels through the input half alone (B rows, not 2B): the
    forward tensors still hold both halves (2B), which the deltas read. Per row it computes what
    :class:`RescaleRule`'s ReLU step computes, in the same order, so the input half is the same.
    """

    name = "deeplift"

    def relu(self, b, g, z, out):
        z_in, z_ref = b.op("Split", [z], "split", n_out=2, axis=0)
        out_in, out_ref = b.op("Split", [out], "split", n_out=2, axis=0)
        d_in, d_out = b.op("Sub", [z_in, z_ref], "delta"), b.op("Sub", [out_in, out_ref], "delta")
        return _rescale(b, b.op("Mul", [g, d_out]), d_in, relu_mask(b, g, out_in))

    def activation(self, b, op, g, z, out):
        z_in, z_ref = b.op("Split", [z], "split", n_out=2, axis=0)
        out_in, out_ref = b.op("Split", [out], "split", n_out=2, axis=0)
        ratio = _activation_multiplier(b, op, z_in, z_ref, out_in, out_ref)
        derivative = OP_SPECS[op.kind].emit_derivative(b, op, z_in, out_in)
        return b.op("Mul", [g, _blend(b, ratio, derivative, _halves_small(b, z_in, z_ref))])

    def maxpool(self, b, g, a, y, op):
        a_in, _ = b.op("Split", [a], "split", n_out=2, axis=0)
        return route_max(b, g, a_in, op)

    def product(self, b, op, g, ins, out):
        # RescaleRule.product on the input half (``g`` has B rows, the forward tensors 2B).
        signal, gate = (_midpoint(b, t) for t in signal_and_gate(op, ins))
        return OP_SPECS[op.kind].product_rule(b, op, g, signal, gate)


def relu_mask(b: GraphBuilder, g: str, out: str) -> str:
    """g where the ReLU was active.

    Reads the ReLU *output* (> 0 exactly where the input was), so the pre-activation
    has no other use and ONNX Runtime fuses each convolution with its ReLU. Greater,
    Cast, Mul: measured 4x faster than Sign, Mul and 10x faster than Where on CPU.
    """
    active = b.op("Cast", [b.op("Greater", [out, b.const(0.0)])], "active", to=FLOAT)
    return b.op("Mul", [g, active], "relu_grad")


def activation_gradient(b: GraphBuilder, op: Op, g: str, z: str, out: str) -> str:
    """g times the activation's exact derivative at its input ``z`` (output ``out``)."""
    return b.op("Mul", [g, OP_SPECS[op.kind].emit_derivative(b, op, z, out)], f"{op.kind}_grad")


def _require_monotone(op: Op) -> None:
    """DeepLIFT's rescale rule is defined here for monotone activations only (see
    ``ops/activation.py``: Captum applies it to ELU, LeakyReLU, Sigmoid and Tanh, not to GELU,
    SiLU or Mish): a graph that would need it elsewhere is not built, and says why."""
    if not OP_SPECS[op.kind].monotone:
        raise ExportError(
            f"layer {op.name} ({op.kind}) is not monotone: DeepLIFT's rescale rule is defined for "
            "monotone activations (ReLU, LeakyReLU, ELU, Sigmoid, Tanh; Captum's DeepLift applies it "
            "to no other activation)"
        )


def _halves_small(b: GraphBuilder, z_in: str, z_ref: str) -> str:
    """1.0 where |input - reference| < 1e-10 (DeepLIFT takes the gradient there), else 0.0."""
    d = b.op("Sub", [z_in, z_ref], "delta")
    return b.op("Cast", [b.op("Less", [b.op("Abs", [d]), b.const(DEEPLIFT_EPS)])], "small", to=FLOAT)


def _activation_multiplier(b: GraphBuilder, op: Op, z_in: str, z_ref: str, out_in: str, out_ref: str) -> str:
    """An activation's rescale multiplier delta-out / delta-in (finite where |delta-in| < 1e-10,
    where ``_blend`` replaces it), in the activation's well-conditioned form (``emit_secant``)."""
    _require_monotone(op)
    small = _halves_small(b, z_in, z_ref)
    safe = b.op("Add", [b.op("Sub", [z_in, z_ref]), small], "delta_safe")
    return OP_SPECS[op.kind].emit_secant(b, op, z_in, z_ref, out_in, out_ref, safe)


def _blend(b: GraphBuilder, ratio: str, fallback: str, small: str) -> str:
    """``ratio`` where ``small`` is 0, ``fallback`` where it is 1 (as ``_rescale``)."""
    kept = b.op("Mul", [ratio, b.op("Sub", [b.const(1.0), small])])
    return b.op("Add", [kept, b.op("Mul", [fallback, small])], "deeplift")


def _halves_delta(b: GraphBuilder, t: str) -> str:
    """(input - reference), repeated for both halves of a doubled batch."""
    t_in, t_ref = b.op("Split", [t], "split", n_out=2, axis=0)
    d = b.op("Sub", [t_in, t_ref], "delta")
    return b.op("Concat", [d, d], "delta2", axis=0)


def _midpoint(b: GraphBuilder, t: str) -> str:
    """(input + reference) / 2 of a doubled batch (B rows)."""
    t_in, t_ref = b.op("Split", [t], "split", n_out=2, axis=0)
    return b.op("Mul", [b.op("Add", [t_in, t_ref]), b.const(0.5)], "midpoint")


def _halves_mean(b: GraphBuilder, t: str) -> str:
    """:func:`_midpoint`, repeated for both halves of a doubled batch."""
    m = _midpoint(b, t)
    return b.op("Concat", [m, m], "midpoint2", axis=0)


def _rescale(b: GraphBuilder, numerator: str, d_in: str, fallback: str) -> str:
    """numerator / d_in, or ``fallback`` where |d_in| < 1e-10 (Captum's torch.where).

    Written as a blend instead of Where, which is ~10x slower than arithmetic on ONNX
    Runtime's CPU provider: the small-delta positions get 1 added to the divisor (so
    nothing divides by zero) and their ratio is multiplied by 0.
    """
    small = b.op("Cast", [b.op("Less", [b.op("Abs", [d_in]), b.const(DEEPLIFT_EPS)])], "small", to=FLOAT)
    ratio = b.op("Div", [numerator, b.op("Add", [d_in, small])], "rescale")
    kept = b.op("Mul", [ratio, b.op("Sub", [b.const(1.0), small])])
    return b.op("Add", [kept, b.op("Mul", [fallback, small])], "deeplift")


# --------------------------------------------------------------------------- backward


def route_max(b: GraphBuilder, g: str, a: str, op: Op) -> str:
    """Max-pool gradient: g goes to the first maximum of each window (PyTorch's choice on
    ties); overlapping windows that share a maximum add their gradients there."""
    return OP_SPECS[op.kind].emit_route_max(b, g, a, op)


def transpose_op(b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
    """The plain gradient of ``op`` with respect to each of its inputs, given ``g`` at its output
    (max pooling excepted: its routing needs the input, see ``route_max``). ``weight_t`` replaces
    a parameterised op's weight (LRP rules propagate through modified weights)."""
    return OP_SPECS[op.kind].emit_transpose(b, op, g, weight_t)


def _backward_op(b: GraphBuilder, rule: Rule, op: Op, g: str, t: dict[str, str]) -> list[str]:
    """Contributions for each input of ``op`` given ``g`` at its output, under ``rule``."""
    ins, out = [t[i] for i in op.inputs], t[op.output]
    return OP_SPECS[op.kind].emit_backward(rule, b, op, g, ins, out)


def emit_backward(b: GraphBuilder, ir: ModelIR, rule: Rule, t: dict[str, str], seed: str, wrt: str) -> str:
    """Propagate ``seed`` (gradient at the logits) back to IR tensor ``wrt`` under ``rule``."""
    needed = _descendants(ir, wrt)
    pending: dict[str, list[str]] = {ir.output: [seed]}
    for op in reversed(ir.ops):
        if op.output == wrt or op.output not in needed or op.output not in pending:
            continue
        g = _total(b, pending.pop(op.output))
        for name, contribution in zip(op.inputs, _backward_op(b, rule, op, g, t), strict=True):
            if name in needed and contribution is not None:  # None: the rule sends nothing (a gate)
                pending.setdefault(name, []).append(contribution)
    if wrt not in pending:
        raise ExportError(f"the model's output does not depend on {wrt!r}")
    return _total(b, pending[wrt])


def _total(b: GraphBuilder, parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else b.op("Sum", parts, "grad_sum")


def _descendants(ir: ModelIR, root: str) -> set[str]:
    found = {root}
    for op in ir.ops:
        if any(i in found for i in op.inputs):
            found.add(op.output)
    return found


# --------------------------------------------------------------------------- whole graphs

BATCH = "batch"


def _start(name: str, x_shape: list, n_classes: int, with_seed: bool = True) -> tuple[GraphBuilder, str, str]:
    b = GraphBuilder(name)
    x = b.add_input("x", x_shape)
    seed = b.add_input("seed", [BATCH, n_classes]) if with_seed else ""
    return b, x, seed


def forward_graph(ir: ModelIR, x_shape: list, n_classes: int) -> onnx.ModelProto:
    b, x, _ = _start("forward", x_shape, n_classes, with_seed=False)
    t = emit_forward(b, ir, x)
    b.add_output(t[ir.output], "logits", [BATCH, n_classes])
    return b.model()


def backward_graph(ir: ModelIR, x_shape: list, n_classes: int, rule: Rule) -> onnx.ModelProto:
    b, x, seed = _start(rule.name, x_shape, n_classes)
    t = emit_forward(b, ir, x)
    grad = to_3d(b, emit_backward(b, ir, rule, t, seed, INPUT))
    b.add_output(t[ir.output], "logits", [BATCH, n_classes])
    b.add_output(grad, "gradient", x_shape)
    return b.model()


def deeplift_graph(ir: ModelIR, x_shape: list, n_classes: int) -> onnx.ModelProto:
    """DeepLIFT's multipliers times (x - baseline). The forward pass runs input and reference as
    one batch of 2B; the graph input ``maxpool_rescale`` picks the backward pass with an ``If``:
    the cross-max rescale rule (:class:`RescaleRule`, both halves) or the gradient through the
    window maximum (:class:`RescaleGradientMaxRule`, the input half only: half the backward
    work). Only the chosen branch runs."""
    b, x, seed = _start("deeplift", x_shape, n_classes)
    ref = b.add_input("baseline", x_shape)
    rescale_max = b.add_input("maxpool_rescale", [], TensorProto.BOOL)
    both = b.op("Concat", [x, ref], "input_and_reference", axis=0)
    t = emit_forward(b, ir, both)

    def rescale(sb: GraphBuilder) -> str:
        seeds = sb.op("Concat", [seed, seed], "seed2", axis=0)
        mult = to_3d(sb, emit_backward(sb, ir, RescaleRule(), t, seeds, INPUT))
        return sb.op("Split", [mult], "split", n_out=2, axis=0)[0]

    def gradient_max(sb: GraphBuilder) -> str:
        return to_3d(sb, emit_backward(sb, ir, RescaleGradientMaxRule(), t, seed, INPUT))

    mult_in = b.op(
        "If",
        [rescale_max],
        "maxpool_rule",
        then_branch=_branch(b, "rescale", rescale),
        else_branch=_branch(b, "gradient_max", gradient_max),
    )
    logits, _ = b.op("Split", [t[ir.output]], "split", n_out=2, axis=0)
    b.add_output(logits, "logits", [BATCH, n_classes])
    b.add_output(b.op("Mul", [mult_in, b.op("Sub", [x, ref])], "deeplift_attr"), "attribution", x_shape)
    return b.model()


def _branch(b: GraphBuilder, name: str, emit: Callable[[GraphBuilder], str]) -> onnx.GraphProto:
    """A subgraph of ``b`` (an ``If`` branch) with one output, ``emit``'s result. It reads the outer
    graph's tensors by name; its constants and parameters join the outer graph's initialisers, and
    its tensor names are prefixed with ``name`` so they stay unique in the model."""
    sb = _Prefixed(name, constants=b.constants, params=b.params, prefix=f"{name}:")
    out = sb.op("Identity", [emit(sb)], "result")
    return onnx.helper.make_graph(sb.nodes, name, [], [onnx.helper.make_tensor_value_info(out, FLOAT, None)])


@dataclass
class _Prefixed(GraphBuilder):
    prefix: str = ""

    def fresh(self, hint: str) -> str:
        return self.prefix + super().fresh(hint)


def lrp_graph(ir: ModelIR, x_shape: list, n_classes: int) -> onnx.ModelProto:
    b, x, seed = _start("lrp", x_shape, n_classes)
    eps = b.add_input("epsilon", [])
    t = emit_forward(b, ir, x)
    normalised = to_3d(b, emit_backward(b, ir, EpsilonRule(eps), t, seed, INPUT))
    # Captum scales the propagated (normalised) relevance by the target's output score.
    score = b.op("ReduceSum", [b.op("Mul", [seed, t[ir.output]]), b.const([1], np.int64)], keepdims=1)
    score3 = b.op("Unsqueeze", [score, b.const([2], np.int64)])
    b.add_output(t[ir.output], "logits", [BATCH, n_classes])
    b.add_output(b.op("Mul", [normalised, score3], "lrp_attr"), "attribution", x_shape)
    return b.model()


def gradcam_graph(ir: ModelIR, x_shape: list, n_classes: int, layer: str) -> onnx.ModelProto:
    b, x, seed = _start("gradcam", x_shape, n_classes)
    t = emit_forward(b, ir, x)
    grad = emit_backward(b, ir, Rule(), t, seed, layer)
    op = ir.op_producing(layer)
    assert op is not None
    shape = [BATCH, *op.out_shape]
    b.add_output(t[ir.output], "logits", [BATCH, n_classes])
    b.add_output(to_3d(b, t[layer]), "activations", shape)
    b.add_output(to_3d(b, grad), "gradients", shape)
    return b.model()
