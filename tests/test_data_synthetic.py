"""Synthetic lesions: masks are exactly the lesion pixels, boxes are tight, classes are
carried by the lesion (not the background), balanced builds, identical bytes per seed."""

import dataclasses

import numpy as np
import pytest

from jaxcam.data import synthetic
from jaxcam.data.builders import split_labels
from jaxcam.data.synthetic import MULTI, SINGLE, SyntheticConfig, make_image, render, sample_scene

SMALL = dataclasses.replace(SINGLE, image_size=48)
SMALL_MULTI = dataclasses.replace(MULTI, image_size=64)


@pytest.mark.parametrize("config", [SMALL, SMALL_MULTI], ids=["single", "multi"])
@pytest.mark.parametrize("label", range(synthetic.NUM_CLASSES))
def test_mask_is_exactly_where_the_lesions_change_the_image(config, label):
    scene = sample_scene(np.random.default_rng([7, label]), config, label=label)
    with_lesions, ids = render(scene, config, lesions=True)
    without, ids_again = render(scene, config, lesions=False)
    np.testing.assert_array_equal(ids, ids_again)
    changed = np.any(with_lesions != without, axis=-1)
    np.testing.assert_array_equal(changed, ids > 0)
    # make_image's mask is the same geometry, binarised.
    image, mask, boxes, lab = make_image(np.random.default_rng([7, label]), config, label=label)
    assert lab == label and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask, (ids > 0).astype(np.uint8))
    np.testing.assert_array_equal(image, np.round(with_lesions * 255).astype(np.uint8))


@pytest.mark.parametrize("config", [SMALL, SMALL_MULTI], ids=["single", "multi"])
def test_boxes_are_tight_around_each_lesion(config):
    for seed in range(6):
        scene = sample_scene(seed, config)
        _, ids = render(scene, config)
        _, _, boxes, _ = make_image(seed, config)
        assert boxes.shape == (len(scene.lesions), 4)
        assert config.min_lesions <= len(boxes) <= config.max_lesions
        for k, (y0, x0, y1, x1) in enumerate(boxes, start=1):
            ys, xs = np.nonzero(ids == k)
            assert (y0, x0, y1, x1) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
            # Lesion k owns every one of its pixels inside the box; lesions do not overlap.
            assert not np.any(ids[y0:y1, x0:x1][ids[y0:y1, x0:x1] > 0] == 0)


def test_multi_instance_lesions_share_the_class_and_do_not_touch():
    for seed in range(8):
        scene = sample_scene(seed, SMALL_MULTI)
        assert 2 <= len(scene.lesions) <= 4
        _, ids = render(scene, SMALL_MULTI)
        for k in range(1, len(scene.lesions) + 1):
            region = ids == k
            grown = region.copy()  # dilate by one pixel: no other lesion adjacent
            grown[1:] |= region[:-1]
            grown[:-1] |= region[1:]
            grown[:, 1:] |= region[:, :-1]
            grown[:, :-1] |= region[:, 1:]
            assert set(np.unique(ids[grown])) <= {0, k}


def test_same_seed_same_bytes_and_different_seed_differs():
    a = make_image(np.random.default_rng(123), SMALL)
    b = make_image(np.random.default_rng(123), SMALL)
    c = make_image(np.random.default_rng(124), SMALL)
    for x, y in zip(a[:3], b[:3], strict=True):
        assert x.tobytes() == y.tobytes()
    assert a[0].tobytes() != c[0].tobytes()


def _mean_colours(n, seed):
    inside, outside, labels = [], [], []
    for i in range(n):
        label = i % synthetic.NUM_CLASSES
        image, mask, _, _ = make_image(np.random.default_rng([seed, i]), SMALL, label=label)
        m = mask.astype(bool)
        inside.append(image[m].mean(0))
        outside.append(image[~m].mean(0))
        labels.append(label)
    return np.array(inside), np.array(outside), np.array(labels)


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y):
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(synthetic.NUM_CLASSES)])
    pred = np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return np.mean(pred == test_y)


def test_class_is_carried_by_the_lesion_not_the_background():
    # A nearest-centroid classifier on the mean lesion colour is near perfect;
    # the same on the mean skin colour is near chance (1/4).
    tr_in, tr_out, tr_y = _mean_colours(40, seed=1)
    te_in, te_out, te_y = _mean_colours(40, seed=2)
    assert _nearest_centroid_accuracy(tr_in, tr_y, te_in, te_y) >= 0.95
    assert _nearest_centroid_accuracy(tr_out, tr_y, te_out, te_y) <= 0.5


def test_split_labels_are_balanced_and_seeded():
    for n in (4, 10, 2001):
        counts = np.bincount(split_labels(0, 0, n), minlength=synthetic.NUM_CLASSES)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert not np.array_equal(split_labels(0, 0, 40), split_labels(1, 0, 40))
    np.testing.assert_array_equal(split_labels(5, 2, 40), split_labels(5, 2, 40))


def test_malignant_flags():
    assert dict(zip(synthetic.CLASS_NAMES, synthetic.MALIGNANT, strict=True)) == {
        "nevus": False,
        "seborrheic_keratosis": False,
        "melanoma": True,
        "basal_cell_carcinoma": True,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 8}, "image_size must be >= 16"),
        ({"min_lesions": 3, "max_lesions": 2}, "min_lesions <= max_lesions"),
        ({"radius": (0.3, 0.2)}, "radius range"),
        ({"max_lesions": 6, "min_lesions": 2, "radius": (0.1, 0.3)}, "do not fit without overlap"),
        ({"vignette": 1.0}, r"vignette must be in \[0, 1\)"),
        ({"image_size": 16, "radius": (0.07, 0.13)}, r"1.12 px are too small to draw"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)


def test_bad_label():
    with pytest.raises(ValueError, match=r"label must be in \[0, 4\)"):
        make_image(0, SMALL, label=4)


def test_held_out_images_are_balanced_reproducible_and_their_ids_are_the_render():
    config = dataclasses.replace(MULTI, image_size=32)
    images, labels, ids = synthetic.held_out_images(config, 6, seed=3)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % synthetic.NUM_CLASSES for i in range(6)]
    again = synthetic.held_out_images(config, 6, seed=3)
    np.testing.assert_array_equal(again[0], images)
    scene = sample_scene(np.random.default_rng([3, synthetic.HELD_OUT_TAG, 4]), config, label=0)
    image, inst = render(scene, config)
    np.testing.assert_array_equal(ids[4], inst)
    np.testing.assert_array_equal(images[4], np.round(image * 255.0).astype(np.uint8))
    other = synthetic.held_out_images(config, 6, seed=3, tag=8)[0]
    assert not np.array_equal(other, images)
