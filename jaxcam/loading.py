"""One entry point for every model jaxcam can explain: :func:`load`; and :func:`convert`.

``load(path)`` accepts a jaxcam checkpoint directory (``jaxcam.checkpoint``,
made by ``jaxcam convert`` or by training), a training run's folder (its best
model), or a torchvision or timm weights file (``.pth`` / ``.pt`` / ``.bin`` /
``.safetensors``, told apart by its keys), and returns a
:class:`~jaxcam.checkpoint.LoadedModel`: the model, its variables, the class
names and the preprocessing its inputs need. ``explain``, the CLI and the
experiments call it. ``convert`` turns a weights file into a checkpoint
(``jaxcam convert``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxcam import checkpoint, weights
from jaxcam.checkpoint import CHECKPOINT_HINT, Factories, LoadedModel
from jaxcam.preprocessing import Preprocessing

__all__ = ["CHECKPOINT_HINT", "LoadedModel", "convert", "load"]


def load(
    path: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    *,
    model: Any | None = None,
    factories: Factories | None = None,
) -> LoadedModel:
    """Load a jaxcam checkpoint (or a training run's best model) or a torchvision / timm
    weights file.

    Args:
      path: a checkpoint directory (``jaxcam.checkpoint.save`` / ``jaxcam convert``),
        a training run's output folder, its ``checkpoints/`` folder or a step
        folder in it (all mean the run's best model, see
        :func:`jaxcam.checkpoint.resolve`), or a torchvision / timm state dict file
        ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``.
      arch: for a weights file, optional: the library (torchvision or timm) and the
        architecture are read from the keys (``jaxcam.weights.detect_source``); give it
        (``"resnet50"``, ``"vit_b_16"``, timm's ``"vit_base_patch16_224"``,
        ``"timm/resnet50"``, ...) where the keys are ambiguous (a ResNet-50: torchvision
        or timm) or to check; for a checkpoint it is read from the metadata and, if
        given, must agree.
      num_classes: optional check: must equal the loaded classifier's width.
      model, factories: for a checkpoint of a model that is not one of jaxcam's
        own: the model itself, or the factories you trust to rebuild it (see
        :func:`jaxcam.checkpoint.restore`; nothing a checkpoint names is imported
        or called otherwise).

    Weights files get their library's eval preprocessing at 224 px (torchvision's
    ImageNet recipe; timm's crop_pct resize and mean/std, 0.5/0.5 for ViTs) and no
    class names. Raises FileNotFoundError if ``path`` does not exist and
    ValueError on a mismatch, naming the fix.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist. jaxcam.load takes a jaxcam checkpoint directory "
            f"({CHECKPOINT_HINT}), a training run's folder (e.g. runs/ham10000), or a "
            "torchvision / timm weights file (.pth, .pt, .bin, .safetensors)"
        )
    if path.is_dir():
        bundle = checkpoint.restore(path, model=model, factories=factories)
        if arch is not None and weights.model_arch(arch) != bundle.model.arch:
            raise ValueError(
                f"the checkpoint {str(path)!r} holds a {bundle.model.arch}, but arch={arch!r} "
                f"was requested; drop arch (--arch) or pass arch={bundle.model.arch!r}"
            )
    else:  # torchvision or timm, told apart (and the arch found) by the keys
        if model is not None:
            raise ValueError(
                f"model= is for jaxcam checkpoint directories; {str(path)!r} is a weights "
                "file: load it with arch=..., or save your model's variables with "
                "jaxcam.checkpoint.save first"
            )
        loaded_model, variables, prep = weights.load_weights(path, arch)
        bundle = LoadedModel(loaded_model, variables, None, prep)
    if num_classes is not None and int(num_classes) != bundle.model.num_classes:
        raise ValueError(
            f"{str(path)!r} has {bundle.model.num_classes} classes, but num_classes="
            f"{num_classes} was requested; drop num_classes or use weights with "
            f"{num_classes} outputs"
        )
    return bundle


def convert(
    weights_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    arch: str | None = None,
    class_names: Sequence[str] | None = None,
    image_size: int = 224,
    *,
    resize_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """torchvision or timm weights file -> jaxcam checkpoint directory (``jaxcam convert``).

    Strict :func:`jaxcam.weights.load_weights` (the library, and with ``arch=None`` the
    architecture, from the keys), then :func:`jaxcam.checkpoint.save` with the
    library's eval preprocessing for ``image_size``: torchvision's resizes the
    shorter side to ``round(image_size * 256 / 224)`` (256 for 224; torchvision's
    ResNet-50 ``IMAGENET1K_V2`` weights use 232) with ImageNet mean/std, timm's to
    ``floor(image_size / crop_pct)`` with the pretrained tag's mean/std
    (:func:`jaxcam.weights.timm_preprocessing`); then a centre crop of
    ``image_size``. ``resize_size`` overrides the resize. ``class_names``, if given,
    must have one name per classifier output. Returns the checkpoint directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{str(out_dir)!r} already exists; choose a new output directory or pass "
            "overwrite=True (--overwrite)"
        )
    if resize_size is not None:  # built first: validates image_size / resize_size
        Preprocessing(image_size=int(image_size), resize_size=int(resize_size))
    model, variables, prep = weights.load_weights(weights_path, arch, image_size=int(image_size))
    if resize_size is not None:
        prep = dataclasses.replace(prep, resize_size=int(resize_size))
    return checkpoint.save(
        out_dir, model, variables, class_names=class_names, preprocessing=prep, overwrite=overwrite
    )
