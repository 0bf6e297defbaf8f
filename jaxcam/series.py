"""Taylor-mode propagation along a line, with symbolic zero terms.

``line_derivatives(f, x, e)`` returns ``d^n/dt^n f(x + t e)`` at ``t = 0`` for
``n = 1..order``: the same numbers as ``jax.experimental.jet.jet(f, (x,),
((e, 0, 0),))``, computed by interpreting ``f``'s jaxpr with one difference
that matters for the ``taylor`` engine: Taylor coefficients that are zero by
construction stay *symbolic* (``None``) instead of being instantiated as
arrays of zeros.

Why it matters. The input series of a line is ``(e, 0, 0)``. Through every
linear primitive (reductions, reshapes, a dense or convolution layer whose
weights are constants, ...) the zero terms stay zero, so only the first term
has to be pushed through; ``jet`` pushes all three (its own TODO: "avoid always
instantiating zeros"). For ResNet-50's GAP + dense head at ``layer4`` this is
the difference between one and three 2048x1000 matrix products per coordinate
(timings in ``docs/derivatives.md``).

Rules, by primitive (coefficients are Taylor coefficients ``x_k = x^(k)/k!``
internally, as in ``jet``):

- all inputs constant (no series): evaluate the primal only.
- outputs that are not floating point (comparisons, argmax, iota): no series.
- linear primitives (``LINEAR``): applied to each nonzero term, non-float
  operands (indices) given their primal values, missing float operands zeros.
- bilinear primitives (``mul``, ``dot_general``, ``conv_general_dilated``):
  the Cauchy product ``z_k = sum_j x_j y_{k-j}``, skipping zero terms; linear
  when one operand is constant. ``div`` by a constant is linear.
- ``jit`` / ``pjit`` / ``closed_call`` / ``checkpoint`` / ``custom_vjp_call``:
  interpreted recursively (``custom_vjp`` functions are differentiated through
  their primal implementation, like ``jet`` does).
- piecewise-linear primitives (``PER_TERM``: ``max``, ``abs``,
  ``reduce_max``, ...) and ``custom_jvp`` functions whose body is piecewise
  linear (``jax.nn.relu``, through its own rule, which gives 0 at the kink):
  term by term, so zero terms stay zero.
- other primitives with a ``jet`` rule: that rule, zeros instantiated.
- everything else (other ``custom_jvp`` functions, primitives ``jet`` has no
  rule for: ``reduce_window_max`` for max pooling, control flow): nested
  ``jax.jvp`` in a scalar ``t`` along the primitive's own input curve
  ``x(t) = x_0 + x_1 t + x_2 t^2 + x_3 t^3``, which respects every JVP rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
from jax.experimental import jet as jet_lib
from jax.extend import core as jex_core

Terms = list  # list of ``order`` arrays or ``None`` (symbolic zero); or None for no series

_jet_rules = jet_lib.jet_rules
_zero_series = jet_lib.zero_series

# Primitives that are linear in their floating-point operands (non-float
# operands, such as gather indices, are parameters).
LINEAR: frozenset[str] = frozenset({
    "neg", "add", "add_any", "sub", "convert_element_type", "broadcast_in_dim", "concatenate",
    "split", "tile", "pad", "reshape", "squeeze", "expand_dims", "rev", "transpose", "slice",
    "reduce_sum", "reduce_window_sum", "cumsum", "copy", "copy_p", "device_put", "reshard",
    "dynamic_slice", "dynamic_update_slice", "gather", "select_n", "real", "imag", "conj",
    "complex", "reduce_precision", "scatter-add", "scatter_add", "mesh_cast", "sharding_constraint",
    "optimization_barrier",
})
BILINEAR: frozenset[str] = frozenset({"mul", "dot_general", "conv_general_dilated"})
# Piecewise-linear primitives: output term k depends on input term k only
# (``max(x, 0)``, max pooling written with ``max``, ``abs``), so zero terms stay zero.
PER_TERM: frozenset[str] = frozenset({"max", "min", "abs", "reduce_max", "reduce_min",
                                      "cummax", "cummin"})
# Piecewise-linear primitives without a usable per-term jet rule (max pooling, sorting,
# clamping): term k is the primitive's JVP applied to term k, exact wherever the JVP
# rule is defined, and zero terms stay zero.
PER_TERM_BY_JVP: frozenset[str] = frozenset({"reduce_window_max", "reduce_window_min",
                                             "sort", "clamp"})
# Primitives allowed in a custom_jvp function that is treated as piecewise linear.
_PIECEWISE_LINEAR_BODY = LINEAR | PER_TERM | PER_TERM_BY_JVP | frozenset({
    "gt", "lt", "ge", "le", "eq", "ne", "and", "or", "not", "sign", "stop_gradient",
    "pjit", "jit", "iota",
})
CALLS: frozenset[str] = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint",
                                   "remat", "custom_vjp_call", "custom_vjp_call_jaxpr"})


def _zeros(x: Any) -> jax.Array:
    """An instantiated zero term for the operand ``x``."""
    return jnp.zeros(jnp.shape(x), jnp.result_type(x))


def _is_float(aval: Any) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def line_derivatives(
    f: Callable[[jax.Array], Any], x: jax.Array, e: jax.Array, order: int = 3
) -> tuple[Any, ...]:
    """``(d1, ..., d_order)``: derivatives of ``t -> f(x + t e)`` at 0 (not divided by k!).

    ``f`` returns one array; exact for every primitive with a JVP rule.
    """
    primal_out, terms_out = line_terms(f, x, e, order)
    out = []
    for k in range(order):
        t = None if terms_out is None else terms_out[k]
        t = jnp.zeros_like(primal_out) if t is None else t * math.factorial(k + 1)
        out.append(t)
    return tuple(out)


def line_terms(
    f: Callable[[jax.Array], Any], x: jax.Array, e: jax.Array, order: int = 3
) -> tuple[Any, list[Any | None] | None]:
    """``(f(x), terms)``: the Taylor coefficients ``[c_1, ..., c_order]`` of
    ``t -> f(x + t e)`` (``c_k = d^k/dt^k / k!``), ``None`` where a coefficient is zero
    by construction (or ``terms`` None when no coefficient is). ``f`` returns one array."""
    closed = jax.make_jaxpr(f)(x)
    if len(closed.jaxpr.outvars) != 1:
        raise ValueError("line_derivatives expects f to return a single array.")
    series_in = [e] + [None] * (order - 1)
    (primal_out,), (terms_out,) = _eval_jaxpr(closed.jaxpr, closed.consts, [x], [series_in],
                                              order)
    return primal_out, terms_out


def is_structurally_piecewise_linear(f: Callable[[jax.Array], Any], x: Any) -> bool:
    """Whether ``f`` is piecewise linear in ``x`` *by construction*, as autodiff sees it:
    the 2nd and 3rd Taylor coefficients of ``f`` along any line through ``x`` are
    symbolic zeros of :func:`line_terms` (every primitive on a path from ``x`` to the
    output is linear, piecewise linear -- ``max``, ReLU, max pooling, ``abs`` -- or
    bilinear with a constant operand).

    Decided by tracing only (``jax.eval_shape``): nothing is computed, ``x`` may be
    abstract or traced (works under ``jit``), and the answer does not depend on the
    direction. It implies the numerical certificate of
    :func:`jaxcam.derivatives.is_piecewise_linear` (exact zeros along random
    directions); the converse can fail only for functions that are linear by
    cancellation (e.g. ``x * x - x * x``), which then take the general path.
    ``f`` may return a pytree of arrays.
    """
    found: dict[str, bool] = {}

    def probe(x):
        def flat(a):
            return jax.flatten_util.ravel_pytree(f(a))[0]

        _, terms = line_terms(flat, x, x)
        found["linear"] = terms is None or all(t is None for t in terms[1:])
        return None

    jax.eval_shape(probe, x)
    return found["linear"]


# --------------------------------------------------------------------------- interpreter


def _eval_jaxpr(jaxpr, consts: Sequence[Any], primals: Sequence[Any],
                series: Sequence[Terms | None], order: int):
    """Primal values and Taylor coefficients of ``jaxpr``'s outputs."""
    env: dict[Any, tuple[Any, Terms | None]] = {}

    def read(v):
        if isinstance(v, jex_core.Literal):
            return v.val, None
        return env[v]

    def write(v, primal, terms):
        env[v] = (primal, terms)

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        write(v, c, None)
    for v, p, s in zip(jaxpr.invars, primals, series, strict=True):
        if s is not None and all(t is None for t in s):
            s = None
        write(v, p, s)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        xs = [p for p, _ in ins]
        ss = [s for _, s in ins]
        outs, out_series = _eval_eqn(eqn, xs, ss, order)
        for v, p, s in zip(eqn.outvars, outs, out_series, strict=True):
            if s is not None and (all(t is None for t in s) or not _is_float(v.aval)):
                s = None
            write(v, p, s)
    result = [read(v) for v in jaxpr.outvars]
    return [p for p, _ in result], [s for _, s in result]


