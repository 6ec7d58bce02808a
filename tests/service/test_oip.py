"""The Open Inference Protocol (service/oip.py), gRPC health and reflection (service/health.py),
over real gRPC on loopback, with Triton's own client (tritonclient.grpc).

The repository is built from real trained packages gated once per session (conftest's
``gated`` fixture, whose gate passes gradcam and fails saliency): model ``ecg`` versions 1
(seed-0) and 2 (seed-1), and model ``broken`` whose only version failed its gate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from cli_helpers import ECGX_WITHOUT_TORCH
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from repo_helpers import make_package
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import InferenceServerException

from ecgx.service.health import NOT_SERVING, SERVING
from ecgx.service.oip import SERVICE_NAME as OIP_SERVICE
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server

MODEL = "ecg"
BROKEN = "broken"

ECGX_SERVICE = "ecgx.v1.ExplanationService"


@pytest.fixture(scope="module")
def repo(gated, tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    root = tmp_path_factory.mktemp("oip") / "repo"
    make_package(gated, root / MODEL / "1", 0)
    make_package(gated, root / MODEL / "2", 1)
    make_package(gated, root / BROKEN / "1", 2, verdict="fail", serve=[])
    repository = ModelRepository(root, [gated["public"]], engine_options={"threads": 1})
    assert [v.servable for v in repository.versions(MODEL)] == [True, True]
    assert not repository.versions(BROKEN)[0].servable
    return repository


class Served:
    """``build_server`` on a free loopback port: ecgx.v1, the OIP (sharing ecgx.v1's request
    slots), health and reflection, as ``ecgx serve`` runs them."""

    def __init__(self, repository: ModelRepository, max_concurrent: int = 8, max_batch: int = 64):
        built = build_server(
            repository,
            security=ServerSecurity.plaintext_unauthenticated(),
            host="127.0.0.1",
            port=0,
            max_batch=max_batch,
            max_concurrent=max_concurrent,
            max_queued=0,
        )
        self.server, self.port, self.ecgx, self.extras = built
        self.oip, self.health = self.extras.oip, self.extras.health
        self.server.start()
        self.url = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.url)
        self.client = tc.InferenceServerClient(self.url)

    def close(self) -> None:
        self.client.close()
        self.channel.close()
        self.server.stop(None)


@pytest.fixture(scope="module")
def served(repo):
    s = Served(repo, max_batch=8)
    yield s
    s.close()


def infer_input(x: np.ndarray, name: str = "ecg", datatype: str = "FP32") -> tc.InferInput:
    i = tc.InferInput(name, list(x.shape), datatype)
    i.set_data_from_numpy(x)
    return i


def code_of(e: InferenceServerException) -> str:
    return str(e.status())


def infer_error(served: Served, x: np.ndarray, **kw: Any) -> InferenceServerException:
    model = kw.pop("model", MODEL)
    with pytest.raises(InferenceServerException) as info:
        served.client.infer(model, [infer_input(x)], **kw)
    return info.value


# ------------------------------------------------------------------------------------ server, metadata


def test_server_live_ready_and_metadata(served) -> None:
    assert served.client.is_server_live()
    assert served.client.is_server_ready()
    meta = served.client.get_server_metadata()
    assert meta.name == "ecgx" and "parameters" in meta.extensions


def test_model_ready_per_version(served) -> None:
    c = served.client
    assert c.is_model_ready(MODEL) and c.is_model_ready(MODEL, "1") and c.is_model_ready(MODEL, "2")
    assert not c.is_model_ready(MODEL, "7")  # unknown version: false, as on Triton
    assert not c.is_model_ready("nope")
    assert not c.is_model_ready(BROKEN)  # its only version failed its gate


def test_model_metadata(served, repo) -> None:
    meta = served.client.get_model_metadata(MODEL)
    assert meta.name == MODEL and list(meta.versions) == ["1", "2"] and meta.platform == "onnxruntime_onnx"
    n = repo.get(MODEL).engine.package.n_classes
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("ecg", "FP32", [-1, 12, 600])]
    # Only what every request can ask for: "attribution" needs the request parameter "method".
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", [-1, n]),
        ("logits", [-1, n]),
    ]
    assert served.client.get_model_metadata(MODEL, "1").name == MODEL
    with pytest.raises(InferenceServerException) as e:
        served.client.get_model_metadata("nope")
    assert code_of(e.value) == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        served.client.get_model_metadata(MODEL, "7")
    assert code_of(e.value) == "StatusCode.NOT_FOUND" and "no version '7'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        served.client.get_model_metadata(BROKEN)
    assert (
        code_of(e.value) == "StatusCode.FAILED_PRECONDITION" and "has no default version" in e.value.message()
    )


def test_triton_only_rpcs_are_unimplemented(served) -> None:
    with pytest.raises(InferenceServerException) as e:
        served.client.get_model_config(MODEL)
    assert code_of(e.value) == "StatusCode.UNIMPLEMENTED"


# ------------------------------------------------------------------------------------------ inference


def test_model_infer_probabilities_match_the_engine(served, repo, beats) -> None:
    engine = repo.get(MODEL).engine
    result = served.client.infer(MODEL, [infer_input(beats)])
    np.testing.assert_array_equal(result.as_numpy("logits"), engine.logits(beats))
    np.testing.assert_allclose(result.as_numpy("probabilities"), engine.probabilities(beats), rtol=1e-6)
    assert result.as_numpy("attribution") is None
    r = result.get_response()
    assert r.model_name == MODEL and r.model_version == "2"  # the default: newest whose gate passed
    assert json.loads(r.parameters["classes"].string_param) == list(engine.package.class_keys)
    assert r.parameters["package_sha256"].string_param == repo.get(MODEL).package_sha256


def test_model_infer_with_attribution_matches_the_engine(served, repo, beats) -> None:
    v1 = repo.get(MODEL, "1")
    result = served.client.infer(
        MODEL,
        [infer_input(beats)],
        model_version="1",
        parameters={"method": "gradcam", "target": "predicted"},
    )
    predicted = v1.engine.logits(beats).argmax(axis=1)
    np.testing.assert_array_equal(result.as_numpy("attribution"), v1.engine.attribute("gradcam", beats))
    np.testing.assert_array_equal(result.as_numpy("logits"), v1.engine.logits(beats))
    r = result.get_response()
    assert r.model_version == "1" and r.parameters["method"].string_param == "gradcam"
    assert json.loads(r.parameters["targets"].string_param) == predicted.tolist()
    assert r.parameters["gate_verdict"].string_param == "pass" and not r.parameters["ungated"].bool_param
    assert r.parameters["gate_report_sha256"].string_param == v1.report_sha256
    # A class key, its SNOMED code and its index name the same target; method settings as JSON
    # (the value the gate checked: another is FAILED_PRECONDITION, tests/service/test_core_gate.py).
    cls = v1.engine.package.manifest["classes"][1]
    expected = v1.engine.attribute("gradcam", beats, target=1, interpolation="linear")
    for target in (cls["key"], cls["code"], 1, "1"):
        got = served.client.infer(
            MODEL,
            [infer_input(beats)],
            model_version="1",
            outputs=[tc.InferRequestedOutput("attribution")],
            parameters={"method": "gradcam", "target": target, "parameters": '{"interpolation": "linear"}'},
        )
        np.testing.assert_array_equal(got.as_numpy("attribution"), expected)
        assert got.as_numpy("probabilities") is None  # only the requested output
        assert json.loads(got.get_response().parameters["targets"].string_param) == [1] * len(beats)


def test_typed_fp32_contents_are_accepted(served, repo, beats) -> None:
    """The same request with ``contents.fp32_contents`` instead of raw bytes (a KServe client's way)."""
    stub = oip_grpc.GRPCInferenceServiceStub(served.channel)
    request = oip_pb.ModelInferRequest(model_name=MODEL, model_version="1")
    t = request.inputs.add(name="ecg", datatype="FP32", shape=list(beats[:2].shape))
    t.contents.fp32_contents.extend(beats[:2].ravel().tolist())
    request.parameters["method"].string_param = "gradcam"
    request.parameters["target"].int64_param = 0
    response = stub.ModelInfer(request, timeout=60)
    names = [o.name for o in response.outputs]
    attribution = np.frombuffer(response.raw_output_contents[names.index("attribution")], "<f4")
    engine = repo.get(MODEL, "1").engine
    np.testing.assert_array_equal(attribution.reshape(2, 12, 600), engine.attribute("gradcam", beats[:2], 0))
    assert [list(o.shape) for o in response.outputs][names.index("attribution")] == [2, 12, 600]


def test_a_method_the_gate_did_not_pass_is_failed_precondition(served, repo, beats) -> None:
    gate = repo.get(MODEL, "1").method_gate("saliency")
    failed = [c.check for c in gate.checks if c.verdict == "fail"]
    assert not gate.servable and failed  # seed-0's gate failed saliency
    e = infer_error(served, beats, model_version="1", parameters={"method": "saliency"})
    assert code_of(e) == "StatusCode.FAILED_PRECONDITION"
    assert "'saliency' did not pass the validation gate of ecg version 1: failed " in e.message()
    assert all(f"{check} score " in e.message() for check in failed), e.message()
    e = infer_error(served, beats, parameters={"method": "lime"})
    assert code_of(e) == "StatusCode.FAILED_PRECONDITION" and "did not check it" in e.message()
    e = infer_error(served, beats, model=BROKEN)
    assert (
        code_of(e) == "StatusCode.FAILED_PRECONDITION"
        and "model 'broken' has no default version" in e.message()
    )


def test_the_refusal_is_the_same_on_both_protocols(served, repo, beats) -> None:
    from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2, ecgx_pb2_grpc

    package = repo.get(MODEL, "1").engine.package
    ecg = ecgx_pb2.Ecg(
        leads=package.leads,
        sampling_rate_hz=500,
        units=ecgx_pb2.MILLIVOLT,
        samples_per_lead=600,
        samples=np.ascontiguousarray(beats[0], "<f4").tobytes(),
    )
    stub = ecgx_pb2_grpc.ExplanationServiceStub(served.channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(ecgx_pb2.ExplainRequest(model=MODEL, version="1", ecgs=[ecg], methods=["saliency"]))
    e = infer_error(served, beats[:1], model_version="1", parameters={"method": "saliency"})
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.message().endswith(err.value.details())  # tritonclient prefixes the status code


def test_oip_shares_the_request_slots_of_ecgx(repo, beats) -> None:
    s = Served(repo, max_concurrent=1)
    try:
        assert s.ecgx.core.admission._slots.acquire(blocking=False)  # the one slot is busy; no queue
        try:
            e = infer_error(s, beats[:1])
            assert code_of(e) == "StatusCode.RESOURCE_EXHAUSTED" and "busy" in e.message()
        finally:
            s.ecgx.core.admission._slots.release()
        assert s.client.infer(MODEL, [infer_input(beats[:1])]).as_numpy("logits").shape[0] == 1
        assert s.ecgx.core.admission._slots.acquire(blocking=False)  # released again after the request
        s.ecgx.core.admission._slots.release()
    finally:
        s.close()


def test_concurrent_triton_clients(served, repo, beats) -> None:
    engine = repo.get(MODEL, "1").engine
    expected = engine.attribute("gradcam", beats, target=0)

    def one(i: int) -> bool:
        client = tc.InferenceServerClient(served.url)
        try:
            for _ in range(3):
                r = client.infer(
                    MODEL,
                    [infer_input(beats)],
                    model_version="1",
                    parameters={"method": "gradcam", "target": 0},
                )
                np.testing.assert_array_equal(r.as_numpy("attribution"), expected)
            return True
        finally:
            client.close()

    with futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(8)))


