"""Flax ResNet-50, VGG19, EfficientNet-B0 and ViT-B/16 (plus ViT-S/16, ViT-Ti/16) with
torchvision's architectures, cut at named layers into `features` (image -> activations) and `head`
(activations -> logits), and adapters that make a user's own linen / NNX module or
plain JAX functions explainable. See docs/models.md."""

from __future__ import annotations

from collections.abc import Callable

from jaxcam.models.adapters import (
    FunctionsModel,
    LinenModel,
    NNXModel,
    from_functions,
    from_linen,
    from_nnx,
    tokens_to_grid,
)
from jaxcam.models.base import Model, Stage
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


__all__ = [
    "ARCHS",
    "FunctionsModel",
    "LinenModel",
    "Model",
    "NNXModel",
    "Stage",
    "ViTModel",
    "efficientnet_b0",
    "from_functions",
    "from_linen",
    "from_nnx",
    "get",
    "resnet50",
    "tokens_to_grid",
    "vgg19",
    "vit_b_16",
    "vit_s_16",
    "vit_ti_16",
]
