"""The viewer's sample ECGs (service/viewer_assets/samples/) are the median beats the project's own
WFDB importer computes from the shared PTB-XL records: this test recomputes them and compares.

Run ``python tests/service/test_viewer_samples.py`` to write them again (after a change to the
importer or the median-beat code)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "ptbxl-sample"
SAMPLES = ROOT / "service" / "viewer_assets" / "samples"
RECORDS = {
    "HR06000": "T-wave abnormality, sinus rhythm",
    "HR06002": "sinus bradycardia, incomplete RBBB",
    "HR06003": "sinus tachycardia",
}
SOURCE = (
    "PTB-XL record {record} as redistributed in the PhysioNet/CinC Challenge 2021 (CC BY 4.0); "
    "median beat by ecgx's WFDB importer (training.data.wfdb_import.record_median_beat)"
)


def sample_documents() -> dict[str, dict]:
    """File name -> JSON document of each sample, and the index."""
    from ecgx.core.schema import LEADS
    from ecgx.training.data.wfdb_import import record_median_beat

    docs: dict[str, dict] = {}
    index = []
    for record, dx in RECORDS.items():
        beat, codes = record_median_beat(DATA / record)
        docs[f"{record}.json"] = {
            "id": record,
            "title": f"{record}: {dx}",
            "source": SOURCE.format(record=record),
            "dx_snomed": list(codes),
            "leads": list(LEADS),
            "sampling_rate_hz": 500,
            "units": "mV",
            "kind": "median beat",
            # Microvolt resolution, as the records themselves (gain 1000/mV).
            "samples": np.round(np.asarray(beat, dtype=np.float64), 3).tolist(),
        }
        index.append({"id": record, "title": docs[f"{record}.json"]["title"], "file": f"{record}.json"})
    docs["index.json"] = {"samples": index}
    return docs


def _text(doc: dict) -> str:
    return json.dumps(doc, separators=(",", ":")) + "\n"


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/ptbxl-sample")
def test_the_shipped_samples_are_the_importers_median_beats() -> None:
    for name, doc in sample_documents().items():
        shipped = json.loads((SAMPLES / name).read_text())
        if "samples" in doc and name != "index.json":
            assert np.allclose(shipped.pop("samples"), doc.pop("samples"), atol=1e-3), name
        assert shipped == doc, name


def test_every_sample_is_twelve_leads_of_a_median_beat() -> None:
    index = json.loads((SAMPLES / "index.json").read_text())["samples"]
    assert len(index) >= 3
    for entry in index:
        doc = json.loads((SAMPLES / entry["file"]).read_text())
        x = np.asarray(doc["samples"], dtype=np.float32)
        assert x.shape == (12, 600) and np.isfinite(x).all() and np.abs(x).max() < 10
        assert doc["leads"][:3] == ["I", "II", "III"]


if __name__ == "__main__":
    SAMPLES.mkdir(parents=True, exist_ok=True)
    for name, doc in sample_documents().items():
        (SAMPLES / name).write_text(_text(doc))
        print("wrote", SAMPLES / name, file=sys.stderr)
