"""Every method of the engine on published ECG architectures, at two input lengths (issue #12).

xresnet1d and inception1d (Strodthoff et al. 2021, PTB-XL benchmark), the residual network of
Ribeiro et al. (2020) and a grouped/depthwise-convolution network, each exported from PyTorch
and served by the engine on ONNX Runtime. References, by method:

- gradient methods (saliency, input x gradient, integrated gradients, SmoothGrad,
  GradientSHAP): Captum on the model as given (plain autograd needs no canonical form);
- guided backprop and deconvnet: the plain-autograd rule reference on the IR-rebuilt module
  (training/export/autograd_reference.py), and Captum too: on these four networks every ReLU
  reads a tensor nothing else reads (Ribeiro's block adds, then BatchNorm, then ReLU), so
  Captum's ReLU-input hooks are right here. Where a ReLU's input also feeds an addition they
  are not (tests/training/test_autograd_reference.py shows both sides);
- DeepLIFT and LRP-epsilon: the plain-autograd rule reference, and Captum on the IR-rebuilt
  module, where every ReLU, addition and pooling is a module its hooks and rules attach to
  (BatchNorm folded as exported); GradCAM: Captum on the rebuilt module.

Criterion as everywhere: relative error above 1e-4 of the largest magnitude on at most 0.1 %
of elements, per sample; a sample float32 cannot pin down (a max-pool near-tie, an
ill-conditioned LRP unit) is excused only with its reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
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
from scipy.signal import decimate

from ecgx.core.median_beat import median_beat
from ecgx.service.engine import AttributionEngine
from ecgx.training import reference_models as zoo
from ecgx.training.data.wfdb_import import read_record
from ecgx.training.export import export_package
from ecgx.training.export.autograd_reference import autograd_attribution
from ecgx.training.export.ir import GMP, MAXPOOL, RELU
from ecgx.training.export.ir_torch import ir_module
from ecgx.training.export.parity import REL_TOL, describe_parity_failure, per_sample_parity
from ecgx.training.export.reference import ill_conditioned_samples, lrp_model, near_tie_samples
from ecgx.training.export.source import from_module
from ecgx.training.export.torch_frontend import trace_model

# name -> (factory(length), lengths, sampling rate per length)
ARCHITECTURES = {
    "xresnet1d": (lambda n: zoo.xresnet1d(), (600, 1000)),
    "inception1d": (lambda n: zoo.inception1d(), (600, 1000)),
    "ribeiro_resnet": (lambda n: zoo.ribeiro_resnet(n_samples=n), (1000, 4096)),
    "grouped_conv_net": (lambda n: zoo.grouped_conv_net(), (600, 1000)),
}
RATE = {600: 500.0, 1000: 100.0, 4096: 400.0}
CASES = [(name, n) for name, (_, lengths) in ARCHITECTURES.items() for n in lengths]


def real_inputs(shared_data: Path, n: int) -> np.ndarray:
    """Four real PTB-XL ECGs of ``n`` samples: median beats at 600 (500 Hz); at 1000, the 10 s
    records at 100 Hz as in PTB-XL's benchmark; at 4096, held to 400 Hz and zero-padded as in
    Ribeiro et al. (Synthetic beats have exactly flat stretches, whose equal activations make
    max-pool ties float32 cannot break the same way twice.)"""
    out = []
    for record in ("HR06000", "HR06001", "HR06002", "HR06003"):
        signal, fs, _ = read_record(shared_data / "ptbxl-sample" / record)
        if n == 600:
            out.append(median_beat(signal, fs))
            continue
        x = decimate(signal, 5, axis=-1)  # 100 Hz
        if n == 4096:
            x = np.pad(np.repeat(x, 4, axis=-1)[:, :4000], ((0, 0), (48, 48)))
        out.append(x[:, :n])
    return np.asarray(out, np.float32)


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{n}" for a, n in CASES])
def setup(request, shared_data, tmp_path_factory):
    name, n = request.param
    torch.manual_seed(0)
    model = zoo.randomise_batchnorm(ARCHITECTURES[name][0](n), seed=1).eval()
    x = real_inputs(shared_data, n)
    source = from_module(model, (12, n), sampling_rate_hz=RATE[n])
    pkg = export_package(source, tmp_path_factory.mktemp(f"{name}-{n}") / "pkg", sample_inputs=x)
    engine = AttributionEngine(pkg, providers=["CPUExecutionProvider"], max_batch=8)
    target = np.array([0, 5, 8, 2])
    return name, model, ir_module(source.ir), engine, x, target


def _captum(fn, *args, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs).detach().numpy()


def assert_parity_except(got, ref, excused):
    """The export's own criterion: every sample that disagrees has a reason float32 cannot
    pin it down (``excused``), and at least half of the samples agree."""
    check = per_sample_parity(got, ref, {"float32 cannot pin down": excused})
    assert check["ok"], describe_parity_failure("parity", check)


def test_the_package_records_the_models_input(setup):
    _, _, _, engine, x, _ = setup
    spec = engine.package.manifest["input"]
    assert spec["shape"] == [None, 12, x.shape[-1]]
    assert spec["sampling_rate_hz"] == RATE[x.shape[-1]]


def test_gradient_methods_match_captum_on_the_model_as_given(setup):
    _, model, module, engine, x, target = setup
    xt, tt = torch.tensor(x), torch.tensor(target)
    saliency = _captum(Saliency(model).attribute, xt, target=tt)
    assert_parity_except(engine.attribute("saliency", x, target), saliency, near_tie_samples(module, x))
    base = np.random.default_rng(3).normal(0, 0.05, x.shape).astype(np.float32)
    ref = _captum(
        IntegratedGradients(model).attribute, xt, baselines=torch.tensor(base), target=tt, n_steps=16
    )
    got = engine.attribute("integrated_gradients", x, target, baseline=base, n_steps=16)
    assert_parity(got, ref)
    noise = np.random.default_rng(5).normal(0, 0.05, (3, *x.shape)).astype(np.float32)
    sal = Saliency(model)
    ref = np.mean([_captum(sal.attribute, torch.tensor(x + e), target=tt) for e in noise], 0)
    assert_parity(engine.attribute("smoothgrad", x, target, n_samples=3, noise=noise), ref)


def test_guided_backprop_and_deconvnet_match_the_autograd_rule(setup):
    _, _, module, engine, x, target = setup
    ties = near_tie_samples(module, x)
    for method, captum_cls in (("guided_backprop", GuidedBackprop), ("deconvolution", Deconvolution)):
        got = engine.attribute(method, x, target)
        assert_parity_except(got, autograd_attribution(module, method, x, target), ties)
        captum = _captum(captum_cls(module).attribute, torch.tensor(x), target=torch.tensor(target))
        assert_parity_except(got, captum, ties)


def captum_pools_with_its_own_rule(module) -> bool:
    """Captum's DeepLift applies its max-pool rule (the cross-max rescale) to a max pool that does
    not read a ReLU's output; behind a ReLU it passes the plain gradient, as the package's
    ``maxpool_rule="gradient"`` does."""
    ir = module.ir
    return any(
        op.kind in (MAXPOOL, GMP) and getattr(ir.op_producing(op.inputs[0]), "kind", None) != RELU
        for op in ir.ops
    )


def test_deeplift_matches_the_autograd_rule_and_captum_where_captum_pools_alike(setup):
    """inception1d's first pooling branch reads the ECG itself and Ribeiro's shortcut pools the
    sum of a block: there Captum computes its own max-pool rule and differs; elsewhere all agree."""
    _, _, module, engine, x, target = setup
    base = np.random.default_rng(4).normal(0, 0.05, x.shape).astype(np.float32)
    got = engine.attribute("deeplift", x, target, baseline=base, maxpool_rule="gradient")
    excused = near_tie_samples(module, x) | near_tie_samples(module, base)
    assert_parity_except(got, autograd_attribution(module, "deeplift", x, target, baseline=base), excused)
    captum = _captum(
        DeepLift(module).attribute, torch.tensor(x), baselines=torch.tensor(base), target=torch.tensor(target)
    )
    if captum_pools_with_its_own_rule(module):
        assert not per_sample_parity(got, captum, {"tie": excused})["ok"]
    else:
        assert_parity_except(got, captum, excused)


def test_deeplift_rescale_rule_sums_to_the_logit_difference(setup):
    _, _, _, engine, x, target = setup
    base = np.random.default_rng(4).normal(0, 0.05, x.shape).astype(np.float32)
    got = engine.attribute("deeplift", x, target, baseline=base)
    rows = np.arange(len(x))
    logits, logits_base = engine.logits(x)[rows, target], engine.logits(base)[rows, target]
    delta = logits - logits_base
    # To float32's precision: the difference of two logits is rounded relative to the logits.
    scale = max(np.abs(delta).max(), np.abs(logits).max(), np.abs(logits_base).max())
    np.testing.assert_allclose(got.astype(np.float64).sum(axis=(1, 2)), delta, rtol=0, atol=REL_TOL * scale)


@pytest.mark.parametrize("epsilon", [1e-2])
def test_lrp_epsilon_matches_the_autograd_rule_and_captum_on_the_rebuilt_module(setup, epsilon):
    _, _, module, engine, x, target = setup
    got = engine.attribute("lrp", x, target, epsilon=epsilon)
    excused = ill_conditioned_samples(module, x, epsilon, REL_TOL) | near_tie_samples(module, x)
    assert_parity_except(got, autograd_attribution(module, "lrp", x, target, epsilon=epsilon), excused)
    ref = _captum(
        CaptumLRP(lrp_model(module, epsilon)).attribute, torch.tensor(x), target=torch.tensor(target)
    )
    assert_parity_except(got, ref, excused)


def test_gradcam_matches_captum_on_the_rebuilt_module(setup):
    _, _, module, engine, x, target = setup
    layer = module.op_modules[engine.package.manifest["gradcam_layer"]]
    cam = _captum(
        LayerGradCam(module, layer).attribute,
        torch.tensor(x),
        target=torch.tensor(target),
        relu_attributions=True,
    )
    ref = LayerAttribution.interpolate(torch.tensor(cam), (x.shape[-1],), "linear").numpy()
    got = engine.attribute("gradcam", x, target, interpolation="linear")
    assert_parity_except(got, np.repeat(ref, 12, axis=1), near_tie_samples(module, x))


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1"])
def test_lrp_composites_match_zennit_on_the_rebuilt_module(setup, composite):
    """The package's composite graph and Zennit's composite (with an Add -> Sum canonizer,
    tests/zennit_helpers.py) both equal the exact (float64) composite map, each to within its own
    float32 sensitivity (``composite_parity``, the export's check): Zennit's Norm rule at additions
    that nearly cancel (Ribeiro's pre-activation blocks, on every sample at 4096 samples)
    amplifies rounding in any float32 implementation, Zennit's included."""
    from zennit_helpers import zennit_lrp

    from ecgx.training.export.lrp_reference import composite_parity

    _, _, module, engine, x, target = setup
    if f"lrp_{composite}" not in engine.package.manifest["graphs"]:
        reason = engine.package.manifest["unavailable"][f"lrp_{composite}"]["reason"]
        pytest.fail(f"the export left lrp_{composite} out: {reason}")
    ties = {"near_max_pool_tie": near_tie_samples(module, x)}
    got = engine.attribute("lrp", x, target, composite=composite, epsilon=1e-2)
    zennit = zennit_lrp(module, composite, x, target, epsilon=1e-2)
    for name, maps in (("package", got), ("Zennit", zennit)):
        check = composite_parity(maps, module, composite, x, target, epsilon=1e-2, excused=ties)
        assert check["ok"], describe_parity_failure(f"{name} vs the exact map", check)


# --------------------------------------------------------------------------- other input forms


@pytest.fixture(scope="module")
def onnx_imported(shared_data, tmp_path_factory):
    """xresnet1d as another framework would hand it over: a forward-only ONNX file (10 s at 100 Hz),
    exported through the ONNX front end. The reference model is that file converted back to
    PyTorch by onnx2torch, as the issue asks."""
    import onnx2torch

    from ecgx.training.export.input_forms import load_source

    torch.manual_seed(0)
    model = zoo.randomise_batchnorm(zoo.xresnet1d(), seed=1).eval()
    folder = tmp_path_factory.mktemp("onnx-import")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 12, 1000),),
            folder / "xresnet1d.onnx",
            dynamo=False,
            opset_version=17,
            input_names=["ecg"],
            output_names=["logits"],
            dynamic_axes={"ecg": {0: "batch"}},
        )
    source = load_source(folder / "xresnet1d.onnx", sampling_rate_hz=100.0)
    assert source.original is None  # nothing of PyTorch comes with an ONNX file
    x = real_inputs(shared_data, 1000)
    pkg = export_package(source, folder / "pkg", sample_inputs=x)
    engine = AttributionEngine(pkg, providers=["CPUExecutionProvider"], max_batch=8)
    converted = onnx2torch.convert(str(folder / "xresnet1d.onnx")).eval()
    return converted, ir_module(source.ir), engine, x, np.array([0, 5, 8, 2])


