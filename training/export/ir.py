"""A small, explicit intermediate representation of a supported CNN.

Every way a model reaches the export (a PyTorch module, a ``torch.export``
program, a forward-only ONNX file) is turned into the same :class:`ModelIR`:
a list of :class:`Op` in topological order over named tensors, with per-sample
shapes, float64 parameters, BatchNorm folded where that is exact and eval-mode
no-ops (Dropout, Identity) removed. The ONNX graph builder emits forward and
backward graphs from this list, so the export never depends on how PyTorch
itself would export a model.

This module holds the IR; its front ends are ``torch_frontend`` (a PyTorch module,
``trace_model``), ``program_import`` and ``onnx_import``.

Per-sample shapes are ``(C, L)`` for signals and ``(F,)`` for flat features;
the batch axis is never part of an op's shape. Op kinds and their ``params`` (each kind is
one ``OpKind`` spec in ``ops/op_<kind>.py``, listed once in ``ops.OP_SPECS``):

========== ===================================================================
conv       weight (C_out, C_in / groups, k), bias | None, stride, padding
           (zeros, same on both sides), dilation, groups
linear     weight (F_out, F_in), bias | None
affine     weight (C,), bias (C,): ``y[c] = weight[c] * x[c] + bias[c]`` (a
           BatchNorm that could not be folded into a neighbour)
maxpool    kernel, stride, padding (-inf), ceil_mode
avgpool    kernel, stride, padding (zeros), ceil_mode, count_include_pad
gap, gmp   global average / max over time: (C, L) -> (C, 1)
add        two inputs of equal shape
mul        two inputs: a signal and its gate (params gate: its index); the gate has
           the signal's shape or broadcasts ((C, 1), (1, L), (C,))
concat     two or more inputs, joined along channels (axis 0 of the shape)
relu       -
leaky_relu slope; ``elu``: alpha; ``gelu``: approximate ("none" | "tanh");
           ``silu``, ``mish``, ``sigmoid``, ``tanh``: - (``ops/activation.py``)
flatten    (C, L) -> (C * L,)
========== ===================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ecgx.core.errors import InvalidArgument

# The op kinds are specs in ``ops/`` (one file per kind); these names are re-exported for the
# front ends and the tests that name kinds.
from ecgx.training.export.ops import (
    ADD,
    AFFINE,
    AVGPOOL,
    CONCAT,
    CONV,
    FLATTEN,
    GAP,
    GMP,
    LINEAR,
    MAXPOOL,
    OP_KINDS,
    OP_SPECS,
    PARAMETERISED,
    RELU,
    RULE_LAYERS,
    SIGMOID,
)
from ecgx.training.export.ops.shapes import conv_output_length, pool_output_length

__all__ = [
    "ADD",
    "AFFINE",
    "AVGPOOL",
    "CONCAT",
    "CONV",
    "FLATTEN",
    "GAP",
    "GMP",
    "INPUT",
    "LINEAR",
    "MAXPOOL",
    "OP_KINDS",
    "PARAMETERISED",
    "RELU",
    "RULE_LAYERS",
    "ExportError",
    "ModelIR",
    "Op",
    "batchnorm_affine",
    "check_op",
    "conv_output_length",
    "finish_ir",
    "pool_output_length",
    "unsupported",
]

INPUT = "x"
SUPPORTED_LAYERS = (
    "Conv1d (any stride, padding, dilation, groups), Linear, BatchNorm1d (eval mode, with running "
    "statistics), ReLU, LeakyReLU, ELU, GELU (exact or tanh), SiLU / Swish, Mish, Sigmoid and Tanh "
    "(modules or functions), MaxPool1d and AvgPool1d (any kernel, stride, padding, "
    "ceil_mode, count_include_pad), AdaptiveAvgPool1d(1), AdaptiveMaxPool1d(1), residual addition, "
    "gating products x * gate (squeeze-and-excitation, sigmoid attention gates), "
    "torch.cat along channels, Flatten / torch.flatten / view(B, -1), zero padding over time "
    "(ConstantPad1d / ZeroPad1d with value 0, F.pad), Dropout, Identity"
)
# What to use instead of a layer the rules are not defined for.
REPLACEMENTS = {
    "GELU (tanh form)": "GELU exported at opset 20 or later (its Gelu operator), or the exact GELU",
    "SELU": "ELU",
    "CELU": "ELU",
    "PReLU": "LeakyReLU (one fixed slope)",
    "Softmax": "nothing: return logits (the service applies the activation)",
    "LSTM": "convolutions (recurrent layers have no backward graph here)",
    "GRU": "convolutions (recurrent layers have no backward graph here)",
    "LayerNorm": "BatchNorm1d (foldable at inference)",
    "GroupNorm": "BatchNorm1d (foldable at inference)",
    "InstanceNorm1d": "BatchNorm1d (foldable at inference)",
    "MultiheadAttention": "convolutions (attention has no backward graph here)",
    "AdaptiveAvgPool1d": "AdaptiveAvgPool1d(1) (global pooling) or AvgPool1d",
    "AdaptiveMaxPool1d": "AdaptiveMaxPool1d(1) (global pooling) or MaxPool1d",
}


class ExportError(InvalidArgument):
    """The model cannot be exported: an unsupported layer, or graphs that disagree with PyTorch."""


def unsupported(name: str, what: str, reason: str = "") -> ExportError:
    """The refusal for a layer: its name, why, and what to use instead."""
    instead = REPLACEMENTS.get(what)
    hint = f"; replace it with {instead}" if instead else f"; supported: {SUPPORTED_LAYERS}"
    return ExportError(f"layer {name} ({what}) is not supported{': ' + reason if reason else ''}{hint}")


@dataclass
class Op:
    """One layer application: ``output = kind(inputs; params)``."""

    kind: str
    name: str  # the layer's name in the source model, for messages and parameter names
    inputs: tuple[str, ...]
    output: str
    out_shape: tuple[int, ...]  # per-sample shape, batch dimension excluded
    in_shapes: tuple[tuple[int, ...], ...]  # one per input
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.in_shapes[0]


@dataclass
class ModelIR:
    """A supported network: ops in topological order from ``INPUT`` (shape ``input_shape``) to ``output``."""

    ops: list[Op]
    output: str
    input_shape: tuple[int, int]  # (leads, samples)

    def op_producing(self, tensor: str) -> Op | None:
        return next((op for op in self.ops if op.output == tensor), None)

    def consumers(self, tensor: str) -> list[Op]:
        return [op for op in self.ops if tensor in op.inputs]

    @property
    def n_outputs(self) -> int:
        return self.ops[-1].out_shape[0]

    def conv_outputs(self) -> list[str]:
        """Tensors after each activation that follows a convolution, addition or concatenation
        (GradCAM candidate layers: (C, L) feature maps)."""
        found = []
        for op in self.ops:
            if OP_SPECS[op.kind].is_activation and len(op.out_shape) == 2:
                producer = self.op_producing(op.inputs[0])
                if producer is not None and OP_SPECS[producer.kind].makes_feature_maps:
                    found.append(op.output)
        return found


# --------------------------------------------------------------------------- validation


def check_op(op: Op) -> None:
    """Validate one op's parameters and shapes (every front end calls this), or raise ExportError."""
    p, name = op.params, op.name
    spec = OP_SPECS.get(op.kind)
    if spec is None:
        raise ExportError(f"layer {name}: unknown op kind {op.kind!r}")
    problem = spec.validate(op)
    if problem is not None:
        raise ExportError(f"layer {name}: {problem}")
    for key in ("weight", "bias"):
        if key in p and p[key] is not None and not np.all(np.isfinite(p[key])):
            raise ExportError(f"layer {name}: its {key} has NaN or infinite values")


