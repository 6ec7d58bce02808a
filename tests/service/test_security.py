"""Access control and the audit log over real gRPC channels on loopback (issue #11).

Real certificates (tests/tls_helpers.py), real TLS and mutual TLS, real access files written by
``ecgx token``'s functions, servers from ``build_server`` on 127.0.0.1:0 with the security
``load_server_security`` builds. The repository holds model ``ecg`` version 1 (conftest
``gated``: gradcam passes, saliency fails).

Servers (module scope, sharing one repository):
  tls        TLS + access file, health and reflection open, audit log
  mtls       mutual TLS + the same access file, audit log
  ca_only    mutual TLS without an access file (every certificate of the CA: predict, explain)
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cli_helpers import ECGX_WITHOUT_TORCH, assert_clean_failure, run_ecgx, serve_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from repo_helpers import make_package
from tls_helpers import Issued, Pki, make_pki
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from ecgx.client import ChannelSecurity, Client, ClientError
from ecgx.core.schema import LEADS
from ecgx.service.audit import AuditLog
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity, load_server_security
from ecgx.service.server import build_server
from ecgx.token_cli import add_certificate, add_token, revoke

PASSED, FAILED = "gradcam", "saliency"
SCOPES = {"predictor": ["predict"], "explainer": ["explain"], "admin": ["admin"], "reader": []}
OK, UNAUTHENTICATED, DENIED = (
    grpc.StatusCode.OK,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)


@dataclass
class Served:
    """A running server: its address, security and audit file."""

    port: int
    security: ServerSecurity
    audit: Path | None
    stop: Callable[[], None]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def audit_lines(self) -> dict[str, dict[str, Any]]:
        assert self.audit is not None
        return {d["request_id"]: d for d in map(json.loads, self.audit.read_text().splitlines())}

    def audit_of(self, request_id: str) -> dict[str, Any]:
        """The audit line of a call (written as the call ends; waited for briefly)."""
        deadline = time.monotonic() + 5
        while request_id not in (lines := self.audit_lines()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return lines[request_id]


def start(repository: ModelRepository, security: ServerSecurity, audit: Path | None = None) -> Served:
    log = AuditLog(audit) if audit is not None else None
    server, port, _, _ = build_server(
        repository, security=security, host="127.0.0.1", port=0, max_batch=4, max_concurrent=2, audit=log
    )
    server.start()
    security.start()

    def stop() -> None:
        server.stop(None)
        security.stop()
        if log is not None:
            log.close()

    return Served(port, security, audit, stop)


@pytest.fixture(scope="module")
def world(gated, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("security")
    pki = make_pki(tmp / "pki")
    make_package(gated, tmp / "repo" / "ecg" / "1", 0)
    repository = ModelRepository(tmp / "repo", [gated["public"]], engine_options={"threads": 1})
    access = tmp / "access.toml"
    tokens = {name: add_token(access, name, scopes) for name, scopes in SCOPES.items()}
    add_certificate(access, "ward-7-viewer", ["predict", "explain"])
    add_certificate(access, "pacs.hospital.example", ["predict"])
    tls = {"tls_cert": pki.server.cert, "tls_key": pki.server.key, "env": {}}
    servers = {
        "tls": start(
            repository,
            load_server_security(tokens_file=access, open_health=True, **tls),
            tmp / "tls.jsonl",
        ),
        "mtls": start(
            repository,
            load_server_security(tokens_file=access, tls_client_ca=pki.ca.path, **tls),
            tmp / "mtls.jsonl",
        ),
        "ca_only": start(repository, load_server_security(tls_client_ca=pki.ca.path, **tls)),
    }
    yield {"pki": pki, "tokens": tokens, "repository": repository, "tmp": tmp, **servers}
    for s in servers.values():
        s.stop()


def channel(served: Served, pki: Pki, client: Issued | None = None, ca: Path | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca.path).read_bytes(),
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.secure_channel(served.address, credentials)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def outcome(method: Any, request: Any, metadata: Any = ()) -> tuple[grpc.StatusCode, str, str]:
    """(status, details, request id) of a unary call."""
    try:
        _, call = method.with_call(request, metadata=metadata, timeout=60)
        return OK, "", dict(call.trailing_metadata())["x-request-id"]
    except grpc.RpcError as e:
        return e.code(), e.details() or "", dict(e.trailing_metadata() or ()).get("x-request-id", "")


def ecg(value: float = 0.1, n: int = 600, **over: Any) -> pb.Ecg:
    x = np.full((12, n), value, dtype="<f4")
    fields = {"leads": list(LEADS), "sampling_rate_hz": 500.0, "units": pb.MILLIVOLT, "samples_per_lead": n}
    fields["samples"] = x.tobytes()
    return pb.Ecg(**{**fields, **over})


PREDICT = pb.PredictRequest(model="ecg", ecgs=[ecg()])
EXPLAIN = pb.ExplainRequest(model="ecg", ecgs=[ecg()], methods=[PASSED], targets=[pb.Target(class_key="AF")])


# --------------------------------------------------------------------------------------------- TLS


def test_tls_serves_a_token_holder_through_ecgx_client(world) -> None:
    security = ChannelSecurity(ca=world["pki"].ca.path, token=world["tokens"]["predictor"])
    with Client(world["tls"].address, timeout=60, security=security) as client:
        assert [m.name for m in client.list_models()] == ["ecg"]
        r = client.predict("ecg", [ecg()])
    assert r.model == "ecg" and r.version == "1"


def test_plaintext_or_an_untrusted_server_certificate_fails_the_handshake(world) -> None:
    served, pki = world["tls"], world["pki"]
    with grpc.insecure_channel(served.address) as ch:
        code, _, _ = outcome(pb_grpc.ExplanationServiceStub(ch).ListModels, pb.ListModelsRequest())
    assert code == grpc.StatusCode.UNAVAILABLE
    with channel(served, pki, ca=pki.other_ca.path) as ch:
        code, _, _ = outcome(pb_grpc.ExplanationServiceStub(ch).ListModels, pb.ListModelsRequest())
    assert code == grpc.StatusCode.UNAVAILABLE
    security = ChannelSecurity(ca=pki.other_ca.path, token=world["tokens"]["reader"])
    with Client(served.address, timeout=10, security=security) as client, pytest.raises(ClientError) as e:
        client.list_models()
    assert str(e.value).startswith("UNAVAILABLE") and world["tokens"]["reader"] not in str(e.value)


def test_a_token_over_plaintext_needs_insecure(world) -> None:
    with pytest.raises(ValueError, match="refusing to send a token over plaintext"):
        Client(world["tls"].address, security=ChannelSecurity(token=world["tokens"]["reader"]))


def test_ecgx_client_flags_tls_ca_and_the_token_from_the_environment(world) -> None:
    served, pki, token = world["tls"], world["pki"], world["tokens"]["reader"]
    base = ["client", "models", "--server", served.address]
    result = run_ecgx(*base, "--tls-ca", str(pki.ca.path), env={"ECGX_TOKEN": token})
    assert result.returncode == 0 and "model ecg: default version 1" in result.stdout, result.stderr
    result = run_ecgx(*base, "--token", token)
    assert_clean_failure(result, "refusing to send a token over plaintext", "--insecure")
    assert token not in result.stderr
    result = run_ecgx(
        *base, "--tls-ca", str(pki.ca.path), "--tls-cert", str(pki.client.cert), env={"ECGX_TOKEN": token}
    )
    assert_clean_failure(result, "mutual TLS needs both --tls-cert and --tls-key")


# ------------------------------------------------------------------------------------------ tokens


def test_tokens_good_bad_missing_and_malformed(world) -> None:
    good = world["tokens"]["reader"]
    with channel(world["tls"], world["pki"]) as ch:
        list_models = pb_grpc.ExplanationServiceStub(ch).ListModels
        assert outcome(list_models, pb.ListModelsRequest(), bearer(good))[0] == OK
        cases = {
            "no credentials: send a bearer token": (),
            "the bearer token is not valid (unknown or revoked)": bearer(good[:-2] + "xx"),
            "the authorization header must be 'Bearer <token>'": (("authorization", f"Basic {good}"),),
            "more than one authorization header": bearer(good) + bearer(good),
        }
        for expected, metadata in cases.items():
            code, details, _ = outcome(list_models, pb.ListModelsRequest(), metadata)
            assert code == UNAUTHENTICATED and expected in details and good not in details


def test_scopes_decide_what_each_token_may_call(world) -> None:
    tokens = world["tokens"]
    with channel(world["tls"], world["pki"]) as ch:
        ecgx, oip = pb_grpc.ExplanationServiceStub(ch), oip_grpc.GRPCInferenceServiceStub(ch)
        calls = {
            "predict": (ecgx.Predict, PREDICT),
            "explain": (ecgx.Explain, EXPLAIN),
            "models": (ecgx.GetModel, pb.GetModelRequest(model="ecg")),
            "oip_meta": (oip.ModelMetadata, oip_pb.ModelMetadataRequest(name="ecg")),
            "oip_stats": (oip.ModelStatistics, oip_pb.ModelStatisticsRequest(name="ecg")),  # not in the table
        }
        expected = {
            "predictor": {
                "predict": OK,
                "explain": DENIED,
                "models": OK,
                "oip_meta": OK,
                "oip_stats": DENIED,
            },
            "explainer": {
                "predict": DENIED,
                "explain": OK,
                "models": OK,
                "oip_meta": OK,
                "oip_stats": DENIED,
            },
            "reader": {
                "predict": DENIED,
                "explain": DENIED,
                "models": OK,
                "oip_meta": OK,
                "oip_stats": DENIED,
            },
            # admin passes every check; Triton's statistics RPC is then not served by ecgx
            "admin": {
                "predict": OK,
                "explain": OK,
                "models": OK,
                "oip_meta": OK,
                "oip_stats": "UNIMPLEMENTED",
            },
        }
        for name, want in expected.items():
            got = {rpc: outcome(m, r, bearer(tokens[name]))[0] for rpc, (m, r) in calls.items()}
            got = {k: v.name if want[k] == "UNIMPLEMENTED" else v for k, v in got.items()}
            assert got == want, name
        _, details, _ = outcome(ecgx.Explain, EXPLAIN, bearer(tokens["predictor"]))
        assert details == "'predictor' may not call Explain: it needs the scope 'explain' (granted: predict)"


def test_oip_model_infer_with_a_method_needs_the_explain_scope(world) -> None:
    raw = np.full((1, 12, 600), 0.1, dtype="<f4").tobytes()
    tensor = oip_pb.ModelInferRequest.InferInputTensor(name="ecg", datatype="FP32", shape=[1, 12, 600])
    request = oip_pb.ModelInferRequest(model_name="ecg", inputs=[tensor], raw_input_contents=[raw])
    request.parameters["method"].string_param = PASSED
    with channel(world["tls"], world["pki"]) as ch:
        infer = oip_grpc.GRPCInferenceServiceStub(ch).ModelInfer
        assert outcome(infer, request, bearer(world["tokens"]["explainer"]))[0] == DENIED  # no predict
        assert outcome(infer, request, bearer(world["tokens"]["admin"]))[0] == OK
        assert outcome(infer, request, bearer(world["tokens"]["predictor"]))[0] == DENIED


def test_health_and_reflection_are_open_only_when_configured(world, tmp_path) -> None:
    with channel(world["tls"], world["pki"]) as ch:  # open_health: no credentials needed
        check = health_pb2_grpc.HealthStub(ch).Check
        code, _, _ = outcome(check, health_pb2.HealthCheckRequest(service=""))
        assert code == OK
        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        assert "ecgx.v1.ExplanationService" in {s.name for s in answer.list_services_response.service}
        assert (
            outcome(pb_grpc.ExplanationServiceStub(ch).ListModels, pb.ListModelsRequest())[0]
            == UNAUTHENTICATED
        )
    access = tmp_path / "access.toml"
    token = add_token(access, "probe", [])
    closed = start(world["repository"], load_server_security(tokens_file=access, insecure=True, env={}))
    try:
        with grpc.insecure_channel(closed.address) as ch:
            check = health_pb2_grpc.HealthStub(ch).Check
            assert outcome(check, health_pb2.HealthCheckRequest())[0] == UNAUTHENTICATED
            assert outcome(check, health_pb2.HealthCheckRequest(), bearer(token))[0] == OK
    finally:
        closed.stop()


def test_a_token_revoked_in_the_file_stops_working_by_reload_and_by_the_watcher(
    world, tmp_path, caplog
) -> None:
    access = tmp_path / "access.toml"
    first = add_token(access, "first", ["predict"])
    security = load_server_security(tokens_file=access, insecure=True, env={}, watch_interval_s=0.05)
    served = start(world["repository"], security)
    try:
        # Plaintext with a token: the client sends it only because it was told --insecure.
        with Client(served.address, timeout=30, security=ChannelSecurity(token=first, insecure=True)) as c:
            assert c.list_models()
            security.stop()  # the explicit reload first, without the watcher
            revoke(access, "first")
            assert security.authenticator.reload()
            with pytest.raises(ClientError, match="UNAUTHENTICATED: the bearer token is not valid"):
                c.list_models()
        security.start()
        second = add_token(access, "second", ["predict"])
        with Client(served.address, timeout=30, security=ChannelSecurity(token=second, insecure=True)) as c:
            assert until(lambda: bool(c.list_models()))  # the watcher reloads within its interval
            with caplog.at_level(logging.ERROR):
                access.write_text("[[token]\nbroken")
                assert until(lambda: "ACCESS FILE NOT RELOADED" in caplog.text)
            assert c.list_models()  # a broken file keeps the last good list
    finally:
        served.stop()


def until(check: Callable[[], bool], seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except ClientError:
            pass
        time.sleep(0.05)
    return False


# -------------------------------------------------------------------------------------- mutual TLS


def test_mutual_tls_refuses_a_missing_or_foreign_client_certificate(world) -> None:
    pki = world["pki"]
    for client in (None, pki.foreign):
        with channel(world["mtls"], pki, client) as ch:
            code, _, _ = outcome(pb_grpc.ExplanationServiceStub(ch).ListModels, pb.ListModelsRequest())
        assert code == grpc.StatusCode.UNAVAILABLE, client


def test_a_client_certificate_names_the_caller_by_cn_or_san(world) -> None:
    pki, served = world["pki"], world["mtls"]
    with channel(served, pki, pki.client) as ch:  # CN ward-7-viewer: predict and explain
        code, _, rid = outcome(pb_grpc.ExplanationServiceStub(ch).Explain, EXPLAIN)
    assert code == OK
    line = served.audit_of(rid)
    assert (line["caller"], line["auth"], line["methods"], line["targets"]) == (
        "ward-7-viewer", "certificate", [PASSED], ["AF"],
    )  # fmt: skip
    security = ChannelSecurity(ca=pki.ca.path, cert=pki.client_san.cert, key=pki.client_san.key)
    with Client(served.address, timeout=60, security=security) as client:  # SAN pacs.hospital.example
        assert client.predict("ecg", [ecg()]).model == "ecg"
        with pytest.raises(ClientError, match=r"'pacs\.hospital\.example' may not call Explain"):
            client.explain("ecg", [ecg()], [PASSED])


def test_a_valid_certificate_not_in_the_access_file_may_call_nothing(world) -> None:
    pki, served = world["pki"], world["mtls"]
    with channel(served, pki, pki.unlisted) as ch:
        code, details, rid = outcome(pb_grpc.ExplanationServiceStub(ch).ListModels, pb.ListModelsRequest())
    assert code == DENIED and "'someone-else' is valid but not in the access list" in details
    assert (
        served.audit_of(rid)["caller"] == "someone-else"
        and served.audit_of(rid)["code"] == "PERMISSION_DENIED"
    )


def test_with_a_certificate_and_a_token_the_token_names_the_caller(world) -> None:
    pki, served, tokens = world["pki"], world["mtls"], world["tokens"]
    with channel(served, pki, pki.client) as ch:
        stub = pb_grpc.ExplanationServiceStub(ch)
        code, details, rid = outcome(stub.Predict, PREDICT, bearer(tokens["reader"]))
        assert code == DENIED and "'reader' may not call Predict" in details  # the certificate could
        assert served.audit_of(rid)["caller"] == "reader" and served.audit_of(rid)["auth"] == "token"
        code, details, _ = outcome(stub.Predict, PREDICT, bearer("ecgx_not-a-token"))
        assert code == UNAUTHENTICATED  # a bad token is never overlooked in favour of the certificate


def test_mutual_tls_without_an_access_file_lets_the_ca_predict_and_explain(world) -> None:
    pki, served = world["pki"], world["ca_only"]
    with channel(served, pki, pki.unlisted) as ch:
        ecgx, oip = pb_grpc.ExplanationServiceStub(ch), oip_grpc.GRPCInferenceServiceStub(ch)
        assert outcome(ecgx.Predict, PREDICT)[0] == OK and outcome(ecgx.Explain, EXPLAIN)[0] == OK
        assert outcome(oip.ModelStatistics, oip_pb.ModelStatisticsRequest())[0] == DENIED  # admin: never
        code, details, _ = outcome(ecgx.ListModels, pb.ListModelsRequest(), bearer(world["tokens"]["admin"]))
        assert code == UNAUTHENTICATED and "takes no bearer tokens" in details


# ----------------------------------------------------------------------------------------- audit


def test_audit_lines_for_each_outcome(world) -> None:
    served, tokens = world["tls"], world["tokens"]
    with channel(served, world["pki"]) as ch:
        stub = pb_grpc.ExplanationServiceStub(ch)
        two = pb.PredictRequest(model="ecg", ecgs=[ecg(), ecg()])
        cases = [
            ("OK", stub.Predict, two, tokens["predictor"]),
            ("UNAUTHENTICATED", stub.Predict, two, "ecgx_wrong"),
            ("PERMISSION_DENIED", stub.Explain, EXPLAIN, tokens["predictor"]),
            (
                "INVALID_ARGUMENT",
                stub.Predict,
                pb.PredictRequest(model="", ecgs=[ecg()]),
                tokens["predictor"],
            ),
            ("NOT_FOUND", stub.Predict, pb.PredictRequest(model="nope", ecgs=[ecg()]), tokens["predictor"]),
        ]
        for expected, method, request, token in cases:
            code, _, rid = outcome(method, request, bearer(token))
            line = served.audit_of(rid)
            assert code.name == expected == line["code"]
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
            assert line["peer"].startswith("ipv4:127.0.0.1:") and line["latency_ms"] >= 0
            assert line["rpc"] == f"/ecgx.v1.ExplanationService/{method._method.decode().rsplit('/', 1)[-1]}"
            if expected == "UNAUTHENTICATED":
                assert (line["caller"], line["auth"]) == ("", "none")
            else:
                assert (line["caller"], line["auth"]) == ("predictor", "token")
            if expected == "OK":
                assert (line["model"], line["version"], line["batch_size"]) == ("ecg", "1", 2)
                assert line["engine_ms"] > 0
            if expected == "NOT_FOUND":
                assert line["model"] == ""  # only names the repository has are recorded


# ------------------------------------------------------------------------ no waveform, no ECG id

SECRET_ID = "PATIENT-4711-SECRET"
SECRET_VALUE = 1.2345678


def secret_forms() -> list[str]:
    """How the recognisable sample value could show up in text: decimals, hex, Python's and
    protobuf text format's byte escapes, base64."""
    raw = struct.pack("<f", SECRET_VALUE)
    forms = [SECRET_ID, "PATIENT-4711", "1.23456", repr(float(np.float32(SECRET_VALUE)))[:12], raw.hex()]
    forms += [
        repr(raw)[2:-1],
        "".join(chr(b) if 32 <= b < 127 else f"\\{b:03o}" for b in raw),
        base64.b64encode(raw * 3).decode(),
    ]
    return forms


