"""Saving and loading trained models as self-describing checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from training.data.schema import CLASSES, LEADS
from training.models import ECGNet, ModelConfig

CHECKPOINT_FORMAT = "ecgx-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, model: ECGNet, **info: Any) -> Path:
    """Write model weights, architecture and provenance; atomically replaces ``path``."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": [{"key": c.key, "code": c.code, "name": c.name} for c in CLASSES],
        "leads": list(LEADS),
        **info,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path | str) -> tuple[ECGNet, dict[str, Any]]:
    """Rebuild the model of a checkpoint (in eval mode) and return it with the checkpoint's fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint is data, never code to unpickle.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises a zoo of types for non-checkpoint files
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an ecgx checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')} is not supported")
    model = ECGNet(ModelConfig.from_dict(payload["model_config"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the recorded architecture: {e}") from None
    model.eval()
    return model, payload
