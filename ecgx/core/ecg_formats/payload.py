"""Sample payloads as documents carry them (base64 integers, whitespace-separated numbers), decoded
only after their size is known to be within the limits."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from ecgx.core.ecg_formats.record import DocumentLimits, EcgDocumentError

_WHITESPACE = np.frombuffer(b" \t\r\n", dtype=np.uint8)


def decode_base64(text: str, max_bytes: int, field: str) -> bytes:
    """The bytes of a base64 ``text``, refused before decoding if they would exceed ``max_bytes``."""
    compact = "".join(text.split())  # line breaks inside base64 are common in vendor XML
    if len(compact) // 4 * 3 > max_bytes + 2:
        raise EcgDocumentError(
            f"{field}: the base64 payload decodes to about {len(compact) // 4 * 3} bytes, over "
            f"the {max_bytes} bytes the limits allow"
        )
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise EcgDocumentError(f"{field}: the payload is not valid base64") from None


def int16_samples(raw: bytes, expected: int, field: str) -> np.ndarray:
    """``expected`` little-endian int16 samples from ``raw``; a short payload is a truncation."""
    if len(raw) < 2 * expected:
        raise EcgDocumentError(
            f"{field}: truncated waveform, {len(raw) // 2} samples where {expected} are announced"
        )
    return np.frombuffer(raw, dtype="<i2", count=expected).astype(np.float64)


def number_list(text: str, limits: DocumentLimits, field: str) -> np.ndarray:
    """The numbers of a whitespace-separated list, counted before the list is split."""
    encoded = text.encode("ascii", "replace")
    is_space = np.isin(np.frombuffer(encoded, dtype=np.uint8), _WHITESPACE)
    count = int(np.count_nonzero(~is_space[1:] & is_space[:-1])) + int(
        bool(len(is_space)) and not is_space[0]
    )
    if count > limits.max_samples_per_lead:
        raise EcgDocumentError(
            f"{field}: {count} samples is over the limit of {limits.max_samples_per_lead} per lead"
        )
    if count == 0:
        raise EcgDocumentError(f"{field}: no samples")
    try:
        values = np.array(text.split(), dtype=np.float64)
    except ValueError:
        raise EcgDocumentError(f"{field}: the samples are not all numbers") from None
    if not np.isfinite(values).all():
        raise EcgDocumentError(f"{field}: the samples are not all finite numbers")
    return values
