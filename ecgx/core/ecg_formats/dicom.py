"""DICOM waveform objects (12-lead ECG, General ECG IODs), read with pydicom.

Each item of the Waveform Sequence is a multiplex group: "RHYTHM" is the rhythm strip, "MEDIAN
BEAT" / "REPRESENTATIVE BEAT" the median beat. Samples are interleaved integers; a channel's value
is ``(sample x sensitivity + baseline) x correction factor`` in the channel's sensitivity unit
(PS3.3 C.10.9.1.4, as pydicom's ``waveform_array`` computes it). Channel and sample counts are
checked against the limits and against the bytes the group holds before any array is made.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pydicom

from ecgx.core.ecg_formats.leads import (
    assemble_leads,
    check_counts,
    derivation_note,
    make_waveform,
    map_leads,
)
from ecgx.core.ecg_formats.record import DocumentLimits, EcgDocument, EcgDocumentError, Waveform
from ecgx.core.ecg_formats.units import mv_per_unit, parse_rate

_DTYPES = {(8, "SB"): "i1", (16, "SS"): "<i2", (32, "SL"): "<i4", (8, "UB"): "u1", (16, "US"): "<u2"}
_MEDIAN_LABELS = ("MEDIAN", "REPRESENTATIVE")


def read(data: bytes, limits: DocumentLimits) -> EcgDocument:
    """Read a DICOM waveform object (see the module's docstring)."""
    try:
        return _read(data, limits)
    except EcgDocumentError:
        raise
    except Exception as exc:
        # pydicom raises many kinds on crafted bytes (struct, index, value, key errors); all of them
        # mean the same to the caller: not a readable DICOM ECG.
        raise EcgDocumentError(f"DICOM: cannot read the object ({type(exc).__name__}: {exc})") from None


def _read(data: bytes, limits: DocumentLimits) -> EcgDocument:
    dataset = pydicom.dcmread(io.BytesIO(data), force=False)
    groups = dataset.get("WaveformSequence")
    if not groups:
        raise EcgDocumentError("DICOM: no WaveformSequence (not a waveform object)")
    if len(groups) > 8:
        raise EcgDocumentError(f"DICOM: WaveformSequence: {len(groups)} groups is over the limit of 8")
    rhythm: Waveform | None = None
    median: Waveform | None = None
    metadata: dict[str, str] = {}
    source_leads: tuple[str, ...] = ()
    for index, group in enumerate(groups):
        label = str(group.get("MultiplexGroupLabel", "") or "").strip().upper()
        kind = "median_beat" if any(word in label for word in _MEDIAN_LABELS) else "rhythm"
        if (kind == "rhythm" and rhythm is not None) or (kind == "median_beat" and median is not None):
            continue  # a second group of a kind (e.g. a long lead II strip) is not one of the 12
        field = f"DICOM: WaveformSequence[{index}] ({label or 'unlabelled'})"
        waveform, labels, notes = _read_group(group, limits, field)
        metadata.update({f"{kind}.{key}": value for key, value in notes.items()})
        if kind == "rhythm":
            rhythm, source_leads = waveform, labels
        else:
            median = waveform
            source_leads = source_leads or labels
    metadata["sop_class_uid"] = str(dataset.get("SOPClassUID", ""))
    metadata.update(
        {key: str(dataset.get(key)) for key in ("Manufacturer", "ManufacturerModelName") if dataset.get(key)}
    )
    return EcgDocument("dicom", rhythm, median, source_leads, metadata)


def _read_group(
    group: Any, limits: DocumentLimits, field: str
) -> tuple[Waveform, tuple[str, ...], dict[str, str]]:
    channels = int(_required(group, "NumberOfWaveformChannels", field))
    samples = int(_required(group, "NumberOfWaveformSamples", field))
    check_counts(channels, samples, limits, field)
    rate = parse_rate(float(_required(group, "SamplingFrequency", field)), f"{field} SamplingFrequency")
    bits = int(_required(group, "WaveformBitsAllocated", field))
    interpretation = str(_required(group, "WaveformSampleInterpretation", field))
    dtype = _DTYPES.get((bits, interpretation))
    if dtype is None:
        raise EcgDocumentError(f"{field}: unsupported sample encoding {bits} bits {interpretation}")
    definitions = _required(group, "ChannelDefinitionSequence", field)
    if len(definitions) != channels:
        raise EcgDocumentError(
            f"{field}: NumberOfWaveformChannels is {channels} but ChannelDefinitionSequence has "
            f"{len(definitions)} items"
        )
    raw = bytes(_required(group, "WaveformData", field))
    needed = channels * samples * np.dtype(dtype).itemsize
    if len(raw) < needed:
        raise EcgDocumentError(
            f"{field}: WaveformData holds {len(raw)} bytes, fewer than the {needed} that "
            f"{channels} channels x {samples} samples of {bits} bits need (truncated or inconsistent)"
        )
    counts = np.frombuffer(raw, dtype=dtype, count=channels * samples).reshape(samples, channels)
    labels = tuple(_channel_label(definition, i) for i, definition in enumerate(definitions))
    signals = {}
    for lead, index in map_leads(labels, field).items():
        signals[lead] = _channel_mv(
            counts[:, index], definitions[index], f"{field} channel {labels[index]!r}"
        )
    mv, derived = assemble_leads(signals, labels, field)
    notes = {**_filters(definitions), **derivation_note(derived)}
    return make_waveform(mv, rate, field), labels, notes


def _required(group: Any, keyword: str, field: str) -> Any:
    value = group.get(keyword)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise EcgDocumentError(f"{field}: {keyword} is missing")
    return value


def _channel_label(definition: Any, index: int) -> str:
    sources = definition.get("ChannelSourceSequence")
    if sources:
        meaning = sources[0].get("CodeMeaning")
        if meaning:
            return str(meaning)
    label = definition.get("ChannelLabel")
    return str(label) if label else f"channel {index + 1}"


def _channel_mv(counts: np.ndarray, definition: Any, field: str) -> np.ndarray:
    sensitivity = float(_required(definition, "ChannelSensitivity", field))
    units = _required(definition, "ChannelSensitivityUnitsSequence", field)
    unit = units[0].get("CodeValue") if len(units) else None
    scale = mv_per_unit(unit, f"{field} ChannelSensitivityUnitsSequence")
    correction = float(definition.get("ChannelSensitivityCorrectionFactor", 1.0) or 1.0)
    baseline = float(definition.get("ChannelBaseline", 0.0) or 0.0)
    return (counts.astype(np.float64) * sensitivity + baseline) * correction * scale


def _filters(definitions: Any) -> dict[str, str]:
    """Filter settings as text; one value when all channels agree, else one per channel."""
    notes = {}
    for keyword, name in (
        ("FilterLowFrequency", "filter_low_hz"),
        ("FilterHighFrequency", "filter_high_hz"),
        ("NotchFilterFrequency", "notch_filter_hz"),
    ):
        values = [str(d.get(keyword)) for d in definitions if d.get(keyword) is not None]
        if values:
            notes[name] = values[0] if len(set(values)) == 1 else " ".join(values)
    return notes
