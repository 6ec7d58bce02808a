"""The random control: the floor every sanity check compares a method with."""

from __future__ import annotations

import numpy as np

from ecgx.service.methods.base import AttributionMethod, Param, Settings, rng_for, seed
from ecgx.service.methods.registry import register


@register
class RandomAttribution(AttributionMethod):
    """Standard normal noise, independent of model and input. A method that cannot
    beat this in the gate carries no information about the model."""

    name, kind, graphs, stochastic = "random", "control", (), True
    params = (Param("seed", None, seed),)

    def cost(self, x, s: Settings) -> int:
        return 0  # no model pass

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        return rng_for(s.seed).standard_normal(x.shape, dtype=np.float32)