def send_secrets(address: str, credentials: grpc.ChannelCredentials, tokens: dict[str, str]) -> list[str]:
    """Good and bad requests carrying the secret id and samples; returns their status names."""
    secret = ecg(SECRET_VALUE, id=SECRET_ID)
    nan = np.full((12, 600), SECRET_VALUE, dtype="<f4")
    nan[3, 7] = np.nan
    calls = [
        ("Predict", pb.PredictRequest(model="ecg", ecgs=[secret, secret]), "predictor"),
        ("Explain", pb.ExplainRequest(model="ecg", ecgs=[secret], methods=[PASSED]), "explainer"),
        ("Explain", pb.ExplainRequest(model="ecg", ecgs=[secret], methods=[FAILED]), "explainer"),
        (
            "Predict",
            pb.PredictRequest(model="ecg", ecgs=[ecg(SECRET_VALUE, id=SECRET_ID, samples_per_lead=599)]),
            "admin",
        ),
        ("Predict", pb.PredictRequest(model="ecg", ecgs=[ecg(id=SECRET_ID, samples=nan.tobytes())]), "admin"),
        ("Predict", pb.PredictRequest(model="nope", ecgs=[secret]), "admin"),
        ("Explain", pb.ExplainRequest(model="ecg", ecgs=[secret], methods=[PASSED]), "predictor"),
        ("Predict", pb.PredictRequest(model="ecg", ecgs=[secret]), None),
    ]
    raw = np.full((1, 12, 600), SECRET_VALUE, dtype="<f4").tobytes()
    infer = oip_pb.ModelInferRequest(
        model_name="ecg",
        id=SECRET_ID,
        inputs=[oip_pb.ModelInferRequest.InferInputTensor(name="ecg", datatype="FP32", shape=[1, 12, 600])],
        raw_input_contents=[raw],
    )
    bad_infer = oip_pb.ModelInferRequest()
    bad_infer.CopyFrom(infer)
    bad_infer.inputs[0].shape[:] = [1, 12, 599]
    codes = []
    with grpc.secure_channel(address, credentials) as ch:
        ecgx, oip = pb_grpc.ExplanationServiceStub(ch), oip_grpc.GRPCInferenceServiceStub(ch)
        for rpc, request, who in calls:
            codes.append(outcome(getattr(ecgx, rpc), request, bearer(tokens[who]) if who else ())[0].name)
        for request in (infer, bad_infer):
            codes.append(outcome(oip.ModelInfer, request, bearer(tokens["admin"]))[0].name)
    return codes


