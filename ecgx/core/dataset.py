"""The dataset folder format: write it atomically, read it memory-mapped, validate it.

A dataset folder holds

- ``signals.npy`` (N, 12, 600) float32, millivolts, R peak at ``R_PEAK_SAMPLE``;
- ``labels.npy``  (N, 9) uint8, 0/1, class order of ``meta.json``;
- ``masks.npy``   (N, 12, 600) uint16, bit c set where class c's feature lies
  (all zero for real data, which has no ground truth);
- ``meta.json``   lead names, sampling rate, classes, source, generator version, seed, and
  optionally ``record_ids`` / ``patient_ids``: one text per beat naming the recording and the
  patient it came from (the WFDB import writes both; synthetic data has neither, and each of
  its beats is its own patient). Training splits by patient, and the gate's leakage guard
  compares them with the training split of the gated package.

Arrays are read with ``mmap_mode="r"`` so a study-sized set (hundreds of
thousands of beats, tens of GB) is never loaded whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecgx.core.errors import InvalidArgument
from ecgx.core.outputs import DATASET, OutputError, StagedOutput
from ecgx.core.schema import BEAT_SAMPLES, CLASSES, LEADS, N_CLASSES, N_LEADS, SAMPLING_RATE_HZ

FORMAT_VERSION = 1
SIGNALS_FILE = "signals.npy"
LABELS_FILE = "labels.npy"
MASKS_FILE = "masks.npy"
META_FILE = "meta.json"
RECORD_IDS = "record_ids"  # meta.json keys: one text per beat, optional
PATIENT_IDS = "patient_ids"
# Values beyond this are not an ECG (a 12-lead ECG rarely exceeds ~5 mV): a units
# mistake (µV stored as mV) or a corrupt file, and training on them would be silent garbage.
MAX_ABS_MV = 50.0
_CHECK_CHUNK = 4096  # beats per chunk when scanning memory-mapped arrays


class DatasetError(InvalidArgument):
    """A dataset folder is missing, malformed or holds values that are not an ECG dataset."""


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset folder. Arrays are read-only memory maps unless loaded in memory."""

    path: Path
    signals: np.ndarray  # (N, 12, 600) float32 mV
    labels: np.ndarray  # (N, 9) uint8
    masks: np.ndarray  # (N, 12, 600) uint16 class bit-masks
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.signals.shape[0])

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.meta.get("has_ground_truth", False))

    @property
    def record_ids(self) -> list[str] | None:
        """The recording of each beat, or None when the source does not say.

        Datasets written before ``record_ids`` existed fall back to the WFDB import's
        ``records`` list (one name per beat, in beat order)."""
        ids = self.meta.get(RECORD_IDS)
        records = self.meta.get("records")
        if ids is None and isinstance(records, list) and len(records) == len(self):
            ids = records
        return None if ids is None else [str(i) for i in ids]

    @property
    def patient_ids(self) -> list[str] | None:
        """The patient of each beat, or None when the source does not say (each beat its own patient)."""
        ids = self.meta.get(PATIENT_IDS)
        return None if ids is None else [str(i) for i in ids]


def default_meta(source: str, **extra: Any) -> dict[str, Any]:
    """The ``meta.json`` fields every dataset folder carries, plus source-specific extras."""
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "leads": list(LEADS),
        "sampling_rate_hz": SAMPLING_RATE_HZ,
        "beat_samples": BEAT_SAMPLES,
        "classes": [{"key": c.key, "code": c.code, "name": c.name} for c in CLASSES],
        "source": source,
    }
    meta.update(extra)
    return meta


