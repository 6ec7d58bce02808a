"""``gap``: global average pooling over time, (C, L) -> (C, 1) (AdaptiveAvgPool1d(1))."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ecgx.training.export.ops.base import NORM, OpKind, signal_input_problem
from ecgx.training.export.ops.onnx_helpers import GraphBuilder

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class GlobalAvgPool(OpKind):
    kind = "gap"
    is_rule_layer = True
    lrp_role = NORM  # Zennit maps every AvgPool, adaptive ones included, to Norm

    def validate(self, op: Op) -> str | None:
        return signal_input_problem(op)

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        return b.op("GlobalAveragePool", ins, op.name)

    def emit_transpose(self, b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
        length = op.in_shape[1]
        return [b.op("Mul", [g, b.const(np.full((1, 1, 1, length), 1.0 / length))], "gap.T")]

    def torch_module(self, op: Op) -> nn.Module:
        return nn.AdaptiveAvgPool1d(1)

    def magnitude(self, layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        return inputs[0].abs().mean(dim=-1, keepdim=True)

    def zero_exact(self, inputs_exact: bool) -> bool:
        return inputs_exact
