"""Gating products (issue #25): squeeze-and-excitation blocks and attention-style gates, the IR's
``mul`` op (``ecgx.training.export.ops.op_mul``).

- every input form (the ``module:factory`` form, a torch.export ``.pt2`` program, ONNX from the
  TorchScript and the dynamo exporter) reads an SE net ("sen"-like: conv-BN-ReLU blocks, each with
  an SE block) as the model, with the SE branch's (B, C) -> (B, C, 1) view read as the gate's
  broadcast and the sigmoid's output as the gate;
- the exported package serves every method, and each graph agrees with its reference: Captum for
  the gradient, guided backprop and deconvolution (Captum's overrides act at ReLUs; the product takes
  its plain gradient); for DeepLIFT and LRP, whose product rules Captum and Zennit do not have, the
  plain-autograd references of ``autograd_reference`` (LRP: the gate detached; DeepLIFT: each
  factor's multiplier the other's midpoint), with DeepLIFT's summation-to-delta and LRP's relevance
  conservation checked on their own;
- which factor is the gate follows the documented convention, and a product with no clear gate is
  refused saying why.
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import zoo_models
from parity_helpers import assert_parity
from torch import nn

from ecgx.training.export import export_package
from ecgx.training.export.autograd_reference import autograd_attribution
from ecgx.training.export.input_forms import load_source
from ecgx.training.export.ir import ExportError
from ecgx.training.export.ir_torch import ir_module
from ecgx.training.export.onnx_graphs import lrp_graph
from ecgx.training.export.reference import as_float64
from ecgx.training.export.source import from_module
from ecgx.training.export.torch_frontend import trace_model

LENGTH = 64
SHAPE = (12, LENGTH)
CLASSES = [f"c{i}" for i in range(5)]
FORMS = ("factory", "program", "onnx_torchscript", "onnx_dynamo")


class SqueezeExcite(nn.Module):
    """Hu et al.'s SE block as torch_ecg writes it: time average, fc-ReLU-fc-sigmoid, ``x * gate``.
    ``view_first``: the gate as ``view(B, C, 1).expand_as(x)``, the first factor (the other spelling)."""

    def __init__(self, channels: int, reduction: int = 4, view_first: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = (
            nn.Linear(channels, channels // reduction),
            nn.Linear(channels // reduction, channels),
        )
        self.relu, self.sigmoid, self.view_first = nn.ReLU(), nn.Sigmoid(), view_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sigmoid(self.fc2(self.relu(self.fc1(x.mean(dim=-1)))))
        if self.view_first:
            return y.view(y.size(0), -1, 1).expand_as(x) * x
        return x * y.unsqueeze(-1)


class SENet(nn.Module):
    """A small "sen": two conv-BN-ReLU blocks, each followed by an SE block, then GAP and a classifier."""

    def __init__(self, leads: int = 12, classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv1d(leads, width, 7, padding=3), nn.BatchNorm1d(width), nn.ReLU())
        self.se1 = SqueezeExcite(width)
        self.b2 = nn.Sequential(nn.Conv1d(width, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU())
        self.se2 = SqueezeExcite(width, view_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.se2(self.b2(self.se1(self.b1(x))))
        return self.head(h.mean(dim=-1))


def se_net() -> nn.Module:
    """The factory the ``module:factory`` form names (``test_gating:se_net``)."""
    torch.manual_seed(0)
    return zoo_models.calibrated(SENet(), *SHAPE)


class AttentionGate(nn.Module):
    """An attention-style gate of the signal's own shape: ``h * sigmoid(conv1x1(h))``."""

    def __init__(self, both_sigmoid: bool = False, no_sigmoid: bool = False) -> None:
        super().__init__()
        self.conv, self.att = nn.Conv1d(12, 8, 5, padding=2), nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8, 5)
        self.both_sigmoid, self.no_sigmoid = both_sigmoid, no_sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        a = self.att(h)
        if self.no_sigmoid:
            g = h * a
        elif self.both_sigmoid:
            g = torch.sigmoid(h) * torch.sigmoid(a)
        else:
            g = torch.sigmoid(a) * h
        return self.head(g.mean(dim=-1))


def _x(n: int = 6, seed: int = 0) -> np.ndarray:
    return zoo_models.synthetic_ecgs(n, *SHAPE, seed=seed)


def _write(model: nn.Module, form: str, folder) -> object:
    example = (torch.zeros(1, *SHAPE),)
    if form == "factory":
        torch.save(model.state_dict(), folder / "w.pt")
        return "test_gating:se_net"
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


def _load(form: str, folder):
    if form == "onnx_dynamo" and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("torch.onnx.export(dynamo=True) needs onnxscript")
    spec = _write(se_net(), form, folder)
    kwargs = {"weights": folder / "w.pt", "input_length": LENGTH} if form == "factory" else {}
    return load_source(spec, classes=CLASSES, sampling_rate_hz=100, **kwargs)


# --------------------------------------------------------------------------- the input forms


