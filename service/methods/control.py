"""The random control: the floor every sanity check compares a method with."""

from __future__ import annotations

import numpy as np

from ecgx.service.methods.base import AttributionMethod, rng_for


class RandomAttribution(AttributionMethod):
    """Standard normal noise, independent of model and input. A method that cannot
    beat this in the gate carries no information about the model."""

    name, kind, stochastic = "random", "control", True

    def check(self, x, *, seed: int | None = None) -> int:
        rng_for(seed)
        return 0  # no model pass

    def attribute(self, engine, x, target, *, seed: int | None = None) -> np.ndarray:
        return rng_for(seed).standard_normal(x.shape, dtype=np.float32)
