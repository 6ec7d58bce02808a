"""The serving install: ``pip install ecgx`` without extras serves, gates and calls, with no PyTorch.

The repository is installed, not in editable mode, into a fresh virtual environment, so what
is tested is the built package (its modules, the generated gRPC stubs, the shipped default
policy) and the base dependency set of pyproject.toml. That environment's own ``ecgx`` then
gates a package (``ecgx validate``), promotes one (``ecgx repo add``), serves the repository
(``ecgx serve``) and is called by its own ``ecgx client`` and a gRPC health probe. PyTorch,
Captum and wfdb must not be installed there at all, which is stronger than the import hook of
``cli_helpers.ECGX_WITHOUT_TORCH``: nothing can import them, on any code path.

Packages come from whatever index pip is configured with (the local one here, PyPI in CI);
where pip reaches none, the test skips and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import serve_port
from conftest import GATE_POLICY
from repo_helpers import make_package

from ecgx.core.dataset import load_dataset
from ecgx.service.engine import AttributionEngine

REPO_ROOT = Path(__file__).resolve().parents[2]
# Never copied into the build: environments, build outputs, generated stubs (setup.py makes
# them afresh), run outputs and what the package does not ship.
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "proto_gen", ".proto_gen.*",
    "node_modules", ".pytest_cache", ".ruff_cache", "demo", "runs", "out",
)  # fmt: skip
# The training side: none of these may be in the serving install.
TRAINING_ONLY = ("torch", "captum", "wfdb")
SERVED = "gradcam"  # passes in the `gated` report (saliency fails there)
PIP_TIMEOUT_S = 1200


def _env(venv: Path) -> dict[str, str]:
    """The environment of a shell with ``venv`` activated, nothing of the checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _run(venv: Path, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_env(venv)
    )


