"""The Open Inference Protocol over REST (service/oip_http.py, service/http_server.py), on
loopback, with Triton's own HTTP client (tritonclient.http) and raw sockets.

The repository: model ``ecg`` versions 1 and 2 (conftest ``gated``: gradcam passes, saliency
fails) and ``broken`` (its only version failed its gate). One core serves the gRPC port (ecgx.v1
and OIP) and the REST port, as ``ecgx serve --http-port`` runs them, so the numbers of all three
can be compared bit for bit.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as tcg
import tritonclient.http as tch
from repo_helpers import make_package
from tritonclient.utils import InferenceServerException

from ecgx.core.schema import LEADS
from ecgx.service.audit import AuditLog
from ecgx.service.oip_http import start_rest
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server

MODEL, BROKEN = "ecg", "broken"
PASSED, FAILED = "gradcam", "saliency"


@pytest.fixture(scope="module")
def repo(gated, tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    root = tmp_path_factory.mktemp("oip_http") / "repo"
    make_package(gated, root / MODEL / "1", 0)
    make_package(gated, root / MODEL / "2", 1)
    make_package(gated, root / BROKEN / "1", 2, verdict="fail", serve=[])
    repository = ModelRepository(root, [gated["public"]], engine_options={"threads": 1})
    yield repository
    repository.stop()


class Both:
    """``build_server`` (ecgx.v1 + OIP gRPC) and the REST transport over its core, audited."""

    def __init__(self, repository: ModelRepository, audit_path: Any, metrics: Any = None, **limits: Any):
        self.audit = AuditLog(audit_path)
        self.audit_path = audit_path
        security = ServerSecurity.plaintext_unauthenticated()
        built = build_server(
            repository,
            security=security,
            host="127.0.0.1",
            port=0,
            max_batch=8,
            audit=self.audit,
            metrics=metrics,
            **limits,
        )
        self.server, self.core = built.server, built.servicer.core
        self.server.start()
        self.rest = start_rest(self.core, security, observers=[self.audit, metrics])
        self.grpc_url = f"127.0.0.1:{built.port}"
        self.http_url = f"127.0.0.1:{self.rest.port}"
        self.channel = grpc.insecure_channel(self.grpc_url)
        self.ecgx = pb_grpc.ExplanationServiceStub(self.channel)
        self.oip = tcg.InferenceServerClient(self.grpc_url)
        self.http = tch.InferenceServerClient(self.http_url)

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def close(self) -> None:
        self.http.close()
        self.oip.close()
        self.channel.close()
        self.rest.stop(1)
        self.server.stop(None)
        self.audit.close()


@pytest.fixture(scope="module")
def both(repo, tmp_path_factory):
    b = Both(repo, tmp_path_factory.mktemp("audit") / "audit.jsonl")
    yield b
    b.close()


def http_input(
    x: np.ndarray, binary: bool = True, name: str = "ecg", datatype: str = "FP32"
) -> tch.InferInput:
    i = tch.InferInput(name, list(x.shape), datatype)
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def grpc_input(x: np.ndarray) -> tcg.InferInput:
    i = tcg.InferInput("ecg", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def post(
    both: Both, body: bytes | str, path: str = f"/v2/models/{MODEL}/infer", **headers: str
) -> requests.Response:
    return requests.post(f"http://{both.http_url}{path}", data=body, headers=headers, timeout=30)


def refused(response: requests.Response, status: int, code: str, *phrases: str) -> str:
    """Assert a JSON error answer with ``status`` and the gRPC ``code``; returns its message."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Ecgx-Status"] == code
    message = response.json()["error"]
    for phrase in phrases:
        assert phrase in message, message
    return message


