"""Property: no request body of any shape gets a 500 from the REST transport (hypothesis).

Bodies near the protocol (the right fields with wrong, huge, nested or missing values, method
settings as arbitrary JSON text) and far from it (any JSON, any bytes, any binary header), sent
to a real server on loopback. Every answer is a 2xx or a 4xx with a JSON ``{"error": ...}``
naming the problem, and the server keeps answering.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from repo_helpers import make_package

from ecgx.core.dataset import load_dataset
from ecgx.service.oip_http import start_rest
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server

MODEL = "ecg"
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def url(gated, tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("http_fuzz") / "repo"
    make_package(gated, root / MODEL / "1", 0)
    repository = ModelRepository(root, [gated["public"]], engine_options={"threads": 1})
    security = ServerSecurity.plaintext_unauthenticated()
    built = build_server(repository, security=security, host="127.0.0.1", port=0, max_batch=2)
    built.server.start()
    rest = start_rest(built.servicer.core, security)
    yield f"http://127.0.0.1:{rest.port}/v2/models/{MODEL}/infer"
    rest.stop(1)
    built.server.stop(None)
    repository.stop()


@pytest.fixture(scope="module")
def beat(gated) -> list[float]:
    return np.asarray(load_dataset(gated["family"]["data"]).signals[0], dtype=np.float32).ravel().tolist()


@pytest.fixture(scope="module")
def session() -> Any:
    with requests.Session() as s:
        yield s


def check(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert isinstance(error, str) and error


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
shapes = st.lists(st.integers(min_value=-3, max_value=2**40), max_size=5) | st.sampled_from(
    [[1, 12, 600], [2, 12, 600]]
)
datatypes = st.sampled_from(["FP32", "FP64", "INT32", "BYTES", "BOOL", ""]) | st.text(max_size=6)
parameters = st.dictionaries(
    st.sampled_from(["method", "target", "parameters", "binary_data_output", "priority", "colour"]),
    st.one_of(
        scalars,
        st.sampled_from(["gradcam", "saliency", "lrp", "kernel_shap", "AF", "predicted", "0", "999"]),
        json_values.map(json.dumps),  # method settings as JSON text of any shape
    ),
    max_size=4,
)


@FUZZ
@given(
    name=st.sampled_from(["ecg", "x", ""]),
    datatype=datatypes,
    shape=shapes,
    data=st.one_of(json_values, st.just("beat")),
    params=parameters,
    outputs=st.one_of(st.none(), json_values),
)
def test_near_protocol_bodies_never_get_a_500(
    url, session, beat, name, datatype, shape, data, params, outputs
) -> None:
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": beat if data == "beat" else data}
    body: dict[str, Any] = {"inputs": [tensor], "parameters": params}
    if outputs is not None:
        body["outputs"] = outputs
    check(session.post(url, data=json.dumps(body), timeout=60))


@FUZZ
@given(body=json_values)
def test_any_json_body_never_gets_a_500(url, session, body) -> None:
    check(session.post(url, data=json.dumps(body), timeout=60))


@FUZZ
@given(
    body=st.binary(max_size=4096),
    header=st.one_of(st.none(), st.integers(min_value=-5, max_value=10_000).map(str), st.text(max_size=8)),
)
def test_any_bytes_and_binary_header_never_get_a_500(url, session, body, header) -> None:
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    try:
        response = session.post(url, data=body, headers=headers, timeout=60)
    except (requests.exceptions.InvalidHeader, ValueError):
        return  # requests itself refuses a header with control characters: nothing was sent
    check(response)


@FUZZ
@given(size=st.integers(min_value=0, max_value=40_000), shape=shapes)
@example(size=0, shape=[0, 1320808, 1321122, 1321439])  # found by this test: no values, yet no array
def test_binary_tensors_of_any_declared_size_never_get_a_500(url, session, size, shape) -> None:
    head = json.dumps(
        {
            "inputs": [
                {"name": "ecg", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": size}}
            ]
        }
    ).encode()
    raw = np.random.default_rng(size).normal(0, 0.1, size // 4).astype("<f4").tobytes()
    headers = {"Inference-Header-Content-Length": str(len(head))}
    check(session.post(url, data=head + raw, headers=headers, timeout=60))
