"""Synthetic 12-lead median beats with ground-truth feature masks (NumPy only).

Physics
-------
The heart is a 3-D dipole ``d(t)`` (axes: x patient's left, y inferior, z anterior),
a sum of Gaussian waves, each with a centre time, a width and a 3-D vector
(direction x amplitude): two atrial P components, six QRS slots (septal q, R, S and
the notch / R' / slurred S of the bundle branch blocks; unused slots are silent),
three ST components (a plateau from the J point) and an asymmetric T (two
Gaussians). QT follows Bazett (QTc 380-440 ms) and the T width grows with RR. The
beats before and after the median beat are the same waves shifted by -RR and +RR
(+-2 RR too): at high rates the previous T and the next P/QRS fall inside the 1.2 s
window. In atrial fibrillation the RR varies, and the median of beats whose
neighbours sit at jittered distances is a smeared neighbour: a Gaussian convolved
with a Gaussian RR jitter ``tau`` is a Gaussian of width ``sqrt(sigma^2 + tau^2)``
with the same area, so the smearing is exact and costs nothing.

The nine electrode potentials (RA, LA, LL, V1..V6) are ``E @ d(t)``, with ``E`` (9 x
3) the lead-field vectors of a patient: ideal Einthoven-triangle limb vectors and
precordial vectors around the chest, jittered (electrode placement), rotated
(electrical axis: +-30 degrees frontal, +-15 transverse, +-10 sagittal) and scaled
(body habitus). Noise is added per electrode: baseline wander (two sinusoids below
0.7 Hz), band-limited 20-100 Hz muscle noise (windows of a noise bank drawn per call),
in 30 % of patients 3-10 Hz tremor / motion residue (about 0.004-0.02 mV) and 50 or 60
Hz mains hum with random phase; levels are drawn per patient, independently of the
labels. The 12 leads are then the fixed linear map of the electrodes
(:func:`leads_from_electrodes`), so I + III = II, aVR + aVL + aVF = 0 and aVR = -(I +
II) / 2 hold to float32 rounding, noise included. The R peak of a normal QRS is at
``R_PEAK_SAMPLE``.

Classes and label prior
-----------------------
Exactly one rhythm: SR 0.45 (60-100 bpm), STach 0.20 (100-150), SBrad 0.20 (40-60),
AF 0.15 (mean 50-140 bpm, RR coefficient of variation 0.08-0.25, no P wave). IAVB with
probability 0.17 among sinus rhythms only. Bundle branch block: none 0.70, LBBB 0.13,
RBBB 0.17. LVH with probability 0.17 and STT with probability 0.22, both never with
LBBB (secondary ST-T changes and voltage make both undiagnosable there). Expected
prevalences: SR .45, STach .20, SBrad .20, AF .15, IAVB .145, LBBB .13, RBBB .17,
LVH .15, STT .19; SR alone ("normal") about .17.

The classes are not separated by gaps between parameter ranges (issue #10): a label
follows a clinical cut through a continuous quantity, and draws crowd towards the cut,
so near-cut beats are genuinely ambiguous, as they are for a cardiologist:

- Rate: the label follows the record's mean rate (cuts at 60 and 100 bpm; STach and
  SBrad crowd towards the cut); the median beat's RR differs from the mean's by sinus
  arrhythmia (SD 2.5 %), so a beat labelled SR may look like 101 bpm.
- PR: 120-200 ms without IAVB, 200-300 ms (crowding towards 200) with it.
- QRS: normal 80-105 ms; complete LBBB / RBBB 120-170 / 120-160 ms crowding towards the
  120 ms cut; 8 % / 15 % of the beats without a block carry an unlabelled incomplete
  left / right block (the same morphology, QRS 100-120 ms, a weaker R' and secondary
  ST-T: block gain 0.45-0.95 against 0.6-1.15).
- LVH: R x1.1-1.6 plus an extra leftward-posterior force of 0.1-0.45 mV, S x1.15-1.7,
  QRS 0-12 ms wider, strain in a third; normal R amplitudes span 0.9-1.8 and body
  habitus scales all voltages by 0.75-1.35, so voltages overlap.
- STT: ST shift 0.04-0.25 mV and T inversion from 0.04 mV up, crowding towards small
  values, in an inferior, lateral, anterior or anteroseptal territory; every patient
  also has a non-specific ST shift of up to 0.04 mV.
- AF: f-waves (4-9 Hz, about 0.06-0.16 mV in a single beat, strongest in V1 and II)
  are not phase-locked to the QRS: each beat of the 10 s record sees them at a random
  phase, and the median over the record's beats leaves only a residual (about a third
  of a single beat's amplitude). What remains is the absent P wave and, at higher
  rates, the smeared neighbours; 10 % of patients have a low, flat P wave (15-50 % of
  the usual amplitude), so their sinus rhythm borders on AF.

``label_noise`` (default 0) flips each stored (beat, class) label independently with
that probability after rendering: signals and masks keep following the true classes,
so a noisy dataset can carry a mask for a class its label denies (and none for one it
claims), and the one-rhythm rule may not hold in its labels. The probability is in
``meta.json``.

Ground-truth masks
------------------
``masks[i, lead, t]`` has bit ``c`` set where class ``c``'s feature lies. For each
class present in a beat, the noise-free beat is rendered a second time with
that class's modification undone and every other random draw of the patient
kept (the counterfactual):

- SR: P waves removed;  STach / SBrad: rate set to 75 bpm (QT, T width and the
  neighbouring beats follow);  AF: sinus rhythm at the same mean rate, with the
  patient's P wave, no f-waves, unsmeared neighbours;  IAVB: a typical PR of 160 ms
  (the P wave's displacement);  LBBB: normal QRS and ST-T;  RBBB: the terminal R' and
  slurred S removed, the rest of the block kept, so the mask is the terminal QRS (V1,
  V2, V6, I);  LVH: normal voltage, no strain;  STT: normal ST-T.

With ``delta`` the 12-lead difference (full minus counterfactual, mV), the bit
is set where ``|delta| > max(MASK_FLOOR_MV, MASK_REL * max |delta|)`` (0.01 mV,
25 %), the maximum taken over all leads and samples of that beat: the mask keeps the
leads and samples where the feature is strong, and a lead whose difference never
reaches a quarter of the beat's strongest change gets no bits. Gaps of at most
``MASK_MAX_GAP`` samples (20 ms) inside a lead are then filled, because the difference
of a moved wave crosses zero inside the feature. Neighbouring beats inside the window
carry the same features, so their waves are marked too (e.g. the next beat's P for SR
at higher rates, the previous T for STT). Absent classes never get bits. Mean mask
areas (share of the 12 x 600 map, beats with the class, 2000 beats): SR .075,
STach .061, SBrad .098, AF .082, IAVB .142, LBBB .104, RBBB .032, LVH .066, STT .106
(generator 1.0, 0.03 mV / 5 % thresholds, no RBBB-specific counterfactual: .10 to .40).
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecgx.core.dataset import DatasetWriter, default_meta
from ecgx.core.errors import InvalidArgument
from ecgx.core.progress import progress_bar
from ecgx.core.schema import (
    BEAT_SAMPLES,
    CLASS_KEYS,
    N_CLASSES,
    N_LEADS,
    R_PEAK_SAMPLE,
    SAMPLING_RATE_HZ,
)

log = logging.getLogger(__name__)

GENERATOR_VERSION = "dipole-2.0"

MASK_FLOOR_MV = 0.01
MASK_REL = 0.25
MASK_MAX_GAP = 10  # samples (20 ms): gaps this short inside a lead's mask are filled

_F32 = np.float32
_T = ((np.arange(BEAT_SAMPLES) - R_PEAK_SAMPLE) / SAMPLING_RATE_HZ).astype(_F32)
_T_FIRST, _T_LAST = float(_T[0]), float(_T[-1])
_CUTOFF_SIGMAS = 5.0  # a Gaussian is below 4e-6 of its peak beyond this: not rendered
_BLOCK = 512  # beats rendered at a time: keeps the working set in cache

_SR, _STACH, _SBRAD, _AF, _IAVB, _LBBB, _RBBB, _LVH, _STT = (
    CLASS_KEYS.index(k) for k in ("SR", "STach", "SBrad", "AF", "IAVB", "LBBB", "RBBB", "LVH", "STT")
)
_RHYTHMS = (_SR, _STACH, _SBRAD, _AF)
_NORMAL_RR_S = 0.8  # 75 bpm: the rate of the STach / SBrad counterfactual
_PR_CUT_S = 0.2  # first-degree AV block: PR above 200 ms
_TYPICAL_PR_S = 0.16  # the PR of the first-degree AV block counterfactual
_QRS_CUT_S = 0.12  # complete bundle branch block: QRS of 120 ms or more
_FLAT_P_SHARE = 0.1  # patients whose P wave is 15-50 % of the usual
_SINUS_ARRHYTHMIA = 0.025  # SD of log(median RR / mean RR) in sinus rhythm
_AF_RECORD_S = 10.0  # the median beat of AF is the median of the beats of a 10 s record
_AF_MAX_BEATS = int(np.ceil(_AF_RECORD_S * 140 / 60))

# Heart-rate ranges (bpm) per rhythm, in _RHYTHMS order, and the skew of the draw: the rate
# is lo + (hi - lo) * u ** power (u uniform), or hi - (hi - lo) * u ** power for SBrad, so
# that tachycardia and bradycardia crowd towards their 100 / 60 bpm cuts, as in real data.
_HR_LO = np.array([60.0, 100.0, 40.0, 50.0])
_HR_HI = np.array([100.0, 150.0, 60.0, 140.0])
_HR_POWER = np.array([1.0, 1.8, 1.8, 1.0])
_HR_FROM_HI = np.array([False, False, True, False])
for _a in (_T, _HR_LO, _HR_HI, _HR_POWER, _HR_FROM_HI):
    _a.setflags(write=False)  # module constants: never modified


@dataclass(frozen=True)
class LabelPrior:
    """How labels are drawn (see the module docstring); recorded in ``meta.json``."""

    rhythm: tuple[float, float, float, float] = (0.45, 0.20, 0.20, 0.15)  # SR, STach, SBrad, AF
    iavb_given_sinus: float = 0.17
    bbb: tuple[float, float, float] = (0.70, 0.13, 0.17)  # none, LBBB, RBBB
    lvh_given_no_lbbb: float = 0.17
    stt_given_no_lbbb: float = 0.22
    # Not labels: among beats without a (complete) block, the share with an incomplete
    # left / right block (the morphology with a QRS of 100-120 ms, labelled neither).
    incomplete_bbb_given_none: tuple[float, float] = (0.08, 0.15)

    def as_dict(self) -> dict[str, object]:
        return {
            "rhythm": dict(zip(("SR", "STach", "SBrad", "AF"), self.rhythm, strict=True)),
            "IAVB_given_sinus": self.iavb_given_sinus,
            "bundle_branch_block": dict(zip(("none", "LBBB", "RBBB"), self.bbb, strict=True)),
            "LVH_given_no_LBBB": self.lvh_given_no_lbbb,
            "STT_given_no_LBBB": self.stt_given_no_lbbb,
            "incomplete_block_given_no_BBB (unlabelled)": dict(
                zip(("LBBB-like", "RBBB-like"), self.incomplete_bbb_given_none, strict=True)
            ),
            "cuts": {"IAVB_PR_ms": 1000 * _PR_CUT_S, "BBB_QRS_ms": 1000 * _QRS_CUT_S},
            "heart_rate_bpm": {
                k: [float(lo), float(hi)]
                for k, lo, hi in zip(("SR", "STach", "SBrad", "AF"), _HR_LO, _HR_HI, strict=True)
            },
        }


LABEL_PRIOR = LabelPrior()


@dataclass
class SynthBatch:
    """A batch of synthetic beats."""

    signals: np.ndarray  # (n, 12, 600) float32 mV
    labels: np.ndarray  # (n, 9) uint8
    masks: np.ndarray  # (n, 12, 600) uint16, bit c = class c's feature


# --------------------------------------------------------------------------- leads


def leads_from_electrodes(el: np.ndarray) -> np.ndarray:
    """The 12 standard leads from the 9 electrode potentials (..., 9, T) -> (..., 12, T).

    Electrode order RA, LA, LL, V1..V6. The precordial leads are referred to
    Wilson's central terminal (RA + LA + LL) / 3.
    """
    ra, la, ll = el[..., 0, :], el[..., 1, :], el[..., 2, :]
    out = np.empty((*el.shape[:-2], N_LEADS, el.shape[-1]), el.dtype)
    out[..., 0, :] = la - ra
    out[..., 1, :] = ll - ra
    out[..., 2, :] = ll - la
    out[..., 3, :] = ra - 0.5 * (la + ll)
    out[..., 4, :] = la - 0.5 * (ra + ll)
    out[..., 5, :] = ll - 0.5 * (ra + la)
    wct = (ra + la + ll) * _F32(1.0 / 3.0)
    out[..., 6:, :] = el[..., 3:, :] - wct[..., None, :]
    return out


# ----------------------------------------------------------------- random draws


def _unit(phi_deg: float, psi_deg: float) -> np.ndarray:
    """Unit vector at frontal angle phi (0 = lead I, +90 = aVF) and anterior elevation psi."""
    phi, psi = np.radians(phi_deg), np.radians(psi_deg)
    return np.array([np.cos(phi) * np.cos(psi), np.sin(phi) * np.cos(psi), np.sin(psi)])


def _vectors(
    rng: np.random.Generator, n: int, phi: float, psi: float, lo: float, hi: float, spread: float = 0.15
) -> np.ndarray:
    """(n, 3) wave vectors around one direction, amplitude uniform in [lo, hi]."""
    v = _unit(phi, psi) + rng.normal(0.0, spread, (n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return (v * rng.uniform(lo, hi, (n, 1))).astype(_F32)


def _u(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, n).astype(_F32)


def _draw_labels(n: int, rng: np.random.Generator, prior: LabelPrior = LABEL_PRIOR) -> np.ndarray:
    labels = np.zeros((n, N_CLASSES), np.uint8)
    rhythm = np.asarray(_RHYTHMS)[rng.choice(4, size=n, p=prior.rhythm)]
    labels[np.arange(n), rhythm] = 1
    sinus = rhythm != _AF
    labels[:, _IAVB] = sinus & (rng.random(n) < prior.iavb_given_sinus)
    bbb = rng.choice(3, size=n, p=prior.bbb)
    labels[:, _LBBB] = bbb == 1
    labels[:, _RBBB] = bbb == 2
    labels[:, _LVH] = (bbb != 1) & (rng.random(n) < prior.lvh_given_no_lbbb)
    labels[:, _STT] = (bbb != 1) & (rng.random(n) < prior.stt_given_no_lbbb)
    return labels


@dataclass(frozen=True)
class _Patient:
    """Every random draw of a batch of patients except noise, one row per beat.

    Class-specific parameters are drawn for every beat, so a counterfactual can
    switch a class on or off without touching the rest of the patient.
    """

    rr: np.ndarray  # s, from the rhythm's rate range
    af_cv: np.ndarray  # RR coefficient of variation if in AF
    pr_normal: np.ndarray  # s, P onset to QRS onset
    pr_long: np.ndarray  # s, first-degree AV block
    qrs_n: np.ndarray  # s, normal QRS duration
    qrs_l: np.ndarray  # s, LBBB QRS duration (100-120 ms if incomplete)
    qrs_r: np.ndarray  # s, RBBB QRS duration (100-120 ms if incomplete)
    inc_mode: np.ndarray  # QRS mode without a labelled block: 0 normal, 1 / 2 incomplete LBBB / RBBB
    rp_sigma: np.ndarray  # s, width of RBBB's R'
    lvh_widen: np.ndarray  # s, extra QRS duration in LVH
    lvh_gain_r: np.ndarray
    lvh_gain_s: np.ndarray
    lvh_r: np.ndarray  # (n, 3) extra leftward-posterior R force of the hypertrophied wall
    qtc: np.ndarray  # s, Bazett-corrected QT
    t_sigma: np.ndarray  # s, T width at 75 bpm
    p_sigma: np.ndarray  # s
    p_gap: np.ndarray  # s, left- after right-atrial P component
    p_ra: np.ndarray  # (n, 3) wave vectors from here on
    p_la: np.ndarray
    q: np.ndarray
    r: np.ndarray
    s: np.ndarray
    t: np.ndarray
    lb_init: np.ndarray
    lb_r1: np.ndarray
    lb_r2: np.ndarray
    lb_t: np.ndarray
    lb_st: np.ndarray
    rb_rp: np.ndarray
    rb_slur: np.ndarray
    rb_t: np.ndarray
    rb_st: np.ndarray
    strain_t: np.ndarray  # zero for LVH without strain
    strain_st: np.ndarray
    st_base: np.ndarray  # (n, 3) small non-specific ST shift every patient has
    stt_t: np.ndarray
    stt_st: np.ndarray
    f_u1: np.ndarray  # f-wave directions x amplitudes
    f_u2: np.ndarray
    f_freq: np.ndarray  # (n, 3) Hz
    f_phase: np.ndarray  # (n, _AF_MAX_BEATS, 3): a phase per beat of the record
    f_weight: np.ndarray  # (n, 3)
    lead_field: np.ndarray  # (n, 9, 3) electrode lead-field vectors, rotated and scaled

    def take(self, rows: np.ndarray | slice) -> _Patient:
        return _Patient(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


def _skewed(rng: np.random.Generator, n: int, near: float, far: float, power: float) -> np.ndarray:
    """Draws in [near, far] (either order) crowding towards ``near`` for power > 1."""
    return (near + (far - near) * rng.random(n) ** power).astype(_F32)


def _median_rr(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """RR (s) of the median beat: the label follows the record's mean rate, drawn in the
    rhythm's range; in sinus rhythm the median RR differs from the mean's by sinus arrhythmia
    (about 2.5 %), so beats near the 60 / 100 bpm cuts are genuinely ambiguous."""
    rhythm = np.argmax(labels[:, list(_RHYTHMS)], axis=1)  # position in _RHYTHMS
    frac = rng.random(len(labels)) ** _HR_POWER[rhythm]
    frac = np.where(_HR_FROM_HI[rhythm], 1.0 - frac, frac)
    hr = _HR_LO[rhythm] + (_HR_HI[rhythm] - _HR_LO[rhythm]) * frac
    jitter = np.where(labels[:, _AF] == 1, 0.0, rng.normal(0.0, _SINUS_ARRHYTHMIA, len(labels)))
    return (60.0 / hr * np.exp(jitter)).astype(_F32)


def _qrs_durations(rng: np.random.Generator, labels: np.ndarray, prior: LabelPrior) -> dict[str, np.ndarray]:
    """QRS durations and hidden incomplete blocks: a complete block has QRS >= 120 ms, crowding
    towards the cut; an incomplete one (unlabelled) 100-120 ms with a weaker R' / secondary ST-T."""
    n = len(labels)
    lb, rb = labels[:, _LBBB] == 1, labels[:, _RBBB] == 1
    p_l, p_r = prior.incomplete_bbb_given_none
    u = rng.random(n)
    inc_mode = np.where(lb | rb, 0, np.where(u < p_l, 1, np.where(u < p_l + p_r, 2, 0)))
    incomplete = _u(rng, n, 0.1, _QRS_CUT_S)
    gain = np.where(lb | rb, _u(rng, n, 0.6, 1.15), _u(rng, n, 0.45, 0.95))[:, None]
    return {
        "qrs_n": _u(rng, n, 0.08, 0.105),
        "qrs_l": np.where(lb, _skewed(rng, n, _QRS_CUT_S, 0.17, 2.0), incomplete),
        "qrs_r": np.where(rb, _skewed(rng, n, _QRS_CUT_S, 0.16, 2.0), incomplete),
        "inc_mode": inc_mode.astype(np.int64),
        "gain": gain.astype(_F32),
    }


