"""explain on ordinary inputs that used to break it: confident / very unconfident
models (scale-free targets), bfloat16 / float16 models, non-finite pixels, and
variables of another model. Specification in issue 14 and docs/derivatives.md."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcam
from jaxcam import metrics
from jaxcam.data import synthetic

SIZE, C, K = 32, 4, 6
SHIFTS = (-1e4, -300.0, -87.5, -48.0, 0.0, 88.5, 1200.0, 1e4)


@dataclasses.dataclass(frozen=True)
class SmallNet:
    """A small CNN implementing the model protocol: conv3x3 -> ReLU -> 2x2 average pool
    -> conv3x3 -> ReLU (cut "conv2", 8x8xK) -> head: flatten, dense + act, dense + bias.
    ``act`` "relu" (a piecewise-linear head) or "silu" (smooth)."""

    act: str = "relu"
    arch: str = "smallnet"
    num_classes: int = C
    default_layer: str = "conv2"
    layers: tuple = ("conv2",)

    def init(self, key):
        k = jax.random.split(key, 4)
        n = (SIZE // 4) ** 2 * K
        f32 = jnp.float32
        return {"params": {
            "conv1": jax.random.normal(k[0], (3, 3, 3, 8), f32) / np.sqrt(27),
            "conv2": jax.random.normal(k[1], (3, 3, 8, K), f32) / np.sqrt(72),
            "fc1": jax.random.normal(k[2], (n, 16), f32) / np.sqrt(n),
            "fc2": jax.random.normal(k[3], (16, C), f32) / 4.0,
            "bias": jnp.zeros((C,), f32),
        }}

    def abstract_variables(self):
        return jax.eval_shape(self.init, jax.random.PRNGKey(0))

    def resolve_layer(self, name):
        if name in (None, "conv2"):
            return "conv2"
        raise ValueError(f"unknown layer {name!r}; valid layers: conv2")

    def features(self, variables, x, layer=None):
        p = variables["params"]
        conv = lambda z, w: jax.lax.conv_general_dilated(
            z, w.astype(z.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        z = jnp.maximum(conv(x, p["conv1"]), 0)
        b, h, w, c = z.shape
        z = z.reshape(b, h // 4, 4, w // 4, 4, c).mean((2, 4))
        return jnp.maximum(conv(z, p["conv2"]), 0)

    def head(self, variables, A, layer=None, x=None):
        p = variables["params"]
        act = (lambda z: jnp.maximum(z, 0)) if self.act == "relu" else jax.nn.silu
        z = act(A.reshape(A.shape[0], -1) @ p["fc1"].astype(A.dtype))
        return z @ p["fc2"].astype(A.dtype) + p["bias"].astype(A.dtype)

    def apply(self, variables, x):
        return self.head(variables, self.features(variables, x))


def _images(n, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed + 7), (n, SIZE, SIZE, 3), jnp.float32)


def _shifted(variables, shift):
    """Every logit moved by ``shift``: softmax and the gradients are unchanged, so the
    true Grad-CAM++ map of exp(S_c) is too (its derivatives all scale by e^{shift})."""
    p = dict(variables["params"], bias=variables["params"]["bias"] + shift)
    return {"params": p}


def _closed_form_maps_float64(model, variables, x, cls):
    """Independent oracle: eq. 19 Grad-CAM++ in float64 from g = dS_c/dA."""
    v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    x64 = np.asarray(x, np.float64)
    A = model.features(v64, x64)
    g = jax.grad(lambda a: jnp.sum(model.head(v64, a)[jnp.arange(len(cls)), cls]))(A)
    sum_a = A.sum(axis=(1, 2), keepdims=True)
    denom = 2 * g**2 + sum_a * g**3
    alpha = jnp.where(denom != 0, g**2 / jnp.where(denom != 0, denom, 1.0), 0.0)
    alpha = jnp.where(alpha > 0, alpha, 0.0)
    w = jnp.sum(alpha * jnp.maximum(g, 0), axis=(1, 2))
    raw = jnp.maximum(jnp.einsum("bhwk,bk->bhw", A, w), 0)
    up = jax.image.resize(raw, (len(cls), SIZE, SIZE), "bilinear")
    lo, hi = up.min((1, 2), keepdims=True), up.max((1, 2), keepdims=True)
    return np.asarray((up - lo) / (hi - lo))


def test_gradcam_pp_exp_target_is_scale_free_for_any_logit():
    """S_c anywhere in [-1e4, 1e4] (exp over/underflows float32 beyond ~88): the
    float32 maps equal the float64 closed form (exact here: piecewise-linear head) to
    1e-4 and are never degenerate, for the exact and the closed-form engines; the
    reported log_scale is S_c itself."""
    with jax.enable_x64(True):
        model = SmallNet("relu")
        v = model.init(jax.random.PRNGKey(0))
        x = _images(3)
        cls = np.array([0, 1, 3])
        truth = _closed_form_maps_float64(model, v, x, cls)
    model = SmallNet("relu")
    v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), v)
    for shift in SHIFTS:
        vs = _shifted(v, shift)
        for derivatives in ("exact", "closed_form"):
            ex = jaxcam.explain(model, vs, x, method="gradcam++", class_idx=cls,
                                derivatives=derivatives)
            assert not np.any(np.asarray(ex.degenerate)), (shift, derivatives)
            assert np.all(np.asarray(ex.finite))
            np.testing.assert_allclose(ex.maps, truth, atol=1e-4, err_msg=f"{shift}")
            logits = np.asarray(model.apply(vs, x))[np.arange(3), cls]
            np.testing.assert_allclose(ex.log_scale, logits, rtol=1e-6, atol=1e-3)


def test_smooth_head_taylor_engine_is_scale_free():
    """Through a smooth (SiLU) head the exact maps come from the Taylor engine; moving
    every logit by up to 1e4 changes none of them (reference: float64 at shift 0)."""
    model = SmallNet("silu")
    v = model.init(jax.random.PRNGKey(1))
    x = _images(2, seed=1)
    cls = np.array([2, 0])
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v)
        ref = jaxcam.explain(model, v64, jnp.asarray(x, jnp.float64), method="gradcam++",
                             class_idx=cls, engine="taylor")
        assert ref.derivatives == "exact/taylor"
        ref_maps = np.asarray(ref.maps)
    for shift in (-1e4, -300.0, 0.0, 1200.0, 1e4):
        ex = jaxcam.explain(model, _shifted(v, shift), x, method="gradcam++", class_idx=cls)
        assert ex.derivatives == "exact/taylor"
        assert not np.any(np.asarray(ex.degenerate))
        np.testing.assert_allclose(ex.maps, ref_maps, atol=1e-4, err_msg=f"{shift}")


def test_softmax_and_sigmoid_targets_are_scale_free():
    """softmax (factor p_c) and sigmoid (factor sigma(1 - sigma)) of a class whose
    probability underflows float32 still give the float64 maps."""
    model = SmallNet("relu")
    v = model.init(jax.random.PRNGKey(2))
    x = _images(2, seed=2)
    cls = np.array([1, 2])
    # class cls gets -200 relative to the others: p_c ~ e^-200 (0 in float32)
    p = v["params"]
    offset = jnp.zeros((C,)).at[1].set(-200.0).at[2].set(-200.0)
    v = {"params": dict(p, bias=p["bias"] + offset)}
    for target in ("softmax", "sigmoid"):
        with jax.enable_x64(True):
            v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v)
            ref = jaxcam.explain(model, v64, jnp.asarray(x, jnp.float64), method="gradcam++",
                                 target=target, class_idx=cls)
            ref_maps = np.asarray(ref.maps)
        ex = jaxcam.explain(model, v, x, method="gradcam++", target=target, class_idx=cls)
        assert not np.any(np.asarray(ex.degenerate))
        np.testing.assert_allclose(ex.maps, ref_maps, atol=1e-4, err_msg=target)


@pytest.mark.slow
def test_resnet50_with_a_scaled_classifier_is_not_degenerate():
    """The issue's probe: ResNet-50 whose logits are ~+-1000: every map used to be
    degenerate. The maps equal those of the unscaled logits' closed form (bias shifts
    leave the true map unchanged)."""
    model = jaxcam.models.resnet50(num_classes=5)
    v = model.init(jax.random.PRNGKey(0), image_size=64)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    base = jaxcam.explain(model, v, x, method=["gradcam++", "gradcam"], class_idx=[0, 3])
    for shift in (-1200.0, 1200.0):
        params = dict(v["params"], fc=dict(v["params"]["fc"],
                                           bias=v["params"]["fc"]["bias"] + shift))
        exs = jaxcam.explain(model, dict(v, params=params), x, method=["gradcam++", "gradcam"],
                             class_idx=[0, 3])
        assert not np.any(np.asarray(exs["gradcam++"].degenerate)), shift
        for name, ex in exs.items():
            # a logit's Grad-CAM map may be all negative (ReLU'd to 0) whatever the shift
            np.testing.assert_array_equal(ex.degenerate, base[name].degenerate)
            np.testing.assert_allclose(ex.maps, base[name].maps, atol=1e-4)


def _train_small_net(steps=150):
    """SmallNet trained briefly on synthetic lesions (class from the lesion's look)."""
    cfg = synthetic.SyntheticConfig(image_size=SIZE)
    data = [synthetic.make_image(i, cfg) for i in range(96)]
    x = np.stack([d[0] for d in data]).astype(np.float32) / 255.0
    x = (x - x.mean((0, 1, 2))) / x.std((0, 1, 2))
    y = np.array([d[3] for d in data])
    model = SmallNet("relu")
    v = model.init(jax.random.PRNGKey(3))
    tx = optax.adam(3e-3)
    opt = tx.init(v)

    @jax.jit
    def step(v, opt, xb, yb):
        loss = lambda v: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(v, xb), yb).mean()
        g = jax.grad(loss)(v)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(v, upd), opt

    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.choice(len(x), 32, replace=False)
        v, opt = step(v, opt, x[idx], y[idx])
    acc = float(np.mean(np.argmax(model.apply(v, x), -1) == y))
    return model, v, x[:8], acc


