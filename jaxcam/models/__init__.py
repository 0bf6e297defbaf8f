"""Flax ResNet-50, VGG19, EfficientNet-B0 and ViT-B/16 (plus ViT-S/16, ViT-Ti/16) with
torchvision's architectures, cut at named layers into `features` (image -> activations) and `head`
(activations -> logits), and adapters that make a user's own linen / NNX module or
plain JAX functions explainable. See docs/models.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxcam.models.adapters import (
    FunctionsModel,
    LinenModel,
    NNXModel,
    from_functions,
    from_linen,
    from_nnx,
    tokens_to_grid,
)
from jaxcam.models.base import Model, Stage, leaf_shapes, variables_mismatch
from jaxcam.models.efficientnet import efficientnet_b0
from jaxcam.models.resnet import resnet50
from jaxcam.models.vgg import vgg19
from jaxcam.models.vit import ViTModel, vit_b_16, vit_s_16, vit_ti_16

ARCHS: dict[str, Callable[[int], Model]] = {
    "resnet50": resnet50,
    "vgg19": vgg19,
    "efficientnet_b0": efficientnet_b0,
    "vit_b_16": vit_b_16,
    "vit_s_16": vit_s_16,
    "vit_ti_16": vit_ti_16,
}


def get(arch: str, num_classes: int = 1000) -> Model:
    """The model called `arch` (a key of `ARCHS`: "resnet50", "vgg19", "efficientnet_b0",
    "vit_b_16", "vit_s_16", "vit_ti_16")."""
    try:
        build = ARCHS[arch]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}"
        ) from None
    return build(num_classes)


def guess_variables_arch(variables: Any) -> str | None:
    """The jaxcam architecture whose variable paths ``variables`` share most (None when
    none shares most of them); the classifier width is ignored."""
    got = set(leaf_shapes(variables))
    if not got:
        return None
    best, best_score = None, 0.0
    for arch in ARCHS:
        want = set(leaf_shapes(get(arch, 10).abstract_variables()))
        score = len(got & want) / len(got | want)
        if score > best_score:
            best, best_score = arch, score
    return best if best_score > 0.5 else None


def check_variables(model: Any, variables: Any) -> None:
    """ValueError naming what is missing, unexpected or mis-shaped when ``variables``
    do not belong to ``model`` (and which architecture they look like). Models
    without ``abstract_variables`` are not checked."""
    abstract = getattr(model, "abstract_variables", None)
    if abstract is None:
        return
    missing, unexpected, shapes = variables_mismatch(abstract(), variables)
    if not (missing or unexpected or shapes):
        return
    parts = [f"{name} ({len(items)}): {', '.join(items[:8])}{', ...' if len(items) > 8 else ''}"
             for name, items in (("missing", missing), ("unexpected", unexpected),
                                 ("shape mismatches", shapes)) if items]
    arch = getattr(model, "arch", type(model).__name__)
    looks = guess_variables_arch(variables) if (missing or unexpected) else None
    hint = (f" They look like the variables of a {looks}: build that model "
            f"(jaxcam.get({looks!r}, ...)) or load its weights." if looks and looks != arch
            else "")
    raise ValueError(
        f"variables do not belong to this {arch} (num_classes="
        f"{getattr(model, 'num_classes', None)}): " + "; ".join(parts) + "." + hint
        + " Pass the variables returned by model.init, training or jaxcam.load for the "
        "same model."
    )


__all__ = [
    "layer_for_image_size",
    "ARCHS",
    "FunctionsModel",
    "LinenModel",
    "Model",
    "NNXModel",
    "Stage",
    "check_variables",
    "ViTModel",
    "efficientnet_b0",
    "from_functions",
    "from_linen",
    "from_nnx",
    "get",
    "guess_variables_arch",
    "resnet50",
    "tokens_to_grid",
    "vgg19",
    "vit_b_16",
    "vit_s_16",
    "vit_ti_16",
]


def layer_for_image_size(model: Any, variables: Any, image_size: int, *,
                         min_map_size: int = 4) -> str:
    """The model's default layer, unless its map would be coarser than ``min_map_size``
    x ``min_map_size`` at ``image_size`` px; then the deepest cut point before it whose
    map is at least that fine (ResNet-50's ``layer4`` is 2x2 at 64 px: one pixel per
    quadrant cannot point at a lesion; ``layer3`` is 4x4). Shapes only
    (``jax.eval_shape``): nothing is computed."""
    import jax
    import numpy as np

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)

    def side(name: str) -> int:
        grid = jax.eval_shape(lambda v, x: model.to_grid(model.features(v, x, name), name),
                              variables, x)
        return min(grid.shape[1:3])  # on the map's grid: tokens too

    if side(model.default_layer) >= min_map_size:
        return model.default_layer
    before = model.layers[: model.layers.index(model.default_layer)]
    return next((name for name in reversed(before) if side(name) >= min_map_size),
                model.default_layer)
