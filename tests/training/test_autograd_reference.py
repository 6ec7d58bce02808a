"""The PyTorch references the export checks its graphs against, for any model the IR describes.

``ir_module`` rebuilds a ModelIR as a canonical module (one module per op); the plain-autograd
reference applies each ReLU's rule on that ReLU's own edge; Captum runs on the same module.
Here: the rebuilt module computes the traced model's function (the project's ECGNet and a
model with every op kind), the autograd reference equals Captum wherever no ReLU input is
shared and differs, as documented, where one is (a pre-activation residual block), Captum's
LRP runs on every op kind, and the max-pool near-tie scan counts only ties that can matter.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LRP, InputXGradient
from parity_helpers import randomise_batchnorm
from torch import nn

from ecgx.training.export.autograd_reference import autograd_attribution
from ecgx.training.export.ir import AFFINE, CONV, OP_KINDS
from ecgx.training.export.ir_torch import ChannelAffine, Concat, IRModule, ir_module
from ecgx.training.export.reference import (
    captum_attribution,
    ill_conditioned_samples,
    layer_activations_and_gradients,
    lrp_model,
    near_tie_report,
    near_tie_samples,
)
from ecgx.training.export.torch_frontend import trace_model
from ecgx.training.models import Add, ModelConfig, build_model

METHODS = ("gradient", "guided_backprop", "deconvolution")
RELU_RULES = ("gradient", "guided_backprop", "deconvolution")
SHAPE = (12, 301)  # odd length: ceil_mode's last window and the tails of strided layers


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _x(n: int, shape: tuple[int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)


class EveryOp(nn.Module):
    """Each op kind the IR has: strided stem, overlapping padded ceil_mode max pool, a BatchNorm
    that stays an affine op (after a pool, before padded convolutions), grouped and depthwise
    branches joined by torch.cat, a residual addition, an average pool without padding counts,
    a concat-pooling head (average and max), nn.Flatten, explicit zero padding (F.pad), a
    squeeze-and-excitation gate and every other activation."""

    def __init__(self, relu_only: bool = False) -> None:
        super().__init__()
        self.relu_only = relu_only  # no gate and no other activation: a piecewise-linear network
        self.stem = nn.Conv1d(12, 8, 7, stride=2, padding=3)
        self.stem_relu = nn.ReLU()
        self.pool = nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True)
        self.bn = nn.BatchNorm1d(8)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=4)
        self.depthwise = nn.Conv1d(8, 8, 5, padding=2, groups=8)
        self.relu_a, self.relu_b = nn.ReLU(), nn.ReLU()
        self.mix = nn.Conv1d(16, 8, 1)
        self.add = Add()
        self.relu = nn.ReLU()
        self.avg = nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.gap, self.gmp = nn.AdaptiveAvgPool1d(1), nn.AdaptiveMaxPool1d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(16, 9)
        self.se = nn.Linear(8, 8)  # a squeeze-and-excitation gate: the gating product
        self.acts = nn.ModuleList(
            [
                nn.LeakyReLU(0.1),
                nn.ELU(0.7),
                nn.GELU(),
                nn.GELU(approximate="tanh"),
                nn.SiLU(),
                nn.Mish(),
                nn.Sigmoid(),
                nn.Tanh(),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.stem_relu(self.stem(F.pad(x, (2, 1)))))
        b = self.bn(h)
        branches = torch.cat([self.relu_a(self.grouped(b)), self.relu_b(self.depthwise(b))], dim=1)
        h = self.avg(self.relu(self.add(self.mix(branches), h)))
        if not self.relu_only:
            h = h * torch.sigmoid(self.se(h.mean(-1))).unsqueeze(-1)
            for act in self.acts:
                h = act(h)
        return self.fc(self.drop(self.flatten(torch.cat([self.gap(h), self.gmp(h)], dim=1))))


def _every_op(relu_only: bool = False) -> EveryOp:
    torch.manual_seed(0)
    model = EveryOp(relu_only)
    randomise_batchnorm(model)
    return model.eval()


def _ecgnet(residual: bool) -> nn.Module:
    torch.manual_seed(1)
    model = build_model(ModelConfig(widths=(8, 16, 16), residual=residual))
    randomise_batchnorm(model)
    return model.eval()


# --------------------------------------------------------------------------- ir_module


@pytest.mark.parametrize("residual", [False, True])
def test_ir_module_computes_the_project_ecgnet(residual: bool) -> None:
    model = _ecgnet(residual)
    module = ir_module(trace_model(model))
    x = torch.tensor(_x(4, (12, 600)))
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), atol=1e-5, rtol=0)
    # BatchNorm is folded as the IR folds it: no BatchNorm left, one module per op.
    assert not any(isinstance(m, nn.BatchNorm1d) for m in module.modules())
    assert list(module.op_modules) == [op.output for op in module.ir.ops]


def test_ir_module_computes_a_model_with_every_op_kind() -> None:
    model = _every_op()
    ir = trace_model(model, SHAPE)
    assert {op.kind for op in ir.ops} == set(OP_KINDS)
    assert any(op.kind == CONV and op.params["groups"] == 8 for op in ir.ops)
    module = ir_module(ir)
    assert sum(isinstance(m, ChannelAffine) for m in module.modules()) == 1
    assert sum(isinstance(m, Concat) for m in module.modules()) == 2
    relus = [m for m in module.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 4 and len({id(m) for m in relus}) == 4  # a distinct module per ReLU op
    x = torch.tensor(_x(5))
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), atol=1e-5, rtol=0)
    # The affine op's module computes weight * x + bias per channel (2-D and 3-D input).
    affine = next(op for op in ir.ops if op.kind == AFFINE)
    layer = module.op_modules[affine.output]
    w, b = affine.params["weight"], affine.params["bias"]
    h = np.random.default_rng(3).normal(size=(2, 8, 5))
    with torch.no_grad():
        got3 = layer(torch.tensor(h, dtype=torch.float32)).numpy()
        got2 = layer(torch.tensor(h[..., 0], dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got3, w[None, :, None] * h + b[None, :, None], atol=1e-5)
    np.testing.assert_allclose(got2, w[None] * h[..., 0] + b[None], atol=1e-5)


def test_module_names_are_sanitised_and_unique() -> None:
    class Clash(nn.Module):
        """Submodules named like IRModule's own attributes and methods."""

        def __init__(self) -> None:
            super().__init__()
            self.ir = nn.Conv1d(12, 4, 3)
            self.op_modules = nn.ReLU()
            self.gap = nn.AdaptiveAvgPool1d(1)
            self.fc = nn.Linear(4, 9)

        def forward(self, x):
            return self.fc(torch.flatten(self.gap(torch.relu(self.op_modules(self.ir(x)))), 1))

    model = Clash().eval()
    module = ir_module(trace_model(model, (12, 50)))
    names = list(module.attr_names.values())
    assert len(set(names)) == len(names) and all(n.isidentifier() for n in names)
    assert module.attr_names["ir"] != "ir" and module.attr_names["op_modules"] != "op_modules"
    assert isinstance(module.ir.ops[0].params["weight"], np.ndarray)  # the IR is still the IR
    x = torch.tensor(_x(2, (12, 50)))
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), atol=1e-5, rtol=0)


