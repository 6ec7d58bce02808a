"""Incremental forward graphs for window perturbations (occlusion, feature ablation; issue #21).

Replacing one lead over a window of at most ``max_window`` samples changes, in each early layer, only
the positions whose receptive field meets the window. Two graphs exploit that, exactly:

* ``incremental_activations`` (``x`` -> ``activations``): the clean activations every later call
  splices into, one flat row per ECG (each layer input the span pass reads, padded as its op pads).
* ``incremental_forward`` (``x``, ``activations``, ``ecg``, ``start`` -> ``logits``): the logits of
  perturbed rows ``x`` that differ from clean ECG ``ecg[r]`` only within samples
  ``[start, start + max_window)``. Along the *local chain* (the leading convolutions, ReLUs, affine
  maps and unpadded pools, each feeding only the next) it computes each layer on a fixed-size span
  that holds every changed position, reading the rest of its receptive field from the clean
  activations; after the chain it splices the span into the clean tensor and runs the remaining
  layers (pooling, the head) on the whole tensor, as the forward graph does.

Every position it outputs is computed from the same inputs by the same operation as in the forward
graph, so the logits agree with it to float32 rounding (checked at export, ``check_incremental``).
Span sizes and offsets depend only on ``start``: they are computed here, once per start sample, and
stored as a constant table the graph indexes with ``start``. All rows of one call share ``start``.
``max_window`` is stored in the model's metadata (``MAX_WINDOW_KEY``) for the methods to read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from ecgx.service.methods.perturbation import MAX_WINDOW_KEY
from ecgx.training.export.ir import INPUT, ExportError, ModelIR, Op
from ecgx.training.export.onnx_graphs import (
    BATCH,
    I64,
    GraphBuilder,
    emit_forward,
    forward_op,
)
from ecgx.training.export.ops import AFFINE, OP_SPECS
from ecgx.training.export.ops.onnx_helpers import pool_extent

MAX_WINDOW = 64  # samples: the widest window served incrementally (the methods' default is 50)


def _pointwise(op: Op) -> bool:
    """An op of one input that maps each time step alone: a per-channel affine map, any element-wise
    activation (ReLU, GELU, ELU, ...: ``OpKind.is_activation``)."""
    return len(op.inputs) == 1 and (op.kind == AFFINE or OP_SPECS[op.kind].is_activation)


_POOLS = ("maxpool", "avgpool")


@dataclass(frozen=True)
class _Layer:
    """One op of the local chain and its span geometry (lengths along time)."""

    op: Op
    extent: int  # input positions one output reads: (k - 1) * dilation + 1
    stride: int
    pad: int  # zero padding on each side (convolutions; pools of the chain have none)
    n: int  # span length of the output
    a: np.ndarray  # (starts,) first output position of the span, for each start sample
    context: np.ndarray  # (starts,) first padded input position the span reads

    @property
    def pointwise(self) -> bool:
        return _pointwise(self.op)

    @property
    def m(self) -> int:
        """Input positions the span reads."""
        return (self.n - 1) * self.stride + self.extent

    @property
    def padded_length(self) -> int:
        return self.op.in_shape[1] + 2 * self.pad


def _geometry(op: Op) -> tuple[int, int, int] | None:
    """(extent, stride, pad) of a local op, or None when the chain must stop before it."""
    if len(op.in_shape) != 2 or len(op.inputs) != 1:
        return None
    p = op.params
    if _pointwise(op):
        return 1, 1, 0
    if op.kind == "conv":
        return (p["weight"].shape[2] - 1) * p["dilation"] + 1, p["stride"], p["padding"]
    if op.kind in _POOLS:
        left, right, _ = pool_extent(op)
        # A padded pool's edge windows differ (-inf padding, avgpool divisors): end the chain there.
        return (p["kernel"], p["stride"], 0) if left == right == 0 else None
    return None


def local_chain(ir: ModelIR) -> list[Op]:
    """The leading ops computed on spans: local, each reading only its predecessor's output, which
    nothing else reads."""
    readers: dict[str, int] = {}
    for op in ir.ops:
        for name in op.inputs:
            readers[name] = readers.get(name, 0) + 1
    chain: list[Op] = []
    previous = INPUT
    for op in ir.ops:
        if op.output == ir.output or op.inputs != (previous,) or readers.get(previous, 0) != 1:
            break
        if _geometry(op) is None:
            break
        chain.append(op)
        previous = op.output
    return chain


def plan(ir: ModelIR, max_window: int = MAX_WINDOW) -> list[_Layer]:
    """Span geometry of the local chain for every start sample (the window ``[start, start +
    max_window)`` cut at the end). ExportError when the model has no local chain."""
    chain = local_chain(ir)
    if not chain or all(_pointwise(op) for op in chain):
        raise ExportError("the model has no leading convolution or pooling to compute incrementally")
    length = ir.input_shape[1]
    lo = np.arange(length)
    hi = np.minimum(lo + max_window, length) - 1
    layers = []
    for op in chain:
        extent, stride, pad = _geometry(op)
        out_len = op.out_shape[1]
        # Outputs reading a changed input: j * stride - pad + [0, extent) meets [lo, hi].
        j0 = np.clip(-(-(lo + pad - extent + 1) // stride), 0, out_len - 1)
        j1 = np.clip((hi + pad) // stride, 0, out_len - 1)
        n = int((j1 - j0).max()) + 1
        a = np.clip(j0, 0, out_len - n)  # a span of fixed length n inside [0, out_len) holding them
        layers.append(_Layer(op, extent, stride, pad, n, a, a * stride))
        lo, hi = a, a + n - 1
    return layers


def _activation_layout(layers: list[_Layer]) -> list[tuple[str, int, int, int]]:
    """(IR tensor, padding, channels, padded length) of each clean tensor the span pass reads: the input
    of every non-pointwise chain op after the first, and the chain's output."""
    out = [
        (ly.op.inputs[0], ly.pad, ly.op.in_shape[0], ly.padded_length)
        for ly in layers[1:]
        if not ly.pointwise
    ]
    last = layers[-1].op
    out.append((last.output, 0, last.out_shape[0], last.out_shape[1]))
    return out


