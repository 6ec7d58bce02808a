"""Bad input of any shape never gives INTERNAL or UNKNOWN, on ecgx.v1 or the OIP (issue 19, items 5
and 7), over real loopback channels; property-based fuzzing of request messages and method
settings with hypothesis.

Before the core: JSON settings nested 100,000 deep, 5,000-digit integers and ragged baseline lists
were INTERNAL on both protocols; a ``snomed_code`` of non-ASCII digits was taken as a class index;
``Ecg.id`` was documented as echoed back but was not; ModelMetadata listed an ``attribution``
output a generic client could not request.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from core_helpers import MODEL, CoreServer, beats_of, ecg_msg, failure, infer_request, make_core_repo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as oip_pb

from ecgx.service.methods import METHOD_NAMES
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.requests import Quotas

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@pytest.fixture(scope="module")
def root(gated, tmp_path_factory):
    return make_core_repo(gated, tmp_path_factory.mktemp("core_input") / "repo")


@pytest.fixture(scope="module", params=["gated", "research"])
def server(request, root, gated):
    # A small budget keeps fuzzed requests cheap: an expensive one is refused before any work.
    s = CoreServer(
        root, gated["public"], allow_ungated=request.param == "research", quotas=Quotas(max_request_cost=4000)
    )
    yield s
    s.close()


@pytest.fixture(scope="module")
def beats(gated):
    return beats_of(gated, 2)


# ------------------------------------------------------------------------------ hostile settings JSON

DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE = {
    "nested 100,000 deep": '{"baseline": ' + DEEP + "}",
    "5,000-digit integer": '{"n_steps": ' + "9" * 5000 + "}",
    "ragged baseline": '{"baseline": [[0.0, 1.0], [2.0]]}',
    "NaN": '{"n_steps": NaN}',
    "2**64": '{"n_steps": 18446744073709551616}',
    "1e999": '{"stdev": 1e999}',
    "deep object": '{"baseline": {"a": {"b": {"c": {"d": 1}}}}}',
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_settings_json_is_invalid_argument_on_both_protocols(server, beats, name) -> None:
    text = HOSTILE[name]
    request = pb.ExplainRequest(
        model=MODEL,
        ecgs=[ecg_msg(b, server.leads) for b in beats],
        methods=["integrated_gradients"],
        parameters_json={"integrated_gradients": text},
    )
    code, v1 = failure(lambda: server.ecgx.Explain(request, timeout=60))
    assert code == INVALID, (name, code, v1)
    params = {"method": "integrated_gradients", "parameters": text}
    code, oip = failure(lambda: server.oip.ModelInfer(infer_request(beats, params), timeout=60))
    assert code == INVALID, (name, code, oip)
    assert len(v1) < 2000 and len(oip) < 2000


def test_messages_name_what_is_wrong(server, beats) -> None:
    def error(text: str) -> str:
        request = pb.ExplainRequest(
            model=MODEL, ecgs=[ecg_msg(b, server.leads) for b in beats], methods=["integrated_gradients"],
            parameters_json={"integrated_gradients": text},
        )  # fmt: skip
        return failure(lambda: server.ecgx.Explain(request, timeout=60))[1]

    assert "nests too deep" in error(HOSTILE["nested 100,000 deep"])
    assert "integer" in error(HOSTILE["5,000-digit integer"])
    assert "rectangular" in error(HOSTILE["ragged baseline"])


# ------------------------------------------------------------------------------ small items of point 7


@pytest.mark.parametrize("code", ["٣", "３", "४२३", "²"])
def test_a_snomed_code_of_non_ascii_digits_is_refused_not_taken_as_an_index(server, beats, code) -> None:
    request = pb.ExplainRequest(
        model=MODEL, ecgs=[ecg_msg(b, server.leads) for b in beats], methods=["gradcam"],
        targets=[pb.Target(snomed_code=code)],
    )  # fmt: skip
    status, msg = failure(lambda: server.ecgx.Explain(request, timeout=60))
    assert status == INVALID and "ASCII digits" in msg
    # The OIP's target is a key, code or index: a non-ASCII "digit" is none of them.
    params = {"method": "gradcam", "target": code}
    status, msg = failure(lambda: server.oip.ModelInfer(infer_request(beats, params), timeout=60))
    assert status == grpc.StatusCode.NOT_FOUND and "unknown class" in msg


def test_ascii_snomed_codes_and_indices_still_work(server, beats) -> None:
    package = server.repository.get(MODEL).engine.package
    code = package.manifest["classes"][3]["code"]
    r = server.explain(beats, ["gradcam"], targets=[pb.Target(snomed_code=code)])
    assert {a.target_class for a in r.attributions} == {package.class_keys[3]}
    request = pb.ExplainRequest(
        model=MODEL, ecgs=[ecg_msg(b, server.leads) for b in beats], methods=["gradcam"],
        targets=[pb.Target(snomed_code="3")],
    )  # fmt: skip
    assert failure(lambda: server.ecgx.Explain(request, timeout=60))[0] == grpc.StatusCode.NOT_FOUND


def test_ecg_ids_are_echoed_in_request_order(server, beats) -> None:
    ecgs = [ecg_msg(b, server.leads, id=f"visit-{i}") for i, b in enumerate(beats)]
    ecgs[1].id = ""
    predicted = server.ecgx.Predict(pb.PredictRequest(model=MODEL, ecgs=ecgs), timeout=60)
    assert list(predicted.ecg_ids) == ["visit-0", ""]
    explained = server.ecgx.Explain(
        pb.ExplainRequest(model=MODEL, ecgs=ecgs, methods=["gradcam"]), timeout=60
    )
    assert list(explained.ecg_ids) == ["visit-0", ""]


def test_model_metadata_lists_only_outputs_every_request_can_ask_for(server, beats) -> None:
    meta = server.oip.ModelMetadata(oip_pb.ModelMetadataRequest(name=MODEL), timeout=30)
    listed = [o.name for o in meta.outputs]
    request = infer_request(beats)
    for name in listed:
        request.outputs.add(name=name)
    r = server.oip.ModelInfer(request, timeout=60)  # a generic client asks for every listed output
    assert [o.name for o in r.outputs] == listed == ["probabilities", "logits"]


# ------------------------------------------------------------------------------ fuzzing

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
PARAM_NAMES = st.sampled_from(
    [
        *("n_steps", "n_samples", "window", "stride", "baseline", "seed", "composite", "relu"),
        *("epsilon", "stdev", "abs", "method", "coalitions", "bogus"),
    ]
)
SETTINGS_TEXT = st.one_of(
    st.dictionaries(PARAM_NAMES, JSON, max_size=3).map(json.dumps),
    JSON.map(json.dumps),
    st.text(max_size=40),
)
METHOD = st.one_of(st.sampled_from(METHOD_NAMES), st.text(max_size=12))
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


@st.composite
def ecgs(draw, beats: np.ndarray) -> list[pb.Ecg]:
    out = []
    for i in range(draw(st.integers(0, 3))):
        x = beats[i % len(beats)]
        choice = draw(st.integers(0, 5))
        if choice == 0:  # a good one
            out.append(ecg_msg(x, LEADS))
            continue
        leads = draw(
            st.one_of(st.just(LEADS), st.lists(st.sampled_from([*LEADS, "X", "", "v1"]), max_size=13))
        )
        samples = draw(st.integers(0, 700)) if choice == 1 else x.shape[-1]
        data = draw(st.binary(max_size=64)) if choice == 2 else np.resize(x, (len(leads), samples)).tobytes()
        out.append(
            pb.Ecg(
                leads=leads,
                sampling_rate_hz=draw(
                    st.sampled_from([500.0, 0.0, -1.0, float("nan"), float("inf"), 250.0, 1e9])
                ),
                units=draw(st.sampled_from([0, 1, 2, 7])),
                samples_per_lead=draw(st.sampled_from([samples, 0, 600, 2**32 - 1])),
                samples=data,
                id=draw(st.text(max_size=10)),
            )
        )
    return out


def target_msg() -> st.SearchStrategy:
    return st.one_of(
        st.builds(pb.Target),
        st.builds(lambda v: pb.Target(class_key=v), st.text(max_size=10)),
        st.builds(lambda v: pb.Target(snomed_code=v), st.text(alphabet="0123456789٣３x", max_size=10)),
        st.builds(lambda v: pb.Target(index=v), st.integers(0, 2**32 - 1)),
        st.builds(lambda v: pb.Target(predicted=v), st.booleans()),
        st.builds(lambda v: pb.Target(top_k=v), st.integers(0, 2**32 - 1)),
        st.builds(lambda v: pb.Target(all_predicted=v), st.booleans()),
    )


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(data=st.data())
def test_fuzzed_ecgx_v1_requests_never_internal(server, beats, data) -> None:
    methods = data.draw(st.lists(METHOD, max_size=3))
    named = data.draw(st.lists(st.one_of(st.sampled_from(methods or ["x"]), METHOD), max_size=3))
    request = pb.ExplainRequest(
        model=data.draw(st.sampled_from([MODEL, "", "nope", MODEL + "\x00"])),
        version=data.draw(st.sampled_from(["", "1", "2", "../1"])),
        ecgs=data.draw(ecgs(beats)),
        methods=methods,
        targets=data.draw(st.lists(target_msg(), max_size=3)),
        parameters_json={m: data.draw(SETTINGS_TEXT) for m in named},
    )
    rpc = server.ecgx.Explain if data.draw(st.booleans()) else None
    try:
        if rpc is None:
            server.ecgx.Predict(
                pb.PredictRequest(model=request.model, version=request.version, ecgs=request.ecgs), timeout=60
            )
        else:
            rpc(request, timeout=60)
    except grpc.RpcError as e:
        assert e.code() not in NEVER, (e.code(), e.details())
        assert e.details(), e.code()


@FUZZ
@given(data=st.data())
def test_fuzzed_oip_requests_never_internal(server, beats, data) -> None:
    request = oip_pb.ModelInferRequest(
        model_name=data.draw(st.sampled_from([MODEL, "", "nope"])),
        model_version=data.draw(st.sampled_from(["", "1", "9"])),
    )
    shape = data.draw(
        st.one_of(st.just([len(beats), 12, 600]), st.lists(st.integers(-2, 2**40), min_size=0, max_size=4))
    )
    t = request.inputs.add(
        name=data.draw(st.sampled_from(["ecg", "ecg", "x"])),
        datatype=data.draw(st.sampled_from(["FP32", "FP32", "FP64", "BYTES", ""])),
        shape=shape,
    )
    form = data.draw(st.integers(0, 3))
    if form == 0:
        request.raw_input_contents.append(np.ascontiguousarray(beats, "<f4").tobytes())
    elif form == 1:
        request.raw_input_contents.append(data.draw(st.binary(max_size=256)))
    elif form == 2:
        t.contents.fp32_contents.extend(data.draw(st.lists(st.floats(width=32), max_size=16)))
    for name in data.draw(
        st.lists(st.sampled_from(["method", "target", "parameters", "priority", "zz"]), max_size=4)
    ):
        p = request.parameters[name]
        kind = data.draw(st.integers(0, 3))
        if kind == 0:
            p.string_param = data.draw(st.one_of(METHOD, SETTINGS_TEXT, st.text(max_size=10)))
        elif kind == 1:
            p.int64_param = data.draw(st.integers(-(2**63), 2**63 - 1))
        elif kind == 2:
            p.bool_param = data.draw(st.booleans())
        else:
            p.double_param = data.draw(st.floats())
    for name in data.draw(
        st.lists(st.sampled_from(["probabilities", "logits", "attribution", "nope"]), max_size=3)
    ):
        request.outputs.add(name=name)
    try:
        server.oip.ModelInfer(request, timeout=60)
    except grpc.RpcError as e:
        assert e.code() not in NEVER, (e.code(), e.details())
        assert e.details(), e.code()


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=200),
        SETTINGS_TEXT,
        st.text(alphabet='[]{}":,0123456789eE.-+ natrufls', max_size=300),
    )
)
def test_the_one_settings_parser_refuses_with_invalid_argument_only(text: str) -> None:
    from ecgx.core.errors import InvalidArgument
    from ecgx.service.core import MAX_SETTINGS_DEPTH, parse_settings_json

    try:
        value = parse_settings_json(text, "parameters")
    except InvalidArgument as e:
        assert "parameters" in str(e)
        return
    assert isinstance(value, dict)
    json.dumps(value, allow_nan=False)  # what it accepts can be echoed back in effective_parameters
    assert _depth(value) <= MAX_SETTINGS_DEPTH


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@pytest.mark.parametrize("shape", [[0, 2**40, 2**40], [0, 12, 600], [2**40, 12, 600], [1, 0, 2**62]])
def test_a_shape_with_a_zero_beside_huge_dimensions_is_invalid_argument(server, shape) -> None:
    """Found by D's REST fuzzing: the count is 0, but NumPy refuses the shape (it was INTERNAL)."""
    request = oip_pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="ecg", datatype="FP32", shape=shape)
    request.raw_input_contents.append(b"")
    code, msg = failure(lambda: server.oip.ModelInfer(request, timeout=30))
    assert code == INVALID, msg
