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

# What an entry's "score" is: the number its verdict is decided on.
MEAN, CI_LOW, CI_HIGH = "mean", "ci_low", "ci_high"
# The comparison that holds when a check fails, for "0.512 (...) > 0.5: FAIL".
_NEGATED = {"<=": ">", "<": ">=", ">=": "<", ">": "<="}


def _entry(
    score: float,
    threshold: float,
    passes: bool,
    comparison: str,
    blocking: bool,
    *,
    statistic: str,
    label: str,
    mean: float,
    interval: Interval | None = None,
    confidence: float | None = None,
    **details: Any,
) -> dict[str, Any]:
    """One check's entry. ``score`` is the decisive number: the one compared with ``threshold``.

    ``decided_by`` names it (``statistic``: mean, ci_low or ci_high; ``label``: in words),
    ``mean`` is the point estimate beside it and ``interval`` its bootstrap interval (None
    for checks without one). ``summary`` is the one line every view shows (CLI, HTML, reasons).
    """
    entry = {
        "score": json_number(score),
        "decided_by": {"statistic": statistic, "label": label},
        "mean": json_number(mean),
        "interval": None
        if interval is None
        else {"low": json_number(interval.low), "high": json_number(interval.high), "confidence": confidence},
        "threshold": threshold,
        "comparison": comparison,
        "verdict": PASS if passes else FAIL,
        "blocking": blocking,
        "details": details,
    }
    entry["summary"] = describe(entry)
    return entry


def _at_least(score: float, minimum: float, blocking: bool, label: str, **details: Any) -> dict[str, Any]:
    """An entry decided on a mean: passes when ``score`` is defined and reaches ``minimum``."""
    passes = bool(np.isfinite(score) and score >= minimum)
    return _entry(score, minimum, passes, ">=", blocking, statistic=MEAN, label=label, mean=score, **details)


def not_run(reason: str, blocking: bool) -> dict[str, Any]:
    entry = {"score": None, "verdict": NOT_RUN, "blocking": blocking, "reason": reason, "details": {}}
    entry["summary"] = describe(entry)
    return entry


