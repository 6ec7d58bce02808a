"""Pictures of ECGs and their attributions (matplotlib, written as PNG).

One figure for every attribution picture ecgx draws (the demo's gated figures, the gRPC
explanation of ``ecgx client explain --png``): :func:`attribution_figure`, with its mV scale bar,
colour bar and legend drawn by the helpers below, so every picture reads the same way.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; servers and CI have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ecgx.core.schema import LEADS, SAMPLING_RATE_HZ

SERVED_COLOUR = "#0072B2"  # Okabe-Ito blue: a column the gate passed
REFUSED_COLOUR = "#7f7f7f"  # grey: refused or not gated, never served
VERDICT_LABELS = {
    "pass": "PASS: served",
    "fail": "FAIL: refused",
    "not gated": "not gated: never served",
    "ungated": "UNGATED: served without a gate",
}
# Columns drawn grey: the gate refused them, or never saw them.
REFUSED_VERDICTS = frozenset({"fail", "not gated"})
GROUND_TRUTH_LABEL = "ground truth: where the synthetic generator put the class's feature"
COLOUR_BAR_LABEL = "|attribution| / the method's maximum on this ECG"
SCALE_BAR_MV, SCALE_BAR_S = 1.0, 0.2


def scale_bar(ax: plt.Axes, t: np.ndarray, bottom: float) -> None:
    """A 1 mV by 0.2 s L-shaped scale bar at the lower left of ``ax`` (the traces share mV)."""
    x0 = t[0] + 0.02 * (t[-1] - t[0])
    ax.plot(
        [x0, x0, x0 + SCALE_BAR_S],
        [bottom + SCALE_BAR_MV, bottom, bottom],
        color=SERVED_COLOUR,
        lw=2.5,
        clip_on=False,
    )
    ax.text(
        x0 + 0.02,
        bottom + SCALE_BAR_MV / 2,
        f"{SCALE_BAR_MV:g} mV",
        color=SERVED_COLOUR,
        fontsize=7,
        va="center",
    )


def colour_bar(fig: plt.Figure, cmap: str = "Reds") -> None:
    """The attribution colour scale on its own axes right of the columns (never over a map)."""
    cax = fig.add_axes((0.915, 0.3, 0.012, 0.4))
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=cmap), cax=cax)
    bar.set_label(COLOUR_BAR_LABEL)


def legend(fig: plt.Figure, *, mask_label: str | None, refused: bool) -> None:
    """What the trace, the scale bar, the ground-truth band (when drawn) and grey columns mean."""
    handles = [
        Line2D(
            [],
            [],
            color="black",
            lw=0.7,
            label=f"ECG (mV); scale bar: {SCALE_BAR_MV:g} mV, {SCALE_BAR_S:g} s",
        )
    ]
    if mask_label is not None:
        handles.append(Patch(color="tab:green", label=mask_label))
    if refused:
        handles.append(
            Patch(color=REFUSED_COLOUR, alpha=0.6, label="grey column: refused or not gated, never served")
        )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)


def wrapped_title(lines: Sequence[str], columns: int) -> str:
    """Title lines wrapped to the figure's width (about 40 characters per column)."""
    width = max(60, 40 * columns)
    return "\n".join(textwrap.fill(line, width) for line in lines if line)


