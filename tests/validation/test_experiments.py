"""`ecgx experiments`: the study's experiments over a trained seed family, from training runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ecgx.cli import main
from ecgx.validation.experiments import find_packages

POLICY = """
[gate]
ecgs = 12
[checks.randomisation]
ecgs = 4
[checks.perturbation]
bootstrap = 100
steps = 4
"""


def test_experiments_report_from_training_runs(
    trained_family: dict[str, Path], tmp_path: Path, capsys
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    out = tmp_path / "report"
    args = ["experiments", "--data", str(trained_family["data"]), "--runs", str(trained_family["runs"])]
    args += [
        "--out",
        str(out),
        "--policy",
        str(policy),
        "--methods",
        "saliency",
        "gradcam",
        "occlusion",
        "-q",
    ]
    assert main(args) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    # The runs were exported on first use, one package per seed, and the first one gated.
    assert sorted(p.name for p in (out / "packages").iterdir()) == ["seed-0", "seed-1", "seed-2"]
    measured = json.loads((out / "experiments.json").read_text())
    assert len(measured["family"]) == 2
    sc = measured["methods"]["occlusion"]["checks"]["self_consistency"]
    assert sc["verdict"] in ("pass", "fail") and sc["details"]["models"] == 3
    html = (out / "report.html").read_text()
    assert "Beside the published study" in html or "published" in html.lower()
    assert "0.41" in html  # the study's self-consistency range is quoted beside ours
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert {"inter_method.png", "perturbation.png", "randomisation_cascading.png"} <= set(pngs)
    assert any(p.startswith("overlay_") for p in pngs)


def test_experiments_need_three_seeds(trained_family: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for s in (0, 1):
        shutil.copytree(trained_family[f"seed-{s}"], runs / f"seed-{s}")
    with pytest.raises(ValueError, match="at least 3"):
        find_packages(runs, tmp_path / "exported")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_packages(tmp_path / "nowhere", tmp_path / "exported")
