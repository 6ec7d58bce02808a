"""Zennit's standard LRP composites as ONNX graphs: EpsilonPlus and EpsilonAlpha2Beta1.

A composite assigns an LRP rule to each kind of layer. These follow Zennit's
``EpsilonPlus`` and ``EpsilonAlpha2Beta1`` (``zennit.composites``) on the IR's ops:

============================ ================================ ==============================
IR op                        EpsilonPlus                      EpsilonAlpha2Beta1
============================ ================================ ==============================
conv (incl. 1x1 shortcuts,   ZPlus                            AlphaBeta(alpha=2, beta=1)
grouped, depthwise)
linear                       Epsilon(epsilon)                 Epsilon(epsilon)
add, avgpool, gap            Norm (Zennit's layer_map_base: ``Sum`` and every ``AvgPool``,
                             adaptive ones included)
relu                         Pass (relevance unchanged)
affine (an unfolded          Pass (Zennit's BatchNorm rule)
BatchNorm)
maxpool, gmp                 unmapped in Zennit: the plain gradient (relevance routed to
                             each window's first maximum)
flatten, concat              unmapped: the plain gradient, which only moves relevance
============================ ================================ ==============================

The layers that read the ECG (every conv or linear op reached from the input through no
other conv or linear op: one in a plain CNN, one per branch in an inception stem) take the
*input rule* chosen at run time by the graph input ``input_rule`` (int64 scalar): 0 the
composite's own rule, 1 Flat, 2 ZBox (z^B) with per-ECG bounds ``low`` and ``high`` (mV, the
values of the layer's own input: the ECG itself unless pooling or an unfolded BatchNorm
comes first, in which case the bounds apply to that op's output, as in Zennit). All three
are computed at the input layers and blended by 0/1 weights (simpler than an ONNX ``If``
with subgraphs; the input layers are a small part of the graph, and every branch is finite,
so the blend is exact).

Rule details as Zennit defines them (``zennit.rules``), with ``s = R_out / stab(z)`` and
``stab(z) = z + c * sign(z)``, sign(0) = +1:

* Epsilon: ``z = W a + b``, ``R_in = a * W^T s``; ``c`` is ``epsilon`` (a graph input).
* ZPlus: ``z = W+ a+ + W- a- + b+``; ``R_in = a+ * W+^T s + a- * W-^T s``; ``c`` is the
  stabiliser (``STABILIZER``, Zennit's default 1e-6), as for every rule but Epsilon.
* AlphaBeta(2, 1): ``p = W+ a+ + W- a- + b+``, ``n = W- a+ + W+ a- + b-``;
  ``R_in = 2 (a+ * W+^T s_p + a- * W-^T s_p) - (a+ * W-^T s_n + a- * W+^T s_n)``.
* Norm: ``z`` is the layer's output, ``R_in = a * J^T s`` per input (an addition splits
  relevance in proportion to each branch's contribution).
* Flat: ``z = 1^T 1`` (the number of inputs each output reads, bias dropped),
  ``R_in = 1^T s``.
* ZBox: ``z = W a - W+ l - W- h`` (Zennit keeps the biases in its three terms, where they
  cancel exactly; they are left out here), ``R_in = a * W^T s - l * W+^T s - h * W-^T s``.

Relevance at the output follows the service's ``lrp`` convention (Captum's): it starts as
the target's logit (``seed * logits``), so attributions sum to about the logit. In Zennit's
terms the relevance passed to the attributor is ``one_hot(target) * logits``.

Where this follows Zennit on a pattern Zennit does not cover by itself: additions are
Zennit's ``Sum`` (its ResNet canonizer's rewrite; ``Add`` modules take two inputs, which
Zennit's hooks cannot); an unfolded BatchNorm is Zennit's ``BatchNorm`` (Pass); and the input
rule goes to *every* layer reading the ECG, where Zennit's ``SpecialFirstLayerMapComposite``
gives it to the first such module only (on an inception stem that would leave the other
branches on the composite's rule, an artifact of module order). tests/training/test_lrp_rules.py
checks the graphs against Zennit set up that way.

Conditioning: Norm divides by a sum. On a pre-activation residual block the addition's
output also feeds an unfolded BatchNorm and a ReLU, whose relevance does not vanish where the
sum nearly cancels, so the branches get large opposite shares that amplify the float32
rounding of the sum: Zennit, the PyTorch reference and these graphs then differ by rounding
on such samples (``lrp_reference.float32_sensitive_samples`` flags them; about half of the
samples of the test's pre-activation network).

Conservation: relevance is conserved layer by layer except for what biases, the
stabiliser and epsilon absorb, and except where a rule's denominator part is empty: a
ZPlus unit with no positive contribution drops its relevance; an AlphaBeta unit with no
negative (positive) contribution passes 2x (-1x) its relevance. Max pooling, ReLU, affine
(Pass), flatten and concatenation conserve exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto

from ecgx.core.errors import InvalidArgument
from ecgx.service.methods.lrp import COMPOSITE_GRAPHS, INPUT_RULES
from ecgx.training.export.ir import INPUT, ModelIR, Op
from ecgx.training.export.onnx_graphs import (
    BATCH,
    FLOAT,
    GraphBuilder,
    Rule,
    bias,
    emit_backward,
    emit_forward,
    forward_op,
    relevance_to_signal,
    stabilise,
    to_3d,
    transpose_op,
    weight,
)
from ecgx.training.export.ops import OP_SPECS
from ecgx.training.export.ops.base import CONV_RULE, DENSE_RULE, NORM, PASS

# Zennit's default stabiliser of every rule but Epsilon (``stabilizer=1e-6`` in its composites).
STABILIZER = 1e-6
# Composite name (as the service's ``composite`` parameter) -> graph name; the service's
# tables are the one source, so the service and the graphs cannot disagree on names or codes.
COMPOSITE_GRAPH_NAMES: dict[str, str] = {c: g for c, g in COMPOSITE_GRAPHS.items() if c != "epsilon"}
I64 = np.int64


def input_layers(ir: ModelIR) -> set[str]:
    """Names of the conv and linear ops that read the ECG: reached from the input through no
    other conv or linear op (Zennit's "first layer"; one per branch where the input branches)."""
    reach, found = {INPUT}, set()
    for op in ir.ops:
        if not any(i in reach for i in op.inputs):
            continue
        if OP_SPECS[op.kind].lrp_role in (CONV_RULE, DENSE_RULE):
            found.add(op.name)
        else:
            reach.add(op.output)
    return found


def _pos(b: GraphBuilder, t: str) -> str:
    return b.op("Relu", [t], "pos")


def _neg(b: GraphBuilder, t: str) -> str:
    # min(t, 0) exactly (t - relu(t) would round for large magnitudes only; Min is exact).
    return b.op("Min", [t, b.const(0.0)], "neg")


class CompositeRule(Rule):
    """One of Zennit's composites (``conv_rule`` "zplus" or "alpha2beta1") as a graph ``Rule``.

    ``eps`` (Epsilon on dense layers), ``input_rule`` (int64 scalar), ``low`` and ``high``
    ((B,) bounds for ZBox) are graph tensor names; ``first`` the input layers' op names.
    """

    def __init__(
        self,
        name: str,
        conv_rule: str,
        first: set[str],
        eps: str,
        input_rule: str,
        low: str,
        high: str,
    ) -> None:
        if conv_rule not in ("zplus", "alpha2beta1"):
            raise InvalidArgument(f"unknown conv rule {conv_rule!r}")
        self.name, self.conv_rule, self.first = name, conv_rule, first
        self.eps, self.input_rule, self.low, self.high = eps, input_rule, low, high

    # ReLU: Zennit's Pass for activations.
    def relu(self, b, g, z, out):
        return g

    # Every other activation: Pass too (``ops/activation.py``: Zennit's ``Activation`` types).
    def activation(self, b, op, g, z, out):
        return g

    # A gating product: relevance to the signal, the gate a constant (Zennit has no product rule;
    # Arras et al.'s treatment, as the epsilon rule's, ``onnx_graphs.relevance_to_signal``).
    def product(self, b, op, g, ins, out):
        return relevance_to_signal(op, g)

    # Max pooling: unmapped in Zennit, Rule.maxpool (the gradient) routes relevance.
    def layer(self, b, op, g, ins, out):
        role = OP_SPECS[op.kind].lrp_role  # the op's place in Zennit's layer map
        if role == PASS:  # an unfolded BatchNorm: Zennit's BatchNorm rule is Pass
            return [g]
        if role == NORM:
            return self._norm(b, op, g, ins, out)
        if role not in (CONV_RULE, DENSE_RULE):  # unmapped: the plain gradient
            return transpose_op(b, op, g)
        own = self._own(b, op, g, ins[0], out)
        if op.name not in self.first:
            return [own]
        flat = self._flat(b, op, g)
        zbox = self._zbox(b, op, g, ins[0])
        parts = []
        for rule, r in zip(INPUT_RULES.values(), (own, flat, zbox), strict=True):
            picked = b.op("Cast", [b.op("Equal", [self.input_rule, b.const(rule, I64)])], "pick", to=FLOAT)
            parts.append(b.op("Mul", [r, picked]))
        return [b.op("Sum", parts, "input_rule")]

    def _stabilised_share(self, b: GraphBuilder, g: str, z: str, eps: str | None = None) -> str:
        return b.op("Div", [g, stabilise(b, z, eps or b.const(STABILIZER))], "lrp_s")

    def _norm(self, b, op, g, ins, out) -> list[str]:
        s = self._stabilised_share(b, g, out)
        return [b.op("Mul", [c, a], "norm_r") for c, a in zip(transpose_op(b, op, s), ins, strict=True)]

    def _own(self, b: GraphBuilder, op: Op, g: str, a: str, out: str) -> str:
        if OP_SPECS[op.kind].lrp_role == DENSE_RULE:  # Epsilon: z is the layer's output, bias included
            s = self._stabilised_share(b, g, out, self.eps)
            return b.op("Mul", [transpose_op(b, op, s)[0], a], "eps_r")
        w = weight(b, op)
        w_pos, w_neg = _pos(b, w), _neg(b, w)
        bias_t = bias(b, op)
        b_pos = _pos(b, bias_t) if bias_t else None
        b_neg = _neg(b, bias_t) if bias_t else None
        a_pos, a_neg = _pos(b, a), _neg(b, a)

        def z(x1: str, w1: str, x2: str, w2: str, b1: str | None) -> str:
            return b.op("Add", [forward_op(b, op, [x1], w1, b1), forward_op(b, op, [x2], w2, None)])

        def back(s: str, x1: str, w1: str, x2: str, w2: str) -> str:
            r1 = b.op("Mul", [transpose_op(b, op, s, w1)[0], x1])
            r2 = b.op("Mul", [transpose_op(b, op, s, w2)[0], x2])
            return b.op("Add", [r1, r2])

        s_pos = self._stabilised_share(b, g, z(a_pos, w_pos, a_neg, w_neg, b_pos))
        positive = back(s_pos, a_pos, w_pos, a_neg, w_neg)
        if self.conv_rule == "zplus":
            return positive
        s_neg = self._stabilised_share(b, g, z(a_pos, w_neg, a_neg, w_pos, b_neg))
        negative = back(s_neg, a_pos, w_neg, a_neg, w_pos)
        return b.op("Sub", [b.op("Mul", [positive, b.const(2.0)]), negative], "alpha_beta")

    def _flat(self, b: GraphBuilder, op: Op, g: str) -> str:
        # z counts the inputs each output reads (padding excluded): a constant ONNX Runtime folds at load.
        ones_w = b.const(np.ones(op.params["weight"].shape))
        ones_in = b.const(
            np.ones((1, op.in_shape[0], 1, op.in_shape[1]) if len(op.in_shape) == 2 else (1, op.in_shape[0]))
        )
        z = forward_op(b, op, [ones_in], ones_w, None)
        return transpose_op(b, op, self._stabilised_share(b, g, z), ones_w)[0]

    def _zbox(self, b: GraphBuilder, op: Op, g: str, a: str) -> str:
        view = [-1, 1, 1, 1] if len(op.in_shape) == 2 else [-1, 1]  # (B, C, 1, L) or (B, F)
        zeros = b.op("Mul", [a, b.const(0.0)], "zeros")
        low = b.op("Add", [zeros, b.op("Reshape", [self.low, b.const(view, I64)])], "low")
        high = b.op("Add", [zeros, b.op("Reshape", [self.high, b.const(view, I64)])], "high")
        w = weight(b, op)
        w_pos, w_neg = _pos(b, w), _neg(b, w)
        z = b.op(
            "Sub",
            [
                forward_op(b, op, [a], w, None),
                b.op("Add", [forward_op(b, op, [low], w_pos, None), forward_op(b, op, [high], w_neg, None)]),
            ],
            "zbox_z",
        )
        s = self._stabilised_share(b, g, z)
        r_x = b.op("Mul", [transpose_op(b, op, s, w)[0], a])
        r_low = b.op("Mul", [transpose_op(b, op, s, w_pos)[0], low])
        r_high = b.op("Mul", [transpose_op(b, op, s, w_neg)[0], high])
        return b.op("Sub", [r_x, b.op("Add", [r_low, r_high])], "zbox_r")


# --------------------------------------------------------------------------- whole graphs

# Inputs and outputs of each composite graph, in GRAPH_SIGNATURES' format.
LRP_COMPOSITE_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    graph: (("x", "seed", "epsilon", "input_rule", "low", "high"), ("logits", "attribution"))
    for graph in COMPOSITE_GRAPH_NAMES.values()
}


