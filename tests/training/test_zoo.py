"""The model zoo (issue #25): every published network of ``tests/zoo_models.py`` builds and exports
through the ``module:factory`` form (fully, or partially with the reasons), and the networks the IR
reads export with no refusal whatever the check ECGs: 2 seeds in the default run, ``ECGX_ZOO_SEEDS`` (3
unless set; 20 for the issue's figure, about 30 minutes on 2 cores) per network with ``-m slow``.
The networks run at ``CI_WIDTH``; the layer patterns, not the capacity, are what the export meets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zoo_models
from zoo_models import CI_WIDTH, ZOO, synthetic_ecgs, zoo_model

from ecgx.training.export import export_package
from ecgx.training.export.input_forms import load_source
from ecgx.training.export.ir import ExportError
from ecgx.training.export.ir_torch import ir_module
from ecgx.training.export.source import from_module

CLASSES = [f"c{i}" for i in range(5)]
CLASS_RECORDS = [{"key": c, "code": str(i), "name": c} for i, c in enumerate(CLASSES)]
FULL_NETWORKS = [name for name, entry in ZOO.items() if entry.full]
PARTIAL_NETWORKS = [name for name, entry in ZOO.items() if not entry.full]


def _factory_source(name: str, folder: Path):
    entry = ZOO[name]
    torch.save(zoo_model(name, width=CI_WIDTH).state_dict(), folder / "w.pt")
    return load_source(
        f"zoo_models:{name}_ci",
        weights=folder / "w.pt",
        input_length=entry.samples,
        sampling_rate_hz=entry.rate_hz,
        classes=CLASSES,
    )


def _manifest(pkg: Path) -> dict:
    return json.loads((pkg / "manifest.json").read_text())


def _refusals(manifest: dict) -> dict[str, str]:
    """Graphs left out for a reason other than the export's own choice, with the reason."""
    return {
        g: u["reason"]
        for g, u in manifest["unavailable"].items()
        if u["methods"] and not u["reason"].startswith("left out of this export")
    }


@pytest.mark.parametrize("name", list(ZOO))
def test_each_zoo_network_exports_through_the_factory_form(name, tmp_path) -> None:
    """The factory form reads the model as it computes, and the export writes a package (the
    essential graphs only, for time) with the forward graph; a graph left out (a partial package)
    names its reason."""
    source = _factory_source(name, tmp_path)
    x = synthetic_ecgs(4, 12, ZOO[name].samples, seed=7)
    with torch.no_grad():
        want = zoo_model(name, width=CI_WIDTH)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(source.forward(x), want, atol=1e-5, rtol=0)
    try:
        pkg = export_package(source, tmp_path / "pkg", graphs=[])
    except ExportError as e:
        pytest.fail(f"{name} is refused as a whole: {e}")
    manifest = _manifest(pkg)
    assert "forward" in manifest["graphs"]
    for graph, entry in manifest["unavailable"].items():
        assert entry["reason"], graph


def _check_ecgs(name: str, seed: int) -> np.ndarray:
    return synthetic_ecgs(8, 12, ZOO[name].samples, seed=10_000 + seed)


def _assert_no_false_refusal(name: str, seed: int, tmp_path: Path) -> None:
    model = zoo_models.zoo_model(name, width=CI_WIDTH)
    entry = ZOO[name]
    source = from_module(model, (12, entry.samples), sampling_rate_hz=entry.rate_hz, classes=CLASS_RECORDS)
    pkg = export_package(source, tmp_path / "pkg", sample_inputs=_check_ecgs(name, seed), overwrite=True)
    refused = _refusals(_manifest(pkg))
    assert not refused, f"{name} seed {seed}: {refused}"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["fcn_wang", "resnet1d_wang"])
def test_relu_networks_export_with_every_method(name, seed, tmp_path) -> None:
    _assert_no_false_refusal(name, seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(int(os.environ.get("ECGX_ZOO_SEEDS", "3"))))
@pytest.mark.parametrize("name", FULL_NETWORKS)
def test_networks_export_with_every_method_on_20_seeds(name, seed, tmp_path) -> None:
    _assert_no_false_refusal(name, seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(int(os.environ.get("ECGX_ZOO_SEEDS", "3"))))
@pytest.mark.parametrize("name", PARTIAL_NETWORKS)
def test_recurrent_networks_export_the_forward_only_methods_on_20_seeds(name, seed, tmp_path) -> None:
    """The recurrent nets' partial packages: the forward graph accepted whatever the check ECGs, and
    exactly the forward-only methods served, every other graph unavailable for the recurrent layer."""
    entry = ZOO[name]
    model = zoo_models.zoo_model(name, width=CI_WIDTH)
    source = from_module(model, (12, entry.samples), sampling_rate_hz=entry.rate_hz, classes=CLASS_RECORDS)
    pkg = export_package(source, tmp_path / "pkg", sample_inputs=_check_ecgs(name, seed), overwrite=True)
    manifest = _manifest(pkg)
    assert manifest["verification"]["checks"]["forward"]["ok"]
    assert manifest["partial"]["methods"] == [
        "occlusion",
        "feature_ablation",
        "kernel_shap",
        "lime",
        "random",
    ]
    assert all("is a recurrent layer" in u["reason"] for u in manifest["unavailable"].values())


