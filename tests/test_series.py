"""jaxcam.series.line_derivatives: Taylor mode with symbolic zero terms.

Specification: the same numbers as nested ``jax.jvp`` (which respects every
JVP rule, custom ones included) for every kind of primitive the interpreter
routes differently; and zero terms that stay symbolic through linear layers,
which is the whole point (counted in the jaxpr).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.extend import core as jex_core

from jaxcam.derivatives import _jvp_series
from jaxcam.series import line_derivatives


def _w(key, *shape):
    """float64 numpy weights (constants of the functions below)."""
    return np.random.default_rng(key).standard_normal(shape) / np.sqrt(shape[0])


W1, W2, B1 = _w(1, 12, 7), _w(2, 7, 5), _w(3, 7)
CONV = _w(4, 3, 3, 3, 4)


def _pool(y):
    return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


# name -> f: (2, 4, 4, 3) -> (2,), each exercising a different interpreter path
FUNCTIONS = {
    # linear + bilinear with a constant + jet rule (exp)
    "gap_dense_exp": lambda A: jnp.exp(
        (jnp.concatenate([A.mean(axis=(1, 2))] * 4, -1) @ W1 @ W2)[:, 1]),
    # custom_jvp relu (piecewise-linear body) + max pooling (no jet rule: nested jvp)
    "relu_pool_softmax": lambda A: jax.nn.log_softmax(
        jnp.tile(_pool(jax.nn.relu(A - 0.2)).reshape(2, -1), (1, 1))[:, :12] @ W1, axis=-1)[:, 0],
    # convolution with constant kernel, jnp.maximum, abs, reduce_max, tanh, division
    "conv_max_abs": lambda A: jnp.tanh(
        jax.lax.conv_general_dilated(jnp.maximum(A, 0.1), CONV, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")).max(
            axis=(1, 2)).sum(-1) / 3.0) + jnp.abs(A).max(axis=(1, 2, 3)),
    # bilinear in the input itself (both operands carry series), sigmoid, gather
    "quadratic_gather": lambda A: jax.nn.sigmoid(
        jnp.einsum("bhwk,bhwk->bk", A, jnp.sin(A)))[jnp.arange(2), jnp.array([0, 2])],
    # silu (x * logistic), select via jnp.where, a jitted inner function
    "silu_where_jit": lambda A: jax.jit(
        lambda a: jnp.where(a > 0, jax.nn.silu(a), 0.5 * a ** 3).sum(axis=(1, 2, 3)))(A),
    # the smooth EfficientNet-like squeeze-excitation gate: x * sigmoid(mean(x) w)
    "squeeze_excite": lambda A: jnp.log1p(jnp.square(
        (A * jax.nn.sigmoid(A.mean(axis=(1, 2), keepdims=True) @ _w(5, 3, 3))).sum(
            axis=(1, 2, 3)))),
}


@pytest.fixture
def A(x64):
    return jax.random.normal(jax.random.key(0), (2, 4, 4, 3), jnp.float64)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_agrees_with_nested_jvp(A, name):
    f = FUNCTIONS[name]
    for idx in [(0, 0, 0), (1, 2, 1), (3, 3, 2), (2, 1, 0)]:
        e = jnp.zeros_like(A).at[(slice(None),) + idx].set(1.0)
        ref = _jvp_series(f, A, e)
        got = jax.jit(lambda a, v: line_derivatives(f, a, v))(A, e)
        for r, g in zip(ref, got, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-14)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(sorted(FUNCTIONS)))
def test_agrees_with_nested_jvp_along_random_directions(seed, name):
    with jax.enable_x64(True):
        k1, k2 = jax.random.split(jax.random.key(seed))
        A = jax.random.normal(k1, (2, 4, 4, 3), jnp.float64)
        e = jax.random.normal(k2, A.shape, jnp.float64)
        f = FUNCTIONS[name]
        ref = _jvp_series(f, A, e)
        got = line_derivatives(f, A, e)
        for r, g in zip(ref, got, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


def _count(jaxpr, name: str) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for sub in jex_core.jaxprs_in_params(eqn.params):
            n += _count(sub, name)
    return n


def test_zero_terms_stay_symbolic_through_linear_layers(A):
    """Line ``A + t e``: terms 2 and 3 of the input are zero, and stay zero through
    GAP and two dense layers, so each dense layer is applied once per order-1 term
    (plus once for the primal): 2 + 2 matrix products, where ``jet`` does 4 + 4."""
    f = FUNCTIONS["gap_dense_exp"]
    e = jnp.ones_like(A)
    ours = jax.make_jaxpr(lambda a, v: line_derivatives(f, a, v))(A, e)
    theirs = jax.make_jaxpr(lambda a, v: jax.experimental.jet.jet(
        f, (a,), ((v, jnp.zeros_like(v), jnp.zeros_like(v)),)))(A, e)
    assert _count(ours.jaxpr, "dot_general") == 4
    assert _count(theirs.jaxpr, "dot_general") > 4


def test_non_float_outputs_and_constants_carry_no_series(A):
    f = lambda a: jnp.exp(a.sum(axis=(1, 2, 3))) * (jnp.argmax(a.reshape(2, -1), -1) + 1.0)
    e = jnp.zeros_like(A).at[:, 1, 1, 1].set(1.0)
    ref = _jvp_series(f, A, e)
    for r, g in zip(ref, line_derivatives(f, A, e), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-12)


def test_rejects_functions_with_several_outputs(A):
    with pytest.raises(ValueError, match="single array"):
        line_derivatives(lambda a: (a.sum(), a.mean()), A, jnp.ones_like(A))