def _draw_patients(n: int, labels: np.ndarray, rng: np.random.Generator) -> _Patient:
    rr = _median_rr(rng, labels)
    qrs = _qrs_durations(rng, labels, LABEL_PRIOR)
    gain = qrs.pop("gain")  # of the block's R' / slurred S and secondary ST-T
    t = _vectors(rng, n, 45, 20, 0.2, 0.45)
    lateral = _vectors(rng, n, -15, -15, 1.0, 1.0, 0.1)
    strain = rng.random(n) < 0.35
    strain_depth = np.maximum(np.sum(t * lateral, axis=1), 0) * 0.8 + _u(rng, n, 0.05, 0.3)
    stt_t, stt_st = _ischaemia(rng, n, t)
    # A few patients have a low, flat P wave: their sinus rhythm borders on AF's absent P.
    p_gain = np.where(rng.random(n) < _FLAT_P_SHARE, _u(rng, n, 0.15, 0.5), _F32(1))[:, None]
    return _Patient(
        rr=rr,
        af_cv=_u(rng, n, 0.08, 0.25),
        pr_normal=_u(rng, n, 0.12, _PR_CUT_S),
        pr_long=_skewed(rng, n, _PR_CUT_S, 0.3, 1.8),
        **qrs,
        rp_sigma=_u(rng, n, 0.012, 0.02),
        lvh_widen=_u(rng, n, 0.0, 0.012),
        lvh_gain_r=_u(rng, n, 1.1, 1.6),
        lvh_gain_s=_u(rng, n, 1.15, 1.7),
        lvh_r=_vectors(rng, n, -5, -35, 0.1, 0.45),
        qtc=_u(rng, n, 0.38, 0.44),
        t_sigma=_u(rng, n, 0.034, 0.048),
        p_sigma=_u(rng, n, 0.014, 0.024),
        p_gap=_u(rng, n, 0.015, 0.035),
        p_ra=_vectors(rng, n, 80, 30, 0.05, 0.18) * p_gain,
        p_la=_vectors(rng, n, 20, -35, 0.04, 0.14) * p_gain,
        q=_vectors(rng, n, 160, 45, 0.1, 0.3),
        r=_vectors(rng, n, 40, -12, 0.9, 1.8, 0.2),
        s=_vectors(rng, n, -100, -50, 0.25, 0.6),
        t=t,
        lb_init=_vectors(rng, n, 10, 5, 0.15, 0.3),
        lb_r1=_vectors(rng, n, 20, -35, 1.0, 1.8),
        lb_r2=_vectors(rng, n, -5, -55, 1.0, 1.8),
        lb_t=_vectors(rng, n, -170, 45, 0.4, 0.7) * gain,
        lb_st=_vectors(rng, n, -170, 45, 0.1, 0.2) * gain,
        rb_rp=_vectors(rng, n, -160, 55, 0.6, 1.2) * gain,
        rb_slur=_vectors(rng, n, 180, 0, 0.15, 0.3) * gain,
        rb_t=_vectors(rng, n, 20, -55, 0.2, 0.4) * gain,
        rb_st=_vectors(rng, n, 20, -55, 0.05, 0.12) * gain,
        strain_t=(-lateral * (strain_depth * strain)[:, None]).astype(_F32),
        strain_st=(-lateral * (_u(rng, n, 0.04, 0.15) * strain)[:, None]).astype(_F32),
        st_base=_vectors(rng, n, 0, 0, 0.0, 0.04, 1.0),
        stt_t=stt_t,
        stt_st=stt_st,
        f_u1=_vectors(rng, n, 100, 50, 0.06, 0.16),
        f_u2=_vectors(rng, n, 40, -20, 0.02, 0.06),
        f_freq=(rng.uniform(4.0, 9.0, (n, 1)) * rng.uniform(0.85, 1.15, (n, 3))).astype(_F32),
        f_phase=rng.uniform(0, 2 * np.pi, (n, _AF_MAX_BEATS, 3)).astype(_F32),
        f_weight=np.column_stack([np.ones(n), rng.uniform(0.3, 0.7, n), rng.uniform(0.2, 0.5, n)]).astype(
            _F32
        ),
        lead_field=_lead_fields(n, rng),
    )


