"""Hostile ECG documents are refused with a clear error, before they cost memory (issue #23).

The documents are built here (bombs, crafted DICOM attributes) or by the test writers in
tests/ecg_format_helpers.py from a synthetic signal, then damaged; hypothesis mutates the bytes
of a valid document of each format and checks that nothing but EcgDocumentError ever comes out.
"""

from __future__ import annotations

import base64
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from ecg_format_helpers import (
    INDEPENDENT_LEADS,
    STANDARD_LEADS,
    dicom_bytes,
    dicom_dataset,
    lzw_encode,
    write_aecg,
    write_dicom,
    write_fhir,
    write_muse,
    write_sierra,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecgx.core.ecg_formats import DocumentLimits, EcgDocument, EcgDocumentError, read_ecg_document

RATE = 500.0
MEMORY_BOUND = 3 * 1024 * 1024  # bytes: a refused document must cost no more than a few MB


def _signal(samples: int = 200, leads: int = 12) -> np.ndarray:
    t = np.arange(samples) / RATE
    return np.stack([np.sin(2 * np.pi * (1 + k) * t) * (0.5 + 0.1 * k) for k in range(leads)])


def _peak_while_refused(call: Callable[[], object], match: str) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(EcgDocumentError, match=match):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _billion_laughs(root: str) -> bytes:
    entities = ['<!ENTITY lol0 "lollollollollollollollollollol">']
    entities += [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    return (
        f'<?xml version="1.0"?>\n<!DOCTYPE {root} [\n'
        + "\n".join(entities)
        + f"\n]>\n<{root}>&lol9;</{root}>"
    ).encode()


XML_FORMATS = {"hl7-aecg": "AnnotatedECG", "ge-muse": "RestingECG", "philips-sierra": "restingecgdata"}


@pytest.mark.parametrize("fmt", sorted(XML_FORMATS))
def test_an_xml_bomb_is_refused_in_bounded_memory(fmt: str) -> None:
    data = _billion_laughs(XML_FORMATS[fmt])
    peak = _peak_while_refused(lambda: read_ecg_document(data, fmt), "DTD is refused")
    assert peak < MEMORY_BOUND, f"peak {peak} bytes"


@pytest.mark.parametrize("fmt", sorted(XML_FORMATS))
def test_an_external_entity_is_refused(fmt: str) -> None:
    root = XML_FORMATS[fmt]
    data = (
        f'<?xml version="1.0"?><!DOCTYPE {root} [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        f"<{root}>&x;</{root}>"
    ).encode()
    with pytest.raises(EcgDocumentError, match="refused"):
        read_ecg_document(data, fmt)


def test_deep_nesting_is_refused_while_parsing() -> None:
    data = b"<RestingECG>" + b"<a>" * 5000 + b"</a>" * 5000 + b"</RestingECG>"
    peak = _peak_while_refused(
        lambda: read_ecg_document(data, "ge-muse"), "nesting deeper than the limit of 64"
    )
    assert peak < MEMORY_BOUND


def test_too_many_elements_are_refused_while_parsing() -> None:
    data = b"<restingecgdata>" + b"<x/>" * 300_000 + b"</restingecgdata>"
    peak = _peak_while_refused(
        lambda: read_ecg_document(data, "philips-sierra"), "more XML elements than the limit of 200000"
    )
    assert peak < 32 * 1024 * 1024  # ~17 MB measured: the elements up to the limit, never more


@pytest.mark.parametrize("encoding", [b"utf-83p", b"utf-16"])
def test_an_unknown_or_wrong_xml_encoding_is_refused(encoding: bytes) -> None:
    data = WRITERS["ge-muse"]().replace(b"encoding='utf-8'", b"encoding='" + encoding + b"'", 1)
    assert data != WRITERS["ge-muse"]()
    with pytest.raises(EcgDocumentError, match="GE MUSE"):
        read_ecg_document(data, "ge-muse")


def test_a_document_over_max_bytes_is_refused_before_parsing() -> None:
    data = write_fhir(_signal(), RATE)
    with pytest.raises(EcgDocumentError, match=r"document: \d+ bytes is over the limit of 1000 bytes"):
        read_ecg_document(data, "fhir", limits=DocumentLimits(max_bytes=1000))


def test_a_dicom_announcing_billions_of_samples_is_refused_cheaply() -> None:
    dataset = dicom_dataset(_signal(), RATE)
    dataset.WaveformSequence[0].NumberOfWaveformSamples = 3_000_000_000
    data = dicom_bytes(dataset)
    peak = _peak_while_refused(
        lambda: read_ecg_document(data, "dicom"), "3000000000 samples per lead is over the limit"
    )
    assert peak < MEMORY_BOUND


@pytest.mark.parametrize(
    ("attribute", "value", "match"),
    [
        ("NumberOfWaveformSamples", 201, "fewer than the .* need"),
        ("NumberOfWaveformChannels", 13, "ChannelDefinitionSequence has 12 items"),
        ("NumberOfWaveformChannels", 40, "40 leads is over the limit of 16"),
        ("WaveformBitsAllocated", 12, "unsupported sample encoding 12 bits"),
        ("SamplingFrequency", "0", "sampling rate 0.0 Hz"),
    ],
)
def test_a_dicom_with_inconsistent_waveform_attributes_is_refused(attribute, value, match) -> None:
    dataset = dicom_dataset(_signal(), RATE)
    setattr(dataset.WaveformSequence[0], attribute, value)
    with pytest.raises(EcgDocumentError, match=match):
        read_ecg_document(dicom_bytes(dataset), "dicom")


WRITERS: dict[str, Callable[[], bytes]] = {
    "dicom": lambda: write_dicom(_signal(), RATE),
    "fhir": lambda: write_fhir(_signal(), RATE),
    "hl7-aecg": lambda: write_aecg(_signal(), RATE),
    "ge-muse": lambda: write_muse(_signal(leads=8), RATE, leads=INDEPENDENT_LEADS),
    "philips-sierra": lambda: write_sierra(_signal(), RATE),
    "philips-sierra-xli": lambda: write_sierra(_signal(), RATE, compression="XLI"),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.7, 0.99])
def test_a_truncated_document_is_refused(fmt: str, keep: float) -> None:
    data = WRITERS[fmt]()
    with pytest.raises(EcgDocumentError):
        read_ecg_document(data[: int(len(data) * keep)], _format(fmt))


def _format(writer_name: str) -> str:
    return writer_name.removesuffix("-xli")


def test_an_xli_chunk_that_expands_beyond_its_samples_is_stopped() -> None:
    bomb = lzw_encode(bytes(2_000_000))  # ~8 KB of codes that expand to 2 MB
    chunk = len(bomb).to_bytes(4, "little") + bytes(4) + bomb
    data = (
        b"<restingecgdata><dataacquisition><signalcharacteristics><samplingrate>500</samplingrate>"
        b"<resolution>5</resolution></signalcharacteristics></dataacquisition>"
        b'<parsedwaveforms durationperchannel="10" dataencoding="Base64" compression="XLI" '
        b'leadlabels="I II III aVR aVL aVF V1 V2 V3 V4 V5 V6">'
        + base64.b64encode(chunk * 12)
        + b"</parsedwaveforms></restingecgdata>"
    )
    peak = _peak_while_refused(
        lambda: read_ecg_document(data, "philips-sierra"), "decompresses beyond the samples announced"
    )
    assert peak < MEMORY_BOUND


def test_an_xli_document_missing_a_chunk_is_refused() -> None:
    data = write_sierra(_signal(), RATE, compression="XLI", leads=STANDARD_LEADS)
    fewer = data.replace(b"V5 V6", b"V5 V6 V7").replace(b'numberofleads="12"', b'numberofleads="13"')
    with pytest.raises(EcgDocumentError, match="XLI data ends before lead 13 of 13"):
        read_ecg_document(fewer, "philips-sierra")


def test_a_muse_payload_longer_than_announced_is_refused_before_decoding() -> None:
    data = WRITERS["ge-muse"]().replace(b"<LeadSampleCountTotal>200<", b"<LeadSampleCountTotal>20<", 1)
    with pytest.raises(EcgDocumentError, match="WaveFormData: the base64 payload decodes to about"):
        read_ecg_document(data, "ge-muse")


def test_a_muse_payload_shorter_than_announced_is_a_truncation() -> None:
    data = WRITERS["ge-muse"]().replace(b"<LeadSampleCountTotal>200<", b"<LeadSampleCountTotal>250<", 1)
    with pytest.raises(EcgDocumentError, match="truncated waveform, 200 samples where 250"):
        read_ecg_document(data, "ge-muse")


def test_samples_over_the_limit_are_counted_before_they_are_split() -> None:
    data = write_aecg(_signal(5000), RATE)
    with pytest.raises(EcgDocumentError, match="5000 samples is over the limit of 1000"):
        read_ecg_document(data, "hl7-aecg", limits=DocumentLimits(max_samples_per_lead=1000))


def test_special_fhir_values_are_not_guessed() -> None:
    data = write_fhir(_signal(), RATE).replace(b'"data":"', b'"data":"E ', 1)
    with pytest.raises(EcgDocumentError, match="not all numbers"):
        read_ecg_document(data, "fhir")


def test_a_fhir_component_without_a_unit_is_refused() -> None:
    data = write_fhir(_signal(), RATE).replace(b',"unit":"uV"', b"").replace(b',"code":"uV"', b"")
    with pytest.raises(EcgDocumentError, match="unknown voltage unit None"):
        read_ecg_document(data, "fhir")


_VALID = {fmt: writer() for fmt, writer in WRITERS.items()}


def _read_or_refuse(data: bytes, fmt: str) -> None:
    try:
        document = read_ecg_document(data, fmt)
    except EcgDocumentError:
        return
    assert isinstance(document, EcgDocument)


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    min_size=1,
    max_size=4,
)


def _mutate(data: bytes, steps: list[tuple[str, float, bytes]]) -> bytes:
    for kind, where, chunk in steps:
        at = int(where * max(len(data) - 1, 0))
        if kind == "flip":
            data = data[:at] + bytes([data[at] ^ chunk[0]]) + data[at + 1 :] if data else data
        elif kind == "cut":
            data = data[:at]
        else:
            data = data[:at] + chunk + data[at:]
    return data


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=mutations)
def test_fuzzed_bytes_give_a_document_or_an_ecg_document_error(fmt: str, steps) -> None:
    _read_or_refuse(_mutate(_VALID[fmt], steps), _format(fmt))


@pytest.mark.parametrize("fmt", sorted({_format(name) for name in WRITERS}))
@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=2048))
def test_random_bytes_give_an_ecg_document_error(fmt: str, data: bytes) -> None:
    _read_or_refuse(data, fmt)
