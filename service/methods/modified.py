"""The gradient with modified ReLU rules: guided backprop and deconvolution."""

from __future__ import annotations

import numpy as np

from ecgx.service.methods.base import AttributionMethod, Settings
from ecgx.service.methods.registry import register


@register
class GuidedBackprop(AttributionMethod):
    """Gradient where each ReLU passes only positive gradient, and only where it was active."""

    name, kind, graphs = "guided_backprop", "modified backward", ("guided_backprop",)

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        return engine.backward("guided_backprop", x, target)


@register
class Deconvolution(AttributionMethod):
    """Deconvnet (Zeiler & Fergus): each ReLU passes the positive part of the gradient."""

    name, kind, graphs = "deconvolution", "modified backward", ("deconvolution",)

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        return engine.backward("deconvolution", x, target)
