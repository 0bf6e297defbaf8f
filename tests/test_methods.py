"""CAM method functions: identities between methods, Grad-CAM++ alpha rules, Score-CAM."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxcam import derivatives as deriv
from jaxcam import methods

FIXTURE_OK = [HealthCheck.function_scoped_fixture]
B, H, W, K, C = 2, 5, 4, 6, 3


def _gap_head(seed):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    Wd, b = jax.random.normal(k1, (K, C)), jax.random.normal(k2, (C,))
    return Wd, b, (lambda A: A.mean((1, 2)) @ Wd + b)


def _relu_acts(seed):
    return jax.nn.relu(jax.random.normal(jax.random.PRNGKey(seed + 99), (B, H, W, K)))


@settings(max_examples=10, deadline=None, suppress_health_check=FIXTURE_OK)
@given(seed=st.integers(0, 10_000))
def test_gap_dense_identities(x64, seed):
    """Logit target through GAP + dense: D1 = W_c / (h w) everywhere, so
    Grad-CAM = CAM / (h w) = HiResCAM, XGrad-CAM = Grad-CAM (A >= 0), and
    ShapleyCAM = Grad-CAM (the Hessian of a linear function is 0)."""
    Wd, _, head = _gap_head(seed)
    A = _relu_acts(seed)
    c = jnp.argmax(head(A), -1)
    f = lambda a: head(a)[jnp.arange(B), c]
    D1 = jax.grad(lambda a: f(a).sum())(A)
    cam = jnp.einsum("bhwk,bk->bhw", A, methods.cam_weights(Wd, c))
    gradcam = methods.weighted_map(A, methods.gradcam_weights(D1))
    np.testing.assert_allclose(gradcam, jax.nn.relu(cam) / (H * W), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(methods.hirescam_map(A, D1), gradcam, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        methods.xgradcam_weights(A, D1, eps=0.0), methods.gradcam_weights(D1),
        rtol=1e-10,
    )
    HA = methods.hessian_times_activations(f, A)
    assert np.all(np.asarray(HA) == 0)
    np.testing.assert_allclose(methods.shapleycam_weights(D1, HA), methods.gradcam_weights(D1))


def test_layercam_equals_hirescam_for_nonnegative_gradients():
    A = _relu_acts(1)
    D1 = jnp.abs(jax.random.normal(jax.random.PRNGKey(2), A.shape))
    np.testing.assert_allclose(methods.layercam_map(A, D1), methods.hirescam_map(A, D1))
    # and LayerCAM ignores negative gradients where HiResCAM subtracts them
    assert np.all(np.asarray(methods.layercam_map(A, -D1)) == 0)


def test_hessian_times_activations_matches_explicit_hessian(x64):
    Q = jax.random.normal(jax.random.PRNGKey(0), (H * W * K, H * W * K))
    f = lambda a: jnp.einsum("bi,ij,bj->b", a.reshape(B, -1), Q, a.reshape(B, -1)) ** 1.5 / 10
    A = _relu_acts(3) + 0.1
    HA = methods.hessian_times_activations(f, A)
    for b in range(B):
        hess = jax.hessian(lambda z, b=b: f(A.at[b].set(z))[b])(A[b]).reshape(H * W * K, -1)
        np.testing.assert_allclose(np.asarray(HA[b]).ravel(), hess @ np.asarray(A[b]).ravel(),
                                   rtol=1e-10)


def test_alpha_zero_denominator_gives_zero():
    A = jnp.ones((1, 2, 2, 1))
    D2 = jnp.zeros((1, 2, 2, 1))
    D3 = jnp.zeros((1, 2, 2, 1))
    alpha = methods.gradcam_pp_alpha(A, D2, D3, negative_denominator="keep")
    assert np.all(np.asarray(alpha) == 0) and not np.any(np.isnan(np.asarray(alpha)))


def test_alpha_negative_denominator_rule():
    """sum(A) = 4. D2 = 1: denominator 2 + 4 D3 is 6 (D3=1), -2 (D3=-1), 0 (D3=-0.5).
    D2 = -1 (concave target): denominator -2 + 4 D3 is -6 (D3=-1): alpha = 1/6 > 0,
    kept by both rules; 2 (D3=1): alpha = -1/2, zeroed by the default rule."""
    A = jnp.full((1, 2, 3, 1), 4.0 / 6.0)
    D2 = jnp.array([1.0, 1.0, 1.0, 1.0, -1.0, -1.0]).reshape(1, 2, 3, 1)
    D3 = jnp.array([1.0, -1.0, -0.5, 0.0, -1.0, 1.0]).reshape(1, 2, 3, 1)
    zero_rule = methods.gradcam_pp_alpha(A, D2, D3)
    keep_rule = methods.gradcam_pp_alpha(A, D2, D3, negative_denominator="keep")
    np.testing.assert_allclose(np.ravel(zero_rule), [1 / 6, 0.0, 0.0, 0.5, 1 / 6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.ravel(keep_rule), [1 / 6, -0.5, 0.0, 0.5, 1 / 6, -0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="negative_denominator must be one of"):
        methods.gradcam_pp_alpha(A, D2, D3, negative_denominator="abs")


def test_alpha_normalisation_sums_to_one_per_channel():
    A = _relu_acts(4)
    D2 = jnp.abs(jax.random.normal(jax.random.PRNGKey(5), A.shape))
    D3 = jax.random.normal(jax.random.PRNGKey(6), A.shape)
    alpha = methods.gradcam_pp_alpha(A, D2, D3, normalize_alpha=True)
    sums = np.asarray(alpha.sum((1, 2)))
    np.testing.assert_allclose(sums[sums != 0], 1.0, rtol=1e-5)
    # a channel whose alphas are all 0 stays 0 (no 0/0)
    alpha0 = methods.gradcam_pp_alpha(A, jnp.zeros_like(D2), D3, normalize_alpha=True)
    assert np.all(np.asarray(alpha0) == 0)


def test_gradcam_pp_closed_form_matches_reference_formula(x64):
    """pytorch-grad-cam's formula, written out: alpha = g^2 / (2 g^2 + sum(A) g^3)
    (zero denominators -> 1), w = sum alpha relu(g)."""
    _, _, head = _gap_head(7)
    A = _relu_acts(7)
    c = jnp.argmax(head(A), -1)
    D = deriv.diagonal_derivatives(None, A, "closed_form", head=head, target="exp", class_idx=c)
    g = np.asarray(D[0]) / np.exp(np.asarray(head(A))[np.arange(B), c])[:, None, None, None]
    sum_a = np.asarray(A).sum((1, 2), keepdims=True)
    denom = 2 * g**2 + sum_a * g**3
    alpha = g**2 / np.where(denom != 0, denom, 1)
    expected = (alpha * np.maximum(g, 0)).sum((1, 2))
    got = methods.gradcam_pp_weights(A, *D, negative_denominator="keep")
    scale = np.exp(np.asarray(head(A))[np.arange(B), c])[:, None]
    np.testing.assert_allclose(np.asarray(got) / scale, expected, rtol=1e-10)


def test_normalize_maps_degenerate_is_zero_not_nan_and_differentiable():
    maps = jnp.stack([jnp.zeros((4, 4)), jnp.arange(16.0).reshape(4, 4)])
    out, degenerate = methods.normalize_maps(maps)
    np.testing.assert_array_equal(degenerate, [True, False])
    assert np.all(np.asarray(out[0]) == 0)
    np.testing.assert_allclose(out[1], np.arange(16.0).reshape(4, 4) / 15)
    grad = jax.grad(lambda m: methods.normalize_maps(m)[0].sum())(maps)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_scorecam_weights_match_a_loop_reference():
    A = _relu_acts(8)
    A = A.at[0, :, :, 2].set(1.0)  # a constant channel: zero mask
    images = jax.random.uniform(jax.random.PRNGKey(9), (B, 10, 8, 3))
    v = jax.random.normal(jax.random.PRNGKey(10), (10, 8, 3))
    score_fn = lambda x: jnp.einsum("bhwc,hwc->b", x, v)
    expected = np.zeros((B, K))
    for b in range(B):
        for k in range(K):
            up = np.asarray(jax.image.resize(A[b, :, :, k], (10, 8), "bilinear"))
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 else np.zeros_like(up)
            expected[b, k] = np.einsum("hwc,hwc->", np.asarray(images[b]) * mask[..., None], v)
    expected = np.exp(expected - expected.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    for batch_size in (1, 4, K):
        got = methods.scorecam_weights(A, images, score_fn, batch_size=batch_size)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 3, K])
def test_scorecam_dead_channels_give_the_same_weights_and_are_not_rescored(batch_size):
    """Channels that are zero everywhere (dead after a ReLU) score the zero image:
    computed once, chunks of dead channels skipped; the weights equal a reference
    that scores every channel (here: a plain loop over channels)."""
    A = _relu_acts(12)
    A = A.at[:, :, :, 1].set(0.0).at[0, :, :, 3].set(0.0).at[:, :, :, K - 1].set(0.0)
    images = jax.random.uniform(jax.random.PRNGKey(13), (B, 10, 8, 3))
    v = jax.random.normal(jax.random.PRNGKey(14), (10, 8, 3))
    calls = []

    def score_fn(x):
        jax.debug.callback(lambda n: calls.append(int(n)), x.shape[0])
        return jnp.einsum("bhwc,hwc->b", x, v) + 0.5

    expected = []
    for k in range(K):
        up = methods.upsample(A[..., k], (10, 8))
        m, _ = methods.normalize_maps(up)
        expected.append(jnp.einsum("bhwc,hwc->b", images * m[..., None], v) + 0.5)
    expected = jax.nn.softmax(jnp.stack(expected).T, axis=-1)
    got = methods.scorecam_weights(A, images, score_fn, batch_size=batch_size)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # Live channels per image: 4 and 3 (channel 3 is dead in image 0 only), sorted
    # first; a chunk is skipped when it holds no live channel of any image. The
    # callback runs once per scored chunk (vmapped) plus once for score_fn(0).
    max_live = K - 2
    assert len(calls) == 1 + -(-max_live // batch_size)


def test_placement_moves_cam_to_the_gap_dense_layer_and_leaves_the_others():
    from test_compilation import tiny_model, tiny_variables

    model = tiny_model()
    variables = tiny_variables(model)
    assert methods.placement("gradcam", model, variables, "block2") == ("block2", None)
    assert methods.placement("cam", model, variables, "block3") == ("block3", None)
    # block2's head is conv + GAP + dense, not linear: CAM runs at the default layer
    assert methods.placement("cam", model, variables, "block2") == ("block3", None)
    no_head = dataclasses.replace(model, default_layer="block2")
    layer, why = methods.placement("cam", no_head, variables, "block1")
    assert layer is None
    assert why == "tiny_cnn has no global-average-pool + dense head at block1 or block2"
