"""Perturbation faithfulness: insertion / deletion curves (RISE) and ROAD.

- Deletion and insertion (Petsiuk et al. 2018, "RISE: Randomized Input
  Sampling for Explanation of Black-box Models", sec. 4.2): replace pixels in
  order of decreasing saliency and record the class score after every ``step``
  pixels. Deletion starts from the image and replaces pixels by a baseline (a
  faithful map makes the score fall fast: low AUC is good); insertion starts
  from a blurred image and puts the original pixels back (high AUC is good).
- ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
  Attribution Methods", ICML): remove a percentage of the most (MoRF) or least
  (LeRF) relevant pixels and fill them by *noisy linear imputation*, which
  leaks far less of the removed shape than a constant baseline. Low MoRF and
  high LeRF scores are good.

Every perturbed batch is built and scored inside ``jax.lax.map`` over chunks of
``chunk_size`` steps (one ``score_fn`` call sees ``chunk_size * B`` images), so
memory is bounded and the whole loop is one compiled program. The functions
are traceable: wrap them in ``jax.jit`` (with ``functools.partial`` fixing
``score_fn`` and the options) to reuse the compiled program across batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcam.metrics._common import (
    ScoreFn,
    check_class_idx,
    check_images_and_maps,
    check_score_fn,
    class_scores,
    gaussian_blur,
    saliency_order,
)

BASELINES = ("zeros", "mean", "blur")


class PerturbationCurve(NamedTuple):
    """A deletion or insertion curve.

    Attributes:
      fractions: ``(S+1,)`` fraction of pixels replaced (deletion) or inserted
        (insertion) at each point, from 0 to 1.
      scores: ``(B, S+1)`` class score after each step.
      auc: ``(B,)`` trapezoidal area under ``scores`` over ``fractions``.
    """

    fractions: jax.Array
    scores: jax.Array
    auc: jax.Array


class RoadCurves(NamedTuple):
    """ROAD scores at each removal percentage.

    Attributes:
      percentages: ``(P,)`` percent of pixels removed and imputed.
      morf: ``(B, P)`` class score after removing the most relevant pixels first.
      lerf: ``(B, P)`` class score after removing the least relevant pixels first.
    """

    percentages: jax.Array
    morf: jax.Array
    lerf: jax.Array


def auc(scores, fractions=None) -> jax.Array:
    """Trapezoidal area under ``scores`` (last axis) over ``fractions`` in ``[0, 1]``.

    ``fractions`` defaults to ``S`` evenly spaced points from 0 to 1 (RISE's
    ``(sum(s) - s[0]/2 - s[-1]/2) / (S - 1)``). A constant curve ``c`` has area ``c``.
    """
    scores = jnp.asarray(scores)
    n = scores.shape[-1]
    if n < 2:
        raise ValueError(f"a curve needs at least 2 points, got {n}.")
    if fractions is None:
        fractions = jnp.linspace(0.0, 1.0, n, dtype=scores.dtype)
    fractions = jnp.asarray(fractions, scores.dtype)
    if fractions.shape != (n,):
        raise ValueError(f"fractions must have shape ({n},), got {fractions.shape}.")
    widths = jnp.diff(fractions)
    return jnp.sum(widths * (scores[..., 1:] + scores[..., :-1]) / 2, axis=-1)


def baseline_images(x, baseline="zeros", *, blur_sigma: float = 5.0,
                    blur_radius: int | None = 5) -> jax.Array:
    """The image pixels are replaced by, ``(B, H, W, C)``.

    ``baseline``: ``"zeros"`` (0 in normalised space: the dataset mean colour,
    RISE's choice), ``"mean"`` (each image's per-channel mean), ``"blur"``
    (gaussian blur, ``blur_sigma`` / ``blur_radius``; RISE uses sigma 5, 11 taps),
    or an array broadcastable to ``x``.
    """
    x = jnp.asarray(x)
    if isinstance(baseline, str):
        if baseline == "zeros":
            return jnp.zeros_like(x)
        if baseline == "mean":
            return jnp.broadcast_to(jnp.mean(x, axis=(1, 2), keepdims=True), x.shape)
        if baseline == "blur":
            return gaussian_blur(x, blur_sigma, blur_radius)
        raise ValueError(
            f"unknown baseline {baseline!r}; use one of {BASELINES} or an array "
            "broadcastable to the images."
        )
    try:
        return jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)
    except ValueError:
        raise ValueError(
            f"baseline of shape {jnp.shape(baseline)} does not broadcast to the images "
            f"{x.shape}."
        ) from None


def _scores_over(
    score_fn: ScoreFn,
    make_images: Callable[[jax.Array], jax.Array],
    n: int,
    class_idx: jax.Array,
    chunk_size: int,
) -> jax.Array:
    """``(n, B)``: class scores of ``make_images(i)`` (a ``(B, H, W, C)`` batch), i < n.

    ``lax.map`` over chunks of ``chunk_size`` indices; within a chunk the
    batches are built with ``vmap`` and scored in one ``score_fn`` call.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)
    # Padding repeats the last index; the extra scores are sliced off.
    idx = jnp.minimum(jnp.arange(n_chunks * chunk), n - 1).reshape(n_chunks, chunk)
    b = class_idx.shape[0]

    def score_chunk(ids):
        imgs = jax.vmap(make_images)(ids)  # (chunk, B, H, W, C)
        s = class_scores(score_fn, imgs.reshape(chunk * b, *imgs.shape[2:]),
                         jnp.tile(class_idx, chunk))
        return s.reshape(chunk, b)

    return jax.lax.map(score_chunk, idx).reshape(n_chunks * chunk, b)[:n]


