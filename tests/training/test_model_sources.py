"""Bring your own model: every input form of ``ecgx export`` becomes the same IR.

Small 1-D CNNs written here, as a user would write them outside the project (grouped and
depthwise convolutions, BatchNorm before and after convolutions and standalone, overlapping
padded pooling with ceil_mode, concatenation of branches, a residual addition with a
projection shortcut, concat pooling, the flatten forms), reach the export as a factory plus
a state dict, a ``torch.export`` program, a forward-only ONNX file and (the project's own
network) a checkpoint. Each IR is run by a small interpreter below and must give the
model's logits; the factory, program and ONNX forms of the same weights must give the same
ops, shapes and parameters. The refusals the issue names must be ExportErrors naming the layer.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_clean_failure, run_ecgx, snapshot
from parity_helpers import randomise_batchnorm

from ecgx.training.export import ir as I
from ecgx.training.export.input_forms import load_source
from ecgx.training.export.ir import ExportError, ModelIR
from ecgx.training.export.onnx_import import import_onnx, onnx_forward
from ecgx.training.export.program_import import import_program

# The user's own module: written to a folder of its own (as a hospital's code would live
# outside this project), imported from there by the factory form.
USER_MODULE = "byom_user_models"
USER_SOURCE = '''
import torch
import torch.nn.functional as F
from torch import nn


class GroupedNet(nn.Module):
    """Strided stem, ResNet-style overlapping max pool, depthwise and grouped convolutions,
    average pooling with ceil_mode and count_include_pad=False, nn.Flatten, nine outputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(12, 16, 7, stride=2, padding=3, bias=False)
        self.stem_bn = nn.BatchNorm1d(16)
        self.pool = nn.MaxPool1d(3, stride=2, padding=1)
        self.depthwise = nn.Conv1d(16, 16, 5, padding=2, groups=16)
        self.dw_bn = nn.BatchNorm1d(16)
        self.grouped = nn.Conv1d(16, 16, 3, padding=1, groups=4)
        self.avg = nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(16, 9)

    def forward(self, x):
        x = self.pool(F.relu(self.stem_bn(self.stem(x))))
        x = torch.relu(self.dw_bn(self.depthwise(x)))
        x = self.avg(F.relu(self.grouped(x)))
        return self.fc(self.drop(self.flatten(self.gap(x))))


class InceptionResNet(nn.Module):
    """Parallel kernels concatenated (inception), a residual addition with a 1x1 projection
    shortcut, BatchNorm after the concatenation, concat pooling (average and max) and a
    BatchNorm before the classifier; five outputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(12, 8, 5, padding=2)
        self.b1 = nn.Conv1d(8, 8, 1)
        self.b3 = nn.Conv1d(8, 8, 3, padding=1)
        self.bpool = nn.MaxPool1d(3, stride=1, padding=1)
        self.bpool_conv = nn.Conv1d(8, 8, 1)
        self.cat_bn = nn.BatchNorm1d(24)
        self.shortcut = nn.Conv1d(8, 24, 1, bias=False)
        self.shortcut_bn = nn.BatchNorm1d(24)
        self.avgmax = nn.AdaptiveMaxPool1d(1)
        self.head_bn = nn.BatchNorm1d(48)
        self.fc = nn.Linear(48, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([self.b1(x), self.b3(x), self.bpool_conv(self.bpool(x))], dim=1)
        y = F.relu(self.cat_bn(y) + self.shortcut_bn(self.shortcut(x)))
        z = torch.cat([F.adaptive_avg_pool1d(y, 1), self.avgmax(y)], 1)
        return self.fc(self.head_bn(torch.flatten(z, 1)))


class BnFirstNet(nn.Module):
    """BatchNorm on the input (before an unpadded convolution), a mean over time without
    keepdim, view(B, -1) of a (C, L) map, nine outputs."""

    def __init__(self):
        super().__init__()
        self.in_bn = nn.BatchNorm1d(12)
        self.conv = nn.Conv1d(12, 6, 5, stride=4)
        self.conv2 = nn.Conv1d(6, 4, 3, padding=1)
        self.pool = nn.AvgPool1d(4)
        self.fc = nn.Linear(6 + 4 * 9, 9)

    def forward(self, x):
        x = F.relu(self.conv(self.in_bn(x)))
        summary = x.mean(-1)
        local = self.pool(F.relu(self.conv2(x)))
        return self.fc(torch.cat([summary, local.view(local.size(0), -1)], 1))


class Softplus(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(12, 4, 3, padding=1)
        self.act = nn.Softplus()  # an activation the IR has no kind for
        self.fc = nn.Linear(4, 9)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(-1))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(150, 8, batch_first=True)
        self.fc = nn.Linear(12 * 8, 9)

    def forward(self, x):
        return self.fc(self.lstm(x)[0].flatten(1))


class NoRunningStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(12, 4, 3, padding=1)
        self.norm = nn.BatchNorm1d(4, track_running_stats=False)
        self.fc = nn.Linear(4, 9)

    def forward(self, x):
        return self.fc(F.relu(self.norm(self.conv(x))).mean(-1))


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(12, 4, 3, padding=1)
        self.fc = nn.Linear(4, 9)

    def forward(self, x):
        features = F.relu(self.conv(x)).mean(-1)
        return self.fc(features), features


class Small(nn.Module):
    """Length-agnostic (for the dynamic-length forms)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(12, 4, 5, padding=2)
        self.fc = nn.Linear(4, 9)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool1d(F.relu(self.conv(x)), 1).flatten(1))


