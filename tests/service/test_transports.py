"""One feature of the serving core, tested once and run against every transport: ecgx.v1 over
gRPC, the Open Inference Protocol over gRPC, and the Open Inference Protocol over REST.

The feature: a gate verdict covers the settings it checked. The version's report serves lrp
with no recorded settings, so the gate is taken to have checked lrp's defaults (composite
"epsilon"); asking for composite "epsilon_plus" is FAILED_PRECONDITION naming the setting on
every transport, and is served marked ungated on every transport in research mode. The three
transports share one core (one server, as ``ecgx serve --http-port`` runs them), so the test
fails if any adapter bypasses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as tcg
from repo_helpers import make_package
from tritonclient.utils import InferenceServerException

from ecgx.core.dataset import load_dataset
from ecgx.core.schema import LEADS
from ecgx.service.oip_http import STATUS_HEADER, start_rest
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server

MODEL, METHOD = "ecg", "lrp"
UNCHECKED = {"composite": "epsilon_plus"}
REFUSAL = "composite='epsilon_plus' (the gate checked composite='epsilon')"


@dataclass(frozen=True)
class Outcome:
    """What a transport answered, in the core's terms: the status code name, its message, and
    for an answer whether the attribution was marked ungated."""

    code: str
    message: str = ""
    ungated: bool | None = None


@dataclass
class Ports:
    grpc: str
    http: str


def explain_ecgx_v1(ports: Ports, x: np.ndarray, settings: dict[str, Any]) -> Outcome:
    ecg = pb.Ecg(
        leads=list(LEADS),
        sampling_rate_hz=500.0,
        units=pb.MILLIVOLT,
        samples_per_lead=600,
        samples=x.tobytes(),
    )
    request = pb.ExplainRequest(
        model=MODEL,
        ecgs=[ecg],
        methods=[METHOD],
        parameters_json={METHOD: json.dumps(settings)} if settings else {},
    )
    with grpc.insecure_channel(ports.grpc) as channel:
        try:
            response = pb_grpc.ExplanationServiceStub(channel).Explain(request)
        except grpc.RpcError as e:
            return Outcome(e.code().name, e.details())
    return Outcome("OK", ungated=response.attributions[0].gate.ungated)


def _oip_parameters(settings: dict[str, Any]) -> dict[str, Any]:
    return {"method": METHOD, **({"parameters": json.dumps(settings)} if settings else {})}


def explain_oip_grpc(ports: Ports, x: np.ndarray, settings: dict[str, Any]) -> Outcome:
    client = tcg.InferenceServerClient(ports.grpc)
    tensor = tcg.InferInput("ecg", [1, 12, 600], "FP32")
    tensor.set_data_from_numpy(x[None])
    try:
        result = client.infer(MODEL, [tensor], parameters=_oip_parameters(settings))
    except InferenceServerException as e:
        return Outcome(str(e.status()).removeprefix("StatusCode."), e.message())
    finally:
        client.close()
    return Outcome("OK", ungated=result.get_response(as_json=True)["parameters"]["ungated"]["bool_param"])


def explain_oip_rest(ports: Ports, x: np.ndarray, settings: dict[str, Any]) -> Outcome:
    body = {
        "parameters": _oip_parameters(settings),
        "inputs": [{"name": "ecg", "datatype": "FP32", "shape": [1, 12, 600], "data": x.ravel().tolist()}],
    }
    r = requests.post(f"http://{ports.http}/v2/models/{MODEL}/infer", json=body, timeout=60)
    if r.status_code != 200:
        return Outcome(r.headers[STATUS_HEADER], r.json()["error"])
    return Outcome("OK", ungated=r.json()["parameters"]["ungated"])


TRANSPORTS: dict[str, Callable[[Ports, np.ndarray, dict[str, Any]], Outcome]] = {
    "ecgx.v1 gRPC": explain_ecgx_v1,
    "OIP gRPC": explain_oip_grpc,
    "OIP REST": explain_oip_rest,
}


def serve_all(repository: ModelRepository) -> tuple[Ports, Callable[[], None]]:
    security = ServerSecurity.plaintext_unauthenticated()
    built = build_server(repository, security=security, host="127.0.0.1", port=0)
    built.server.start()
    rest = start_rest(built.servicer.core, security)

    def stop() -> None:
        rest.stop(1)
        built.server.stop(None)

    return Ports(f"127.0.0.1:{built.port}", f"127.0.0.1:{rest.port}"), stop


@pytest.fixture(scope="module", params=[False, True], ids=["gated", "research"])
def served(request, gated, tmp_path_factory) -> Iterator[tuple[Ports, bool]]:
    research = request.param
    root = tmp_path_factory.mktemp("transports") / "repo"
    methods = {**gated["report"]["methods"], METHOD: {"verdict": "pass", "checks": {}}}
    make_package(gated, root / MODEL / "1", serve=[METHOD], methods=methods)
    repository = ModelRepository(
        root, [gated["public"]], allow_ungated=research, engine_options={"threads": 1}
    )
    ports, stop = serve_all(repository)
    yield ports, research
    stop()
    repository.stop()


@pytest.fixture(scope="module")
def beat(gated) -> np.ndarray:
    return np.asarray(load_dataset(gated["family"]["data"]).signals[0], dtype="<f4")


@pytest.mark.parametrize("transport", list(TRANSPORTS), ids=list(TRANSPORTS))
def test_a_setting_the_gate_did_not_check_is_refused_or_marked_ungated_on_every_transport(
    transport, served, beat
) -> None:
    ports, research = served
    explain = TRANSPORTS[transport]
    for checked in ({}, {"composite": "epsilon"}):  # the defaults, implicit or spelled out: gated
        assert explain(ports, beat, checked) == Outcome("OK", ungated=False)
    outcome = explain(ports, beat, UNCHECKED)
    if research:
        assert outcome == Outcome("OK", ungated=True)
    else:
        assert outcome.code == "FAILED_PRECONDITION" and REFUSAL in outcome.message, outcome
