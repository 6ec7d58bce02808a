"""A single-file HTML report of a gate run: summary, score table, figures and the study comparison.

The figures are written as PNG files beside the report (``figures/``) and embedded
in the HTML as base64 data URIs, so ``report.html`` alone can be mailed or archived:
no external resources, no JavaScript, inline CSS only. Every number shown comes from
the gate report; nothing is typed in by hand.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecgx.validation import figures
from ecgx.validation.checks import describe
from ecgx.validation.policy import CHECKS, CONTROL_METHOD

if TYPE_CHECKING:
    from ecgx.validation.gate import GateRun

REPORT_FILE = "report.html"
FIGURE_DIR = "figures"
NEAR_ZERO = 0.1  # |Spearman| below this counts as "reached zero" after full randomisation
_SYMBOLS = {"<=": "≤", ">=": "≥", ">": ">", "<": "<"}

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #0072B2; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .8em 0; font-size: 0.92em; }
th, td { border: 1px solid #bbb; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.pass { background: #deebf7; }
td.fail { background: #fdd0a2; font-weight: bold; }
td.not_run { background: #eeeeee; color: #555; }
tr.control td:first-child { font-style: italic; }
.verdict-pass { color: #08519c; font-weight: bold; }
.verdict-fail { color: #a63603; font-weight: bold; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.92em; color: #444; max-width: 900px; }
.small { font-size: 0.85em; color: #555; font-weight: normal; }
.headline { font-size: 1.1em; padding: .6em .8em; border-left: 6px solid #08519c; background: #f4f8fc; }
.headline.fail { border-left-color: #a63603; background: #fdf1e7; }
.warning { padding: .6em .8em; border: 2px solid #a63603; background: #fff3e0; font-weight: bold; }
code { background: #f4f4f4; padding: 0 .2em; }
.banner { padding: .6em .8em; border: 2px solid #E69F00; background: #fff8e6; margin: .8em 0; }
.banner ul { margin: .3em 0 0 0; }
"""


@dataclass(frozen=True)
class Figure:
    """One written figure and how to read it."""

    path: Path
    title: str
    caption: str


# (file name, title, function of the report, caption); the class overlays are added apart.
_REPORT_FIGURES: tuple[tuple[str, str, Callable[[dict, Path], Path], str], ...] = (
    (
        "scores.png",
        "Scores and verdicts",
        figures.plot_scores,
        "Each cell is the number one check's verdict for one method is decided on (for randomisation the "
        "upper end of its bootstrap interval, for perturbation the lowest lower end over the replacement "
        "strategies, otherwise a mean); blue cells pass, orange cells fail and grey cells did not run. "
        "The column header gives the pass condition and whether the check blocks "
        "the method (blocking) or is only reported (informative). The last column is the method's "
        "verdict: it passes when all its blocking checks pass.",
    ),
    (
        "randomisation_cascading.png",
        "Cascading model randomisation",
        figures.plot_randomisation,
        "Layers are replaced by random weights one after another, from the output layer towards the "
        "input, and each method is recomputed on the same ECGs. The y axis is how similar the new "
        "attributions are to those of the trained model (1 = unchanged). A method that explains the "
        "model should fall towards 0 as more of the model is destroyed; one that stays high is "
        "mostly showing the input signal. The left panel's last point is the mean over the ECGs; the "
        "verdict uses the upper end of its bootstrap interval against the dotted threshold (both are in the "
        "table above). The random control (grey, dashed) does not depend on the model and stays at 1.",
    ),
    (
        "randomisation_independent.png",
        "Independent layer randomisation",
        figures.plot_randomisation_independent,
        "Each column randomises a single layer and keeps the others trained. Low values (white or "
        "blue) mean the method's map depends on that layer; values near 1 (dark red) mean it ignores "
        "it. Informative only: the gate decides on the cascading curve.",
    ),
    (
        "perturbation.png",
        "Perturbation curves",
        figures.plot_perturbation,
        "ECG segments (lead × window) are removed in the order a method ranks them, and the model's "
        "probability for the explained class is tracked. Top row: most relevant segments first "
        "(MoRF): a faithful method makes the probability fall fast. Bottom row: least relevant first "
        "(LeRF): it should stay high. Each column replaces the removed samples differently, because "
        "each replacement has its own bias. The random control (grey, dashed) is the baseline every "
        "method must beat: faithfulness is area(LeRF) − area(MoRF), compared with the control's.",
    ),
    (
        "inter_method.png",
        "Agreement between methods",
        figures.plot_inter_method,
        "Mean per-ECG Pearson correlation of absolute attributions between every pair of methods "
        "(red: similar maps, white: unrelated, blue: opposite). Blocks of red show families of "
        "methods that highlight the same samples; the random control's row should be about 0.",
    ),
)

