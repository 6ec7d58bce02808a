"""Per-method availability of an exported package, reproducible package bytes, models of any input
shape, and the stochastic methods' chunked draws.

A graph the export cannot build or check for a model is left out and listed in the manifest's
``unavailable`` with the methods that need it; the engine refuses those methods naming the reason,
and the gate does not check them and never lets them serve. The forward pass and the gradient are
needed by everything: their failure refuses the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ecgx.core.errors import FailedPrecondition
from ecgx.core.package_reader import MANIFEST_FILE, WEIGHTS_FILE, PackageError, load_package
from ecgx.service.engine import AttributionEngine
from ecgx.training.data.synth import generate
from ecgx.training.export import ExportError, export_package
from ecgx.training.export.graphs import GRAPH_SIGNATURES, build_graph
from ecgx.training.export.package_writer import default_sample_inputs
from ecgx.training.export.source import from_module
from ecgx.training.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[2]
X = generate(4, np.random.default_rng(7)).signals
CPU = ["CPUExecutionProvider"]


class NoConvBlock(nn.Module):
    """A convolution read through global pooling, ReLU only in the dense head: no (C, L) feature
    map after a ReLU, so GradCAM has no layer to read and its graph cannot be built."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 6, 7, padding=3)
        self.pool = nn.AvgPool1d(3, stride=2, padding=1)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 9)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.gap(self.pool(self.conv(x))).flatten(1))))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(widths=(8, 16), stem_stride=4, residual=True)).eval()


def manifest_of(pkg: Path) -> dict:
    return json.loads((pkg / MANIFEST_FILE).read_text())


