"""The one record every ECG document reader yields, and the limits every reader obeys.

A reader turns the bytes of one document (a DICOM 12-lead waveform, HL7 aECG, GE MUSE XML,
Philips Sierra XML, a FHIR Observation) into an :class:`EcgDocument`: the 12 standard leads in
standard order, in millivolts, with the source's own labels and filter settings kept as metadata.
It never guesses: a missing lead, an unknown unit, an odd lead set or a truncated waveform is an
:class:`EcgDocumentError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ecgx.core.errors import InvalidArgument

# The standard 12-lead order every reader yields (the project's dataset order).
STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


class EcgDocumentError(InvalidArgument):
    """A document that cannot be read as a 12-lead ECG; the message names the field."""


@dataclass(frozen=True)
class DocumentLimits:
    """Bounds no crafted document may exceed; each is checked before the memory is spent."""

    max_bytes: int = 16 * 1024 * 1024
    max_samples_per_lead: int = 120 * 1000  # 120 s at 1 kHz
    max_leads: int = 16
    max_xml_depth: int = 64
    max_xml_elements: int = 200_000


@dataclass(frozen=True)
class Waveform:
    """Samples of the 12 standard leads: ``mv`` is (12, samples) float32 millivolts."""

    mv: np.ndarray
    sampling_rate_hz: float

    @property
    def seconds(self) -> float:
        return self.mv.shape[1] / self.sampling_rate_hz


@dataclass(frozen=True)
class EcgDocument:
    """One ECG as a hospital document holds it.

    ``rhythm`` is the rhythm strip and ``median_beat`` the representative beat, whichever the
    source holds (at least one). ``source_leads`` are the labels as the source wrote them, in
    the source's order; ``metadata`` keeps filter settings, device and acquisition facts as
    text (never patient identifiers).
    """

    format: str
    rhythm: Waveform | None
    median_beat: Waveform | None
    source_leads: tuple[str, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    leads: tuple[str, ...] = STANDARD_LEADS
