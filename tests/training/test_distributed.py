"""Multi-process training with torchrun (DistributedDataParallel, gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ecgx.training.checkpoint import load_checkpoint
from ecgx.training.train import CHECKPOINT_FILE, METRICS_FILE, seed_dir


def test_torchrun_two_processes_on_cpu(small_synth: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text("[model]\nwidths = [8, 16]\nstem_stride = 4\n[train]\nmax_epochs = 2\n")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ecgx.cli",
        "train",
        "--data",
        str(small_synth),
        "--seeds",
        "0",
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(config),
        "--quiet",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((seed_dir(tmp_path / "run", 0) / METRICS_FILE).read_text())
    assert metrics["environment"]["world_size"] == 2
    # the cores are split between the two processes, not oversubscribed
    assert metrics["environment"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
    model, _ = load_checkpoint(seed_dir(tmp_path / "run", 0) / CHECKPOINT_FILE)
    assert model.classifier.out_features == 9
