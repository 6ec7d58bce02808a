"""An ONNX Pad whose pads are computed at run time. From shapes alone (torch_ecg's "same" padding,
exported by the TorchScript exporter) they are constants once the input's shape is fixed, and the
importer resolves them; pads that read the signal's values, or change with the batch, are refused
naming the layer and the cause (and by default the model exports with its forward pass only)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ecgx.training.export import export_package
from ecgx.training.export.input_forms import load_source
from ecgx.training.export.ir import ExportError

CLASSES = [{"key": f"c{i}", "code": str(i), "name": f"class {i}"} for i in range(3)]


class SamePad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.conv.kernel_size[0] - 1 + (x.shape[-1] % 2)  # a shape-dependent amount
        h = F.pad(x, (total // 2, total - total // 2))
        return self.fc(torch.relu(self.conv(h)).mean(-1))


@pytest.fixture
def same_pad():
    torch.manual_seed(0)
    return SamePad().eval()


@pytest.fixture
def onnx_file(tmp_path, same_pad):
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            same_pad, (torch.zeros(1, 12, 64),), path, dynamo=False, input_names=["x"],
            dynamic_axes={"x": {0: "b", 2: "t"}},
        )  # fmt: skip
    return path


@pytest.mark.parametrize("length", [64, 65])
def test_pads_computed_from_shapes_are_resolved_at_the_fixed_length(
    onnx_file, same_pad, length, tmp_path
) -> None:
    """One file, two input lengths: the pads differ (3 = 1 + 2 at 64, 4 = 2 + 2 at 65), each resolved
    for its length; the package has every graph and its forward pass equals the module's."""
    source = load_source(onnx_file, input_length=length, sampling_rate_hz=100, classes=CLASSES, partial=False)
    pad = next(op for op in source.ir.ops if op.kind == "pad")
    assert (pad.params["left"], pad.params["right"]) == ((1, 2) if length == 64 else (2, 2))
    package = export_package(source, tmp_path / "pkg")
    manifest = json.loads((package / "manifest.json").read_text())
    assert "partial" not in manifest and "gradient" in manifest["graphs"]
    x = np.random.default_rng(0).normal(size=(3, 12, length)).astype(np.float32)
    with torch.no_grad():
        want = same_pad(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(source.forward(x), want, atol=1e-5)


def _padded_by(amount: list[onnx.NodeProto], amount_value: str, tmp_path) -> str:
    """A model x -> Pad(x, (0, 0, k, 0, 0, k)) -> conv -> mean -> logits, k from ``amount`` nodes."""
    w = np.random.default_rng(0).normal(size=(3, 12, 4)).astype(np.float32)
    nodes = [
        *amount,
        helper.make_node("Concat", ["zeros2", amount_value, "zeros2", amount_value], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["padded"], name="/pad/Pad"),
        helper.make_node("Conv", ["padded", "w"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["logits"], axes=[2], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 12, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.zeros(2, np.int64), "zeros2"),
        ],
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_pads_read_from_the_signals_values_are_refused_by_name(tmp_path) -> None:
    """k = where the first lead of the first ECG peaks: integer arithmetic, but on the signal's values."""
    amount = [
        helper.make_node("ArgMax", ["x"], ["peaks"], axis=2, keepdims=0),
        helper.make_node("Reshape", ["peaks", "flat"], ["all_peaks"]),
        helper.make_node("Slice", ["all_peaks", "start", "end"], ["k"]),
    ]
    path = _padded_by(amount, "k", tmp_path)
    model = onnx.load(path)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1], np.int64), "flat"),
            numpy_helper.from_array(np.array([0], np.int64), "start"),
            numpy_helper.from_array(np.array([1], np.int64), "end"),
        ]
    )
    onnx.save_model(model, path)
    with pytest.raises(ExportError, match=r"\(Pad\): its pads .* is computed from the input"):
        load_source(path, sampling_rate_hz=100, classes=CLASSES, partial=False)


def test_pads_that_change_with_the_batch_are_refused(tmp_path) -> None:
    """k = the batch size: computed from a shape, but not a constant of the ECG's shape."""
    amount = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "start", "end"], ["k"]),
    ]
    path = _padded_by(amount, "k", tmp_path)
    model = onnx.load(path)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "start"),
            numpy_helper.from_array(np.array([1], np.int64), "end"),
        ]
    )
    onnx.save_model(model, path)
    with pytest.raises(ExportError, match=r"\(Pad\): its pads .* is computed from the input"):
        load_source(path, sampling_rate_hz=100, classes=CLASSES, partial=False)
