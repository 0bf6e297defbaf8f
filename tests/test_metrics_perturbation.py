"""Insertion / deletion (RISE) and ROAD on toy score functions with known answers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import csc_matrix, lil_matrix
from scipy.sparse.linalg import spsolve

from jaxcam import metrics
from jaxcam.metrics._common import gaussian_blur

H = W = 16
REGION = (slice(4, 8), slice(4, 10))  # 24 pixels: the toy model looks only here
R = 24


def region_score(x):
    """Class 0 = mean of the region over channels; class 1 = 1 - that."""
    s = jnp.mean(x[:, REGION[0], REGION[1], :], axis=(1, 2, 3))
    return jnp.stack([s, 1 - s], axis=1)


def region_mask():
    m = np.zeros((H, W), bool)
    m[REGION] = True
    return m


def np_region_score(x):
    return x[:, REGION[0], REGION[1], :].mean(axis=(1, 2, 3))


# --- AUC ---------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(c=st.floats(-5, 5), n=st.sampled_from([2, 5, 17]), seed=st.integers(0, 1000))
def test_auc_of_constant_curve_is_the_constant(c, n, seed):
    rng = np.random.default_rng(seed)
    interior = np.sort(rng.uniform(0, 1, n - 2))
    fractions = np.concatenate([[0.0], interior, [1.0]])
    curve = np.full((3, n), c, np.float32)
    np.testing.assert_allclose(metrics.auc(curve, fractions), c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics.auc(curve), c, rtol=1e-5, atol=1e-5)


def test_auc_of_identity_is_one_half_and_matches_numpy_trapezoid():
    f = np.linspace(0, 1, 11)
    assert float(metrics.auc(f[None])[0]) == pytest.approx(0.5)
    y = np.random.default_rng(0).uniform(size=(4, 7))
    x = np.array([0, 0.1, 0.15, 0.5, 0.6, 0.99, 1.0])
    np.testing.assert_allclose(metrics.auc(y, x), np.trapezoid(y, x, axis=1), rtol=1e-6)


def test_auc_rejects_bad_fractions():
    with pytest.raises(ValueError, match=r"fractions must have shape \(3,\)"):
        metrics.auc(np.zeros((2, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="at least 2 points"):
        metrics.auc(np.zeros((2, 1)))


# --- deletion / insertion ----------------------------------------------------


def test_deletion_of_ideal_map_has_the_analytic_curve_and_auc():
    # Image of ones; the ideal map deletes the region first, one pixel per step:
    # score_k = max(0, 1 - k/R), so the AUC is exactly (R/N)/2.
    x = jnp.ones((1, H, W, 3))
    ideal = jnp.asarray(region_mask(), jnp.float32)[None]
    out = metrics.deletion(region_score, x, ideal, 0, step=1, chunk_size=64)
    k = np.arange(H * W + 1)
    np.testing.assert_allclose(out.fractions, k / (H * W), atol=1e-7)
    np.testing.assert_allclose(out.scores[0], np.maximum(0, 1 - k / R), atol=1e-6)
    np.testing.assert_allclose(out.auc[0], 0.5 * R / (H * W), rtol=1e-5)


def test_deletion_auc_of_ideal_map_is_below_random_maps_and_insertion_above():
    # Images 0-3 get the ideal map, images 4-7 (the same images) a random map.
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 0.3, (4, H, W, 3))
    x[:, REGION[0], REGION[1]] += 1.0  # a bright region: blurring it lowers the score
    x = jnp.asarray(np.concatenate([x, x]), jnp.float32)
    ideal = np.broadcast_to(region_mask(), (4, H, W))
    maps = jnp.asarray(np.concatenate([ideal, rng.uniform(size=(4, H, W))]), jnp.float32)
    cls = jnp.zeros(8, jnp.int32)
    d = np.asarray(metrics.deletion(region_score, x, maps, cls, step=8).auc)
    assert np.all(d[:4] < d[4:] - 0.2)
    i = np.asarray(metrics.insertion(region_score, x, maps, cls, step=8, blur_sigma=3.0).auc)
    assert np.all(i[:4] > i[4:] + 0.05)


def test_deletion_matches_a_numpy_loop_with_partial_last_step_and_ties():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, H, W, 3)).astype(np.float32)
    maps = rng.integers(0, 4, size=(2, H, W)).astype(np.float32)  # many ties
    step = 7  # 256 = 36 * 7 + 4: a short last step
    out = metrics.deletion(region_score, x, maps, np.array([0, 1]), step=step,
                           baseline="mean", chunk_size=5)
    n = H * W
    counts = np.minimum(np.arange(-(-n // step) + 1) * step, n)
    expected = np.zeros((2, len(counts)))
    for b in range(2):
        order = np.argsort(-maps[b].ravel(), kind="stable")
        base = x[b].mean(axis=(0, 1))
        for i, c in enumerate(counts):
            img = x[b].reshape(n, 3).copy()
            img[order[:c]] = base
            s = np_region_score(img.reshape(1, H, W, 3))[0]
            expected[b, i] = s if b == 0 else 1 - s
    np.testing.assert_allclose(out.scores, expected, atol=1e-5)
    np.testing.assert_allclose(out.fractions, counts / n, atol=1e-7)
    np.testing.assert_allclose(out.auc, np.trapezoid(expected, counts / n, axis=1), atol=1e-5)


def test_insertion_goes_from_the_blurred_image_to_the_image():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, H, W, 3)), jnp.float32)
    maps = jnp.asarray(rng.uniform(size=(2, H, W)), jnp.float32)
    out = metrics.insertion(region_score, x, maps, 0, step=16, blur_sigma=2.0)
    blurred = gaussian_blur(x, 2.0, 5)
    np.testing.assert_allclose(out.scores[:, 0], region_score(blurred)[:, 0], atol=1e-6)
    np.testing.assert_allclose(out.scores[:, -1], region_score(x)[:, 0], atol=1e-6)


def test_gaussian_blur_keeps_constants_and_matches_a_numpy_reference():
    x = np.full((1, 12, 12, 3), 0.7, np.float32)
    np.testing.assert_allclose(gaussian_blur(x, 2.0, 3), x, atol=1e-6)
    rng = np.random.default_rng(4)
    img = rng.normal(size=(1, 12, 12, 1)).astype(np.float32)
    t = np.arange(-3, 4)
    k = np.exp(-(t**2) / 8.0)
    k /= k.sum()
    p = np.pad(img[0, ..., 0], 3, mode="reflect")
    ref = np.array([[np.sum(np.outer(k, k) * p[i:i + 7, j:j + 7]) for j in range(12)]
                    for i in range(12)])
    np.testing.assert_allclose(gaussian_blur(img, 2.0, 3)[0, ..., 0], ref, atol=1e-5)


def test_jit_equals_eager_and_chunk_size_does_not_change_the_result():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, H, W, 3)), jnp.float32)
    maps = jnp.asarray(rng.uniform(size=(3, H, W)), jnp.float32)
    cls = jnp.array([0, 1, 0])
    jitted = jax.jit(functools.partial(metrics.deletion, region_score, step=10, chunk_size=4))
    eager = metrics.deletion(region_score, x, maps, cls, step=10, chunk_size=27)
    np.testing.assert_allclose(jitted(x, maps, cls).scores, eager.scores, atol=1e-6)


def test_perturbation_errors_name_the_problem():
    x = jnp.zeros((2, H, W, 3))
    maps = jnp.zeros((2, H, W))
    with pytest.raises(ValueError, match=r"maps shape \(2, 8, 8\) does not match"):
        metrics.deletion(region_score, x, jnp.zeros((2, 8, 8)), 0)
    with pytest.raises(ValueError, match="unknown baseline 'noise'"):
        metrics.deletion(region_score, x, maps, 0, baseline="noise")
    with pytest.raises(ValueError, match="step must be between 1 and H\\*W = 256"):
        metrics.deletion(region_score, x, maps, 0, step=0)
    with pytest.raises(ValueError, match=r"class_idx must be a scalar or have shape \(2,\)"):
        metrics.insertion(region_score, x, maps, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match=r"score_fn must return one score per class"):
        metrics.deletion(lambda z: z.mean(axis=(1, 2, 3)), x, maps, 0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        metrics.deletion(region_score, x, maps, 0, chunk_size=0)


# --- ROAD: noisy linear imputation --------------------------------------------


def test_imputation_reproduces_a_linear_ramp_exactly():
    i, j = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    ramp = np.stack([0.3 * i - 0.2 * j + 1, 0.1 * i, -0.5 * j], axis=-1)[None].astype(np.float32)
    missing = np.zeros((1, H, W), bool)
    missing[0, 3:13, 2:11] = True  # interior hole, 90 pixels
    missing[0, 7, 13] = True
    out = metrics.noisy_linear_impute(ramp, missing, noise=0.0)
    np.testing.assert_allclose(out, ramp, atol=1e-4)


def _spsolve_reference(img, miss):
    """Rong et al.'s sparse system, assembled pixel by pixel and solved by scipy."""
    h, w = img.shape
    ids = {tuple(p): n for n, p in enumerate(np.argwhere(miss))}
    a = lil_matrix((len(ids), len(ids)))
    rhs = np.zeros(len(ids))
    for (y, x), n in ids.items():
        for dy, dx, wt in metrics.ROAD_NEIGHBOURS:
            q = (y + dy, x + dx)
            if 0 <= q[0] < h and 0 <= q[1] < w:
                a[n, n] += wt
                if miss[q]:
                    a[n, ids[q]] -= wt
                else:
                    rhs[n] += wt * img[q]
    out = img.copy()
    out[miss] = spsolve(csc_matrix(a), rhs)
    return out


