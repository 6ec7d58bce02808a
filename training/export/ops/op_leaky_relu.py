"""``leaky_relu``: LeakyReLU with its slope (ops/activation.py has the rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ecgx.training.export.ops.activation import Activation, positive

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class LeakyRelu(Activation):
    kind = "leaky_relu"

    def validate(self, op: Op) -> str | None:
        if op.params.get("slope", -1.0) < 0:
            return f"leaky_relu needs a non-negative slope, got {op.params.get('slope')}"
        return super().validate(op)

    def onnx_f(self, b, op, x):
        return b.op("LeakyRelu", [x], op.name, alpha=float(op.params["slope"]))

    def emit_derivative(self, b, op, x, y):
        slope = float(op.params["slope"])  # slope + (1 - slope) * [x > 0]
        return b.op("Add", [b.op("Mul", [positive(b, x), b.const(1.0 - slope)]), b.const(slope)])

    def emit_secant(self, b, op, x, r, y, y_r, d):
        # slope + (1 - slope) * (relu(x) - relu(r)) / d: exactly 1 or slope when x and r share a side
        relu_d = b.op("Sub", [b.op("Relu", [x]), b.op("Relu", [r])])
        slope = float(op.params["slope"])
        return b.op("Add", [b.op("Mul", [b.op("Div", [relu_d, d]), b.const(1.0 - slope)]), b.const(slope)])

    def torch_module(self, op: Op) -> nn.Module:
        return nn.LeakyReLU(float(op.params["slope"]))

    def kinked_at_zero(self, op: Op) -> bool:
        return float(op.params["slope"]) != 1.0
