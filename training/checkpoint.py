"""Saving and loading trained models as self-describing checkpoints."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ecgx.core.errors import InvalidArgument
from ecgx.core.schema import CLASSES, LEADS
from ecgx.training.config import model_config_from_dict
from ecgx.training.models import ECGNet

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


class CheckpointError(InvalidArgument):
    """A file is not a usable ecgx checkpoint; the message names the file and the field at fault."""


def load_checkpoint(path: Path | str) -> tuple[ECGNet, dict[str, Any]]:
    """Rebuild the model of a checkpoint (in eval mode) and return it with the checkpoint's fields.

    Everything is checked before a model is returned: the file is read as data only
    (``weights_only=True``, never as code), its fields, the architecture in ``model_config``,
    the weights against that architecture, and every weight for NaN or infinity.
    """
    path = Path(path)
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        what = "a dict without" if isinstance(payload, dict) else f"a {type(payload).__name__}, not"
        raise CheckpointError(
            f"{path} is not an ecgx checkpoint: it holds {what} format={CHECKPOINT_FORMAT!r} (a plain "
            "torch.save file); checkpoints come from ecgx train (RUNDIR/seed-<s>/checkpoint.pt)"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload.get('version')!r} is not supported (this ecgx reads "
            f"version {CHECKPOINT_VERSION})"
        )
    for key in ("model_config", "state_dict", "classes", "leads"):
        if key not in payload:
            raise CheckpointError(
                f"{path}: field {key} is missing; the file is not a complete ecgx checkpoint"
            )
    _check_schema(path, payload)
    try:
        config = model_config_from_dict(payload["model_config"], "model_config")
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = ECGNet(config)
    _check_state(path, payload["state_dict"], model)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload


def _read(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the file, e.g. {path / 'checkpoint.pt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a device, pipe or socket)")
    try:
        data = path.read_bytes()  # read here, so file-system errors are told apart from bad content
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {(e.strerror or str(e)).lower()}") from None
    try:
        # weights_only: a checkpoint is data, never code to unpickle. torch's warnings about
        # files that are not its own (pickle protocols) would only add noise to the error below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # torch raises a zoo of types for bytes it cannot parse
        # torch's own message is not passed on: it advises weights_only=False, i.e. running
        # code from the file, which ecgx never does.
        raise CheckpointError(
            f"{path} is not an ecgx checkpoint, or it is corrupt or truncated: it does not read as a "
            "PyTorch file of tensors and plain data"
        ) from None


def _check_schema(path: Path, payload: dict[str, Any]) -> None:
    classes = payload["classes"]
    keys = (
        [c.get("key") if isinstance(c, dict) else c for c in classes] if isinstance(classes, list) else None
    )
    if keys != [c.key for c in CLASSES]:
        raise CheckpointError(
            f"{path}: field classes must list {[c.key for c in CLASSES]} in this order, "
            f"got {keys if keys is not None else classes!r}"
        )
    if payload["leads"] != list(LEADS):
        raise CheckpointError(f"{path}: field leads must be {list(LEADS)}, got {payload['leads']!r}")
    for key, kinds in (("metrics", dict), ("train_config", dict), ("seed", int)):
        if payload.get(key) is not None and not isinstance(payload[key], kinds):
            raise CheckpointError(f"{path}: field {key} has the wrong type ({type(payload[key]).__name__})")
    metrics = payload.get("metrics") or {}
    rows = metrics.get("classes", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "key" in r for r in rows):
        raise CheckpointError(f"{path}: field metrics.classes must be a list of per-class tables")


def _check_state(path: Path, state: Any, model: ECGNet) -> None:
    """The weights must fit ``model`` exactly and be finite; messages name the parameter."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: field state_dict must map parameter names to tensors")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {_names(unexpected)}")
        raise CheckpointError(
            f"{path}: state_dict does not fit the architecture in model_config: {'; '.join(parts)}"
        )
    for name, want in expected.items():
        got = state[name]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict.{name} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{path}: state_dict.{name} has shape {tuple(got.shape)}, but the architecture in "
                f"model_config needs {tuple(want.shape)}"
            )
        if got.dtype != want.dtype and not (got.is_floating_point() and want.is_floating_point()):
            raise CheckpointError(f"{path}: state_dict.{name} has dtype {got.dtype}, expected {want.dtype}")
        if got.is_floating_point():
            bad = int((~torch.isfinite(got)).sum())
            if bad:
                raise CheckpointError(
                    f"{path}: parameter {name} holds {bad} NaN or infinite value(s) of {got.numel()}; "
                    "the model diverged in training or the file is corrupt"
                )


def _names(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
