"""``tanh``: the hyperbolic tangent (ops/activation.py has the rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ecgx.training.export.ops.activation import Activation, sinhc, where_close

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class Tanh(Activation):
    kind = "tanh"

    def onnx_f(self, b, op, x):
        return b.op("Tanh", [x], op.name)

    def emit_derivative(self, b, op, x, y):
        return b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])], "tanh'")

    def emit_secant(self, b, op, x, r, y, y_r, d):
        # tanh(x) - tanh(r) = sinh(d) / (cosh(x) cosh(r))
        cosh = b.op("Mul", [b.op("Cosh", [x]), b.op("Cosh", [r])])
        return where_close(
            b, d, b.op("Div", [sinhc(b, d), cosh]), super().emit_secant(b, op, x, r, y, y_r, d)
        )

    def torch_module(self, op: Op) -> nn.Module:
        return nn.Tanh()
