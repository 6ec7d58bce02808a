"""The gate's measures against reference implementations, and its perturbation and policy mechanics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from sklearn.metrics import roc_auc_score

from ecgx.core.ecg_noise import high_frequency_noise, high_frequency_sd
from ecgx.core.similarity import (
    auroc_rows,
    mass_inside,
    mean_pairwise_pearson,
    pearson_rows,
    segment_sums,
    spearman_rows,
    ssim_rows,
)
from ecgx.service.methods import METHOD_NAMES
from ecgx.service.methods.perturbation import segment_mask
from ecgx.validation.bootstrap import bootstrap_difference
from ecgx.validation.perturbation import (
    STANDARD_LEADS,
    lead_basis,
    linear_fill,
    removal_order,
    remove_segments,
    replace,
    segment_relevance,
)
from ecgx.validation.policy import PolicyError, default_policy, load_policy


@pytest.fixture
def maps() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 12, 600)).astype(np.float32)
    b = (0.6 * a + 0.4 * rng.standard_normal(a.shape)).astype(np.float32)
    b[:, :, :5] = 0.0  # ties, so average ranks matter
    return a, b


def test_correlations_match_scipy(maps) -> None:
    a, b = maps
    for i in range(len(a)):
        signed = spearmanr(a[i].ravel(), b[i].ravel())[0]
        assert spearman_rows(a, b, absolute=False)[i] == pytest.approx(signed)
        ref = spearmanr(np.abs(a[i]).ravel(), np.abs(b[i]).ravel())[0]
        assert spearman_rows(a, b)[i] == pytest.approx(ref)
        assert pearson_rows(a, b)[i] == pytest.approx(np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1], abs=1e-6)


def test_ssim_matches_scikit_image(maps) -> None:
    a, b = maps
    ours = ssim_rows(a, b)
    for i in range(len(a)):
        ua, ub = np.abs(a[i]) / np.abs(a[i]).max(), np.abs(b[i]) / np.abs(b[i]).max()
        ref = structural_similarity(ua.astype(np.float64), ub.astype(np.float64), data_range=1.0)
        assert ours[i] == pytest.approx(ref, abs=1e-6)
    assert ssim_rows(a, a) == pytest.approx(1.0)


def test_constant_maps_have_no_similarity_rather_than_a_guess(maps) -> None:
    a, _ = maps
    zero = np.zeros_like(a)
    assert np.isnan(spearman_rows(a, zero)).all()
    assert np.isnan(ssim_rows(a, zero)).all()
    assert np.isnan(pearson_rows(zero, zero)).all()


def test_pairwise_consistency_averages_all_pairs(maps) -> None:
    a, b = maps
    c = -a
    expected = (pearson_rows(a, b) + pearson_rows(a, c) + pearson_rows(b, c)) / 3
    assert mean_pairwise_pearson([a, b, c]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_pearson([a])


def test_localisation_auroc_matches_sklearn_and_mass_is_a_share(maps) -> None:
    a, _ = maps
    truth = np.zeros(a.shape, bool)
    truth[:, 3:6, 200:300] = True
    scores = np.abs(a) + 0.8 * truth
    ours = auroc_rows(scores, truth)
    for i in range(len(a)):
        assert ours[i] == pytest.approx(roc_auc_score(truth[i].ravel(), scores[i].ravel()))
    share = mass_inside(scores, truth)
    inside = np.abs(scores[0])[truth[0]].sum() / np.abs(scores[0]).sum()
    assert share[0] == pytest.approx(inside)
    assert np.isnan(auroc_rows(scores, np.zeros_like(truth))).all()


# ---------------------------------------------------------------- perturbation mechanics


def test_linear_fill_draws_straight_lines_between_kept_samples() -> None:
    x = np.array([[[0.0, 1.0, 5.0, 5.0, 5.0, 4.0, 9.0, 9.0]]], np.float32)
    removed = np.array([[[False, False, True, True, True, False, True, True]]])
    fill = linear_fill(x, removed)
    assert fill[0, 0, 2:5] == pytest.approx([1.75, 2.5, 3.25])  # from 1.0 at 1 to 4.0 at 5
    assert fill[0, 0, 6:] == pytest.approx([4.0, 4.0])  # the end holds the last kept value
    whole = linear_fill(x, np.ones_like(removed))
    assert whole[0, 0] == pytest.approx(np.full(8, x.mean()))


def test_replacements_touch_only_removed_samples() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 12, 600)).astype(np.float32)
    removed = np.zeros(x.shape, bool)
    removed[:, 2, 100:150] = True
    for strategy in ("zero", "lead_mean", "linear", "noisy_linear"):
        out = replace(x, removed, strategy, np.random.default_rng(0), noise_sd=0.05)
        assert np.array_equal(out[~removed], x[~removed]), strategy
        assert not np.array_equal(out[removed], x[removed]), strategy
    lead_mean = replace(x, removed, "lead_mean", rng, 0.05)
    assert lead_mean[0, 2, 120] == pytest.approx(x[0, 2].mean())
    noisy = replace(x, removed, "noisy_linear", np.random.default_rng(0), noise_sd=0.05)
    linear = replace(x, removed, "linear", rng, 0.05)
    assert np.std(noisy[removed] - linear[removed]) == pytest.approx(0.05, rel=0.2)


def _limb_consistent(rng: np.random.Generator) -> np.ndarray:
    """Random ECGs whose derived limb leads follow from I and II, as recorded ones do."""
    x = rng.standard_normal((2, 12, 600))
    i, ii = x[:, 0], x[:, 1]
    x[:, 2], x[:, 3], x[:, 4], x[:, 5] = ii - i, -(i + ii) / 2, i - ii / 2, ii - i / 2
    return x.astype(np.float32)


def test_removal_happens_in_the_independent_leads_and_the_derived_leads_follow() -> None:
    basis = lead_basis(STANDARD_LEADS)
    assert [STANDARD_LEADS[i] for i in basis.independent] == ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    x = _limb_consistent(np.random.default_rng(3))
    removed = np.zeros((2, 8, 600), bool)
    removed[:, 0, 100:150] = True  # lead I only
    out = remove_segments(x, removed, basis, "zero", np.random.default_rng(0), np.zeros((2, 8, 1)))
    # Lead I is gone in that window, and so is its share of III, aVR, aVL and aVF: no copy survives.
    assert np.all(out[:, 0, 100:150] == 0)
    ii = x[:, 1, 100:150]
    assert out[:, 2, 100:150] == pytest.approx(ii, abs=1e-5)  # III = II - I with I = 0
    assert out[:, 3, 100:150] == pytest.approx(-ii / 2, abs=1e-5)
    assert out[:, 4, 100:150] == pytest.approx(-ii / 2, abs=1e-5)
    assert out[:, 5, 100:150] == pytest.approx(ii, abs=1e-5)
    # Everything outside the window, and the precordial leads, are exactly as recorded.
    outside = np.ones(600, bool)
    outside[100:150] = False
    assert np.array_equal(out[:, :, outside], x[:, :, outside])
    assert np.array_equal(out[:, 6:], x[:, 6:])
    # Another lead set is not guessed at: every lead is independent.
    other = lead_basis(["A", "B"])
    assert other.independent == (0, 1) and not other.derived


def test_segment_relevance_counts_the_derived_leads_an_independent_lead_feeds() -> None:
    basis = lead_basis(STANDARD_LEADS)
    a = np.zeros((1, 12, 600), np.float32)
    a[0, 2, 100:150] = 1.0  # III in window 2: fed by I (-1) and II (+1)
    a[0, 8, 500:550] = -1.0  # V3 in window 10, the least relevant
    relevance = segment_relevance(a, 50, basis)
    assert relevance.shape == (1, 8 * 12)
    assert relevance[0, 0 * 12 + 2] == pytest.approx(50) and relevance[0, 1 * 12 + 2] == pytest.approx(50)
    assert relevance[0, 4 * 12 + 10] == pytest.approx(-50)  # V3 is the 5th independent lead
    morf = removal_order(relevance, np.random.default_rng(0), most_relevant_first=True)
    lerf = removal_order(relevance, np.random.default_rng(0), most_relevant_first=False)
    assert set(morf[0, :2]) == {2, 14} and lerf[0, 0] == 4 * 12 + 10
    # Among the tied zero segments the order is shuffled, not lead by lead.
    assert not np.array_equal(np.sort(morf[0, 2:-1]), morf[0, 2:-1])


def test_segment_sums_follow_the_perturbation_segments() -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal((3, 12, 600))
    ids = segment_mask(70, 12, 600)  # 70 does not divide 600: the last window is shorter
    expected = np.stack([np.bincount(ids.ravel(), weights=row.ravel()) for row in a])
    assert segment_sums(a, 70) == pytest.approx(expected)


def test_the_noise_level_is_each_ecgs_own() -> None:
    rng = np.random.default_rng(5)
    t = np.arange(600) / 500
    wave = np.sin(2 * np.pi * 1.2 * t) + np.exp(-(((t - 0.6) / 0.02) ** 2))  # slow waves and a QRS-like spike
    quiet = wave + rng.normal(0, 0.005, 600)
    loud = wave + rng.normal(0, 0.05, 600)
    x = np.stack([np.tile(quiet, (12, 1)), np.tile(loud, (12, 1))]).astype(np.float32)
    sd = high_frequency_sd(x)[:, 0, 0]
    # The residual of a 5-sample average keeps 0.89 of white noise's SD; the spike hardly counts.
    assert sd[0] == pytest.approx(0.005 * 0.89, rel=0.25) and sd[1] == pytest.approx(0.05 * 0.89, rel=0.25)
    noise = high_frequency_noise(x, np.random.default_rng(0), scale=2.0)
    assert noise[1].std() / noise[0].std() == pytest.approx(10, rel=0.3)


def test_bootstrap_interval_surrounds_the_mean_and_shrinks_with_more_ecgs() -> None:
    rng = np.random.default_rng(2)
    small = bootstrap_difference(rng.normal(0.1, 0.2, 30), np.zeros(30), n_boot=500, confidence=0.95, seed=0)
    big = bootstrap_difference(rng.normal(0.1, 0.2, 600), np.zeros(600), n_boot=500, confidence=0.95, seed=0)
    assert small.low < small.mean < small.high
    assert (big.high - big.low) < (small.high - small.low)
    same = bootstrap_difference(np.ones(10), np.ones(10), n_boot=100, confidence=0.95, seed=0)
    assert same.low == same.mean == same.high == 0.0


# ---------------------------------------------------------------- policy


def test_default_policy_loads_and_overrides_merge(tmp_path: Path) -> None:
    base = default_policy()
    assert base.blocking("randomisation") and base.blocking("perturbation")
    assert base.required_methods() == [] and base.min_passing == 1
    path = tmp_path / "p.toml"
    path.write_text('[gate]\nrequired_methods = ["occlusion"]\n[checks.perturbation]\nmargin = 0.1\n')
    p = load_policy(path)
    assert p.required_methods() == ["occlusion"]
    assert p.check("perturbation")["margin"] == 0.1
    assert p.check("perturbation")["steps"] == base.check("perturbation")["steps"]
    assert p.sha256 != base.sha256 and p.source == str(path)
    path.write_text('[gate]\nrequired_methods = "all"\n')
    required = load_policy(path).required_methods()
    assert "random" not in required and len(required) == len(METHOD_NAMES) - 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[gate]\necgs = 0\n", r"gate.ecgs must be >= 1"),
        ("[gate]\necgs = 'many'\n", "gate.ecgs must be an integer"),
        ("[checks.randomisation]\nmax_similarity = 2\n", "between -1 and 1"),
        ("[checks.randomisaton]\n", "unknown policy key 'checks.randomisaton'"),
        ("[checks.perturbation]\nstrategies = ['blur']\n", "unknown"),
        ("[checks.localisation]\nblocking = 'yes'\n", "must be true or false"),
        ('[gate]\nrequired_methods = ["random"]\n', "cannot require the random control"),
        ('[gate]\nrequired_methods = ["nope"]\n', "unknown method"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_policies_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        load_policy(path)


def test_missing_policy_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "none.toml")
