"""Diagonal-derivative engines: taylor == finite differences, factored == taylor where
certified, closed form == exact for exp through piecewise-linear heads, nested-sum is
the Hessian row sum (and differs from the diagonal), batching/jit/chunking invariance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxcam import derivatives as deriv
from jaxcam import methods

# the x64 fixture is deliberately shared by all examples of one test
FIXTURE_OK = [HealthCheck.function_scoped_fixture]

B, H, W, K, C, HIDDEN = 2, 4, 4, 3, 4, 5
PL_HEADS = ("gap_dense", "mlp_relu", "mlp_maximum", "maxpool_mlp")
SMOOTH_HEADS = ("mlp_softplus", "mlp_gelu", "mlp_silu")
TARGETS = ("exp", "logit", "softmax", "log_softmax", "rest")


def _maxpool2(A):
    return jax.lax.reduce_window(A, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


_ACT = {
    "mlp_relu": jax.nn.relu,
    "mlp_maximum": lambda z: jnp.maximum(z, 0.0),
    "mlp_softplus": jax.nn.softplus,
    "mlp_gelu": jax.nn.gelu,
    "mlp_silu": jax.nn.silu,
}


def make_head(kind, seed):
    """A random small head: pure function A (B, H, W, K) -> logits (B, C)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    if kind == "gap_dense":
        Wd = jax.random.normal(k[0], (K, C))
        b = jax.random.normal(k[1], (C,))
        return lambda A: A.mean((1, 2)) @ Wd + b
    if kind == "maxpool_mlp":
        n_in = (H // 2) * (W // 2) * K
        W1 = jax.random.normal(k[0], (n_in, HIDDEN)) / np.sqrt(n_in)
        W2 = jax.random.normal(k[1], (HIDDEN, C))
        return lambda A: jnp.maximum(_maxpool2(A).reshape(A.shape[0], -1) @ W1, 0.0) @ W2
    act = _ACT[kind]
    n_in = H * W * K
    W1 = jax.random.normal(k[0], (n_in, HIDDEN)) / np.sqrt(n_in)
    b1 = 0.3 * jax.random.normal(k[1], (HIDDEN,))
    W2 = jax.random.normal(k[2], (HIDDEN, C))
    return lambda A: act(A.reshape(A.shape[0], -1) @ W1 + b1) @ W2


def make_A(seed, nonneg=False):
    A = jax.random.normal(jax.random.PRNGKey(seed + 1000), (B, H, W, K))
    return jnp.abs(A) if nonneg else A


def _close(a, b, rtol, atol_frac=1e-12):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol_frac * max(np.abs(b).max(), 1e-300))


def _dd(head, A, method, target, **kw):
    return deriv.diagonal_derivatives(None, A, method, head=head, target=target, **kw)


@pytest.mark.parametrize("kind", PL_HEADS + SMOOTH_HEADS)
def test_certificate_true_exactly_for_piecewise_linear_heads(kind):
    head = make_head(kind, 0)
    assert deriv.is_piecewise_linear(head, make_A(0)) == (kind in PL_HEADS)


@settings(max_examples=10, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(PL_HEADS),
    target=st.sampled_from(TARGETS + ("callable",)),
)
def test_factored_equals_taylor_where_certified(x64, seed, kind, target):
    if target == "callable":
        target = lambda S, c: jnp.tanh(S[c]) + 0.1 * jnp.sum(S) ** 2
    head, A = make_head(kind, seed), make_A(seed)
    assert deriv.is_piecewise_linear(head, A)
    ref = _dd(head, A, "taylor", target)
    got = _dd(head, A, "factored", target)
    for r, g in zip(ref, got, strict=True):
        _close(g, r, rtol=1e-9, atol_frac=1e-12)


@settings(max_examples=5, deadline=None, suppress_health_check=FIXTURE_OK)
@given(seed=st.integers(0, 10_000), target=st.sampled_from(TARGETS))
def test_factored_linear_head_shortcut_equals_taylor(x64, seed, target):
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    Wd, b = jax.random.normal(k[0], (K, C)), jax.random.normal(k[1], (C,))
    head = lambda A: A.mean((1, 2)) @ Wd + b
    A = make_A(seed)
    ref = _dd(head, A, "taylor", target)
    got = _dd(head, A, "factored", target, linear_head=(Wd, b))
    for r, g in zip(ref, got, strict=True):
        _close(g, r, rtol=1e-9)


