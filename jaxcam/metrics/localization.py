"""Localization of saliency maps against ground-truth masks or boxes.

- Pointing game (Zhang et al. 2016, "Top-down Neural Attention by Excitation
  Backprop", sec. 5.1): a hit when the map's maximum falls on the object, or
  within ``tolerance`` pixels of it (they use 15 px).
- Energy-based pointing game (Wang et al. 2020, "Score-CAM", sec. 5.2): the
  share of the map's total mass that falls inside the object.
- Multi-instance coverage (images with several objects of the class, e.g.
  several lesions): the fraction of instances that receive a local maximum of
  the map, and the fraction that receive at least a given share of its energy.

Masks are ``(B, H, W)`` (nonzero = object) on the map's grid; several
instances are ``(B, N, H, W)`` (an all-zero slot is padding, not an instance).
Maps are expected non-negative (CAM maps are ReLU'd); they are not clipped.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcam.metrics._common import check_maps


class InstanceCoverage(NamedTuple):
    """Per-instance localization of a batch.

    Attributes:
      peak_fraction: scalar, ``sum(peaks) / sum(valid)`` over the batch.
      energy_fraction: scalar, ``sum(shares >= energy_share) / sum(valid)``.
      peaks: ``(B, N)`` bool, the instance holds a local maximum above threshold.
      shares: ``(B, N)`` share of the map's energy inside each instance.
      valid: ``(B, N)`` bool, the slot holds a non-empty instance.
    """

    peak_fraction: jax.Array
    energy_fraction: jax.Array
    peaks: jax.Array
    shares: jax.Array
    valid: jax.Array


def _check_masks(maps, masks, instances: bool):
    maps = check_maps(maps)
    masks = jnp.asarray(masks)
    want = (maps.shape[0], "N", *maps.shape[1:]) if instances else maps.shape
    ok = (masks.ndim == 4 and masks.shape[0] == maps.shape[0]
          and masks.shape[2:] == maps.shape[1:]) if instances else masks.shape == maps.shape
    if not ok:
        raise ValueError(
            f"masks must have shape {want} to match maps {maps.shape}, got {masks.shape}; "
            "resize the masks to the map size (nearest neighbour) or convert boxes with "
            "boxes_to_masks."
        )
    return maps, masks != 0


def boxes_to_masks(boxes, height: int, width: int) -> jax.Array:
    """Boxes ``(..., 4)`` as ``(y0, x0, y1, x1)`` pixels -> bool masks ``(..., H, W)``.

    The convention of :func:`jaxcam.data.synthetic.make_image` (rows first,
    end-exclusive): a pixel ``(i, j)`` is inside when its centre
    ``(i + 0.5, j + 0.5)`` lies in ``[y0, y1) x [x0, x1)``; with integer corners
    that is rows ``y0 .. y1-1`` and columns ``x0 .. x1-1``. A box with
    ``y1 <= y0`` or ``x1 <= x0`` is empty (use it to pad a variable number of boxes).
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4) as (y0, x0, y1, x1), got {boxes.shape}.")
    cy = jnp.arange(height, dtype=jnp.float32) + 0.5
    cx = jnp.arange(width, dtype=jnp.float32) + 0.5
    y0, x0, y1, x1 = (boxes[..., i, None] for i in range(4))
    rows = (cy >= y0) & (cy < y1)  # (..., H)
    cols = (cx >= x0) & (cx < x1)  # (..., W)
    return rows[..., :, None] & cols[..., None, :]


