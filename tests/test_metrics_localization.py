"""Pointing game, energy pointing game and multi-instance coverage with known answers."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcam import metrics

H = W = 20


def blob(cy, cx, s=2.0):
    i, j = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    return np.exp(-((i - cy) ** 2 + (j - cx) ** 2) / (2 * s**2))


def test_ideal_map_wins_the_pointing_game_and_full_energy():
    masks = np.zeros((3, H, W), bool)
    masks[0, 2:6, 3:9] = masks[1, 10:18, 1:4] = masks[2, 15:20, 15:20] = True
    maps = masks.astype(np.float32)
    assert np.all(np.asarray(metrics.pointing_game(maps, masks)))
    np.testing.assert_allclose(metrics.energy_pointing_game(maps, masks), 1.0)


def test_energy_of_uniform_map_is_the_mask_area_fraction_and_zero_map_scores_zero():
    masks = np.zeros((2, H, W), np.uint8)
    masks[0, :5, :8] = 1
    masks[1, 3:4, 2:12] = 255
    e = metrics.energy_pointing_game(np.ones((2, H, W)), masks)
    np.testing.assert_allclose(e, [40 / 400, 10 / 400], rtol=1e-6)
    assert float(metrics.energy_pointing_game(np.zeros((1, H, W)), masks[:1])[0]) == 0.0


def test_pointing_game_tolerance_is_a_euclidean_distance_in_pixels():
    mask = np.zeros((1, H, W), bool)
    mask[0, 5, 5] = True
    m = np.zeros((1, H, W), np.float32)
    m[0, 8, 9] = 1.0  # distance 5 from the mask pixel
    assert not bool(metrics.pointing_game(m, mask, tolerance=4.99)[0])
    assert bool(metrics.pointing_game(m, mask, tolerance=5.0)[0])
    assert not bool(metrics.pointing_game(m, np.zeros_like(mask), tolerance=100)[0])
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        metrics.pointing_game(m, mask, tolerance=-1)


def test_pointing_game_ties_take_the_first_pixel_in_raster_order():
    mask = np.zeros((1, H, W), bool)
    mask[0, 0, 0] = True
    assert bool(metrics.pointing_game(np.ones((1, H, W)), mask)[0])
    assert not bool(metrics.pointing_game(np.ones((1, H, W)), mask[:, ::-1, ::-1])[0])


def test_boxes_to_masks_uses_end_exclusive_yxyx_pixels_like_the_data_module():
    boxes = np.array([[3, 2, 7, 5], [4, 4, 9, 4]])  # (y0, x0, y1, x1); second box is empty
    m = np.asarray(metrics.boxes_to_masks(boxes, H, W))
    expected = np.zeros((H, W), bool)
    expected[3:7, 2:5] = True
    np.testing.assert_array_equal(m[0], expected)
    assert not m[1].any()


def test_instance_coverage_counts_lesions_with_a_peak_and_with_energy():
    # Three lesions plus an empty padding slot; the map has peaks in lesions 0 and 1
    # only (lesion 1's at 60% of the maximum), none in lesion 2.
    inst = np.zeros((1, 4, H, W), bool)
    inst[0, 0, 2:7, 2:7] = True
    inst[0, 1, 12:18, 12:18] = True
    inst[0, 2, 2:6, 13:19] = True
    maps = (blob(4, 4) + 0.6 * blob(15, 15))[None].astype(np.float32)
    cov = metrics.instance_coverage(maps, inst, peak_threshold=0.5, energy_share=0.1)
    np.testing.assert_array_equal(cov.valid, [[True, True, True, False]])
    np.testing.assert_array_equal(cov.peaks, [[True, True, False, False]])
    assert float(cov.peak_fraction) == pytest.approx(2 / 3)
    shares = [(maps[0] * inst[0, k]).sum() / maps[0].sum() for k in range(4)]
    np.testing.assert_allclose(cov.shares[0], shares, rtol=1e-5)
    assert float(cov.energy_fraction) == pytest.approx(np.sum(np.array(shares[:3]) >= 0.1) / 3)
    stricter = metrics.instance_coverage(maps, inst, peak_threshold=0.7)
    assert float(stricter.peak_fraction) == pytest.approx(1 / 3)


def test_instance_masks_from_labels_and_local_maxima_plateau():
    labels = np.zeros((1, H, W), np.int32)
    labels[0, :3, :3] = 1
    labels[0, 10:, 10:] = 3
    inst = np.asarray(metrics.instance_masks_from_labels(labels, 3))
    assert inst.shape == (1, 3, H, W)
    assert inst[0, 0].sum() == 9 and inst[0, 1].sum() == 0 and inst[0, 2].sum() == 100
    plateau = np.zeros((1, H, W), np.float32)
    plateau[0, 5:7, 5:8] = 1.0
    np.testing.assert_array_equal(metrics.local_maxima(plateau), plateau.astype(bool))
    assert not np.asarray(metrics.local_maxima(np.zeros((1, H, W)))).any()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_energy_shares_of_a_partition_sum_to_one(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(2, H, W))
    inst = np.stack([labels == k for k in range(3)], axis=1)  # covers every pixel
    maps = rng.uniform(size=(2, H, W)).astype(np.float32)
    shares = np.asarray(metrics.instance_energy(maps, inst))
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all((shares >= 0) & (shares <= 1 + 1e-6))


def test_localization_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"masks must have shape \(2, 20, 20\)"):
        metrics.pointing_game(np.ones((2, H, W)), np.ones((2, 10, 10)))
    with pytest.raises(ValueError, match=r"masks must have shape \(2, 'N', 20, 20\)"):
        metrics.instance_coverage(np.ones((2, H, W)), np.ones((2, H, W)))
    with pytest.raises(ValueError, match="window must be a positive odd number"):
        metrics.local_maxima(np.ones((1, H, W)), window=4)
    with pytest.raises(ValueError, match=r"boxes must have shape \(\.\.\., 4\)"):
        metrics.boxes_to_masks(jnp.zeros((2, 3)), H, W)