class DatasetWriter:
    """Write a dataset folder chunk by chunk, so size is bounded by disk, not memory.

    Files go to a temporary folder beside ``out`` and are renamed into place only
    when :meth:`close` succeeds and the folder reads back valid (:mod:`ecgx.core.outputs`):
    an interrupted write never leaves a half dataset, and an existing folder is only
    replaced when asked and only if it is a dataset folder.
    """

    def __init__(self, out: Path | str, n: int, meta: dict[str, Any], overwrite: bool = False):
        self.out = Path(out)
        if n < 0:
            raise DatasetError(f"number of beats must be >= 0, got {n}")
        try:
            self._stage = StagedOutput(self.out, DATASET, overwrite=overwrite)
        except OutputError as e:  # callers catch DatasetError for everything about a dataset folder
            raise DatasetError(str(e)) from None
        self._tmp = self._stage.path
        self.n = n
        self.meta = {**meta, "n": n}
        self._pos = 0
        shape = (n, N_LEADS, BEAT_SAMPLES)
        open_mm = np.lib.format.open_memmap
        try:
            self._signals = open_mm(self._tmp / SIGNALS_FILE, "w+", np.float32, shape)
            self._labels = open_mm(self._tmp / LABELS_FILE, "w+", np.uint8, (n, N_CLASSES))
            self._masks = open_mm(self._tmp / MASKS_FILE, "w+", np.uint16, shape)
        except BaseException:
            self.abort()
            raise

    def write(self, signals: np.ndarray, labels: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Append a chunk of beats."""
        k = len(signals)
        if self._pos + k > self.n:
            raise DatasetError(f"writing {k} more beats would exceed the declared {self.n}")
        sl = slice(self._pos, self._pos + k)
        self._signals[sl] = signals
        self._labels[sl] = labels
        self._masks[sl] = 0 if masks is None else masks
        self._pos += k

    def close(self) -> Path:
        """Flush, validate and move the folder into place; returns its path."""
        try:
            if self._pos != self.n:
                raise DatasetError(f"only {self._pos} of {self.n} declared beats were written")
            for arr in (self._signals, self._labels, self._masks):
                arr.flush()
            del self._signals, self._labels, self._masks
            (self._tmp / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")
            load_dataset(self._tmp)  # never publish a folder we could not read back
            self._stage.commit()
        except BaseException:
            self.abort()
            raise
        return self.out

    def abort(self) -> None:
        self._stage.abort()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


def write_dataset(
    out: Path | str,
    signals: np.ndarray,
    labels: np.ndarray,
    meta: dict[str, Any],
    masks: np.ndarray | None = None,
    overwrite: bool = False,
) -> Path:
    """Write in-memory arrays as a dataset folder (see :class:`DatasetWriter`)."""
    writer = DatasetWriter(out, len(signals), meta, overwrite=overwrite)
    with writer:
        writer.write(signals, labels, masks)
    return writer.close()


def load_dataset(path: Path | str, mmap: bool = True, check_values: bool = True) -> Dataset:
    """Open and validate a dataset folder.

    ``check_values`` scans every value (chunked, so memory stays bounded) for
    non-finite or absurd amplitudes and labels outside {0, 1}; switch it off
    only for a folder that was already validated.
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist or is not a folder")
    meta = _read_meta(path)
    mode = "r" if mmap else None
    signals = _read_array(path, SIGNALS_FILE, np.float32, (N_LEADS, BEAT_SAMPLES), mode)
    n = signals.shape[0]
    labels = _read_array(path, LABELS_FILE, np.uint8, (N_CLASSES,), mode, n)
    masks = _read_array(path, MASKS_FILE, np.uint16, (N_LEADS, BEAT_SAMPLES), mode, n)
    if "n" in meta and meta["n"] != n:
        raise DatasetError(f"{path / META_FILE} says n={meta['n']} but {SIGNALS_FILE} holds {n} beats")
    _check_ids(path, meta, n)
    if check_values:
        _check_values(path, signals, labels, masks)
    return Dataset(path=path, signals=signals, labels=labels, masks=masks, meta=meta)


def iter_chunks(n: int, size: int = _CHECK_CHUNK) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise DatasetError(f"{path} is not a dataset folder: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path} must hold a JSON object")
    leads = meta.get("leads")
    if leads != list(LEADS):
        raise DatasetError(f"{meta_path}: leads must be {list(LEADS)}, got {leads}")
    codes = [c.get("code") for c in meta.get("classes", []) if isinstance(c, dict)]
    if codes != [c.code for c in CLASSES]:
        expected = [c.code for c in CLASSES]
        raise DatasetError(f"{meta_path}: classes must be {expected} in this order, got {codes}")
    rate = meta.get("sampling_rate_hz")
    if rate != SAMPLING_RATE_HZ:
        raise DatasetError(f"{meta_path}: sampling_rate_hz must be {SAMPLING_RATE_HZ}, got {rate}")
    return meta


def _check_ids(path: Path, meta: dict[str, Any], n: int) -> None:
    """``record_ids`` and ``patient_ids``, where present, are lists of N non-empty texts."""
    for key in (RECORD_IDS, PATIENT_IDS):
        ids = meta.get(key)
        if ids is None:
            continue
        if not isinstance(ids, list) or len(ids) != n:
            got = f"{len(ids)} entries" if isinstance(ids, list) else type(ids).__name__
            raise DatasetError(
                f"{path / META_FILE}: {key} must be a list of one id per beat ({n}), got {got}"
            )
        bad = next((i for i, v in enumerate(ids) if not isinstance(v, str) or not v), None)
        if bad is not None:
            raise DatasetError(f"{path / META_FILE}: {key}[{bad}] must be a non-empty text, got {ids[bad]!r}")


def beat_sha256(signals: np.ndarray) -> list[str]:
    """SHA-256 of each beat's float32 little-endian bytes: identical signals, identical hashes.

    The package manifest keeps these for the training split, and the gate's leakage guard
    compares them with the validation ECGs (:mod:`ecgx.validation.leakage`)."""
    out = []
    for sl in iter_chunks(len(signals)):
        block = np.ascontiguousarray(signals[sl], dtype="<f4")
        out += [hashlib.sha256(beat.tobytes()).hexdigest() for beat in block]
    return out


def _read_array(
    path: Path,
    name: str,
    dtype: type,
    tail: tuple[int, ...],
    mode: str | None,
    n: int | None = None,
) -> np.ndarray:
    file = path / name
    if not file.is_file():
        raise DatasetError(f"{file} is missing")
    try:
        arr = np.load(file, mmap_mode=mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{file} is not a readable .npy array: {e}") from None
    if arr.dtype != np.dtype(dtype):
        raise DatasetError(f"{file} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    expected = ("N", *tail) if n is None else (n, *tail)
    if arr.ndim != len(expected) or tuple(arr.shape[1:]) != tail or (n is not None and arr.shape[0] != n):
        raise DatasetError(f"{file} has shape {arr.shape}, expected {expected}")
    return arr


def _check_values(path: Path, signals: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> None:
    max_bit = np.uint16(1 << N_CLASSES)
    for sl in iter_chunks(len(signals)):
        block = np.asarray(signals[sl])
        finite = np.isfinite(block)
        if not finite.all():
            i = sl.start + int(np.argwhere(~finite.all(axis=(1, 2)))[0, 0])
            raise DatasetError(f"{path / SIGNALS_FILE}: beat {i} holds NaN or infinite values")
        big = np.abs(block).max(axis=(1, 2)) > MAX_ABS_MV
        if big.any():
            i = sl.start + int(np.argmax(big))
            raise DatasetError(
                f"{path / SIGNALS_FILE}: beat {i} exceeds {MAX_ABS_MV} mV; signals must be in millivolts"
            )
        lab = np.asarray(labels[sl])
        if (lab > 1).any():
            i = sl.start + int(np.argwhere((lab > 1).any(axis=1))[0, 0])
            raise DatasetError(f"{path / LABELS_FILE}: beat {i} has a label other than 0 or 1")
        if (np.asarray(masks[sl]) >= max_bit).any():
            raise DatasetError(f"{path / MASKS_FILE}: bits beyond the {N_CLASSES} classes are set")


def dataset_fingerprint(ds: Dataset, max_sampled_beats: int = 1024) -> str:
    """A SHA-256 that changes when the data changes, cheap even for tens of GB.

    It covers ``meta.json``, the array shapes, every label and an evenly strided
    sample of at most ``max_sampled_beats`` beats' signals (reading everything
    of a study-sized set would take minutes for a value recorded in reports).
    """
    h = hashlib.sha256()
    h.update(json.dumps(ds.meta, sort_keys=True).encode())
    h.update(repr((ds.signals.shape, ds.labels.shape, ds.masks.shape)).encode())
    for sl in iter_chunks(len(ds)):
        h.update(np.ascontiguousarray(ds.labels[sl]).tobytes())
    stride = max(1, -(-len(ds) // max_sampled_beats))
    h.update(np.ascontiguousarray(ds.signals[::stride]).tobytes())
    return h.hexdigest()
