"""Activations other than ReLU as IR op kinds, with each method's rule (issue #25; ops/activation.py).

A small BatchNorm-calibrated conv net per activation (two conv-BN-activation blocks, global average
pooling, a linear head) is exported and served; every method the package offers is compared with
its reference, by method:

- saliency, integrated gradients: Captum on the model as given (the exact derivative);
- guided backprop, deconvolution: Captum on the IR-rebuilt module. Captum overrides ``nn.ReLU``
  modules only, so through these activations both pass the plain gradient;
- DeepLIFT (monotone activations): Captum's DeepLift, whose ``nonlinear`` rule is the rescale rule
  for ELU, LeakyReLU, Sigmoid and Tanh, run on the float64 copy of the rebuilt module. In float32,
  Captum's delta-out / delta-in loses digits where input and baseline nearly coincide at a unit,
  which the package's well-conditioned secants do not (``Activation.emit_secant``); GELU, SiLU and
  Mish have no rescale rule (Captum applies none) and the manifest says why;
- LRP-epsilon: Captum's LRP on the float64 rebuilt module, every activation passing relevance
  (Captum passes ReLU and Tanh itself; ``reference.ActivationPassRule`` the rest);
- LRP composites: Zennit (``Pass`` for its ``Activation`` types), and the PyTorch rule reference
  ``lrp_reference`` for Mish, which Zennit's list lacks (Zennit alone would take its gradient);
- GradCAM: Captum's LayerGradCam at the activation the package chose.

The ONNX (both exporters' spellings) and ``.pt2`` forms are checked to give the same IR as the
module form, so the same graphs; one ONNX form per activation is exported in full (the heavier cases
are marked slow).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LRP as CaptumLRP
from captum.attr import (
    Deconvolution,
    DeepLift,
    GuidedBackprop,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Saliency,
)
from parity_helpers import assert_parity
from torch import nn
from zoo_models import calibrated, synthetic_ecgs

from ecgx.service.engine import AttributionEngine
from ecgx.training.export import export_package
from ecgx.training.export.input_forms import load_source
from ecgx.training.export.ir import ExportError, Op
from ecgx.training.export.ir_torch import ir_module
from ecgx.training.export.onnx_graphs import GraphBuilder, RescaleGradientMaxRule, Rule, forward_op, lrp_graph
from ecgx.training.export.onnx_import import import_onnx
from ecgx.training.export.ops import OP_SPECS
from ecgx.training.export.parity import describe_parity_failure, per_sample_parity
from ecgx.training.export.program_import import import_program
from ecgx.training.export.reference import as_float64, lrp_model, relu_near_ties
from ecgx.training.export.source import from_module
from ecgx.training.export.torch_frontend import trace_model

LEADS, LENGTH = 12, 128
SHAPE = (LEADS, LENGTH)
CLASSES = [{"key": c, "code": c, "name": c} for c in "ABCDE"]
ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": lambda: nn.ELU(0.7),
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "mish": nn.Mish,
}
KIND = {"gelu_tanh": "gelu"}
MONOTONE = {"sigmoid", "tanh", "leaky_relu", "elu"}
# The default run covers a saturating, a kinked, a non-monotone and a Zennit-unlisted activation.
FAST = {"sigmoid", "leaky_relu", "gelu", "mish"}


def _cases(names=ACTIVATIONS):
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


class ActNet(nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = (
            nn.Conv1d(LEADS, 8, 7, padding=3, bias=False),
            nn.BatchNorm1d(8),
            make(),
        )
        self.conv2, self.bn2, self.act2 = nn.Conv1d(8, 8, 5, padding=2, bias=False), nn.BatchNorm1d(8), make()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc(x.mean(-1))


def act_net(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return calibrated(ActNet(ACTIVATIONS[name]), LEADS, LENGTH, seed)


def _captum(fn, *args, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs).detach().numpy()


def _parity(got, ref, excused) -> None:
    check = per_sample_parity(got, ref, {"near_relu_tie": excused})
    assert check["ok"], describe_parity_failure("parity", check)


@pytest.fixture(scope="module", params=_cases())
def exported(request, tmp_path_factory):
    name = request.param
    model = act_net(name)
    x = synthetic_ecgs(6, LEADS, LENGTH, seed=11)
    source = from_module(model, SHAPE, classes=CLASSES)
    pkg = export_package(source, tmp_path_factory.mktemp(name) / "pkg", sample_inputs=x)
    engine = AttributionEngine(pkg, providers=["CPUExecutionProvider"], max_batch=8)
    manifest = json.loads((pkg / "manifest.json").read_text())
    module = ir_module(source.ir)
    ties = relu_near_ties(module, x)[0]  # LeakyReLU and ELU(0.7) have a kink at 0
    return name, model, module, engine, manifest, x, np.array([0, 1, 2, 3, 4, 0]), ties


def test_only_the_undefined_rules_are_unavailable(exported):
    name, _, _, _, manifest, *_ = exported
    unavailable = {g: u["reason"] for g, u in manifest["unavailable"].items() if u["methods"]}
    if name not in MONOTONE:
        assert set(unavailable) == {"deeplift"}, unavailable
        assert "not monotone" in unavailable["deeplift"] and "rescale rule" in unavailable["deeplift"]
    else:
        assert set(unavailable) <= {"lrp"}, unavailable
    if "lrp" in unavailable:  # a sigmoid's LRP-epsilon at the tiny default epsilon: see the test below
        assert name == "sigmoid" and "default_epsilon" in unavailable["lrp"]
    assert manifest["gradcam_layer"] == "act2"


def test_gradient_methods_match_captum(exported):
    _, model, module, engine, _, x, target, ties = exported
    xt, tt = torch.tensor(x), torch.tensor(target)
    _parity(
        engine.attribute("saliency", x, target),
        _captum(Saliency(model).attribute, xt, target=tt),
        ties,
    )
    base = np.random.default_rng(3).normal(0, 0.05, x.shape).astype(np.float32)
    ref = _captum(
        IntegratedGradients(model).attribute, xt, baselines=torch.tensor(base), target=tt, n_steps=8
    )
    assert_parity(engine.attribute("integrated_gradients", x, target, baseline=base, n_steps=8), ref)
    for method, captum_cls in (("guided_backprop", GuidedBackprop), ("deconvolution", Deconvolution)):
        got = engine.attribute(method, x, target)
        _parity(got, _captum(captum_cls(module).attribute, xt, target=tt), ties)
        # Captum overrides ReLU modules only: through these activations, the plain gradient
        _parity(got, _captum(Saliency(model).attribute, xt, target=tt, abs=False), ties)


def test_gradcam_matches_captum_at_the_activation(exported):
    _, _, module, engine, manifest, x, target, ties = exported
    layer = module.op_modules[manifest["gradcam_layer"]]
    cam = _captum(
        LayerGradCam(module, layer).attribute,
        torch.tensor(x),
        target=torch.tensor(target),
        relu_attributions=True,
    )
    ref = LayerAttribution.interpolate(torch.tensor(cam), (LENGTH,), "linear").numpy()
    _parity(
        engine.attribute("gradcam", x, target, interpolation="linear"), np.repeat(ref, LEADS, axis=1), ties
    )


def test_deeplift_matches_captums_rescale_rule(exported):
    name, _, module, engine, _, x, target, ties = exported
    if name not in MONOTONE:
        with pytest.raises(Exception, match="deeplift"):
            engine.attribute("deeplift", x, target)
        return
    base = np.random.default_rng(4).normal(0, 0.05, x.shape).astype(np.float32)
    got = engine.attribute("deeplift", x, target, baseline=base)
    m64 = as_float64(module)
    ref = _captum(
        DeepLift(m64).attribute,
        torch.tensor(x).double(),
        baselines=torch.tensor(base).double(),
        target=torch.tensor(target),
    )
    _parity(got, ref, ties | relu_near_ties(module, base)[0])
    # summation to delta
    rows = np.arange(len(x))
    delta = engine.logits(x)[rows, target] - engine.logits(base)[rows, target]
    np.testing.assert_allclose(
        got.astype(np.float64).sum(axis=(1, 2)), delta, atol=1e-4 * np.abs(delta).max()
    )


def test_lrp_epsilon_passes_activations_as_captum_passes_relus(exported):
    """At a well-conditioned epsilon; where the package left ``lrp`` out (a sigmoid net, whose map at
    the tiny default epsilon float32 cannot pin down), the graph the export built is run directly."""
    _, _, module, engine, manifest, x, target, ties = exported
    if "lrp" in manifest["unavailable"]:
        graph = lrp_graph(module.ir, ["batch", *SHAPE], 5)
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        seed = np.eye(5, dtype=np.float32)[target]
        got = session.run(None, {"x": x, "seed": seed, "epsilon": np.array(1e-2, np.float32)})[1]
    else:
        got = engine.attribute("lrp", x, target, epsilon=1e-2)
    m64 = as_float64(module)
    ref = _captum(
        CaptumLRP(lrp_model(m64, 1e-2)).attribute, torch.tensor(x).double(), target=torch.tensor(target)
    )
    _parity(got, ref, ties)


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1"])
def test_lrp_composites_match_zennit(exported, composite):
    from zennit_helpers import zennit_lrp

    from ecgx.training.export.lrp_reference import composite_parity

    name, _, module, engine, _, x, target, ties = exported
    got = engine.attribute("lrp", x, target, composite=composite, epsilon=1e-2)
    check = composite_parity(got, module, composite, x, target, epsilon=1e-2, excused={"near_relu_tie": ties})
    assert check["ok"], describe_parity_failure("package", check)  # the PyTorch rule reference (Pass)
    if name != "mish":  # Zennit's Activation list has no Mish
        zennit = zennit_lrp(module, composite, x, target, epsilon=1e-2)
        check = composite_parity(zennit, module, composite, x, target, epsilon=1e-2)
        assert check["ok"], describe_parity_failure("Zennit", check)


def test_sigmoid_lrp_at_a_tiny_epsilon_is_not_pinned_down_by_float32():
    """Behind a sigmoid, relevance ~ sigmoid(z) ~ 0.5 reaches units whose z is near 0, and LRP-epsilon
    divides it by z + eps: with eps = 1e-9 float32's rounding of z moves the map (no ReLU zeroes those
    units). The float64 maps at 1e-9 are finite, but PyTorch's float32 run already departs from them."""
    from ecgx.training.export.autograd_reference import autograd_attribution

    module = ir_module(trace_model(act_net("sigmoid"), SHAPE))
    x = synthetic_ecgs(6, LEADS, LENGTH, seed=11)
    exact = autograd_attribution(as_float64(module), "lrp", x, 0, epsilon=1e-9)
    single = autograd_attribution(module, "lrp", x, 0, epsilon=1e-9)
    assert not per_sample_parity(single, exact, {})["ok"]
    well = autograd_attribution(module, "lrp", x, 0, epsilon=1e-2)
    assert_parity(well, autograd_attribution(as_float64(module), "lrp", x, 0, epsilon=1e-2))