def test_onnx_import_every_method_matches_its_reference(onnx_imported):
    converted, module, engine, x, target = onnx_imported
    assert "unavailable" not in engine.package.manifest or not engine.package.manifest["unavailable"]
    ties = near_tie_samples(module, x)
    xt, tt = torch.tensor(x), torch.tensor(target)
    # The ONNX file's own function, back in PyTorch: its logits and its autograd gradient.
    with torch.no_grad():
        assert_parity(engine.logits(x), converted(xt).numpy())
    saliency = _captum(Saliency(converted).attribute, xt, target=tt)
    assert_parity_except(engine.attribute("saliency", x, target), saliency, ties)
    base = np.random.default_rng(4).normal(0, 0.05, x.shape).astype(np.float32)
    for method, kw in (
        ("guided_backprop", {}),
        ("deconvolution", {}),
        ("deeplift", {"baseline": base}),
        ("lrp", {"epsilon": 1e-2}),
    ):
        extra = {"maxpool_rule": "gradient"} if method == "deeplift" else {}
        got = engine.attribute(method, x, target, **kw, **extra)
        assert_parity_except(got, autograd_attribution(module, method, x, target, **kw), ties)


def test_the_trained_demo_model_matches_every_reference(trained_family):
    """The project's own trained model (the demo's family, seed 0), exported from its checkpoint."""
    from ecgx.core.dataset import load_dataset
    from ecgx.training.checkpoint import load_checkpoint
    from ecgx.training.train import CHECKPOINT_FILE, seed_dir

    model, _ = load_checkpoint(seed_dir(trained_family["runs"], 0) / CHECKPOINT_FILE)
    engine = AttributionEngine(trained_family["seed-0"], providers=["CPUExecutionProvider"], max_batch=8)
    module = ir_module(trace_model(model))
    x = np.asarray(load_dataset(trained_family["data"]).signals[:6], np.float32)
    target = np.array([0, 1, 2, 3, 4, 5])
    ties = near_tie_samples(module, x)
    xt, tt = torch.tensor(x), torch.tensor(target)
    assert_parity_except(
        engine.attribute("saliency", x, target), _captum(Saliency(model).attribute, xt, target=tt), ties
    )
    base = np.zeros_like(x)
    for method, kw, captum in (
        ("guided_backprop", {}, GuidedBackprop(model)),
        ("deconvolution", {}, Deconvolution(model)),
        ("deeplift", {"baseline": base}, DeepLift(model)),
    ):
        extra = {"maxpool_rule": "gradient"} if method == "deeplift" else {}
        got = engine.attribute(method, x, target, **kw, **extra)
        assert_parity_except(got, autograd_attribution(module, method, x, target, **kw), ties)
        ref = _captum(captum.attribute, xt, target=tt, **({"baselines": torch.tensor(base)} if kw else {}))
        assert_parity_except(got, ref, ties)
    got = engine.attribute("lrp", x, target, epsilon=1e-2)
    ref = _captum(CaptumLRP(lrp_model(module, 1e-2)).attribute, xt, target=tt)
    assert_parity_except(got, ref, ties | ill_conditioned_samples(module, x, 1e-2, REL_TOL))
