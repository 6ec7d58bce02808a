"""Every form in which a model reaches ``ecgx export``, turned into one :class:`ModelSource`.

========================= =====================================================================
form                      what it needs
========================= =====================================================================
project checkpoint        ``RUNDIR/seed-<s>/checkpoint.pt`` (``ecgx train``); nothing else
factory + state dict      ``pkg.module:function`` (called with no arguments, returns the
                          ``nn.Module``) and ``weights`` (a ``torch.save`` of its state dict,
                          read as data only); ``input_length`` unless it is 600 samples
``torch.export`` program  a ``.pt2`` file (``torch.export.save``); ``input_length`` when the
                          program's length is dynamic
ONNX model                a forward-only ``.onnx`` file; ``input_length`` when its length is
                          dynamic
========================= =====================================================================

A factory, program or ONNX model the export's IR cannot read (LSTM, GRU, a layer no front end
maps) gives a *partial* source unless ``partial=False``: its forward pass only, the model itself
as ONNX (``source.PartialForward``), from which the writer makes a package with the forward-only
methods and every other method unavailable with the IR's refusal as the reason.

The sampling rate is the project's 500 Hz only for 600-sample inputs (the project's
median beat); otherwise it must be given, unless the file carries it (ONNX
``metadata_props`` or a ``.pt2`` extra file named ``sampling_rate_hz``). Classes default
to the project's nine when the model has nine outputs; otherwise their names must be given.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecgx.core.schema import BEAT_SAMPLES, CLASSES, N_LEADS, SAMPLING_RATE_HZ
from ecgx.training.export.ir import ExportError
from ecgx.training.export.source import (
    ModelSource,
    module_forward,
    partial_from_onnx,
    partial_from_program,
    recurrent_in_onnx,
    refused,
    trace_or_partial,
)
from ecgx.training.export.torch_frontend import trace_model

SAMPLING_RATE_KEY = "sampling_rate_hz"
_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_LISTED = 5  # names shown per kind of state-dict mismatch before "and N more"


def is_factory_spec(model: str | Path) -> bool:
    """Whether ``model`` reads as ``pkg.module:function`` (and not as a file that exists)."""
    text = str(model)
    return bool(_FACTORY.match(text)) and not Path(text).exists()


def load_source(
    model: str | Path,
    *,
    weights: Path | None = None,
    input_length: int | None = None,
    sampling_rate_hz: float | None = None,
    classes: list[str] | Path | str | None = None,
    partial: bool = True,
) -> ModelSource:
    """The :class:`ModelSource` of a checkpoint, a factory spec plus ``weights``, a ``.pt2``
    program or an ``.onnx`` file, or ExportError (CheckpointError for a bad checkpoint) naming
    what is wrong and what to pass instead.

    ``partial``: a model the IR cannot read gives a forward-only source (a partial package);
    False raises the IR's refusal instead.

    ``classes`` is a list of names, a file with one name per line, or a comma-separated string.
    """
    if input_length is not None and (not isinstance(input_length, int) or input_length <= 0):
        raise ExportError(f"--input-length must be a positive number of samples, got {input_length}")
    if sampling_rate_hz is not None and not (math.isfinite(sampling_rate_hz) and sampling_rate_hz > 0):
        raise ExportError(f"--sampling-rate must be a positive number of Hz, got {sampling_rate_hz}")
    if is_factory_spec(model):
        if weights is None:
            raise ExportError(
                f"--model {model} is a factory; give its trained weights with --weights FILE (a state dict "
                "saved with torch.save(model.state_dict(), FILE))"
            )
        return _from_factory(str(model), Path(weights), input_length, sampling_rate_hz, classes, partial)
    path = Path(model)
    if weights is not None:
        raise ExportError(
            f"--weights is only for a factory (--model pkg.module:function); {path} carries its own weights"
        )
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return _from_program(path, input_length, sampling_rate_hz, classes, partial)
    if suffix == ".onnx":
        return _from_onnx(path, input_length, sampling_rate_hz, classes, partial)
    if not path.exists() and ":" in str(model):
        raise ExportError(
            f"--model {model}: neither a file nor a factory spec; a factory is written pkg.module:function "
            "(a module importable from the current folder or PYTHONPATH, and a function in it)"
        )
    if not path.exists():
        raise ExportError(
            f"{path}: no such file; --model takes a factory (pkg.module:function), a .pt2 program or an "
            ".onnx model, and a checkpoint is given without --model"
        )
    return _from_checkpoint(path, input_length, sampling_rate_hz, classes)


# --------------------------------------------------------------------------- the four forms


def _from_checkpoint(path: Path, input_length, sampling_rate_hz, classes) -> ModelSource:
    from ecgx.core.package_reader import sha256_file
    from ecgx.training.checkpoint import load_checkpoint

    if input_length not in (None, BEAT_SAMPLES) or sampling_rate_hz not in (None, SAMPLING_RATE_HZ):
        raise ExportError(
            f"{path}: a project checkpoint is a {BEAT_SAMPLES}-sample beat at {SAMPLING_RATE_HZ} Hz; "
            "--input-length and --sampling-rate do not apply to it"
        )
    model, _ = load_checkpoint(path)
    ir = trace_model(model, (N_LEADS, BEAT_SAMPLES))
    return ModelSource(
        ir=ir,
        forward=module_forward(model),
        original=model,
        sampling_rate_hz=float(SAMPLING_RATE_HZ),
        classes=_classes(classes, ir.n_outputs, path),
        description={"form": "checkpoint", "checkpoint": str(path.resolve()), "sha256": sha256_file(path)},
    )


def _from_factory(
    spec: str, weights: Path, input_length, sampling_rate_hz, classes, partial: bool = True
) -> ModelSource:
    from ecgx.core.package_reader import sha256_file

    model = build_from_factory(spec)
    state = read_state_dict(weights)
    load_strict(model, state, spec, weights)
    model.eval()
    length = input_length or BEAT_SAMPLES
    ir, forward_only = trace_or_partial(model, (N_LEADS, length), partial)
    return ModelSource(
        ir=ir,
        forward=module_forward(model),
        original=model,
        partial=forward_only,
        sampling_rate_hz=_sampling_rate(sampling_rate_hz, None, length, spec),
        classes=_classes(classes, (ir or forward_only).n_outputs, spec),
        description={
            "form": "factory",
            "factory": spec,
            "weights": str(weights.resolve()),
            "sha256": sha256_file(weights),
        },
    )


def _from_program(path: Path, input_length, sampling_rate_hz, classes, partial: bool = True) -> ModelSource:
    from ecgx.core.package_reader import sha256_file
    from ecgx.training.export.program_import import import_program, program_metadata

    forward_only = None
    try:
        ir, module = import_program(path, input_length)
    except ExportError as e:
        if not partial:
            raise
        ir, (forward_only, module) = None, partial_from_program(path, input_length, e)
    meta = program_metadata(path).get(SAMPLING_RATE_KEY)
    shaped = ir or forward_only
    return ModelSource(
        ir=ir,
        forward=module_forward(module),
        original=module,
        partial=forward_only,
        sampling_rate_hz=_sampling_rate(sampling_rate_hz, meta, shaped.input_shape[1], path),
        classes=_classes(classes, shaped.n_outputs, path),
        description={
            "form": "torch.export program",
            "path": str(path.resolve()),
            "sha256": sha256_file(path),
        },
    )


def _from_onnx(path: Path, input_length, sampling_rate_hz, classes, partial: bool = True) -> ModelSource:
    from ecgx.core.package_reader import sha256_file
    from ecgx.training.export.onnx_import import import_onnx, onnx_forward, onnx_metadata

    forward_only = None
    try:
        ir = import_onnx(path, input_length)
    except ExportError as e:
        model, shape = _onnx_input(path, input_length)  # the input's own refusals come first
        if not partial:
            raise refused(e, recurrent_in_onnx(model)) from None
        ir, forward_only = None, partial_from_onnx(path, model, shape, e)
    meta = onnx_metadata(path).get(SAMPLING_RATE_KEY)
    shaped = ir or forward_only
    return ModelSource(
        ir=ir,
        forward=onnx_forward(path),
        original=None,
        partial=forward_only,
        sampling_rate_hz=_sampling_rate(sampling_rate_hz, meta, shaped.input_shape[1], path),
        classes=_classes(classes, shaped.n_outputs, path),
        description={"form": "onnx", "path": str(path.resolve()), "sha256": sha256_file(path)},
    )


def _onnx_input(path: Path, input_length: int | None) -> tuple[Any, tuple[int, int]]:
    """The ONNX model and its (leads, samples), with the importer's own checks of the input (one
    float32 input (batch, leads, samples), one output, the length fixed or given)."""
    from ecgx.training.export.onnx_import import _Importer, load_onnx_model

    model = load_onnx_model(path)
    _, leads, length = _Importer(model, path)._input(input_length)
    return model, (leads, length)


# --------------------------------------------------------------------------- factory and weights


def build_from_factory(spec: str) -> nn.Module:
    """Import ``pkg.module`` and call ``function()`` of ``pkg.module:function``; the result must be
    an ``nn.Module``. The current folder is importable, as it is for ``python -m``."""
    if not _FACTORY.match(spec):
        raise ExportError(f"--model {spec!r} is not a factory spec; write it pkg.module:function")
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # as for python -m: the user's module beside them is importable, for this import only
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or any error raised while the module runs
        raise ExportError(
            f"--model {spec}: module {module_name} cannot be imported ({type(e).__name__}: {e}); it must be "
            "importable from the current folder or PYTHONPATH"
        ) from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ExportError(f"--model {spec}: module {module_name} has no attribute {attr}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ExportError(
            f"--model {spec}: {attr} is a {type(factory).__name__}, not a function that builds the model"
        )
    try:
        model = factory()
    except Exception as e:
        raise ExportError(
            f"--model {spec}: the factory raised {type(e).__name__}: {e} (it is called with no arguments)"
        ) from None
    if not isinstance(model, nn.Module):
        raise ExportError(
            f"--model {spec}: the factory returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save``, read as data only (``weights_only=True``).

    A dict holding it under ``state_dict`` or ``model_state_dict`` (a training checkpoint of
    another project) is accepted too; anything else is an ExportError.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--weights {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for bytes it cannot parse
        # torch's own message advises weights_only=False, i.e. running code from the file: never.
        raise ExportError(
            f"--weights {path} does not read as a PyTorch file of tensors (torch.save of a state dict); "
            "files that need code to unpickle are not read"
        ) from None
    if isinstance(data, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise ExportError(
            f"--weights {path} is not a state dict (a dict of parameter names to tensors); save one with "
            "torch.save(model.state_dict(), FILE)"
        )
    return data


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], spec: str, path: Path) -> None:
    """``load_state_dict(strict=True)`` with every mismatch listed on one line."""
    own = model.state_dict()
    if (
        state
        and own
        and all(k.startswith("module.") for k in state)
        and not any(k.startswith("module.") for k in own)
    ):
        state = {k[len("module.") :]: v for k, v in state.items()}  # saved from DataParallel / DDP
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{what}: {_listing(names)}"
        for what, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file vs model)", wrong),
        )
        if names
    ]
    if problems:
        raise ExportError(f"--weights {path} does not fit the model of {spec}: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # what the checks above did not foresee, on one line
        raise ExportError(
            f"--weights {path} does not fit the model of {spec}: {' '.join(str(e).split())}"
        ) from None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


# --------------------------------------------------------------------------- sampling rate and classes


def _sampling_rate(given: float | None, stored: str | None, length: int, where: Any) -> float:
    if given is not None:
        return float(given)
    if stored is not None:
        try:
            rate = float(stored)
        except ValueError:
            rate = float("nan")
        if not (math.isfinite(rate) and rate > 0):
            raise ExportError(
                f"{where}: its {SAMPLING_RATE_KEY} metadata {stored!r} is not a positive number of Hz; pass "
                "--sampling-rate"
            )
        return rate
    if length == BEAT_SAMPLES:
        return float(SAMPLING_RATE_HZ)
    raise ExportError(
        f"{where}: the input is {length} samples, not the project's {BEAT_SAMPLES}-sample beat at "
        f"{SAMPLING_RATE_HZ} Hz; pass --sampling-rate with the rate the model was trained at"
    )


def read_class_names(classes: list[str] | Path | str) -> list[str]:
    """Class names from a list, a file with one name per line, or a comma-separated string."""
    if isinstance(classes, Path) or (isinstance(classes, str) and Path(classes).is_file()):
        path = Path(classes)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ExportError(f"--classes {path} cannot be read ({type(e).__name__}: {e})") from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
    elif isinstance(classes, str):
        names = [n.strip() for n in classes.split(",")]
    else:
        names = [str(n).strip() for n in classes]
    if not names or any(not n for n in names):
        raise ExportError(f"--classes: empty class names in {classes!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ExportError(f"--classes: the names {', '.join(duplicates)} appear more than once")
    return names


def _classes(classes: list[str] | Path | str | None, n: int, where: Any) -> list[dict[str, str]] | None:
    if classes is None:
        if n == len(CLASSES):
            return None  # the project's nine classes
        raise ExportError(
            f"{where}: the model has {n} outputs; name its classes with --classes (a comma-separated list "
            f"or a file with one name per line); the project's {len(CLASSES)} classes fit only "
            f"{len(CLASSES)} outputs"
        )
    names = read_class_names(classes)
    if len(names) != n:
        raise ExportError(f"--classes gives {len(names)} names, but the model has {n} outputs")
    return [{"key": name, "code": name, "name": name} for name in names]