def attribution_figure(
    signal: np.ndarray,
    attributions: Mapping[str, np.ndarray],
    *,
    title: str = "",
    verdicts: Mapping[str, str] | None = None,
    mask: np.ndarray | None = None,
    mask_label: str = GROUND_TRUTH_LABEL,
    leads: Sequence[str] = LEADS,
    fs: float = SAMPLING_RATE_HZ,
) -> plt.Figure:
    """One column per method, one row per lead: the ECG window (black, mV) over the method's
    |attribution| (red, scaled to the method's own maximum: colour bar), a 1 mV / 0.2 s scale bar
    and a legend. ``verdicts`` (column -> gate verdict) puts each verdict in its column's title and
    draws refused or ungated-by-the-gate columns grey; ``mask`` is the ground-truth band (green,
    under the trace), explained in the legend as ``mask_label``."""
    methods = list(attributions)
    leads = list(leads)
    verdicts = dict(verdicts or {})
    t = np.arange(signal.shape[1]) / float(fs)
    fig, axes = plt.subplots(
        len(leads), len(methods), figsize=(max(2.4 * len(methods), 7.0) + 1.2, 12), sharex=True, squeeze=False
    )
    lo, hi = float(signal.min()), float(signal.max())
    pad = 0.1 * (hi - lo + 1e-6)
    has_mask = mask is not None and bool(np.asarray(mask).any())
    for col, name in enumerate(methods):
        verdict = verdicts.get(name)
        served = verdict not in REFUSED_VERDICTS
        heat = np.abs(np.asarray(attributions[name], dtype=float))
        heat = heat / (heat.max() or 1.0)
        for row, lead in enumerate(leads):
            ax = axes[row, col]
            ax.imshow(
                heat[row][None, :],
                aspect="auto",
                cmap="Reds" if served else "Greys",
                vmin=0,
                vmax=1,
                alpha=1.0 if served else 0.6,
                extent=(t[0], t[-1], lo - pad, hi + pad),
                origin="lower",
            )
            if has_mask and mask[row].any():
                ax.fill_between(
                    t, lo - pad, lo - pad + 0.08 * (hi - lo), where=mask[row], color="tab:green", lw=0
                )
            ax.plot(t, signal[row], color="black" if served else "#555555", lw=0.7)
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(lead, rotation=0, ha="right", va="center")
        label = name if verdict is None else f"{name}\n{VERDICT_LABELS.get(verdict, verdict)}"
        axes[0, col].set_title(
            label,
            fontsize=9,
            color=SERVED_COLOUR if verdict == "pass" else (REFUSED_COLOUR if not served else "black"),
            fontweight="bold" if verdict == "pass" else "normal",
        )
        axes[-1, col].set_xlabel("s")
    scale_bar(axes[-1, 0], t, lo - pad)
    refused = any(v in REFUSED_VERDICTS for v in verdicts.values())
    legend(fig, mask_label=mask_label if has_mask else None, refused=refused)
    window = (
        f"the {signal.shape[1] / fs:.1f} s window the model sees ({signal.shape[1]} samples at {fs:g} Hz)"
    )
    suptitle = wrapped_title([title, window], max(len(methods), 3))
    fig.suptitle(suptitle, fontsize=10)
    # Room above the grid for the title's lines and the two-line column titles, so they never touch.
    top = 0.965 - 0.016 * (suptitle.count("\n") + 1) - 0.03
    fig.subplots_adjust(left=0.06, right=0.9, top=top, bottom=0.07, hspace=0.08, wspace=0.05)
    colour_bar(fig)
    return fig


def explanation_title(
    model: str,
    version: str,
    ecg_index: int,
    *,
    record: str = "",
    top_class: str,
    probability: float,
    methods: Mapping[str, str] | None = None,
) -> str:
    """The title of an explanation's picture: model, version, the record (its id where the request
    named one), the most probable class, and each method with its gate verdict."""
    what = f"record {record}" if record else f"ecg {ecg_index}"
    title = f"{model} v{version}, {what}: most probable {top_class} (p = {probability:.3f})"
    if methods:
        title += "; " + ", ".join(f"{m} (gate {v})" for m, v in methods.items())
    return title


def save_figure(fig: plt.Figure, out: Path, fmt: str | None = None) -> Path:
    """Write ``fig`` to ``out`` (``fmt`` when the suffix does not say it) and close it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=90, format=fmt)
    finally:
        plt.close(fig)
    return out


def plot_attributions(
    signal: np.ndarray,
    attributions: Mapping[str, np.ndarray],
    out: Path,
    *,
    title: str = "",
    verdicts: Mapping[str, str] | None = None,
    mask: np.ndarray | None = None,
    leads: Sequence[str] = LEADS,
    fmt: str | None = None,
) -> Path:
    """:func:`attribution_figure` written to ``out``; ``fmt`` is the file format when ``out``'s
    suffix does not say it (a temporary file)."""
    fig = attribution_figure(signal, attributions, title=title, verdicts=verdicts, mask=mask, leads=leads)
    return save_figure(fig, out, fmt)
