"""Write ECG documents for tests with tools other than ecgx's readers (shared by several suites).

Each writer takes (12, n) millivolts in the standard lead order and a sampling rate and returns the
document's bytes, written by an independent producer: DICOM with pydicom's Dataset API, FHIR with
fhir.resources models, the XML formats with ElementTree following the vendor schemas (HL7 aECG
v3 schema, GE MUSE XML, Philips Sierra XML 1.04). ``real_record`` reads one of the shared
PhysioNet records with ``wfdb`` (the reference every round trip is compared with).

The writers quantise like the devices do: integer counts times a resolution in microvolts
(``uv_per_count``), so a round trip matches within half a count.
"""

from __future__ import annotations

import base64
import io
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
INDEPENDENT_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")


def real_record(shared_data: Path, name: str = "HR06000") -> tuple[np.ndarray, float]:
    """A shared PTB-XL record as (12, n) float mV in standard order and its sampling rate."""
    import wfdb

    record = wfdb.rdrecord(str(shared_data / "ptbxl-sample" / name))
    order = [record.sig_name.index(lead) for lead in STANDARD_LEADS]
    return record.p_signal[:, order].T.astype(np.float64), float(record.fs)


def counts_of(mv: np.ndarray, uv_per_count: float) -> np.ndarray:
    """The integer counts a device with ``uv_per_count`` resolution stores for ``mv``."""
    return np.round(np.asarray(mv, dtype=np.float64) * 1000.0 / uv_per_count).astype(np.int64)


# ---------------------------------------------------------------- DICOM (pydicom Dataset API)

_DICOM_MEANINGS = {
    "I": "Lead I (Einthoven)",
    "II": "Lead II",
    "III": "Lead III",
    "aVR": "Lead aVR",
    "aVL": "Lead aVL",
    "aVF": "Lead aVF",
}


def dicom_dataset(
    mv: np.ndarray,
    rate_hz: float,
    *,
    leads: Sequence[str] = STANDARD_LEADS,
    uv_per_count: float = 1.0,
    unit: str = "uV",
    median_mv: np.ndarray | None = None,
):
    """A 12-lead ECG DICOM dataset (pydicom), rhythm group and optionally a median-beat group.

    ``mv`` rows follow ``leads``. ``unit`` is the sensitivity unit written (the counts are always
    microvolt counts, so a wrong ``unit`` makes a wrong document on purpose).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.9.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "ECG"
    ds.Manufacturer = "ecgx tests (pydicom writer)"
    groups = [_dicom_group("RHYTHM", mv, rate_hz, leads, uv_per_count, unit)]
    if median_mv is not None:
        groups.append(_dicom_group("MEDIAN BEAT", median_mv, rate_hz, leads, uv_per_count, unit))
    ds.WaveformSequence = groups
    return ds


def _dicom_group(label, mv, rate_hz, leads, uv_per_count, unit):
    from pydicom.dataset import Dataset

    counts = counts_of(mv, uv_per_count).astype("<i2")
    group = Dataset()
    group.MultiplexGroupLabel = label
    group.WaveformOriginality = "ORIGINAL"
    group.NumberOfWaveformChannels = len(leads)
    group.NumberOfWaveformSamples = counts.shape[1]
    group.SamplingFrequency = f"{rate_hz:g}"
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    channels = []
    for lead in leads:
        source = Dataset()
        source.CodeValue = f"2:{lead}"
        source.CodingSchemeDesignator = "MDC"
        source.CodeMeaning = _DICOM_MEANINGS.get(lead, f"Lead {lead}")
        units = Dataset()
        units.CodeValue = unit
        units.CodingSchemeDesignator = "UCUM"
        units.CodeMeaning = unit
        channel = Dataset()
        channel.ChannelSourceSequence = [source]
        channel.ChannelSensitivity = f"{uv_per_count:g}"
        channel.ChannelSensitivityUnitsSequence = [units]
        channel.ChannelSensitivityCorrectionFactor = "1"
        channel.ChannelBaseline = "0"
        channel.WaveformBitsStored = 16
        channel.FilterLowFrequency = "0.05"
        channel.FilterHighFrequency = "150"
        channel.NotchFilterFrequency = "50"
        channels.append(channel)
    group.ChannelDefinitionSequence = channels
    group.WaveformData = counts.T.tobytes()  # interleaved: sample by sample, channel by channel
    return group


def dicom_bytes(dataset) -> bytes:
    """The Part-10 file (preamble, file meta) of a dataset from :func:`dicom_dataset`."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom(mv: np.ndarray, rate_hz: float, **options) -> bytes:
    """:func:`dicom_dataset` written as bytes."""
    return dicom_bytes(dicom_dataset(mv, rate_hz, **options))