def _bind(eqn, xs):
    params = eqn.primitive.get_bind_params(eqn.params)
    out = eqn.primitive.bind(*xs, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _eval_eqn(eqn, xs, ss, order):
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if all(s is None for s in ss) or not any(_is_float(v.aval) for v in eqn.outvars):
        return _bind(eqn, xs), [None] * n_out
    if name in CALLS:
        inner = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
        if hasattr(inner, "jaxpr"):  # ClosedJaxpr
            return _eval_jaxpr(inner.jaxpr, inner.consts, xs, ss, order)
        return _eval_jaxpr(inner, [], xs, ss, order)
    if name in LINEAR:
        return _linear(eqn, xs, ss, order)
    if name in BILINEAR:
        return _bilinear(eqn, xs, ss, order)
    if name == "div" and ss[1] is None:
        return _linear(eqn, xs, ss, order, linear_operands=(0,))
    if name in PER_TERM:
        return _per_term(eqn, xs, ss, order)
    if name in PER_TERM_BY_JVP or (
            name == "custom_jvp_call" and _piecewise_linear(eqn.params["call_jaxpr"].jaxpr)):
        return _per_term_jvp(eqn, xs, ss, order)
    rule = _jet_rules.get(eqn.primitive)
    if rule is not None:
        return _with_jet_rule(rule, eqn, xs, ss, order)
    return _by_nested_jvp(eqn, xs, ss, order)


def _linear(eqn, xs, ss, order, linear_operands=None):
    outs = _bind(eqn, xs)
    is_lin = [
        _is_float(v.aval) and (linear_operands is None or i in linear_operands)
        for i, v in enumerate(eqn.invars)
    ]
    terms_out: list[list] = [[None] * order for _ in outs]
    for k in range(order):
        if all(s is None or s[k] is None for s, lin in zip(ss, is_lin, strict=True) if lin):
            continue
        args = []
        for x, s, lin in zip(xs, ss, is_lin, strict=True):
            if not lin:
                args.append(x)
            elif s is None or s[k] is None:
                args.append(_zeros(x))
            else:
                args.append(s[k])
        for j, t in enumerate(_bind(eqn, args)):
            terms_out[j][k] = t
    return outs, terms_out


def _bilinear(eqn, xs, ss, order):
    x, y = xs
    sx, sy = ss
    if sx is None:
        return _linear(eqn, xs, ss, order, linear_operands=(1,))
    if sy is None:
        return _linear(eqn, xs, ss, order, linear_operands=(0,))
    (out,) = _bind(eqn, xs)
    fx = [x] + list(sx)
    fy = [y] + list(sy)
    terms = []
    for k in range(1, order + 1):
        acc = None
        for j in range(k + 1):
            a, b = fx[j], fy[k - j]
            if a is None or b is None:
                continue
            (t,) = _bind(eqn, [a, b])
            acc = t if acc is None else acc + t
        terms.append(acc)
    return [out], [terms]


def _piecewise_linear(jaxpr) -> bool:
    """Whether every primitive of ``jaxpr`` (recursively) is linear or piecewise linear
    (``jax.nn.relu``'s body ``max(x, 0)``)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name not in _PIECEWISE_LINEAR_BODY:
            return False
        inner = eqn.params.get("jaxpr")
        if inner is not None and not _piecewise_linear(getattr(inner, "jaxpr", inner)):
            return False
    return True


def _term_k(xs, ss, k):
    return [_zeros(x) if s is None or s[k] is None else s[k]
            for x, s in zip(xs, ss, strict=True)]


def _per_term(eqn, xs, ss, order):
    """Piecewise-linear primitive through its ``jet`` rule, one term at a time."""
    rule = _jet_rules[eqn.primitive]
    params = eqn.primitive.get_bind_params(eqn.params)
    outs = _bind(eqn, xs)
    terms_out = [[None] * order for _ in outs]
    for k in range(order):
        if all(s is None or s[k] is None for s in ss):
            continue
        _, terms = rule(xs, [[t] for t in _term_k(xs, ss, k)], **params)
        terms = terms if eqn.primitive.multiple_results else [terms]
        for j, t in enumerate(terms):
            if t is not _zero_series:
                terms_out[j][k] = t[0]
    return outs, terms_out


def _per_term_jvp(eqn, xs, ss, order):
    """Piecewise-linear primitive or ``custom_jvp`` function: term k is its JVP applied
    to term k (exact: its higher derivatives vanish wherever the rule is defined)."""
    float_in = [i for i, s in enumerate(ss) if s is not None]

    def fn(*fl):
        args = list(xs)
        for i, a in zip(float_in, fl, strict=True):
            args[i] = a
        return _bind(eqn, args)

    outs = _bind(eqn, xs)
    terms_out = [[None] * order for _ in outs]
    primals = tuple(xs[i] for i in float_in)
    for k in range(order):
        if all(ss[i][k] is None for i in float_in):
            continue
        tangents = tuple(_term_k([xs[i]], [ss[i]], k)[0] for i in float_in)
        _, tan = jax.jvp(fn, primals, tangents)
        for j, (t, v) in enumerate(zip(tan, eqn.outvars, strict=True)):
            if _is_float(v.aval):
                terms_out[j][k] = t
    return outs, terms_out


def _with_jet_rule(rule, eqn, xs, ss, order):
    series_in = []
    for x, s in zip(xs, ss, strict=True):
        if s is None:
            series_in.append([_zeros(x)] * order)
        else:
            series_in.append([_zeros(x) if t is None else t for t in s])
    params = eqn.primitive.get_bind_params(eqn.params)
    out, terms = rule(xs, series_in, **params)
    if eqn.primitive.multiple_results:
        return list(out), [None if t is _zero_series else list(t) for t in terms]
    return [out], [None if terms is _zero_series else list(terms)]


def _by_nested_jvp(eqn, xs, ss, order):
    """Taylor coefficients of ``prim(x(t))`` with ``x(t) = sum_k x_k t^k``, by ``order``
    nested JVPs in the scalar ``t`` (so custom JVP rules and every differentiable
    primitive are respected)."""
    float_in = [i for i, (x, s) in enumerate(zip(xs, ss, strict=True)) if s is not None]
    dtype = jnp.result_type(*[xs[i] for i in float_in])

    def curve(t):
        args = list(xs)
        for i in float_in:
            v = xs[i]
            for k, c in enumerate(ss[i], start=1):
                if c is not None:
                    v = v + (t**k).astype(jnp.result_type(c)) * c
            args[i] = v
        outs = _bind(eqn, args)
        # only floating outputs carry a series; others are fixed along the curve
        return [o if _is_float(v.aval) else jnp.zeros((), dtype)
                for o, v in zip(outs, eqn.outvars, strict=True)]

    def upto(m):
        """``t -> [g, g', ..., g^(m)]`` (each a list over outputs) by ``m`` nested JVPs."""
        if m == 0:
            return lambda t: [curve(t)]

        def h(t):
            primal, tangent = jax.jvp(upto(m - 1), (t,), (jnp.ones((), dtype),))
            return primal + [tangent[-1]]

        return h

    all_derivs = upto(order)(jnp.zeros((), dtype))
    outs = _bind(eqn, xs)
    derivs = all_derivs[1:]  # derivs[k][j]: (k+1)-th derivative of output j
    terms_out = []
    for j, v in enumerate(eqn.outvars):
        if not _is_float(v.aval):
            terms_out.append(None)
            continue
        terms_out.append([derivs[k][j] / math.factorial(k + 1) for k in range(order)])
    return outs, terms_out
