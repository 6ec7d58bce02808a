"""Issue 26's units and measurements, checked on their own: the two-way bootstrap over ECGs and
weight draws, randomisation's segment unit (the one perturbation ranks), the top block of the
changed-model check, the class templates, and the random control drawn afresh per call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ecgx.core.package_reader import load_package
from ecgx.core.similarity import spearman_rows
from ecgx.service.engine import AttributionEngine
from ecgx.validation.bootstrap import bootstrap_mean
from ecgx.validation.changed_model import block_of, changed_models, top_block
from ecgx.validation.gate import control_attributor
from ecgx.validation.perturbation import STANDARD_LEADS, lead_basis, segment_relevance
from ecgx.validation.randomisation import parameterised_layers, resolution_similarity
from ecgx.validation.references import class_templates


def test_the_bootstrap_over_draws_and_ecgs_holds_the_draw_to_draw_variance() -> None:
    """The issue's coin toss: the same per-ECG means, but draws that disagree. Averaging the
    draws first gives the narrow interval; resampling draws too widens it."""
    rng = np.random.default_rng(0)
    ecg = rng.normal(0.48, 0.05, 32)
    draws = np.stack([ecg - 0.08, ecg, ecg + 0.08])  # (draws, ECGs): one draw low, one high
    pooled = bootstrap_mean(draws.mean(axis=0), n_boot=2000, confidence=0.95, seed=0)
    joint = bootstrap_mean(draws, n_boot=2000, confidence=0.95, seed=0)
    assert np.isclose(joint.mean, pooled.mean)
    assert joint.high - joint.low > 2 * (pooled.high - pooled.low)
    assert joint.low < pooled.low and joint.high > pooled.high


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(2, 20), st.integers(0, 10_000))
def test_the_two_way_bootstrap_surrounds_the_mean(draws: int, ecgs: int, seed: int) -> None:
    values = np.random.default_rng(seed).normal(0, 1, (draws, ecgs))
    interval = bootstrap_mean(values, n_boot=200, confidence=0.9, seed=seed)
    assert interval.low <= interval.high and np.isclose(interval.mean, values.mean())
    assert values.min() - 1e-9 <= interval.low and interval.high <= values.max() + 1e-9


def test_randomisation_compares_the_segment_relevance_perturbation_ranks() -> None:
    """A map whose segments keep their magnitude but flip their sign ranks its segments in the
    opposite order for perturbation (signed sums): the segment resolution says so, where
    Spearman of |segment sums| over 12 leads (the old unit) called them identical."""
    basis = lead_basis(STANDARD_LEADS)
    rng = np.random.default_rng(1)
    trained = rng.standard_normal((4, 12, 600))
    flipped = -trained
    sample, segment = resolution_similarity(trained, flipped, 50, basis)
    np.testing.assert_allclose(sample, 1.0)  # per sample |a| is unchanged
    np.testing.assert_allclose(segment, -1.0)  # perturbation would remove the other end first
    relevance = segment_relevance(trained, 50, basis)
    assert relevance.shape == (4, 8 * 12)  # 8 independent leads x 12 windows
    np.testing.assert_allclose(segment, spearman_rows(relevance, -relevance, absolute=False))


def test_the_top_block_is_the_output_layer_and_the_block_below_it(trained_family: dict[str, Path]) -> None:
    pkg = load_package(trained_family["seed-0"])
    names = [layer["name"] for layer in parameterised_layers(pkg)]
    block = top_block(pkg)
    assert block[0] == names[0] == "classifier"
    assert block[1:] == [n for n in names[1:] if block_of(n) == block_of(names[1])] and len(block) >= 2
    assert block_of("features.7.0") == "features.7" and block_of("blocks.2.conv1") == "blocks.2"
    models = list(changed_models(pkg, seed=0, draws=2))
    assert [key for key, _ in models] == [
        ("output_layer", 0),
        ("top_block", 0),
        ("output_layer", 1),
        ("top_block", 1),
    ]
    params = pkg.read_parameters()
    for (model, _), overrides in models:
        layers = ["classifier"] if model == "output_layer" else block
        assert set(overrides) == {
            p for layer in parameterised_layers(pkg) if layer["name"] in layers for p in layer["parameters"]
        }
        for p, v in overrides.items():
            assert v.shape == params[p].shape and not np.allclose(v, params[p])
    # Two draws are two models.
    assert not np.allclose(models[0][1]["classifier.weight"], models[2][1]["classifier.weight"])


def test_class_templates_are_where_each_class_differs_from_all() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 12, 600)).astype(np.float32)
    target = np.array([0, 0, 1, 1, 1, 0])
    t = class_templates(x, target, 3)
    overall = x.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(t[1], np.abs(x[target == 1].mean(axis=0) - overall), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t[2], np.abs(overall), rtol=1e-5, atol=1e-6)  # no ECG of class 2


def test_the_random_control_draws_afresh_on_every_call(tiny_package: Path) -> None:
    """Not keyed to the package: the same engine and input get another draw each call, and two
    gates with the same seed make the same draws in the same order."""
    engine = AttributionEngine(tiny_package)
    x = np.zeros((2, 12, 600), np.float32)
    target = np.zeros(2, np.int64)
    first, second = control_attributor(0), control_attributor(0)
    a, b = first(engine, x, target), first(engine, x, target)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.05
    np.testing.assert_array_equal(second(engine, x, target), a)
    np.testing.assert_array_equal(second(engine, x, target), b)
    assert not np.array_equal(control_attributor(1)(engine, x, target), a)