def raw_exchange(port: int, data: bytes, wait_s: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it or ``wait_s``."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


# ------------------------------------------------------------------------------------ health, metadata


def test_live_ready_and_server_metadata_through_tritonclient_http(both) -> None:
    assert both.http.is_server_live()
    assert both.http.is_server_ready()
    meta = both.http.get_server_metadata()
    assert meta["name"] == "ecgx" and "binary_tensor_data" in meta["extensions"]


def test_model_ready_and_metadata_match_the_grpc_protocol(both) -> None:
    assert both.http.is_model_ready(MODEL) and both.http.is_model_ready(MODEL, "1")
    assert not both.http.is_model_ready("no-such-model")
    assert not both.http.is_model_ready(BROKEN)
    assert not both.http.is_model_ready(MODEL, "9")
    rest = both.http.get_model_metadata(MODEL, "1")
    grpc_meta = both.oip.get_model_metadata(MODEL, "1", as_json=True)
    assert rest["name"] == grpc_meta["name"] == MODEL
    assert rest["versions"] == grpc_meta["versions"] == ["1", "2"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in rest["outputs"]] == [
        (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in grpc_meta["outputs"]
    ]
    assert rest["inputs"] == [{"name": "ecg", "datatype": "FP32", "shape": [-1, 12, 600]}]
    with pytest.raises(InferenceServerException) as e:
        both.http.get_model_metadata("no-such-model")
    assert e.value.status() == "404" and "no-such-model" in e.value.message()


# ------------------------------------------------------------------------------------ inference


def test_probabilities_are_those_of_both_grpc_protocols_bit_for_bit(both, beats) -> None:
    rest = both.http.infer(MODEL, [http_input(beats)], model_version="1")
    oip = both.oip.infer(MODEL, [grpc_input(beats)], model_version="1")
    v1 = both.ecgx.Predict(
        pb.PredictRequest(
            model=MODEL,
            version="1",
            ecgs=[
                pb.Ecg(
                    leads=list(LEADS),
                    sampling_rate_hz=500.0,
                    units=pb.MILLIVOLT,
                    samples_per_lead=600,
                    samples=np.asarray(b, "<f4").tobytes(),
                )
                for b in beats
            ],
        )
    )
    probs = rest.as_numpy("probabilities")
    assert probs.shape == (4, 2) or probs.shape[0] == 4
    assert np.array_equal(probs, oip.as_numpy("probabilities"))
    assert np.array_equal(rest.as_numpy("logits"), oip.as_numpy("logits"))
    v1_probs = np.frombuffer(v1.probabilities.data, "<f4").reshape(tuple(v1.probabilities.shape))
    assert np.array_equal(probs, v1_probs)
    params = rest.get_response()["parameters"]
    assert params["model_version"] == "1" and json.loads(params["classes"])


def test_the_asyncio_client_works_unchanged_too(both, beats) -> None:
    import asyncio

    import tritonclient.http.aio as aio

    async def run() -> tuple[bool, np.ndarray]:
        client = aio.InferenceServerClient(both.http_url)
        try:
            x = aio.InferInput("ecg", list(beats.shape), "FP32")
            x.set_data_from_numpy(beats)
            result = await client.infer(MODEL, [x], parameters={"method": PASSED})
            return await client.is_server_ready(), result.as_numpy("attribution")
        finally:
            await client.close()

    ready, maps = asyncio.run(run())
    sync = both.http.infer(MODEL, [http_input(beats)], parameters={"method": PASSED})
    assert ready and np.array_equal(maps, sync.as_numpy("attribution"))


def test_json_tensors_both_ways_give_the_same_numbers_as_binary(both, beats) -> None:
    binary = both.http.infer(MODEL, [http_input(beats)])
    outputs = [tch.InferRequestedOutput(n, binary_data=False) for n in ("probabilities", "logits")]
    as_json = both.http.infer(MODEL, [http_input(beats, binary=False)], outputs=outputs)
    assert "data" in as_json.get_response()["outputs"][0]
    for name in ("probabilities", "logits"):
        assert np.array_equal(
            binary.as_numpy(name), as_json.as_numpy(name).reshape(binary.as_numpy(name).shape)
        )


def test_an_attribution_is_that_of_the_grpc_protocols_bit_for_bit(both, beats) -> None:
    params = {"method": PASSED, "target": "predicted"}
    rest = both.http.infer(MODEL, [http_input(beats)], parameters=params)
    oip = both.oip.infer(MODEL, [grpc_input(beats)], parameters=params)
    v1 = both.ecgx.Explain(
        pb.ExplainRequest(
            model=MODEL,
            methods=[PASSED],
            ecgs=[
                pb.Ecg(
                    leads=list(LEADS),
                    sampling_rate_hz=500.0,
                    units=pb.MILLIVOLT,
                    samples_per_lead=600,
                    samples=np.asarray(b, "<f4").tobytes(),
                )
                for b in beats
            ],
        )
    )
    maps = rest.as_numpy("attribution")
    assert maps.shape == (4, 12, 600) and np.abs(maps).sum() > 0
    assert np.array_equal(maps, oip.as_numpy("attribution"))
    v1_maps = np.stack([np.frombuffer(a.attribution.data, "<f4").reshape(12, 600) for a in v1.attributions])
    assert np.array_equal(maps, v1_maps)
    p, q = rest.get_response()["parameters"], oip.get_response(as_json=True)["parameters"]
    assert p["gate_verdict"] == q["gate_verdict"]["string_param"] == "pass"
    assert p["ungated"] is False and p["method"] == PASSED
    assert json.loads(p["targets"]) == json.loads(q["targets"]["string_param"])
    assert "effective_parameters" in p and "gate_report_sha256" in p


def test_a_method_the_gate_failed_is_refused_as_on_grpc(both, beats) -> None:
    with pytest.raises(InferenceServerException) as e:
        both.http.infer(MODEL, [http_input(beats[:1])], parameters={"method": FAILED})
    assert e.value.status() == "400" and FAILED in e.value.message()
    body = json.dumps(
        {
            "parameters": {"method": FAILED},
            "inputs": [
                {"name": "ecg", "datatype": "FP32", "shape": [1, 12, 600], "data": beats[0].ravel().tolist()}
            ],
        }
    )
    refused(post(both, body), 400, "FAILED_PRECONDITION", FAILED)


def test_request_id_and_chosen_outputs_come_back(both, beats) -> None:
    r = both.http.infer(
        MODEL, [http_input(beats[:2])], request_id="abc-1", outputs=[tch.InferRequestedOutput("logits")]
    )
    response = r.get_response()
    assert response["id"] == "abc-1" and [o["name"] for o in response["outputs"]] == ["logits"]
    with pytest.raises(InferenceServerException) as e:
        both.http.infer(MODEL, [http_input(beats[:2])], outputs=[tch.InferRequestedOutput("attribution")])
    assert e.value.status() == "400" and "method" in e.value.message()


# ------------------------------------------------------------------------------------ bad input


def body_of(shape: list[int], data: Any, datatype: str = "FP32", **extra: Any) -> str:
    return json.dumps(
        {"inputs": [{"name": "ecg", "datatype": datatype, "shape": shape, "data": data}], **extra}
    )


@pytest.mark.parametrize(
    ("body", "status", "code", "phrase"),
    [
        ("{not json", 400, "INVALID_ARGUMENT", "not valid JSON"),
        ("[1, 2]", 400, "INVALID_ARGUMENT", "JSON object"),
        ('{"inputs": []}', 400, "INVALID_ARGUMENT", "non-empty list"),
        (body_of([1, 12, 600], [0.0] * 7200, "INT32"), 400, "INVALID_ARGUMENT", "FP32"),
        (body_of([1, 12, 600], ["a"] * 7200), 400, "INVALID_ARGUMENT", "numbers only"),
        (body_of([1, 12, 600], [0.0] * 7199), 400, "INVALID_ARGUMENT", "7199 values"),
        (body_of([1, 12, 599], [0.0] * 7188), 400, "INVALID_ARGUMENT", "[batch, 12, 600]"),
        (body_of([1, 12, 600], [[0.0] * 600] * 12), 200, "", ""),  # nested row-major data is allowed
        (body_of([1, 12, 600], [float("nan")] + [0.0] * 7199), 400, "INVALID_ARGUMENT", "NaN"),
        (body_of([1, 12, 600], [10**30] + [0.0] * 7199), 400, "INVALID_ARGUMENT", "integer out of"),
        (body_of([1, 12, 600], [60] * 7200), 400, "INVALID_ARGUMENT", "mV"),  # past the amplitude limit
        (body_of([9, 12, 600], [0.0] * 9 * 7200), 429, "RESOURCE_EXHAUSTED", "at most 8"),
        (body_of([99, 12, 600], [0.0] * 99 * 7200), 413, "RESOURCE_EXHAUSTED", "JSON part"),
        (
            body_of([1, 12, 600], [0.0] * 7200, parameters={"colour": "red"}),
            400,
            "INVALID_ARGUMENT",
            "colour",
        ),
        (body_of([1, 12, 600], [0.0] * 7200, parameters={"method": "nope"}), 404, "NOT_FOUND", "nope"),
        (body_of([1, 12, 600], [0.0] * 7200, extra_field=1), 400, "INVALID_ARGUMENT", "extra_field"),
        (body_of([1, 12, 600], [0.0] * 7200, parameters={"target": "AF"}), 400, "INVALID_ARGUMENT", "method"),
        ("[" * 100_000 + "]" * 100_000, 400, "INVALID_ARGUMENT", "nests too deep"),
        ('{"inputs": ' + "9" * 5000 + "}", 400, "INVALID_ARGUMENT", "not valid JSON"),
        ("", 400, "INVALID_ARGUMENT", "no body"),
        (body_of([0, 1320808, 1321122, 1321439], []), 400, "INVALID_ARGUMENT", "declares more values"),
    ],
)
def test_bad_bodies_get_a_4xx_naming_the_problem(both, body, status, code, phrase) -> None:
    r = post(both, body)
    if status == 200:
        assert r.status_code == 200, r.text
        return
    refused(r, status, code, phrase)


def test_binary_framing_errors_are_400(both, beats) -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "ecg",
                    "datatype": "FP32",
                    "shape": [1, 12, 600],
                    "parameters": {"binary_data_size": 28800},
                }
            ]
        }
    ).encode()
    raw = beats[0].astype("<f4").tobytes()
    ok = post(both, head + raw, **{"Inference-Header-Content-Length": str(len(head))})
    assert ok.status_code == 200 and ok.json()["outputs"][0]["name"] == "probabilities"
    refused(
        post(both, head + raw[:-4], **{"Inference-Header-Content-Length": str(len(head))}),
        400,
        "INVALID_ARGUMENT",
        "runs past",
    )
    refused(
        post(both, head + raw + b"xx", **{"Inference-Header-Content-Length": str(len(head))}),
        400,
        "INVALID_ARGUMENT",
        "add up to",
    )
    refused(
        post(both, head + raw, **{"Inference-Header-Content-Length": "10"}),
        400,
        "INVALID_ARGUMENT",
        "not valid JSON",
    )
    refused(
        post(both, head + raw, **{"Inference-Header-Content-Length": "-1"}),
        400,
        "INVALID_ARGUMENT",
        "non-negative",
    )
    refused(
        post(both, head + raw, **{"Inference-Header-Content-Length": str(10**9)}),
        400,
        "INVALID_ARGUMENT",
        "more than",
    )
    refused(post(both, head + raw, **{"Content-Encoding": "gzip"}), 400, "INVALID_ARGUMENT", "compressed")