def grouped():
    return GroupedNet()


def inception():
    return InceptionResNet()


def bn_first():
    return BnFirstNet()


def softplus():
    return Softplus()


def recurrent():
    return Recurrent()


def no_running_stats():
    return NoRunningStats()


def tuple_out():
    return TupleOut()


def small():
    return Small()


def needs_arguments(width):
    return Small()


def raises():
    raise RuntimeError("weights server unreachable")


def not_a_module():
    return {"conv": 1}


NOT_CALLABLE = 3
'''

# (factory, input length, number of outputs)
MODELS = {
    "grouped": (150, 9),
    "inception": (64, 5),
    "bn_first": (150, 9),
}
SAMPLING = 250.0


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory):
    """The user's folder holding their model module, importable for the rest of this file."""
    folder = tmp_path_factory.mktemp("hospital")
    (folder / f"{USER_MODULE}.py").write_text(USER_SOURCE)
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(USER_MODULE, None)


@pytest.fixture(scope="module")
def user(user_dir: Path):
    return importlib.import_module(USER_MODULE)


def _build(user, factory: str) -> torch.nn.Module:
    torch.manual_seed(sum(map(ord, factory)))
    model = getattr(user, factory)()
    if all(m.track_running_stats for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        randomise_batchnorm(model)
    return model.eval()


def _save_forms(model: torch.nn.Module, folder: Path, length: int, **onnx_kwargs) -> dict[str, Path]:
    """The model's state dict, its torch.export program and its ONNX file (TorchScript exporter)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, program, onnx_file = folder / "weights.pt", folder / "model.pt2", folder / "model.onnx"
    torch.save(model.state_dict(), weights)
    example = (torch.zeros(1, 12, length),)
    torch.export.save(torch.export.export(model, example), program)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            onnx_file,
            dynamo=False,
            opset_version=onnx_kwargs.pop("opset_version", 17),
            input_names=["ecg"],
            output_names=["logits"],
            **onnx_kwargs,
        )
    return {"weights": weights, "program": program, "onnx": onnx_file}


# --------------------------------------------------------------------------- the IR interpreter


def run_ir(ir: ModelIR, x: np.ndarray) -> np.ndarray:
    """Evaluate the IR op by op in float64 (PyTorch's functional ops as the reference semantics
    of each kind), checking every op's declared per-sample shape on the way."""
    env = {I.INPUT: torch.as_tensor(np.asarray(x, np.float64))}

    def t(v):
        return None if v is None else torch.as_tensor(v)

    for op in ir.ops:
        a, p = [env[i] for i in op.inputs], op.params
        if op.kind == I.CONV:
            y = F.conv1d(
                a[0], t(p["weight"]), t(p["bias"]), p["stride"], p["padding"], p["dilation"], p["groups"]
            )
        elif op.kind == I.LINEAR:
            y = F.linear(a[0], t(p["weight"]), t(p["bias"]))
        elif op.kind == I.AFFINE:
            shape = (-1,) + (1,) * (a[0].dim() - 2)
            y = a[0] * t(p["weight"]).reshape(shape) + t(p["bias"]).reshape(shape)
        elif op.kind == I.MAXPOOL:
            y = F.max_pool1d(a[0], p["kernel"], p["stride"], p["padding"], ceil_mode=p["ceil_mode"])
        elif op.kind == I.AVGPOOL:
            y = F.avg_pool1d(
                a[0], p["kernel"], p["stride"], p["padding"], p["ceil_mode"], p["count_include_pad"]
            )
        elif op.kind == I.GAP:
            y = a[0].mean(-1, keepdim=True)
        elif op.kind == I.GMP:
            y = a[0].amax(-1, keepdim=True)
        elif op.kind == I.ADD:
            y = a[0] + a[1]
        elif op.kind == I.CONCAT:
            y = torch.cat(a, 1)
        elif op.kind == I.RELU:
            y = a[0].clamp_min(0)
        elif op.kind == I.FLATTEN:
            y = a[0].flatten(1)
        else:  # pragma: no cover - a new op kind needs a line here
            raise AssertionError(f"unknown op kind {op.kind}")
        assert tuple(y.shape[1:]) == op.out_shape, f"{op.name}: {tuple(y.shape[1:])} != {op.out_shape}"
        env[op.output] = y
    return env[ir.output].numpy()


def _logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x)).double().numpy()


def _assert_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(got - ref).max()) / scale
    assert err < 1e-5, f"{what}: max error {err:.2e} of the largest logit"


def _signature(ir: ModelIR) -> list[tuple]:
    return [(op.kind, op.out_shape, op.in_shapes) for op in ir.ops]


def _assert_same_ir(a: ModelIR, b: ModelIR, what: str) -> None:
    assert _signature(a) == _signature(b), f"{what}: op kinds or shapes differ"
    for op_a, op_b in zip(a.ops, b.ops, strict=True):
        keys = set(op_a.params) - {"folded"}
        assert keys == set(op_b.params) - {"folded"}, f"{what}: {op_a.name} vs {op_b.name} parameters"
        for key in keys:
            va, vb = op_a.params[key], op_b.params[key]
            if isinstance(va, np.ndarray) or isinstance(vb, np.ndarray):
                # float32 weights folded in float64 (IR) or in float32 (the ONNX exporter)
                np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-6, err_msg=f"{what}: {op_a.name}.{key}")
            else:
                assert va == vb, f"{what}: {op_a.name}.{key} {va} != {vb}"


# --------------------------------------------------------------------------- (a) every form, one IR


@pytest.mark.parametrize("factory", sorted(MODELS))
def test_every_form_gives_the_models_ir(
    factory: str, user, user_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    length, n_out = MODELS[factory]
    model = _build(user, factory)
    files = _save_forms(model, tmp_path, length)
    x = np.random.default_rng(0).normal(size=(4, 12, length)).astype(np.float32)
    ref = _logits(model, x)
    classes = None if n_out == 9 else [f"c{i}" for i in range(n_out)]
    kw = {"input_length": length, "sampling_rate_hz": SAMPLING, "classes": classes}

    monkeypatch.chdir(user_dir)  # the factory's module is found beside the user, as for python -m
    sources = {
        "factory": load_source(f"{USER_MODULE}:{factory}", weights=files["weights"], **kw),
        "program": load_source(files["program"], **kw),
        "onnx": load_source(files["onnx"], **kw),
    }
    for form, source in sources.items():
        assert source.input_shape == (12, length), form
        assert source.ir.n_outputs == n_out, form
        assert source.sampling_rate_hz == SAMPLING
        _assert_close(run_ir(source.ir, x), ref, f"{form} IR")
        _assert_close(np.asarray(source.forward(x), np.float64), ref, f"{form} forward")
        assert (source.original is None) == (form == "onnx"), form
        if classes is None:
            assert source.classes is None
        else:
            assert source.classes == [{"key": c, "code": c, "name": c} for c in classes]
    _assert_same_ir(sources["factory"].ir, sources["program"].ir, "factory vs .pt2")
    _assert_same_ir(sources["factory"].ir, sources["onnx"].ir, "factory vs .onnx")
    # the original of a program runs batches and carries autograd (the gradient check needs it)
    xt = torch.as_tensor(x[:2]).requires_grad_(True)
    sources["program"].original(xt)[:, 0].sum().backward()
    assert xt.grad is not None and xt.grad.abs().sum() > 0

    desc = sources["factory"].description
    assert desc["form"] == "factory" and desc["factory"] == f"{USER_MODULE}:{factory}"
    assert len(desc["sha256"]) == 64 and desc["weights"].endswith("weights.pt")
    assert sources["onnx"].description["form"] == "onnx"
    assert sources["program"].description["path"].endswith("model.pt2")


def test_checkpoint_form(tmp_path: Path) -> None:
    from ecgx.training.checkpoint import save_checkpoint
    from ecgx.training.models import ModelConfig, build_model

    torch.manual_seed(1)
    model = build_model(ModelConfig(widths=(8, 16), stem_stride=4, residual=True))
    randomise_batchnorm(model)
    path = save_checkpoint(tmp_path / "checkpoint.pt", model.eval())
    source = load_source(path)
    x = np.random.default_rng(1).normal(size=(3, 12, 600)).astype(np.float32)
    _assert_close(run_ir(source.ir, x), _logits(model.eval(), x), "checkpoint IR")
    assert source.input_shape == (12, 600) and source.sampling_rate_hz == 500.0
    assert source.classes is None and source.description["form"] == "checkpoint"
    with pytest.raises(ExportError, match="carries its own weights"):
        load_source(path, weights=path)


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
def test_onnx_opsets_and_a_fixed_batch(opset: int, user, tmp_path: Path) -> None:
    """Opsets 11-21 of the TorchScript exporter; a file fixed to batch 1 still runs batches."""
    model = _build(user, "grouped")
    files = _save_forms(model, tmp_path, 150, opset_version=opset)
    x = np.random.default_rng(2).normal(size=(3, 12, 150)).astype(np.float32)
    ir = import_onnx(files["onnx"])
    _assert_close(run_ir(ir, x), _logits(model, x), f"opset {opset}")
    _assert_close(np.asarray(onnx_forward(files["onnx"])(x), np.float64), _logits(model, x), "forward")


def test_dynamic_length_forms(user, tmp_path: Path) -> None:
    """A model exported with a dynamic time axis imports at the length given, and only then."""
    model = _build(user, "small")
    onnx_file, program = tmp_path / "dyn.onnx", tmp_path / "dyn.pt2"
    example = (torch.zeros(1, 12, 64),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            onnx_file,
            dynamo=False,
            opset_version=17,
            input_names=["ecg"],
            dynamic_axes={"ecg": {0: "batch", 2: "samples"}},
        )
    dims = {"x": {0: torch.export.Dim("batch"), 2: torch.export.Dim("samples", min=8, max=10000)}}
    # an example batch of two: a batch of one would be specialised to a constant
    torch.export.save(torch.export.export(model, (torch.zeros(2, 12, 64),), dynamic_shapes=dims), program)
    for path in (onnx_file, program):
        with pytest.raises(ExportError, match="--input-length") as e:
            load_source(path, sampling_rate_hz=SAMPLING)
        assert "dynamic" in str(e.value)
        source = load_source(path, input_length=333, sampling_rate_hz=SAMPLING)
        assert source.input_shape == (12, 333)
        x = np.random.default_rng(3).normal(size=(2, 12, 333)).astype(np.float32)
        _assert_close(run_ir(source.ir, x), _logits(model, x), path.suffix)
        _assert_close(np.asarray(source.forward(x), np.float64), _logits(model, x), f"{path.suffix} forward")


def test_decomposed_program(user, tmp_path: Path) -> None:
    """A program saved after run_decompositions() (addmm, 2-D pooling around unsqueeze/squeeze)."""
    model = _build(user, "inception")
    ep = torch.export.export(model, (torch.zeros(1, 12, 64),)).run_decompositions()
    torch.export.save(ep, tmp_path / "core.pt2")
    ir, module = import_program(tmp_path / "core.pt2")
    x = np.random.default_rng(4).normal(size=(2, 12, 64)).astype(np.float32)
    _assert_close(run_ir(ir, x), _logits(model, x), "decomposed program")
    _assert_close(_logits(module, x), _logits(model, x), "decomposed program's module")


def test_program_with_a_fixed_batch(user, tmp_path: Path) -> None:
    """A program exported for a batch of three runs any batch (in padded chunks), autograd included."""
    model = _build(user, "grouped")
    torch.export.save(torch.export.export(model, (torch.zeros(3, 12, 150),)), tmp_path / "b3.pt2")
    source = load_source(tmp_path / "b3.pt2", sampling_rate_hz=SAMPLING)
    x = np.random.default_rng(6).normal(size=(7, 12, 150)).astype(np.float32)
    _assert_close(np.asarray(source.forward(x), np.float64), _logits(model, x), "forward of 7")
    _assert_close(run_ir(source.ir, x), _logits(model, x), "IR")
    xt = torch.as_tensor(x[:2]).requires_grad_(True)
    ref = torch.as_tensor(x[:2]).requires_grad_(True)
    source.original(xt)[:, 1].sum().backward()
    model(ref)[:, 1].sum().backward()
    np.testing.assert_allclose(xt.grad.numpy(), ref.grad.numpy(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- (b) onnx2torch reference


def test_onnx_file_converted_back_by_onnx2torch(user, tmp_path: Path) -> None:
    if not (Path(__file__).parents[1] / "stubs" / "torchvision").is_dir():
        pytest.skip("tests/stubs/torchvision (the stand-in onnx2torch imports) is not there yet")
    onnx2torch = pytest.importorskip("onnx2torch")
    model = _build(user, "inception")
    files = _save_forms(model, tmp_path, 64)
    back = onnx2torch.convert(str(files["onnx"])).eval()
    x = np.random.default_rng(5).normal(size=(3, 12, 64)).astype(np.float32)
    ref = _logits(model, x)
    _assert_close(_logits(back, x), ref, "onnx2torch module")
    source = load_source(files["onnx"], sampling_rate_hz=SAMPLING, classes=[f"c{i}" for i in range(5)])
    _assert_close(run_ir(source.ir, x), _logits(back, x), "ONNX IR vs onnx2torch")


# --------------------------------------------------------------------------- (c) refusals


@pytest.mark.parametrize(
    ("factory", "form", "layer", "fragments"),
    [
        (factory, form, layer, fragments)
        for factory, layer, fragments in [
            ("softplus", "act", ["oftplus", "supported"]),  # .pt2 names it "softplus"
            ("recurrent", "lstm", ["LSTM", "convolutions"]),
            ("no_running_stats", "norm", ["running statistics"]),
            ("tuple_out", None, ["one tensor of logits"]),
        ]
        for form in ("factory", "program", "onnx")
    ],
)
def test_refusals_in_every_form(factory, form, layer, fragments, user, user_dir, tmp_path, monkeypatch):
    model = _build(user, factory)
    length = 150
    example = (torch.zeros(1, 12, length),)
    if form == "factory":
        torch.save(model.state_dict(), tmp_path / "w.pt")
        monkeypatch.chdir(user_dir)
        spec = f"{USER_MODULE}:{factory}"
        load = lambda: load_source(spec, weights=tmp_path / "w.pt", input_length=length, partial=False)  # noqa: E731
    elif form == "program":
        torch.export.save(torch.export.export(model, example), tmp_path / "m.pt2")
        load = lambda: load_source(tmp_path / "m.pt2", partial=False)  # noqa: E731
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, example, tmp_path / "m.onnx", dynamo=False, opset_version=17)
        load = lambda: load_source(tmp_path / "m.onnx", partial=False)  # noqa: E731
    with pytest.raises(ExportError) as e:
        load()
    message = str(e.value)
    if layer is not None:
        assert f"layer {layer} " in message or f"layer /{layer}" in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message}"


def test_bad_state_dict(user, user_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(user_dir)
    state = _build(user, "grouped").state_dict()
    state["extra.weight"] = torch.zeros(3)
    del state["fc.bias"]
    state["stem.weight"] = torch.zeros(16, 12, 5)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ExportError) as e:
        load_source(
            f"{USER_MODULE}:grouped", weights=tmp_path / "bad.pt", input_length=150, sampling_rate_hz=1
        )
    message = str(e.value)
    assert "\n" not in message
    for fragment in (
        "missing keys: fc.bias",
        "unexpected keys: extra.weight",
        "stem.weight (16, 12, 5) vs (16, 12, 7)",
    ):
        assert fragment in message
    # not a state dict at all, and a file that needs code to unpickle
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ExportError, match="not a state dict"):
        load_source(f"{USER_MODULE}:grouped", weights=tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ExportError, match="tensors"):
        load_source(f"{USER_MODULE}:grouped", weights=tmp_path / "junk.pt")
    with pytest.raises(ExportError, match="--weights"):
        load_source(f"{USER_MODULE}:grouped")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("no_such_package_xyz.models:build", "cannot be imported (ModuleNotFoundError"),
        (f"{USER_MODULE}:missing", "has no attribute missing"),
        (f"{USER_MODULE}:NOT_CALLABLE", "is a int, not a function"),
        (f"{USER_MODULE}:raises", "the factory raised RuntimeError: weights server unreachable"),
        (f"{USER_MODULE}:needs_arguments", "the factory raised TypeError"),
        (f"{USER_MODULE}:not_a_module", "returned a dict, not a torch.nn.Module"),
    ],
)
def test_factory_errors(spec, fragment, user_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(user_dir)
    torch.save({}, tmp_path / "w.pt")
    with pytest.raises(ExportError) as e:
        load_source(spec, weights=tmp_path / "w.pt")
    assert fragment in str(e.value) and spec in str(e.value)


def test_classes_and_sampling_rate(user, user_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(user_dir)
    model = _build(user, "inception")
    files = _save_forms(model, tmp_path, 64)
    with pytest.raises(ExportError, match="5 outputs; name its classes with --classes"):
        load_source(files["onnx"], sampling_rate_hz=SAMPLING)
    with pytest.raises(ExportError, match="--classes gives 2 names, but the model has 5 outputs"):
        load_source(files["onnx"], sampling_rate_hz=SAMPLING, classes=["a", "b"])
    with pytest.raises(ExportError, match="more than once"):
        load_source(files["onnx"], sampling_rate_hz=SAMPLING, classes=["a", "a", "b", "c", "d"])
    names = tmp_path / "classes.txt"
    names.write_text("NORM\nMI\n\nSTTC\nCD\nHYP\n")
    source = load_source(files["onnx"], sampling_rate_hz=SAMPLING, classes=names)
    assert [c["key"] for c in source.classes] == ["NORM", "MI", "STTC", "CD", "HYP"]
    assert (
        load_source(files["program"], sampling_rate_hz=SAMPLING, classes="a,b,c,d,e").classes[4]["name"]
        == "e"
    )
    # nine outputs and no names: the project's classes; other names must still count nine
    weights = _save_forms(_build(user, "grouped"), tmp_path / "g", 150)["weights"]
    spec = f"{USER_MODULE}:grouped"
    with pytest.raises(ExportError, match="--classes gives 5 names, but the model has 9 outputs"):
        load_source(spec, weights=weights, input_length=150, sampling_rate_hz=SAMPLING, classes=list("abcde"))
    # the sampling rate: required off the project's 600 samples, unless the file records it
    with pytest.raises(ExportError, match="pass --sampling-rate"):
        load_source(spec, weights=weights, input_length=150)
    with pytest.raises(ExportError, match="positive number of Hz"):
        load_source(spec, weights=weights, input_length=150, sampling_rate_hz=-5.0)
    import onnx

    stored = onnx.load(str(files["onnx"]))
    onnx.helper.set_model_props(stored, {"sampling_rate_hz": "360"})
    onnx.save(stored, str(tmp_path / "with_rate.onnx"))
    assert load_source(tmp_path / "with_rate.onnx", classes="a,b,c,d,e").sampling_rate_hz == 360.0


def test_onnx_input_and_operator_refusals(tmp_path: Path) -> None:
    """Several inputs, a non-float input, a 2-D input, an unsupported operator with its node name."""
    from onnx import TensorProto, helper

    def save(nodes, inputs, outputs, name, inits=()):
        graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
        path = tmp_path / f"{name}.onnx"
        import onnx

        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    f = TensorProto.FLOAT
    x = helper.make_tensor_value_info("x", f, [1, 12, 50])
    y = helper.make_tensor_value_info("y", f, None)
    two = save(
        [helper.make_node("Add", ["x", "x2"], ["y"], name="sum")],
        [x, helper.make_tensor_value_info("x2", f, [1, 12, 50])],
        [y],
        "two",
    )
    with pytest.raises(ExportError, match="2 inputs and 1 outputs"):
        import_onnx(two)
    ints = save(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 12, 50])],
        [y],
        "ints",
    )
    with pytest.raises(ExportError, match="INT64; it must be float32"):
        import_onnx(ints)
    flat = save(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", f, [1, 600])],
        [y],
        "flat",
    )
    with pytest.raises(ExportError, match="must be 3-D"):
        import_onnx(flat)
    sig = save([helper.make_node("Sigmoid", ["x"], ["y"], name="head/prob")], [x], [y], "sigmoid")
    with pytest.raises(ExportError, match=r"layer head/prob \(Sigmoid\).*keep the sigmoid outside"):
        import_onnx(sig)
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        import_onnx(tmp_path / "junk.onnx")


def _handmade_onnx(path: Path, opset: int, conv_attrs=None, gemm_attrs=None) -> Path:
    """A graph as another framework would write it (no PyTorch): SAME padding, BatchNormalization,
    ReduceMean / ReduceMax over time with and without keepdims, Squeeze, MatMul + Add bias, Gemm
    with an untransposed weight, Identity and Dropout, and a dynamic batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)

    def init(name, *shape, positive=False):
        value = rng.uniform(0.5, 1.5, shape) if positive else rng.normal(0, 0.3, shape)
        return numpy_helper.from_array(value.astype(np.float32), name)

    axes_last = numpy_helper.from_array(np.array([-1], np.int64), "axes_last")
    axes_time = numpy_helper.from_array(np.array([2], np.int64), "axes_time")
    inits = [
        init("w1", 8, 12, 3), init("scale", 8, positive=True), init("shift", 8), init("mean", 8),
        init("var", 8, positive=True), init("wm", 80, 16), init("bm", 16), init("wg", 16, 4), init("bg", 4),
    ]  # fmt: skip
    reduce_axes = opset >= 18  # ReduceMean / ReduceMax take axes as an input from opset 18
    squeeze_axes = opset >= 13
    if reduce_axes or squeeze_axes:
        inits += [axes_last, axes_time]

    def reduce(op, src, out, axes, keep):
        if reduce_axes:
            return helper.make_node(op, [src, axes], [out], name=f"head/{out}", keepdims=keep)
        values = [-1] if axes == "axes_last" else [2]
        return helper.make_node(op, [src], [out], name=f"head/{out}", keepdims=keep, axes=values)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="block/conv",
                         **(conv_attrs or {"auto_pad": "SAME_UPPER"})),
        helper.make_node("BatchNormalization", ["c1", "scale", "shift", "mean", "var"], ["bn"],
                         name="block/bn"),
        helper.make_node("Relu", ["bn"], ["r1"], name="block/relu"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="block/pool", kernel_shape=[3], strides=[2],
                         pads=[1, 1]),
        helper.make_node("AveragePool", ["p1"], ["p2"], name="block/avg", kernel_shape=[2], strides=[2],
                         count_include_pad=1),
        reduce("ReduceMean", "p1", "g1", "axes_last", 1),
        reduce("ReduceMax", "p1", "g2", "axes_time", 0),
        helper.make_node("Squeeze", ["g1", "axes_time"] if squeeze_axes else ["g1"], ["s1"],
                         name="head/squeeze", **({} if squeeze_axes else {"axes": [2]})),
        helper.make_node("Concat", ["s1", "g2"], ["cat"], name="head/concat", axis=-1),
        helper.make_node("Flatten", ["p2"], ["f"], name="head/flatten", axis=1),
        helper.make_node("MatMul", ["f", "wm"], ["mm"], name="head/matmul"),
        helper.make_node("Add", ["mm", "bm"], ["lin"], name="head/bias"),
        helper.make_node("Add", ["cat", "lin"], ["sum"], name="head/sum"),
        helper.make_node("Identity", ["sum"], ["same"], name="head/identity"),
        helper.make_node("Dropout", ["same"], ["dropped"], name="head/dropout"),
        helper.make_node("Relu", ["dropped"], ["r2"], name="head/relu"),
        helper.make_node("Gemm", ["r2", "wg", "bg"], ["logits"], name="head/classifier",
                         **(gemm_attrs or {})),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "handmade",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 40])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
def test_onnx_from_another_framework(opset: int, tmp_path: Path) -> None:
    path = _handmade_onnx(tmp_path / "handmade.onnx", opset)
    ir = import_onnx(path)
    assert [op.kind for op in ir.ops] == [
        I.CONV, I.RELU, I.MAXPOOL, I.AVGPOOL, I.GAP, I.GMP, I.FLATTEN, I.FLATTEN, I.CONCAT, I.FLATTEN,
        I.LINEAR, I.ADD, I.RELU, I.LINEAR,
    ]  # fmt: skip
    assert ir.ops[0].params["padding"] == 1 and ir.ops[0].params["folded"] == "block/bn"
    assert ir.ops[10].params["bias"] is not None  # the Add after MatMul became its bias
    x = np.random.default_rng(8).normal(size=(3, 12, 40)).astype(np.float32)
    _assert_close(run_ir(ir, x), np.asarray(onnx_forward(path)(x), np.float64), f"handmade opset {opset}")


@pytest.mark.parametrize(
    ("conv_attrs", "gemm_attrs", "fragments"),
    [
        ({"pads": [0, 2]}, None, ["layer block/conv (Conv)", "same padding at both ends"]),
        ({"auto_pad": "SAME_LOWER"}, None, None),
        ({"pads": [2, 2], "dilations": [2]}, None, None),
        (None, {"alpha": 0.5}, ["layer head/classifier (Gemm)", "alpha = beta = 1"]),
    ],
)
def test_onnx_attribute_refusals(conv_attrs, gemm_attrs, fragments, tmp_path: Path) -> None:
    path = _handmade_onnx(tmp_path / "m.onnx", 17, conv_attrs, gemm_attrs)
    if fragments is None:  # supported: it must import and run
        x = np.random.default_rng(9).normal(size=(2, 12, 40)).astype(np.float32)
        ir = import_onnx(path)
        _assert_close(run_ir(ir, x), np.asarray(onnx_forward(path)(x), np.float64), str(conv_attrs))
        return
    with pytest.raises(ExportError) as e:
        import_onnx(path)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_model_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no such ONNX file"):
        load_source(tmp_path / "missing.onnx")
    with pytest.raises(ExportError, match="no such file"):
        load_source(tmp_path / "checkpoint.pt")
    with pytest.raises(ExportError, match=r"no such torch\.export program"):
        load_source(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    with pytest.raises(ExportError, match=r"not a readable torch\.export program"):
        load_source(tmp_path / "junk.pt2")
    with pytest.raises(ExportError, match="--input-length must be a positive"):
        load_source(tmp_path / "missing.onnx", input_length=0)


# --------------------------------------------------------------------------- (d) the command line


def _export_takes_source() -> bool:
    from ecgx.training.export import export_package

    first = next(iter(inspect.signature(export_package).parameters.values()))
    return "ModelSource" in str(first.annotation)


def test_cli_export_refusals(user, user_dir: Path, tmp_path: Path) -> None:
    """Bad --model input fails cleanly (one line, exit 2, nothing written), whatever export_package takes."""
    torch.save(_build(user, "grouped").state_dict(), tmp_path / "w.pt")
    out = tmp_path / "pkg"
    before = snapshot(tmp_path)
    result = run_ecgx(
        "export",
        "--model",
        "no_such_pkg_xyz:build",
        "--weights",
        str(tmp_path / "w.pt"),
        "--out",
        str(out),
        cwd=user_dir,
    )
    assert_clean_failure(result, "no_such_pkg_xyz", "cannot be imported", before=before, roots=[tmp_path])
    result = run_ecgx(
        "export",
        "--model",
        f"{USER_MODULE}:grouped",
        "--weights",
        str(tmp_path / "w.pt"),
        "--input-length",
        "150",
        "--out",
        str(out),
        cwd=user_dir,
    )
    assert_clean_failure(result, "--sampling-rate", before=before, roots=[tmp_path])
    result = run_ecgx("export", str(tmp_path / "w.pt"), "--model", "x.onnx", "--out", str(out))
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(
    not _export_takes_source(),
    reason="ecgx.training.export.export_package does not accept a ModelSource yet (the lead is adapting it)",
)
def test_cli_export_factory_and_onnx(user, user_dir: Path, tmp_path: Path) -> None:
    """ecgx export --model: a factory plus weights (the project's 600 samples at 500 Hz), and an
    ONNX file at another length and rate with its class names in a file."""
    import json

    from ecgx.core.package_reader import sha256_file

    model = _build(user, "grouped")
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "pkg"
    result = run_ecgx(
        "export",
        "--model",
        f"{USER_MODULE}:grouped",
        "--weights",
        str(weights),
        "--input-length",
        "600",
        "--sampling-rate",
        "500",
        "--out",
        str(out),
        cwd=user_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["form"] == "factory"
    assert manifest["source"]["factory"] == f"{USER_MODULE}:grouped"
    assert manifest["source"]["sha256"] == sha256_file(weights)
    assert manifest["input"]["shape"][1:] == [12, 600] and manifest["input"]["sampling_rate_hz"] == 500.0

    files = _save_forms(_build(user, "inception"), tmp_path / "inc", 64)
    names = tmp_path / "classes.txt"
    names.write_text("NORM\nMI\nSTTC\nCD\nHYP\n")
    out = tmp_path / "pkg_onnx"
    result = run_ecgx(
        "export",
        "--model",
        str(files["onnx"]),
        "--sampling-rate",
        "100",
        "--classes",
        str(names),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["form"] == "onnx"
    assert manifest["source"]["sha256"] == sha256_file(files["onnx"])
    assert [c["key"] for c in manifest["classes"]] == ["NORM", "MI", "STTC", "CD", "HYP"]
    assert manifest["input"]["shape"][1:] == [12, 64] and manifest["input"]["sampling_rate_hz"] == 100.0


def test_cli_export_checkpoint_given_as_model(tmp_path: Path) -> None:
    """--model CHECKPOINT exports as the positional form does (its provenance in the manifest)."""
    import json

    from ecgx.training.checkpoint import save_checkpoint
    from ecgx.training.models import ModelConfig, build_model

    torch.manual_seed(2)
    path = save_checkpoint(
        tmp_path / "checkpoint.pt", build_model(ModelConfig(widths=(8,), stem_stride=4)).eval()
    )
    result = run_ecgx("export", "--model", str(path), "--out", str(tmp_path / "pkg"))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"] == str(path.resolve())
    before = snapshot(tmp_path)
    result = run_ecgx("export", "--model", str(path), "--weights", str(path), "--out", str(tmp_path / "pkg2"))
    assert_clean_failure(
        result, "--weights does not apply to a project checkpoint", before=before, roots=[tmp_path]
    )
