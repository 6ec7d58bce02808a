"""The dataset folder format: round trip, memory mapping, and validation messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ecgx.core.dataset import (
    DatasetError,
    DatasetWriter,
    dataset_fingerprint,
    default_meta,
    load_dataset,
    write_dataset,
)


def _arrays(n: int = 5):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.2, (n, 12, 600)).astype(np.float32)
    y = (rng.random((n, 9)) < 0.3).astype(np.uint8)
    m = np.zeros((n, 12, 600), np.uint16)
    m[:, 1, 200:300] = 1 << 4
    return x, y, m


def test_round_trip_is_memory_mapped(tmp_path: Path) -> None:
    x, y, m = _arrays()
    write_dataset(tmp_path / "d", x, y, default_meta("test", seed=3), masks=m)
    ds = load_dataset(tmp_path / "d")
    assert isinstance(ds.signals, np.memmap)
    np.testing.assert_array_equal(ds.signals, x)
    np.testing.assert_array_equal(ds.labels, y)
    np.testing.assert_array_equal(ds.masks, m)
    assert ds.meta["n"] == 5 and ds.meta["seed"] == 3 and len(ds) == 5


def test_existing_folder_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    x, y, _ = _arrays()
    write_dataset(tmp_path / "d", x, y, default_meta("test"))
    with pytest.raises(DatasetError, match="already exists"):
        write_dataset(tmp_path / "d", x[:2], y[:2], default_meta("test"))
    assert len(load_dataset(tmp_path / "d")) == 5  # untouched
    write_dataset(tmp_path / "d", x[:2], y[:2], default_meta("test"), overwrite=True)
    assert len(load_dataset(tmp_path / "d")) == 2


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    x, y, _ = _arrays()
    with pytest.raises(RuntimeError), DatasetWriter(tmp_path / "d", 5, default_meta("test")) as w:
        w.write(x[:2], y[:2])
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_short_write_is_refused(tmp_path: Path) -> None:
    x, y, _ = _arrays()
    w = DatasetWriter(tmp_path / "d", 5, default_meta("test"))
    w.write(x[:3], y[:3])
    with pytest.raises(DatasetError, match="only 3 of 5"):
        w.close()
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
        (lambda d: (d / "meta.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "labels.npy").unlink(), "labels.npy is missing"),
        (lambda d: np.save(d / "signals.npy", np.zeros((5, 12, 500), np.float32)), r"shape \(5, 12, 500\)"),
        (lambda d: np.save(d / "signals.npy", np.zeros((5, 12, 600), np.float64)), "dtype float64"),
        (lambda d: np.save(d / "labels.npy", np.zeros((4, 9), np.uint8)), r"shape \(4, 9\)"),
        (lambda d: (d / "signals.npy").write_bytes(b"garbage"), "not a readable .npy"),
    ],
)
def test_malformed_folders_are_named(tmp_path: Path, corrupt, message: str) -> None:
    x, y, _ = _arrays()
    d = write_dataset(tmp_path / "d", x, y, default_meta("test"))
    corrupt(d)
    with pytest.raises(DatasetError, match=message):
        load_dataset(d)


def test_bad_values_are_named_with_the_beat(tmp_path: Path) -> None:
    x, y, _ = _arrays()
    x[3, 2, 10] = np.nan
    with pytest.raises(DatasetError, match="beat 3 holds NaN"):
        write_dataset(tmp_path / "d", x, y, default_meta("test"))
    assert not (tmp_path / "d").exists(), "an invalid dataset must never be published"
    x[3, 2, 10] = 0
    x[1] *= 1000  # microvolts stored as millivolts
    with pytest.raises(DatasetError, match="beat 1 exceeds"):
        write_dataset(tmp_path / "d", x, y, default_meta("test"))
    x[1] /= 1000
    y[2, 0] = 7
    with pytest.raises(DatasetError, match="beat 2 has a label other than 0 or 1"):
        write_dataset(tmp_path / "d", x, y, default_meta("test"))


def test_meta_must_match_the_product_schema(tmp_path: Path) -> None:
    x, y, _ = _arrays()
    d = write_dataset(tmp_path / "d", x, y, default_meta("test"))
    meta = json.loads((d / "meta.json").read_text())
    meta["leads"] = meta["leads"][::-1]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="leads must be"):
        load_dataset(d)


def test_fingerprint_follows_content(tmp_path: Path) -> None:
    x, y, _ = _arrays()
    a = load_dataset(write_dataset(tmp_path / "a", x, y, default_meta("test")))
    b = load_dataset(write_dataset(tmp_path / "b", x, y, default_meta("test")))
    y[0, 0] ^= 1
    c = load_dataset(write_dataset(tmp_path / "c", x, y, default_meta("test")))
    assert dataset_fingerprint(a) == dataset_fingerprint(b) != dataset_fingerprint(c)