def composite_graph(ir: ModelIR, x_shape: list, n_classes: int, conv_rule: str, name: str) -> onnx.ModelProto:
    """The graph ``name``: logits and the composite's relevance at the input (B, C, L).

    Inputs: ``x`` (B, C, L), ``seed`` (B, classes; one-hot target rows), ``epsilon`` (scalar,
    the dense layers' Epsilon), ``input_rule`` (int64 scalar, see ``INPUT_RULES``), ``low`` and
    ``high`` ((B,) ZBox bounds, read only when ``input_rule`` is 2).
    """
    b = GraphBuilder(name)
    x = b.add_input("x", x_shape)
    seed = b.add_input("seed", [BATCH, n_classes])
    eps = b.add_input("epsilon", [])
    input_rule = b.add_input("input_rule", [], TensorProto.INT64)
    low = b.add_input("low", [BATCH])
    high = b.add_input("high", [BATCH])
    rule = CompositeRule(name, conv_rule, input_layers(ir), eps, input_rule, low, high)
    t = emit_forward(b, ir, x)
    # Relevance starts as the target's logit (the service's lrp convention, Captum's scaling).
    relevance = b.op("Mul", [seed, t[ir.output]], "relevance_out")
    attribution = to_3d(b, emit_backward(b, ir, rule, t, relevance, INPUT))
    b.add_output(t[ir.output], "logits", [BATCH, n_classes])
    b.add_output(attribution, "attribution", x_shape)
    return b.model()


LRP_COMPOSITE_GRAPHS: dict[str, Callable[[ModelIR, list, int], onnx.ModelProto]] = {
    "lrp_epsilon_plus": lambda ir, x_shape, n: composite_graph(ir, x_shape, n, "zplus", "lrp_epsilon_plus"),
    "lrp_epsilon_alpha2_beta1": lambda ir, x_shape, n: composite_graph(
        ir, x_shape, n, "alpha2beta1", "lrp_epsilon_alpha2_beta1"
    ),
}
