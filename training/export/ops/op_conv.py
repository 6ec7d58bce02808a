"""``conv``: a Conv1d. params: weight (C_out, C_in / groups, k), bias | None, stride, padding
(zeros, same on both sides), dilation, groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecgx.training.export.ops.base import CONV_RULE, OpKind, scale_outputs, signal_input_problem
from ecgx.training.export.ops.onnx_helpers import GraphBuilder, as_4d, conv_input_gradient, weight
from ecgx.training.export.ops.torch_helpers import load

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op


class Conv(OpKind):
    kind = "conv"
    has_parameters = True
    is_rule_layer = True
    makes_feature_maps = True
    lrp_role = CONV_RULE

    def validate(self, op: Op) -> str | None:
        problem = signal_input_problem(op)
        if problem is None and op.params["groups"] < 1:
            return "groups must be >= 1"
        return problem

    def fold_output_affine(self, op: Op, scale: np.ndarray, shift: np.ndarray) -> bool:
        scale_outputs(op, scale, shift)
        return True

    def fold_input_affine(self, op: Op, scale: np.ndarray, shift: np.ndarray) -> bool:
        # Exact only where every tap reads the affine map's output: no zero padding, one group.
        if op.params["padding"] != 0 or op.params["groups"] != 1:
            return False
        w = op.params["weight"]
        bias = op.params["bias"] if op.params["bias"] is not None else np.zeros(w.shape[0])
        op.params["bias"] = bias + np.einsum("oik,i->o", w, shift)
        op.params["weight"] = w * scale[None, :, None]
        return True

    def emit_forward(self, b: GraphBuilder, op: Op, ins: list[str], weight_t, bias_t) -> str:
        p = op.params
        k = p["weight"].shape[2]
        args = [ins[0], as_4d(b, weight_t, weight_t)] + ([bias_t] if bias_t else [])
        return b.op(
            "Conv",
            args,
            op.name,
            kernel_shape=[1, k],
            strides=[1, p["stride"]],
            pads=[0, p["padding"], 0, p["padding"]],
            dilations=[1, p["dilation"]],
            group=p["groups"],
        )

    def emit_transpose(self, b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
        p = op.params
        w3 = weight_t or weight(b, op)
        k = p["weight"].shape[2]
        return [
            conv_input_gradient(
                b,
                g,
                w3,
                k,
                p["stride"],
                (p["padding"], p["padding"]),
                p["dilation"],
                p["groups"],
                (op.in_shape[1], op.out_shape[1]),
                p["weight"].shape,
            )
        ]

    def torch_module(self, op: Op) -> nn.Module:
        p = op.params
        w = p["weight"]
        conv = nn.Conv1d(
            op.in_shape[0],
            w.shape[0],
            w.shape[2],
            stride=p["stride"],
            padding=p["padding"],
            dilation=p["dilation"],
            groups=p["groups"],
            bias=p["bias"] is not None,
        )
        return load(conv, w, p["bias"])

    def magnitude(self, layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        bias = None if layer.bias is None else layer.bias.abs()
        return F.conv1d(
            inputs[0].abs(),
            layer.weight.abs(),
            bias,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
