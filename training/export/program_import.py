"""The ``torch.export`` front end: a saved program (``.pt2``, ``torch.export.save``) into a ModelIR.

A program file holds the network as a graph of ATen operators with its weights, so a
model exports without its Python source. ``ep.module()`` gives an fx GraphModule whose
parameters are ``get_attr`` nodes; each ATen call becomes an IR op (named after the
``nn.Module`` it came from where the graph records one), nodes that only compute from
parameters (``aten.t(weight)``) are evaluated once, and assertion and shape nodes are
skipped. Shapes come from running the graph once on zeros (fx ShapeProp), with the input
length from the program's example input, or ``input_length`` when that is dynamic.

Besides the ops of the non-decomposed graph ``torch.export.export`` writes, the forms of
``run_decompositions()`` are accepted: ``convolution``, ``addmm`` / ``mm`` with a
transposed weight, ``_native_batch_norm_legit_no_training``, and 1-D pooling written as
``unsqueeze -> 2-D pooling -> squeeze``.
"""

from __future__ import annotations

import math
import operator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

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
from ecgx.training.export.ops.op_mul import (
    CHANNEL_MIX_ONLY,
    NoClearGate,
    broadcast_problem,
    channel_mix_params,
    gate_index,
)

aten = torch.ops.aten

# ATen operator name -> the name under which ir.REPLACEMENTS says what to use instead.
_REPLACEMENT_KEYS = {
    "gelu": "GELU",
    "elu": "ELU",
    "selu": "SELU",
    "silu": "SiLU",
    "leaky_relu": "LeakyReLU",
    "prelu": "PReLU",
    "_prelu_kernel": "PReLU",
    "tanh": "Tanh",
    "sigmoid": "Sigmoid",
    "softmax": "Softmax",
    "_softmax": "Softmax",
    "log_softmax": "Softmax",
    "_log_softmax": "Softmax",
    "lstm": "LSTM",
    "gru": "GRU",
    "layer_norm": "LayerNorm",
    "native_layer_norm": "LayerNorm",
    "group_norm": "GroupNorm",
    "native_group_norm": "GroupNorm",
    "instance_norm": "InstanceNorm1d",
    "_native_multi_head_attention": "MultiheadAttention",
    "scaled_dot_product_attention": "MultiheadAttention",
}


