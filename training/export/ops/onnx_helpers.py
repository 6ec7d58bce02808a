"""The ONNX building blocks the op kinds and the graph builders share.

``GraphBuilder`` accumulates one graph; the functions below name an op's shared parameter
initialisers and spell out the pieces several op kinds need (the 4-D views of 1-D
convolutions, pooling windows, the input gradient of a convolution). The op kinds
(``ops/op_*.py``) and the builders (``onnx_graphs``, ``lrp_rules``) import this module;
it imports neither, so no import circle can form.

Inside a graph every (batch, channels, time) tensor is held as (batch, channels, 1, time)
and every Conv1d runs as a 1 x k Conv (see ``onnx_graphs``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ecgx.training.export.ops.shapes import pool_output_length

if TYPE_CHECKING:
    from ecgx.training.export.ir import Op

OPSET = 17
FLOAT = TensorProto.FLOAT
I64 = np.int64
NEG_LARGE = float(np.finfo(np.float32).min)  # max-pool padding: never a window's maximum


@dataclass
class GraphBuilder:
    """Accumulates nodes, constants and shared parameter initialisers of one ONNX graph."""

    name: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    _count: int = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}/{self._count}"

    def op(
        self, op_type: str, inputs: Iterable[str], hint: str = "", n_out: int = 1, **attrs
    ) -> str | list[str]:
        outs = [self.fresh(f"{hint or op_type}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: np.ndarray | float | int | list, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        # A content hash, not Python's salted hash(): the same model must export to the same bytes.
        digest = hashlib.sha256(arr.tobytes()).hexdigest()[:16]
        key = f"const/{arr.dtype}/{'x'.join(map(str, arr.shape))}/{digest}"
        if key not in self.constants:
            self.constants[key] = arr
        return key

    def param(self, name: str, value: np.ndarray) -> str:
        self.params[name] = np.asarray(value, dtype=np.float32)
        return name

    def add_input(self, name: str, shape: list, dtype: int = FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def add_output(self, tensor: str, name: str, shape: list) -> None:
        self.nodes.append(helper.make_node("Identity", [tensor], [name], name=f"output/{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, FLOAT, shape))

    def model(self) -> onnx.ModelProto:
        inits = [numpy_helper.from_array(v, k) for k, v in {**self.params, **self.constants}.items()]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ecgx")
        model.ir_version = 8  # readable by every ONNX Runtime that supports opset 17
        return model


# --------------------------------------------------------------------------- parameters


def param_names(op: Op) -> tuple[str, str | None]:
    """Names of an op's weight and bias initialisers (shared by all graphs of a package)."""
    return f"{op.name}.weight", (f"{op.name}.bias" if op.params.get("bias") is not None else None)


def weight(b: GraphBuilder, op: Op) -> str:
    """The op's shared weight initialiser (conv (C_out, C_in/g, k), linear (F_out, F_in), affine (C,))."""
    return b.param(param_names(op)[0], op.params["weight"])


def bias(b: GraphBuilder, op: Op) -> str | None:
    name = param_names(op)[1]
    return None if name is None else b.param(name, op.params["bias"])


def as_4d(b: GraphBuilder, w3: str, hint: str) -> str:
    """A (C_out, C_in, k) weight viewed as (C_out, C_in, 1, k)."""
    return b.op("Unsqueeze", [w3, b.const([2], I64)], f"{hint}.4d")


def channel_view(b: GraphBuilder, v: str, op: Op, hint: str) -> str:
    """A per-channel (C,) vector shaped to broadcast over the op's (B, C, 1, L) or (B, C) tensors."""
    shape = [1, -1, 1, 1] if len(op.in_shape) == 2 else [1, -1]
    return b.op("Reshape", [v, b.const(shape, I64)], hint)


# --------------------------------------------------------------------------- pooling windows


def pool_extent(op: Op) -> tuple[int, int, int]:
    """(left pad, right pad, output length) of a pooling op: ceil_mode becomes extra right padding,
    so every backend computes PyTorch's windows with plain (unpadded, floor-mode) pooling."""
    p, length = op.params, op.in_shape[1]
    n = pool_output_length(length, p["kernel"], p["stride"], p["padding"], p["ceil_mode"])
    right = max(p["padding"], (n - 1) * p["stride"] + p["kernel"] - length - p["padding"])
    return p["padding"], right, n


def pad_for_pool(b: GraphBuilder, a: str, op: Op, value: float) -> tuple[str, int]:
    left, right, _ = pool_extent(op)
    if left == 0 and right == 0:
        return a, 0
    pads = b.const([0, 0, 0, left, 0, 0, 0, right], I64)
    return b.op("Pad", [a, pads, b.const(value)], "pool_pad"), left


# --------------------------------------------------------------------------- convolution gradient


def conv_input_gradient(
    b: GraphBuilder,
    g: str,
    w3: str,
    kernel: int,
    stride: int,
    pads: tuple[int, int],
    dilation: int,
    groups: int,
    lengths: tuple[int, int],
    shape: tuple[int, int, int],
) -> str:
    """Gradient of a 1-D convolution (weight ``w3`` of ``shape`` (C_out, C_in/groups, k)) with
    respect to its input of length ``lengths[0]`` (output length ``lengths[1]``).

    With stride 1 this is itself a convolution, with each group's channel axes swapped and
    the taps reversed; ONNX Runtime folds that weight view into a constant at load and runs
    its fast Conv kernel. Strided convolutions use ConvTranspose.
    """
    k, s, d = kernel, stride, dilation
    (pad_l, pad_r), (l_in, l_out) = pads, lengths
    c_out, c_in_g, _ = shape
    if s == 1 and d * (k - 1) - pad_l >= 0 and d * (k - 1) - pad_r >= 0:
        if groups == 1:
            swapped = b.op("Transpose", [w3], f"{w3}.T", perm=[1, 0, 2])
        else:
            grouped = b.op("Reshape", [w3, b.const([groups, c_out // groups, c_in_g, k], I64)])
            swapped = b.op(
                "Reshape",
                [
                    b.op("Transpose", [grouped], perm=[0, 2, 1, 3]),
                    b.const([groups * c_in_g, c_out // groups, k], I64),
                ],
                f"{w3}.T",
            )
        flipped = b.op(
            "Slice",
            [swapped, b.const([-1], I64), b.const([-(k + 1)], I64), b.const([2], I64), b.const([-1], I64)],
            f"{w3}.flip",
        )
        return b.op(
            "Conv",
            [g, as_4d(b, flipped, f"{w3}.flip")],
            "conv.T",
            kernel_shape=[1, k],
            pads=[0, d * (k - 1) - pad_l, 0, d * (k - 1) - pad_r],
            dilations=[1, d],
            group=groups,
        )
    extra = l_in - (s * (l_out - 1) + d * (k - 1) + 1 - pad_l - pad_r)
    return b.op(
        "ConvTranspose",
        [g, as_4d(b, w3, w3)],
        "conv.T",
        kernel_shape=[1, k],
        strides=[1, s],
        pads=[0, pad_l, 0, pad_r],
        dilations=[1, d],
        output_padding=[0, extra],
        group=groups,
    )
