"""Layer-wise relevance propagation with the epsilon rule."""

from __future__ import annotations

import numpy as np

from service.methods.base import AttributionMethod, check_non_negative

# Zennit's default stabiliser; the export checks the package's LRP graph at this value too.
DEFAULT_EPSILON = 1e-6
# Float32 in the graph: a larger epsilon absorbs all relevance (a zero map) or overflows.
MAX_EPSILON = 1e6


class Lrp(AttributionMethod):
    """LRP-epsilon (Bach et al.) on the BatchNorm-folded network, as Captum's LRP with
    EpsilonRule on every convolution, dense, pooling and addition layer: relevance
    starts at the target logit and is conserved up to what epsilon absorbs."""

    name, kind = "lrp", "modified backward"

    def check(self, x, *, epsilon: float = DEFAULT_EPSILON) -> int:
        check_non_negative("epsilon", epsilon, MAX_EPSILON)
        return 1

    def attribute(self, engine, x, target, *, epsilon: float = DEFAULT_EPSILON) -> np.ndarray:
        eps = np.array(check_non_negative("epsilon", epsilon, MAX_EPSILON), np.float32)
        return engine.backward("lrp", x, target, output="attribution", epsilon=eps)
