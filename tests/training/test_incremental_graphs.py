"""The incremental forward graphs (issue #21): logits equal to the forward graph's on window-perturbed
inputs, at every window start; the perturbation methods use them when the package has them and
fall back to the forward graph when it does not, or when the window is wider than they serve."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from parity_helpers import assert_parity, randomise_batchnorm

from ecgx.service.engine import AttributionEngine
from ecgx.service.methods.perturbation import INCREMENTAL_GRAPHS, MAX_WINDOW_KEY, incremental_window
from ecgx.training import reference_models
from ecgx.training.data.synth import generate
from ecgx.training.export import export_package
from ecgx.training.export.graphs import GRAPHS, build_graph
from ecgx.training.export.incremental_graphs import MAX_WINDOW, local_chain, plan
from ecgx.training.export.ir import ExportError
from ecgx.training.export.torch_frontend import trace_model
from ecgx.training.models import ModelConfig, build_model

MODELS = {
    "plain": lambda: build_model(ModelConfig(widths=(8, 16), stem_stride=4)),
    # odd kernel, dilation, average pooling, a stem of stride 2, three stages (odd lengths)
    "dilated_avgpool": lambda: build_model(
        ModelConfig(widths=(8, 8, 16), kernel_size=5, dilation=2, stem_stride=2, pool="avg")
    ),
    "residual": lambda: build_model(ModelConfig(widths=(8, 16), stem_stride=4, residual=True)),
    "xresnet1d": lambda: reference_models.xresnet1d(width=8, layers=(1, 1)),
    # the other activations are pointwise in time too: the span pass runs through them (issue #25)
    "gelu_elu_silu": lambda: torch.nn.Sequential(
        torch.nn.Conv1d(12, 8, 7, stride=2, padding=3),
        torch.nn.GELU(),
        torch.nn.MaxPool1d(3, stride=2),
        torch.nn.Conv1d(8, 8, 5, padding=2),
        torch.nn.ELU(),
        torch.nn.Conv1d(8, 16, 3, padding=1),
        torch.nn.SiLU(),
        torch.nn.AdaptiveAvgPool1d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 9),
    ),
}
X = generate(3, np.random.default_rng(0)).signals.astype(np.float32)
TARGET = np.array([0, 4, 8])


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    randomise_batchnorm(model)
    return model


def _session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_equal_the_forward_graph_at_every_start(name):
    ir = trace_model(_model(name))
    try:
        sessions = {g: _session(build_graph(ir, g, "")) for g in ("forward", *INCREMENTAL_GRAPHS)}
    except ExportError as e:
        pytest.skip(f"no incremental graphs for {name}: {e}")
    incremental = sessions["incremental_forward"]
    width = int(incremental.get_modelmeta().custom_metadata_map[MAX_WINDOW_KEY])
    assert width == MAX_WINDOW
    acts = sessions["incremental_activations"].run(None, {"x": X})[0]
    rng = np.random.default_rng(1)
    ecg, lead = np.repeat(np.arange(len(X)), 2), rng.integers(0, 12, 2 * len(X))
    samples = X.shape[2]
    worst = 0.0
    for start in range(samples):
        rows = X[ecg].copy()
        # Any change inside [start, start + width): here random values over a random sub-window.
        end = min(start + width, samples)
        a = min(start + int(rng.integers(0, width // 2)), end - 1)
        rows[np.arange(len(rows)), lead, a:end] = rng.normal(0, 0.5, end - a)
        feeds = {"x": rows, "activations": acts, "ecg": ecg, "start": np.array([start], np.int64)}
        got = incremental.run(None, feeds)[0]
        want = sessions["forward"].run(None, {"x": rows})[0]
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert worst <= 1e-5, f"largest relative error {worst:.2e}"


def test_the_plain_network_is_computed_on_spans():
    """The span pass covers every convolution and pooling of the plain network, each on a small
    part of its length (that is where the time goes)."""
    ir = trace_model(_model("plain"))
    layers = plan(ir)
    assert [ly.op.kind for ly in layers] == [op.kind for op in ir.ops[: len(layers)]]
    assert {"conv", "maxpool"} <= {ly.op.kind for ly in layers}
    assert all(ly.n < ly.op.out_shape[1] for ly in layers if ly.op.kind == "conv")


def test_the_span_pass_runs_through_the_other_activations():
    layers = plan(trace_model(_model("gelu_elu_silu")))
    assert [ly.op.kind for ly in layers][:7] == ["conv", "gelu", "maxpool", "conv", "elu", "conv", "silu"]


def test_a_model_without_leading_local_layers_gets_no_incremental_graph():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12 * 600, 9)).eval()
    ir = trace_model(model)
    assert local_chain(ir) == []
    with pytest.raises(ExportError, match="no leading convolution"):
        build_graph(ir, "incremental_forward", "")


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """The same model exported with the incremental graphs and without them (an older package)."""
    model = _model("plain")
    with torch.no_grad():
        model.features[0][0].weight.mul_(10.0)  # a sensitive stem, as in test_parity_perturbation
    root = tmp_path_factory.mktemp("incremental")
    full = export_package(model, root / "full", sample_inputs=X)
    older = [g for g in GRAPHS if g not in INCREMENTAL_GRAPHS]
    plain = export_package(model, root / "older", sample_inputs=X, graphs=older)
    cpu = ["CPUExecutionProvider"]
    return [AttributionEngine(p, providers=cpu, max_batch=7, threads=1) for p in (full, plain)]


def _graphs_run(engine, monkeypatch) -> list[str]:
    seen: list[str] = []
    run = engine.run

    def spy(graph, feeds, outputs):
        seen.append(graph)
        return run(graph, feeds, outputs)

    monkeypatch.setattr(engine, "run", spy)
    return seen


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("occlusion", {}),
        ("occlusion", {"window": 64, "stride": 13, "baseline": 0.3}),
        ("feature_ablation", {}),
        ("feature_ablation", {"window": 70}),  # wider than the graph serves: the plain path
    ],
)
def test_methods_use_the_graphs_when_present_and_fall_back_without(packages, monkeypatch, method, params):
    full, older = packages
    assert incremental_window(full) == MAX_WINDOW and incremental_window(older) == 0
    assert older.package.manifest["graphs"].keys().isdisjoint(INCREMENTAL_GRAPHS)
    seen_full, seen_older = _graphs_run(full, monkeypatch), _graphs_run(older, monkeypatch)
    got = full.attribute(method, X, TARGET, **params)
    ref = older.attribute(method, X, TARGET, **params)
    assert_parity(got, ref)
    assert ("incremental_forward" in seen_full) == (params.get("window", 50) <= MAX_WINDOW)
    assert set(seen_older) == {"forward"}
