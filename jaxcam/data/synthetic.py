"""Synthetic dermoscopy-like images with lesions of known class, mask and boxes.

A pure-numpy, seeded generator: ``make_image(rng, config)`` renders a
skin-toned textured background (smooth colour variation, pores), one or more
lesions, hair strokes on top and a vignette, and returns the lesion
segmentation mask and per-lesion boxes computed from the *same* geometry the
lesions were painted with. The class is carried only by the lesions'
appearance, never by the background, so a classifier must look at the lesion:

==================== ========= ==================================================
class                malignant appearance
==================== ========= ==================================================
nevus                no        round, regular border, uniform brown, darker centre,
                               faint pigment network
seborrheic_keratosis no        oval, tan/yellow-brown, cerebriform ridges,
                               white milia-like dots
melanoma             yes       irregular, asymmetric border; patchy black-brown,
                               blue-grey and brown
basal_cell_carcinoma yes       pink, pearly (translucent), red branching vessels,
                               blue-grey ovoid nests
==================== ========= ==================================================

Position, size, orientation and aspect of the lesions, skin tone, hair and
vignetting vary independently of the class.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "nevus",
    "seborrheic_keratosis",
    "melanoma",
    "basal_cell_carcinoma",
)
DISPLAY_NAMES: tuple[str, ...] = (
    "Nevus",
    "Seborrheic keratosis",
    "Melanoma",
    "Basal cell carcinoma",
)
MALIGNANT: tuple[bool, ...] = (False, False, True, True)
NUM_CLASSES = len(CLASS_NAMES)

# Border irregularity: amplitude range of the harmonics k = 2..7 of r(theta)
# (scaled by 2/k), and of the k = 1 harmonic (asymmetry), per class.
_IRREGULARITY = {0: (0.0, 0.02), 1: (0.01, 0.04), 2: (0.06, 0.14), 3: (0.03, 0.07)}
_ASYMMETRY = {0: (0.0, 0.02), 1: (0.0, 0.04), 2: (0.10, 0.22), 3: (0.02, 0.08)}
_HARMONIC_SUM = sum(2.0 / k for k in range(2, 8))
_ASPECT = {0: (0.85, 1.0), 1: (0.6, 0.8), 2: (0.7, 1.0), 3: (0.7, 0.95)}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What one synthetic image looks like.

    Attributes:
      image_size: side ``S`` of the square image in pixels (>= 16).
      min_lesions, max_lesions: number of lesions per image, drawn uniformly;
        all lesions of one image share its class (multi-instance when > 1).
      radius: range of the lesion base radius as a fraction of ``S``.
      max_hairs: hair strokes per image are drawn from ``0..max_hairs``.
      vignette: darkening at the corners, ``image *= 1 - vignette * (r / r_max)^2``.
    """

    image_size: int = 128
    min_lesions: int = 1
    max_lesions: int = 1
    radius: tuple[float, float] = (0.12, 0.28)
    max_hairs: int = 6
    vignette: float = 0.35

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}.")
        if not 1 <= self.min_lesions <= self.max_lesions:
            raise ValueError(
                f"need 1 <= min_lesions <= max_lesions, got {self.min_lesions}, {self.max_lesions}."
            )
        lo, hi = self.radius
        if not 0.02 <= lo <= hi <= 0.45:
            raise ValueError(
                f"radius range must satisfy 0.02 <= lo <= hi <= 0.45, got {self.radius}."
            )
        if lo * self.image_size < 1.5:
            raise ValueError(
                f"lesions of radius {lo} x {self.image_size} px = {lo * self.image_size:.2f} px "
                "are too small to draw; raise image_size or the lower radius (>= 1.5 px)."
            )
        if self.max_lesions > 1 and (2.6 * hi) ** 2 * self.max_lesions > 1.0:
            raise ValueError(
                f"{self.max_lesions} lesions of radius up to {hi} do not fit without overlap; "
                "lower max_lesions or the radius range."
            )
        if not 0.0 <= self.vignette < 1.0:
            raise ValueError(f"vignette must be in [0, 1), got {self.vignette}.")


