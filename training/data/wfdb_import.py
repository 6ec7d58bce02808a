"""Import WFDB records (PTB-XL, PhysioNet 2021, PTB Diagnostic, ...) as a dataset folder of median beats.

Each record is read with ``wfdb.rdrecord``, its 12 standard leads are picked by
name (case-insensitively, extra channels such as Frank leads ignored), converted to
millivolts, reduced to one median beat (:mod:`ecgx.core.median_beat`) and
labelled from its ``# Dx:`` SNOMED CT codes. A record that cannot be used is
skipped with its reason (listed in the report and ``meta.json``); the import fails,
writing nothing, only when no record is usable.

Headers are parsed strictly (:func:`read_header`) before ``wfdb`` reads the samples:
``wfdb`` silently reads an unparsable, negative or missing sampling frequency as
250 Hz and a missing or zero gain as 200, so any such field is refused with the
header file, line and field named. Every record must also pass the median-beat
pipeline's input checks (:func:`ecgx.core.median_beat.check_sampling_rate`,
:func:`~ecgx.core.median_beat.check_leads`): at least 250 Hz, no flat or
disconnected lead.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import wfdb

from ecgx.core.dataset import MAX_ABS_MV, DatasetError, default_meta, write_dataset
from ecgx.core.errors import InvalidArgument
from ecgx.core.median_beat import MedianBeatError, check_sampling_rate, median_beat
from ecgx.core.progress import progress
from ecgx.core.schema import LEADS, N_CLASSES, snomed_to_class

log = logging.getLogger(__name__)

RECORD_SUFFIXES = (".hea", ".mat", ".dat")
# Factor to millivolts for each unit spelling found in WFDB headers (compared lower-cased).
UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "microvolt": 1e-3, "v": 1e3, "nv": 1e-6}
# Short gaps (invalid samples) are interpolated; a lead missing more than this is not trusted.
MAX_MISSING_FRACTION = 0.2
# Bytes per sample of the WFDB storage formats whose data-file size follows from the sample count
# (the compressed FLAC formats 508/516/524 do not, and are not size-checked).
_FORMAT_BYTES = {
    "8": 1.0,
    "16": 2.0,
    "61": 2.0,
    "80": 1.0,
    "160": 2.0,
    "212": 1.5,
    "310": 4 / 3,
    "311": 4 / 3,
    "24": 3.0,
    "32": 4.0,
}
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")  # no nan, inf or 1_000
_INTEGER = re.compile(r"^[-+]?\d+$")
_FORMAT = re.compile(r"^(\d+)(?:x(\d+))?(?::(\d+))?(?:\+(\d+))?$")  # fmt[xspf][:skew][+offset]
_GAIN = re.compile(r"^([^(/]*)(?:\(([^)]*)\))?(?:/(.*))?$")  # gain[(baseline)][/units]
# Storage formats of the WFDB specification (signal(5)); wfdb raises a bare KeyError on others.
_FORMATS = {"0", "8", "16", "24", "32", "61", "80", "160", "212", "310", "311", "508", "516", "524"}
_SIGNAL_INTEGER_FIELDS = ("ADC resolution", "ADC zero", "initial value", "checksum", "block size")
_DX_LINE = re.compile(r"^\s*dx\s*:\s*(.*)$", re.IGNORECASE)
# Header comments that name the patient (e.g. "# Patient ID: 15709"), and PTB Diagnostic's layout
# (records in one folder per patient, "patient001/s0010_re").
_PATIENT_LINE = re.compile(r"^\s*#?\s*(?:patient|subject)(?:[ _]?id)?\s*:\s*(\S.*?)\s*$", re.IGNORECASE)
_PATIENT_FOLDER = re.compile(r"^patient\d+$", re.IGNORECASE)
_MAX_LISTED = 10  # names listed in one aggregated warning


class WfdbImportError(InvalidArgument):
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


def find_records(paths: Iterable[str | Path]) -> list[tuple[str, Path | None, str]]:
    """Expand files and folders into ``(name, record base, problem)`` triples.

    A folder contributes every record whose ``.hea`` it holds, in it or any subfolder (as
    PhysioNet lays out its databases: ``WFDB/g1/HR00001.hea``), sorted by path and named by the
    record's own name, as PhysioNet names them (unique within a database); a record given twice
    (directly and inside a folder) is imported once. Base ``None`` marks a path that
    gives no record (not found, a folder without headers, an unreadable folder) and ``problem``
    says why.
    """
    found: list[tuple[str, Path | None, str]] = []
    seen: set[Path] = set()
    for given in paths:
        p = Path(given)
        if p.is_dir():
            try:
                bases = sorted(h.with_suffix("") for h in p.rglob("*.hea") if h.is_file())
            except OSError as e:
                found.append((str(given), None, f"cannot list the folder: {e.strerror or e}"))
                continue
            if not bases:
                found.append(
                    (str(given), None, "the folder holds no WFDB header (.hea), nor do its subfolders")
                )
                continue
        else:
            bases = [record_base(p)]
            if not _header(bases[0]).is_file():
                found.append((str(given), None, "not found"))
                continue
        for base in bases:
            if base.resolve() not in seen:
                seen.add(base.resolve())
                found.append((base.name, base, ""))
    return found


def _header(base: Path) -> Path:
    # Not with_suffix: record names may contain dots.
    return base.parent / f"{base.name}.hea"


@dataclass(frozen=True)
class SignalSpec:
    """One signal line of a WFDB header, every field the import uses checked."""

    line: int  # line number in the header file
    file: str  # data file, relative to the header's folder
    fmt: str  # storage format, e.g. "16" or "212"
    samples_per_frame: int
    byte_offset: int
    gain: float  # ADC units per physical unit, > 0
    baseline: int | None  # None: not given (WFDB's documented default, the ADC zero)
    units: str  # "mV" where the header gives none (WFDB's documented default)
    name: str  # the description, e.g. "V1"


@dataclass(frozen=True)
class HeaderSpec:
    """The record line and signal lines of a WFDB header (:func:`read_header`)."""

    file: Path
    line: int  # line number of the record line
    fs: float  # > 0
    sig_len: int | None  # > 0; None: not given (WFDB counts the samples in the data file)
    signals: tuple[SignalSpec, ...]


def read_header(path: str | Path) -> HeaderSpec:
    """Parse a record's ``.hea`` strictly; raise :class:`WfdbImportError` naming file, line and field.

    ``wfdb.rdheader`` reads an unparsable, negative or missing sampling frequency as
    250 Hz, a missing, zero or unparsable gain as 200 and ignores junk after a field; here
    each of those is an error. A missing ``units`` (millivolts) and a missing baseline
    (the ADC zero) keep the WFDB format's documented defaults, which real databases (MIT-BIH,
    PTB Diagnostic) rely on. Multi-segment records are refused.
    """
    hea = _header(record_base(path))
    try:
        text = hea.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise WfdbImportError(f"{hea.name}: cannot read the header: {e.strerror or e}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise WfdbImportError(f"{hea.name}: no record line (the header is empty or only comments)")
    (n, record_line), signal_lines = lines[0], lines[1:]
    at = f"{hea.name} line {n}"
    tok = record_line.split()
    if "/" in tok[0]:
        raise WfdbImportError(f"{at}: record name {tok[0]!r}: multi-segment records are not supported")
    if len(tok) < 2:
        raise WfdbImportError(f"{at}: no number of signals (n_sig) in the record line {record_line!r}")
    n_sig = _integer(tok[1], at, "number of signals (n_sig)")
    if n_sig < 1:
        raise WfdbImportError(f"{at}: number of signals (n_sig) is {n_sig}: the record has no signals")
    if len(tok) < 3:
        raise WfdbImportError(f"{at}: no sampling frequency (fs); WFDB's default of 250 Hz would be a guess")
    fs = _number(tok[2].split("/")[0], at, "sampling frequency (fs)")
    if fs <= 0:
        raise WfdbImportError(f"{at}: sampling frequency (fs) {tok[2]!r} is not positive")
    sig_len = None
    if len(tok) > 3:
        sig_len = _integer(tok[3], at, "number of samples per signal (sig_len)")
        if sig_len <= 0:
            raise WfdbImportError(
                f"{at}: number of samples per signal (sig_len) is {sig_len}: the record holds no samples"
            )
    if len(signal_lines) != n_sig:
        raise WfdbImportError(
            f"{at}: number of signals (n_sig) is {n_sig} but {len(signal_lines)} signal line(s) follow"
        )
    return HeaderSpec(hea, n, fs, sig_len, tuple(_signal_spec(hea.name, n, line) for n, line in signal_lines))


def _signal_spec(header: str, n: int, line: str) -> SignalSpec:
    tok = line.split(maxsplit=8)
    name = tok[8] if len(tok) > 8 else ""
    at = f"{header} line {n}" + (f" ({name})" if name else "")
    if len(tok) < 2:
        raise WfdbImportError(f"{at}: no storage format in the signal line {line!r}")
    fmt = _FORMAT.match(tok[1])
    if fmt is None or fmt[1] not in _FORMATS:
        raise WfdbImportError(
            f"{at}: storage format {tok[1]!r} is not a WFDB format (e.g. 16, 212, 16x1+24; see signal(5))"
        )
    if len(tok) < 3:
        raise WfdbImportError(f"{at}: no ADC gain; WFDB's default of 200 units/mV would be a guess")
    spec = _GAIN.match(tok[2])
    if spec is None:
        raise WfdbImportError(f"{at}: ADC gain field {tok[2]!r} is not gain[(baseline)][/units]")
    gain = _number(spec[1], at, "ADC gain")
    if gain == 0:
        raise WfdbImportError(f"{at}: ADC gain is 0 (uncalibrated); WFDB's default of 200 would be a guess")
    if gain < 0:
        raise WfdbImportError(f"{at}: ADC gain {spec[1]} is negative")
    baseline = None if spec[2] is None else _integer(spec[2], at, "baseline")
    for text, field_name in zip(tok[3:8], _SIGNAL_INTEGER_FIELDS, strict=False):
        _integer(text, at, field_name)
    return SignalSpec(
        line=n,
        file=tok[0],
        fmt=fmt[1],
        samples_per_frame=int(fmt[2] or 1),
        byte_offset=int(fmt[4] or 0),
        gain=gain,
        baseline=baseline,
        units=(spec[3] or "").strip() or "mV",
        name=name,
    )


def _number(text: str, at: str, field_name: str) -> float:
    if not _NUMBER.match(text):
        raise WfdbImportError(f"{at}: {field_name} {text!r} is not a number")
    value = float(text)
    if not math.isfinite(value):
        raise WfdbImportError(f"{at}: {field_name} {text!r} is out of range")
    return value


def _integer(text: str, at: str, field_name: str) -> int:
    if not _INTEGER.match(text):
        raise WfdbImportError(f"{at}: {field_name} {text!r} is not a whole number")
    return int(text)


def read_record(path: str | Path) -> tuple[np.ndarray, float, list[str]]:
    """Read one WFDB record: ``(signal, fs, dx_codes)``.

    ``signal`` is (12, T) float32 millivolts in ``schema.LEADS`` order at the record's
    own sampling rate ``fs``; short runs of invalid samples are linearly interpolated.
    ``dx_codes`` are the SNOMED codes of the header's ``# Dx:`` lines (empty if none).
    Raises :class:`WfdbImportError`, naming the file and field, for a header field that
    is missing or impossible (:func:`read_header`), a sampling rate outside the
    median-beat pipeline's range, missing or duplicated leads, unknown units, a data file
    that is missing, unreadable or holds another number of samples than the header
    says, and leads without enough valid samples.
    """
    base = record_base(path)
    if not _header(base).is_file():
        raise WfdbImportError(f"not found: {_header(base)}")
    header = read_header(base)
    hea = header.file.name
    try:
        check_sampling_rate(header.fs)
    except MedianBeatError as e:
        raise WfdbImportError(f"{hea} line {header.line}: sampling frequency (fs): {e}") from None
    idx = _lead_indices(header)
    scale = np.array([_mv_factor(header.signals[i], LEADS[k], hea) for k, i in enumerate(idx)])
    _check_data_files(base, header)
    try:
        rec = wfdb.rdrecord(str(base))
    except Exception as e:  # wfdb raises many types on malformed files; all mean "unreadable"
        files = ", ".join(dict.fromkeys(s.file for s in header.signals))
        message = " ".join(f"{type(e).__name__}: {e}".split())
        raise WfdbImportError(f"{hea}: cannot read the samples in {files}: {message}") from None
    _check_agrees(rec, header)
    signal = rec.p_signal[:, idx].T * scale[:, None]
    return _fill_gaps(signal).astype(np.float32), header.fs, _dx_codes(rec.comments or [])


def _lead_indices(header: HeaderSpec) -> list[int]:
    """Channel index of each of the 12 standard leads, matched case-insensitively; duplicates are refused."""
    index: dict[str, int] = {}
    for i, signal in enumerate(header.signals):
        key = signal.name.strip().casefold()
        if key in index and key in {lead.casefold() for lead in LEADS}:
            first = header.signals[index[key]]
            raise WfdbImportError(
                f"{header.file.name} lines {first.line} and {signal.line}: signal description (lead name) "
                f"{signal.name!r} appears twice; which one is lead {signal.name} would be a guess"
            )
        index.setdefault(key, i)
    missing = [lead for lead in LEADS if lead.casefold() not in index]
    if missing:
        present = ", ".join(s.name or "(unnamed)" for s in header.signals)
        raise WfdbImportError(
            f"{header.file.name}: missing leads: {', '.join(missing)} (signal descriptions: {present})"
        )
    return [index[lead.casefold()] for lead in LEADS]


def _mv_factor(signal: SignalSpec, lead: str, header: str) -> float:
    key = signal.units.casefold()
    if key not in UNIT_TO_MV:
        raise WfdbImportError(
            f"{header} line {signal.line} (lead {lead}): unsupported units {signal.units!r} "
            "(expected mV, uV or V)"
        )
    return UNIT_TO_MV[key]


def _check_data_files(base: Path, header: HeaderSpec) -> None:
    """Every data file exists and, where its format allows, holds exactly ``sig_len`` samples per signal."""
    by_file: dict[str, list[SignalSpec]] = {}
    for signal in header.signals:
        by_file.setdefault(signal.file, []).append(signal)
    for name, signals in by_file.items():
        at = f"{header.file.name} line {signals[0].line}"
        path = base.parent / name
        if not path.is_file():
            raise WfdbImportError(f"{at}: data file {name} not found")
        if header.sig_len is None or any(s.fmt not in _FORMAT_BYTES for s in signals):
            continue
        frame = sum(s.samples_per_frame * _FORMAT_BYTES[s.fmt] for s in signals)  # bytes per frame
        data = path.stat().st_size - signals[0].byte_offset
        expected = math.ceil(header.sig_len * frame)
        if not expected <= data < expected + frame:
            held = max(data, 0) // frame
            raise WfdbImportError(
                f"{at}: data file {name} holds {held:.0f} samples per signal but the header's "
                f"number of samples per signal (sig_len) is {header.sig_len}"
            )


def _check_agrees(rec: wfdb.Record, header: HeaderSpec) -> None:
    """``wfdb`` read the fields the conversion relies on as :func:`read_header` did (a safety net)."""
    hea = header.file.name
    n_sig, n_samples = (None, None) if rec.p_signal is None else rec.p_signal.shape[::-1]
    if n_sig != len(header.signals):
        raise WfdbImportError(f"{hea}: wfdb read {n_sig} signals, the header has {len(header.signals)}")
    if rec.fs is None or not math.isclose(float(rec.fs), header.fs, rel_tol=1e-9):
        raise WfdbImportError(f"{hea}: wfdb read the sampling frequency (fs) as {rec.fs}, not {header.fs:g}")
    if header.sig_len is not None and n_samples != header.sig_len:
        raise WfdbImportError(
            f"{hea}: wfdb read {n_samples} samples per signal, not sig_len {header.sig_len}"
        )
    for signal, gain, baseline in zip(header.signals, rec.adc_gain, rec.baseline, strict=True):
        if not math.isclose(float(gain), signal.gain, rel_tol=1e-9):
            raise WfdbImportError(
                f"{hea} line {signal.line}: wfdb read the ADC gain as {gain}, not {signal.gain:g}"
            )
        if signal.baseline is not None and baseline != signal.baseline:
            raise WfdbImportError(
                f"{hea} line {signal.line}: wfdb read the baseline as {baseline}, not {signal.baseline}"
            )


def _fill_gaps(signal: np.ndarray) -> np.ndarray:
    """Interpolate invalid samples (NaN in ``p_signal``) lead by lead, refusing mostly-empty leads."""
    if np.isinf(signal).any():
        lead = LEADS[int(np.flatnonzero(np.isinf(signal).any(axis=1))[0])]
        raise WfdbImportError(
            f"lead {lead}: samples overflow to infinity in millivolts (ADC gain too small?)"
        )
    bad = np.isnan(signal)
    if not bad.any():
        return signal
    out = signal.copy()
    t = np.arange(signal.shape[1])
    for k in np.flatnonzero(bad.any(axis=1)):
        missing = bad[k].mean()
        if missing == 1.0:
            raise WfdbImportError(
                f"lead {LEADS[k]}: no valid samples (all are the format's invalid-sample code)"
            )
        if missing > MAX_MISSING_FRACTION:
            raise WfdbImportError(
                f"lead {LEADS[k]}: {missing:.0%} of the samples are invalid "
                f"(at most {MAX_MISSING_FRACTION:.0%} are interpolated)"
            )
        out[k, bad[k]] = np.interp(t[bad[k]], t[~bad[k]], signal[k, ~bad[k]])
    return out


def _dx_codes(comments: Sequence[str]) -> list[str]:
    codes: list[str] = []
    for line in comments:
        m = _DX_LINE.match(line)
        if m:
            codes += [c.strip() for c in m.group(1).split(",") if c.strip()]
    return list(dict.fromkeys(codes))  # unique, header order


def patient_id(base: str | Path) -> str | None:
    """The patient a record belongs to, where the source says: a ``# Patient:`` / ``# Patient ID:`` /
    ``# Subject:`` header comment, else a parent folder named ``patient<digits>`` (PTB Diagnostic's
    layout); None when neither is there (the import then counts the record as its own patient)."""
    base = record_base(base)
    try:
        text = _header(base).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        m = _PATIENT_LINE.match(line) if line.lstrip().startswith("#") else None
        if m:
            return m.group(1)
    folder = base.parent.name
    return folder if _PATIENT_FOLDER.match(folder) else None


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
    except (ValueError, ArithmeticError, MemoryError) as e:  # numpy/scipy on a signal the checks let through
        raise WfdbImportError(f"median beat failed: {type(e).__name__}: {e}") from None
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
    patients: list[str] = field(default_factory=list)  # the record's name where no patient is named
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    unknown: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, base: Path, beat: np.ndarray, codes: list[str]) -> None:
        labels, unknown = labels_from_codes(codes)
        self.beats.append(beat)
        self.labels.append(labels)
        self.names.append(name)
        self.paths.append(str(base))
        self.patients.append(patient_id(base) or name)
        if not codes:
            self.unlabelled.append(name)
        if unknown:
            self.unknown[name] = unknown

    def skip(self, name: str, reason: str) -> None:
        # Logged once the import is known to go ahead (_warn_skipped): if no record is usable,
        # the error alone says why, on one line.
        self.skipped.append((name, " ".join(reason.split())))


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
    record in them). Unusable records are skipped, listed with their reasons in the
    report and summarised in one WARNING; if none is usable, :class:`WfdbImportError`
    lists the reasons and nothing is written. ``min_beats`` (>= 1) is the fewest
    consistent beats a record's median beat is made of. Labels are multi-hot from the
    ``# Dx:`` codes; the data has no ground-truth masks.
    """
    if isinstance(min_beats, bool) or not isinstance(min_beats, (int, np.integer)) or min_beats < 1:
        raise WfdbImportError(f"--min-beats must be a whole number of at least 1, got {min_beats!r}")
    out = Path(out)
    _check_out(out, overwrite)  # fail before minutes of work, not after
    records = find_records(paths)
    got = _Collected()
    for name, base, problem in progress(
        records, total=len(records), desc="import WFDB", unit="rec", enabled=show_progress
    ):
        if base is None:
            got.skip(name, problem)
            continue
        try:
            beat, codes = record_median_beat(base, min_beats=min_beats)
        except WfdbImportError as e:
            got.skip(name, str(e))
            continue
        except (OSError, ValueError, ArithmeticError, MemoryError) as e:  # a file gone or changed mid-run
            got.skip(name, f"{type(e).__name__}: {e}")
            continue
        got.add(name, base, beat, codes)
    if not got.beats:
        raise WfdbImportError(_nothing_usable(len(records), got.skipped))
    _warn_skipped(got, len(records))
    _warn_labels(got)
    written = write_dataset(out, np.stack(got.beats), np.stack(got.labels), _meta(got), overwrite=overwrite)
    return ImportReport(written, got.names, got.skipped, got.unlabelled, got.unknown)


