"""Exact diagonal derivatives ``D_n = d^n y / d A_i^n`` (n = 1, 2, 3) of a CAM target.

``y = psi(s)``, ``s = inner(head(A))`` (``jaxcam.targets``) maps target-layer
activations ``A`` (B, ...) to one scalar per image. Grad-CAM++ needs the
*diagonal* second and third derivatives (one number per activation), which
plain reverse mode does not give. Every engine computes the derivatives
``s_1, s_2, s_3`` of the *inner score* along each coordinate line
``A + t e_i`` and composes them with the target's link
(:func:`jaxcam.targets.compose`), so the result is scale-free: the true
derivatives are ``exp(log_scale) * D_n`` with a positive per-image factor
(``e^{S_c}`` for ``exp``) that is reported, never multiplied in.

Engines, compared in ``docs/derivatives.md``:

- ``taylor``: exact for any head. Per coordinate ``i`` the line is pushed
  through Taylor mode with symbolic zero terms
  (:func:`jaxcam.series.line_derivatives`), ``vmap``-batched over coordinates in
  chunks (``jax.lax.map(batch_size=...)``) so that memory is bounded. Cost:
  ``N`` head evaluations (``N`` coordinates).
- ``factored``: exact when the head is piecewise linear at ``A``
  (``out(A + t e_i) = out + t J_i``, ``J = d out / dA``). A linear inner score
  (class logit, regression output, masked segmentation sum) needs one VJP
  (``s_1 = ds/dA``, ``s_2 = s_3 = 0``); ``log_softmax``/``rest``-type scores are
  cumulants of ``J_i`` under ``p = softmax(S)`` (one VJP per class, streamed in
  chunks; analytic when the head is GAP + dense); a general score takes the full
  Jacobian (one VJP per output value) and a jet of the score along each column.
  Guarded by the certificate :func:`certify`.
- ``closed_form``: the Grad-CAM++ paper's eq. 19, ``D_n = exp(S_c) g^n`` with
  ``g = dS_c/dA`` (or the gradient of the target's linear score). Exact only for
  ``exp`` of a linear score through a piecewise-linear head; computed the same
  way whatever the target (what other libraries do).
- ``nested_sum``: ``D2 = grad(sum(grad y))``, ``D3 = grad(sum(D2))``: row sums
  of the Hessian / third-derivative tensor, what naive ``GradientTape`` code
  computes. Not a diagonal; kept to measure the difference.

**The certificate.** :func:`certify` decides, by tracing only, whether the head
is piecewise linear *by construction* (every primitive from ``A`` to the output
linear, piecewise linear or bilinear with a constant operand: the 2nd and 3rd
Taylor coefficients along any line are symbolic zeros of
:func:`jaxcam.series.line_terms`). It needs no concrete values, so it works
under ``jit``, costs no execution, and is decided once per compilation.
:func:`is_piecewise_linear` is the numerical check (exact zeros along random
directions), kept as an independent oracle.

Every image's scalar must depend only on its own activations (eval mode:
running batch-norm statistics, no dropout), so batching is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from jaxcam import methods as methods_lib
from jaxcam import series
from jaxcam import targets as targets_lib
from jaxcam.series import line_derivatives

ENGINES: tuple[str, ...] = ("auto", "taylor", "factored", "closed_form", "nested_sum")
EXACT_ENGINES: tuple[str, ...] = ("auto", "factored", "taylor")

# Elements (not bytes) one chunk of per-coordinate / per-class work may hold per
# series term; 2**25 float32 = 128 MiB.
DEFAULT_MEMORY_ELEMENTS = 2**25

HeadFn = Callable[[jax.Array], Any]
GridFn = Callable[[jax.Array], jax.Array]


class Derivatives(NamedTuple):
    """Diagonal derivatives up to a positive per-image factor.

    The true ``d^n y / dA_i^n`` is ``exp(log_scale[b]) * Dn[b, i]``. Shapes: ``D1,
    D2, D3`` like the (grid) activations; ``log_scale`` ``(B,)``.
    """

    D1: jax.Array
    D2: jax.Array
    D3: jax.Array
    log_scale: jax.Array

    def true(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``exp(log_scale) * Dn``: the derivatives themselves (may over/underflow)."""
        scale = jnp.exp(self.log_scale).astype(self.D1.dtype)
        scale = scale.reshape((-1,) + (1,) * (self.D1.ndim - 1))
        return scale * self.D1, scale * self.D2, scale * self.D3


