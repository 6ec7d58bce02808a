"""Bad input to ``ecgx data import-wfdb``, run as a user would (issue #8).

Every kind of unusable record, given alone, must fail cleanly: exit 2, one
``ecgx: error:`` line naming the record and the field (header field or lead) at
fault, no traceback, nothing written. The same record among good ones is skipped
with its reason and the good ones are imported (exit 0). Corrupt records are built
in ``tmp_path``: copies of a shared PTB-XL record with an edited header or data
file, or records written with ``wfdb.wrsamp`` from its samples.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import wfdb
from cli_helpers import assert_clean_failure, run_ecgx, snapshot
from scipy import signal as sps

from ecgx.core.dataset import load_dataset
from ecgx.core.schema import LEADS
from ecgx.training.data.wfdb_import import read_record

BAD = "HRBAD"  # the corrupt record's name in every case
SOURCE = "HR06000"  # the shared PTB-XL record it is made from (500 Hz, 10 s, gain 1000/mV, .mat)


def _copy(shared: Path, folder: Path) -> Path:
    """Copy the shared record into ``folder`` as BAD (header and .mat renamed); returns the header."""
    folder.mkdir(parents=True, exist_ok=True)
    src = shared / "ptbxl-sample" / SOURCE
    hea = folder / f"{BAD}.hea"
    hea.write_text(src.with_suffix(".hea").read_text().replace(SOURCE, BAD))
    shutil.copyfile(src.with_suffix(".mat"), folder / f"{BAD}.mat")
    return hea


def _edit(line: int, old: str, new: str) -> Callable[[Path, Path], None]:
    """A case that copies the record and replaces ``old`` by ``new`` in header line ``line`` (1-based)."""

    def build(shared: Path, folder: Path) -> None:
        hea = _copy(shared, folder)
        lines = hea.read_text().splitlines(keepends=True)
        assert old in lines[line - 1], (old, lines[line - 1])
        lines[line - 1] = lines[line - 1].replace(old, new)
        hea.write_text("".join(lines))

    return build


def _edit_all(old: str, new: str) -> Callable[[Path, Path], None]:
    def build(shared: Path, folder: Path) -> None:
        hea = _copy(shared, folder)
        hea.write_text(hea.read_text().replace(old, new))

    return build


def _data(change: Callable[[bytes], bytes | None]) -> Callable[[Path, Path], None]:
    """A case that copies the record and rewrites (or, for ``None``, deletes) its .mat file."""

    def build(shared: Path, folder: Path) -> None:
        _copy(shared, folder)
        mat = folder / f"{BAD}.mat"
        content = change(mat.read_bytes())
        if content is None:
            mat.unlink()
        else:
            mat.write_bytes(content)

    return build


def _write(folder: Path, mv: np.ndarray, fs: float, leads: list[str] = LEADS) -> None:
    """Write (leads, T) millivolts as BAD with format 16 and gain 1000/mV; NaN = invalid sample."""
    folder.mkdir(parents=True, exist_ok=True)
    digital = np.where(np.isnan(mv), -32768, np.round(np.nan_to_num(mv) * 1000.0)).astype(np.int16)
    wfdb.wrsamp(
        BAD,
        fs=fs,
        units=["mV"] * len(leads),
        sig_name=list(leads),
        d_signal=np.ascontiguousarray(digital.T),
        adc_gain=[1000.0] * len(leads),
        baseline=[0] * len(leads),
        fmt=["16"] * len(leads),
        comments=["Dx: 426783006"],
        write_dir=str(folder),
    )


def _signal(change: Callable[[np.ndarray], tuple[np.ndarray, float]]) -> Callable[[Path, Path], None]:
    """A case that writes the shared record's samples (mV, 500 Hz) after ``change``."""

    def build(shared: Path, folder: Path) -> None:
        mv, _, _ = read_record(shared / "ptbxl-sample" / SOURCE)
        _write(folder, *change(mv.astype(np.float64)))

    return build


def _lead(name: str, value: float, start_s: float = 0.0, stop_s: float = 10.0):
    def change(mv: np.ndarray) -> tuple[np.ndarray, float]:
        mv[LEADS.index(name), int(start_s * 500) : int(stop_s * 500)] = value
        return mv, 500.0

    return change


def _resampled(fs: int):
    def change(mv: np.ndarray) -> tuple[np.ndarray, float]:
        r = Fraction(fs, 500)
        return sps.resample_poly(mv, r.numerator, r.denominator, axis=-1), float(fs)

    return change


def _without_v3(mv: np.ndarray) -> tuple[np.ndarray, float]:
    return np.delete(mv, LEADS.index("V3"), axis=0), 500.0


def _missing_v3(shared: Path, folder: Path) -> None:
    mv, _, _ = read_record(shared / "ptbxl-sample" / SOURCE)
    _write(folder, *_without_v3(mv.astype(np.float64)), leads=[lead for lead in LEADS if lead != "V3"])


def _header_only_comments(shared: Path, folder: Path) -> None:
    hea = _copy(shared, folder)
    hea.write_text(
        "".join(line for line in hea.read_text().splitlines(keepends=True) if line.startswith("#"))
    )


