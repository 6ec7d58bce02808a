"""``OpKind``: what one kind of IR op is, everywhere the export needs to know.

Each op kind is one subclass in its own file (``ops/op_<name>.py``), listed once in
``ops/__init__.py``'s ``OP_SPECS``. A spec answers, for the ops of its kind:

* **what it is**: class attributes the builders read (``has_parameters``, ``is_rule_layer``,
  ``moves_values``, ``makes_feature_maps``, ``lrp_role``) and ``validate``;
* **how BatchNorm folds into it**: ``fold_output_affine``, ``fold_input_affine``;
* **its ONNX graphs**: ``emit_forward`` (the op itself), ``emit_transpose`` (its plain input
  gradient), ``emit_backward`` (which hook of an attribution rule applies at it) and, for the
  max pools, ``emit_route_max``;
* **its PyTorch references**: ``torch_module`` (the module ``ir_torch`` rebuilds it as, which
  every reference runs), ``max_window``, ``magnitude`` and ``zero_exact``.

A hook a kind does not need keeps the default below. A spec holds no state: one instance
per kind serves every op of that kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ecgx.training.export.ir import Op
    from ecgx.training.export.onnx_graphs import Rule
    from ecgx.training.export.ops.onnx_helpers import GraphBuilder

# An op's role in Zennit's LRP composites (``lrp_rules``, ``lrp_reference``).
CONV_RULE = "conv"  # the composite's conv rule (ZPlus, AlphaBeta); the input rule where it reads the ECG
DENSE_RULE = "dense"  # Epsilon; the input rule where it reads the ECG
NORM = "norm"  # Zennit's Norm (its Sum and AvgPool rule): z is the op's output
PASS = "pass"  # relevance passes unchanged (activations; Zennit's BatchNorm rule)
GRADIENT = "gradient"  # unmapped in Zennit: the plain gradient moves relevance

# (kernel, stride, padding, ceil_mode) of a max pool's windows.
MaxWindow = tuple[int, int, int, bool]


class OpKind:
    """One kind of IR op. Subclasses set ``kind`` and override the hooks their kind needs."""

    kind: ClassVar[str]
    has_parameters: ClassVar[bool] = False  # weight and bias initialisers shared by every graph
    # LRP's "linear" layers (z = a weighted sum of inputs + bias): Captum's epsilon rule attaches here.
    is_rule_layer: ClassVar[bool] = False
    moves_values: ClassVar[bool] = False  # only moves values: every rule passes its gradient through
    makes_feature_maps: ClassVar[bool] = False  # an activation after it gives a GradCAM candidate layer
    is_activation: ClassVar[bool] = False  # element-wise activation (ReLU, ops/activation.py)
    lrp_role: ClassVar[str] = GRADIENT

    # ----------------------------------------------------------------- the IR

    def validate(self, op: Op) -> str | None:
        """What is wrong with ``op``'s inputs or parameters (the IR raises it), or None."""
        return None

    def fold_output_affine(self, op: Op, scale: np.ndarray, shift: np.ndarray) -> bool:
        """Fold ``y -> scale * y + shift`` (per output channel) into ``op`` if that is exact."""
        return False

    def fold_input_affine(self, op: Op, scale: np.ndarray, shift: np.ndarray) -> bool:
        """Fold ``x -> scale * x + shift`` (per input channel) into ``op`` if that is exact."""
        return False

    # ----------------------------------------------------------------- ONNX graphs

    def emit_forward(
        self, b: GraphBuilder, op: Op, ins: list[str], weight_t: str | None, bias_t: str | None
    ) -> str:
        """The op on ``ins`` ((B, C, 1, L) signals, (B, F) features). For a parameterised kind,
        ``weight_t``/``bias_t`` are the weight and bias tensors to use (``bias_t`` None: no bias)."""
        raise NotImplementedError(f"op kind {self.kind!r} has no forward emission")

    def emit_transpose(self, b: GraphBuilder, op: Op, g: str, weight_t: str | None = None) -> list[str]:
        """The plain gradient at each input given ``g`` at the output (``weight_t`` replaces a
        parameterised op's weight)."""
        raise NotImplementedError(f"op kind {self.kind!r} has no transpose")

    def emit_backward(
        self, rule: Rule, b: GraphBuilder, op: Op, g: str, ins: list[str], out: str
    ) -> list[str]:
        """The contribution at each input under ``rule`` (ReLUs call ``rule.relu``, max pools
        ``rule.maxpool``, every other op with weights or a sum ``rule.layer``)."""
        if self.moves_values:  # every rule passes them through
            return self.emit_transpose(b, op, g)
        return rule.layer(b, op, g, ins, out)

    def emit_route_max(self, b: GraphBuilder, g: str, a: str, op: Op) -> str:
        """A max pool's gradient: ``g`` to the first maximum of each window of input ``a``."""
        raise NotImplementedError(f"op kind {self.kind!r} is not a max pool")

    # ----------------------------------------------------------------- PyTorch references

    def torch_module(self, op: Op) -> nn.Module:
        """The module computing ``op`` in float32 (``ir_torch`` rebuilds the IR from these)."""
        raise NotImplementedError(f"op kind {self.kind!r} has no PyTorch module")

    def max_window(self, op: Op) -> MaxWindow | None:
        """A max pool's windows; None for every other kind."""
        return None

    def magnitude(self, layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        """``sum |w * a|`` (+ |bias|) per output unit of a layer LRP divides by, else None."""
        return None

    def kinked_at_zero(self, op: Op) -> bool:
        """Whether the op's derivative jumps where its input crosses 0 (ReLU, LeakyReLU): float32
        rounding of an input near 0 may then switch it (``reference.relu_near_ties``)."""
        return False

    def zero_exact(self, inputs_exact: bool) -> bool:
        """Whether the output is non-negative with zeros exact in every float32 implementation,
        given whether all inputs are."""
        return False


def scale_outputs(op: Op, scale: np.ndarray, shift: np.ndarray) -> None:
    """Fold a per-output-channel affine map into a conv or dense layer's weight and bias."""
    w = op.params["weight"]
    bias = op.params["bias"] if op.params["bias"] is not None else np.zeros(w.shape[0])
    op.params["weight"] = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    op.params["bias"] = bias * scale + shift


def signal_input_problem(op: Op) -> str | None:
    """The problem with an op that needs a (C, L) signal input, if its input is not one."""
    if len(op.in_shape) != 2:
        return f"expects (batch, channels, time) input, got per-sample {op.in_shape}"
    return None


def pool_problem(op: Op) -> str | None:
    """The problem with a windowed pooling op's input or padding, if any."""
    problem = signal_input_problem(op)
    if problem is None and 2 * op.params["padding"] > op.params["kernel"]:
        return f"padding {op.params['padding']} exceeds half the kernel {op.params['kernel']}"
    return problem
