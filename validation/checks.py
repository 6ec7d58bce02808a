"""Turning measured scores into per-check verdicts, the way the policy says.

Each function returns one check's entry of the gate report: the score, the
threshold and how they compare, the verdict, whether it blocks, and details
(curves, intervals) for people and plots. A check that could not run (no seed
family, no masks) says why; if it blocks, the method cannot pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ecgx.validation.bootstrap import Interval, bootstrap_mean
from ecgx.validation.perturbation import PerturbationCurves
from ecgx.validation.randomisation import RandomisationCurves

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
    details = entry["details"]
    prefix = f"{details['criterion']}: " if details.get("criterion") else ""
    if details.get("undefined"):
        return f"{prefix}{details['undefined']}: FAIL"
    if interval is None:
        best = details.get("most_similar")
        context = decided["statistic"] + (f", with {best}" if best else "")
    else:
        short = {CI_LOW: "lower end", CI_HIGH: "upper end"}.get(decided["statistic"], decided["statistic"])
        where = entry["details"].get("strategy")
        if where and entry["details"].get("row"):
            where += f" against {entry['details']['row']}"
        context = (
            f"{short} of the {_level(interval.get('confidence'))}CI"
            + (f" under {where}" if where else "")
            + f"; mean {_number(entry.get('mean'))}, "
            f"CI [{_number(interval['low'])}, {_number(interval['high'])}]"
        )
    return f"{prefix}{_decisive(entry)} ({context}) {comparison} {entry['threshold']:g}: {verdict}"


def _decisive(entry: dict[str, Any]) -> str:
    """The score to 3 decimals, or to 6 where 3 would print the threshold itself ("0.500 > 0.5")."""
    score, threshold = entry["score"], entry["threshold"]
    if score is not None and round(score, 3) == round(threshold, 3) and score != threshold:
        return f"{score:.6f}"
    return _number(score)


@dataclass(frozen=True)
class Criterion:
    """One condition of a check: the mean of a per-ECG statistic against a threshold.

    ``comparison`` "<=" is judged by the upper end of the bootstrap interval of the mean
    (the statistic must be shown to be low), ">=" by the lower end. Any undefined ECG
    (NaN: a constant map has no ranking) fails the criterion, with ``undefined_reason``.
    """

    name: str
    label: str
    per_ecg: np.ndarray
    threshold: float
    comparison: str
    undefined_reason: str = ""


def judge(criterion: Criterion, *, bootstrap: int, confidence: float, seed: int) -> dict[str, Any]:
    """``criterion``'s entry (the fields of a check's entry), decided on its bootstrap interval."""
    values = np.asarray(criterion.per_ecg, np.float64)  # (ECGs,) or (draws, ECGs)
    undefined = int((~np.isfinite(values.reshape(-1, values.shape[-1]))).any(axis=0).sum())
    upper = criterion.comparison.startswith("<")
    statistic = CI_HIGH if upper else CI_LOW
    end = "upper" if upper else "lower"
    label = f"{end} end of the {_level(confidence)}bootstrap confidence interval of {criterion.label}"
    if undefined or values.size == 0:
        why = criterion.undefined_reason or "a map without a ranking cannot show what it depends on"
        entry = _entry(
            float("nan"),
            criterion.threshold,
            False,
            criterion.comparison,
            True,
            statistic=statistic,
            label=label,
            mean=float("nan"),
            criterion=criterion.name,
            undefined=f"undefined on {undefined} of {values.shape[-1]} ECGs: {why}",
        )
        return entry
    interval = bootstrap_mean(values, n_boot=bootstrap, confidence=confidence, seed=seed)
    score = interval.high if upper else interval.low
    return _entry(
        score,
        criterion.threshold,
        _holds(score, criterion.comparison, criterion.threshold),
        criterion.comparison,
        True,
        statistic=statistic,
        label=label,
        mean=interval.mean,
        interval=interval,
        confidence=confidence,
        criterion=criterion.name,
    )


def _holds(score: float, comparison: str, threshold: float) -> bool:
    return bool(
        {"<=": score <= threshold, "<": score < threshold, ">=": score >= threshold, ">": score > threshold}[
            comparison
        ]
    )


def criteria_entry(judged: list[dict[str, Any]], blocking: bool, **details: Any) -> dict[str, Any]:
    """A check made of several criteria: it passes when every one does. Its score, threshold and
    summary are those of the criterion that decided: the first that failed, or, when all passed,
    the one closest to its threshold. ``details.criteria`` holds every criterion's entry."""
    failing = [c for c in judged if c["verdict"] != PASS]
    decisive = failing[0] if failing else min(judged, key=_slack)
    entry = {k: v for k, v in decisive.items() if k not in ("details", "summary")}
    entry["blocking"] = blocking
    entry["details"] = {
        **details,
        "criterion": decisive["details"]["criterion"],
        "criteria": {c["details"]["criterion"]: c for c in judged},
    }
    if "undefined" in decisive["details"]:
        entry["details"]["undefined"] = decisive["details"]["undefined"]
    summary = decisive["summary"]
    others = [c["details"]["criterion"] for c in failing[1:]]
    if others:
        summary += f" (also failing: {', '.join(others)})"
    entry["summary"] = summary
    return entry