EXPECTED_CODES = [
    "OK", "OK", "FAILED_PRECONDITION", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "NOT_FOUND",
    "PERMISSION_DENIED", "UNAUTHENTICATED", "OK", "INVALID_ARGUMENT",
]  # fmt: skip


def assert_no_secret(text: str, where: str, tokens: dict[str, str]) -> None:
    for form in [*secret_forms(), *tokens.values()]:
        assert form not in text, f"{form!r} appears in {where}"


def test_no_waveform_or_ecg_id_reaches_the_audit_log_or_any_log(world, caplog) -> None:
    served = world["tls"]
    credentials = grpc.ssl_channel_credentials(root_certificates=world["pki"].ca.pem)
    with caplog.at_level(logging.DEBUG):
        codes = send_secrets(served.address, credentials, world["tokens"])
    assert codes == EXPECTED_CODES
    audit = served.audit.read_text()
    assert audit.count('"rpc":"/ecgx.v1.ExplanationService/') >= 8 and "ModelInfer" in audit
    assert_no_secret(audit, "the audit log", world["tokens"])
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "FAILED_PRECONDITION" in logged  # the server's own log lines were captured
    assert_no_secret(logged, "the log", world["tokens"])


def test_ecgx_serve_logs_no_waveform_or_ecg_id_even_at_debug(world, gated) -> None:
    """The same requests against ``ecgx serve --verbose --audit-log -`` (TLS, tokens): its whole
    standard error, audit lines and debug logging included, holds neither."""
    pki, tmp = world["pki"], world["tmp"]
    script = tmp / "serve_no_torch.py"
    script.write_text(ECGX_WITHOUT_TORCH)
    access = tmp / "serve-access.toml"
    shutil.copy(tmp / "access.toml", access)
    args = ["serve", "--repo", str(tmp / "repo"), "--port", "0", "--trusted-key", str(gated["public_pem"])]
    args += ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tokens", str(access)]
    args += ["--audit-log", "-", "--verbose", "--no-metrics"]
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=Path(__file__).resolve().parents[2],
    )
    lines: list[str] = []
    try:
        port, lines = serve_port(proc, "TLS")
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.pem)
        assert send_secrets(f"127.0.0.1:{port}", credentials, world["tokens"]) == EXPECTED_CODES
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stderr = "".join(lines) + err
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.count('"request_id":') == len(EXPECTED_CODES) and "DEBUG" in stderr
    assert_no_secret(stderr, "ecgx serve's standard error", world["tokens"])
