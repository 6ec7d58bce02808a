"""ECG documents (DICOM, HL7 aECG, GE MUSE, Philips Sierra, FHIR) into a dataset folder of median beats.

``ecgx data import FILE... [--format F]``: each file is read by
:func:`ecgx.core.ecg_formats.read_ecg_document` and turned into the project's (12, 600) median beat
at 500 Hz by the serving path's own code (:func:`ecgx.service.ecg_input.decode_document`: the
document's median beat when it holds one at 500 Hz and 600 samples, else the median beat of its
rhythm strip, with the same lead, amplitude and strip checks), so a dataset imported here holds
exactly what the server would explain. Documents carry no diagnosis codes the importer trusts:
the beats are imported unlabelled (all-zero labels). Unreadable files are skipped with their
reason, as ``import-wfdb`` does; if none is usable nothing is written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ecgx.core.dataset import DatasetError, default_meta, write_dataset
from ecgx.core.ecg_formats import FORMATS, read_document_file
from ecgx.core.errors import InvalidArgument
from ecgx.core.outputs import DATASET, OutputError, check_output
from ecgx.core.progress import progress
from ecgx.core.schema import LEADS, N_CLASSES
from ecgx.service.ecg_input import DocumentBytes, ModelInput, decode_document

log = logging.getLogger(__name__)
_MAX_LISTED = 10


class DocumentImportError(InvalidArgument):
    """No usable document, or a bad argument."""


@dataclass
class DocumentImportReport:
    out: Path
    imported: list[str] = field(default_factory=list)
    waveforms: list[str] = field(default_factory=list)  # "median_beat" or "rhythm_strip", per import
    skipped: list[tuple[str, str]] = field(default_factory=list)


def document_beat(path: Path, fmt: str | None = None) -> tuple[np.ndarray, str, str]:
    """(12, 600) float32 mV median beat of one document file, what it was made from, and its format."""
    data, fmt = read_document_file(path, fmt)
    beat, waveform = decode_document(DocumentBytes(fmt, data), LEADS, ModelInput(), where=fmt)
    return beat, waveform, fmt


def import_documents(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    fmt: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> DocumentImportReport:
    """Turn ECG document files into a dataset folder of median beats at ``out``."""
    out = Path(out)
    try:
        check_output(out, DATASET, overwrite=overwrite)  # fail before the work, not after
    except OutputError as e:
        raise DatasetError(str(e)) from None
    if fmt is not None and fmt not in FORMATS:
        raise DocumentImportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    report = DocumentImportReport(out)
    beats, paths_used = [], []
    for path in progress([Path(p) for p in paths], total=len(paths), desc="import", enabled=show_progress):
        try:
            beat, waveform, _ = document_beat(path, fmt)
        except (InvalidArgument, OSError) as e:
            report.skipped.append((path.name, " ".join(str(e).split())))
            continue
        beats.append(beat)
        paths_used.append(str(path))
        report.imported.append(path.stem)
        report.waveforms.append(waveform)
    if not beats:
        reasons = "; ".join(f"{n}: {r}" for n, r in report.skipped[:_MAX_LISTED])
        raise DocumentImportError(f"no usable ECG document among {len(paths)}: {reasons or 'none given'}")
    if report.skipped:
        log.warning(
            "skipped %d of %d document(s), reasons kept in meta.json", len(report.skipped), len(paths)
        )
    meta = default_meta(
        "documents",
        records=report.imported,
        record_paths=paths_used,
        record_ids=report.imported,
        patient_ids=report.imported,
        input_waveforms=report.waveforms,
        skipped=[list(s) for s in report.skipped],
        unlabelled_records=report.imported,
        has_ground_truth=False,
    )
    labels = np.zeros((len(beats), N_CLASSES), np.uint8)
    report.out = write_dataset(out, np.stack(beats), labels, meta, overwrite=overwrite)
    return report


__all__ = ["DocumentImportError", "DocumentImportReport", "document_beat", "import_documents"]
