"""``maxpool``: MaxPool1d. params: kernel, stride, padding (-inf), ceil_mode."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ecgx.training.export.ops.base import MaxWindow, OpKind, pool_problem
from ecgx.training.export.ops.onnx_helpers import (
    FLOAT,
    I64,
    NEG_LARGE,
    GraphBuilder,
    pad_for_pool,
    pool_extent,
)

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op
    from ecgx.training.export.onnx_graphs import Rule


class MaxPool(OpKind):
    kind = "maxpool"
    is_rule_layer = True

    def validate(self, op: Op) -> str | None:
        return pool_problem(op)

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        padded, _ = pad_for_pool(b, ins[0], op, NEG_LARGE)
        k, s = op.params["kernel"], op.params["stride"]
        return b.op("MaxPool", [padded], op.name, kernel_shape=[1, k], strides=[1, s])

    def emit_backward(
        self, rule: Rule, b: GraphBuilder, op: Op, g: str, ins: list[str], out: str
    ) -> list[str]:
        return [rule.maxpool(b, g, ins[0], out, op)]

    def emit_route_max(self, b: GraphBuilder, g: str, a: str, op: Op) -> str:
        """g goes to the first maximum of each window (PyTorch's choice on ties); overlapping
        windows that share a maximum add their gradients there."""
        p = op.params
        k, s = p["kernel"], p["stride"]
        left, right, _ = pool_extent(op)
        if k == 2 and s == 2 and left == 0 and right <= 0:
            return _route_max_pairs(b, g, a, op)
        padded, _ = pad_for_pool(b, a, op, NEG_LARGE)
        # ONNX Runtime's MaxPool reports the first maximum's flat index into its (padded) input.
        _, idx = b.op("MaxPool", [padded], "argmax", n_out=2, kernel_shape=[1, k], strides=[1, s])
        if s >= k and left == 0:  # windows do not overlap: each index is hit at most once
            routed = b.op(
                "MaxUnpool", [g, idx, b.op("Shape", [padded])], "route", kernel_shape=[1, k], strides=[1, s]
            )
        else:
            zeros = b.op("Mul", [b.op("Reshape", [padded, b.const([-1], I64)]), b.const(0.0)])
            flat = b.op(
                "ScatterElements",
                [zeros, b.op("Reshape", [idx, b.const([-1], I64)]), b.op("Reshape", [g, b.const([-1], I64)])],
                "route",
                axis=0,
                reduction="add",
            )
            routed = b.op("Reshape", [flat, b.op("Shape", [padded])])
        if left == 0 and right <= 0:
            return routed
        length = op.in_shape[1]
        return b.op(
            "Slice", [routed, b.const([left], I64), b.const([left + length], I64), b.const([3], I64)], "unpad"
        )

    def torch_module(self, op: Op) -> nn.Module:
        p = op.params
        return nn.MaxPool1d(p["kernel"], p["stride"], p["padding"], ceil_mode=p["ceil_mode"])

    def max_window(self, op: Op) -> MaxWindow | None:
        p = op.params
        return p["kernel"], p["stride"], p["padding"], p["ceil_mode"]

    def zero_exact(self, inputs_exact: bool) -> bool:
        return inputs_exact


def _route_max_pairs(b: GraphBuilder, g: str, a: str, op: Op) -> str:
    """Kernel-2 routing by comparing the two samples of each window: 2x faster than
    MaxPool-with-indices + MaxUnpool on ONNX Runtime's CPU provider (measured)."""
    c, length = op.in_shape
    n_out = op.out_shape[1]
    if 2 * n_out != length:
        a = b.op("Slice", [a, b.const([0], I64), b.const([2 * n_out], I64), b.const([3], I64)])
    pairs = b.op("Reshape", [a, b.const([-1, c, 1, n_out, 2], I64)])
    left, right = b.op("Split", [pairs], "pair", n_out=2, axis=4)
    first = b.op("Cast", [b.op("GreaterOrEqual", [left, right])], "first", to=FLOAT)
    g5 = b.op("Unsqueeze", [g, b.const([4], I64)])
    to_left = b.op("Mul", [g5, first])
    routed = b.op("Concat", [to_left, b.op("Sub", [g5, to_left])], "route", axis=4)
    routed = b.op("Reshape", [routed, b.const([-1, c, 1, 2 * n_out], I64)])
    if 2 * n_out == length:
        return routed
    # Samples that fell off the end of the last window get no gradient, as in PyTorch.
    return b.op("Pad", [routed, b.const([0, 0, 0, 0, 0, 0, 0, length - 2 * n_out], I64)])
