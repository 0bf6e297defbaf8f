"""jaxcam.testing: the finite-difference oracle bounds its errors, finds the line's
scale whatever the step hint, refuses kinks and round-off instead of guessing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxcam import testing as fdt

FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def _fd(fn, **kw):
    """The oracle on one line ``fn(t)`` (numpy, vectorised over t)."""
    with np.errstate(all="ignore"):
        return fdt.finite_difference_derivatives(lambda i, t: fn(t), 1, **kw).take(0)


def _assert_bounded(r, truth, rtol=1e-6):
    """Trusted estimates lie within their bound, and the bound within rtol."""
    assert np.all(r.trusted), r.reason
    err = np.abs(r.value - truth)
    assert np.all(err <= r.error), (r.value, truth, r.error)
    assert np.all(r.error <= rtol * np.abs(truth))


def test_polynomial_is_exact():
    r = _fd(lambda t: 2.0 + 3.0 * t - 1.5 * t**2 + 0.25 * t**3)
    _assert_bounded(r, np.array([3.0, -3.0, 1.5]), rtol=1e-13)


@pytest.mark.parametrize("b", [1e-3, 1.0, 30.0, -200.0])
@pytest.mark.parametrize("a", [-600.0, 0.0, 600.0])
def test_exponentials_of_any_scale(a, b):
    """g = e^{a + b t}: values from 1e-261 to 1e+260, variation scales 1/b from 5e-3 to
    1e3, one step hint: every estimate trusted and within its bound."""
    r = _fd(lambda t: np.exp(a + b * t))
    _assert_bounded(r, np.exp(a) * np.array([b, b**2, b**3]))


@pytest.mark.parametrize("hint", [1e-6, 1.0, 1e4])
def test_step_hint_far_from_the_scale(hint):
    """sin(100 t + 1) with hints below, at and far above its scale 1e-2 (a hint of
    1e4 samples it far below Nyquist: the probes descend until the values resolve)."""
    truth = np.array([100 * np.cos(1.0), -1e4 * np.sin(1.0), -1e6 * np.cos(1.0)])
    _assert_bounded(_fd(lambda t: np.sin(100 * t + 1.0), step=hint), truth)


def test_kink_at_zero_is_refused():
    """A ReLU at exactly 0 (one-sided slopes 6 and 1; central differences give 3.5
    at every step, consistently): refused as a kink, every order."""
    r = _fd(lambda t: np.exp(t) + 5 * np.maximum(t, 0.0))
    assert not np.any(r.trusted) and set(r.reason) == {"kink"}


def test_max_pool_tie_is_refused():
    """max(a + t, a, a - 1): the derivative is 1 from the right, 0 from the left."""
    r = _fd(lambda t: np.maximum(np.maximum(2.0 + t, 2.0), 1.0) ** 2)
    assert not np.any(r.trusted) and set(r.reason) == {"kink"}


@pytest.mark.parametrize("d", [1e-11, 1e-7, 1e-3, -1e-3, 0.3])
def test_kink_near_zero_never_trusted_wrongly(d):
    """A kink at t = d: the derivatives at 0 are those of the piece holding 0. Close
    kinks force small steps (round-off) or are detected; a trusted estimate is
    right within its bound. At 1e-3 and beyond, g' is resolved."""
    slope = 5.0 if d < 0 else 0.0
    truth = np.array([1.0 + slope, 1.0, 1.0])
    r = _fd(lambda t: np.exp(t) + 5 * np.maximum(t - d, 0.0))
    err = np.abs(r.value - truth)
    assert np.all(err[r.trusted] <= r.error[r.trusted])
    if abs(d) >= 1e-3:
        assert r.trusted[0]
    if abs(d) <= 1e-11:
        assert not np.any(r.trusted)


def test_piecewise_linear_line_has_exact_zero_higher_derivatives():
    """A logit through a ReLU head along a line: linear on the piece holding 0, kinks
    at 0.2 and -0.3. D2 = D3 = 0 are confirmed against a scale, and reported as
    indistinguishable from 0 without one."""
    fn = lambda t: 2 * np.maximum(1 + t / 0.3, 0) + 0.5 * np.maximum(0.2 - t, 0) - 1.0
    truth = np.array([2 / 0.3 - 0.5, 0.0, 0.0])
    with_scale = _fd(fn, scale=[1.0, 1.0, 1.0])
    assert np.all(with_scale.trusted)
    assert np.all(np.abs(with_scale.value - truth) <= with_scale.error)
    assert np.all(with_scale.error[1:] <= 1e-6)
    alone = _fd(fn)
    assert alone.trusted[0] and list(alone.reason[1:]) == ["zero", "zero"]