@pytest.mark.parametrize("form", FORMS)
def test_every_form_reads_the_se_blocks_as_gated_products(form, tmp_path) -> None:
    source = _load(form, tmp_path)
    products = [op for op in source.ir.ops if op.kind == "mul"]
    assert len(products) == 2, [op.kind for op in source.ir.ops]
    for op in products:
        gate_producer = source.ir.op_producing(op.inputs[op.params["gate"]])
        assert gate_producer is not None and gate_producer.kind == "sigmoid", gate_producer
        assert op.in_shapes[op.params["gate"]] in ((8,), (8, 1)) and op.out_shape == (8, LENGTH)
    x = torch.from_numpy(_x())
    with torch.no_grad():
        torch.testing.assert_close(ir_module(source.ir)(x), se_net()(x), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS[1:])
def test_every_form_exports_the_se_net_with_every_method(form, tmp_path) -> None:
    source = _load(form, tmp_path)
    pkg = export_package(source, tmp_path / "pkg", sample_inputs=_x())
    unavailable = json.loads((pkg / "manifest.json").read_text())["unavailable"]
    assert not {g: u["reason"] for g, u in unavailable.items() if u["methods"]}


# --------------------------------------------------------------------------- the package's graphs


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The SE net exported through its factory form (every graph passed the export's own checks)."""
    folder = tmp_path_factory.mktemp("se")
    source = _load("factory", folder)
    pkg = export_package(source, folder / "pkg", sample_inputs=_x())
    return pkg, source.ir


def _run(pkg, graph: str, **feeds) -> list[np.ndarray]:
    return ort.InferenceSession(str(pkg / f"{graph}.onnx")).run(None, feeds)


def _seed(target: np.ndarray) -> np.ndarray:
    return np.eye(len(CLASSES), dtype=np.float32)[target]


TARGET = np.array([0, 1, 2, 3, 4, 0])


def test_every_method_is_available(package) -> None:
    pkg, _ = package
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert not {g: u["reason"] for g, u in manifest["unavailable"].items() if u["methods"]}


@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "deconvolution"])
def test_gradient_family_agrees_with_captum(package, method) -> None:
    """Captum's overrides act at the ReLU modules (the SE branch's included); the product passes its
    plain gradient to both factors, as autograd does."""
    from captum.attr import Deconvolution, GuidedBackprop, Saliency

    pkg, _ = package
    x = _x()
    got = _run(pkg, method, x=x, seed=_seed(TARGET))[1]
    model = se_net()
    explainer = {
        "gradient": lambda m: Saliency(m),
        "guided_backprop": GuidedBackprop,
        "deconvolution": Deconvolution,
    }
    kwargs = {"abs": False} if method == "gradient" else {}
    want = explainer[method](model).attribute(torch.from_numpy(x), target=torch.from_numpy(TARGET), **kwargs)
    assert_parity(got, want.detach().numpy())


def test_deeplift_agrees_with_its_midpoint_reference_and_sums_to_delta(package) -> None:
    pkg, ir = package
    x, baseline = _x(), np.zeros_like(_x())
    reference = autograd_attribution(as_float64(ir_module(ir)), "deeplift", x, TARGET, baseline=baseline)
    model = se_net()
    with torch.no_grad():
        rows = np.arange(len(x))
        delta = (model(torch.from_numpy(x)) - model(torch.from_numpy(baseline))).numpy()[rows, TARGET]
    for rescale in (False, True):
        feeds = {"x": x, "baseline": baseline, "seed": _seed(TARGET), "maxpool_rescale": np.array(rescale)}
        got = _run(pkg, "deeplift", **feeds)[1]
        assert_parity(got, reference)
        total = got.astype(np.float64).sum(axis=(1, 2))
        np.testing.assert_allclose(total, delta, atol=1e-4 * np.abs(delta).max())
    # Captum's DeepLift (autograd through the product, each half with its own gate) does not sum to
    # delta on this net: why it is not the reference for products.
    from captum.attr import DeepLift

    _, captum_delta = DeepLift(se_net()).attribute(
        torch.from_numpy(x),
        torch.from_numpy(baseline),
        target=torch.from_numpy(TARGET),
        return_convergence_delta=True,
    )
    assert captum_delta.abs().max().item() > 100 * 1e-4 * np.abs(delta).max()


def test_lrp_agrees_with_its_detached_gate_reference(package) -> None:
    pkg, ir = package
    x = _x()
    for eps in (1e-9, 0.1):
        got = _run(pkg, "lrp", x=x, seed=_seed(TARGET), epsilon=np.array(eps, np.float32))[1]
        assert_parity(got, autograd_attribution(as_float64(ir_module(ir)), "lrp", x, TARGET, epsilon=eps))