# ---------------------------------------------------------------- FHIR (fhir.resources models)

_MDC_CODES = {"I": 131329, "II": 131330, "III": 131389, "aVR": 131390, "aVL": 131391, "aVF": 131392}
_MDC_CODES.update({f"V{n}": 131330 + n for n in range(1, 7)})


def write_fhir(
    mv: np.ndarray,
    rate_hz: float,
    *,
    leads: Sequence[str] = STANDARD_LEADS,
    uv_per_count: float = 1.0,
    unit: str = "uV",
) -> bytes:
    """A FHIR R5 Observation (JSON) with one ``valueSampledData`` component per lead."""
    from fhir.resources.observation import Observation

    counts = counts_of(mv, uv_per_count)
    components = [
        {
            "code": {
                "coding": [
                    {
                        "system": "urn:oid:2.16.840.1.113883.6.24",
                        "code": str(_MDC_CODES[lead]),
                        "display": f"MDC_ECG_ELEC_POTL_{lead.upper() if lead[0] != 'a' else lead}",
                    }
                ]
            },
            "valueSampledData": {
                "origin": {"value": 0, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
                "interval": 1000.0 / rate_hz,
                "intervalUnit": "ms",
                "factor": uv_per_count,
                "dimensions": 1,
                "data": " ".join(str(int(v)) for v in row),
            },
        }
        for lead, row in zip(leads, counts, strict=True)
    ]
    observation = Observation.model_validate(
        {
            "resourceType": "Observation",
            "id": "ecg-test",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "11524-6", "display": "EKG study"}]},
            "component": components,
        }
    )
    return observation.model_dump_json().encode()


# ---------------------------------------------------------------- XML formats (ElementTree)


def _xml(root: ET.Element) -> bytes:
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


_HL7 = "urn:hl7-org:v3"
_XSI = "http://www.w3.org/2001/XMLSchema-instance"


def write_aecg(
    mv: np.ndarray,
    rate_hz: float,
    *,
    leads: Sequence[str] = STANDARD_LEADS,
    uv_per_count: float = 5.0,
    unit: str = "uV",
    median_mv: np.ndarray | None = None,
) -> bytes:
    """An HL7 aECG document (HL7 v3 schema): rhythm series, optional median in a derivedSeries."""
    ET.register_namespace("", _HL7)
    ET.register_namespace("xsi", _XSI)
    root = ET.Element(f"{{{_HL7}}}AnnotatedECG")
    _sub(root, f"{{{_HL7}}}id", root="2.16.840.1.113883.3.1")
    _sub(root, f"{{{_HL7}}}code", code="93000", codeSystem="2.16.840.1.113883.6.12")
    series = _sub(_sub(root, f"{{{_HL7}}}component"), f"{{{_HL7}}}series")
    _sub(series, f"{{{_HL7}}}code", code="RHYTHM", codeSystem="2.16.840.1.113883.5.4")
    _aecg_set(_sub(series, f"{{{_HL7}}}component"), mv, rate_hz, leads, uv_per_count, unit)
    if median_mv is not None:
        derived = _sub(_sub(series, f"{{{_HL7}}}derivation"), f"{{{_HL7}}}derivedSeries")
        _sub(derived, f"{{{_HL7}}}code", code="REPRESENTATIVE_BEAT", codeSystem="2.16.840.1.113883.5.4")
        _aecg_set(_sub(derived, f"{{{_HL7}}}component"), median_mv, rate_hz, leads, uv_per_count, unit)
    return _xml(root)


