"""Pictures of ECGs and their attributions (matplotlib, written as PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; servers and CI have no display
import matplotlib.pyplot as plt
import numpy as np

from ecgx.core.schema import LEADS, SAMPLING_RATE_HZ


def plot_attributions(
    signal: np.ndarray,
    attributions: Mapping[str, np.ndarray],
    out: Path,
    *,
    title: str = "",
    mask: np.ndarray | None = None,
    leads: Sequence[str] = LEADS,
    fmt: str | None = None,
) -> Path:
    """One column per method, one row per lead: the ECG (black) over the method's
    |attribution| (red, scaled to the method's own maximum), and the ground-truth
    feature ``mask`` (green band under the trace) where there is one. ``leads`` names the rows;
    ``fmt`` is the file format when ``out``'s suffix does not say it (a temporary file)."""
    methods = list(attributions)
    t = np.arange(signal.shape[1]) / SAMPLING_RATE_HZ
    fig, axes = plt.subplots(
        len(leads), len(methods), figsize=(max(2.6 * len(methods), 6.0), 11), sharex=True, squeeze=False
    )
    lo, hi = float(signal.min()), float(signal.max())
    pad = 0.1 * (hi - lo + 1e-6)
    for col, name in enumerate(methods):
        heat = np.abs(attributions[name])
        heat = heat / (heat.max() or 1.0)
        for row, lead in enumerate(leads):
            ax = axes[row, col]
            ax.imshow(
                heat[row][None, :],
                aspect="auto",
                cmap="Reds",
                vmin=0,
                vmax=1,
                extent=(t[0], t[-1], lo - pad, hi + pad),
                origin="lower",
            )
            if mask is not None and mask[row].any():
                ax.fill_between(
                    t, lo - pad, lo - pad + 0.08 * (hi - lo), where=mask[row], color="tab:green", lw=0
                )
            ax.plot(t, signal[row], color="black", lw=0.7)
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(lead, rotation=0, ha="right", va="center")
            if row == 0:
                ax.set_title(name, fontsize=10)
        axes[-1, col].set_xlabel("s")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, format=fmt)
    plt.close(fig)
    return out