def test_lrp_conserves_relevance_through_the_gate() -> None:
    """Without biases, LRP-epsilon (eps -> 0) conserves relevance: the input's relevance sums to the
    target logit only if the product passes all of it to the signal and none to the gate (the
    product rule would add the gate branch's share on top)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(12, 8, 5, padding=2, bias=False), nn.ReLU(), _BiasFreeSE(8), _MeanHead(8))
    ir = trace_model(model.eval(), SHAPE)
    x = _x()
    graph = lrp_graph(ir, ["batch", *SHAPE], len(CLASSES))
    session = ort.InferenceSession(graph.SerializeToString())
    logits, relevance = session.run(
        None, {"x": x, "seed": _seed(TARGET), "epsilon": np.array(1e-9, np.float32)}
    )
    want = logits[np.arange(len(x)), TARGET]
    np.testing.assert_allclose(relevance.astype(np.float64).sum(axis=(1, 2)), want, rtol=1e-4)


class _BiasFreeSE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=-1))).unsqueeze(-1)


class _MeanHead(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, len(CLASSES), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=-1))


def test_gradcam_reads_the_last_block_and_its_plain_gradient(package) -> None:
    """GradCAM's layer is the last conv block's ReLU (the SE product is not a candidate) and its
    gradient there is autograd's, through both the signal and the gate branch."""
    pkg, _ = package
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["gradcam_layer"] == "b2_2"
    x = _x()
    _, acts, grads = _run(pkg, "gradcam", x=x, seed=_seed(TARGET))
    model, seen = se_net(), {}
    model.b2[2].register_forward_hook(lambda m, i, o: seen.update(out=o))
    logits = model(torch.from_numpy(x))
    (want,) = torch.autograd.grad(logits[np.arange(len(x)), TARGET].sum(), seen["out"])
    assert_parity(acts, seen["out"].detach().numpy())
    assert_parity(grads, want.numpy())


# --------------------------------------------------------------------------- which factor is the gate


def test_an_attention_gate_of_the_signals_shape_is_the_sigmoids_output() -> None:
    torch.manual_seed(0)
    model = AttentionGate().eval()
    ir = trace_model(model, SHAPE)
    (op,) = [o for o in ir.ops if o.kind == "mul"]
    assert op.params["gate"] == 0 and ir.op_producing(op.inputs[0]).kind == "sigmoid"
    x = torch.from_numpy(_x())
    with torch.no_grad():
        torch.testing.assert_close(ir_module(ir)(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("variant", "why"), [("no_sigmoid", "neither"), ("both_sigmoid", "both")])
def test_a_product_with_no_clear_gate_is_refused_saying_why(variant, why) -> None:
    model = AttentionGate(**{variant: True}).eval()
    with pytest.raises(ExportError, match=rf"{why} is a sigmoid's output.*neither is clearly the gate"):
        trace_model(model, SHAPE)


def test_the_benchmarks_parameter_matmul_se_block_reads_as_channel_mixing_convolutions() -> None:
    """The PTB-XL benchmark's SqueezeExcite1d multiplies parameter matrices onto the pooled signal
    (``torch.matmul(self.w1, z)``): torch.fx cannot read that, torch.export can, as 1x1 convolutions."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(12, 8, 5, padding=2), nn.ReLU(), zoo_models.SqueezeExcite1d(8, 4), _MeanHead(8)
    ).eval()
    ir = trace_model(model, SHAPE)
    kinds = [op.kind for op in ir.ops]
    assert kinds == [
        "conv",
        "relu",
        "gap",
        "conv",
        "relu",
        "conv",
        "sigmoid",
        "mul",
        "gap",
        "flatten",
        "linear",
    ]
    (product,) = [op for op in ir.ops if op.kind == "mul"]
    assert product.in_shapes[product.params["gate"]] == (8, 1)
    x = torch.from_numpy(_x())
    with torch.no_grad():
        torch.testing.assert_close(ir_module(ir)(x), model(x), atol=1e-5, rtol=0)


def test_the_benchmarks_se_blocks_export_with_every_method_and_gradcam_on_the_last_conv_block(
    tmp_path,
) -> None:
    """Its gates come from a convolution (the 1x1 channel mix) and a sigmoid of (C, 1): GradCAM's
    default candidate there has no time axis, gives constant maps, and gives way to the last conv
    block's ReLU (the manifest says so)."""
    torch.manual_seed(0)
    model = zoo_models.calibrated(
        nn.Sequential(
            nn.Conv1d(12, 8, 5, padding=2),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            zoo_models.SqueezeExcite1d(8, 4),
            nn.Conv1d(8, 8, 3, padding=1),
            nn.ReLU(),
            zoo_models.SqueezeExcite1d(8, 4),
            _MeanHead(8),
        ),
        *SHAPE,
    )
    source = from_module(model, SHAPE, classes=[{"key": c, "code": c, "name": c} for c in CLASSES])
    pkg = export_package(source, tmp_path / "pkg", sample_inputs=_x())
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert not {g: u["reason"] for g, u in manifest["unavailable"].items() if u["methods"]}
    conv_block = source.ir.op_producing(manifest["gradcam_layer"])
    assert conv_block.kind == "relu" and conv_block.out_shape == (8, LENGTH)