def _aecg_set(parent, mv, rate_hz, leads, uv_per_count, unit) -> None:
    ns = f"{{{_HL7}}}"
    sequence_set = _sub(parent, ns + "sequenceSet")
    time = _sub(_sub(sequence_set, ns + "component"), ns + "sequence")
    _sub(time, ns + "code", code="TIME_ABSOLUTE", codeSystem="2.16.840.1.113883.5.4")
    value = _sub(time, ns + "value", **{f"{{{_XSI}}}type": "GLIST_TS"})
    _sub(value, ns + "head", value="20260101120000.000")
    _sub(value, ns + "increment", value=f"{1.0 / rate_hz:.6g}", unit="s")
    for lead, row in zip(leads, counts_of(mv, uv_per_count), strict=True):
        sequence = _sub(_sub(sequence_set, ns + "component"), ns + "sequence")
        _sub(sequence, ns + "code", code=f"MDC_ECG_LEAD_{lead}", codeSystem="2.16.840.1.113883.6.24")
        value = _sub(sequence, ns + "value", **{f"{{{_XSI}}}type": "SLIST_PQ"})
        _sub(value, ns + "origin", value="0", unit=unit)
        _sub(value, ns + "scale", value=f"{uv_per_count:g}", unit=unit)
        _sub(value, ns + "digits", " ".join(str(int(v)) for v in row))


def write_muse(
    mv: np.ndarray,
    rate_hz: float,
    *,
    leads: Sequence[str] = INDEPENDENT_LEADS,
    uv_per_count: float = 4.88,
    unit: str = "MICROVOLTS",
    median_mv: np.ndarray | None = None,
) -> bytes:
    """A GE MUSE XML export: ``mv`` rows follow ``leads`` (MUSE stores the 8 independent ones)."""
    root = ET.Element("RestingECG")
    _sub(root, "MuseInfo").append(_element("MuseVersion", "9.0.9.18167"))
    demographics = _sub(root, "TestDemographics")
    _sub(demographics, "AcquisitionDevice", "MAC55")
    for kind, data in (("Median", median_mv), ("Rhythm", mv)):
        if data is None:
            continue
        waveform = _sub(root, "Waveform")
        _sub(waveform, "WaveformType", kind)
        _sub(waveform, "WaveformStartTime", "0")
        _sub(waveform, "NumberofLeads", str(len(leads)))
        _sub(waveform, "SampleType", "CONTINUOUS_SAMPLES")
        _sub(waveform, "SampleBase", f"{rate_hz:g}")
        _sub(waveform, "SampleExponent", "0")
        _sub(waveform, "HighPassFilter", "16")
        _sub(waveform, "LowPassFilter", "150")
        _sub(waveform, "ACFilter", "60")
        for lead, row in zip(leads, counts_of(data, uv_per_count), strict=True):
            raw = row.astype("<i2").tobytes()
            lead_data = _sub(waveform, "LeadData")
            _sub(lead_data, "LeadByteCountTotal", str(len(raw)))
            _sub(lead_data, "LeadTimeOffset", "0")
            _sub(lead_data, "LeadSampleCountTotal", str(len(row)))
            _sub(lead_data, "LeadAmplitudeUnitsPerBit", f"{uv_per_count:g}")
            _sub(lead_data, "LeadAmplitudeUnits", unit)
            _sub(lead_data, "LeadHighLimit", "32767")
            _sub(lead_data, "LeadLowLimit", "-32768")
            _sub(lead_data, "LeadID", lead)
            _sub(lead_data, "LeadOffsetFirstSample", "0")
            _sub(lead_data, "FirstSampleBaseline", "0")
            _sub(lead_data, "LeadSampleSize", "2")
            _sub(lead_data, "LeadOff", "FALSE")
            _sub(lead_data, "BaselineSway", "FALSE")
            _sub(lead_data, "WaveFormData", base64.encodebytes(raw).decode())  # MUSE wraps lines
    return _xml(root)


def _element(tag: str, text: str) -> ET.Element:
    element = ET.Element(tag)
    element.text = text
    return element


