"""``elu``: ELU with its alpha (ops/activation.py has the rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ecgx.training.export.ops.activation import Activation, positive, sinhc, where_close

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class Elu(Activation):
    kind = "elu"

    def validate(self, op: Op) -> str | None:
        if op.params.get("alpha", -1.0) < 0:
            return f"elu needs a non-negative alpha, got {op.params.get('alpha')}"
        return super().validate(op)

    def onnx_f(self, b, op, x):
        return b.op("Elu", [x], op.name, alpha=float(op.params["alpha"]))

    def emit_derivative(self, b, op, x, y):
        # 1 where x > 0, alpha * exp(x) elsewhere (exp of min(x, 0): never overflows)
        pos = positive(b, x)
        neg = b.op("Mul", [b.op("Exp", [b.op("Min", [x, b.const(0.0)])]), b.const(float(op.params["alpha"]))])
        return b.op("Add", [pos, b.op("Mul", [neg, b.op("Sub", [b.const(1.0), pos])])])

    def emit_secant(self, b, op, x, r, y, y_r, d):
        # Both below 0: alpha * (e^x - e^r) / d = alpha * e^((x + r) / 2) * sinh(d / 2) / (d / 2).
        negative = b.op("Mul", [sinhc(b, b.op("Mul", [d, b.const(0.5)])), b.const(float(op.params["alpha"]))])
        mid = b.op("Mul", [b.op("Add", [x, r]), b.const(0.5)])
        stable = b.op("Mul", [negative, b.op("Exp", [b.op("Min", [mid, b.const(0.0)])])])
        both_negative = b.op(
            "Not", [b.op("Or", [b.op("Greater", [x, b.const(0.0)]), b.op("Greater", [r, b.const(0.0)])])]
        )
        naive = super().emit_secant(b, op, x, r, y, y_r, d)  # exactly 1 where both are above 0
        return where_close(b, d, b.op("Where", [both_negative, stable, naive]), naive)

    def torch_module(self, op: Op) -> nn.Module:
        return nn.ELU(float(op.params["alpha"]))

    def kinked_at_zero(self, op: Op) -> bool:
        return float(op.params["alpha"]) != 1.0
