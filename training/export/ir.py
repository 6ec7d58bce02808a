"""A small, explicit intermediate representation of a supported CNN.

``trace_model`` turns a PyTorch module into a list of :class:`Op` in
topological order, over named tensors, with BatchNorm folded into the
preceding convolution and eval-mode no-ops (Dropout, Identity) removed. The
ONNX graph builder emits forward and backward graphs from this list, so the
export never depends on how PyTorch itself would export a model.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from training.data.schema import BEAT_SAMPLES, N_LEADS
from training.models import Add

# Op kinds. "Linear" layers (in the LRP sense: z = W a + b) are the ones rules attach to.
CONV, LINEAR, MAXPOOL, AVGPOOL, GAP, ADD, RELU, FLATTEN = (
    "conv",
    "linear",
    "maxpool",
    "avgpool",
    "gap",
    "add",
    "relu",
    "flatten",
)
RULE_LAYERS = frozenset({CONV, LINEAR, MAXPOOL, AVGPOOL, GAP, ADD})
INPUT = "x"
SUPPORTED_LAYERS = (
    "Conv1d, BatchNorm1d (after a Conv1d), ReLU, MaxPool1d, AvgPool1d, AdaptiveAvgPool1d(1), Linear, "
    "Dropout, Identity, residual addition, flatten"
)


class ExportError(ValueError):
    """The model cannot be exported: an unsupported layer, or graphs that disagree with PyTorch."""


@dataclass
class Op:
    """One layer application: ``output = kind(inputs; params)``."""

    kind: str
    name: str  # module path in the PyTorch model, for messages and node names
    inputs: tuple[str, ...]
    output: str
    out_shape: tuple[int, ...]  # per-sample shape, batch dimension excluded
    in_shape: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelIR:
    ops: list[Op]
    output: str

    def op_producing(self, tensor: str) -> Op | None:
        return next((op for op in self.ops if op.output == tensor), None)

    def consumers(self, tensor: str) -> list[Op]:
        return [op for op in self.ops if tensor in op.inputs]

    def conv_outputs(self) -> list[str]:
        """Tensors after each ReLU that follows a convolution (GradCAM candidate layers)."""
        found = []
        for op in self.ops:
            if op.kind == RELU:
                producer = self.op_producing(op.inputs[0])
                if producer is not None and producer.kind in (CONV, ADD):
                    found.append(op.output)
        return found


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Add) or super().is_leaf_module(m, qualname)


def trace_model(model: nn.Module) -> ModelIR:
    """Trace ``model`` (eval mode) into a :class:`ModelIR`, or raise :class:`ExportError`."""
    model = model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types for untraceable code
        raise ExportError(f"the model cannot be traced for export: {e}") from None
    gm = fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, N_LEADS, BEAT_SAMPLES))
    modules = dict(model.named_modules())
    ops: list[Op] = []
    alias: dict[str, str] = {}
    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            alias[node.name] = INPUT
        elif node.op == "output":
            output = alias[node.args[0].name]
        else:
            _convert_node(node, modules, ops, alias)
    assert output is not None
    return ModelIR(_fold_batchnorm(ops), output)


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape[1:])


def _convert_node(node: fx.Node, modules: dict[str, nn.Module], ops: list[Op], alias: dict[str, str]) -> None:
    args = [a for a in node.args if isinstance(a, fx.Node)]
    ins = tuple(alias[a.name] for a in args)
    in_shape = _shape(args[0]) if args else ()
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, (nn.Dropout, nn.Identity)):
            alias[node.name] = ins[0]
            return
        kind, params = _module_op(node.target, module, in_shape)
    elif node.op in ("call_function", "call_method") and node.target in (operator.add, torch.add, "add"):
        kind, params = ADD, {}
    elif node.op in ("call_function", "call_method") and node.target in (torch.flatten, "flatten", "view"):
        kind, params = FLATTEN, {}
    else:
        raise ExportError(f"unsupported operation {node.target!r} ({node.op}); supported: {SUPPORTED_LAYERS}")
    if kind == ADD and len(ins) != 2:
        raise ExportError(f"addition {node.name} must add exactly two tensors")
    alias[node.name] = node.name
    ops.append(Op(kind, str(node.target), ins, node.name, _shape(node), in_shape, params))


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy()


def _single(v: Any, what: str, name: str) -> int:
    v = v if isinstance(v, (tuple, list)) else (v,)
    if len(v) != 1:
        raise ExportError(f"layer {name}: {what} {v} must be one-dimensional")
    return int(v[0])


def _module_op(name: str, m: nn.Module, in_shape: tuple[int, ...]) -> tuple[str, dict[str, Any]]:
    if isinstance(m, Add):
        return ADD, {}
    if isinstance(m, nn.ReLU):
        return RELU, {}
    if isinstance(m, nn.Conv1d):
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ExportError(f"layer {name}: Conv1d must have groups=1, zero padding and integer padding")
        return CONV, {
            "weight": _np(m.weight),
            "bias": _np(m.bias),
            "stride": _single(m.stride, "stride", name),
            "padding": _single(m.padding, "padding", name),
            "dilation": _single(m.dilation, "dilation", name),
        }
    if isinstance(m, nn.BatchNorm1d):
        return "batchnorm", {"module": m}
    if isinstance(m, nn.Linear):
        return LINEAR, {"weight": _np(m.weight), "bias": _np(m.bias)}
    if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)):
        return _pool_op(name, m)
    if isinstance(m, nn.AdaptiveAvgPool1d):
        if _single(m.output_size, "output_size", name) != 1:
            raise ExportError(f"layer {name}: AdaptiveAvgPool1d must have output_size 1")
        return GAP, {}
    raise ExportError(f"layer {name} ({type(m).__name__}) is not supported; supported: {SUPPORTED_LAYERS}")


def _pool_op(name: str, m: nn.Module) -> tuple[str, dict[str, Any]]:
    k = _single(m.kernel_size, "kernel_size", name)
    s = _single(m.stride, "stride", name) if m.stride is not None else k
    pad = _single(m.padding, "padding", name)
    ok = s == k and pad == 0 and not m.ceil_mode
    if isinstance(m, nn.MaxPool1d):
        ok = ok and _single(m.dilation, "dilation", name) == 1
    if not ok:
        kind = type(m).__name__
        raise ExportError(
            f"layer {name} ({kind}): only non-overlapping pooling (stride == kernel_size, no padding)"
        )
    return (MAXPOOL if isinstance(m, nn.MaxPool1d) else AVGPOOL), {"kernel": k}


def _fold_batchnorm(ops: list[Op]) -> list[Op]:
    """Fold each eval-mode BatchNorm1d into the convolution that feeds it (and only it)."""
    out: list[Op] = []
    rename: dict[str, str] = {}
    for op in ops:
        op.inputs = tuple(rename.get(t, t) for t in op.inputs)
        if op.kind != "batchnorm":
            out.append(op)
            continue
        conv = next((o for o in out if o.output == op.inputs[0]), None)
        users = [o for o in ops if op.inputs[0] in o.inputs and o is not op]
        if conv is None or conv.kind != CONV or users:
            raise ExportError(
                f"layer {op.name} (BatchNorm1d) must directly follow a Conv1d whose output it alone uses"
            )
        bn: nn.BatchNorm1d = op.params["module"]
        mean, var = _np(bn.running_mean), _np(bn.running_var)
        gamma = _np(bn.weight) if bn.affine else np.ones_like(mean)
        beta = _np(bn.bias) if bn.affine else np.zeros_like(mean)
        scale = gamma / np.sqrt(var + bn.eps)
        bias = conv.params["bias"] if conv.params["bias"] is not None else np.zeros_like(mean)
        conv.params["weight"] = conv.params["weight"] * scale[:, None, None]
        conv.params["bias"] = (bias - mean) * scale + beta
        conv.params["folded"] = op.name
        rename[op.output] = conv.output
    return out
