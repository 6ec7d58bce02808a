"""Patterns that refused a whole model (issue #25), through every input form they concern: the
``module:factory`` form (torch.fx, with torch.export as its fallback), a torch.export ``.pt2``
program, and ONNX from the TorchScript exporter and from the dynamo exporter.

- an ``if`` on shapes in forward() (torch_ecg's ResNet block) is resolved at export;
- no-op rearrangements (einops-style ``b c l -> b l c`` and back, transpose twice, a singleton
  unsqueeze then squeeze) are read as the tensor itself, and the dynamo exporter's spelling of a 1-D
  pool and of global pooling (Unsqueeze -> 2-D op -> Squeeze) as the 1-D op;
- parameter-free layers built in forward() are accepted; a layer with parameters built there is
  refused naming that cause;
- GradCAM's default layer, when its maps are constant on the check ECGs, gives way to the last
  convolutional layer whose maps vary, and the manifest says so.
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
import zoo_models
from zoo_models import LayersInForward, ParametersInForward, RibeiroHead, RoundTrips, ShapeIfBlock

from ecgx.training.export import export_package
from ecgx.training.export.input_forms import load_source
from ecgx.training.export.ir import ExportError
from ecgx.training.export.ir_torch import ir_module
from ecgx.training.export.package_writer import gradcam_maps
from ecgx.training.export.source import from_module
from ecgx.training.export.torch_frontend import trace_model

LENGTH = 64
SHAPE = (12, LENGTH)
CLASSES = [f"c{i}" for i in range(5)]
FORMS = ("factory", "program", "onnx_torchscript", "onnx_dynamo")
PATTERNS = ("shape_if", "round_trips", "layers_in_forward")


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(zoo_models.synthetic_ecgs(n, *SHAPE, seed=seed))


def _write(model: torch.nn.Module, factory: str, form: str, folder) -> object:
    """``model`` in ``form``; returns what load_source takes."""
    example = (torch.zeros(1, *SHAPE),)
    if form == "factory":
        torch.save(model.state_dict(), folder / "w.pt")
        return f"zoo_models:{factory}"
    if form == "program":
        torch.export.save(torch.export.export(model, example), folder / "m.pt2")
        return folder / "m.pt2"
    path = folder / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, example, path, dynamo=form == "onnx_dynamo", input_names=["x"], verbose=False
        )
    return path


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(pattern, form) -> the ModelSource load_source makes of it, or the error it raised."""
    out = {}
    for pattern in PATTERNS:
        model = zoo_models.pattern_factory(pattern)
        for form in FORMS:
            if form == "onnx_dynamo" and importlib.util.find_spec("onnxscript") is None:
                continue  # the dynamo exporter needs onnxscript (a dev dependency)
            folder = tmp_path_factory.mktemp(f"{pattern}-{form}")
            spec = _write(model, pattern, form, folder)
            kwargs = {"weights": folder / "w.pt", "input_length": LENGTH} if form == "factory" else {}
            try:
                out[pattern, form] = load_source(spec, classes=CLASSES, sampling_rate_hz=100, **kwargs)
            except ExportError as e:
                out[pattern, form] = e
    return out


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_form_reads_the_pattern_as_the_model(loaded, pattern, form) -> None:
    if (pattern, form) not in loaded:
        pytest.skip("torch.onnx.export(dynamo=True) needs onnxscript")
    source = loaded[pattern, form]
    assert not isinstance(source, ExportError), str(source)
    model, x = zoo_models.pattern_factory(pattern), _x()
    with torch.no_grad():
        torch.testing.assert_close(ir_module(source.ir)(x), model(x), atol=1e-5, rtol=0)
    kinds = [op.kind for op in source.ir.ops]
    if pattern == "round_trips":  # the rearrangements leave no op behind; the pool is one 1-D pool
        assert kinds == ["conv", "relu", "conv", "relu", "maxpool", "gap", "flatten", "linear"], kinds
    if pattern == "shape_if":  # the branch taken at this length: the shortcut padded by one sample
        assert "pad" in kinds and "add" in kinds, kinds