def _curve(score_fn, start, finish, maps, class_idx, step, chunk_size) -> PerturbationCurve:
    b, h, w = maps.shape
    n_pix = h * w
    step = w if step is None else int(step)
    if not 1 <= step <= n_pix:
        raise ValueError(f"step must be between 1 and H*W = {n_pix} pixels, got {step}.")
    n_steps = -(-n_pix // step)
    counts = jnp.minimum(jnp.arange(n_steps + 1) * step, n_pix)
    ranks = saliency_order(maps)

    def make(i):
        replaced = (ranks < counts[i])[..., None]
        return jnp.where(replaced, finish, start)

    scores = _scores_over(score_fn, make, n_steps + 1, class_idx, chunk_size).T
    fractions = counts.astype(scores.dtype) / n_pix
    return PerturbationCurve(fractions, scores, auc(scores, fractions))


def deletion(
    score_fn: ScoreFn,
    x,
    maps,
    class_idx,
    *,
    step: int | None = None,
    baseline="zeros",
    blur_sigma: float = 5.0,
    chunk_size: int = 16,
) -> PerturbationCurve:
    """Deletion curve and AUC (RISE): lower is better.

    Point ``k`` of the curve is ``score_fn(x_k)[c]`` where ``x_k`` has its
    ``min(k * step, H*W)`` most salient pixels (all channels) replaced by the
    baseline, ``k = 0 .. ceil(H*W / step)``. Ties in the map are broken in
    raster order.

    Args:
      score_fn: ``(N, H, W, C) -> (N, num_classes)``, probabilities recommended
        (RISE uses softmax); any batch size ``N`` must work.
      x: normalised images ``(B, H, W, C)``.
      maps: saliency ``(B, H, W)``; only the ranking of pixels matters.
      class_idx: ``(B,)`` or a scalar.
      step: pixels replaced per step; default ``W`` (RISE: 224 at 224 px).
      baseline: see :func:`baseline_images` (``"zeros"``, ``"mean"``, ``"blur"``, array).
      blur_sigma: sigma of the ``"blur"`` baseline.
      chunk_size: steps scored per ``score_fn`` call (``chunk_size * B`` images);
        lower it to bound memory.
    """
    x, maps = check_images_and_maps(x, maps)
    class_idx = check_class_idx(class_idx, x.shape[0])
    check_score_fn(score_fn, x)
    finish = baseline_images(x, baseline, blur_sigma=blur_sigma)
    return _curve(score_fn, x, finish, maps, class_idx, step, chunk_size)


def insertion(
    score_fn: ScoreFn,
    x,
    maps,
    class_idx,
    *,
    step: int | None = None,
    baseline="blur",
    blur_sigma: float = 5.0,
    chunk_size: int = 16,
) -> PerturbationCurve:
    """Insertion curve and AUC (RISE): higher is better.

    Point ``k`` is the score of the ``baseline`` image (default: ``x`` blurred,
    sigma 5, 11 taps, as RISE) with its ``min(k * step, H*W)`` most salient pixels
    restored from ``x``; the last point is ``score_fn(x)[c]``. Arguments as
    :func:`deletion` (``baseline``: the perturbation baseline, the image insertion
    starts from and deletion ends at).
    """
    x, maps = check_images_and_maps(x, maps)
    class_idx = check_class_idx(class_idx, x.shape[0])
    check_score_fn(score_fn, x)
    begin = baseline_images(x, baseline, blur_sigma=blur_sigma)
    return _curve(score_fn, begin, x, maps, class_idx, step, chunk_size)


# --- ROAD ------------------------------------------------------------------

# Rong et al.'s neighbour weights: 1/6 for the 4 direct neighbours, 1/12 for
# the diagonals (their NoisyLinearImputer).
ROAD_NEIGHBOURS: tuple[tuple[int, int, float], ...] = (
    (1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
    (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6),
)


def _neighbour_sum(u: jax.Array) -> jax.Array:
    """``sum_o w_o u[p + o]`` over the 8 neighbours, zero outside the image; ``u (H, W)``."""
    h, w = u.shape
    p = jnp.pad(u, 1)
    out = jnp.zeros_like(u)
    for dy, dx, wt in ROAD_NEIGHBOURS:
        out = out + wt * p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return out


def _impute_channel(img: jax.Array, missing: jax.Array, tol: float, maxiter: int) -> jax.Array:
    """Solve the imputation system for one ``(H, W)`` channel (see :func:`noisy_linear_impute`)."""
    m = missing.astype(img.dtype)
    known = 1 - m
    degree = _neighbour_sum(jnp.ones_like(img))  # sum of in-image neighbour weights

    def op(u):  # SPD: (D - W) on the missing pixels, identity on the known ones
        return m * (degree * u - _neighbour_sum(m * u)) + known * u

    rhs = m * _neighbour_sum(known * img)
    n_known = jnp.maximum(jnp.sum(known), 1)
    x0 = m * jnp.sum(known * img) / n_known  # start from the mean of the known pixels
    precond = lambda r: r * (m / degree + known)
    u, _ = jax.scipy.sparse.linalg.cg(op, rhs, x0=x0, tol=tol, maxiter=maxiter, M=precond)
    return known * img + m * u


@functools.partial(jax.jit, static_argnames=("tol", "maxiter"))
def _impute_batch(images, missing, *, tol: float, maxiter: int):
    """Noise-free imputation of ``(B, H, W, C)``; each image and channel solved on its own."""
    per_channel = jax.vmap(_impute_channel, in_axes=(-1, None, None, None), out_axes=-1)
    return jax.vmap(per_channel, in_axes=(0, 0, None, None))(images, missing, tol, maxiter)


def noisy_linear_impute(
    images,
    missing,
    *,
    noise: float = 0.01,
    rng: jax.Array | None = None,
    tol: float = 1e-6,
    maxiter: int | None = None,
) -> jax.Array:
    """ROAD's noisy linear imputation of the ``missing`` pixels of ``images``.

    Each missing pixel ``p`` takes the weighted mean of its in-image 8
    neighbours (weights 1/6 direct, 1/12 diagonal, :data:`ROAD_NEIGHBOURS`),
    whether those are known or themselves imputed:
    ``D_p v_p - sum_{q missing} w_pq v_q = sum_{q known} w_pq x_q``, with ``D_p``
    the sum of the in-image neighbour weights. Rong et al. solve this sparse
    system with ``scipy.sparse.linalg.spsolve``; here it is solved exactly (to
    ``tol``) inside jit by Jacobi-preconditioned conjugate gradients on the
    matrix-free operator, which is symmetric positive definite whenever every
    connected hole touches a known pixel. Each channel is solved separately.
    A linear ramp with an interior hole is reproduced exactly (discrete
    harmonic functions are their neighbours' weighted mean). Then gaussian noise
    of standard deviation ``noise`` is added to the imputed pixels only (known
    pixels are untouched; ``noise=0`` or ``rng=None`` adds none).

    Args:
      images: ``(B, H, W, C)``.
      missing: ``(B, H, W)`` bool, True where a pixel is removed.
      noise: standard deviation of the added noise (in ``images`` units).
      rng: PRNG key for the noise; ``None`` means no noise.
      tol: relative residual tolerance of conjugate gradients.
      maxiter: CG iteration cap; default ``4 * (H + W)``.
    """
    images = jnp.asarray(images)
    missing = jnp.asarray(missing)
    if images.ndim != 4 or missing.shape != images.shape[:3]:
        raise ValueError(
            f"images must be (B, H, W, C) and missing (B, H, W) on the same grid; got "
            f"{images.shape} and {missing.shape}."
        )
    h, w = images.shape[1:3]
    maxiter = 4 * (h + w) if maxiter is None else int(maxiter)
    out = _impute_batch(images, missing, tol=float(tol), maxiter=maxiter)
    if rng is not None and noise > 0:
        eps = noise * jax.random.normal(rng, images.shape, images.dtype)
        out = out + missing[..., None].astype(images.dtype) * eps
    return out


def road(
    score_fn: ScoreFn,
    x,
    maps,
    class_idx,
    *,
    percentages: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    noise: float = 0.01,
    rng: jax.Array | None = None,
    chunk_size: int = 4,
    tol: float = 1e-6,
    maxiter: int | None = None,
) -> RoadCurves:
    """ROAD, Remove And Debias (Rong et al. 2022): MoRF and LeRF curves.

    For each percentage ``p`` the ``round(p/100 * H*W)`` most (MoRF) or least
    (LeRF) salient pixels are removed and filled by :func:`noisy_linear_impute`
    (noise drawn from ``rng``, independent per percentage and order), and the
    class score of the imputed image is recorded. A faithful map gives a low
    MoRF and a high LeRF curve; ``auc``-style summaries are the means over
    percentages. ``chunk_size`` counts (order, percentage) pairs per ``score_fn``
    call; the imputation runs inside the same chunked loop.
    """
    x, maps = check_images_and_maps(x, maps)
    class_idx = check_class_idx(class_idx, x.shape[0])
    check_score_fn(score_fn, x)
    pct = np.asarray(percentages, dtype=np.float64)
    if pct.ndim != 1 or pct.size == 0 or pct.min() < 0 or pct.max() > 100:
        raise ValueError(
            f"percentages must be a non-empty list of values in [0, 100], got {percentages}."
        )
    n_pix = x.shape[1] * x.shape[2]
    counts = jnp.asarray(np.round(pct / 100 * n_pix).astype(np.int32))
    n_p = len(pct)
    ranks = saliency_order(maps)
    key = jax.random.PRNGKey(0) if rng is None else rng
    use_noise = rng is not None and noise > 0

    def make(i):  # i < P: MoRF at percentage i; i >= P: LeRF at percentage i - P
        lerf = i >= n_p
        c = counts[i % n_p]
        remove = jnp.where(lerf, ranks >= n_pix - c, ranks < c)
        return noisy_linear_impute(
            x, remove, noise=noise if use_noise else 0.0,
            rng=jax.random.fold_in(key, i) if use_noise else None, tol=tol, maxiter=maxiter,
        )

    scores = _scores_over(score_fn, make, 2 * n_p, class_idx, chunk_size)  # (2P, B)
    return RoadCurves(jnp.asarray(pct, scores.dtype), scores[:n_p].T, scores[n_p:].T)