@pytest.fixture(scope="module")
def no_gradcam(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export_package(NoConvBlock().eval(), tmp_path_factory.mktemp("nogc") / "pkg")


# ------------------------------------------------------------------------------------- unavailable graphs


def test_a_graph_that_cannot_be_built_leaves_only_its_methods_unavailable(no_gradcam: Path) -> None:
    manifest = manifest_of(no_gradcam)
    entry = manifest["unavailable"]["gradcam"]
    assert entry["reason"].startswith("cannot be built: the model has no convolution")
    assert entry["methods"] == ["gradcam", "guided_gradcam"]
    assert list(manifest["unavailable"]) == ["gradcam"] and manifest["gradcam_layer"] is None
    assert set(manifest["graphs"]) == set(GRAPH_SIGNATURES) - {"gradcam"}
    assert not (no_gradcam / "gradcam.onnx").exists() and "gradcam.onnx" not in manifest["files"]
    checks = manifest["verification"]["checks"]
    assert all(c["ok"] for c in checks.values() if not c.get("informative"))


def test_the_engine_refuses_an_unavailable_method_naming_the_reason(no_gradcam: Path) -> None:
    engine = AttributionEngine(no_gradcam, providers=CPU)
    for method in ("gradcam", "guided_gradcam"):
        with pytest.raises(FailedPrecondition) as e:
            engine.attribute(method, X, target=0)
        message = str(e.value)
        assert f"method {method!r} is unavailable for the model package" in message
        assert "graph 'gradcam' is unavailable for this model: cannot be built: the model has no" in message
    # The session itself names the reason too (a caller that runs graphs directly).
    with pytest.raises(PackageError, match=r"graph 'gradcam' is unavailable for this model: cannot be built"):
        engine.session("gradcam")
    for method in ("saliency", "guided_backprop", "deconvolution", "deeplift", "lrp", "occlusion"):
        assert engine.attribute(method, X, target=0).shape == X.shape, method


def test_the_gate_does_not_check_an_unavailable_method_and_never_serves_it(
    no_gradcam: Path, tmp_path: Path
) -> None:
    from ecgx.training.data.synth import synthesize_dataset
    from ecgx.validation.gate import run_gate, summary_lines

    data = synthesize_dataset(tmp_path / "val", 24, seed=11, show_progress=False)
    policy = tmp_path / "policy.toml"
    policy.write_text(
        "[gate]\necgs = 16\nallow_incomplete_data = true\nrequired_methods = ['gradcam']\n"
        "[checks.randomisation]\necgs = 4\nblocking = false\ndraws = 1\n"
        "[checks.perturbation]\nbootstrap = 100\n"
    )
    run = run_gate(
        no_gradcam,
        data,
        policy=policy,
        methods=["saliency", "gradcam", "guided_gradcam"],
        workers=1,
        show_progress=False,
        research=True,
    )
    report = run.report
    assert set(report["unavailable"]) == {"gradcam", "guided_gradcam"}
    assert "cannot be built: the model has no convolution" in report["unavailable"]["gradcam"]
    for method in ("gradcam", "guided_gradcam"):
        assert method not in report["methods"] and method not in report["serve"] and method not in run.maps
        assert method not in report["not_checked"]
    assert "saliency" in report["methods"]
    assert report["verdict"] == "fail"  # the policy requires gradcam, which this package cannot run
    assert any(r.startswith("required method 'gradcam' is unavailable") for r in report["reasons"])
    assert "2 are unavailable in this package (gradcam, guided_gradcam)" in report["headline"]
    assert any(
        line.startswith("Unavailable, not checked and never served:") for line in summary_lines(report)
    )


def test_the_service_never_serves_an_unavailable_method_not_even_ungated(no_gradcam: Path) -> None:
    """Research mode serves every method ungated, except one the package cannot run; the refusal
    names the export's reason (both protocols use ``refusal_of_method``)."""
    from ecgx.service.repository import ServedVersion, refusal_of_method

    pkg = load_package(no_gradcam)
    engine = AttributionEngine(pkg, providers=CPU)
    report = {"verdict": "fail", "serve": [], "methods": {}}
    served = ServedVersion(
        "ecg", "1", no_gradcam, engine, None, None, report, None, None, None, allow_ungated=True, package=pkg
    )
    assert served.servable and served.method_gate("saliency").servable
    gate = served.method_gate("guided_gradcam")
    assert not gate.servable
    refusal = refusal_of_method(served, gate)
    assert "the gate did not check it: method 'guided_gradcam' is unavailable" in refusal
    assert "cannot be built: the model has no convolution" in refusal


def test_a_graph_that_fails_its_check_is_left_out_and_the_rest_exports(tmp_path: Path) -> None:
    """The documented ``graph_builder`` hook gives the deconvolution file the plain gradient's graph:
    a genuinely wrong graph for that method, which its check must catch."""

    def builder(ir, name, layer):
        return build_graph(ir, "gradient" if name == "deconvolution" else name, layer)

    pkg = export_package(small_cnn(), tmp_path / "pkg", sample_inputs=X, graph_builder=builder)
    manifest = manifest_of(pkg)
    entry = manifest["unavailable"]["deconvolution"]
    assert entry["reason"].startswith("disagrees with its reference: deconvolution: sample 0:")
    assert entry["methods"] == ["deconvolution"] and list(manifest["unavailable"]) == ["deconvolution"]
    engine = AttributionEngine(pkg, providers=CPU)
    with pytest.raises(
        FailedPrecondition, match=r"'deconvolution' is unavailable.*disagrees with its reference"
    ):
        engine.attribute("deconvolution", X, target=1)
    assert engine.attribute("guided_gradcam", X, target=1).shape == X.shape


class PreActivationBlock(nn.Module):
    """A pre-activation residual block: the block input feeds a ReLU and the addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv1d(12, 8, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv1d(8, 8, 5, padding=2)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(8, 9)

    def forward(self, x):
        h = self.conv0(x)
        return self.fc(self.gap(self.relu2(h + self.conv1(self.relu1(h)))).flatten(1))


def test_differing_from_captum_alone_is_recorded_not_fatal(tmp_path: Path) -> None:
    """Captum's guided backprop and deconvnet hook the ReLU's input tensor, which here also feeds
    the addition: they differ from the plain-autograd rule, and the graphs are still published."""
    torch.manual_seed(0)
    pkg = export_package(PreActivationBlock().eval(), tmp_path / "pkg", sample_inputs=X)
    manifest = manifest_of(pkg)
    checks = manifest["verification"]["checks"]
    for graph in ("guided_backprop", "deconvolution"):
        assert graph in manifest["graphs"] and graph not in manifest["unavailable"]
        assert checks[graph]["ok"] and checks[graph]["agreeing"] == len(X)
        captum = checks[f"{graph}.captum"]
        assert captum["informative"] and captum["agrees"] is False and captum["failing"]
    engine = AttributionEngine(pkg, providers=CPU)
    assert engine.attribute("guided_backprop", X, target=2).shape == X.shape


@pytest.mark.parametrize(
    ("swap", "message"),
    [
        ({"gradient": "guided_backprop"}, r"the gradient graph disagrees with its reference.*not written"),
        ({"forward": "forward-of-another-model"}, r"the forward graph disagrees with its reference"),
        ({"gradient": "cannot-build"}, r"the gradient graph cannot be built.*every package needs it"),
    ],
    ids=["wrong gradient", "wrong forward", "gradient not buildable"],
)
def test_a_forward_or_gradient_failure_refuses_the_whole_package(swap, message, tmp_path: Path) -> None:
    model = small_cnn()
    other = from_module(
        small_cnn().apply(lambda m: m.weight.data.mul_(1.5) if isinstance(m, nn.Linear) else None)
    )

    def builder(ir, name, layer):
        use = swap.get(name, name)
        if use == "cannot-build":
            raise ExportError("layer x (Made up) has no backward graph here")
        if use == "forward-of-another-model":
            return build_graph(other.ir, "forward", layer)
        return build_graph(ir, use, layer)

    with pytest.raises(ExportError, match=message):
        export_package(model, tmp_path / "pkg", sample_inputs=X, graph_builder=builder)
    assert list(tmp_path.iterdir()) == []


def test_a_subset_of_graphs_exports_the_rest_as_unavailable(tmp_path: Path) -> None:
    pkg = export_package(small_cnn(), tmp_path / "pkg", sample_inputs=X, graphs=["lrp"])
    manifest = manifest_of(pkg)
    assert set(manifest["graphs"]) == {"forward", "gradient", "lrp"}
    assert set(manifest["unavailable"]) == {
        "guided_backprop",
        "deconvolution",
        "deeplift",
        "gradcam",
        "lrp_epsilon_plus",
        "lrp_epsilon_alpha2_beta1",
        "incremental_activations",
        "incremental_forward",
    }
    assert all("left out of this export" in e["reason"] for e in manifest["unavailable"].values())
    with pytest.raises(ExportError, match=r"unknown graph\(s\) \['lrp2'\]"):
        export_package(small_cnn(), tmp_path / "other", graphs=["lrp2"])


# ------------------------------------------------------------------------------------- manifest round trip


def test_the_manifest_round_trips_through_the_reader(no_gradcam: Path) -> None:
    manifest = manifest_of(no_gradcam)
    pkg = load_package(no_gradcam)
    assert pkg.manifest == manifest
    assert pkg.unavailable == manifest["unavailable"]
    assert pkg.graph_unavailable_reason("gradcam").startswith("is unavailable for this model: cannot be")
    assert pkg.graph_unavailable_reason("nope").startswith("is not in the package")
    assert manifest["verification"]["near_ties"]["samples"] == 8  # the default sample inputs
    assert set(manifest["verification"]["excused_samples"]) <= {
        "near_max_pool_tie",
        "near_relu_tie",
        "ill_conditioned",
        "float32_spread",
        "float32_arithmetic",
    }
    assert any("Captum" in note for note in manifest["verification"]["notes"])


# ------------------------------------------------------------------------------------- any input shape


def test_a_model_of_another_shape_rate_and_classes_exports_and_serves(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv1d(3, 8, 9, stride=2, padding=4),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.MaxPool1d(3, stride=2, padding=1),
        nn.Conv1d(8, 8, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    ).eval()
    classes = [{"key": "N", "code": "0", "name": "normal"}, {"key": "A", "code": "1", "name": "abnormal"}]
    src = from_module(model, (3, 1000), sampling_rate_hz=250, classes=classes)
    pkg = export_package(src, tmp_path / "pkg")
    manifest = manifest_of(pkg)
    assert manifest["input"]["shape"] == [None, 3, 1000] and manifest["input"]["sampling_rate_hz"] == 250
    assert manifest["input"]["r_peak_sample"] is None  # not the project's R-aligned beat
    assert manifest["classes"] == classes and manifest["leads"] == ["lead1", "lead2", "lead3"]
    assert manifest["unavailable"] == {}
    assert "rhythm strips" in manifest["verification"]["sample_inputs"]
    x = default_sample_inputs((3, 1000), 250)[:2]
    engine = AttributionEngine(pkg, providers=CPU)
    grad = engine.attribute("saliency", x, target="A", abs=False)
    xt = torch.tensor(x, requires_grad=True)
    model(xt)[:, 1].sum().backward()
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-4, atol=1e-5 * np.abs(grad).max())
    with pytest.raises(ExportError, match="the model has 2 outputs but no class list was given"):
        export_package(from_module(model, (3, 1000)), tmp_path / "no-classes")


def test_default_sample_inputs_are_deterministic_beats_resampled_and_joined() -> None:
    beats = default_sample_inputs((12, 600), 500)
    np.testing.assert_array_equal(beats, generate(8, np.random.default_rng(20261124)).signals)
    strips = default_sample_inputs((14, 900), 250)
    assert strips.shape == (8, 14, 900) and strips.dtype == np.float32
    np.testing.assert_array_equal(strips, default_sample_inputs((14, 900), 250))
    # A 600-sample beat at 500 Hz is 300 samples at 250 Hz; lead 12 repeats lead 0.
    np.testing.assert_allclose(strips[0, :, :300:2], strips[0, :, :300][:, ::2])
    np.testing.assert_allclose(strips[0, 0, :300:2], beats[0, 0, ::4], atol=1e-6)
    np.testing.assert_array_equal(strips[:, 12], strips[:, 0])
    np.testing.assert_allclose(strips[0, 0, 300:600:2], beats[1, 0, ::4], atol=1e-6)


# ------------------------------------------------------------------------------------- reproducible bytes

_EXPORT_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from ecgx.training.export import export_package
    from ecgx.training.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=(8, 16), stem_stride=4, residual=True))
    export_package(model, sys.argv[1])
    """
)


