"""Multi-seed training of the CNN family on a dataset folder.

One run trains the same configuration from several seeds (a *seed family*,
used by the gate's self-consistency check). The train/validation/test split
depends only on the split seed, so every member of a family is tested on the
same held-out beats. Batches are read from the memory-mapped arrays, so the
dataset size is bounded by disk, not memory.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ecgx
from ecgx.core.dataset import Dataset, beat_sha256, dataset_fingerprint, load_dataset
from ecgx.core.errors import InvalidArgument
from ecgx.core.outputs import (
    RUN,
    OutputError,
    StagedOutput,
    classify_output,
    temporary_sibling,
    write_text_atomic,
)
from ecgx.core.progress import progress
from ecgx.core.schema import CLASSES
from ecgx.training.auroc import per_class_auroc
from ecgx.training.checkpoint import save_checkpoint
from ecgx.training.config import TrainConfig
from ecgx.training.distributed import DistContext, broadcast_float, init_distributed, shutdown_distributed
from ecgx.training.models import ECGNet, ModelConfig, build_model

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
# What the model was trained on, beside each checkpoint; the export copies both into the package
# so the gate can refuse validation data that overlaps it (validation/leakage.py).
TRAINING_BEATS_FILE = "training_beats.sha256"  # SHA-256 of each training beat, sorted, one per line
TRAINING_IDS_FILE = "training_ids.json"  # record and patient ids of the training split


@dataclass(frozen=True)
class Split:
    """Sorted beat indices of each part (sorted: memory-mapped reads stay sequential)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def make_split(n: int, cfg: TrainConfig, groups: Sequence[str] | None = None) -> Split:
    """Random split fixed by ``cfg.split_seed``; every part gets at least one beat.

    ``groups`` (one patient id per beat) keeps all beats of a patient on one side: patients are
    shuffled and dealt to test, then validation, until each holds its share of beats; the rest
    train. Without groups every beat is its own patient, which gives the same split as before
    patient ids existed (old runs stay reproducible).
    """
    n_val = max(1, round(n * cfg.val_fraction))
    n_test = max(1, round(n * cfg.test_fraction))
    if n - n_val - n_test < 1:
        raise InvalidArgument(f"a dataset of {n} beats is too small to split into train/validation/test")
    if groups is None:
        perm = np.random.default_rng(cfg.split_seed).permutation(n)
        test, val, train = np.split(perm, [n_test, n_test + n_val])
        return Split(np.sort(train), np.sort(val), np.sort(test))
    return _split_by_group(n, cfg, groups, n_test, n_val)


def _split_by_group(n: int, cfg: TrainConfig, groups: Sequence[str], n_test: int, n_val: int) -> Split:
    if len(groups) != n:
        raise InvalidArgument(f"{len(groups)} patient ids for {n} beats; give one per beat")
    names, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    if len(names) < 3:
        raise InvalidArgument(
            f"the {n} beats come from {len(names)} patient(s); a split by patient needs at least 3 "
            "(one each for train, validation and test)"
        )
    # First-appearance order, so that one beat per patient reproduces the ungrouped split exactly.
    first = np.full(len(names), n)
    np.minimum.at(first, inverse, np.arange(n))
    order = np.argsort(first, kind="stable")  # group ids in first-appearance order
    sizes = np.bincount(inverse, minlength=len(names))
    dealt = order[np.random.default_rng(cfg.split_seed).permutation(len(names))]
    part = np.full(len(names), 2)  # 0 test, 1 validation, 2 train
    i = 0
    # Test, then validation, take whole patients until they hold their share of beats; each
    # leaves at least one patient for the parts after it.
    for p, want, keep in ((0, n_test, 2), (1, n_val, 1)):
        filled = 0
        while i < len(dealt) - keep and filled < want:
            part[dealt[i]] = p
            filled += sizes[dealt[i]]
            i += 1
    side = part[inverse]
    train, val, test = (np.flatnonzero(side == p) for p in (2, 1, 0))
    return Split(train, val, test)


def split_dataset(ds: Dataset, cfg: TrainConfig) -> Split:
    """The split of ``ds``: by patient where the dataset names patients (:func:`make_split`)."""
    return make_split(len(ds), cfg, ds.patient_ids)


def split_by(ds: Dataset) -> str:
    """How :func:`split_dataset` splits ``ds``: ``"patient"`` where it names patients, else ``"beat"``."""
    return "patient" if ds.patient_ids is not None else "beat"


