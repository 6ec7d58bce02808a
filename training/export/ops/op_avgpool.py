"""``avgpool``: AvgPool1d. params: kernel, stride, padding (zeros), ceil_mode, count_include_pad."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ecgx.training.export.ops.base import NORM, OpKind, pool_problem
from ecgx.training.export.ops.onnx_helpers import GraphBuilder, conv_input_gradient, pool_extent

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class AvgPool(OpKind):
    kind = "avgpool"
    is_rule_layer = True
    lrp_role = NORM

    def validate(self, op: Op) -> str | None:
        return pool_problem(op)

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        """A depthwise convolution with a ones kernel times 1 / PyTorch's divisor: the same
        windows and divisors as PyTorch for any padding and ceil_mode."""
        left, right, _ = pool_extent(op)
        k, s = op.params["kernel"], op.params["stride"]
        summed = b.op(
            "Conv",
            [ins[0], b.const(np.ones((op.in_shape[0], 1, 1, k)))],
            "window_sum",
            kernel_shape=[1, k],
            strides=[1, s],
            pads=[0, left, 0, right],
            group=op.in_shape[0],
        )
        inv = b.const((1.0 / avg_pool_divisors(op)).reshape(1, 1, 1, -1))
        return b.op("Mul", [summed, inv], op.name)

    def emit_transpose(self, b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
        p = op.params
        left, right, n = pool_extent(op)
        scaled = b.op("Mul", [g, b.const((1.0 / avg_pool_divisors(op)).reshape(1, 1, 1, -1))])
        c, k = op.in_shape[0], p["kernel"]
        ones = b.const(np.ones((c, 1, k)))
        return [
            conv_input_gradient(
                b, scaled, ones, k, p["stride"], (left, right), 1, c, (op.in_shape[1], n), (c, 1, k)
            )
        ]

    def torch_module(self, op: Op) -> nn.Module:
        p = op.params
        return nn.AvgPool1d(
            p["kernel"],
            p["stride"],
            p["padding"],
            ceil_mode=p["ceil_mode"],
            count_include_pad=p["count_include_pad"],
        )

    def magnitude(self, layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        return layer(inputs[0].abs())

    def zero_exact(self, inputs_exact: bool) -> bool:
        return inputs_exact


def avg_pool_divisors(op: Op) -> np.ndarray:
    """PyTorch's divisor per output position of AvgPool1d (count_include_pad counts the padding,
    never the part of a ceil_mode window beyond it)."""
    p, length = op.params, op.in_shape[1]
    k, s, pad = p["kernel"], p["stride"], p["padding"]
    _, _, n = pool_extent(op)
    start = np.arange(n) * s - pad
    end = np.minimum(start + k, length + pad)
    if p["count_include_pad"]:
        return (end - start).astype(np.float64)
    return (np.minimum(end, length) - np.maximum(start, 0)).astype(np.float64)
