"""PyTorch building blocks the op kinds share to rebuild their ops as modules (``ir_torch``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A float64 IR parameter as the float32 tensor the reference modules compute with."""
    return torch.tensor(np.asarray(a), dtype=torch.float32)


def load(module: nn.Conv1d | nn.Linear, weight: np.ndarray, bias: np.ndarray | None) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(as_tensor(weight))
        if bias is not None:
            module.bias.copy_(as_tensor(bias))
    return module
