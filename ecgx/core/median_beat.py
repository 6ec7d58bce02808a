"""R-peak detection and the median beat of a 12-lead rhythm ECG (NumPy/SciPy only).

Pipeline of :func:`median_beat`:

0. refuse what cannot give a trustworthy beat (:func:`check_sampling_rate`,
   :func:`check_leads`): a sampling rate below ``MIN_SAMPLING_RATE_HZ`` or above
   ``MAX_SAMPLING_RATE_HZ``, a record shorter than one beat window, a flat lead
   (peak-to-peak below ``FLAT_LEAD_MV``, e.g. all zeros) or a lead that holds one value
   for ``FLAT_RUN_S`` or longer (electrode off or saturated during the recording);
1. resample to 500 Hz (``resample_poly`` with the rational ratio);
2. detect QRS complexes on a 5-15 Hz band-passed, squared-derivative energy summed
   over all leads (:func:`detect_r_peaks`); this filtering is for detection only;
3. remove baseline wander from the signal that is averaged with a 0.5 Hz zero-phase
   high-pass (bidirectional filtering below 0.67 Hz keeps ST levels, AHA 2007);
4. one fiducial per beat shared by all 12 leads (:func:`_fiducial`: the
   amplitude-weighted median over leads of the time of each lead's largest
   |deflection|), then each beat is aligned to the provisional median by normalised
   12-lead cross-correlation of its QRS (+-20 ms), and the whole set is shifted so
   that the median beat's own fiducial lands on sample 250;
5. beats whose QRS correlates < 0.8 with the provisional median (ectopic beats,
   artefacts, false detections) are dropped;
6. each beat's isoelectric level (mean of the flattest 20 ms before the QRS, the
   PR segment, found once on the median) is subtracted per lead, so the median
   beat's baseline sits at 0 mV like the synthetic data;
7. the per-lead median over beats is the result, (12, 600) float32 mV.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy import ndimage, signal

from ecgx.core.errors import InvalidArgument
from ecgx.core.schema import BEAT_SAMPLES, LEADS, N_LEADS, R_PEAK_SAMPLE, SAMPLING_RATE_HZ

REFRACTORY_S = 0.25  # two QRS complexes are never closer than this
T_WAVE_WINDOW_S = 0.36  # a weak peak this soon after a beat is a T wave (Pan-Tompkins)
MIN_BEAT_CORRELATION = 0.8
# Lowest accepted sampling rate. The beat is resampled to 500 Hz, but resampling cannot bring back what
# was never sampled: at 250 Hz the record keeps QRS content up to 125 Hz and, on the PTB-XL records
# downsampled for the test, the median beat stays within 0.04 mV of the 500 Hz beat's per-lead QRS peak
# with the R fiducial within 2 ms. At 100 Hz (PTB-XL's records100, a decimated copy of records500) the
# band ends at 50 Hz: QRS peaks lose up to 0.2 mV and notches vanish, a different input from the 500 Hz
# beats the models are trained on; at 50 Hz the loss is 0.66 mV. 250 Hz still admits INCART (257 Hz).
MIN_SAMPLING_RATE_HZ = 250.0
MAX_SAMPLING_RATE_HZ = 20_000.0  # far above any ECG recorder; a higher value is a corrupt header
# A lead whose whole record spans less than this (peak to peak) carries no ECG: an unconnected electrode,
# all zeros, or a gain 1000 times too large. Real leads span 0.4 mV or more (QRS plus baseline drift).
FLAT_LEAD_MV = 0.02
# A lead holding exactly one value this long was disconnected or saturated during the recording. Real
# records hold one quantised value for at most ~0.2 s (PTB-XL's flattest isoelectric stretches).
FLAT_RUN_S = 2.0
_DETECT_BAND_HZ = (5.0, 15.0)
_HIGHPASS_HZ = 0.5
_ENVELOPE_S = 0.08  # moving average merging one QRS's energy lobes into one peak
_LOCAL_MAX_S = 2.5  # longer than the longest plausible RR, so every window holds a QRS
_REL_HEIGHT = 0.2  # peak height relative to the local maximum of the envelope
_FLOOR_HEIGHT = 0.1  # ... and relative to the typical QRS energy (ignores quiet noise)
_REFINE_S = 0.05  # search radius around the envelope peak for the R fiducial
_ALIGN_MAX_LAG = 10  # samples at 500 Hz: +-20 ms beat-to-template alignment
_QRS = (-50, 75)  # samples around R (at 500 Hz) compared for alignment and outliers
_ISO_SEARCH = (-100, -10)  # where the PR segment is looked for, samples around R
_ISO_WIDTH = 10  # 20 ms


class MedianBeatError(InvalidArgument):
    """No trustworthy median beat can be made from a signal (the message says why)."""


def check_sampling_rate(fs: float) -> None:
    """Raise :class:`MedianBeatError` unless ``fs`` lies in [MIN_SAMPLING_RATE_HZ, MAX_SAMPLING_RATE_HZ]."""
    if not np.isfinite(fs) or fs <= 0:
        raise MedianBeatError(f"sampling rate must be a positive number of Hz, got {fs}")
    if fs < MIN_SAMPLING_RATE_HZ:
        raise MedianBeatError(
            f"sampling rate {fs:g} Hz is below the {MIN_SAMPLING_RATE_HZ:g} Hz minimum for median beats "
            "(QRS detail above half the rate is lost; for PTB-XL import records500, not records100)"
        )
    if fs > MAX_SAMPLING_RATE_HZ:
        raise MedianBeatError(
            f"sampling rate {fs:g} Hz is above the {MAX_SAMPLING_RATE_HZ:g} Hz plausible for an ECG"
        )


def _longest_constant_run(lead: np.ndarray) -> int:
    """Length (samples) of the longest stretch of identical consecutive values."""
    changes = np.flatnonzero(np.diff(lead) != 0)
    bounds = np.concatenate(([-1], changes, [len(lead) - 1]))
    return int(np.diff(bounds).max())


def check_leads(signal_12xT: np.ndarray, fs: float) -> None:
    """Raise :class:`MedianBeatError` naming every flat or disconnected lead of a (12, T) mV signal.

    A lead is flat when it spans less than ``FLAT_LEAD_MV`` peak to peak over the whole
    record, and disconnected when it holds one value for ``FLAT_RUN_S`` or longer.
    """
    x = _as_leads(signal_12xT)
    span = np.ptp(x, axis=1)
    flat = [LEADS[k] for k in np.flatnonzero(span < FLAT_LEAD_MV)]
    if flat:
        raise MedianBeatError(
            f"flat lead{'s' if len(flat) > 1 else ''} {', '.join(flat)}: less than {FLAT_LEAD_MV} mV peak to "
            "peak over the whole record (electrode not connected, or wrong gain or units in the header)"
        )
    min_run = int(np.ceil(FLAT_RUN_S * fs))
    runs = [(LEADS[k], _longest_constant_run(x[k])) for k in range(N_LEADS)]
    stuck = [f"{lead} ({n / fs:.1f} s)" for lead, n in runs if n >= min_run]
    if stuck:
        raise MedianBeatError(
            f"disconnected lead{'s' if len(stuck) > 1 else ''} {', '.join(stuck)}: one constant value for "
            f"{FLAT_RUN_S:g} s or longer (electrode off or saturated during the recording)"
        )


def resample(x: np.ndarray, fs: float, target: float = SAMPLING_RATE_HZ) -> np.ndarray:
    """Resample ``x`` (leads x samples) from ``fs`` to ``target`` Hz with a polyphase filter."""
    if fs <= 0:
        raise MedianBeatError(f"sampling rate must be positive, got {fs}")
    ratio = (Fraction(target) / Fraction(fs)).limit_denominator(1000)
    if ratio == 1:
        return x
    return signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)


def _zero_phase(x: np.ndarray, sos: np.ndarray, fs: float) -> np.ndarray:
    # Long odd-extension padding keeps the slow high-pass from ringing at the edges.
    padlen = min(x.shape[-1] - 1, int(3 * fs))
    return signal.sosfiltfilt(sos, x, axis=-1, padlen=padlen)


def highpass(x: np.ndarray, fs: float, cutoff: float = _HIGHPASS_HZ) -> np.ndarray:
    """Zero-phase high-pass that removes baseline wander without shifting the ST level."""
    sos = signal.butter(2, cutoff, "highpass", fs=fs, output="sos")
    return _zero_phase(x, sos, fs)


def _qrs_envelope(x: np.ndarray, fs: float) -> np.ndarray:
    """Energy of the QRS band's slope, summed over leads and smoothed over ~80 ms."""
    sos = signal.butter(2, _DETECT_BAND_HZ, "bandpass", fs=fs, output="sos")
    band = _zero_phase(x, sos, fs)
    energy = (np.diff(band, axis=-1, prepend=band[:, :1]) ** 2).sum(axis=0)
    return ndimage.uniform_filter1d(energy, max(1, round(_ENVELOPE_S * fs)))