def _tail(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh virtual environment holding ``pip install <copy of this repository>``, no extras."""
    tmp = tmp_path_factory.mktemp("serve_install")
    # The build runs on a copy: setup.py regenerates service/proto_gen/ in the tree it builds
    # from, and the checkout's stubs must not be swapped out under tests running beside this one.
    src = shutil.copytree(REPO_ROOT, tmp / "src", ignore=COPY_IGNORE)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # Whether pip reaches an index at all (a tiny package of the base set): if not, skip; if it
    # does, any failure of the real install below is a failure of the package.
    probe = _run(
        venv, py, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp / "probe", "packaging", cwd=tmp
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(f"pip cannot reach a package index from a fresh virtual environment: {last}")
    r = _run(venv, py, "-m", "pip", "install", "-q", str(src), cwd=tmp, timeout=PIP_TIMEOUT_S)
    assert r.returncode == 0, _tail(r)
    return {"venv": venv, "python": py, "ecgx": venv / "bin" / "ecgx", "tmp": tmp}


def test_the_base_install_has_no_pytorch(serving_venv: dict[str, Path]) -> None:
    venv, tmp = serving_venv["venv"], serving_venv["tmp"]
    r = _run(venv, serving_venv["python"], "-m", "pip", "list", "--format=json", cwd=tmp)
    assert r.returncode == 0, _tail(r)
    installed = {d["name"].lower() for d in json.loads(r.stdout)}
    assert "ecgx" in installed
    assert not installed & set(TRAINING_ONLY), sorted(installed & set(TRAINING_ONLY))
    for name in TRAINING_ONLY:
        r = _run(venv, serving_venv["python"], "-c", f"import {name}", cwd=tmp)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, _tail(r)
    # The modules come from the installed package, never from the checkout, and the stubs and
    # the default policy were built into it.
    code = (
        "import ecgx, ecgx.service, ecgx.validation, ecgx.training, ecgx.validation.policy as p; "
        "from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2; "
        "print(ecgx.service.__file__, ecgx.validation.__file__, ecgx.training.__file__, ecgx.__file__, "
        "ecgx_pb2.__file__, p.default_policy().sha256)"
    )
    r = _run(venv, serving_venv["python"], "-c", code, cwd=tmp)
    assert r.returncode == 0, _tail(r)
    *files, policy_sha = r.stdout.split()
    site = str(venv / "lib")
    assert all(f.startswith(site) for f in files), files
    assert len(policy_sha) == 64
    # One import namespace: nothing but ecgx is installed at top level.
    for name in ("service", "training", "validation"):
        r = _run(venv, serving_venv["python"], "-c", f"import {name}", cwd=tmp)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, _tail(r)


def test_validate_gates_a_package_without_pytorch(
    serving_venv: dict[str, Path], gated: dict[str, Any]
) -> None:
    tmp = serving_venv["tmp"] / "validate"
    tmp.mkdir()
    package = shutil.copytree(gated["family"]["seed-0"], tmp / "pkg")
    (package / "gate.json").unlink(missing_ok=True)
    policy = tmp / "policy.toml"
    policy.write_text(GATE_POLICY)
    key = gated["public_pem"].with_name("gate_signing_key.pem")
    r = _run(
        serving_venv["venv"], serving_venv["ecgx"], "validate", package,
        "--data", gated["family"]["data"], "--policy", policy, "--methods", SERVED, "saliency",
        "--workers", "1", "--signing-key", key, "--research", "-q",
        cwd=tmp,
    )  # fmt: skip
    # GATE_POLICY passes seed-0 on these two methods (the `gated` fixture asserts it in-process).
    assert r.returncode == 0, _tail(r)
    report = json.loads((package / "gate.json").read_text())
    assert report["verdict"] == "pass" and report["research"] is True
    assert {SERVED, "saliency"} <= set(report["methods"])  # beside the reference rows
    # The signed report verifies with the venv's `ecgx gate verify`; a research report never serves.
    r = _run(
        serving_venv["venv"], serving_venv["ecgx"], "gate", "verify", package,
        "--public-key", gated["public_pem"], "--allowed-policy", report["policy"]["sha256"], cwd=tmp,
    )  # fmt: skip
    assert r.returncode == 1, _tail(r)
    assert "signature valid" in r.stdout and "RESEARCH" in r.stdout, _tail(r)


def test_serve_and_client_without_pytorch(serving_venv: dict[str, Path], gated: dict[str, Any]) -> None:
    venv, ecgx = serving_venv["venv"], serving_venv["ecgx"]
    tmp = serving_venv["tmp"] / "serve"
    tmp.mkdir()
    candidate = make_package(gated, tmp / "candidate", 0)
    root = tmp / "repo"
    r = _run(venv, ecgx, "repo", "add", candidate, "--repo", root, "--model", "ecg", "--public-key",
             gated["public_pem"], "-q", cwd=tmp)  # fmt: skip
    assert r.returncode == 0, _tail(r)
    assert (root / "ecg" / "1" / "gate.json").is_file()
    beat = np.asarray(load_dataset(gated["family"]["data"]).signals[0], dtype=np.float32)
    np.save(tmp / "beat.npy", beat)

    args = ["serve", "--repo", root, "--port", "0", "--trusted-key", gated["public_pem"], "--insecure"]
    args += ["--metrics-port", "0", "--grace", "5"]
    proc = subprocess.Popen(
        [str(ecgx), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
        env=_env(venv),
    )
    try:
        port, _ = serve_port(proc, "PLAINTEXT")
        address = f"127.0.0.1:{port}"
        # A probe as a load balancer or Kubernetes sends it (grpc.health.v1), from the venv.
        health = (
            "import sys, grpc\n"
            "from grpc_health.v1 import health_pb2, health_pb2_grpc\n"
            f"with grpc.insecure_channel({address!r}) as ch:\n"
            "    stub = health_pb2_grpc.HealthStub(ch)\n"
            "    for s in ('', 'ecg'):\n"
            "        r = stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=30)\n"
            "        print(repr(s), health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))\n"
        )
        r = _run(venv, serving_venv["python"], "-c", health, cwd=tmp)
        assert r.returncode == 0, _tail(r)
        assert r.stdout.split() == ["''", "SERVING", "'ecg'", "SERVING"], r.stdout

        r = _run(venv, ecgx, "client", "models", "--server", address, "-q", cwd=tmp)
        assert r.returncode == 0, _tail(r)
        assert "ecg" in r.stdout

        out_json, out_png = tmp / "explain.json", tmp / "explain.png"
        r = _run(
            venv, ecgx, "client", "explain", "--server", address, "--ecg", tmp / "beat.npy",
            "--method", SERVED, "--target", "0", "--json", out_json, "--png", out_png, "-q",
            cwd=tmp,
        )  # fmt: skip
        assert r.returncode == 0, _tail(r)
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib is in the base set
        result = json.loads(out_json.read_text())
        [attribution] = result["attributions"]
        assert attribution["method"] == SERVED and attribution["gate"]["verdict"] == "pass"
        # The installed copy computes what the checkout's engine computes on the same package.
        expected = AttributionEngine(root / "ecg" / "1").attribute(SERVED, beat[None], 0)[0]
        np.testing.assert_allclose(np.asarray(attribution["attribution"]), expected, rtol=1e-4, atol=1e-5)

        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]


def test_a_training_command_on_the_serving_install_names_the_extra(serving_venv: dict[str, Path]) -> None:
    venv, tmp = serving_venv["venv"], serving_venv["tmp"]
    (tmp / "m.onnx").write_bytes(b"")  # never read: the export needs torch before it opens the file
    r = _run(venv, serving_venv["ecgx"], "export", "--model", tmp / "m.onnx", "--out", tmp / "pkg", cwd=tmp)
    assert r.returncode == 2, _tail(r)
    assert "needs torch, which this install lacks: pip install 'ecgx[train]'" in r.stderr, _tail(r)
    assert "Traceback" not in r.stderr, _tail(r)
