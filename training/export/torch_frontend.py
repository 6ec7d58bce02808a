"""The PyTorch front end of the export: an ``nn.Module`` traced by torch.fx into a ModelIR.

Modules and their functional forms are both accepted (``nn.ReLU`` or ``F.relu``,
``nn.Flatten`` or ``torch.flatten`` or ``x.view(x.size(0), -1)``, ``nn.MaxPool1d``
or ``F.max_pool1d`` ...). Each call becomes its own op, so a module applied twice
(a reused ReLU) is two ops, each with its own rule.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ecgx.core.schema import BEAT_SAMPLES, N_LEADS
from ecgx.training.export.ir import (
    INPUT,
    ExportError,
    ModelIR,
    Op,
    batchnorm_affine,
    finish_ir,
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
from ecgx.training.export.ops.op_mul import NoClearGate, broadcast_problem, gate_index
from ecgx.training.models import Add

_ADD = (operator.add, operator.iadd, torch.add, "add", "add_", "__add__")
_RELU = (F.relu, torch.relu, torch.relu_, "relu", "relu_")
_CAT = (torch.cat, torch.concat, torch.concatenate)
# The other activations (ops/activation.py): module -> (kind, {param: module attribute}), and
# function or method -> (kind, {param: (position after the tensor, keyword, default)}).
_ACTIVATION_MODULES: dict[type, tuple[str, dict[str, str]]] = {
    nn.LeakyReLU: (LEAKY_RELU, {"slope": "negative_slope"}),
    nn.ELU: (ELU, {"alpha": "alpha"}),
    nn.GELU: (GELU, {"approximate": "approximate"}),
    nn.SiLU: (SILU, {}),
    nn.Mish: (MISH, {}),
    nn.Sigmoid: (SIGMOID, {}),
    nn.Tanh: (TANH, {}),
}
_SLOPE, _ALPHA = {"slope": (0, "negative_slope", 0.01)}, {"alpha": (0, "alpha", 1.0)}
_ACTIVATION_FUNCTIONS: dict[Any, tuple[str, dict[str, tuple[int, str, Any]]]] = {
    **{f: (LEAKY_RELU, _SLOPE) for f in (F.leaky_relu, F.leaky_relu_, "leaky_relu", "leaky_relu_")},
    **{f: (ELU, _ALPHA) for f in (F.elu, F.elu_, "elu", "elu_")},
    **{f: (GELU, {"approximate": (0, "approximate", "none")}) for f in (F.gelu, "gelu")},
    **{f: (SILU, {}) for f in (F.silu, "silu")},
    **{f: (MISH, {}) for f in (F.mish, "mish")},
    **{f: (SIGMOID, {}) for f in (F.sigmoid, torch.sigmoid, torch.sigmoid_, "sigmoid", "sigmoid_")},
    **{f: (TANH, {}) for f in (F.tanh, torch.tanh, torch.tanh_, "tanh", "tanh_")},
}
_FLATTEN = (torch.flatten, "flatten", "view", "reshape", torch.reshape, "squeeze", torch.squeeze)
_DROPOUT = (F.dropout, F.dropout1d, F.alpha_dropout, "contiguous", torch.clone, "clone")
_POOL_FUNCTIONS = {
    F.max_pool1d: MAXPOOL,
    F.avg_pool1d: AVGPOOL,
    F.adaptive_avg_pool1d: GAP,
    F.adaptive_max_pool1d: GMP,
}
_MEAN = (torch.mean, "mean")
_MUL = (operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__")
# Views that only broadcast a gate ((B, C) -> (B, C, 1), expand_as): read by the product they feed.
_BROADCAST_VIEWS = ("view", "reshape", torch.reshape, "unsqueeze", torch.unsqueeze, "expand", "expand_as")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Add) or super().is_leaf_module(m, qualname)


def trace_model(model: nn.Module, input_shape: tuple[int, int] | None = None) -> ModelIR:
    """Trace a PyTorch ``model`` (eval mode) into a :class:`ModelIR`, or raise :class:`ExportError`.

    ``input_shape`` is (leads, samples) of one ECG; the default is the project's
    12-lead, 600-sample median beat.
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    shape = tuple(input_shape or (N_LEADS, BEAT_SAMPLES))
    model = model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types for untraceable code
        # torch.fx traces symbolically: an ``if`` on a shape, an einops rearrangement (it reads
        # x.shape) or a layer built inside forward() stop it. torch.export runs the code on fixed
        # shapes, so what depends only on shapes is resolved there.
        return _trace_by_export(model, shape, f"{type(e).__name__}: {e}")
    gm = fx.GraphModule(model, graph)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, *shape))
    except Exception as e:
        raise ExportError(
            f"the model does not run on one ECG of shape {shape} (leads, samples): {type(e).__name__}: "
            f"{e}; give the input length it was built for"
        ) from None
    try:
        return _Converter(gm, dict(model.named_modules())).convert(shape)
    except _Rearrangement as e:
        # permute, transpose, a reshape to another layout: the ATen graph's rearrangements are
        # replayed on a probe (program_import), which tells a round trip from a real change of layout.
        return _trace_by_export(model, shape, str(e))


