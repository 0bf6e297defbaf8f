"""Confidence-based faithfulness: Average Drop, Increase in Confidence, Win %.

Chattopadhyay et al. 2018, "Grad-CAM++: Improved Visual Explanations for Deep
Convolutional Networks", sec. 6.1. The explanation map ``E = M * I`` keeps the
image where the saliency map ``M`` (in ``[0, 1]``) is high; a faithful map keeps
the evidence, so the model's confidence ``O_c = score(E)_c`` should stay close to
the confidence ``Y_c = score(I)_c`` on the full image.

``score_fn`` should return probabilities (softmax): Average Drop divides by
``Y_c`` and is only meaningful for positive scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcam.metrics._common import (
    ScoreFn,
    check_class_idx,
    check_images_and_maps,
    check_score_fn,
    class_scores,
)


class ConfidenceScores(NamedTuple):
    """Class scores ``(B,)`` on the full image (``original``, ``Y``) and on ``E = M * I``
    (``explained``, ``O``)."""

    original: jax.Array
    explained: jax.Array


def explanation_images(x, maps, baseline=0.0) -> jax.Array:
    """``E = M * x + (1 - M) * baseline``, shape ``(B, H, W, C)``.

    With the default ``baseline=0`` this is the paper's ``E = L * I``. Note that
    ``x`` is a *normalised* model input, so 0 is the dataset mean colour, not black
    (pytorch-grad-cam makes the same choice); pass ``baseline`` = the normalised
    value of black to mask to black instead.
    """
    x, maps = check_images_and_maps(x, maps)
    m = maps[..., None].astype(x.dtype)
    return m * x + (1 - m) * jnp.asarray(baseline, x.dtype)


def confidence_scores(
    score_fn: ScoreFn, x, maps, class_idx, *, baseline=0.0
) -> ConfidenceScores:
    """Scores ``Y = score_fn(x)[c]`` and ``O = score_fn(M * x)[c]`` per image.

    Args:
      score_fn: ``(B, H, W, C) -> (B, num_classes)`` probabilities.
      x: normalised images ``(B, H, W, C)``.
      maps: saliency maps ``(B, H, W)`` in ``[0, 1]`` (``Explanation.maps``).
      class_idx: ``(B,)`` (or a scalar) class explained in each image.
      baseline: value the masked-out part of the image fades to (see
        :func:`explanation_images`).
    """
    x, maps = check_images_and_maps(x, maps)
    class_idx = check_class_idx(class_idx, x.shape[0])
    check_score_fn(score_fn, x)
    both = jnp.concatenate([x, explanation_images(x, maps, baseline)], axis=0)
    s = class_scores(score_fn, both, jnp.concatenate([class_idx, class_idx]))
    b = x.shape[0]
    return ConfidenceScores(original=s[:b], explained=s[b:])


def drop(scores: ConfidenceScores) -> jax.Array:
    """Per-image relative drop ``max(0, Y - O) / Y``, ``(B,)``."""
    y, o = scores
    return jnp.maximum(0.0, y - o) / y


def average_drop(score_fn: ScoreFn, x, maps, class_idx, *, baseline=0.0) -> jax.Array:
    """Average Drop % ``= 100 * mean_i max(0, Y_i - O_i) / Y_i`` (lower is better).

    A map of ones gives ``E = x`` and an Average Drop of exactly 0.
    """
    return 100.0 * jnp.mean(drop(confidence_scores(score_fn, x, maps, class_idx,
                                                   baseline=baseline)))


def increase_in_confidence(score_fn: ScoreFn, x, maps, class_idx, *, baseline=0.0) -> jax.Array:
    """% Increase in Confidence ``= 100 * mean_i [Y_i < O_i]`` (higher is better)."""
    y, o = confidence_scores(score_fn, x, maps, class_idx, baseline=baseline)
    return 100.0 * jnp.mean((y < o).astype(jnp.float32))


def win_percentage(drops: Mapping[str, jax.Array], *, tie_tolerance: float = 0.0
                   ) -> dict[str, jax.Array]:
    """Win % of each method: the share of images on which its drop is the lowest.

    ``drops`` maps a method name to its per-image drops ``(B,)`` (from
    :func:`drop`). With two methods this is the paper's Win % ("the number of
    times the fall in confidence for method A's map is less than for method B's").
    Every method whose drop is within ``tie_tolerance`` of an image's lowest drop
    ties for it; an image with ``k`` tied winners counts ``1/k`` for each, so the
    percentages sum to 100. A small tolerance (e.g. ``1e-4``) keeps float noise
    between mathematically equal maps (Grad-CAM and CAM on a GAP + dense head)
    from deciding the winner.
    """
    if len(drops) < 2:
        raise ValueError(f"win_percentage compares at least two methods, got {list(drops)}.")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}.")
    names = list(drops)
    d = jnp.stack([jnp.asarray(drops[n]) for n in names])  # (M, B)
    if d.ndim != 2:
        raise ValueError(f"each entry of drops must have shape (B,), got {d.shape[1:]}.")
    best = d <= jnp.min(d, axis=0, keepdims=True) + tie_tolerance
    share = best / jnp.sum(best, axis=0, keepdims=True)
    pct = 100.0 * jnp.mean(share, axis=1)
    return {n: pct[i] for i, n in enumerate(names)}


def confidence_metrics(
    score_fn: ScoreFn, x, maps: Mapping[str, jax.Array], class_idx, *, baseline=0.0
) -> dict[str, dict[str, jax.Array]]:
    """Average Drop %, % Increase in Confidence and (for >= 2 methods) Win % per method.

    ``maps`` maps a method name to its ``(B, H, W)`` maps; ``Y`` is computed once.
    Returns ``{name: {"average_drop", "increase_in_confidence"[, "win"]}}``.
    """
    if not maps:
        raise ValueError("maps is empty; give {method name: (B, H, W) maps}.")
    names = list(maps)
    x, _ = check_images_and_maps(x, maps[names[0]])
    class_idx = check_class_idx(class_idx, x.shape[0])
    check_score_fn(score_fn, x)
    # One score_fn call per method keeps the batch (and the memory) at B images.
    y = class_scores(score_fn, x, class_idx)
    explained = [
        class_scores(score_fn, explanation_images(x, maps[n], baseline), class_idx)
        for n in names
    ]
    out: dict[str, dict[str, jax.Array]] = {}
    drops = {}
    for i, n in enumerate(names):
        s = ConfidenceScores(y, explained[i])
        drops[n] = drop(s)
        out[n] = {
            "average_drop": 100.0 * jnp.mean(drops[n]),
            "increase_in_confidence": 100.0 * jnp.mean((y < s.explained).astype(jnp.float32)),
        }
    if len(names) >= 2:
        for n, w in win_percentage(drops).items():
            out[n]["win"] = w
    return out
