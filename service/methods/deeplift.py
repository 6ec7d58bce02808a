"""DeepLIFT with the rescale rule, and its expectation over a baseline distribution."""

from __future__ import annotations

from typing import Any

import numpy as np

from ecgx.service.methods.base import AttributionMethod, check_choice, check_per_ecg, per_ecg_array, rng_for
from ecgx.service.methods.gradient import n_baselines, shap_baselines

MAXPOOL_RULES = ("rescale", "gradient")


def _deeplift(engine, x, target, base: np.ndarray, maxpool_rule: str) -> np.ndarray:
    check_choice("maxpool_rule", maxpool_rule, MAXPOOL_RULES)
    flag = np.array(maxpool_rule == "rescale")
    return engine.backward("deeplift", x, target, output="attribution", baseline=base, maxpool_rescale=flag)


class DeepLift(AttributionMethod):
    """DeepLIFT rescale (Shrikumar et al.) against ``baseline`` (default: zeros).

    ReLUs use delta-out / delta-in, as Captum. Max pooling: ``maxpool_rule="rescale"``
    (default) uses the cross-max rescale rule, so attributions sum exactly to
    f(x) - f(baseline); ``"gradient"`` routes through the window maximum, which is
    what Captum 0.9's DeepLift computes (see training/export/onnx_graphs.py).
    """

    name, kind = "deeplift", "modified backward"

    def check(self, x, *, baseline: Any = None, maxpool_rule: str = "rescale") -> int:
        check_per_ecg("baseline", baseline, x)
        check_choice("maxpool_rule", maxpool_rule, MAXPOOL_RULES)
        return 1

    def attribute(
        self, engine, x, target, *, baseline: Any = None, maxpool_rule: str = "rescale"
    ) -> np.ndarray:
        base = per_ecg_array("baseline", baseline, x)
        return _deeplift(engine, x, target, base, maxpool_rule)


class DeepLiftShap(AttributionMethod):
    """Mean DeepLIFT attribution over a baseline distribution (as Captum's DeepLiftShap).

    Every ECG is paired with every baseline: B x K rows, built and run ``max_batch`` at a
    time and summed per ECG as they come, so no (B, K, 12, 600) array exists.
    """

    name, kind, stochastic = "deeplift_shap", "modified backward", True

    def check(
        self, x, *, baselines: Any = None, maxpool_rule: str = "rescale", seed: int | None = None
    ) -> int:
        check_choice("maxpool_rule", maxpool_rule, MAXPOOL_RULES)
        rng_for(seed)
        return n_baselines(baselines, x)

    def attribute(
        self,
        engine,
        x,
        target,
        *,
        baselines: Any = None,
        maxpool_rule: str = "rescale",
        seed: int | None = None,
    ) -> np.ndarray:
        check_choice("maxpool_rule", maxpool_rule, MAXPOOL_RULES)
        base = shap_baselines(baselines, x, rng_for(seed))
        k, batch = len(base), len(x)
        flag = np.array(maxpool_rule == "rescale")
        seeds = engine.selectors(target)

        def make_rows(rows: np.ndarray):
            j, ecg = rows // batch, engine.ecg_of_rows(rows, batch)
            return {"x": x[ecg], "baseline": base[j], "seed": seeds[ecg], "maxpool_rescale": flag}, None

        total = engine.accumulate(
            "deeplift", k, x.shape, make_rows, lambda rows, attr, _: attr, output="attribution"
        )
        return total / k
