"""``gmp``: global max pooling over time, (C, L) -> (C, 1) (AdaptiveMaxPool1d(1))."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from ecgx.training.export.ops.base import MaxWindow, OpKind, signal_input_problem
from ecgx.training.export.ops.onnx_helpers import FLOAT, I64, GraphBuilder

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op
    from ecgx.training.export.onnx_graphs import Rule


class GlobalMaxPool(OpKind):
    kind = "gmp"
    is_rule_layer = True

    def validate(self, op: Op) -> str | None:
        return signal_input_problem(op)

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        return b.op("GlobalMaxPool", ins, op.name)

    def emit_backward(
        self, rule: Rule, b: GraphBuilder, op: Op, g: str, ins: list[str], out: str
    ) -> list[str]:
        return [rule.maxpool(b, g, ins[0], out, op)]

    def emit_route_max(self, b: GraphBuilder, g: str, a: str, op: Op) -> str:
        """g to the first maximum over time of each channel."""
        idx = b.op("ArgMax", [a], "argmax", axis=3, keepdims=1, select_last_index=0)
        positions = b.const(np.arange(op.in_shape[1]).reshape(1, 1, 1, -1), I64)
        first = b.op("Cast", [b.op("Equal", [positions, idx])], "first", to=FLOAT)
        return b.op("Mul", [g, first], "route_gmp")

    def torch_module(self, op: Op) -> nn.Module:
        return nn.AdaptiveMaxPool1d(1)

    def max_window(self, op: Op) -> MaxWindow | None:
        return op.in_shape[1], 1, 0, False  # one window over the whole signal

    def zero_exact(self, inputs_exact: bool) -> bool:
        return inputs_exact
