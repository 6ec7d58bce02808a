"""A forward graph exported for a fixed batch, run on any batch.

``torch.export`` and the dynamo ONNX exporter specialise a program to its example's batch unless told
otherwise, and a recurrent layer then bakes it in (an LSTM's initial state of shape
``(layers, batch, hidden)``: ONNX Runtime refuses any other batch). A package's forward graph takes
any batch, so :func:`any_batch` wraps such a graph in an ONNX ``Loop`` over chunks of the fixed batch:
the input is padded with zeros to a whole number of chunks, each chunk runs the model's own nodes,
and the padding rows are dropped from the logits. Rows are independent in eval mode (the caller
checks it), so the padding never reaches a real ECG's logits. The cost is one model run per chunk:
a batch of 64 ECGs through a program fixed at batch 1 is 64 runs, not one.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

_PREFIX = "_any_batch"


def fixed_batch(model: onnx.ModelProto, input_name: str) -> int | None:
    """The batch ``input_name`` is declared with, when fixed (a number, not a name); else None."""
    value = next((i for i in model.graph.input if i.name == input_name), None)
    if value is None or not value.type.tensor_type.shape.dim:
        return None
    dim = value.type.tensor_type.shape.dim[0]
    return int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None


def any_batch(model: onnx.ModelProto, input_name: str, output_name: str, batch: int) -> onnx.ModelProto:
    """``model`` (one input ``input_name`` (batch, ...), one output ``output_name`` (batch, classes),
    both at the fixed ``batch``) as a graph of the same signature that takes any batch: a ``Loop``
    over chunks of ``batch`` rows. The model's initialisers stay in the outer graph, read by the
    loop body from the outer scope."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # Unsqueeze and Squeeze read their axes from an input since opset 13
        raise ValueError(
            f"a fixed-batch graph is run in chunks from ONNX opset 13 on; this one is opset {opset}"
        )
    inner = model.graph
    chunk, logits = f"{_PREFIX}/chunk", f"{_PREFIX}/chunk_logits"
    body_nodes = []
    for node in inner.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [chunk if v == input_name else v for v in copy.input]
        copy.output[:] = [logits if v == output_name else v for v in copy.output]
        body_nodes.append(copy)
    p = _PREFIX
    body = helper.make_graph(
        [
            helper.make_node("Unsqueeze", [f"{p}/i", f"{p}/zero"], [f"{p}/i1"]),
            helper.make_node("Mul", [f"{p}/i1", f"{p}/b"], [f"{p}/start"]),
            helper.make_node("Add", [f"{p}/start", f"{p}/b"], [f"{p}/end"]),
            helper.make_node("Slice", [f"{p}/padded", f"{p}/start", f"{p}/end", f"{p}/zero"], [chunk]),
            *body_nodes,
            helper.make_node("Identity", [f"{p}/cond_in"], [f"{p}/cond_out"]),
        ],
        f"{p}/body",
        [
            helper.make_tensor_value_info(f"{p}/i", TensorProto.INT64, []),
            helper.make_tensor_value_info(f"{p}/cond_in", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info(f"{p}/cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info(logits, TensorProto.FLOAT, None),
        ],
    )
    rank = len(next(i for i in inner.input if i.name == input_name).type.tensor_type.shape.dim)
    consts = [
        helper.make_tensor(f"{p}/zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor(f"{p}/b", TensorProto.INT64, [1], [batch]),
        helper.make_tensor(f"{p}/b_minus_1", TensorProto.INT64, [1], [batch - 1]),
        helper.make_tensor(f"{p}/one", TensorProto.INT64, [1], [1]),
        helper.make_tensor(f"{p}/zeros_before", TensorProto.INT64, [rank], [0] * rank),
        helper.make_tensor(f"{p}/zeros_after", TensorProto.INT64, [rank - 1], [0] * (rank - 1)),
    ]
    outer_nodes = [
        helper.make_node("Shape", [input_name], [f"{p}/shape"]),
        helper.make_node("Slice", [f"{p}/shape", f"{p}/zero", f"{p}/one"], [f"{p}/n"]),
        helper.make_node("Add", [f"{p}/n", f"{p}/b_minus_1"], [f"{p}/n_up"]),
        helper.make_node("Div", [f"{p}/n_up", f"{p}/b"], [f"{p}/chunks1"]),
        helper.make_node("Mul", [f"{p}/chunks1", f"{p}/b"], [f"{p}/rows"]),
        helper.make_node("Sub", [f"{p}/rows", f"{p}/n"], [f"{p}/pad_rows"]),
        # Pad's pads are (begin of every axis, end of every axis): the padding rows go at the end of
        # axis 0 only.
        helper.make_node(
            "Concat", [f"{p}/zeros_before", f"{p}/pad_rows", f"{p}/zeros_after"], [f"{p}/pads"], axis=0
        ),
        helper.make_node("Pad", [input_name, f"{p}/pads"], [f"{p}/padded"]),
        helper.make_node("Squeeze", [f"{p}/chunks1", f"{p}/zero"], [f"{p}/chunks"]),
        helper.make_node("Loop", [f"{p}/chunks", ""], [f"{p}/stacked"], body=body),
        helper.make_node("Flatten", [f"{p}/stacked"], [f"{p}/all_logits"], axis=2),
        helper.make_node("Slice", [f"{p}/all_logits", f"{p}/zero", f"{p}/n", f"{p}/zero"], [output_name]),
    ]
    graph = helper.make_graph(
        outer_nodes,
        inner.name or "forward",
        [_any_batch_value(v) for v in inner.input],
        [_any_batch_value(v) for v in inner.output],
        [*inner.initializer, *consts],
    )
    graph.sparse_initializer.extend(inner.sparse_initializer)
    wrapped = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    wrapped.functions.extend(model.functions)
    return wrapped


def _any_batch_value(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """A copy of a graph input or output with its first dimension named ``batch``, not fixed."""
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    dims = copy.type.tensor_type.shape.dim
    if dims:
        dims[0].Clear()
        dims[0].dim_param = "batch"
    return copy
