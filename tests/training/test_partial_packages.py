"""Partial packages (issue #25): a model the export's IR cannot read (LSTM, bidirectional GRU, a
layer no front end maps) exports its forward pass only, with the forward-only methods.

Three small nets defined here (an LSTM head on the last time step, a bidirectional GRU with mean
pooling, a convolutional net that indexes the last time step), through the factory form, ONNX from
the TorchScript exporter and a ``.pt2`` program with a dynamic batch (ONNX from the dynamo exporter
is marked slow). Checked: the manifest's ``partial`` and ``unavailable``; the four perturbation
methods against Captum on the PyTorch model (occlusion and feature ablation directly, Kernel SHAP
and LIME on the same coalitions with a float64 surrogate fit, as test_parity_perturbation does) to
1e-5 of the largest magnitude; every other method refused with the reason; ``ecgx validate``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import FeatureAblation, Occlusion
from test_parity_perturbation import _captum_surrogate, _kernel_shap, _lime, _per_ecg_draws
from torch import nn

from ecgx.core.errors import FailedPrecondition
from ecgx.core.package_reader import load_package
from ecgx.service.engine import AttributionEngine
from ecgx.service.methods import METHOD_NAMES
from ecgx.service.methods.perturbation import kernel_shap_coalitions, segment_mask
from ecgx.training.data.synth import generate
from ecgx.training.export import export_package
from ecgx.training.export.input_forms import load_source
from ecgx.training.export.ir import ExportError

FORWARD_ONLY = ["occlusion", "feature_ablation", "kernel_shap", "lime", "random"]
X = generate(3, np.random.default_rng(0)).signals.astype(np.float32)
TARGET = np.array([0, 4, 8])
TOL = 1e-5  # of the reference's largest magnitude


class LstmNet(nn.Module):
    """The PTB-XL benchmark's LSTM head, small: a strided convolution, an LSTM, the last time step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 8, 15, stride=8, padding=7)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(torch.relu(self.conv(x)).transpose(1, 2))
        return self.head(out[:, -1])


