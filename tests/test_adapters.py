"""jaxcam.models adapters: a user's linen / NNX module or plain functions, cut at named
submodules. Models are written the way users write them (tests/ only, tiny sizes)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcam
from jaxcam.models import from_functions, from_linen, from_nnx, tokens_to_grid

SIZE = 16
SHAPE = (1, SIZE, SIZE, 3)


def _images(batch=2, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, SIZE, SIZE, 3))


def _randomise_batch_stats(variables, seed=7):
    """Running statistics far from init (mean 0, var 1), so eval mode is visible."""
    stats = variables["batch_stats"]
    leaves, treedef = jax.tree_util.tree_flatten(stats)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [jax.random.uniform(k, leaf.shape, minval=0.5, maxval=2.0) for k, leaf in
           zip(keys, leaves, strict=True)]
    return {**variables, "batch_stats": jax.tree_util.tree_unflatten(treedef, new)}


# ---- the models, as users write them ------------------------------------------


class ResBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.Conv(self.features, (3, 3), name="conv_a")(x)
        y = nn.BatchNorm(use_running_average=not train, name="bn_a")(y)
        y = nn.relu(y)
        y = nn.Conv(self.features, (3, 3), name="conv_b")(y)
        return nn.relu(x + y)  # the skip path crosses every cut inside the block


class LinenCNN(nn.Module):
    num_classes: int = 5

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
        x = ResBlock(8, name="block1")(x, train)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = ResBlock(8, name="block2")(x, train)
        x = x.mean((1, 2))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="fc")(x)


LINEN_CNN_LAYERS = (
    "stem",
    "block1/conv_a", "block1/bn_a", "block1/conv_b", "block1",
    "block2/conv_a", "block2/bn_a", "block2/conv_b", "block2",
    "Dropout_0", "fc",
)


class SegNet(nn.Module):
    """Encoder-decoder for segmentation: output (B, H, W, C); a U-Net skip from enc1."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x):
        e1 = nn.relu(nn.Conv(8, (3, 3), name="enc1")(x))
        e2 = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), name="enc2")(e1))
        d = nn.ConvTranspose(8, (2, 2), strides=(2, 2), name="up")(e2)
        d = nn.relu(nn.Conv(8, (3, 3), name="dec")(jnp.concatenate([d, e1], -1)))
        return nn.Conv(self.num_classes, (1, 1), name="out")(d)


