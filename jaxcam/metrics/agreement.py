"""Agreement between two saliency maps: rank correlation, SSIM, top-k% IoU.

Used to compare methods (Grad-CAM vs Grad-CAM++) and, in the sanity checks, a
map with the map of a randomised model. All functions are batched over the
leading axis and return one value per image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcam.metrics._common import (
    average_ranks,
    check_maps,
    gaussian_kernel1d,
    saliency_order,
    separable_filter,
)


def _pair(a, b):
    a, b = check_maps(a, "maps_a"), check_maps(b, "maps_b")
    if a.shape != b.shape:
        raise ValueError(f"maps_a {a.shape} and maps_b {b.shape} must have the same shape.")
    return a, b


def pearson(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pearson correlation of two ``(B, N)`` arrays along the last axis; 0 if either is constant."""
    a = a - jnp.mean(a, axis=-1, keepdims=True)
    b = b - jnp.mean(b, axis=-1, keepdims=True)
    num = jnp.sum(a * b, axis=-1)
    den = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0)


def spearman(maps_a, maps_b) -> jax.Array:
    """Spearman rank correlation per image, ``(B,)``.

    Pearson correlation of the pixel ranks, ties given their average rank (as
    ``scipy.stats.spearmanr``). A constant map has no ranking: its correlation
    is reported as 0 (scipy returns NaN), so that an explanation destroyed into
    a constant map counts as uncorrelated.
    """
    a, b = _pair(maps_a, maps_b)
    return _spearman(a, b)


@jax.jit
def _spearman(a, b):
    n = a.shape[0]
    ra = jax.vmap(average_ranks)(a.reshape(n, -1))
    rb = jax.vmap(average_ranks)(b.reshape(n, -1))
    return pearson(ra, rb)


def ssim(
    maps_a,
    maps_b,
    *,
    data_range: float = 1.0,
    sigma: float = 1.5,
    win_size: int = 11,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Mean structural similarity per image, ``(B,)`` (Wang et al. 2004).

    ``SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))``
    with local means, variances and covariance weighted by a ``win_size``
    gaussian window (``sigma`` 1.5, 11 taps), ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``,
    ``L = data_range``, averaged over the positions where the window fits
    ("valid", as Wang's reference code). Variances are the weighted population
    ones (no ``N/(N-1)`` correction). Maps in ``[0, 1]`` -> ``data_range=1``.
    """
    a, b = _pair(maps_a, maps_b)
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd number, got {win_size}.")
    if min(a.shape[1:]) < win_size:
        raise ValueError(
            f"maps of size {a.shape[1:]} are smaller than the SSIM window ({win_size}); "
            "pass a smaller win_size."
        )
    return _ssim(a, b, data_range=float(data_range), sigma=float(sigma), win_size=int(win_size),
                 k1=float(k1), k2=float(k2))


@functools.partial(jax.jit, static_argnames=("data_range", "sigma", "win_size", "k1", "k2"))
def _ssim(a, b, *, data_range, sigma, win_size, k1, k2):
    kernel = gaussian_kernel1d(sigma, (win_size - 1) // 2)
    stack = jnp.stack([a, b, a * a, b * b, a * b], axis=-1)  # (B, H, W, 5)
    f = separable_filter(stack, kernel, "valid")
    mu_a, mu_b = f[..., 0], f[..., 1]
    var_a = f[..., 2] - mu_a**2
    var_b = f[..., 3] - mu_b**2
    cov = f[..., 4] - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return jnp.mean(s, axis=(1, 2))


def top_k_mask(maps, percent: float) -> jax.Array:
    """``(B, H, W)`` bool: the ``round(percent/100 * H*W)`` (at least 1) most salient pixels.

    Ties are broken in raster order, so exactly that many pixels are selected.
    """
    maps = check_maps(maps)
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}.")
    n_pix = maps.shape[1] * maps.shape[2]
    k = max(1, round(percent / 100 * n_pix))
    return saliency_order(maps) < k


def top_k_iou(maps_a, maps_b, percent: float = 20.0) -> jax.Array:
    """IoU of the top-``percent``% regions of two maps, ``(B,)`` in ``[0, 1]``."""
    a, b = _pair(maps_a, maps_b)
    ta, tb = top_k_mask(a, percent), top_k_mask(b, percent)
    return _iou(ta, tb)


@jax.jit
def _iou(ta, tb):
    inter = jnp.sum(ta & tb, axis=(1, 2))
    union = jnp.sum(ta | tb, axis=(1, 2))
    return inter / union
