"""DeepLIFT with the rescale rule, and its expectation over a baseline distribution."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.methods.base import AttributionMethod, check_choice, check_finite, per_ecg_array, rng_for
from service.methods.gradient import shap_baselines

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

    def attribute(
        self, engine, x, target, *, baseline: Any = None, maxpool_rule: str = "rescale"
    ) -> np.ndarray:
        base = check_finite("baseline", per_ecg_array("baseline", baseline, x))
        return _deeplift(engine, x, target, base, maxpool_rule)


class DeepLiftShap(AttributionMethod):
    """Mean DeepLIFT attribution over a baseline distribution (as Captum's DeepLiftShap).

    Every ECG is paired with every baseline (B x K rows, run in batches).
    """

    name, kind, stochastic = "deeplift_shap", "modified backward", True

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
        base = shap_baselines(baselines, x, rng_for(seed))
        k = len(base)
        per_chunk = max(1, engine.max_batch // k)  # ECGs whose B x K pairs fit one batch
        out = np.empty(x.shape, np.float32)
        for start in range(0, len(x), per_chunk):
            xs, ts = x[start : start + per_chunk], target[start : start + per_chunk]
            pairs_x, pairs_b = np.repeat(xs, k, axis=0), np.tile(base, (len(xs), 1, 1))
            attr = _deeplift(engine, pairs_x, np.repeat(ts, k), pairs_b, maxpool_rule)
            out[start : start + len(xs)] = attr.reshape(len(xs), k, *x.shape[1:]).mean(axis=1)
        return out
