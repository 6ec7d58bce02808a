"""``ecgx demo``: the whole pipeline on the built-in defaults.

Each step skips itself when its output already exists (unless ``overwrite``),
so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from training.config import TrainConfig
from training.data.synth import synthesize_dataset
from training.models import ModelConfig
from training.summary import format_training_summary
from training.train import CHECKPOINT_FILE, seed_dir, train_run

log = logging.getLogger(__name__)

DEMO_BEATS = 8000
DEMO_DATA_SEED = 0


def run_demo(
    out: Path,
    *,
    n: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    overwrite: bool = False,
    show_progress: bool = True,
) -> None:
    """Synthesise a dataset, train a seed family on it and print per-class test AUROC."""
    started = time.perf_counter()
    n = DEMO_BEATS if n is None else n
    data_dir, run_dir = out / "data", out / "runs"
    if overwrite or not (data_dir / "meta.json").is_file():
        log.info("step 1/2: generating %d synthetic beats into %s", n, data_dir)
        synthesize_dataset(data_dir, n, DEMO_DATA_SEED, overwrite=True, show_progress=show_progress)
    else:
        log.info("step 1/2: reusing dataset %s", data_dir)
    todo = [s for s in seeds if overwrite or not (seed_dir(run_dir, s) / CHECKPOINT_FILE).is_file()]
    if todo:
        log.info("step 2/2: training seeds %s into %s", todo, run_dir)
        train_run(
            data_dir, todo, run_dir, ModelConfig(), TrainConfig(), overwrite=True, show_progress=show_progress
        )
    else:
        log.info("step 2/2: reusing trained seeds in %s", run_dir)
    print(format_training_summary(run_dir, seeds))
    print(f"demo finished in {time.perf_counter() - started:.0f} s; outputs in {out}")