def test_bfloat16_and_float16_models_explain_like_float32():
    """Dtype policy: the model runs in its own dtype, derivatives / alphas / maps in
    float32. bf16 maps of a trained model agree with float32 maps (Spearman >= 0.95
    per image; bf16 keeps ~3 significant digits in the forward pass)."""
    model, v, x, acc = _train_small_net()
    assert acc > 0.4  # learned something (4 classes: chance 0.25)
    cls = np.asarray(jnp.argmax(model.apply(v, x), -1))
    methods = ["gradcam", "gradcam++"]
    ref = jaxcam.explain(model, v, x, method=methods, class_idx=cls)
    for dtype in (jnp.bfloat16, jnp.float16):
        vl = jax.tree.map(lambda a, dtype=dtype: a.astype(dtype), v)
        exs = jaxcam.explain(model, vl, x.astype(dtype), method=methods, class_idx=cls)
        for name in methods:
            assert exs[name].maps.dtype == jnp.float32
            rho = np.asarray(metrics.spearman(exs[name].maps, ref[name].maps))
            assert np.all(rho >= 0.95), (dtype, name, rho)


def test_non_finite_pixels_raise_eagerly_and_are_flagged_under_jit():
    model = SmallNet("relu")
    v = model.init(jax.random.PRNGKey(0))
    x = np.array(_images(3))
    x[1, 4, 5, 0] = np.nan
    x[2, 0, 0, 2] = np.inf
    with pytest.raises(ValueError, match=r"images \[1, 2\] contain NaN or infinite pixels"):
        jaxcam.explain(model, v, x, method="gradcam")
    ex = jaxcam.explain(model, v, x, method="gradcam", nonfinite="flag")
    np.testing.assert_array_equal(ex.finite, [True, False, False])
    flags = jax.jit(lambda x: jaxcam.explain(model, v, x, method="gradcam++").finite)(x)
    np.testing.assert_array_equal(flags, [True, False, False])
    # non-finite variables give non-finite outputs: named too
    bad = {"params": dict(v["params"], bias=v["params"]["bias"].at[0].set(jnp.inf))}
    with pytest.raises(ValueError, match=r"explanation of images \[0, 1, 2\] is not finite"):
        jaxcam.explain(model, bad, _images(3), method="gradcam")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        jaxcam.explain(model, v, _images(3), nonfinite="ignore")


def test_variables_of_another_architecture_name_it():
    """VGG19's variables given to a ResNet-50 used to raise KeyError: 'fc'."""
    resnet, vgg = jaxcam.models.resnet50(num_classes=3), jaxcam.models.vgg19(num_classes=3)
    x = jnp.zeros((1, 32, 32, 3))
    vgg_vars = jax.tree.map(jnp.zeros_like, vgg.abstract_variables())
    with pytest.raises(ValueError, match=r"variables do not belong to this resnet50.*missing "
                                         r"\(\d+\): .*look like the variables of a vgg19"):
        jaxcam.explain(resnet, vgg_vars, x, method="gradcam")
    small = jaxcam.models.resnet50(num_classes=5)
    wrong_width = jax.tree.map(jnp.zeros_like, small.abstract_variables())
    with pytest.raises(ValueError, match=r"shape mismatches \(2\): params/fc/bias: \(5,\) != "
                                         r"\(3,\)"):
        jaxcam.explain(resnet, wrong_width, x, method="gradcam")
