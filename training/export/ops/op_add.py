"""``add``: two inputs of equal shape added (a residual connection)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ecgx.training.export.ops.base import NORM, OpKind
from ecgx.training.export.ops.onnx_helpers import GraphBuilder
from ecgx.training.models import Add as AddModule

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class Add(OpKind):
    kind = "add"
    is_rule_layer = True
    makes_feature_maps = True
    lrp_role = NORM  # Zennit's Sum (its ResNet canonizer's rewrite of an addition)

    def validate(self, op: Op) -> str | None:
        if len(op.inputs) != 2 or op.in_shapes[0] != op.in_shapes[1]:
            return f"an addition must add two tensors of one shape, got {op.in_shapes}"
        return None

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        return b.op("Add", ins, op.name)

    def emit_transpose(self, b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
        return [g, g]

    def torch_module(self, op: Op) -> nn.Module:
        return AddModule()

    def magnitude(self, layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        return inputs[0].abs() + inputs[1].abs()

    def zero_exact(self, inputs_exact: bool) -> bool:
        return inputs_exact  # a sum of non-negative terms is zero only when each term is