class _Rearrangement(ExportError):
    """A rearrangement (permute, transpose, reshape to another layout) the fx converter does not read."""


_REARRANGE = (torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.unsqueeze, "unsqueeze")
_REARRANGE += ("permute", "transpose", "swapaxes", "movedim", "mT", "t", torch.t)


def _trace_by_export(model: nn.Module, shape: tuple[int, ...], fx_error: str) -> ModelIR:
    """The model through torch.export, when torch.fx cannot trace or describe it; refuses a model
    whose output changes between two calls on the same input (a layer with parameters created in
    forward() draws new weights on every call: there is no one model to export)."""
    from ecgx.training.export.program_import import export_module_ir

    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            first, second = model(x), model(x)
        except Exception as e:
            raise ExportError(
                f"the model does not run on ECGs of shape {shape} (leads, samples): {type(e).__name__}: {e}"
            ) from None
    if (
        isinstance(first, torch.Tensor)
        and isinstance(second, torch.Tensor)
        and not torch.equal(first, second)
    ):
        raise ExportError(
            "the model gives different outputs for the same input on two calls in eval mode: a layer with "
            "parameters created inside forward() (e.g. nn.Conv1d(...)(x)) gets new random weights on every "
            "call, or forward() draws random numbers; create such layers in __init__ (parameter-free ones, "
            "such as nn.AdaptiveAvgPool1d(1)(x), are fine)"
        )
    try:
        return export_module_ir(model, tuple(shape))
    except ExportError as e:
        raise ExportError(f"the model cannot be traced for export (torch.fx: {fx_error}; {e})") from None