SINGLE = SyntheticConfig()
MULTI = SyntheticConfig(min_lesions=2, max_lesions=4, radius=(0.07, 0.13))


@dataclasses.dataclass(frozen=True)
class Lesion:
    """Geometry of one lesion, in pixel units of an ``S x S`` image.

    A pixel centre ``p`` is inside when ``rho(p) < radius * r(theta(p))`` with
    ``(u, v)`` the offset from ``center`` rotated by ``-angle`` and ``v``
    divided by ``aspect``, ``rho = |(u, v)|``, ``theta = atan2(v, u)`` and
    ``r(theta) = 1 + sum_k amps[k] cos(k theta + phases[k])`` (k = 1..7).
    """

    center: tuple[float, float]  # (y, x)
    radius: float
    aspect: float
    angle: float
    amps: tuple[float, ...]
    phases: tuple[float, ...]

    def window(self, size: int) -> tuple[slice, slice]:
        """Rows and columns that can hold the lesion: ``r(theta) <= 1 + sum_k |amps[k]|``."""
        reach = self.radius * (1.0 + sum(abs(a) for a in self.amps)) + 1.0
        y0, x0 = (max(0, math.floor(c - reach)) for c in self.center)
        y1, x1 = (min(size, math.ceil(c + reach) + 1) for c in self.center)
        return slice(y0, y1), slice(x0, x1)

    def normalized_radius(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """``rho / (radius * r(theta))`` at pixel centres: < 1 inside the lesion."""
        dy, dx = yy - self.center[0], xx - self.center[1]
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = c * dx + s * dy
        v = (-s * dx + c * dy) / self.aspect
        rho = np.hypot(u, v)
        theta = np.arctan2(v, u)
        r = np.ones_like(theta)
        for k, (a, ph) in enumerate(zip(self.amps, self.phases, strict=True), start=1):
            r = r + a * np.cos(k * theta + ph)
        return rho / (self.radius * r)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise: a ``(cells+1)^2`` grid of N(0, 1) bilinearly upsampled to ``(size, size)``."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    pos = (np.arange(size) + 0.5) / size * cells
    lo = np.minimum(np.floor(pos).astype(int), cells - 1)
    frac = pos - lo
    interp = np.zeros((size, cells + 1))
    interp[np.arange(size), lo] = 1.0 - frac
    interp[np.arange(size), lo + 1] += frac
    return interp @ grid @ interp.T


def _stroke_alpha(size: int, points: np.ndarray, width: float) -> np.ndarray:
    """Coverage in ``[0, 1]`` of a polyline through ``points`` ((n, 2), (y, x) pixels).

    The curve is sampled every 0.25 px and splatted bilinearly; ``width``
    (pixels) scales the coverage so thin strokes stay faint.
    """
    seg = np.diff(points, axis=0)
    lengths = np.hypot(seg[:, 0], seg[:, 1])
    samples = [
        points[i]
        + np.linspace(0.0, 1.0, max(2, int(lengths[i] / 0.25)), endpoint=False)[:, None] * seg[i]
        for i in range(len(seg))
    ]
    pts = np.concatenate(samples, axis=0) - 0.5
    acc = np.zeros((size + 1, size + 1))
    y0 = np.floor(pts[:, 0]).astype(int)
    x0 = np.floor(pts[:, 1]).astype(int)
    fy, fx = pts[:, 0] - y0, pts[:, 1] - x0
    for dy, dx, w in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
        np.add.at(acc, (yy[ok], xx[ok]), w[ok])
    # 4 samples per pixel of length -> ~4 per unit; normalise then widen.
    return np.clip(acc[:size, :size] * (width / 4.0) * 1.6, 0.0, 1.0)


def _curve(rng: np.random.Generator, start: np.ndarray, length: float, n: int = 12) -> np.ndarray:
    """A gently bending random walk of ``n`` segments, ``length`` pixels long."""
    heading = rng.uniform(0, 2 * math.pi)
    turns = np.cumsum(rng.normal(0.0, 0.25, n))
    steps = np.stack([np.sin(heading + turns), np.cos(heading + turns)], axis=1) * (length / n)
    return np.concatenate([start[None], start + np.cumsum(steps, axis=0)], axis=0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Skin: a base tone, low-frequency colour variation and fine pore texture, ``(S, S, 3)``."""
    light = rng.uniform(0.0, 1.0)
    base = (1 - light) * np.array([0.72, 0.52, 0.42]) + light * np.array([0.93, 0.78, 0.70])
    base = base + rng.normal(0.0, 0.015, 3)
    low = _smooth_noise(rng, size, 4)[..., None] * np.array([0.025, 0.03, 0.03])
    red = np.maximum(_smooth_noise(rng, size, 3), 0.0)[..., None] * np.array([0.03, -0.02, -0.02])
    pores = rng.standard_normal((size, size))[..., None] * 0.012
    return base + low + red + pores


def _sample_lesions(rng: np.random.Generator, label: int, config: SyntheticConfig) -> list[Lesion]:
    s = config.image_size
    n = int(rng.integers(config.min_lesions, config.max_lesions + 1))
    lesions: list[Lesion] = []
    lo, hi = _IRREGULARITY[label]
    alo, ahi = _ASYMMETRY[label]
    for _ in range(1000):
        if len(lesions) == n:
            break
        radius = rng.uniform(*config.radius) * s
        # r(theta) <= 1 + asymmetry + sum_k (2/k) irregularity; keep lesions inside.
        reach = radius * (1.0 + ahi + _HARMONIC_SUM * hi)
        margin = min(reach + 1.0, s / 2)
        center = rng.uniform(margin, s - margin, 2)
        if any(
            np.hypot(*(center - np.asarray(o.center)))
            < reach + o.radius * (1.0 + ahi + _HARMONIC_SUM * hi) + 2.0
            for o in lesions
        ):
            continue
        amps = (rng.uniform(alo, ahi),) + tuple(rng.uniform(lo, hi, 6) * 2.0 / np.arange(2, 8))
        lesions.append(
            Lesion(
                center=(float(center[0]), float(center[1])),
                radius=float(radius),
                aspect=float(rng.uniform(*_ASPECT[label])),
                angle=float(rng.uniform(0, math.pi)),
                amps=tuple(float(a) for a in amps),
                phases=tuple(float(p) for p in rng.uniform(0, 2 * math.pi, 7)),
            )
        )
    if len(lesions) < config.min_lesions:
        raise ValueError(
            f"could not place {config.min_lesions} non-touching lesions in a "
            f"{s} px image; raise image_size or lower the radius range {config.radius}."
        )
    return lesions


def _paint_lesion(
    rng: np.random.Generator,
    label: int,
    t: np.ndarray,
    win: tuple[slice, slice],
    size: int,
    skin: np.ndarray,
    lesion: Lesion,
) -> np.ndarray:
    """Colour of one lesion on the window ``win`` of an ``S x S`` image, where
    ``t`` (the normalised radius) and ``skin`` are given; meaningful where ``t < 1``."""
    s = size
    yy, xx = (np.mgrid[0:s, 0:s] + 0.5)[(slice(None), *win)]
    tc = np.clip(t, 0.0, 1.0)[..., None]
    if label == 0:  # nevus: uniform brown, darker centre, faint network
        base = np.array([0.42, 0.26, 0.16]) + rng.normal(0, 0.02, 3)
        period = rng.uniform(0.18, 0.28) * lesion.radius + 1.0
        net = (np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period))[..., None]
        colour = base * (0.8 + 0.2 * tc) - 0.03 * (net > 0.6)
        colour = colour + 0.015 * _smooth_noise(rng, s, 6)[win][..., None]
    elif label == 1:  # seborrheic keratosis: tan, ridges, white milia
        base = np.array([0.70, 0.55, 0.33]) + rng.normal(0, 0.02, 3)
        ridges = np.sin(_smooth_noise(rng, s, 5)[win] * 6.0)[..., None]
        colour = base + 0.06 * ridges * np.array([1.0, 0.9, 0.7])
        for _ in range(int(rng.integers(4, 9))):
            rr, aa = lesion.radius * math.sqrt(rng.uniform(0, 0.6)), rng.uniform(0, 2 * math.pi)
            cy, cx = lesion.center[0] + rr * math.sin(aa), lesion.center[1] + rr * math.cos(aa)
            dot = np.hypot(yy - cy, xx - cx) < max(1.0, 0.07 * lesion.radius)
            colour = np.where(dot[..., None], np.array([0.96, 0.94, 0.86]), colour)
    elif label == 2:  # melanoma: patchy black-brown, blue-grey, brown
        black = np.array([0.14, 0.08, 0.07]) + rng.normal(0, 0.015, 3)
        blue = np.array([0.36, 0.40, 0.52]) + rng.normal(0, 0.02, 3)
        brown = np.array([0.40, 0.22, 0.13]) + rng.normal(0, 0.02, 3)
        w1 = 1 / (1 + np.exp(-2.5 * _smooth_noise(rng, s, 5)[win]))[..., None]
        w2 = 1 / (1 + np.exp(-2.5 * (_smooth_noise(rng, s, 4)[win] - 0.6)))[..., None]
        colour = (w1 * black + (1 - w1) * brown) * (1 - w2) + w2 * blue
    else:  # basal cell carcinoma: pearly pink, red arborizing vessels, blue-grey nests
        pink = np.array([0.90, 0.58, 0.60]) + rng.normal(0, 0.02, 3)
        colour = 0.75 * pink + 0.25 * skin + 0.03 * _smooth_noise(rng, s, 5)[win][..., None]
        vessels = np.zeros(t.shape)
        for _ in range(int(rng.integers(2, 5))):
            rr, aa = lesion.radius * rng.uniform(0, 0.5), rng.uniform(0, 2 * math.pi)
            start = np.array(
                [lesion.center[0] + rr * math.sin(aa), lesion.center[1] + rr * math.cos(aa)]
            )
            trunk = _curve(rng, start, lesion.radius * rng.uniform(0.6, 1.2))
            vessels = np.maximum(vessels, _stroke_alpha(s, trunk, 1.6)[win])
            branch = _curve(rng, trunk[len(trunk) // 2], lesion.radius * 0.5)
            vessels = np.maximum(vessels, _stroke_alpha(s, branch, 1.0)[win])
        colour = colour * (1 - vessels[..., None]) + vessels[..., None] * np.array(
            [0.72, 0.10, 0.14]
        )
        for _ in range(int(rng.integers(1, 3))):
            rr, aa = lesion.radius * math.sqrt(rng.uniform(0, 0.5)), rng.uniform(0, 2 * math.pi)
            cy, cx = lesion.center[0] + rr * math.sin(aa), lesion.center[1] + rr * math.cos(aa)
            nest = np.hypot(yy - cy, (xx - cx) * 0.7) < max(1.0, 0.16 * lesion.radius)
            colour = np.where(nest[..., None], np.array([0.45, 0.48, 0.58]), colour)
    return colour


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything random about one image, drawn once; rendering is deterministic."""

    label: int
    lesions: tuple[Lesion, ...]
    seeds: tuple[int, int, int]  # background, lesion texture, hair


def sample_scene(
    rng: np.random.Generator | int, config: SyntheticConfig = SINGLE, label: int | None = None
) -> Scene:
    """Draw the class (uniform unless ``label`` is given) and the lesion geometry."""
    rng = np.random.default_rng(rng)
    if label is None:
        label = int(rng.integers(NUM_CLASSES))
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}.")
    seeds = tuple(int(v) for v in rng.integers(0, 2**63 - 1, 3))
    return Scene(label=int(label), lesions=tuple(_sample_lesions(rng, label, config)), seeds=seeds)


def render(
    scene: Scene, config: SyntheticConfig = SINGLE, lesions: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``scene`` -> ``(image float64 (S, S, 3) in [0, 1], instance ids uint8 (S, S))``.

    Instance id ``k >= 1`` marks the pixels painted by lesion ``k``; 0 is skin.
    With ``lesions=False`` the same background, hair and vignette are rendered
    without lesions (the test oracle: the two renders differ exactly on the mask).
    """
    s = config.image_size
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    image = _background(np.random.default_rng(scene.seeds[0]), s)
    ids = np.zeros((s, s), np.uint8)
    tex_rng = np.random.default_rng(scene.seeds[1])
    for k, lesion in enumerate(scene.lesions, start=1):
        win = lesion.window(s)
        t = lesion.normalized_radius(yy[win], xx[win])
        inside = (t < 1.0) & (ids[win] == 0)
        colour = _paint_lesion(tex_rng, scene.label, t, win, s, image[win], lesion)
        if lesions:
            image[win] = np.where(inside[..., None], colour, image[win])
        ids[win][inside] = k
    hair_rng = np.random.default_rng(scene.seeds[2])
    colour = np.array([0.10, 0.07, 0.05]) + hair_rng.normal(0, 0.01, 3)
    for _ in range(int(hair_rng.integers(0, config.max_hairs + 1))):
        start = hair_rng.uniform(0, s, 2)
        alpha = 0.85 * _stroke_alpha(
            s, _curve(hair_rng, start, s * hair_rng.uniform(0.3, 0.9)), max(0.8, s / 128)
        )
        image = image * (1 - alpha[..., None]) + alpha[..., None] * colour
    r2 = ((yy - s / 2) ** 2 + (xx - s / 2) ** 2) / (s**2 / 2)
    image = image * (1.0 - config.vignette * r2)[..., None]
    return np.clip(image, 0.0, 1.0), ids


def boxes_from_instances(ids: np.ndarray, n: int) -> np.ndarray:
    """Tight boxes ``(n, 4)`` int32 ``(y0, x0, y1, x1)``, end-exclusive, of instance ids 1..n."""
    boxes = np.zeros((n, 4), np.int32)
    for k in range(1, n + 1):
        ys, xs = np.nonzero(ids == k)
        boxes[k - 1] = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    return boxes


def make_image(
    rng: np.random.Generator | int, config: SyntheticConfig = SINGLE, label: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One synthetic dermoscopy image.

    Returns ``(image, mask, boxes, label)``: ``image`` uint8 ``(S, S, 3)`` RGB;
    ``mask`` uint8 ``(S, S)``, 1 on exactly the pixels painted by a lesion and
    0 elsewhere; ``boxes`` int32 ``(n, 4)`` ``(y0, x0, y1, x1)`` (end-exclusive)
    tight around each lesion's pixels; ``label`` the class index into
    :data:`CLASS_NAMES`. A pure function of ``rng``'s state (or seed),
    ``config`` and ``label``.
    """
    scene = sample_scene(rng, config, label)
    image, ids = render(scene, config)
    boxes = boxes_from_instances(ids, len(scene.lesions))
    return np.round(image * 255.0).astype(np.uint8), (ids > 0).astype(np.uint8), boxes, scene.label


HELD_OUT_TAG = 7  # the builder's splits never seed a generator with [seed, 7, i]


def held_out_images(
    config: SyntheticConfig, num_images: int, seed: int = 0, tag: int = HELD_OUT_TAG
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fresh images outside every TFDS split, with their exact per-lesion masks.

    Image ``i`` is drawn from ``default_rng([seed, tag, i])`` with class
    ``i % NUM_CLASSES`` (balanced). Returns ``(images uint8 (N, S, S, 3), labels int32
    (N,), instance ids uint8 (N, S, S))``, ids as :func:`render` gives them (0 skin,
    ``k >= 1`` lesion ``k``); the images are rounded to uint8 as :func:`make_image`
    stores them.
    """
    images, labels, ids = [], [], []
    for i in range(num_images):
        scene = sample_scene(np.random.default_rng([seed, tag, i]), config,
                             label=i % NUM_CLASSES)
        image, inst = render(scene, config)
        images.append(np.round(image * 255.0).astype(np.uint8))
        labels.append(scene.label)
        ids.append(inst)
    return np.stack(images), np.asarray(labels, np.int32), np.stack(ids)
