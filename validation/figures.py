"""Figures of a gate run: one PNG per function, drawn from the gate report (and its arrays).

Every function reads only what the report (or :class:`~ecgx.validation.gate.GateRun`) holds,
so a figure shows exactly what the gate decided on. Colours follow the Okabe-Ito
palette (distinguishable with the common colour-vision deficiencies); with more
methods than colours, markers tell the methods apart. The random control is always
grey and dashed, so it reads as the baseline at a glance.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only; servers and CI have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from ecgx.core.errors import InvalidArgument
from ecgx.core.plots import GROUND_TRUTH_LABEL, VERDICT_LABELS, attribution_figure  # noqa: F401 (re-exported)
from ecgx.core.schema import CLASSES, LEADS, SAMPLING_RATE_HZ
from ecgx.validation.policy import CHECKS, CONTROL_METHOD

if TYPE_CHECKING:
    from ecgx.validation.gate import GateRun

DPI = 100
# Okabe & Ito (2008), without black (kept for text) and yellow (too pale on white for lines).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
CONTROL_COLOUR = "#7f7f7f"
# Verdict colours of the score table: blue / orange / grey is safe for red-green deficiency.
VERDICT_COLOURS = {"pass": "#9ecae1", "fail": "#fdae6b", "not_run": "#e0e0e0"}
MEASURES = {
    "spearman_abs": "Spearman rank correlation of |attribution|",
    "spearman": "Spearman rank correlation (signed)",
    "ssim": "SSIM (structural similarity)",
}
STRATEGY_LABELS = {
    "zero": "replaced by zeros",
    "lead_mean": "replaced by the lead's mean",
    "linear": "linear interpolation",
    "noisy_linear": "noisy linear interpolation (ROAD)",
}
CHECK_LABELS = {
    "randomisation": "randomisation",
    "perturbation": "perturbation",
    "changed_model": "changed model",
    "self_consistency": "self-consistency",
    "inter_method": "inter-method",
    "localisation": "localisation",
}
# Methods shown in the per-class overlays when present: one of each family (gradient,
# path, reference, CAM, perturbation, relevance propagation).
OVERLAY_METHODS = ("saliency", "integrated_gradients", "deeplift", "gradcam", "occlusion", "lrp")
MAX_OVERLAY_METHODS = 6
_SYMBOLS = {"<=": "≤", ">=": "≥"}


def method_styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Line style per method: colour and marker cycle independently, so up to 49 methods
    get distinct (colour, marker) pairs; the random control is grey and dashed."""
    styles: dict[str, dict[str, Any]] = {}
    others = [m for m in methods if m != CONTROL_METHOD]
    for i, m in enumerate(others):
        colour = PALETTE[i % len(PALETTE)]
        marker = MARKERS[(i // len(PALETTE) + i) % len(MARKERS)]
        styles[m] = {"color": colour, "marker": marker, "lw": 1.4, "ms": 4}
    if CONTROL_METHOD in methods:
        styles[CONTROL_METHOD] = {"color": CONTROL_COLOUR, "marker": None, "lw": 2.2, "ls": "--"}
    return styles


def _save(fig: plt.Figure, out: Path | str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return out


def _checked(report: dict, check: str) -> dict[str, dict]:
    """Method -> the check's entry, for methods where it ran."""
    out = {}
    for m, r in report["methods"].items():
        entry = r["checks"].get(check)
        if entry is not None and entry["verdict"] != "not_run":
            out[m] = entry
    return out


def _nan(values: Sequence[float | None]) -> np.ndarray:
    """JSON nulls (NaN in the measurement) back to NaN, so lines break instead of failing."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _empty(out: Path | str, title: str, why: str) -> Path:
    """A small figure that says the check did not run, so reports never miss a picture silently."""
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
    return _save(fig, out)


def _legend_handles(styles: dict[str, dict[str, Any]], methods: Sequence[str]) -> list[Line2D]:
    return [Line2D([], [], label=m, **{k: v for k, v in styles[m].items() if k != "ms"}) for m in methods]


def plot_inter_method(report: dict, out: Path | str) -> Path:
    """Method x method heatmap of the mean per-ECG correlation of |attribution|, annotated."""
    names = report["inter_method"]["methods"]
    matrix = np.array([_nan(row) for row in report["inter_method"]["matrix"]])
    n = len(names)
    size = max(4.0, 0.5 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=-1, vmax=1)
    fontsize = 8 if n <= 12 else 7
    for i in range(n):
        for j in range(n):
            v = matrix[i, j]
            text = "n/a" if not np.isfinite(v) else f"{v:.2f}"
            colour = "white" if np.isfinite(v) and abs(v) > 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=colour)
    ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("method")
    ax.set_ylabel("method")
    ecgs = report.get("data", {}).get("ecgs", "?")
    ax.set_title(f"Inter-method agreement: Pearson correlation of |attribution|\n(mean over {ecgs} ECGs)")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("correlation (−1 … 1)")
    return _save(fig, out)


def _randomisation_table(report: dict, mode: str) -> tuple[list[str], dict[str, dict]]:
    """Layers (output to input) and method -> {measure: curve} of one randomisation mode."""
    entries = _checked(report, "randomisation")
    layers: list[str] = []
    curves = {}
    for m, e in entries.items():
        layers = layers or list(e["details"]["layers"])
        curves[m] = e["details"][mode]
    return layers, curves


# The randomisation criteria drawn on the cascading |rho| panel, with their line styles.
_LIMIT_STYLES = (
    (":", "policy limit, every layer randomised"),
    ("--", "policy limit, output layer randomised"),
)
_LIMIT_CRITERIA = ("final", "top_layer")


def _randomisation_limits(entry: dict) -> list[tuple[str, float]]:
    """(text, threshold) of the final and top-layer similarity criteria, as the policy that
    decided set them (``final ≤ 0.5``); a report without criteria gives its one threshold."""
    criteria = entry.get("details", {}).get("criteria") or {}
    out = []
    for name in _LIMIT_CRITERIA:
        c = criteria.get(name)
        if c is not None:
            out.append(
                (
                    f"{name} {_SYMBOLS.get(c['comparison'], c['comparison'])} {c['threshold']:g}",
                    c["threshold"],
                )
            )
    if not out:
        out.append(
            (
                f"score {_SYMBOLS.get(entry['comparison'], entry['comparison'])} {entry['threshold']:g}",
                entry["threshold"],
            )
        )
    return out


def plot_randomisation(report: dict, out: Path | str) -> Path:
    """Cascading randomisation: similarity to the trained model's attributions as layers are
    randomised cumulatively from the output towards the input, one subplot per measure."""
    title = "Cascading model randomisation"
    layers, curves = _randomisation_table(report, "cascading")
    if not curves:
        return _empty(out, title, "The randomisation check did not run for any method.")
    methods = list(curves)
    styles = method_styles(methods)
    labels = ["trained", *[f"+ {layer}" for layer in layers]]
    x = np.arange(len(labels))
    limits = _randomisation_limits(next(iter(_checked(report, "randomisation").values())))
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5.2 * len(MEASURES), 6.0), sharey=True)
    for ax, (measure, label) in zip(axes, MEASURES.items(), strict=True):
        for m in methods:
            # The trained model's maps equal themselves: similarity 1 by definition.
            y = np.concatenate([[1.0], _nan(curves[m].get(measure, []))])
            ax.plot(x[: len(y)], y, label=m, zorder=3 if m == CONTROL_METHOD else 2, **styles[m])
        if measure == "spearman_abs":
            for (ls, _), (_, value) in zip(_LIMIT_STYLES, limits, strict=False):
                ax.axhline(value, color="black", lw=1, ls=ls, zorder=1)
        ax.axhline(0, color="#bbbbbb", lw=0.8, zorder=0)
        ax.set_xticks(x, labels, rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("layers randomised (cumulative, output → input)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("similarity to trained-model attributions (mean over ECGs)")
    axes[0].set_ylim(-0.3, 1.05)
    limit_lines = [
        Line2D([], [], color="black", lw=1, ls=ls, label=f"{label}, |ρ| panel: {text}")
        for (ls, label), (text, _) in zip(_LIMIT_STYLES, limits, strict=False)
    ]
    fig.legend(
        handles=[*_legend_handles(styles, methods), *limit_lines],
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        title="method",
        fontsize=8,
    )
    ecgs = report.get("data", {}).get("randomisation_ecgs", "?")
    fig.suptitle(f"{title} ({ecgs} ECGs): a method that explains the model should fall towards 0")
    fig.tight_layout()
    return _save(fig, out)


def plot_randomisation_independent(report: dict, out: Path | str) -> Path:
    """Independent randomisation: one layer randomised at a time (the rest trained), shown as
    method x layer heatmaps of the similarity to the trained model's attributions."""
    title = "Independent layer randomisation"
    layers, curves = _randomisation_table(report, "independent")
    if not curves:
        return _empty(out, title, "The randomisation check did not run for any method.")
    methods = list(curves)
    fig, axes = plt.subplots(
        1, len(MEASURES), figsize=(3.0 + 1.1 * len(layers) * len(MEASURES), 1.6 + 0.36 * len(methods))
    )
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#d9d9d9")
    for k, (ax, (measure, label)) in enumerate(zip(axes, MEASURES.items(), strict=True)):
        grid = np.array([_nan(curves[m].get(measure, [None] * len(layers))) for m in methods])
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v = grid[i, j]
                colour = "white" if np.isfinite(v) and abs(v) > 0.6 else "black"
                ax.text(
                    j,
                    i,
                    "n/a" if not np.isfinite(v) else f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=colour,
                )
        ax.set_xticks(range(len(layers)), layers, rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_yticks(range(len(methods)), methods if k == 0 else [""] * len(methods))
        ax.set_xlabel("layer randomised alone (output → input)")
        ax.set_title(label, fontsize=10)
    cbar = fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01)
    cbar.set_label("similarity to trained-model attributions")
    fig.suptitle(f"{title}: low values mean the method depends on that layer's weights")
    return _save(fig, out)


def plot_perturbation(report: dict, out: Path | str) -> Path:
    """Mean target-class logit as segments are removed: one column per replacement
    strategy, MoRF (most relevant first, solid) on top and LeRF (least relevant first,
    dashed) below, one colour per method, the random control grey."""
    title = "Perturbation curves"
    entries = _checked(report, "perturbation")
    if not entries:
        return _empty(out, title, "The perturbation check did not run for any method.")
    methods = list(entries)
    first = next(iter(entries.values()))["details"]
    strategies = list(first["morf"])
    fractions = 100 * np.asarray(first["fractions"], dtype=float)
    styles = method_styles(methods)
    fig, axes = plt.subplots(
        2, len(strategies), figsize=(4.2 * len(strategies), 8.2), sharex=True, sharey=True, squeeze=False
    )
    rows = (
        ("morf", "-", "most relevant removed first (MoRF)"),
        ("lerf", "--", "least relevant first (LeRF)"),
    )
    for r, (order, ls, order_label) in enumerate(rows):
        for c, s in enumerate(strategies):
            ax = axes[r, c]
            for m in methods:
                style = {**styles[m], "ls": "--" if m == CONTROL_METHOD else ls, "ms": 3}
                y = _nan(entries[m]["details"][order][s])
                ax.plot(fractions, y, zorder=3 if m == CONTROL_METHOD else 2, **style)
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(STRATEGY_LABELS.get(s, s), fontsize=10)
            if r == 1:
                ax.set_xlabel("segments removed (%)")
            if c == 0:
                ax.set_ylabel(f"{order_label}\n target-class logit")
    fig.legend(
        handles=_legend_handles(styles, methods),
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        title="method",
        fontsize=8,
    )
    ecgs = first.get("ecgs", report.get("data", {}).get("ecgs", "?"))
    fig.suptitle(
        f"{title} (mean over {ecgs} ECGs whose target the model predicts): a faithful method falls "
        "fast in the top row and stays high in the bottom row"
    )
    fig.tight_layout()
    return _save(fig, out)


def _cell(entry: dict | None) -> tuple[str, str]:
    """(verdict, text) of one check cell of the score table."""
    if entry is None:
        return "not_run", "absent"
    if entry["verdict"] == "not_run":
        return "not_run", "not run"
    score = "n/a" if entry["score"] is None else f"{entry['score']:.3f}"
    return entry["verdict"], f"{score}\n{'pass' if entry['verdict'] == 'pass' else 'FAIL'}"


def _check_header(report: dict, check: str) -> str:
    """Column header: the check, its pass condition and whether it blocks."""
    for r in report["methods"].values():
        e = r["checks"].get(check)
        if e is not None and e["verdict"] != "not_run":
            blocking = "blocking" if e["blocking"] else "informative"
            criteria = e.get("details", {}).get("criteria") or {}
            if criteria:  # each criterion with its own threshold, from the policy that decided
                lines = [
                    f"{n} {_SYMBOLS.get(c['comparison'], c['comparison'])} {c['threshold']:g}"
                    for n, c in criteria.items()
                ]
                return f"{CHECK_LABELS[check]}\n" + "\n".join(lines) + f"\n({blocking})"
            condition = f"score {_SYMBOLS.get(e['comparison'], e['comparison'])} {e['threshold']:g}"
            return f"{CHECK_LABELS[check]}\n{condition}\n({blocking})"
    return f"{CHECK_LABELS[check]}\n(not run)"


def plot_scores(report: dict, out: Path | str) -> Path:
    """Methods x checks: each cell the check's score, coloured and labelled by its verdict
    (not-run cells grey); the last column is the method's overall verdict."""
    methods = list(report["methods"])
    cols = [c for c in CHECKS if any(c in r["checks"] for r in report["methods"].values())]
    verdicts = np.empty((len(methods), len(cols) + 1), dtype=object)
    texts = np.empty_like(verdicts)
    for i, m in enumerate(methods):
        for j, c in enumerate(cols):
            verdicts[i, j], texts[i, j] = _cell(report["methods"][m]["checks"].get(c))
        verdicts[i, -1] = report["methods"][m]["verdict"]
        texts[i, -1] = "PASS" if verdicts[i, -1] == "pass" else "FAIL"
    order = list(VERDICT_COLOURS)
    codes = np.vectorize(order.index)(verdicts)
    fig, ax = plt.subplots(figsize=(2.0 + 1.7 * (len(cols) + 1), 1.8 + 0.42 * len(methods)))
    ax.imshow(
        codes, cmap=ListedColormap([VERDICT_COLOURS[v] for v in order]), vmin=-0.5, vmax=2.5, aspect="auto"
    )
    for (i, j), text in np.ndenumerate(texts):
        bold = "bold" if j == len(cols) or verdicts[i, j] == "fail" else "normal"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, fontweight=bold)
    ax.set_xticks(
        range(len(cols) + 1), [_check_header(report, c) for c in cols] + ["method\nverdict"], fontsize=8
    )
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xticks(np.arange(-0.5, len(cols) + 1), minor=True)
    ax.set_yticks(np.arange(-0.5, len(methods)), minor=True)
    ax.grid(which="minor", color="white", lw=2)
    ax.tick_params(which="minor", length=0)
    ax.axvline(len(cols) - 0.5, color="black", lw=1.5)
    handles = [Rectangle((0, 0), 1, 1, color=VERDICT_COLOURS[v], label=v.replace("_", " ")) for v in order]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3, frameon=False)
    ax.set_title(f"Gate scores per method and check — gate verdict: {report['verdict'].upper()}", pad=12)
    return _save(fig, out)


def overlay_methods(run: GateRun, methods: Sequence[str] | None = None) -> list[str]:
    """The methods the class overlays show: ``methods`` if given (those that were run), else
    one of each family from :data:`OVERLAY_METHODS`, else the first non-control methods."""
    if methods is not None:
        missing = [m for m in methods if m not in run.maps]
        if missing:
            raise InvalidArgument(
                f"no attributions for {', '.join(missing)}; the run has {', '.join(run.maps)}"
            )
        return list(methods)
    chosen = [m for m in OVERLAY_METHODS if m in run.maps]
    return chosen or [m for m in run.maps if m != CONTROL_METHOD][:MAX_OVERLAY_METHODS]


def _overlay_title(lines: Sequence[str], columns: int) -> str:
    """The overlay's title wrapped to its figure: ``plot_attributions`` gives each method column
    2.6 inches and saves without growing the canvas, so a long line would be cut off."""
    width = max(24, int(columns * 2.6 * 9))  # about 9 characters per inch at the title's size
    return "\n".join(textwrap.fill(line, width) for line in lines)


def plot_class_overlays(
    run: GateRun, out_dir: Path | str, methods: Sequence[str] | None = None
) -> list[Path]:
    """Per class among the run's targets, its first ECG (dataset order, so not hand-picked)
    with each chosen method's |attribution| and the class's ground-truth mask where there is one;
    written as ``overlay_<CLASSKEY>.png``."""
    out_dir = Path(out_dir)
    names = overlay_methods(run, methods)
    target = np.asarray(run.data.target)
    paths = []
    for c in sorted({int(t) for t in target}):
        i = int(np.flatnonzero(target == c)[0])
        cls = CLASSES[c]
        mask = None if run.data.masks is None else np.asarray(run.data.masks[i])
        title = (
            f"record {int(run.data.indices[i])} of {Path(run.report['data']['path']).name}, "
            f"explained for {cls.key} ({cls.name})"
        )
        attributions = {m: np.asarray(run.maps[m][i]) for m in names}
        methods = run.report.get("methods", {})
        verdicts = {m: methods[m]["verdict"] if m in methods else "not gated" for m in names}
        paths.append(
            plot_gated_attributions(
                run.data.x[i],
                attributions,
                verdicts,
                out_dir / f"overlay_{cls.key}.png",
                title=title,
                mask=mask,
            )
        )
    return paths


# ------------------------------------------------------------------ attributions marked with verdicts


def gated_attribution_figure(
    signal: np.ndarray,
    attributions: dict[str, np.ndarray],
    verdicts: dict[str, str],
    *,
    title: str,
    mask: np.ndarray | None = None,
    leads: Sequence[str] | None = None,
    fs: float | None = None,
) -> plt.Figure:
    """:func:`ecgx.core.plots.attribution_figure` with the gate's verdict on every column (a method
    the gate did not check is "not gated"): the picture the demo and `ecgx client explain --png` share."""
    return attribution_figure(
        signal,
        attributions,
        title=title,
        verdicts={m: verdicts.get(m, "not gated") for m in attributions},
        mask=mask,
        leads=LEADS if leads is None else leads,
        fs=SAMPLING_RATE_HZ if fs is None else fs,
    )


def plot_gated_attributions(
    signal: np.ndarray,
    attributions: dict[str, np.ndarray],
    verdicts: dict[str, str],
    out: Path | str,
    *,
    title: str,
    mask: np.ndarray | None = None,
    leads: Sequence[str] | None = None,
) -> Path:
    """:func:`gated_attribution_figure` written as PNG to ``out``."""
    fig = gated_attribution_figure(signal, attributions, verdicts, title=title, mask=mask, leads=leads)
    return _save(fig, out)