def training_fingerprint(ds: Dataset, split: Split) -> tuple[str, dict[str, Any]]:
    """The training split as the package records it: the text of ``training_beats.sha256``
    (sorted unique SHA-256 of each training beat's float32 bytes) and ``training_ids.json``
    (sorted unique record and patient ids, None where the dataset has none)."""
    beats = sorted(set(beat_sha256(ds.signals[split.train])))
    ids: dict[str, Any] = {"split_by": split_by(ds), "beats": len(split.train)}
    for key, values in (("record_ids", ds.record_ids), ("patient_ids", ds.patient_ids)):
        ids[key] = None if values is None else sorted({values[i] for i in split.train})
    return "".join(f"{h}\n" for h in beats), ids


def seed_dir(run_dir: Path, seed: int) -> Path:
    return Path(run_dir) / f"seed-{seed}"


def iter_batches(
    ds: Dataset, indices: np.ndarray, batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(signals, labels) tensors in batches; shuffled when ``rng`` is given."""
    order = rng.permutation(indices) if rng is not None else indices
    for start in range(0, len(order), batch_size):
        idx = np.sort(order[start : start + batch_size])
        x = torch.from_numpy(np.ascontiguousarray(ds.signals[idx], dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(ds.labels[idx], dtype=np.float32))
        yield x, y


@torch.no_grad()
def predict_logits(model: nn.Module, ds: Dataset, indices: np.ndarray, batch_size: int, device: torch.device):
    """Logits of ``model`` (eval mode) for the given beats, as a NumPy array."""
    model.eval()
    out = [model(x.to(device)).cpu().numpy() for x, _ in iter_batches(ds, indices, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


def _bce(logits: np.ndarray, labels: np.ndarray) -> float:
    # Numerically stable BCE-with-logits, the same loss training minimises.
    z = logits.astype(np.float64)
    return float(np.mean(np.maximum(z, 0) - z * labels + np.log1p(np.exp(-np.abs(z)))))


def _epoch_indices(split: Split, cfg: TrainConfig, ctx: DistContext, rng: np.random.Generator) -> np.ndarray:
    """This process's share of one epoch: the same shuffle on every rank, strided by rank."""
    perm = rng.permutation(split.train)
    if cfg.max_beats_per_epoch is not None:
        perm = perm[: cfg.max_beats_per_epoch]
    per_rank = len(perm) // ctx.world_size  # equal step counts on every rank, or DDP would hang
    return perm[ctx.rank :: ctx.world_size][:per_rank]


def _train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ds: Dataset,
    indices: np.ndarray,
    cfg: TrainConfig,
    ctx: DistContext,
    desc: str,
    show_progress: bool,
) -> float:
    model.train()
    loss_fn = nn.BCEWithLogitsLoss()
    total, count = 0.0, 0
    # Shuffling already happened in _epoch_indices; batches keep that order.
    batches = [indices[i : i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
    for idx in progress(batches, desc=desc, unit="batch", enabled=show_progress and ctx.is_main):
        x, y = next(iter_batches(ds, idx, len(idx)))
        x, y = x.to(ctx.device), y.to(ctx.device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1)


def train_seed(
    ds: Dataset,
    split: Split,
    seed: int,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    ctx: DistContext,
    show_progress: bool = True,
) -> tuple[ECGNet, dict[str, Any]]:
    """Train one model; returns it (best validation epoch) and its metrics."""
    torch.manual_seed(seed)
    model = build_model(model_cfg).to(ctx.device)
    wrapped: nn.Module = DistributedDataParallel(model) if ctx.distributed else model
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    best_loss, best_state, best_epoch, stale = math.inf, copy.deepcopy(model.state_dict()), 0, 0
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        indices = _epoch_indices(split, cfg, ctx, rng)
        desc = f"seed {seed} epoch {epoch}/{cfg.max_epochs}"
        train_loss = _train_one_epoch(wrapped, optimizer, ds, indices, cfg, ctx, desc, show_progress)
        val_loss = math.nan
        if ctx.is_main:
            logits = predict_logits(model, ds, split.val, cfg.eval_batch_size, ctx.device)
            val_loss = _bce(logits, np.asarray(ds.labels[split.val], dtype=np.float64))
        val_loss = broadcast_float(ctx, val_loss)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss if math.isfinite(train_loss) else None,  # null, never NaN
                "val_loss": val_loss if math.isfinite(val_loss) else None,
                "seconds": time.perf_counter() - t0,
            }
        )
        log.info("seed %d epoch %d: train loss %.4f, validation loss %.4f", seed, epoch, train_loss, val_loss)
        if val_loss < best_loss - cfg.min_delta:
            best_loss, best_state, best_epoch, stale = val_loss, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                log.info("seed %d: early stop after epoch %d (best epoch %d)", seed, epoch, best_epoch)
                break
    if best_epoch == 0:
        raise InvalidArgument(
            f"training seed {seed} diverged: the validation loss was not finite in any of its {len(history)} "
            "epoch(s); lower learning_rate in --config [train]"
        )
    model.load_state_dict(best_state)
    model.eval()
    metrics = {
        "seed": seed,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "best_val_loss": best_loss,
        "train_seconds": time.perf_counter() - started,
        "history": history,
    }
    return model, metrics