_OVERLAY_CAPTION = (
    "The first ECG of this class among the validation ECGs (not hand-picked), explained for this class. "
    "Black: the ECG, one row per lead; red: each method's absolute attribution, scaled to that "
    "method's own maximum on this ECG (so colours compare places within a column, not methods); "
    "green band under the trace: where the synthetic generator put the class's feature (ground truth), "
    "when the data has it."
)


def write_figures(run: GateRun, fig_dir: Path, overlay_methods: Sequence[str] | None = None) -> list[Figure]:
    """Every figure of the report as PNG in ``fig_dir``, with titles and captions; the class
    overlays show ``overlay_methods`` (default: :func:`ecgx.validation.figures.overlay_methods`)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    out = [
        Figure(fn(run.report, fig_dir / name), title, caption) for name, title, fn, caption in _REPORT_FIGURES
    ]
    for path in figures.plot_class_overlays(run, fig_dir, overlay_methods):
        key = path.stem.removeprefix("overlay_")
        out.append(Figure(path, f"Attribution maps: class {key}", _OVERLAY_CAPTION))
    return out


def write_html_report(
    run: GateRun,
    out_dir: Path,
    *,
    title: str,
    study_comparison: list[dict] | None = None,
    notes: list[str] | None = None,
    overlay_methods: Sequence[str] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and its figures in ``out_dir/figures/``.

    ``study_comparison`` rows (keys ``experiment``, ``published``, ``here``) are shown as
    given; None computes them with :func:`study_comparison_rows`, an empty list leaves the
    section out. ``overlay_methods`` picks the methods drawn over each class's ECG (each
    method adds a column, about half a second per class to draw).
    """
    out_dir = Path(out_dir)
    figs = write_figures(run, out_dir / FIGURE_DIR, overlay_methods)
    rows = study_comparison_rows(run.report) if study_comparison is None else study_comparison
    page = render_html(run.report, figs, title=title, study_comparison=rows, notes=notes or [])
    path = out_dir / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path


