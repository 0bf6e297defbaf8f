"""Reading image files into RGB arrays, and turning them into model inputs.

Everything that enters jaxcam from disk goes through :func:`load_image`, so
that every caller (the CLI, notebooks, experiments) sees the same pixels: RGB
(never BGR), EXIF orientation applied, 8 bits per channel. Preprocessing is
:func:`jaxcam.preprocessing.preprocess` with the checkpoint's own
:class:`~jaxcam.preprocessing.Preprocessing`; nothing here re-implements it.

Conversion rules (``load_image``):

- JPEG, PNG, BMP, TIFF, GIF, WebP -- anything Pillow opens. Multi-frame files
  (animated GIF, multi-page TIFF) give their first frame.
- EXIF orientation is applied (``PIL.ImageOps.exif_transpose``): a phone photo
  stored sideways with an "rotate 90" tag comes back upright, as every image
  viewer shows it.
- Grayscale (``L``, ``1``) is repeated to three channels.
- Alpha (``RGBA``, ``LA``, ``PA``, palette with transparency) is composited
  on a white background: the result is what a viewer shows on a white page.
  Dropping alpha instead would expose whatever colour the encoder left under
  fully transparent pixels (often black), which is not part of the picture.
- 16-bit grayscale (``I;16``, or ``I`` with values in ``0..65535``) is scaled
  to 8 bits as ``round(v * 255 / 65535)``, so full scale stays full scale.
  (Pillow itself reduces 16-bit *RGB* PNG/TIFF files to 8 bits on reading, by
  keeping the high byte, ``floor(v / 256)``, which differs from the rounded
  scaling by at most one level.)
- 32-bit float images (``F``) must hold values in ``[0, 1]``; they are scaled
  by 255 and rounded. Other ranges are rejected rather than guessed.
- CMYK, YCbCr, LAB, HSV are converted with Pillow's ``convert("RGB")``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxcam.preprocessing import Preprocessing, denormalize, preprocess

_WHITE = (255, 255, 255)


def _scale16(arr: np.ndarray) -> np.ndarray:
    """``uint16``-range integers -> uint8, ``round(v * 255 / 65535)``."""
    return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A Pillow image (any mode) -> uint8 RGB ``(H, W, 3)``, following the module's rules.

    EXIF orientation is *not* applied here (see :func:`load_image`).
    """
    mode = image.mode
    if mode in ("RGB",):
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("L", "1"):
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(
                f"32-bit integer image with values in [{arr.min()}, {arr.max()}], outside "
                "the 16-bit range 0..65535; convert it to an 8- or 16-bit image first."
            )
        gray = _scale16(arr)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        if not np.all(np.isfinite(arr)) or (arr.size and (arr.min() < 0 or arr.max() > 1)):
            raise ValueError(
                "floating-point image with values outside [0, 1] (or NaN/inf); scale it to "
                "[0, 1] or save it as an 8- or 16-bit image first."
            )
        gray = np.round(arr * 255.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file -> uint8 RGB array ``(H, W, 3)``, upright (EXIF applied).

    See the module docstring for the conversion rules (grayscale, alpha on
    white, 16-bit scaling, float images).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` is a directory, or not an image Pillow can decode,
        or a truncated/corrupt file, or an unsupported value range.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file {path!r} does not exist; check the path.")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not an image file; give image files.")
    try:
        with Image.open(path) as image:
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            image.load()
            return pil_to_rgb(image)
    except UnidentifiedImageError:
        raise ValueError(
            f"cannot read {path!r}: not an image format Pillow recognises (JPEG, PNG, BMP, "
            "TIFF, ...); check that the file is an image."
        ) from None
    except (OSError, SyntaxError) as e:  # truncated / corrupt data; Pillow raises these
        raise ValueError(f"cannot read {path!r}: the image data is corrupt ({e}).") from None


def inputs_to_uint8(x, prep: Preprocessing) -> np.ndarray:
    """Normalised model inputs ``(..., S, S, 3)`` -> the pixels the model sees, uint8 RGB.

    ``round(255 * clip(x * std + mean, 0, 1))`` (``denormalize``): the same resize and
    centre crop as the model input, so a map ``(S, S)`` from :func:`jaxcam.explain`
    lies exactly on it.
    """
    return np.round(np.asarray(denormalize(np.asarray(x), prep)) * 255.0).astype(np.uint8)


def load_images(
    paths: Sequence[str | os.PathLike], prep: Preprocessing
) -> tuple[np.ndarray, np.ndarray]:
    """Read and preprocess image files for a model.

    Returns:
      ``x``: float32 ``(B, S, S, 3)`` normalised model inputs
      (``jaxcam.preprocessing.preprocess`` with ``prep``), and ``shown``:
      uint8 ``(B, S, S, 3)``, the same crops in RGB for overlays.
    """
    raw = [load_image(p) for p in paths]
    x = np.stack([preprocess(r, prep) for r in raw]).astype(np.float32)
    return x, inputs_to_uint8(x, prep)
