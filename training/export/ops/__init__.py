"""The IR's op kinds: one ``OpKind`` spec per kind, each in its own ``op_<name>.py``, listed once here.

``OP_SPECS`` maps a kind's name (``Op.kind``) to its spec; the IR's validation, the ONNX graph
builders, the LRP composites, the PyTorch rebuild and the references all ask the spec instead
of testing ``op.kind``. The kind names below are what the front ends write into ``Op.kind``.
To add a kind, see docs/extending.md ("A new layer kind of the IR").
"""

from __future__ import annotations

from ecgx.training.export.ops.base import OpKind
from ecgx.training.export.ops.op_add import Add
from ecgx.training.export.ops.op_affine import Affine
from ecgx.training.export.ops.op_avgpool import AvgPool
from ecgx.training.export.ops.op_concat import ConcatKind
from ecgx.training.export.ops.op_conv import Conv
from ecgx.training.export.ops.op_elu import Elu
from ecgx.training.export.ops.op_flatten import Flatten
from ecgx.training.export.ops.op_gap import GlobalAvgPool
from ecgx.training.export.ops.op_gelu import Gelu
from ecgx.training.export.ops.op_gmp import GlobalMaxPool
from ecgx.training.export.ops.op_leaky_relu import LeakyRelu
from ecgx.training.export.ops.op_linear import Linear
from ecgx.training.export.ops.op_maxpool import MaxPool
from ecgx.training.export.ops.op_mish import Mish
from ecgx.training.export.ops.op_mul import Mul
from ecgx.training.export.ops.op_pad import Pad
from ecgx.training.export.ops.op_relu import Relu
from ecgx.training.export.ops.op_sigmoid import Sigmoid
from ecgx.training.export.ops.op_silu import Silu
from ecgx.training.export.ops.op_tanh import Tanh

# Every op kind, in the IR's documented order.
OP_SPECS: dict[str, OpKind] = {
    spec.kind: spec
    for spec in (
        Conv(),
        Linear(),
        Affine(),
        MaxPool(),
        AvgPool(),
        GlobalAvgPool(),
        GlobalMaxPool(),
        Add(),
        Mul(),
        ConcatKind(),
        Relu(),
        LeakyRelu(),
        Elu(),
        Gelu(),
        Silu(),
        Mish(),
        Sigmoid(),
        Tanh(),
        Flatten(),
        Pad(),
    )
}

# The kind names, for the front ends that map foreign layers onto them.
CONV, LINEAR, AFFINE = Conv.kind, Linear.kind, Affine.kind
MAXPOOL, AVGPOOL, GAP, GMP = MaxPool.kind, AvgPool.kind, GlobalAvgPool.kind, GlobalMaxPool.kind
ADD, CONCAT, RELU, FLATTEN = Add.kind, ConcatKind.kind, Relu.kind, Flatten.kind
PAD, MUL = Pad.kind, Mul.kind
LEAKY_RELU, ELU, GELU, SILU = LeakyRelu.kind, Elu.kind, Gelu.kind, Silu.kind
MISH, SIGMOID, TANH = Mish.kind, Sigmoid.kind, Tanh.kind

OP_KINDS: tuple[str, ...] = tuple(OP_SPECS)
# "Linear" layers in the LRP sense (z = sum of weighted inputs + bias): the ones rules attach to.
RULE_LAYERS = frozenset(kind for kind, spec in OP_SPECS.items() if spec.is_rule_layer)
PARAMETERISED = frozenset(kind for kind, spec in OP_SPECS.items() if spec.has_parameters)

__all__ = [
    "ADD",
    "AFFINE",
    "AVGPOOL",
    "CONCAT",
    "CONV",
    "ELU",
    "FLATTEN",
    "GAP",
    "GELU",
    "GMP",
    "LEAKY_RELU",
    "LINEAR",
    "MAXPOOL",
    "MISH",
    "MUL",
    "OP_KINDS",
    "OP_SPECS",
    "PAD",
    "PARAMETERISED",
    "RELU",
    "RULE_LAYERS",
    "SIGMOID",
    "SILU",
    "TANH",
    "OpKind",
]