def test_the_same_model_exports_to_the_same_bytes_whatever_the_hash_seed(tmp_path: Path) -> None:
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"pkg-{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "SOURCE_DATE_EPOCH": "1764000000"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "stubs")])
        done = subprocess.run(
            [sys.executable, "-c", _EXPORT_SCRIPT, str(out)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(out)
    a, b = outs
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != MANIFEST_FILE:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = manifest_of(a), manifest_of(b)
    assert ma["created"] == mb["created"] == "2025-11-24T16:00:00Z"  # SOURCE_DATE_EPOCH
    for m in (ma, mb):
        m.pop("export_seconds")
    assert ma == mb
    assert WEIGHTS_FILE in names and "forward.onnx" in names
    # No constant is named by Python's salted hash(): every name is the same in both exports.
    model = onnx.load(str(a / "lrp.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.initializer] == [
        i.name for i in onnx.load(str(b / "lrp.onnx"), load_external_data=False).graph.initializer
    ]


# ------------------------------------------------------------------------------------- chunked draws


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return export_package(small_cnn(), tmp_path_factory.mktemp("tiny") / "pkg", sample_inputs=X)


def gradient_shap_unchunked(engine, x, target, n, stdev, seed):
    """GradientSHAP computed from whole arrays (what the method must never build), drawing the
    documented streams: the default baselines first, then baseline index, alpha and noise, each
    from its own stream spawned from the seed, in row order (row r: sample r // B of ECG r % B)."""
    b, k = len(x), 8
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.05, (k, *x.shape[1:])).astype(np.float32)
    idx_rng, alpha_rng, noise_rng = rng.spawn(3)
    rows = n * b
    idx = np.minimum((idx_rng.random(rows) * k).astype(np.int64), k - 1)
    alpha = alpha_rng.random(rows).astype(np.float32)
    noise = noise_rng.normal(0, stdev, (rows, *x.shape[1:])).astype(np.float32)
    ecg = np.arange(rows) % b
    diff = x[ecg] + noise - base[idx]
    points = base[idx] + alpha[:, None, None] * diff
    grads = engine.backward("gradient", points, np.asarray(target)[ecg])
    return (diff * grads).reshape(n, b, *x.shape[1:]).sum(axis=0) / n


def smoothgrad_unchunked(engine, x, target, n, stdev, seed):
    rng = np.random.default_rng(seed)
    b = len(x)
    noise = rng.normal(0, stdev, (n * b, *x.shape[1:]))
    ecg = np.arange(n * b) % b
    grads = engine.backward("gradient", (x[ecg] + noise).astype(np.float32), np.asarray(target)[ecg])
    return np.abs(grads).reshape(n, b, *x.shape[1:]).sum(axis=0) / n


@pytest.mark.parametrize(
    ("method", "params", "reference"),
    [
        ("gradient_shap", {"n_samples": 23, "stdev": 0.05}, gradient_shap_unchunked),
        ("smoothgrad", {"n_samples": 23, "stdev": 0.1}, smoothgrad_unchunked),
    ],
)
def test_chunked_draws_equal_the_whole_array_computation(tiny: Path, method, params, reference) -> None:
    target = np.array([0, 3, 5])
    x = X[:3]
    chunked = AttributionEngine(tiny, providers=CPU, max_batch=4)  # 69 rows in 18 chunks
    got = chunked.attribute(method, x, target, seed=9, **params)
    want = reference(chunked, x, target, params["n_samples"], params["stdev"], 9)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("method", ["gradient_shap", "smoothgrad", "deeplift_shap", "integrated_gradients"])
def test_a_large_request_never_holds_its_draws_whole(tiny: Path, method: str) -> None:
    engine = AttributionEngine(tiny, providers=CPU, max_batch=8)
    engine.warm_up()
    n = 600
    params = {
        "gradient_shap": {"n_samples": n, "stdev": 0.1, "seed": 1},
        "smoothgrad": {"n_samples": n, "seed": 1},
        "deeplift_shap": {"baselines": np.zeros((n, 12, 600), np.float32)},
        "integrated_gradients": {"n_steps": n},
    }[method]
    whole_mb = n * 2 * 12 * 600 * 4 / 1e6  # the (n, B, 12, 600) float32 array, B = 2 (34.6 MB)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        engine.attribute(method, X[:2], 0, **params)
        peak = (tracemalloc.get_traced_memory()[1] - before) / 1e6
    finally:
        tracemalloc.stop()
    # DeepLIFT-SHAP's baselines are given, not drawn: checking them for NaN takes one byte per value.
    allowed = whole_mb / 8 + (n * 12 * 600 / 1e6 if method == "deeplift_shap" else 0.0)
    assert peak < allowed, f"{method}: peak {peak:.1f} MB; the whole draw would be {whole_mb:.1f} MB"