def _slack(entry: dict[str, Any]) -> float:
    score, threshold = entry["score"], entry["threshold"]
    return threshold - score if entry["comparison"].startswith("<") else score - threshold


# The randomisation criteria: (name, policy key, comparison, what the per-ECG value is).
RANDOMISATION_CRITERIA = (
    ("final", "max_similarity", "<=", "the mean Spearman |a| with every layer randomised"),
    ("top_layer", "max_top_layer_similarity", "<=", "the mean Spearman |a| with the output layer randomised"),
    ("curve_area", "max_curve_area", "<=", "the mean area under the cascading curve (its mean over steps)"),
    (
        "independent",
        "max_independent_similarity",
        "<=",
        "the mean Spearman |a| with one layer randomised alone, judged per layer (the worst decides)",
    ),
    (
        "noise_floor_gap",
        "min_noise_floor_gap",
        ">=",
        "the mean drop below the method's own noise floor with every layer randomised",
    ),
)


def randomisation_entry(curves: RandomisationCurves, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Every criterion of :data:`RANDOMISATION_CRITERIA` must hold, judged per ECG and weight
    draw at the more similar of the sample and segment resolutions (the bootstrap resamples
    ECGs and draws together); ``independent`` is judged for each layer and the worst layer
    decides. ``cfg`` is the policy's ``checks.randomisation`` table."""
    per_ecg = {
        "final": curves.worst("cascading", -1),
        "top_layer": curves.worst("cascading", 0),
        "curve_area": curves.worst("cascading", slice(None)),
        "noise_floor_gap": curves.gap_to_noise_floor(),
    }
    reason = _constant_reason(curves.constant_maps)
    draws, n = per_ecg["final"].shape
    over = f"over {n} ECGs and {draws} weight draw(s)"

    def judged(name: str, key: str, comparison: str, what: str, values: np.ndarray) -> dict[str, Any]:
        criterion = Criterion(name, f"{what}, {over}", values, cfg[key], comparison, reason)
        return judge(criterion, bootstrap=cfg["bootstrap"], confidence=cfg["confidence"], seed=seed)

    entries = []
    for name, key, comparison, what in RANDOMISATION_CRITERIA:
        if name != "independent":
            entries.append(judged(name, key, comparison, what, per_ecg[name]))
            continue
        per_layer = [
            judged(
                name, key, comparison, f"the mean Spearman |a| with layer {layer} randomised alone", values
            )
            for layer, values in zip(
                curves.layers,
                (curves.worst("independent", k) for k in range(len(curves.layers))),
                strict=True,
            )
        ]
        entries.append(_worst_layer(per_layer, curves.layers))
    return criteria_entry(
        entries,
        cfg["blocking"],
        layers=curves.layers,
        draws=draws,
        cascading=_nums(curves.cascading),
        independent=_nums(curves.independent),
        noise_floor={
            r: json_number(_nanmean(v))
            for r, v in zip(("sample", "segment"), curves.noise_floor, strict=True)
        },
        constant_maps=curves.constant_maps,
    )


def _worst_layer(per_layer: list[dict[str, Any]], layers: list[str]) -> dict[str, Any]:
    """The layer whose criterion decides: the first undefined, else the highest upper end;
    every layer's decisive number is kept in the details."""
    undefined = [e for e in per_layer if e["score"] is None]
    worst = undefined[0] if undefined else max(per_layer, key=lambda e: e["score"])
    worst = {**worst, "details": {**worst["details"], "layer": layers[per_layer.index(worst)]}}
    worst["details"]["per_layer"] = {layer: e["score"] for layer, e in zip(layers, per_layer, strict=True)}
    return worst


def _constant_reason(constant: dict[str, int]) -> str:
    parts = [
        f"{n} {where}"
        for where, n in (
            ("trained-model", constant.get("trained", 0)),
            ("noisy-input", constant.get("noisy_input", 0)),
            ("randomised-model", constant.get("randomised", 0)),
        )
        if n
    ]
    what = f"constant maps ({', '.join(parts)})" if parts else "constant maps"
    return f"{what}; a map with no ranking cannot show that it depends on the weights"


def _lowest(versus: dict[str, dict[str, Interval]]) -> tuple[str, str]:
    """(strategy, row) of the lowest lower end."""
    return min(((s, r) for s, rows in versus.items() for r in rows), key=lambda sr: versus[sr[0]][sr[1]].low)


def _intervals(versus: dict[str, dict[str, Interval]]) -> dict[str, dict[str, dict[str, float | None]]]:
    return {
        s: {
            r: {"mean": json_number(c.mean), "low": json_number(c.low), "high": json_number(c.high)}
            for r, c in rows.items()
        }
        for s, rows in versus.items()
    }


def perturbation_entry(
    curves: PerturbationCurves,
    versus: dict[str, dict[str, Interval]],
    margin: float,
    blocking: bool,
    confidence: float | None = None,
    control: str = "random",
    **extra: Any,
) -> dict[str, Any]:
    """Passes when, under every replacement strategy and against every model-independent row,
    the lower end of the confidence interval of the paired faithfulness gap (method - row) is
    above ``margin``: the method must beat the strongest map that ignores the model, not only
    the random control. ``versus[strategy][row]`` is that interval; the score is the lowest
    lower end, ``details.strategy`` and ``details.row`` say where. Faithfulness is area(LeRF) -
    area(MoRF) of the target's logit; ``extra`` goes into the details."""
    strategy, row = _lowest(versus)
    decisive = versus[strategy][row]
    n = len(next(iter(curves.score.values()))) if curves.score else 0
    label = (
        f"lower end of the {_level(confidence)}bootstrap confidence interval of the mean faithfulness "
        f"gap (logit area) to the strongest model-independent map over {n} ECGs whose target the model "
        "predicts, under the replacement strategy and against the map where it is lowest"
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
        strategy=strategy,
        row=row,
        fractions=curves.fractions,
        morf=_nums(curves.morf),
        lerf=_nums(curves.lerf),
        faithfulness={s: json_number(float(np.mean(v))) for s, v in curves.score.items()},
        versus=_intervals(versus),
        versus_control={
            s: _intervals({s: {control: rows[control]}})[s][control]
            for s, rows in versus.items()
            if control in rows
        },
        **extra,
    )


def changed_model_entry(
    versus: dict[str, dict[str, Interval]],
    margin: float,
    blocking: bool,
    *,
    confidence: float,
    ecgs: int,
    draws: int,
    faithfulness: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """Passes when, on every changed model (``versus`` key: the output layer, the top block
    randomised) and under every strategy, the lower end of the interval of the paired
    faithfulness gap to the random control, each map and logit from that model, is above
    ``margin``. ``versus[model][strategy]``; ``faithfulness[model][strategy]`` the mean."""
    model, strategy = _lowest(versus)
    decisive = versus[model][strategy]
    label = (
        f"lower end of the {_level(confidence)}bootstrap confidence interval (ECGs and weight draws "
        f"resampled together) of the mean faithfulness gap to the random control on a model with its "
        f"{model.replace('_', ' ')} randomised, the method's own maps and that model's logits, over {ecgs} "
        f"ECGs and {draws} draw(s), under the strategy where it is lowest"
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
        strategy=f"{strategy} on the {model.replace('_', ' ')}-randomised model",
        model=model,
        versus_control=_intervals(versus),
        faithfulness={m: {s: json_number(v) for s, v in f.items()} for m, f in faithfulness.items()},
        ecgs=ecgs,
        draws=draws,
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


def localisation_entry(
    scores: dict[str, np.ndarray],
    baseline: dict[str, np.ndarray],
    area: np.ndarray,
    minimum: float,
    blocking: bool,
) -> dict[str, Any]:
    """Passes when the mean AUROC of |attribution| against the ground-truth mask reaches ``minimum``.

    ``scores`` are :func:`ecgx.validation.localisation.localisation_scores` per ECG (AUROC, relevance
    mass, pointing game, top-k precision); ``baseline`` the same for the input |x|, whose means
    are shown beside them, since good localisation can come from the input alone."""
    n = int(np.isfinite(scores["auroc"]).sum())
    return _at_least(
        _nanmean(scores["auroc"]),
        minimum,
        blocking,
        "mean AUROC of |a| against the ground-truth mask over the ECGs that have one",
        ecgs_with_mask=n,
        mass_inside=json_number(_nanmean(scores["mass"])),
        pointing_game=json_number(_nanmean(scores["pointing_game"])),
        top_k_precision=json_number(_nanmean(scores["top_k_precision"])),
        mask_area=json_number(_nanmean(area)),
        input_baseline={k: json_number(_nanmean(v)) for k, v in baseline.items()},
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
