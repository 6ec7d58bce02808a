"""``affine``: ``y[c] = weight[c] * x[c] + bias[c]``, a BatchNorm that could not be folded into a
neighbour. params: weight (C,), bias (C,)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ecgx.training.export.ops.base import PASS, OpKind
from ecgx.training.export.ops.onnx_helpers import GraphBuilder, channel_view, weight
from ecgx.training.export.ops.torch_helpers import as_tensor

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class ChannelAffine(nn.Module):
    """``y[:, c] = weight[c] * x[:, c] + bias[c]`` on (B, C) or (B, C, L): an unfoldable BatchNorm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class Affine(OpKind):
    kind = "affine"
    has_parameters = True
    is_rule_layer = True
    makes_feature_maps = True
    lrp_role = PASS  # Zennit's BatchNorm rule

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        scaled = b.op("Mul", [ins[0], channel_view(b, weight_t, op, f"{weight_t}.view")], op.name)
        return b.op("Add", [scaled, channel_view(b, bias_t, op, f"{bias_t}.view")]) if bias_t else scaled

    def emit_transpose(self, b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
        view = channel_view(b, weight_t or weight(b, op), op, "affine.view")
        return [b.op("Mul", [g, view], f"{op.name}.T")]

    def torch_module(self, op: Op) -> nn.Module:
        return ChannelAffine(as_tensor(op.params["weight"]), as_tensor(op.params["bias"]))

    def magnitude(self, layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        a = inputs[0].abs()
        shape = (1, -1) + (1,) * (a.dim() - 2)
        return a * layer.weight.abs().view(shape) + layer.bias.abs().view(shape)
