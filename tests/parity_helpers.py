"""Shared by the parity tests: the issue's criterion and non-trivial BatchNorm statistics."""

from __future__ import annotations

import numpy as np
import torch

from ecgx.training.export.parity import parity, parity_ok


def assert_parity(got: np.ndarray, ref: np.ndarray) -> None:
    """Relative error above 1e-4 of the largest magnitude on at most 0.1 % of elements."""
    p = parity(got, ref)
    assert parity_ok(p), (
        f"{p['outlier_fraction']:.2%} of elements off by more than 1e-4 (max {p['max_rel_error']:.2e})"
    )


def randomise_batchnorm(model: torch.nn.Module) -> None:
    """Untrained BatchNorm is the identity; give it statistics so folding is exercised."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
