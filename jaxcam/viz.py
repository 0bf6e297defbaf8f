"""Pictures of explanations: heatmap overlays, signed two-colour maps, grids, GIFs.

Conventions:

- Images are RGB, never BGR: uint8 ``(H, W, 3)`` or float in ``[0, 1]``;
  grayscale ``(H, W)`` is accepted and repeated to RGB.
- Maps are ``(H, W)`` floats; heatmaps in ``[0, 1]`` (as
  :func:`jaxcam.explain` returns them), signed maps in ``[-1, 1]``. A map of
  another size than its image is resized bilinearly to the image.
- Array functions return uint8 RGB ``(H, W, 3)``; figure functions return a
  :class:`matplotlib.figure.Figure`. Only the ``save_*`` functions write files.
- Figures are built with the object-oriented API (``Figure`` + Agg canvas),
  never ``pyplot``: no global state, no GUI backend, nothing left open.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

RED = (0.84, 0.15, 0.16)
BLUE = (0.12, 0.47, 0.71)


# ---------------------------------------------------------------- arrays


def _as_rgb01(image) -> np.ndarray:
    """uint8 / float image, ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` -> float64 ``[0, 1]`` RGB."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected an RGB image (H, W, 3) or grayscale (H, W); got shape {arr.shape}."
        )
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError("the image contains NaN or inf.")
        return np.clip(arr.astype(np.float64), 0.0, 1.0)
    raise ValueError(f"image dtype must be uint8 or float in [0, 1], got {arr.dtype}.")


def _to_uint8(rgb01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgb01, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_map(values, name: str = "map") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W), got {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; check the explanation that produced it.")
    return arr


def resize_map(values, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``(h, w)`` map to ``size = (H, W)`` (identity when equal)."""
    arr = _check_map(values)
    if arr.shape == tuple(size):
        return arr
    img = Image.fromarray(arr.astype(np.float32), mode="F")
    return np.asarray(img.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float64)


def get_cmap(cmap: str | Colormap) -> Colormap:
    """A matplotlib colormap by name (``"jet"``, ``"viridis"``, ...) or passed through."""
    if isinstance(cmap, Colormap):
        return cmap
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(
            f"unknown colormap {cmap!r}; use a matplotlib colormap name such as 'jet', "
            "'turbo', 'viridis' or 'inferno' (see matplotlib.colormaps)."
        ) from None


def colorize(heatmap, cmap: str | Colormap = "jet") -> np.ndarray:
    """Heatmap ``(H, W)`` in ``[0, 1]`` -> uint8 RGB ``(H, W, 3)`` through a colormap.

    Values outside ``[0, 1]`` are clipped.
    """
    arr = np.clip(_check_map(heatmap, "heatmap"), 0.0, 1.0)
    return _to_uint8(get_cmap(cmap)(arr)[..., :3])


def overlay(image, heatmap, cmap: str | Colormap = "jet", alpha: float = 0.5) -> np.ndarray:
    """Blend a colour-mapped heatmap over an image: uint8 RGB ``(H, W, 3)``.

    ``out = (1 - alpha) * image + alpha * cmap(clip(heatmap, 0, 1))``, rounded
    to uint8. ``alpha`` is the heatmap's opacity: 0 gives the image, 1 the
    colour-mapped heatmap alone. A heatmap of another size is resized
    bilinearly to the image first.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (heatmap opacity) must be in [0, 1], got {alpha}.")
    rgb = _as_rgb01(image)
    heat = np.clip(resize_map(heatmap, rgb.shape[:2]), 0.0, 1.0)
    colours = get_cmap(cmap)(heat)[..., :3]
    return _to_uint8((1.0 - alpha) * rgb + alpha * colours)


def scale_signed(values) -> np.ndarray:
    """A signed map divided by its largest magnitude: ``m / max|m|`` in ``[-1, 1]``.

    An all-zero map stays zero. Zero keeps its meaning (no evidence either way),
    which a min-max rescaling would destroy. Subnormal values may underflow to 0.
    """
    arr = _check_map(values)
    peak = np.max(np.abs(arr)) if arr.size else 0.0
    return arr / peak if peak > 0 else np.zeros_like(arr)


def _check_signed(values) -> np.ndarray:
    arr = _check_map(values, "signed map")
    if arr.size and (arr.min() < -1 - 1e-6 or arr.max() > 1 + 1e-6):
        raise ValueError(
            f"signed map must lie in [-1, 1], got [{arr.min():.3g}, {arr.max():.3g}]; "
            "scale it first, e.g. with jaxcam.viz.scale_signed."
        )
    return np.clip(arr, -1.0, 1.0)


def signed_colorize(
    values,
    positive: tuple[float, float, float] = RED,
    negative: tuple[float, float, float] = BLUE,
) -> np.ndarray:
    """Signed map ``(H, W)`` in ``[-1, 1]`` -> uint8 RGB on white, two colours.

    ``rgb = white + |m| * (colour - white)`` with ``colour = positive`` where
    ``m > 0`` and ``negative`` where ``m < 0``: 0 is white, +1 pure
    ``positive`` (default red, e.g. evidence for "malignant"), -1 pure
    ``negative`` (default blue, evidence for "benign"). Colours are RGB in
    ``[0, 1]``.
    """
    m = _check_signed(values)[..., None]
    colour = np.where(m >= 0, np.asarray(positive, np.float64), np.asarray(negative, np.float64))
    return _to_uint8(1.0 + np.abs(m) * (colour - 1.0))


def signed_overlay(
    image,
    values,
    positive: tuple[float, float, float] = RED,
    negative: tuple[float, float, float] = BLUE,
    alpha: float = 0.7,
) -> np.ndarray:
    """A signed map in ``[-1, 1]`` over an image, opacity growing with ``|m|``.

    ``out = (1 - a) * image + a * colour`` with ``a = alpha * |m|`` per pixel
    and ``colour`` as in :func:`signed_colorize`: where the map is 0 the image
    shows unchanged, so only the evidence is painted. Returns uint8 RGB.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (maximum opacity) must be in [0, 1], got {alpha}.")
    rgb = _as_rgb01(image)
    m = _check_signed(resize_map(_check_signed(values), rgb.shape[:2]))[..., None]
    colour = np.where(m >= 0, np.asarray(positive, np.float64), np.asarray(negative, np.float64))
    a = alpha * np.abs(m)
    return _to_uint8((1.0 - a) * rgb + a * colour)


def caption_frame(frame, caption: str, height: int | None = None) -> np.ndarray:
    """Add a white strip with ``caption`` in black below ``frame``: ``(H + h, W, 3)`` uint8.

    The caption goes below rather than on top, so no pixel of the frame is hidden.
    """
    rgb = _to_uint8(_as_rgb01(frame))
    h, w = rgb.shape[:2]
    strip_h = height if height is not None else max(14, h // 8)
    canvas = Image.new("RGB", (w, h + strip_h), (255, 255, 255))
    canvas.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(canvas)
    # Largest font (at most 70% of the strip) whose text fits the frame's width.
    font_size = max(6, int(strip_h * 0.7))
    font = ImageFont.load_default(size=font_size)
    while font_size > 6 and draw.textlength(caption, font=font) > 0.95 * w:
        font_size -= 1
        font = ImageFont.load_default(size=font_size)
    draw.text((w / 2, h + strip_h / 2), caption, fill=(0, 0, 0), font=font, anchor="mm")
    return np.asarray(canvas)


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure with Agg -> uint8 RGB ``(H, W, 3)`` (for GIF frames, tests, notebooks)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ---------------------------------------------------------------- figures


def _new_figure(nrows: int, ncols: int, panel_size: float) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def method_grid(
    images,
    maps: Mapping[str, object],
    cmap: str | Colormap = "jet",
    alpha: float = 0.5,
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
    show_original: bool = True,
    panel_size: float = 2.2,
) -> Figure:
    """One row per image, one column per method (first column the image itself).

    Args:
      images: one image ``(H, W, 3)`` / ``(H, W)`` or a batch ``(B, H, W, 3)``
        (RGB, uint8 or float in ``[0, 1]``).
      maps: method name -> heatmap ``(H, W)`` (one image) or ``(B, H, W)``,
        in ``[0, 1]``; the column titles are the keys, in order.
      row_titles: one label per row (e.g. the class explained), shown on the
        first panel of the row.
      title: figure title.
    """
    imgs = np.asarray(images)
    single = imgs.ndim <= 3
    if single:
        imgs = imgs[None]
    if not maps and not show_original:
        raise ValueError("nothing to draw: give at least one map or show_original=True.")
    batch = imgs.shape[0]
    stacked = {}
    for name, m in maps.items():
        arr = np.asarray(m)
        arr = arr[None] if single and arr.ndim == 2 else arr
        if arr.ndim != 3 or arr.shape[0] != batch:
            raise ValueError(
                f"map {name!r} has shape {np.asarray(m).shape}; expected one (H, W) map per "
                f"image, i.e. {'(H, W)' if single else f'({batch}, H, W)'}."
            )
        stacked[name] = arr
    if row_titles is not None and len(row_titles) != batch:
        raise ValueError(f"got {len(row_titles)} row titles for {batch} images.")
    ncols = len(stacked) + int(show_original)
    fig, axes = _new_figure(batch, ncols, panel_size)
    for i in range(batch):
        col = 0
        if show_original:
            axes[i, 0].imshow(_to_uint8(_as_rgb01(imgs[i])))
            if i == 0:
                axes[i, 0].set_title("image", fontsize=10)
            col = 1
        for j, (name, arr) in enumerate(stacked.items()):
            axes[i, col + j].imshow(overlay(imgs[i], arr[i], cmap=cmap, alpha=alpha))
            if i == 0:
                axes[i, col + j].set_title(name, fontsize=10)
        if row_titles is not None:
            axes[i, 0].set_axis_on()
            axes[i, 0].set_xticks([])
            axes[i, 0].set_yticks([])
            for spine in axes[i, 0].spines.values():
                spine.set_visible(False)
            axes[i, 0].set_ylabel(row_titles[i], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def side_by_side(
    image,
    heatmap,
    cmap: str | Colormap = "jet",
    alpha: float = 0.5,
    title: str | None = None,
    panel_size: float = 3.0,
) -> Figure:
    """Three panels: the image, the heatmap alone (with a colour bar), the overlay."""
    rgb = _to_uint8(_as_rgb01(image))
    heat = np.clip(resize_map(heatmap, rgb.shape[:2]), 0.0, 1.0)
    fig, axes = _new_figure(1, 3, panel_size)
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("image", fontsize=10)
    shown = axes[0, 1].imshow(heat, cmap=get_cmap(cmap), vmin=0.0, vmax=1.0)
    axes[0, 1].set_title("heatmap", fontsize=10)
    fig.colorbar(shown, ax=axes[0, 1], fraction=0.046, pad=0.02)
    axes[0, 2].imshow(overlay(rgb, heat, cmap=cmap, alpha=alpha))
    axes[0, 2].set_title("overlay", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def signed_map(heatmap, positive: bool) -> np.ndarray:
    """Evidence for a predicted class, signed by its group: ``+map`` when the class is
    in the positive group (e.g. malignant, drawn red by :func:`signed_overlay`),
    ``-map`` otherwise (benign, blue); ``(H, W)`` in ``[-1, 1]`` for a map in ``[0, 1]``."""
    heat = np.asarray(heatmap)
    return heat if positive else -heat


def explanation_panels(
    image,
    maps: Mapping[str, object],
    *,
    mask=None,
    positive: bool | None = None,
    title: str | None = None,
) -> Figure:
    """One image explained by several methods: columns the image, then one per method
    (titled by the keys of ``maps``, ``(H, W)`` heatmaps in ``[0, 1]``); rows the
    heatmap alone, its overlay on the image, and, when ``positive`` is given, the
    overlay of :func:`signed_map` (red: positive group, blue: negative). ``mask``
    ``(H, W)`` outlines the ground truth (lime) on the image in the second row."""
    labels = list(maps)
    rows = 2 if positive is None else 3
    cols = len(labels) + 1
    fig = Figure(figsize=(2.0 * cols, 2.1 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("original", fontsize=9)
    if mask is not None:
        axes[1, 0].imshow(image)
        axes[1, 0].contour(np.asarray(mask), levels=[0.5], colors="lime", linewidths=1)
        axes[1, 0].set_title("lesion mask", fontsize=9)
    for j, label in enumerate(labels, start=1):
        heat = np.asarray(maps[label])
        axes[0, j].imshow(colorize(heat))
        axes[0, j].set_title(label, fontsize=9)
        axes[1, j].imshow(overlay(image, heat))
        if positive is not None:
            axes[2, j].imshow(signed_overlay(image, signed_map(heat, positive)))
    if positive is not None:
        axes[2, 0].imshow(image)
        axes[2, 0].set_title("signed evidence\n(red: malignant, blue: benign)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def confusion_figure(matrix, class_names: Sequence[str], title: str = "") -> Figure:
    """A ``(K, K)`` confusion matrix (rows true, columns predicted) with its counts."""
    m = np.asarray(matrix)
    k = len(class_names)
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix {m.shape} does not match {k} class names.")
    fig = Figure(figsize=(1.2 + 0.8 * k, 1.0 + 0.7 * k), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black", fontsize=9)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return fig


def training_curves_figure(history: Sequence[Mapping[str, float]]) -> Figure:
    """Loss and accuracy per epoch from :class:`jaxcam.train.TrainResult` ``history``
    (entries with ``epoch``, ``train_loss``, ``val_loss``, ``train_accuracy``,
    ``val_accuracy``, ``val_balanced_accuracy``)."""
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    loss, acc = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    series = ((loss, "train_loss", "o-", "train"), (loss, "val_loss", "o-", "validation"),
              (acc, "train_accuracy", "o-", "train"), (acc, "val_accuracy", "o-", "validation"),
              (acc, "val_balanced_accuracy", "s--", "validation (balanced)"))
    for ax, key, style, label in series:
        ax.plot(epochs, [h[key] for h in history], style, label=label)
    loss.set_title("loss")
    acc.set_title("accuracy")
    for ax in (loss, acc):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def grouped_bar_figure(
    rows: Mapping[str, Mapping[str, float]],
    series: Mapping[str, str],
    *,
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
) -> Figure:
    """Grouped bars: one group per key of ``rows`` (e.g. a method), one bar per key of
    ``series`` (``{row key: legend name}``) of height ``rows[group][key]``."""
    fig = Figure(figsize=(2.0 + 1.3 * len(rows), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(series)
    pos = np.arange(len(rows))
    for i, (key, name) in enumerate(series.items()):
        ax.bar(pos + i * width, [row[key] for row in rows.values()], width, label=name)
    ax.set_xticks(pos + 0.4 - width / 2, list(rows), rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return fig


def overlay_pair(image, heatmap, *, positive: bool | None = None, size: int = 160
                 ) -> np.ndarray:
    """uint8 ``(size, 2 * size, 3)``: the image beside its overlay (the signed overlay
    of :func:`signed_map` when ``positive`` is given), e.g. one GIF frame."""
    ov = (overlay(image, heatmap) if positive is None
          else signed_overlay(image, signed_map(heatmap, positive)))
    pair = np.concatenate([overlay(image, heatmap, alpha=0.0), ov], axis=1)
    return np.asarray(Image.fromarray(pair).resize((2 * size, size), Image.BILINEAR))


# ---------------------------------------------------------------- files


def _parent_dir(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    return path


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write a figure (format from the extension: ``.png``, ``.pdf``, ``.svg``, ...).

    Creates the parent directory; returns the path written. Figures from this
    module are not registered with ``pyplot``, so they need no closing.
    """
    path = _parent_dir(path)
    fig.savefig(path, dpi=dpi)
    return path


def save_image(array, path: str | os.PathLike) -> str:
    """Write an RGB image array (uint8 or float in ``[0, 1]``) to ``path`` (PNG, JPEG, ...)."""
    path = _parent_dir(path)
    Image.fromarray(_to_uint8(_as_rgb01(array))).save(path)
    return path


def save_gif(
    path: str | os.PathLike,
    frames: Sequence,
    captions: Sequence[str] | None = None,
    duration_ms: int = 600,
    loop: int = 0,
) -> str:
    """Write an animated GIF (Pillow), optionally with one caption per frame.

    Args:
      frames: RGB images of one shape (uint8 or float in ``[0, 1]``), e.g.
        overlays for successive training epochs or layers.
      captions: one string per frame, drawn below it (:func:`caption_frame`).
      duration_ms: display time of each frame; ``loop=0`` repeats forever.
    """
    if len(frames) == 0:
        raise ValueError("save_gif needs at least one frame.")
    rgb = [_to_uint8(_as_rgb01(f)) for f in frames]
    if len({f.shape for f in rgb}) != 1:
        raise ValueError(
            f"all GIF frames must have one shape, got {sorted({f.shape for f in rgb})}; "
            "resize them first."
        )
    if captions is not None:
        if len(captions) != len(rgb):
            raise ValueError(f"got {len(captions)} captions for {len(rgb)} frames.")
        rgb = [caption_frame(f, c) for f, c in zip(rgb, captions, strict=True)]
    path = _parent_dir(path)
    pil = [Image.fromarray(f) for f in rgb]
    pil[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=pil[1:],
        duration=duration_ms,
        loop=loop,
        disposal=2,
    )
    return path
