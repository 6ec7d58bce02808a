"""Human-readable summary of a training run (per-class test AUROC per seed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ecgx.core.schema import CLASSES
from ecgx.training.train import METRICS_FILE, seed_dir


def read_seed_metrics(run_dir: Path, seeds: Sequence[int]) -> dict[int, dict]:
    """metrics.json of every seed that has one."""
    found = {}
    for s in seeds:
        path = seed_dir(run_dir, s) / METRICS_FILE
        if path.is_file():
            found[s] = json.loads(path.read_text())
    return found


def format_training_summary(run_dir: Path, seeds: Sequence[int]) -> str:
    """A table: one row per class, one column per seed, test AUROC."""
    metrics = read_seed_metrics(run_dir, seeds)
    if not metrics:
        return f"no trained seeds found in {run_dir}"
    cols = sorted(metrics)
    head = f"{'class':8s}{'SNOMED':>11s}  " + "".join(f"{'seed ' + str(s):>9s}" for s in cols)
    lines = [f"Test AUROC per class ({run_dir})", head, "-" * len(head)]
    for i, c in enumerate(CLASSES):
        cells = "".join(_cell(metrics[s]["classes"][i]["test_auroc"]) for s in cols)
        lines.append(f"{c.key:8s}{c.code:>11s}  {cells}")
    lines.append("-" * len(head))
    lines.append(f"{'min':19s}  " + "".join(_cell(metrics[s]["min_test_auroc"]) for s in cols))
    lines.append(f"{'mean':19s}  " + "".join(_cell(metrics[s]["mean_test_auroc"]) for s in cols))
    lines.append(f"{'epochs':19s}  " + "".join(f"{metrics[s]['epochs_run']:9d}" for s in cols))
    lines.append(f"{'train s':19s}  " + "".join(f"{metrics[s]['train_seconds']:9.0f}" for s in cols))
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{value:9.4f}" if value is not None else f"{'n/a':>9s}"