# --------------------------------------------------------------------------- the front ends


def _kinds(ir) -> list[tuple[str, dict]]:
    keep = ("slope", "alpha", "approximate")
    return [(op.kind, {k: v for k, v in op.params.items() if k in keep}) for op in ir.ops]


def _onnx(model: nn.Module, path, dynamo: bool, opset: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, *SHAPE),),
            path,
            dynamo=dynamo,
            opset_version=opset,
            input_names=["x"],
            **({} if dynamo else {"dynamic_axes": {"x": {0: "batch"}}}),
        )
    return path


# (exporter, opset): the TorchScript exporter spells GELU with Erf (its tanh form with a cubic inside
# a Tanh; the dynamo exporter with Pow) before opset 20 and Mish with
# Softplus and Tanh before 18; both spell SiLU as Sigmoid and Mul; the dynamo exporter orders GELU's
# factors differently and writes Mish as one node from opset 18. The dynamo exporter takes seconds
# per model: the default run keeps the forms whose spelling differs from the TorchScript ones.
FORMS = [("torchscript", 17), ("torchscript", 20), ("dynamo", 18), ("dynamo", 20)]
SPELLING_CASES = [
    (exporter, opset, name)
    if exporter == "torchscript" or (opset, name) in ((18, "gelu"), (18, "gelu_tanh"), (18, "mish"))
    else pytest.param(exporter, opset, name, marks=pytest.mark.slow)
    for exporter, opset in FORMS
    for name in ACTIVATIONS
]


