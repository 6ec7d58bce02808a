"""ECG documents as hospitals store them, read into one record (:class:`EcgDocument`)."""

from ecgx.core.ecg_formats.record import (
    STANDARD_LEADS,
    DocumentLimits,
    EcgDocument,
    EcgDocumentError,
    Waveform,
)

__all__ = ["STANDARD_LEADS", "DocumentLimits", "EcgDocument", "EcgDocumentError", "Waveform"]