# --------------------------------------------------------------------------- BatchNorm folding


def batchnorm_affine(
    name: str, mean: np.ndarray | None, var: np.ndarray | None, gamma, beta, eps: float
) -> dict[str, np.ndarray]:
    """The eval-mode BatchNorm as per-channel ``weight * x + bias``, or ExportError without statistics."""
    if mean is None or var is None:
        raise ExportError(
            f"layer {name} (BatchNorm1d) has no running statistics (track_running_stats=False): it "
            "normalises each batch by itself, so it is not a fixed function of one ECG; train it with "
            "running statistics"
        )
    scale = (np.ones_like(mean) if gamma is None else gamma) / np.sqrt(var + eps)
    shift = (np.zeros_like(mean) if beta is None else beta) - mean * scale
    return {"weight": scale, "bias": shift}


def fold_affine(ops: list[Op]) -> list[Op]:
    """Fold each ``affine`` op into a neighbouring conv or linear layer where that is exact.

    Into the layer before it, when the affine op is that layer's only consumer (BatchNorm
    after a convolution or dense layer); otherwise into a dense layer (or an unpadded
    convolution) after it that is its only consumer (BatchNorm before the classifier).
    What cannot be folded stays an ``affine`` op. The folded layer records the BatchNorm's
    name under ``params["folded"]``.
    """
    ops = list(ops)
    changed = True
    while changed:
        changed = False
        for op in ops:
            if op.kind != AFFINE:
                continue
            if _fold_into_producer(ops, op) or _fold_into_consumer(ops, op):
                changed = True
                break
    return ops


def _fold_into_producer(ops: list[Op], bn: Op) -> bool:
    producer = next((o for o in ops if o.output == bn.inputs[0]), None)
    users = [o for o in ops if bn.inputs[0] in o.inputs]
    if producer is None or users != [bn]:
        return False
    if not OP_SPECS[producer.kind].fold_output_affine(producer, bn.params["weight"], bn.params["bias"]):
        return False
    _note_fold(producer, bn)
    _bypass(ops, bn, producer.output)
    return True


def _fold_into_consumer(ops: list[Op], bn: Op) -> bool:
    users = [o for o in ops if bn.output in o.inputs]
    if len(users) != 1 or users[0].inputs != (bn.output,):
        return False
    user = users[0]
    if not OP_SPECS[user.kind].fold_input_affine(user, bn.params["weight"], bn.params["bias"]):
        return False
    _note_fold(user, bn)
    user.inputs = bn.inputs
    ops.remove(bn)
    return True


def _note_fold(layer: Op, bn: Op) -> None:
    before = layer.params.get("folded")
    layer.params["folded"] = bn.name if not before else f"{before}, {bn.name}"


def _bypass(ops: list[Op], removed: Op, replacement: str) -> None:
    ops.remove(removed)
    for o in ops:
        o.inputs = tuple(replacement if t == removed.output else t for t in o.inputs)


def finish_ir(ops: list[Op], output: str, input_shape: tuple[int, int]) -> ModelIR:
    """Validate the front end's ops, fold BatchNorm and check the result (shared by every front end)."""
    for op in ops:
        check_op(op)
    ops = fold_affine(ops)
    if not ops or output != ops[-1].output:
        raise ExportError("the model's output must be the result of its last layer")
    out = ops[-1].out_shape
    if ops[-1].kind == SIGMOID:
        raise ExportError(
            f"layer {ops[-1].name} (Sigmoid) ends the model: return logits (keep the sigmoid outside the "
            "model; the service applies the output activation)"
        )
    if len(out) != 1:
        raise ExportError(
            f"the model must return (batch, classes) logits; it returns per-sample shape {out} "
            "(add a flatten and a Linear classifier)"
        )
    return ModelIR(ops, output, tuple(input_shape))
