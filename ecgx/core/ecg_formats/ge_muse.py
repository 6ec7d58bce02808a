"""GE MUSE XML exports (``RestingECG``), read with the safe XML parser.

Each ``Waveform`` has a ``WaveformType`` (``Rhythm`` or ``Median``), a ``SampleBase`` (Hz, times
10 ^ ``SampleExponent``) and filter settings, and one ``LeadData`` per stored lead: base64
little-endian int16 ``WaveFormData``, ``LeadSampleCountTotal``, ``LeadAmplitudeUnitsPerBit`` and
``LeadAmplitudeUnits``. MUSE usually stores the 8 independent leads; the limb leads it leaves out
are derived (and the metadata says so).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np

from ecgx.core.ecg_formats.leads import (
    assemble_leads,
    check_counts,
    derivation_note,
    make_waveform,
    map_leads,
)
from ecgx.core.ecg_formats.payload import decode_base64, int16_samples
from ecgx.core.ecg_formats.record import DocumentLimits, EcgDocument, EcgDocumentError, Waveform
from ecgx.core.ecg_formats.units import mv_per_unit, parse_number, parse_rate
from ecgx.core.ecg_formats.xml_safety import parse_xml, text_of

_WHAT = "GE MUSE"
_KINDS = {"RHYTHM": "rhythm", "MEDIAN": "median_beat"}
_FILTERS = ("HighPassFilter", "LowPassFilter", "ACFilter")


def read(data: bytes, limits: DocumentLimits) -> EcgDocument:
    """Read a GE MUSE XML export (see the module's docstring)."""
    root = parse_xml(data, limits, _WHAT)
    if root.tag != "RestingECG":
        raise EcgDocumentError(f"{_WHAT}: the root element is <{root.tag}>, not <RestingECG>")
    found: dict[str, tuple[Waveform, tuple[str, ...]]] = {}
    metadata: dict[str, str] = {}
    for index, waveform in enumerate(root.findall("Waveform")):
        kind = _KINDS.get((waveform.findtext("WaveformType") or "").strip().upper())
        if kind is None or kind in found:
            continue
        field = f"{_WHAT}: Waveform[{index}] ({kind})"
        wave, labels, notes = _read_waveform(waveform, limits, field)
        found[kind] = (wave, labels)
        metadata.update({f"{kind}.{key}": value for key, value in notes.items()})
    if not found:
        raise EcgDocumentError(f"{_WHAT}: no <Waveform> of WaveformType Rhythm or Median")
    rhythm = found.get("rhythm")
    median = found.get("median_beat")
    labels = (rhythm or median)[1]  # type: ignore[index]
    device = root.findtext("TestDemographics/AcquisitionDevice")
    if device:
        metadata["acquisition_device"] = device.strip()
    return EcgDocument(
        "ge-muse", rhythm[0] if rhythm else None, median[0] if median else None, labels, metadata
    )


def _read_waveform(
    waveform: ET.Element, limits: DocumentLimits, field: str
) -> tuple[Waveform, tuple[str, ...], dict[str, str]]:
    base = parse_number(text_of(waveform, "SampleBase", field), f"{field} SampleBase")
    exponent = parse_number(waveform.findtext("SampleExponent") or "0", f"{field} SampleExponent")
    rate = parse_rate(base * 10.0**exponent if abs(exponent) < 6 else -1, f"{field} SampleBase")
    lead_data = waveform.findall("LeadData")
    check_counts(len(lead_data), 1, limits, field)
    labels = tuple(text_of(lead, "LeadID", f"{field} LeadData") for lead in lead_data)
    signals = {
        lead: _lead_mv(lead_data[index], limits, f"{field} lead {labels[index]}")
        for lead, index in map_leads(labels, field).items()
    }
    mv, derived = assemble_leads(signals, labels, field)
    notes = {name: text for name in _FILTERS if (text := (waveform.findtext(name) or "").strip())}
    return make_waveform(mv, rate, field), labels, {**notes, **derivation_note(derived)}


def _lead_mv(lead: ET.Element, limits: DocumentLimits, field: str) -> np.ndarray:
    count = int(parse_number(text_of(lead, "LeadSampleCountTotal", field), f"{field} LeadSampleCountTotal"))
    check_counts(1, count, limits, f"{field} LeadSampleCountTotal")
    per_bit = parse_number(
        text_of(lead, "LeadAmplitudeUnitsPerBit", field), f"{field} LeadAmplitudeUnitsPerBit"
    )
    scale = mv_per_unit(lead.findtext("LeadAmplitudeUnits"), f"{field} LeadAmplitudeUnits")
    raw = decode_base64(text_of(lead, "WaveFormData", field), 2 * count, f"{field} WaveFormData")
    return int16_samples(raw, count, f"{field} WaveFormData") * per_bit * scale
