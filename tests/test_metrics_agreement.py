"""Spearman, SSIM and top-k% IoU against independent references and properties."""

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcam import metrics

H = W = 16


def _int_maps(seed, shape=(3, H, W), high=6):
    return np.random.default_rng(seed).integers(0, high, size=shape).astype(np.float32)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_spearman_with_ties_matches_scipy(seed):
    a, b = _int_maps(seed), _int_maps(seed + 1)
    b[1] = a[1] + _int_maps(seed + 2)[1]  # a correlated pair
    ours = np.asarray(metrics.spearman(a, b))
    ref = [scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(3)]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_spearman_is_invariant_to_strictly_increasing_transforms(seed):
    a, b = _int_maps(seed, high=20), _int_maps(seed + 7, high=20)
    base = np.asarray(metrics.spearman(a, b))
    transformed = np.asarray(metrics.spearman(a**3 + 2 * a - 5, np.exp(b / 4)))
    np.testing.assert_allclose(transformed, base, atol=1e-6)
    np.testing.assert_allclose(metrics.spearman(a, -b), -base, atol=1e-6)


def test_spearman_of_a_constant_map_is_zero_by_convention():
    a = _int_maps(0)
    assert np.all(np.asarray(metrics.spearman(a, np.ones_like(a))) == 0.0)
    np.testing.assert_allclose(metrics.spearman(a, a), 1.0, atol=1e-6)


def _ssim_reference(a, b, win=7, sigma=1.5, data_range=1.0):
    """Window-by-window SSIM with explicit 2-D gaussian weights (Wang et al. 2004)."""
    t = np.arange(win) - (win - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(a.shape[0] - win + 1):
        for j in range(a.shape[1] - win + 1):
            pa, pb = a[i:i + win, j:j + win], b[i:i + win, j:j + win]
            ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
            va, vb = (w2 * (pa - ma) ** 2).sum(), (w2 * (pb - mb) ** 2).sum()
            cov = (w2 * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2)
                        / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return np.mean(vals)


def test_ssim_matches_a_windowed_numpy_reference(x64):
    rng = np.random.default_rng(3)
    a = rng.uniform(size=(2, 14, 13))
    b = np.clip(a + rng.normal(scale=0.2, size=a.shape), 0, 1)
    ours = np.asarray(metrics.ssim(a, b, win_size=7))
    ref = [_ssim_reference(a[i], b[i]) for i in range(2)]
    np.testing.assert_allclose(ours, ref, rtol=1e-10)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_ssim_is_symmetric_and_one_for_identical_maps(seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(size=(2, H, W)).astype(np.float32)
    b = rng.uniform(size=(2, H, W)).astype(np.float32)
    np.testing.assert_allclose(metrics.ssim(a, b), metrics.ssim(b, a), atol=1e-6)
    np.testing.assert_allclose(metrics.ssim(a, a), 1.0, atol=1e-5)
    assert np.all(np.asarray(metrics.ssim(a, b)) < 0.5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), percent=st.sampled_from([1.0, 5.0, 20.0, 50.0, 100.0]))
def test_top_k_iou_is_symmetric_in_unit_interval_and_exact_count(seed, percent):
    a, b = _int_maps(seed), _int_maps(seed + 3)
    ab = np.asarray(metrics.top_k_iou(a, b, percent))
    np.testing.assert_allclose(ab, metrics.top_k_iou(b, a, percent))
    assert np.all((ab >= 0) & (ab <= 1))
    np.testing.assert_allclose(metrics.top_k_iou(a, a, percent), 1.0)
    k = max(1, round(percent / 100 * H * W))
    np.testing.assert_array_equal(np.asarray(metrics.top_k_mask(a, percent)).sum((1, 2)), k)


def test_top_k_iou_known_values():
    a = np.zeros((1, 10, 10), np.float32)
    b = np.zeros((1, 10, 10), np.float32)
    a[0, :2] = 1  # top 20% = rows 0-1
    b[0, 1:3] = 1  # top 20% = rows 1-2: overlap one row of 10, union 30
    assert float(metrics.top_k_iou(a, b, 20)[0]) == pytest.approx(1 / 3)
    b[0] = 0
    b[0, 8:] = 1
    assert float(metrics.top_k_iou(a, b, 20)[0]) == 0.0


def test_agreement_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"maps_a \(1, 4, 4\) and maps_b \(1, 4, 5\) must have"):
        metrics.spearman(np.ones((1, 4, 4)), np.ones((1, 4, 5)))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        metrics.ssim(np.ones((1, 8, 8)), np.ones((1, 8, 8)))
    with pytest.raises(ValueError, match=r"percent must be in \(0, 100\]"):
        metrics.top_k_iou(np.ones((1, 4, 4)), np.ones((1, 4, 4)), 0)
