"""A :class:`ModelIR` rebuilt as a canonical PyTorch module: the function the references run on.

Models reach the export as PyTorch modules, ``torch.export`` programs or ONNX files; the
IR is what they have in common. :func:`ir_module` turns it back into an ``nn.Module``
whose every op is its own submodule (a distinct ``nn.ReLU`` per ReLU op, an ``Add`` per
addition, a ``Concat`` per concatenation ...), with BatchNorm already folded exactly as
the IR folds it. That is the shape attribution libraries need: Captum's and Zennit's
rules attach to modules, Captum's GradCAM hooks a module's output, and the plain-autograd
reference (``autograd_reference``) swaps the rule in at each ReLU op. The module computes
the IR's function in float32 from the IR's float64 parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ecgx.training.export.ir import (
    ADD,
    AFFINE,
    AVGPOOL,
    CONCAT,
    CONV,
    FLATTEN,
    GAP,
    GMP,
    INPUT,
    LINEAR,
    MAXPOOL,
    RELU,
    ExportError,
    ModelIR,
    Op,
)
from ecgx.training.export.torch_frontend import trace_model
from ecgx.training.models import Add

# What an op's module may be replaced with while running: (op, its module, its inputs) -> output,
# or None to run the module itself.
Substitute = Callable[[Op, nn.Module, list[torch.Tensor]], torch.Tensor | None]


class ChannelAffine(nn.Module):
    """``y[:, c] = weight[c] * x[:, c] + bias[c]`` on (B, C) or (B, C, L): an unfoldable BatchNorm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class Concat(nn.Module):
    """``torch.cat`` along channels (dim 1) as a module, so rules and hooks can attach to it."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1)


class IRModule(nn.Module):
    """A ModelIR as a module: one submodule per op, run in the IR's order on (B, C, L) input.

    ``op_modules`` maps each IR tensor name (``op.output``) to the module producing it;
    ``attr_names`` maps each op's name to its submodule's attribute name. ``ir`` is the
    IR it was built from (its parameters are the float64 originals).
    """

    def __init__(self, ir: ModelIR) -> None:
        super().__init__()
        self.ir = ir
        self.op_modules: dict[str, nn.Module] = {}
        self.attr_names: dict[str, str] = {}
        self._steps: list[tuple[Op, str]] = []
        for op in ir.ops:
            attr = self._attribute_name(op.name)
            module = _op_module(op)
            self.add_module(attr, module)
            self.op_modules[op.output] = module
            self.attr_names[op.name] = attr
            self._steps.append((op, attr))
        # The step after which each tensor is no longer read: it is dropped there, so a long
        # network holds only its live tensors (autograd keeps what the backward pass needs).
        self._last_use: dict[str, int] = {}
        for i, (op, _) in enumerate(self._steps):
            for name in op.inputs:
                self._last_use[name] = i

    def _attribute_name(self, op_name: str) -> str:
        base = re.sub(r"\W", "_", op_name) or "op"
        if base[0].isdigit():
            base = f"op_{base}"
        name, n = base, 1
        # hasattr also rejects the names of nn.Module's own methods and of attributes set above.
        while name in self._modules or hasattr(self, name):
            n += 1
            name = f"{base}_{n}"
        return name

    def steps(self) -> list[tuple[Op, nn.Module]]:
        """The ops in order with their modules."""
        return [(op, self._modules[attr]) for op, attr in self._steps]

    def evaluate(self, x: torch.Tensor, substitute: Substitute | None = None) -> torch.Tensor:
        """Run the IR on ``x``; ``substitute`` may compute any op in place of its module."""
        if x.dim() != 3 or tuple(x.shape[1:]) != tuple(self.ir.input_shape):
            raise ExportError(
                f"the model takes (batch, {self.ir.input_shape[0]}, {self.ir.input_shape[1]}) input, "
                f"got {tuple(x.shape)}"
            )
        values = {INPUT: x}
        for i, (op, attr) in enumerate(self._steps):
            module = self._modules[attr]
            inputs = [values[name] for name in op.inputs]
            out = substitute(op, module, inputs) if substitute is not None else None
            values[op.output] = module(*inputs) if out is None else out
            for name in set(op.inputs):
                if self._last_use[name] == i and name != self.ir.output:
                    del values[name]
        return values[self.ir.output]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.evaluate(x)


def target_indices(target: np.ndarray | int, n: int) -> torch.Tensor:
    """One class index per sample (int64), from one index for all or one per sample."""
    return torch.as_tensor(np.broadcast_to(np.asarray(target, dtype=np.int64), (n,)).copy())


def ir_module(ir: ModelIR) -> IRModule:
    """The canonical PyTorch module computing ``ir``'s function (eval mode, float32 parameters)."""
    return IRModule(ir).eval()


def as_ir_module(model: nn.Module, input_shape: tuple[int, int] | None = None) -> IRModule:
    """``model`` itself if it is an IRModule, else the IRModule of its trace for (leads, samples)
    ``input_shape`` (or raise ExportError for a model the IR cannot describe)."""
    if isinstance(model, IRModule):
        return model
    return ir_module(trace_model(model, input_shape))


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float32)


def _op_module(op: Op) -> nn.Module:
    p = op.params
    if op.kind == CONV:
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
        return _load(conv, w, p["bias"])
    if op.kind == LINEAR:
        w = p["weight"]
        return _load(nn.Linear(w.shape[1], w.shape[0], bias=p["bias"] is not None), w, p["bias"])
    if op.kind == AFFINE:
        return ChannelAffine(_t(p["weight"]), _t(p["bias"]))
    if op.kind == MAXPOOL:
        return nn.MaxPool1d(p["kernel"], p["stride"], p["padding"], ceil_mode=p["ceil_mode"])
    if op.kind == AVGPOOL:
        return nn.AvgPool1d(
            p["kernel"],
            p["stride"],
            p["padding"],
            ceil_mode=p["ceil_mode"],
            count_include_pad=p["count_include_pad"],
        )
    if op.kind == GAP:
        return nn.AdaptiveAvgPool1d(1)
    if op.kind == GMP:
        return nn.AdaptiveMaxPool1d(1)
    if op.kind == ADD:
        return Add()
    if op.kind == CONCAT:
        return Concat()
    if op.kind == RELU:
        return nn.ReLU()
    if op.kind == FLATTEN:
        return nn.Flatten()
    raise ExportError(f"layer {op.name}: no PyTorch module for op kind {op.kind!r}")


def _load(module: nn.Conv1d | nn.Linear, weight: np.ndarray, bias: np.ndarray | None) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(_t(weight))
        if bias is not None:
            module.bias.copy_(_t(bias))
    return module
