"""Localisation scores against ground-truth masks, on hand-built maps with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ecgx.validation.localisation import SCORES, localisation_scores


def _mask(shape: tuple[int, ...] = (12, 600)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[6, 280:310] = True  # V1, terminal QRS: 30 of 7200 elements
    m[11, 280:300] = True  # V6
    return m


def _one(attribution: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {k: float(v[0]) for k, v in localisation_scores(attribution[None], mask[None]).items()}


def test_a_map_equal_to_the_mask_scores_one_everywhere() -> None:
    m = _mask()
    assert _one(m.astype(np.float32), m) == dict.fromkeys(SCORES, 1.0)
    assert _one(-3.0 * m, m) == dict.fromkeys(SCORES, 1.0)  # the sign does not matter


def test_a_map_outside_the_mask_scores_zero() -> None:
    m = _mask()
    a = np.where(m, 0.0, 1.0 + np.arange(m.size).reshape(m.shape) % 7)
    assert _one(a, m) == dict.fromkeys(SCORES, 0.0)


def test_partial_maps_have_the_expected_scores() -> None:
    m = _mask()  # 50 elements inside
    a = np.zeros(m.shape)
    a[6, 280:290] = 3.0  # 10 inside at the top, mass 30
    a[0, :40] = 1.0  # 40 outside, mass 40; together the 50 largest
    s = _one(a, m)
    assert s["mass"] == pytest.approx(30 / 70)
    assert s["pointing_game"] == 1.0
    assert s["top_k_precision"] == pytest.approx(10 / 50)
    # 10 positives above all 7150 negatives; 40 positives at zero, below the 40 ones and tied
    # with the 7110 zeros outside (half a win each): U = 10 * 7150 + 40 * 7110 / 2 of 50 * 7150.
    assert s["auroc"] == pytest.approx((10 * 7150 + 40 * 7110 / 2) / (50 * 7150))


def test_ties_count_by_their_share_inside() -> None:
    m = _mask()
    a = np.zeros(m.shape)
    a[6, 280:283] = 5.0  # 3 tied maxima inside ...
    a[0, 0] = 5.0  # ... and 1 outside
    assert _one(a, m)["pointing_game"] == pytest.approx(3 / 4)
    # k = 50: the 4 maxima, then 46 of the 7196 zeros (46 of them inside) on average.
    assert _one(a, m)["top_k_precision"] == pytest.approx((3 + 46 * 47 / 7196) / 50)
    # The answer does not depend on where the tied elements sit.
    b = a[:, ::-1].copy()
    assert _one(b, m[:, ::-1])["pointing_game"] == pytest.approx(3 / 4)


def test_undefined_cases_are_nan() -> None:
    m = _mask()
    maps = np.stack([np.zeros(m.shape), np.ones(m.shape), np.full(m.shape, np.nan), np.ones(m.shape)])
    masks = np.stack([m, np.zeros_like(m), m, np.ones_like(m)])
    s = localisation_scores(maps, masks)
    for key in SCORES:
        assert np.isnan(s[key][:3]).all(), key  # all-zero map, empty mask, non-finite map
    # A mask covering the whole map: every share is 1, AUROC has no negatives.
    assert [s[k][3] for k in ("mass", "pointing_game", "top_k_precision")] == [1.0, 1.0, 1.0]
    assert np.isnan(s["auroc"][3])


def test_rows_are_independent_and_shapes_are_checked() -> None:
    m = _mask()
    maps = np.stack([m * 1.0, np.where(m, 0.0, 1.0), m * 1.0])
    s = localisation_scores(maps, np.stack([m, m, m]))
    np.testing.assert_array_equal(s["pointing_game"], [1.0, 0.0, 1.0])
    assert all(v.shape == (3,) and v.dtype == np.float64 for v in s.values())
    with pytest.raises(ValueError, match="one shape"):
        localisation_scores(maps, m[None])


def test_random_maps_score_about_the_mask_area() -> None:
    m = np.zeros((12, 600), bool)
    m[:, 200:300] = True  # 1/6 of the map
    rng = np.random.default_rng(0)
    s = localisation_scores(rng.random((200, 12, 600)), np.broadcast_to(m, (200, 12, 600)))
    assert np.mean(s["mass"]) == pytest.approx(1 / 6, abs=0.01)
    assert np.mean(s["top_k_precision"]) == pytest.approx(1 / 6, abs=0.01)
    assert np.mean(s["pointing_game"]) == pytest.approx(1 / 6, abs=0.07)
    assert np.mean(s["auroc"]) == pytest.approx(0.5, abs=0.01)
