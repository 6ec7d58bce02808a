"""What the export needs from a model, whatever form it arrived in.

A :class:`ModelSource` pairs the model's IR (what the ONNX graphs are built from)
with a way to run the model *as given* (what the IR's forward pass is checked
against) and the facts a package records: sampling rate, classes and where the
model came from. ``from_module`` makes one from a PyTorch module; the other
front ends (``input_forms.load_source``) make one from a factory plus weights, a
``torch.export`` program or a forward-only ONNX file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ecgx.core.schema import SAMPLING_RATE_HZ
from ecgx.training.export.ir import ExportError, ModelIR
from ecgx.training.export.torch_frontend import trace_model


@dataclass
class ModelSource:
    """A model ready for export.

    ``forward`` runs the model as given on float32 ``(B, leads, samples)`` and returns
    ``(B, outputs)`` logits; ``original`` is that model when it is a PyTorch module
    (its autograd gradient is then checked as well). ``classes`` lists ``{key, code,
    name}`` per output; None means the project's nine classes (the model must then
    have nine outputs).
    """

    ir: ModelIR
    forward: Callable[[np.ndarray], np.ndarray]
    original: nn.Module | None = None
    sampling_rate_hz: float = float(SAMPLING_RATE_HZ)
    classes: list[dict[str, str]] | None = None
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.ir.input_shape


def module_forward(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """``forward`` for a PyTorch module (eval mode, no gradient)."""

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.eval()(torch.as_tensor(np.asarray(x, np.float32))).numpy()

    return run


def from_module(
    model: nn.Module,
    input_shape: tuple[int, int] | None = None,
    *,
    sampling_rate_hz: float | None = None,
    classes: list[dict[str, str]] | None = None,
    description: dict[str, Any] | None = None,
) -> ModelSource:
    """A source for a PyTorch module; ``input_shape`` is (leads, samples), default the project's beat."""
    if sampling_rate_hz is not None and not (np.isfinite(sampling_rate_hz) and sampling_rate_hz > 0):
        raise ExportError(f"the sampling rate must be a positive number of Hz, got {sampling_rate_hz}")
    ir = trace_model(model, input_shape)
    return ModelSource(
        ir=ir,
        forward=module_forward(model),
        original=model.eval(),
        sampling_rate_hz=float(sampling_rate_hz or SAMPLING_RATE_HZ),
        classes=classes,
        description=dict(description or {}),
    )
