"""The element-wise activations other than ReLU: their shared ``Activation`` base and rules.

Each activation is one short subclass in its own ``op_<kind>.py`` (LeakyReLU, ELU, GELU, SiLU,
Mish, Sigmoid, Tanh), listed once in ``OP_SPECS``.

Each kind emits its forward pass with the ONNX ops of opset 17 (``Gelu`` is opset 20, so GELU
is spelled with ``Erf`` or ``Tanh``), its exact derivative (``emit_derivative``), and routes its
backward step to ``rule.activation``, where each method's rule for activations lives
(``onnx_graphs``, ``lrp_rules``):

* gradient methods (saliency, input x gradient, integrated gradients, SmoothGrad, GradCAM's
  gradients): the exact derivative;
* guided backprop and deconvolution: the plain derivative. Both rules are defined on ReLUs,
  and Captum's ``ModifiedReluGradientAttribution._register_hooks`` overrides ``nn.ReLU``
  modules only, so every other activation passes the plain gradient there;
* DeepLIFT rescale: delta-out / delta-in, the derivative where |delta-in| < 1e-10 (Shrikumar et
  al. 2017; Captum's ``nonlinear`` rule, which its ``SUPPORTED_NON_LINEAR`` applies to ELU,
  LeakyReLU, Sigmoid and Tanh). Defined here for the monotone activations only: Captum does not
  apply it to GELU, SiLU or Mish (it passes their plain gradient, which breaks DeepLIFT's
  summation-to-delta), and on a non-monotone activation the multiplier's sign no longer says
  whether the unit's input moved its output up or down; those packages leave ``deeplift`` out
  with the reason (``monotone``);
* LRP: relevance passes unchanged (Zennit's ``Pass`` for ``zennit.types.Activation``, which lists
  ELU, LeakyReLU, GELU, SiLU, Sigmoid and Tanh; Captum passes ReLU and Tanh alike). Zennit's list
  has no ``nn.Mish`` (added to PyTorch after it), so Zennit alone would take Mish's gradient;
  Mish is an activation like SiLU, and Pass is applied to it too (checked against the
  plain-autograd rule reference, ``lrp_reference``).

Their zeros are not exact (``zero_exact`` stays False), and only LeakyReLU and ELU with
alpha != 1 have a kink at 0 where float32 rounding may switch the derivative
(``kinked_at_zero``: the near-tie scan of ReLU inputs covers them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ecgx.training.export.ops.base import PASS, OpKind
from ecgx.training.export.ops.onnx_helpers import FLOAT, GraphBuilder

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op
    from ecgx.training.export.onnx_graphs import Rule


class Activation(OpKind):
    """An element-wise activation ``y = f(x)``: subclasses give ``f`` and ``f'`` in ONNX and the
    PyTorch module; ``monotone`` says whether DeepLIFT's rescale rule is defined for it."""

    is_activation = True
    lrp_role = PASS
    monotone: ClassVar[bool] = True
    # f(0) == 0: the relevance a unit passes shrinks with its input, as after a ReLU (LRP-epsilon's
    # conditioning, ``reference.ill_conditioned_samples``); False for the sigmoid (f(0) = 1/2).
    zero_at_zero: ClassVar[bool] = True

    def validate(self, op: Op) -> str | None:
        if len(op.inputs) != 1 or op.out_shape != op.in_shape:
            return f"{self.kind} takes one tensor and keeps its shape"
        return None

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        return self.onnx_f(b, op, ins[0])

    def emit_backward(
        self, rule: Rule, b: GraphBuilder, op: Op, g: str, ins: list[str], out: str
    ) -> list[str]:
        return [rule.activation(b, op, g, ins[0], out)]

    def emit_derivative(self, b: GraphBuilder, op: Op, x: str, y: str) -> str:
        """``g * f'(x)`` needs ``f'(x)``: the exact derivative at input ``x`` (output ``y``)."""
        raise NotImplementedError

    def onnx_f(self, b: GraphBuilder, op: Op, x: str) -> str:
        raise NotImplementedError

    def emit_secant(self, b: GraphBuilder, op: Op, x: str, r: str, y: str, y_r: str, d: str) -> str:
        """DeepLIFT's multiplier ``(f(x) - f(r)) / d`` (``d``: x - r, never 0). This naive form
        loses digits where |x - r| is small against |x|: float32 rounds f(x) and f(r) apart from
        each other, and the quotient amplifies it. The monotone kinds override it with a form
        whose only small quantity is ``d`` itself."""
        return b.op("Div", [b.op("Sub", [y, y_r]), d], "secant")


def positive(b: GraphBuilder, x: str) -> str:
    """1.0 where x > 0, else 0.0 (PyTorch's derivative of LeakyReLU and ELU takes the negative
    side at 0)."""
    return b.op("Cast", [b.op("Greater", [x, b.const(0.0)])], "positive", to=FLOAT)


def sinhc(b: GraphBuilder, u: str) -> str:
    """sinh(u) / u for u != 0, accurate for small u (sinh is)."""
    return b.op("Div", [b.op("Sinh", [u]), u], "sinhc")


def where_close(b: GraphBuilder, d: str, stable: str, naive: str) -> str:
    """``stable`` where |d| < 1 (where the naive quotient loses digits), ``naive`` elsewhere (where
    the stable form's sinh or cosh could overflow)."""
    return b.op("Where", [b.op("Less", [b.op("Abs", [d]), b.const(1.0)]), stable, naive], "secant")
