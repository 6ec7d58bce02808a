"""Real servers for the admission, audit and access tests (issue 19): ``build_server`` on
127.0.0.1:0 in this process, or ``ecgx serve`` in a subprocess (for memory and file-size limits),
over an empty model repository (admission, authentication and audit happen before any model is
looked up, so no model is trained for these tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cli_helpers import serve_port
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ecgx.service.audit import AuditLog
from ecgx.service.metrics import ServiceMetrics
from ecgx.service.repository import ModelRepository
from ecgx.service.security import load_server_security
from ecgx.service.server import build_server
from ecgx.token_cli import add_token

PREDICT = "/ecgx.v1.ExplanationService/Predict"
LIST_MODELS = "/ecgx.v1.ExplanationService/ListModels"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


def empty_repository(folder: Path) -> tuple[ModelRepository, Path]:
    """An empty model repository and the PEM file of the key it trusts."""
    (folder / "repo").mkdir(parents=True, exist_ok=True)
    public = Ed25519PrivateKey.generate().public_key()
    key = folder / "gate_public_key.pem"
    key.write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return ModelRepository(folder / "repo", [public]), key


def make_tokens(access: Path, scopes: dict[str, list[str]]) -> dict[str, str]:
    return {name: add_token(access, name, granted) for name, granted in scopes.items()}


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Running:
    """A server on loopback with its access tokens, audit file and metrics."""

    port: int
    tokens: dict[str, str]
    audit: Path | None
    metrics: ServiceMetrics | None
    stop: Callable[[], None]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def audit_lines(self) -> list[dict[str, Any]]:
        assert self.audit is not None
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def audit_of(self, request_id: str, seconds: float = 5) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            found = [d for d in self.audit_lines() if d["request_id"] == request_id]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, f"{len(found)} audit lines for {request_id}"
                return found[0]
            time.sleep(0.02)


def start_in_process(
    folder: Path,
    scopes: dict[str, list[str]],
    *,
    open_health: bool = False,
    audit: bool = True,
    metrics: bool = False,
    max_concurrent: int = 2,
) -> Running:
    """``build_server`` over plaintext with an access file (``insecure``: tokens in plaintext are
    fine on loopback), an audit log and optionally metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    repository, _ = empty_repository(folder)
    access = folder / "access.toml"
    tokens = make_tokens(access, scopes)
    security = load_server_security(tokens_file=access, open_health=open_health, insecure=True, env={})
    log = AuditLog(folder / "audit.jsonl") if audit else None
    observed = ServiceMetrics(repository) if metrics else None
    server, port, _, _ = build_server(
        repository,
        security=security,
        port=0,
        max_concurrent=max_concurrent,
        audit=log,
        metrics=observed,
    )
    server.start()
    security.start()

    def stop() -> None:
        server.stop(None)
        security.stop()
        if log is not None:
            log.close()

    return Running(port, tokens, folder / "audit.jsonl" if audit else None, observed, stop)


def raw_unary(channel: grpc.Channel, method: str) -> Callable:
    """A unary callable that sends and receives raw bytes (no protobuf on the client side)."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def code_of(call: Callable, payload: bytes, metadata: Sequence[tuple[str, str]] = (), timeout: float = 30):
    """(status code, details, request id) of one raw call."""
    try:
        _, c = call.with_call(payload, metadata=metadata, timeout=timeout)
        return grpc.StatusCode.OK, "", dict(c.trailing_metadata() or ()).get("x-request-id", "")
    except grpc.RpcError as e:
        return e.code(), e.details() or "", dict(e.trailing_metadata() or ()).get("x-request-id", "")


def serve_subprocess(
    folder: Path,
    *args: str,
    preexec: Callable[[], None] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, int]:
    """``ecgx serve --insecure`` over an empty repository in a subprocess; returns it and its port.
    ``args`` adds flags (``--tokens``, ``--audit-log``, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    _, key = empty_repository(folder)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ecgx.cli",
            "serve",
            "--repo",
            str(folder / "repo"),
            "--trusted-key",
            str(key),
            "--port",
            "0",
            "--insecure",
            "--no-metrics",
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,
        env={**os.environ, **(env or {})},
    )
    port, _ = serve_port(proc, "PLAINTEXT")
    return proc, port


def stop_subprocess(proc: subprocess.Popen, timeout: float = 30) -> str:
    """SIGTERM, wait, and return what is left of its standard error."""
    if proc.poll() is None:
        proc.terminate()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or ""


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int:
    """A process's resident memory (or its peak, ``VmHWM``) from /proc, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field_name} for process {pid}")