# Seeds of check ECGs that were false refusals before float32's spread was measured (issue #25):
# Ribeiro's pre-activation ResNet, where PyTorch's float32 LRP maps are off against float64 by up to
# 6e-2 of the largest value on some samples (the engine as far or closer), and inception1d, where
# PyTorch's float32 LRP-epsilon run rounded luckily (the input moved by one rounding: 2.2e-4). On
# sen's seed 12 no float32 run shows the engine's LRP error (2.6e-4 against 1.3e-4 at most), but the
# engine's own graph run in float64 equals the reference to 2.6e-8: ONNX Runtime's rounding.
@pytest.mark.parametrize(
    ("name", "seed", "excuse"),
    [
        ("ribeiro600", 4, "float32_spread"),
        ("ribeiro4096", 12, "float32_spread"),
        ("inception1d", 15, "float32_spread"),
        ("sen", 12, "float32_arithmetic"),
    ],
)
def test_check_ecgs_float32_does_not_pin_down_are_no_false_refusal(name, seed, excuse, tmp_path) -> None:
    _assert_no_false_refusal(name, seed, tmp_path)
    excused = _manifest(tmp_path / "pkg")["verification"]["excused_samples"]
    assert excused.get(excuse, 0) >= 1, excused


def test_a_graph_wrong_on_one_check_ecg_is_refused_though_run_in_float64(tmp_path) -> None:
    """The float64 run of the engine's own graph excuses only rounding: an LRP graph that is 1 % off
    on one check ECG alone (its peak above a threshold) is that far off in float64 too, and refused."""
    from onnx import TensorProto, helper, numpy_helper

    from ecgx.training.export.graphs import build_graph

    name, seed = "sen", 12
    x = _check_ecgs(name, seed)
    peaks = np.sort(x.max(axis=(1, 2)))
    threshold = float(peaks[-2] + peaks[-1]) / 2  # between the two highest: one ECG is off

    def wrong_on_one(ir, graph, layer):
        model = build_graph(ir, graph, layer)
        if graph != "lrp":
            return model
        g = model.graph
        out = g.output[1].name
        for node in g.node:
            node.output[:] = [f"{o}_right" if o == out else o for o in node.output]
        g.initializer.extend(
            [
                numpy_helper.from_array(np.array(threshold, np.float32), "wrong_threshold"),
                numpy_helper.from_array(np.array(0.01, np.float32), "wrong_size"),
                numpy_helper.from_array(np.array(1.0, np.float32), "wrong_one"),
            ]
        )
        g.node.extend(
            [
                helper.make_node("ReduceMax", ["x"], ["wrong_peak"], axes=[1, 2], keepdims=1),
                helper.make_node("Greater", ["wrong_peak", "wrong_threshold"], ["wrong_hit"]),
                helper.make_node("Cast", ["wrong_hit"], ["wrong_hit_f"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["wrong_hit_f", "wrong_size"], ["wrong_delta"]),
                helper.make_node("Add", ["wrong_delta", "wrong_one"], ["wrong_factor"]),
                helper.make_node("Mul", [f"{out}_right", "wrong_factor"], [out]),
            ]
        )
        return model

    entry = ZOO[name]
    source = from_module(zoo_model(name, width=CI_WIDTH), (12, entry.samples), classes=CLASS_RECORDS)
    pkg = export_package(
        source, tmp_path / "pkg", sample_inputs=x, graphs=["lrp"], graph_builder=wrong_on_one
    )
    manifest = _manifest(pkg)
    assert "lrp" in manifest["unavailable"], manifest["unavailable"].keys()
    failing = manifest["verification"]["checks"]["lrp"]["failing"]
    assert len(failing) == 1 and failing[0]["graph_in_float64"] > 1e-3, failing


def test_a_wrong_lrp_composite_is_still_refused_where_float32_does_not_pin_samples_down(tmp_path) -> None:
    """On the same check ECGs (Ribeiro's ResNet, seed 4), a composite map 1 % off, or made with
    another input-layer rule, is refused: the samples float32 pins down show it."""
    import onnxruntime as ort

    from ecgx.training.export.lrp_reference import composite_parity
    from ecgx.training.export.lrp_rules import INPUT_RULES

    name, seed = "ribeiro600", 4
    _assert_no_false_refusal(name, seed, tmp_path)
    x = _check_ecgs(name, seed)
    source = from_module(zoo_model(name, width=CI_WIDTH), (12, ZOO[name].samples), classes=CLASS_RECORDS)
    session = ort.InferenceSession(str(tmp_path / "pkg" / "lrp_epsilon_plus.onnx"))
    target = np.arange(len(x)) % len(CLASSES)
    flat = x.reshape(len(x), -1)
    low, high = flat.min(axis=1), flat.max(axis=1)

    def lrp_map(rule: str) -> np.ndarray:
        feeds = {
            "x": x,
            "seed": np.eye(len(CLASSES), dtype=np.float32)[target],
            "epsilon": np.array(1e-2, np.float32),
        }
        feeds |= {"input_rule": np.array(INPUT_RULES[rule], np.int64), "low": low, "high": high}
        return session.run(None, feeds)[1]

    module = ir_module(source.ir).eval()
    kwargs = {"epsilon": 1e-2, "low": low, "high": high}
    right = composite_parity(lrp_map("default"), module, "epsilon_plus", x, target, **kwargs)
    assert right["ok"], right
    for wrong in (lrp_map("default") * 1.01, lrp_map("flat")):
        check = composite_parity(wrong, module, "epsilon_plus", x, target, **kwargs)
        assert not check["ok"] and check["failing"], check
