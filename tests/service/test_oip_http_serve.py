"""``ecgx serve --http-port`` as a user runs it: a real subprocess with PyTorch made unimportable
(the serving path never imports it), TLS and tokens on both ports, tritonclient.http against
the REST port, and a bounded exit on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as tch
from cli_helpers import ECGX_WITHOUT_TORCH, run_ecgx, serve_port
from repo_helpers import make_package
from tls_helpers import make_pki
from tritonclient.utils import InferenceServerException

from ecgx.core.dataset import load_dataset
from ecgx.service.oip_http import start_rest
from ecgx.service.security import SecurityConfigError, load_server_security
from ecgx.token_cli import add_token

REST_LINE = re.compile(r"Open Inference Protocol over REST on https?://[^ ]+:(\d+)")


def test_ecgx_serve_http_port_serves_tls_and_tokens_and_stops_in_time(gated, tmp_path) -> None:
    pki = make_pki(tmp_path / "pki")
    make_package(gated, tmp_path / "repo" / "ecg" / "1", 0)
    access = tmp_path / "access.toml"
    token = add_token(access, "ward", ["predict", "explain"])
    script = tmp_path / "serve_no_torch.py"
    script.write_text(ECGX_WITHOUT_TORCH)
    args = ["serve", "--repo", str(tmp_path / "repo"), "--port", "0", "--http-port", "0"]
    args += ["--trusted-key", str(gated["public_pem"]), "--no-metrics", "--grace", "2"]
    args += ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tokens", str(access)]
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        _, lines = serve_port(proc, "TLS")
        rest = [m for line in lines if (m := REST_LINE.search(line))]
        assert rest, "".join(lines)
        client = tch.InferenceServerClient(
            f"localhost:{rest[0][1]}", ssl=True, ssl_options={"ca_certs": str(pki.ca.path)}
        )
        headers = {"Authorization": f"Bearer {token}"}
        assert client.is_server_ready(headers=headers)
        x = np.asarray(load_dataset(gated["family"]["data"]).signals[:2], dtype=np.float32)
        tensor = tch.InferInput("ecg", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("ecg", [tensor], headers=headers, parameters={"method": "gradcam"})
        assert result.as_numpy("attribution").shape == (2, 12, 600)
        with pytest.raises(InferenceServerException) as e:
            client.infer("ecg", [tensor])
        assert e.value.status() == "401"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 2 + 2 + 1, err[-2000:]  # grace + 2 s, and a second to exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "torch" not in out


def test_the_rest_port_must_differ_from_the_grpc_port(tmp_path) -> None:
    r = run_ecgx("serve", "--repo", str(tmp_path), "--port", "7000", "--http-port", "7000", "--insecure")
    assert r.returncode == 2 and "http_port and port are both 7000" in r.stderr


def test_a_tls_grpc_port_never_gets_a_plaintext_rest_port(tmp_path) -> None:
    pki = make_pki(tmp_path / "pki")
    access = tmp_path / "access.toml"
    add_token(access, "ward", ["predict"])
    security = load_server_security(
        tls_cert=pki.server.cert, tls_key=pki.server.key, tokens_file=access, env={}
    )
    with pytest.raises(SecurityConfigError, match="the HTTP port must too"):
        start_rest(None, security, ssl_context=None)


def test_http_port_in_the_config_file_and_the_flag_wins(tmp_path) -> None:
    from ecgx.service.serve_config import ServeConfigError, resolve_serve_config

    config = tmp_path / "serve.toml"
    config.write_text('[serve]\nrepo = "/srv/models"\nhttp_port = 8000\n')
    assert resolve_serve_config(config, {}).http_port == 8000
    assert resolve_serve_config(config, {"http_port": 0}).http_port == 0
    assert resolve_serve_config(None, {"repo": "/srv/models"}).http_port is None  # off unless asked for
    config.write_text('[serve]\nrepo = "/srv/models"\nhttp_port = "8000"\n')
    with pytest.raises(ServeConfigError, match="http_port must be int"):
        resolve_serve_config(config, {})