HEA = f"{BAD}.hea"
# (id, how to build the record in a folder, fragments the error line must hold). The record line is
# "HRBAD 12 500 5000"; line 2 is lead I ("HRBAD.mat 16x1+24 1000.0(0)/mv 16 0 10 23323 0 I"), line 3 II.
CASES: list[tuple[str, Callable[[Path, Path], None], list[str]]] = [
    # header fields wfdb would read with a default or a wrong value
    ("fs-not-a-number", _edit(1, " 500 ", " abc "), [f"{HEA} line 1", "sampling frequency (fs) 'abc'"]),
    ("fs-zero", _edit(1, " 500 ", " 0 "), [f"{HEA} line 1", "sampling frequency (fs) '0' is not positive"]),
    ("fs-negative", _edit(1, " 500 ", " -500 "), [f"{HEA} line 1", "(fs) '-500' is not positive"]),
    (
        "fs-missing",
        _edit(1, f"{BAD} 12 500 5000", f"{BAD} 12"),
        [f"{HEA} line 1", "no sampling frequency (fs)"],
    ),
    ("fs-implausible", _edit(1, " 500 ", " 1e9 "), [f"{HEA} line 1", "(fs)", "above the 20000 Hz"]),
    ("gain-zero", _edit(2, "1000.0(0)", "0(0)"), [f"{HEA} line 2 (I)", "ADC gain is 0"]),
    (
        "gain-not-a-number",
        _edit(2, "1000.0(0)", "abc(0)"),
        [f"{HEA} line 2 (I)", "ADC gain 'abc' is not a number"],
    ),
    ("gain-missing", _edit(2, " 1000.0(0)/mv 16 0 10 23323 0 I", ""), [f"{HEA} line 2", "no ADC gain"]),
    (
        "gain-negative",
        _edit(2, "1000.0(0)", "-1000.0(0)"),
        [f"{HEA} line 2 (I)", "ADC gain -1000.0 is negative"],
    ),
    ("baseline-junk", _edit(6, "1000.0(0)", "1000.0(x1)"), [f"{HEA} line 6 (aVL)", "baseline 'x1'"]),
    (
        "units-unknown",
        _edit(3, "/mv", "/furlong"),
        [f"{HEA} line 3 (lead II)", "unsupported units 'furlong'"],
    ),
    # units that convert, but to an impossible ECG: the data are millivolts
    ("units-uv-on-mv-data", _edit_all("/mv", "/uV"), [BAD, "flat leads I, II, III", "wrong gain or units"]),
    ("units-v-on-mv-data", _edit_all("/mv", "/V"), [BAD, "implausible amplitude", "wrong units"]),
    (
        "sig-len-above-data",
        _edit(1, " 5000", " 6000"),
        [f"{HEA} line 2", "holds 5000 samples", "(sig_len) is 6000"],
    ),
    (
        "sig-len-below-data",
        _edit(1, " 5000", " 4000"),
        [f"{HEA} line 2", "holds 5000 samples", "(sig_len) is 4000"],
    ),
    ("sig-len-zero", _edit(1, " 5000", " 0"), [f"{HEA} line 1", "(sig_len) is 0"]),
    ("sig-len-junk", _edit(1, " 5000", " 5k"), [f"{HEA} line 1", "(sig_len) '5k' is not a whole number"]),
    ("n-sig-mismatch", _edit(1, " 12 ", " 13 "), [f"{HEA} line 1", "(n_sig) is 13 but 12 signal line(s)"]),
    (
        "lead-name-duplicated",
        _edit(3, " II\n", " I\n"),
        [f"{HEA} lines 2 and 3", "(lead name) 'I' appears twice"],
    ),
    ("format-unknown", _edit(2, "16x1+24", "99x1+24"), [f"{HEA} line 2 (I)", "storage format '99x1+24'"]),
    ("multi-segment", _edit(1, f"{BAD} 12", f"{BAD}/2 12"), [f"{HEA} line 1", "multi-segment"]),
    ("header-only-comments", _header_only_comments, [HEA, "no record line"]),
    # data files
    ("data-missing", _data(lambda b: None), [f"{HEA} line 2", f"data file {BAD}.mat not found"]),
    ("data-zero-length", _data(lambda b: b""), [f"{HEA} line 2", "holds 0 samples", "(sig_len) is 5000"]),
    ("data-truncated", _data(lambda b: b[:50_000]), [f"{HEA} line 2", "holds 2082 samples", "(sig_len)"]),
    ("data-junk", _data(lambda b: b"\x00" * len(b)), [BAD, "flat leads I, II, III"]),
    # signals
    ("lead-all-zeros", _signal(_lead("V3", 0.0)), [BAD, "flat lead V3:"]),
    ("lead-constant", _signal(_lead("V3", 0.7)), [BAD, "flat lead V3:"]),
    ("lead-disconnected-3s", _signal(_lead("V2", 0.0, 2.0, 5.0)), [BAD, "disconnected lead V2 (3.0 s)"]),
    ("lead-all-invalid", _signal(_lead("V1", np.nan)), [BAD, "lead V1: no valid samples"]),
    ("lead-mostly-invalid", _signal(_lead("V1", np.nan, 0.0, 3.0)), [BAD, "lead V1: 30% of the samples"]),
    ("lead-missing", _missing_v3, [HEA, "missing leads: V3"]),
    ("record-too-short", _signal(lambda mv: (mv[:, :500], 500.0)), [BAD, "too few beats", "1.00 s long"]),
    # sampling rates too low for the median beat (a genuinely downsampled record, not a mislabelled one)
    ("rate-100hz", _signal(_resampled(100)), [f"{HEA} line 1", "(fs)", "100 Hz is below the 250 Hz minimum"]),
    ("rate-50hz", _signal(_resampled(50)), [f"{HEA} line 1", "(fs)", "50 Hz is below the 250 Hz minimum"]),
]


