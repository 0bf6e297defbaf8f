"""jaxcam.explain through the adapters (issue 15): models defined as users write them
(tests/test_adapters.py) explained with every method, the certificate deciding the
engine unchanged, exact == closed form where eq. 19 is exact and != where it is not,
a cut crossed by a skip connection, a segmentation output, and jaxcam's own ResNet-50
through from_linen equal to the native model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_adapters import (
    NNXCNN,
    SHAPE,
    SIZE,
    LinenCNN,
    SegNet,
    ViT,
    _he_variables,
    _images,
    _randomise_batch_stats,
)

import jaxcam
from jaxcam import derivatives as deriv
from jaxcam.models import from_linen, from_nnx, tokens_to_grid


@pytest.fixture(scope="module")
def linen_cnn():
    module = LinenCNN()
    variables = _randomise_batch_stats(module.init(jax.random.key(0), jnp.zeros(SHAPE)))
    return module, from_linen(module, input_shape=SHAPE), variables


@pytest.fixture(scope="module")
def vit():
    model, state = from_nnx(ViT(nnx.Rngs(0)), input_shape=SHAPE, reshape=tokens_to_grid(1),
                            default_layer="blocks.1.norm1")
    return model, state


def test_every_method_on_a_linen_cnn_with_the_gap_identities(linen_cnn):
    """At block2 (GAP + dropout + dense after it, piecewise linear) every registered
    method runs, Grad-CAM = CAM / (h w), and exact Grad-CAM++ (factored, certified)
    equals the closed form."""
    _, model, v = linen_cnn
    x = _images(3)
    exs = jaxcam.explain(model, v, x, method=list(jaxcam.METHODS), layer="block2")
    assert set(exs) == set(jaxcam.METHODS)
    h, w = exs["gradcam"].raw.shape[1:]
    np.testing.assert_allclose(exs["gradcam"].raw, exs["cam"].raw / (h * w), rtol=1e-5,
                               atol=1e-7)
    assert exs["gradcam++"].derivatives == "exact/factored"
    closed = jaxcam.explain(model, v, x, method="gradcam++", layer="block2",
                            derivatives="closed_form")
    np.testing.assert_allclose(exs["gradcam++"].maps, closed.maps, atol=1e-5)
    for ex in exs.values():
        assert np.all(np.asarray(ex.finite))
        assert float(ex.maps.max()) == pytest.approx(1.0) or bool(ex.degenerate.any())


def test_grad_cam_at_a_cut_crossed_by_a_skip_connection(linen_cnn):
    """block2/conv_b is added to block2's input: the skip crosses the cut. Grad-CAM
    from explain equals the first-order computation written here by hand (the rest of
    the model with the skip held fixed)."""
    module, model, v = linen_cnn
    x = _images(2)
    layer = "block2/conv_b"
    ex = jaxcam.explain(model, v, x, method="gradcam", layer=layer, class_idx=[1, 4])
    a = model.features(v, x, layer)
    _, inter = module.apply(v, x, capture_intermediates=True)
    skip = nn.max_pool(inter["intermediates"]["block1"]["__call__"][0], (2, 2), (2, 2))
    fc = v["params"]["fc"]
    by_hand = lambda a: jnp.maximum(skip + a, 0).mean((1, 2)) @ fc["kernel"] + fc["bias"]
    g = jax.grad(lambda a: by_hand(a)[jnp.arange(2), jnp.array([1, 4])].sum())(a)
    np.testing.assert_allclose(ex.weights, g.mean((1, 2)), rtol=1e-5, atol=1e-8)
    raw = jnp.maximum(jnp.einsum("bhwk,bk->bhw", a, g.mean((1, 2))), 0)
    np.testing.assert_allclose(ex.raw, raw, rtol=1e-5, atol=1e-7)


def test_nnx_cnn_exact_equals_closed_form_for_exp():
    module = NNXCNN(3, nnx.Rngs(0))
    model, state = from_nnx(module, input_shape=SHAPE)
    x = _images(2)
    for layer in ("conv2", "bn2"):
        exact = jaxcam.explain(model, state, x, method="gradcam++", layer=layer)
        closed = jaxcam.explain(model, state, x, method="gradcam++", layer=layer,
                                derivatives="closed_form")
        assert exact.derivatives == "exact/factored"
        np.testing.assert_allclose(exact.maps, closed.maps, atol=1e-5)


def test_nnx_vit_smooth_head_falls_back_to_taylor_and_differs_from_the_closed_form(vit):
    """A ViT cut at the last block's first LayerNorm: attention, GELU and LayerNorm make
    the head smooth, the certificate fails, auto picks taylor, and the exact alphas
    differ from eq. 19's. explain's weights equal the dispatcher's own composition."""
    model, state = vit
    x = _images(2)
    layer = "blocks.1.norm1"
    ex = jaxcam.explain(model, state, x, method="gradcam++", layer=layer)
    assert ex.derivatives == "exact/taylor" and ex.raw.shape == (2, 4, 4)
    A = model.features(state, x, layer)
    head = lambda a: model.head(state, a, layer, x=x)
    assert not deriv.certify(head, A) and not deriv.is_piecewise_linear(head, A)
    with pytest.raises(ValueError, match="'factored' needs a piecewise-linear head"):
        jaxcam.explain(model, state, x, method="gradcam++", layer=layer, engine="factored")
    closed = jaxcam.explain(model, state, x, method="gradcam++", layer=layer,
                            derivatives="closed_form")
    assert float(jnp.abs(ex.maps - closed.maps).max()) > 1e-2
    c = ex.class_idx  # the class explain chose (not re-derived in another program)
    D, _ = deriv.target_derivatives(head, A, jaxcam.targets.as_target("exp"), c,
                                    engine="taylor", to_grid=lambda a: model.to_grid(a, layer))
    Ag = model.to_grid(A, layer)
    np.testing.assert_allclose(ex.weights, jaxcam.methods.gradcam_pp_weights(Ag, D.D1, D.D2,
                                                                          D.D3),
                               rtol=2e-4, atol=1e-7)
    for name in ("gradcam", "xgradcam", "hirescam", "layercam", "scorecam", "shapleycam"):
        other = jaxcam.explain(model, state, x, method=name, layer=layer)
        assert other.maps.shape == (2, SIZE, SIZE) and np.all(np.asarray(other.finite))


