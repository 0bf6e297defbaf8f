"""Input pipeline: exact resume, determinism, coverage, class balance, augmentation geometry."""

import numpy as np
import pytest

import jaxcam.data as data
from jaxcam.data.pipeline import batches, color_jitter, epoch_order, rotate, source_labels
from jaxcam.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

S = 16


def fake_source(n=22, size=S, seed=0):
    """White disc 'lesions' on dark noise; the mask is the disc; labels 0/1/2 imbalanced."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        cy, cx = rng.uniform(4, size - 4, 2)
        mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < 9).astype(np.uint8)
        image = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
        image[mask.astype(bool)] = 255
        label = 0 if i < n - 6 else 1 + i % 2
        out.append(
            {"image": image, "mask": mask[..., None], "label": label, "malignant": label == 2}
        )
    return out


def _collect(it):
    return list(it)


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("balanced", [False, True])
def test_resume_from_start_step_gives_the_same_batches(balanced):
    src = fake_source()
    full = _collect(batches(src, 4, 12, train=True, seed=3, epoch=2, balanced=balanced))
    assert len(full) == 5  # 22 // 4, drop_remainder in training
    for k in (1, 3, 5):
        _equal(
            _collect(
                batches(src, 4, 12, train=True, seed=3, epoch=2, start_step=k, balanced=balanced)
            ),
            full[k:],
        )


def test_order_and_augmentation_depend_on_seed_and_epoch_only():
    src = fake_source()
    a = _collect(batches(src, 4, 12, train=True, seed=0, epoch=1, num_threads=1))
    b = _collect(batches(src, 4, 12, train=True, seed=0, epoch=1, num_threads=2))
    _equal(a, b)
    c = _collect(batches(src, 4, 12, train=True, seed=0, epoch=2))
    assert not np.array_equal(
        np.concatenate([x["index"] for x in a]), np.concatenate([x["index"] for x in c])
    )


def test_an_epoch_visits_every_example_once():
    src = fake_source()
    evals = _collect(batches(src, 4, 12, train=False, seed=0))
    assert [len(b["label"]) for b in evals] == [4, 4, 4, 4, 4, 2]  # eval keeps the remainder
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in evals]), np.arange(22))
    train = np.concatenate([b["index"] for b in batches(src, 4, 12, train=True, seed=0)])
    assert len(train) == 20 and len(set(train.tolist())) == 20
    for b in evals:
        np.testing.assert_array_equal(b["label"], [src[i]["label"] for i in b["index"]])
        np.testing.assert_array_equal(b["malignant"], [src[i]["malignant"] for i in b["index"]])
        assert (
            b["label"].dtype == np.int32
            and b["malignant"].dtype == np.bool_
            and b["index"].dtype == np.int64
        )


def test_eval_images_are_normalised_pixels():
    # No resize (S -> S) and no augmentation: (x / 255 - mean) / std, by hand.
    src = fake_source()
    batch = next(iter(batches(src, 5, S, train=False, seed=0)))
    expected = np.stack(
        [
            (src[i]["image"] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
            for i in range(5)
        ]
    )
    np.testing.assert_allclose(batch["image"], expected, atol=1e-5)
    assert batch["image"].dtype == np.float32
    np.testing.assert_array_equal(
        batch["mask"], np.stack([src[i]["mask"][..., 0] for i in range(5)])
    )


def test_augmented_masks_stay_aligned_with_images():
    src = fake_source(n=40)
    prep = Preprocessing(image_size=24, resize_size=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    agree, changed = [], 0
    for b in batches(src, 8, 24, train=True, seed=5, prep=prep):
        white = b["image"].mean(-1) > 0.5
        agree.append(np.mean(white == (b["mask"] == 1)))
        plain = next(
            iter(batches([src[i] for i in b["index"]], 8, 24, train=False, seed=0, prep=prep))
        )
        changed += int(np.sum(np.any(plain["mask"] != b["mask"], axis=(1, 2))))
    assert min(agree) > 0.97  # the disc and its mask moved together
    assert changed > 10  # augmentation did move most masks


def test_balanced_sampling_draws_classes_uniformly():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    draws = np.concatenate([labels[epoch_order(100, 0, e, True, labels)] for e in range(60)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.03)
    np.testing.assert_array_equal(
        epoch_order(100, 0, 1, True, labels), epoch_order(100, 0, 1, True, labels)
    )


def test_rotation_identities():
    rng = np.random.default_rng(0)
    img = rng.random((9, 9, 3))
    np.testing.assert_allclose(rotate(img, 0.0), img, atol=1e-12)
    np.testing.assert_allclose(rotate(img, 90.0), np.rot90(img), atol=1e-9)  # counter-clockwise
    mask = (rng.random((9, 9)) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(rotate(mask, -90.0, nearest=True), np.rot90(mask, -1))


def test_color_jitter_formulas():
    rng = np.random.default_rng(1)
    img = rng.random((5, 5, 3)) * 0.8
    np.testing.assert_allclose(color_jitter(img, 1.0, 1.0, 1.0), img, atol=1e-12)
    np.testing.assert_allclose(
        color_jitter(img, 1.2, 1.0, 1.0), np.clip(img * 1.2, 0, 1), atol=1e-12
    )
    gray = color_jitter(img, 1.0, 1.0, 0.0)
    np.testing.assert_allclose(
        gray, np.repeat((img @ [0.299, 0.587, 0.114])[..., None], 3, -1), atol=1e-12
    )


def test_source_labels_skip_image_decoding_on_tfds(tmp_path):
    kw = {"num_train": 8, "num_validation": 4, "num_test": 4, "image_size": 24}
    data.build("synthetic_lesions", data_dir=tmp_path, progress=False, verbose=False, **kw)
    src = data.load("synthetic_lesions", "train", data_dir=tmp_path, **kw)
    np.testing.assert_array_equal(source_labels(src), [src[i]["label"] for i in range(len(src))])
    batch = next(iter(batches(src, 8, 16, train=False, seed=0)))
    assert set(np.unique(batch["mask"])) <= {0, 1} and batch["mask"].shape == (8, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_step": 6}, r"start_step must be in \[0, 5\]"),
        ({"batch_size": 30}, "batch_size 30 exceeds the 22 examples"),
        ({"batch_size": 0}, "batch_size and image_size must be positive"),
        (
            {"prep": Preprocessing(image_size=8, resize_size=None)},
            r"prep.image_size \(8\) != image_size \(12\)",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"batch_size": 4, "image_size": 12, "train": True, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        next(iter(batches(fake_source(), **args)))
    with pytest.raises(ValueError, match="the source is empty"):
        next(iter(batches([], 4, 12, True, 0)))
