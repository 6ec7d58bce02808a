"""The import layers (docs/architecture.md), checked by import-linter on the installed layout.

service/, training/ and validation/ install as ecgx.service, ecgx.training and ecgx.validation
(setup.py's package_dir); import-linter reads a package from one folder, so the test assembles
that layout in a temporary folder (a copy of the sources, nothing built) and lints it with the
contracts in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NESTED = ("service", "training", "validation")


def _installed_layout(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "proto_gen")
    shutil.copytree(ROOT / "ecgx", dest / "ecgx", ignore=ignore)
    for name in NESTED:
        shutil.copytree(ROOT / name, dest / "ecgx" / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _lint(tree: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (the dev extra installs it)")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(lint), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_import_layers_hold(tmp_path: Path) -> None:
    r = _lint(_installed_layout(tmp_path))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout, r.stdout[-2000:]


def test_an_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    """The check can fail: the core importing the command line is reported."""
    tree = _installed_layout(tmp_path)
    schema = tree / "ecgx" / "core" / "schema.py"
    schema.write_text(schema.read_text() + "\nfrom ecgx import cli  # noqa\n")
    r = _lint(tree)
    assert r.returncode != 0
    assert "ecgx.core.schema -> ecgx.cli" in r.stdout, r.stdout[-3000:]


def test_an_import_circle_is_reported(tmp_path: Path) -> None:
    """The dataset format imports output staging; staging importing it back closes a circle."""
    tree = _installed_layout(tmp_path)
    outputs = tree / "ecgx" / "core" / "outputs.py"
    outputs.write_text(outputs.read_text() + "\nfrom ecgx.core import dataset  # noqa\n")
    r = _lint(tree)
    assert r.returncode != 0
    assert "No import circles" in r.stdout and "BROKEN" in r.stdout, r.stdout[-3000:]
