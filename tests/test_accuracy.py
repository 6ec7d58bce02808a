"""The product's accuracy promise on held-out synthetic data (issue #2): AUROC >= 0.95 per class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import TrainConfig
from training.data.synth import synthesize_dataset
from training.models import ModelConfig
from training.train import METRICS_FILE, seed_dir, train_run


@pytest.mark.slow
def test_small_configuration_reaches_auroc_095_on_every_class(tmp_path: Path) -> None:
    data = synthesize_dataset(tmp_path / "data", 4000, seed=7, show_progress=False)
    small = ModelConfig(widths=(16, 32, 32, 64))
    train_run(data, [0], tmp_path / "run", small, TrainConfig(max_epochs=12), show_progress=False)
    metrics = json.loads((seed_dir(tmp_path / "run", 0) / METRICS_FILE).read_text())
    aurocs = {c["key"]: c["test_auroc"] for c in metrics["classes"]}
    assert all(a is not None and a >= 0.95 for a in aurocs.values()), aurocs
