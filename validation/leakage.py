"""The leakage guard: the gate refuses validation ECGs the model was trained on.

A verdict on training data says how a method explains beats the model has memorised, not
the beats it will see in use. A package exported from a training run records its training
split (``training/export/package_writer.py``): the SHA-256 of every training beat's float32 bytes
(``training_beats.sha256``) and the split's record and patient ids (``training_ids.json``),
both listed with their hashes in the manifest. Before any computation the gate compares the
selected validation ECGs with them: an identical signal, a shared record or a shared patient
is a refusal (:class:`LeakageError`). A package exported before the manifest kept this record
cannot be checked: the gate says so in the report's warnings instead of refusing.

NumPy and hashlib only: no PyTorch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecgx.core.dataset import Dataset, beat_sha256
from ecgx.core.errors import InvalidArgument
from ecgx.core.package_reader import ModelPackage, PackageError, read_package_file

_LISTED = 5  # ids named in one message


class LeakageError(InvalidArgument):
    """The validation data overlaps the gated package's training data."""


@dataclass(frozen=True)
class TrainingData:
    """What a package records of its training split."""

    beats: frozenset[str]  # SHA-256 of each training beat
    record_ids: frozenset[str] | None  # None: the training data named no records
    patient_ids: frozenset[str] | None
    split_by: str | None  # "patient" or "beat"


def training_data(package: ModelPackage) -> TrainingData | None:
    """The training split recorded in ``package``, or None for a package exported without one.

    The files are read again and checked against the manifest's SHA-256 (PackageError when they
    differ: the package was modified)."""
    entry = package.manifest.get("training_data")
    if not isinstance(entry, dict):
        return None
    beats = _read_checked(package, entry["beats_file"]).decode("ascii", errors="replace").split()
    try:
        ids = json.loads(_read_checked(package, entry["ids_file"]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{package.path}: {entry['ids_file']} is not valid JSON: {e}") from None
    return TrainingData(
        beats=frozenset(beats),
        record_ids=_ids(ids.get("record_ids")),
        patient_ids=_ids(ids.get("patient_ids")),
        split_by=ids.get("split_by"),
    )


def _read_checked(package: ModelPackage, name: str) -> bytes:
    data = read_package_file(package.path, name)
    if hashlib.sha256(data).hexdigest() != package.manifest["files"][name]["sha256"]:
        raise PackageError(
            f"{package.path}: {name} does not match its SHA-256 in the manifest; the package was modified"
        )
    return data


def _ids(values: Any) -> frozenset[str] | None:
    return None if values is None else frozenset(str(v) for v in values)


def training_overlap(
    package: ModelPackage, dataset: Dataset, selected_rows: Sequence[int] | np.ndarray
) -> list[str]:
    """How the ECGs ``selected_rows`` of ``dataset`` overlap ``package``'s training data, in words
    (empty: no overlap, or a package that records no training data; see :func:`training_data`).

    Checks identical signals (bit for bit, float32), shared record ids and shared patient ids."""
    train = training_data(package)
    if train is None:
        return []
    rows = np.sort(np.asarray(selected_rows, dtype=np.int64))
    problems = []
    hashes = beat_sha256(np.asarray(dataset.signals[rows], dtype=np.float32))
    same = sum(h in train.beats for h in hashes)
    if same:
        problems.append(
            f"{same} of {len(rows)} validation ECGs are beats the model was trained on (identical signals)"
        )
    for what, known, ids in (
        ("records", train.record_ids, dataset.record_ids),
        ("patients", train.patient_ids, dataset.patient_ids),
    ):
        if known is None or ids is None:
            continue
        shared = sorted({ids[i] for i in rows} & known)
        if shared:
            more = f" and {len(shared) - _LISTED} more" if len(shared) > _LISTED else ""
            problems.append(f"{what} {', '.join(shared[:_LISTED])}{more} appear in the training split")
    return problems


def check_leakage(
    package: ModelPackage, dataset: Dataset, selected_rows: Sequence[int] | np.ndarray
) -> list[str]:
    """Refuse (:class:`LeakageError`) validation ECGs that overlap the training data; return the
    warnings for the report (a package that records no training data cannot be checked)."""
    if training_data(package) is None:
        return [
            f"package {package.path} records no training data (exported before the leakage guard, or "
            "without its training run), so the gate could not check that the validation ECGs are not "
            "beats the model was trained on; export it again from its checkpoint to record them"
        ]
    problems = training_overlap(package, dataset, selected_rows)
    if problems:
        raise LeakageError(
            f"validation data {dataset.path} overlaps the training data of package {package.path}: "
            f"{'; '.join(problems)}. A verdict on training data says nothing about beats the model has "
            "not seen: gate on held-out data (another dataset, or ECGs of other patients)"
        )
    return []


def leakage_record(package: ModelPackage) -> dict[str, Any]:
    """What the report says about the guard: whether it could check, and against how much."""
    train = training_data(package)
    if train is None:
        return {"checked": False, "training_beats": None, "split_by": None}
    return {
        "checked": True,
        "training_beats": len(train.beats),
        "training_patients": None if train.patient_ids is None else len(train.patient_ids),
        "split_by": train.split_by,
    }