def test_research_mode_serves_ungated_methods_marked_and_reproducible(gated, repo, beats) -> None:
    research = ModelRepository(
        repo.root, [gated["public"]], allow_ungated=True, engine_options={"threads": 1}
    )
    s = Served(research)
    try:
        settings = {"method": "smoothgrad", "target": "AF", "parameters": '{"n_samples": 3}'}
        r = s.client.infer(MODEL, [infer_input(beats[:2])], model_version="2", parameters=settings)
        p = r.get_response().parameters
        assert p["ungated"].bool_param and p["gate_verdict"].string_param == "not checked"
        effective = json.loads(p["effective_parameters"].string_param)
        assert effective["n_samples"] == 3 and isinstance(effective["seed"], int)  # drawn, reported
        engine = research.get(MODEL, "2").engine
        expected = engine.attribute("smoothgrad", beats[:2], "AF", **effective)
        np.testing.assert_array_equal(r.as_numpy("attribution"), expected)
        again = s.client.infer(
            MODEL,
            [infer_input(beats[:2])],
            model_version="2",
            parameters={**settings, "parameters": json.dumps({"n_samples": 3, "seed": effective["seed"]})},
        )
        np.testing.assert_array_equal(again.as_numpy("attribution"), expected)  # the seed reproduces it
        assert p["compute_seconds"].double_param > 0 and p["onnxruntime_version"].string_param
    finally:
        s.close()


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"model": "nope"}, "NOT_FOUND", "unknown model 'nope'"),
        ({"model_version": "7"}, "NOT_FOUND", "no version '7'"),
        ({"model": BROKEN, "model_version": "1"}, "FAILED_PRECONDITION", "version '1' does not serve"),
        ({"parameters": {"method": "nope"}}, "NOT_FOUND", "unknown attribution method 'nope'"),
        ({"parameters": {"method": "gradcam", "target": "XYZ"}}, "NOT_FOUND", "unknown class 'XYZ'"),
        ({"parameters": {"method": "gradcam", "target": 99}}, "NOT_FOUND", "out of range"),
        ({"parameters": {"method": "gradcam", "parameters": '{"bogus": 1}'}}, "INVALID_ARGUMENT", "bogus"),
        (
            {"parameters": {"method": "gradcam", "parameters": "{not json"}},
            "INVALID_ARGUMENT",
            "not valid JSON",
        ),
        ({"parameters": {"method": "gradcam", "parameters": "[1]"}}, "INVALID_ARGUMENT", "JSON object"),
        ({"parameters": {"target": "AF"}}, "INVALID_ARGUMENT", "needs 'method'"),
        ({"parameters": {"colour": "red"}}, "INVALID_ARGUMENT", "unknown request parameter 'colour'"),
        ({"outputs": ["attribution"]}, "INVALID_ARGUMENT", "'attribution' needs the request parameter"),
        ({"outputs": ["nope"]}, "NOT_FOUND", "unknown output 'nope'"),
    ],
)
def test_bad_requests(served, beats, change, code, message) -> None:
    kw = dict(change)
    if "outputs" in kw:
        kw["outputs"] = [tc.InferRequestedOutput(n) for n in kw["outputs"]]
    e = infer_error(served, beats[:1], **kw)
    assert code_of(e) == f"StatusCode.{code}", e.message()
    assert message in e.message()