def evaluate(model: ECGNet, ds: Dataset, indices: np.ndarray, batch_size: int, device: torch.device):
    """Per-class AUROC (None where a class has only one label value in ``indices``)."""
    logits = predict_logits(model, ds, indices, batch_size, device)
    labels = np.asarray(ds.labels[indices])
    return per_class_auroc(labels, logits)


def _class_table(
    test_auroc: list[float | None], val_auroc: list[float | None], labels: np.ndarray, val_labels: np.ndarray
):
    """Per class; an AUROC is None (null) where the split lacks positives or negatives of the class."""
    return [
        {
            "key": c.key,
            "code": c.code,
            "name": c.name,
            "test_auroc": t,
            "val_auroc": v,
            "test_positives": int(labels[:, i].sum()),
            "val_positives": int(val_labels[:, i].sum()),
        }
        for i, (c, t, v) in enumerate(zip(CLASSES, test_auroc, val_auroc, strict=True))
    ]


def _environment(ctx: DistContext) -> dict[str, Any]:
    return {
        "ecgx_version": ecgx.__version__,
        "torch_version": str(torch.__version__),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "world_size": ctx.world_size,
        "device": str(ctx.device),
    }


def train_run(
    data_dir: Path | str,
    seeds: Sequence[int],
    out: Path | str,
    model_cfg: ModelConfig | None = None,
    cfg: TrainConfig | None = None,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train one model per seed into ``out/seed-<s>/`` and write ``out/run.json``.

    ``out`` follows the output rule of :mod:`ecgx.core.outputs`: a new run folder appears whole
    when every seed is trained; ``overwrite`` replaces a run folder ecgx wrote. Without it,
    seeds not yet in an existing run folder are added, only for the same dataset
    (fingerprint) and config, and run.json then lists every seed. Every class needs
    positive and negative training beats (:func:`check_class_coverage`).

    Works the same in one process and under ``torchrun`` (DistributedDataParallel);
    only rank 0 writes files. Returns the run summary.
    """
    model_cfg, cfg = model_cfg or ModelConfig(), cfg or TrainConfig()
    seeds = check_seeds(seeds)
    out = Path(out)
    existing = _existing_run(out, seeds, overwrite)  # fail before minutes of work, not after
    ds = load_dataset(data_dir)
    if ds.labels.shape[0] == 0:
        raise InvalidArgument(f"dataset {data_dir} holds no beats")
    split = split_dataset(ds, cfg)
    unevaluable = check_class_coverage(ds, split)
    fingerprint = dataset_fingerprint(ds)
    if existing is not None:
        _check_same_family(out, existing, ds, fingerprint, model_cfg, cfg)
    ctx = init_distributed(cfg.device)
    # Determinism is a process-wide switch: set it for training only, then restore the caller's.
    was = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=ctx.device.type != "cpu")
    threads_before = torch.get_num_threads()
    if ctx.device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        writer = _RunWriter(out, overwrite, existing) if ctx.is_main else None
        try:
            summary = _train_seeds(ds, split, seeds, writer, model_cfg, cfg, ctx, show_progress, fingerprint)
            if writer is not None:
                summary["unevaluable_classes"] = unevaluable
                summary = writer.commit(summary)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.set_num_threads(threads_before)
        shutdown_distributed(ctx)
    return summary


def _existing_run(out: Path, seeds: list[int], overwrite: bool) -> dict[str, Any] | None:
    """run.json of the run folder ``out`` when new seeds are to be added to it, else None.

    An existing run folder is replaced with ``overwrite``; without it, seeds may be added
    (checked later to be of the same dataset and config), but never retrained.
    """
    if classify_output(out, RUN) != "ours" or overwrite:
        return None
    summary = json.loads((out / RUN_FILE).read_text())
    present = [s for s in seeds if str(s) in summary["seeds"] or seed_dir(out, s).exists()]
    if present:
        raise FileExistsError(
            f"{out} already holds seed(s) {', '.join(map(str, present))}; train other seeds into it, "
            "choose another --out, or pass --overwrite to replace the whole run folder"
        )
    return summary


def _check_same_family(
    out: Path,
    existing: dict[str, Any],
    ds: Dataset,
    fingerprint: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
) -> None:
    """Seeds added to a run folder must be of the same dataset and config as the seeds in it."""
    differences = []
    old_data = existing.get("data", {})
    if old_data.get("fingerprint") != fingerprint:
        differences.append(
            f"dataset: {old_data.get('path')} (fingerprint {str(old_data.get('fingerprint'))[:12]}) there, "
            f"{Path(ds.path).resolve()} (fingerprint {fingerprint[:12]}) here"
        )
    for table, new in (("model", model_cfg.to_dict()), ("train", cfg.to_dict())):
        old = existing.get(f"{table}_config", {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                differences.append(f"{table}.{key}: {old.get(key)!r} there, {new.get(key)!r} here")
    if differences:
        raise InvalidArgument(
            f"cannot add seeds to run folder {out}: a seed family shares its dataset and config, but "
            f"{'; '.join(differences)}; choose another --out, or pass --overwrite to replace the run folder"
        )


def check_class_coverage(ds: Dataset, split: Split) -> dict[str, list[str]]:
    """Refuse a split where some class cannot be learned; name the classes that cannot be evaluated.

    Every class needs positive and negative beats in the training split, or the model cannot learn
    it (:class:`ValueError` names the classes and their counts). A class without positives (or
    without negatives) in the validation or test split cannot be evaluated there: its AUROC is
    recorded as null and the classes are returned per split (and logged), never written as NaN.
    """
    labels = np.asarray(ds.labels)
    total = labels.sum(axis=0, dtype=np.int64)
    train = labels[split.train].sum(axis=0, dtype=np.int64)
    n_train = len(split.train)
    problems = []
    for i, c in enumerate(CLASSES):
        if train[i] == 0:
            where = "none in the whole dataset" if total[i] == 0 else f"{total[i]} in the whole dataset"
            problems.append(f"{c.key} has no positive beat ({where})")
        elif train[i] == n_train:
            problems.append(f"{c.key} is positive in every beat")
    if problems:
        raise InvalidArgument(
            f"cannot train on {ds.path}: in the training split ({n_train} beats) {'; '.join(problems)}. "
            "Every class needs positive and negative training beats to be learned: add beats of these "
            "classes, or change the split (split_seed, val_fraction, test_fraction in --config [train])"
        )
    unevaluable: dict[str, list[str]] = {}
    for part, idx in (("val", split.val), ("test", split.test)):
        pos = labels[idx].sum(axis=0, dtype=np.int64)
        keys = [c.key for i, c in enumerate(CLASSES) if pos[i] == 0 or pos[i] == len(idx)]
        if keys:
            unevaluable[part] = keys
            name = "validation" if part == "val" else "test"
            log.warning(
                "the %s split (%d beats) has no positive (or no negative) beat of %s: their %s AUROC "
                "is undefined and recorded as null",
                name,
                len(idx),
                ", ".join(keys),
                name,
            )
    return unevaluable


class _RunWriter:
    """Where rank 0 writes a run (see :mod:`ecgx.core.outputs`).

    A new run folder (or one replaced with ``overwrite``) is built whole in a temporary
    sibling and renamed into place when every seed is trained. Seeds added to an existing
    run folder are trained in a temporary sibling too, then moved in, and run.json is
    rewritten listing every seed. An interruption leaves the run folder as it was.
    """

    def __init__(self, out: Path, overwrite: bool, existing: dict[str, Any] | None):
        self.out = out
        self.existing = existing
        if existing is None:
            self._stage: StagedOutput | None = StagedOutput(out, RUN, overwrite=overwrite)
            self.root = self._stage.path
        else:
            self._stage = None
            self.root = temporary_sibling(out, folder=True)

    def commit(self, summary: dict[str, Any]) -> dict[str, Any]:
        if self.existing is not None:
            seeds = {**self.existing["seeds"], **summary["seeds"]}
            summary = {**summary, "seeds": dict(sorted(seeds.items(), key=lambda kv: int(kv[0])))}
        text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
        if self._stage is not None:
            (self.root / RUN_FILE).write_text(text)
            self._stage.commit()
            return summary
        # Re-checked now: the folder may have changed while the seeds trained.
        if classify_output(self.out, RUN) != "ours":
            raise OutputError(f"run folder {self.out} disappeared while training; nothing was added")
        for d in sorted(self.root.iterdir()):
            if (self.out / d.name).exists():
                raise OutputError(f"{self.out / d.name} appeared while training; nothing was added")
        for d in sorted(self.root.iterdir()):
            d.chmod(0o755)
            d.rename(self.out / d.name)
        write_text_atomic(self.out / RUN_FILE, text)
        self.root.rmdir()
        return summary

    def abort(self) -> None:
        if self._stage is not None:
            self._stage.abort()
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InvalidArgument("give at least one seed")
    if any(s < 0 for s in seeds):
        raise InvalidArgument(f"seeds must be >= 0, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise InvalidArgument(f"seeds must be distinct, got {seeds}")
    return seeds


def _train_seeds(ds, split, seeds, writer, model_cfg, cfg, ctx, show_progress, fingerprint) -> dict[str, Any]:
    data_info = {
        "path": str(Path(ds.path).resolve()),
        "n": len(ds),
        "fingerprint": fingerprint,
        "source": ds.meta.get("source"),
    }
    summary: dict[str, Any] = {
        "data": data_info,
        "split": {"seed": cfg.split_seed, "by": split_by(ds), **split.sizes()},
        "model_config": model_cfg.to_dict(),
        "train_config": cfg.to_dict(),
        "environment": _environment(ctx),
        "seeds": {},
    }
    test_labels = np.asarray(ds.labels[split.test])
    val_labels = np.asarray(ds.labels[split.val])
    fingerprint_files = training_fingerprint(ds, split) if ctx.is_main else None
    for seed in seeds:
        model, metrics = train_seed(ds, split, seed, model_cfg, cfg, ctx, show_progress)
        if not ctx.is_main:
            continue
        test_auroc = evaluate(model, ds, split.test, cfg.eval_batch_size, ctx.device)
        val_auroc = evaluate(model, ds, split.val, cfg.eval_batch_size, ctx.device)
        defined = [a for a in test_auroc if a is not None]
        metrics.update(
            classes=_class_table(test_auroc, val_auroc, test_labels, val_labels),
            mean_test_auroc=float(np.mean(defined)) if defined else None,
            min_test_auroc=float(np.min(defined)) if defined else None,
            data=data_info,
            split={"seed": cfg.split_seed, "by": split_by(ds), **split.sizes()},
            environment=_environment(ctx),
        )
        _write_seed(writer.root, seed, model.cpu(), metrics, model_cfg, cfg, fingerprint_files)
        keys = ("mean_test_auroc", "min_test_auroc", "best_epoch", "train_seconds")
        summary["seeds"][str(seed)] = {k: metrics[k] for k in keys}
        if defined:
            log.info(
                "seed %d: mean test AUROC %.4f, min %.4f over %d of %d classes",
                seed,
                metrics["mean_test_auroc"],
                metrics["min_test_auroc"],
                len(defined),
                len(test_auroc),
            )
        else:
            log.warning("seed %d: no class can be evaluated on the test split: test AUROC undefined", seed)
    return summary


def _write_seed(
    out: Path,
    seed: int,
    model: ECGNet,
    metrics: dict,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    fingerprint: tuple[str, dict[str, Any]] | None = None,
):
    d = seed_dir(out, seed)
    d.mkdir(parents=True, exist_ok=True)
    if fingerprint is not None:
        (d / TRAINING_BEATS_FILE).write_text(fingerprint[0])
        (d / TRAINING_IDS_FILE).write_text(json.dumps(fingerprint[1], indent=1) + "\n")
    save_checkpoint(d / CHECKPOINT_FILE, model, seed=seed, train_config=cfg.to_dict(), metrics=metrics)
    (d / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
