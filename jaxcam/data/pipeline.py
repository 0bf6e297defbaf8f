"""Input pipeline: a grain loader from a random-access source to numpy batches.

Every batch is a pure function of ``(seed, epoch, step)``: the epoch's order
(a permutation, or class-balanced draws with replacement) comes from
``default_rng([seed, epoch])`` and each example's augmentation from
``default_rng([seed, epoch, position])``, where ``position`` is the example's
place in the epoch. So ``batches(..., start_step=k)`` yields exactly batches
``k, k+1, ...`` of an uninterrupted run, whatever the thread count.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from jaxcam.preprocessing import Preprocessing, normalize, resize_and_crop, to_float01

# Training augmentation (dermoscopy and fundus images have no canonical orientation).
MAX_ROTATION_DEG = 15.0
BRIGHTNESS = 0.1  # factor in [1 - b, 1 + b]
CONTRAST = 0.1
SATURATION = 0.1


def epoch_order(
    num_examples: int, seed: int, epoch: int, shuffle: bool, labels: np.ndarray | None = None
) -> np.ndarray:
    """Source indices of one epoch, length ``num_examples``.

    ``labels`` given: class-balanced sampling with replacement, each draw picks
    a class uniformly among those present, then an example of it uniformly
    (probability ``1 / (C_present * n_class)``). Else a permutation
    (``shuffle``) or ``arange``.
    """
    if labels is not None:
        labels = np.asarray(labels)
        classes, counts = np.unique(labels, return_counts=True)
        weights = 1.0 / (len(classes) * counts[np.searchsorted(classes, labels)])
        rng = np.random.default_rng([seed, epoch])
        return rng.choice(num_examples, size=num_examples, replace=True, p=weights / weights.sum())
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def source_labels(source: Any) -> np.ndarray:
    """Labels of every example, without decoding images when the source is TFDS."""
    info = getattr(source, "dataset_info", None)
    split = getattr(source, "split", None)
    if info is not None and split is not None:
        import tensorflow_datasets as tfds

        skip = {
            k: tfds.decode.SkipDecoding()
            for k, f in info.features.items()
            if isinstance(f, tfds.features.Image)
        }
        light = type(source)(dataset_info=info, split=split, decoders=skip)
        return np.array(
            [ex["label"] for ex in light.__getitems__(list(range(len(light))))], np.int64
        )
    return np.array([source[i]["label"] for i in range(len(source))], np.int64)


def rotate(image: np.ndarray, angle_deg: float, nearest: bool = False) -> np.ndarray:
    """Rotate ``(H, W)`` or ``(H, W, C)`` about its centre by ``angle_deg`` (counter-clockwise).

    Inverse mapping ``p_src = R(-angle) (p - c) + c`` with bilinear (or
    nearest) sampling; source coordinates are clamped to the image, so corners
    repeat the border instead of turning black.
    """
    h, w = image.shape[:2]
    a = math.radians(angle_deg)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # Counter-clockwise on screen (y down): source = R(-a) applied to (x, y).
    sx = math.cos(a) * (xx - cx) - math.sin(a) * (yy - cy) + cx
    sy = math.sin(a) * (xx - cx) + math.cos(a) * (yy - cy) + cy
    sx, sy = np.clip(sx, 0, w - 1), np.clip(sy, 0, h - 1)
    if nearest:
        return image[np.rint(sy).astype(int), np.rint(sx).astype(int)]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = sx - x0, sy - y0
    if image.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(image.dtype)


def color_jitter(
    image01: np.ndarray, brightness: float, contrast: float, saturation: float
) -> np.ndarray:
    """torchvision-style jitter with given factors (1 = unchanged), clipped to ``[0, 1]``.

    brightness ``x * b``; contrast ``(x - mean(gray)) * c + mean(gray)``;
    saturation ``(x - gray) * s + gray`` with ITU-R 601 gray.
    """
    weights = np.array([0.299, 0.587, 0.114], image01.dtype)
    x = np.clip(image01 * brightness, 0.0, 1.0)
    mean = (x @ weights).mean()
    x = np.clip((x - mean) * contrast + mean, 0.0, 1.0)
    gray = (x @ weights)[..., None]
    return np.clip((x - gray) * saturation + gray, 0.0, 1.0)


def _decode(image: Any) -> np.ndarray:
    if isinstance(image, bytes | bytearray):
        with Image.open(io.BytesIO(image)) as im:
            return np.asarray(im.convert("RGB"))
    return np.asarray(image)


def make_example(
    ex: dict[str, Any], index: int, prep: Preprocessing, rng: np.random.Generator | None
) -> dict[str, np.ndarray]:
    """Decoded example -> model-ready arrays; ``rng`` None means no augmentation.

    Order: resize (+crop) with :func:`jaxcam.preprocessing.resize_and_crop`,
    then flips / rotation / colour jitter, then :func:`normalize`. A mask goes
    through the same resize (thresholded at 0.5), flips and rotation (nearest).
    """
    image = resize_and_crop(to_float01(_decode(ex["image"])), prep)
    mask = None
    if "mask" in ex:
        m = _decode(ex["mask"]).astype(np.float32)
        m = m[..., 0] if m.ndim == 3 else m
        mask = (resize_and_crop(m[..., None], prep)[..., 0] >= 0.5).astype(np.uint8)
    if rng is not None:
        flip_h, flip_v = rng.random(2) < 0.5
        angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
        factors = 1.0 + rng.uniform(-1, 1, 3) * np.array([BRIGHTNESS, CONTRAST, SATURATION])
        if flip_h:
            image = image[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        if flip_v:
            image = image[::-1]
            mask = None if mask is None else mask[::-1]
        image = rotate(np.ascontiguousarray(image), angle)
        mask = None if mask is None else rotate(np.ascontiguousarray(mask), angle, nearest=True)
        image = color_jitter(image, *factors)
    out = {
        "image": normalize(image.astype(np.float32), prep.mean, prep.std).astype(np.float32),
        "label": np.int32(ex["label"]),
        "malignant": np.bool_(ex["malignant"]),
        "index": np.int64(index),
    }
    if mask is not None:
        out["mask"] = np.ascontiguousarray(mask)
    return out


def _stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def batches(
    source: Any,
    batch_size: int,
    image_size: int,
    train: bool,
    seed: int,
    epoch: int = 0,
    start_step: int = 0,
    balanced: bool = False,
    drop_remainder: bool | None = None,
    *,
    shuffle: bool | None = None,
    augment: bool | None = None,
    prep: Preprocessing | None = None,
    num_threads: int = 2,
    labels: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of numpy batches from a random-access ``source`` (e.g. :func:`load`).

    Yields dicts: ``"image"`` float32 ``(B, S, S, 3)`` normalised, ``"label"``
    int32 ``(B,)``, ``"malignant"`` bool ``(B,)``, ``"index"`` int64 ``(B,)``
    (the source index), and ``"mask"`` uint8 ``(B, S, S)`` in ``{0, 1}`` when
    the source has masks.

    Args:
      source: ``len(source)`` and ``source[i]`` -> dict with ``"image"``
        (uint8 ``(H, W, 3)`` or encoded bytes), ``"label"``, ``"malignant"``
        and optionally ``"mask"``.
      batch_size, image_size: ``B`` and ``S``.
      train: default for ``shuffle``, ``augment`` and ``drop_remainder``.
      seed, epoch: the order and the augmentation are pure functions of these.
      start_step: skip this many batches (resume); the rest are identical to
        an uninterrupted epoch's.
      balanced: draw classes uniformly (with replacement, ``len(source)``
        draws per epoch) instead of a permutation.
      prep: resize and normalisation; default resizes straight to ``S x S``
        (no crop, so masks and lesions near the border are kept) with
        ImageNet mean/std.
      num_threads: grain reader threads (decoding releases the GIL).
      labels: labels of the source, to skip reading them for ``balanced``.
    """
    n = len(source)
    if batch_size < 1 or image_size < 1:
        raise ValueError(
            f"batch_size and image_size must be positive, got {batch_size}, {image_size}."
        )
    if n == 0:
        raise ValueError("the source is empty; build the dataset first or pick another split.")
    shuffle = train if shuffle is None else shuffle
    augment = train if augment is None else augment
    drop_remainder = train if drop_remainder is None else drop_remainder
    prep = prep or Preprocessing(image_size=image_size, resize_size=None)
    if prep.image_size != image_size:
        raise ValueError(f"prep.image_size ({prep.image_size}) != image_size ({image_size}).")
    steps = n // batch_size if drop_remainder else math.ceil(n / batch_size)
    if steps == 0:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {n} examples with drop_remainder=True."
        )
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in [0, {steps}] for this epoch, got {start_step}.")
    if balanced and labels is None:
        labels = source_labels(source)
    order = epoch_order(n, seed, epoch, shuffle, labels if balanced else None)

    def load(position: int) -> dict[str, np.ndarray]:
        index = int(order[position])
        rng = np.random.default_rng([seed, epoch, position, 1]) if augment else None
        return make_example(source[index], index, prep, rng)

    stop = steps * batch_size if drop_remainder else n
    ds = grain.MapDataset.range(start_step * batch_size, stop).map(load)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_stack)
    read = grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=4 * batch_size)
    yield from ds.to_iter_dataset(read)