def render_html(
    report: dict, figs: Sequence[Figure], *, title: str, study_comparison: list[dict], notes: list[str]
) -> str:
    """The report page as one HTML string, figures embedded from their PNG files."""
    parts = [
        f"<h1>{_e(title)}</h1>",
        _synthetic_banner(report),
        _summary(report),
        _methods_table(report),
        _equivalence_note(report),
        _figures_section(figs),
    ]
    if study_comparison:
        parts.append(_study_table(study_comparison))
    if notes:
        parts.append("<h2>Notes</h2>\n<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------- sections


def data_is_synthetic(report: dict) -> bool:
    """Whether the gate ran on synthetic ECGs: the dataset's meta.json says so (``source``); a
    dataset no longer on disk is judged by its ground-truth masks, which only the generator has."""
    data = report.get("data", {})
    try:
        meta = json.loads((Path(data.get("path", "")) / "meta.json").read_text())
        return meta.get("source") == "synthetic"
    except (OSError, ValueError, AttributeError):
        return bool(data.get("ground_truth"))


def _synthetic_banner(report: dict) -> str:
    if not data_is_synthetic(report):
        return ""
    return (
        '<div class="banner"><strong>Synthetic data.</strong> These ECGs come from ecgx\'s generator '
        "(docs/synthetic_data.md), not from patients: the verdicts say how the methods behave on this "
        "model and these data, not how they would on clinical recordings. Gate a model on validation "
        "ECGs like those it will serve before trusting its explanations.</div>"
    )


# Input x gradient and LRP-epsilon: the same map on ReLU networks when epsilon -> 0.
_EQUIVALENT = ("input_x_gradient", "lrp")
_NEAR_EQUAL_EPSILON = 1e-3


def _equivalence_note(report: dict) -> str:
    """Say where two gated methods are one method on this architecture, so their agreement is
    not read as two methods confirming each other."""
    a, b = _EQUIVALENT
    methods = report.get("methods", {})
    if a not in methods or b not in methods:
        return ""
    checked = (methods[b].get("settings") or {}).get("checked") or {}
    eps = checked.get("epsilon")
    if checked.get("composite") != "epsilon" or eps is None or eps > _NEAR_EQUAL_EPSILON:
        return ""
    names = report.get("inter_method", {}).get("methods", [])
    matrix = report.get("inter_method", {}).get("matrix", [])
    r = matrix[names.index(a)][names.index(b)] if a in names and b in names else None
    measured = f" Measured here: correlation {r:.2f}." if r is not None else ""
    return (
        "<h2>Methods that are one method here</h2>\n<p><b>Input × gradient and LRP-ε.</b> On a network "
        "built from ReLUs and affine layers (convolutions and linear layers with or without biases, "
        "batch normalisation at inference, pooling, residual additions), the ε-rule applied to every "
        "layer with ε → 0 gives each input relevance <i>x<sub>i</sub> · ∂f/∂x<sub>i</sub></i> exactly: "
        "by induction each layer's relevance equals its activation times the gradient at it, and a bias "
        "keeps none of the relevance it is never given (Ancona et al. 2018, Proposition 1; Montavon et "
        f"al. 2019). This package's LRP applies the ε-rule everywhere with ε = {eps:g}, so the two maps "
        "differ only where a pre-activation lies within ε of zero, and their checks measure the same "
        "map twice; their agreement is not two methods confirming each other. (DeepLIFT with a zero "
        f"baseline equals them too, but only on networks without biases.){measured}</p>"
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _verdict(v: str) -> str:
    return f'<span class="verdict-{_e(v)}">{_e(v.upper())}</span>'


def _rows(items: Sequence[tuple[str, str]]) -> str:
    """A two-column table; values are HTML already (escaped by the caller)."""
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in items) + "</table>"


def _small(text: str) -> str:
    return f"<br><span class='small'>{_e(text)}</span>"


def _summary(report: dict) -> str:
    data, pkg = report["data"], report["package"]
    family = report.get("family") or []
    family_text = "<br>".join(_e(f["path"]) for f in family) or "none (self-consistency cannot run)"
    targets = ", ".join(f"{k}: {n}" for k, n in data.get("targets", {}).items())
    source = (pkg.get("source") or {}).get("checkpoint")
    policy = report.get("policy", {})
    software = report.get("software", {})
    versions = ", ".join(f"{k} {v}" for k, v in software.items() if k != "providers")
    passed = report.get("passed", report.get("serve", []))
    items = [
        ("Gate verdict", _verdict(report["verdict"]) + "".join(_small(r) for r in report.get("reasons", []))),
        ("May be served", _e(", ".join(report.get("serve", [])) or "none")),
        ("Passed their checks", _e(", ".join(passed) or "none")),
        ("Failed (refused)", _e(", ".join(report.get("failed", [])) or "none")),
        ("Not checked (refused)", _e(", ".join(report.get("not_checked", [])) or "none")),
        ("Required methods", _e(", ".join(report.get("required_methods", [])) or "none")),
        ("Package", _e(pkg["path"]) + (_small(f"from {source}") if source else "")),
        ("Seed family", family_text),
        ("Data", _e(data["path"]) + _small(f"fingerprint {data['fingerprint'][:16]}…")),
        ("ECGs", _e(_ecgs_text(data))),
        ("ECGs per explained class", _e(targets or "n/a")),
        ("Ground-truth masks", "yes" if data.get("ground_truth") else "no"),
        ("Policy", _e(policy.get("source", "?")) + _small(f"sha256 {policy.get('sha256', '')[:16]}…")),
        ("Software", _e(versions) + _small(f"providers: {', '.join(software.get('providers', []))}")),
        ("Created", _e(report.get("created", "?"))),
    ]
    html_out = "<h2>Summary</h2>\n" + _headline(report) + _rows(items)
    timings = report.get("timings_s", {})
    if timings:
        html_out += "\n<h3>Timings</h3>\n" + _rows([(k, f"{v:.1f} s") for k, v in timings.items()])
    return html_out


def _ecgs_text(data: dict) -> str:
    asked = data.get("ecgs_asked")
    text = f"{data['ecgs']}" + (
        f" of the {asked} the policy asks for" if asked not in (None, data["ecgs"]) else ""
    )
    return text + f" (randomisation on {data.get('randomisation_ecgs', data['ecgs'])})"


def _headline(report: dict) -> str:
    """The verdict as a sentence (what passed, what will be refused, under which policy) and any
    warnings, above everything else."""
    verdict = report["verdict"]
    text = report.get("headline") or verdict.upper()
    out = f'<p class="headline {_e(verdict)}">Gate verdict: {_e(text)}</p>\n'
    out += "".join(f'<p class="warning">WARNING: {_e(w)}</p>\n' for w in report.get("warnings", []))
    return out


def _statistic_name(entry: dict) -> str:
    decided = entry.get("decided_by")
    if not decided:
        return "score"
    return {"ci_high": "upper end of CI", "ci_low": "lower end of CI"}.get(decided["statistic"], "mean")


def _check_condition(report: dict, check: str) -> str:
    for r in report["methods"].values():
        e = r["checks"].get(check)
        if e is not None and e["verdict"] != "not_run":
            kind = "blocking" if e["blocking"] else "informative"
            criteria = e["details"].get("criteria")
            if criteria:  # several conditions, each with its own threshold
                parts = [f"{n}: {_statistic_name(c)} {_condition(c)}" for n, c in criteria.items()]
                return f"{'; '.join(parts)}; all {kind}"
            return f"{_statistic_name(e)} {_condition(e)}, {kind}"
    return "not run"


def _condition(entry: dict) -> str:
    return f"{_SYMBOLS.get(entry['comparison'], entry['comparison'])} {entry['threshold']:g}"


def _check_cell(entry: dict | None, footnotes: list[str]) -> str:
    if entry is None:
        return '<td class="not_run">absent</td>'
    if entry["verdict"] == "not_run":
        reason = entry.get("reason", "")
        if reason not in footnotes:
            footnotes.append(reason)
        n = footnotes.index(reason) + 1
        return f'<td class="not_run" title="{_e(reason)}">not run <sup>{n}</sup></td>'
    verdict = entry["verdict"]
    summary = entry.get("summary") or describe(entry)
    decided = entry.get("decided_by")
    title = f"{decided['label']}: {summary}" if decided else summary
    interval = entry.get("interval")
    extra = ""
    if interval:
        extra = _small(
            f"mean {_fmt(entry.get('mean'))}, CI [{_fmt(interval['low'])}, {_fmt(interval['high'])}]"
        )
        strategy = entry.get("details", {}).get("strategy")
        if strategy:
            extra += _small(f"under {strategy}")
    shown = "pass" if verdict == "pass" else "FAIL"
    return f'<td class="num {_e(verdict)}" title="{_e(title)}">{_fmt(entry["score"])} {shown}{extra}</td>'


def _methods_table(report: dict) -> str:
    cols = [c for c in CHECKS if any(c in r["checks"] for r in report["methods"].values())]
    footnotes: list[str] = []
    head = "".join(
        f"<th>{_e(c.replace('_', '-'))}<br><span class='small'>{_e(_check_condition(report, c))}</span></th>"
        for c in cols
    )
    rows = []
    references = report.get("references", {})
    for m, r in {**report["methods"], **references}.items():
        cells = "".join(_check_cell(r["checks"].get(c), footnotes) for c in cols)
        reasons = "".join(_small(reason) for reason in r.get("reasons", []))
        label = f"{_e(m)} (control)" if m == CONTROL_METHOD else _e(m)
        if m in references:
            label += " (reference, must fail)"
        cls = ' class="control"' if m == CONTROL_METHOD or m in references else ""
        verdict = f'<td class="{_e(r["verdict"])}">{_e(r["verdict"])}{reasons}</td>'
        rows.append(f"<tr{cls}><td>{label}</td>{cells}{verdict}</tr>")
    notes = "".join(f"<li>{_e(f)}</li>" for f in footnotes)
    foot = f'<ol class="small">{notes}</ol>' if footnotes else ""
    legend = "".join(
        f"<li><b>{_e(c.replace('_', '-'))}</b>: {_e(text)}</li>" for c, text in _legends(report, cols).items()
    )
    intro = (
        "<p>Each cell is the number the check's verdict is decided on, with the pass condition under "
        "the check's name; where the verdict rests on an end of a bootstrap confidence interval, the "
        "mean and the interval are shown beneath it. A method passes when every <em>blocking</em> check "
        "passes; the verdict column says which check stopped it. The random control is expected to "
        "fail: it is the baseline. The reference rows at the bottom are maps that ignore the model "
        "(|x|, |dx/dt|, a constant, unseeded noise, another model's saliency): each must fail, and "
        f"the gate fails if one passes.</p><ul class='small'>{legend}</ul>"
    )
    table = f"<table><tr><th>method</th>{head}<th>verdict</th></tr>{''.join(rows)}</table>"
    return "<h2>Methods and checks</h2>\n" + intro + table + foot


def _legends(report: dict, cols: Sequence[str]) -> dict[str, str]:
    """What each check's number is, in words (from the first method where the check ran)."""
    out = {}
    for c in cols:
        for r in report["methods"].values():
            e = r["checks"].get(c)
            if e is not None and e["verdict"] != "not_run" and e.get("decided_by"):
                out[c] = e["decided_by"]["label"]
                break
    return out


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figures_section(figs: Sequence[Figure]) -> str:
    items = [
        f'<figure><h3>{_e(f.title)}</h3><img src="{_data_uri(f.path)}" alt="{_e(f.title)}">'
        f"<figcaption>{_e(f.caption)}</figcaption></figure>"
        for f in figs
    ]
    return "<h2>Figures</h2>\n" + "\n".join(items)


def _study_table(rows: list[dict]) -> str:
    body = "".join(
        f"<tr><td>{_e(r.get('experiment', ''))}</td><td>{_e(r.get('published', ''))}</td>"
        f"<td>{_e(r.get('here', ''))}</td></tr>"
        for r in rows
    )
    return (
        "<h2>Beside the published study</h2>\n"
        "<table><tr><th>experiment</th><th>published finding</th><th>here</th></tr>"
        f"{body}</table>"
    )


# ------------------------------------------------------------------ study comparison


def _ran(report: dict, check: str) -> dict[str, dict]:
    """Non-control method -> the check's entry, where it ran with a score."""
    out = {}
    for m, r in report["methods"].items():
        e = r["checks"].get(check)
        if m != CONTROL_METHOD and e is not None and e["verdict"] != "not_run" and e["score"] is not None:
            out[m] = e
    return out


def _not_run_text(report: dict, check: str) -> str:
    for r in report["methods"].values():
        e = r["checks"].get(check)
        if e is not None and e["verdict"] == "not_run":
            return f"not run: {e.get('reason', 'no reason given')}"
    return "not run"


def _listing(values: dict[str, float], digits: int = 2) -> str:
    ordered = sorted(values.items(), key=lambda kv: kv[1])
    return ", ".join(f"{m} ({v:.{digits}f})" for m, v in ordered) or "none"


def _extremes(values: dict) -> tuple:
    """The keys of the smallest and the largest value."""
    return min(values, key=values.get), max(values, key=values.get)


def _self_consistency_here(report: dict) -> str:
    entries = _ran(report, "self_consistency")
    if not entries:
        return _not_run_text(report, "self_consistency")
    scores = {m: e["score"] for m, e in entries.items()}
    lo, hi = _extremes(scores)
    models = max(e["details"].get("models", 0) for e in entries.values())
    return (
        f"mean correlation {scores[lo]:.2f}-{scores[hi]:.2f} across {len(scores)} methods "
        f"(mean {statistics.fmean(scores.values()):.2f}; lowest {lo}, highest {hi}; {models} models)"
    )


def _criterion(entry: dict, name: str) -> dict | None:
    """One criterion of a randomisation entry (its threshold and comparison come from the policy
    that decided), or None for an entry without criteria."""
    return (entry.get("details", {}).get("criteria") or {}).get(name)


def _decided(entry: dict) -> str:
    """``final: 0.543 > 0.5``: the criterion that decided, its number and the condition it missed."""
    name = entry.get("details", {}).get("criterion")
    c = _criterion(entry, name) if name else None
    c = c or entry
    missed = {"<=": ">", ">=": "<", "<": ">=", ">": "<="}.get(c["comparison"], "not " + c["comparison"])
    label = f"{name}: " if name else ""
    if c.get("score") is None:  # e.g. constant maps: no ranking to compare
        return f"{label}undefined"
    return f"{label}{c['score']:.3f} {missed} {c['threshold']:g}"


def _randomisation_here(report: dict) -> str:
    entries = _ran(report, "randomisation")
    if not entries:
        return _not_run_text(report, "randomisation")
    final = {m: e["details"]["cascading"]["spearman_abs"][-1] for m, e in entries.items()}
    final = {m: v for m, v in final.items() if v is not None}
    first = next(iter(entries.values()))
    limit = _criterion(first, "final") or first  # the final-similarity criterion of the policy
    zero = {m: v for m, v in final.items() if abs(v) < NEAR_ZERO}
    high = {m: v for m, v in final.items() if v > limit["threshold"]}
    between = len(final) - len(zero) - len(high)
    # Every method that failed, those without a number too (constant maps: nothing to rank).
    failed = {
        m: r["checks"]["randomisation"]
        for m, r in report["methods"].items()
        if m != CONTROL_METHOD and r["checks"].get("randomisation", {}).get("verdict") == "fail"
    }
    order = sorted(failed.items(), key=lambda kv: (kv[1]["score"] is None, kv[1]["score"] or 0.0))
    shown = ", ".join(f"{m} ({_decided(e)})" for m, e in order)
    return (
        f"mean Spearman |a| with every layer randomised reaches |ρ| < {NEAR_ZERO:g} for {len(zero)} of "
        f"{len(final)} methods: {_listing(zero, 3)}; stays above the policy's final limit "
        f"({_SYMBOLS.get(limit['comparison'], limit['comparison'])} {limit['threshold']:g}) for "
        f"{len(high)}: {_listing(high, 3)}; {between} in between. Each criterion is decided on its "
        f"interval's end ({_criteria_text(first)}): {len(failed)} fail the check: {shown or 'none'}"
    )


def _criteria_text(entry: dict) -> str:
    criteria = entry.get("details", {}).get("criteria") or {}
    if not criteria:
        return f"{_statistic_name(entry)} {_condition(entry)}"
    return "; ".join(f"{n} {_statistic_name(c)} {_condition(c)}" for n, c in criteria.items())


def _perturbation_here(report: dict) -> str:
    entries = _ran(report, "perturbation")
    if not entries:
        return _not_run_text(report, "perturbation")
    versus = {m: e["details"]["versus_control"] for m, e in entries.items()}
    strategies = list(next(iter(versus.values())))
    strategy = "noisy_linear" if "noisy_linear" in strategies else strategies[0]
    gap = {m: v[strategy]["mean"] for m, v in versus.items() if v[strategy]["mean"] is not None}
    beat = [m for m, v in versus.items() if v[strategy]["low"] is not None and v[strategy]["low"] > 0]
    passed = [m for m, e in entries.items() if e["verdict"] == "pass"]
    confidence = report.get("policy", {}).get("content", {}).get("checks", {}).get("perturbation", {})
    level = f"{100 * confidence['confidence']:g} % " if "confidence" in confidence else ""
    lo, hi = _extremes(gap)
    return (
        f"faithfulness gap to the random control ({strategy}, method − control): {gap[lo]:.2f} ({lo}) "
        f"to {gap[hi]:.2f} ({hi}); {len(beat)} of {len(versus)} methods beat the control (lower end "
        f"of the {level}interval above 0); {len(passed)} pass the check under all "
        f"{len(strategies)} replacement strategies"
    )


def _inter_method_here(report: dict) -> str:
    names = report["inter_method"]["methods"]
    matrix = report["inter_method"]["matrix"]
    keep = [i for i, m in enumerate(names) if m != CONTROL_METHOD]
    pairs = {
        (names[i], names[j]): matrix[i][j]
        for a, i in enumerate(keep)
        for j in keep[a + 1 :]
        if matrix[i][j] is not None
    }
    if not pairs:
        return "not measured: fewer than two methods besides the control"
    lo, hi = _extremes(pairs)
    return (
        f"median correlation {statistics.median(pairs.values()):.2f} over {len(pairs)} pairs of "
        f"{len(keep)} methods; least similar {lo[0]} / {lo[1]} ({pairs[lo]:.2f}), "
        f"most similar {hi[0]} / {hi[1]} ({pairs[hi]:.2f})"
    )


def _localisation_here(report: dict) -> str:
    entries = _ran(report, "localisation")
    if not entries:
        return _not_run_text(report, "localisation")
    auroc = {m: e["score"] for m, e in entries.items()}
    lo, hi = _extremes(auroc)
    threshold = next(iter(entries.values()))["threshold"]
    reach = sum(v >= threshold for v in auroc.values())
    text = (
        f"AUROC {auroc[lo]:.2f} ({lo}) to {auroc[hi]:.2f} ({hi}), mean "
        f"{statistics.fmean(auroc.values()):.2f} (chance 0.5); {reach} of {len(auroc)} methods reach "
        f"{threshold:g}"
    )
    details = next(iter(entries.values()))["details"]
    base = details.get("input_baseline") or {}
    if base.get("auroc") is not None:
        best = {m: e["details"].get("pointing_game") for m, e in entries.items()}
        best = {m: v for m, v in best.items() if v is not None}
        top = max(best, key=best.get) if best else None
        text += (
            f"; the input |x| alone scores AUROC {base['auroc']:.2f}, pointing game "
            f"{_fmt(base.get('pointing_game'))}, top-k precision {_fmt(base.get('top_k_precision'))}, "
            f"relevance mass {_fmt(base.get('mass'))} (mask area {_fmt(details.get('mask_area'))})"
        )
        if top is not None:
            text += f"; best pointing game {best[top]:.2f} ({top})"
    return text


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def study_comparison_rows(report: dict) -> list[dict]:
    """The published study's findings beside what this report measured (every number from ``report``)."""
    return [
        {
            "experiment": "Self-consistency across seeds",
            "published": "mean correlation 0.41-0.65 across methods",
            "here": _self_consistency_here(report),
        },
        {
            "experiment": "Cascading model randomisation",
            "published": "correlation drops under randomisation; some methods do not reach zero",
            "here": _randomisation_here(report),
        },
        {
            "experiment": "Perturbation (feature removal)",
            "published": "methods differ widely in whether the features they highlight matter to the model",
            "here": _perturbation_here(report),
        },
        {
            "experiment": "Inter-method similarity",
            "published": "methods often disagree",
            "here": _inter_method_here(report),
        },
        {
            "experiment": "Ground-truth localisation",
            "published": "not measured (no ground truth in real data)",
            "here": _localisation_here(report),
        },
    ]


NOTICE_MARK = "<!-- ecgx notices -->"


def add_notice(path: Path, heading: str, lines: Sequence[str]) -> Path:
    """Put a highlighted notice (``heading`` and a list of ``lines``) at the top of the written
    report ``path``, e.g. what a demo trimmed; the page stays self-contained."""
    path = Path(path)
    page = path.read_text(encoding="utf-8")
    items = "".join(f"<li>{_e(line)}</li>" for line in lines)
    notice = f'<div class="banner"><strong>{_e(heading)}</strong><ul>{items}</ul></div>\n'
    if NOTICE_MARK not in page:
        page = page.replace("<body>\n", f"<body>\n{NOTICE_MARK}\n", 1)
    page = page.replace(NOTICE_MARK + "\n", NOTICE_MARK + "\n" + notice, 1)
    path.write_text(page, encoding="utf-8")
    return path
