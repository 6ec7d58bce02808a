"""Import WFDB records (PTB-XL, PhysioNet 2021, PTB Diagnostic, ...) as a dataset folder of median beats.

Each record is read with ``wfdb.rdrecord``, its 12 standard leads are picked by
name (case-insensitively, extra channels such as Frank leads ignored), converted to
millivolts, reduced to one median beat (:mod:`training.data.median_beat`) and
labelled from its ``# Dx:`` SNOMED CT codes. A record that cannot be used is
skipped with a logged reason; the import fails only when no record is usable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import wfdb

from ecgx.progress import progress
from training.data.dataset import MAX_ABS_MV, DatasetError, default_meta, write_dataset
from training.data.median_beat import MedianBeatError, median_beat
from training.data.schema import LEADS, N_CLASSES, snomed_to_class

log = logging.getLogger(__name__)

RECORD_SUFFIXES = (".hea", ".mat", ".dat")
# Factor to millivolts for each unit spelling found in WFDB headers (compared lower-cased).
UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "microvolt": 1e-3, "v": 1e3, "nv": 1e-6}
# Short gaps (invalid samples) are interpolated; a lead missing more than this is not trusted.
MAX_MISSING_FRACTION = 0.2
_DX_LINE = re.compile(r"^\s*dx\s*:\s*(.*)$", re.IGNORECASE)
_MAX_LISTED = 10  # names listed in one aggregated warning


class WfdbImportError(ValueError):
    """A WFDB record (or a whole import) cannot be used; the message says why."""


@dataclass
class ImportReport:
    """What :func:`import_wfdb` did: the folder written, records imported and records skipped."""

    out: Path | None
    imported: list[str]
    skipped: list[tuple[str, str]]  # (record, reason)
    unlabelled: list[str] = field(default_factory=list)  # imported records without any Dx code
    unknown_codes: dict[str, list[str]] = field(default_factory=dict)  # record -> ignored Dx codes


def record_base(path: str | Path) -> Path:
    """The record path without extension (``x/HR06000.hea`` and ``x/HR06000`` -> ``x/HR06000``)."""
    p = Path(path)
    return p.with_suffix("") if p.suffix.lower() in RECORD_SUFFIXES else p


def find_records(paths: Iterable[str | Path]) -> list[tuple[str, Path | None]]:
    """Expand files and folders into ``(name, record base)`` pairs; base ``None`` = not found.

    A folder contributes every record whose ``.hea`` it holds, sorted; a record given
    twice is imported once.
    """
    found: list[tuple[str, Path | None]] = []
    seen: set[Path] = set()
    for given in paths:
        p = Path(given)
        bases = sorted(h.with_suffix("") for h in p.glob("*.hea")) if p.is_dir() else [record_base(p)]
        if not p.is_dir() and not _header(bases[0]).is_file():
            found.append((str(given), None))
            continue
        for base in bases:
            if base.resolve() not in seen:
                seen.add(base.resolve())
                found.append((base.name, base))
    return found


def _header(base: Path) -> Path:
    # Not with_suffix: record names may contain dots.
    return base.parent / f"{base.name}.hea"


def read_record(path: str | Path) -> tuple[np.ndarray, float, list[str]]:
    """Read one WFDB record: ``(signal, fs, dx_codes)``.

    ``signal`` is (12, T) float32 millivolts in ``schema.LEADS`` order at the record's
    own sampling rate ``fs``; short runs of invalid samples are linearly interpolated.
    ``dx_codes`` are the SNOMED codes of the header's ``# Dx:`` lines (empty if none).
    Raises :class:`WfdbImportError` for an unreadable record, missing leads, unknown
    units or leads without enough valid samples.
    """
    base = record_base(path)
    if not _header(base).is_file():
        raise WfdbImportError(f"not found: {_header(base)}")
    try:
        rec = wfdb.rdrecord(str(base))
    except Exception as e:  # wfdb raises many types on malformed files; all mean "unreadable"
        raise WfdbImportError(f"unreadable WFDB record: {type(e).__name__}: {e}") from None
    if rec.p_signal is None or rec.fs is None:
        raise WfdbImportError("unreadable WFDB record: no physical signal or sampling rate")
    idx = _lead_indices(rec.sig_name or [])
    units = rec.units or ["mV"] * rec.n_sig
    scale = np.array([_mv_factor(units[i], LEADS[k]) for k, i in enumerate(idx)])
    signal = rec.p_signal[:, idx].T * scale[:, None]
    return _fill_gaps(signal).astype(np.float32), float(rec.fs), _dx_codes(rec.comments or [])


def _lead_indices(names: Sequence[str]) -> list[int]:
    """Channel index of each of the 12 standard leads; the first channel wins on duplicates."""
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(str(name).strip().casefold(), i)
    missing = [lead for lead in LEADS if lead.casefold() not in index]
    if missing:
        present = ", ".join(map(str, names)) or "none"
        raise WfdbImportError(f"missing leads: {', '.join(missing)} (channels present: {present})")
    return [index[lead.casefold()] for lead in LEADS]


def _mv_factor(unit: str | None, lead: str) -> float:
    key = (unit or "mV").strip().casefold()
    if key not in UNIT_TO_MV:
        raise WfdbImportError(f"lead {lead}: unsupported units {unit!r} (expected mV, uV or V)")
    return UNIT_TO_MV[key]


def _fill_gaps(signal: np.ndarray) -> np.ndarray:
    """Interpolate invalid samples (NaN in ``p_signal``) lead by lead, refusing mostly-empty leads."""
    bad = ~np.isfinite(signal)
    if not bad.any():
        return signal
    out = signal.copy()
    t = np.arange(signal.shape[1])
    for k in np.flatnonzero(bad.any(axis=1)):
        missing = bad[k].mean()
        if missing == 1.0:
            raise WfdbImportError(f"lead {LEADS[k]} has no valid samples (all NaN)")
        if missing > MAX_MISSING_FRACTION:
            raise WfdbImportError(f"lead {LEADS[k]} has {missing:.0%} invalid samples")
        out[k, bad[k]] = np.interp(t[bad[k]], t[~bad[k]], signal[k, ~bad[k]])
    return out


def _dx_codes(comments: Sequence[str]) -> list[str]:
    codes: list[str] = []
    for line in comments:
        m = _DX_LINE.match(line)
        if m:
            codes += [c.strip() for c in m.group(1).split(",") if c.strip()]
    return list(dict.fromkeys(codes))  # unique, header order


def labels_from_codes(codes: Iterable[str]) -> tuple[np.ndarray, list[str]]:
    """Multi-hot (9,) uint8 labels of SNOMED ``codes`` and the codes that map to no class."""
    table = snomed_to_class()
    labels = np.zeros(N_CLASSES, dtype=np.uint8)
    unknown = []
    for code in codes:
        if code in table:
            labels[table[code]] = 1
        else:
            unknown.append(code)
    return labels, unknown


def record_median_beat(path: str | Path, min_beats: int = 3) -> tuple[np.ndarray, list[str]]:
    """Median beat (12, 600) float32 mV and Dx codes of one record; raises WfdbImportError."""
    signal, fs, codes = read_record(path)
    try:
        beat = median_beat(signal, fs, min_beats=min_beats)
    except MedianBeatError as e:
        raise WfdbImportError(str(e)) from None
    peak = float(np.abs(beat).max())
    if peak > MAX_ABS_MV:
        # A units mistake (e.g. µV labelled mV) would otherwise fail the whole dataset write.
        raise WfdbImportError(f"implausible amplitude {peak:.1f} mV (wrong units in the header?)")
    return beat, codes


@dataclass
class _Collected:
    """Median beats and provenance gathered record by record."""

    beats: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    unknown: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, base: Path, beat: np.ndarray, codes: list[str]) -> None:
        labels, unknown = labels_from_codes(codes)
        self.beats.append(beat)
        self.labels.append(labels)
        self.names.append(name)
        self.paths.append(str(base))
        if not codes:
            self.unlabelled.append(name)
        if unknown:
            self.unknown[name] = unknown

    def skip(self, name: str, reason: str) -> None:
        log.warning("skipping WFDB record %s: %s", name, reason)
        self.skipped.append((name, reason))


def import_wfdb(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    min_beats: int = 3,
) -> ImportReport:
    """Turn WFDB records into a dataset folder of median beats at ``out``.

    ``paths`` are records (with or without ``.hea``/``.mat``/``.dat``) or folders (every
    record in them). Unusable records are skipped with a WARNING and listed in the
    report; if none is usable, :class:`WfdbImportError` lists the reasons and nothing
    is written. Labels are multi-hot from the ``# Dx:`` codes; the data has no
    ground-truth masks.
    """
    out = Path(out)
    _check_out(out, overwrite)  # fail before minutes of work, not after
    records = find_records(paths)
    got = _Collected()
    for name, base in progress(
        records, total=len(records), desc="import WFDB", unit="rec", enabled=show_progress
    ):
        if base is None:
            got.skip(name, "not found")
            continue
        try:
            beat, codes = record_median_beat(base, min_beats=min_beats)
        except WfdbImportError as e:
            got.skip(name, str(e))
            continue
        got.add(name, base, beat, codes)
    if not got.beats:
        reasons = "; ".join(f"{n}: {r}" for n, r in got.skipped) or "no records given"
        raise WfdbImportError(f"no usable WFDB record among {len(records)}: {reasons}")
    _warn_labels(got)
    written = write_dataset(out, np.stack(got.beats), np.stack(got.labels), _meta(got), overwrite=overwrite)
    return ImportReport(written, got.names, got.skipped, got.unlabelled, got.unknown)


def _check_out(out: Path, overwrite: bool) -> None:
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not overwrite:
        raise DatasetError(
            f"{out} already exists and is not empty; choose another --out or pass --overwrite to replace it"
        )


def _meta(got: _Collected) -> dict[str, object]:
    return default_meta(
        "wfdb",
        records=got.names,
        record_paths=got.paths,
        unknown_codes=got.unknown,
        unlabelled_records=got.unlabelled,
        skipped=[list(s) for s in got.skipped],
        has_ground_truth=False,
    )


def _listing(names: Sequence[str]) -> str:
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _warn_labels(got: _Collected) -> None:
    if got.unlabelled:
        log.warning(
            "%d record(s) have no Dx codes and are imported unlabelled (all-zero labels): %s",
            len(got.unlabelled),
            _listing(got.unlabelled),
        )
    if got.unknown:
        codes = sorted({c for cs in got.unknown.values() for c in cs})
        log.warning(
            "ignored Dx codes outside the %d classes in %d record(s): %s",
            N_CLASSES,
            len(got.unknown),
            _listing(codes),
        )