class BiGruNet(nn.Module):
    """The benchmark's bidirectional GRU, small, its outputs averaged over time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 8, 15, stride=8, padding=7)
        self.gru = nn.GRU(8, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(torch.relu(self.conv(x)).transpose(1, 2))
        return self.head(out.mean(dim=1))


class LastStepConv(nn.Module):
    """A convolutional net with one op no front end maps: indexing the last time step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 8, 15, stride=4, padding=7)
        self.conv2 = nn.Conv1d(8, 8, 9, stride=4, padding=4)
        self.head = nn.Linear(8, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.head(h[:, :, -1])


NETS = {"lstm": LstmNet, "bigru": BiGruNet, "last_step": LastStepConv}
BLOCKED = {"lstm": "LSTM", "bigru": "GRU", "last_step": ""}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = NETS[name]().eval()
    with torch.no_grad():  # a sensitive stem: logits that move when one segment changes
        model.conv.weight.mul_(10.0)
    return model


def _source(name: str, form: str, folder: Path):
    model = _model(name)
    example = (torch.from_numpy(X[:2]),)
    if form == "factory":
        torch.save(model.state_dict(), folder / "w.pt")  # the classes are factories: no arguments
        return model, load_source(f"{__name__}:{NETS[name].__name__}", weights=folder / "w.pt")
    if form in ("program", "program_fixed"):  # program_fixed: specialised to the example's batch of 2
        dynamic = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if form == "program" else {}
        program = torch.export.export(model, example, **dynamic)
        torch.export.save(program, folder / "m.pt2")
        return model, load_source(folder / "m.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if form == "onnx_fixed":  # no dynamic axis: the recurrent layer's initial state fixes batch 2
            torch.onnx.export(model, example, folder / "m.onnx", dynamo=False, opset_version=17)
        elif form == "onnx":
            torch.onnx.export(
                model,
                example,
                folder / "m.onnx",
                dynamo=False,
                opset_version=17,
                input_names=["ecg"],
                output_names=["scores"],
                dynamic_axes={"ecg": {0: "b"}, "scores": {0: "b"}},
            )
        else:
            pytest.importorskip("onnxscript")
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, example, folder / "m.onnx", dynamo=True, dynamic_shapes=({0: batch},))
    return model, load_source(folder / "m.onnx")


def _engine(package: Path) -> AttributionEngine:
    return AttributionEngine(package, providers=["CPUExecutionProvider"], max_batch=16, threads=1)


def _assert_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max()) / scale
    assert scale > 0 and err <= TOL, f"{what}: max error {err:.2e} of the largest magnitude {scale:.3g}"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [
    ("lstm", "factory"),
    ("lstm", "onnx"),
    ("lstm", "program"),
    ("lstm", "program_fixed"),
    ("bigru", "onnx_fixed"),
    ("bigru", "factory"),
    ("bigru", "onnx"),
    ("last_step", "factory"),
    ("last_step", "onnx"),
    pytest.param(("bigru", "program"), marks=pytest.mark.slow, id="bigru-program"),
    pytest.param(("lstm", "onnx_dynamo"), marks=pytest.mark.slow, id="lstm-onnx_dynamo"),
    pytest.param(("bigru", "onnx_dynamo"), marks=pytest.mark.slow, id="bigru-onnx_dynamo"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    return {}


def _exported(exported: dict, tmp_path_factory, name: str, form: str) -> tuple[nn.Module, Path]:
    """(torch model, package) of one case, exported once per module."""
    if (name, form) not in exported:
        folder = tmp_path_factory.mktemp(f"{name}-{form}")
        model, source = _source(name, form, folder)
        assert source.ir is None and source.partial is not None
        exported[name, form] = (model, export_package(source, folder / "pkg", sample_inputs=X))
    return exported[name, form]


@pytest.fixture(params=CASES, ids=lambda c: "-".join(c) if isinstance(c, tuple) else None)
def partial(request, exported, tmp_path_factory):
    """(name, form, torch model, package) for one case."""
    name, form = request.param
    return name, form, *_exported(exported, tmp_path_factory, name, form)


def test_the_manifest_says_partial_and_why(partial) -> None:
    name, _form, _, package = partial
    manifest = json.loads((package / "manifest.json").read_text())
    entry = manifest["partial"]
    assert entry["methods"] == FORWARD_ONLY
    assert set(manifest["graphs"]) == {"forward"} and manifest["verification"]["checks"]["forward"]["ok"]
    if BLOCKED[name]:  # the real cause first, by layer name
        kind = BLOCKED[name]
        assert entry["reason"].startswith("layer ") and f"({kind}) is a recurrent layer" in entry["reason"]
        assert f"{kind} is not supported by the gradient graphs" in entry["reason"]
        assert entry["blocked_by"].endswith(f"({kind})")
    else:
        assert entry["reason"].startswith("the export's IR cannot read the model: layer ")
    unavailable = manifest["unavailable"]
    assert "forward" not in unavailable and "gradient" in unavailable and "gradcam" in unavailable
    assert all(entry["reason"] in u["reason"] for u in unavailable.values())
    assert "automatic differentiation" in unavailable["gradient"]["reason"]
    # Weight-bearing nodes' weights are package parameters the gate can randomise, layer by layer.
    owners = [layer for layer in manifest["layers"] if layer["parameters"]]
    assert len(owners) >= 3 and manifest["parameters"]
    if BLOCKED[name]:
        assert any(layer["kind"] == f"onnx:{BLOCKED[name]}" for layer in owners)
    assert load_package(package).partial == entry["reason"]


def test_occlusion_and_feature_ablation_equal_captum_on_the_torch_model(partial) -> None:
    _, _, model, package = partial
    engine = _engine(package)
    base = np.random.default_rng(2).normal(0, 0.05, X.shape).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Occlusion(model).attribute(
            torch.tensor(X),
            sliding_window_shapes=(1, 50),
            strides=(1, 25),
            baselines=torch.tensor(base),
            target=torch.tensor(TARGET),
            perturbations_per_eval=32,
        )
    got = engine.attribute("occlusion", X, TARGET, window=50, stride=25, baseline=base)
    _assert_close(got, ref.numpy(), "occlusion")
    ref = FeatureAblation(model).attribute(
        torch.tensor(X),
        target=torch.tensor(TARGET),
        feature_mask=torch.tensor(segment_mask(50))[None],
        baselines=0.0,
        perturbations_per_eval=32,
    )
    _assert_close(engine.attribute("feature_ablation", X, TARGET, window=50), ref.numpy(), "feature_ablation")


@pytest.mark.parametrize("name", list(NETS))
def test_kernel_shap_and_lime_equal_captum_on_the_same_coalitions(name, exported, tmp_path_factory) -> None:
    """On the factory form: the surrogate fit is the same for every form, whose forward pass the
    occlusion test checks."""
    model, package = _exported(exported, tmp_path_factory, name, "factory")
    engine = _engine(package)
    z = _per_ecg_draws(lambda rng: kernel_shap_coalitions(rng, 60, 144), 5, len(X))
    ref = _captum_surrogate(_kernel_shap(model), X, TARGET, z, 50)
    _assert_close(engine.attribute("kernel_shap", X, TARGET, n_samples=60, seed=5), ref, "kernel_shap")
    z = _per_ecg_draws(lambda rng: rng.random((80, 144)) < 0.5, 6, len(X))
    ref = _captum_surrogate(_lime(model), X, TARGET, z, 50)
    _assert_close(engine.attribute("lime", X, TARGET, n_samples=80, seed=6), ref, "lime")


def test_every_other_method_is_refused_with_the_reason(partial) -> None:
    _name, _, _, package = partial
    engine = _engine(package)
    reason = load_package(package).partial
    for method in METHOD_NAMES:
        if method in FORWARD_ONLY:
            continue
        with pytest.raises(FailedPrecondition) as e:
            engine.attribute(method, X[:1], TARGET[:1])
        assert "unavailable" in str(e.value) and reason in str(e.value), (method, str(e.value)[:300])


def test_the_input_contract_holds_for_a_partial_package(partial) -> None:
    _, _, _, package = partial
    engine = _engine(package)
    from ecgx.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"shape \(batch, 12, 600\)"):
        engine.logits(engine.check_inputs(np.zeros((1, 12, 500), np.float32)))
    assert load_package(package).input_shape == (12, 600) and load_package(package).n_classes == 9


# --------------------------------------------------------------------------- refusing instead


def test_partial_false_refuses_with_the_irs_reason(tmp_path) -> None:
    torch.save(_model("lstm").state_dict(), tmp_path / "w.pt")
    with pytest.raises(ExportError, match=r"layer lstm \(lstm\) is not supported"):
        load_source(f"{__name__}:LstmNet", weights=tmp_path / "w.pt", partial=False)
    with pytest.raises(ExportError, match=r"LSTM is not supported by the gradient graphs"):
        export_package(_model("lstm"), tmp_path / "pkg", sample_inputs=X, partial=False)
    assert not (tmp_path / "pkg").exists()


def test_a_model_whose_batch_changes_its_answers_is_still_refused(tmp_path) -> None:
    """BatchNorm without running statistics normalises over the batch: no forward graph can serve it."""
    model = nn.Sequential(
        nn.Conv1d(12, 4, 5), nn.BatchNorm1d(4, track_running_stats=False), nn.Flatten(), nn.Linear(4 * 596, 9)
    ).eval()
    with pytest.raises(ExportError, match=r"no running statistics.*depend on who else was asked"):
        export_package(model, tmp_path / "pkg", sample_inputs=X)
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize(("name", "form"), [("lstm", "program_fixed"), ("bigru", "onnx_fixed")])
def test_a_model_exported_for_a_fixed_batch_runs_in_chunks_of_it(
    name, form, exported, tmp_path_factory
) -> None:
    """torch.export and torch.onnx without a dynamic batch fix it at the example's (2), and the
    recurrent layer's initial state bakes it in: the forward graph runs in chunks of 2 ECGs (an ONNX
    Loop; a batch of 3 is padded to 4 and trimmed), says so, and equals the model row by row (the
    other tests of the case check occlusion and feature ablation against Captum)."""
    model, package = _exported(exported, tmp_path_factory, name, form)
    made_by = json.loads((package / "manifest.json").read_text())["partial"]["forward_graph"]
    assert made_by.endswith("exported for a fixed batch of 2: run in chunks of 2 ECGs (an ONNX Loop)"), (
        made_by
    )
    engine = _engine(package)
    with torch.no_grad():
        want = model(torch.from_numpy(X)).numpy()
    for rows in (X[:1], X[:2], X):
        _assert_close(engine.logits(engine.check_inputs(rows)), want[: len(rows)], f"{len(rows)} ECGs")


# --------------------------------------------------------------------------- the gate


GATE_POLICY = """
[gate]
ecgs = 24
required_methods = ["occlusion"]
[checks.randomisation]
ecgs = 8
[checks.perturbation]
margin = -1.0
[checks.changed_model]
ecgs = 8
"""


def test_ecgx_validate_gates_the_forward_only_methods_and_reports_the_rest(
    exported, tmp_path_factory, small_synth, tmp_path
) -> None:
    """One gate run (the LSTM, factory form): the gate reads the package, not how it was made."""
    from ecgx.cli import main

    pkg = shutil.copytree(_exported(exported, tmp_path_factory, "lstm", "factory")[1], tmp_path / "pkg")
    assert main(["gate", "keygen", "--out", str(tmp_path / "keys")]) == 0
    (tmp_path / "policy.toml").write_text(GATE_POLICY)
    args = ["validate", str(pkg), "--data", str(small_synth), "--policy", str(tmp_path / "policy.toml")]
    args += ["--signing-key", str(tmp_path / "keys" / "gate_signing_key.pem")]
    code = main([*args, "--methods", "occlusion", "--workers", "1", "--research", "-q"])
    report = json.loads((pkg / "gate.json").read_text())
    assert code in (0, 1), code
    assert "occlusion" in report["passed"] + report["failed"]
    assert "saliency" in report["unavailable"] and "recurrent layer" in report["unavailable"]["saliency"]
    assert "occlusion" in report["methods"] and "saliency" not in report["methods"]


# --------------------------------------------------------------------------- the zoo's recurrent nets


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lstm", "gru_bidir"])
def test_the_benchmarks_recurrent_nets_export_partially_with_occlusion_equal_to_captum(
    name, tmp_path
) -> None:
    """The PTB-XL benchmark's LSTM and bidirectional GRU (tests/zoo_models.py, CI width): 2-layer
    recurrent layers, concat pooling built in forward() and a BatchNorm head."""
    from zoo_models import ZOO, zoo_model

    from ecgx.training.export.source import from_module

    entry, classes = ZOO[name], [{"key": f"c{i}", "code": f"c{i}", "name": f"c{i}"} for i in range(5)]
    model = zoo_model(name)
    source = from_module(model, (12, entry.samples), sampling_rate_hz=entry.rate_hz, classes=classes)
    x = generate(3, np.random.default_rng(0)).signals[:, :, : entry.samples].astype(np.float32)
    package = export_package(source, tmp_path / "pkg", sample_inputs=x)
    manifest = json.loads((package / "manifest.json").read_text())
    assert (
        manifest["partial"]["methods"] == FORWARD_ONLY
        and "is a recurrent layer" in manifest["partial"]["reason"]
    )
    target = np.array([0, 2, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Occlusion(model).attribute(
            torch.tensor(x), sliding_window_shapes=(1, 25), strides=(1, 25), target=torch.tensor(target)
        )
    got = _engine(package).attribute("occlusion", x, target, window=25, stride=25)
    _assert_close(got, ref.numpy(), f"{name} occlusion")


def test_an_onnx_file_listing_its_initialisers_as_inputs_exports(tmp_path) -> None:
    """Older exporters list every weight among the graph's inputs too: the forward graph takes x only."""
    model = _model("last_step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(X[:2]),),
            tmp_path / "m.onnx",
            dynamo=False,
            opset_version=17,
            keep_initializers_as_inputs=True,
            dynamic_axes={"input.1": {0: "b"}},
            input_names=["input.1"],
        )
    package = export_package(load_source(tmp_path / "m.onnx"), tmp_path / "pkg", sample_inputs=X)
    with torch.no_grad():
        _assert_close(_engine(package).logits(X), model(torch.from_numpy(X)).numpy(), "logits")


def test_ecgx_export_says_partial_and_no_partial_refuses(tmp_path, capsys) -> None:
    """The command line: a partial package is announced before its unavailable graphs; --no-partial
    refuses the model with the IR's reason and writes nothing."""
    from ecgx.cli import main

    _source("lstm", "onnx", tmp_path)  # writes m.onnx
    args = ["export", "--model", str(tmp_path / "m.onnx"), "--sampling-rate", "500"]
    args += ["--classes", ",".join(f"c{i}" for i in range(_model("lstm").head.out_features))]
    assert main([*args, "--out", str(tmp_path / "pkg")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PARTIAL PACKAGE (forward pass only; methods: occlusion"), out
    assert "UNAVAILABLE gradient" in out
    assert main([*args, "--out", str(tmp_path / "refused"), "--no-partial"]) != 0
    assert "LSTM is not supported by the gradient graphs" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