def load_program(path: Path | str, extra_files: tuple[str, ...] = ()) -> tuple[Any, dict[str, str]]:
    """``torch.export.load`` of ``path``, with the named extra files saved beside the program
    (``torch.export.save(..., extra_files=...)``), or ExportError saying why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such torch.export program file")
    extra = dict.fromkeys(extra_files, "")
    try:
        ep = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # a zip that is not a program, a newer serialisation format, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(
            f"{path} is not a readable torch.export program ({type(e).__name__}: {first}); save one with "
            "torch.export.save(torch.export.export(model.eval(), (example,)), 'model.pt2')"
        ) from None
    return ep, {k: v for k, v in extra.items() if v}


def program_metadata(path: Path | str) -> dict[str, str]:
    """Extra files saved with the program that the export reads (``sampling_rate_hz``)."""
    return load_program(path, ("sampling_rate_hz",))[1]


class ProgramModule(nn.Module):
    """The program's module as an ordinary eval-mode ``nn.Module``.

    ``ep.module()`` refuses ``train()`` / ``eval()`` (a program has no training mode), which
    every caller of a model makes; this wrapper accepts both as no-ops. A program exported
    for a fixed batch size (its guards refuse any other) is run in chunks of that size, the
    last one padded with zeros and trimmed (each ECG's logits depend on that ECG alone for
    the supported layers in eval mode); autograd flows through.
    """

    def __init__(self, module: nn.Module, fixed_batch: int | None):
        super().__init__()
        self.program = module
        self.fixed_batch = fixed_batch
        self.training = False

    def train(self, mode: bool = True) -> ProgramModule:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.fixed_batch
        if b is None or x.shape[0] == b:
            return self.program(x)
        outs = []
        for start in range(0, x.shape[0], b):
            chunk = x[start : start + b]
            n = chunk.shape[0]
            if n < b:
                chunk = torch.cat([chunk, chunk.new_zeros((b - n, *chunk.shape[1:]))])
            outs.append(self.program(chunk)[:n])
        return torch.cat(outs)


def import_program(path: Path | str, input_length: int | None = None) -> tuple[ModelIR, ProgramModule]:
    """Read a ``torch.export`` program file into a :class:`ModelIR` and the runnable module.

    The module is ``ep.module()`` (wrapped to run any batch size when the program was
    exported for a fixed one); ``input_length`` fixes the number of samples when
    the program's example input leaves it dynamic.
    """
    path = Path(path)
    ep, _ = load_program(path)
    spec = getattr(getattr(ep, "call_spec", None), "out_spec", None)
    if spec is not None and not spec.is_leaf():
        raise ExportError(
            f"{path}: the program returns {spec.type.__name__ if spec.type else 'a structure'} of "
            f"{spec.num_leaves} values; it must return one tensor of logits (batch, classes)"
        )
    try:
        gm = ep.module()
    except Exception as e:
        raise ExportError(
            f"{path}: the program cannot be turned into a module ({type(e).__name__}: {e})"
        ) from None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ExportError(
            f"{path}: the program takes {len(placeholders)} inputs; it must take one ECG tensor "
            "(batch, leads, samples)"
        )
    batch, leads, length = _input_shape(path, placeholders[0], input_length)
    with torch.no_grad():
        try:
            ShapeProp(gm).propagate(torch.zeros(batch, leads, length))
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise ExportError(
                f"{path}: the program does not run on {leads} leads x {length} samples ({type(e).__name__}: "
                f"{first}); check --input-length"
            ) from None
    ir = _Converter(gm, path).convert((leads, length))
    return ir, ProgramModule(gm, fixed_batch=None if _dynamic_batch(placeholders[0]) else batch)


def _dynamic_batch(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return val is not None and not isinstance(val.shape[0], int)


def _input_shape(path: Path, node: fx.Node, input_length: int | None) -> tuple[int, int, int]:
    val = node.meta.get("val")
    if val is None or not hasattr(val, "shape"):
        raise ExportError(f"{path}: the program records no example input; export it with torch.export.export")
    if len(val.shape) != 3:
        raise ExportError(
            f"{path}: the program's input has shape {tuple(val.shape)}; it must be 3-D "
            "(batch, leads, samples)"
        )
    if val.dtype != torch.float32:
        raise ExportError(f"{path}: the program's input is {val.dtype}; it must be float32")
    b, leads, length = val.shape
    if not isinstance(leads, int):
        raise ExportError(f"{path}: the program's number of leads is dynamic ({leads}); it must be fixed")
    if isinstance(length, int):
        if input_length is not None and input_length != length:
            raise ExportError(
                f"{path}: the program was exported for {length} samples, not --input-length {input_length}"
            )
    elif input_length is None:
        raise ExportError(
            f"{path}: the program's input length is dynamic ({length}); pass --input-length with the number "
            "of samples the model was trained on"
        )
    elif input_length <= 0:
        raise ExportError(f"--input-length must be a positive number of samples, got {input_length}")
    else:
        length = input_length
    return (b if isinstance(b, int) else 2), int(leads), int(length)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy().copy()


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta["tensor_meta"]
    if not hasattr(meta, "shape"):  # (values, indices) of max pooling, (out, stats) of BatchNorm
        meta = meta[0]
    return tuple(meta.shape[1:])


def _op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


class _Converter:
    def __init__(self, gm: fx.GraphModule, path: Path):
        self.gm, self.path = gm, path
        self.ops: list[Op] = []
        self.alias: dict[str, str] = {}  # fx node name -> IR tensor
        self.consts: dict[str, Any] = {}  # fx node name -> tensor computed from parameters only
        self.tuples: dict[str, str] = {}  # a node returning (value, indices/stats) -> IR tensor of value
        self.lifted: set[str] = set()  # IR tensors seen through an unsqueeze(-2) (decomposed 1-D pooling)
        self.open_linear: dict[str, Op] = {}  # mm without bias, waiting for add(bias)
        self.names: dict[str, int] = {}
        # A node that only rearranges an IR tensor (permute, transpose, a reshape to another layout):
        # fx node name -> (the fx node of that IR tensor, its probe, the probe rearranged alike).
        self.views: dict[str, tuple[fx.Node, torch.Tensor, torch.Tensor]] = {}
        # A gate's broadcast view ((B, C) -> (B, C, 1), expand): fx node name -> its IR tensor's shape;
        # only a product reads it (the product broadcasts the gate itself).
        self.gate_views: dict[str, tuple[int, ...]] = {}

    def convert(self, shape: tuple[int, int]) -> ModelIR:
        output = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.alias[node.name] = INPUT
            elif node.op == "get_attr":
                self.consts[node.name] = operator.attrgetter(str(node.target))(self.gm)
            elif node.op == "call_module":
                continue  # the input guards (_guards_fn) torch.export inserts
            elif node.op == "output":
                output = self._output(node)
            else:
                self._node(node)
        assert output is not None
        return finish_ir(self.ops, output, shape)

    def _output(self, node: fx.Node) -> str:
        outs = node.args[0]
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        if len(outs) != 1 or not isinstance(outs[0], fx.Node):
            raise ExportError(
                f"{self.path}: the program returns {len(outs)} values; it must return one tensor of logits "
                "(batch, classes)"
            )
        if outs[0].name not in self.alias:
            raise ExportError(f"{self.path}: the program's output does not depend on its input")
        return self.alias[outs[0].name]

    # ------------------------------------------------------------------ helpers

    def _layer(self, node: fx.Node) -> str:
        """The layer's name: its nn.Module's qualified name when the call is that module's own
        (a Conv1d's convolution), else the node's name inside its parent module."""
        stack = node.meta.get("nn_module_stack") or {}
        base = node.name
        if stack:
            qualname, cls = list(stack.values())[-1]
            cls_name = cls if isinstance(cls, str) else getattr(cls, "__module__", "")
            if str(cls_name).startswith("torch.nn.modules") and qualname:
                base = qualname
            elif qualname:
                base = f"{qualname}.{node.name}"
        return base

    def _add(self, *ops: Op) -> None:
        """Append ops, numbering a name used before (a module called twice: ``relu``, ``relu@2``)."""
        for op in ops:
            self.names[op.name] = self.names.get(op.name, 0) + 1
            if self.names[op.name] > 1:
                op.name = f"{op.name}@{self.names[op.name]}"
            self.ops.append(op)

    def _is_data(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and (
            a.name in self.alias or a.name in self.tuples or a.name in self.views
        )

    def _data_args(self, node: fx.Node) -> list[fx.Node]:
        found = []
        for a in [*node.args, *node.kwargs.values()]:
            for x in a if isinstance(a, (list, tuple)) else [a]:
                if self._is_data(x):
                    found.append(x)
        return found

    def _const(self, a: Any, name: str, what: str) -> Any:
        if a is None:
            return None
        if isinstance(a, fx.Node):
            if a.name not in self.consts:
                raise ExportError(
                    f"layer {name}: its {what} is computed from the input; it must be a parameter or buffer"
                )
            return self.consts[a.name]
        return a

    def _emit(self, kind: str, node: fx.Node, name: str, inputs: list[fx.Node], params=None) -> Op:
        viewed = [a.name for a in inputs if a.name in self.gate_views]
        if viewed and kind != MUL:
            why = f"it reads {viewed[0]}, a gate's broadcast view (only a product may)"
            raise unsupported(name, kind, why)
        op = Op(
            kind,
            name,
            tuple(self.alias[a.name] for a in inputs),
            node.name,
            _shape(node),
            tuple(self.gate_views.get(a.name, _shape(a)) for a in inputs),
            params or {},
        )
        self._add(op)
        self.alias[node.name] = node.name
        return op

    def _args(self, node: fx.Node) -> dict[str, Any]:
        """The call's arguments by schema name, defaults filled in."""
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            return {}
        values: dict[str, Any] = {}
        for i, arg in enumerate(schema.arguments):
            if i < len(node.args):
                values[arg.name] = node.args[i]
            elif arg.name in node.kwargs:
                values[arg.name] = node.kwargs[arg.name]
            elif arg.has_default_value():
                values[arg.name] = arg.default_value
        return values

    # ------------------------------------------------------------------ dispatch

    def _node(self, node: fx.Node) -> None:
        data = self._data_args(node)
        if node.target is operator.getitem:
            self._getitem(node)
            return
        if not data:
            self._fold(node)
            return
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return  # assertions and shape arithmetic (_assert_tensor_metadata, sym_size)
        op = _op_name(node)
        if not node.users and not op.endswith("_"):
            return  # a value nothing reads (a slice taken only for its shape in forward())
        name = self._layer(node)
        viewed = [d for d in data if d.name in self.views]
        if viewed:
            if op not in _LAYOUT_OPS:
                raise self._view_refusal(name, op, viewed[0])
            self._layout(node, name, data[0])
            return
        handler = getattr(self, f"_aten_{op}", None)
        if handler is None:
            raise unsupported(name, _REPLACEMENT_KEYS.get(op, op), f"ATen operator {node.target}")
        handler(node, name, data, self._args(node))

    def _fold(self, node: fx.Node) -> None:
        """A call on parameters only (a transposed weight): evaluated once, here."""

        def value(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return self.consts.get(a.name)
            if isinstance(a, (list, tuple)):
                return type(a)(value(x) for x in a)
            return a

        if any(isinstance(a, fx.Node) and a.name not in self.consts for a in node.args):
            return  # shape arithmetic on sizes, not a tensor
        try:
            with torch.no_grad():
                self.consts[node.name] = node.target(*value(node.args), **value(dict(node.kwargs)))
        except Exception as e:
            raise ExportError(
                f"layer {node.name}: {node.target} on parameters could not be evaluated "
                f"({type(e).__name__}: {e})"
            ) from None

    def _getitem(self, node: fx.Node) -> None:
        source, index = node.args
        if isinstance(source, fx.Node) and source.name in self.consts:
            self.consts[node.name] = self.consts[source.name][index]
        elif isinstance(source, fx.Node) and source.name in self.tuples:
            if index == 0:
                self.alias[node.name] = self.tuples[source.name]
                if source.name in self.lifted:
                    self.lifted.add(node.name)
            elif node.users:
                raise unsupported(
                    source.name, str(source.target), f"its output {index} (indices or statistics) is used"
                )

    def _tuple_result(self, node: fx.Node, op: Op) -> None:
        """A node returning (value, extra): the IR tensor of its value, read by getitem(node, 0)."""
        self.tuples[node.name] = op.output
        self.alias.pop(node.name, None)

    def _alias(self, node: fx.Node, source: fx.Node) -> None:
        self.alias[node.name] = self.alias[source.name]

    # ------------------------------------------------------------------ rearrangements

    def _layout(self, node: fx.Node, name: str, x: fx.Node) -> None:
        """A permute, transpose, squeeze, unsqueeze or reshape: replayed on a probe (distinct values
        in the IR tensor's full shape). When the rearrangements since the IR tensor give the probe
        back unchanged (a round trip: einops' ``b c l -> b l c`` and back, a singleton unsqueeze then
        squeeze) the node is that tensor; when they give its per-ECG flattening, a flatten; else the
        node stays a view, which only another rearrangement may read."""
        base, base_probe, probe = self.views.get(x.name) or (x, *([self._probe(x)] * 2))
        args = [probe if a is x else a for a in node.args]
        try:
            new = node.target(*args, **dict(node.kwargs))
        except Exception as e:  # an argument the probe cannot stand in for
            raise unsupported(
                name, _op_name(node), f"a rearrangement that could not be replayed ({e})"
            ) from None
        self.views.pop(node.name, None)
        if new.shape == base_probe.shape and torch.equal(new, base_probe):
            self._alias(node, base)
        elif (
            new.dim() == 2 and new.shape[0] == base_probe.shape[0] and torch.equal(new, base_probe.flatten(1))
        ):
            in_shape = _shape(base)
            if len(in_shape) == 1:
                self._alias(node, base)
            else:
                flat = Op(FLATTEN, name, (self.alias[base.name],), node.name, _shape(node), (in_shape,))
                self._add(flat)
                self.alias[node.name] = node.name
        else:
            self.views[node.name] = (base, base_probe, new)

    def _probe(self, node: fx.Node) -> torch.Tensor:
        shape = tuple(node.meta["tensor_meta"].shape)
        return torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)

    def _view_refusal(self, name: str, op: str, viewed: fx.Node) -> ExportError:
        base, base_probe, probe = self.views[viewed.name]
        return unsupported(
            name,
            op,
            f"it reads {base.name} rearranged from {tuple(base_probe.shape[1:])} to {tuple(probe.shape[1:])} "
            "(permuted or reshaped); a rearrangement is supported only where it returns to (batch, channels, "
            "time) before the next layer (a round trip), or flattens each ECG's features",
        )

    # ------------------------------------------------------------------ operators

    def _aten_pad(self, node, name, data, a) -> None:
        pads, mode, value = list(a["pad"]), a.get("mode", "constant"), a.get("value")
        if mode != "constant" or value not in (None, 0) or len(pads) != 2 or min(pads) < 0:
            raise unsupported(name, "padding", f"only zero padding of the time axis, got {pads} {mode}")
        self._emit(PAD, node, name, data[:1], {"left": int(pads[0]), "right": int(pads[1])})

    def _aten_constant_pad_nd(self, node, name, data, a) -> None:
        self._aten_pad(node, name, data, {"pad": a["pad"], "value": a.get("value")})

    def _aten_relu(self, node, name, data, a) -> None:
        self._emit(RELU, node, name, data[:1])

    _aten_relu_ = _aten_relu

    # The other activations (ops/activation.py), in place or not.
    def _aten_leaky_relu(self, node, name, data, a) -> None:
        self._emit(LEAKY_RELU, node, name, data[:1], {"slope": float(a.get("negative_slope", 0.01))})

    def _aten_elu(self, node, name, data, a) -> None:
        if float(a.get("scale", 1.0)) != 1.0 or float(a.get("input_scale", 1.0)) != 1.0:
            raise unsupported(name, "ELU", "scale or input_scale other than 1 (SELU, CELU)")
        self._emit(ELU, node, name, data[:1], {"alpha": float(a.get("alpha", 1.0))})

    def _aten_gelu(self, node, name, data, a) -> None:
        self._emit(GELU, node, name, data[:1], {"approximate": a.get("approximate", "none")})

    def _aten_silu(self, node, name, data, a) -> None:
        self._emit(SILU, node, name, data[:1])

    def _aten_mish(self, node, name, data, a) -> None:
        self._emit(MISH, node, name, data[:1])

    def _aten_sigmoid(self, node, name, data, a) -> None:
        self._emit(SIGMOID, node, name, data[:1])

    def _aten_tanh(self, node, name, data, a) -> None:
        self._emit(TANH, node, name, data[:1])

    _aten_leaky_relu_, _aten_elu_, _aten_silu_ = _aten_leaky_relu, _aten_elu, _aten_silu
    _aten_mish_, _aten_sigmoid_, _aten_tanh_ = _aten_mish, _aten_sigmoid, _aten_tanh

    def _aten_dropout(self, node, name, data, a) -> None:
        if a.get("train"):
            raise unsupported(name, "Dropout", "it is in training mode (export the model in eval mode)")
        self._alias(node, data[0])

    def _aten_clone(self, node, name, data, a) -> None:
        self._alias(node, data[0])

    _aten_alias = _aten_contiguous = _aten_detach = _aten_lift_fresh_copy = _aten_clone

    def _aten__to_copy(self, node, name, data, a) -> None:
        if node.meta["tensor_meta"].dtype != torch.float32:
            raise unsupported(name, "_to_copy", "only float32 copies of the signal")
        self._alias(node, data[0])

    def _aten_conv1d(self, node, name, data, a) -> None:
        self._conv(node, name, data, a)

    def _aten_convolution(self, node, name, data, a) -> None:
        if a.get("transposed"):
            raise unsupported(name, "ConvTranspose1d", "transposed convolutions")
        self._conv(node, name, data, a)

    def _conv(self, node, name, data, a) -> None:
        if len(data) != 1 or a["input"] is not data[0]:
            raise ExportError(f"layer {name}: the convolution's weight and bias must be parameters")
        w = self._const(a["weight"], name, "weight")
        b = self._const(a.get("bias"), name, "bias")
        if w.dim() != 3:
            raise unsupported(name, "convolution", f"only 1-D convolutions, weight {tuple(w.shape)}")
        k = w.shape[2]
        dilation = _one(a.get("dilation", [1]), name, "dilation")
        padding = a.get("padding", [0])
        if isinstance(padding, str):
            total = 0 if padding == "valid" else dilation * (k - 1)
            if total % 2:
                raise unsupported(
                    name, "Conv1d", "padding='same' with an even effective kernel pads unevenly"
                )
            padding = [total // 2]
        self._emit(
            CONV,
            node,
            name,
            data,
            {
                "weight": _np(w),
                "bias": _np(b),
                "stride": _one(a.get("stride", [1]), name, "stride"),
                "padding": _one(padding, name, "padding"),
                "dilation": dilation,
                "groups": int(a.get("groups", 1)),
            },
        )

    def _aten_linear(self, node, name, data, a) -> None:
        if len(data) != 1 or a["input"] is not data[0]:
            raise ExportError(f"layer {name}: the dense layer's weight and bias must be parameters")
        w = self._const(a["weight"], name, "weight")
        self._linear(node, name, data, _np(w), _np(self._const(a.get("bias"), name, "bias")))

    def _aten_addmm(self, node, name, data, a) -> None:
        # addmm(bias, x, W^T): a dense layer as run_decompositions() writes it
        if len(data) != 1 or a["mat1"] is not data[0] or a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
            raise unsupported(name, "addmm", "only bias + input @ weight")
        wt = self._const(a["mat2"], name, "weight")
        bias = self._const(a["self"], name, "bias")
        self._linear(node, name, data, _np(wt).T.copy(), _np(bias).reshape(-1))

    def _aten_mm(self, node, name, data, a) -> None:
        if len(data) != 1 or a["self"] is not data[0]:
            raise unsupported(name, "mm", "only input @ weight")
        wt = self._const(a["mat2"], name, "weight")
        self.open_linear[node.name] = self._linear(node, name, data, _np(wt).T.copy(), None)

    def _aten_matmul(self, node, name, data, a) -> None:
        if len(data) == 1 and a["other"] is data[0] and isinstance(a["self"], fx.Node):
            w = _np(self._const(a["self"], name, "weight"))  # W @ x: a channel mix (a 1x1 convolution)
            params = channel_mix_params(w, _shape(data[0]))
            if params is None:
                raise unsupported(name, "matmul", CHANNEL_MIX_ONLY)
            self._emit(CONV, node, name, data, params)
            return
        self._aten_mm(node, name, data, {"self": a["self"], "mat2": a["other"]})

    def _linear(self, node, name, data, weight: np.ndarray, bias: np.ndarray | None) -> Op:
        in_shape = _shape(data[0])
        if len(in_shape) != 1 or in_shape[0] != weight.shape[1]:
            raise unsupported(
                name,
                "linear",
                f"a dense layer needs flat (batch, {weight.shape[1]}) features, got {in_shape}",
            )
        return self._emit(LINEAR, node, name, data, {"weight": weight, "bias": bias})

    def _aten_batch_norm(self, node, name, data, a) -> None:
        if a.get("training"):
            batchnorm_affine(name, None, None, None, None, 0.0)  # raises: batch statistics
        self._batchnorm(node, name, data, a)

    def _aten__native_batch_norm_legit_no_training(self, node, name, data, a) -> None:
        self._tuple_result(node, self._batchnorm(node, name, data, a))

    def _batchnorm(self, node, name, data, a) -> Op:
        if len(data) != 1 or a["input"] is not data[0]:
            raise ExportError(f"layer {name}: BatchNorm's statistics and parameters must be buffers")
        params = batchnorm_affine(
            name,
            _np(self._const(a.get("running_mean"), name, "running mean")),
            _np(self._const(a.get("running_var"), name, "running variance")),
            _np(self._const(a.get("weight"), name, "weight")),
            _np(self._const(a.get("bias"), name, "bias")),
            float(a.get("eps", 1e-5)),
        )
        return self._emit(AFFINE, node, name, data, params)

    def _batch_stats(self, node, name, data, a) -> None:
        batchnorm_affine(name, None, None, None, None, 0.0)  # raises: it normalises by batch statistics

    _aten__native_batch_norm_legit = _aten_native_batch_norm = _batch_stats
    _aten__native_batch_norm_legit_functional = _batch_stats

    def _pool(self, node, name, data, a, kind, two_d: bool) -> Op:
        k, stride, padding = a["kernel_size"], a.get("stride") or a["kernel_size"], a.get("padding", [0])
        dilation = a.get("dilation", [1])
        if two_d:
            if data[0].name not in self.lifted:
                raise unsupported(name, str(node.target), "only 1-D pooling")
            k, stride, padding, dilation = (
                _second(v, name, t) for v, t in ((k, 1), (stride, 1), (padding, 0), (dilation, 1))
            )
        if _one(dilation, name, "dilation") != 1:
            raise unsupported(name, "max_pool1d", "dilation > 1")
        params: dict[str, Any] = {
            "kernel": _one(k, name, "kernel_size"),
            "stride": _one(stride, name, "stride"),
            "padding": _one(padding, name, "padding"),
            "ceil_mode": bool(a.get("ceil_mode", False)),
        }
        if kind == AVGPOOL:
            params["count_include_pad"] = bool(a.get("count_include_pad", True))
            if a.get("divisor_override") is not None:
                raise unsupported(name, "avg_pool", "divisor_override")
        op = self._emit_shaped(kind, node, name, data, params, two_d)
        return op

    def _emit_shaped(self, kind, node, name, data, params, two_d: bool) -> Op:
        """Emit an op whose node may be a 4-D (B, C, 1, L) tensor of a decomposed 1-D op."""
        if not two_d:
            return self._emit(kind, node, name, data, params)
        shape = _shape(node)
        op = Op(
            kind,
            name,
            (self.alias[data[0].name],),
            node.name,
            (shape[0], shape[2]),
            (self._lifted_shape(data[0]),),
            params or {},
        )
        self._add(op)
        self.alias[node.name] = node.name
        self.lifted.add(node.name)
        return op

    def _lifted_shape(self, node: fx.Node) -> tuple[int, int]:
        s = _shape(node)
        return (s[0], s[2])

    def _aten_max_pool1d(self, node, name, data, a) -> None:
        self._pool(node, name, data, a, MAXPOOL, False)

    def _aten_max_pool1d_with_indices(self, node, name, data, a) -> None:
        self._tuple_result(node, self._pool(node, name, data, a, MAXPOOL, False))

    def _aten_max_pool2d_with_indices(self, node, name, data, a) -> None:
        op = self._pool(node, name, data, a, MAXPOOL, True)
        self._tuple_result(node, op)

    def _aten_avg_pool1d(self, node, name, data, a) -> None:
        self._pool(node, name, data, a, AVGPOOL, False)

    def _aten_avg_pool2d(self, node, name, data, a) -> None:
        self._pool(node, name, data, a, AVGPOOL, True)

    def _adaptive(self, node, name, data, a, kind, two_d: bool) -> Op:
        size = list(a["output_size"])
        if size != ([1, 1] if two_d else [1]) or (two_d and data[0].name not in self.lifted):
            raise unsupported(
                name, "AdaptiveAvgPool1d" if kind == GAP else "AdaptiveMaxPool1d", f"output_size {size}"
            )
        return self._emit_shaped(kind, node, name, data, {}, two_d)

    def _aten_adaptive_avg_pool1d(self, node, name, data, a) -> None:
        self._adaptive(node, name, data, a, GAP, False)

    def _aten_adaptive_max_pool1d(self, node, name, data, a) -> None:
        self._tuple_result(node, self._adaptive(node, name, data, a, GMP, False))

    def _aten_adaptive_max_pool2d(self, node, name, data, a) -> None:
        self._tuple_result(node, self._adaptive(node, name, data, a, GMP, True))

    def _aten__adaptive_avg_pool2d(self, node, name, data, a) -> None:
        self._adaptive(node, name, data, {"output_size": a["output_size"]}, GAP, True)

    _aten_adaptive_avg_pool2d = _aten__adaptive_avg_pool2d

    def _aten_mean(self, node, name, data, a) -> None:
        self._reduce(node, name, data, a, GAP)

    def _aten_amax(self, node, name, data, a) -> None:
        self._reduce(node, name, data, a, GMP)

    def _reduce(self, node, name, data, a, kind) -> None:
        x = data[0]
        lifted = x.name in self.lifted
        rank = len(x.meta["tensor_meta"].shape)
        dims = sorted(int(d) % rank for d in (a.get("dim") or []))
        keep = bool(a.get("keepdim", False))
        what = "mean" if kind == GAP else "amax"
        if lifted and dims == [2, 3] and keep:
            self._emit_shaped(kind, node, name, data, {}, True)
            return
        if lifted or rank != 3 or dims != [2]:
            raise unsupported(name, what, "only over time (dim=-1) of (batch, channels, time)")
        if keep:
            self._emit(kind, node, name, data)
            return
        in_shape = _shape(x)
        pool = Op(kind, name, (self.alias[x.name],), f"{node.name}.pool", (in_shape[0], 1), (in_shape,))
        flat = Op(FLATTEN, f"{name}.flatten", (pool.output,), node.name, (in_shape[0],), ((in_shape[0], 1),))
        self._add(pool, flat)
        self.alias[node.name] = node.name

    def _aten_add(self, node, name, data, a) -> None:
        if a.get("alpha", 1) != 1:
            raise unsupported(name, "add", "alpha other than 1")
        if len(data) == 2 and a["self"] is not a["other"]:
            shapes = [_shape(d) for d in data]
            if shapes[0] != shapes[1] or _shape(node) != shapes[0]:
                raise unsupported(name, "add", f"only the sum of two tensors of one shape, got {shapes}")
            if any(d.name in self.lifted for d in data):
                raise unsupported(name, "add", "an addition of 4-D tensors")
            self._emit(ADD, node, name, data)
            return
        linear = self.open_linear.pop(data[0].name, None) if len(data) == 1 else None
        if linear is None or len(data[0].users) != 1:
            raise unsupported(name, "add", "only the sum of two tensors, or the bias after a matrix product")
        other = a["other"] if a["self"] is data[0] else a["self"]
        bias = _np(torch.as_tensor(self._const(other, name, "bias"))).reshape(-1)
        if bias.shape[0] != linear.out_shape[0]:
            raise unsupported(
                name, "add", f"the bias must have {linear.out_shape[0]} values, got {bias.shape}"
            )
        linear.params["bias"] = bias
        self.alias[node.name] = linear.output

    _aten_add_ = _aten_add

    def _aten_cat(self, node, name, data, a) -> None:
        parts = list(a["tensors"])
        rank = len(node.meta["tensor_meta"].shape)
        if not all(self._is_data(p) for p in parts) or int(a.get("dim", 0)) % rank != 1:
            raise unsupported(
                name, "cat", f"only tensors joined along channels (dim=1), got dim={a.get('dim')}"
            )
        if any(p.name in self.lifted for p in parts):
            raise unsupported(name, "cat", "a concatenation of 4-D tensors")
        self._emit(CONCAT, node, name, parts)

    _aten_concat = _aten_cat

    def _reshape(self, node, name, data, a) -> None:
        x = data[0]
        in_full, out_full = tuple(x.meta["tensor_meta"].shape), tuple(node.meta["tensor_meta"].shape)
        if out_full[:1] != in_full[:1]:
            raise unsupported(name, _op_name(node), f"it changes the batch axis ({in_full} -> {out_full})")
        lifted = x.name in self.lifted
        op = _op_name(node)
        if op == "unsqueeze" and not lifted and len(in_full) == 3 and len(out_full) == 4 and out_full[2] == 1:
            self.alias[node.name] = self.alias[x.name]
            self.lifted.add(node.name)  # (B, C, L) -> (B, C, 1, L): decomposed 1-D pooling follows
            return
        if lifted and len(out_full) == 3 and out_full == (in_full[0], in_full[1], in_full[3]):
            self._alias(node, x)  # squeeze back to (B, C, L)
            return
        in_shape = self._lifted_shape(x) if lifted else _shape(x)
        out_shape = _shape(node)
        if out_shape == in_shape:
            self._alias(node, x)
            return
        if not lifted and self._gate_view(node, x):
            return
        if len(out_shape) != 1 or out_shape[0] != math.prod(in_shape):
            if not lifted:
                self._layout(node, name, x)  # another layout: a view, until it comes back
                return
            raise unsupported(
                name,
                f"reshape {in_shape} -> {out_shape}",
                "only flattening each ECG's features to one axis ((C, 1) -> (C,) or (C, L) -> (C*L,))",
            )
        op_ = Op(FLATTEN, name, (self.alias[x.name],), node.name, out_shape, (in_shape,))
        self._add(op_)
        self.alias[node.name] = node.name

    _aten_flatten = _aten_view = _aten_reshape = _aten__unsafe_view = _reshape
    _aten_squeeze = _aten_unsqueeze = _reshape

    def _gate_view(self, node: fx.Node, x: fx.Node) -> bool:
        """Alias a view that only broadcasts a gate ((C,) -> (C, 1), (C, 1) -> (C, L)); False if
        ``node`` is another reshape."""
        shape, out = self.gate_views.get(x.name, _shape(x)), _shape(node)
        if len(out) != 2 or out == shape or broadcast_problem(out, shape) is not None:
            return False
        self._alias(node, x)
        self.gate_views[node.name] = shape
        return True

    def _aten_expand(self, node, name, data, a) -> None:
        if not self._gate_view(node, data[0]):
            raise unsupported(name, "expand", "only a gate broadcast over the signal it multiplies")

    _aten_expand_as = _aten_expand

    def _aten_mul(self, node, name, data, a) -> None:
        if len(data) != 2:
            raise unsupported(name, "multiplication", "only a product of two tensors: a signal, its gate")
        shapes = tuple(self.gate_views.get(d.name, _shape(d)) for d in data)
        producers = [next((o for o in self.ops if o.output == self.alias[d.name]), None) for d in data]
        try:
            gate = gate_index(shapes, tuple(p.kind if p else None for p in producers))
        except NoClearGate as e:
            raise unsupported(name, "multiplication", str(e)) from None
        self._emit(MUL, node, name, data, {"gate": gate})

    def _aten_permute(self, node, name, data, a) -> None:
        if data[0].name in self.lifted:
            raise unsupported(name, "permute", "a permutation of a 4-D tensor")
        self._layout(node, name, data[0])

    _aten_transpose = _aten_permute


# What may read a view (a rearranged tensor): another rearrangement, or a copy of it.
_LAYOUT_OPS = frozenset(
    {"permute", "transpose", "squeeze", "unsqueeze", "view", "reshape", "_unsafe_view", "flatten", "clone"}
    | {"contiguous", "alias", "detach", "expand", "t"}
)


def _one(v: Any, name: str, what: str) -> int:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(v) != 1:
        raise ExportError(f"layer {name}: {what} {tuple(v)} must be one-dimensional")
    return int(v[0])


def _second(v: Any, name: str, trivial: int) -> list[int]:
    """The time entry of a decomposed 1-D op's 2-D argument ([1, k] -> [k]); the other entry must be
    ``trivial`` (a window of one row, no padding)."""
    v = list(v) if isinstance(v, (list, tuple)) else [v, v]
    if len(v) == 1:
        v = [v[0], v[0]]
    if len(v) != 2 or int(v[0]) != trivial:
        raise unsupported(name, "2-D pooling", f"only a 1-D window (1, k) over time, got {v}")
    return [int(v[1])]


def export_module_ir(model: nn.Module, shape: tuple[int, int]) -> ModelIR:
    """A module's IR through ``torch.export`` (non-strict, a batch of two ECGs of ``shape``): the
    fx front end's fallback for code torch.fx cannot trace symbolically. Shapes are fixed at export,
    so an ``if`` on a tensor's shape is resolved there, and layers built inside ``forward()`` appear
    as the ATen calls they make. Raises ExportError naming the cause."""
    example = torch.zeros(2, *shape)
    try:
        ep = torch.export.export(model.eval(), (example,), strict=False)
        gm = ep.module()
    except Exception as e:  # torch.export raises many types; data-dependent control flow among them
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        data_dependent = any(k in f"{type(e).__name__} {e}" for k in ("data-dependent", "DataDependent"))
        why = (
            "data-dependent Python control flow in forward() (an if or loop on tensor values) is not "
            "supported; control flow on shapes is"
            if data_dependent
            else "torch.export cannot capture it either"
        )
        raise ExportError(f"torch.export: {type(e).__name__}: {first}; {why}") from None
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return _Converter(gm, Path("the model")).convert(shape)