def _table(layers: list[_Layer]) -> tuple[np.ndarray, list[dict[str, int]]]:
    """Per start sample, the slice bounds the span pass uses: (starts, K) int64, and for each layer
    the column of each bound."""
    cols: list[np.ndarray] = []
    index: list[dict[str, int]] = []

    def col(values) -> int:
        cols.append(np.broadcast_to(np.asarray(values, np.int64), layers[0].a.shape))
        return len(cols) - 1

    prev: _Layer | None = None
    for ly in layers:
        entry: dict[str, int] = {}
        if prev is None or not ly.pointwise:
            c, m = ly.context, ly.m
            entry["c0"], entry["c1"] = col(c), col(c + m)
            if prev is not None:
                span0 = prev.a + ly.pad  # the previous span in this op's padded coordinates
                entry["left1"] = col(np.maximum(span0, c))
                entry["mid0"] = col(np.maximum(0, c - span0))
                entry["mid1"] = col(np.minimum(prev.n, c + m - span0))
                entry["right0"] = col(np.clip(span0 + prev.n, c, c + m))
        if "mid0" in entry:
            _check_splice(cols, entry, prev, ly)
        index.append(entry)
        prev = ly
    last = layers[-1]
    tail = {"a": col(last.a), "b": col(last.a + last.n)}
    index.append(tail)
    return np.stack(cols, axis=1), index


def _check_splice(table_cols: list[np.ndarray], entry: dict[str, int], prev: _Layer, layer: _Layer) -> None:
    """Every start's spliced input is exactly the span's input length (the previous span overlaps
    the context): a guard on the geometry above."""
    v = {key: table_cols[col] for key, col in entry.items()}
    total = (v["left1"] - v["c0"]) + (v["mid1"] - v["mid0"]) + (v["c1"] - v["right0"])
    if (v["mid1"] <= v["mid0"]).any() or (total != layer.m).any():
        raise ExportError(f"incremental span geometry does not close at layer {layer.op.name!r}")


def incremental_activations_graph(ir: ModelIR, x_shape: list, n_classes: int) -> onnx.ModelProto:
    """``x`` (B, C, L) -> ``activations`` (B, F): the clean tensors the span pass reads, flat."""
    layers = plan(ir)
    b = GraphBuilder("incremental_activations")
    x = b.add_input("x", x_shape)
    t = emit_forward(b, ir, x)
    parts = []
    for name, pad, _, _ in _activation_layout(layers):
        tensor = t[name]
        if pad:
            tensor = b.op("Pad", [tensor, b.const([0, 0, 0, pad, 0, 0, 0, pad], I64), b.const(0.0)], "pad")
        parts.append(b.op("Flatten", [tensor], "flat", axis=1))
    flat = b.op("Concat", parts, "activations", axis=1)
    width = sum(c * length for _, _, c, length in _activation_layout(layers))
    b.add_output(flat, "activations", [BATCH, width])
    return b.model()