def test_op_modules_give_gradcam_the_traced_models_layer() -> None:
    """GradCAM's activations and gradients read on an IRModule's layer equal the original model's."""
    model = _ecgnet(True)
    ir = trace_model(model)
    module = ir_module(ir)
    tensor = ir.conv_outputs()[-1]
    name = ir.op_producing(tensor).name
    x, target = _x(3, (12, 600)), np.array([0, 4, 8])
    acts, grads = layer_activations_and_gradients(module, module.op_modules[tensor], x, target)
    acts_ref, grads_ref = layer_activations_and_gradients(model, model.get_submodule(name), x, target)
    assert _rel(acts, acts_ref) < 1e-5 and _rel(grads, grads_ref) < 1e-5


# --------------------------------------------------------------------------- autograd reference


@pytest.mark.parametrize("net", ["ecgnet", "ecgnet_residual", "every_op"])
def test_autograd_reference_equals_captum_where_no_relu_input_is_shared(net: str) -> None:
    if net == "every_op":
        model, x = _every_op(), _x(4)
    else:
        model, x = _ecgnet(net == "ecgnet_residual"), _x(4, (12, 600))
    module = ir_module(trace_model(model, x.shape[1:]))
    target = np.array([0, 3, 5, 8])
    for method in RELU_RULES:
        ref = captum_attribution(module, method, x, target)
        got = autograd_attribution(module, method, x, target)
        assert _rel(got, ref) < 1e-5, method
    # The three rules really differ on these inputs (the test compares three different things).
    maps = [autograd_attribution(module, m, x, target) for m in RELU_RULES]
    assert _rel(maps[0], maps[1]) > 1e-2 and _rel(maps[1], maps[2]) > 1e-2