def _check_out(out: Path, overwrite: bool) -> None:
    """The output rule of :mod:`ecgx.core.outputs`, checked before minutes of work (the writer again)."""
    from ecgx.core.outputs import DATASET, OutputError, check_output

    try:
        check_output(out, DATASET, overwrite=overwrite)
    except OutputError as e:
        raise DatasetError(str(e)) from None


def _meta(got: _Collected) -> dict[str, object]:
    return default_meta(
        "wfdb",
        records=got.names,
        record_paths=got.paths,
        record_ids=got.names,
        patient_ids=got.patients,
        unknown_codes=got.unknown,
        unlabelled_records=got.unlabelled,
        skipped=[list(s) for s in got.skipped],
        has_ground_truth=False,
    )


def _listing(names: Sequence[str]) -> str:
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _nothing_usable(n_records: int, skipped: Sequence[tuple[str, str]]) -> str:
    """One line: why not one of ``n_records`` records could be imported (the first few reasons)."""
    if not skipped:
        return "no WFDB records given"
    reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:_MAX_LISTED])
    more = f"; and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
    return f"no usable WFDB record among {n_records}: {reasons}{more}"


def _warn_skipped(got: _Collected, n_records: int) -> None:
    if got.skipped:
        log.warning(
            "skipped %d of %d WFDB record(s), reasons kept in meta.json: %s",
            len(got.skipped),
            n_records,
            _listing([name for name, _ in got.skipped]),
        )


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
