"""``sigmoid``: the logistic function (ops/activation.py has the rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ecgx.training.export.ops.activation import Activation, sinhc, where_close

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class Sigmoid(Activation):
    kind = "sigmoid"
    zero_at_zero = False

    def onnx_f(self, b, op, x):
        return b.op("Sigmoid", [x], op.name)

    def emit_derivative(self, b, op, x, y):
        return b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])], "sigmoid'")

    def emit_secant(self, b, op, x, r, y, y_r, d):
        # sigmoid(x) - sigmoid(r) = sinh(d / 2) / (2 cosh(x / 2) cosh(r / 2))
        half = b.const(0.5)
        cosh = b.op("Mul", [b.op("Cosh", [b.op("Mul", [x, half])]), b.op("Cosh", [b.op("Mul", [r, half])])])
        stable = b.op("Div", [sinhc(b, b.op("Mul", [d, half])), b.op("Mul", [cosh, b.const(4.0)])])
        return where_close(b, d, stable, super().emit_secant(b, op, x, r, y, y_r, d))

    def torch_module(self, op: Op) -> nn.Module:
        return nn.Sigmoid()
