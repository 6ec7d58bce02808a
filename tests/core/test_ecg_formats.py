"""ECG documents read back equal to the WFDB reading, lead by lead (issue #23).

Where each test document comes from:
- ``waveform_ecg.dcm``: a real 12-lead recording (Mortara ELI 250) shipped in pydicom's test data.
- The round trips: the shared PTB-XL record HR06000 (read with ``wfdb``), written as DICOM by
  pydicom's Dataset API, as FHIR by fhir.resources models, and as HL7 aECG, GE MUSE and Philips
  Sierra XML by ElementTree following the vendor schemas (tests/ecg_format_helpers.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ecg_format_helpers import (
    INDEPENDENT_LEADS,
    STANDARD_LEADS,
    real_record,
    write_aecg,
    write_dicom,
    write_fhir,
    write_muse,
    write_sierra,
)

from ecgx.core.ecg_formats import (
    FORMATS,
    EcgDocumentError,
    format_of_file,
    read_ecg_document,
    sniff_format,
)

INDEPENDENT = [STANDARD_LEADS.index(lead) for lead in INDEPENDENT_LEADS]
SOURCE_QUANTUM_MV = 0.001  # PTB-XL stores 1 uV counts

# format -> (writer, resolution in uV per count the writer uses, whether it stores only 8 leads)
WRITERS = {
    "dicom": (write_dicom, 1.0, False),
    "fhir": (write_fhir, 1.0, False),
    "hl7-aecg": (write_aecg, 5.0, False),
    "ge-muse": (write_muse, 4.88, True),
    "philips-sierra": (write_sierra, 5.0, False),
}


@pytest.fixture(scope="module")
def record(shared_data: Path) -> tuple[np.ndarray, float]:
    return real_record(shared_data, "HR06000")


def _tolerance(uv_per_count: float, derived: bool) -> float:
    half_count = uv_per_count / 2000.0
    # a derived lead adds the rounding of two stored leads and the source's own rounding
    return (2 * half_count + SOURCE_QUANTUM_MV if derived else half_count) + 1e-6


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_round_trip_of_a_real_record_lead_by_lead(fmt: str, record: tuple[np.ndarray, float]) -> None:
    mv, rate = record
    writer, uv_per_count, eight_leads = WRITERS[fmt]
    stored = mv[INDEPENDENT] if eight_leads else mv
    document = read_ecg_document(writer(stored, rate), fmt)
    assert document.format == fmt
    assert document.leads == STANDARD_LEADS
    assert document.rhythm is not None
    assert document.rhythm.sampling_rate_hz == rate
    assert document.rhythm.mv.dtype == np.float32
    assert document.rhythm.mv.shape == mv.shape
    for index, lead in enumerate(STANDARD_LEADS):
        derived = eight_leads and lead not in INDEPENDENT_LEADS
        error = np.abs(document.rhythm.mv[index] - mv[index]).max()
        assert error <= _tolerance(uv_per_count, derived), f"{fmt} lead {lead}: off by {error} mV"
    read = document.rhythm.mv.astype(np.float64)
    einthoven = np.abs(read[1] - (read[0] + read[2])).max()
    assert einthoven <= 3 * uv_per_count / 2000 + 2 * SOURCE_QUANTUM_MV  # II = I + III
    assert len(document.source_leads) == len(stored)


@pytest.mark.parametrize("fmt", ["dicom", "hl7-aecg", "ge-muse", "philips-sierra"])
def test_median_beat_is_read_beside_the_rhythm(fmt: str, record: tuple[np.ndarray, float]) -> None:
    mv, rate = record
    writer, uv_per_count, eight_leads = WRITERS[fmt]
    median = mv[:, 1000:1400]
    stored, stored_median = (mv[INDEPENDENT], median[INDEPENDENT]) if eight_leads else (mv, median)
    document = read_ecg_document(writer(stored, rate, median_mv=stored_median), fmt)
    assert document.median_beat is not None
    assert document.median_beat.mv.shape == (12, 400)
    independent = document.median_beat.mv[INDEPENDENT]
    assert np.abs(independent - median[INDEPENDENT]).max() <= _tolerance(uv_per_count, False)


def test_pydicoms_real_ecg_matches_pydicoms_own_decoding() -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("waveform_ecg.dcm")
    if path is None:
        pytest.skip("pydicom's waveform_ecg.dcm is not installed")
    document = read_ecg_document(Path(path).read_bytes(), format_of_file(path))
    dataset = pydicom.dcmread(path)
    reference_uv = dataset.waveform_array(0).T  # pydicom applies sensitivity, baseline, correction
    assert document.rhythm is not None and document.median_beat is not None
    assert document.rhythm.sampling_rate_hz == 1000.0
    assert document.source_leads[0] == "Lead I (Einthoven)"
    np.testing.assert_allclose(document.rhythm.mv, reference_uv / 1000.0, atol=1e-6)
    read = document.rhythm.mv.astype(np.float64)
    assert np.abs(read[1] - read[0] - read[2]).max() <= 3 * 1.25e-3  # within a few 1.25 uV counts
    assert document.metadata["rhythm.filter_high_hz"] == "300"
    assert document.median_beat.mv.shape == (12, 1200)


def test_eight_independent_leads_are_completed_and_the_metadata_says_so(record) -> None:
    mv, rate = record
    data = write_dicom(mv[INDEPENDENT], rate, leads=INDEPENDENT_LEADS)
    document = read_ecg_document(data, "dicom")
    assert document.metadata["rhythm.derived_leads"] == "III aVR aVL aVF"
    assert "Einthoven" in document.metadata["rhythm.derivation"]
    assert document.source_leads == tuple(
        {"I": "Lead I (Einthoven)", "II": "Lead II"}.get(lead, f"Lead {lead}") for lead in INDEPENDENT_LEADS
    )


def test_a_missing_independent_lead_is_named(record) -> None:
    mv, rate = record
    keep = [lead for lead in STANDARD_LEADS if lead != "V3"]
    rows = [STANDARD_LEADS.index(lead) for lead in keep]
    for fmt in ("dicom", "fhir", "hl7-aecg", "philips-sierra"):
        writer = WRITERS[fmt][0]
        with pytest.raises(EcgDocumentError, match=r"V3 missing"):
            read_ecg_document(writer(mv[rows], rate, leads=keep), fmt)


def test_fifteen_leads_with_extra_channels_are_fine_and_duplicates_are_not(record) -> None:
    mv, rate = record
    leads = (*STANDARD_LEADS, "vx", "vy", "vz")
    extra = np.vstack([mv, mv[:3]])
    document = read_ecg_document(write_aecg(extra, rate, leads=leads), "hl7-aecg")
    assert len(document.source_leads) == 15
    assert document.rhythm is not None and document.rhythm.mv.shape[0] == 12
    twice = (*STANDARD_LEADS, "I")
    with pytest.raises(EcgDocumentError, match="lead I appears twice"):
        read_ecg_document(write_aecg(np.vstack([mv, mv[:1]]), rate, leads=twice), "hl7-aecg")


@pytest.mark.parametrize(
    ("fmt", "unit"),
    [("dicom", "mmHg"), ("fhir", "kPa"), ("hl7-aecg", "mm"), ("ge-muse", "NANOFARADS")],
)
def test_an_unknown_unit_is_refused_by_name(fmt: str, unit: str, record) -> None:
    mv, rate = record
    writer, _, eight_leads = WRITERS[fmt]
    stored = mv[INDEPENDENT] if eight_leads else mv
    with pytest.raises(EcgDocumentError, match=rf"unknown voltage unit '{unit}'"):
        read_ecg_document(writer(stored[:, :500], rate, unit=unit), fmt)


@pytest.mark.parametrize(("unit", "factor"), [("mV", 1e3), ("V", 1e6), ("microvolts", 1.0)])
def test_known_units_scale_the_same_counts(unit: str, factor: float, record) -> None:
    mv, rate = record
    reference = read_ecg_document(write_fhir(mv, rate, unit="uV"), "fhir").rhythm
    other = read_ecg_document(write_fhir(mv, rate, unit=unit), "fhir").rhythm
    assert reference is not None and other is not None
    np.testing.assert_allclose(other.mv, reference.mv * factor, rtol=1e-5)


def test_format_of_file_by_extension_then_content(tmp_path: Path, record) -> None:
    mv, rate = record
    short = mv[:, :100]
    assert format_of_file("ecg.DCM") == "dicom"
    assert format_of_file("obs.json") == "fhir"
    for fmt in ("hl7-aecg", "ge-muse", "philips-sierra"):
        writer, _, eight = WRITERS[fmt]
        data = writer(short[INDEPENDENT] if eight else short, rate)
        path = tmp_path / f"{fmt}.xml"
        path.write_bytes(data)
        assert format_of_file(path) == fmt
        assert format_of_file("anything.xml", data) == fmt
    no_extension = tmp_path / "ecg"
    no_extension.write_bytes(write_dicom(short, rate))
    assert format_of_file(no_extension) == "dicom"
    assert sniff_format(write_fhir(short, rate)) == "fhir"
    with pytest.raises(EcgDocumentError, match=r"cannot tell the ECG format of notes\.txt"):
        format_of_file("notes.txt", b"hello")


def test_an_unknown_format_name_lists_the_known_ones() -> None:
    with pytest.raises(EcgDocumentError, match="known: " + ", ".join(FORMATS)):
        read_ecg_document(b"", "scp-ecg")
    assert FORMATS == ("dicom", "hl7-aecg", "ge-muse", "philips-sierra", "fhir")


def test_xli_compressed_sierra_reads_back(record) -> None:
    mv, rate = record
    plain = read_ecg_document(write_sierra(mv, rate), "philips-sierra")
    xli = read_ecg_document(write_sierra(mv, rate, compression="XLI"), "philips-sierra")
    assert plain.rhythm is not None and xli.rhythm is not None
    np.testing.assert_array_equal(xli.rhythm.mv, plain.rhythm.mv)


def test_an_unknown_sierra_compression_is_refused_by_name(record) -> None:
    mv, rate = record
    data = write_sierra(mv[:, :100], rate, compression="LZ4")
    with pytest.raises(EcgDocumentError, match="compression 'LZ4' is not supported"):
        read_ecg_document(data, "philips-sierra")
