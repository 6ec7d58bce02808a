"""The gate's report does not contradict itself (issue #8).

* Every view (the JSON entry, the CLI summary, the HTML report) shows the number a
  verdict is decided on, with its mean and interval, never the mean alone.
* The verdict's headline says under which policy, what may be served and what will be
  refused.
* A seed family of copies (or one sibling twice) is refused: it would agree with itself.
* Validation data with fewer ECGs or classes than the policy asks for is refused unless
  the policy allows it, and then the report says so wherever the verdict is shown.
* Policy numbers must be finite; a bad one is refused before any computation.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_clean_failure, run_ecgx, snapshot

from ecgx.service.methods import METHOD_NAMES
from ecgx.validation import checks
from ecgx.validation.bootstrap import Interval, bootstrap_mean
from ecgx.validation.gate import run_gate, summary_lines
from ecgx.validation.html_report import render_html
from ecgx.validation.perturbation import PerturbationCurves
from ecgx.validation.policy import Policy, PolicyError, default_policy, load_policy

N_GATED = len(METHOD_NAMES) - 1  # every method but the random control

# On these small models no method beats |x| in perturbation by the default margin; a margin of
# -1 lets some pass, so the views of a passing and a failing method can both be checked.
SMALL = """
[gate]
ecgs = 48
[checks.randomisation]
ecgs = 16
[checks.perturbation]
bootstrap = 200
margin = -1.0
[checks.changed_model]
ecgs = 32
bootstrap = 200
"""
# Small policies are below the floor: their reports are research reports, and say so first.
RESEARCH = "RESEARCH report, not servable (ecgx validate --research): "
_HOLDS = {"<=": np.less_equal, ">=": np.greater_equal, ">": np.greater, "<": np.less}


def _criterion(
    values, threshold: float = 0.5, comparison: str = "<=", name: str = "final"
) -> checks.Criterion:
    return checks.Criterion(name, "the mean Spearman |a|", np.asarray(values, float), threshold, comparison)


def _judge(criterion: checks.Criterion) -> dict:
    return checks.judge(criterion, bootstrap=1000, confidence=0.95, seed=0)


# ---------------------------------------------------------------- the decisive number


def test_randomisation_score_is_the_upper_end_that_decides() -> None:
    """The issue's case: a mean under 0.5 with an upper end above it. The criterion fails, and
    every text gives the upper end and why, not 'mean not <= 0.5'."""
    values = np.random.default_rng(0).normal(0.5, 0.08, 16)
    interval = bootstrap_mean(values, n_boot=1000, confidence=0.95, seed=0)
    assert interval.mean < 0.5 < interval.high
    entry = _judge(_criterion(values))
    assert entry["verdict"] == "fail" and entry["score"] == round(interval.high, 6)
    assert entry["decided_by"]["statistic"] == "ci_high" and "upper end" in entry["decided_by"]["label"]
    assert entry["mean"] == round(interval.mean, 6)
    assert entry["summary"] == (
        f"final: {interval.high:.3f} (upper end of the 95 % CI; mean {interval.mean:.3f}, "
        f"CI [{interval.low:.3f}, {interval.high:.3f}]) > 0.5: FAIL"
    )
    check = checks.criteria_entry([entry], True)
    verdict, reasons = checks.method_verdict({"randomisation": check})
    assert verdict == "fail" and reasons == [f"randomisation: {entry['summary']}"]


def test_a_check_of_several_criteria_is_decided_by_the_first_that_fails() -> None:
    passing = _judge(_criterion(np.full(8, 0.2)))
    close = _judge(_criterion(np.full(8, 0.75), threshold=0.8, name="top_layer"))
    failing = _judge(_criterion(np.full(8, 0.1), threshold=0.3, comparison=">=", name="noise_floor_gap"))
    also = _judge(_criterion(np.full(8, 0.9), threshold=0.8, name="independent"))
    entry = checks.criteria_entry([passing, close, failing, also], True)
    assert entry["verdict"] == "fail" and entry["details"]["criterion"] == "noise_floor_gap"
    assert (
        entry["score"] == 0.1 and entry["threshold"] == 0.3 and entry["decided_by"]["statistic"] == "ci_low"
    )
    assert (
        entry["summary"].startswith("noise_floor_gap: 0.100 (lower end") and "< 0.3: FAIL" in entry["summary"]
    )
    assert entry["summary"].endswith("(also failing: independent)")
    assert set(entry["details"]["criteria"]) == {"final", "top_layer", "noise_floor_gap", "independent"}
    # When every criterion holds, the one closest to its threshold is shown.
    ok = checks.criteria_entry([passing, close], True)
    assert ok["verdict"] == "pass" and ok["details"]["criterion"] == "top_layer"


def test_an_undefined_similarity_fails_with_its_reason() -> None:
    """A constant map has no ranking: it must not count as 'changed' (the issue's first finding)."""
    values = np.array([0.1, np.nan, 0.2, np.nan])
    entry = _judge(checks.Criterion("final", "x", values, 0.5, "<=", "constant maps (2 trained-model)"))
    assert entry["verdict"] == "fail" and entry["score"] is None
    assert entry["summary"] == "final: undefined on 2 of 4 ECGs: constant maps (2 trained-model): FAIL"


def test_perturbation_score_is_the_lowest_lower_end_and_names_its_strategy() -> None:
    curves = PerturbationCurves(
        fractions=[0.0, 1.0],
        morf={"zero": [1, 0], "linear": [1, 0]},
        lerf={"zero": [1, 1], "linear": [1, 1]},
        score={"zero": np.full(4, 0.3), "linear": np.full(4, 0.1)},
    )
    # Against each model-independent row; the lowest lower end, over strategies and rows, decides.
    versus = {
        "zero": {"random": Interval(0.3, 0.2, 0.4), "ref:input": Interval(0.1, 0.04, 0.16)},
        "linear": {"random": Interval(0.05, 0.03, 0.09), "ref:input": Interval(0.05, 0.01, 0.09)},
    }
    entry = checks.perturbation_entry(curves, versus, 0.02, True, confidence=0.9)
    assert entry["score"] == 0.01 and entry["verdict"] == "fail"
    assert entry["decided_by"]["statistic"] == "ci_low" and entry["details"]["strategy"] == "linear"
    assert entry["details"]["row"] == "ref:input"
    assert entry["mean"] == 0.05 and entry["interval"]["low"] == 0.01
    assert entry["summary"] == (
        "0.010 (lower end of the 90 % CI under linear against ref:input; mean 0.050, CI [0.010, 0.090]) "
        "<= 0.02: FAIL"
    )
    # The gap to the control alone is kept for the plots.
    assert entry["details"]["versus_control"]["zero"] == {"mean": 0.3, "low": 0.2, "high": 0.4}


def test_a_score_next_to_its_threshold_is_not_printed_as_the_threshold() -> None:
    entry = _judge(_criterion(np.full(8, 0.5004)))
    assert entry["verdict"] == "fail"
    assert entry["summary"].startswith("final: 0.500400 (upper end")


def test_checks_without_an_interval_say_they_decide_on_the_mean() -> None:
    entry = checks.self_consistency_entry(np.array([0.2, 0.4, np.nan]), 3, 0.3, False)
    assert entry["decided_by"]["statistic"] == "mean" and entry["interval"] is None
    assert entry["score"] == entry["mean"] == pytest.approx(0.3)
    assert entry["summary"] == "0.300 (mean) >= 0.3: pass"
    row = checks.inter_method_entry({"gradcam": 0.1, "lime": 0.15}, 0.2, False)
    assert row["summary"] == "0.150 (mean, with lime) < 0.2: FAIL"


# ---------------------------------------------------------------- one gate run, every view


@pytest.fixture(scope="module")
def small_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "small.toml"
    path.write_text(SMALL)
    return path


@pytest.fixture(scope="module")
def gate(trained_family: dict[str, Path], small_policy: Path):
    return run_gate(
        trained_family["seed-0"],
        trained_family["data"],
        family=[trained_family["seed-1"], trained_family["seed-2"]],
        policy=small_policy,
        methods=["saliency", "gradcam", "input_x_gradient", "lime"],
        workers=2,
        show_progress=False,
        research=True,
    )


def _ran(report: dict):
    for m, r in report["methods"].items():
        for name, c in r["checks"].items():
            if c["verdict"] != "not_run":
                yield m, name, c


def test_every_verdict_follows_from_the_score_shown(gate) -> None:
    """In the JSON, the score is what the comparison with the threshold decides on, and for
    interval checks it is the named end of the interval."""
    for m, name, c in _ran(gate.report):
        if c["score"] is not None:
            holds = bool(_HOLDS[c["comparison"]](c["score"], c["threshold"]))
            assert holds == (c["verdict"] == "pass"), (m, name, c["summary"])
        statistic = c["decided_by"]["statistic"]
        if c["score"] is None:  # undefined similarity: fails, with its reason
            assert c["verdict"] == "fail" and "undefined on" in c["summary"]
        elif statistic == "ci_high":
            assert c["score"] == c["interval"]["high"] and c["interval"]["low"] <= c["mean"] <= c["score"]
        elif statistic == "ci_low":
            assert c["score"] == c["interval"]["low"] and c["score"] <= c["mean"] <= c["interval"]["high"]
            if name == "perturbation":
                strategy, row = c["details"]["strategy"], c["details"]["row"]
                assert c["details"]["versus"][strategy][row]["low"] == c["score"]
                lows = [v["low"] for rows in c["details"]["versus"].values() for v in rows.values()]
                assert c["score"] == min(lows)
        else:
            assert statistic == "mean" and c["score"] == c["mean"]
        criterion = c["details"].get("criterion")
        if criterion is None:
            assert c["summary"] == checks.describe(c)
            assert c["summary"].startswith(f"{c['score']:.3f}"), c["summary"]
        else:  # a check of several criteria shows the one that decided, named
            decisive = c["details"]["criteria"][criterion]
            assert c["summary"].startswith(decisive["summary"]) and decisive["summary"] == checks.describe(
                decisive
            )
            assert c["score"] == decisive["score"] and c["threshold"] == decisive["threshold"]


def test_cli_summary_shows_the_decisive_numbers_and_intervals(gate) -> None:
    report = gate.report
    lines = summary_lines(report)
    text = "\n".join(lines)
    for m, r in report["methods"].items():
        row = next(line for line in lines if line.startswith(m))
        for _, name, c in ((m, n, c) for n, c in r["checks"].items() if c["verdict"] != "not_run"):
            cell = "n/a" if c["score"] is None else f"{c['score']:.3f}"
            assert cell in row, (m, name, row)
            if c["blocking"]:
                assert c["summary"] in text, (m, name)  # the number, its mean and interval
    assert "lower end of the 95 % bootstrap confidence interval" in text
    assert "final <= 0.5, top_layer <= 0.8" in text  # every randomisation criterion, with its threshold
    assert lines[-1] == f"Gate verdict: {report['headline']}"


def test_html_shows_the_decisive_numbers_intervals_and_headline(gate) -> None:
    report = gate.report
    page = render_html(report, [], title="t", study_comparison=[], notes=[])
    for _, _, c in _ran(report):
        assert html.escape(c["summary"], quote=True) in page  # in the cell's title
        if c["interval"]:
            ci = f"CI [{c['interval']['low']:.3f}, {c['interval']['high']:.3f}]"
            assert f"mean {c['mean']:.3f}, {ci}" in page
    assert "final: upper end of CI ≤ 0.5; top_layer: upper end of CI ≤ 0.8" in page
    assert "noise_floor_gap: lower end of CI ≥ 0.1; all blocking" in page
    assert "lower end of CI &gt; -1, blocking" in page
    assert html.escape(report["headline"], quote=True) in page


def test_the_headline_says_what_may_be_served_and_what_is_refused(gate) -> None:
    report = gate.report
    assert report["verdict"] == "pass"
    policy = load_policy(report["policy"]["source"])
    head = report["headline"]
    assert head.removeprefix(RESEARCH).startswith(
        f"PASS under policy {policy.source} (sha256 {policy.sha256[:12]})"
    )
    assert "which requires no particular method to pass and at least 1 method(s) to pass" in head
    served = report["passed"]
    assert report["serve"] == served and served
    assert f"may be served with {len(served)} of {N_GATED} methods ({', '.join(served)})" in head
    if report["failed"]:
        assert f"{len(report['failed'])} fail their blocking checks ({', '.join(report['failed'])})" in head
    assert set(report["failed"]) | set(served) == set(report["methods"]) - {"random"}
    assert len(report["not_checked"]) == 12 and not set(report["not_checked"]) & set(report["methods"])
    assert "12 were not checked" in head and head.split(" WARNING: ")[0].endswith("they will be refused.")
    assert "random" not in served + report["failed"] + report["not_checked"]


def test_a_failing_gate_serves_nothing_and_says_why(trained_family, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    # No method can be that dissimilar from its own map, so the required method fails.
    policy.write_text(
        '[gate]\necgs = 16\nrequired_methods = ["gradcam"]\n'
        "[checks.randomisation]\necgs = 8\nmax_similarity = -1.0\n[checks.perturbation]\nbootstrap = 100\n"
    )
    run = run_gate(
        trained_family["seed-0"],
        trained_family["data"],
        policy=policy,
        methods=["gradcam"],
        workers=1,
        show_progress=False,
        research=True,
    )
    report = run.report
    assert report["verdict"] == "fail" and report["serve"] == [] and report["failed"] == ["gradcam"]
    head = report["headline"]
    assert (
        head.removeprefix(RESEARCH).startswith("FAIL under policy")
        and "which requires gradcam to pass" in head
    )
    assert "required method gradcam failed" in head and "No method of this package may be served" in head
    assert summary_lines(report)[-1] == f"Gate verdict: {head}"


def test_a_policy_the_model_independent_maps_pass_fails_the_gate(trained_family, tmp_path: Path) -> None:
    """With no blocking check, every method passes, the control and the reference rows too: the
    gate fails, naming each reference row, and warns that the control passed, instead of a bare
    PASS. (Such a policy is below the floor: only a research run may use it.)"""
    policy = tmp_path / "p.toml"
    policy.write_text(
        "[gate]\necgs = 16\n[checks.randomisation]\necgs = 4\nblocking = false\n"
        "[checks.perturbation]\nblocking = false\nbootstrap = 100\nsteps = 4\n"
        "[checks.changed_model]\nblocking = false\nbootstrap = 100\necgs = 8\n"
    )
    run = run_gate(
        trained_family["seed-0"],
        trained_family["data"],
        policy=policy,
        methods=["saliency"],
        workers=1,
        show_progress=False,
        research=True,
    )
    report = run.report
    assert report["methods"]["random"]["verdict"] == "pass" and report["verdict"] == "fail"
    assert report["serve"] == []
    refs = sorted(report["references"])
    assert all(report["references"][r]["verdict"] == "pass" for r in refs)
    assert [r for r in refs if any(r in reason for reason in report["reasons"])] == refs
    (warning,) = [w for w in report["warnings"] if w.startswith("the random control passed every")]
    assert warning in report["headline"].split("WARNING: ", 1)[1]
    assert f"WARNING: {warning}" in summary_lines(report)


# ---------------------------------------------------------------- the seed family


@pytest.fixture
def copies(trained_family: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A byte copy of seed-0 elsewhere, and a weight-identical one whose manifest differs."""
    byte_copy = shutil.copytree(trained_family["seed-0"], tmp_path / "elsewhere" / "seed-0-copy")
    renamed = shutil.copytree(trained_family["seed-0"], tmp_path / "reexported")
    manifest = json.loads((renamed / "manifest.json").read_text())
    manifest["source"] = {"note": "exported again"}
    (renamed / "manifest.json").write_text(json.dumps(manifest))
    sibling_copy = shutil.copytree(trained_family["seed-1"], tmp_path / "seed-1-copy")
    return {"byte": byte_copy, "renamed": renamed, "sibling": sibling_copy}


def test_a_copy_of_the_gated_package_is_not_a_family_member(trained_family, copies) -> None:
    pkg, data = trained_family["seed-0"], trained_family["data"]
    for copy in (copies["byte"], copies["renamed"]):
        with pytest.raises(ValueError, match="same weights as the gated package") as e:
            run_gate(pkg, data, family=[trained_family["seed-1"], copy], show_progress=False)
        assert str(copy) in str(e.value) and "random control" in str(e.value)


def test_a_family_member_given_twice_is_refused(trained_family, copies) -> None:
    pkg, data, s1 = trained_family["seed-0"], trained_family["data"], trained_family["seed-1"]
    with pytest.raises(ValueError, match=re.escape(f"lists the package {s1} twice")):
        run_gate(pkg, data, family=[s1, s1], show_progress=False)
    with pytest.raises(ValueError, match="twice"):
        run_gate(pkg, data, family=[s1, s1.parent / "seed-2" / ".." / "seed-1"], show_progress=False)
    with pytest.raises(ValueError, match="have the same weights") as e:
        run_gate(pkg, data, family=[s1, copies["sibling"]], show_progress=False)
    assert str(copies["sibling"]) in str(e.value)


def test_cli_refuses_a_copy_in_the_family_cleanly(trained_family, copies, tmp_path: Path) -> None:
    pkg = shutil.copytree(trained_family["seed-0"], tmp_path / "pkg")
    out = tmp_path / "gate.json"
    before = snapshot(pkg, out)
    args = ["validate", str(pkg), "--data", str(trained_family["data"]), "--unsigned", "--out", str(out)]
    result = run_ecgx(*args, "--family", str(trained_family["seed-1"]), str(copies["byte"]))
    assert_clean_failure(result, str(copies["byte"]), "same weights", before=before, roots=[pkg, out])


# ---------------------------------------------------------------- too little data


def test_data_smaller_than_the_policy_asks_is_refused(trained_family, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("[gate]\necgs = 100\n")  # the data has 64 labelled ECGs
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        run_gate(
            trained_family["seed-0"],
            trained_family["data"],
            policy=policy,
            show_progress=False,
            research=True,
        )
    message = str(e.value)
    assert "64 labelled ECG(s) but the policy asks for gate.ecgs = 100" in message
    assert "gate.allow_incomplete_data = true" in message and "lower gate.ecgs" in message
    assert time.perf_counter() - t0 < 10  # refused before any attribution is computed


def test_real_data_missing_classes_is_refused_by_default(trained_family, shared_data, tmp_path) -> None:
    """The issue's case: the PTB-XL sample's 10 ECGs under the default policy's 256, five classes
    with no ECG at all. Through the CLI: exit 2, one line, nothing written."""
    from ecgx.training.data.wfdb_import import import_wfdb

    real = import_wfdb([shared_data / "ptbxl-sample"], tmp_path / "real", show_progress=False).out
    pkg = shutil.copytree(trained_family["seed-0"], tmp_path / "pkg")
    before = snapshot(pkg)
    result = run_ecgx("validate", str(pkg), "--data", str(real), "--unsigned")
    assert_clean_failure(
        result,
        "10 labelled ECG(s) but the policy asks for gate.ecgs = 256",
        "no ECG of class(es) AF, IAVB, LBBB, RBBB, LVH",
        "give ECGs of every class",
        "allow_incomplete_data",
        before=before,
        roots=[pkg],
    )
    assert not (pkg / "gate.json").exists()


def test_allowed_incomplete_data_is_gated_and_shown_prominently(
    trained_family, shared_data, tmp_path
) -> None:
    from ecgx.training.data.wfdb_import import import_wfdb

    real = import_wfdb([shared_data / "ptbxl-sample"], tmp_path / "real", show_progress=False).out
    policy = tmp_path / "p.toml"
    policy.write_text("[gate]\nallow_incomplete_data = true\n[checks.randomisation]\necgs = 4\n")
    run = run_gate(
        trained_family["seed-0"],
        real,
        policy=policy,
        methods=["gradcam"],
        workers=1,
        show_progress=False,
        research=True,
    )
    report = run.report
    assert report["data"]["ecgs"] == 10 and report["data"]["ecgs_asked"] == 256
    warnings = report["warnings"]
    assert any("10 labelled ECG(s) but the policy asks for gate.ecgs = 256" in w for w in warnings)
    assert any("no ECG of class(es) AF, IAVB, LBBB, RBBB, LVH" in w for w in warnings)
    assert all(w in report["headline"] for w in warnings) and "WARNING" in report["headline"]
    lines = summary_lines(report)
    assert [line for line in lines if line.startswith("WARNING: ")] == [f"WARNING: {w}" for w in warnings]
    page = render_html(report, [], title="t", study_comparison=[], notes=[])
    assert page.index('class="warning"') < page.index("<h2>Methods and checks</h2>")
    assert "10 of the 256 the policy asks for" in page


def test_a_policy_with_fewer_ecgs_than_classes_is_warned_about(trained_family, tmp_path: Path) -> None:
    """The policy's own choice (4 ECGs, 9 classes) is not refused, but the report says which
    classes went ungated."""
    policy = tmp_path / "p.toml"
    policy.write_text(
        "[gate]\necgs = 4\n[checks.randomisation]\necgs = 4\n[checks.perturbation]\nsteps = 4\n"
    )
    run = run_gate(
        trained_family["seed-0"],
        trained_family["data"],
        policy=policy,
        methods=["saliency"],
        workers=1,
        show_progress=False,
        research=True,
    )
    (warning,) = [w for w in run.report["warnings"] if not w.startswith("research mode")]
    assert warning.startswith("gate.ecgs = 4 is fewer ECGs than classes: no ECG of class(es) ")
    ungated = [k for k, n in run.report["data"]["targets"].items() if n == 0]
    assert len(ungated) == 5 and ", ".join(ungated) in warning


# ---------------------------------------------------------------- policy numbers


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[checks.perturbation]\nmargin = nan\n", "checks.perturbation.margin"),
        ("[checks.randomisation]\nmax_similarity = nan\n", "checks.randomisation.max_similarity"),
        ("[checks.randomisation]\nmax_similarity = -inf\n", "checks.randomisation.max_similarity"),
        ("[checks.randomisation]\nconfidence = nan\n", "checks.randomisation.confidence"),
        ("[checks.perturbation]\nnoise_scale = inf\n", "checks.perturbation.noise_scale"),
        ("[checks.self_consistency]\nmin_correlation = nan\n", "checks.self_consistency.min_correlation"),
        ("[checks.inter_method]\nmin_correlation = +inf\n", "checks.inter_method.min_correlation"),
        ("[checks.localisation]\nmin_auroc = nan\n", "checks.localisation.min_auroc"),
        ("[gate]\necgs = nan\n", "gate.ecgs"),
    ],
)
def test_non_finite_policy_numbers_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=rf"{key} must be (a finite number|an integer)"):
        load_policy(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"[gate]\nmin_passing = {N_GATED + 1}\n", f"gate.min_passing must be between 0 and {N_GATED}"),
        ("[checks.perturbation]\nbootstrap = 10000000\n", "checks.perturbation.bootstrap must be between"),
        ("[gate]\nallow_incomplete_data = 1\n", "gate.allow_incomplete_data must be true or false"),
    ],
)
def test_out_of_range_policy_values_name_their_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        load_policy(path)


def test_a_policy_built_in_code_is_checked_too(trained_family) -> None:
    content = default_policy().content
    content["checks"]["perturbation"]["margin"] = float("nan")
    with pytest.raises(PolicyError, match=r"checks\.perturbation\.margin must be a finite number"):
        run_gate(trained_family["seed-0"], trained_family["data"], policy=Policy(content, "mine"))


def test_cli_refuses_a_nan_policy_before_any_work(trained_family, tmp_path: Path) -> None:
    pkg = shutil.copytree(trained_family["seed-0"], tmp_path / "pkg")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gate]\necgs = 48\n[checks.perturbation]\nmargin = nan\n")
    out = tmp_path / "report" / "gate.json"
    before = snapshot(pkg, tmp_path / "report")
    t0 = time.perf_counter()
    result = run_ecgx(
        "validate", str(pkg), "--data", str(trained_family["data"]), "--policy", str(bad),
        "--unsigned", "--out", str(out),
    )  # fmt: skip
    assert_clean_failure(
        result,
        f"policy file {bad}: checks.perturbation.margin must be a finite number, got nan",
        before=before,
        roots=[pkg, tmp_path / "report"],
    )
    assert time.perf_counter() - t0 < 30  # the process start; the gate itself takes minutes
