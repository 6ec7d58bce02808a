"""Training mechanics: determinism, split, early stopping, checkpoints, config files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgx.core.dataset import load_dataset
from ecgx.training.checkpoint import load_checkpoint
from ecgx.training.config import TrainConfig, load_config
from ecgx.training.models import ModelConfig
from ecgx.training.train import CHECKPOINT_FILE, METRICS_FILE, RUN_FILE, make_split, seed_dir, train_run

TINY = ModelConfig(widths=(8, 16), kernel_size=5, stem_stride=4)
FAST = TrainConfig(max_epochs=2, batch_size=32)


def _state(run: Path, seed: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(seed_dir(run, seed) / CHECKPOINT_FILE)[1]["state_dict"]


def test_same_seed_gives_identical_weights_and_different_seeds_differ(
    small_synth: Path, tmp_path: Path
) -> None:
    train_run(small_synth, [0, 1], tmp_path / "a", TINY, FAST, show_progress=False)
    train_run(small_synth, [0], tmp_path / "b", TINY, FAST, show_progress=False)
    a0, a1, b0 = _state(tmp_path / "a", 0), _state(tmp_path / "a", 1), _state(tmp_path / "b", 0)
    for k in a0:
        assert torch.equal(a0[k], b0[k]), f"{k} differs between two runs of seed 0"
    assert any(not torch.equal(a0[k], a1[k]) for k in a0 if a0[k].is_floating_point())


def test_run_writes_checkpoint_metrics_and_summary(small_synth: Path, tmp_path: Path) -> None:
    summary = train_run(small_synth, [3], tmp_path / "run", TINY, FAST, show_progress=False)
    metrics = json.loads((seed_dir(tmp_path / "run", 3) / METRICS_FILE).read_text())
    assert [c["key"] for c in metrics["classes"]] == [
        "SR",
        "STach",
        "SBrad",
        "AF",
        "IAVB",
        "LBBB",
        "RBBB",
        "LVH",
        "STT",
    ]
    for c in metrics["classes"]:
        assert c["test_auroc"] is None or 0.0 <= c["test_auroc"] <= 1.0
    assert metrics["split"] == {"seed": 0, "by": "beat", "train": 420, "val": 90, "test": 90}
    assert metrics["data"]["fingerprint"] == summary["data"]["fingerprint"]
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["seeds"]["3"]["best_epoch"] >= 1

    model, ckpt = load_checkpoint(seed_dir(tmp_path / "run", 3) / CHECKPOINT_FILE)
    assert ckpt["model_config"] == TINY.to_dict() and ckpt["seed"] == 3
    x = torch.from_numpy(np.array(load_dataset(small_synth).signals[:4]))
    assert model(x).shape == (4, 9)


def test_existing_models_are_not_overwritten(small_synth: Path, tmp_path: Path) -> None:
    train_run(small_synth, [0], tmp_path / "run", TINY, FAST, show_progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_run(small_synth, [0], tmp_path / "run", TINY, FAST, show_progress=False)


def test_early_stopping_stops_when_validation_loss_stalls(small_synth: Path, tmp_path: Path) -> None:
    # No later epoch can beat the first by min_delta, so training must stop after `patience` more.
    stalled = TrainConfig(max_epochs=10, min_delta=1e6, patience=2, batch_size=64)
    train_run(small_synth, [0], tmp_path / "run", TINY, stalled, show_progress=False)
    metrics = json.loads((seed_dir(tmp_path / "run", 0) / METRICS_FILE).read_text())
    assert metrics["best_epoch"] == 1
    assert metrics["epochs_run"] == 3


def test_split_depends_only_on_split_seed() -> None:
    a, b = make_split(1000, TrainConfig(split_seed=5)), make_split(1000, TrainConfig(split_seed=5))
    c = make_split(1000, TrainConfig(split_seed=6))
    assert all(
        np.array_equal(x, y) for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True)
    )
    assert not np.array_equal(a.test, c.test)
    together = np.concatenate([a.train, a.val, a.test])
    assert np.array_equal(np.sort(together), np.arange(1000))
    with pytest.raises(ValueError, match="too small"):
        make_split(2, TrainConfig())


def test_bad_seeds_are_refused(small_synth: Path, tmp_path: Path) -> None:
    for seeds, message in (([], "at least one seed"), ([1, 1], "distinct"), ([-1], ">= 0")):
        with pytest.raises(ValueError, match=message):
            train_run(small_synth, seeds, tmp_path / "run", TINY, FAST, show_progress=False)


def test_config_file(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[model]\nresidual = true\nwidths = [16, 32]\n[train]\nmax_epochs = 3\n")
    model_cfg, train_cfg = load_config(good)
    assert model_cfg.residual and model_cfg.widths == (16, 32) and train_cfg.max_epochs == 3
    for text, message in (
        ("[model]\ndepth = 3\n", "unknown model setting"),
        ("[optimiser]\nlr = 1\n", "unknown table"),
        ("[train]\nbatch_size = 0\n", "batch_size must be >= 1"),
        ("[train\n", "not valid TOML"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_config(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_non_checkpoint_files_are_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not an ecgx checkpoint, or it is corrupt"):
        load_checkpoint(bogus)
    torch.save({"weights": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match="not an ecgx checkpoint"):
        load_checkpoint(bogus)


def test_split_by_patient_keeps_each_patient_on_one_side() -> None:
    patients = [f"P{i % 37}" for i in range(1000)]
    a = make_split(1000, TrainConfig(split_seed=5), patients)
    b = make_split(1000, TrainConfig(split_seed=5), patients)
    assert all(
        np.array_equal(x, y) for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True)
    )
    sides = [{patients[i] for i in part} for part in (a.train, a.val, a.test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert np.array_equal(np.sort(np.concatenate([a.train, a.val, a.test])), np.arange(1000))
    assert min(a.sizes().values()) > 0
    assert not np.array_equal(a.test, make_split(1000, TrainConfig(split_seed=6), patients).test)
    # One beat per patient is the beat split exactly: old runs keep their split.
    plain, singletons = (
        make_split(1000, TrainConfig(split_seed=5)),
        make_split(1000, TrainConfig(split_seed=5), [str(i) for i in range(1000)]),
    )
    assert all(
        np.array_equal(x, y)
        for x, y in zip((plain.train, plain.test), (singletons.train, singletons.test), strict=True)
    )
    with pytest.raises(ValueError, match="2 patient"):
        make_split(10, TrainConfig(), ["a"] * 5 + ["b"] * 5)


def test_a_run_records_its_training_split_beside_each_checkpoint(small_synth: Path, tmp_path: Path) -> None:
    from ecgx.core.dataset import beat_sha256
    from ecgx.training.train import TRAINING_BEATS_FILE, TRAINING_IDS_FILE, split_dataset

    train_run(small_synth, [0], tmp_path / "run", TINY, FAST, show_progress=False)
    ds = load_dataset(small_synth)
    split = split_dataset(ds, FAST)
    hashes = (seed_dir(tmp_path / "run", 0) / TRAINING_BEATS_FILE).read_text().split()
    assert hashes == sorted(set(beat_sha256(ds.signals[split.train])))
    assert not set(hashes) & set(beat_sha256(ds.signals[split.test]))
    ids = json.loads((seed_dir(tmp_path / "run", 0) / TRAINING_IDS_FILE).read_text())
    assert ids["split_by"] == "beat" and ids["patient_ids"] is None  # synthetic data names no patients
    metrics = json.loads((seed_dir(tmp_path / "run", 0) / METRICS_FILE).read_text())
    assert metrics["split"]["by"] == "beat"