class _Converter:
    def __init__(self, gm: fx.GraphModule, modules: dict[str, nn.Module]):
        self.gm, self.modules = gm, modules
        self.ops: list[Op] = []
        self.alias: dict[str, str] = {}
        self.names: dict[str, int] = {}
        # fx node -> its IR tensor's shape, for broadcast views of a gate (only a product reads them)
        self.views: dict[str, tuple[int, ...]] = {}

    def convert(self, shape: tuple[int, int]) -> ModelIR:
        output = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.alias[node.name] = INPUT
            elif node.op == "output":
                output = self._output(node)
            elif node.op == "get_attr":
                # torch.export reads some of these (a parameter matrix times the signal: the PTB-XL
                # benchmark's SqueezeExcite1d), so the program front end has the last word.
                raise _Rearrangement(
                    f"{node.target}: the model reads a parameter or buffer directly in forward() "
                    "(a functional layer such as F.conv1d(x, self.weight)); use the layer's module instead"
                )
            elif node.op == "call_module" and not _is_tensor(node):
                module = self.modules[node.target]
                raise unsupported(str(node.target), type(module).__name__, "it does not return one tensor")
            elif not _is_tensor(node):
                continue  # x.size(0) and other shape arithmetic
            else:
                self._node(node)
        assert output is not None
        return finish_ir(self.ops, output, shape)

    def _output(self, node: fx.Node) -> str:
        out = node.args[0]
        if not isinstance(out, fx.Node) or not _is_tensor(out):
            raise ExportError(
                "the model must return one tensor of logits (batch, classes); "
                f"it returns {type(out).__name__}"
            )
        return self.alias[out.name]

    def _name(self, base: str) -> str:
        self.names[base] = self.names.get(base, 0) + 1
        return base if self.names[base] == 1 else f"{base}@{self.names[base]}"

    def _emit(self, kind: str, node: fx.Node, name: str, inputs: list[fx.Node], params=None) -> None:
        viewed = [a.name for a in inputs if a.name in self.views]
        if viewed and kind != MUL:
            why = f"it reads {viewed[0]}, a gate's broadcast view (only a product may)"
            raise unsupported(name, kind, why)
        op = Op(
            kind,
            self._name(name),
            tuple(self.alias[a.name] for a in inputs),
            node.name,
            _shape(node),
            tuple(self.views.get(a.name, _shape(a)) for a in inputs),
            params or {},
        )
        self.ops.append(op)
        self.alias[node.name] = node.name

    def _node(self, node: fx.Node) -> None:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and _is_tensor(a)]
        if node.op == "call_module":
            self._module(node, self.modules[node.target], tensors)
        else:
            self._function(node, tensors)

    # ------------------------------------------------------------------ modules

    def _module(self, node: fx.Node, m: nn.Module, ins: list[fx.Node]) -> None:
        name = str(node.target)
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.Identity)):
            self.alias[node.name] = self.alias[ins[0].name]
        elif isinstance(m, Add):
            self._emit(ADD, node, name, ins)
        elif isinstance(m, nn.ReLU):
            self._emit(RELU, node, name, ins)
        elif type(m) in _ACTIVATION_MODULES:
            kind, attrs = _ACTIVATION_MODULES[type(m)]
            self._emit(kind, node, name, ins, {p: getattr(m, a) for p, a in attrs.items()})
        elif isinstance(m, nn.Conv1d):
            self._emit(CONV, node, name, ins, _conv_params(name, m, _shape(ins[0])))
        elif isinstance(m, nn.Linear):
            self._emit(LINEAR, node, name, ins, {"weight": _np(m.weight), "bias": _np(m.bias)})
        elif isinstance(m, nn.BatchNorm1d):
            self._emit(AFFINE, node, name, ins, _bn_params(name, m))
        elif isinstance(m, nn.MaxPool1d):
            if _single(m.dilation, "dilation", name) != 1 or m.return_indices:
                raise unsupported(name, "MaxPool1d", "dilation > 1 or return_indices")
            self._emit(
                MAXPOOL, node, name, ins, _pool_params(name, m.kernel_size, m.stride, m.padding, m.ceil_mode)
            )
        elif isinstance(m, nn.AvgPool1d):
            params = _pool_params(name, m.kernel_size, m.stride, m.padding, m.ceil_mode)
            self._emit(AVGPOOL, node, name, ins, {**params, "count_include_pad": bool(m.count_include_pad)})
        elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)):
            kind = GAP if isinstance(m, nn.AdaptiveAvgPool1d) else GMP
            if _single(m.output_size, "output_size", name) != 1 or getattr(m, "return_indices", False):
                raise unsupported(
                    name, type(m).__name__, f"output_size {m.output_size} (only 1: global pooling)"
                )
            self._emit(kind, node, name, ins)
        elif isinstance(m, nn.Flatten):
            self._flatten(node, name, ins)
        elif isinstance(m, nn.ConstantPad1d):
            self._pad(node, name, ins, m.padding, "constant", m.value)
        else:
            raise unsupported(name, type(m).__name__)

    # ------------------------------------------------------------------ functions and methods

    def _function(self, node: fx.Node, ins: list[fx.Node]) -> None:
        target = node.target
        name = node.name
        if target in _DROPOUT:
            self.alias[node.name] = self.alias[ins[0].name]
        elif target in _RELU:
            self._emit(RELU, node, name, ins[:1])
        elif target in _ACTIVATION_FUNCTIONS:
            kind, args = _ACTIVATION_FUNCTIONS[target]
            given = node.args[1:]
            params = {
                p: given[i] if i < len(given) else node.kwargs.get(k, d) for p, (i, k, d) in args.items()
            }
            self._emit(kind, node, name, ins[:1], params)
        elif target in _ADD:
            if len(ins) != 2 or len(node.args) != 2:
                raise unsupported(name, "addition", "only the sum of two tensors (no constants, no alpha)")
            self._emit(ADD, node, name, ins)
        elif target in _CAT:
            self._cat(node, name)
        elif target in _MUL:
            self._product(node, name, ins)
        elif target in _BROADCAST_VIEWS and self._broadcast_view(node, ins[:1]):
            pass  # aliased to the gate, which the product reads with its own broadcast
        elif target in _FLATTEN:
            self._flatten(node, name, ins[:1])
        elif target in _POOL_FUNCTIONS:
            self._pool_function(node, name, _POOL_FUNCTIONS[target], ins[:1])
        elif target in _MEAN:
            self._mean(node, name, ins[:1])
        elif target in _REARRANGE:
            raise _Rearrangement(f"layer {name}: {getattr(target, '__name__', target)}, a rearrangement")
        elif target is F.pad:
            kw = {"mode": "constant", "value": None, **node.kwargs}
            self._pad(node, name, ins[:1], node.args[1], kw["mode"], kw["value"])
        else:
            what = getattr(target, "__name__", str(target))
            raise unsupported(name, what)

    def _cat(self, node: fx.Node, name: str) -> None:
        args = node.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True)
        kwargs = (
            args.kwargs if args is not None else {"tensors": node.args[0], "dim": node.kwargs.get("dim", 0)}
        )
        parts = list(kwargs["tensors"])
        dim = kwargs.get("dim", 0)
        rank = len(_shape(node)) + 1
        if not all(isinstance(p, fx.Node) for p in parts) or dim % rank != 1:
            raise unsupported(
                name, "torch.cat", f"only concatenation of tensors along channels (dim=1), got dim={dim}"
            )
        self._emit(CONCAT, node, name, parts)

    def _product(self, node: fx.Node, name: str, ins: list[fx.Node]) -> None:
        if len(ins) != 2 or len(node.args) != 2:
            raise unsupported(name, "multiplication", "only a product of two tensors: a signal, its gate")
        shapes = tuple(self.views.get(a.name, _shape(a)) for a in ins)
        producers = [next((o for o in self.ops if o.output == self.alias[a.name]), None) for a in ins]
        try:
            gate = gate_index(shapes, tuple(p.kind if p else None for p in producers))
        except NoClearGate as e:
            raise unsupported(name, "multiplication", str(e)) from None
        self._emit(MUL, node, name, ins, {"gate": gate})

    def _broadcast_view(self, node: fx.Node, ins: list[fx.Node]) -> bool:
        """Alias a view that only broadcasts a gate ((C,) -> (C, 1), (C, 1) -> (C, L)); False if
        ``node`` is another reshape."""
        if not ins:
            return False
        shape, out = self.views.get(ins[0].name, _shape(ins[0])), _shape(node)
        if len(out) != 2 or out == shape or broadcast_problem(out, shape) is not None:
            return False
        self.alias[node.name] = self.alias[ins[0].name]
        self.views[node.name] = shape
        return True

    def _flatten(self, node: fx.Node, name: str, ins: list[fx.Node]) -> None:
        in_shape, out_shape = _shape(ins[0]), _shape(node)
        if out_shape == in_shape:  # a view that changes nothing (x.view(x.size(0), C, L))
            self.alias[node.name] = self.alias[ins[0].name]
            return
        if len(out_shape) != 1 or out_shape[0] != math.prod(in_shape):
            raise _Rearrangement(f"layer {name}: reshape {in_shape} -> {out_shape}, a rearrangement")
        self._emit(FLATTEN, node, name, ins)

    def _pool_function(self, node: fx.Node, name: str, kind: str, ins: list[fx.Node]) -> None:
        args = node.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True)
        if args is None:
            raise unsupported(name, str(node.target), "its arguments could not be read")
        kw = dict(args.kwargs)
        if kind in (GAP, GMP):
            size = kw.get("output_size")
            if _single(size, "output_size", name) != 1 or kw.get("return_indices"):
                raise unsupported(name, "adaptive pooling", f"output_size {size} (only 1: global pooling)")
            self._emit(kind, node, name, ins)
            return
        params = _pool_params(
            name, kw["kernel_size"], kw.get("stride"), kw.get("padding", 0), kw.get("ceil_mode", False)
        )
        if kind == MAXPOOL:
            if _single(kw.get("dilation", 1), "dilation", name) != 1 or kw.get("return_indices"):
                raise unsupported(name, "max_pool1d", "dilation > 1 or return_indices")
        else:
            params["count_include_pad"] = bool(kw.get("count_include_pad", True))
        self._emit(kind, node, name, ins, params)

    def _pad(self, node: fx.Node, name: str, ins: list[fx.Node], pads, mode: str, value) -> None:
        if mode != "constant" or value not in (None, 0) or len(pads) != 2 or min(pads) < 0:
            raise unsupported(
                name, "padding", f"only zero padding of the time axis, got {tuple(pads)} {mode}"
            )
        self._emit(PAD, node, name, ins, {"left": int(pads[0]), "right": int(pads[1])})

    def _mean(self, node: fx.Node, name: str, ins: list[fx.Node]) -> None:
        in_shape, out_shape = _shape(ins[0]), _shape(node)
        if len(in_shape) != 2 or out_shape not in ((in_shape[0], 1), (in_shape[0],)):
            raise unsupported(name, "mean", "only the mean over time (dim=-1) of (batch, channels, time)")
        if out_shape == (in_shape[0], 1):
            self._emit(GAP, node, name, ins)
            return
        # mean without keepdim: global average pooling, then flatten (C, 1) -> (C,)
        gap = Op(
            GAP,
            self._name(name),
            (self.alias[ins[0].name],),
            f"{node.name}.gap",
            (in_shape[0], 1),
            (in_shape,),
        )
        self.ops.append(gap)
        self.ops.append(
            Op(
                FLATTEN,
                self._name(f"{name}.flatten"),
                (gap.output,),
                node.name,
                out_shape,
                ((in_shape[0], 1),),
            )
        )
        self.alias[node.name] = node.name