def test_out_of_range_method_setting_is_invalid_argument(served, beats) -> None:
    e = infer_error(
        served, beats[:1], parameters={"method": "gradcam", "parameters": '{"interpolation": "cubic-ish"}'}
    )
    assert code_of(e) == "StatusCode.INVALID_ARGUMENT" and "interpolation" in e.message()


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (lambda b: b[:, :11], "INVALID_ARGUMENT", "must have shape [batch, 12, 600]"),
        (lambda b: b[0], "INVALID_ARGUMENT", "must have shape [batch, 12, 600]"),
        (lambda b: b[:0], "INVALID_ARGUMENT", "batch size 0"),
        (lambda b: np.concatenate([b] * 3), "RESOURCE_EXHAUSTED", "at most 8"),
        (lambda b: np.where(np.arange(4)[:, None, None] == 2, np.nan, b), "INVALID_ARGUMENT", "[2] hold NaN"),
        (lambda b: np.where(np.arange(4)[:, None, None] == 1, np.inf, b), "INVALID_ARGUMENT", "[1] hold NaN"),
        (lambda b: b * 1000.0, "INVALID_ARGUMENT", "exceed 50.0 mV"),
    ],
)
def test_bad_inputs(served, beats, make, code, message) -> None:
    x = np.ascontiguousarray(make(beats), dtype=np.float32)
    e = infer_error(served, x)
    assert code_of(e) == f"StatusCode.{code}", e.message()
    assert message in e.message()


