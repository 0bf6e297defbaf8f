"""Exact diagonal derivatives ``D_n = d^n f / d A_i^n`` (n = 1, 2, 3) of a CAM target.

``f(A) = phi(head(A))`` maps target-layer activations ``A`` (B, h, w, K) to one
scalar per image (B,). Grad-CAM++ needs the *diagonal* second and third
derivatives (one number per activation), which plain reverse mode does not
give. Four engines, compared in ``docs/derivatives.md``:

- ``taylor``: exact for any head. Per coordinate ``i`` the restriction
  ``t -> f(A + t e_i)`` is pushed through Taylor mode with symbolic zero
  terms (:func:`jaxcam.series.line_derivatives`: ``jet``'s rules, but only the
  nonzero terms cross linear layers; nested ``jax.jvp`` for primitives jet has
  no rule for), ``vmap``-batched over coordinates in chunks (``jax.lax.map(batch_size=...)``)
  so that memory is bounded. Cost: ``N = h*w*K`` head evaluations.
- ``factored``: exact when the head is piecewise linear at ``A``
  (``S(A + t e_i) = S + t J_i``, ``J = dS/dA``): ``D_n,i = d^n/dt^n phi(S + t J_i)``.
  For ``exp``/``logit`` only the class row ``J_c = dS_c/dA`` (one VJP) is
  needed; for ``softmax``/``log_softmax``/``rest`` the derivatives are
  cumulants of ``J_i`` under ``p = softmax(S)`` (one VJP per class, streamed
  in chunks; or analytic when the head is GAP + dense); for a callable target,
  per-coordinate jets of the C-dimensional ``phi``. Guarded by the certificate
  :func:`is_piecewise_linear`.
- ``closed_form``: the Grad-CAM++ paper's eq. 19, ``D_n = exp(S_c) g^n`` with
  ``g = dS_c/dA``. Exact only for the ``exp`` target through a piecewise-linear
  head; computed the same way whatever the target (this is what other
  libraries do), so for other targets it is an approximation by definition.
- ``nested_sum``: ``D2 = grad(sum(grad f))``, ``D3 = grad(sum(D2))``: row sums
  of the Hessian / third-derivative tensor, what naive ``GradientTape`` code
  computes. Not a diagonal; kept to measure the difference.

Every image's scalar must depend only on its own activations (eval mode:
running batch-norm statistics, no dropout), so batching is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxcam import targets as targets_lib
from jaxcam.series import line_derivatives

ENGINES: tuple[str, ...] = ("auto", "taylor", "factored", "closed_form", "nested_sum")

# Elements (not bytes) one chunk of per-coordinate / per-class work may hold per
# series term; 2**25 float32 = 128 MiB.
DEFAULT_MEMORY_ELEMENTS = 2**25

Derivatives = tuple[jax.Array, jax.Array, jax.Array]
HeadFn = Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------------- series


def _jvp_series(fun: Callable, x: jax.Array, e: jax.Array):
    """``(d1, d2, d3)`` of ``t -> fun(x + t e)`` at 0 by nested forward mode (the
    certificate's check; :func:`jaxcam.series.line_derivatives` is the fast path)."""

    def first(a):
        return jax.jvp(fun, (a,), (e,))[1]

    def first_second(a):
        return jax.jvp(first, (a,), (e,))

    (d1, d2), (_, d3) = jax.jvp(first_second, (x,), (e,))
    return d1, d2, d3


def _auto_chunk(per_item_elements: int, total: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
        return min(int(chunk_size), total)
    return max(1, min(total, DEFAULT_MEMORY_ELEMENTS // max(per_item_elements, 1)))


# --------------------------------------------------------------------------- engines


def taylor_derivatives(
    f: Callable[[jax.Array], jax.Array], A: jax.Array, *, chunk_size: int | None = None
) -> Derivatives:
    """Exact ``D1, D2, D3`` of any ``f: (B, h, w, K) -> (B,)`` by per-coordinate Taylor mode.

    For each of the ``N = h*w*K`` coordinates ``i`` (the same coordinate in every
    image at once, images being independent) computes the derivatives of
    ``t -> f(A + t e_i)``. Coordinates are processed ``chunk_size`` at a time
    (``vmap`` inside ``jax.lax.map``); peak memory is about
    ``chunk_size * B * N`` elements per series term (default: chunks sized to
    ~2**25 elements).
    """
    batch, coord_shape = A.shape[0], A.shape[1:]
    n = math.prod(coord_shape)
    d1, d2, d3 = taylor_derivatives_at(f, A, jnp.arange(n), chunk_size=chunk_size)
    return tuple(d.reshape((batch,) + coord_shape) for d in (d1, d2, d3))


def taylor_derivatives_at(
    f: Callable[[jax.Array], jax.Array],
    A: jax.Array,
    coordinates: jax.Array,
    *,
    chunk_size: int | None = None,
) -> Derivatives:
    """:func:`taylor_derivatives` at a subset of coordinates only.

    ``coordinates``: (n,) flat indices into ``h*w*K`` (row-major, like
    ``A[b].reshape(-1)``). Returns three (B, n) arrays. Used to get ground truth
    on large layers from a sample of coordinates.
    """
    batch, coord_shape = A.shape[0], A.shape[1:]
    n = math.prod(coord_shape)
    coordinates = jnp.asarray(coordinates, dtype=jnp.int32).reshape(-1)
    chunk = _auto_chunk(batch * n, coordinates.shape[0], chunk_size)

    def direction(idx):
        e = jax.nn.one_hot(idx, n, dtype=A.dtype).reshape(coord_shape)
        return jnp.broadcast_to(e, A.shape)

    def one(idx):
        return jnp.stack(line_derivatives(f, A, direction(idx)))  # (3, B)

    out = jax.lax.map(one, coordinates, batch_size=chunk)  # (n, 3, B)
    out = jnp.moveaxis(out, 0, -1)  # (3, B, n)
    return out[0], out[1], out[2]


def nested_sum_derivatives(f: Callable[[jax.Array], jax.Array], A: jax.Array) -> Derivatives:
    """``D1 = grad f``, ``D2 = grad(sum(D1))``, ``D3 = grad(sum(D2))`` (per image).

    ``D2_i = sum_j d^2 f / dA_i dA_j`` is a Hessian *row sum*, not the diagonal:
    this is what ``tape.gradient(tape.gradient(...))`` code computes. Kept only
    to measure how far that shortcut is from the true diagonal.
    """

    def first(a):
        return jax.grad(lambda z: jnp.sum(f(z)))(a)

    def second(a):
        return jax.grad(lambda z: jnp.sum(first(z)))(a)

    def third(a):
        return jax.grad(lambda z: jnp.sum(second(z)))(a)

    # one compiled program instead of op-by-op dispatch of three nested grads
    return jax.jit(lambda a: (first(a), second(a), third(a)))(A)


def closed_form_from_gradient(score: jax.Array, g: jax.Array) -> Derivatives:
    """Grad-CAM++ eq. 19: ``D_n = exp(S_c) g^n`` from the class logit ``S_c`` (B,) and
    ``g = dS_c/dA`` (B, h, w, K). Exact only for ``exp(S_c)`` through a
    piecewise-linear head."""
    e = jnp.exp(score).reshape((-1,) + (1,) * (g.ndim - 1))
    return e * g, e * g**2, e * g**3


def _class_moments(
    vjp_fn: Callable,
    logits: jax.Array,
    g: jax.Array,
    class_chunk_size: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``m_k = sum_j p_j (J_j - g)^k`` for k = 1, 2, 3, with ``J_j = dS_j/dA`` obtained by
    one VJP per class, ``class_chunk_size`` classes at a time (bounded memory)."""
    batch, num_classes = logits.shape
    n = math.prod(g.shape[1:])
    cc = _auto_chunk(batch * n, num_classes, class_chunk_size)
    n_chunks = -(-num_classes // cc)
    ids = jnp.arange(n_chunks * cc).reshape(n_chunks, cc)
    valid = (ids < num_classes).astype(g.dtype)
    ids = jnp.minimum(ids, num_classes - 1)
    p = jax.nn.softmax(logits, axis=-1)
    expand = (slice(None), slice(None)) + (None,) * (g.ndim - 1)

    def body(carry, xs):
        chunk_ids, chunk_valid = xs
        cot = jnp.broadcast_to(
            jax.nn.one_hot(chunk_ids, num_classes, dtype=logits.dtype)[:, None, :],
            (cc, batch, num_classes),
        )
        J = jax.vmap(lambda ct: vjp_fn(ct)[0])(cot)  # (cc, B, h, w, K)
        u = J - g[None]
        w = (p[:, chunk_ids].T * chunk_valid[:, None])[expand]  # (cc, B, 1, 1, 1)
        wu = w * u
        m1, m2, m3 = carry
        return (m1 + wu.sum(0), m2 + (wu * u).sum(0), m3 + (wu * u * u).sum(0)), None

    zero = jnp.zeros_like(g)
    (m1, m2, m3), _ = jax.lax.scan(body, (zero, zero, zero), (ids, valid))
    return m1, m2, m3


def _linear_head_moments(
    W: jax.Array, logits: jax.Array, class_idx: jax.Array, spatial: tuple[int, int]
) -> tuple[jax.Array, ...]:
    """Row ``g`` and shifted moments for a GAP + dense head, analytically:
    ``J_j(i, k) = W[k, j] / (h w)`` is constant over positions, so everything
    lives on ``(B, K)`` and is broadcast over ``(h, w)``."""
    scale = 1.0 / (spatial[0] * spatial[1])
    Wt = W.T.astype(logits.dtype) * scale  # (C, K)
    g = Wt[class_idx]  # (B, K)
    u = Wt[None] - g[:, None, :]  # (B, C, K)
    p = jax.nn.softmax(logits, axis=-1)
    m1 = jnp.einsum("bc,bck->bk", p, u)
    m2 = jnp.einsum("bc,bck->bk", p, u * u)
    m3 = jnp.einsum("bc,bck->bk", p, u * u * u)
    return tuple(x[:, None, None, :] for x in (g, m1, m2, m3))


def factored_from_vjp(
    logits: jax.Array,
    vjp_fn: Callable,
    A: jax.Array,
    target: targets_lib.TargetSpec,
    class_idx: jax.Array,
    *,
    g: jax.Array | None = None,
    chunk_size: int | None = None,
    class_chunk_size: int | None = None,
    linear_head: tuple[jax.Array, jax.Array] | None = None,
) -> Derivatives:
    """The factored engine given ``(S, vjp_fn) = jax.vjp(head, A)`` (so that a caller
    that already ran the forward/VJP shares it). Assumes the head is piecewise
    linear at ``A`` (not checked here; see :func:`factored_derivatives`)."""
    named = isinstance(target, str)
    if linear_head is not None and named and target not in targets_lib.ROW_ONLY_TARGETS:
        g_, m1, m2, m3 = (
            jnp.broadcast_to(x, A.shape)
            for x in _linear_head_moments(linear_head[0], logits, class_idx, A.shape[1:3])
        )
        return targets_lib.directional_derivatives(target, logits, class_idx, g_, m1, m2, m3)
    if g is None:
        onehot = jax.nn.one_hot(class_idx, logits.shape[1], dtype=logits.dtype)
        g = vjp_fn(onehot)[0]
    if named:
        if target in targets_lib.ROW_ONLY_TARGETS:
            zero = jnp.zeros_like(g)
            return targets_lib.directional_derivatives(
                target, logits, class_idx, g, zero, zero, zero
            )
        m1, m2, m3 = _class_moments(vjp_fn, logits, g, class_chunk_size)
        return targets_lib.directional_derivatives(target, logits, class_idx, g, m1, m2, m3)
    return _factored_callable(logits, vjp_fn, A, target, class_idx, chunk_size)


def _factored_callable(logits, vjp_fn, A, target, class_idx, chunk_size) -> Derivatives:
    """Callable target: the full Jacobian ``J`` (C VJPs, C*B*N elements), then a jet of
    the C-dimensional ``phi`` along each column ``J_i``."""
    phi = targets_lib.get_target(target)
    batch, num_classes = logits.shape
    coord_shape = A.shape[1:]
    n = math.prod(coord_shape)
    eye = jnp.broadcast_to(
        jnp.eye(num_classes, dtype=logits.dtype)[:, None, :], (num_classes, batch, num_classes)
    )
    J = jax.vmap(lambda ct: vjp_fn(ct)[0])(eye)  # (C, B, h, w, K)
    J = jnp.moveaxis(J.reshape(num_classes, batch, n), 0, -1)  # (B, N, C)
    chunk = _auto_chunk(num_classes * 4, n, chunk_size)

    def per_image(s, c, Jb):
        fun = lambda z: phi(z, c)
        def one(v):
            return jnp.stack(line_derivatives(fun, s, v))

        return jax.lax.map(one, Jb, batch_size=chunk)  # (N, 3)

    out = jax.vmap(per_image)(logits, class_idx, J)  # (B, N, 3)
    out = jnp.moveaxis(out, -1, 0).reshape((3, batch) + coord_shape)
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------- certificate


def piecewise_linear_residual(head: HeadFn, A: jax.Array, directions: jax.Array) -> jax.Array:
    """Largest ``|2nd|`` or ``|3rd|`` derivative of any logit along any direction.

    ``directions`` has shape ``(M,) + A.shape``. Computed with nested ``jvp``
    (works through ``jax.nn.relu`` and max-pooling). Exactly 0 iff the head is
    piecewise linear at ``A`` as autodiff sees it; NaN propagates (and fails).
    """

    def along(v):
        d1, d2, d3 = _jvp_series(head, A, v)
        del d1
        return jnp.maximum(jnp.max(jnp.abs(d2)), jnp.max(jnp.abs(d3)))

    return jnp.max(jnp.stack([along(v) for v in directions]))


def is_piecewise_linear(
    head: HeadFn,
    A: jax.Array,
    *,
    num_directions: int = 2,
    key: jax.Array | None = None,
) -> bool:
    """The certificate behind the ``factored`` engine.

    True iff the 2nd and 3rd derivatives of every logit ``head(A)`` along
    ``num_directions`` Gaussian directions are *exactly* 0 (a head of ReLU,
    max/average pooling, dense/conv layers and eval-mode batch norm gives
    structural zeros; any smooth nonlinearity -- softplus, GELU, SiLU -- gives
    non-zeros almost surely). Needs concrete ``A`` and head parameters (it
    returns a Python bool); run it outside ``jit`` and pass the result on.
    """
    if isinstance(A, jax.core.Tracer):
        raise ValueError(
            "is_piecewise_linear needs concrete activations (it returns a Python bool); "
            "call it outside jit/vmap, or pass certified=True/False to "
            "diagonal_derivatives, or use method='taylor'."
        )
    key = jax.random.PRNGKey(0) if key is None else key
    directions = jax.random.normal(key, (num_directions,) + A.shape, dtype=A.dtype)
    try:
        # eager on purpose: jit of a closure would bake the head's weights into the
        # program as constants (slow constant folding for VGG19's 25088x4096 layer)
        return bool(piecewise_linear_residual(head, A, directions) == 0)
    except jax.errors.ConcretizationTypeError as err:
        raise ValueError(
            "is_piecewise_linear needs concrete head parameters; call it outside jit, or "
            "pass certified=True/False to diagonal_derivatives."
        ) from err


def _not_certified_error(residual_hint: str = "") -> ValueError:
    return ValueError(
        "derivatives engine 'factored' needs a piecewise-linear head (ReLU, max/average "
        "pooling, dense/conv, eval-mode batch norm), but the certificate failed: the head's "
        "2nd/3rd derivatives along random directions are not zero (a smooth activation such "
        "as softplus/GELU/SiLU, or dropout/BN in train mode)." + residual_hint + " Use "
        "method='taylor' (exact for any head) or 'auto' (picks the right engine)."
    )


# --------------------------------------------------------------------------- dispatcher


def factored_derivatives(
    head: HeadFn,
    A: jax.Array,
    target: targets_lib.TargetSpec,
    class_idx: Any = None,
    *,
    certified: bool | None = None,
    chunk_size: int | None = None,
    class_chunk_size: int | None = None,
    linear_head: tuple[jax.Array, jax.Array] | None = None,
) -> Derivatives:
    """Factored engine with its certificate (``certified=None`` checks it here)."""
    if certified is None:
        certified = is_piecewise_linear(head, A)
    if not certified:
        raise _not_certified_error()
    logits, vjp_fn = jax.vjp(head, A)
    c = targets_lib.select_class(logits, class_idx)
    return factored_from_vjp(
        logits, vjp_fn, A, target, c, chunk_size=chunk_size,
        class_chunk_size=class_chunk_size, linear_head=linear_head,
    )


def diagonal_derivatives(
    f: Callable[[jax.Array], jax.Array] | None,
    A: jax.Array,
    method: str = "auto",
    *,
    head: HeadFn | None = None,
    target: targets_lib.TargetSpec | None = None,
    class_idx: Any = None,
    chunk_size: int | None = None,
    class_chunk_size: int | None = None,
    certified: bool | None = None,
    linear_head: tuple[jax.Array, jax.Array] | None = None,
) -> Derivatives:
    """Diagonal derivatives ``(D1, D2, D3)``, each shaped like ``A`` (B, h, w, K).

    Two ways to say what is differentiated:

    - ``f``: a function ``(B, h, w, K) -> (B,)`` (each image's value from its own
      activations). Engines: ``taylor``, ``nested_sum``, ``closed_form`` (``f``
      is then read as the class logit ``S_c``: ``D_n = exp(f) (grad f)^n``), and
      ``auto`` (= ``taylor``: a plain ``f`` cannot be factored).
    - ``f=None, head=..., target=...``: ``head: (B, h, w, K) -> (B, C)`` logits and
      a target (name in ``jaxcam.targets.TARGETS`` or callable ``phi(S, c)``),
      ``class_idx`` (None: argmax). Every engine works; ``factored`` and ``auto``
      need this form. ``auto`` = ``factored`` if :func:`is_piecewise_linear`
      certifies the head, else ``taylor``; ``factored`` on an uncertified head
      raises. ``certified`` skips the check (pass it when calling under ``jit``,
      where the certificate cannot be evaluated). ``linear_head=(W, b)`` (from
      ``model.linear_head``) tells ``factored`` that the head is GAP + dense, so
      that the class Jacobian is formed analytically.

    ``chunk_size``: coordinates per vectorised chunk (``taylor``, callable
    targets); ``class_chunk_size``: classes per chunk of VJPs (``factored`` with
    softmax-type targets). ``None`` sizes chunks to ~2**25 elements.

    Example::

        head = lambda A: model.head(variables, A, "layer4")
        D1, D2, D3 = diagonal_derivatives(None, A, head=head, target="softmax")
    """
    if method not in ENGINES:
        raise ValueError(f"Unknown derivatives method {method!r}; use one of {ENGINES}.")
    if A.ndim != 4:
        raise ValueError(f"A must be a batch of activations (B, h, w, K), got shape {A.shape}.")
    if (f is None) == (head is None):
        raise ValueError(
            "Give exactly one of f (a function (B,h,w,K) -> (B,)) or head= with target= "
            "(logits function and target)."
        )
    if f is not None:
        if method == "factored":
            raise ValueError(
                "method='factored' needs the head and the target separately: call "
                "diagonal_derivatives(None, A, 'factored', head=..., target=..., class_idx=...)."
            )
        if method in ("auto", "taylor"):
            return taylor_derivatives(f, A, chunk_size=chunk_size)
        if method == "nested_sum":
            return nested_sum_derivatives(f, A)
        score, vjp_fn = jax.vjp(f, A)
        return closed_form_from_gradient(score, vjp_fn(jnp.ones_like(score))[0])

    if target is None:
        raise ValueError(f"head= needs target= (one of {targets_lib.TARGETS} or a callable).")
    targets_lib.validate_target(target)
    logits = jax.eval_shape(head, A)
    if len(logits.shape) != 2 or logits.shape[0] != A.shape[0]:
        raise ValueError(f"head must map (B, h, w, K) to logits (B, C), got {logits.shape}.")
    if method in ("auto", "factored"):
        if certified is None:
            certified = is_piecewise_linear(head, A)
        if certified:
            return factored_derivatives(
                head, A, target, class_idx, certified=True, chunk_size=chunk_size,
                class_chunk_size=class_chunk_size, linear_head=linear_head,
            )
        if method == "factored":
            raise _not_certified_error()
        method = "taylor"
    S, vjp_fn = jax.vjp(head, A)
    c = targets_lib.select_class(S, class_idx)
    if method == "closed_form":
        onehot = jax.nn.one_hot(c, S.shape[1], dtype=S.dtype)
        s_c = jnp.take_along_axis(S, c[:, None], axis=1)[:, 0]
        return closed_form_from_gradient(s_c, vjp_fn(onehot)[0])
    phi = targets_lib.get_target(target)
    f = lambda a: jax.vmap(phi)(head(a), c)
    if method == "taylor":
        return taylor_derivatives(f, A, chunk_size=chunk_size)
    return nested_sum_derivatives(f, A)
