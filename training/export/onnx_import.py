"""The ONNX front end of the export: a forward-only ONNX model from another framework into a ModelIR.

A hospital's network may arrive as an ONNX file (``torch.onnx.export``, tf2onnx, a
vendor's tool). This module reads its graph, without PyTorch, into the same IR the
PyTorch front ends produce, so the package's backward graphs are built from the ONNX
graph itself. Parameters are the graph's initializers and ``Constant`` nodes (and what
constant-only nodes compute from them, e.g. a transposed weight); integer shape
arithmetic (``Shape -> Gather -> Concat -> Reshape``) is skipped, because every
tensor's shape comes from ONNX shape inference with the input's length fixed.

Supported operators (opsets 11-21): Conv (1-D, any group, symmetric padding),
BatchNormalization (inference), Relu, MaxPool / AveragePool (symmetric padding,
ceil_mode, count_include_pad), GlobalAveragePool, GlobalMaxPool, ReduceMean /
ReduceMax over time, Concat along channels, Add of two tensors, Flatten / Reshape /
Squeeze / Unsqueeze that only flatten each ECG's features, Gemm, MatMul (+ Add of a
constant bias), Dropout, Identity. Anything else is refused with the node's name and
what to use instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from ecgx.training.export.fixed_batch import fixed_batch
from ecgx.training.export.ir import (
    INPUT,
    ExportError,
    ModelIR,
    Op,
    batchnorm_affine,
    conv_output_length,
    finish_ir,
    pool_output_length,
    unsupported,
)
from ecgx.training.export.ops import (
    ADD,
    AFFINE,
    AVGPOOL,
    CONCAT,
    CONV,
    ELU,
    FLATTEN,
    GAP,
    GELU,
    GMP,
    LEAKY_RELU,
    LINEAR,
    MAXPOOL,
    MISH,
    MUL,
    PAD,
    RELU,
    SIGMOID,
    SILU,
    TANH,
)
from ecgx.training.export.ops.op_mul import (
    CHANNEL_MIX_ONLY,
    NoClearGate,
    broadcast_problem,
    channel_mix_params,
    gate_index,
)

# ONNX operator -> the name under which ir.REPLACEMENTS says what to use instead.
_REPLACEMENT_KEYS = {
    "Selu": "SELU",
    "PRelu": "PReLU",
    "HardSigmoid": "HardSigmoid",
    "Softmax": "Softmax",
    "LogSoftmax": "Softmax",
    "LSTM": "LSTM",
    "GRU": "GRU",
    "RNN": "LSTM",
    "LayerNormalization": "LayerNorm",
    "GroupNormalization": "GroupNorm",
    "InstanceNormalization": "InstanceNorm1d",
    "Attention": "MultiheadAttention",
}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
MIN_OPSET, MAX_OPSET = 11, 21


# What may read a view (a rearranged tensor): another rearrangement.
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def load_onnx_model(path: Path | str) -> onnx.ModelProto:
    """Read an ONNX file, or raise ExportError saying why it is not one."""
    path = Path(path)
    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise ExportError(f"{path}: no such ONNX file") from None
    except Exception as e:  # protobuf's DecodeError and onnx's own errors
        raise ExportError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None


def onnx_metadata(path: Path | str) -> dict[str, str]:
    """The model's ``metadata_props`` (e.g. ``sampling_rate_hz``) as a dict."""
    return {p.key: p.value for p in load_onnx_model(path).metadata_props}


