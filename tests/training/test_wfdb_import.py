"""WFDB import and median beats, on the real records in ../shared/data and on synthetic rhythms."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import wfdb

from ecgx.core.dataset import Dataset, DatasetError, load_dataset
from ecgx.core.median_beat import MedianBeatError, detect_r_peaks, median_beat
from ecgx.core.schema import BEAT_SAMPLES, CLASS_KEYS, LEADS, R_PEAK_SAMPLE
from ecgx.training.data.wfdb_import import ImportReport, WfdbImportError, import_wfdb, read_record

PTBXL = [f"HR0600{i}" for i in range(10)]


@pytest.fixture(scope="module")
def shared(shared_data: Path) -> Path:
    """The shared records folder (skips when absent; see conftest.py)."""
    return shared_data


@pytest.fixture(scope="module")
def imported(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ImportReport, Dataset]:
    """The ten PTB-XL records plus PTB Diagnostic s0010_re, imported once for the module."""
    out = tmp_path_factory.mktemp("wfdb") / "ds"
    paths = [shared / "ptbxl-sample", shared / "ptb-diagnostic" / "s0010_re.hea"]
    report = import_wfdb(paths, out, show_progress=False)
    return report, load_dataset(out)


def _beat(ds: Dataset, name: str) -> np.ndarray:
    return np.asarray(ds.signals[ds.meta["records"].index(name)])


def _labels(ds: Dataset, name: str) -> set[str]:
    row = ds.labels[ds.meta["records"].index(name)]
    return {k for k, v in zip(CLASS_KEYS, row, strict=True) if v}


def _write(directory: Path, name: str, signal: np.ndarray, fs: float, leads=LEADS, units="mV") -> Path:
    """Write a (leads, T) signal as a WFDB record, optionally with a Dx line."""
    wfdb.wrsamp(
        name,
        fs=fs,
        units=[units] * len(leads),
        sig_name=list(leads),
        p_signal=np.ascontiguousarray(signal.T, dtype=np.float64),
        fmt=["16"] * len(leads),
        comments=["Dx: 426783006"],
        write_dir=str(directory),
    )
    return directory / name


def test_all_ptbxl_records_import(imported: tuple[ImportReport, Dataset]) -> None:
    report, ds = imported
    assert report.imported == [*PTBXL, "s0010_re"]
    assert report.skipped == []
    assert ds.signals.shape == (11, 12, BEAT_SAMPLES)
    assert ds.signals.dtype == np.float32
    assert np.isfinite(ds.signals).all()
    assert ds.meta["source"] == "wfdb" and ds.meta["has_ground_truth"] is False
    assert not ds.masks.any()


@pytest.mark.parametrize("name", PTBXL)
def test_median_beat_has_its_r_peak_at_250(imported: tuple[ImportReport, Dataset], name: str) -> None:
    beat = _beat(imported[1], name)
    r_amplitude = np.abs(beat[:, R_PEAK_SAMPLE - 5 : R_PEAK_SAMPLE + 6]).max()
    assert 0.3 <= r_amplitude <= 5.0
    # Every lead's largest QRS deflection should sit at (or within 16 ms of) sample 250 in most leads.
    qrs_peak = 200 + np.abs(beat[:, 200:320]).argmax(axis=1)
    assert (np.abs(qrs_peak - R_PEAK_SAMPLE) <= 8).sum() >= 8, qrs_peak - R_PEAK_SAMPLE


def test_labels_follow_dx_codes(imported: tuple[ImportReport, Dataset]) -> None:
    report, ds = imported
    assert _labels(ds, "HR06000") == {"SR", "STT"}  # 164934002 T-wave abnormality is in the STT family
    assert _labels(ds, "HR06001") == {"SR", "STT"}
    assert _labels(ds, "HR06002") == {"SR", "SBrad"}  # 713426002 incomplete RBBB is not RBBB
    assert _labels(ds, "HR06003") == {"SR", "STach"}
    for name in PTBXL[4:]:
        assert _labels(ds, name) == {"SR"}
    assert report.unknown_codes == {"HR06002": ["713426002"]}
    assert ds.meta["unknown_codes"] == {"HR06002": ["713426002"]}


def test_ptb_diagnostic_record_is_resampled_and_unlabelled(
    shared: Path, imported: tuple[ImportReport, Dataset]
) -> None:
    signal, fs, codes = read_record(shared / "ptb-diagnostic" / "s0010_re")
    assert signal.shape == (12, 38400) and signal.dtype == np.float32  # 12 of 15 channels picked
    assert fs == 1000.0 and codes == []
    report, ds = imported
    assert _labels(ds, "s0010_re") == set()
    assert report.unlabelled == ["s0010_re"]
    beat = _beat(ds, "s0010_re")
    assert 0.3 <= np.abs(beat[:, R_PEAK_SAMPLE - 5 : R_PEAK_SAMPLE + 6]).max() <= 5.0


@pytest.mark.parametrize("name", [*PTBXL, "s0010_re"])
def test_median_beat_keeps_einthoven_law(imported: tuple[ImportReport, Dataset], name: str) -> None:
    # The recorded leads obey I + III = II; a per-lead median is only nearly linear, most of all on the
    # steep QRS slopes and where the next beat enters the window, so bound the RMS and the beat's core.
    beat = _beat(imported[1], name)
    residual = beat[0] + beat[2] - beat[1]
    assert np.sqrt(np.mean(residual**2)) < 0.03
    assert np.abs(residual[150:450]).max() < 0.1


def test_record_path_forms_agree(shared: Path) -> None:
    base = shared / "ptbxl-sample" / "HR06003"
    ref, fs, codes = read_record(base)
    assert fs == 500.0 and codes == ["426783006", "427084000"]
    for form in (base.with_suffix(".hea"), base.with_suffix(".mat")):
        assert np.array_equal(read_record(form)[0], ref)


def test_units_are_converted_to_millivolts(shared: Path, tmp_path: Path) -> None:
    ref, fs, _ = read_record(shared / "ptbxl-sample" / "HR06004")
    _write(tmp_path, "micro", ref * 1000.0, fs, units="uV")
    signal, _, _ = read_record(tmp_path / "micro")
    np.testing.assert_allclose(signal, ref, atol=2e-3)


def test_unusable_records_are_skipped_with_reasons(
    shared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref, fs, _ = read_record(shared / "ptbxl-sample" / "HR06000")
    bad = tmp_path / "bad"
    bad.mkdir()
    no_v3 = [lead for lead in LEADS if lead != "V3"]
    _write(bad, "no_v3", np.delete(ref, LEADS.index("V3"), axis=0), fs, leads=no_v3)
    _write(bad, "short", ref[:, : int(fs)], fs)  # 1 s
    (bad / "garbage.hea").write_text("this is not\na WFDB header\n")
    with caplog.at_level(logging.WARNING, logger="ecgx.training.data.wfdb_import"):
        report = import_wfdb(
            [shared / "ptbxl-sample", bad, tmp_path / "nowhere"], tmp_path / "out", show_progress=False
        )
    assert report.imported == PTBXL
    reasons = dict(report.skipped)
    assert set(reasons) == {"garbage", "no_v3", "short", str(tmp_path / "nowhere")}
    assert "missing leads: V3" in reasons["no_v3"]
    assert "garbage.hea line 1: number of signals (n_sig) 'is' is not a whole number" in reasons["garbage"]
    assert "too few beats" in reasons["short"]
    assert reasons[str(tmp_path / "nowhere")] == "not found"
    for name in reasons:
        assert any(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["records"] == PTBXL and len(meta["skipped"]) == 4


def test_no_usable_record_raises_and_writes_nothing(shared: Path, tmp_path: Path) -> None:
    ref, fs, _ = read_record(shared / "ptbxl-sample" / "HR06001")
    _write(tmp_path, "short", ref[:, : int(fs)], fs)
    out = tmp_path / "out"
    with pytest.raises(WfdbImportError, match=r"no usable WFDB record.*short: too few beats"):
        import_wfdb([tmp_path / "short", tmp_path / "missing.hea"], out, show_progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left


def test_existing_output_is_refused_before_work(shared: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="already exists"):
        import_wfdb([shared / "ptbxl-sample"], out, show_progress=False)
    assert (out / "keep.txt").exists()


def _rhythm(
    fs: float, seconds: float = 10.0, bpm: float = 72.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """12 leads of Gaussian QRS-like pulses (and T waves) with baseline wander and noise; R times in s."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * fs)) / fs
    r_times = np.arange(0.4, seconds - 0.1, 60.0 / bpm)
    amps = np.array([1.0, 1.5, 0.5, -1.2, 0.3, 1.0, -0.8, -0.5, 0.8, 1.6, 1.4, 1.1])
    pulses = sum(np.exp(-0.5 * ((t - r) / 0.012) ** 2) for r in r_times)
    t_waves = sum(np.exp(-0.5 * ((t - r - 0.3) / 0.04) ** 2) for r in r_times)
    x = amps[:, None] * pulses + 0.2 * np.sign(amps)[:, None] * t_waves
    phases = rng.uniform(0, 2 * np.pi, (12, 1))
    x += 0.4 * np.sin(2 * np.pi * 0.3 * t + phases) + rng.normal(0, 0.01, x.shape)
    return x, r_times