def _is_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape")


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape[1:])


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy().copy()


def _single(v: Any, what: str, name: str) -> int:
    v = v if isinstance(v, (tuple, list)) else (v,)
    if len(v) != 1:
        raise ExportError(f"layer {name}: {what} {tuple(v)} must be one-dimensional")
    return int(v[0])


def _conv_params(name: str, m: nn.Conv1d, in_shape: tuple[int, ...]) -> dict[str, Any]:
    if m.padding_mode != "zeros":
        raise unsupported(name, "Conv1d", f"padding_mode {m.padding_mode!r} (only 'zeros')")
    k, d = m.kernel_size[0], _single(m.dilation, "dilation", name)
    padding = m.padding
    if isinstance(padding, str):
        total = 0 if padding == "valid" else d * (k - 1)
        if total % 2:
            raise unsupported(name, "Conv1d", "padding='same' with an even effective kernel pads unevenly")
        padding = total // 2
    return {
        "weight": _np(m.weight),
        "bias": _np(m.bias),
        "stride": _single(m.stride, "stride", name),
        "padding": _single(padding, "padding", name),
        "dilation": d,
        "groups": int(m.groups),
    }


def _bn_params(name: str, m: nn.BatchNorm1d) -> dict[str, Any]:
    return batchnorm_affine(
        name,
        _np(m.running_mean) if m.track_running_stats else None,
        _np(m.running_var) if m.track_running_stats else None,
        _np(m.weight) if m.affine else None,
        _np(m.bias) if m.affine else None,
        float(m.eps),
    )


def _pool_params(name: str, kernel, stride, padding, ceil_mode) -> dict[str, Any]:
    k = _single(kernel, "kernel_size", name)
    s = (
        k
        if stride is None or (isinstance(stride, (tuple, list)) and not stride)
        else _single(stride, "stride", name)
    )
    return {
        "kernel": k,
        "stride": s,
        "padding": _single(padding, "padding", name),
        "ceil_mode": bool(ceil_mode),
    }