def test_imputation_matches_the_sparse_direct_solve(x64):
    rng = np.random.default_rng(6)
    img = rng.normal(size=(1, 12, 12, 2))
    miss = rng.uniform(size=(1, 12, 12)) < 0.6  # holes touch the border too
    out = np.asarray(metrics.noisy_linear_impute(img, miss, noise=0.0, tol=1e-12))
    for c in range(2):
        np.testing.assert_allclose(out[0, ..., c], _spsolve_reference(img[0, ..., c], miss[0]),
                                   atol=1e-9)


def test_imputation_noise_touches_only_the_removed_pixels():
    rng = np.random.default_rng(7)
    img = jnp.asarray(rng.normal(size=(2, H, W, 3)), jnp.float32)
    miss = jnp.asarray(rng.uniform(size=(2, H, W)) < 0.5)
    clean = metrics.noisy_linear_impute(img, miss, noise=0.0)
    noisy = metrics.noisy_linear_impute(img, miss, noise=0.05, rng=jax.random.PRNGKey(0))
    diff = np.asarray(noisy - clean)
    m = np.asarray(miss)
    assert np.all(diff[~m] == 0)
    assert 0.04 < diff[m].std() < 0.06


def test_road_on_the_region_model_has_known_morf_and_lerf():
    # Ones in the region, zeros elsewhere; ideal map = region. MoRF removes the whole
    # region from 10% (26 px >= 24) on and imputes it from zeros -> score 0. LeRF
    # up to 90% (230 px <= 232) never touches the region -> score 1.
    x = jnp.asarray(region_mask(), jnp.float32)[None, ..., None] * jnp.ones((1, 1, 1, 3))
    ideal = jnp.asarray(region_mask(), jnp.float32)[None]
    out = metrics.road(region_score, x, ideal, 0, percentages=(10, 50, 90), chunk_size=2)
    np.testing.assert_allclose(out.percentages, [10, 50, 90])
    np.testing.assert_allclose(out.morf, 0.0, atol=1e-5)
    np.testing.assert_allclose(out.lerf, 1.0, atol=1e-5)
    reverse = metrics.road(region_score, x, 1 - ideal, 0, percentages=(10, 50, 90))
    assert np.all(np.asarray(reverse.morf) > 0.99) and np.all(np.asarray(reverse.lerf) < 0.01)


def test_road_rejects_bad_percentages():
    x = jnp.zeros((1, H, W, 3))
    with pytest.raises(ValueError, match=r"values in \[0, 100\], got \(50, 120\)"):
        metrics.road(region_score, x, jnp.zeros((1, H, W)), 0, percentages=(50, 120))
