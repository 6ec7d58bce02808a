"""Unit scaling shared by every reader: one table of the voltage units an ECG document may use.

Each format states its amplitude its own way (DICOM: channel sensitivity x correction factor plus
baseline, in a coded unit; aECG: origin + scale x digit; MUSE: amplitude units per bit; Sierra: a
resolution in microvolts; FHIR: origin + factor x data), but all of them end in a unit from this
table. A unit that is not here is refused, never assumed.
"""

from __future__ import annotations

from ecgx.core.ecg_formats.record import EcgDocumentError

# Lower-cased unit spellings (UCUM codes, DICOM code values, vendor words) -> millivolts per unit.
_MV_PER_UNIT: dict[str, float] = {
    "uv": 1e-3,
    "µv": 1e-3,
    "μv": 1e-3,  # Greek mu, as some exporters write it
    "microvolt": 1e-3,
    "microvolts": 1e-3,
    "mv": 1.0,
    "millivolt": 1.0,
    "millivolts": 1.0,
    "v": 1e3,
    "volt": 1e3,
    "volts": 1e3,
}

# Time units for sampling intervals -> seconds per unit.
_SECONDS_PER_UNIT: dict[str, float] = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def mv_per_unit(unit: str | None, field: str) -> float:
    """Millivolts per one ``unit``; ``field`` names where the unit was read, for the error."""
    scale = _MV_PER_UNIT.get((unit or "").strip().lower())
    if scale is None:
        raise EcgDocumentError(
            f"{field}: unknown voltage unit {unit!r} (known: uV, mV, V and their spelled-out names)"
        )
    return scale


def seconds_per_unit(unit: str | None, field: str) -> float:
    """Seconds per one time ``unit`` (s, ms, us); ``field`` names where it was read."""
    scale = _SECONDS_PER_UNIT.get((unit or "").strip().lower())
    if scale is None:
        raise EcgDocumentError(f"{field}: unknown time unit {unit!r} (known: s, ms, us)")
    return scale


def parse_number(text: str | None, field: str) -> float:
    """A finite number from document text, or an error naming ``field``."""
    try:
        value = float((text or "").strip())
    except ValueError:
        raise EcgDocumentError(f"{field}: {text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise EcgDocumentError(f"{field}: {text!r} is not a finite number")
    return value


def parse_rate(hz: float, field: str) -> float:
    """A sampling rate in Hz, refused unless positive and plausible for an ECG (<= 100 kHz)."""
    if not 0 < hz <= 100_000:
        raise EcgDocumentError(f"{field}: sampling rate {hz} Hz is not in (0, 100000]")
    return float(hz)
