"""Philips XLI decompression of Sierra ``parsedwaveforms``: most files straight from a cart use it.

Each lead is one chunk: an 8-byte header (payload size, int32 LE; the first residual, int16 LE
at offset 6) then 10-bit LZW codes (MSB first, no clear code, table full at 1022). The bytes the
LZW yields are the high bytes of int16 values followed by their low bytes; the values are second
differences offset by 64 (``x[i] = 2 x[i-1] - x[i-2] - r[i]``). Derived from the MIT-licensed
sierra-ecg-tools by Christopher Watford (the ``sierraecg`` package), rewritten here so the output
of each chunk is bounded by the samples the header announces (an LZW chunk can expand ~800x).
"""

from __future__ import annotations

import numpy as np

from ecgx.core.ecg_formats.record import EcgDocumentError

_BITS = 10
_MAX_CODE = (1 << _BITS) - 2


def xli_decode(data: bytes, leads: int, samples: int, field: str) -> np.ndarray:
    """(leads, samples) int64 counts from XLI ``data``; more or fewer chunks or samples: an error."""
    out = np.zeros((leads, samples), dtype=np.int64)
    offset = 0
    for lead in range(leads):
        if offset + 8 > len(data):
            raise EcgDocumentError(f"{field}: XLI data ends before lead {lead + 1} of {leads}")
        size = int.from_bytes(data[offset : offset + 4], "little", signed=True)
        first = int.from_bytes(data[offset + 6 : offset + 8], "little", signed=True)
        offset += 8
        if size < 0 or offset + size > len(data):
            raise EcgDocumentError(f"{field}: XLI chunk {lead + 1} announces {size} bytes it does not hold")
        raw = _lzw_decode(data[offset : offset + size], 2 * samples + 1, f"{field} XLI chunk {lead + 1}")
        offset += size
        values = _unpack(raw)
        if len(values) < samples:
            raise EcgDocumentError(
                f"{field}: truncated waveform, XLI chunk {lead + 1} holds {len(values)} samples where "
                f"{samples} are announced"
            )
        out[lead] = _undelta(values[:samples], first)
    return out


def _lzw_decode(chunk: bytes, max_out: int, field: str) -> bytearray:
    strings: dict[int, bytes] = {code: bytes([code]) for code in range(256)}
    next_code = 256
    previous = b""
    out = bytearray()
    bit_buffer = 0
    bit_count = 0
    for byte in chunk:
        bit_buffer = (bit_buffer << 8) | byte
        bit_count += 8
        while bit_count >= _BITS:
            bit_count -= _BITS
            code = (bit_buffer >> bit_count) & ((1 << _BITS) - 1)
            bit_buffer &= (1 << bit_count) - 1
            if code > _MAX_CODE:
                return out  # the encoder's end-of-data padding
            if code in strings:
                current = strings[code]
            elif code == next_code and previous:
                current = previous + previous[:1]
            else:
                raise EcgDocumentError(f"{field}: invalid LZW code {code}")
            if previous and next_code <= _MAX_CODE:
                strings[next_code] = previous + current[:1]
                next_code += 1
            previous = current
            out += current
            if len(out) > max_out:
                raise EcgDocumentError(f"{field}: decompresses beyond the samples announced")
    return out


def _unpack(raw: bytearray) -> np.ndarray:
    if len(raw) % 2:
        raw.append(0)
    half = len(raw) // 2
    buffer = np.frombuffer(bytes(raw), dtype=np.uint8)
    return ((buffer[:half].astype(np.int64) << 8) | buffer[half:]).astype(np.int16).astype(np.int64)


def _undelta(deltas: np.ndarray, first: int) -> np.ndarray:
    values = deltas.tolist()  # Python ints: this loop is sequential by nature
    out = values[:2]
    residual = first
    for i in range(2, len(values)):
        value = 2 * out[i - 1] - out[i - 2] - residual
        out.append(((value + 32768) & 0xFFFF) - 32768)  # the device's 16-bit arithmetic
        residual = values[i] - 64
    return np.asarray(out[: len(values)], dtype=np.int64)


def restore_limb_leads(counts: dict[str, np.ndarray]) -> None:
    """XLI stores III, aVR, aVL, aVF as residuals from I and II; restore them in place."""
    lead_i, lead_ii = counts["I"], counts["II"]
    counts["III"] = lead_ii - lead_i - counts["III"]
    counts["aVR"] = -counts["aVR"] - np.floor_divide(lead_i + lead_ii, 2)
    counts["aVL"] = np.floor_divide(lead_i - counts["III"], 2) - counts["aVL"]
    counts["aVF"] = np.floor_divide(lead_ii + counts["III"], 2) - counts["aVF"]
