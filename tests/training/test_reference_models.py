"""The published ECG architectures (training/reference_models.py) and the torchvision stand-in.

These tests check that each re-implementation runs at the lengths it documents and that
the export's PyTorch front end traces it into an IR containing the patterns the
architecture is about. Whether the IR computes the same function as the module is the
export parity tests' job, not this file's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ecgx.training import reference_models as R
from ecgx.training.export import ir as IR
from ecgx.training.export.torch_frontend import trace_model

STUBS = Path(__file__).resolve().parents[1] / "stubs"
# Zennit and onnx2torch import torchvision, which is not installed (tests/stubs/README.md):
# put the stand-in first on the path, once, and only when no real torchvision exists.
if importlib.util.find_spec("torchvision") is None and str(STUBS) not in sys.path:
    sys.path.insert(0, str(STUBS))

LENGTH_AGNOSTIC = {
    "xresnet1d": R.xresnet1d,
    "inception1d": R.inception1d,
    "grouped_conv_net": R.grouped_conv_net,
}


def _traced(model: nn.Module, length: int) -> IR.ModelIR:
    return trace_model(R.randomise_batchnorm(model, seed=3), (12, length))


def _kinds(ir: IR.ModelIR) -> set[str]:
    return {op.kind for op in ir.ops}


def _reaches(ir: IR.ModelIR, start: str, kind: str, avoid: set[str]) -> bool:
    """Whether a path from tensor ``start`` reaches an op of ``kind`` without entering ``avoid``."""
    todo, seen = [start], set()
    while todo:
        tensor = todo.pop()
        for op in ir.consumers(tensor):
            if op.name in avoid or op.name in seen:
                continue
            if op.kind == kind:
                return True
            seen.add(op.name)
            todo.append(op.output)
    return False


# --------------------------------------------------------------------------- running


@pytest.mark.parametrize("length", [600, 1000])
@pytest.mark.parametrize("name", sorted(LENGTH_AGNOSTIC))
def test_length_agnostic_architectures_run_at_both_lengths(name: str, length: int) -> None:
    model = R.randomise_batchnorm(LENGTH_AGNOSTIC[name](), seed=1)
    assert not model.training, "factories must return eval-mode models"
    x = torch.randn(3, 12, length, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        again = model(x)
    assert out.shape == (3, 9)
    assert torch.isfinite(out).all()
    assert torch.equal(out, again), "eval mode must be deterministic (Dropout off, running statistics)"
    # one ECG's logits do not depend on the rest of the batch (BatchNorm uses running statistics)
    torch.testing.assert_close(model(x[:1]).detach(), out[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LENGTH_AGNOSTIC))
def test_documented_minimum_length_runs(name: str) -> None:
    length = R.MIN_SAMPLES[name]
    with torch.no_grad():
        assert LENGTH_AGNOSTIC[name]()(torch.randn(1, 12, length)).shape == (1, 9)
    assert trace_model(LENGTH_AGNOSTIC[name](), (12, length)).input_shape == (12, length)


@pytest.mark.parametrize("length", [600, 1000, 4096])
def test_ribeiro_resnet_runs_at_its_built_length(length: int) -> None:
    model = R.randomise_batchnorm(R.ribeiro_resnet(filters=(8, 12, 16), n_samples=length), seed=1)
    assert model.input_shape == (12, length)
    with torch.no_grad():
        out = model(torch.randn(2, 12, length))
    assert out.shape == (2, 9) and torch.isfinite(out).all()


def test_ribeiro_resnet_refuses_lengths_whose_streams_disagree() -> None:
    # 4095 % 4 == 3: the strided convolution gives 1024 samples, the pooled shortcut 1023
    with pytest.raises(ValueError, match="n_samples=4095 does not fit"):
        R.ribeiro_resnet(n_samples=4095)
    with pytest.raises(ValueError, match="one entry more than downsample"):
        R.ribeiro_resnet(filters=(16, 32), downsample=(4, 4))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        R.ribeiro_resnet(kernel_size=16)


def test_factory_argument_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="divisible by groups"):
        R.grouped_conv_net(width=6, groups=8)
    with pytest.raises(ValueError, match="layers must be"):
        R.xresnet1d(layers=())
    with pytest.raises(ValueError, match="width must be a positive integer"):
        R.inception1d(width=0)


def test_every_factory_is_callable_without_arguments() -> None:
    # the CLI builds `module:function` with no arguments, then loads a state dict into it
    for factory in (R.xresnet1d, R.inception1d, R.ribeiro_resnet, R.grouped_conv_net):
        model = factory()
        assert isinstance(model, nn.Module) and not model.training
        clone = factory()
        clone.load_state_dict(model.state_dict())
        length = getattr(model, "input_shape", (12, 600))[1]
        x = torch.randn(1, 12, length)
        with torch.no_grad():
            torch.testing.assert_close(clone(x), model(x))


# --------------------------------------------------------------------------- BatchNorm randomisation


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, nn.BatchNorm1d)
        for t in (m.running_mean, m.running_var, m.weight, m.bias)
    ]


def test_randomise_batchnorm_is_deterministic_and_non_trivial() -> None:
    a = _bn_state(R.randomise_batchnorm(R.xresnet1d(), seed=5))
    b = _bn_state(R.randomise_batchnorm(R.xresnet1d(), seed=5))
    c = _bn_state(R.randomise_batchnorm(R.xresnet1d(), seed=6))
    assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))
    assert not all(torch.equal(s, t) for s, t in zip(a, c, strict=True))
    fresh = _bn_state(R.xresnet1d())
    # every statistic and affine parameter of every BatchNorm moved away from (0, 1, 1, 0)
    assert all(not torch.allclose(s, t) for s, t in zip(a, fresh, strict=True))
    variances = a[1::4]
    assert all((v > 0.4).all() for v in variances)


def test_randomised_batchnorm_changes_the_folded_parameters() -> None:
    model = R.grouped_conv_net()
    plain = trace_model(model, (12, 600))
    randomised = trace_model(R.randomise_batchnorm(model, seed=2), (12, 600))
    stem = next(op for op in plain.ops if op.name == "stem")
    stem_r = next(op for op in randomised.ops if op.name == "stem")
    assert stem.params["folded"] == stem_r.params["folded"] == "stem_bn"
    assert not np.allclose(stem.params["weight"], stem_r.params["weight"])


# --------------------------------------------------------------------------- traced patterns


@pytest.mark.parametrize("length", [600, 1000])
def test_xresnet1d_traces_its_stem_shortcuts_and_concat_pooling_head(length: int) -> None:
    ir = _traced(R.xresnet1d(), length)
    assert {IR.CONV, IR.MAXPOOL, IR.AVGPOOL, IR.GMP, IR.GAP, IR.CONCAT, IR.ADD, IR.FLATTEN} <= _kinds(ir)
    # the stem's overlapping, padded max pooling
    (maxpool,) = [op for op in ir.ops if op.kind == IR.MAXPOOL]
    assert (maxpool.params["kernel"], maxpool.params["stride"], maxpool.params["padding"]) == (3, 2, 1)
    # the strided block's pooled identity
    (avgpool,) = [op for op in ir.ops if op.kind == IR.AVGPOOL]
    assert avgpool.params["ceil_mode"] and avgpool.params["kernel"] == avgpool.params["stride"] == 2
    # concat pooling: max then average, joined along channels
    (cat,) = [op for op in ir.ops if op.kind == IR.CONCAT]
    assert [ir.op_producing(t).kind for t in cat.inputs] == [IR.GMP, IR.GAP]
    # both blocks add a projection shortcut (a 1x1 conv) to the body
    adds = [op for op in ir.ops if op.kind == IR.ADD]
    assert len(adds) == 2
    for add in adds:
        producers = [ir.op_producing(t) for t in add.inputs]
        assert all(p.kind == IR.CONV for p in producers)
        assert any(p.params["weight"].shape[-1] == 1 and p.params["folded"] for p in producers)
        assert ir.consumers(add.output)[0].kind == IR.RELU
    # every BatchNorm folds: the ones after convolutions and the head's before the Linear layers
    assert IR.AFFINE not in _kinds(ir)
    assert all(op.params.get("folded") for op in ir.ops if op.kind == IR.LINEAR)


def test_xresnet1d_identity_shortcut_adds_the_block_input() -> None:
    ir = _traced(R.xresnet1d(layers=(2, 1)), 600)
    # the second block of the first stage keeps its channels: its shortcut is the block input itself
    identity = [
        add
        for add in ir.ops
        if add.kind == IR.ADD and any(ir.op_producing(t).kind == IR.RELU for t in add.inputs)
    ]
    assert len(identity) == 1


@pytest.mark.parametrize("length", [600, 1000])
def test_inception1d_traces_four_branch_concatenation_and_shortcut(length: int) -> None:
    ir = _traced(R.inception1d(), length)
    assert {IR.CONV, IR.MAXPOOL, IR.CONCAT, IR.ADD, IR.AFFINE, IR.GMP, IR.GAP} <= _kinds(ir)
    branch_cats = [op for op in ir.ops if op.kind == IR.CONCAT and len(op.inputs) == 4]
    assert len(branch_cats) == 3  # one per block
    for cat in branch_cats:
        kernels = [ir.op_producing(t).params["weight"].shape[-1] for t in cat.inputs]
        assert kernels == [39, 19, 9, 1]
        assert all(s == (8, length) for s in cat.in_shapes) and cat.out_shape == (32, length)
        # the fourth branch is max pool (3, stride 1, padding 1) -> 1x1 conv on the block input
        pool = ir.op_producing(ir.op_producing(cat.inputs[3]).inputs[0])
        assert pool.kind == IR.MAXPOOL and (pool.params["stride"], pool.params["padding"]) == (1, 1)
        # BatchNorm after a concatenation cannot fold: it stays an affine op before the ReLU
        (bn,) = ir.consumers(cat.output)
        assert bn.kind == IR.AFFINE and ir.consumers(bn.output)[0].kind == IR.RELU
    # the shortcut (1x1 conv, folded BatchNorm) from the network input to the third block
    (add,) = [op for op in ir.ops if op.kind == IR.ADD]
    shortcut = [ir.op_producing(t) for t in add.inputs if ir.op_producing(t).kind == IR.CONV]
    assert len(shortcut) == 1 and shortcut[0].inputs == (IR.INPUT,) and shortcut[0].params["folded"]


@pytest.mark.parametrize("length", [600, 1000, 4096])
def test_ribeiro_resnet_traces_pre_activation_units(length: int) -> None:
    ir = _traced(R.ribeiro_resnet(filters=(8, 12, 16), n_samples=length), length)
    assert {IR.CONV, IR.MAXPOOL, IR.ADD, IR.AFFINE, IR.RELU, IR.FLATTEN, IR.LINEAR} <= _kinds(ir)
    adds = [op for op in ir.ops if op.kind == IR.ADD]
    assert len(adds) == 2
    # the first unit's sum feeds an unfoldable BatchNorm (then ReLU) and, through the next
    # unit's pooled, projected shortcut, the next addition
    first = adds[0]
    (bn,) = [op for op in ir.consumers(first.output) if op.kind == IR.AFFINE]
    assert ir.consumers(bn.output)[0].kind == IR.RELU
    assert _reaches(ir, first.output, IR.ADD, avoid={bn.name})
    # flatten of the last feature map into the classifier
    flatten = next(op for op in ir.ops if op.kind == IR.FLATTEN)
    assert len(flatten.in_shape) == 2 and ir.consumers(flatten.output)[0].kind == IR.LINEAR
    assert flatten.out_shape == (16 * (length // 16),)


def test_ribeiro_identity_unit_adds_a_tensor_that_also_feeds_batchnorm() -> None:
    # a unit without downsampling or channel change: the previous sum goes straight into the addition
    ir = _traced(R.ribeiro_resnet(filters=(8, 12, 12), downsample=(4, 1), n_samples=600), 600)
    first, second = [op for op in ir.ops if op.kind == IR.ADD]
    assert first.output in second.inputs
    assert {op.kind for op in ir.consumers(first.output)} == {IR.AFFINE, IR.ADD}


@pytest.mark.parametrize("length", [600, 1000])
def test_grouped_conv_net_traces_grouped_convs_and_a_standalone_batchnorm(length: int) -> None:
    ir = _traced(R.grouped_conv_net(), length)
    assert {IR.CONV, IR.AFFINE, IR.MAXPOOL, IR.AVGPOOL, IR.GAP, IR.FLATTEN, IR.LINEAR} <= _kinds(ir)
    groups = {op.name: op.params["groups"] for op in ir.ops if op.kind == IR.CONV}
    assert groups["depthwise"] == 24 and groups["grouped"] == 4
    # the BatchNorm between pooling and a padded conv stays a per-channel affine op
    (affine,) = [op for op in ir.ops if op.kind == IR.AFFINE]
    assert affine.name == "pre_bn"
    assert ir.op_producing(affine.inputs[0]).kind == IR.AVGPOOL
    # functional max pooling and the pooling module's padding options
    (maxpool,) = [op for op in ir.ops if op.kind == IR.MAXPOOL]
    assert (maxpool.params["kernel"], maxpool.params["stride"], maxpool.params["padding"]) == (3, 2, 1)
    (avgpool,) = [op for op in ir.ops if op.kind == IR.AVGPOOL]
    assert avgpool.params["padding"] == 1 and avgpool.params["count_include_pad"] is False
    relus = [op for op in ir.ops if op.kind == IR.RELU]
    assert len(relus) == 4  # F.relu, traced as functions


# --------------------------------------------------------------------------- the torchvision stand-in


def _is_stand_in() -> bool:
    import torchvision

    return Path(torchvision.__file__).resolve().is_relative_to(STUBS)


def test_zennit_and_onnx2torch_import_with_the_stand_in() -> None:
    import onnx2torch
    import zennit.composites
    import zennit.torchvision

    assert callable(onnx2torch.convert)
    assert hasattr(zennit.composites, "EpsilonPlus") and hasattr(zennit.torchvision, "ResNetCanonizer")


def test_stand_in_refuses_to_be_used() -> None:
    if not _is_stand_in():
        pytest.skip("a real torchvision is installed; the stand-in is not used")
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for call in (
        lambda: torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5),
        lambda: torchvision.ops.roi_align(torch.zeros(1, 1, 2, 2), [torch.zeros(1, 4)], 1),
        lambda: torchvision.ops.box_convert(torch.zeros(1, 4), "xyxy", "cxcywh"),
        BasicBlock,
        Bottleneck,
    ):
        with pytest.raises(NotImplementedError, match="test stand-in"):
            call()
    assert issubclass(Bottleneck, nn.Module)
