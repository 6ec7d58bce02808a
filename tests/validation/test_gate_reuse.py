"""The gate's shared work (issue 21): reusing it changes how much is computed, never a number.

``run_gate(reuse=True)`` (the default) computes each clean pass once and hands it to every check
that needs it; ``reuse=False`` recomputes everything as before. Both must write the same report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import rankdata

from ecgx.core.ecg_noise import high_frequency_sd
from ecgx.core.similarity import spearman_rows
from ecgx.service.engine import AttributionEngine
from ecgx.validation.gate import run_gate
from ecgx.validation.perturbation import (
    STANDARD_LEADS,
    _removed_steps,
    _StepBuilder,
    lead_basis,
    linear_fill,
    perturbation_curves,
    perturbation_curves_on,
    removal_order,
    remove_segments,
    segment_relevance,
)
from ecgx.validation.randomisation import (
    _RankedTrained,
    average_ranks,
    randomisation_models,
    resolution_similarity,
    weights_id,
)
from ecgx.validation.references import other_model

# Small, so both runs fit the suite; two draws of each kind, so models repeat within a draw
# (the first cascading and the first independent step) and not across draws.
POLICY = """
[gate]
ecgs = 24
[checks.randomisation]
ecgs = 8
draws = 2
[checks.perturbation]
steps = 4
bootstrap = 100
margin = -1.0
[checks.changed_model]
ecgs = 12
draws = 2
bootstrap = 100
"""


def user_input(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """A user method that ignores the model (its maps repeat on every model)."""
    return np.abs(x)


def comparable(report: dict) -> str:
    """The report without what differs between any two runs: the time, the timings, and the row
    drawn from fresh operating-system entropy on every call."""
    r = {k: v for k, v in report.items() if k not in ("created", "timings_s")}
    r["references"] = {k: v for k, v in r["references"].items() if k != "ref:unseeded_random"}
    return json.dumps(r, sort_keys=True)


def test_reuse_gives_the_same_report(trained_family: dict[str, Path], tmp_path: Path):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    runs = {
        reuse: run_gate(
            trained_family["seed-0"],
            trained_family["data"],
            family=[trained_family["seed-1"], trained_family["seed-2"]],
            policy=policy,
            methods=["saliency", "gradcam", "occlusion", "user_input"],
            attributors={"user_input": user_input},
            workers=2,
            show_progress=False,
            research=True,
            reuse=reuse,
        )
        for reuse in (False, True)
    }
    plain, reused = (comparable(runs[r].report) for r in (False, True))
    assert plain == reused
    # The comparison has something to compare: every check ran and produced numbers.
    row = runs[True].report["methods"]["saliency"]["checks"]
    for check in ("randomisation", "perturbation", "changed_model", "self_consistency"):
        assert row[check]["score"] is not None, check
    for name, maps in runs[True].maps.items():
        if name != "ref:unseeded_random":
            np.testing.assert_array_equal(maps, runs[False].maps[name], err_msg=name)


def test_ranked_trained_map_gives_spearman_exactly():
    rng = np.random.default_rng(0)
    trained = rng.standard_normal((5, 12, 600)).astype(np.float32)
    other = rng.standard_normal((5, 12, 600)).astype(np.float32)
    other[1] = np.round(other[1], 1)  # ties, ranked by their average
    basis = lead_basis(("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"))
    ranked = _RankedTrained(trained, 50, basis)
    np.testing.assert_array_equal(
        ranked.resolution_similarity(other), resolution_similarity(trained, other, 50, basis)
    )
    np.testing.assert_array_equal(ranked.signed(other), spearman_rows(trained, other, absolute=False))


def test_repeated_models_are_recognised(trained_family: dict[str, Path]):
    from ecgx.core.package_reader import load_package

    models = dict(randomisation_models(load_package(trained_family["seed-0"]), seed=0, draws=2))
    ids = {key: weights_id(o) for key, o in models.items()}
    # The first layer randomised alone is the first cascading step; nothing else repeats.
    assert ids[("independent", 0, 0)] == ids[("cascading", 0, 0)]
    assert ids[("independent", 1, 0)] == ids[("cascading", 1, 0)]
    assert len(set(ids.values())) == len(ids) - 2


def test_curves_on_several_models_equal_each_models_own(trained_family: dict[str, Path]):
    from ecgx.core.dataset import load_dataset

    ds = load_dataset(trained_family["data"])
    x = np.asarray(ds.signals[:6], np.float32)
    t = np.asarray(ds.labels[:6]).argmax(axis=1)
    engines = [AttributionEngine(trained_family[f"seed-{s}"], threads=1) for s in (0, 1)]
    attribution = np.abs(x)
    settings = dict(
        strategies=["zero", "noisy_linear"],
        window=50,
        steps=3,
        noise_scale=1.0,
        seed=0,
        basis=lead_basis(engines[0].package.leads),
    )
    together = perturbation_curves_on(engines, x, t, attribution, **settings)
    for engine, curves in zip(engines, together, strict=True):
        alone = perturbation_curves(engine, x, t, attribution, **settings)
        assert curves.morf == alone.morf and curves.lerf == alone.lerf
        for s in settings["strategies"]:
            np.testing.assert_array_equal(curves.score[s], alone.score[s])
    assert together[0].morf != together[1].morf  # two models, two sets of logits


def test_other_model_memo_computes_once_per_ecg_set(trained_family: dict[str, Path]):
    built: list[AttributionEngine] = []

    def make() -> AttributionEngine:
        built.append(AttributionEngine(trained_family["seed-1"], threads=1))
        return built[-1]

    calls: list[int] = []
    plain = other_model(make)
    memo = other_model(make, memo=True)
    x = np.random.default_rng(1).standard_normal((3, 12, 600)).astype(np.float32)
    t = np.array([0, 1, 0])
    first = memo(None, x, t)
    original = built[-1].attribute

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    built[-1].attribute = counting
    again = memo(None, x, t)
    np.testing.assert_array_equal(first, again)
    assert calls == []  # given again, not recomputed
    again[:] = 0  # a copy: the caller cannot change what later calls get
    np.testing.assert_array_equal(memo(None, x, t), first)
    np.testing.assert_array_equal(plain(None, x, t), first)
    memo(None, x, np.array([1, 1, 1]))  # other targets: computed
    assert calls == [1]


@pytest.mark.parametrize(
    ("leads", "samples", "window"),
    [(STANDARD_LEADS, 600, 50), (STANDARD_LEADS, 610, 50), (("A", "B", "C"), 230, 40)],
)
def test_step_builder_gives_remove_segments_bytes(leads: tuple[str, ...], samples: int, window: int):
    """The gate's perturbed ECGs (reuse) are remove_segments' of every step, byte for byte, for
    every strategy: ties, a lead removed whole, windows at both ends, a short last window."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, len(leads), samples)).astype(np.float32)
    x[0, :, :7] = 0.0
    basis = lead_basis(leads)
    attribution = np.abs(rng.standard_normal(x.shape)).astype(np.float32)
    attribution[1] = 0.0  # every segment tied
    relevance = segment_relevance(attribution, window, basis)
    n_seg = relevance.shape[1]
    counts = np.round(np.linspace(0, n_seg, 6)).astype(int)
    window_of = np.arange(samples) // window
    noise_sd = high_frequency_sd(x[:, basis.independent])
    build = _StepBuilder(x, basis, noise_sd, window)
    for strategy in ["zero", "lead_mean", "linear", "noisy_linear"]:
        for most_first in (True, False):
            draws = [np.random.default_rng([0, int(most_first), 7]) for _ in range(2)]
            orders = [removal_order(relevance, r, most_first) for r in draws]
            steps = _removed_steps(orders[0], counts, len(basis.independent), window_of)
            before = np.concatenate(
                [remove_segments(x, removed, basis, strategy, draws[0], noise_sd) for removed in steps]
            )
            now, lines = build.steps(orders[1], counts, strategy, draws[1], None)
            assert now.dtype == before.dtype and now.tobytes() == before.tobytes(), (strategy, most_first)
            if strategy == "linear":  # the lines a later noisy_linear takes
                steps = _removed_steps(orders[0], counts, len(basis.independent), window_of)
                for removed, line in zip(steps, lines, strict=True):
                    expected = linear_fill(x[:, basis.independent].astype(np.float64), removed)
                    assert np.array_equal(line[removed], expected[removed])


def test_average_ranks_are_scipys():
    rng = np.random.default_rng(4)
    tied = np.abs(rng.standard_normal((6, 700)).astype(np.float32)).astype(np.float64)
    tied[::2, ::5] = 0.0
    cases = [
        tied,
        np.round(rng.standard_normal((5, 300)), 1),
        np.zeros((3, 50)),
        np.array([[0.0, -0.0, 1.0, -0.0]]),
        np.array([[1.0, np.nan, 2.0], [1.0, 1.0, 2.0]]),
        np.array([[np.inf, -np.inf, 1.0, np.inf]]),
    ]
    for rows in cases:
        assert average_ranks(rows).tobytes() == rankdata(rows, axis=1).tobytes()