def test_max_pool_gradient_goes_to_the_first_maximum() -> None:
    """An exact tie in an overlapping padded window: PyTorch and the reference both pick the first."""
    model = nn.Sequential(
        nn.Conv1d(1, 1, 1, bias=False), nn.MaxPool1d(3, 2, 1, ceil_mode=True), nn.Flatten(), nn.Linear(4, 1)
    ).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[3].weight.fill_(1.0)
    # Windows: (pad, .5, 2) (2, 2, -1) (-1, 3, 3) (3, 0, past the end): winners at 1, 1, 4, 5.
    x = np.array([[[0.5, 2.0, 2.0, -1.0, 3.0, 3.0, 0.0]]], np.float32)
    module = ir_module(trace_model(model, (1, 7)))
    got = autograd_attribution(module, "gradient", x, 0)
    np.testing.assert_array_equal(got, [[[0, 2, 0, 0, 1, 1, 0]]])
    np.testing.assert_array_equal(got, captum_attribution(module, "gradient", x, 0))


class PreActBlock(nn.Module):
    """Ribeiro et al.'s residual block: ``y = conv2(relu(bn1(conv1(x)))) + skip``, then
    ``relu(bn2(y))`` goes on and ``y`` also feeds the next block's addition. ``bn2=False``
    drops the BatchNorm, so the ReLU reads ``y`` itself: the tensor shared with the addition."""

    def __init__(self, c: int, bn2: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c, c, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv1d(c, c, 5, padding=2, bias=False)
        self.add = Add()
        self.bn2 = nn.BatchNorm1d(c) if bn2 else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.add(self.conv2(self.relu1(self.bn1(self.conv1(x)))), skip)
        return self.relu2(self.bn2(y)), y


class PreActNet(nn.Module):
    def __init__(self, bn2: bool) -> None:
        super().__init__()
        self.stem = nn.Conv1d(12, 8, 7, padding=3)
        self.relu = nn.ReLU()
        self.block1, self.block2 = PreActBlock(8, bn2), PreActBlock(8, bn2)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(8, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        x, y = self.block1(x, x)
        x, _ = self.block2(x, y)
        return self.fc(self.gap(x).flatten(1))


def _preact(bn2: bool) -> PreActNet:
    torch.manual_seed(2)
    model = PreActNet(bn2)
    randomise_batchnorm(model)
    return model.eval()


def test_captum_differs_from_the_per_edge_rule_where_a_relu_input_feeds_an_addition_too() -> None:
    """Captum's GuidedBackprop/Deconvolution hook the ReLU's input tensor. Where that tensor also
    feeds the next addition (``relu(y)``, ``y`` shared), the hook sees the gradient summed over
    both consumers: guided backprop clamps the sum, deconvolution replaces it with the ReLU path's
    clamped gradient. The per-edge rule acts on the ReLU path alone.

    The per-edge answer is pinned independently: the same function with an identity BatchNorm
    between the addition and the ReLU (scale 1, shift 0, so the ReLU reads an unshared tensor)
    gives Captum nothing to mix up, and Captum there equals the autograd reference without it.
    In Ribeiro et al.'s block as published (``relu(bn2(y))`` with a real BatchNorm, which the IR
    keeps as an affine op) the ReLU's input is likewise unshared, and Captum agrees.
    """
    x, target = _x(4, (12, 200)), np.array([1, 2, 6, 7])
    shared = ir_module(trace_model(_preact(bn2=False), (12, 200)))
    identity_bn = _preact(bn2=True)
    identity_bn.load_state_dict(_preact(bn2=False).state_dict(), strict=False)
    for block in (identity_bn.block1, identity_bn.block2):
        block.bn2.reset_parameters()  # weight 1, bias 0, mean 0, var 1
        block.bn2.eps = 0.0
    unshared = ir_module(trace_model(identity_bn, (12, 200)))
    with torch.no_grad():
        torch.testing.assert_close(shared(torch.tensor(x)), unshared(torch.tensor(x)), atol=1e-6, rtol=0)
    for method in RELU_RULES:
        per_edge = autograd_attribution(shared, method, x, target)
        assert _rel(per_edge, captum_attribution(unshared, method, x, target)) < 1e-5, method
        assert _rel(per_edge, autograd_attribution(unshared, method, x, target)) < 1e-5, method
        captum_shared = captum_attribution(shared, method, x, target)
        if method == "gradient":  # no hook: plain autograd in both
            assert _rel(per_edge, captum_shared) < 1e-5
        else:
            assert _rel(per_edge, captum_shared) > 1e-2, method
    # Ribeiro's block with its BatchNorm: the ReLU's input is bn2's output, read by the ReLU alone.
    ribeiro = ir_module(trace_model(_preact(bn2=True), (12, 200)))
    assert sum(op.kind == AFFINE for op in ribeiro.ir.ops) == 2
    for method in RELU_RULES:
        ref = captum_attribution(ribeiro, method, x, target)
        assert _rel(autograd_attribution(ribeiro, method, x, target), ref) < 1e-5, method


@pytest.mark.parametrize("net", ["ecgnet", "ecgnet_residual"])
def test_deeplift_and_lrp_rules_equal_captum_where_its_hooks_apply_alike(net: str) -> None:
    model, x = _ecgnet(net == "ecgnet_residual"), _x(4, (12, 600))
    module = ir_module(trace_model(model, x.shape[1:]))
    target, base = np.array([0, 3, 5, 8]), _x(4, (12, 600), seed=1) * 0.1
    ref = captum_attribution(module, "deeplift", x, target, baseline=base)
    assert _rel(autograd_attribution(module, "deeplift", x, target, baseline=base), ref) < 1e-5
    for eps in (1e-2, 0.5):
        ref = captum_attribution(module, "lrp", x, target, epsilon=eps)
        assert _rel(autograd_attribution(module, "lrp", x, target, epsilon=eps), ref) < 1e-5


def test_lrp_and_deeplift_per_edge_where_a_relu_input_feeds_an_addition_too() -> None:
    """As for guided backprop: on the shared tensor Captum's ReLU hooks mix the addition's path
    in. DeepLIFT's per-edge rule equals Captum on the same function with the tensor unshared (an
    identity BatchNorm between the addition and the ReLU). For LRP that BatchNorm is itself a
    layer the epsilon rule divides at, so there both references are run on the unshared module."""
    x, target = _x(4, (12, 200)), np.array([1, 2, 6, 7])
    base = _x(4, (12, 200), seed=3) * 0.1
    shared = ir_module(trace_model(_preact(bn2=False), (12, 200)))
    identity_bn = _preact(bn2=True)
    identity_bn.load_state_dict(_preact(bn2=False).state_dict(), strict=False)
    for block in (identity_bn.block1, identity_bn.block2):
        block.bn2.reset_parameters()
        block.bn2.eps = 0.0
    unshared = ir_module(trace_model(identity_bn, (12, 200)))
    for method, kw in (("deeplift", {"baseline": base}), ("lrp", {"epsilon": 1e-2})):
        per_edge = autograd_attribution(shared, method, x, target, **kw)
        assert _rel(per_edge, captum_attribution(shared, method, x, target, **kw)) > 1e-2, method
        right = captum_attribution(unshared, method, x, target, **kw)
        same_function = (
            per_edge if method == "deeplift" else autograd_attribution(unshared, method, x, target, **kw)
        )
        assert _rel(same_function, right) < 1e-4, method


def test_autograd_reference_refuses_what_it_does_not_compute() -> None:
    module = ir_module(trace_model(_every_op(), SHAPE))
    with pytest.raises(ValueError, match="no autograd reference for 'gradcam'"):
        autograd_attribution(module, "gradcam", _x(1), 0)
    with pytest.raises(TypeError, match="IRModule"):
        autograd_attribution(_every_op(), "gradient", _x(1), 0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- LRP on the IRModule


def test_captum_lrp_runs_on_every_op_kind_and_is_input_times_gradient_at_tiny_epsilon() -> None:
    """With epsilon -> 0, LRP-epsilon on a ReLU network equals input x gradient; it holds only if
    every op's rule is right (concatenation and flatten pass relevance unchanged). Only a
    piecewise-linear network has that identity: no gate, no smooth activation."""
    module = ir_module(trace_model(_every_op(relu_only=True), SHAPE))
    x, target = _x(3), np.array([0, 4, 7])
    lrp = captum_attribution(module, "lrp", x, target, epsilon=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ixg = InputXGradient(module).attribute(torch.tensor(x), target=torch.tensor(target)).detach().numpy()
    assert _rel(lrp, ixg) < 1e-3
    # The rules come off after each call (Captum removes them); lrp_model puts them back.
    assert not any(hasattr(m, "rule") for m in module.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = LRP(lrp_model(module, 1e-9)).attribute(torch.tensor(x), target=torch.tensor(target))
    np.testing.assert_allclose(again.detach().numpy(), lrp, rtol=0, atol=1e-6 * np.abs(lrp).max())
    with pytest.raises(TypeError, match="IRModule"):
        lrp_model(_every_op(), 1e-9)  # type: ignore[arg-type]


def test_lrp_passes_relevance_through_concatenation_and_flatten_unchanged() -> None:
    """At a large epsilon an epsilon rule on torch.cat or flatten would shrink relevance; the pass
    rule must give what plain autograd gives for those two ops (run functionally, outside any rule)."""

    class Functional(nn.Module):
        def __init__(self, module: IRModule) -> None:
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            def plain(op, layer, inputs):
                if op.kind == "concat":
                    return torch.cat(inputs, dim=1)
                return inputs[0].flatten(1) if op.kind == "flatten" else None

            return self.module.evaluate(x, plain)

    # Captum's LRP has no rule for the gating product: the piecewise-linear variant.
    module = ir_module(trace_model(_every_op(relu_only=True), SHAPE))
    x, target = _x(3), np.array([2, 3, 4])
    ref = captum_attribution(module, "lrp", x, target, epsilon=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = LRP(Functional(lrp_model(module, 0.1))).attribute(
            torch.tensor(x), target=torch.tensor(target)
        )
    assert _rel(ref, plain.detach().numpy()) < 1e-5


def test_ill_conditioning_sees_grouped_convolutions_and_every_op_kind() -> None:
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(12, 2, 1, groups=2)
            self.relu = nn.ReLU()
            self.gap = nn.AdaptiveAvgPool1d(1)
            self.fc = nn.Linear(2, 9)

        def forward(self, x):
            return self.fc(self.gap(self.relu(self.conv(x))).flatten(1))

    model = Grouped().eval()
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.zero_()
        model.conv.weight[0, 0, 0], model.conv.weight[0, 1, 0] = 1.0, -1.0  # group 0: leads 0-5
        model.conv.weight[1, 0, 0] = 1.0  # group 1: lead 6
    x = np.full((2, 12, 50), 0.5, np.float32)
    x[:, 1] = 0.0
    x[1, 0, 0], x[1, 1, 0] = 5.0, 5.0 - 2e-6  # unit 0 sums large terms to 2e-6 at sample 1
    module = ir_module(trace_model(model, (12, 50)))
    assert ill_conditioned_samples(module, x, 1e-6, 1e-4).tolist() == [False, True]
    assert ill_conditioned_samples(module, x, 1e-2, 1e-4).tolist() == [False, False]
    # The plain module is traced into the same IRModule.
    assert ill_conditioned_samples(model, x, 1e-6, 1e-4).tolist() == [False, True]
    every = ir_module(trace_model(_every_op(), SHAPE))
    assert not ill_conditioned_samples(every, _x(4), 0.1, 1e-4).any()


# --------------------------------------------------------------------------- near ties


class TieNet(nn.Module):
    """Leads 0 and 1 pass through a 1x1 convolution, a ReLU (or not) and a pool."""

    def __init__(self, relu: bool, pool: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 2, 1)
        self.relu = nn.ReLU() if relu else nn.Identity()
        self.pool = pool
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(2, 9)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[0, 0, 0] = self.conv.weight[1, 1, 0] = 1.0

    def forward(self, x):
        return self.fc(self.gap(self.pool(self.relu(self.conv(x)))).flatten(1))


def _tie_inputs(value: float, other: float) -> np.ndarray:
    """Lead 1 rises steadily (no tie anywhere); lead 0 is -1 except at samples 10 and 11 of ECG 1."""
    x = np.zeros((3, 12, 40), np.float32)
    x[:, 1] = np.linspace(0.1, 1.0, 40)
    x[:, 0] = -1.0
    x[1, 0, 10], x[1, 0, 11] = value, other
    return x


@pytest.mark.parametrize(
    "pool", [nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True), nn.MaxPool1d(2), nn.AdaptiveMaxPool1d(1)]
)
def test_near_ties_count_only_where_they_can_change_the_path(pool: nn.Module) -> None:
    after_relu = ir_module(trace_model(TieNet(True, pool).eval(), (12, 40)))
    # ECGs 0 and 2: lead 0 is all zeros after the ReLU, (0, 0) windows everywhere: not counted.
    x = _tie_inputs(1.0, 1.0 + 1e-9)
    assert near_tie_samples(after_relu, x).tolist() == [False, True, False]
    report = near_tie_report(after_relu, x)
    assert report["flagged"] == 1 and report["samples"] == 3
    assert report["per_layer"] == {"pool": 1} and report["zero_ties_not_counted"] == 2
    assert "exact zeros after a ReLU" in report["reason"]
    # A gap well above float rounding is no tie.
    assert not near_tie_samples(after_relu, _tie_inputs(1.0, 1.01)).any()
    # Without a ReLU before the pool, equal values anywhere count (nothing makes them exact): the
    # -1 plateau of lead 0 ties in every window of every ECG.
    no_relu = ir_module(trace_model(TieNet(False, pool).eval(), (12, 40)))
    assert near_tie_samples(no_relu, x).all()


def test_a_tie_in_the_padding_or_past_the_end_is_no_tie() -> None:
    """-inf padding: a window holding one real value and padding has no second candidate."""
    module = ir_module(
        trace_model(TieNet(True, nn.MaxPool1d(2, stride=2, padding=1, ceil_mode=True)).eval(), (12, 41))
    )
    x = np.zeros((1, 12, 41), np.float32)
    x[:, 0] = np.linspace(1.0, 2.0, 41)  # distinct positive values; first and last windows half padding
    x[:, 1] = np.linspace(2.0, 1.0, 41)
    assert near_tie_report(module, x)["flagged"] == 0