def test_nowhere_finite_is_refused():
    r = _fd(lambda t: np.exp(800.0 + t))
    assert not np.any(r.trusted) and set(r.reason) == {"non-finite"}


def test_lines_are_independent_and_outputs_share_evaluations():
    b = np.array([1.0, 30.0, 1e-3])
    g = lambda i, t: np.stack([np.exp(b[i, None] * t), np.sin(b[i, None] * t + 0.3)], -1)
    calls = []
    both = fdt.finite_difference_derivatives(lambda i, t: calls.append(t.size) or g(i, t), 3)
    assert both.value.shape == (3, 2, 3) and both.noise.shape == (3, 2)
    assert sum(calls) == both.evaluations.sum()
    for i in range(3):
        one = fdt.finite_difference_derivatives(lambda _, t, i=i: g(np.array([i]), t), 1)
        np.testing.assert_array_equal(one.value[0], both.value[i])
        np.testing.assert_array_equal(one.error[0], both.error[i])
    truth = np.stack([np.stack([b, b**2, b**3], -1),
                      np.stack([b * np.cos(0.3), -b**2 * np.sin(0.3), -b**3 * np.cos(0.3)],
                               -1)], 1)
    assert np.all(both.trusted)
    assert np.all(np.abs(both.value - truth) <= both.error)


def _hash_noise(t, eps):
    """Deterministic pseudo-random relative noise in [-eps, eps], a hash of t's bits."""
    bits = np.ascontiguousarray(t, np.float64).view(np.uint64)
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        bits = (bits ^ (bits >> np.uint64(33))) * np.uint64(mult)
    u = ((bits ^ (bits >> np.uint64(33))) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return eps * (2 * u - 1)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["exp", "sin", "kink", "relu_exp", "noisy"]),
    seed=st.integers(0, 2**31 - 1),
    log_hint=st.floats(-3, 3),
)
def test_trusted_estimates_are_within_their_bound(kind, seed, log_hint):
    """Random exponentials (values 1e-130..1e130), sinusoids, kinks at random
    distances, exp of random ReLU networks along a line (an exp target through a
    ReLU head), functions with injected noise up to 1e-6: whatever is trusted is
    within its bound (and its bound within rtol). Errors linear in t below 1e-11
    relative are invisible to any stencil (the module's limit), hence the floor."""
    rng = np.random.default_rng(seed)
    if kind == "exp":
        a, b = rng.uniform(-300, 300), rng.choice([-1, 1]) * 10 ** rng.uniform(-4, 3)
        fn, truth = (lambda t: np.exp(a + b * t)), np.exp(a) * np.array([b, b**2, b**3])
    elif kind == "sin":
        w, ph, amp = 10 ** rng.uniform(-2, 3), rng.uniform(0, 6.3), 10 ** rng.uniform(-5, 5)
        fn = lambda t: amp * np.sin(w * t + ph)
        truth = amp * np.array([w * np.cos(ph), -w**2 * np.sin(ph), -w**3 * np.cos(ph)])
    elif kind == "kink":
        b = 10 ** rng.uniform(-2, 1)
        d = rng.choice([-1, 1]) * 10 ** rng.uniform(-12, 1)
        s = rng.normal() * 10 ** rng.uniform(-6, 1)
        fn = lambda t: np.exp(b * t) + s * np.maximum(t - d, 0)
        truth = np.array([b + (s if d < 0 else 0.0), b**2, b**3])
    elif kind == "relu_exp":
        w, v = rng.normal(size=20), rng.normal(size=20)
        z = rng.normal(size=20) * 10 ** rng.uniform(-3, 0)
        c = rng.uniform(-50, 50)
        fn = lambda t: np.exp(c + np.maximum(np.multiply.outer(t, w) + z, 0) @ v)
        slope = np.sum(v * w * (z > 0))
        truth = np.exp(c + np.maximum(z, 0) @ v) * np.array([slope, slope**2, slope**3])
    else:
        b, eps = 10 ** rng.uniform(-2, 2), 10 ** rng.uniform(-15, -6)
        fn = lambda t: np.exp(b * t) * (1 + _hash_noise(t, eps))
        truth = np.array([b, b**2, b**3])
    r = _fd(fn, step=10**log_hint)
    err = np.abs(r.value - truth)
    ok = r.trusted
    assert np.all(err[ok] <= r.error[ok] + 1e-11 * np.abs(truth[ok]))
    assert np.all(r.error[ok] <= 1e-6 * np.abs(r.value[ok]))


