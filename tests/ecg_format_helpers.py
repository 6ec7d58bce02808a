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

import io
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
