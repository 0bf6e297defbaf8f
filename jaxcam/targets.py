"""Targets: the scalar ``y`` of one image's model output that a CAM explains.

Every target is a *link* of an *inner score*, ``y = psi(s)``, ``s = inner(out, c)``:

========================  =====================================  ============  =========
name / constructor        inner score ``s``                      link ``psi``  ``s`` is
========================  =====================================  ============  =========
``"logit"``               ``S_c``                                identity      linear
``"exp"``                 ``S_c``                                ``exp``       linear
``"sigmoid"``             ``S_c`` (multi-label / binary heads)   ``sigmoid``   linear
``"softmax"``             ``log softmax(S)_c``                   ``exp``       smooth
``"log_softmax"``         ``log softmax(S)_c = S_c - lse(S)``    identity      smooth
``"rest"``                ``2 S_c - lse(S)`` (ShapleyCAM's ReST) identity      smooth
:func:`regression`        an output value, or ``fn(out)``        any           linear*
:func:`segmentation`      ``sum_ij mask_ij out[i, j, c]``        any           linear
:func:`custom` / callable ``phi(out, c)``                        any           general
========================  =====================================  ============  =========

``out`` is one image's model output (the ``(C,)`` logits of a classifier, or any
array / pytree), ``c`` its class index (an int32 scalar, possibly traced).

Why the split. Along a line ``A + t e`` the derivatives of ``y`` are
(Faa di Bruno) ``D1 = psi' s1``, ``D2 = psi'' s1^2 + psi' s2``,
``D3 = psi''' s1^3 + 3 psi'' s1 s2 + psi' s3`` with ``s_n = d^n s / dt^n``. The
engines compute the derivatives of the inner score only and compose them here
(:func:`compose`), which makes targets *scale-free*: each link factors its
derivatives as ``psi^(n)(s) = exp(L(s)) r_n(s)`` with a positive per-image
factor ``exp(L)`` (``exp``: ``L = s``, ``r = (1, 1, 1)``; ``sigmoid``:
``L = log sigma(s) (1 - sigma(s))``; identity: ``L = 0``), and the ``exp(L)`` is
carried separately as ``log_scale``, never multiplied in. Grad-CAM++'s alphas are
invariant to it and every map is normalised, so ``exp(S_c)`` for ``|S_c|`` in the
thousands (which over/underflows float32 beyond ~88) gives the same maps as a
float64 computation. A *linear* inner score (a linear functional of the output)
lets the ``factored`` engine use one VJP; ``smooth`` ones have closed forms as
cumulants of the logits' Jacobian under ``softmax(S)`` (:func:`directional_derivatives`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TARGETS: tuple[str, ...] = ("exp", "logit", "softmax", "log_softmax", "rest", "sigmoid")
LINKS: tuple[str, ...] = ("identity", "exp", "sigmoid")
KINDS: tuple[str, ...] = ("linear", "log_softmax", "rest", "general")

TargetFn = Callable[[jax.Array, jax.Array], jax.Array]


# --------------------------------------------------------------------------- links


def link_value(link: str, s: jax.Array) -> jax.Array:
    """``psi(s)``: the target's value from its inner score."""
    if link == "identity":
        return s
    if link == "exp":
        return jnp.exp(s)
    if link == "sigmoid":
        return jax.nn.sigmoid(s)
    raise ValueError(f"Unknown link {link!r}; use one of {LINKS}.")