def incremental_forward_graph(
    ir: ModelIR, x_shape: list, n_classes: int, max_window: int = MAX_WINDOW
) -> onnx.ModelProto:
    """The span pass: see the module docstring."""
    layers = plan(ir, max_window)
    table, index = _table(layers)
    layout = _activation_layout(layers)
    b = GraphBuilder("incremental_forward")
    x = b.add_input("x", x_shape)
    acts = b.add_input("activations", ["ecgs", sum(c * n for _, _, c, n in layout)])
    ecg = b.add_input("ecg", ["rows"], TensorProto.INT64)
    start = b.add_input("start", [1], TensorProto.INT64)
    row = b.op("Gather", [b.const(table, np.int64), start], "bounds", axis=0)  # (1, K)
    row = b.op("Reshape", [row, b.const([-1], I64)])

    def bound(column: int) -> str:
        return b.op("Gather", [row, b.const([column], I64)], "bound", axis=0)  # (1,)

    def cut(t: str, lo: str, hi: str) -> str:
        return b.op("Slice", [t, lo, hi, b.const([3], I64)], "cut")

    def clean(k: int) -> str:
        """(B, C, 1, padded length) of the k-th tensor of the layout."""
        offset = sum(c * n for _, _, c, n in layout[:k])
        _, _, c, n = layout[k]
        bounds = [b.const([offset], I64), b.const([offset + c * n], I64), b.const([1], I64)]
        flat = b.op("Slice", [acts, *bounds])
        return b.op("Reshape", [flat, b.const([-1, c, 1, n], I64)], "clean")

    def rows(t: str) -> str:
        return b.op("Gather", [t, ecg], "rows", axis=0)

    x4 = b.op("Unsqueeze", [x, b.const([2], I64)], "x4")
    span, k = None, 0
    for i, (ly, entry) in enumerate(zip(layers, index[:-1], strict=True)):
        if i == 0:
            padded = x4
            if ly.pad:
                pads = b.const([0, 0, 0, ly.pad, 0, 0, 0, ly.pad], I64)
                padded = b.op("Pad", [x4, pads, b.const(0.0)], "pad")
            inp = cut(padded, bound(entry["c0"]), bound(entry["c1"]))
        elif ly.pointwise:
            inp = span
        else:
            whole = clean(k)
            k += 1
            left = rows(cut(whole, bound(entry["c0"]), bound(entry["left1"])))
            mid = cut(span, bound(entry["mid0"]), bound(entry["mid1"]))
            right = rows(cut(whole, bound(entry["right0"]), bound(entry["c1"])))
            inp = b.op("Concat", [left, mid, right], "spliced", axis=3)
        span = forward_op(b, _span_op(ly), [inp])
    whole = clean(k)
    tail = index[-1]
    length = layout[k][3]
    left = rows(cut(whole, b.const([0], I64), bound(tail["a"])))
    right = rows(cut(whole, bound(tail["b"]), b.const([length], I64)))
    t = {layers[-1].op.output: b.op("Concat", [left, span, right], "spliced", axis=3)}
    for op in ir.ops[len(layers) :]:
        t[op.output] = forward_op(b, op, [t[name] for name in op.inputs])
    b.add_output(t[ir.output], "logits", [BATCH, n_classes])
    model = b.model()
    onnx.helper.set_model_props(model, {MAX_WINDOW_KEY: str(max_window)})
    return model


def _span_op(ly: _Layer) -> Op:
    """The layer's op on its span: no padding (the clean context carries it), lengths of the span."""
    op = copy.copy(ly.op)
    op.params = dict(op.params)
    if "padding" in op.params:
        op.params["padding"] = 0
    if "ceil_mode" in op.params:
        op.params["ceil_mode"] = False
    op.in_shapes = ((ly.op.in_shape[0], ly.m),)
    op.out_shape = (ly.op.out_shape[0], ly.n)
    return op
