"""Lead labels and lead sets, shared by every reader (the one place that maps a label to a lead).

Sources spell leads many ways: "I", "Lead I", "Lead I (Einthoven)" (DICOM code meanings),
"MDC_ECG_LEAD_I" (aECG), "MDC_ECG_ELEC_POTL_I" or the MDC code 131329 (FHIR), "AVR" (MUSE).
:func:`standard_lead` maps each to the standard name or None; a label it cannot map (a Frank
lead, "-aVR", a vendor channel name) is never guessed. :func:`assemble_leads` turns the mapped
leads into the 12 standard leads, deriving the four limb leads a cart does not store (8
independent leads: I, II, V1-V6) by Einthoven's and Goldberger's equations, which is how the cart
itself computes them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from ecgx.core.ecg_formats.record import STANDARD_LEADS, DocumentLimits, EcgDocumentError, Waveform

INDEPENDENT_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
DERIVED_LIMB_LEADS = ("III", "aVR", "aVL", "aVF")

_BY_UPPER = {lead.upper(): lead for lead in STANDARD_LEADS}
# ISO/IEEE 11073 MDC codes (partition 2, MDC_ECG_ELEC_POTL_* = 256 + lead term code).
_MDC_TERM = {1: "I", 2: "II", 61: "III", 62: "aVR", 63: "aVL", 64: "aVF"}
_MDC_TERM.update({2 + n: f"V{n}" for n in range(1, 7)})
_MDC_CODES = {str(2 * 65536 + 256 + term): lead for term, lead in _MDC_TERM.items()}
_PREFIXES = ("MDC_ECG_LEAD_", "MDC_ECG_ELEC_POTL_", "LEAD_", "LEAD ", "LEAD-")
_PARENTHETICAL = re.compile(r"\s*\([^)]*\)\s*$")


def standard_lead(label: str) -> str | None:
    """The standard lead a source label names, or None when it names none of the 12."""
    text = _PARENTHETICAL.sub("", label.strip())
    if text in _MDC_CODES:
        return _MDC_CODES[text]
    upper = text.upper()
    for prefix in _PREFIXES:
        if upper.startswith(prefix):
            upper = upper[len(prefix) :].strip()
            break
    return _BY_UPPER.get(upper)


def map_leads(labels: Sequence[str], field: str) -> dict[str, int]:
    """Standard lead -> index into ``labels``; a lead named twice is an error naming ``field``."""
    found: dict[str, int] = {}
    for index, label in enumerate(labels):
        lead = standard_lead(label)
        if lead is None:
            continue
        if lead in found:
            raise EcgDocumentError(
                f"{field}: lead {lead} appears twice ({labels[found[lead]]!r} and {label!r})"
            )
        found[lead] = index
    return found


def assemble_leads(
    signals: Mapping[str, np.ndarray], labels: Sequence[str], field: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The (12, n) float32 mV array in standard order, and the leads derived (if any).

    ``signals`` maps standard lead names to 1-D mV arrays of one length; ``labels`` are the
    source's labels, named in the error when a lead is missing.
    """
    lengths = {len(signal) for signal in signals.values()}
    if len(lengths) > 1:
        raise EcgDocumentError(f"{field}: leads have different lengths {sorted(lengths)}")
    if all(lead in signals for lead in STANDARD_LEADS):
        return _stack(signals), ()
    missing = [lead for lead in INDEPENDENT_LEADS if lead not in signals]
    if missing:
        absent = [lead for lead in STANDARD_LEADS if lead not in signals]
        raise EcgDocumentError(
            f"{field}: lead(s) {', '.join(absent)} missing and not derivable (an ECG needs the 12 "
            f"leads or the 8 independent ones I, II, V1-V6); the source has {list(labels)}"
        )
    lead_i = signals["I"].astype(np.float64)
    lead_ii = signals["II"].astype(np.float64)
    derived = {
        "III": lead_ii - lead_i,  # Einthoven
        "aVR": -(lead_i + lead_ii) / 2,  # Goldberger
        "aVL": lead_i - lead_ii / 2,
        "aVF": lead_ii - lead_i / 2,
    }
    made = tuple(lead for lead in DERIVED_LIMB_LEADS if lead not in signals)
    return _stack({**{lead: derived[lead] for lead in made}, **signals}), made


def _stack(signals: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(signals[lead], dtype=np.float32) for lead in STANDARD_LEADS])


def make_waveform(mv: np.ndarray, rate_hz: float, field: str) -> Waveform:
    """A :class:`Waveform`, refused when empty or not finite (a NaN is never passed on)."""
    if mv.shape[1] == 0:
        raise EcgDocumentError(f"{field}: the waveform has no samples")
    if not np.isfinite(mv).all():
        raise EcgDocumentError(f"{field}: the waveform holds values that are not finite")
    return Waveform(mv=np.ascontiguousarray(mv, dtype=np.float32), sampling_rate_hz=rate_hz)


def check_counts(leads: int, samples: int, limits: DocumentLimits, field: str) -> None:
    """Refuse a lead or sample count over ``limits`` before any memory is spent on it."""
    if leads > limits.max_leads:
        raise EcgDocumentError(f"{field}: {leads} leads is over the limit of {limits.max_leads}")
    if samples > limits.max_samples_per_lead:
        raise EcgDocumentError(
            f"{field}: {samples} samples per lead is over the limit of {limits.max_samples_per_lead}"
        )
    if leads <= 0 or samples <= 0:
        raise EcgDocumentError(f"{field}: {leads} leads x {samples} samples holds no waveform")


def derivation_note(derived: tuple[str, ...]) -> dict[str, str]:
    """Metadata that says which leads were derived and how (empty when none were)."""
    if not derived:
        return {}
    return {
        "derived_leads": " ".join(derived),
        "derivation": "III = II - I (Einthoven); aVR = -(I + II)/2, aVL = I - II/2, "
        "aVF = II - I/2 (Goldberger)",
    }