def test_paths_and_methods_the_protocol_does_not_have(both) -> None:
    r = requests.get(f"http://{both.http_url}/v1/models", timeout=5)
    assert r.status_code == 404 and "KServe v2" in r.json()["error"]
    r = requests.get(f"http://{both.http_url}/v2/models/{MODEL}/infer", timeout=5)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = requests.delete(f"http://{both.http_url}/v2/health/live", timeout=5)
    assert r.status_code == 405


def test_http_framing_errors_get_json_errors_and_never_a_500(both) -> None:
    port = both.rest.port
    cases = {
        b"\x00\x01garbage\r\n\r\n": b"Bad request",
        b"POST /v2/models/ecg/infer HTTP/1.1\r\nContent-Length: abc\r\n\r\n": b"400 Bad Request",
        b"POST /v2/models/ecg/infer HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n": b"400",
        b"POST /v2/models/ecg/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n": b"411",
        b"GET /v2 HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n": b"431",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n": b"414",
    }
    for request, expected in cases.items():
        answer = raw_exchange(port, request)
        assert expected in answer, (request[:60], answer[:200])
        assert b" 500 " not in answer and b'"error"' in answer


def test_a_body_over_the_limit_is_refused_before_it_is_sent(both) -> None:
    """Only the headers of a 1 GB upload are sent: the answer comes at once (nothing waited for)."""
    t0 = time.monotonic()
    answer = raw_exchange(
        both.rest.port, b"POST /v2/models/ecg/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
    )
    assert b"413" in answer and b"RESOURCE_EXHAUSTED" in answer and time.monotonic() - t0 < 3