@settings(max_examples=8, deadline=None, suppress_health_check=FIXTURE_OK)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(PL_HEADS))
def test_exp_through_piecewise_linear_head_exact_equals_closed_form(x64, seed, kind):
    """Paper eq. 19 is exact here: D_n = e^{S_c} g^n, hence equal alphas and weights."""
    head, A = make_head(kind, seed), make_A(seed, nonneg=True)
    exact = _dd(head, A, "taylor", "exp")
    factored = _dd(head, A, "factored", "exp")
    closed = _dd(head, A, "closed_form", "exp")
    for e, f, c in zip(exact, factored, closed, strict=True):
        _close(f, e, rtol=1e-9)
        _close(c, e, rtol=1e-9)
    alpha_exact = methods.gradcam_pp_alpha(A, exact[1], exact[2])
    alpha_closed = methods.gradcam_pp_alpha(A, closed[1], closed[2])
    np.testing.assert_allclose(alpha_exact, alpha_closed, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        methods.gradcam_pp_weights(A, *exact), methods.gradcam_pp_weights(A, *closed),
        rtol=1e-9, atol=1e-12,
    )


@pytest.mark.parametrize("kind", SMOOTH_HEADS)
def test_closed_form_is_not_exact_for_smooth_heads(x64, kind):
    head, A = make_head(kind, 3), make_A(3)
    exact = _dd(head, A, "taylor", "exp")
    closed = _dd(head, A, "closed_form", "exp")
    np.testing.assert_allclose(closed[0], exact[0], rtol=1e-10)  # D1 is exact either way
    rel = np.abs(np.asarray(closed[1] - exact[1])).max() / np.abs(np.asarray(exact[1])).max()
    assert rel > 1e-3


@settings(max_examples=10, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(SMOOTH_HEADS + PL_HEADS),
    target=st.sampled_from(TARGETS),
)
def test_taylor_equals_finite_differences(x64, seed, kind, target):
    """taylor == float64 finite differences, smooth and ReLU / max-pool heads
    (jaxcam.testing's oracle: steps from each line's scale, an error bound per
    estimate, kinks and round-off refused and the coordinates replaced) at 4
    trusted coordinates per image: |taylor - fd| <= the oracle's bound (itself <= 1e-6
    of the scale), plus 1e-12 of the scale for taylor's own float64 rounding."""
    from jaxcam import targets, testing

    head, A = make_head(kind, seed), make_A(seed)
    D = np.stack([np.asarray(d).reshape(B, -1) for d in _dd(head, A, "taylor", target)], -1)
    phi = targets.get_target(target)
    c = jnp.argmax(head(A), axis=-1)
    rng = np.random.default_rng(seed)
    for b in range(B):
        f = lambda a, b=b: jax.vmap(phi, in_axes=(0, None))(head(a), c[b])
        length = float(jnp.sqrt(jnp.mean(A[b] ** 2)))
        scale = testing.derivative_scale(D[b], length, value=f(A[b : b + 1])[0])
        check = testing.check_coordinates(f, A[b], rng.permutation(H * W * K), 4, scale=scale)
        assert check.coords.size == 4, check.refused
        err = np.abs(check.fd.value - D[b, check.coords])
        assert np.all(err <= check.fd.error + 1e-12 * scale), (err, check.fd.error)


def test_nested_sum_is_hessian_row_sum_and_differs_from_diagonal_for_softmax(x64):
    head, A = make_head("gap_dense", 7), make_A(7)
    c = jnp.argmax(head(A), axis=-1)
    f = lambda a: jax.nn.softmax(head(a), axis=-1)[jnp.arange(B), c]
    nested = deriv.diagonal_derivatives(f, A, "nested_sum")
    diagonal = deriv.diagonal_derivatives(f, A, "taylor")
    np.testing.assert_allclose(nested[0], diagonal[0], rtol=1e-12)
    for b in range(B):
        fb = lambda a, b=b: f(A.at[b].set(a))[b]
        hess = jax.jit(jax.hessian(fb))(A[b]).reshape(H * W * K, H * W * K)
        np.testing.assert_allclose(np.asarray(nested[1][b]).ravel(), hess.sum(1), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(diagonal[1][b]).ravel(), np.diag(hess), rtol=1e-10)
    rel = np.abs(np.asarray(nested[1] - diagonal[1])).max() / np.abs(np.asarray(diagonal[1])).max()
    assert rel > 0.1


@pytest.mark.parametrize("method", ["taylor", "factored", "nested_sum", "closed_form"])
def test_batch_equals_per_image(x64, method):
    head, A = make_head("mlp_relu", 11), make_A(11)
    cls = jnp.array([1, 3])
    full = _dd(head, A, method, "softmax", class_idx=cls)
    for b in range(B):
        one = _dd(head, A[b : b + 1], method, "softmax", class_idx=cls[b : b + 1])
        for f, o in zip(full, one, strict=True):
            np.testing.assert_allclose(f[b : b + 1], o, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["taylor", "factored"])
def test_jit_equals_eager(method):
    head, A = make_head("mlp_gelu" if method == "taylor" else "mlp_relu", 5), make_A(5)
    eager = _dd(head, A, method, "log_softmax")
    jitted = jax.jit(functools.partial(_dd, head, method=method, target="log_softmax",
                                       certified=method == "factored"))(A)
    for e, j in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(e, j, rtol=2e-5, atol=1e-6)


