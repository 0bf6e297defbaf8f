"""jaxcam.explain end to end: a tiny stand-in model (fast to compile) for the API
properties, and ResNet-50 / VGG19 at 64 px for the engine agreement on real heads."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcam
from jaxcam import derivatives as deriv
from jaxcam import explanation, methods, targets

SIZE, C = 32, 5


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """Test-only model with the jaxcam.models API: 4x4 average pooling, a 1x1 conv
    with ReLU (the cut point "conv", K = 6), then a head: "gap" (GAP + dense),
    "mlp" (flatten, ReLU dense, dense) or "smooth" (same with SiLU)."""

    kind: str = "gap"
    arch: str = "tiny"
    num_classes: int = C
    default_layer: str = "conv"
    layers: tuple = ("conv",)

    def init(self, key):
        k = jax.random.split(key, 4)
        hw = (SIZE // 4) ** 2
        return {"params": {
            "conv": jax.random.normal(k[0], (3, 6)),
            "dense": jax.random.normal(k[1], (6, C)),
            "fc1": jax.random.normal(k[2], (hw * 6, 8)) / np.sqrt(hw * 6),
            "fc2": jax.random.normal(k[3], (8, C)),
        }}

    def resolve_layer(self, name):
        if name in (None, "conv"):
            return "conv"
        raise ValueError(f"unknown layer {name!r} for tiny; valid layers: conv")

    def features(self, variables, x, layer=None):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images x must have rank 4 (B, H, W, 3), got shape {x.shape}")
        b, h, w, _ = x.shape
        pooled = x.reshape(b, h // 4, 4, w // 4, 4, 3).mean((2, 4))
        return jax.nn.relu(pooled @ variables["params"]["conv"])

    def head(self, variables, A, layer=None, x=None):
        p = variables["params"]
        if self.kind == "gap":
            return A.mean((1, 2)) @ p["dense"]
        act = jax.nn.relu if self.kind == "mlp" else jax.nn.silu
        return act(A.reshape(A.shape[0], -1) @ p["fc1"]) @ p["fc2"]

    def apply(self, variables, x):
        return self.head(variables, self.features(variables, x))

    def linear_head(self, variables, layer=None):
        if self.kind != "gap":
            return None
        return variables["params"]["dense"], jnp.zeros((C,))


def _setup(kind="gap", batch=3, seed=0):
    model = TinyModel(kind)
    variables = model.init(jax.random.PRNGKey(seed))
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, SIZE, SIZE, 3))
    return model, variables, x


GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "shapleycam")


def test_explain_maps_are_normalised_upsampled_raw_maps():
    model, v, x = _setup("mlp")
    exs = jaxcam.explain(model, v, x, method=list(jaxcam.METHODS[1:]))
    assert set(exs) == set(jaxcam.METHODS[1:])
    for name, ex in exs.items():
        assert ex.method == name and ex.layer == "conv"
        assert ex.target == explanation.DEFAULT_TARGETS[name]
        up = jax.image.resize(ex.raw, (3, SIZE, SIZE), "bilinear")
        lo, hi = up.min((1, 2), keepdims=True), up.max((1, 2), keepdims=True)
        np.testing.assert_allclose(ex.maps, (up - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
        assert float(ex.maps.min()) == 0.0 and float(ex.maps.max()) == pytest.approx(1.0)
        np.testing.assert_array_equal(ex.class_idx, jnp.argmax(ex.logits, -1))
    assert exs["gradcam++"].derivatives == "exact/factored"


def test_explain_weights_equal_the_method_functions():
    """Independent composition: features -> diagonal_derivatives -> methods."""
    model, v, x = _setup("smooth")
    exs = jaxcam.explain(model, v, x, method=["gradcam", "gradcam++", "xgradcam"],
                         class_idx=[0, 1, 2])
    assert exs["gradcam++"].derivatives == "exact/taylor"
    A = model.features(v, x)
    head = lambda a: model.head(v, a)
    cls = jnp.array([0, 1, 2])
    D = deriv.diagonal_derivatives(None, A, "taylor", head=head, target="exp", class_idx=cls)
    # weights are reported up to the positive factor exp(log_scale) (= e^{S_c} for exp)
    pp = exs["gradcam++"]
    np.testing.assert_allclose(pp.log_scale, head(A)[jnp.arange(3), cls], rtol=1e-6)
    np.testing.assert_allclose(jnp.exp(pp.log_scale)[:, None] * pp.weights,
                               methods.gradcam_pp_weights(A, *D), rtol=2e-4, atol=1e-6)
    D1 = deriv.diagonal_derivatives(None, A, "closed_form", head=head, target="logit",
                                    class_idx=cls)[0] / jnp.exp(head(A)[jnp.arange(3), cls]
                                                                )[:, None, None, None]
    np.testing.assert_allclose(exs["gradcam"].weights, methods.gradcam_weights(D1), rtol=1e-5)
    np.testing.assert_allclose(exs["xgradcam"].weights, methods.xgradcam_weights(A, D1),
                               rtol=1e-5)


def test_gap_head_identities_through_explain():
    model, v, x = _setup("gap")
    exs = jaxcam.explain(model, v, x, method=["cam", "gradcam", "gradcam++"],
                         derivatives="exact")
    np.testing.assert_allclose(exs["gradcam"].raw, exs["cam"].raw / (SIZE // 4) ** 2,
                               rtol=1e-5, atol=1e-7)
    closed = jaxcam.explain(model, v, x, method="gradcam++", derivatives="closed_form")
    np.testing.assert_allclose(exs["gradcam++"].maps, closed.maps, atol=1e-5)


def test_batch_equals_per_image_and_repeated_calls_reuse_the_compiled_function(x64):
    # float64: batched and single-image XLA kernels round differently in float32, and
    # min-max normalisation of the maps amplifies that to ~4e-5 at a few pixels
    model, v, x = _setup("mlp")
    full = jaxcam.explain(model, v, x, method=["gradcam++", "layercam"], target="softmax")
    n_compiled = len(explanation._COMPILED)
    again = jaxcam.explain(model, v, x, method=["gradcam++", "layercam"], target="softmax")
    assert len(explanation._COMPILED) == n_compiled
    np.testing.assert_array_equal(full["gradcam++"].maps, again["gradcam++"].maps)
    for b in range(3):
        one = jaxcam.explain(model, v, x[b : b + 1], method=["gradcam++", "layercam"],
                             target="softmax")
        for name in one:
            np.testing.assert_allclose(one[name].maps[0], full[name].maps[b], atol=1e-10)


def test_explain_is_differentiable_wrt_images():
    model, v, x = _setup("mlp")

    def loss(images):
        ex = jaxcam.explain(model, v, images, method="gradcam++", target="log_softmax",
                            class_idx=[0, 1, 2])
        return jnp.sum(ex.maps * jnp.linspace(0, 1, SIZE))

    g = jax.grad(loss)(x)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0


def test_all_zero_map_is_flagged_not_nan():
    model, v, x = _setup("gap")
    v = jax.tree_util.tree_map(lambda a: a, v)
    v["params"]["dense"] = jnp.zeros_like(v["params"]["dense"])
    ex = jaxcam.explain(model, v, x, method="gradcam")
    assert np.all(np.asarray(ex.degenerate))
    assert np.all(np.asarray(ex.maps) == 0)


def test_callable_target():
    model, v, x = _setup("mlp")
    phi = lambda S, c: jnp.tanh(S[c]) * 3.0
    ex = jaxcam.explain(model, v, x, method="gradcam++", target=phi)
    assert ex.target == "<lambda>"
    A = model.features(v, x)
    D = deriv.diagonal_derivatives(None, A, "taylor", head=lambda a: model.head(v, a),
                                   target=phi)
    np.testing.assert_allclose(ex.weights, methods.gradcam_pp_weights(A, *D), rtol=2e-4,
                               atol=1e-6)


def test_errors_are_raised_up_front():
    model, v, x = _setup("mlp")
    with pytest.raises(ValueError, match=r"Unknown method 'gradcam\+'"):
        jaxcam.explain(model, v, x, method="gradcam+")
    with pytest.raises(ValueError, match="repeated name"):
        jaxcam.explain(model, v, x, method=["gradcam", "gradcam"])
    with pytest.raises(ValueError, match="Unknown target 'prob'"):
        jaxcam.explain(model, v, x, target="prob")
    with pytest.raises(ValueError, match="Unknown derivatives 'hessian'"):
        jaxcam.explain(model, v, x, derivatives="hessian")
    with pytest.raises(ValueError, match="Unknown engine"):
        jaxcam.explain(model, v, x, engine="jet")
    with pytest.raises(ValueError, match=r"class_idx\[2\] = 5 is out of range"):
        jaxcam.explain(model, v, x, class_idx=[0, 1, 5])
    with pytest.raises(ValueError, match="CAM needs a head that is global average pooling"):
        jaxcam.explain(model, v, x, method="cam")
    with pytest.raises(ValueError, match="target='logit' is degenerate.*'exp'.*'softmax'"):
        jaxcam.explain(model, v, x, method="gradcam++", target="logit")
    with pytest.raises(ValueError, match="rank 4"):
        jaxcam.explain(model, v, x[0])
    smooth, vs, xs = _setup("smooth")
    with pytest.raises(ValueError, match="'factored' needs a piecewise-linear head"):
        jaxcam.explain(smooth, vs, xs, engine="factored")
    # logit + exact is fine for a smooth head (D2 is not 0 there)
    ex = jaxcam.explain(smooth, vs, xs, method="gradcam++", target="logit")
    assert not np.any(np.asarray(ex.degenerate))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "vgg19"])
def test_real_heads_factored_equals_taylor_and_closed_form_for_exp(arch):
    """Default layer, random init, 64 px: the certificate holds, factored == taylor on
    sampled coordinates (exp and softmax), and exp == closed form everywhere sampled."""
    model = jaxcam.models.get(arch, 7)
    v = model.init(jax.random.PRNGKey(0), image_size=64)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    layer = model.default_layer
    A = jax.jit(lambda v, x: model.features(v, x, layer))(v, x)
    head = lambda a: model.head(v, a, layer)
    assert deriv.is_piecewise_linear(head, A)
    cls = jnp.argmax(head(A), -1)
    coords = jax.random.choice(jax.random.PRNGKey(2), A[0].size, (48,), replace=False)
    closed = deriv.diagonal_derivatives(None, A, "closed_form", head=head, target="exp",
                                        class_idx=cls)
    for target in ("exp", "softmax"):
        phi = targets.get_target(target)
        f = lambda a, phi=phi: jax.vmap(phi)(head(a), cls)
        truth = deriv.taylor_derivatives_at(f, A, coords)
        fac = deriv.diagonal_derivatives(None, A, "factored", head=head, target=target,
                                         class_idx=cls, certified=True,
                                         linear_head=model.linear_head(v, layer))
        for n in range(3):
            got = np.asarray(fac[n]).reshape(2, -1)[:, np.asarray(coords)]
            scale = np.abs(np.asarray(fac[n])).max()
            np.testing.assert_allclose(got, truth[n], rtol=1e-3, atol=1e-4 * scale)
            if target == "exp":
                np.testing.assert_allclose(closed[n], fac[n], rtol=1e-4, atol=1e-5 * scale)
