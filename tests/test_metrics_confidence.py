"""Average Drop, Increase in Confidence and Win % on toy scores with known values."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcam import metrics

H = W = 8


def region_score(x):
    """Class 0: mean of the top-left 4x4 block; class 1: 1 - 0.5 * that (falls with brightness)."""
    s = jnp.mean(x[:, :4, :4, :], axis=(1, 2, 3))
    return jnp.stack([s, 1 - 0.5 * s], axis=1)


X = jnp.ones((3, H, W, 3))


def test_map_of_ones_has_zero_drop_and_no_increase():
    ones = jnp.ones((3, H, W))
    assert float(metrics.average_drop(region_score, X, ones, 0)) == 0.0
    assert float(metrics.increase_in_confidence(region_score, X, ones, 0)) == 0.0


def test_half_map_halves_the_score_giving_a_50_percent_drop():
    half = jnp.full((3, H, W), 0.5)
    y, o = metrics.confidence_scores(region_score, X, half, 0)
    np.testing.assert_allclose(y, 1.0)
    np.testing.assert_allclose(o, 0.5)
    np.testing.assert_allclose(metrics.average_drop(region_score, X, half, 0), 50.0, rtol=1e-6)


def test_masking_that_raises_the_score_counts_as_increase_and_no_drop():
    # class 1 = 1 - 0.5 * mean: Y = 0.5; with the half map O = 0.75 > Y.
    half = jnp.full((3, H, W), 0.5)
    assert float(metrics.increase_in_confidence(region_score, X, half, 1)) == 100.0
    assert float(metrics.average_drop(region_score, X, half, 1)) == 0.0


def test_drop_formula_against_numpy_for_mixed_images():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 1.0, (5, H, W, 3)).astype(np.float32)
    maps = rng.uniform(size=(5, H, W)).astype(np.float32)
    cls = np.array([0, 1, 0, 1, 1])
    mean = lambda z: z[:, :4, :4].mean((1, 2, 3))
    s = lambda z: np.stack([mean(z), 1 - 0.5 * mean(z)], 1)
    y = s(x)[np.arange(5), cls]
    o = s(x * maps[..., None])[np.arange(5), cls]
    np.testing.assert_allclose(metrics.average_drop(region_score, x, maps, cls),
                               100 * np.mean(np.maximum(0, y - o) / y), rtol=1e-5)
    np.testing.assert_allclose(metrics.increase_in_confidence(region_score, x, maps, cls),
                               100 * np.mean(y < o))


def test_baseline_fades_the_masked_part_to_the_given_value():
    e = metrics.explanation_images(X, jnp.zeros((3, H, W)), baseline=-2.0)
    np.testing.assert_allclose(e, -2.0)


def test_win_percentage_two_methods_and_ties_split():
    drops = {"a": jnp.array([0.1, 0.5, 0.2, 0.3]), "b": jnp.array([0.2, 0.4, 0.2, 0.9])}
    win = metrics.win_percentage(drops)
    # a wins images 0 and 3, b wins image 1, image 2 is a tie (half each)
    assert float(win["a"]) == pytest.approx(62.5)
    assert float(win["b"]) == pytest.approx(37.5)
    near = {"a": jnp.array([0.1, 0.5]), "b": jnp.array([0.1 + 1e-7, 0.9])}
    assert float(metrics.win_percentage(near)["a"]) == pytest.approx(100.0)
    tied = metrics.win_percentage(near, tie_tolerance=1e-4)
    assert float(tied["a"]) == pytest.approx(75.0) and float(tied["b"]) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="at least two methods"):
        metrics.win_percentage({"a": drops["a"]})


def test_confidence_metrics_agrees_with_the_single_metrics():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(0.2, 1.0, (4, H, W, 3)), jnp.float32)
    maps = {"ones": jnp.ones((4, H, W)),
            "rand": jnp.asarray(rng.uniform(size=(4, H, W)), jnp.float32)}
    out = metrics.confidence_metrics(region_score, x, maps, 0)
    for name, m in maps.items():
        np.testing.assert_allclose(out[name]["average_drop"],
                                   metrics.average_drop(region_score, x, m, 0), rtol=1e-6)
        np.testing.assert_allclose(out[name]["increase_in_confidence"],
                                   metrics.increase_in_confidence(region_score, x, m, 0))
    assert float(out["ones"]["win"]) == 100.0 and float(out["rand"]["win"]) == 0.0


def test_confidence_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"maps must have shape \(B, H, W\)"):
        metrics.average_drop(region_score, X, jnp.ones((H, W)), 0)
    with pytest.raises(ValueError, match="class_idx must hold integers"):
        metrics.average_drop(region_score, X, jnp.ones((3, H, W)), jnp.zeros(3))
    with pytest.raises(ValueError, match="maps is empty"):
        metrics.confidence_metrics(region_score, X, {}, 0)
