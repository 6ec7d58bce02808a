"""ECG payloads of the gRPC API (``ecgx.v1.Ecg``) to the (B, leads, T) mV input a model takes.

An ECG arrives as lead names (any order, matched case-insensitively as in the WFDB importer),
a sampling rate, explicit units and packed little-endian float32 samples (leads x T). What a
model takes is its :class:`ModelInput` (from its package manifest):

- a median-beat model (the project's: 600 samples at 500 Hz) takes a median beat as it is,
  or a rhythm strip of at least ``MIN_STRIP_S`` seconds at a rate the importer accepts, from
  which the beat is computed with the importer's own code
  (:func:`~ecgx.core.median_beat.median_beat`);
- a window model (a network brought from elsewhere, e.g. 10 s at 100 Hz as in PTB-XL's
  benchmark) takes exactly its number of samples at its rate, or a longer strip, or one at
  another rate: that is resampled to the model's rate and its first ``samples`` are used.

An ECG may instead arrive as a hospital document (``document``: ``format`` and ``data`` bytes,
the fields of ``ecgx.v1.EcgDocumentBytes``): it is read here, once for every transport, by
:func:`ecgx.core.ecg_formats.read_ecg_document` within its :class:`DocumentLimits`, and the
waveform the model expects (:func:`document_waveform`) then takes exactly the path samples take.
What each input was made from is reported per ECG (:data:`WAVEFORMS`).

Anything else is refused with an :class:`~ecgx.core.errors.InvalidArgument` whose message
names the ECG (``ecgs[i]``) and what is wrong. Messages never quote sample values beyond
one peak amplitude, and nothing here logs.

NumPy/SciPy only: the serving path never imports PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from ecgx.core.ecg_formats import FORMATS, DocumentLimits, EcgDocument, Waveform, read_ecg_document
from ecgx.core.errors import InvalidArgument, ResourceExhausted
from ecgx.core.median_beat import MedianBeatError, check_leads, check_sampling_rate, median_beat

# Units (values of the ecgx.v1.Units enum).
UNITS_UNSPECIFIED, MILLIVOLT, MICROVOLT = 0, 1, 2
_TO_MV = {MILLIVOLT: 1.0, MICROVOLT: 1e-3}
# Same bound as the engine and the dataset format: beyond it the units are wrong or it is not an ECG.
MAX_ABS_MV = 50.0
BEAT_RATE_HZ = 500.0
# A rhythm strip must hold enough beats for a trustworthy median (PTB-XL records are 10 s).
MIN_STRIP_S = 8.0
# Longer strips add nothing to a median beat and cost time (resampling, detection).
MAX_STRIP_S = 120.0
# What a model input was made from (the responses' ecg_waveforms): a median beat or a window
# used exactly as sent (or as the document held it), or a rhythm strip the server reduced to it.
MEDIAN_BEAT, WINDOW, RHYTHM_STRIP = "median_beat", "window", "rhythm_strip"
WAVEFORMS = (MEDIAN_BEAT, WINDOW, RHYTHM_STRIP)
# The samples fields a document replaces: a payload sets one or the other, never both.
_SAMPLE_FIELDS = ("leads", "sampling_rate_hz", "units", "samples_per_lead", "samples")


@dataclass(frozen=True)
class DocumentBytes:
    """An ECG document as a transport received it (the fields of ``ecgx.v1.EcgDocumentBytes``)."""

    format: str
    data: bytes


@dataclass(frozen=True)
class DocumentEcg:
    """An ECG payload holding a document instead of samples (what the OIP transports pass the core)."""

    document: DocumentBytes
    id: str = ""


@dataclass(frozen=True)
class ModelInput:
    """What one ECG must become for a model: ``samples`` per lead at ``rate_hz``, and whether
    that is a median beat (computed from a rhythm strip when one is sent) or a window of signal."""

    samples: int = 600
    rate_hz: float = BEAT_RATE_HZ
    median_beat: bool = True

    @classmethod
    def of_manifest(cls, manifest: dict[str, Any]) -> ModelInput:
        """From a package manifest's ``input`` (packages without ``kind`` hold median beats)."""
        spec = manifest["input"]
        return cls(
            samples=int(spec["shape"][-1]),
            rate_hz=float(spec.get("sampling_rate_hz") or BEAT_RATE_HZ),
            median_beat=spec.get("kind", "median_beat") == "median_beat",
        )