def test_r_peaks_of_a_synthetic_rhythm() -> None:
    x, r_times = _rhythm(500.0)
    peaks = detect_r_peaks(x, 500.0)
    assert len(peaks) == len(r_times) == 12
    assert np.abs(peaks - np.round(r_times * 500.0)).max() <= 2


def test_median_beat_of_a_synthetic_rhythm_at_another_rate() -> None:
    x, _ = _rhythm(500.0)
    beat = median_beat(x, 500.0)
    assert beat.shape == (12, BEAT_SAMPLES) and beat.dtype == np.float32
    assert np.abs(beat[1]).argmax() == R_PEAK_SAMPLE
    assert beat[1, R_PEAK_SAMPLE] == pytest.approx(1.5, abs=0.1)
    x360, r_times = _rhythm(360.0)
    assert np.abs(detect_r_peaks(x360, 360.0) - np.round(r_times * 360.0)).max() <= 2
    assert np.abs(median_beat(x360, 360.0) - beat).max() < 0.1


def test_median_beat_rejects_bad_input() -> None:
    with pytest.raises(MedianBeatError, match="shape"):
        median_beat(np.zeros((11, 5000)), 500.0)
    bad = np.zeros((12, 5000))
    bad[3, 10] = np.nan
    with pytest.raises(MedianBeatError, match="NaN"):
        median_beat(bad, 500.0)
    with pytest.raises(MedianBeatError, match=r"flat leads I, II, .*, V6"):
        median_beat(np.zeros((12, 5000)), 500.0)
    with pytest.raises(MedianBeatError, match="too few beats"):
        median_beat(np.random.default_rng(0).normal(0.0, 0.1, (12, 5000)), 500.0)