@pytest.mark.parametrize("exporter,opset,name", SPELLING_CASES)
def test_onnx_spellings_import_to_the_module_forms_ir(tmp_path, name, exporter, opset):
    model = act_net(name)
    expected = _kinds(trace_model(model, SHAPE))
    assert [k for k, _ in expected].count(KIND.get(name, name)) == 2
    ir = import_onnx(_onnx(model, tmp_path / "m.onnx", exporter == "dynamo", opset))
    got = _kinds(ir)
    assert [k for k, _ in got] == [k for k, _ in expected]
    for (_, p), (_, q) in zip(got, expected, strict=True):
        assert p.keys() == q.keys() and all(
            np.isclose(p[k], q[k]) if k != "approximate" else p[k] == q[k] for k in p
        )
    x = synthetic_ecgs(3, LEADS, LENGTH, seed=2)
    with torch.no_grad():
        np.testing.assert_allclose(
            ir_module(ir)(torch.tensor(x)).numpy(), model(torch.tensor(x)).numpy(), atol=1e-5
        )


def test_gelu_tanh_form_as_pt2(tmp_path):
    model = act_net("gelu_tanh")
    expected = _kinds(trace_model(model, SHAPE))
    assert ("gelu", {"approximate": "tanh"}) in expected
    program = torch.export.export(model, (torch.zeros(2, *SHAPE),))
    torch.export.save(program, tmp_path / "m.pt2")
    assert _kinds(import_program(tmp_path / "m.pt2")[0]) == expected


