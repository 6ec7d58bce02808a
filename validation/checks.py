"""Turning measured scores into per-check verdicts, the way the policy says.

Each function returns one check's entry of the gate report: the score, the
threshold and how they compare, the verdict, whether it blocks, and details
(curves, intervals) for people and plots. A check that could not run (no seed
family, no masks) says why; if it blocks, the method cannot pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from validation.bootstrap import Interval
from validation.perturbation import PerturbationCurves
from validation.randomisation import RandomisationCurves

PASS, FAIL, NOT_RUN = "pass", "fail", "not_run"


def _entry(score: float, threshold: float, passes: bool, comparison: str, blocking: bool, **details: Any):
    return {
        "score": json_number(score),
        "threshold": threshold,
        "comparison": comparison,
        "verdict": PASS if passes else FAIL,
        "blocking": blocking,
        "details": details,
    }


def _at_least(score: float, minimum: float, blocking: bool, **details: Any) -> dict[str, Any]:
    """An entry that passes when ``score`` is defined and reaches ``minimum``."""
    return _entry(score, minimum, bool(np.isfinite(score) and score >= minimum), ">=", blocking, **details)


def not_run(reason: str, blocking: bool) -> dict[str, Any]:
    return {"score": None, "verdict": NOT_RUN, "blocking": blocking, "reason": reason, "details": {}}


def randomisation_entry(
    curves: RandomisationCurves, interval: Interval, max_similarity: float, blocking: bool
) -> dict[str, Any]:
    """Passes when the upper end of the confidence interval of the mean Spearman |a| between
    trained and fully randomised model is at most ``max_similarity``: the method must be
    shown to change, not merely be estimated to."""
    score = curves.final("spearman_abs")
    return _entry(
        score,
        max_similarity,
        bool(interval.high <= max_similarity),
        "<=",
        blocking,
        interval={"low": json_number(interval.low), "high": json_number(interval.high)},
        layers=curves.layers,
        cascading=_nums(curves.cascading),
        independent=_nums(curves.independent),
        constant_maps=curves.undefined,
    )


def perturbation_entry(
    curves: PerturbationCurves, versus_control: dict[str, Interval], margin: float, blocking: bool
) -> dict[str, Any]:
    """Passes when, under every replacement strategy, the lower end of the confidence interval
    of (method - random control) faithfulness is above ``margin``."""
    score = min(c.low for c in versus_control.values())
    return _entry(
        score,
        margin,
        bool(score > margin),
        ">",
        blocking,
        fractions=curves.fractions,
        morf=_nums(curves.morf),
        lerf=_nums(curves.lerf),
        faithfulness={s: json_number(float(np.mean(v))) for s, v in curves.score.items()},
        versus_control={
            s: {"mean": json_number(c.mean), "low": json_number(c.low), "high": json_number(c.high)}
            for s, c in versus_control.items()
        },
    )


def self_consistency_entry(per_ecg: np.ndarray, n_models: int, minimum: float, blocking: bool):
    """Passes when the mean pairwise correlation across the seed family reaches ``minimum``."""
    return _at_least(
        _nanmean(per_ecg), minimum, blocking, models=n_models, per_ecg_quartiles=_quartiles(per_ecg)
    )


def inter_method_entry(row: dict[str, float], minimum: float, blocking: bool) -> dict[str, Any]:
    """Passes when the method agrees with at least one other (non-control) method."""
    best_method = max(row, key=lambda m: -np.inf if not np.isfinite(row[m]) else row[m])
    return _at_least(
        row[best_method],
        minimum,
        blocking,
        most_similar=best_method,
        correlations={m: json_number(v) for m, v in row.items()},
    )


def localisation_entry(auroc: np.ndarray, mass: np.ndarray, area: np.ndarray, minimum: float, blocking: bool):
    """Passes when the mean AUROC of |attribution| against the ground-truth mask reaches ``minimum``."""
    return _at_least(
        _nanmean(auroc),
        minimum,
        blocking,
        ecgs_with_mask=int(np.isfinite(auroc).sum()),
        mass_inside=json_number(_nanmean(mass)),
        mask_area=json_number(_nanmean(area)),
    )


def method_verdict(checks: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """Pass when every blocking check passed; the reasons list what failed or did not run."""
    reasons = []
    for name, c in checks.items():
        if not c["blocking"] or c["verdict"] == PASS:
            continue
        if c["verdict"] == NOT_RUN:
            reasons.append(f"{name} is blocking but did not run: {c['reason']}")
        else:
            reasons.append(f"{name}: score {c['score']} not {c['comparison']} {c['threshold']}")
    return (FAIL if reasons else PASS), reasons


def json_number(v: float) -> float | None:
    """JSON-safe float: NaN and infinities become null (reports are strict JSON)."""
    v = float(v)
    return round(v, 6) if np.isfinite(v) else None


def _nums(table: dict[str, list[float]]) -> dict[str, list[float | None]]:
    return {k: [json_number(v) for v in values] for k, values in table.items()}


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    return float(np.mean(a[np.isfinite(a)])) if np.isfinite(a).any() else float("nan")


def _quartiles(a: np.ndarray) -> list[float | None]:
    a = np.asarray(a, np.float64)
    a = a[np.isfinite(a)]
    return [json_number(v) for v in np.quantile(a, [0.25, 0.5, 0.75])] if len(a) else [None, None, None]