def instance_masks_from_labels(labels, num_instances: int) -> jax.Array:
    """Instance label images ``(B, H, W)`` -> ``(B, N, H, W)`` bool masks.

    Label 0 is background and label ``k`` (1 .. ``num_instances``) is instance ``k``.
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must have shape (B, H, W), got {labels.shape}.")
    ids = jnp.arange(1, num_instances + 1).reshape(1, -1, 1, 1)
    return labels[:, None] == ids


def pointing_game(maps, masks, *, tolerance: float = 0.0) -> jax.Array:
    """Pointing-game hits ``(B,)`` bool (Zhang et al. 2016).

    Hit when the map's maximum (first in raster order if several pixels tie)
    lies within Euclidean distance ``tolerance`` (pixels) of a mask pixel;
    ``tolerance=0`` asks for the maximum on the mask itself. An empty mask is a miss.
    The accuracy is ``mean(hits)``.
    """
    maps, masks = _check_masks(maps, masks, instances=False)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}.")
    return _pointing(maps, masks, jnp.asarray(tolerance, jnp.float32))


@jax.jit
def _pointing(maps, masks, tolerance):
    b, h, w = maps.shape
    peak = jnp.argmax(maps.reshape(b, -1), axis=1)
    py, px = (peak // w)[:, None, None], (peak % w)[:, None, None]
    ii = jnp.arange(h)[None, :, None]
    jj = jnp.arange(w)[None, None, :]
    near = (ii - py) ** 2 + (jj - px) ** 2 <= tolerance**2
    return jnp.any(masks & near, axis=(1, 2))


@jax.jit
def _energy(maps, masks):
    total = jnp.sum(maps, axis=(-2, -1))
    inside = jnp.sum(jnp.where(masks, maps, 0), axis=(-2, -1))
    return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1), 0.0)


def energy_pointing_game(maps, masks) -> jax.Array:
    """Energy-based pointing game ``(B,)``: ``sum(map * mask) / sum(map)`` (Score-CAM).

    1 when all of the map's mass is on the object; an all-zero map scores 0.
    """
    maps, masks = _check_masks(maps, masks, instances=False)
    return _energy(maps, masks)


def local_maxima(maps, *, threshold: float = 0.5, window: int = 3) -> jax.Array:
    """``(B, H, W)`` bool: pixels that are maxima of their ``window x window``
    neighbourhood and at least ``threshold * max(map)`` (and > 0).

    Every pixel of a flat plateau at the top counts.
    """
    maps = check_maps(maps)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number of pixels, got {window}.")
    if not 0 <= threshold <= 1:
        raise ValueError(
            f"threshold is a fraction of the map's maximum in [0, 1], got {threshold}."
        )
    return _local_maxima(maps, jnp.asarray(threshold, maps.dtype), window)


@functools.partial(jax.jit, static_argnums=2)
def _local_maxima(maps, threshold, window):
    neigh = jax.lax.reduce_window(
        maps, -jnp.inf, jax.lax.max, (1, window, window), (1, 1, 1), "SAME"
    )
    top = jnp.max(maps, axis=(1, 2), keepdims=True)
    return (maps >= neigh) & (maps >= threshold * top) & (maps > 0)


def instance_peaks(maps, instance_masks, *, threshold: float = 0.5, window: int = 3) -> jax.Array:
    """``(B, N)`` bool: instance ``n`` contains a :func:`local_maxima` pixel."""
    maps, inst = _check_masks(maps, instance_masks, instances=True)
    peaks = local_maxima(maps, threshold=threshold, window=window)
    return jnp.any(inst & peaks[:, None], axis=(2, 3))


def instance_energy(maps, instance_masks) -> jax.Array:
    """``(B, N)``: share of each map's total mass inside each instance."""
    maps, inst = _check_masks(maps, instance_masks, instances=True)
    return _energy(maps[:, None], inst)


def instance_coverage(
    maps,
    instance_masks,
    *,
    peak_threshold: float = 0.5,
    window: int = 3,
    energy_share: float = 0.1,
) -> InstanceCoverage:
    """Fraction of instances that get a local maximum / an energy share >= ``energy_share``.

    An instance receives a peak when a local maximum of the map (the largest
    value in its ``window x window`` neighbourhood, at least
    ``peak_threshold * max(map)``) lies inside it. Fractions are pooled over
    the batch (micro average over all valid instances); NaN when no instance.
    """
    maps, inst = _check_masks(maps, instance_masks, instances=True)
    if not 0 <= energy_share <= 1:
        raise ValueError(f"energy_share must be in [0, 1], got {energy_share}.")
    valid = jnp.any(inst, axis=(2, 3))
    peaks = instance_peaks(maps, inst, threshold=peak_threshold, window=window) & valid
    shares = instance_energy(maps, inst)
    n = jnp.sum(valid)
    return InstanceCoverage(
        peak_fraction=jnp.sum(peaks) / n,
        energy_fraction=jnp.sum((shares >= energy_share) & valid) / n,
        peaks=peaks,
        shares=shares,
        valid=valid,
    )
