"""The viewer's sample ECGs (service/viewer_assets/samples/) are synthetic median beats from the
project's own generator (ground truth known, no patient data shipped): this test recomputes them
and compares. Real records stay in ../shared/data and are never copied into the package.

Run ``python tests/service/test_viewer_samples.py`` to write them again (after a change to the
generator)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "service" / "viewer_assets" / "samples"
SEED, COUNT = 20261206, 64
# Beats of that draw with distinct findings: index -> what the generator put in it.
PICKS = (0, 10, 2)
SOURCE = (
    "synthetic median beat {i} of ecgx.training.data.synth.generate({count}, "
    "numpy.random.default_rng({seed})): no patient data"
)


def sample_documents() -> dict[str, dict]:
    """File name -> JSON document of each sample, and the index."""
    from ecgx.core.schema import CLASSES, LEADS
    from ecgx.training.data.synth import generate

    batch = generate(COUNT, np.random.default_rng(SEED))
    docs: dict[str, dict] = {}
    index = []
    for i in PICKS:
        found = [c for c, on in zip(CLASSES, batch.labels[i], strict=True) if on]
        name = "synthetic-" + "-".join(c.key for c in found)
        docs[f"{name}.json"] = {
            "id": name,
            "title": f"synthetic beat: {', '.join(c.name for c in found)}",
            "source": SOURCE.format(i=i, count=COUNT, seed=SEED),
            "dx_snomed": [c.code for c in found],
            "leads": list(LEADS),
            "sampling_rate_hz": 500,
            "units": "mV",
            "kind": "median beat",
            "samples": np.round(np.asarray(batch.signals[i], dtype=np.float64), 3).tolist(),
        }
        index.append({"id": name, "title": docs[f"{name}.json"]["title"], "file": f"{name}.json"})
    docs["index.json"] = {"samples": index}
    return docs


def _text(doc: dict) -> str:
    return json.dumps(doc, separators=(",", ":")) + "\n"


def test_the_shipped_samples_are_the_generators_beats() -> None:
    docs = sample_documents()
    assert sorted(p.name for p in SAMPLES.glob("*.json")) == sorted(docs)
    for name, doc in docs.items():
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
    for old in SAMPLES.glob("*.json"):
        old.unlink()
    for name, doc in sample_documents().items():
        (SAMPLES / name).write_text(_text(doc))
        print("wrote", SAMPLES / name, file=sys.stderr)