def test_einops_rearrange_round_trip_through_the_factory_front_end() -> None:
    pytest.importorskip("einops")
    torch.manual_seed(0)
    model = RoundTrips(use_einops=True).eval()
    ir = trace_model(model, SHAPE)  # torch.fx alone: KeyError: Proxy(getattr_1)
    with torch.no_grad():
        torch.testing.assert_close(ir_module(ir)(_x()), model(_x()), atol=1e-5, rtol=0)


def test_a_rearrangement_that_does_not_come_back_is_refused_naming_it() -> None:
    class TimeMajorHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = torch.nn.Conv1d(12, 8, 3), torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).transpose(1, 2)).mean(1)  # a dense layer per time step

    with pytest.raises(ExportError, match=r"rearranged from \(8, 62\) to \(62, 8\)"):
        trace_model(TimeMajorHead().eval(), SHAPE)


def test_data_dependent_control_flow_is_still_refused_as_such() -> None:
    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = torch.nn.Conv1d(12, 8, 3), torch.nn.Linear(8, 5)

        def forward(self, x):
            h = self.conv(x)
            if h.sum() > 0:
                h = torch.relu(h)
            return self.fc(h.mean(-1))

    with pytest.raises(ExportError, match="data-dependent Python control flow"):
        trace_model(Branchy().eval(), SHAPE)


def test_a_layer_with_parameters_built_in_forward_is_refused_naming_the_cause() -> None:
    with pytest.raises(ExportError, match=r"parameters created inside forward\(\)") as e:
        trace_model(ParametersInForward().eval(), SHAPE)
    assert "NameError" not in str(e.value) and "control flow" not in str(e.value)


def test_layers_in_forward_and_shape_if_export_with_every_method(tmp_path) -> None:
    """The patterns through the export itself: every graph passes its parity check."""
    for i, model in enumerate((ShapeIfBlock(), LayersInForward())):
        torch.manual_seed(i)
        source = from_module(model.eval(), SHAPE, classes=[{"key": c, "code": c, "name": c} for c in CLASSES])
        pkg = export_package(source, tmp_path / f"p{i}", sample_inputs=_x(6, seed=i).numpy())
        unavailable = json.loads((pkg / "manifest.json").read_text())["unavailable"]
        refused = {g: u["reason"] for g, u in unavailable.items() if u["methods"]}
        assert not refused, refused


def test_a_degenerate_default_gradcam_layer_gives_way(tmp_path) -> None:
    torch.manual_seed(0)
    model = RibeiroHead(samples=LENGTH).eval()
    source = from_module(model, SHAPE, classes=[{"key": c, "code": c, "name": c} for c in CLASSES])
    x = _x(6).numpy()
    earlier, default = source.ir.conv_outputs()
    assert np.abs(gradcam_maps(source.ir, default, x)).max() == 0  # Ribeiro's head: all-zero maps
    pkg = export_package(source, tmp_path / "pkg", sample_inputs=x, graphs=["gradcam"])
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["gradcam_layer"] == earlier
    choice = manifest["gradcam_layer_choice"]
    assert (
        choice["default"] == default and choice["chosen"] == earlier and "constant maps" in choice["reason"]
    )
    assert "gradcam" not in manifest["unavailable"]


def test_a_layer_the_user_names_is_kept(tmp_path) -> None:
    torch.manual_seed(0)
    source = from_module(
        RibeiroHead(samples=LENGTH).eval(), SHAPE, classes=[{"key": c, "code": c, "name": c} for c in CLASSES]
    )
    default = source.ir.conv_outputs()[-1]
    pkg = export_package(
        source, tmp_path / "pkg", sample_inputs=_x(4).numpy(), graphs=["gradcam"], gradcam_layer=default
    )
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["gradcam_layer"] == default and "gradcam_layer_choice" not in manifest