def test_chunk_size_and_coordinate_subset_do_not_change_results(x64):
    head, A = make_head("mlp_silu", 2), make_A(2)
    ref = _dd(head, A, "taylor", "rest")
    for chunk in (1, 5, 48, 1000):
        for r, g in zip(ref, _dd(head, A, "taylor", "rest", chunk_size=chunk), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-11, atol=1e-15)
    cls = jnp.argmax(head(A), -1)
    f = lambda a: 2 * head(a)[jnp.arange(B), cls] - jax.nn.logsumexp(head(a), axis=-1)
    coords = jnp.array([0, 7, 47, 13])
    sub = deriv.taylor_derivatives_at(f, A, coords, chunk_size=3)
    for r, s in zip(ref, sub, strict=True):
        np.testing.assert_allclose(s, np.asarray(r).reshape(B, -1)[:, coords], rtol=1e-11)


def test_class_chunks_do_not_change_factored_results(x64):
    head, A = make_head("maxpool_mlp", 4), make_A(4)
    ref = _dd(head, A, "factored", "softmax", class_chunk_size=C)
    for chunk in (1, 3):
        got = _dd(head, A, "factored", "softmax", class_chunk_size=chunk)
        for r, g in zip(ref, got, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-15)


def test_custom_jvp_relu_and_maximum_agree(x64):
    """jax.nn.relu (a custom_jvp function) and jnp.maximum(x, 0) take different paths
    through the Taylor-mode interpreter (custom JVP per term vs the max rule); same
    function, same derivatives."""
    A = make_A(9)
    relu_head, max_head = make_head("mlp_relu", 9), make_head("mlp_maximum", 9)
    for r, m in zip(_dd(relu_head, A, "taylor", "softmax"), _dd(max_head, A, "taylor", "softmax"),
                    strict=True):
        np.testing.assert_allclose(r, m, rtol=1e-12, atol=1e-15)


def test_auto_picks_factored_or_taylor(x64, monkeypatch):
    calls = []
    original = deriv.taylor_derivatives
    monkeypatch.setattr(deriv, "taylor_derivatives",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    A = make_A(1)
    _dd(make_head("gap_dense", 1), A, "auto", "softmax")
    assert calls == []
    _dd(make_head("mlp_softplus", 1), A, "auto", "softmax")
    assert calls == [1]


def test_errors():
    A = make_A(0)
    smooth, pl = make_head("mlp_gelu", 0), make_head("mlp_relu", 0)
    f = lambda a: pl(a)[:, 0]
    with pytest.raises(ValueError, match="needs a piecewise-linear head.*certificate failed"):
        _dd(smooth, A, "factored", "exp")
    with pytest.raises(ValueError, match="'factored' needs the head and the target separately"):
        deriv.diagonal_derivatives(f, A, "factored")
    with pytest.raises(ValueError, match="Unknown derivatives method 'hessian'"):
        deriv.diagonal_derivatives(f, A, "hessian")
    with pytest.raises(ValueError, match=r"batch of activations \(B, h, w, K\)"):
        deriv.diagonal_derivatives(f, A[0], "taylor")
    with pytest.raises(ValueError, match="exactly one of f"):
        deriv.diagonal_derivatives(f, A, "taylor", head=pl, target="exp")
    with pytest.raises(ValueError, match="head= needs target="):
        deriv.diagonal_derivatives(None, A, "taylor", head=pl)
    with pytest.raises(ValueError, match="Unknown target"):
        _dd(pl, A, "taylor", "probability")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        _dd(pl, A, "taylor", "exp", chunk_size=0)
    with pytest.raises(ValueError, match="needs concrete activations"):
        jax.jit(lambda a: deriv.is_piecewise_linear(pl, a))(A)


def test_structural_certificate_works_under_jit_and_agrees_with_the_numerical_one():
    """certify() decides by tracing only, so 'auto' works inside jit (the numerical
    certificate cannot), and it agrees with the numerical check on every test head."""
    A = make_A(0)
    for kind in PL_HEADS + SMOOTH_HEADS:
        head = make_head(kind, 0)
        assert deriv.certify(head, A) == deriv.is_piecewise_linear(head, A) == (kind in PL_HEADS)
        assert jax.jit(lambda a, head=head: jnp.asarray(deriv.certify(head, a)))(A) == (
            kind in PL_HEADS)
    pl = make_head("maxpool_mlp", 0)
    eager = _dd(pl, A, "auto", "softmax")
    jitted = jax.jit(lambda a: _dd(pl, a, "auto", "softmax"))(A)
    for e, j in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(j, e, rtol=2e-5, atol=1e-6 * float(jnp.abs(e).max()))
