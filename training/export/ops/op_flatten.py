"""``flatten``: (C, L) -> (C * L,)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ecgx.training.export.ops.base import OpKind
from ecgx.training.export.ops.onnx_helpers import I64, GraphBuilder

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class Flatten(OpKind):
    kind = "flatten"
    moves_values = True

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        return b.op("Flatten", ins, op.name, axis=1)

    def emit_transpose(self, b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
        c, length = op.in_shape
        return [b.op("Reshape", [g, b.const([-1, c, 1, length], I64)], "flatten.T")]

    def torch_module(self, op: Op) -> nn.Module:
        return nn.Flatten()

    def zero_exact(self, inputs_exact: bool) -> bool:
        return inputs_exact
