"""Image preprocessing that matches torchvision's evaluation transform.

torchvision's ImageNet recipe is ``Resize(resize_size)`` (shorter side),
``CenterCrop(image_size)``, ``ToTensor()`` (to ``[0, 1]``) and
``Normalize(mean, std)``. jaxcam keeps images NHWC and RGB throughout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw RGB images become model inputs.

    Attributes:
      image_size: side of the square crop fed to the model.
      resize_size: the shorter image side is resized to this before the centre
        crop (torchvision uses 256 for 224 crops); ``None`` resizes straight to
        ``image_size`` x ``image_size`` (no crop, the aspect ratio changes).
      mean, std: per-channel normalisation applied to ``[0, 1]`` pixels.
    """

    image_size: int = 224
    resize_size: int | None = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}.")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size ({self.resize_size}) is smaller than image_size "
                f"({self.image_size}); the centre crop would not fit. Use resize_size >= "
                "image_size, or resize_size=None to resize straight to image_size."
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 entries each, and std must be positive.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(d["image_size"]),
            resize_size=None if d.get("resize_size") is None else int(d["resize_size"]),
            mean=tuple(float(v) for v in d.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in d.get("std", IMAGENET_STD)),
        )

    @classmethod
    def imagenet(cls, image_size: int = 224) -> Preprocessing:
        """torchvision's eval transform, scaled: resize to ``image_size * 256/224``."""
        return cls(image_size=image_size, resize_size=round(image_size * 256 / 224))


def normalize(images01, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """``(x - mean) / std`` on the last (channel) axis; ``x`` in ``[0, 1]``."""
    xp = np if isinstance(images01, np.ndarray) else jnp
    return (images01 - xp.asarray(mean, images01.dtype)) / xp.asarray(std, images01.dtype)


def denormalize(x, prep: Preprocessing | None = None):
    """Inverse of :func:`normalize`, clipped to ``[0, 1]`` for display."""
    prep = prep or Preprocessing()
    xp = np if isinstance(x, np.ndarray) else jnp
    out = x * xp.asarray(prep.std, x.dtype) + xp.asarray(prep.mean, x.dtype)
    return xp.clip(out, 0.0, 1.0)


def to_float01(image) -> np.ndarray:
    """uint8 / uint16 / float image -> float32 in ``[0, 1]``, shape ``(H, W, 3)``.

    Grayscale ``(H, W)`` or ``(H, W, 1)`` is repeated to RGB; RGBA drops alpha.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(
            f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
            f"got shape {arr.shape}."
        )
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    elif arr.shape[-1] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {arr.shape[-1]} (shape {arr.shape}).")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"unsupported image dtype {arr.dtype}; give uint8, uint16 or float in [0, 1].")


def resized_shape(height: int, width: int, prep: Preprocessing) -> tuple[int, int]:
    """The ``(H, W)`` that torchvision's ``Resize(prep.resize_size)`` produces.

    The shorter side becomes ``resize_size``, the longer ``int(resize_size * long / short)``
    (truncated, as ``torchvision.transforms.functional._compute_resized_output_size``).
    """
    if prep.resize_size is None:
        return prep.image_size, prep.image_size
    short, long = min(height, width), max(height, width)
    new_short, new_long = prep.resize_size, int(prep.resize_size * long / short)
    return (new_long, new_short) if height > width else (new_short, new_long)


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of torchvision's ``CenterCrop(size)``: ``int(round((H - size) / 2))``."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_and_crop(image, prep: Preprocessing) -> np.ndarray:
    """Bilinear (antialiased, PIL) resize then centre crop, with torchvision's arithmetic.

    ``image`` is ``(H, W, C)``: ``uint8`` is resized as an 8-bit PIL image, exactly
    as torchvision's ``Resize`` does on a PIL image (result ``uint8``); a float
    image is resized per channel in PIL's 32-bit float mode (no 8-bit rounding).
    """
    image = np.asarray(image)
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, prep)
    if (new_h, new_w) != (h, w):
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
            image = np.asarray(
                Image.fromarray(image, mode="RGB").resize((new_w, new_h), Image.BILINEAR)
            )
        else:
            channels = [
                np.asarray(
                    Image.fromarray(image[..., c].astype(np.float32), mode="F").resize(
                        (new_w, new_h), Image.BILINEAR
                    )
                )
                for c in range(image.shape[-1])
            ]
            image = np.stack(channels, axis=-1)
    top, left = center_crop_offsets(new_h, new_w, prep.image_size)
    return image[top : top + prep.image_size, left : left + prep.image_size]


def preprocess(image, prep: Preprocessing | None = None) -> np.ndarray:
    """One raw image (any of :func:`to_float01`'s inputs) -> model input ``(S, S, 3)`` float32.

    For an 8-bit RGB image this is torchvision's ``Resize(resize_size)``,
    ``CenterCrop(image_size)``, ``ToTensor()``, ``Normalize(mean, std)`` on the
    PIL image, up to float32 rounding (the resize runs on the uint8 image, as
    in torchvision), laid out ``(H, W, 3)`` instead of ``(3, H, W)``.
    """
    prep = prep or Preprocessing()
    arr = np.asarray(image)
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 3:
        img = resize_and_crop(arr, prep).astype(np.float32) / 255.0
    else:
        img = resize_and_crop(to_float01(arr), prep)
    return normalize(img, prep.mean, prep.std).astype(np.float32)