def _drop_t_waves(peaks: np.ndarray, heights: np.ndarray, fs: float) -> np.ndarray:
    """Drop a peak that comes soon after an accepted beat and has under half its energy."""
    keep = [0]
    for i in range(1, len(peaks)):
        last = keep[-1]
        if peaks[i] - peaks[last] < T_WAVE_WINDOW_S * fs and heights[i] < 0.5 * heights[last]:
            continue
        keep.append(i)
    return peaks[keep]


def _fiducial(segment: np.ndarray) -> int:
    """Index of the R fiducial in a (12, W) QRS segment, the same for every lead.

    Each lead votes with the time of its largest |deflection|, weighted by that
    amplitude; the weighted median of the votes is robust to noisy or small leads and,
    unlike the spatial-energy peak, does not jump between R and S when they are of
    similar size (both give the dominant deflection of most leads).
    """
    mag = np.abs(segment)
    times = np.argmax(mag, axis=1)
    weights = mag[np.arange(len(times)), times]
    order = np.argsort(times, kind="stable")
    cum = np.cumsum(weights[order])
    return int(times[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _refine(x_hp: np.ndarray, peaks: np.ndarray, fs: float) -> np.ndarray:
    """Move each detection (an energy-envelope peak) onto the beat's R fiducial nearby."""
    radius = max(1, round(_REFINE_S * fs))
    starts = np.maximum(peaks - radius, 0)
    refined = [s + _fiducial(x_hp[:, s : p + radius + 1]) for s, p in zip(starts, peaks, strict=True)]
    # Two detections can refine onto the same QRS; keep it once.
    return np.unique(np.asarray(refined, dtype=np.int64))


def detect_r_peaks(signal_12xT: np.ndarray, fs: float) -> np.ndarray:
    """R-peak sample indices of a (12, T) ECG sampled at ``fs`` Hz.

    QRS complexes are found on the band-passed slope energy; each is then placed on
    its R fiducial (amplitude-weighted median over leads of the time of each lead's
    largest deflection, within 50 ms), one instant shared by every lead.
    """
    x = _as_leads(signal_12xT)
    if x.shape[-1] < 2 * round(fs * REFRACTORY_S):
        return np.zeros(0, dtype=np.int64)
    env = _qrs_envelope(x, fs)
    local_max = ndimage.maximum_filter1d(env, max(1, round(_LOCAL_MAX_S * fs)))
    height = np.maximum(_REL_HEIGHT * local_max, _FLOOR_HEIGHT * np.median(local_max))
    peaks, props = signal.find_peaks(env, height=height, distance=max(1, round(REFRACTORY_S * fs)))
    if peaks.size == 0:
        return peaks.astype(np.int64)
    peaks = _drop_t_waves(peaks, props["peak_heights"], fs)
    return _refine(highpass(x, fs), peaks, fs)


def _as_leads(signal_12xT: np.ndarray) -> np.ndarray:
    x = np.asarray(signal_12xT, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != N_LEADS:
        raise MedianBeatError(f"expected a ({N_LEADS}, T) array of leads x samples, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise MedianBeatError("signal holds NaN or infinite values")
    return x


def _cut(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Windows [r-250, r+350) of every beat: (n, 12, 600)."""
    idx = r[:, None] + np.arange(-R_PEAK_SAMPLE, BEAT_SAMPLES - R_PEAK_SAMPLE)[None, :]
    return np.transpose(x[:, idx], (1, 0, 2))


def _inside(r: np.ndarray, n_samples: int) -> np.ndarray:
    return r[(r >= R_PEAK_SAMPLE) & (r + BEAT_SAMPLES - R_PEAK_SAMPLE <= n_samples)]


def _align(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Shift each beat by the lag (+-20 ms) that best matches the median's 12-lead QRS."""
    template = np.median(_cut(x, r), axis=0)[:, R_PEAK_SAMPLE + _QRS[0] : R_PEAK_SAMPLE + _QRS[1]]
    template = template / (np.linalg.norm(template) + 1e-12)
    lags = np.arange(-_ALIGN_MAX_LAG, _ALIGN_MAX_LAG + 1)
    offsets = np.arange(_QRS[0], _QRS[1])
    scores = np.empty((len(r), len(lags)))
    for j, lag in enumerate(lags):
        idx = np.clip(r[:, None] + lag + offsets[None, :], 0, x.shape[-1] - 1)
        seg = np.transpose(x[:, idx], (1, 0, 2))  # (n, 12, qrs)
        norms = np.linalg.norm(seg, axis=(1, 2)) + 1e-12
        scores[:, j] = np.einsum("nls,ls->n", seg, template) / norms
    return r + lags[np.argmax(scores, axis=1)]


def _center(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Shift all fiducials so that the median beat's R fiducial is at ``R_PEAK_SAMPLE``."""
    med = np.median(_cut(x, r), axis=0)
    lo = R_PEAK_SAMPLE - 2 * _ALIGN_MAX_LAG
    peak = lo + _fiducial(med[:, lo : R_PEAK_SAMPLE + 2 * _ALIGN_MAX_LAG + 1])
    return r + (peak - R_PEAK_SAMPLE)


def _consistent(beats: np.ndarray, min_correlation: float) -> np.ndarray:
    """Mask of beats whose 12-lead QRS correlates with the median's at least ``min_correlation``."""
    qrs = beats[:, :, R_PEAK_SAMPLE + _QRS[0] : R_PEAK_SAMPLE + _QRS[1]].reshape(len(beats), -1)
    ref = np.median(qrs, axis=0)
    qrs = qrs - qrs.mean(axis=1, keepdims=True)
    ref = ref - ref.mean()
    corr = qrs @ ref / (np.linalg.norm(qrs, axis=1) * np.linalg.norm(ref) + 1e-12)
    return corr >= min_correlation


def _remove_isoelectric(beats: np.ndarray) -> np.ndarray:
    """Subtract each beat's per-lead level over the flattest 20 ms before the QRS (PR segment)."""
    med = np.median(beats, axis=0)
    lo, hi = R_PEAK_SAMPLE + _ISO_SEARCH[0], R_PEAK_SAMPLE + _ISO_SEARCH[1]
    slope = np.abs(np.diff(med[:, lo:hi], axis=-1)).sum(axis=0)
    # Mean slope over every 20 ms window; the flattest one is the isoelectric segment.
    flatness = np.convolve(slope, np.ones(_ISO_WIDTH), mode="valid")
    start = lo + int(np.argmin(flatness))
    level = beats[:, :, start : start + _ISO_WIDTH].mean(axis=-1, keepdims=True)
    return beats - level


def median_beat(
    signal_12xT: np.ndarray,
    fs: float,
    min_beats: int = 3,
    min_correlation: float = MIN_BEAT_CORRELATION,
) -> np.ndarray:
    """The (12, 600) float32 median beat (mV, R peak at sample 250, 500 Hz) of a rhythm ECG.

    ``signal_12xT`` holds the 12 leads in ``schema.LEADS`` order, in millivolts, at
    ``fs`` Hz. Raises :class:`MedianBeatError` when the signal is malformed (see
    :func:`check_sampling_rate`, :func:`check_leads`) or yields fewer than ``min_beats``
    usable, mutually consistent beats.
    """
    if isinstance(min_beats, bool) or not isinstance(min_beats, (int, np.integer)) or min_beats < 1:
        raise MedianBeatError(f"min_beats must be a whole number of at least 1, got {min_beats!r}")
    check_sampling_rate(fs)
    x = _as_leads(signal_12xT)
    seconds = x.shape[-1] / fs
    if seconds * SAMPLING_RATE_HZ < BEAT_SAMPLES:  # checked before resampling, which would cost time
        raise MedianBeatError(
            f"too few beats: the record is {seconds:.2f} s long, "
            f"shorter than one {BEAT_SAMPLES / SAMPLING_RATE_HZ:.1f} s beat window"
        )
    check_leads(x, fs)
    x = resample(x, fs)
    n = x.shape[-1]
    if n < BEAT_SAMPLES:
        raise MedianBeatError(
            f"too few beats: the record is {n / SAMPLING_RATE_HZ:.2f} s long, "
            f"shorter than one {BEAT_SAMPLES / SAMPLING_RATE_HZ:.1f} s beat window"
        )
    detected = detect_r_peaks(x, SAMPLING_RATE_HZ)
    x_hp = highpass(x, SAMPLING_RATE_HZ)
    r = _inside(detected, n)
    _require(len(r), min_beats, f"{len(r)} complete beat window(s) from {len(detected)} detected R peak(s)")
    r = _inside(_align(x_hp, r), n)
    _require(len(r), min_beats, f"{len(r)} complete beat window(s) after alignment")
    r = _inside(_center(x_hp, r), n)
    _require(len(r), min_beats, f"{len(r)} complete beat window(s) after centring")
    beats = _cut(x_hp, r)
    keep = _consistent(beats, min_correlation)
    _require(
        int(keep.sum()),
        min_beats,
        f"only {int(keep.sum())} of {len(r)} beats correlate >= {min_correlation} with the median beat",
    )
    beats = _remove_isoelectric(beats[keep])
    return np.median(beats, axis=0).astype(np.float32)


def _require(count: int, min_beats: int, detail: str) -> None:
    if count < min_beats:
        raise MedianBeatError(f"too few beats: {detail}, need at least {min_beats}")
