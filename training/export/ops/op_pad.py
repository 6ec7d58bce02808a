"""``pad``: explicit zero padding over time, (C, L) -> (C, left + L + right)
(nn.ConstantPad1d / nn.ZeroPad1d with value 0, F.pad(x, (left, right)), ONNX Pad). params: left, right."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ecgx.training.export.ops.base import OpKind, signal_input_problem
from ecgx.training.export.ops.onnx_helpers import I64, GraphBuilder

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class Pad(OpKind):
    kind = "pad"
    moves_values = True  # it only moves values (and adds zeros): every rule passes it through

    def validate(self, op: Op) -> str | None:
        if op.params["left"] < 0 or op.params["right"] < 0:
            return f"negative padding {op.params['left'], op.params['right']} (cropping) is not supported"
        return signal_input_problem(op)

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        left, right = op.params["left"], op.params["right"]
        return b.op("Pad", [ins[0], b.const([0, 0, 0, left, 0, 0, 0, right], I64)], op.name)

    def emit_transpose(self, b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
        left, length = op.params["left"], op.in_shape[1]
        ends = [b.const([left], I64), b.const([left + length], I64), b.const([3], I64)]
        return [b.op("Slice", [g, *ends], "pad.T")]

    def torch_module(self, op: Op) -> nn.Module:
        return nn.ConstantPad1d((op.params["left"], op.params["right"]), 0.0)

    def zero_exact(self, inputs_exact: bool) -> bool:
        return inputs_exact  # the padding is exact zeros
