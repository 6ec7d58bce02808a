"""Explicit zero padding (``pad``), the worked example of a new op kind: each front end reads it,
and the package's graphs agree with Captum (gradient family, DeepLIFT, LRP-epsilon: checked by
the export itself) and with Zennit (the LRP composites)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from zennit_helpers import zennit_lrp

from ecgx.training.export import export_package
from ecgx.training.export.ir_torch import ir_module
from ecgx.training.export.lrp_rules import LRP_COMPOSITE_GRAPHS
from ecgx.training.export.onnx_import import import_onnx
from ecgx.training.export.ops import PAD
from ecgx.training.export.parity import per_sample_parity
from ecgx.training.export.program_import import import_program
from ecgx.training.export.torch_frontend import trace_model

SHAPE = (12, 600)  # the package's input shape


class PadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(12, 8, 5)
        self.pad = nn.ConstantPad1d((2, 1), 0.0)
        self.c2 = nn.Conv1d(8, 8, 3)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(8 * 300, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(F.pad(x, (3, 1))))
        h = self.pool(torch.relu(self.c2(self.pad(h))))
        return self.fc(torch.flatten(h, 1))


def _model() -> PadNet:
    torch.manual_seed(0)
    return PadNet().eval()


def _x(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1, (n, *SHAPE)).astype(np.float32)


def _signature(ir):
    return [
        (op.kind, op.out_shape, op.in_shapes, op.params.get("left"), op.params.get("right")) for op in ir.ops
    ]


def test_every_front_end_reads_zero_padding(tmp_path) -> None:
    model = _model()
    ir = trace_model(model, SHAPE)
    assert [(op.params["left"], op.params["right"]) for op in ir.ops if op.kind == PAD] == [(3, 1), (2, 1)]
    x = torch.tensor(_x())
    with torch.no_grad():
        torch.testing.assert_close(ir_module(ir)(x), model(x), atol=1e-5, rtol=0)
    torch.export.save(torch.export.export(model, (x[:1],)), tmp_path / "m.pt2")
    assert _signature(import_program(tmp_path / "m.pt2")[0]) == _signature(ir)
    torch.onnx.export(model, (x[:1],), tmp_path / "m.onnx", dynamo=False, input_names=["x"])
    assert _signature(import_onnx(tmp_path / "m.onnx")) == _signature(ir)


def test_the_package_passes_its_parity_checks_with_every_method(tmp_path) -> None:
    pkg = export_package(_model(), tmp_path / "pkg", sample_inputs=_x(8))
    manifest = json.loads((pkg / "manifest.json").read_text())
    # A graph no method needs (an optional speed-up the model's shape does not allow) may be absent.
    needed = {g: why for g, why in manifest.get("unavailable", {}).items() if why["methods"]}
    assert not needed, needed


def test_lrp_composites_match_zennit() -> None:
    ir = trace_model(_model(), SHAPE)
    x = _x()
    target = np.arange(len(x)) % 9
    for composite, graph in (
        ("epsilon_plus", "lrp_epsilon_plus"),
        ("epsilon_alpha2_beta1", "lrp_epsilon_alpha2_beta1"),
    ):
        session = ort.InferenceSession(
            LRP_COMPOSITE_GRAPHS[graph](ir, ["batch", *SHAPE], 9).SerializeToString(),
            providers=["CPUExecutionProvider"],
        )
        flat = x.reshape(len(x), -1)
        feeds = {
            "x": x,
            "seed": np.eye(9, dtype=np.float32)[target],
            "epsilon": np.array(1e-2, np.float32),
            "input_rule": np.array(0, np.int64),
            "low": flat.min(1),
            "high": flat.max(1),
        }
        (got,) = session.run(["attribution"], feeds)
        zen = zennit_lrp(ir_module(ir), composite, x, target, epsilon=1e-2)
        check = per_sample_parity(got, zen)
        assert check["ok"], f"{composite}: {check}"