@pytest.mark.parametrize(("build", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_unusable_record_alone_fails_cleanly(
    shared_data: Path, tmp_path: Path, build: Callable[[Path, Path], None], fragments: list[str]
) -> None:
    folder = tmp_path / "in"
    build(shared_data, folder)
    before = snapshot(tmp_path)
    result = run_ecgx("data", "import-wfdb", str(folder / BAD), "--out", str(tmp_path / "out"))
    assert_clean_failure(result, f"{BAD}: ", *fragments, before=before, roots=[tmp_path])


# One case of each kind, now among good records: skipped with its reason, the rest imported.
MIXED = [
    "fs-not-a-number",
    "gain-zero",
    "sig-len-above-data",
    "data-truncated",
    "lead-all-zeros",
    "lead-disconnected-3s",
    "rate-100hz",
    "record-too-short",
]


@pytest.mark.parametrize("case", MIXED)
def test_unusable_record_among_good_ones_is_skipped(shared_data: Path, tmp_path: Path, case: str) -> None:
    build, fragments = next((b, f) for i, b, f in CASES if i == case)
    folder = tmp_path / "in"
    build(shared_data, folder)
    good = [shared_data / "ptbxl-sample" / f"{name}.hea" for name in ("HR06001", "HR06003")]
    out = tmp_path / "out"
    result = run_ecgx("data", "import-wfdb", str(good[0]), str(folder), str(good[1]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    skipped = [line for line in result.stderr.splitlines() if line.startswith(f"skipped {BAD}: ")]
    assert len(skipped) == 1, result.stderr
    for fragment in fragments:
        assert fragment in skipped[0], (fragment, skipped[0])
    ds = load_dataset(out)
    assert ds.meta["records"] == ["HR06001", "HR06003"]
    assert [name for name, _ in ds.meta["skipped"]] == [BAD]
    assert len(ds) == 2


def test_every_record_unusable_fails_cleanly_naming_each(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _edit(1, " 500 ", " 0 ")(shared_data, folder)
    mv, _, _ = read_record(shared_data / "ptbxl-sample" / SOURCE)
    short = tmp_path / "short"
    _write(short, mv[:, :500].astype(np.float64), 500.0)
    (short / f"{BAD}.hea").rename(short / "SHORT.hea")
    (short / "SHORT.hea").write_text((short / "SHORT.hea").read_text().replace(BAD, "SHORT"))
    (short / f"{BAD}.dat").rename(short / "SHORT.dat")
    before = snapshot(tmp_path)
    result = run_ecgx("data", "import-wfdb", str(folder), str(short), "--out", str(tmp_path / "out"))
    assert_clean_failure(
        result,
        "no usable WFDB record among 2",
        f"{BAD}: {BAD}.hea line 1: sampling frequency (fs) '0'",
        "SHORT: too few beats",
        before=before,
        roots=[tmp_path],
    )


def test_folder_without_records_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no records here")
    before = snapshot(tmp_path)
    result = run_ecgx("data", "import-wfdb", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert_clean_failure(
        result, "empty: the folder holds no WFDB header (.hea)", before=before, roots=[tmp_path]
    )


@pytest.mark.parametrize("value", ["0", "-1"])
def test_min_beats_below_one_is_refused(shared_data: Path, tmp_path: Path, value: str) -> None:
    before = snapshot(tmp_path)
    result = run_ecgx(
        "data",
        "import-wfdb",
        str(shared_data / "ptbxl-sample"),
        "--out",
        str(tmp_path / "out"),
        "--min-beats",
        value,
    )
    assert_clean_failure(
        result,
        f"--min-beats must be a whole number of at least 1, got {value}",
        before=before,
        roots=[tmp_path],
    )


def test_missing_units_and_baseline_keep_the_wfdb_defaults(shared_data: Path, tmp_path: Path) -> None:
    """Missing units are mV and a missing baseline is the ADC zero (WFDB defaults MIT-BIH and PTB rely on)."""
    ref, _, _ = read_record(shared_data / "ptbxl-sample" / SOURCE)
    _edit_all("(0)/mv", "")(shared_data, tmp_path)
    signal, fs, codes = read_record(tmp_path / BAD)
    assert fs == 500.0 and codes == ["164934002", "426783006"]
    np.testing.assert_array_equal(signal, ref)