def _number(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _level(confidence: float | None) -> str:
    return "" if confidence is None else f"{100 * confidence:g} % "


def describe(entry: dict[str, Any]) -> str:
    """One line for a check's entry: the decisive number, what it is, the mean and interval beside
    it, and how it compares with the threshold, e.g.
    ``0.512 (upper end of the 95 % CI; mean 0.497, CI [0.440, 0.512]) > 0.5: FAIL``.

    Entries of reports written before ``decided_by`` existed get ``score ... : verdict``.
    """
    if entry["verdict"] == NOT_RUN:
        return f"not run: {entry.get('reason', 'no reason given')}"
    passed = entry["verdict"] == PASS
    comparison = (
        entry["comparison"] if passed else _NEGATED.get(entry["comparison"], "not " + entry["comparison"])
    )
    if entry["score"] is None:  # undefined (no finite value): the check cannot pass
        comparison = "not " + entry["comparison"]
    verdict = "pass" if passed else "FAIL"
    decided = entry.get("decided_by")
    if not decided:
        return f"score {_decisive(entry)} {comparison} {entry['threshold']:g}: {verdict}"
    interval = entry.get("interval")
    if interval is None:
        best = entry["details"].get("most_similar")
        context = decided["statistic"] + (f", with {best}" if best else "")
    else:
        short = {CI_LOW: "lower end", CI_HIGH: "upper end"}.get(decided["statistic"], decided["statistic"])
        where = entry["details"].get("strategy")
        context = (
            f"{short} of the {_level(interval.get('confidence'))}CI"
            + (f" under {where}" if where else "")
            + f"; mean {_number(entry.get('mean'))}, "
            f"CI [{_number(interval['low'])}, {_number(interval['high'])}]"
        )
    return f"{_decisive(entry)} ({context}) {comparison} {entry['threshold']:g}: {verdict}"


def _decisive(entry: dict[str, Any]) -> str:
    """The score to 3 decimals, or to 6 where 3 would print the threshold itself ("0.500 > 0.5")."""
    score, threshold = entry["score"], entry["threshold"]
    if score is not None and round(score, 3) == round(threshold, 3) and score != threshold:
        return f"{score:.6f}"
    return _number(score)


def randomisation_entry(
    curves: RandomisationCurves,
    interval: Interval,
    max_similarity: float,
    blocking: bool,
    confidence: float | None = None,
) -> dict[str, Any]:
    """Passes when the upper end of the confidence interval of the mean Spearman |a| between
    trained and fully randomised model is at most ``max_similarity``: the method must be
    shown to change, not merely be estimated to. The score is that upper end."""
    n = 0 if curves.final_per_ecg is None else len(curves.final_per_ecg)
    label = (
        f"upper end of the {_level(confidence)}bootstrap confidence interval of the mean Spearman |a| "
        f"between the trained and the fully randomised model's maps, over {n} ECGs"
    )
    return _entry(
        interval.high,
        max_similarity,
        bool(interval.high <= max_similarity),
        "<=",
        blocking,
        statistic=CI_HIGH,
        label=label,
        mean=interval.mean,
        interval=interval,
        confidence=confidence,
        layers=curves.layers,
        cascading=_nums(curves.cascading),
        independent=_nums(curves.independent),
        constant_maps=curves.undefined,
    )


def perturbation_entry(
    curves: PerturbationCurves,
    versus_control: dict[str, Interval],
    margin: float,
    blocking: bool,
    confidence: float | None = None,
) -> dict[str, Any]:
    """Passes when, under every replacement strategy, the lower end of the confidence interval
    of (method - random control) faithfulness is above ``margin``. The score is the lowest of
    those lower ends; ``details.strategy`` names its strategy."""
    worst = min(versus_control, key=lambda s: versus_control[s].low)
    decisive = versus_control[worst]
    n = len(next(iter(curves.score.values()))) if curves.score else 0
    label = (
        f"lower end of the {_level(confidence)}bootstrap confidence interval of the mean faithfulness "
        f"gap to the random control over {n} ECGs, under the replacement strategy where it is lowest"
    )
    return _entry(
        decisive.low,
        margin,
        bool(decisive.low > margin),
        ">",
        blocking,
        statistic=CI_LOW,
        label=label,
        mean=decisive.mean,
        interval=decisive,
        confidence=confidence,
        strategy=worst,
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
    label = f"mean over the ECGs of the mean pairwise Pearson correlation of |a| across {n_models} models"
    return _at_least(
        _nanmean(per_ecg), minimum, blocking, label, models=n_models, per_ecg_quartiles=_quartiles(per_ecg)
    )


def inter_method_entry(row: dict[str, float], minimum: float, blocking: bool) -> dict[str, Any]:
    """Passes when the method agrees with at least one other (non-control) method."""
    best_method = max(row, key=lambda m: -np.inf if not np.isfinite(row[m]) else row[m])
    label = "mean per-ECG Pearson correlation of |a| with the most similar other method"
    return _at_least(
        row[best_method],
        minimum,
        blocking,
        label,
        most_similar=best_method,
        correlations={m: json_number(v) for m, v in row.items()},
    )


def localisation_entry(auroc: np.ndarray, mass: np.ndarray, area: np.ndarray, minimum: float, blocking: bool):
    """Passes when the mean AUROC of |attribution| against the ground-truth mask reaches ``minimum``."""
    n = int(np.isfinite(auroc).sum())
    return _at_least(
        _nanmean(auroc),
        minimum,
        blocking,
        "mean AUROC of |a| against the ground-truth mask over the ECGs that have one",
        ecgs_with_mask=n,
        mass_inside=json_number(_nanmean(mass)),
        mask_area=json_number(_nanmean(area)),
    )


def method_verdict(checks: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """Pass when every blocking check passed; the reasons list what failed or did not run,
    each with the check's summary line (the decisive number, its interval, the threshold)."""
    reasons = []
    for name, c in checks.items():
        if not c["blocking"] or c["verdict"] == PASS:
            continue
        if c["verdict"] == NOT_RUN:
            reasons.append(f"{name} is blocking but did not run: {c['reason']}")
        else:
            reasons.append(f"{name}: {c.get('summary') or describe(c)}")
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