def write_sierra(
    mv: np.ndarray,
    rate_hz: float,
    *,
    leads: Sequence[str] = STANDARD_LEADS,
    uv_per_count: float = 5.0,
    median_mv: np.ndarray | None = None,
    compression: str = "Uncompressed",
) -> bytes:
    """A Philips Sierra ECG XML 1.04 document; parsedwaveforms uncompressed or XLI (``compression``)."""
    root = ET.Element("restingecgdata")
    info = _sub(root, "documentinfo")
    _sub(info, "documentname", "ecg.xml")
    _sub(info, "documenttype", "PhilipsECG")
    _sub(info, "documentversion", "1.04")
    acquisition = _sub(root, "dataacquisition")
    signal = _sub(acquisition, "signalcharacteristics")
    _sub(signal, "samplingrate", f"{rate_hz:g}")
    _sub(signal, "resolution", f"{uv_per_count:g}")
    _sub(signal, "acquisitiontype", "STD-12")
    _sub(signal, "bitspersample", "16")
    _sub(signal, "signaloffset", "0")
    _sub(signal, "numberchannelsvalid", str(len(leads)))
    _sub(signal, "numberchannelsallocated", str(len(leads)))
    bandwidth = _sub(_sub(root, "reportinfo"), "reportbandwidth")
    _sub(bandwidth, "highpassfiltersetting", "0.05")
    _sub(bandwidth, "lowpassfiltersetting", "150")
    _sub(bandwidth, "notchfiltersetting", "50")
    counts = counts_of(mv, uv_per_count).astype("<i2")
    payload = xli_encode(counts, leads) if compression == "XLI" else counts.tobytes()  # lead after lead
    waveforms = _sub(
        root,
        "parsedwaveforms",
        base64.b64encode(payload).decode(),
        durationperchannel=f"{counts.shape[1] * 1000.0 / rate_hz:g}",
        samplespersecond=f"{rate_hz:g}",
        dataencoding="Base64",
        compression=compression,
        numberofleads=str(len(leads)),
        leadlabels=" ".join(leads),
    )
    del waveforms
    if median_mv is not None:
        beats = _sub(
            root,
            "repbeats",
            dataencoding="Base64",
            samplespersec=f"{rate_hz:g}",
            resolution=f"{uv_per_count:g}",
            repbeatmethod="median",
        )
        for lead, row in zip(leads, counts_of(median_mv, uv_per_count).astype("<i2"), strict=True):
            beat = _sub(beats, "repbeat", leadname=lead)
            _sub(
                beat,
                "waveform",
                base64.b64encode(row.tobytes()).decode(),
                duration=f"{len(row) * 1000.0 / rate_hz:g}",
            )
    return _xml(root)


# ---------------------------------------------------------------- Philips XLI compression


def xli_encode(counts: np.ndarray, leads: Sequence[str]) -> bytes:
    """XLI-compress (leads, n) int16 counts as a Philips cart does (limb leads as residuals).

    The inverse of the decoder in sierra-ecg-tools (github.com/sixlettervariables/sierra-ecg-tools,
    the ``sierraecg`` package): second differences offset by 64, high bytes then low bytes,
    10-bit LZW, each lead behind an 8-byte header.
    """
    stored = {lead: counts[i].astype(np.int64) for i, lead in enumerate(leads)}
    lead_i, lead_ii, lead_iii = stored["I"], stored["II"], stored["III"]
    residual = dict(stored)
    residual["III"] = lead_ii - lead_i - lead_iii
    residual["aVR"] = -stored["aVR"] - np.floor_divide(lead_i + lead_ii, 2)
    residual["aVL"] = np.floor_divide(lead_i - lead_iii, 2) - stored["aVL"]
    residual["aVF"] = np.floor_divide(lead_ii + lead_iii, 2) - stored["aVF"]
    out = bytearray()
    for lead in leads:
        first, deltas = _xli_deltas(residual[lead].tolist())
        packed = np.asarray(deltas, dtype=np.int64).astype(np.int16).astype(">u2").view(np.uint8)
        chunk = lzw_encode(bytes(packed[0::2]) + bytes(packed[1::2]))  # high bytes, then low bytes
        out += len(chunk).to_bytes(4, "little") + b"\0\0" + int(first).to_bytes(2, "little", signed=True)
        out += chunk
    return bytes(out)


def _xli_deltas(x: list[int]) -> tuple[int, list[int]]:
    # decoder: x[i] = 2 x[i-1] - x[i-2] - r[i], r[2] = header value, r[i] = d[i-1] - 64 (i >= 3)
    residuals = [2 * x[i - 1] - x[i - 2] - x[i] for i in range(2, len(x))]
    deltas = [x[0], x[1]] + [r + 64 for r in residuals[1:]] + [64]
    return residuals[0], deltas[: len(x)]


def lzw_encode(data: bytes, bits: int = 10) -> bytes:
    table = {bytes([b]): b for b in range(256)}
    max_code, next_code = (1 << bits) - 2, 256
    codes, word = [], b""
    for byte in data:
        candidate = word + bytes([byte])
        if candidate in table:
            word = candidate
            continue
        codes.append(table[word])
        if next_code <= max_code:
            table[candidate] = next_code
            next_code += 1
        word = bytes([byte])
    if word:
        codes.append(table[word])
    value = 0
    for code in codes:
        value = (value << bits) | code
    total = len(codes) * bits
    padding = (-total) % 8
    return (value << padding).to_bytes((total + padding) // 8, "big")
