"""``gelu``: GELU, exact (erf) or tanh-approximated (ops/activation.py has the rules)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import nn

from ecgx.training.export.ops.activation import Activation
from ecgx.training.export.ops.onnx_helpers import GraphBuilder

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op

GELU_FORMS = ("none", "tanh")  # PyTorch's ``approximate``: the exact erf form, or the tanh form
_TANH_K = math.sqrt(2.0 / math.pi)
_TANH_C = 0.044715


class Gelu(Activation):
    """GELU, ``x * Phi(x)``, exact (erf) or with PyTorch's tanh approximation (``approximate``)."""

    kind = "gelu"
    monotone = False  # minimum at x = -0.75

    def validate(self, op: Op) -> str | None:
        if op.params.get("approximate") not in GELU_FORMS:
            return f"gelu's approximate must be one of {GELU_FORMS}, got {op.params.get('approximate')!r}"
        return super().validate(op)

    def onnx_f(self, b, op, x):
        half_x = b.op("Mul", [x, b.const(0.5)])
        return b.op("Mul", [half_x, b.op("Add", [b.const(1.0), self._inner(b, op, x)])], op.name)

    def _inner(self, b: GraphBuilder, op: Op, x: str) -> str:
        """erf(x / sqrt 2), or tanh(k (x + c x^3))."""
        if op.params["approximate"] == "none":
            return b.op("Erf", [b.op("Mul", [x, b.const(1.0 / math.sqrt(2.0))])])
        cube = b.op("Mul", [b.op("Mul", [x, x]), x])
        arg = b.op("Mul", [b.op("Add", [x, b.op("Mul", [cube, b.const(_TANH_C)])]), b.const(_TANH_K)])
        return b.op("Tanh", [arg])

    def emit_derivative(self, b, op, x, y):
        t = self._inner(b, op, x)
        cdf = b.op("Mul", [b.op("Add", [b.const(1.0), t]), b.const(0.5)])
        if op.params["approximate"] == "none":  # Phi(x) + x * phi(x)
            density = b.op("Exp", [b.op("Mul", [b.op("Mul", [x, x]), b.const(-0.5)])])
            slope = b.op("Mul", [b.op("Mul", [x, density]), b.const(1.0 / math.sqrt(2.0 * math.pi))])
        else:  # 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2)
            sech2 = b.op("Sub", [b.const(1.0), b.op("Mul", [t, t])])
            poly = b.op("Add", [b.const(1.0), b.op("Mul", [b.op("Mul", [x, x]), b.const(3.0 * _TANH_C)])])
            slope = b.op("Mul", [b.op("Mul", [b.op("Mul", [x, sech2]), poly]), b.const(0.5 * _TANH_K)])
        return b.op("Add", [cdf, slope], "gelu'")

    def torch_module(self, op: Op) -> nn.Module:
        return nn.GELU(approximate=op.params["approximate"])