def decode_ecgs(
    ecgs: Sequence[Any],
    leads: Sequence[str],
    beat_samples: int | ModelInput = 600,
    max_batch: int | None = None,
    limits: DocumentLimits | None = None,
) -> tuple[np.ndarray, list[bool]]:
    """(B, leads, samples) float32 mV model inputs from ``Ecg`` messages, and whether each came
    from a strip (resampled or cut, or reduced to its median beat).

    ``leads`` is the model's lead order (its package manifest); ``beat_samples`` the model's
    input (a number: a median beat of that many samples at 500 Hz). Raises InvalidArgument
    for an empty batch or any malformed ECG, ResourceExhausted for more than ``max_batch`` ECGs.
    """
    beats, waveforms = decode_inputs(ecgs, leads, beat_samples, max_batch, limits)
    return beats, [w == RHYTHM_STRIP for w in waveforms]


def decode_inputs(
    ecgs: Sequence[Any],
    leads: Sequence[str],
    beat_samples: int | ModelInput = 600,
    max_batch: int | None = None,
    limits: DocumentLimits | None = None,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """As :func:`decode_ecgs`, with what each input was made from (one of :data:`WAVEFORMS`)."""
    if len(ecgs) == 0:
        raise InvalidArgument("the request holds no ECG (ecgs is empty)")
    if max_batch is not None and len(ecgs) > max_batch:
        raise ResourceExhausted(
            f"the request holds {len(ecgs)} ECGs; this server takes at most {max_batch} per request "
            "(--max-batch): send them in several requests"
        )
    spec = beat_samples if isinstance(beat_samples, ModelInput) else ModelInput(int(beat_samples))
    beats = np.empty((len(ecgs), len(leads), spec.samples), np.float32)
    waveforms = []
    for i, ecg in enumerate(ecgs):
        beats[i], waveform = decode_input(ecg, leads, spec, where=f"ecgs[{i}]", limits=limits)
        waveforms.append(waveform)
    return beats, tuple(waveforms)


def decode_ecg(
    ecg: Any, leads: Sequence[str], beat_samples: int | ModelInput = 600, where: str = "ecg"
) -> tuple[np.ndarray, bool]:
    """One ``Ecg`` message as the model's (leads, samples) float32 mV input, and whether it was a strip."""
    x, waveform = decode_input(ecg, leads, beat_samples, where)
    return x, waveform == RHYTHM_STRIP


def decode_input(
    ecg: Any,
    leads: Sequence[str],
    beat_samples: int | ModelInput = 600,
    where: str = "ecg",
    limits: DocumentLimits | None = None,
) -> tuple[np.ndarray, str]:
    """One ``Ecg`` payload (samples or a document) as the model's (leads, samples) float32 mV
    input, and what it was made from (one of :data:`WAVEFORMS`)."""
    spec = beat_samples if isinstance(beat_samples, ModelInput) else ModelInput(int(beat_samples))
    document = document_of(ecg, where)
    if document is not None:
        return decode_document(document, leads, spec, f"{where}.document", limits)
    order = lead_order(list(ecg.leads), leads, where)
    scale = units_to_mv(ecg.units, where)
    fs = float(ecg.sampling_rate_hz)
    if not math.isfinite(fs) or fs <= 0:
        raise InvalidArgument(f"{where}: sampling_rate_hz must be a positive number of Hz, got {fs:g}")
    t = int(ecg.samples_per_lead)
    if t < 1:
        raise InvalidArgument(f"{where}: samples_per_lead must be at least 1, got {t}")
    n = len(ecg.leads)
    expected = 4 * n * t
    if len(ecg.samples) != expected:
        raise InvalidArgument(
            f"{where}: samples holds {len(ecg.samples)} bytes; {n} leads x {t} samples_per_lead x 4 bytes "
            f"(float32) = {expected} expected"
        )
    is_beat = t == spec.samples and fs == spec.rate_hz
    if not is_beat:
        seconds = t / fs
        if seconds > MAX_STRIP_S:
            raise InvalidArgument(
                f"{where}: the rhythm strip is {seconds:.1f} s long; at most {MAX_STRIP_S:g} s is accepted "
                "(a median beat needs 8-10 s)"
            )
    x = np.frombuffer(ecg.samples, "<f4").reshape(n, t)[order]
    return _model_input(x, fs, scale, spec, leads, where)


def _model_input(
    x: np.ndarray, fs: float, scale: float, spec: ModelInput, leads: Sequence[str], where: str
) -> tuple[np.ndarray, str]:
    """The checks and reduction every ECG gets, from its (model leads, T) samples in the stated
    units at ``fs`` Hz: finite, amplitude, then used as it is or reduced from a strip."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise InvalidArgument(f"{where}: NaN or infinite samples in lead(s) {_names(leads, bad)}")
    x = x.astype(np.float32) * np.float32(scale)
    _check_amplitude(x, leads, scale, where)
    if x.shape[-1] == spec.samples and fs == spec.rate_hz:
        return np.ascontiguousarray(x, dtype=np.float32), MEDIAN_BEAT if spec.median_beat else WINDOW
    if not spec.median_beat:
        return strip_to_window(x, fs, spec, leads, scale, where), RHYTHM_STRIP
    return strip_to_beat(x, fs, leads, scale, where), RHYTHM_STRIP


# ---------------------------------------------------------------------------- documents


def document_of(ecg: Any, where: str = "ecg") -> Any | None:
    """The payload's document (``format``, ``data``), or None when it holds samples.

    A payload that sets both a document and any samples field is refused: which one the client
    meant cannot be told."""
    document = getattr(ecg, "document", None)
    has_field = getattr(ecg, "HasField", None)
    if document is None or (has_field is not None and not has_field("document")):
        return None
    given = [name for name in _SAMPLE_FIELDS if getattr(ecg, name, None)]
    if given:
        raise InvalidArgument(
            f"{where}: holds a document and samples fields ({', '.join(given)}); send one or the other"
        )
    return document


def decode_document(
    document: Any,
    leads: Sequence[str],
    spec: ModelInput,
    where: str = "ecg.document",
    limits: DocumentLimits | None = None,
) -> tuple[np.ndarray, str]:
    """A document (``format``, ``data``) read within ``limits``, then the waveform the model
    expects (:func:`document_waveform`) through the checks samples get."""
    fmt, data = str(document.format), document.data
    if not fmt:
        raise InvalidArgument(f"{where}.format: the document's format must be given")
    try:
        record = read_ecg_document(bytes(data), fmt, limits=limits or DocumentLimits())
    except InvalidArgument as e:
        field = "format" if fmt not in FORMATS else "data"
        raise InvalidArgument(f"{where}.{field}: {e}") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError, RecursionError) as e:
        # A reader's slip on a crafted file is still the document's fault, never INTERNAL.
        raise InvalidArgument(f"{where}.data: not a readable {fmt} ECG ({type(e).__name__})") from None
    waveform, name = document_waveform(record, spec, where)
    order = lead_order(list(record.leads), leads, where)
    fs = float(waveform.sampling_rate_hz)
    if not math.isfinite(fs) or fs <= 0:
        raise InvalidArgument(f"{where}: its sampling rate must be a positive number of Hz, got {fs:g}")
    mv = np.asarray(waveform.mv, dtype=np.float32)
    if mv.ndim != 2 or mv.shape[0] != len(record.leads) or mv.shape[1] < 1:
        raise InvalidArgument(f"{where}: its {name} holds no (leads, samples) waveform")
    if mv.shape[1] / fs > MAX_STRIP_S and not (mv.shape[1] == spec.samples and fs == spec.rate_hz):
        raise InvalidArgument(
            f"{where}: the rhythm strip is {mv.shape[1] / fs:.1f} s long; "
            f"at most {MAX_STRIP_S:g} s is accepted"
        )
    return _model_input(mv[order], fs, 1.0, spec, leads, where)


def document_waveform(
    record: EcgDocument, spec: ModelInput, where: str = "ecg.document"
) -> tuple[Waveform, str]:
    """The waveform of a document the model takes, and its name ("median beat" or "rhythm strip").

    A median-beat model takes the document's median beat when it holds one at the model's rate
    and length (the beat as the cart computed it), else its rhythm strip (reduced here with the
    importer's code); a window model takes the rhythm strip."""
    beat, rhythm = record.median_beat, record.rhythm
    if spec.median_beat and beat is not None and _fits(beat, spec):
        return beat, "median beat"
    if rhythm is not None:
        return rhythm, "rhythm strip"
    if beat is not None and spec.median_beat:
        raise InvalidArgument(
            f"{where}: holds only a median beat of {beat.mv.shape[-1]} samples at "
            f"{beat.sampling_rate_hz:g} Hz and no rhythm strip; the model takes a median beat of "
            f"{spec.samples} samples at {spec.rate_hz:g} Hz"
        )
    raise InvalidArgument(
        f"{where}: holds no rhythm strip; the model takes a window of {spec.samples} samples at "
        f"{spec.rate_hz:g} Hz cut from one"
    )


def _fits(waveform: Waveform, spec: ModelInput) -> bool:
    return waveform.mv.shape[-1] == spec.samples and float(waveform.sampling_rate_hz) == spec.rate_hz


def lead_order(names: Sequence[str], leads: Sequence[str], where: str = "ecg") -> list[int]:
    """Row of each model lead in ``names`` (matched case-insensitively, surrounding blanks ignored).

    Every model lead must appear exactly once and no other name may appear: an extra signal
    (a rhythm lead, a duplicate) is refused rather than silently dropped.
    """
    if not names:
        raise InvalidArgument(f"{where}: no lead names; give the {len(leads)} leads {', '.join(leads)}")
    wanted = {lead.casefold(): lead for lead in leads}
    index: dict[str, int] = {}
    duplicated, unknown = [], []
    for i, name in enumerate(names):
        key = str(name).strip().casefold()
        if key not in wanted:
            unknown.append(name)
        elif key in index:
            duplicated.append(name)
        else:
            index[key] = i
    missing = [lead for lead in leads if lead.casefold() not in index]
    problems = []
    if missing:
        problems.append(f"missing lead(s) {', '.join(missing)}")
    if unknown:
        shown = [repr(u) if len(repr(u)) <= 24 else repr(u)[:21] + "..." for u in unknown[:16]]
        more = f" and {len(unknown) - 16} more" if len(unknown) > 16 else ""
        problems.append(f"unknown lead name(s) {', '.join(shown)}{more}")
    if duplicated:
        problems.append(f"lead(s) given twice: {', '.join(dict.fromkeys(duplicated))}")
    if problems:
        raise InvalidArgument(
            f"{where}: {'; '.join(problems)}; the model takes exactly the {len(leads)} leads "
            f"{', '.join(leads)} (any order, names case-insensitive)"
        )
    return [index[lead.casefold()] for lead in leads]


def units_to_mv(units: int, where: str = "ecg") -> float:
    """Factor from the stated units to millivolts; UNITS_UNSPECIFIED and unknown values are refused."""
    if units == UNITS_UNSPECIFIED:
        raise InvalidArgument(f"{where}: units must be given (MILLIVOLT or MICROVOLT), got UNITS_UNSPECIFIED")
    if units not in _TO_MV:
        raise InvalidArgument(f"{where}: unknown units value {units}; use MILLIVOLT or MICROVOLT")
    return _TO_MV[units]


def strip_to_beat(
    x: np.ndarray, fs: float, leads: Sequence[str], scale: float, where: str = "ecg"
) -> np.ndarray:
    """The median beat of a (12, T) mV rhythm strip at ``fs`` Hz, with the importer's checks and code."""
    try:
        check_sampling_rate(fs)
    except MedianBeatError as e:
        raise InvalidArgument(f"{where}: {e}") from None
    seconds = x.shape[-1] / fs
    if seconds < MIN_STRIP_S:
        raise InvalidArgument(
            f"{where}: the rhythm strip is {seconds:.2f} s long ({x.shape[-1]} samples at {fs:g} Hz); "
            f"at least {MIN_STRIP_S:g} s is needed for a median beat, or send a {len(leads)} x 600 median "
            f"beat at {BEAT_RATE_HZ:g} Hz"
        )
    try:
        check_leads(x, fs)
        beat = median_beat(x, fs)
    except MedianBeatError as e:
        raise InvalidArgument(f"{where}: no median beat from this rhythm strip: {e}") from None
    except (ValueError, ArithmeticError) as e:  # numpy/scipy on a signal the checks let through
        raise InvalidArgument(
            f"{where}: no median beat from this rhythm strip: {type(e).__name__}: {e}"
        ) from None
    _check_amplitude(beat, leads, scale, where, what="its median beat")
    return np.ascontiguousarray(beat, dtype=np.float32)


def strip_to_window(
    x: np.ndarray, fs: float, spec: ModelInput, leads: Sequence[str], scale: float, where: str = "ecg"
) -> np.ndarray:
    """The first ``spec.samples`` samples of a (leads, T) mV strip at ``fs`` Hz, resampled to the
    model's rate (polyphase, anti-aliased) when ``fs`` differs."""
    from scipy.signal import resample_poly

    try:
        check_sampling_rate(fs)
    except MedianBeatError as e:
        raise InvalidArgument(f"{where}: {e}") from None
    need_s = spec.samples / spec.rate_hz
    if x.shape[-1] / fs < need_s:
        raise InvalidArgument(
            f"{where}: the ECG is {x.shape[-1] / fs:.2f} s long ({x.shape[-1]} samples at {fs:g} Hz); "
            f"the model takes {spec.samples} samples at {spec.rate_hz:g} Hz ({need_s:g} s)"
        )
    if fs != spec.rate_hz:
        ratio = Fraction(spec.rate_hz / fs).limit_denominator(1000)
        x = resample_poly(x.astype(np.float64), ratio.numerator, ratio.denominator, axis=-1)
        if x.shape[-1] < spec.samples:  # rounding of a strip exactly as long as the window
            x = np.pad(x, ((0, 0), (0, spec.samples - x.shape[-1])), mode="edge")
    window = np.ascontiguousarray(x[:, : spec.samples], dtype=np.float32)
    _check_amplitude(window, leads, scale, where, what="the resampled ECG")
    return window


def _check_amplitude(x: np.ndarray, leads: Sequence[str], scale: float, where: str, what: str = "") -> None:
    peak = np.abs(x).max(axis=1)
    big = peak > MAX_ABS_MV
    if big.any():
        hint = (
            " (microvolts sent as MILLIVOLT? set units to MICROVOLT)"
            if scale == 1.0 and float(peak.max()) <= MAX_ABS_MV * 1000
            else ""
        )
        subject = f" of {what}" if what else ""
        raise InvalidArgument(
            f"{where}: implausible amplitude{subject} in lead(s) {_names(leads, big)}: |x| up to "
            f"{float(peak.max()):.4g} mV, over the {MAX_ABS_MV:g} mV an ECG can reach{hint}"
        )


def _names(leads: Sequence[str], mask: np.ndarray) -> str:
    return ", ".join(leads[k] for k in np.flatnonzero(mask))
