"""`ecgx validate`, `ecgx gate verify` and `ecgx gate keygen` as an MLOps pipeline uses them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ecgx.cli import main
from ecgx.core.signing import SIGNING_KEY_ENV
from ecgx.service.methods import METHOD_NAMES
from ecgx.validation.policy import load_policy

N_GATED = len(METHOD_NAMES) - 1  # every method but the random control

# The floor is the default policy's every detection setting (issue 26), and on the suite's small
# family no method beats |x| by the default perturbation margin, so no servable PASS can be made
# here: validate runs in research mode, whose exit codes and signing are the same, and whose
# report `gate verify` refuses (the verification of a servable report is tested with the
# conftest `gated` report, tests/validation/test_policy_floor.py). Occlusion passes with this margin.
FAST = """
[gate]
ecgs = 64
required_methods = ["occlusion"]
[checks.randomisation]
ecgs = 16
[checks.perturbation]
margin = -1.0
[checks.changed_model]
ecgs = 32
"""


@pytest.fixture
def setup(trained_family: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of the seed-0 package (tests tamper with it), keys and policies."""
    pkg = shutil.copytree(trained_family["seed-0"], tmp_path / "pkg")
    assert main(["gate", "keygen", "--out", str(tmp_path / "keys")]) == 0
    passing, failing = tmp_path / "pass.toml", tmp_path / "fail.toml"
    passing.write_text(FAST)
    # No method can be that dissimilar from itself, so every method fails randomisation.
    failing.write_text(FAST.replace("ecgs = 16", "ecgs = 16\nmax_similarity = -1.0"))
    return {
        "allowed": [load_policy(passing).sha256, load_policy(failing).sha256],
        "pkg": pkg,
        "data": trained_family["data"],
        "private": tmp_path / "keys" / "gate_signing_key.pem",
        "public": tmp_path / "keys" / "gate_public_key.pem",
        "pass": passing,
        "fail": failing,
    }


def validate(s: dict[str, Path], policy: str, *extra: str) -> int:
    return main(
        [
            "validate",
            str(s["pkg"]),
            "--data",
            str(s["data"]),
            "--policy",
            str(s[policy]),
            "--methods",
            "occlusion",
            "gradcam",
            "--workers",
            "1",
            "--research",
            "-q",
            *(["--family", *map(str, s["family"])] if s.get("family") else []),
            *extra,
        ]
    )


def verify(s: dict[str, Path]) -> int:
    allowed = [arg for h in s["allowed"] for arg in ("--allowed-policy", h)]  # not the default policy
    return main(["gate", "verify", str(s["pkg"]), "--public-key", str(s["public"]), *allowed, "-q"])


def test_a_passing_gate_exits_0_and_its_signed_report_verifies(setup, capsys) -> None:
    assert validate(setup, "pass", "--signing-key", str(setup["private"])) == 0
    out = capsys.readouterr().out
    report = json.loads((setup["pkg"] / "gate.json").read_text())
    assert "occlusion" in report["serve"]
    served = f"may be served with {len(report['serve'])} of {N_GATED} methods ({', '.join(report['serve'])})"
    assert (
        "Gate verdict: RESEARCH report, not servable" in out and "PASS under policy" in out and served in out
    )
    assert report["verdict"] == "pass" and report["signature"]["algorithm"] == "Ed25519"
    assert report["research"] is True and report["servable"] is False
    assert verify(setup) == 1  # authentic, but a research report never verifies as servable
    out = capsys.readouterr().out
    assert "signature valid" in out and "RESEARCH report" in out


def test_a_failing_gate_exits_1_and_still_writes_its_report(setup, capsys) -> None:
    assert validate(setup, "fail", "--signing-key", str(setup["private"])) == 1
    out = capsys.readouterr().out
    assert "FAIL under policy" in out and "required method occlusion failed" in out
    assert json.loads((setup["pkg"] / "gate.json").read_text())["verdict"] == "fail"
    assert verify(setup) == 1  # authentic, but the verdict is fail
    assert "verdict: fail" in capsys.readouterr().out


def test_a_package_changed_after_gating_fails_verification(setup, capsys) -> None:
    assert validate(setup, "pass", "--signing-key", str(setup["private"])) == 0
    weights = setup["pkg"] / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert verify(setup) == 1
    out = capsys.readouterr().out
    assert "does NOT verify" in out and "weights.bin changed after gating" in out


def test_the_signing_key_can_come_from_the_environment(setup, monkeypatch, capsys) -> None:
    monkeypatch.setenv(SIGNING_KEY_ENV, setup["private"].read_text())
    assert validate(setup, "pass") == 0
    capsys.readouterr()
    verify(setup)
    assert "signature valid" in capsys.readouterr().out


def test_no_key_is_bad_usage_before_any_work(setup, monkeypatch, capsys) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    assert validate(setup, "pass") == 2
    err = capsys.readouterr().err
    assert err.startswith("ecgx: error: no signing key given") and "ecgx gate keygen" in err
    assert not (setup["pkg"] / "gate.json").exists()
    assert validate(setup, "pass", "--unsigned", "--out", str(setup["pkg"] / "unsigned.json")) == 0
    assert "signature" not in json.loads((setup["pkg"] / "unsigned.json").read_text())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["fail"].write_text("[gate]\necgs = -3\n"), "gate.ecgs must be >= 1"),
        (lambda s: s["fail"].write_text("[checks.perturbation]\nmargin = nan\n"), "margin must be a finite"),
        (lambda s: s.update(family=[s["pkg"], s["pkg"]]), "lists the gated package"),
        (lambda s: (s["pkg"] / "manifest.json").unlink(), "is not a model package (no manifest.json)"),
        (lambda s: s.update(data=s["pkg"]), "is not a dataset folder"),
    ],
    ids=["bad policy", "NaN in the policy", "family of itself", "not a package", "not a dataset"],
)
def test_bad_input_exits_2(setup, change, message: str, capsys) -> None:
    change(setup)
    assert validate(setup, "fail", "--unsigned") == 2
    err = capsys.readouterr().err
    assert err.startswith("ecgx: error:") and message in err and "Traceback" not in err


def test_verify_without_a_report_is_bad_input(setup, capsys) -> None:
    assert verify(setup) == 2
    assert "gate report" in capsys.readouterr().err


def test_validate_runs_without_pytorch(setup) -> None:
    code = (
        "import sys; from ecgx.cli import main; "
        f"rc = main(['validate', {str(setup['pkg'])!r}, '--data', {str(setup['data'])!r}, '--policy', "
        f"{str(setup['pass'])!r}, '--methods', 'saliency', '--unsigned', '--workers', '1', '--research', "
        "'-q']); "
        "assert 'torch' not in sys.modules, 'the gate imported torch'; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stderr
