"""ECG documents in (DICOM, HL7 aECG, GE MUSE, Philips Sierra, FHIR), FHIR Observations out, over
a real loopback server: ecgx.v1 gRPC, the Open Inference Protocol on gRPC and on REST.

Documents are written by independent producers (tests/ecg_format_helpers.py: pydicom,
fhir.resources, ElementTree) from a real PTB-XL record; the raw samples each is compared with are
the ones the document holds (the reader's output), so an explanation of the document must equal
that of its samples sent raw bit for bit: the document is decoded in one place and then takes
the samples' path.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tcg
import tritonclient.http as tch
from ecg_format_helpers import (
    dicom_bytes,
    dicom_dataset,
    real_record,
    write_aecg,
    write_dicom,
    write_fhir,
    write_muse,
    write_sierra,
)
from fhir.resources.R4B.observation import Observation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from repo_helpers import make_package

from ecgx.core.ecg_formats import FORMATS, STANDARD_LEADS, read_ecg_document
from ecgx.core.errors import InvalidArgument
from ecgx.service import fhir_output
from ecgx.service.ecg_input import (
    MEDIAN_BEAT,
    RHYTHM_STRIP,
    DocumentBytes,
    DocumentEcg,
    ModelInput,
    decode_input,
)
from ecgx.service.oip_http import start_rest
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server

MODEL, PASSED = "ecg", "gradcam"
WRITERS = {
    "dicom": write_dicom,
    "fhir": write_fhir,
    "hl7-aecg": write_aecg,
    "ge-muse": lambda mv, fs: write_muse(mv[[0, 1, 6, 7, 8, 9, 10, 11]], fs),
    "philips-sierra": write_sierra,
}


@pytest.fixture(scope="module")
def repo(gated, tmp_path_factory):
    root = tmp_path_factory.mktemp("documents") / "repo"
    make_package(gated, root / MODEL / "1", 0)
    repository = ModelRepository(root, [gated["public"]], engine_options={"threads": 1})
    yield repository
    repository.stop()


class Served:
    """``build_server`` (ecgx.v1 + OIP gRPC) and the REST transport over its core."""

    def __init__(self, repository: ModelRepository):
        security = ServerSecurity.plaintext_unauthenticated()
        built = build_server(repository, security=security, host="127.0.0.1", port=0, max_batch=8)
        self.server, self.core = built.server, built.servicer.core
        self.server.start()
        self.rest = start_rest(self.core, security)
        url = f"127.0.0.1:{built.port}"
        self.channel = grpc.insecure_channel(url)
        self.ecgx = pb_grpc.ExplanationServiceStub(self.channel)
        self.oip = tcg.InferenceServerClient(url)
        self.http = tch.InferenceServerClient(f"127.0.0.1:{self.rest.port}")

    def close(self) -> None:
        self.http.close()
        self.oip.close()
        self.channel.close()
        self.rest.stop(1)
        self.server.stop(None)


@pytest.fixture(scope="module")
def served(repo):
    s = Served(repo)
    yield s
    s.close()


@pytest.fixture(scope="module")
def record(shared_data):
    mv, fs = real_record(shared_data)
    return np.asarray(mv, np.float32), float(fs)


def raw_ecg(mv: np.ndarray, fs: float) -> pb.Ecg:
    return pb.Ecg(
        leads=list(STANDARD_LEADS),
        sampling_rate_hz=fs,
        units=pb.MILLIVOLT,
        samples_per_lead=mv.shape[1],
        samples=np.ascontiguousarray(mv, "<f4").tobytes(),
    )


def document_ecg(fmt: str, data: bytes) -> pb.Ecg:
    return pb.Ecg(document=pb.EcgDocumentBytes(format=fmt, data=data))


def explain(served: Served, ecg: pb.Ecg) -> pb.ExplainResponse:
    return served.ecgx.Explain(pb.ExplainRequest(model=MODEL, ecgs=[ecg], methods=[PASSED]), timeout=120)


def array(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, "<f4").reshape(list(t.shape))


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# ------------------------------------------------------------------------------ ecgx.v1


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_document_is_explained_as_its_samples_sent_raw(served, record, fmt) -> None:
    mv, fs = record
    data = WRITERS[fmt](mv, fs)
    held = read_ecg_document(data, fmt).rhythm
    from_document = explain(served, document_ecg(fmt, data))
    from_samples = explain(served, raw_ecg(held.mv, held.sampling_rate_hz))
    assert from_document.beats.data == from_samples.beats.data
    assert [a.attribution.data for a in from_document.attributions] == [
        a.attribution.data for a in from_samples.attributions
    ]
    assert from_document.probabilities.data == from_samples.probabilities.data
    # the reading matches the record within the format's quantisation, lead by lead
    assert np.allclose(held.mv, mv, atol=0.01)


def test_a_median_beat_at_the_models_rate_is_used_as_the_document_holds_it(served, record) -> None:
    mv, fs = record
    beat = explain(served, raw_ecg(mv, fs))  # the server's median beat of the strip
    median = array(beat.beats)[0]
    data = write_dicom(mv, fs, median_mv=median)
    held = read_ecg_document(data, "dicom").median_beat
    r = served.ecgx.Predict(pb.PredictRequest(model=MODEL, ecgs=[document_ecg("dicom", data)]), timeout=60)
    assert np.array_equal(array(r.beats)[0], held.mv)  # as held: no median of a median


def test_predict_takes_documents_and_samples_in_one_batch(served, record) -> None:
    mv, fs = record
    ecgs = [document_ecg("fhir", write_fhir(mv, fs)), raw_ecg(mv, fs)]
    r = served.ecgx.Predict(pb.PredictRequest(model=MODEL, ecgs=ecgs), timeout=60)
    assert tuple(r.probabilities.shape) == (2, len(r.class_keys))


def _bomb() -> bytes:
    entities = "".join(f'<!ENTITY e{i} "{f"&e{i - 1};" * 10}">' for i in range(1, 10))
    return (
        f'<?xml version="1.0"?><!DOCTYPE AnnotatedECG [<!ENTITY e0 "lol">{entities}]>'
        "<AnnotatedECG>&e9;</AnnotatedECG>"
    ).encode()


def _huge_dicom(mv: np.ndarray, fs: float) -> bytes:
    dataset = dicom_dataset(mv[:, :1000], fs)
    dataset.WaveformSequence[0].NumberOfWaveformSamples = 3_000_000_000
    return dicom_bytes(dataset)


@pytest.mark.parametrize(
    ("name", "fmt", "make", "field"),
    [
        ("xml bomb", "hl7-aecg", lambda mv, fs: _bomb(), "ecgs[0].document.data"),
        ("billions announced", "dicom", _huge_dicom, "ecgs[0].document.data"),
        ("truncated", "dicom", lambda mv, fs: write_dicom(mv, fs)[:5000], "ecgs[0].document.data"),
        (
            "truncated xml",
            "ge-muse",
            lambda mv, fs: WRITERS["ge-muse"](mv, fs)[:3000],
            "ecgs[0].document.data",
        ),
        ("wrong format", "fhir", lambda mv, fs: write_dicom(mv, fs), "ecgs[0].document.data"),
        ("unknown format", "pdf", lambda mv, fs: b"%PDF-1.4", "ecgs[0].document.format"),
        ("no format", "", lambda mv, fs: b"{}", "ecgs[0].document.format"),
    ],
)
def test_hostile_documents_are_invalid_arguments_naming_the_field(
    served, record, name, fmt, make, field
) -> None:
    mv, fs = record
    error = refusal(lambda: explain(served, document_ecg(fmt, make(mv, fs))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.details())
    assert field in error.details(), error.details()
    assert served.ecgx.ListModels(pb.ListModelsRequest(), timeout=10).models  # still up


def test_a_document_and_samples_in_one_ecg_are_refused(served, record) -> None:
    mv, fs = record
    ecg = raw_ecg(mv, fs)
    ecg.document.format, ecg.document.data = "fhir", write_fhir(mv, fs)
    error = refusal(lambda: explain(served, ecg))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ecgs[0]: holds a document and samples fields" in error.details()


# ------------------------------------------------------------------------------ Open Inference Protocol


def _documents(*docs: bytes, http: bool = False):
    module = tch if http else tcg
    i = module.InferInput("ecg_document", [len(docs)], "BYTES")
    values = np.array(list(docs), dtype=np.object_)
    if http:
        i.set_data_from_numpy(values, binary_data=True)
    else:
        i.set_data_from_numpy(values)
    return i


@pytest.mark.parametrize("http", [False, True], ids=["grpc", "rest"])
def test_oip_takes_documents_and_returns_fhir_observations(served, record, http) -> None:
    mv, fs = record
    dicom = write_dicom(mv, fs)
    reference = explain(served, document_ecg("dicom", dicom))
    client = served.http if http else served.oip
    result = client.infer(
        MODEL,
        [_documents(dicom, http=http)],
        parameters={"format": "dicom", "method": PASSED, "fhir": True},
    )
    assert np.array_equal(result.as_numpy("attribution")[0], array(reference.attributions[0].attribution))
    observations = result.as_numpy("fhir_observation")
    assert observations.shape == (1,)
    text = observations[0]
    check_observation(text, reference)


def test_rest_takes_text_documents_as_json_strings(served, record) -> None:
    mv, fs = record
    fhir = write_fhir(mv, fs)
    reference = explain(served, document_ecg("fhir", fhir))
    i = tch.InferInput("ecg_document", [1], "BYTES")
    i.set_data_from_numpy(np.array([fhir.decode()], dtype=np.object_), binary_data=False)
    result = served.http.infer(MODEL, [i], parameters={"format": "fhir", "method": PASSED})
    assert np.array_equal(result.as_numpy("attribution")[0], array(reference.attributions[0].attribution))


@pytest.mark.parametrize("http", [False, True], ids=["grpc", "rest"])
def test_oip_refuses_hostile_documents_as_bad_requests(served, record, http) -> None:
    from tritonclient.utils import InferenceServerException

    client = served.http if http else served.oip
    for fmt, data, phrase in [
        ("hl7-aecg", _bomb(), "ecgs[0].document.data"),
        ("dicom", _huge_dicom(*record), "ecgs[0].document.data"),
        ("pdf", b"%PDF", "request parameter 'format' must be one of"),
    ]:
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, [_documents(data, http=http)], parameters={"format": fmt})
        assert phrase in str(info.value)
        assert "400" in str(info.value.status()) or "INVALID_ARGUMENT" in str(info.value.status())
    assert client.is_server_live()


# ------------------------------------------------------------------------------ FHIR out


def check_observation(text: bytes, reference: pb.ExplainResponse) -> None:
    """A valid R4 Observation carrying the attribution, its method, verdict and report hash."""
    resource = Observation.model_validate_json(text)  # fhir.resources validates it
    doc = json.loads(text)
    a = reference.attributions[0]
    ext = {e["url"]: e["valueString"] for e in doc["extension"]}
    assert ext[fhir_output.EXT_METHOD] == PASSED == a.method
    assert ext[fhir_output.EXT_GATE_VERDICT] == a.gate.verdict == "pass"
    assert ext[fhir_output.EXT_GATE_REPORT] == reference.gate_report_sha256 != ""
    assert ext[fhir_output.EXT_TARGET] == a.target_class
    components = doc["component"]
    assert len(components) == 24 and resource.status == "final"
    signal = np.stack([fhir_output.sampled_values(c) for c in components[:12]])
    attribution = np.stack([fhir_output.sampled_values(c) for c in components[12:]])
    assert np.array_equal(signal, array(reference.beats)[0])
    assert np.array_equal(attribution, array(a.attribution))
    assert all(c["code"]["coding"][0]["code"] == "ecg-attribution" for c in components[12:])


# ------------------------------------------------------------------------------ properties


SPEC = ModelInput()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.one_of(st.sampled_from(FORMATS), st.text(max_size=20)), data=st.binary(max_size=4096))
def test_any_document_fields_are_read_or_refused_as_invalid_argument(fmt, data) -> None:
    try:
        x, waveform = decode_input(DocumentEcg(DocumentBytes(fmt, data)), STANDARD_LEADS, SPEC, "ecgs[0]")
    except InvalidArgument as e:
        assert str(e).startswith("ecgs[0].document")
    else:  # pragma: no cover - random bytes are never an ECG
        assert x.shape == (12, 600) and waveform in (MEDIAN_BEAT, RHYTHM_STRIP)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(fmt=st.sampled_from([*FORMATS, "", "DICOM", "x" * 300]), data=st.binary(max_size=2048))
def test_any_document_fields_over_grpc_are_invalid_argument_never_internal(served, fmt, data) -> None:
    error = refusal(lambda: explain(served, document_ecg(fmt, data)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "ecgs[0].document." in error.details()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(min_value=0, max_value=10_000), fmt=st.sampled_from(FORMATS))
def test_any_prefix_of_a_real_document_is_read_or_refused(cut, fmt) -> None:
    rng = np.random.default_rng(0)
    mv = np.cumsum(rng.normal(0, 0.01, (12, 2000)), axis=1).astype(np.float32)
    data = WRITERS[fmt](mv, 500.0)
    try:
        decode_input(DocumentEcg(DocumentBytes(fmt, data[: cut % (len(data) + 1)])), STANDARD_LEADS, SPEC)
    except InvalidArgument as e:
        assert str(e).startswith("ecg.document")


# ------------------------------------------------------------------------------ the core's hook

# The core reports what each input was made from and ecgx.v1 returns FHIR once service/core.py,
# requests.py and server.py carry the hook (engineer C's files); until then these skip.
needs_hook = pytest.mark.skipif(
    not hasattr(
        __import__("ecgx.service.requests", fromlist=["PredictResult"]).PredictResult, "ecg_waveforms"
    ),
    reason="the serving core does not report ecg_waveforms yet (hook in service/core.py pending)",
)


@needs_hook
def test_the_response_says_which_waveform_each_input_was_made_from(served, record) -> None:
    mv, fs = record
    strip = explain(served, raw_ecg(mv, fs))
    median = array(strip.beats)[0]
    ecgs = [
        document_ecg("dicom", write_dicom(mv, fs, median_mv=median)),  # its median beat fits
        document_ecg("fhir", write_fhir(mv, fs)),  # a rhythm strip only
        raw_ecg(median, 500.0),  # a beat sent as samples
    ]
    r = served.ecgx.Predict(pb.PredictRequest(model=MODEL, ecgs=ecgs), timeout=60)
    assert list(r.ecg_waveforms) == [MEDIAN_BEAT, RHYTHM_STRIP, MEDIAN_BEAT]
    assert list(strip.ecg_waveforms) == [RHYTHM_STRIP]


@needs_hook
def test_ecgx_v1_explain_returns_a_fhir_observation_per_attribution(served, record) -> None:
    mv, fs = record
    request = pb.ExplainRequest(
        model=MODEL, ecgs=[document_ecg("dicom", write_dicom(mv, fs))], methods=[PASSED], fhir=True
    )
    r = served.ecgx.Explain(request, timeout=120)
    assert len(r.attributions) == 1
    check_observation(r.attributions[0].fhir_observation, r)
    plain = explain(served, document_ecg("dicom", write_dicom(mv, fs)))
    assert plain.attributions[0].fhir_observation == b""  # only when asked


# ------------------------------------------------------------------------------ the OIP codec


@pytest.mark.parametrize(
    ("parameters", "name", "datatype", "shape", "raw", "phrase"),
    [
        ({}, "ecg_document", "BYTES", [1], b"\x01\0\0\0x", "needs the request parameter 'format'"),
        ({"format": "dicom"}, "ecg_document", "FP32", [1], b"", "must have datatype BYTES"),
        ({"format": "dicom"}, "ecg_document", "BYTES", [1, 1], b"", "must have shape [batch]"),
        ({"format": "dicom"}, "ecg_document", "BYTES", [1], b"\x05\0\0", "before element 0's 4-byte length"),
        ({"format": "dicom"}, "ecg_document", "BYTES", [1], b"\x09\0\0\0abc", "announces 9 bytes"),
        ({"format": "dicom"}, "ecg_document", "BYTES", [1], b"\x01\0\0\0ab", "1 bytes after the 1 elements"),
        ({"format": "dicom"}, "ecg", "FP32", [1, 12, 600], b"", "'format' goes with input 'ecg_document'"),
        ({"format": "docx"}, "ecg_document", "BYTES", [1], b"", "'format' must be one of dicom"),
        ({"fhir": True}, "ecg", "FP32", [1, 12, 600], b"", "'fhir' needs 'method'"),
        ({"fhir": "yes", "method": "gradcam"}, "ecg", "FP32", [1], b"", "'fhir' must be a boolean"),
    ],
)
def test_the_codec_refuses_bad_document_inputs_naming_them(parameters, name, datatype, shape, raw, phrase):
    from ecgx.service import oip_codec as codec

    with pytest.raises(InvalidArgument) as info:
        call = codec.parse_parameters(parameters)
        codec.input_ecgs(name, datatype, shape, call, raw=raw)
    assert phrase in str(info.value)


def test_the_codec_reads_kserve_bytes_both_ways() -> None:
    from ecgx.service import oip_codec as codec

    call = codec.parse_parameters({"format": "fhir"})
    docs = [b"{}", b"", "text é".encode()]
    raw = codec.input_ecgs("ecg_document", "BYTES", [3], call, raw=codec.bytes_tensor(docs))
    listed = codec.input_ecgs("ecg_document", "BYTES", [3], call, values=[b"{}", "", "text é"])
    assert [e.document.data for e in raw] == docs == [e.document.data for e in listed]
    assert {e.document.format for e in raw} == {"fhir"}