def test_nothing_the_client_typed_reaches_the_log_at_info(both, beats, caplog) -> None:
    caplog.set_level(logging.INFO)
    secret = "SECRET-7f3a"
    post(both, body_of([1, 12, 600], beats[0].ravel().tolist()), path=f"/v2/models/{secret}/infer")
    post(both, body_of([1, 12, 600], [0.0] * 7200, parameters={"method": secret}))
    post(both, body_of([1, 12, 600], [0.0] * 7200, parameters={secret: 1}))
    raw_exchange(both.rest.port, f"GET /{secret} HTTP/9.9\r\n\r\n".encode())
    raw_exchange(both.rest.port, f"{secret} {secret}\r\n\r\n".encode())
    assert secret not in caplog.text and f"{beats[0, 0, 0]:.4f}" not in caplog.text


# ------------------------------------------------------------------------------------ connections


def test_idle_connections_cannot_lock_the_port(repo, tmp_path) -> None:
    """At the connection cap, idle connections (never sending a request) are closed to make room."""
    b = Both(repo, tmp_path / "a.jsonl")
    try:
        cap = b.rest.http._server.limits.max_connections
        idle = [socket.create_connection(("127.0.0.1", b.rest.port)) for _ in range(cap + 5)]
        time.sleep(0.3)
        assert b.rest.http.open_connections <= cap
        assert b.http.is_server_live()
        for s in idle:
            s.close()
    finally:
        b.close()


