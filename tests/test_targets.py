"""Targets: values, closed-form directional derivatives vs jet, class selection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental import jet

from jaxcam import targets

# the x64 fixture is deliberately shared by all examples of one test
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def _logits(seed, c, scale=3.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), (c,))


def test_named_targets_match_their_definitions(x64):
    S = _logits(0, 6)
    c = jnp.int32(2)
    lse = np.log(np.sum(np.exp(np.asarray(S))))
    expected = {
        "exp": np.exp(S[2]),
        "logit": S[2],
        "softmax": np.exp(S[2]) / np.sum(np.exp(np.asarray(S))),
        "log_softmax": S[2] - lse,
        "rest": 2 * S[2] - lse,
        "sigmoid": 1.0 / (1.0 + np.exp(-S[2])),
    }
    for name in targets.TARGETS:
        np.testing.assert_allclose(targets.get_target(name)(S, c), expected[name], rtol=1e-12)


@functools.partial(jax.jit, static_argnames="name")
def _closed_vs_jet(S, c, V, name):
    phi = targets.get_target(name)

    def truth(s, ci, v):
        zero = jnp.zeros_like(s)
        return jnp.stack(jet.jet(lambda z: phi(z, ci), (s,), ((v, zero, zero),))[1])

    expected = jax.vmap(lambda s, ci, vs: jax.vmap(lambda v: truth(s, ci, v))(vs))(S, c, V)
    p = jax.nn.softmax(S, axis=-1)[:, None, :]
    v_c = jnp.take_along_axis(V, c[:, None, None], axis=2)[..., 0]  # (B, N)
    u = V - v_c[..., None]
    m1, m2, m3 = ((p * u**k).sum(-1) for k in (1, 2, 3))
    got = targets.directional_derivatives(name, S, c, v_c, m1, m2, m3)
    return jnp.stack(got, -1), expected


@settings(max_examples=12, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    seed=st.integers(0, 10_000),
    num_classes=st.sampled_from([2, 7]),
    name=st.sampled_from(targets.TARGETS),
)
def test_directional_derivatives_equal_jet_of_phi(x64, seed, num_classes, name):
    """The closed forms (cumulants under softmax) == Taylor mode of phi(S + t v)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    S = 2.0 * jax.random.normal(k1, (2, num_classes))
    c = jax.random.randint(k2, (2,), 0, num_classes)
    V = jax.random.normal(k3, (2, 5, num_classes))  # one direction per coordinate
    got, expected = _closed_vs_jet(S, c, V, name)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_target_grad_logits_is_the_gradient(x64):
    S = jnp.stack([_logits(1, 5), _logits(2, 5)])
    c = jnp.array([0, 4])
    for name in targets.TARGETS:
        g = targets.target_grad_logits(name, S, c)
        for b in range(2):
            expected = jax.grad(targets.get_target(name))(S[b], c[b])
            np.testing.assert_allclose(g[b], expected, rtol=1e-12)


def test_callable_target_is_used_as_given():
    phi = lambda S, c: S[c] ** 2
    S = jnp.array([[1.0, -2.0, 3.0]])
    assert float(targets.target_scores(phi, S, jnp.array([1]))[0]) == 4.0
    assert targets.target_name(phi) == "<lambda>"


def test_select_class_argmax_int_and_array():
    S = jnp.array([[0.0, 2.0, 1.0], [5.0, 0.0, 1.0]])
    np.testing.assert_array_equal(targets.select_class(S), [1, 0])
    np.testing.assert_array_equal(targets.select_class(S, 2), [2, 2])
    np.testing.assert_array_equal(targets.select_class(S, [0, 2]), [0, 2])


def test_select_class_errors():
    S = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"class_idx\[1\] = 3 is out of range .* 3 classes"):
        targets.select_class(S, [0, 3])
    with pytest.raises(ValueError, match=r"class_idx\[0\] = -1 is out of range"):
        targets.select_class(S, -1)
    with pytest.raises(ValueError, match=r"shape \(3,\); give one class per image, shape \(2,\)"):
        targets.select_class(S, [0, 1, 2])
    with pytest.raises(ValueError, match="must be integers"):
        targets.select_class(S, [0.5, 1.0])


def test_unknown_target_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown target 'prob'.*'exp', 'logit'"):
        targets.validate_target("prob")
    with pytest.raises(ValueError, match="callable phi"):
        targets.validate_target(3)