def onnx_forward(path: Path | str) -> Callable[[np.ndarray], np.ndarray]:
    """Run the original ONNX file on ONNX Runtime (CPU): float32 ``(B, leads, samples)`` -> logits.

    A file exported with a fixed batch is run in chunks of that batch, the last one padded with zeros
    and trimmed (independently of the forward graph's ONNX Loop, ``fixed_batch.any_batch``, which
    this run checks).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{path}: ONNX Runtime cannot load the model ({type(e).__name__}: {e})") from None
    inp = session.get_inputs()[0]
    b = inp.shape[0] if isinstance(inp.shape[0], int) else None  # a fixed batch, or None

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if b is None or b == len(x):
            return np.asarray(session.run(None, {inp.name: x})[0])
        outs = []
        for start in range(0, len(x), b):
            chunk = x[start : start + b]
            padded = np.concatenate([chunk, np.zeros((b - len(chunk), *x.shape[1:]), np.float32)])
            outs.append(np.asarray(session.run(None, {inp.name: padded})[0])[: len(chunk)])
        return np.concatenate(outs)

    return run


def import_onnx(path: Path | str, input_length: int | None = None) -> ModelIR:
    """Read the forward-only ONNX model at ``path`` into a :class:`ModelIR`, or raise ExportError.

    The model must have one float32 input ``(batch, leads, samples)`` and one output
    ``(batch, classes)``. ``input_length`` fixes the number of samples when the graph
    leaves it dynamic (and must agree with the graph when it does not).
    """
    path = Path(path)
    model = load_onnx_model(path)
    return _Importer(model, path).convert(input_length)


def batchnorm_error(name: str) -> ExportError:
    """The refusal of a BatchNorm that normalises by each batch's own statistics."""
    try:
        batchnorm_affine(name, None, None, None, None, 0.0)
    except ExportError as e:
        return e
    raise AssertionError("batchnorm_affine accepted missing statistics")  # pragma: no cover


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Importer:
    def __init__(self, model: onnx.ModelProto, path: Path):
        self.model, self.path = model, path
        self.graph = model.graph
        self.consts: dict[str, np.ndarray] = {}
        self.alias: dict[str, str] = {}  # ONNX value name -> IR tensor name
        self.shapes: dict[str, list] = {}
        self.types: dict[str, int] = {}
        self.ops: list[Op] = []
        self.names: dict[str, int] = {}
        # MatMul-made linear layers still waiting for a bias (ONNX value name -> op)
        self.open_linear: dict[str, Op] = {}
        self.uses: dict[str, int] = {}
        self.shape_values: set[str] = set()  # integer shape arithmetic, skipped
        # A value that only rearranges an IR tensor (Transpose, Reshape to another layout, Unsqueeze):
        # ONNX value -> (the value of that IR tensor, its probe, the probe rearranged alike).
        self.views: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
        # A gate's broadcast view ((B, C) -> (B, C, 1), Expand): ONNX value -> its IR tensor's shape;
        # only a product reads it (the product broadcasts the gate itself).
        self.gate_views: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ set-up

    def convert(self, input_length: int | None) -> ModelIR:
        self._check_opset()
        inp, leads, length = self._input(input_length)
        self.input_name, self.leads, self.length = inp.name, leads, length
        self._infer_shapes(inp, leads, length)
        for init in self.graph.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        for node in self.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        for name in (o.name for o in self.graph.output):
            self.uses[name] = self.uses.get(name, 0) + 1
        self.alias[inp.name] = INPUT
        self.spelled = activation_spellings(self.graph, self.uses)
        for index, node in enumerate(self.graph.node):
            self._node(node, index)
        out = self.graph.output[0].name
        if out not in self.alias:
            raise ExportError(f"{self.path}: the model's output {out!r} does not depend on its input")
        return finish_ir(self.ops, self.alias[out], (leads, length))

    def _check_opset(self) -> None:
        versions = {o.domain or "ai.onnx": o.version for o in self.model.opset_import}
        version = versions.get("ai.onnx")
        if version is None or not MIN_OPSET <= version <= MAX_OPSET:
            raise ExportError(
                f"{self.path}: ONNX opset {version} is not supported (opsets {MIN_OPSET}-{MAX_OPSET}); "
                "export the model again with opset_version between those"
            )

    def _input(self, input_length: int | None) -> tuple[onnx.ValueInfoProto, int, int]:
        initialised = {i.name for i in self.graph.initializer}
        inputs = [i for i in self.graph.input if i.name not in initialised]
        if len(inputs) != 1 or len(self.graph.output) != 1:
            raise ExportError(
                f"{self.path}: the model has {len(inputs)} inputs and {len(self.graph.output)} outputs; "
                "it must take one ECG tensor (batch, leads, samples) and return one tensor of logits "
                "(batch, classes)"
            )
        inp = inputs[0]
        elem = inp.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            raise ExportError(
                f"{self.path}: input {inp.name!r} is {onnx.TensorProto.DataType.Name(elem)}; it must be "
                "float32 (batch, leads, samples)"
            )
        dims = _dims(inp)
        if dims is None or len(dims) != 3:
            raise ExportError(
                f"{self.path}: input {inp.name!r} has shape {dims}; it must be 3-D (batch, leads, samples)"
            )
        leads, length = dims[1], dims[2]
        if not isinstance(leads, int) or leads <= 0:
            raise ExportError(f"{self.path}: input {inp.name!r} has no fixed number of leads ({leads!r})")
        if isinstance(length, int) and length > 0:
            if input_length is not None and input_length != length:
                raise ExportError(
                    f"{self.path}: the model's input has {length} samples, not --input-length {input_length}"
                )
        elif input_length is None:
            raise ExportError(
                f"{self.path}: the input length of {inp.name!r} is dynamic ({length!r}); pass --input-length "
                "with the number of samples the model was trained on"
            )
        else:
            if input_length <= 0:
                raise ExportError(f"--input-length must be a positive number of samples, got {input_length}")
            length = input_length
        return inp, leads, int(length)

    def _infer_shapes(self, inp: onnx.ValueInfoProto, leads: int, length: int) -> None:
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for value in model.graph.input:
            if value.name == inp.name:
                dims = value.type.tensor_type.shape.dim
                if not dims[0].HasField("dim_value"):
                    # A dynamic batch is fixed at 2 (not 1) for inference: shape arithmetic such as
                    # view(x.size(0), -1) then resolves, and a reshape that mixes ECGs of one batch
                    # (a constant [1, -1]) shows as a changed batch axis.
                    dims[0].dim_value = 2
                dims[1].dim_value, dims[2].dim_value = leads, length
        # Drop stale shapes recorded by the exporter (made for another length); infer them anew.
        del model.graph.value_info[:]
        try:
            inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        except Exception as e:
            raise ExportError(
                f"{self.path}: ONNX shape inference fails for an input of {leads} leads x {length} samples "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check --input-length"
            ) from None
        g = inferred.graph
        for value in [*g.input, *g.value_info, *g.output]:
            self.types[value.name] = value.type.tensor_type.elem_type
            dims = _dims(value)
            if dims is not None:
                self.shapes[value.name] = dims
        self._runtime_shapes(model, inp.name, leads, length)

    def _runtime_shapes(self, model: onnx.ModelProto, input_name: str, leads: int, length: int) -> None:
        """Shapes inference left open (shape arithmetic in older opsets that ONNX's data propagation
        does not follow), measured by running the graph once on zeros with ONNX Runtime."""
        float_values = [
            o
            for node in model.graph.node
            for o in node.output
            if o and self.types.get(o, onnx.TensorProto.FLOAT) in _FLOAT_TYPES
        ]
        open_values = [
            v
            for v in float_values
            if not ((dims := self.shapes.get(v)) and len(dims) >= 2 and all(isinstance(d, int) for d in dims))
        ]
        if not open_values:
            return
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        known = {o.name for o in probe.graph.output}
        for v in open_values:
            if v not in known:
                elem = self.types.get(v) or onnx.TensorProto.FLOAT
                probe.graph.output.append(onnx.helper.make_tensor_value_info(v, elem, None))
        batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 2
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(
                probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            names = [o.name for o in session.get_outputs()]
            values = session.run(names, {input_name: np.zeros((batch, leads, length), np.float32)})
        except Exception as e:
            raise ExportError(
                f"{self.path}: the model does not run on {leads} leads x {length} samples "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check --input-length"
            ) from None
        for name, value in zip(names, values, strict=True):
            if name in open_values:
                self.shapes[name] = list(np.shape(value))

    # ------------------------------------------------------------------ helpers

    def _name(self, node: onnx.NodeProto, index: int) -> str:
        base = node.name or f"{node.op_type}_{index}"
        self.names[base] = self.names.get(base, 0) + 1
        return base if self.names[base] == 1 else f"{base}@{self.names[base]}"

    def _tensor(self, value: str) -> str:
        return f"{value}.0" if value == INPUT else value

    def _per_sample(self, value: str, name: str, op_type: str) -> tuple[int, ...]:
        dims = self.shapes.get(value)
        if dims is None or len(dims) < 2 or not all(isinstance(d, int) for d in dims[1:]):
            raise ExportError(
                f"layer {name} ({op_type}): the shape of {value!r} could not be inferred ({dims}); every "
                "tensor must have a fixed shape for one input length"
            )
        return tuple(int(d) for d in dims[1:])

    def _data(self, node: onnx.NodeProto, name: str) -> list[str]:
        """The node's inputs that carry the ECG (not constants), as ONNX value names."""
        return [i for i in node.input if i and i not in self.consts and i not in self.shape_values]

    def _const(self, node: onnx.NodeProto, position: int, name: str, what: str) -> np.ndarray | None:
        if position >= len(node.input) or not node.input[position]:
            return None
        value = node.input[position]
        if value not in self.consts and value in self.shape_values:
            resolved = self._from_shapes(value)
            if resolved is not None:
                self.consts[value] = resolved
        if value not in self.consts:
            raise ExportError(
                f"layer {name} ({node.op_type}): its {what} {value!r} is computed from the input at run "
                "time, from the signal's values or the batch size; it must be a constant (an initializer), "
                "or computed from the ECG's shape alone (resolved at export, the shape being fixed)"
            )
        return self.consts[value]

    def _from_shapes(self, value: str) -> np.ndarray | None:
        """``value`` when it is computed from shapes alone (every path from the input passes a Shape
        or Size node: torch_ecg's "same" padding), by running the model to it on ONNX Runtime with a
        batch of 1 and of 2 ECGs of the fixed (leads, samples); None when it reads the signal's
        values or changes with the batch. Shapes are fixed at export, so such a value is a constant."""
        producer = {o: n for n in self.graph.node for o in n.output}
        stack, seen = [value], set()
        while stack:
            name = stack.pop()
            if name in seen or name in self.consts:
                continue
            seen.add(name)
            if name == self.input_name:
                return None  # reaches the signal's values, not only its shape
            node = producer.get(name)
            if node is None:
                return None
            if node.op_type not in ("Shape", "Size"):
                stack.extend(i for i in node.input if i)
        import onnxruntime as ort

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        elem = self.types.get(value) or onnx.TensorProto.INT64
        model.graph.output.append(onnx.helper.make_tensor_value_info(value, elem, None))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        fixed = fixed_batch(self.model, self.input_name)
        batches = (fixed,) if fixed is not None else (1, 2)
        try:
            session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            values = [
                session.run([value], {self.input_name: np.zeros((b, self.leads, self.length), np.float32)})[0]
                for b in batches
            ]
        except Exception:  # the model does not run at these shapes: the caller's refusal stands
            return None
        if any(v.shape != values[0].shape or not np.array_equal(v, values[0]) for v in values):
            return None
        return np.asarray(values[0])

    def _emit(
        self, kind: str, name: str, node: onnx.NodeProto, inputs: list[str], params: dict | None = None
    ) -> Op:
        out = node.output[0]
        viewed = [i for i in inputs if i in self.gate_views]
        if viewed and kind != MUL:
            why = f"it reads {viewed[0]}, a gate's broadcast view (only a product may)"
            raise unsupported(name, kind, why)
        op = Op(
            kind,
            name,
            tuple(self.alias[i] for i in inputs),
            self._tensor(out),
            self._per_sample(out, name, node.op_type),
            tuple(self.gate_views.get(i) or self._per_sample(i, name, node.op_type) for i in inputs),
            params or {},
        )
        self.ops.append(op)
        self.alias[out] = op.output
        return op

    # ------------------------------------------------------------------ nodes

    def _node(self, node: onnx.NodeProto, index: int) -> None:
        if node.output and node.output[0] in self.spelled.inner:
            return  # a step of a several-node activation, emitted at its last node
        name = self._name(node, index)
        op_type = node.op_type
        if node.output and node.output[0] in self.spelled.last:
            kind, params, x = self.spelled.last[node.output[0]]
            self._emit(kind, name, node, [x], params)
            return
        if node.domain not in ("", "ai.onnx"):
            raise unsupported(name, f"{node.domain}.{op_type}", "operators outside the standard ONNX domain")
        if op_type == "Constant":
            self._constant(node, name)
            return
        data = self._data(node, name)
        if not data:
            if any(i in self.shape_values for i in node.input):
                self.shape_values.update(node.output)  # more shape arithmetic
            else:
                self._fold(node, name)
            return
        if all(self.types.get(o, 0) not in _FLOAT_TYPES and self.types.get(o, 0) != 0 for o in node.output):
            # integer shape arithmetic (Shape, Gather, ...): shapes come from inference instead
            self.shape_values.update(node.output)
            return
        viewed = [d for d in data if d in self.views]
        if viewed:
            self._check_extra_outputs(node, name)
            if op_type in _LAYOUT_OPS:
                self._layout(node, name, data[0])
            elif op_type in ("MaxPool", "AveragePool") and len(data) == 1:
                self._lifted_pool(node, name, data[0], MAXPOOL if op_type == "MaxPool" else AVGPOOL)
            elif op_type in ("ReduceMean", "ReduceMax") and len(data) == 1:
                self._lifted_reduce(node, name, data[0], GAP if op_type == "ReduceMean" else GMP)
            else:
                raise self._view_refusal(name, op_type, viewed[0])
            return
        missing = [d for d in data if d not in self.alias]
        if missing:
            raise ExportError(
                f"layer {name} ({op_type}): input {missing[0]!r} comes from an unsupported path"
            )
        handler = getattr(self, f"_op_{op_type}", None)
        if handler is None:
            raise self._refusal(node, name)
        self._check_extra_outputs(node, name)
        handler(node, name, data)

    def _refusal(self, node: onnx.NodeProto, name: str) -> ExportError:
        """The refusal of an unsupported node, named after the layer it belongs to where the
        exporter's scoped names (``/block/act/Erf``) show one: a PyTorch layer exported as several
        ONNX nodes (GELU before opset 20, LSTM with its transposes, BatchNorm with batch statistics)
        is refused as that layer, not as its first arithmetic node."""
        scope = node.name.rsplit("/", 1)[0] if node.name.count("/") >= 2 else ""
        in_scope = [n.op_type for n in self.graph.node if scope and n.name.startswith(scope + "/")]
        if "BatchNormalization" in in_scope and "ReduceMean" in in_scope:
            return batchnorm_error(scope)
        key = next((_REPLACEMENT_KEYS[t] for t in in_scope if t in _REPLACEMENT_KEYS), None)
        if key is None and "Erf" in in_scope:
            key = "GELU"
        if key is None and "Tanh" in in_scope and "Erf" not in in_scope and len(set(in_scope)) > 2:
            # a polynomial inside a Tanh: GELU's tanh form in a spelling ``activation_spellings`` lacks
            key = "GELU (tanh form)"
        reason = f"ONNX operator {node.op_type}"
        if len(set(in_scope)) > 1:
            reason += f" in {scope} ({', '.join(sorted(set(in_scope)))})"
        return unsupported(name, key or _REPLACEMENT_KEYS.get(node.op_type, node.op_type), reason)

    def _check_extra_outputs(self, node: onnx.NodeProto, name: str) -> None:
        for extra in node.output[1:]:
            if extra and self.uses.get(extra, 0):
                raise unsupported(
                    name, node.op_type, f"its extra output {extra!r} (indices, mask or statistics) is used"
                )

    def _constant(self, node: onnx.NodeProto, name: str) -> None:
        attrs = node.attribute
        if len(attrs) != 1:
            raise ExportError(f"layer {name} (Constant): expected exactly one value attribute")
        a = attrs[0]
        if a.name == "value":
            value = numpy_helper.to_array(a.t)
        elif a.name in ("value_float", "value_int"):
            value = np.asarray(onnx.helper.get_attribute_value(a))
        elif a.name in ("value_floats", "value_ints"):
            value = np.asarray(list(onnx.helper.get_attribute_value(a)))
        else:
            raise ExportError(f"layer {name} (Constant): {a.name} constants are not supported")
        self.consts[node.output[0]] = value

    def _fold(self, node: onnx.NodeProto, name: str) -> None:
        """A node of constants only (a transposed weight, a cast): computed once, here."""
        from onnx.reference import ReferenceEvaluator

        inputs = [i for i in node.input if i]
        try:
            graph = onnx.helper.make_graph(
                [node],
                "fold",
                [onnx.helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in inputs],
                [
                    onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                    for o in node.output
                ],
            )
            m = onnx.helper.make_model(graph, opset_imports=list(self.model.opset_import))
            results = ReferenceEvaluator(m).run(None, {i: self.consts[i] for i in inputs})
        except Exception as e:
            raise ExportError(
                f"layer {name} ({node.op_type}): its constant inputs could not be evaluated "
                f"({type(e).__name__}: {e})"
            ) from None
        for out, value in zip(node.output, results, strict=False):
            if out:
                self.consts[out] = np.asarray(value)

    # ------------------------------------------------------------------ operators

    def _op_Identity(self, node, name, data) -> None:
        self.alias[node.output[0]] = self.alias[data[0]]

    def _op_Dropout(self, node, name, data) -> None:
        if len(node.input) >= 3 and node.input[2]:
            mode = self.consts.get(node.input[2])
            if mode is None or bool(np.asarray(mode)):
                raise unsupported(name, "Dropout", "training_mode is on (export the model in eval mode)")
        self.alias[node.output[0]] = self.alias[data[0]]

    def _op_Cast(self, node, name, data) -> None:
        to = _attrs(node).get("to")
        if to != onnx.TensorProto.FLOAT:
            raise unsupported(name, "Cast", "only casts to float32 of the signal")
        self.alias[node.output[0]] = self.alias[data[0]]

    def _op_Pad(self, node, name, data) -> None:
        # Pads computed from shapes (torch_ecg's "same" padding) are refused by name, never a KeyError.
        pads = [int(v) for v in np.asarray(self._const(node, 1, name, "pads")).reshape(-1)]
        value = self._const(node, 2, name, "constant value")
        mode = _attrs(node).get("mode", b"constant")
        zero = value is None or not np.any(np.asarray(value))
        if (
            mode != b"constant"
            or not zero
            or len(pads) != 6
            or any(pads[i] for i in (0, 1, 3, 4))
            or min(pads) < 0
        ):
            raise unsupported(name, "Pad", f"only zero padding of the time axis, got pads {pads}")
        self._emit(PAD, name, node, data[:1], {"left": pads[2], "right": pads[5]})

    def _op_Relu(self, node, name, data) -> None:
        self._emit(RELU, name, node, data[:1])

    # The other activations (ops/activation.py); SiLU, and GELU and Mish before opsets 20 and 18,
    # arrive as several nodes (``activation_spellings``).
    def _op_LeakyRelu(self, node, name, data) -> None:
        self._emit(LEAKY_RELU, name, node, data[:1], {"slope": float(_attrs(node).get("alpha", 0.01))})

    def _op_Elu(self, node, name, data) -> None:
        self._emit(ELU, name, node, data[:1], {"alpha": float(_attrs(node).get("alpha", 1.0))})

    def _op_Gelu(self, node, name, data) -> None:
        approximate = _attrs(node).get("approximate", b"none")
        self._emit(GELU, name, node, data[:1], {"approximate": approximate.decode()})

    def _op_Mish(self, node, name, data) -> None:
        self._emit(MISH, name, node, data[:1])

    def _op_Sigmoid(self, node, name, data) -> None:
        self._emit(SIGMOID, name, node, data[:1])

    def _op_Tanh(self, node, name, data) -> None:
        self._emit(TANH, name, node, data[:1])

    def _op_Conv(self, node, name, data) -> None:
        a = _attrs(node)
        if node.input[0] != data[0] or len(data) != 1:
            raise ExportError(f"layer {name} (Conv): its weight and bias must be constants")
        w = self._const(node, 1, name, "weight")
        b = self._const(node, 2, name, "bias")
        in_shape = self._per_sample(data[0], name, "Conv")
        if w.ndim != 3 or len(in_shape) != 2:
            raise unsupported(
                name, "Conv", f"only 1-D convolutions of (batch, channels, time), weight {w.shape}"
            )
        k = int(a.get("kernel_shape", [w.shape[2]])[0])
        stride = self._one(a.get("strides", [1]), name, "strides")
        dilation = self._one(a.get("dilations", [1]), name, "dilations")
        padding = self._padding(a, name, "Conv", in_shape[1], k, stride, dilation)
        groups = int(a.get("group", 1))
        out_shape = self._per_sample(node.output[0], name, "Conv")
        if out_shape[1] != conv_output_length(in_shape[1], k, stride, padding, dilation):
            raise ExportError(
                f"layer {name} (Conv): output length {out_shape[1]} does not match its attributes"
            )
        params = {
            "weight": w.astype(np.float64),
            "bias": None if b is None else b.astype(np.float64).reshape(-1),
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "groups": groups,
        }
        self._emit(CONV, name, node, data, params)

    def _op_BatchNormalization(self, node, name, data) -> None:
        a = _attrs(node)
        if node.input[0] != data[0] or len(data) != 1:
            raise ExportError(
                f"layer {name} (BatchNormalization): its scale, bias, mean and variance must be constants"
            )
        if a.get("training_mode", 0):
            raise batchnorm_error(name)
        gamma, beta, mean, var = (
            np.asarray(self._const(node, i, name, what), np.float64).reshape(-1)
            for i, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance"))
        )
        params = batchnorm_affine(name, mean, var, gamma, beta, float(a.get("epsilon", 1e-5)))
        self._emit(AFFINE, name, node, data, params)

    def _op_MaxPool(self, node, name, data) -> None:
        self._pool(node, name, data, MAXPOOL)

    def _op_AveragePool(self, node, name, data) -> None:
        self._pool(node, name, data, AVGPOOL)

    def _pool(self, node, name, data, kind) -> None:
        in_shape = self._per_sample(data[0], name, node.op_type)
        out_shape = self._per_sample(node.output[0], name, node.op_type)
        if len(in_shape) != 2:
            raise unsupported(name, node.op_type, "only 1-D pooling of (batch, channels, time)")
        kind, params = self._pool_params(node, name, _attrs(node), in_shape, out_shape, kind)
        self._emit(kind, name, node, data, params)

    def _lifted_pool(self, node, name, value: str, kind: str) -> None:
        """A 1-D pool as the dynamo exporter spells it: Unsqueeze to (B, C, 1, L), a 2-D pool with a
        (1, k) window, Squeeze back. The pool is read as the 1-D pool of the IR tensor; its 4-D output
        is a view of that pool's output, which the Squeeze then brings back."""
        base, base_probe, probe = self.views[value]
        if probe.ndim != 4 or not np.array_equal(probe, base_probe[:, :, None, :]):
            raise self._view_refusal(name, node.op_type, value)
        a = _attrs(node)
        kernel, strides = list(a.get("kernel_shape", [])), list(a.get("strides", [1, 1]))
        pads, dilations = list(a.get("pads", [0, 0, 0, 0])), list(a.get("dilations", [1, 1]))
        if len(kernel) != 2 or kernel[0] != 1 or strides[0] != 1 or pads[0::2] != [0, 0] or dilations[0] != 1:
            raise unsupported(
                name,
                f"2-D {node.op_type}",
                f"only a (1, k) window over time, got kernel {kernel}, pads {pads}",
            )
        one_d = {**a, "kernel_shape": kernel[1:], "strides": strides[1:], "dilations": dilations[1:]}
        one_d["pads"] = pads[1::2]
        in_shape = self._per_sample(base, name, node.op_type)
        out4 = self._per_sample(node.output[0], name, node.op_type)
        out_shape = (out4[0], out4[2])
        kind, params = self._pool_params(node, name, one_d, in_shape, out_shape, kind)
        out = node.output[0]
        op = Op(kind, name, (self.alias[base],), self._tensor(out), out_shape, (in_shape,), params)
        self.ops.append(op)
        flat = f"{out}#1d"
        self.alias[flat] = op.output
        self.shapes[flat] = [self.shapes[out][0], out_shape[0], out_shape[1]]
        probe_out = self._probe(flat)
        self.views[out] = (flat, probe_out, probe_out[:, :, None, :])

    def _lifted_reduce(self, node, name, value: str, kind: str) -> None:
        """Global pooling as the dynamo exporter spells it: Unsqueeze to (B, C, 1, L), ReduceMean or
        ReduceMax over the last axes, Squeeze back; read as the global pool of the IR tensor."""
        base, base_probe, probe = self.views[value]
        a = _attrs(node)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self._const(node, 1, name, "axes")
        axes = sorted({int(x) % 4 for x in np.ravel(axes)}) if axes is not None else None
        if (
            probe.ndim != 4
            or not np.array_equal(probe, base_probe[:, :, None, :])
            or axes not in ([3], [2, 3])
        ):
            raise self._view_refusal(name, node.op_type, value)
        in_shape = self._per_sample(base, name, node.op_type)
        out = node.output[0]
        pooled = f"{out}#1d"
        op = Op(kind, name, (self.alias[base],), self._tensor(pooled), (in_shape[0], 1), (in_shape,))
        self.ops.append(op)
        self.alias[pooled] = op.output
        self.shapes[pooled] = [self.shapes[out][0], in_shape[0], 1]
        probe_out = self._probe(pooled)  # (B, C, 1)
        kept = probe_out[:, :, None, :] if a.get("keepdims", 1) else probe_out[:, :, 0]
        self._settle(out, pooled, probe_out, kept, name)

    def _pool_params(self, node, name, a, in_shape, out_shape, kind) -> tuple[str, dict[str, Any]]:
        k = self._one(a["kernel_shape"], name, "kernel_shape")
        stride = self._one(a.get("strides", [1]), name, "strides")
        if any(d != 1 for d in a.get("dilations", [1])):
            raise unsupported(name, node.op_type, "dilations > 1")
        if a.get("storage_order", 0):
            raise unsupported(name, node.op_type, "storage_order 1")
        padding = self._padding(a, name, node.op_type, in_shape[1], k, stride, 1)
        ceil = bool(a.get("ceil_mode", 0))
        if out_shape[1] != pool_output_length(in_shape[1], k, stride, padding, ceil):
            raise unsupported(
                name,
                node.op_type,
                f"its output length {out_shape[1]} differs from PyTorch's rule for kernel {k}, stride "
                f"{stride}, padding {padding}, ceil_mode {ceil}",
            )
        if padding == 0 and k == in_shape[1] and out_shape[1] == 1:
            # a global pooling written as a window over the whole signal (AdaptiveMaxPool1d(1) exported)
            return (GMP if kind == MAXPOOL else GAP), {}
        params: dict[str, Any] = {"kernel": k, "stride": stride, "padding": padding, "ceil_mode": ceil}
        if kind == AVGPOOL:
            params["count_include_pad"] = bool(a.get("count_include_pad", 0))
        return kind, params

    def _op_GlobalAveragePool(self, node, name, data) -> None:
        self._global(node, name, data, GAP)

    def _op_GlobalMaxPool(self, node, name, data) -> None:
        self._global(node, name, data, GMP)

    def _global(self, node, name, data, kind) -> None:
        if len(self._per_sample(data[0], name, node.op_type)) != 2:
            raise unsupported(name, node.op_type, "only global pooling over time of (batch, channels, time)")
        self._emit(kind, name, node, data)

    def _op_ReduceMean(self, node, name, data) -> None:
        self._reduce(node, name, data, GAP)

    def _op_ReduceMax(self, node, name, data) -> None:
        self._reduce(node, name, data, GMP)

    def _reduce(self, node, name, data, kind) -> None:
        a = _attrs(node)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self._const(node, 1, name, "axes")
        rank = len(self.shapes.get(data[0]) or ())
        axes = [int(x) % rank for x in np.asarray(axes).reshape(-1)] if axes is not None and rank else None
        if rank != 3 or axes != [2]:
            raise unsupported(
                name,
                node.op_type,
                f"only the reduction over time (axis -1) of (batch, channels, time), axes {axes}",
            )
        if a.get("keepdims", 1):
            self._emit(kind, name, node, data)
            return
        in_shape = self._per_sample(data[0], name, node.op_type)
        gap = Op(
            kind,
            name,
            (self.alias[data[0]],),
            f"{self._tensor(node.output[0])}.pool",
            (in_shape[0], 1),
            (in_shape,),
        )
        self.ops.append(gap)
        flat = Op(
            FLATTEN,
            f"{name}.flatten",
            (gap.output,),
            self._tensor(node.output[0]),
            (in_shape[0],),
            ((in_shape[0], 1),),
        )
        self.ops.append(flat)
        self.alias[node.output[0]] = flat.output

    def _op_Concat(self, node, name, data) -> None:
        rank = len(self.shapes.get(node.output[0]) or ())
        axis = int(_attrs(node).get("axis", 0))
        if len(data) != len([i for i in node.input if i]):
            raise unsupported(name, "Concat", "concatenation with a constant tensor")
        if not rank or axis % rank != 1:
            raise unsupported(name, "Concat", f"only concatenation along channels (axis 1), got axis {axis}")
        self._emit(CONCAT, name, node, data)

    def _op_Add(self, node, name, data) -> None:
        if len(data) == 2:
            shapes = [self._per_sample(d, name, "Add") for d in data]
            if shapes[0] != shapes[1]:
                raise unsupported(name, "Add", f"only the sum of two tensors of one shape, got {shapes}")
            self._emit(ADD, name, node, data)
            return
        # x @ W + b: the bias of a MatMul-made linear layer
        linear = self.open_linear.pop(data[0], None)
        bias_input = next(i for i in node.input if i != data[0])
        if linear is None or self.uses.get(data[0], 0) != 1:
            raise unsupported(name, "Add", "adding a constant is only supported as the bias after MatMul")
        bias = np.asarray(self.consts[bias_input], np.float64)
        f_out = linear.out_shape[0]
        if bias.size != f_out or bias.reshape(-1).shape[0] != f_out or bias.ndim > 2:
            raise unsupported(
                name, "Add", f"the bias after MatMul must have {f_out} values, got {bias.shape}"
            )
        linear.params["bias"] = bias.reshape(-1)
        self.alias[node.output[0]] = linear.output

    def _op_Gemm(self, node, name, data) -> None:
        a = _attrs(node)
        if node.input[0] != data[0] or len(data) != 1:
            raise unsupported(name, "Gemm", "only input @ constant weight (the first input is the signal)")
        if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
            raise unsupported(name, "Gemm", "only alpha = beta = 1 and transA = 0")
        w = np.asarray(self._const(node, 1, name, "weight"), np.float64)
        weight = w if a.get("transB", 0) else w.T
        c = self._const(node, 2, name, "bias")
        bias = None
        if c is not None:
            c = np.asarray(c, np.float64)
            if c.size == 1:
                c = np.full(weight.shape[0], float(c.reshape(-1)[0]))
            if c.reshape(-1).shape[0] != weight.shape[0] or c.ndim > 2:
                raise unsupported(name, "Gemm", f"bias of shape {c.shape} for {weight.shape[0]} outputs")
            bias = c.reshape(-1)
        self._linear(node, name, data, weight, bias)

    def _op_MatMul(self, node, name, data) -> None:
        if len(data) == 1 and node.input[1] == data[0] and node.input[0] in self.consts:
            params = channel_mix_params(self.consts[node.input[0]], self._per_sample(data[0], name, "MatMul"))
            if params is None:
                raise unsupported(name, "MatMul", CHANNEL_MIX_ONLY)
            self._emit(CONV, name, node, data, params)
            return
        if node.input[0] != data[0] or len(data) != 1:
            raise unsupported(name, "MatMul", "only input @ constant weight (the first input is the signal)")
        w = np.asarray(self._const(node, 1, name, "weight"), np.float64)
        if w.ndim != 2:
            raise unsupported(name, "MatMul", f"the weight must be 2-D, got {w.shape}")
        op = self._linear(node, name, data, w.T.copy(), None)
        self.open_linear[node.output[0]] = op

    def _linear(self, node, name, data, weight: np.ndarray, bias: np.ndarray | None) -> Op:
        in_shape = self._per_sample(data[0], name, node.op_type)
        if len(in_shape) != 1 or in_shape[0] != weight.shape[1]:
            raise unsupported(
                name,
                node.op_type,
                f"a dense layer needs flat (batch, {weight.shape[1]}) features, got per-sample {in_shape}; "
                "flatten first",
            )
        return self._emit(LINEAR, name, node, data, {"weight": weight, "bias": bias})

    def _op_Flatten(self, node, name, data) -> None:
        rank = len(self.shapes.get(data[0]) or ())
        axis = int(_attrs(node).get("axis", 1))
        if not rank or axis % rank != 1:
            raise unsupported(name, "Flatten", f"only flattening from axis 1, got axis {axis}")
        self._reshape(node, name, data)

    def _op_Reshape(self, node, name, data) -> None:
        self._reshape(node, name, data)

    def _op_Squeeze(self, node, name, data) -> None:
        self._reshape(node, name, data)

    def _op_Unsqueeze(self, node, name, data) -> None:
        self._reshape(node, name, data)

    def _reshape(self, node, name, data) -> None:
        in_dims, out_dims = self.shapes.get(data[0]), self.shapes.get(node.output[0])
        in_shape = self._per_sample(data[0], name, node.op_type)
        out_shape = self._per_sample(node.output[0], name, node.op_type)
        if out_dims[0] != in_dims[0]:
            raise unsupported(name, node.op_type, f"it changes the batch axis ({in_dims} -> {out_dims})")
        if out_shape == in_shape:
            self.alias[node.output[0]] = self.alias[data[0]]
            return
        if self._gate_view(node, name, data[0]):
            return
        if len(out_shape) != 1 or out_shape[0] != math.prod(in_shape):
            self._layout(node, name, data[0])  # another layout: a view, until it comes back
            return
        self._emit(FLATTEN, name, node, data)

    def _gate_view(self, node, name, value: str) -> bool:
        """Alias a view that only broadcasts a gate ((C,) -> (C, 1), (C, 1) -> (C, L)); False if
        ``node`` is another reshape."""
        shape = self.gate_views.get(value) or self._per_sample(value, name, node.op_type)
        out = self._per_sample(node.output[0], name, node.op_type)
        if len(out) != 2 or out == shape or broadcast_problem(out, shape) is not None:
            return False
        self.alias[node.output[0]] = self.alias[value]
        self.gate_views[node.output[0]] = shape
        return True

    def _op_Expand(self, node, name, data) -> None:
        if not self._gate_view(node, name, data[0]):
            raise unsupported(name, "Expand", "only a gate broadcast over the signal it multiplies")

    def _op_Mul(self, node, name, data) -> None:
        if len(data) != 2:  # a product with a constant: not a gate
            raise self._refusal(node, name)
        shapes = tuple(self.gate_views.get(d) or self._per_sample(d, name, "Mul") for d in data)
        producers = [next((o for o in self.ops if o.output == self.alias[d]), None) for d in data]
        try:
            gate = gate_index(shapes, tuple(p.kind if p else None for p in producers))
        except NoClearGate as e:
            raise unsupported(name, "Mul", str(e)) from None
        self._emit(MUL, name, node, data, {"gate": gate})

    def _op_Transpose(self, node, name, data) -> None:
        self._layout(node, name, data[0])

    # ------------------------------------------------------------------ rearrangements

    def _probe(self, value: str) -> np.ndarray:
        """Distinct values in ``value``'s full shape (a batch of two where the batch is not fixed)."""
        dims = self.shapes[value]
        shape = (dims[0] if isinstance(dims[0], int) else 2, *(int(d) for d in dims[1:]))
        return np.arange(math.prod(shape), dtype=np.float64).reshape(shape)

    def _layout(self, node, name, value: str) -> None:
        """Transpose, Reshape, Squeeze, Unsqueeze or Flatten, replayed on a probe: when the
        rearrangements since the IR tensor give it back (a round trip, a singleton axis added and
        removed) the value is that tensor; when they give its per-ECG flattening, a flatten; else the
        value stays a view, which only another rearrangement (or a 2-D pool over a (1, k) window,
        the dynamo exporter's 1-D pool) may read."""
        base, base_probe, probe = self.views.get(value) or (value, *([self._probe(value)] * 2))
        self._settle(node.output[0], base, base_probe, self._replay(node, name, probe), name)

    def _settle(self, out: str, base: str, base_probe: np.ndarray, new: np.ndarray, name: str) -> None:
        """``out`` holds ``base`` rearranged as ``new`` shows on its probe: that tensor itself, its
        per-ECG flattening (a flatten op), or a view for a later rearrangement to bring back."""
        if new.shape == base_probe.shape and np.array_equal(new, base_probe):
            self.alias[out] = self.alias[base]
        elif new.ndim == 2 and np.array_equal(new, base_probe.reshape(len(base_probe), -1)):
            in_shape = self._per_sample(base, name, "Reshape")
            if len(in_shape) == 1:
                self.alias[out] = self.alias[base]
            else:
                op = Op(FLATTEN, name, (self.alias[base],), self._tensor(out), (new.shape[1],), (in_shape,))
                self.ops.append(op)
                self.alias[out] = op.output
        else:
            self.views[out] = (base, base_probe, new)

    def _replay(self, node, name, probe: np.ndarray) -> np.ndarray:
        a, op_type = _attrs(node), node.op_type
        if op_type == "Transpose":
            return np.transpose(probe, a.get("perm", list(range(probe.ndim))[::-1]))
        if op_type in ("Squeeze", "Unsqueeze"):
            axes = a.get("axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                axes = self._const(node, 1, name, "axes")
            if op_type == "Squeeze":
                return np.squeeze(probe, axis=None if axes is None else tuple(int(x) for x in np.ravel(axes)))
            rank = probe.ndim + len(np.ravel(axes))
            for axis in sorted(int(x) % rank for x in np.ravel(axes)):
                probe = np.expand_dims(probe, axis)
            return probe
        if op_type == "Flatten":
            axis = int(a.get("axis", 1)) % probe.ndim
            return probe.reshape(math.prod(probe.shape[:axis]), -1)
        if op_type == "Identity":
            return probe
        # Reshape: the inferred output shape, with the probe's batch
        return probe.reshape(len(probe), *self._per_sample(node.output[0], name, op_type))

    def _view_refusal(self, name: str, op_type: str, value: str) -> ExportError:
        base, base_probe, probe = self.views[value]
        return unsupported(
            name,
            op_type,
            f"it reads {base!r} rearranged from {base_probe.shape[1:]} to {probe.shape[1:]} (transposed or "
            "reshaped); a rearrangement is supported only where it returns to (batch, channels, time) before "
            "the next layer (a round trip), or flattens each ECG's features",
        )

    # ------------------------------------------------------------------ attribute helpers

    def _one(self, values, name: str, what: str) -> int:
        values = list(values)
        if len(values) != 1:
            raise ExportError(f"layer {name}: {what} {values} must be one-dimensional (a 1-D layer)")
        return int(values[0])

    def _padding(
        self, a: dict, name: str, op_type: str, length: int, k: int, stride: int, dilation: int
    ) -> int:
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto == "VALID":
            return 0
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            total = max((-(-length // stride) - 1) * stride + (k - 1) * dilation + 1 - length, 0)
            if total % 2:
                raise unsupported(
                    name, op_type, f"auto_pad {auto} pads unevenly ({total} samples) at this length"
                )
            return total // 2
        if auto != "NOTSET":
            raise unsupported(name, op_type, f"auto_pad {auto}")
        pads = list(a.get("pads", [0, 0]))
        if len(pads) != 2 or pads[0] != pads[1]:
            raise unsupported(name, op_type, f"only the same padding at both ends, got pads {pads}")
        return int(pads[0])


# --------------------------------------------------------------------------- several-node activations


@dataclass
class Spellings:
    """Activations spelled as several nodes: the last node's output -> (kind, params, input value),
    and the outputs of the nodes before it (skipped)."""

    last: dict[str, tuple[str, dict, str]] = field(default_factory=dict)
    inner: set[str] = field(default_factory=set)


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_TANH_K, _TANH_C = math.sqrt(2.0 / math.pi), 0.044715  # GELU's tanh form: tanh(k (x + c x^3))


def activation_spellings(graph: onnx.GraphProto, uses: dict[str, int]) -> Spellings:
    """The exporters' spellings of one activation as a product of ``x`` and a function of ``x``:
    SiLU ``x * Sigmoid(x)`` (every opset), Mish ``x * Tanh(Softplus(x))`` (before opset 18),
    exact GELU ``0.5 * x * (1 + Erf(x / sqrt 2))`` and its tanh form
    ``0.5 * x * (1 + Tanh(k * (x + 0.044715 * x^3)))`` (before opset 20, the factors in either
    exporter's order, the cube as ``Pow`` or products). Each step's output must be read by that
    step alone; another spelling is refused naming its ops."""
    producer = {o: n for n in graph.node for o in n.output}
    scalars = _scalars(graph)
    found = Spellings()
    for node in graph.node:
        if node.op_type != "Mul" or node.output[0] in found.inner:
            continue
        factors, members = _factors(node.output[0], producer, uses, root=True)
        data = [f for f in factors if f not in scalars]
        scale = math.prod(scalars[f] for f in factors if f in scalars)
        if len(data) != 2:
            continue
        for x, other in (data, data[::-1]):
            match = _function_of(x, other, producer, uses, scalars)
            if match is not None and math.isclose(scale, match[2], rel_tol=1e-6):
                kind, params, _, steps = match
                found.last[node.output[0]] = (kind, params, x)
                found.inner |= (members | steps) - {node.output[0]}
                break
    return found


def _cubic_steps(v: str, x: str, producer: dict, uses: dict, scalars: dict[str, float]) -> set[str] | None:
    """The outputs of ``x + 0.044715 * x^3`` ending at ``v`` (the cube as ``Pow(x, 3)`` or
    ``x * x * x``; each step read once), or None."""

    def node(value: str, op_type: str):
        n = producer.get(value)
        return n if n is not None and n.op_type == op_type and uses.get(value, 0) == 1 else None

    add = node(v, "Add")
    if add is None or x not in add.input:
        return None
    term = node(next(i for i in add.input if i != x), "Mul") if list(add.input).count(x) == 1 else None
    if term is None:
        return None
    c = next((scalars[i] for i in term.input if i in scalars), None)
    cube_value = next((i for i in term.input if i not in scalars), None)
    if c is None or cube_value is None or not math.isclose(c, _TANH_C, rel_tol=1e-6):
        return None
    pow_node = node(cube_value, "Pow")
    if pow_node is not None and pow_node.input[0] == x and scalars.get(pow_node.input[1]) == 3.0:
        return {v, term.output[0], cube_value}
    factors, members = _factors(cube_value, producer, uses)
    return {v, term.output[0]} | members if factors == [x, x, x] else None


def _scalars(graph: onnx.GraphProto) -> dict[str, float]:
    """Values holding one number: initializers and ``Constant`` nodes."""
    out = {}
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.size == 1:
            out[init.name] = float(arr.reshape(-1)[0])
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            arr = numpy_helper.to_array(n.attribute[0].t)
            if arr.size == 1:
                out[n.output[0]] = float(arr.reshape(-1)[0])
    return out


def _factors(value: str, producer: dict, uses: dict, root: bool = False) -> tuple[list[str], set[str]]:
    """The factors of a product tree of ``Mul`` nodes ending at ``value`` (an inner product read by
    that tree alone), and the outputs of its ``Mul`` nodes."""
    node = producer.get(value)
    if node is None or node.op_type != "Mul" or (not root and uses.get(value, 0) != 1):
        return [value], set()
    factors, members = [], {value}
    for i in node.input:
        f, m = _factors(i, producer, uses)
        factors += f
        members |= m
    return factors, members


def _function_of(x: str, v: str, producer: dict, uses: dict[str, int], scalars: dict[str, float]):
    """(kind, params, the product's constant factor, step outputs) when ``v`` is Sigmoid(x),
    Tanh(Softplus(x)), 1 + Erf(x / sqrt 2) or 1 + Tanh(k (x + c x^3)), each step read once; else None."""
    chain = []
    while v != x and len(chain) < 3:
        node = producer.get(v)
        data = [i for i in node.input if i not in scalars] if node is not None else []
        if node is None or uses.get(v, 0) != 1 or len(data) != 1:
            return None
        chain.append(node)
        v = data[0]
    kinds = [n.op_type for n in chain]
    steps = {n.output[0] for n in chain}
    if v != x:
        cubic = _cubic_steps(v, x, producer, uses, scalars) if kinds == ["Add", "Tanh", "Mul"] else None
        one = next((scalars[i] for i in chain[0].input if i in scalars), None)
        k = next((scalars[i] for i in chain[-1].input if i in scalars), None)
        if cubic is None or one is None or k is None or not math.isclose(one, 1.0):
            return None
        if not math.isclose(k, _TANH_K, rel_tol=1e-6):
            return None
        return GELU, {"approximate": "tanh"}, 0.5, steps | cubic
    if kinds == ["Sigmoid"]:
        return SILU, {}, 1.0, steps
    if kinds == ["Tanh", "Softplus"]:
        return MISH, {}, 1.0, steps
    if kinds in (["Add", "Erf", "Div"], ["Add", "Erf", "Mul"]):
        one = next((scalars[i] for i in chain[0].input if i in scalars), None)
        c = next((scalars[i] for i in chain[-1].input if i in scalars), None)
        arg = (1.0 / c if kinds[-1] == "Div" else c) if c else None
        if one is not None and math.isclose(one, 1.0) and arg and math.isclose(arg, _SQRT_HALF, rel_tol=1e-6):
            return GELU, {"approximate": "none"}, 0.5, steps
    return None