def test_segmentation_targets_through_a_linen_encoder_decoder():
    """A (B, H, W, C) output: the masked-sum target needs class_idx; with the identity
    link exact Grad-CAM++ is degenerate through the piecewise-linear decoder (said so),
    with link='exp' it equals the closed form."""
    module = SegNet()
    v = module.init(jax.random.key(0), jnp.zeros(SHAPE))
    model = from_linen(module, input_shape=SHAPE)
    x = _images(2)
    mask = jnp.zeros((SIZE, SIZE)).at[4:10, 3:12].set(1.0)
    plain = jaxcam.targets.segmentation(mask=mask)
    with pytest.raises(ValueError, match="pass class_idx="):
        jaxcam.explain(model, v, x, method="gradcam", target=plain)
    with pytest.raises(ValueError, match="needs a classifier's"):
        jaxcam.explain(model, v, x, method="gradcam", target="softmax", class_idx=1)
    ex = jaxcam.explain(model, v, x, method="gradcam", target=plain, class_idx=[1, 2])
    A = model.features(v, x, "dec")

    def score(a):  # sum over the mask of each image's class channel
        out = model.head(v, a, "dec", x=x)
        return jnp.sum(out[0, :, :, 1] * mask) + jnp.sum(out[1, :, :, 2] * mask)

    g = jax.grad(score)(A)
    np.testing.assert_allclose(ex.weights, g.mean((1, 2)), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="link='exp'"):
        jaxcam.explain(model, v, x, method="gradcam++", target=plain, class_idx=1)
    with_exp = jaxcam.targets.segmentation(mask=mask, link="exp")
    exact = jaxcam.explain(model, v, x, method="gradcam++", target=with_exp, class_idx=1)
    closed = jaxcam.explain(model, v, x, method="gradcam++", target=with_exp, class_idx=1,
                            derivatives="closed_form")
    np.testing.assert_allclose(exact.maps, closed.maps, atol=1e-5)
    # a new mask is data, not a new program
    n = len(jaxcam.explanation._COMPILED)
    jaxcam.explain(model, v, x, method="gradcam", target=jaxcam.targets.segmentation(
        mask=1.0 - mask), class_idx=[1, 2])
    assert len(jaxcam.explanation._COMPILED) == n


@pytest.mark.slow
def test_resnet50_through_from_linen_explains_like_the_native_model():
    native = jaxcam.models.resnet50(num_classes=10)
    v = _he_variables(native.abstract_variables())
    model = from_linen(native.module, input_shape=(1, 64, 64, 3), name="resnet50")
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    methods = ["gradcam", "gradcam++", "xgradcam", "layercam", "cam"]
    ours = jaxcam.explain(model, v, x, method=methods, layer="layer4/2")
    theirs = jaxcam.explain(native, v, x, method=methods, layer="layer4")
    for name in methods:
        np.testing.assert_allclose(ours[name].maps, theirs[name].maps, atol=1e-6)
        np.testing.assert_allclose(ours[name].raw, theirs[name].raw, rtol=1e-6, atol=1e-9)
    assert ours["gradcam++"].derivatives == theirs["gradcam++"].derivatives == "exact/factored"


def test_cascading_randomization_on_an_nnx_model():
    """The sanity check walks an NNX state's top-level groups (param_order); fully
    randomised, the maps no longer match the trained ones; the untouched model gives a
    Spearman of 1 with itself."""
    module = NNXCNN(3, nnx.Rngs(0))
    model, state = from_nnx(module, input_shape=SHAPE)
    x = _images(2)
    fresh = lambda rng: from_nnx(NNXCNN(3, nnx.Rngs(int(jax.random.randint(rng, (), 0, 99)))),
                                 input_shape=SHAPE)[1]
    explain_fn = lambda v, im: jaxcam.explain(model, v, im, method="gradcam", layer="conv2",
                                              class_idx=[0, 1], nonfinite="flag")
    result = jaxcam.metrics.cascading_randomization(model, state, x, explain_fn,
                                                    rng=jax.random.key(3), init_fn=fresh)
    assert result.layers == tuple(reversed(model.param_order))
    same = jaxcam.metrics.spearman(explain_fn(state, x).maps, explain_fn(state, x).maps)
    np.testing.assert_allclose(same, 1.0, atol=1e-6)
    assert float(jnp.max(result.spearman[-1])) < 0.9
