"""``mish``: Mish, x * tanh(softplus(x)) (ops/activation.py has the rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ecgx.training.export.ops.activation import Activation

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class Mish(Activation):
    """Mish: ``x * tanh(softplus(x))``."""

    kind = "mish"
    monotone = False  # minimum at x = -1.19

    def onnx_f(self, b, op, x):
        return b.op("Mul", [x, b.op("Tanh", [b.op("Softplus", [x])])], op.name)

    def emit_derivative(self, b, op, x, y):
        # tanh(sp) + x * sigmoid(x) * (1 - tanh(sp)^2), sp = softplus(x)
        t = b.op("Tanh", [b.op("Softplus", [x])])
        slope = b.op(
            "Mul", [b.op("Mul", [x, b.op("Sigmoid", [x])]), b.op("Sub", [b.const(1.0), b.op("Mul", [t, t])])]
        )
        return b.op("Add", [t, slope], "mish'")

    def torch_module(self, op: Op) -> nn.Module:
        return nn.Mish()