def link_derivatives(link: str, s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(r1, r2, r3, L)`` with ``psi^(n)(s) = exp(L) r_n`` (n = 1, 2, 3), ``L`` the log
    of the positive factor the link's derivatives share.

    - identity: ``r = (1, 0, 0)``, ``L = 0``;
    - exp: ``r = (1, 1, 1)``, ``L = s``;
    - sigmoid (``sigma' = sigma (1 - sigma)``): ``r = (1, 1 - 2 sigma,
      1 - 6 sigma + 6 sigma^2)``, ``L = log sigma(s) + log sigma(-s)`` (finite for
      every finite ``s``, computed without forming ``sigma (1 - sigma)``).
    """
    one = jnp.ones_like(s)
    zero = jnp.zeros_like(s)
    if link == "identity":
        return one, zero, zero, zero
    if link == "exp":
        return one, one, one, s
    if link == "sigmoid":
        sig = jax.nn.sigmoid(s)
        return (one, 1.0 - 2.0 * sig, 1.0 - 6.0 * sig + 6.0 * sig * sig,
                jax.nn.log_sigmoid(s) + jax.nn.log_sigmoid(-s))
    raise ValueError(f"Unknown link {link!r}; use one of {LINKS}.")


def link_shifted(link: str, s: jax.Array, s0: jax.Array) -> jax.Array:
    """``psi(s) exp(-L(s0))``: the target divided by its positive factor at the base
    point ``s0`` (held constant), for engines that differentiate a scalar function
    directly (``nested_sum``, ShapleyCAM's Hessian-vector product)."""
    if link == "identity":
        return s
    if link == "exp":
        return jnp.exp(s - s0)
    if link == "sigmoid":
        return jnp.exp(jax.nn.log_sigmoid(s) - jax.nn.log_sigmoid(s0) - jax.nn.log_sigmoid(-s0))
    raise ValueError(f"Unknown link {link!r}; use one of {LINKS}.")


def compose(
    link: str, s0: jax.Array, s1: jax.Array, s2: jax.Array, s3: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Derivatives of ``psi(s(t))`` from those of the inner score, without the factor.

    ``s0`` (B,) the inner score at the base point; ``s1, s2, s3`` its 1st-3rd
    derivatives along each coordinate (B, ...). Returns ``(D1, D2, D3, log_scale)``
    with the true derivatives equal to ``exp(log_scale) * D_n`` (log_scale (B,)):
    ``D1 = r1 s1``, ``D2 = r2 s1^2 + r1 s2``, ``D3 = r3 s1^3 + 3 r2 s1 s2 + r1 s3``.
    """
    r1, r2, r3, log_scale = link_derivatives(link, s0)
    expand = (slice(None),) + (None,) * (s1.ndim - 1)
    r1, r2, r3 = (r.astype(s1.dtype)[expand] for r in (r1, r2, r3))
    d1 = r1 * s1
    d2 = r2 * s1 * s1 + r1 * s2
    d3 = r3 * s1 * s1 * s1 + 3.0 * r2 * s1 * s2 + r1 * s3
    return d1, d2, d3, log_scale


# --------------------------------------------------------------------------- targets


def _class_logit(out: jax.Array, c: jax.Array, data: Any) -> jax.Array:
    return out[c]


def _log_softmax_c(out: jax.Array, c: jax.Array, data: Any) -> jax.Array:
    return out[c] - jax.nn.logsumexp(out)


def _rest_score(out: jax.Array, c: jax.Array, data: Any) -> jax.Array:
    return 2.0 * out[c] - jax.nn.logsumexp(out)


@dataclasses.dataclass(frozen=True)
class Target:
    """A differentiable scalar of one image's model output: ``psi(inner(out, c, data))``.

    Attributes:
      name: printable name.
      inner: ``(out, c, data) -> scalar`` for one image (``out`` the image's output
        pytree, ``c`` its int32 class, ``data`` its slice of :attr:`data`).
      link: ``"identity"`` | ``"exp"`` | ``"sigmoid"`` (see :func:`link_derivatives`).
      kind: how ``inner`` depends on the output: ``"linear"`` (a linear functional:
        one VJP gives every coordinate's derivative through a piecewise-linear
        head), ``"log_softmax"`` / ``"rest"`` (closed forms over the classes), or
        ``"general"``.
      needs_class: whether ``c`` is used (classifiers: default the argmax).
      classifier: whether ``out`` must be a ``(C,)`` logit vector.
      data: per-image arrays (leading batch axis) or arrays shared by all images
        (e.g. a segmentation mask); passed to ``inner`` as traced values, so a
        new mask does not recompile. Not part of equality or hashing.
    """

    name: str
    inner: Callable[[Any, jax.Array, Any], jax.Array]
    link: str = "identity"
    kind: str = "general"
    needs_class: bool = True
    classifier: bool = False
    data: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
    batched_data: bool = dataclasses.field(default=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.link not in LINKS:
            raise ValueError(f"Unknown link {self.link!r}; use one of {LINKS}.")
        if self.kind not in KINDS:
            raise ValueError(f"Unknown target kind {self.kind!r}; use one of {KINDS}.")

    def value(self, out: Any, c: jax.Array, data: Any = None) -> jax.Array:
        """``psi(inner(out, c, data))`` for one image."""
        return link_value(self.link, self.inner(out, c, data))

    def score(self, out: Any, c: jax.Array, data: Any = None) -> jax.Array:
        """The linear score the closed form (eq. 19) differentiates: the inner score of
        a linear target, the class logit of a classifier target, else the inner score."""
        if self.kind != "linear" and self.classifier:
            return out[c]
        return self.inner(out, c, data)


def _named(name: str) -> Target:
    return {
        "exp": Target("exp", _class_logit, "exp", "linear", classifier=True),
        "logit": Target("logit", _class_logit, "identity", "linear", classifier=True),
        "sigmoid": Target("sigmoid", _class_logit, "sigmoid", "linear", classifier=True),
        "softmax": Target("softmax", _log_softmax_c, "exp", "log_softmax", classifier=True),
        "log_softmax": Target("log_softmax", _log_softmax_c, "identity", "log_softmax",
                              classifier=True),
        "rest": Target("rest", _rest_score, "identity", "rest", classifier=True),
    }[name]


@dataclasses.dataclass(frozen=True)
class _Custom:
    """``inner(out, c, data) = fn(out, c)``; a dataclass so that targets built from the
    same function compare equal (explain's compile cache is keyed by targets)."""

    fn: Callable[[Any, jax.Array], jax.Array]
    drop_class: bool = False

    def __call__(self, out: Any, c: jax.Array, data: Any) -> jax.Array:
        return self.fn(out) if self.drop_class else self.fn(out, c)


def custom(
    fn: Callable[[Any, jax.Array], jax.Array],
    *,
    link: str = "identity",
    linear: bool = False,
    needs_class: bool = True,
    name: str | None = None,
) -> Target:
    """A target ``psi(fn(out, c))`` from a function of one image's output.

    ``fn(out, c) -> scalar`` must be three times differentiable. ``linear=True``
    declares ``fn`` linear in ``out`` (then the ``factored`` engine needs one VJP
    instead of the full Jacobian; it is not checked, so only declare it when true).
    A plain callable passed as ``target=`` is ``custom(callable)``.
    """
    if not callable(fn):
        raise ValueError(f"custom target needs a callable fn(out, c) -> scalar, got {fn!r}.")
    label = name or getattr(fn, "__name__", type(fn).__name__)
    return Target(label, _Custom(fn), link, "linear" if linear else "general",
                  needs_class=needs_class)


@dataclasses.dataclass(frozen=True)
class _OutputValue:
    """``out[index]``, or the single value of ``out`` when ``index`` is None."""

    index: Any = None

    def __call__(self, out: Any, c: jax.Array, data: Any) -> jax.Array:
        arr = jnp.asarray(out)
        if self.index is None:
            if arr.size != 1:
                raise ValueError(
                    f"the regression target needs one output value per image, but the "
                    f"output has shape {arr.shape} per image; pass index=... (a position in "
                    "that shape) or fn=... (a scalar function of it)."
                )
            return arr.reshape(())
        return arr[self.index]


def regression(
    index: int | tuple[int, ...] | None = None,
    fn: Callable[[Any], jax.Array] | None = None,
    *,
    link: str = "identity",
) -> Target:
    """Explain a regression output: ``out[index]`` (``index`` into one image's output
    array; None when the output has exactly one value per image), or ``fn(out)``.

    The closed form assumes ``exp`` of a logit through a piecewise-linear head; with
    the identity link a regression output's exact ``D2`` through such a head is 0
    (Grad-CAM++ is then degenerate, explain says so): use ``link="exp"`` for the
    paper's Grad-CAM++ of ``exp(out)``, or a smooth head.
    """
    if fn is not None:
        if index is not None:
            raise ValueError("regression takes index= or fn=, not both.")
        if not callable(fn):
            raise ValueError(f"regression fn must be callable fn(out) -> scalar, got {fn!r}.")
        return Target(f"regression({getattr(fn, '__name__', 'fn')})",
                      _Custom(fn, drop_class=True), link, "general", needs_class=False)
    if isinstance(index, list):
        index = tuple(index)
    return Target("regression" if index is None else f"regression[{index}]",
                  _OutputValue(index), link, "linear", needs_class=False)


@dataclasses.dataclass(frozen=True)
class _MaskedClassSum:
    """``sum_ij mask_ij out[i, j, c]`` (mask from the target's data, or a box)."""

    box: tuple[int, int, int, int] | None = None

    def __call__(self, out: Any, c: jax.Array, data: Any) -> jax.Array:
        if out.ndim != 3:
            raise ValueError(
                f"the segmentation target needs a (H, W, C) output per image (channels "
                f"last), got shape {out.shape}."
            )
        scores = out[:, :, c]
        if data is not None:
            if data.shape != scores.shape:
                raise ValueError(
                    f"segmentation mask has shape {data.shape} per image but the output is "
                    f"{scores.shape[0]}x{scores.shape[1]}; give the mask at the output's "
                    "resolution."
                )
            return jnp.sum(scores * data.astype(scores.dtype))
        if self.box is not None:
            y0, x0, y1, x1 = self.box
            if y1 > scores.shape[0] or x1 > scores.shape[1]:
                raise ValueError(f"box {self.box!r} exceeds the {scores.shape} output.")
            return jnp.sum(scores[y0:y1, x0:x1])
        return jnp.sum(scores)


def segmentation(
    mask: Any = None,
    box: tuple[int, int, int, int] | None = None,
    *,
    link: str = "identity",
) -> Target:
    """pytorch-grad-cam's ``SemanticSegmentationTarget``: ``s = sum_ij mask_ij
    out[i, j, c]`` for a segmentation output ``(H, W, C)`` per image (channels last)
    and the explained class ``c`` (``class_idx=``, required).

    ``mask``: ``(H, W)`` for every image or ``(B, H, W)`` one per image (bool or
    float weights), at the output's resolution; or ``box=(y0, x0, y1, x1)``
    (half-open pixel ranges); neither: the whole image. Linear in the output.
    With the identity link the exact ``D2`` through a piecewise-linear decoder
    is 0; ``link="exp"`` gives the paper's Grad-CAM++ of ``exp(s)``.
    """
    if mask is not None and box is not None:
        raise ValueError("segmentation takes mask= or box=, not both.")
    if box is not None:
        if len(box) != 4 or not all(isinstance(v, int | np.integer) for v in box):
            raise ValueError(f"box must be four ints (y0, x0, y1, x1), got {box!r}.")
        box = tuple(int(v) for v in box)
        if not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
            raise ValueError(f"box {box!r} is empty or negative; need 0 <= y0 < y1, 0 <= x0 < x1.")
    data, batched = None, False
    if mask is not None:
        data = jnp.asarray(mask)
        if data.ndim not in (2, 3):
            raise ValueError(
                f"segmentation mask must be (H, W) or (B, H, W), got shape {data.shape}."
            )
        batched = data.ndim == 3
    return Target("segmentation", _MaskedClassSum(box), link, "linear", needs_class=True,
                  data=data, batched_data=batched)


TargetSpec = str | Target | TargetFn


def as_target(target: Any) -> Target:
    """A :class:`Target` for a name in :data:`TARGETS`, a Target, or a callable
    ``phi(out, c) -> scalar`` (as :func:`custom`); else ValueError."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(
                f"Unknown target {target!r}. Use one of {TARGETS}, a jaxcam.targets.Target "
                "(regression(...), segmentation(...), custom(...)), or a callable "
                "phi(out, c) -> scalar of one image's output and class index c."
            )
        return _named(target)
    if callable(target):
        return custom(target)
    raise ValueError(
        f"target must be one of {TARGETS}, a jaxcam.targets.Target or a callable "
        f"phi(out, c) -> scalar, got {target!r}."
    )


def validate_target(target: Any) -> Any:
    """Return ``target`` unchanged if :func:`as_target` accepts it, else raise."""
    as_target(target)
    return target


def target_name(target: Any) -> str:
    """A printable name: the target's own name, or the callable's ``__name__``."""
    return as_target(target).name


def get_target(target: Any) -> TargetFn:
    """The per-image value function ``phi(out, c) -> scalar`` (without per-image data)."""
    t = as_target(target)
    return lambda out, c: t.value(out, c, t.data)


def target_scores(target: Any, logits: jax.Array, class_idx: jax.Array) -> jax.Array:
    """``phi(S_b, c_b)`` for every image: logits ``(B, C)``, classes ``(B,)`` -> ``(B,)``."""
    return jax.vmap(get_target(target))(logits, class_idx)


def target_grad_logits(target: Any, logits: jax.Array, class_idx: jax.Array) -> jax.Array:
    """``d phi / d S`` per image, ``(B, C)``: the cotangent that turns one VJP of the
    head into ``D1 = dy/dA`` for any target (chain rule)."""
    return jax.vmap(jax.grad(get_target(target)))(logits, class_idx)


def per_image_data(target: Target, batch: int) -> Any:
    """The target's data with a leading batch axis of ``batch`` (broadcast if shared)."""
    if target.data is None:
        return None
    if target.batched_data:
        lead = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(target.data)}
        if lead != {batch}:
            raise ValueError(
                f"target {target.name!r} has per-image data for {sorted(lead)} images but "
                f"{batch} images are explained; give one entry per image, or a single "
                "entry for all."
            )
        return target.data
    return jax.tree.map(lambda d: jnp.broadcast_to(d, (batch,) + jnp.shape(d)), target.data)


def inner_scores(target: Target, outputs: Any, class_idx: jax.Array, data: Any) -> jax.Array:
    """The inner score of every image, ``(B,)``: ``outputs`` a pytree with leading B."""
    if data is None:
        return jax.vmap(lambda o, c: target.inner(o, c, None))(outputs, class_idx)
    return jax.vmap(target.inner)(outputs, class_idx, data)


def select_class(logits: Any, class_idx: Any = None) -> jax.Array:
    """The explained class per image, ``(B,)`` int32.

    ``class_idx=None`` picks the argmax of each image's logits; an int applies
    to every image; a sequence/array gives one class per image. Concrete
    values are range-checked (``ValueError`` naming the bad entry).
    """
    batch, num_classes = logits.shape
    if class_idx is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return check_class_idx(class_idx, batch, num_classes)


def check_class_idx(class_idx: Any, batch: int, num_classes: int | None) -> jax.Array:
    """``class_idx`` (int, sequence or array; concrete or traced) as ``(B,)`` int32,
    range-checked against ``num_classes`` when concrete (None: not checked)."""
    if isinstance(class_idx, jax.core.Tracer):
        idx = jnp.asarray(class_idx).astype(jnp.int32)
        return jnp.broadcast_to(idx, (batch,)) if idx.ndim == 0 else idx
    arr = np.asarray(class_idx)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"class_idx must be integers, got dtype {arr.dtype}.")
    if arr.ndim == 0:
        arr = np.full((batch,), int(arr))
    if arr.shape != (batch,):
        raise ValueError(
            f"class_idx has shape {arr.shape}; give one class per image, shape ({batch},), "
            "a single int for all images, or None for each image's argmax."
        )
    limit = np.inf if num_classes is None else num_classes
    bad = np.flatnonzero((arr < 0) | (arr >= limit))
    if bad.size:
        raise ValueError(
            f"class_idx[{bad[0]}] = {arr[bad[0]]} is out of range for a model with "
            f"{num_classes} classes (valid: 0..{num_classes - 1})."
        )
    return jnp.asarray(arr, dtype=jnp.int32)


def inner_directional(
    kind: str, logits: jax.Array, class_idx: jax.Array,
    v_c: jax.Array, m1: jax.Array, m2: jax.Array, m3: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``d^n/dt^n s(S + t v)`` at ``t = 0`` (n = 1, 2, 3) of the classifier inner
    scores, from moments of the direction ``v`` (one C-vector per coordinate).

    Inputs per image (leading axis ``B``; trailing axes are the coordinates):
    ``v_c`` the class component of ``v``; ``m_k = sum_j p_j (v_j - v_c)^k`` with
    ``p = softmax(S)`` (raw moments shifted by ``v_c``: the shift keeps float32
    cancellation small because ``p`` is often peaked at ``c``). With
    ``k2 = m2 - m1^2`` and ``k3 = m3 - 3 m1 m2 + 2 m1^3`` (the cumulants of ``v``
    under ``p``, the derivatives of ``logsumexp(S + t v)`` beyond the first):

    - linear (``S_c``): ``(v_c, 0, 0)``;
    - log_softmax (``S_c - lse``): ``(-m1, -k2, -k3)``;
    - rest (``2 S_c - lse``): ``(v_c - m1, -k2, -k3)``.
    """
    del logits, class_idx
    if kind == "linear":
        zero = jnp.zeros_like(v_c)
        return v_c, zero, zero
    k2 = m2 - m1**2
    k3 = m3 - 3.0 * m1 * m2 + 2.0 * m1**3
    if kind == "log_softmax":
        return -m1, -k2, -k3
    if kind == "rest":
        return v_c - m1, -k2, -k3
    raise ValueError(f"No closed-form directional derivatives for target kind {kind!r}.")


def directional_derivatives(
    target: str,
    logits: jax.Array,
    class_idx: jax.Array,
    v_c: jax.Array,
    m1: jax.Array,
    m2: jax.Array,
    m3: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """True ``d^n/dt^n phi(S + t v)`` (n = 1, 2, 3) of a named classifier target:
    :func:`inner_directional` composed with the target's link, times ``exp(L)``.

    E.g. exp: ``e^{S_c} (v_c, v_c^2, v_c^3)``; softmax: ``p_c (h1, h1^2 + h2,
    h1^3 + 3 h1 h2 + h3)`` with ``(h1, h2, h3)`` the log_softmax ones. For a
    scale-free result use :func:`inner_directional` and :func:`compose`.
    """
    t = as_target(target)
    s0 = jax.vmap(lambda o, c: t.inner(o, c, None))(logits, class_idx)
    s = inner_directional(t.kind, logits, class_idx, v_c, m1, m2, m3)
    d1, d2, d3, log_scale = compose(t.link, s0, *s)
    scale = jnp.exp(log_scale)[(slice(None),) + (None,) * (v_c.ndim - 1)]
    return scale * d1, scale * d2, scale * d3
