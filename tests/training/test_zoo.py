"""The model zoo (issue #25): every published network of ``tests/zoo_models.py`` builds and exports
through the ``module:factory`` form (fully, or partially with the reasons), and the ReLU networks
export with no refusal whatever the check ECGs: 2 seeds in the default run, ``ECGX_ZOO_SEEDS`` (3
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
from ecgx.training.export.source import from_module

CLASSES = [f"c{i}" for i in range(5)]
CLASS_RECORDS = [{"key": c, "code": str(i), "name": c} for i, c in enumerate(CLASSES)]
RELU_NETWORKS = [name for name, entry in ZOO.items() if entry.relu_only]


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


# Known and open (issue #25): on some check ECGs the LRP composites (epsilon-plus, alpha2-beta1) and
# LRP-epsilon of Ribeiro's pre-activation ResNet disagree with the float64 reference beyond the
# float32 allowances (6 of 20 seeds at 600 samples, 2 of 20 at 4096; 2026-12-06); whether the engine
# or the allowance is wrong is not settled, so those seeds may fail without hiding a failure elsewhere.
_RIBEIRO = "LRP of Ribeiro's ResNet on some check ECGs (issue #25, open)"
KNOWN_OPEN = {"ribeiro600": _RIBEIRO, "ribeiro4096": _RIBEIRO}


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(int(os.environ.get("ECGX_ZOO_SEEDS", "3"))))
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_OPEN[n], strict=False)) if n in KNOWN_OPEN else n
        for n in RELU_NETWORKS
    ],
)
def test_relu_networks_export_with_every_method_on_20_seeds(name, seed, tmp_path) -> None:
    _assert_no_false_refusal(name, seed, tmp_path)
