"""``linear``: a dense layer. params: weight (F_out, F_in), bias | None."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecgx.training.export.ops.base import DENSE_RULE, OpKind, scale_outputs
from ecgx.training.export.ops.onnx_helpers import GraphBuilder, weight
from ecgx.training.export.ops.torch_helpers import load

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class Linear(OpKind):
    kind = "linear"
    has_parameters = True
    is_rule_layer = True
    lrp_role = DENSE_RULE

    def fold_output_affine(self, op: Op, scale: np.ndarray, shift: np.ndarray) -> bool:
        scale_outputs(op, scale, shift)
        return True

    def fold_input_affine(self, op: Op, scale: np.ndarray, shift: np.ndarray) -> bool:
        if len(op.in_shape) != 1:  # per-channel scaling of a (C, L) map flattened later: not here
            return False
        w = op.params["weight"]
        bias = op.params["bias"] if op.params["bias"] is not None else np.zeros(w.shape[0])
        op.params["bias"] = bias + w @ shift
        op.params["weight"] = w * scale[None, :]
        return True

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        return b.op("Gemm", [ins[0], weight_t] + ([bias_t] if bias_t else []), op.name, transB=1)

    def emit_transpose(self, b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
        return [b.op("MatMul", [g, weight_t or weight(b, op)], f"{op.name}.T")]

    def torch_module(self, op: Op) -> nn.Module:
        w = op.params["weight"]
        return load(
            nn.Linear(w.shape[1], w.shape[0], bias=op.params["bias"] is not None), w, op.params["bias"]
        )

    def magnitude(self, layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        return F.linear(inputs[0].abs(), layer.weight.abs(), None if layer.bias is None else layer.bias.abs())
