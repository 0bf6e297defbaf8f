"""Targets: the scalar ``y = phi(S, c)`` of the logits ``S`` that a CAM explains.

A target is a function of one image's logits ``S`` (shape ``(C,)``) and its
class index ``c`` (an integer scalar, possibly traced) that returns a scalar:

- ``"exp"``: ``exp(S_c)`` (the Grad-CAM++ paper's choice, Chattopadhay et al. 2018);
- ``"logit"``: ``S_c``;
- ``"softmax"``: ``softmax(S)_c``;
- ``"log_softmax"``: ``log softmax(S)_c = S_c - logsumexp(S)``;
- ``"rest"``: ``2 S_c - logsumexp(S) = S_c + log softmax(S)_c`` (ShapleyCAM's
  "ReST" target, Cai 2025);
- any callable ``phi(S, c) -> scalar`` with the same signature (``S`` a
  ``(C,)`` array, ``c`` an int32 scalar). It must be differentiable three
  times (it is pushed through ``jax.experimental.jet`` / nested ``jax.jvp``).

For the named targets the derivatives along a direction of the logits have
closed forms (used by the ``factored`` engine in ``jaxcam.derivatives``); see
:func:`directional_derivatives`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TARGETS: tuple[str, ...] = ("exp", "logit", "softmax", "log_softmax", "rest")

TargetFn = Callable[[jax.Array, jax.Array], jax.Array]
TargetSpec = str | TargetFn


def _exp(S: jax.Array, c: jax.Array) -> jax.Array:
    return jnp.exp(S[c])


def _logit(S: jax.Array, c: jax.Array) -> jax.Array:
    return S[c]


def _softmax(S: jax.Array, c: jax.Array) -> jax.Array:
    return jnp.exp(S[c] - jax.nn.logsumexp(S))


def _log_softmax(S: jax.Array, c: jax.Array) -> jax.Array:
    return S[c] - jax.nn.logsumexp(S)


def _rest(S: jax.Array, c: jax.Array) -> jax.Array:
    return 2.0 * S[c] - jax.nn.logsumexp(S)


_FUNCTIONS: dict[str, TargetFn] = {
    "exp": _exp,
    "logit": _logit,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
    "rest": _rest,
}


def target_name(target: TargetSpec) -> str:
    """A printable name: the target's own name, or the callable's ``__name__``."""
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", type(target).__name__)


def validate_target(target: Any) -> TargetSpec:
    """Return ``target`` unchanged if it is a known name or a callable, else raise."""
    if isinstance(target, str):
        if target not in _FUNCTIONS:
            raise ValueError(
                f"Unknown target {target!r}. Use one of {TARGETS}, or a callable "
                "phi(S, c) -> scalar of one image's logits S (C,) and class index c."
            )
        return target
    if callable(target):
        return target
    raise ValueError(
        f"target must be one of {TARGETS} or a callable phi(S, c) -> scalar, got {target!r}."
    )


def get_target(target: TargetSpec) -> TargetFn:
    """The per-image function ``phi(S, c) -> scalar`` for a name or a callable."""
    target = validate_target(target)
    return _FUNCTIONS[target] if isinstance(target, str) else target


def target_scores(target: TargetSpec, logits: jax.Array, class_idx: jax.Array) -> jax.Array:
    """``phi(S_b, c_b)`` for every image: logits ``(B, C)``, classes ``(B,)`` -> ``(B,)``."""
    return jax.vmap(get_target(target))(logits, class_idx)


def target_grad_logits(
    target: TargetSpec, logits: jax.Array, class_idx: jax.Array
) -> jax.Array:
    """``d phi / d S`` per image, ``(B, C)``: the cotangent that turns one VJP of the
    head into ``D1 = dy/dA`` for any target (chain rule)."""
    return jax.vmap(jax.grad(get_target(target)))(logits, class_idx)


def select_class(logits: jax.Array, class_idx: Any = None) -> jax.Array:
    """The explained class per image, ``(B,)`` int32.

    ``class_idx=None`` picks the argmax of each image's logits; an int applies
    to every image; a sequence/array gives one class per image. Concrete
    values are range-checked (``ValueError`` naming the bad entry).
    """
    batch, num_classes = logits.shape
    if class_idx is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
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
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        raise ValueError(
            f"class_idx[{bad[0]}] = {arr[bad[0]]} is out of range for a model with "
            f"{num_classes} classes (valid: 0..{num_classes - 1})."
        )
    return jnp.asarray(arr, dtype=jnp.int32)


def directional_derivatives(
    target: str,
    logits: jax.Array,
    class_idx: jax.Array,
    v_c: jax.Array,
    m1: jax.Array,
    m2: jax.Array,
    m3: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Closed-form ``d^n/dt^n phi(S + t v)`` at ``t = 0``, ``n = 1, 2, 3``, for the
    named targets, from moments of the direction ``v`` (C-dim, one per coordinate).

    Inputs per image (leading axis ``B``; trailing axes are the coordinates,
    broadcast): ``v_c`` the class component of ``v``; ``m_k = sum_j p_j (v_j - v_c)^k``
    with ``p = softmax(S)`` (raw moments of ``v`` shifted by ``v_c``; the
    shift keeps float32 cancellation small because ``p`` is often peaked at
    ``c``). With ``mu = E_p[v]``, ``k2 = Var_p[v] = m2 - m1^2`` and
    ``k3 = m3 - 3 m1 m2 + 2 m1^3`` (the cumulants of ``v`` under ``p``, which
    are the derivatives of ``logsumexp(S + t v)``):

    - logit: ``(v_c, 0, 0)``; exp: ``e^{S_c} (v_c, v_c^2, v_c^3)``;
    - log_softmax: ``(v_c - mu, -k2, -k3)`` = ``(-m1, -k2, -k3)``;
    - rest: ``(2 v_c - mu, -k2, -k3)``;
    - softmax: ``p_c (h1, h1^2 + h2, h1^3 + 3 h1 h2 + h3)`` with ``(h1, h2, h3)``
      the log_softmax derivatives (Faa di Bruno for ``exp`` of it).
    """
    expand = (slice(None),) + (None,) * (v_c.ndim - 1)
    s_c = jnp.take_along_axis(logits, class_idx[:, None], axis=1)[:, 0][expand]
    if target == "logit":
        zero = jnp.zeros_like(v_c)
        return v_c, zero, zero
    if target == "exp":
        e = jnp.exp(s_c)
        return e * v_c, e * v_c**2, e * v_c**3
    k2 = m2 - m1**2
    k3 = m3 - 3.0 * m1 * m2 + 2.0 * m1**3
    if target == "log_softmax":
        return -m1, -k2, -k3
    if target == "rest":
        return v_c - m1, -k2, -k3
    if target == "softmax":
        p_c = jnp.exp(s_c - jax.nn.logsumexp(logits, axis=1)[expand])
        h1, h2, h3 = -m1, -k2, -k3
        return p_c * h1, p_c * (h1**2 + h2), p_c * (h1**3 + 3.0 * h1 * h2 + h3)
    raise ValueError(f"No closed-form directional derivatives for target {target!r}.")


# Targets whose directional derivatives need only the class row of the Jacobian.
ROW_ONLY_TARGETS: tuple[str, ...] = ("exp", "logit")
