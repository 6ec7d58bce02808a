"""The product's accuracy promise on held-out synthetic data (issues #2 and #10).

Generator 2.0 (issue #10) makes the classes overlap as real ECGs do: labels follow
clinical cuts through continuous quantities, with borderline beats on both sides, so
the hard classes land where published 12-lead models land on real data (about
0.85-0.97), not at 1.0. Per-class test AUROC of this configuration, measured
2026-11-25 (data seed 7; data seed 8 in brackets):

    SR 0.943 (0.939)  STach 0.993 (0.991)  SBrad 0.948 (0.964)  AF 0.9998 (0.9995)
    IAVB 0.945 (0.965)  LBBB 0.996 (0.995)  RBBB 0.997 (0.999)  LVH 0.920 (0.933)
    STT 0.864 (0.858)

(generator 1.0: every class 0.966-1.0, LBBB, RBBB and STach at 1.0). The floors sit
about 0.03-0.04 below the measurement; the ceilings on the hard classes check that the
data did not become trivially separable again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ecgx.training.config import TrainConfig
from ecgx.training.data.synth import synthesize_dataset
from ecgx.training.models import ModelConfig
from ecgx.training.train import METRICS_FILE, seed_dir, train_run

FLOORS = {
    "SR": 0.90,
    "STach": 0.96,
    "SBrad": 0.91,
    "AF": 0.97,
    "IAVB": 0.90,
    "LBBB": 0.97,
    "RBBB": 0.97,
    "LVH": 0.87,
    "STT": 0.82,
}
HARD_CEILING = 0.985  # SR, SBrad, IAVB, LVH, STT: borderline beats keep them off 1.0
HARD = ("SR", "SBrad", "IAVB", "LVH", "STT")


@pytest.mark.slow
def test_small_configuration_reaches_the_per_class_floors(tmp_path: Path) -> None:
    data = synthesize_dataset(tmp_path / "data", 4000, seed=7, show_progress=False)
    small = ModelConfig(widths=(16, 32, 32, 64))
    train_run(data, [0], tmp_path / "run", small, TrainConfig(max_epochs=12), show_progress=False)
    metrics = json.loads((seed_dir(tmp_path / "run", 0) / METRICS_FILE).read_text())
    aurocs = {c["key"]: c["test_auroc"] for c in metrics["classes"]}
    assert set(aurocs) == set(FLOORS), aurocs
    assert all(aurocs[k] is not None and aurocs[k] >= floor for k, floor in FLOORS.items()), aurocs
    assert all(aurocs[k] < HARD_CEILING for k in HARD), aurocs
