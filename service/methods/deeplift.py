"""DeepLIFT with the rescale rule, and its expectation over a baseline distribution."""

from __future__ import annotations

import numpy as np

from ecgx.service.methods.base import (
    AttributionMethod,
    Param,
    Settings,
    broadcast_per_ecg,
    one_of,
    per_ecg,
    rng_for,
    seed,
)
from ecgx.service.methods.gradient import baselines_param, n_baselines, shap_baselines
from ecgx.service.methods.registry import register

MAXPOOL_RULES = ("rescale", "gradient")


@register
class DeepLift(AttributionMethod):
    """DeepLIFT rescale (Shrikumar et al.) against ``baseline`` (default: zeros).

    ReLUs use delta-out / delta-in, as Captum. Max pooling: ``maxpool_rule="rescale"``
    (default) uses the cross-max rescale rule, so attributions sum exactly to
    f(x) - f(baseline); ``"gradient"`` routes through the window maximum, which is
    what Captum 0.9's DeepLift computes (see training/export/onnx_graphs.py).
    """

    name, kind, graphs = "deeplift", "modified backward", ("deeplift",)
    params = (
        Param("baseline", None, per_ecg()),
        Param("maxpool_rule", "rescale", one_of(MAXPOOL_RULES)),
    )

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        base = broadcast_per_ecg(s.baseline, x)
        flag = np.array(s.maxpool_rule == "rescale")
        return engine.backward(
            "deeplift", x, target, output="attribution", baseline=base, maxpool_rescale=flag
        )


@register
class DeepLiftShap(AttributionMethod):
    """Mean DeepLIFT attribution over a baseline distribution (as Captum's DeepLiftShap).

    Every ECG is paired with every baseline: B x K rows, built and run ``max_batch`` at a
    time and summed per ECG as they come, so no (B, K, 12, 600) array exists.
    """

    name, kind, graphs, stochastic = "deeplift_shap", "modified backward", ("deeplift",), True
    params = (
        Param("baselines", None, baselines_param),
        Param("maxpool_rule", "rescale", one_of(MAXPOOL_RULES)),
        Param("seed", None, seed),
    )

    def cost(self, x, s: Settings) -> int:
        return n_baselines(s.baselines)

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        base = shap_baselines(s.baselines, x, rng_for(s.seed))
        k, batch = len(base), len(x)
        flag = np.array(s.maxpool_rule == "rescale")
        seeds = engine.selectors(target)

        def make_rows(rows: np.ndarray):
            j, ecg = rows // batch, engine.ecg_of_rows(rows, batch)
            return {"x": x[ecg], "baseline": base[j], "seed": seeds[ecg], "maxpool_rescale": flag}, None

        total = engine.accumulate(
            "deeplift", k, x.shape, make_rows, lambda rows, attr, _: attr, output="attribution"
        )
        return total / k
