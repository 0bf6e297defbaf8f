"""Input checks and small array helpers shared by the metric modules."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ScoreFn = Callable[[jax.Array], jax.Array]


def check_maps(maps, name: str = "maps") -> jax.Array:
    """``maps`` as a float array of shape ``(B, H, W)``, else ``ValueError``."""
    maps = jnp.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(
            f"{name} must have shape (B, H, W), got {maps.shape}; "
            "add a batch axis with maps[None] for a single map."
        )
    if not jnp.issubdtype(maps.dtype, jnp.floating):
        maps = maps.astype(jnp.float32)
    return maps


def check_images_and_maps(x, maps) -> tuple[jax.Array, jax.Array]:
    """Model inputs ``(B, H, W, C)`` and maps ``(B, H, W)`` on the same grid."""
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(
            f"images must have shape (B, H, W, C) (normalised model inputs), got {x.shape}."
        )
    maps = check_maps(maps)
    if maps.shape != x.shape[:3]:
        raise ValueError(
            f"maps shape {maps.shape} does not match the images' (B, H, W) = {x.shape[:3]}; "
            "upsample the maps to the input size first (Explanation.maps already are)."
        )
    return x, maps


def check_class_idx(class_idx, batch: int) -> jax.Array:
    """Class indices as int32 ``(B,)``; a scalar is broadcast to the batch."""
    class_idx = jnp.asarray(class_idx)
    if class_idx.ndim == 0:
        class_idx = jnp.broadcast_to(class_idx, (batch,))
    if class_idx.shape != (batch,):
        raise ValueError(
            f"class_idx must be a scalar or have shape ({batch},) (one class per image), "
            f"got {class_idx.shape}."
        )
    if not jnp.issubdtype(class_idx.dtype, jnp.integer):
        raise ValueError(f"class_idx must hold integers, got dtype {class_idx.dtype}.")
    return class_idx.astype(jnp.int32)


def check_score_fn(score_fn: ScoreFn, x: jax.Array) -> int:
    """Trace ``score_fn`` abstractly once: it must map ``(B, H, W, C)`` to ``(B, num_classes)``."""
    if not callable(score_fn):
        raise ValueError(f"score_fn must be callable x -> (B, num_classes), got {score_fn!r}.")
    out = jax.eval_shape(score_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
    if not hasattr(out, "shape") or len(out.shape) != 2 or out.shape[0] != x.shape[0]:
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"score_fn must return one score per class, shape (B, num_classes) = "
            f"({x.shape[0]}, C), got {shape}."
        )
    return int(out.shape[1])


def class_scores(score_fn: ScoreFn, x: jax.Array, class_idx: jax.Array) -> jax.Array:
    """``score_fn(x)[b, class_idx[b]]``, shape ``(B,)``."""
    scores = score_fn(x)
    return jnp.take_along_axis(scores, class_idx[:, None], axis=1)[:, 0]


def average_ranks(values: jax.Array) -> jax.Array:
    """Ranks ``0 .. n-1`` of a 1-D array, ties sharing the mean of their ranks.

    A value's tied group occupies ``[searchsorted(left), searchsorted(right))`` in
    the sorted array, so its average rank is the mid-point of that range — the
    same convention as ``scipy.stats.rankdata(method="average") - 1``.
    """
    s = jnp.sort(values)
    lo = jnp.searchsorted(s, values, side="left")
    hi = jnp.searchsorted(s, values, side="right")
    return (lo + hi - 1).astype(values.dtype) / 2


@jax.jit
def saliency_order(maps: jax.Array) -> jax.Array:
    """Rank of each pixel, 0 = most salient: ``(B, H, W)`` int32, a permutation per image.

    Ties are broken by raster order (stable sort), so the ranks are a
    permutation of ``0 .. H*W-1`` and exactly ``k`` pixels have rank ``< k``.
    """
    b = maps.shape[0]
    flat = maps.reshape(b, -1)
    order = jnp.argsort(-flat, axis=1, stable=True)
    ranks = jnp.argsort(order, axis=1, stable=True)
    return ranks.reshape(maps.shape).astype(jnp.int32)


def gaussian_kernel1d(sigma: float, radius: int) -> np.ndarray:
    """Normalised 1-D gaussian taps ``exp(-t^2 / 2 sigma^2)``, ``t = -radius .. radius``."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}.")
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(t**2) / (2.0 * sigma**2))
    return k / k.sum()  # float64; cast to the images' dtype when applied


def separable_filter(images: jax.Array, kernel: np.ndarray, padding: str) -> jax.Array:
    """Filter ``(B, H, W, C)`` with ``kernel (k,)`` along H then W, per channel.

    ``padding``: ``"reflect"`` (output the input's size, edges mirrored without
    repeating the edge pixel, as ``numpy.pad(mode="reflect")``) or ``"valid"``
    (only the positions where the window fits: ``(H-k+1, W-k+1)``).
    """
    r = (len(kernel) - 1) // 2
    if padding == "reflect":
        images = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    elif padding != "valid":
        raise ValueError(f"padding must be 'reflect' or 'valid', got {padding!r}.")
    c = images.shape[-1]
    k = jnp.asarray(kernel, images.dtype)
    dn = ("NHWC", "HWIO", "NHWC")
    kh = jnp.tile(k[:, None, None, None], (1, 1, 1, c))
    kw = jnp.tile(k[None, :, None, None], (1, 1, 1, c))
    out = jax.lax.conv_general_dilated(
        images, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )
    return jax.lax.conv_general_dilated(
        out, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )


def gaussian_blur(images, sigma: float = 5.0, radius: int | None = None) -> jax.Array:
    """Gaussian blur of ``(B, H, W, C)`` images, reflect padding, same size out.

    ``radius`` defaults to ``ceil(2 * sigma)``; RISE (Petsiuk et al. 2018) blurs
    its insertion start with an 11-tap kernel of sigma 5 (``radius=5``).
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, H, W, C), got {images.shape}.")
    radius = int(np.ceil(2 * sigma)) if radius is None else int(radius)
    if radius >= min(images.shape[1:3]):
        raise ValueError(
            f"blur radius {radius} must be smaller than the image side "
            f"{min(images.shape[1:3])}; pass a smaller radius or sigma."
        )
    return _blur(images, float(sigma), radius)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _blur(images, sigma, radius):
    return separable_filter(images, gaussian_kernel1d(sigma, radius), "reflect")