class NNXCNN(nnx.Module):
    def __init__(self, num_classes: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(16, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.fc = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.avg_pool(x, (2, 2), (2, 2))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.fc(self.dropout(x.mean((1, 2))))


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False,
                                           rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class ViT(nnx.Module):
    """16x16 images, 4x4 patches -> 16 tokens + a class token, two blocks."""

    def __init__(self, rngs: nnx.Rngs, dim: int = 16, depth: int = 2, classes: int = 4):
        self.patch_embed = nnx.Conv(3, dim, (4, 4), strides=(4, 4), padding="VALID",
                                    rngs=rngs)
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim)))
        self.pos_embed = nnx.Param(0.1 * jax.random.normal(rngs.params(), (1, 17, dim)))
        self.blocks = nnx.List([Block(dim, 2, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, x):
        x = self.patch_embed(x)
        b, _, _, d = x.shape
        x = x.reshape(b, -1, d)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


@pytest.fixture(scope="module")
def linen_cnn():
    module = LinenCNN()
    variables = _randomise_batch_stats(module.init(jax.random.key(0), jnp.zeros(SHAPE)))
    return module, from_linen(module, input_shape=SHAPE), variables


@pytest.fixture(scope="module")
def vit():
    module = ViT(nnx.Rngs(0))
    model, state = from_nnx(module, input_shape=SHAPE, reshape=tokens_to_grid(1),
                            default_layer="blocks.1.norm1")
    return module, model, state


def _assert_head_inverts_features(model, variables, x, layer):
    a = model.features(variables, x, layer)
    # Eagerly, head runs the same primitives on the same numbers as apply, with the cut's
    # output replaced by an identical array: bitwise equal.
    np.testing.assert_array_equal(model.head(variables, a, layer, x=x), model.apply(variables, x))


# ---- linen ------------------------------------------------------------------------


def test_linen_layers_in_the_order_outputs_are_computed(linen_cnn):
    _, model, _ = linen_cnn
    assert model.layers == LINEN_CNN_LAYERS
    assert model.default_layer == "block2"  # the last 4-D output before the output
    assert model.num_classes == 5 and model.arch == "LinenCNN"
    assert model.call_kwargs == (("train", False),)
    assert model.param_order == ("stem", "block1", "block2", "fc")


def test_linen_head_of_features_is_apply_at_every_cut(linen_cnn):
    _, model, v = linen_cnn
    x = _images()
    for layer in model.layers:
        _assert_head_inverts_features(model, v, x, layer)


def test_linen_under_jit_head_of_features_matches_apply(linen_cnn):
    _, model, v = linen_cnn
    x = _images()
    feats = jax.jit(model.features, static_argnums=2)
    head = jax.jit(lambda v, a, x: model.head(v, a, "block1/bn_a", x=x))
    # jit fuses head and apply differently: float32 rounding of a few dozen ops on O(1)
    # values
    np.testing.assert_allclose(head(v, feats(v, x, "block1/bn_a"), x), model.apply(v, x),
                               rtol=1e-5, atol=1e-5)


def test_linen_eval_mode_by_default(linen_cnn):
    module, model, v = linen_cnn
    x = _images()
    out = model.apply(v, x)
    np.testing.assert_array_equal(out, module.apply(v, x, train=False))
    np.testing.assert_array_equal(out, model.apply(v, x))  # no dropout: deterministic
    train, _ = module.apply(v, x, train=True, rngs={"dropout": jax.random.key(3)},
                            mutable=["batch_stats"])
    assert float(jnp.abs(train - out).max()) > 1e-2  # train mode would differ visibly
    # the running statistics are read, not updated (nothing is mutable)
    a = model.features(v, x, "block2/bn_a")
    y = model.features(v, x, "block2/conv_a")
    stats = v["batch_stats"]["block2"]["bn_a"]
    bn = v["params"]["block2"]["bn_a"]
    expect = (y - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * bn["scale"] + bn["bias"]
    np.testing.assert_allclose(a, expect, rtol=1e-5, atol=1e-5)


def test_linen_call_kwargs_override(linen_cnn):
    module, _, v = linen_cnn
    with pytest.raises(ValueError, match=r"not in eval mode.*batch_stats.*call_kwargs"):
        from_linen(module, input_shape=SHAPE, call_kwargs={"train": True})
    # the given kwargs are passed to __call__
    model = from_linen(module, input_shape=SHAPE, call_kwargs={"train": False})
    np.testing.assert_array_equal(model.apply(v, _images()), module.apply(v, _images()))


def test_gradient_at_a_cut_inside_a_residual_block_is_the_partial_derivative(linen_cnn):
    """At block2/conv_b, y = conv_b(...) is added to block2's input x: the skip crosses
    the cut. Hand-written rest of the model: S = fc(mean(relu(x + A))), x held fixed."""
    module, model, v = linen_cnn
    x = _images()
    layer = "block2/conv_b"
    a = model.features(v, x, layer)
    _, inter = module.apply(v, x, capture_intermediates=True)
    skip = nn.max_pool(inter["intermediates"]["block1"]["__call__"][0], (2, 2), (2, 2))
    fc = v["params"]["fc"]

    def by_hand(a):
        return jnp.maximum(skip + a, 0).mean((1, 2)) @ fc["kernel"] + fc["bias"]

    np.testing.assert_allclose(by_hand(a), model.apply(v, x), rtol=1e-5, atol=1e-6)
    for c in range(3):
        want = jax.grad(lambda a, c=c: by_hand(a)[:, c].sum())(a)
        got = jax.grad(lambda a, c=c: model.head(v, a, layer, x=x)[:, c].sum())(a)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        # Grad-CAM weights from it: the mean over (h, w)
        np.testing.assert_allclose(got.mean((1, 2)), want.mean((1, 2)), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(want).max()) > 0


def test_linen_segmentation_encoder_decoder():
    module = SegNet()
    v = module.init(jax.random.key(0), jnp.zeros(SHAPE))
    model = from_linen(module, input_shape=SHAPE)
    assert model.layers == ("enc1", "enc2", "up", "dec", "out")
    assert model.num_classes is None  # outputs are (B, H, W, C), not (B, C)
    assert model.default_layer == "dec"  # "out" is the model's output itself
    x = _images()
    assert model.apply(v, x).shape == (2, SIZE, SIZE, 3)
    for layer in model.layers:
        _assert_head_inverts_features(model, v, x, layer)
    # at "up", the U-Net skip from enc1 crosses the cut: held fixed, so a zero A still
    # reaches the output through it
    a = model.features(v, x, "up")
    zero = model.head(v, jnp.zeros_like(a), "up", x=x)
    e1 = model.features(v, x, "enc1")
    dec = v["params"]["dec"]
    d = jax.lax.conv_general_dilated(
        jnp.concatenate([jnp.zeros_like(a), jax.nn.relu(e1)], -1), dec["kernel"], (1, 1),
        "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + dec["bias"]
    out = v["params"]["out"]
    want = jnp.einsum("bhwk,kc->bhwc", jax.nn.relu(d), out["kernel"][0, 0]) + out["bias"]
    np.testing.assert_allclose(zero, want, rtol=1e-5, atol=1e-5)


def _he_variables(abstract, seed=0):
    """Variables of the given shapes, quickly (no compiled init): He-scaled kernels,
    BN statistics and scales in [0.5, 1.5], small biases."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        key = jax.tree_util.keystr(path)
        if "kernel" in key:
            fan_in = int(np.prod(s.shape[:-1]))
            return jnp.asarray(rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in), s.dtype)
        if "var" in key or "scale" in key:
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def test_jaxcam_resnet50_through_from_linen_equals_the_native_model():
    """The native model is a StagedNet: its bottlenecks are children "0", "1", ... of a
    per-stage `Sequential` called once per block, so torchvision's `layer4` (= native
    cut "layer4", the last bottleneck) is linen path "layer4/2"; "layer4" itself is the
    Sequential container, called 3 times, which cannot be cut. Likewise native
    "layer{s}.{i}" is "layer{s}/{i}", and the stem's conv and BN are "conv1", "bn1"."""
    native = jaxcam.models.resnet50(num_classes=10)
    v = _he_variables(native.abstract_variables())
    shape = (1, 32, 32, 3)
    model = from_linen(native.module, input_shape=shape, name="resnet50")
    assert model.default_layer == "layer4/2" and model.num_classes == 10
    assert model.param_order == native.param_order
    assert model == from_linen(native.module, input_shape=shape, name="resnet50")
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    for ours, theirs in (("layer4/2", "layer4"), ("layer3/4", "layer3.4")):
        a = model.features(v, x, ours)
        np.testing.assert_allclose(a, native.features(v, x, theirs), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(model.head(v, a, ours, x=x), native.head(v, a, theirs),
                                   rtol=1e-6, atol=1e-6)
    a = model.features(v, x, "layer4/2")
    g = jax.jit(jax.grad(lambda a: model.head(v, a, "layer4/2", x=x)[:, 3].sum()))(a)
    gn = jax.jit(jax.grad(lambda a: native.head(v, a, "layer4")[:, 3].sum()))(a)
    np.testing.assert_allclose(g, gn, rtol=1e-6, atol=1e-9)
    w, b = model.linear_head(v, "layer4/2")
    assert w is v["params"]["fc"]["kernel"] and b is v["params"]["fc"]["bias"]
    assert model.linear_head(v, "layer4/1") is None
    with pytest.raises(ValueError, match="'layer4' of resnet50 is called 3 times"):
        model.features(v, x, "layer4")


def test_linen_linear_head_is_gap_plus_dense_only(linen_cnn):
    _, model, v = linen_cnn
    # after block2: mean over (h, w), dropout (identity in eval mode), fc
    w, b = model.linear_head(v, "block2")
    assert w is v["params"]["fc"]["kernel"] and b is v["params"]["fc"]["bias"]
    a = model.features(v, _images(), "block2")
    np.testing.assert_allclose(model.head(v, a, "block2", x=_images()),
                               a.mean((1, 2)) @ w + b, rtol=1e-5, atol=1e-6)
    # inside the block, the ReLU and the skip come between A and the pooling
    assert model.linear_head(v, "block2/conv_b") is None
    assert model.linear_head(v, "block1") is None


def test_models_are_hashable_and_equal_when_built_alike(linen_cnn, vit):
    module, model, _ = linen_cnn
    again = from_linen(LinenCNN(), input_shape=SHAPE)
    assert again == model and hash(again) == hash(model)
    assert from_linen(module, input_shape=SHAPE, default_layer="block1") != model
    vmodule, vmodel, _ = vit
    other, _ = from_nnx(vmodule, input_shape=SHAPE, reshape=tokens_to_grid(1),
                        default_layer="blocks.1.norm1")
    assert other == vmodel and hash(other) == hash(vmodel)
    jitted = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
    np.testing.assert_allclose(jitted(again, linen_cnn[2], _images()),
                               model.apply(linen_cnn[2], _images()), rtol=1e-5, atol=1e-5)


# ---- errors -----------------------------------------------------------------------


class SharedDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv")(x).mean((1, 2))
        dense = nn.Dense(4, name="shared")
        return nn.Dense(2, name="out")(dense(jnp.tanh(dense(x))))


class Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (1, 1), name="a")(x), nn.Conv(4, (1, 1), name="b")(x)


class TupleOutput(nn.Module):
    @nn.compact
    def __call__(self, x):
        a, b = Pair(name="pair")(x)
        return nn.Dense(2, name="out")((a * b).mean((1, 2)))


def test_unknown_layer_lists_the_layers_and_close_matches(linen_cnn):
    _, model, v = linen_cnn
    with pytest.raises(ValueError, match=re.escape("did you mean 'block2/conv_b'")) as err:
        model.features(v, _images(), "block2/convb")
    assert ", ".join(LINEN_CNN_LAYERS) in str(err.value)
    with pytest.raises(ValueError, match="unknown layer 'layer4'"):
        model.resolve_layer("layer4")
    with pytest.raises(ValueError, match="default_layer 'nope' is not a cut point"):
        from_linen(LinenCNN(), input_shape=SHAPE, default_layer="nope")


def test_a_shared_submodule_is_listed_but_cannot_be_cut():
    module = SharedDense()
    v = module.init(jax.random.key(0), jnp.zeros(SHAPE))
    model = from_linen(module, input_shape=SHAPE)
    assert model.layers == ("conv", "shared", "out")
    x = _images()
    a = model.features(v, x, "conv")
    for call in (lambda: model.features(v, x, "shared"),
                 lambda: model.head(v, a, "shared", x=x)):
        with pytest.raises(ValueError, match="'shared' of SharedDense is called 2 times"):
            call()


def test_a_tuple_output_is_not_a_cut_point():
    module = TupleOutput()
    v = module.init(jax.random.key(0), jnp.zeros(SHAPE))
    model = from_linen(module, input_shape=SHAPE)
    assert model.layers == ("pair/a", "pair/b", "out")
    with pytest.raises(ValueError, match=r"'pair' of TupleOutput returns a tuple of 2 elements"
                                         r".*from_functions"):
        model.features(v, _images(), "pair")
    _assert_head_inverts_features(model, v, _images(), "pair/b")


def test_head_needs_the_images_and_the_right_activation_shape(linen_cnn):
    _, model, v = linen_cnn
    x = _images()
    a = model.features(v, x, "block2")
    with pytest.raises(ValueError, match=r"needs the images.*x=x"):
        model.head(v, a, "block2")
    with pytest.raises(ValueError, match=r"must have shape \(2, 8, 8, 8\).*got \(2, 16, 16, 8\)"):
        model.head(v, model.features(v, x, "block1"), "block2", x=x)
    with pytest.raises(ValueError, match=r"must have shape"):
        model.head(v, a[:1], "block2", x=x)
    with pytest.raises(ValueError, match=r"add a batch axis"):
        model.apply(v, x[0])
    with pytest.raises(ValueError, match="NCHW"):
        model.features(v, jnp.zeros((2, 3, SIZE, SIZE)), "block2")


def test_wrong_module_kinds_are_refused():
    with pytest.raises(ValueError, match="use jaxcam.models.from_nnx"):
        from_linen(NNXCNN(3, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="use jaxcam.models.from_linen"):
        from_nnx(LinenCNN())


# ---- NNX --------------------------------------------------------------------------


def test_nnx_cnn_layers_cut_and_eval_mode():
    module = NNXCNN(3, nnx.Rngs(0))
    for bn in (module.bn1, module.bn2):
        bn.mean[...] = jax.random.normal(jax.random.key(5), bn.mean.shape)
        bn.var[...] = jax.random.uniform(jax.random.key(6), bn.var.shape, minval=0.5, maxval=2)
    model, state = from_nnx(module, input_shape=SHAPE)
    assert model.layers == ("conv1", "bn1", "conv2", "bn2", "dropout", "fc")
    assert model.default_layer == "bn2" and model.num_classes == 3
    assert module.dropout.deterministic is False  # the user's module is left alone
    x = _images()
    out = model.apply(state, x)
    np.testing.assert_array_equal(out, model.apply(state, x))
    module.eval()  # flax's own eval mode: running statistics, no dropout
    np.testing.assert_allclose(out, module(x), rtol=1e-6, atol=1e-6)
    # nnx.state of the user's module (e.g. after training) is accepted as well
    np.testing.assert_allclose(model.apply(nnx.state(module), x), out, rtol=1e-6, atol=1e-6)
    module.train()
    train = module(x)
    assert float(jnp.abs(train - out).max()) > 1e-2
    for layer in model.layers:
        _assert_head_inverts_features(model, state, x, layer)
    w, b = model.linear_head(state, "bn2") or (None, None)
    assert w is None  # a ReLU comes between bn2 and the pooling
    abstract = model.abstract_variables()
    assert jax.tree.map(lambda s: (s.shape, s.dtype), abstract) == jax.tree.map(
        lambda a: (a.shape, a.dtype), state)


class NNXGapAfterRelu(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.act = nnx.Sequential(nnx.relu)  # a module whose output is the ReLU
        self.fc = nnx.Linear(6, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.act(self.conv(x)).mean((1, 2)))


def test_nnx_gap_dense_head_is_detected():
    model, state = from_nnx(NNXGapAfterRelu(nnx.Rngs(0)), input_shape=SHAPE)
    assert model.default_layer == "act"
    w, b = model.linear_head(state, "act")
    np.testing.assert_array_equal(w, state["fc"]["kernel"][...])
    np.testing.assert_array_equal(b, state["fc"]["bias"][...])
    x = _images()
    a = model.features(state, x, "act")
    np.testing.assert_allclose(model.head(state, a, "act", x=x), a.mean((1, 2)) @ w + b,
                               rtol=1e-5, atol=1e-6)
    assert model.linear_head(state, "conv") is None


def test_head_under_jit_vmap_and_jvp_equals_the_loop(vit):
    """What the derivative engines do: jvp of the head along many directions, vmapped,
    with x and the variables fixed."""
    _, model, state = vit
    x = _images()
    layer = "blocks.1.norm1"
    a = model.features(state, x, layer)
    dirs = jax.random.normal(jax.random.key(4), (3, *a.shape))

    def tangent(d):
        return jax.jvp(lambda a: model.head(state, a, layer, x=x), (a,), (d,))[1]

    batched = jax.jit(jax.vmap(tangent))(dirs)
    single = jax.jit(tangent)
    for i in range(3):
        # batched vs unbatched kernels: float32 rounding of the attention block, values O(1)
        np.testing.assert_allclose(batched[i], single(dirs[i]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda s, a, x: model.head(s, a, layer, x=x))(
        state, a, x), model.apply(state, x), rtol=1e-5, atol=1e-5)


class SharedNNX(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)  # one module object used twice
        self.fc = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        x = self.dropout(self.conv(x))
        return self.fc(self.dropout(x.mean((1, 2))))


def test_nnx_shared_module_cannot_be_cut():
    model, state = from_nnx(SharedNNX(nnx.Rngs(0)), input_shape=SHAPE)
    assert "dropout" in model.layers
    with pytest.raises(ValueError, match="'dropout' of SharedNNX is called 2 times"):
        model.features(state, _images(), "dropout")
    _assert_head_inverts_features(model, state, _images(), "conv")


def test_vit_layer_names_and_head_of_features(vit):
    _, model, state = vit
    block = ("norm1", "attn.query", "attn.key", "attn.value", "attn.out", "attn", "norm2",
             "fc1", "fc2")
    want = ("patch_embed",) + tuple(f"blocks.{i}.{n}" for i in (0, 1) for n in (*block, "")
                                    ) + ("norm", "head")
    assert model.layers == tuple(n.rstrip(".") for n in want)
    assert model.num_classes == 4 and model.default_layer == "blocks.1.norm1"
    x = _images()
    for layer in model.layers:
        _assert_head_inverts_features(model, state, x, layer)


def test_vit_gradient_holds_the_residual_stream_and_class_token_fixed(vit):
    """At blocks.1.norm1 the residual stream x crosses the cut (x + attn(norm1(x))):
    the head's derivative is dS/dA with x held fixed, written here by hand."""
    module, model, state = vit
    x = _images()
    layer = "blocks.1.norm1"
    m = nnx.merge(*nnx.split(nnx.view(module, deterministic=True)))
    t = m.patch_embed(x).reshape(2, -1, 16)
    t = jnp.concatenate([jnp.broadcast_to(m.cls_token[...], (2, 1, 16)), t], 1)
    stream = m.blocks[0](t + m.pos_embed[...])
    blk = m.blocks[1]

    def by_hand(a):
        y = stream + blk.attn(a)
        y = y + blk.fc2(nnx.gelu(blk.fc1(blk.norm2(y))))
        return m.head(m.norm(y)[:, 0])

    a = model.features(state, x, layer)
    np.testing.assert_allclose(a, blk.norm1(stream), rtol=1e-6, atol=1e-6)
    for c in range(2):
        want = jax.grad(lambda a, c=c: by_hand(a)[:, c].sum())(a)
        got = jax.grad(lambda a, c=c: model.head(state, a, layer, x=x)[:, c].sum())(a)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert float(jnp.abs(want).max()) > 0


def test_tokens_to_grid_is_an_exact_reindexing(vit):
    _, model, state = vit
    x = _images()
    a = model.features(state, x, "blocks.1.norm1")
    grid = model.to_grid(a, "blocks.1.norm1")
    assert grid.shape == (2, 4, 4, 16)
    for i in range(4):
        for j in range(4):
            np.testing.assert_array_equal(grid[:, i, j], a[:, 1 + 4 * i + j])
    tokens = jnp.arange(2 * 11 * 3).reshape(2, 11, 3)
    g = tokens_to_grid(num_prefix_tokens=3, grid=(2, 4))(tokens)
    np.testing.assert_array_equal(g, np.arange(66).reshape(2, 11, 3)[:, 3:].reshape(2, 2, 4, 3))
    with pytest.raises(ValueError, match="not a square number; pass grid"):
        tokens_to_grid(1)(jnp.zeros((1, 11, 3)))
    with pytest.raises(ValueError, match=r"grid 3x3 = 9 cells but there are 8 tokens"):
        tokens_to_grid(3, grid=(3, 3))(tokens)
    with pytest.raises(ValueError, match=r"expects tokens shaped \(B, N, D\)"):
        model.to_grid(model.features(state, x, "patch_embed"), "patch_embed")


def test_to_grid_without_reshape(vit, linen_cnn):
    module, _, state = vit
    plain, _ = from_nnx(module, input_shape=SHAPE, default_layer="blocks.1.norm1")
    a = plain.features(state, _images(), "blocks.1.norm1")
    with pytest.raises(ValueError, match=r"not a \(B, h, w, K\) grid; pass reshape=.*tokens_to"):
        plain.to_grid(a, "blocks.1.norm1")
    # without a reshape the default is the last 4-D output before the model's output:
    # here attention's (B, N, heads, head_dim) values, which is why a ViT gets its
    # default_layer (or a reshape) from the user
    assert from_nnx(module, input_shape=SHAPE)[0].default_layer == "blocks.1.attn.value"
    # a mapping reshapes only the layers it names
    mixed, _ = from_nnx(module, input_shape=SHAPE, default_layer="blocks.1.norm1",
                        reshape={"blocks.1.norm1": tokens_to_grid(1)})
    conv = mixed.features(state, _images(), "patch_embed")
    assert mixed.to_grid(conv, "patch_embed") is conv
    assert mixed.to_grid(a, "blocks.1.norm1").shape == (2, 4, 4, 16)
    _, cnn, v = linen_cnn
    a = cnn.features(v, _images(), "block2")
    assert cnn.to_grid(a, "block2") is a
    with pytest.raises(ValueError, match=r"shape \(2, 5\), not a \(B, h, w, K\) grid"):
        cnn.to_grid(cnn.features(v, _images(), "fc"), "fc")


# ---- plain functions -------------------------------------------------------------


def _fn_features(variables, x, layer):
    a = jnp.maximum(x.reshape(x.shape[0], 4, 4, 4, 4, 3).mean((2, 4)) @ variables["w"], 0)
    return a if layer == "relu" else a * 2.0


def _fn_head(variables, a, layer, x):
    if layer == "double":
        a = a / 2.0
    return a.mean((1, 2)) @ variables["d"] + x.mean((1, 2, 3))[:, None]


def test_from_functions():
    model = from_functions(_fn_features, _fn_head, num_classes=3, layers=("relu", "double"),
                           default_layer="relu")
    v = {"w": jax.random.normal(jax.random.key(0), (3, 6)),
         "d": jax.random.normal(jax.random.key(1), (6, 3))}
    x = _images()
    for layer in model.layers:
        _assert_head_inverts_features(model, v, x, layer)
    np.testing.assert_allclose(model.features(v, x, "double"), 2 * model.features(v, x))
    with pytest.raises(ValueError, match="needs the images"):
        model.head(v, model.features(v, x), "relu")
    with pytest.raises(ValueError, match=r"must have shape \(2, 4, 4, 6\)"):
        model.head(v, jnp.zeros((2, 4, 4, 5)), "relu", x=x)
    with pytest.raises(ValueError, match="unknown layer"):
        model.features(v, x, "conv")
    with pytest.raises(ValueError, match="must take a `layer` argument"):
        from_functions(lambda v, x: x, _fn_head, layers=("a", "b"))
    assert model == from_functions(_fn_features, _fn_head, num_classes=3,
                                   layers=("relu", "double"), default_layer="relu")
    assert model.linear_head(v) is None


# ---- dead code under jit --------------------------------------------------------


def _convolutions(fn, *args):
    """Convolutions in the optimised HLO XLA compiles (CPU: `convolution(`; GPU: cuDNN
    custom calls)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return len(re.findall(r" convolution\(|custom_call_target=\"__cudnn\$conv", text))


def test_under_jit_the_part_before_the_cut_is_eliminated(linen_cnn):
    """head runs the whole module on x, but XLA keeps only what reaches the output. The
    model has 5 convolutions: stem, block1/conv_a, conv_b, block2/conv_a, conv_b."""
    _, model, v = linen_cnn
    x = _images()
    assert _convolutions(model.apply, v, x) == 5  # the counter sees them all

    def head_convolutions(layer):
        a = model.features(v, x, layer)
        return _convolutions(lambda v, a, x: model.head(v, a, layer, x=x), v, a, x)

    # nothing crosses the cut at block2: its output feeds only pooling, dropout and fc
    assert head_convolutions("block2") == 0
    # inside block2 the skip path needs block2's input (stem, block1's two convolutions);
    # block2's convolutions before the cut are gone
    assert head_convolutions("block2/conv_b") == 3
    assert head_convolutions("block2/conv_a") == 4  # + conv_b, after the cut
