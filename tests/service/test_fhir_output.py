"""service/fhir_output.py: an attribution as a FHIR R4 Observation that fhir.resources validates,
carrying the model input and the map bit for bit, and the method, verdict and report hash."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fhir.resources.R4B.observation import Observation

from ecgx.core.ecg_formats import STANDARD_LEADS
from ecgx.service import fhir_output as fo
from ecgx.service.requests import AttributionResult, GateInfo, VersionFacts

FACTS = VersionFacts(
    "ecg", "3", "a" * 64, "b" * 64, "c" * 64, ("AF", "NORM"), "1.20.0", ("CPUExecutionProvider",)
)


def attribution(values: np.ndarray, verdict: str = "pass") -> AttributionResult:
    gate = GateInfo("integrated_gradients", True, verdict, False, ())
    shares = np.abs(values).sum(axis=1) / np.abs(values).sum()
    return AttributionResult(0, "integrated_gradients", 1, "NORM", values, shares, {"n_steps": 32}, gate, 0.2)


@pytest.fixture
def maps() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.normal(0, 0.3, (12, 600)).astype(np.float32), rng.normal(0, 1e-4, (12, 600)).astype(np.float32)


def test_the_observation_validates_and_carries_method_verdict_and_report_hash(maps) -> None:
    beat, values = maps
    text = fo.observation_json(
        FACTS, attribution(values), beat, STANDARD_LEADS, 500.0, waveform="rhythm_strip"
    )
    resource = Observation.model_validate_json(text)
    assert resource.status == "final"
    ext = {e["url"]: e["valueString"] for e in json.loads(text)["extension"]}
    assert ext[fo.EXT_METHOD] == "integrated_gradients"
    assert ext[fo.EXT_GATE_VERDICT] == "pass"
    assert ext[fo.EXT_GATE_REPORT] == FACTS.gate_report_sha256
    assert ext[fo.EXT_TARGET] == "NORM"
    assert ext[fo.EXTENSION_BASE + "input-waveform"] == "rhythm_strip"


def test_signal_and_attribution_come_back_bit_for_bit_lead_by_lead(maps) -> None:
    beat, values = maps
    doc = json.loads(fo.observation_json(FACTS, attribution(values), beat, STANDARD_LEADS, 500.0))
    components = doc["component"]
    assert len(components) == 24
    for k, lead in enumerate(STANDARD_LEADS):
        signal, attr = components[k], components[12 + k]
        assert signal["code"]["coding"][1]["code"] == fo.MDC_LEADS[lead] == attr["code"]["coding"][1]["code"]
        assert signal["valueSampledData"]["origin"]["unit"] == "mV"
        assert signal["valueSampledData"]["period"] == 2.0  # ms at 500 Hz
        assert np.array_equal(fo.sampled_values(signal), beat[k])
        assert np.array_equal(fo.sampled_values(attr), values[k])
        assert attr["code"]["coding"][0] == fo.ATTRIBUTION_CODE


def test_a_map_that_does_not_fit_the_input_is_refused(maps) -> None:
    beat, values = maps
    with pytest.raises(ValueError, match="do not match"):
        fo.attribution_observation(FACTS, attribution(values[:, :300]), beat, STANDARD_LEADS, 500.0)