# Ischaemic territories: the direction the injury current points to (ST elevation there).
_TERRITORIES = np.stack(
    [_unit(90, 0), _unit(-15, -15), _unit(0, 70), _unit(180, 85)]
)  # inf, lat, ant, antsep
_TERRITORIES.setflags(write=False)


def _ischaemia(rng: np.random.Generator, n: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ST and T vectors of an ischaemic ST-T change (added to the normal ones when STT is on).

    Modes: ST depression, ST elevation, T inversion, ST depression with T inversion.
    """
    u = _TERRITORIES[rng.integers(0, len(_TERRITORIES), n)] + rng.normal(0, 0.12, (n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    mode = rng.integers(0, 4, n)
    st_sign = np.select([mode == 1, mode == 2], [1.0, 0.0], -1.0)
    # Amplitudes crowd towards small values: a slight ST shift or a flat T is a borderline case.
    st = u * (st_sign * _skewed(rng, n, 0.04, 0.25, 1.5))[:, None]
    flip = np.maximum(np.sum(t * u, axis=1), 0) * rng.uniform(0.5, 1.0, n) + _skewed(rng, n, 0.04, 0.35, 1.5)
    invert = (mode >= 2) * flip
    return (-u * invert[:, None]).astype(_F32), st.astype(_F32)


# Ideal lead fields, electrode order RA, LA, LL, V1..V6: the limb electrodes sit on
# the Einthoven triangle (lead I along x, II at 60 degrees), the chest electrodes
# around the transverse plane, nearer the heart (gain > 1) and slightly superior.
_LIMB_ANGLES = (-150.0, -30.0, 90.0)
_CHEST_ANGLES = (115.0, 90.0, 75.0, 55.0, 30.0, 5.0)  # from x (left) towards z (anterior)
_CHEST_GAINS = (1.3, 2.0, 2.0, 2.0, 1.9, 1.5)


def _lead_fields(n: int, rng: np.random.Generator) -> np.ndarray:
    a = np.radians(_LIMB_ANGLES)
    limb = np.stack([np.cos(a), np.sin(a), np.zeros(3)], axis=1) / np.sqrt(3.0)
    limb = limb + rng.normal(0, 0.02, (n, 3, 3))
    theta = np.radians(_CHEST_ANGLES) + np.radians(4.0) * rng.normal(size=(n, 6))
    gain = np.asarray(_CHEST_GAINS) * np.exp(rng.normal(0, 0.07, (n, 6)))
    elev = -0.1 + rng.normal(0, 0.04, (n, 6))
    chest = np.stack([np.cos(theta), elev, np.sin(theta)], axis=2) * gain[:, :, None]
    fields = np.concatenate([limb, chest], axis=1)
    scale = np.clip(np.exp(rng.normal(0, 0.12, n)), 0.75, 1.35)
    return (fields @ _rotations(n, rng) * scale[:, None, None]).astype(_F32)


def _rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Per-patient heart orientation: frontal (about z), transverse (about y), sagittal (about x)."""
    fr, tr, sa = (np.radians(rng.uniform(-lim, lim, n)) for lim in (30.0, 15.0, 10.0))
    z, o = np.zeros(n), np.ones(n)
    rz = np.stack([np.cos(fr), -np.sin(fr), z, np.sin(fr), np.cos(fr), z, z, z, o], 1).reshape(n, 3, 3)
    ry = np.stack([np.cos(tr), z, -np.sin(tr), z, o, z, np.sin(tr), z, np.cos(tr)], 1).reshape(n, 3, 3)
    rx = np.stack([o, z, z, z, np.cos(sa), -np.sin(sa), z, np.sin(sa), np.cos(sa)], 1).reshape(n, 3, 3)
    return rz @ ry @ rx


# ----------------------------------------------------------------------- render


@dataclass(frozen=True)
class _Switches:
    """What a rendering shows; a counterfactual is the same patient with other switches."""

    has_p: np.ndarray  # bool
    af: np.ndarray  # bool: f-waves and smeared neighbours
    rr: np.ndarray  # s
    pr: np.ndarray  # s
    qrs_mode: np.ndarray  # 0 normal, 1 LBBB, 2 RBBB (complete or incomplete)
    terminal: np.ndarray  # bool: RBBB's R' and slurred S are drawn (off only in its counterfactual)
    lvh: np.ndarray  # bool
    stt: np.ndarray  # bool

    def take(self, rows: np.ndarray | slice) -> _Switches:
        return _Switches(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


def _switches(labels: np.ndarray, p: _Patient) -> _Switches:
    lab = labels.astype(bool)
    return _Switches(
        has_p=~lab[:, _AF],
        af=lab[:, _AF],
        rr=p.rr,
        pr=np.where(lab[:, _IAVB], p.pr_long, p.pr_normal),
        qrs_mode=np.where(lab[:, _LBBB], 1, np.where(lab[:, _RBBB], 2, p.inc_mode)),
        terminal=np.ones(len(lab), bool),
        lvh=lab[:, _LVH],
        stt=lab[:, _STT],
    )


def _counterfactual(sw: _Switches, p: _Patient, cls: int) -> _Switches:
    """The same beats with class ``cls``'s modification undone (module docstring)."""
    m = len(sw.rr)
    if cls == _SR:
        return dataclasses.replace(sw, has_p=np.zeros(m, bool))
    if cls in (_STACH, _SBRAD):
        return dataclasses.replace(sw, rr=np.full(m, _NORMAL_RR_S, _F32))
    if cls == _AF:
        return dataclasses.replace(sw, af=np.zeros(m, bool), has_p=np.ones(m, bool), pr=p.pr_normal)
    if cls == _IAVB:  # a typical PR, not the patient's draw: that may sit just under the cut
        return dataclasses.replace(sw, pr=np.full(m, _TYPICAL_PR_S, _F32))
    if cls == _RBBB:  # the feature is the terminal R' / slurred S, not the whole changed beat
        return dataclasses.replace(sw, terminal=np.zeros(m, bool))
    if cls == _LBBB:
        return dataclasses.replace(sw, qrs_mode=np.zeros(m, sw.qrs_mode.dtype))
    if cls == _LVH:
        return dataclasses.replace(sw, lvh=np.zeros(m, bool))
    return dataclasses.replace(sw, stt=np.zeros(m, bool))


_Wave = tuple[np.ndarray, np.ndarray, np.ndarray]  # centre (m,) s, width (m,) s, vector (m, 3)


def _select(mode: np.ndarray, options: list[list[_Wave]]) -> list[_Wave]:
    """Per beat, slot by slot, the waves of option ``mode[i]``."""
    out = []
    for slot in zip(*options, strict=True):
        c = np.choose(mode, [w[0] for w in slot])
        s = np.choose(mode, [w[1] for w in slot])
        v = np.choose(mode[:, None], [w[2] for w in slot])
        out.append((c, s, v))
    return out


def _qrs_waves(p: _Patient, sw: _Switches) -> tuple[list[_Wave], np.ndarray]:
    """The six QRS slots and the QRS end (J point), relative to the R peak at t = 0.

    Every mode starts at the normal QRS onset (His activation is unchanged);
    the bundle branch blocks prolong the complex. Slots a mode does not use are silent.
    """
    onset = -0.5 * p.qrs_n
    qn = p.qrs_n + sw.lvh * p.lvh_widen
    g_r = np.where(sw.lvh, p.lvh_gain_r, _F32(1))[:, None]
    g_s = np.where(sw.lvh, p.lvh_gain_s, _F32(1))[:, None]
    r_vec = p.r * g_r + sw.lvh[:, None] * p.lvh_r
    silent = (0 * qn, 0 * qn + _F32(0.01), np.zeros_like(p.q))
    normal = [
        (-0.34 * qn, 0.075 * qn, p.q),  # septal q: left to right, anterior
        (0 * qn, 0.13 * qn, r_vec),  # main R: left, inferior, slightly posterior
        silent,
        (0.34 * qn, 0.1 * qn, p.s * g_s),  # terminal S: posterior, superior
        silent,
        silent,
    ]
    ql = p.qrs_l
    lbbb = [  # septum depolarised right to left (no septal q), then a slow, notched left-ward R
        (onset + 0.1 * ql, 0.06 * ql, p.lb_init),
        (onset + 0.36 * ql, 0.13 * ql, p.lb_r1 * g_r),  # LVH shows in an incomplete block's R too
        (onset + 0.7 * ql, 0.12 * ql, p.lb_r2 * g_r),
        silent,
        silent,
        silent,
    ]
    c_rp = onset + p.qrs_r - 2.0 * p.rp_sigma
    on = sw.terminal[:, None]
    rbbb = [  # normal start, then late right-ventricular R' (rSR' in V1, wide slurred S in I, V6)
        normal[0],
        normal[1],
        silent,
        (0.28 * qn, 0.1 * qn, 0.7 * p.s * g_s),
        (c_rp, p.rp_sigma, p.rb_rp * on),
        (c_rp + 0.004, 1.6 * p.rp_sigma, p.rb_slur * on),
    ]
    mode = sw.qrs_mode
    j_point = np.choose(mode, [0.5 * qn, onset + ql, onset + p.qrs_r]).astype(_F32)
    return _select(mode, [normal, lbbb, rbbb]), j_point


def _beat_waves(p: _Patient, sw: _Switches) -> list[_Wave]:
    """All waves of the median beat itself (P, QRS, ST, T)."""
    lb, rb = sw.qrs_mode == 1, sw.qrs_mode == 2
    qrs, j_point = _qrs_waves(p, sw)
    onset = -0.5 * p.qrs_n
    # P: onset PR before the QRS onset; absent in AF.
    c_ra = onset - sw.pr + 2.0 * p.p_sigma
    has_p = sw.has_p[:, None]
    p_waves = [(c_ra, p.p_sigma, p.p_ra * has_p), (c_ra + p.p_gap, p.p_sigma, p.p_la * has_p)]
    # QT by Bazett from the QRS onset; a wider QRS adds to QT (the JT interval is kept).
    qt = p.qtc * np.sqrt(sw.rr) + (j_point - onset - p.qrs_n)
    sig_t = p.t_sigma * np.sqrt(sw.rr / _NORMAL_RR_S)
    t_apex = onset + qt - 2.2 * sig_t
    strain = sw.lvh[:, None] * p.strain_t
    t_vec = np.where(lb[:, None], p.lb_t, p.t + rb[:, None] * p.rb_t + strain) + sw.stt[:, None] * p.stt_t
    st_vec = (
        p.st_base
        + lb[:, None] * p.lb_st
        + rb[:, None] * p.rb_st
        + sw.lvh[:, None] * p.strain_st
        + sw.stt[:, None] * p.stt_st
    )
    span = t_apex - j_point
    st_t = [
        # Three overlapping Gaussians make a plateau from the J point to the T wave.
        (j_point + 0.15 * span, 0.12 * span, st_vec),
        (j_point + 0.45 * span, 0.15 * span, st_vec),
        (j_point + 0.75 * span, 0.18 * span, st_vec),
        (t_apex - 0.35 * sig_t, 1.1 * sig_t, 0.75 * t_vec),
        (t_apex + 0.3 * sig_t, 0.7 * sig_t, 0.4 * t_vec),
    ]
    return p_waves + qrs + st_t


def _add_gaussian(d: np.ndarray, c: np.ndarray, s: np.ndarray, v: np.ndarray) -> None:
    """d[i, :, t] += v[i] * exp(-(t - c[i])^2 / (2 s[i]^2)), only where it is not negligible.

    exp is the cost: skip beats whose wave is zero or outside the window, and
    restrict the columns to the span of the beats that remain.
    """
    reach = _CUTOFF_SIGMAS * s
    active = (c + reach > _T_FIRST) & (c - reach < _T_LAST) & np.any(v != 0, axis=1)
    n_active = int(np.count_nonzero(active))
    if n_active == 0:
        return
    lo_t, hi_t = float(np.min((c - reach)[active])), float(np.max((c + reach)[active]))
    lo = max(0, int(np.floor(lo_t * SAMPLING_RATE_HZ)) + R_PEAK_SAMPLE)
    hi = min(BEAT_SAMPLES, int(np.ceil(hi_t * SAMPLING_RATE_HZ)) + R_PEAK_SAMPLE + 1)
    sparse = n_active < 0.6 * len(c)
    if sparse:
        rows = np.flatnonzero(active)
        c, s, v = c[rows], s[rows], v[rows]
    else:
        v = v * active[:, None]
    z = _T[lo:hi] - c[:, None]
    z *= (1.0 / s)[:, None]
    z *= z
    z *= _F32(-0.5)
    np.exp(z, out=z)
    contrib = v[:, :, None] * z[:, None, :]
    if sparse:
        d[rows, :, lo:hi] += contrib
    else:
        d[:, :, lo:hi] += contrib


_NEIGHBOURS = (-2, -1, 1, 2)


def _render(p: _Patient, sw: _Switches, f_dipole: np.ndarray) -> np.ndarray:
    """Noise-free dipole (m, 3, 600) of the median beat and its neighbours.

    ``f_dipole`` is the median beat's residual f-wave dipole (:func:`_f_waves`), added where
    ``sw.af``: it depends on the patient only, so it is computed once per block.
    """
    d = np.zeros((len(sw.rr), 3, BEAT_SAMPLES), _F32)
    waves = _beat_waves(p, sw)
    # AF: neighbours k beats away sit at k*RR +- sqrt(|k|) * cv * RR; their median is smeared.
    tau = np.where(sw.af, p.af_cv * sw.rr, _F32(0))
    for c, s, v in waves:
        _add_gaussian(d, c, s, v)
        for k in _NEIGHBOURS:
            s_k = np.sqrt(s * s + abs(k) * tau * tau)
            _add_gaussian(d, c + k * sw.rr, s_k, v * (s / s_k)[:, None])
    d[sw.af] += f_dipole[sw.af]
    return d


def _f_waves(p: _Patient, af: np.ndarray) -> np.ndarray:
    """(m, 3, 600) f-wave dipole of the median beat, zero where ``af`` is off.

    f-waves are not phase-locked to the QRS: every beat of the 10 s record sees them at
    its own random phase, and the median over the record's beats (about 8-23 of them)
    leaves a small residual. The median is taken per dipole component sum, an
    approximation of the per-lead median that keeps the cost at one pass.
    """
    out = np.zeros((len(af), 3, BEAT_SAMPLES), _F32)
    rows = np.flatnonzero(af)
    if rows.size == 0:
        return out
    beats = np.clip(np.rint(_AF_RECORD_S / p.rr[rows]), 3, _AF_MAX_BEATS).astype(int)
    w = p.f_weight[rows] / p.f_weight[rows].sum(axis=1, keepdims=True)
    for nb in np.unique(beats):
        sel = beats == nb
        idx = rows[sel]
        ph = 2 * np.pi * p.f_freq[idx, None, :, None] * _T + p.f_phase[idx, :nb, :, None]  # (g, nb, 3, 600)
        s1 = np.median(np.einsum("gk,gbkt->gbt", w[sel], np.sin(ph)), axis=1)
        s2 = np.median(np.einsum("gk,gbkt->gbt", w[sel][:, ::-1], np.cos(ph)), axis=1)
        out[idx] = p.f_u1[idx, :, None] * s1[:, None, :] + p.f_u2[idx, :, None] * s2[:, None, :]
    return out


# ------------------------------------------------------------------------ noise


@dataclass(frozen=True)
class _Noise:
    """Per-beat noise draws: small, so they are drawn for the whole batch up front."""

    wander_f: np.ndarray  # (n, 2) Hz
    wander_ph: np.ndarray  # (n, 2)
    hum_f: np.ndarray  # (n,) 50 or 60 Hz
    hum_ph: np.ndarray  # (n,)
    weights: np.ndarray  # (n, 9, 4) electrode weights of [wander1, wander2, hum cos, hum sin]
    emg_row: np.ndarray  # (n, 9) bank row
    emg_off: np.ndarray  # (n, 9) bank offset
    emg_gain: np.ndarray  # (n, 9) mV RMS
    tremor_row: np.ndarray  # (n, 9) row of the tremor bank
    tremor_off: np.ndarray  # (n, 9)
    tremor_gain: np.ndarray  # (n, 9) mV RMS, zero for most patients
    bank: np.ndarray  # (rows, length) unit-RMS 20-100 Hz noise
    tremor_bank: np.ndarray  # (rows, length) unit-RMS 3-10 Hz noise

    def take(self, rows: slice) -> _Noise:
        return dataclasses.replace(
            self,
            **{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self) if "bank" not in f.name},
        )


_BANK_ROWS, _BANK_LEN = 32, 4096
_TREMOR_SHARE = 0.3  # patients with residual tremor / motion noise in the f-wave band


def _noise_bank(rng: np.random.Generator, rows: int, lo_hz: float, hi_hz: float) -> np.ndarray:
    """Unit-RMS band-limited white noise; each electrode reads a random window of a row."""
    shape = (rows, _BANK_LEN // 2 + 1)
    spec = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    freqs = np.fft.rfftfreq(_BANK_LEN, 1.0 / SAMPLING_RATE_HZ)
    spec[:, (freqs < lo_hz) | (freqs > hi_hz)] = 0
    bank = np.fft.irfft(spec, _BANK_LEN, axis=1)
    return (bank / bank.std(axis=1, keepdims=True)).astype(_F32)


def _draw_noise(n: int, rng: np.random.Generator) -> _Noise:
    bank = _noise_bank(rng, _BANK_ROWS, 20.0, 100.0)  # muscle noise
    # Tremor and motion leave 3-10 Hz residuals in some median beats, in AF's f-wave band:
    # without them, any energy there would give AF away.
    tremor_bank = _noise_bank(rng, _BANK_ROWS // 4, 3.0, 10.0)
    tremor = (rng.random(n) < _TREMOR_SHARE) * rng.uniform(0.004, 0.02, n)
    wander = rng.uniform(0.0, 0.05, (n, 1, 1)) * rng.normal(size=(n, 9, 2))
    hum = rng.uniform(0.0, 0.015, (n, 1, 1)) * rng.uniform(0.3, 1.0, (n, 9, 1)) * _unit_pairs(rng, (n, 9))
    return _Noise(
        wander_f=rng.uniform(0.05, 0.7, (n, 2)).astype(_F32),
        wander_ph=rng.uniform(0, 2 * np.pi, (n, 2)).astype(_F32),
        hum_f=rng.choice(np.array([50.0, 60.0], _F32), n),
        hum_ph=rng.uniform(0, 2 * np.pi, n).astype(_F32),
        weights=np.concatenate([wander, hum], axis=2).astype(_F32),
        emg_row=rng.integers(0, _BANK_ROWS, (n, 9)),
        emg_off=rng.integers(0, _BANK_LEN - BEAT_SAMPLES + 1, (n, 9)),
        emg_gain=(rng.uniform(0.002, 0.012, (n, 1)) * rng.uniform(0.5, 1.5, (n, 9))).astype(_F32),
        tremor_row=rng.integers(0, len(tremor_bank), (n, 9)),
        tremor_off=rng.integers(0, _BANK_LEN - BEAT_SAMPLES + 1, (n, 9)),
        tremor_gain=(tremor[:, None] * rng.uniform(0.5, 1.5, (n, 9))).astype(_F32),
        bank=bank,
        tremor_bank=tremor_bank,
    )


def _unit_pairs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """(cos, sin) of a phase near 0: each electrode sees the hum with a slightly different phase."""
    a = rng.normal(0, 0.3, shape)
    return np.stack([np.cos(a), np.sin(a)], axis=-1)


def _electrode_noise(nz: _Noise) -> np.ndarray:
    """(m, 9, 600) mV: baseline wander + mains hum + muscle and tremor noise at each electrode."""
    m = len(nz.hum_f)
    basis = np.empty((m, 4, BEAT_SAMPLES), _F32)
    basis[:, :2] = np.sin(2 * np.pi * nz.wander_f[:, :, None] * _T + nz.wander_ph[:, :, None])
    hum = 2 * np.pi * nz.hum_f[:, None] * _T + nz.hum_ph[:, None]
    basis[:, 2], basis[:, 3] = np.cos(hum), np.sin(hum)
    noise = nz.weights @ basis
    windows = np.lib.stride_tricks.sliding_window_view(nz.bank, BEAT_SAMPLES, axis=1)
    noise += windows[nz.emg_row, nz.emg_off] * nz.emg_gain[:, :, None]
    shaking = np.flatnonzero(nz.tremor_gain.any(axis=1))
    windows = np.lib.stride_tricks.sliding_window_view(nz.tremor_bank, BEAT_SAMPLES, axis=1)
    tremor = windows[nz.tremor_row[shaking], nz.tremor_off[shaking]] * nz.tremor_gain[shaking, :, None]
    noise[shaking] += tremor
    return noise


# ------------------------------------------------------------------------ masks


def _masks(d: np.ndarray, p: _Patient, sw: _Switches, labels: np.ndarray, f_dipole: np.ndarray) -> np.ndarray:
    """Class bit-masks from the counterfactual differences (module docstring); ``d`` is the full render."""
    masks = np.zeros((len(labels), N_LEADS, BEAT_SAMPLES), np.uint16)
    for cls in range(N_CLASSES):
        rows = np.flatnonzero(labels[:, cls])
        if rows.size == 0:
            continue
        p_c = p.take(rows)
        sw_c = sw.take(rows)
        delta_d = d[rows] - _render(p_c, _counterfactual(sw_c, p_c, cls), f_dipole[rows])
        delta = np.abs(leads_from_electrodes(p_c.lead_field @ delta_d))
        thr = np.maximum(MASK_FLOOR_MV, MASK_REL * delta.max(axis=(1, 2)))
        bits = _close_gaps(delta > thr[:, None, None], MASK_MAX_GAP)
        masks[rows] |= bits.astype(np.uint16) << np.uint16(cls)
    return masks


def _close_gaps(bits: np.ndarray, max_gap: int) -> np.ndarray:
    """Fill runs of at most ``max_gap`` False samples between True samples along the last axis.

    A difference of two shifted waves crosses zero inside the feature; without
    this the mask of a moved T wave would be cut in two at its apex.
    """
    pos = np.arange(bits.shape[-1], dtype=np.int16)
    far = np.int16(10_000)
    prev = np.maximum.accumulate(np.where(bits, pos, -far), axis=-1)
    nxt = np.minimum.accumulate(np.where(bits, pos, far)[..., ::-1], axis=-1)[..., ::-1]
    return bits | (nxt - prev <= max_gap + 1)


# --------------------------------------------------------------------- public API


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgument(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_label_noise(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 0.5:
        raise InvalidArgument(f"label_noise must be a number in [0, 0.5], got {value!r}")
    return float(value)


def _flip_labels(labels: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each (beat, class) label flipped with probability ``rate``, independently (module docstring)."""
    flips = rng.random(labels.shape) < rate
    return labels ^ flips.astype(np.uint8)


def generate(n: int, rng: np.random.Generator, *, label_noise: float = 0.0) -> SynthBatch:
    """Generate ``n`` labelled median beats with ground-truth masks, reproducibly from ``rng``.

    ``label_noise`` flips each (beat, class) label with that probability after the beats
    are rendered: signals and masks follow the true labels (module docstring). The flips are
    drawn last, so with the same ``rng`` state signals and masks do not depend on it.
    """
    n = _check_count("n", n, 1)
    label_noise = _check_label_noise(label_noise)
    if not isinstance(rng, np.random.Generator):
        raise InvalidArgument(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    labels = _draw_labels(n, rng)
    patients = _draw_patients(n, labels, rng)
    noise = _draw_noise(n, rng)
    signals = np.empty((n, N_LEADS, BEAT_SAMPLES), _F32)
    masks = np.empty((n, N_LEADS, BEAT_SAMPLES), np.uint16)
    for start in range(0, n, _BLOCK):
        sl = slice(start, min(start + _BLOCK, n))
        p = patients.take(sl)
        sw = _switches(labels[sl], p)
        f_dipole = _f_waves(p, sw.af)
        d = _render(p, sw, f_dipole)
        signals[sl] = leads_from_electrodes(p.lead_field @ d + _electrode_noise(noise.take(sl)))
        masks[sl] = _masks(d, p, sw, labels[sl], f_dipole)
    if label_noise > 0:
        labels = _flip_labels(labels, label_noise, rng)
    return SynthBatch(signals=signals, labels=labels, masks=masks)


def synthesize_dataset(
    out: Path | str,
    n: int,
    seed: int,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    chunk_size: int = 1024,
    label_noise: float = 0.0,
) -> Path:
    """Write ``n`` synthetic beats as a dataset folder and return its path.

    Chunk ``k`` is generated from ``SeedSequence([seed, k])``, so memory stays
    bounded for any ``n`` and the same ``(n, seed, chunk_size, label_noise)`` always
    gives byte-identical files. ``label_noise`` (default 0: clean labels) is the
    probability that each stored label is flipped (:func:`generate`); it is recorded
    in ``meta.json``.
    """
    n = _check_count("n", n, 1)
    seed = _check_count("seed", seed, 0)
    chunk_size = _check_count("chunk_size", chunk_size, 1)
    label_noise = _check_label_noise(label_noise)
    meta = default_meta(
        "synthetic",
        generator_version=GENERATOR_VERSION,
        seed=seed,
        chunk_size=chunk_size,
        has_ground_truth=True,
        label_prior=LABEL_PRIOR.as_dict(),
        mask_threshold={"floor_mv": MASK_FLOOR_MV, "relative_to_beat_max": MASK_REL},
        label_noise=label_noise,
    )
    log.info("generating %d synthetic beats (seed %d, generator %s) into %s", n, seed, GENERATOR_VERSION, out)
    writer = DatasetWriter(out, n, meta, overwrite=overwrite)
    with writer, progress_bar(total=n, desc="synth", unit="beat", enabled=show_progress) as bar:
        for k, start in enumerate(range(0, n, chunk_size)):
            rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
            batch = generate(min(chunk_size, n - start), rng, label_noise=label_noise)
            writer.write(batch.signals, batch.labels, batch.masks)
            bar.update(len(batch.labels))
    return writer.close()
