"""The ecgx command line: help, clear errors, and the pipeline from data to attributions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ecgx.cli import main

SUBCOMMANDS = [
    ["data", "synth"],
    ["data", "import-wfdb"],
    ["data", "info"],
    ["train"],
    ["export"],
    ["attribute"],
    ["demo"],
    ["validate"],
    ["gate", "verify"],
    ["gate", "keygen"],
    ["experiments"],
]


def _ecgx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ecgx.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: " ".join(c))
def test_every_subcommand_explains_itself(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: ecgx" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "synth", "--n", "0", "--out", "{tmp}/d"], "n must be"),
        (["data", "info", "{tmp}/nowhere"], "does not exist"),
        (["train", "--data", "{tmp}/nowhere", "--out", "{tmp}/run"], "does not exist"),
        (["export", "{tmp}/missing.pt", "--out", "{tmp}/pkg"], "does not exist"),
        (
            [
                "attribute",
                "--package",
                "{tmp}",
                "--data",
                "{tmp}",
                "--method",
                "saliency",
                "--out",
                "{tmp}/a.npy",
            ],
            "manifest.json is missing",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ecgx: error:") and message in err and "Traceback" not in err


def test_pipeline_synth_train_export_attribute(tmp_path: Path) -> None:
    data, run, pkg, out = tmp_path / "data", tmp_path / "run", tmp_path / "pkg", tmp_path / "attr.npy"
    config = tmp_path / "tiny.toml"
    config.write_text("[model]\nwidths = [8, 16]\nstem_stride = 4\n[train]\nmax_epochs = 1\n")
    assert main(["data", "synth", "--n", "300", "--seed", "1", "--out", str(data), "-q"]) == 0
    assert (
        main(["train", "--data", str(data), "--seeds", "0", "--out", str(run), "--config", str(config), "-q"])
        == 0
    )
    assert main(["export", str(run / "seed-0" / "checkpoint.pt"), "--out", str(pkg), "-q"]) == 0
    # The attribution step runs in a fresh process that must never import PyTorch.
    script = (
        "import sys; from ecgx.cli import main; "
        f"code = main(['attribute', '--package', {str(pkg)!r}, '--data', {str(data)!r}, '--method', "
        "'integrated_gradients', '--target', 'AF', '--count', '5', '--param', 'n_steps=16', "
        f"'--out', {str(out)!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    attributions = np.load(out)
    assert attributions.shape == (5, 12, 600) and attributions.dtype == np.float32
    result = _ecgx(
        "attribute",
        "--package",
        str(pkg),
        "--data",
        str(data),
        "--method",
        "occlusion",
        "--param",
        "window=0",
        "--out",
        str(out),
        "--overwrite",
    )
    assert result.returncode == 2 and "window" in result.stderr and "Traceback" not in result.stderr