def test_audit_lines_for_rest_calls_name_the_rpc_and_the_outcome(both, beats) -> None:
    before = len(both.audit_lines())
    both.http.infer(MODEL, [http_input(beats[:1])], parameters={"method": PASSED})
    post(both, "{bad")
    lines = both.audit_lines()[before:]
    assert [(line["rpc"].rsplit("/", 1)[-1], line["code"]) for line in lines] == [
        ("ModelInfer", "OK"),
        ("ModelInfer", "INVALID_ARGUMENT"),
    ]
    assert lines[0]["methods"] == [PASSED] and lines[0]["model"] == MODEL and lines[0]["batch_size"] == 1


def test_audit_lines_say_which_transport_a_call_came_over(both, beats) -> None:
    """REST calls are recorded under the OIP gRPC method names; the transport field tells them
    apart from the same call over gRPC."""
    before = len(both.audit_lines())
    both.http.infer(MODEL, [http_input(beats[:1])], parameters={"method": PASSED})
    both.oip.infer(MODEL, [grpc_input(beats[:1])], parameters={"method": PASSED})
    lines = both.audit_lines()[before:]
    assert [(line["rpc"].rsplit("/", 1)[-1], line["transport"]) for line in lines] == [
        ("ModelInfer", "http"),
        ("ModelInfer", "grpc"),
    ]


def test_rest_calls_and_refusals_are_counted_in_the_metrics(repo, beats, tmp_path) -> None:
    from ecgx.service.metrics import ServiceMetrics

    metrics = ServiceMetrics(repo, stability_share=0.0)
    b = Both(repo, tmp_path / "a.jsonl", metrics=metrics)
    try:
        b.http.infer(MODEL, [http_input(beats[:1])], parameters={"method": PASSED})
        post(b, body_of([9, 12, 600], [0.0] * 9 * 7200))  # over --max-batch 8
        rpc = "/inference.GRPCInferenceService/ModelInfer"
        value = metrics.registry.get_sample_value
        ok = {"rpc": rpc, "model": MODEL, "version": "2", "method": PASSED, "code": "OK"}
        assert value("ecgx_requests_total", ok) == 1
        assert value("ecgx_refusals_total", {"rpc": rpc, "reason": "max_batch"}) == 1
    finally:
        b.close()
        metrics.stop()


def test_a_client_that_hangs_up_frees_its_slot_and_is_audited_cancelled(gated, beats, tmp_path) -> None:
    """Research mode serves a slow method; the client closes its connection mid-request: the
    engine stops within a chunk, the slot is free, the audit says CANCELLED."""
    make_package(gated, tmp_path / "repo" / MODEL / "1", 0)
    repository = ModelRepository(
        tmp_path / "repo", [gated["public"]], allow_ungated=True, engine_options={"threads": 1}
    )
    b = Both(repository, tmp_path / "audit.jsonl")
    try:
        x = np.repeat(beats[:1], 8, axis=0)  # 8 ECGs x 2000 noisy gradient passes: seconds of work
        body = body_of(
            [8, 12, 600],
            x.ravel().tolist(),
            parameters={"method": "smoothgrad", "parameters": '{"n_samples": 2000}'},
        ).encode()
        s = socket.create_connection(("127.0.0.1", b.rest.port))
        s.sendall(
            b"POST /v2/models/ecg/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        deadline = time.monotonic() + 10
        while b.core.admission.running() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.core.admission.running() == 1
        s.close()
        t0 = time.monotonic()
        while b.core.admission.running() and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert b.core.admission.running() == 0 and time.monotonic() - t0 < 3
        deadline = time.monotonic() + 5
        while (
            not any(line["code"] == "CANCELLED" for line in b.audit_lines()) and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert [line["code"] for line in b.audit_lines()][-1] == "CANCELLED"
    finally:
        b.close()
        repository.stop()


def test_stop_is_bounded_and_readiness_turns_false_first(repo, tmp_path) -> None:
    b = Both(repo, tmp_path / "a.jsonl")
    keep = socket.create_connection(("127.0.0.1", b.rest.port))  # an idle kept connection
    b.rest.app.shutdown()
    assert not b.http.is_server_ready() and b.http.is_server_live()
    t0 = time.monotonic()
    b.close()
    assert time.monotonic() - t0 < 3
    keep.close()
