"""A :class:`ModelIR` rebuilt as a canonical PyTorch module: the function the references run on.

Models reach the export as PyTorch modules, ``torch.export`` programs or ONNX files; the
IR is what they have in common. :func:`ir_module` turns it back into an ``nn.Module``
whose every op is its own submodule (a distinct ``nn.ReLU`` per ReLU op, an ``Add`` per
addition, a ``Concat`` per concatenation ...: each kind's ``OpKind.torch_module``), with
BatchNorm already folded exactly as the IR folds it. That is the shape attribution
libraries need: Captum's and Zennit's rules attach to modules, Captum's GradCAM hooks a
module's output, and the plain-autograd reference (``autograd_reference``) swaps the rule
in at each ReLU op. The module computes the IR's function in float32 from the IR's
float64 parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ecgx.training.export.ir import INPUT, ExportError, ModelIR, Op
from ecgx.training.export.ops import OP_SPECS
from ecgx.training.export.ops.op_affine import ChannelAffine
from ecgx.training.export.ops.op_concat import Concat
from ecgx.training.export.torch_frontend import trace_model

# Re-exported: the references and tests name these modules from here.
__all__ = ["ChannelAffine", "Concat", "IRModule", "Substitute", "as_ir_module", "ir_module", "target_indices"]

# What an op's module may be replaced with while running: (op, its module, its inputs) -> output,
# or None to run the module itself.
Substitute = Callable[[Op, nn.Module, list[torch.Tensor]], torch.Tensor | None]


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
            module = OP_SPECS[op.kind].torch_module(op)
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
