"""HL7 FHIR Observations of an ECG: one component per lead, each a ``valueSampledData``.

A component's lead comes from its code (an MDC code such as 131329 or its name
``MDC_ECG_ELEC_POTL_I``, or any label :func:`standard_lead` maps); its values are
``origin + factor x data`` in the origin's unit, sampled every ``interval`` ``intervalUnit``
(FHIR R5; R4's ``period`` in milliseconds is read too). Validated with fhir.resources (R5).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fhir.resources.observation import Observation

from ecgx.core.ecg_formats.leads import assemble_leads, derivation_note, make_waveform, map_leads
from ecgx.core.ecg_formats.payload import number_list
from ecgx.core.ecg_formats.record import DocumentLimits, EcgDocument, EcgDocumentError
from ecgx.core.ecg_formats.units import mv_per_unit, parse_rate, seconds_per_unit

_WHAT = "FHIR"


def read(data: bytes, limits: DocumentLimits) -> EcgDocument:
    """Read a FHIR Observation (JSON) of an ECG (see the module's docstring)."""
    raw = _load_json(data)
    _r4_period_to_r5(raw)
    try:
        observation = Observation.model_validate(raw)
    except Exception as exc:
        first = str(exc).splitlines()[:3]
        raise EcgDocumentError(f"{_WHAT}: not a valid Observation ({' '.join(first)})") from None
    components = observation.component or []
    if len(components) > limits.max_leads * 2:
        raise EcgDocumentError(f"{_WHAT}: component: {len(components)} components is over the limit")
    sampled = [(index, c) for index, c in enumerate(components) if c.valueSampledData is not None]
    labels = tuple(_component_label(c) for _, c in sampled)
    signals: dict[str, np.ndarray] = {}
    rates: set[float] = set()
    for lead, position in map_leads(labels, f"{_WHAT}: component").items():
        index, component = sampled[position]
        field = f"{_WHAT}: component[{index}] ({labels[position]})"
        signals[lead], rate = _samples(component.valueSampledData, limits, field)
        rates.add(rate)
    if len(rates) > 1:
        raise EcgDocumentError(f"{_WHAT}: component: leads sampled at different rates {sorted(rates)}")
    mv, derived = assemble_leads(signals, labels, f"{_WHAT}: component")
    metadata = {"resource_id": observation.id or "", **derivation_note(derived)}
    return EcgDocument("fhir", make_waveform(mv, rates.pop(), _WHAT), None, labels, metadata)


def _load_json(data: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        raise EcgDocumentError(f"{_WHAT}: not JSON") from None
    if not isinstance(raw, dict) or raw.get("resourceType") != "Observation":
        raise EcgDocumentError(f"{_WHAT}: resourceType is not 'Observation'")
    return raw


def _r4_period_to_r5(raw: dict[str, Any]) -> None:
    """R4's ``period`` (ms) becomes R5's ``interval`` + ``intervalUnit`` so one model reads both."""
    components = raw.get("component")
    for component in components if isinstance(components, list) else []:
        sampled = component.get("valueSampledData") if isinstance(component, dict) else None
        if isinstance(sampled, dict) and "period" in sampled and "interval" not in sampled:
            sampled["interval"] = sampled.pop("period")
            sampled.setdefault("intervalUnit", "ms")


def _component_label(component: Any) -> str:
    codings = component.code.coding or []
    for coding in codings:  # a coding that maps wins; else the first one's words, for the error
        for candidate in (coding.code, coding.display):
            if candidate and map_leads((str(candidate),), _WHAT):
                return str(candidate)
    if codings:
        return str(codings[0].display or codings[0].code or "")
    return str(component.code.text or "")


def _samples(sampled: Any, limits: DocumentLimits, field: str) -> tuple[np.ndarray, float]:
    if sampled.dimensions != 1:
        raise EcgDocumentError(f"{field}: valueSampledData.dimensions is {sampled.dimensions}, not 1")
    if sampled.data is None:
        raise EcgDocumentError(f"{field}: valueSampledData.data is missing")
    origin = sampled.origin
    unit = origin.code or origin.unit
    scale = mv_per_unit(unit, f"{field} valueSampledData.origin unit")
    if sampled.interval is None or float(sampled.interval) <= 0:
        raise EcgDocumentError(f"{field}: valueSampledData.interval is missing or not positive")
    seconds = float(sampled.interval) * seconds_per_unit(sampled.intervalUnit, f"{field} intervalUnit")
    values = number_list(sampled.data, limits, f"{field} valueSampledData.data")
    factor = float(sampled.factor) if sampled.factor is not None else 1.0
    mv = (float(origin.value or 0) + factor * values) * scale
    return mv, parse_rate(1.0 / seconds, f"{field} interval")
