"""HL7 annotated ECG (aECG, the FDA's HL7 v3 XML), read with the safe XML parser.

``AnnotatedECG/component/series`` holds the rhythm: a ``sequenceSet`` whose ``sequence`` elements
are the time axis (code ``TIME_ABSOLUTE`` or ``TIME_RELATIVE``, a ``GLIST_TS``/``GLIST_PQ`` with an
``increment``) and one per lead (code ``MDC_ECG_LEAD_*``, an ``SLIST_PQ`` of ``origin`` + ``scale``
x ``digits``). ``series/derivation/derivedSeries`` holds the median beats the same way.
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
from ecgx.core.ecg_formats.payload import number_list
from ecgx.core.ecg_formats.record import DocumentLimits, EcgDocument, EcgDocumentError, Waveform
from ecgx.core.ecg_formats.units import mv_per_unit, parse_number, parse_rate, seconds_per_unit
from ecgx.core.ecg_formats.xml_safety import attribute, child, parse_xml

_WHAT = "HL7 aECG"
_TIME_CODES = ("TIME_ABSOLUTE", "TIME_RELATIVE")


def read(data: bytes, limits: DocumentLimits) -> EcgDocument:
    """Read an HL7 aECG document (see the module's docstring)."""
    root = parse_xml(data, limits, _WHAT)
    if root.tag != "AnnotatedECG":
        raise EcgDocumentError(f"{_WHAT}: the root element is <{root.tag}>, not <AnnotatedECG>")
    series = child(root, "component/series", _WHAT)
    rhythm_set = series.find("component/sequenceSet")
    median_set = series.find("derivation/derivedSeries/component/sequenceSet")
    if rhythm_set is None and median_set is None:
        raise EcgDocumentError(f"{_WHAT}: series/component/sequenceSet (the rhythm) is missing")
    metadata: dict[str, str] = {}
    rhythm = median = None
    labels: tuple[str, ...] = ()
    if rhythm_set is not None:
        rhythm, labels, notes = _read_set(rhythm_set, limits, f"{_WHAT}: series sequenceSet")
        metadata.update({f"rhythm.{k}": v for k, v in notes.items()})
    if median_set is not None:
        median, median_labels, notes = _read_set(median_set, limits, f"{_WHAT}: derivedSeries sequenceSet")
        metadata.update({f"median_beat.{k}": v for k, v in notes.items()})
        labels = labels or median_labels
    metadata.update(_filters(series))
    return EcgDocument("hl7-aecg", rhythm, median, labels, metadata)


def _read_set(
    sequence_set: ET.Element, limits: DocumentLimits, field: str
) -> tuple[Waveform, tuple[str, ...], dict[str, str]]:
    sequences = sequence_set.findall("component/sequence")
    check_counts(max(len(sequences) - 1, 1), 1, limits, field)
    rate: float | None = None
    leads: list[tuple[str, ET.Element]] = []
    for sequence in sequences:
        code = attribute(child(sequence, "code", field), "code", f"{field} sequence code")
        if code in _TIME_CODES:
            rate = _rate(child(sequence, "value", field), f"{field} {code}")
        else:
            leads.append((code, child(sequence, "value", f"{field} {code}")))
    if rate is None:
        raise EcgDocumentError(f"{field}: the time sequence (TIME_ABSOLUTE or TIME_RELATIVE) is missing")
    labels = tuple(code for code, _ in leads)
    signals = {
        lead: _lead_mv(leads[index][1], limits, f"{field} {labels[index]}")
        for lead, index in map_leads(labels, field).items()
    }
    mv, derived = assemble_leads(signals, labels, field)
    return make_waveform(mv, rate, field), labels, derivation_note(derived)


def _rate(value: ET.Element, field: str) -> float:
    increment = child(value, "increment", field)
    step = parse_number(attribute(increment, "value", field), f"{field} increment")
    seconds = step * seconds_per_unit(increment.get("unit"), f"{field} increment unit")
    if seconds <= 0:
        raise EcgDocumentError(f"{field}: increment {step} is not positive")
    return parse_rate(1.0 / seconds, f"{field} increment")


def _lead_mv(value: ET.Element, limits: DocumentLimits, field: str) -> np.ndarray:
    origin = child(value, "origin", field)
    scale = child(value, "scale", field)
    origin_mv = parse_number(attribute(origin, "value", field), f"{field} origin") * mv_per_unit(
        origin.get("unit"), f"{field} origin unit"
    )
    scale_mv = parse_number(attribute(scale, "value", field), f"{field} scale") * mv_per_unit(
        scale.get("unit"), f"{field} scale unit"
    )
    digits = child(value, "digits", field).text or ""
    return origin_mv + scale_mv * number_list(digits, limits, f"{field} digits")


def _filters(series: ET.Element) -> dict[str, str]:
    """Filter settings from the series' controlVariables (code -> value with unit)."""
    notes = {}
    for variable in series.iter("controlVariable"):
        for setting in variable.iter("component"):
            code = setting.find("controlVariable/code")
            value = setting.find("controlVariable/value")
            if code is not None and value is not None and code.get("code"):
                notes[code.get("code", "")] = f"{value.get('value', '')} {value.get('unit', '')}".strip()
    return notes
