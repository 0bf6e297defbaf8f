"""Sanity checks for saliency maps: cascading model-parameter randomisation.

Adebayo et al. 2018, "Sanity Checks for Saliency Maps" (NeurIPS), sec. 3.1:
re-initialise the model's parameters from the output layer towards the input,
one more group at a time, and compare each randomised model's map with the
original map. A method whose maps stay similar does not depend on what the
model learned. Similarity is measured by Spearman rank correlation and SSIM
(both in :mod:`jaxcam.metrics.agreement`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcam.metrics.agreement import spearman, ssim


class SanityResult(NamedTuple):
    """Cascading randomisation, one row per step.

    Attributes:
      layers: ``(S,)`` parameter group re-initialised at each step; step ``s`` has
        the groups ``layers[:s+1]`` (head first) randomised.
      spearman: ``(S, B)`` rank correlation of the step's maps with the original.
      ssim: ``(S, B)`` SSIM of the (min-max normalised) maps with the original.
      maps: ``(S+1, B, H, W)`` the original maps, then each step's maps.
    """

    layers: tuple[str, ...]
    spearman: jax.Array
    ssim: jax.Array
    maps: jax.Array


def _as_maps(out) -> jax.Array:
    maps = jnp.asarray(getattr(out, "maps", out))
    if maps.ndim != 3:
        raise ValueError(
            f"explain_fn must return maps of shape (B, H, W) (or an Explanation), got {maps.shape}."
        )
    return maps


def _minmax(maps: jax.Array) -> jax.Array:
    lo = jnp.min(maps, axis=(1, 2), keepdims=True)
    span = jnp.max(maps, axis=(1, 2), keepdims=True) - lo
    return jnp.where(span > 0, (maps - lo) / jnp.where(span > 0, span, 1), 0.0)


def _parameter_groups(variables: Any) -> tuple[Mapping[str, Any], Callable[[dict], Any]]:
    """``(groups, rebuild)``: the top-level parameter groups and how to put a changed
    copy back: ``variables["params"]`` for linen-style dicts, the state itself for NNX."""
    if isinstance(variables, Mapping) and "params" in variables:
        return variables["params"], lambda new: {**variables, "params": dict(new)}
    if type(variables).__name__ == "State" and isinstance(variables, Mapping):
        return variables, lambda new: type(variables)(dict(new))
    raise ValueError("variables must be a dict with a 'params' collection or an nnx.State.")


def cascading_randomization(
    model: Any,
    variables: dict,
    images,
    explain_fn: Callable[[dict, jax.Array], Any],
    *,
    rng: jax.Array,
    init_fn: Callable[[jax.Array], dict] | None = None,
    absolute: bool = True,
) -> SanityResult:
    """Cascading model-parameter randomisation (Adebayo et al. 2018).

    Walks ``model.param_order`` (top-level keys of ``variables["params"]``, or of
    an NNX state, input -> output) backwards: at step ``s`` the last ``s + 1``
    groups hold freshly initialised parameters (from ``init_fn(rng)``, by default
    ``model.init(rng, image_size=H)``), the rest keep the trained ones. Other
    collections (``batch_stats``) are kept, as in the paper; an NNX state keeps
    a module's batch statistics inside its group, so they are re-initialised
    with it.

    Args:
      model: anything with ``param_order`` (and ``init`` unless ``init_fn`` is given).
      variables: the trained ``{"params": ..., ...}`` (linen / jaxcam models) or
        ``nnx.State`` (``jaxcam.models.from_nnx``; pass ``init_fn``).
      images: ``(B, H, W, 3)`` normalised inputs.
      explain_fn: ``(variables, images) -> (B, H, W)`` maps or an Explanation, e.g.
        ``lambda v, x: jaxcam.explain(model, v, x, method="gradcam", class_idx=c)``.
        Fix the class (``class_idx``) if the maps should explain the same class
        throughout; otherwise each randomised model explains its own prediction.
      rng: PRNG key for the re-initialisation.
      init_fn: ``rng -> variables`` with the same structure as ``variables``.
      absolute: compare ``|map|`` (Adebayo et al.'s default); CAM maps are >= 0 anyway.

    Returns:
      :class:`SanityResult`. Spearman is invariant to the normalisation; SSIM is
      computed on maps min-max normalised to ``[0, 1]`` per image.
    """
    order = getattr(model, "param_order", None)
    if not order:
        raise ValueError(
            "model must define param_order (the top-level parameter groups, input -> output) "
            "for cascading randomisation."
        )
    params, rebuild = _parameter_groups(variables)
    missing = [g for g in order if g not in params]
    if missing:
        raise ValueError(
            f"param_order names {missing}, which are not parameter groups of the variables "
            f"(keys: {sorted(params)})."
        )
    images = jnp.asarray(images)
    if init_fn is None:
        if not hasattr(model, "init"):
            raise ValueError(
                "model has no init(rng, image_size=...); pass init_fn=rng -> variables."
            )
        fresh = model.init(rng, image_size=images.shape[1])
    else:
        fresh = init_fn(rng)
    fresh_params = _parameter_groups(fresh)[0]
    for g in order:
        if g not in fresh_params:
            raise ValueError(f"the re-initialised variables have no parameter group {g!r}.")
        a = jax.tree_util.tree_structure(params[g])
        b = jax.tree_util.tree_structure(fresh_params[g])
        if a != b:
            raise ValueError(f"re-initialised group {g!r} differs in structure from the original.")

    post = jnp.abs if absolute else (lambda m: m)
    original = post(_as_maps(explain_fn(variables, images)))
    current = dict(params)
    all_maps, rhos, ssims = [original], [], []
    layers = tuple(reversed(order))
    ref01 = _minmax(original)
    for g in layers:
        current[g] = fresh_params[g]
        maps = post(_as_maps(explain_fn(rebuild(current), images)))
        if maps.shape != original.shape:
            raise ValueError(f"explain_fn returned {maps.shape}, expected {original.shape}.")
        all_maps.append(maps)
        rhos.append(spearman(original, maps))
        ssims.append(ssim(ref01, _minmax(maps)))
    return SanityResult(layers, jnp.stack(rhos), jnp.stack(ssims), jnp.stack(all_maps))
