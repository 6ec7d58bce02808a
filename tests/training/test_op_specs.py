"""The IR's op kinds as specs (``ecgx.training.export.ops``): one ``OpKind`` per kind, in a file
of its own, listed once; everything the export knows about a kind comes from its spec.

Here: the registry and the sets derived from it; each spec's validation reaches the IR's
errors; and, for every op of a model that has each kind in several variants, the spec's
ONNX emission agrees with its own PyTorch module: the forward pass with the module's
output, the plain-gradient backward step (``emit_backward`` under ``Rule``) with autograd's
vector-Jacobian product.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from parity_helpers import randomise_batchnorm
from torch import nn

import ecgx.training.export.ops as ops_package
from ecgx.training.export.ir import OP_KINDS, PARAMETERISED, RULE_LAYERS, ExportError, ModelIR, Op, check_op
from ecgx.training.export.onnx_graphs import GraphBuilder, Rule, forward_op
from ecgx.training.export.ops import OP_SPECS, OpKind
from ecgx.training.export.torch_frontend import trace_model
from ecgx.training.models import Add

SHAPE = (3, 41)  # odd length: ceil_mode's last window and the tails of strided layers


def test_each_kind_is_one_spec_in_its_own_file_listed_once() -> None:
    assert list(OP_SPECS) == list(OP_KINDS)
    files = sorted(p.stem for p in Path(ops_package.__file__).parent.glob("op_*.py"))
    assert files == sorted(f"op_{kind}" for kind in OP_KINDS)
    for kind, spec in OP_SPECS.items():
        module = importlib.import_module(f"ecgx.training.export.ops.op_{kind}")
        assert isinstance(spec, OpKind) and spec.kind == kind
        assert type(spec).__module__ == module.__name__, f"{kind}'s spec lives outside op_{kind}.py"


def test_the_kind_sets_derive_from_the_specs() -> None:
    assert OP_KINDS == (
        "conv", "linear", "affine", "maxpool", "avgpool", "gap", "gmp", "add", "mul", "concat", "relu",
        "leaky_relu", "elu", "gelu", "silu", "mish", "sigmoid", "tanh", "flatten", "pad",
    )  # fmt: skip
    assert frozenset({"conv", "linear", "affine"}) == PARAMETERISED
    assert frozenset({"conv", "linear", "affine", "maxpool", "avgpool", "gap", "gmp", "add"}) == RULE_LAYERS
    assert {k for k, s in OP_SPECS.items() if s.moves_values} == {"concat", "flatten", "pad"}
    max_pools = {k for k, s in OP_SPECS.items() if type(s).max_window is not OpKind.max_window}
    assert max_pools == {"maxpool", "gmp"}


def _op(kind: str, in_shapes, out_shape, inputs=None, **params) -> Op:
    inputs = inputs or tuple(f"t{i}" for i in range(len(in_shapes)))
    return Op(kind, f"bad_{kind}", inputs, "y", out_shape, tuple(in_shapes), params)


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (_op("add", [(4, 10), (4, 9)], (4, 10)), "an addition must add two tensors of one shape"),
        (_op("concat", [(4, 10)], (4, 10)), "torch.cat must join two or more tensors"),
        (_op("gap", [(40,)], (40,)), r"expects \(batch, channels, time\) input"),
        (
            _op("maxpool", [(4, 10)], (4, 4), kernel=2, stride=2, padding=2, ceil_mode=False),
            "padding 2 exceeds half the kernel 2",
        ),
        (
            _op(
                "conv",
                [(4, 10)],
                (4, 10),
                weight=np.ones((4, 4, 1)),
                bias=None,
                stride=1,
                padding=0,
                dilation=1,
                groups=0,
            ),
            "groups must be >= 1",
        ),
        (_op("softsign", [(4, 10)], (4, 10)), "unknown op kind 'softsign'"),
    ],
)
def test_each_specs_validation_is_the_irs_error(op: Op, message: str) -> None:
    with pytest.raises(ExportError, match=f"layer bad_.*: {message}"):
        check_op(op)


class Variants(nn.Module):
    """Each kind, most in more than one variant: a strided stem (a ConvTranspose gradient), a
    padded ceil_mode max pool (scattered routing), a kernel-2 max pool (paired routing), an
    affine op, grouped and dilated convolutions, torch.cat, an addition, an average pool with
    and without padding counts, explicit zero padding, both global pools, flatten and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(SHAPE[0], 6, 5, stride=2, padding=2)
        self.pool = nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True)
        self.bn = nn.BatchNorm1d(6)
        self.grouped = nn.Conv1d(6, 6, 3, padding=1, groups=3)
        self.dilated = nn.Conv1d(6, 6, 3, padding=2, dilation=2)
        self.mix = nn.Conv1d(12, 6, 1)
        self.pairs = nn.MaxPool1d(2)
        self.avg = nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.avg_incl = nn.AvgPool1d(2, stride=1, padding=1, count_include_pad=True)
        self.gap, self.gmp = nn.AdaptiveAvgPool1d(1), nn.AdaptiveMaxPool1d(1)
        self.add, self.relu = Add(), nn.ReLU()
        self.pad = nn.ConstantPad1d((1, 2), 0.0)
        self.fc = nn.Linear(12, 4)
        self.se = nn.Linear(6, 6)  # a squeeze-and-excitation gate: the gating product
        self.acts = nn.ModuleList(
            [
                nn.LeakyReLU(0.1),
                nn.ELU(0.7),
                nn.GELU(),
                nn.GELU(approximate="tanh"),
                nn.SiLU(),
                nn.Mish(),
                nn.Sigmoid(),
                nn.Tanh(),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu(self.stem(self.pad(x))))
        b = self.bn(h)
        branches = torch.cat([self.relu(self.grouped(b)), self.relu(self.dilated(b))], dim=1)
        h = self.avg_incl(self.avg(self.pairs(self.relu(self.add(self.mix(branches), h)))))
        h = h * torch.sigmoid(self.se(h.mean(-1))).unsqueeze(-1)
        for act in self.acts:
            h = act(h)
        return self.fc(torch.flatten(torch.cat([self.gap(h), self.gmp(h)], dim=1), 1))


def _variants_ir() -> ModelIR:
    torch.manual_seed(0)
    model = Variants()
    randomise_batchnorm(model)
    return trace_model(model.eval(), SHAPE)


def test_the_test_model_has_every_kind() -> None:
    assert {op.kind for op in _variants_ir().ops} == set(OP_KINDS)


def _single_op_graph(op: Op) -> ort.InferenceSession:
    """``op`` alone as a graph: its forward pass, and its backward step under the plain-gradient
    rule for output gradient ``g``; graph tensors in and out keep their 1-D shapes."""
    b = GraphBuilder(f"one_{op.kind}")
    ins = []
    for i, shape in enumerate(op.in_shapes):
        x = b.add_input(f"x{i}", ["batch", *shape])
        ins.append(b.op("Unsqueeze", [x, b.const([2], np.int64)]) if len(shape) == 2 else x)
    g = b.add_input("g", ["batch", *op.out_shape])
    g4 = b.op("Unsqueeze", [g, b.const([2], np.int64)]) if len(op.out_shape) == 2 else g
    out = forward_op(b, op, ins)
    grads = OP_SPECS[op.kind].emit_backward(Rule(), b, op, g4, ins, out)

    def emit(t: str, name: str, shape: tuple[int, ...]) -> None:
        flat = b.op("Squeeze", [t, b.const([2], np.int64)]) if len(shape) == 2 else t
        b.add_output(flat, name, ["batch", *shape])

    emit(out, "y", op.out_shape)
    for i, (t, shape) in enumerate(zip(grads, op.in_shapes, strict=True)):
        emit(t, f"dx{i}", shape)
    return ort.InferenceSession(b.model().SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("index", range(len(_variants_ir().ops)))
def test_each_specs_graph_step_matches_its_pytorch_module(index: int) -> None:
    op = _variants_ir().ops[index]
    spec = OP_SPECS[op.kind]
    rng = np.random.default_rng(index)
    xs = [rng.normal(0, 1, (3, *shape)).astype(np.float32) for shape in op.in_shapes]
    g = rng.normal(0, 1, (3, *op.out_shape)).astype(np.float32)
    module = spec.torch_module(op).eval()
    leaves = [torch.tensor(x, requires_grad=True) for x in xs]
    y = module(*leaves)
    expected = torch.autograd.grad(y, leaves, torch.tensor(g))
    session = _single_op_graph(op)
    got = session.run(None, {**{f"x{i}": x for i, x in enumerate(xs)}, "g": g})
    np.testing.assert_allclose(got[0], y.detach().numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{op.name} forward")
    for i, (dx, want) in enumerate(zip(got[1:], expected, strict=True)):
        np.testing.assert_allclose(dx, want.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{op.name} input {i}")