def test_import_keeps_record_and_patient_ids(imported: tuple[ImportReport, Dataset], tmp_path: Path) -> None:
    _, ds = imported
    assert ds.record_ids == ds.meta["records"] and "HR06000" in ds.record_ids
    # These headers name no patient: each record counts as its own patient.
    assert ds.patient_ids == ds.record_ids


def test_patient_ids_come_from_header_comments_and_patient_folders(shared: Path, tmp_path: Path) -> None:
    import shutil

    from ecgx.training.data.wfdb_import import patient_id

    for i, name in enumerate(("HR06000", "HR06001")):
        for suffix in (".hea", ".mat"):
            shutil.copy(shared / "ptbxl-sample" / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
        with open(tmp_path / f"{name}.hea", "a") as f:
            f.write("# Patient ID: 15709\n" if i == 0 else "# Subject: P7\n")
    folder = tmp_path / "patient001"
    folder.mkdir()
    for suffix in (".hea", ".dat", ".xyz"):
        shutil.copy(shared / "ptb-diagnostic" / f"s0010_re{suffix}", folder / f"s0010_re{suffix}")
    assert patient_id(tmp_path / "HR06000") == "15709" and patient_id(folder / "s0010_re") == "patient001"
    import_wfdb([tmp_path, folder], tmp_path / "ds", show_progress=False)
    ds = load_dataset(tmp_path / "ds")
    assert dict(zip(ds.record_ids, ds.patient_ids, strict=True)) == {
        "HR06000": "15709",
        "HR06001": "P7",
        "s0010_re": "patient001",
    }


def test_old_datasets_without_ids_still_load_and_bad_ids_are_refused(shared: Path, tmp_path: Path) -> None:
    import_wfdb([shared / "ptbxl-sample"], tmp_path / "ds", show_progress=False)
    meta_file = tmp_path / "ds" / "meta.json"
    meta = json.loads(meta_file.read_text())
    old = {k: v for k, v in meta.items() if k not in ("record_ids", "patient_ids")}
    meta_file.write_text(json.dumps(old))
    ds = load_dataset(tmp_path / "ds")
    assert ds.patient_ids is None and ds.record_ids == meta["records"]  # the old records list
    meta_file.write_text(json.dumps({**old, "patient_ids": ["a"]}))
    with pytest.raises(DatasetError, match=r"patient_ids must be a list of one id per beat \(10\), got 1"):
        load_dataset(tmp_path / "ds")
