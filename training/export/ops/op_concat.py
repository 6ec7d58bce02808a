"""``concat``: two or more inputs joined along channels (axis 0 of the per-sample shape)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ecgx.training.export.ops.base import OpKind
from ecgx.training.export.ops.onnx_helpers import I64, GraphBuilder

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class Concat(nn.Module):
    """``torch.cat`` along channels (dim 1) as a module, so rules and hooks can attach to it."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1)


class ConcatKind(OpKind):
    kind = "concat"
    moves_values = True
    makes_feature_maps = True

    def validate(self, op: Op) -> str | None:
        if len(op.inputs) < 2 or len({s[1:] for s in op.in_shapes}) != 1:
            return "torch.cat must join two or more tensors along channels (dim 1)"
        return None

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        return b.op("Concat", ins, op.name, axis=1)

    def emit_transpose(self, b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
        sizes = [shape[0] for shape in op.in_shapes]
        return b.op("Split", [g, b.const(sizes, I64)], "concat.T", n_out=len(sizes), axis=1)

    def torch_module(self, op: Op) -> nn.Module:
        return Concat()

    def zero_exact(self, inputs_exact: bool) -> bool:
        return inputs_exact
