"""ecgx.core.plots: every attribution picture (the gRPC explanation included) has its mV scale bar,
colour bar and legend, and says the record, method and verdict where they are known."""

from __future__ import annotations

import numpy as np
import pytest

from ecgx.core.plots import (
    COLOUR_BAR_LABEL,
    GROUND_TRUTH_LABEL,
    attribution_figure,
    explanation_title,
    plot_attributions,
)
from ecgx.core.schema import LEADS


@pytest.fixture
def beat():
    rng = np.random.default_rng(0)
    signal = np.sin(np.linspace(0, 6, 600))[None, :] * np.linspace(0.5, 2.0, len(LEADS))[:, None]
    maps = {"saliency": rng.normal(size=(len(LEADS), 600)), "gradcam": rng.normal(size=(len(LEADS), 600))}
    return signal.astype(np.float32), maps


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _legend_labels(fig):
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def test_the_figure_has_scale_bar_colour_bar_and_legend(beat):
    signal, maps = beat
    fig = attribution_figure(signal, maps, title="t")
    assert "1 mV" in _texts(fig)
    assert any(ax.get_ylabel() == COLOUR_BAR_LABEL for ax in fig.axes)  # the colour bar's own axes
    labels = _legend_labels(fig)
    assert any(label.startswith("ECG (mV); scale bar: 1 mV, 0.2 s") for label in labels)
    assert GROUND_TRUTH_LABEL not in labels  # no mask: no band, nothing to explain
    assert "the 1.2 s window the model sees (600 samples at 500 Hz)" in fig._suptitle.get_text()


def test_verdicts_title_the_columns_and_grey_the_refused_with_a_legend_entry(beat):
    signal, maps = beat
    mask = np.zeros_like(signal, dtype=bool)
    mask[1, 100:200] = True
    fig = attribution_figure(signal, maps, verdicts={"saliency": "pass", "gradcam": "fail"}, mask=mask)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["saliency\nPASS: served", "gradcam\nFAIL: refused"]
    labels = _legend_labels(fig)
    assert GROUND_TRUTH_LABEL in labels
    assert any("grey column" in label for label in labels)
    grid = [ax for ax in fig.axes if ax.images]
    cmaps = {im.get_cmap().name for ax in grid for im in ax.images}
    assert cmaps == {"Reds", "Greys"}


def test_the_explanation_title_names_record_method_and_verdict():
    title = explanation_title(
        "ecg",
        "2",
        0,
        record="demo/records/test-beat.npy",
        top_class="AF",
        probability=0.91234,
        methods={"gradient_shap -> AF": "pass"},
    )
    assert title == (
        "ecg v2, record demo/records/test-beat.npy: most probable AF (p = 0.912); "
        "gradient_shap -> AF (gate pass)"
    )
    assert explanation_title("ecg", "2", 3, top_class="AF", probability=0.5).startswith("ecg v2, ecg 3:")


def test_plot_attributions_writes_a_png(beat, tmp_path):
    signal, maps = beat
    out = plot_attributions(signal, maps, tmp_path / "sub" / "x.png", title="record 7, saliency (gate pass)")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