def test_bad_input_encodings(served, beats) -> None:
    with pytest.raises(InferenceServerException) as e:
        served.client.infer(MODEL, [infer_input(beats.astype(np.float64), datatype="FP64")])
    assert (
        code_of(e.value) == "StatusCode.INVALID_ARGUMENT" and "datatype FP32, got 'FP64'" in e.value.message()
    )
    with pytest.raises(InferenceServerException) as e:
        served.client.infer(MODEL, [infer_input(beats, name="x")])
    assert "exactly one input named 'ecg'" in e.value.message()
    stub = oip_grpc.GRPCInferenceServiceStub(served.channel)
    request = oip_pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="ecg", datatype="FP32", shape=[1, 12, 600])
    request.raw_input_contents.append(beats[0].tobytes()[:-4])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 28800" in err.value.details()
    request = oip_pb.ModelInferRequest(model_name=MODEL)
    t = request.inputs.add(name="ecg", datatype="FP32", shape=[1, 12, 600])
    t.contents.fp32_contents.extend([0.0] * 10)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 7200" in err.value.details()
    request = oip_pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="ecg", datatype="FP32", shape=[1, 12, 600])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "has no data" in err.value.details()


# ------------------------------------------------------------------------------------ health, reflection


def check(served: Served, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(served.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_server_and_per_model(served) -> None:
    assert check(served, "") == SERVING
    assert check(served, OIP_SERVICE) == SERVING
    assert check(served, MODEL) == SERVING
    assert check(served, BROKEN) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        check(served, "nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def wait_for(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_health_follows_reloads_and_shutdown(gated, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    make_package(gated, root / MODEL / "1", 0)
    repository = ModelRepository(root, [gated["public"]], engine_options={"threads": 1})
    s = Served(repository)
    try:
        assert check(s, MODEL) == SERVING
        (root / MODEL / "1" / "REVOKED").write_text("withdrawn by the test\n")
        repository.reload()
        s.health.update()
        assert check(s, MODEL) == NOT_SERVING and check(s, "") == SERVING
        assert not s.client.is_model_ready(MODEL) and not s.client.is_server_ready()
        s.extras.start(0.05)  # from now on the publisher follows reloads by itself
        (root / MODEL / "1" / "REVOKED").unlink()
        repository.reload()
        wait_for(lambda: check(s, MODEL) == SERVING)
        assert s.client.is_model_ready(MODEL) and s.client.is_server_ready()
        shutil.rmtree(root / MODEL)
        repository.reload()
        wait_for(lambda: check(s, MODEL) == NOT_SERVING)  # a model that left the repository
        s.extras.shutdown()
        assert check(s, "") == NOT_SERVING and check(s, OIP_SERVICE) == NOT_SERVING
        assert not s.client.is_server_ready()
        s.health.update()  # ignored after shutdown
        assert check(s, "") == NOT_SERVING
    finally:
        s.close()


def test_reflection_lists_the_services(served) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    expected = {OIP_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    if ECGX_SERVICE:
        expected.add(ECGX_SERVICE)
    assert names == expected
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=OIP_SERVICE)
    (response,) = list(stub.ServerReflectionInfo(iter([request])))
    assert response.file_descriptor_response.file_descriptor_proto  # grpcurl can describe it


def test_the_oip_and_health_modules_do_not_import_pytorch() -> None:
    # An import hook, not sys.modules["torch"] = None (scipy.stats probes that entry and breaks).
    code = ECGX_WITHOUT_TORCH.split("from ecgx.cli import main")[0] + (
        "import ecgx.service.oip, ecgx.service.health; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
