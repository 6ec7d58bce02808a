"""Fixtures the service tests share."""

from __future__ import annotations

import numpy as np
import pytest

from ecgx.core.dataset import load_dataset


@pytest.fixture(scope="module")
def beats(gated: dict) -> np.ndarray:
    """Four validation beats of the gated family, float32 (a test file may ask for its own)."""
    return np.asarray(load_dataset(gated["family"]["data"]).signals[:4], dtype=np.float32)