# --------------------------------------------------------------------------- series


def _jvp_series(fun: Callable, x: jax.Array, e: jax.Array):
    """``(d1, d2, d3)`` of ``t -> fun(x + t e)`` at 0 by nested forward mode (the
    numerical certificate's check; :func:`jaxcam.series.line_derivatives` is the
    fast path)."""

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
) -> tuple[jax.Array, jax.Array, jax.Array]:
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
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


RowHeadFn = Callable[[jax.Array, jax.Array], Any]


def _grid_tokens(A: jax.Array, grid: GridFn) -> tuple[np.ndarray, tuple[int, int]] | None:
    """``(tokens (h*w,), (h, w))`` when ``A`` is (B, N, D) tokens and the grid's cell
    ``(i, j)`` holds exactly the D values of one token, in order; else None."""
    if A.ndim != 3:
        return None
    n, d = A.shape[1:]
    with jax.ensure_compile_time_eval():
        coords = np.asarray(grid(jnp.arange(n * d, dtype=jnp.int32).reshape(1, n, d)))
    if coords.ndim != 4 or coords.shape[-1] != d:
        return None
    cells = coords[0].reshape(-1, d)
    if not (np.all(cells % d == np.arange(d)) and np.all(cells // d == cells[:, :1] // d)):
        return None
    return cells[:, 0] // d, coords.shape[1:3]


def taylor_rows(
    s_row: Callable[[jax.Array, jax.Array], jax.Array],
    A: jax.Array,
    tokens: Any,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`taylor_derivatives` for token activations ``A`` (B, N, D), one token row
    at a time: ``(s1, s2, s3)`` of shape (B, T, D) at the ``T`` rows ``tokens``.

    ``s_row(t, a) -> (B,)`` is the score with row ``t`` of ``A`` replaced by ``a``
    (B, D), every other row held at its value. It equals ``s(A.at[:, t].set(a))``
    and is exact for the same reason, but may compute only what row ``t`` reaches: a
    ViT head at the last block's first LayerNorm, read at the class token, needs the
    perturbed token's key and value rows and one token's MLP per coordinate instead
    of the whole block over every token (about N times less work).
    """
    batch, _, d = A.shape
    tokens = jnp.asarray(tokens, jnp.int32)
    chunk = _auto_chunk(batch * d, d, chunk_size)

    def per_token(t):
        a0 = jax.lax.dynamic_index_in_dim(A, t, axis=1, keepdims=False)  # (B, D)
        f = lambda a: s_row(t, a)

        def one(k):
            e = jnp.broadcast_to(jax.nn.one_hot(k, d, dtype=A.dtype), a0.shape)
            return jnp.stack(line_derivatives(f, a0, e))  # (3, B)

        return jax.lax.map(one, jnp.arange(d), batch_size=chunk)  # (D, 3, B)

    out = jax.lax.map(per_token, tokens)  # (T, D, 3, B)
    out = jnp.transpose(out, (2, 3, 0, 1))  # (3, B, T, D)
    return out[0], out[1], out[2]


def nested_sum_derivatives(f: Callable[[jax.Array], jax.Array], A: jax.Array):
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


def closed_form_from_gradient(score: jax.Array, g: jax.Array):
    """Grad-CAM++ eq. 19: ``D_n = exp(S_c) g^n`` from the class logit ``S_c`` (B,) and
    ``g = dS_c/dA`` (B, ...). Exact only for ``exp(S_c)`` through a piecewise-linear
    head. (Forms ``exp(S_c)``; the engines use the scale-free ``(g, g^2, g^3)`` with
    ``log_scale = S_c``.)"""
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


def _inner_cotangent(target: targets_lib.Target, out: Any, c: jax.Array, data: Any) -> Any:
    """``d s / d out`` per image (a pytree like ``out``): with one VJP of the head it
    gives ``ds/dA`` for any target (chain rule)."""
    if data is None:
        return jax.vmap(jax.grad(lambda o, ci: target.inner(o, ci, None)))(out, c)
    return jax.vmap(jax.grad(target.inner))(out, c, data)


def _score_cotangent(target: targets_lib.Target, out: Any, c: jax.Array, data: Any) -> Any:
    """``d score / d out`` of the closed form's linear score (:meth:`Target.score`)."""
    if data is None:
        return jax.vmap(jax.grad(lambda o, ci: target.score(o, ci, None)))(out, c)
    return jax.vmap(jax.grad(target.score))(out, c, data)


def _flat_outputs(out: Any) -> tuple[jax.Array, Callable]:
    """``out`` (pytree, leading B) -> ``(B, M)`` and the per-image unflatten."""
    flat = jax.vmap(lambda o: jax.flatten_util.ravel_pytree(o)[0])(out)
    one = jax.tree.map(lambda x: x[0], out)
    return flat, jax.flatten_util.ravel_pytree(one)[1]


def output_size(out: Any) -> int:
    """Values per image of a (batched) output pytree."""
    return sum(math.prod(x.shape[1:]) for x in jax.tree_util.tree_leaves(out))


def factored_series(
    out: Any,
    vjp_fn: Callable,
    A: jax.Array,
    target: targets_lib.Target,
    c: jax.Array,
    data: Any = None,
    *,
    u: jax.Array | None = None,
    chunk_size: int | None = None,
    class_chunk_size: int | None = None,
    linear_head: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(s1, s2, s3)``: derivatives of the inner score along every coordinate line,
    given ``(out, vjp_fn) = jax.vjp(head, A)`` with the head piecewise linear at ``A``
    (not checked here). ``u``: ``ds/dA`` if the caller already has it."""
    if target.kind == "linear":
        if u is None:
            u = vjp_fn(_inner_cotangent(target, out, c, data))[0]
        zero = jnp.zeros_like(u)
        return u, zero, zero
    if target.kind in ("log_softmax", "rest"):
        if linear_head is not None:
            g, m1, m2, m3 = (jnp.broadcast_to(x, A.shape) for x in
                             _linear_head_moments(linear_head[0], out, c, A.shape[1:3]))
        else:
            onehot = jax.nn.one_hot(c, out.shape[1], dtype=out.dtype)
            g = vjp_fn(onehot)[0]
            m1, m2, m3 = _class_moments(vjp_fn, out, g, class_chunk_size)
        return targets_lib.inner_directional(target.kind, out, c, g, m1, m2, m3)
    return _factored_general(out, vjp_fn, A, target, c, data, chunk_size)


def _factored_general(out, vjp_fn, A, target, c, data, chunk_size):
    """General score: the full Jacobian ``J`` (M VJPs, M*B*N elements), then a jet of
    the score along each column ``J_i`` (M-dimensional)."""
    flat, unflatten = _flat_outputs(out)
    batch, m = flat.shape
    coord_shape = A.shape[1:]
    n = math.prod(coord_shape)
    eye = jnp.broadcast_to(jnp.eye(m, dtype=flat.dtype)[:, None, :], (m, batch, m))
    J = jax.vmap(lambda ct: vjp_fn(jax.vmap(unflatten)(ct))[0])(eye)  # (M, B, ...)
    J = jnp.moveaxis(J.reshape(m, batch, n), 0, -1)  # (B, N, M)
    chunk = _auto_chunk(m * 4, n, chunk_size)

    def per_image(o, ci, di, Jb):
        fun = lambda z: target.inner(unflatten(z), ci, di)

        def one(v):
            return jnp.stack(line_derivatives(fun, o, v))

        return jax.lax.map(one, Jb, batch_size=chunk)  # (N, 3)

    if data is None:
        res = jax.vmap(lambda o, ci, Jb: per_image(o, ci, None, Jb))(flat, c, J)
    else:
        res = jax.vmap(per_image)(flat, c, data, J)  # (B, N, 3)
    res = jnp.moveaxis(res, -1, 0).reshape((3, batch) + coord_shape)
    return res[0], res[1], res[2]


def hessian_activation_product(
    head: HeadFn, A: jax.Array, target: targets_lib.Target, c: jax.Array, data: Any = None
) -> tuple[jax.Array, jax.Array]:
    """``(H A, log_scale)``: the Hessian of the target w.r.t. ``A`` applied to ``A``
    (ShapleyCAM), up to the factor ``exp(log_scale)``, per image.

    With ``y = psi(s)``: ``H_y A = psi'' (grad s . A) grad s + psi' (H_s A)``; divided
    by ``exp(L)``: ``r2 (grad s . A) grad s + r1 (H_s A)``, ``(grad s, H_s A)`` by
    forward-over-reverse (:func:`jaxcam.methods.hessian_times_activations`).
    """
    s_fn = lambda a: targets_lib.inner_scores(target, head(a), c, data)
    g = jax.grad(lambda a: jnp.sum(s_fn(a)))(A)
    hs_a = methods_lib.hessian_times_activations(s_fn, A)
    r1, r2, _, log_scale = targets_lib.link_derivatives(target.link, jax.lax.stop_gradient(
        s_fn(A)))
    expand = (slice(None),) + (None,) * (A.ndim - 1)
    g_dot_a = jnp.sum((g * A).reshape(A.shape[0], -1), axis=1)
    return r2[expand] * g_dot_a[expand] * g + r1[expand] * hs_a, log_scale


# --------------------------------------------------------------------------- certificate


def certify(head: HeadFn, A: Any) -> bool:
    """The ``factored`` engine's certificate: ``head`` is piecewise linear in ``A`` by
    construction (:func:`jaxcam.series.is_structurally_piecewise_linear`; tracing only,
    works on abstract or traced ``A``). A ReLU / max-pool / dense / conv / eval-mode
    batch-norm head certifies; softplus, GELU, SiLU, LayerNorm, softmax attention or
    train-mode batch norm do not."""
    return series.is_structurally_piecewise_linear(head, A)


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
    """The numerical certificate (an oracle for :func:`certify`).

    True iff the 2nd and 3rd derivatives of every logit ``head(A)`` along
    ``num_directions`` Gaussian directions are *exactly* 0 (a head of ReLU,
    max/average pooling, dense/conv layers and eval-mode batch norm gives
    structural zeros; any smooth nonlinearity -- softplus, GELU, SiLU -- gives
    non-zeros almost surely). Needs concrete ``A`` and head parameters (it
    returns a Python bool); use :func:`certify` under ``jit``.
    """
    if isinstance(A, jax.core.Tracer):
        raise ValueError(
            "is_piecewise_linear needs concrete activations (it returns a Python bool); "
            "call it outside jit/vmap, or use jaxcam.derivatives.certify (tracing only)."
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
            "use jaxcam.derivatives.certify."
        ) from err


def not_certified_error(where: str = "") -> ValueError:
    """The error for engine='factored' on a head that is not piecewise linear."""
    return ValueError(
        "derivatives engine 'factored' needs a piecewise-linear head (ReLU, max/average "
        "pooling, dense/conv, eval-mode batch norm), but the certificate failed: the head "
        "contains a smooth operation (softplus/GELU/SiLU, LayerNorm, softmax attention, "
        "train-mode batch norm)" + where + ". Use engine='taylor' (exact for any head) "
        "or 'auto' (picks the right engine)."
    )


# --------------------------------------------------------------------------- dispatcher


def resolve_engine(
    engine: str, head: HeadFn, A: Any, target: targets_lib.Target, out: Any = None,
    *, certified: bool | None = None, where: str = "",
) -> tuple[str, bool | None]:
    """``(engine, certified)``: ``"auto"`` -> ``"factored"`` where the head certifies
    (and, for a general score, the Jacobian has fewer rows than there are
    coordinates), else ``"taylor"``; ``"factored"`` on an uncertified head raises.
    ``certified`` is computed (tracing only) when it matters and not given."""
    if engine not in ENGINES:
        raise ValueError(f"Unknown derivatives method {engine!r}; use one of {ENGINES} "
                         "(engine=...).")
    if engine in ("auto", "factored") or (engine == "taylor" and certified is None):
        if certified is None:
            certified = certify(head, A)
    if engine == "factored" and not certified:
        raise not_certified_error(where)
    if engine == "auto":
        engine = "factored" if certified else "taylor"
        if engine == "factored" and target.kind == "general" and out is not None:
            n = math.prod(A.shape[1:])
            if output_size(out) > n:
                engine = "taylor"
    return engine, certified


def second_derivative_vanishes(target: targets_lib.Target, engine: str,
                               certified: bool | None) -> bool:
    """Whether the exact ``D2`` is identically 0: a linear score with the identity
    link through a certified (piecewise-linear) head (e.g. a raw logit)."""
    return (engine in EXACT_ENGINES and bool(certified) and target.kind == "linear"
            and target.link == "identity")


def target_derivatives(
    head: HeadFn,
    A: jax.Array,
    target: targets_lib.Target,
    c: jax.Array,
    data: Any = None,
    *,
    engine: str = "auto",
    certified: bool | None = None,
    primal: tuple[Any, Callable] | None = None,
    to_grid: GridFn | None = None,
    chunk_size: int | None = None,
    class_chunk_size: int | None = None,
    linear_head: tuple[jax.Array, jax.Array] | None = None,
    row_head: RowHeadFn | None = None,
) -> tuple[Derivatives, str]:
    """The one dispatcher: ``(Derivatives on the grid, engine used)``.

    Args:
      head: ``A -> out`` (pytree with leading batch axis B).
      A: the layer's activations (B, ...), any trailing shape.
      target: a :class:`jaxcam.targets.Target`; ``c`` (B,) int32 classes; ``data``
        the target's per-image data (leading B) or None.
      engine: one of :data:`ENGINES`; ``certified``: the certificate if known.
      primal: ``jax.vjp(head, A)`` if the caller already has it (shared forward).
      to_grid: ``(B, ...) -> (B, h, w, K)`` re-indexing applied to the results
        (``taylor`` evaluates only the coordinates it keeps); None: identity.
      chunk_size, class_chunk_size, linear_head: see :func:`diagonal_derivatives`.
      row_head: for token activations ``A`` (B, N, D), ``g(t, a) -> out`` equal to
        ``head(A with row t replaced by a)`` (a (B, D)) but computing only what row t
        reaches (a ViT head read at the class token: see :func:`taylor_rows`);
        used by ``taylor`` when the grid keeps whole token rows.
    """
    engine, certified = resolve_engine(engine, head, A, target,
                                       None if primal is None else primal[0],
                                       certified=certified)
    grid = (lambda a: a) if to_grid is None else to_grid
    s_fn = lambda a: targets_lib.inner_scores(target, head(a), c, data)
    if engine == "taylor":
        s0 = s_fn(A)
        tokens = None if row_head is None else _grid_tokens(A, grid)
        if tokens is not None:
            s_row = lambda t, a: targets_lib.inner_scores(target, row_head(t, a), c, data)
            s1, s2, s3 = taylor_rows(s_row, A, tokens[0], chunk_size=chunk_size)
            s1, s2, s3 = (d.reshape((A.shape[0],) + tokens[1] + (A.shape[2],))
                          for d in (s1, s2, s3))
        elif to_grid is None:
            s1, s2, s3 = taylor_derivatives(s_fn, A, chunk_size=chunk_size)
        else:
            n = math.prod(A.shape[1:])
            coords = grid(jnp.arange(n, dtype=jnp.int32).reshape((1,) + A.shape[1:]))
            flat = taylor_derivatives_at(s_fn, A, coords.reshape(-1), chunk_size=chunk_size)
            s1, s2, s3 = (d.reshape((A.shape[0],) + coords.shape[1:]) for d in flat)
        return Derivatives(*targets_lib.compose(target.link, s0, s1, s2, s3)), engine
    out, vjp_fn = jax.vjp(head, A) if primal is None else primal
    s0 = targets_lib.inner_scores(target, out, c, data)
    if engine == "factored":
        s1, s2, s3 = factored_series(out, vjp_fn, A, target, c, data, chunk_size=chunk_size,
                                     class_chunk_size=class_chunk_size,
                                     linear_head=linear_head)
        s1, s2, s3 = grid(s1), grid(s2), grid(s3)
        return Derivatives(*targets_lib.compose(target.link, s0, s1, s2, s3)), engine
    if engine == "closed_form":
        score0 = jax.vmap(lambda o, ci, di: target.score(o, ci, di),
                          in_axes=(0, 0, None if data is None else 0))(out, c, data)
        g = grid(vjp_fn(_score_cotangent(target, out, c, data))[0])
        zero = jnp.zeros_like(g)
        return Derivatives(*targets_lib.compose("exp", score0, g, zero, zero)), engine
    # nested_sum: the target divided by its factor at A, differentiated directly
    s0c = jax.lax.stop_gradient(s0)
    f = lambda a: targets_lib.link_shifted(target.link, s_fn(a), s0c)
    d1, d2, d3 = nested_sum_derivatives(f, A)
    log_scale = targets_lib.link_derivatives(target.link, s0)[3]
    return Derivatives(grid(d1), grid(d2), grid(d3), log_scale), engine


def diagonal_derivatives(
    f: Callable[[jax.Array], jax.Array] | None,
    A: jax.Array,
    engine: str = "auto",
    *,
    head: HeadFn | None = None,
    target: targets_lib.TargetSpec | None = None,
    class_idx: Any = None,
    chunk_size: int | None = None,
    class_chunk_size: int | None = None,
    certified: bool | None = None,
    linear_head: tuple[jax.Array, jax.Array] | None = None,
    normalized: bool = False,
):
    """Diagonal derivatives ``(D1, D2, D3)``, each shaped like ``A`` (B, h, w, K).

    Two ways to say what is differentiated:

    - ``f``: a function ``(B, h, w, K) -> (B,)`` (each image's value from its own
      activations). Engines: ``taylor``, ``nested_sum``, ``closed_form`` (``f``
      is then read as the class logit ``S_c``: ``D_n = exp(f) (grad f)^n``), and
      ``auto`` (= ``taylor``: a plain ``f`` cannot be factored).
    - ``f=None, head=..., target=...``: ``head: (B, h, w, K) -> outputs`` (logits
      (B, C), or any pytree with leading B) and a target (name in
      ``jaxcam.targets.TARGETS``, a :class:`jaxcam.targets.Target`, or callable
      ``phi(out, c)``), ``class_idx`` (None: argmax). Every engine works;
      ``factored`` and ``auto`` need this form. ``auto`` = ``factored`` if
      :func:`certify` holds, else ``taylor``; ``factored`` on an uncertified head
      raises. ``certified`` skips the check. ``linear_head=(W, b)`` (from
      ``model.linear_head``) tells ``factored`` that the head is GAP + dense, so
      that the class Jacobian is formed analytically.

    ``normalized=False`` returns the true derivatives (which can over- or
    underflow: ``exp(S_c) g^n``); ``normalized=True`` returns
    :class:`Derivatives` ``(D1, D2, D3, log_scale)``, true = ``exp(log_scale) * D``.

    ``chunk_size``: coordinates per vectorised chunk (``taylor``, general
    targets); ``class_chunk_size``: classes per chunk of VJPs (``factored`` with
    softmax-type targets). ``None`` sizes chunks to ~2**25 elements.

    Example::

        head = lambda A: model.head(variables, A, "layer4")
        D1, D2, D3 = diagonal_derivatives(None, A, head=head, target="softmax")
    """
    if engine not in ENGINES:
        raise ValueError(f"Unknown derivatives method {engine!r}; use one of {ENGINES} "
                         "(engine=...).")
    if A.ndim != 4:
        raise ValueError(f"A must be a batch of activations (B, h, w, K), got shape {A.shape}.")
    if (f is None) == (head is None):
        raise ValueError(
            "Give exactly one of f (a function (B,h,w,K) -> (B,)) or head= with target= "
            "(outputs function and target)."
        )
    if f is not None:
        if engine == "factored":
            raise ValueError(
                "engine='factored' needs the head and the target separately: call "
                "diagonal_derivatives(None, A, 'factored', head=..., target=..., class_idx=...)."
            )
        head, tgt = f, targets_lib.regression()
        engine = "taylor" if engine == "auto" else engine
        c = jnp.zeros((A.shape[0],), jnp.int32)
    else:
        if target is None:
            raise ValueError(
                f"head= needs target= (one of {targets_lib.TARGETS}, a Target or a callable).")
        tgt = targets_lib.as_target(target)
        out = jax.eval_shape(head, A)
        leaves = jax.tree_util.tree_leaves(out)
        if not leaves or any(x.ndim < 1 or x.shape[0] != A.shape[0] for x in leaves):
            raise ValueError(f"head must map (B, h, w, K) to outputs with leading axis B, got "
                             f"{jax.tree.map(lambda x: x.shape, out)}.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
        if isinstance(out, jax.ShapeDtypeStruct) and out.ndim == 2:
            c = targets_lib.select_class(head(A) if class_idx is None else out, class_idx)
        elif class_idx is not None:
            c = targets_lib.check_class_idx(class_idx, A.shape[0], None)
        elif tgt.needs_class:
            raise ValueError(f"target {tgt.name!r} needs class_idx= (the outputs are not "
                             "(B, C) logits to take an argmax of).")
        else:
            c = jnp.zeros((A.shape[0],), jnp.int32)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    data = targets_lib.per_image_data(tgt, A.shape[0])
    result, _ = target_derivatives(
        head, A, tgt, c, data, engine=engine, certified=certified, chunk_size=chunk_size,
        class_chunk_size=class_chunk_size, linear_head=linear_head)
    return result if normalized else result.true()
