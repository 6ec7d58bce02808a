"""``relu``: the one activation the attribution rules are defined for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ecgx.training.export.ops.base import PASS, OpKind
from ecgx.training.export.ops.onnx_helpers import GraphBuilder

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op
    from ecgx.training.export.onnx_graphs import Rule


class Relu(OpKind):
    kind = "relu"
    lrp_role = PASS
    is_activation = True

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        return b.op("Relu", ins, op.name)

    def emit_backward(
        self, rule: Rule, b: GraphBuilder, op: Op, g: str, ins: list[str], out: str
    ) -> list[str]:
        return [rule.relu(b, g, ins[0], out)]

    def torch_module(self, op: Op) -> nn.Module:
        return nn.ReLU()

    def kinked_at_zero(self, op: Op) -> bool:
        return True

    def zero_exact(self, inputs_exact: bool) -> bool:
        return True  # a ReLU's zeros are exact whatever its input