@pytest.mark.parametrize("name", [n for n in ACTIVATIONS if n != "gelu_tanh"])
def test_pt2_programs_import_to_the_module_forms_ir(tmp_path, name):
    model = act_net(name)
    program = torch.export.export(model, (torch.zeros(2, *SHAPE),))
    torch.export.save(program, tmp_path / "m.pt2")
    assert _kinds(import_program(tmp_path / "m.pt2")[0]) == _kinds(trace_model(model, SHAPE))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(LEADS, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = F.leaky_relu(self.conv(x), 0.2)
        x = F.elu(x, alpha=0.5)
        x = F.gelu(x, approximate="tanh")
        x = torch.sigmoid(F.mish(F.silu(x)))
        return self.fc(x.tanh().mean(-1))


def test_functional_forms_trace_with_their_parameters():
    assert _kinds(trace_model(Functional().eval(), SHAPE))[1:-3] == [
        ("leaky_relu", {"slope": 0.2}),
        ("elu", {"alpha": 0.5}),
        ("gelu", {"approximate": "tanh"}),
        ("silu", {}),
        ("mish", {}),
        ("sigmoid", {}),
        ("tanh", {}),
    ]


@pytest.mark.parametrize("name", _cases(["sigmoid", "silu", "gelu", "mish", "elu", "tanh", "leaky_relu"]))
def test_an_onnx_form_exports_with_the_module_forms_methods(tmp_path, name):
    """The ONNX form's package serves the same maps as the module form's (one IR, one set of graphs)."""
    model = act_net(name)
    x = synthetic_ecgs(6, LEADS, LENGTH, seed=11)
    path = _onnx(model, tmp_path / "m.onnx", False, 17)
    pkg = export_package(
        load_source(path, classes="A,B,C,D,E", sampling_rate_hz=500.0), tmp_path / "pkg", sample_inputs=x
    )
    manifest = json.loads((pkg / "manifest.json").read_text())
    engine = AttributionEngine(pkg, providers=["CPUExecutionProvider"])
    module = ir_module(trace_model(model, SHAPE))
    ties = relu_near_ties(module, x)[0]
    target = np.zeros(len(x), int)
    ref = _captum(Saliency(model).attribute, torch.tensor(x), target=torch.tensor(target))
    _parity(engine.attribute("saliency", x, target), ref, ties)
    if name in MONOTONE:
        assert "deeplift" not in manifest["unavailable"]
    else:
        assert "not monotone" in manifest["unavailable"]["deeplift"]["reason"]


# --------------------------------------------------------------------------- refusals


def test_an_unknown_activation_is_refused_naming_it_and_the_supported_ones(tmp_path):
    model = nn.Sequential(
        nn.Conv1d(LEADS, 4, 3), nn.Softsign(), nn.Flatten(), nn.Linear(4 * (LENGTH - 2), 5)
    ).eval()
    with pytest.raises(ExportError, match="Softsign") as e:
        trace_model(model, SHAPE)
    assert (
        "supported:" in str(e.value) and "Mish" in str(e.value) and "replace it with ReLU" not in str(e.value)
    )
    softplus = nn.Sequential(
        nn.Conv1d(LEADS, 4, 3), nn.Softplus(), nn.Flatten(), nn.Linear(4 * (LENGTH - 2), 5)
    )
    with pytest.raises(ExportError, match="Softplus") as e:
        import_onnx(_onnx(softplus.eval(), tmp_path / "m.onnx", False, 17))
    assert "supported:" in str(e.value)


def test_a_model_ending_in_a_sigmoid_is_told_to_return_logits():
    model = nn.Sequential(
        nn.Conv1d(LEADS, 4, 3), nn.Flatten(), nn.Linear(4 * (LENGTH - 2), 5), nn.Sigmoid()
    ).eval()
    with pytest.raises(ExportError, match="return logits"):
        trace_model(model, SHAPE)


# --------------------------------------------------------------------------- each spec's own steps

SPEC_CASES = {
    "sigmoid": {},
    "tanh": {},
    "leaky_relu": {"slope": 0.1},
    "elu": {"alpha": 0.7},
    "gelu": {"approximate": "none"},
    "gelu_tanh": {"approximate": "tanh"},
    "silu": {},
    "mish": {},
}


def _spec_session(kind: str, params: dict, rule) -> ort.InferenceSession:
    """One activation op as a graph on (B, 4, 1, L) inputs: its output and its backward step under ``rule``
    (for DeepLIFT the batch holds the inputs, then their references)."""
    op = Op(kind, "act", ("t",), "y", (4, 9), ((4, 9),), params)
    b = GraphBuilder("one")
    x = b.op("Unsqueeze", [b.add_input("x", ["batch", 4, 9]), b.const([2], np.int64)])
    g = b.op("Unsqueeze", [b.add_input("g", ["batch", 4, 9]), b.const([2], np.int64)])
    y = forward_op(b, op, [x])
    (dx,) = OP_SPECS[kind].emit_backward(rule, b, op, g, [x], y)
    b.add_output(b.op("Squeeze", [y, b.const([2], np.int64)]), "y", ["batch", 4, 9])
    b.add_output(b.op("Squeeze", [dx, b.const([2], np.int64)]), "dx", ["batch", 4, 9])
    return ort.InferenceSession(b.model().SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", list(SPEC_CASES))
def test_each_spec_computes_its_module_and_exact_derivative(name):
    kind, params = KIND.get(name, name), SPEC_CASES[name]
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 3, (3, 4, 9)), 30 * rng.normal(0, 1, (1, 4, 9))]).astype(np.float32)
    g = rng.normal(0, 1, x.shape).astype(np.float32)
    module = OP_SPECS[kind].torch_module(Op(kind, "act", ("t",), "y", (4, 9), ((4, 9),), params))
    assert type(module) is type(ACTIVATIONS[name]()) and repr(module) == repr(ACTIVATIONS[name]())
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    want = module(xt)
    (dwant,) = torch.autograd.grad(want, xt, torch.tensor(g, dtype=torch.float64))
    y, dx = _spec_session(kind, params, Rule()).run(None, {"x": x, "g": g})
    np.testing.assert_allclose(y, want.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, dwant.numpy(), rtol=1e-4, atol=1e-5)  # float32 cancellation in tails


