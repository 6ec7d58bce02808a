"""A package graph run in float64: the engine's own computation, without float32 rounding.

When the engine's float32 map of a sample disagrees with the float64 reference and neither a near
tie nor float32's measured spread explains it, one question is left: is the graph built wrong, or
do ONNX Runtime's float32 kernels round differently from PyTorch's (sen, LRP at any epsilon: the
engine 2.9e-4 off, PyTorch's float32 run 8.1e-5, the graph in float64 6.5e-13; issue #25)? Running
the graph itself in float64 answers it. ONNX Runtime has no float64 Conv, so the graph is converted
(initialisers, constants, casts and declared types) and run by ONNX's reference evaluator (numpy):
slow, so the export runs it on a few samples only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# The graph in float64 agrees with the float64 reference when its largest error is below this
# fraction of the reference's largest magnitude: a hundredth of the float32 criterion (REL_TOL,
# 1e-4). Float64 rounding amplified by the conditioning that moves the float32 map stays far below
# it (sen, LRP at epsilon 1e-2: 2.6e-8; at 1.0: 6.5e-13); a construction error is of the order of
# the map (1e-3 to 1).
FLOAT64_TOL = 1e-6


def as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float64 wherever it computed in float32."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _graph_to_float64(copy.graph)
    return copy


def run_float64(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``model`` (a float32 graph) run in float64 on ``feeds`` (float32 feeds are widened exactly)."""
    from onnx.reference import ReferenceEvaluator

    wide = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    return [np.asarray(o) for o in ReferenceEvaluator(as_float64(model)).run(None, wide)]


def _graph_to_float64(graph: onnx.GraphProto) -> None:
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(_wide(init))
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value_float":
            value = np.array(node.attribute[0].f, np.float64)
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(value)))
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(_wide(attribute.t))
            elif node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.DOUBLE
            elif attribute.type == onnx.AttributeProto.GRAPH:
                _graph_to_float64(attribute.g)


def _wide(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name)
