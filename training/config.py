"""Training settings and the TOML config file that overrides them.

A config file has up to two tables, each optional::

    [model]            # ecgx.training.models.ModelConfig fields
    widths = [32, 64, 64, 96]
    residual = true

    [train]            # TrainConfig fields
    max_epochs = 20
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ecgx.core.config_file import ConfigError, build, check_tables, checked_fields, read_toml
from ecgx.training.models import ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    """How one seed is trained. Defaults reach AUROC >= 0.95 on the synthetic data (README)."""

    max_epochs: int = 25
    batch_size: int = 64  # per process; under torchrun the global batch is this x world size
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 4  # epochs without validation-loss improvement before stopping
    min_delta: float = 1e-4
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    eval_batch_size: int = 512
    # For study-sized sets: an epoch visits this many random training beats instead of all.
    max_beats_per_epoch: int | None = None
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    # Torch intra-op threads per training process on CPU; 0: torch's default (every core, or the
    # cores split between torchrun's processes). One thread is the default because these small
    # CNNs gain little from a second thread on an idle machine and slow down several-fold when
    # another process competes for the cores (benchmarks/RESULTS.md), and because the trained
    # weights then do not depend on the machine's core count.
    threads: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.min_delta >= 0, f"min_delta must be >= 0, got {self.min_delta}"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (0 < self.test_fraction < 1, f"test_fraction must be in (0, 1), got {self.test_fraction}"),
            (
                self.val_fraction + self.test_fraction < 1,
                "val_fraction + test_fraction must leave beats for training",
            ),
            (self.split_seed >= 0, f"split_seed must be >= 0, got {self.split_seed}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (
                self.max_beats_per_epoch is None or self.max_beats_per_epoch >= 1,
                f"max_beats_per_epoch must be >= 1 or unset, got {self.max_beats_per_epoch}",
            ),
            (self.threads >= 0, f"threads must be >= 0 (0: torch's default), got {self.threads}"),
            (
                self.device in ("auto", "cpu", "cuda"),
                f"device must be auto, cpu or cuda, not {self.device!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a config-file table: unknown keys, wrong types and bad values name the key."""
        return build(cls, checked_fields(cls, values, "train"), "train")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_config_from_dict(values: Any, table: str = "model") -> ModelConfig:
    """A :class:`ModelConfig` from a config-file table or a checkpoint's ``model_config``,
    refusing unknown keys, wrong types and bad values by name (``table.key``)."""
    return build(ModelConfig, checked_fields(ModelConfig, values, table), table)


def load_config(path: Path | str | None) -> tuple[ModelConfig, TrainConfig]:
    """Read a TOML config file; ``None`` gives the defaults. Every error names the file and key."""
    if path is None:
        return ModelConfig(), TrainConfig()
    raw = read_toml(path)
    check_tables(raw, ("model", "train"), f"config file {path}")
    try:
        return model_config_from_dict(raw.get("model", {})), TrainConfig.from_dict(raw.get("train", {}))
    except ValueError as e:
        raise ConfigError(f"config file {path}: {e}") from None
