"""``silu``: SiLU / Swish, x * sigmoid(x) (ops/activation.py has the rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ecgx.training.export.ops.activation import Activation

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class Silu(Activation):
    """SiLU / Swish: ``x * sigmoid(x)``."""

    kind = "silu"
    monotone = False  # minimum at x = -1.28

    def onnx_f(self, b, op, x):
        return b.op("Mul", [x, b.op("Sigmoid", [x])], op.name)

    def emit_derivative(self, b, op, x, y):
        s = b.op("Sigmoid", [x])  # s * (1 + x * (1 - s))
        return b.op("Mul", [s, b.op("Add", [b.const(1.0), b.op("Mul", [x, b.op("Sub", [b.const(1.0), s])])])])

    def torch_module(self, op: Op) -> nn.Module:
        return nn.SiLU()