def test_coordinate_lines_and_check_coordinates(x64):
    """f(a) = exp(w . a) + relu(a_0 - a_1) over a (3, 4) example: coordinates 0 and 1
    sit on the ReLU's kink (a_0 = a_1) and are refused and replaced; the others are
    checked against the analytic derivatives e^{w.a} w_i^n."""
    w = jnp.linspace(-0.5, 0.5, 12)
    a = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
    a = a.at[0, 1].set(a[0, 0])
    f = lambda b: jnp.exp(b.reshape(b.shape[0], -1) @ w) + jax.nn.relu(b[:, 0, 0] - b[:, 0, 1])
    check = fdt.check_coordinates(f, a, [0, 1, 5, 7, 11, 3], count=3)
    assert check.coords.tolist() == [5, 7, 11] and check.tried == 5
    assert check.refused == {"kink": 2}
    e = float(jnp.exp(a.ravel() @ w))
    truth = e * np.asarray(w)[check.coords, None] ** np.arange(1, 4)
    assert np.all(np.abs(check.fd.value - truth) <= check.fd.error)


def test_coordinate_lines_need_float64():
    with pytest.raises(ValueError, match="needs float64"):
        fdt.coordinate_lines(lambda b: b.sum((1, 2)), np.ones((2, 2)), [0])


def test_derivative_scale():
    exact = np.array([[2.0, 0.0, -3.0], [-4.0, 0.0, 1.0]])
    np.testing.assert_allclose(fdt.derivative_scale(exact, 2.0), [4.0, 2.0, 3.0])
    # a constant function (every unit after the layer dead): the value over the length
    np.testing.assert_allclose(fdt.derivative_scale(np.zeros((2, 3)), 2.0, value=8.0),
                               [4.0, 2.0, 1.0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_lines must be >= 1"):
        fdt.finite_difference_derivatives(lambda i, t: t, 0)
    with pytest.raises(ValueError, match="step must be positive"):
        fdt.finite_difference_derivatives(lambda i, t: t, 1, step=0.0)
    with pytest.raises(ValueError, match="rtol must be in"):
        fdt.finite_difference_derivatives(lambda i, t: t, 1, rtol=2.0)
    with pytest.raises(ValueError, match=r"returned shape \(1,\)"):
        fdt.finite_difference_derivatives(lambda i, t: t[:, 0], 1)


def test_resolved_top_k_returns_the_ranking_or_refuses_a_near_tie():
    s = np.array([[0.1, 3.0, 2.0, -1.0], [5.0, 4.0, 1.0, 4.5]])
    np.testing.assert_array_equal(fdt.resolved_top_k(s, 2), [[1, 2], [0, 3]])
    tie = np.array([[1.0, 2.0, 2.0 + 1e-7, 0.0]])
    assert fdt.resolved_top_k(tie, 1, rtol=1e-9)[0, 0] == 2
    with pytest.raises(AssertionError, match="near-tie in row 0: the scores ranked 1 and 2"):
        fdt.resolved_top_k(tie, 1)
    # only the ranks asked for (and the next one) must be resolved
    late_tie = np.array([[9.0, 5.0, 1.0, 1.0 + 1e-9]])
    np.testing.assert_array_equal(fdt.resolved_top_k(late_tie, 1), [[0]])
    with pytest.raises(AssertionError, match="ranked 3 and 4"):
        fdt.resolved_top_k(late_tie, 3)
    with pytest.raises(ValueError, match="1 <= k < C"):
        fdt.resolved_top_k(s, 4)
