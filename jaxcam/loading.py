"""One entry point for every model jaxcam can explain: :func:`load`.

``load(path)`` accepts a jaxcam checkpoint directory (``jaxcam.checkpoint``,
made by ``jaxcam convert`` or by training) or a torchvision or timm weights file
(``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``, told apart by its keys), and returns a
:class:`LoadedModel`: the model, its variables, the class names and the
preprocessing its inputs need. ``explain``, the CLI and the experiments call it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxcam.preprocessing import Preprocessing

CHECKPOINT_HINT = (
    "make one with `jaxcam convert WEIGHTS OUT_DIR --arch resnet50` "
    "(see docs/weights.md for getting torchvision weights)"
)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to explain.

    Attributes:
      model: a ``jaxcam.models.Model`` (``.arch``, ``.num_classes``, ``features``, ``head``).
      variables: ``{"params": ..., "batch_stats": ...}`` (VGG19: params only).
      class_names: one name per output, or None when unknown (torchvision files).
      preprocessing: how raw images become inputs (``jaxcam.preprocessing.preprocess``).
    """

    model: Any
    variables: Any = field(repr=False)
    class_names: tuple[str, ...] | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


def load(
    path: str | os.PathLike, arch: str | None = None, num_classes: int | None = None
) -> LoadedModel:
    """Load a jaxcam checkpoint directory or a torchvision / timm weights file.

    Args:
      path: a checkpoint directory (``jaxcam.checkpoint.save`` / ``jaxcam convert``),
        or a torchvision / timm state dict file ``.pth`` / ``.pt`` / ``.bin`` /
        ``.safetensors``.
      arch: for a weights file, optional: the library (torchvision or timm) and the
        architecture are read from the keys (``jaxcam.weights.detect_source``); give it
        (``"resnet50"``, ``"vit_b_16"``, timm's ``"vit_base_patch16_224"``,
        ``"timm/resnet50"``, ...) where the keys are ambiguous (a ResNet-50: torchvision
        or timm) or to check; for a checkpoint it is read from the metadata and, if
        given, must agree.
      num_classes: optional check: must equal the loaded classifier's width.

    Weights files get their library's eval preprocessing at 224 px (torchvision's
    ImageNet recipe; timm's crop_pct resize and mean/std, 0.5/0.5 for ViTs) and no
    class names. Raises FileNotFoundError if ``path`` does not exist and
    ValueError on a mismatch, naming the fix.
    """
    from jaxcam import checkpoint, weights

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist. jaxcam.load takes a jaxcam checkpoint directory "
            f"({CHECKPOINT_HINT}) or a torchvision / timm weights file (.pth, .pt, .bin, "
            ".safetensors)"
        )
    if path.is_dir():
        bundle = checkpoint.restore(path)
        if arch is not None and weights.model_arch(arch) != bundle.model.arch:
            raise ValueError(
                f"the checkpoint {str(path)!r} holds a {bundle.model.arch}, but arch={arch!r} "
                f"was requested; drop arch (--arch) or pass arch={bundle.model.arch!r}"
            )
    else:  # torchvision or timm, told apart (and the arch found) by the keys
        model, variables, prep = weights.load_weights(path, arch)
        bundle = LoadedModel(model, variables, None, prep)
    if num_classes is not None and int(num_classes) != bundle.model.num_classes:
        raise ValueError(
            f"{str(path)!r} has {bundle.model.num_classes} classes, but num_classes="
            f"{num_classes} was requested; drop num_classes or use weights with "
            f"{num_classes} outputs"
        )
    return bundle
