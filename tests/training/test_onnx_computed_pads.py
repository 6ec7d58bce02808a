"""An ONNX Pad whose pads are computed from shapes at run time (torch_ecg's "same" padding, exported
by the TorchScript exporter) is refused naming the layer and the cause, not with a KeyError; by
default the model then exports as a partial package (forward pass only)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
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
def onnx_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            SamePad().eval(), (torch.zeros(1, 12, 64),), path, dynamo=False, input_names=["x"],
            dynamic_axes={"x": {0: "b", 2: "t"}},
        )  # fmt: skip
    return path


def test_computed_pads_are_refused_by_name(onnx_file) -> None:
    with pytest.raises(ExportError, match=r"\(Pad\): its pads .* is computed from the input"):
        load_source(onnx_file, input_length=64, sampling_rate_hz=100, classes=CLASSES, partial=False)


def test_by_default_the_model_exports_with_its_forward_pass_only(onnx_file, tmp_path) -> None:
    source = load_source(onnx_file, input_length=64, sampling_rate_hz=100, classes=CLASSES)
    manifest = json.loads((export_package(source, tmp_path / "pkg") / "manifest.json").read_text())
    assert "is computed from the input" in manifest["partial"]["reason"]
    assert "occlusion" in manifest["partial"]["methods"]