@pytest.mark.parametrize("name", sorted(MONOTONE))
def test_the_rescale_multiplier_is_the_float64_secant_even_for_close_pairs(name):
    """delta-out / delta-in in the activation's well-conditioned form: right to float32's precision where
    input and reference nearly coincide (PyTorch's float32 quotient is off by up to ~10 % there)."""
    kind, params = KIND.get(name, name), SPEC_CASES[name]
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (2, 4, 9)).astype(np.float32)
    ref = (x * (1 + rng.choice([1e-6, 1e-4, 1e-2, 1.0], x.shape) * rng.choice([-1, 1], x.shape))).astype(
        np.float32
    )
    ref[0, 0, :3] = x[0, 0, :3]  # delta 0: the derivative
    g = np.ones_like(x)
    both = np.concatenate([x, ref])
    _, dx = _spec_session(kind, params, RescaleGradientMaxRule()).run(None, {"x": both, "g": g})
    module = OP_SPECS[kind].torch_module(Op(kind, "act", ("t",), "y", (4, 9), ((4, 9),), params)).double()
    x64, r64 = torch.tensor(x, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    d = x64 - r64
    with torch.no_grad():
        secant = (module(x64) - module(r64)) / torch.where(d == 0, torch.ones_like(d), d)
    leaf = x64.clone().requires_grad_()
    (derivative,) = torch.autograd.grad(module(leaf).sum(), leaf)
    want = torch.where(d.abs() < 1e-10, derivative, secant).numpy()
    np.testing.assert_allclose(dx, want, rtol=2e-5, atol=1e-7)
