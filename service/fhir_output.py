"""An attribution as a FHIR R4 Observation, for an EHR to store next to the ECG it explains.

One Observation per attribution (one ECG, one method, one target class):

- a component per lead holding the input the model saw (its median beat or window, in mV) as
  ``SampledData``, coded with the lead's MDC code (ISO/IEEE 11073-10101, as FHIR's ECG example);
- a component per lead holding the attribution map over the same samples, coded
  ``ecg-attribution`` (:data:`CODE_SYSTEM`) plus the lead's MDC code;
- extensions naming the attribution method, the target class, the gate's verdict on the method,
  the signed gate report's SHA-256, and the model, version and package hash that computed it.

Built and validated with ``fhir.resources`` (its R4B models: R4's Observation and SampledData,
unchanged in 4.3), so a malformed resource fails here, not in the EHR. No PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ecgx.service.ecg_input import ModelInput
from ecgx.service.requests import AttributionResult, ExplainResult, VersionFacts

# Our own code system and extension base (no registered FHIR profile exists for attributions).
CODE_SYSTEM = "urn:ecgx:fhir:code"
EXTENSION_BASE = "urn:ecgx:fhir:extension:"
EXT_METHOD = EXTENSION_BASE + "attribution-method"
EXT_TARGET = EXTENSION_BASE + "target-class"
EXT_GATE_VERDICT = EXTENSION_BASE + "gate-verdict"
EXT_GATE_REPORT = EXTENSION_BASE + "gate-report-sha256"
EXT_MODEL = EXTENSION_BASE + "model"
EXT_VERSION = EXTENSION_BASE + "model-version"
EXT_PACKAGE = EXTENSION_BASE + "package-sha256"
# The most bytes one sample takes in SampledData.data ("%.9g" and a space: sign, 9 digits, point,
# exponent); the core sizes responses with it before any work.
BYTES_PER_VALUE = 17
EXT_WAVEFORM = EXTENSION_BASE + "input-waveform"
MDC = "urn:oid:2.16.840.1.113883.6.24"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
# MDC codes of the 12 standard leads (MDC_ECG_LEAD_*), as HL7's FHIR ECG example codes them.
MDC_LEADS = {
    "I": "131329",
    "II": "131330",
    "III": "131389",
    "aVR": "131390",
    "aVL": "131391",
    "aVF": "131392",
    "V1": "131331",
    "V2": "131332",
    "V3": "131333",
    "V4": "131334",
    "V5": "131335",
    "V6": "131336",
}
ECG_CODE = {"system": LOINC, "code": "11524-6", "display": "EKG study"}
ATTRIBUTION_CODE = {"system": CODE_SYSTEM, "code": "ecg-attribution", "display": "ECG attribution map"}
SIGNAL_CODE = {"system": CODE_SYSTEM, "code": "ecg-model-input", "display": "ECG as the model saw it"}


def attribution_observation(
    facts: VersionFacts,
    attribution: AttributionResult,
    beat: np.ndarray,
    leads: Sequence[str],
    rate_hz: float,
    *,
    waveform: str = "",
) -> dict[str, Any]:
    """The Observation (a JSON-ready dict, validated) of one attribution over the (leads, samples)
    mV input ``beat`` the model saw at ``rate_hz``; ``waveform``: what that input was made from."""
    from fhir.resources.R4B.observation import Observation

    period_ms = 1000.0 / float(rate_hz)
    values = np.asarray(attribution.attribution, dtype=np.float32)
    if values.shape != np.shape(beat) or len(leads) != values.shape[0]:
        raise ValueError(
            f"attribution {values.shape} and input {np.shape(beat)} do not match {len(leads)} leads"
        )
    components = [_component(SIGNAL_CODE, lead, beat[k], period_ms, "mV") for k, lead in enumerate(leads)]
    components += [
        _component(ATTRIBUTION_CODE, lead, values[k], period_ms, None) for k, lead in enumerate(leads)
    ]
    extensions = [
        {"url": EXT_METHOD, "valueString": attribution.method},
        {"url": EXT_TARGET, "valueString": attribution.target_key},
        {"url": EXT_GATE_VERDICT, "valueString": attribution.gate.verdict or "not checked"},
        {"url": EXT_MODEL, "valueString": facts.model},
        {"url": EXT_VERSION, "valueString": facts.version},
    ]
    for url, value in ((EXT_GATE_REPORT, facts.gate_report_sha256), (EXT_PACKAGE, facts.package_sha256)):
        if value:
            extensions.append({"url": url, "valueString": value})
    if waveform:
        extensions.append({"url": EXT_WAVEFORM, "valueString": waveform})
    resource = {
        "resourceType": "Observation",
        "status": "final",
        "category": [_concept(CODE_SYSTEM, "explanation", "Model explanation")],
        "code": {
            "coding": [ECG_CODE, ATTRIBUTION_CODE],
            "text": f"{attribution.method} attribution of {facts.model} {facts.version} "
            f"for class {attribution.target_key}",
        },
        "method": {"text": attribution.method},
        "extension": extensions,
        "component": components,
    }
    return Observation.model_validate(resource).model_dump(mode="json", exclude_none=True)


def observation_json(
    facts: VersionFacts,
    attribution: AttributionResult,
    beat: np.ndarray,
    leads: Sequence[str],
    rate_hz: float,
    *,
    waveform: str = "",
) -> bytes:
    """:func:`attribution_observation` (validated) as UTF-8 JSON text."""
    resource = attribution_observation(facts, attribution, beat, leads, rate_hz, waveform=waveform)
    return json.dumps(resource, separators=(",", ":")).encode("utf-8")


def observations_of(result: ExplainResult, served: Any) -> list[bytes]:
    """Every attribution of an Explain result as an Observation (JSON bytes), in order, over the
    inputs the model saw; ``served`` is the version that computed them (its leads and rate)."""
    package = served.engine.package
    rate = ModelInput.of_manifest(package.manifest).rate_hz
    waveforms = tuple(getattr(result, "ecg_waveforms", ()) or ())  # once the core reports them
    return [
        observation_json(
            result.facts,
            a,
            result.beats[a.ecg_index],
            package.leads,
            rate,
            waveform=waveforms[a.ecg_index] if a.ecg_index < len(waveforms) else "",
        )
        for a in result.attributions
    ]


def _component(
    code: dict[str, str], lead: str, values: np.ndarray, period_ms: float, unit: str | None
) -> dict:
    coding = [code]
    if lead in MDC_LEADS:
        coding.append({"system": MDC, "code": MDC_LEADS[lead], "display": f"MDC_ECG_LEAD_{lead}"})
    origin: dict[str, Any] = {"value": 0}
    if unit:
        origin.update(unit=unit, system=UCUM, code=unit)
    return {
        "code": {"coding": coding, "text": f"{code['display']}, lead {lead}"},
        "valueSampledData": {
            "origin": origin,
            "period": round(period_ms, 9),
            "dimensions": 1,
            # float32 needs 9 significant digits to come back bit for bit
            "data": " ".join(f"{float(v):.9g}" for v in np.asarray(values, dtype=np.float32)),
        },
    }


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}]}


def sampled_values(component: dict[str, Any]) -> np.ndarray:
    """The float32 values of a component's SampledData (origin + factor x data), as a reader would."""
    sd = component["valueSampledData"]
    data = np.array([float(v) for v in sd["data"].split()], dtype=np.float64)
    factor = float(sd.get("factor", 1) or 1)
    return (float(sd["origin"].get("value", 0)) + factor * data).astype(np.float32)


__all__ = [
    "ATTRIBUTION_CODE",
    "CODE_SYSTEM",
    "EXT_GATE_REPORT",
    "EXT_GATE_VERDICT",
    "EXT_METHOD",
    "EXT_TARGET",
    "SIGNAL_CODE",
    "attribution_observation",
    "observation_json",
    "observations_of",
    "sampled_values",
]
