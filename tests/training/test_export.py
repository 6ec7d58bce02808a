"""ONNX export: supported layers, refusal messages, shared weights, dynamic batch, self-check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from ecgx.training.export import ExportError, export_package, graphs, onnx_graphs
from ecgx.training.models import ModelConfig, build_model

X = np.random.default_rng(0).normal(0, 0.3, (3, 12, 600)).astype(np.float32)


class WithLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.conv = nn.Conv1d(12, 4, 3, padding=1)
        self.odd = layer
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(4, 9)

    def forward(self, x):
        return self.fc(self.gap(self.relu(self.odd(self.conv(x)))).flatten(1))


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (nn.Softsign(), r"layer odd \(Softsign\) is not supported; supported:"),
        (nn.Tanh(), None),  # the activations of issue #25: supported
        (nn.GELU(), None),
        (
            nn.BatchNorm1d(4, track_running_stats=False),
            r"layer odd \(BatchNorm1d\) has no running statistics",
        ),
        (nn.MaxPool1d(3, stride=2, padding=1), None),  # the ResNet stem's pooling: supported
        (nn.BatchNorm1d(4), None),  # folds into the conv before it: supported
    ],
)
def test_unsupported_layers_are_refused_by_name(layer, message, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = WithLayer(layer).eval()
    if message is None:
        assert (export_package(model, tmp_path / "pkg", sample_inputs=X) / "manifest.json").is_file()
        return
    with pytest.raises(ExportError, match=message):  # partial=False: refuse, no forward-only package
        export_package(model, tmp_path / "pkg", sample_inputs=X, partial=False)
    assert not (tmp_path / "pkg").exists()


def test_batchnorm_without_a_conv_before_it_exports_as_a_channel_affine(tmp_path: Path) -> None:
    class BnFirst(WithLayer):
        def forward(self, x):
            return self.fc(self.gap(self.relu(self.conv(self.odd(x)))).flatten(1))

    model = BnFirst(nn.BatchNorm1d(12)).eval()
    with torch.no_grad():  # statistics that are not the identity, so a wrong fold would show
        model.odd.running_mean.uniform_(-0.5, 0.5)
        model.odd.running_var.uniform_(0.5, 2.0)
    pkg = export_package(model, tmp_path / "pkg", sample_inputs=X)
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["unavailable"] == {}
    assert manifest["verification"]["checks"]["gradient.original"]["ok"]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[nn.Module, Path]:
    torch.manual_seed(1)
    model = build_model(ModelConfig(widths=(8, 16), residual=True)).eval()
    return model, export_package(model, tmp_path_factory.mktemp("e") / "pkg", sample_inputs=X)


def test_manifest_lists_files_layers_and_checks(package) -> None:
    _, pkg = package
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert set(manifest["files"]) == {"weights.bin", *(f"{g}.onnx" for g in graphs.GRAPH_SIGNATURES)}
    assert manifest["unavailable"] == {}
    assert [c["key"] for c in manifest["classes"]][:2] == ["SR", "STach"]
    assert manifest["input"]["shape"] == [None, 12, 600] and manifest["opset"] == onnx_graphs.OPSET
    assert any(layer["kind"] == "add" for layer in manifest["layers"])
    assert all(layer["folded_batchnorm"] for layer in manifest["layers"] if layer["kind"] == "conv")
    checks = manifest["verification"]["checks"]
    assert all(c["ok"] for c in checks.values() if not c.get("informative"))
    assert all(c["outlier_fraction"] <= 1e-3 for c in checks.values() if c.get("ok"))
    # The gradient is checked against the model as given too, and Captum beside the autograd rules.
    assert {"gradient.original", "guided_backprop.captum", "deconvolution.captum"} <= set(checks)
    assert manifest["input"]["sampling_rate_hz"] == 500 and manifest["input"]["r_peak_sample"] == 250


def test_the_manifest_describes_the_graphs_from_the_one_table(package) -> None:
    _, pkg = package
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["graphs"] == {
        name: {"file": f"{name}.onnx", "inputs": list(spec.inputs), "outputs": list(spec.outputs)}
        for name, spec in graphs.GRAPHS.items()
    }
    assert manifest["verification"]["reference"] == graphs.references(module_given=True)
    assert manifest["verification"]["reference"]["gradient"].endswith("and on the original PyTorch module")
    assert graphs.references(module_given=False)["gradient"] == "autograd on the IR module"
    # Every check the export recorded belongs to a graph of the table.
    assert all(name.split(".")[0] in graphs.GRAPHS for name in manifest["verification"]["checks"])


def test_the_export_runs_the_check_its_graph_spec_names(tmp_path: Path, monkeypatch) -> None:
    import dataclasses

    def refuses(refs, graph: str) -> dict:
        return {graph: {"ok": False, "error": "the spec's own check refused it"}}

    spec = dataclasses.replace(graphs.GRAPHS["deconvolution"], check=refuses)
    monkeypatch.setitem(graphs.GRAPHS, "deconvolution", spec)
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=(8,), stem_stride=4)).eval()
    pkg = export_package(model, tmp_path / "pkg", sample_inputs=X, graphs=["deconvolution"])
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert "deconvolution" not in manifest["graphs"] and not (pkg / "deconvolution.onnx").exists()
    assert "the spec's own check refused it" in manifest["unavailable"]["deconvolution"]["reason"]


def test_every_graph_reads_the_one_weights_file(package) -> None:
    _, pkg = package
    manifest = json.loads((pkg / "manifest.json").read_text())
    for graph in graphs.GRAPH_SIGNATURES:
        model = onnx.load(str(pkg / f"{graph}.onnx"), load_external_data=False)
        params = [i for i in model.graph.initializer if not i.name.startswith("const/")]
        assert params, graph
        for init in params:
            location = {e.key: e.value for e in init.external_data}
            assert init.data_location == onnx.TensorProto.EXTERNAL and location["location"] == "weights.bin"
            assert int(location["offset"]) == manifest["parameters"][init.name]["offset"]


def test_randomising_a_weight_changes_forward_and_backward_graphs_alike(package, tmp_path: Path) -> None:
    import shutil

    _, pkg = package
    copy = tmp_path / "pkg"
    shutil.copytree(pkg, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["parameters"]["classifier.weight"]
    with open(copy / "weights.bin", "r+b") as f:
        f.seek(entry["offset"])
        f.write(np.random.default_rng(0).normal(0, 1, entry["length"] // 4).astype("<f4").tobytes())

    def logits(folder: Path, graph: str) -> np.ndarray:
        sess = ort.InferenceSession(str(folder / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        feeds = {"x": X, "seed": np.eye(9, dtype=np.float32)[[0, 1, 2]]}
        return sess.run(
            ["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}
        )[0]

    before, after = logits(pkg, "forward"), logits(copy, "forward")
    assert not np.allclose(before, after)
    for graph in ("gradient", "guided_backprop", "gradcam"):
        np.testing.assert_allclose(logits(copy, graph), after, rtol=1e-5, atol=1e-6)


def test_batch_dimension_is_dynamic(package) -> None:
    _, pkg = package
    sess = ort.InferenceSession(str(pkg / "gradient.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 2, 5):
        x = np.repeat(X[:1], b, axis=0)
        _, grad = sess.run(None, {"x": x, "seed": np.eye(9, dtype=np.float32)[[4] * b]})
        assert grad.shape == (b, 12, 600)
        np.testing.assert_allclose(grad, np.repeat(grad[:1], b, axis=0), rtol=1e-5, atol=1e-7)


def test_a_graph_that_disagrees_with_its_reference_is_left_out(tmp_path: Path, monkeypatch) -> None:
    # Break guided backprop's rule: the export's self-check must catch it and leave the graph out,
    # while every other graph is published.
    from ecgx.core.errors import FailedPrecondition
    from ecgx.service.engine import AttributionEngine

    monkeypatch.setattr(onnx_graphs.GuidedRule, "relu", onnx_graphs.Rule.relu)
    model = build_model(ModelConfig(widths=(8, 16))).eval()
    pkg = export_package(model, tmp_path / "pkg", sample_inputs=X)
    manifest = json.loads((pkg / "manifest.json").read_text())
    entry = manifest["unavailable"]["guided_backprop"]
    assert entry["reason"].startswith("disagrees with its reference: guided_backprop: sample 0:")
    assert entry["methods"] == ["guided_backprop", "guided_gradcam"]
    assert not (pkg / "guided_backprop.onnx").exists() and "guided_backprop.onnx" not in manifest["files"]
    assert set(manifest["graphs"]) == set(graphs.GRAPH_SIGNATURES) - {"guided_backprop"}
    engine = AttributionEngine(pkg, providers=["CPUExecutionProvider"])
    with pytest.raises(FailedPrecondition, match=r"method 'guided_gradcam' is unavailable.*disagrees with"):
        engine.attribute("guided_gradcam", X, target=0)
    assert engine.attribute("deconvolution", X, target=0).shape == X.shape


def test_existing_package_is_not_replaced_unless_asked(package, tmp_path: Path) -> None:
    model, _ = package
    export_package(model, tmp_path / "pkg", sample_inputs=X)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_package(model, tmp_path / "pkg", sample_inputs=X)
    export_package(model, tmp_path / "pkg", sample_inputs=X, overwrite=True)


def test_only_excused_samples_may_disagree() -> None:
    from ecgx.training.export.parity import per_sample_parity

    ref = np.random.default_rng(0).normal(size=(4, 12, 600))
    got = ref.copy()
    got[1, 3, :100] += 1.0  # sample 1 takes another gradient path
    near = {"near_max_pool_tie": np.array([False, True, False, False])}
    assert per_sample_parity(got, ref, near)["ok"]
    assert per_sample_parity(got, ref, near)["excused"] == {"near_max_pool_tie": [1]}
    unexcused = per_sample_parity(got, ref)
    assert not unexcused["ok"] and [f["sample"] for f in unexcused["failing"]] == [1]
    got[:, 0, :50] += 1.0  # a construction error: every sample off
    assert not per_sample_parity(got, ref, {"near_max_pool_tie": np.ones(4, bool)})["ok"]


def test_near_tie_detection_finds_a_planted_max_pool_tie() -> None:
    from ecgx.training.export.reference import near_tie_samples

    model = nn.Sequential(nn.MaxPool1d(2)).eval()
    x = np.random.default_rng(1).uniform(0.5, 1.0, (3, 12, 600)).astype(np.float32)
    x[2, 5, 10] = x[2, 5, 11] = 0.99  # an exact tie between two positive values
    assert near_tie_samples(model, x).tolist() == [False, False, True]


class ReusedRelu(nn.Module):
    """One nn.ReLU module applied after two convolutions (Captum's hooks refuse such a model)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(12, 8, 5, padding=2)
        self.conv2 = nn.Conv1d(8, 8, 5, padding=2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(h.mean(dim=-1))


def test_a_reused_relu_is_one_op_per_call_and_every_method_exports(tmp_path: Path) -> None:
    from ecgx.training.data.synth import generate
    from ecgx.training.export.torch_frontend import trace_model

    torch.manual_seed(0)
    model = ReusedRelu().eval()
    ops = trace_model(model).ops
    assert [op.name for op in ops if op.kind == "relu"] == ["relu", "relu@2"]
    pkg = export_package(model, tmp_path / "pkg", sample_inputs=generate(4, np.random.default_rng(0)).signals)
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert not manifest.get("unavailable"), manifest.get("unavailable")
