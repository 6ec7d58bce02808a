"""The gate's figures and its self-contained HTML report, on a small real gate run."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from ecgx.core.schema import CLASSES
from ecgx.training.data.synth import synthesize_dataset
from ecgx.validation import figures
from ecgx.validation.gate import GateRun, run_gate
from ecgx.validation.html_report import FIGURE_DIR, REPORT_FILE, study_comparison_rows, write_html_report

METHODS = ["saliency", "gradcam", "occlusion"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# One ECG per class: drawing dominates this module's time. Fewer would leave perturbation without
# ECGs whose target the untrained model predicts (it predicts 5 of the 9 classes everywhere).
POLICY = """
[gate]
ecgs = 9

[checks.randomisation]
ecgs = 4

[checks.perturbation]
bootstrap = 100
steps = 4
"""


@pytest.fixture(scope="module")
def gate_run(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> GateRun:
    root = tmp_path_factory.mktemp("gate")
    data = synthesize_dataset(root / "data", 60, seed=3, overwrite=True, show_progress=False)
    policy = root / "policy.toml"
    policy.write_text(POLICY)
    return run_gate(
        tiny_package, data, methods=METHODS, policy=policy, workers=1, show_progress=False, research=True
    )


@pytest.fixture(scope="module")
def written(gate_run: GateRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html")
    rows = study_comparison_rows(gate_run.report)
    return write_html_report(
        gate_run, out, title="Tiny <gate> & co", study_comparison=rows, notes=["a <note>"]
    )


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"


def test_every_figure_is_a_real_png(gate_run: GateRun, written: Path) -> None:
    fig_dir = written.parent / FIGURE_DIR
    classes = sorted({int(t) for t in gate_run.data.target})
    expected = [
        "scores.png",
        "randomisation_cascading.png",
        "randomisation_independent.png",
        "perturbation.png",
        "inter_method.png",
        *[f"overlay_{CLASSES[c].key}.png" for c in classes],
    ]
    assert sorted(p.name for p in fig_dir.glob("*.png")) == sorted(expected)
    for name in expected:
        _assert_png(fig_dir / name)


def test_html_is_self_contained(gate_run: GateRun, written: Path) -> None:
    assert written.name == REPORT_FILE
    page = written.read_text(encoding="utf-8")
    n_png = len(list((written.parent / FIGURE_DIR).glob("*.png")))
    assert page.count('src="data:image/png;base64,') == n_png
    assert 'src="figures/' not in page
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    # Every src is a data URI (nothing else would load).
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))


def test_html_shows_methods_verdict_and_study_table(gate_run: GateRun, written: Path) -> None:
    page = written.read_text(encoding="utf-8")
    for method in gate_run.report["methods"]:
        assert method in page
    # The reference rows are shown beside the methods, as the floor they must beat.
    assert len(gate_run.report["references"]) == 6  # |x|, edges, class template, constant, noise, other model
    for reference in gate_run.report["references"]:
        assert f"{reference} (reference, must fail)" in page
    assert gate_run.report["verdict"].upper() in page
    assert "Beside the published study" in page
    for row in study_comparison_rows(gate_run.report):
        assert row["experiment"] in page
        assert row["published"] in page
    # Titles and notes are escaped, not interpreted as markup.
    assert "Tiny &lt;gate&gt; &amp; co" in page
    assert "a &lt;note&gt;" in page


def test_not_run_checks_say_why(gate_run: GateRun, written: Path) -> None:
    """Without a seed family self-consistency does not run; the report says so and why."""
    entry = gate_run.report["methods"]["saliency"]["checks"]["self_consistency"]
    assert entry["verdict"] == "not_run"
    page = written.read_text(encoding="utf-8")
    assert entry["reason"] in page  # as footnote (and tooltip), escaped text is unchanged here
    row = study_comparison_rows(gate_run.report)[0]
    assert row["here"].startswith("not run")


def _with_self_consistency(report: dict, scores: dict[str, float]) -> dict:
    out = copy.deepcopy(report)
    for m, s in scores.items():
        out["methods"][m]["checks"]["self_consistency"] = {
            "score": s,
            "threshold": 0.3,
            "comparison": ">=",
            "verdict": "pass" if s >= 0.3 else "fail",
            "blocking": False,
            "details": {"models": 3},
        }
    return out


def test_study_rows_follow_the_report(gate_run: GateRun) -> None:
    report = gate_run.report
    before = study_comparison_rows(report)
    # Self-consistency: the range and mean come from the scores (control excluded).
    changed = _with_self_consistency(
        report, {"saliency": 0.123, "gradcam": 0.876, "occlusion": 0.5, "random": 1}
    )
    row = study_comparison_rows(changed)[0]["here"]
    assert "0.12-0.88" in row and "mean 0.50" in row and "3 methods" in row
    # Localisation: the AUROC range follows the scores.
    changed = copy.deepcopy(report)
    changed["methods"]["gradcam"]["checks"]["localisation"]["score"] = 0.987
    here = study_comparison_rows(changed)[4]["here"]
    assert "0.99 (gradcam)" in here and here != before[4]["here"]
    # Randomisation: a method whose final similarity is set to 0.9 stays above the threshold.
    changed = copy.deepcopy(report)
    changed["methods"]["occlusion"]["checks"]["randomisation"]["details"]["cascading"]["spearman_abs"][-1] = (
        0.9
    )
    assert "occlusion (0.900)" in study_comparison_rows(changed)[1]["here"]
    # Inter-method: the most similar pair follows the matrix.
    changed = copy.deepcopy(report)
    names = changed["inter_method"]["methods"]
    i, j = names.index("saliency"), names.index("occlusion")
    changed["inter_method"]["matrix"][i][j] = changed["inter_method"]["matrix"][j][i] = 0.987
    assert "most similar saliency / occlusion (0.99)" in study_comparison_rows(changed)[3]["here"]
    # Perturbation: the gap range comes from versus_control.
    changed = copy.deepcopy(report)
    strategy = "noisy_linear"
    changed["methods"]["saliency"]["checks"]["perturbation"]["details"]["versus_control"][strategy][
        "mean"
    ] = 0.777
    assert "0.78 (saliency)" in study_comparison_rows(changed)[2]["here"]


def test_study_rows_without_localisation(gate_run: GateRun) -> None:
    changed = copy.deepcopy(gate_run.report)
    for r in changed["methods"].values():
        r["checks"]["localisation"] = {
            "score": None,
            "verdict": "not_run",
            "blocking": False,
            "reason": "no masks",
        }
    assert study_comparison_rows(changed)[4]["here"] == "not run: no masks"


def test_figures_of_checks_that_did_not_run(gate_run: GateRun, tmp_path: Path) -> None:
    """A figure for a check that ran for no method still comes out, saying so."""
    changed = copy.deepcopy(gate_run.report)
    for r in changed["methods"].values():
        r["checks"]["randomisation"] = {"score": None, "verdict": "not_run", "blocking": True, "reason": "x"}
    path = figures.plot_randomisation(changed, tmp_path / "r.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    _assert_png(figures.plot_scores(changed, tmp_path / "s.png"))


def test_overlay_methods_choice(gate_run: GateRun) -> None:
    assert figures.overlay_methods(gate_run) == ["saliency", "gradcam", "occlusion"]
    assert figures.overlay_methods(gate_run, ["gradcam"]) == ["gradcam"]
    with pytest.raises(ValueError, match="lrp"):
        figures.overlay_methods(gate_run, ["lrp"])


# ---------------------------- issue #22: thresholds from the policy, self-explaining figures


def _failing_final(report: dict, method: str, score: float, threshold: float) -> dict:
    """``report`` with ``method`` failing randomisation on the final criterion, under a policy whose
    final limit is ``threshold`` (as a report made under that policy records it)."""
    out = copy.deepcopy(report)
    for r in out["methods"].values():  # one policy: every method's final criterion has its limit
        criteria = r["checks"]["randomisation"].get("details", {}).get("criteria") or {}
        if "final" in criteria:
            criteria["final"]["threshold"] = threshold
    entry = out["methods"][method]["checks"]["randomisation"]
    final = entry["details"]["criteria"]["final"]
    final.update(score=score, threshold=threshold, verdict="fail")
    entry.update(score=score, threshold=threshold, verdict="fail", comparison=final["comparison"])
    entry["details"]["criterion"] = "final"
    return out


def test_randomisation_text_quotes_the_criterion_that_decided(gate_run: GateRun) -> None:
    changed = _failing_final(gate_run.report, "occlusion", 0.543, 0.37)
    here = study_comparison_rows(changed)[1]["here"]
    assert "occlusion (final: 0.543 > 0.37)" in here
    assert "final limit (≤ 0.37)" in here
    criteria = changed["methods"]["occlusion"]["checks"]["randomisation"]["details"]["criteria"]
    top = criteria["top_layer"]["threshold"]
    assert f"top_layer upper end of CI ≤ {top:g}" in here  # every criterion, with its own limit
    assert f"above {top:g}" not in here


def test_score_figure_header_lists_each_criterion_from_the_policy(gate_run: GateRun) -> None:
    changed = _failing_final(gate_run.report, "occlusion", 0.543, 0.37)
    header = figures._check_header(changed, "randomisation")
    criteria = changed["methods"]["occlusion"]["checks"]["randomisation"]["details"]["criteria"]
    for name, c in criteria.items():
        assert f"{name} {figures._SYMBOLS.get(c['comparison'], c['comparison'])} {c['threshold']:g}" in header
    limits = figures._randomisation_limits(changed["methods"]["occlusion"]["checks"]["randomisation"])
    assert limits[0] == ("final ≤ 0.37", 0.37)
    assert limits[1][0].startswith("top_layer ≤ ")


def test_report_says_the_data_are_synthetic(written: Path) -> None:
    page = written.read_text(encoding="utf-8")
    assert "<strong>Synthetic data.</strong>" in page


def test_report_notes_input_x_gradient_and_lrp_are_one_method_here(gate_run: GateRun) -> None:
    from ecgx.validation.html_report import _equivalence_note

    report = copy.deepcopy(gate_run.report)
    assert _equivalence_note(report) == ""  # neither method gated: no note
    base = report["methods"]["saliency"]
    report["methods"]["input_x_gradient"] = copy.deepcopy(base)
    report["methods"]["lrp"] = {
        **copy.deepcopy(base),
        "settings": {"checked": {"epsilon": 1e-06, "composite": "epsilon"}, "may_differ": {}},
    }
    report["inter_method"] = {"methods": ["input_x_gradient", "lrp"], "matrix": [[1.0, 0.998], [0.998, 1.0]]}
    note = _equivalence_note(report)
    assert "ε = 1e-06" in note and "ε → 0" in note and "Measured here: correlation 1.00" in note
    report["methods"]["lrp"]["settings"]["checked"]["epsilon"] = 0.25  # a real ε: no longer the same map
    assert _equivalence_note(report) == ""


def test_gated_attribution_figure_explains_itself(gate_run: GateRun) -> None:
    import numpy as np

    i = 0
    x = gate_run.data.x[i]
    maps = {m: np.asarray(gate_run.maps[m][i]) for m in ("saliency", "gradcam")}
    mask = np.zeros(x.shape, dtype=bool)
    mask[1, 100:140] = True
    fig = figures.gated_attribution_figure(
        x, maps, {"saliency": "pass", "gradcam": "fail"}, title="record 17 of data", mask=mask
    )
    try:
        title = fig._suptitle.get_text()
        assert "record 17 of data" in title and "1.2 s window the model sees (600 samples at 500 Hz)" in title
        column_titles = [ax.get_title() for ax in fig.axes[:2]]
        assert column_titles == ["saliency\nPASS: served", "gradcam\nFAIL: refused"]
        legend_texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        assert figures.GROUND_TRUTH_LABEL in legend_texts
        assert any("1 mV" in t for t in legend_texts)  # the scale bar is explained
        colour_bars = [ax for ax in fig.axes if "maximum" in ax.get_ylabel()]
        assert len(colour_bars) == 1
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
