"""Specifications of jaxcam.models: torchvision's architectures and parameter
names, the features/head split at every cut point, train mode, jet-friendly
heads, and the input checks (docs/models.md)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import jet

from jaxcam import models
from jaxcam.models.vgg import adaptive_avg_pool, max_pool_2x2

ARCHS = ("resnet50", "vgg19", "efficientnet_b0")
NUM_CLASSES = 5
SIZE = 32


@pytest.fixture(scope="module")
def built():
    """arch -> (model, variables, x), with random variables drawn in numpy on the
    shapes of `model.init` (compiling three inits would dominate the file's
    time; `test_init_follows_torchvision` covers `init`). BN scales, biases and
    running statistics are random too, so that using them matters."""
    x = jax.random.normal(jax.random.key(1), (2, SIZE, SIZE + 8, 3))
    return {arch: (model, _random_variables(model, seed), x)
            for seed, arch in enumerate(ARCHS)
            for model in [models.get(arch, NUM_CLASSES)]}


def _random_variables(model, seed):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("bias", "mean"):
            value = rng.uniform(-0.3, 0.3, shape)
        else:  # var
            value = rng.uniform(0.5, 2.0, shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, _init_shapes(model))


def _torch_meta_model(arch):
    import torch
    import torchvision

    with torch.device("meta"):
        return getattr(torchvision.models, arch)()


def _flax_to_torch_keys(shapes):
    """Flax variables (shapes) -> {torch key: expected torch shape}, by the rule
    of docs/models.md: path components joined by '.', leaf renamed, kernels
    transposed back (HWIO -> OIHW, (in, out) -> (out, in))."""
    rename = {"params": {"kernel": "weight", "scale": "weight", "bias": "bias"},
              "batch_stats": {"mean": "running_mean", "var": "running_var"}}
    out = {}
    for collection, tree in shapes.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = [p.key for p in path]
            key = ".".join(names[:-1] + [rename[collection][names[-1]]])
            shape = tuple(leaf.shape)
            if names[-1] == "kernel":
                shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
            out[key] = shape
    return out


def _init_shapes(model):
    return jax.eval_shape(model.module.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


# ---- architecture and parameter names --------------------------------------


@pytest.mark.parametrize(
    "arch, expected", [("resnet50", 25_557_032), ("vgg19", 143_667_240),
                       ("efficientnet_b0", 5_288_548)]
)
def test_parameter_count_equals_torchvision(arch, expected):
    shapes = _init_shapes(models.get(arch, 1000))
    assert _count(shapes["params"]) == expected


def test_resnet50_batch_stats_count_equals_torchvision_running_stats():
    shapes = _init_shapes(models.resnet50(1000))
    torch_model = _torch_meta_model("resnet50")
    running = sum(b.numel() for name, b in torch_model.named_buffers()
                  if name.endswith(("running_mean", "running_var")))
    assert _count(shapes["batch_stats"]) == running == 2 * 26_560


@pytest.mark.parametrize("arch", ARCHS)
def test_variables_map_one_to_one_onto_torchvision_state_dict(arch):
    """The naming rule of docs/models.md turns every Flax leaf into a torchvision
    key with the right (transposed) shape, and misses none."""
    expected = _flax_to_torch_keys(_init_shapes(models.get(arch, 1000)))
    torch_shapes = {k: tuple(v.shape) for k, v in _torch_meta_model(arch).state_dict().items()
                    if not k.endswith("num_batches_tracked")}
    assert sorted(expected) == sorted(torch_shapes)
    assert expected == torch_shapes


@pytest.mark.parametrize("arch", ARCHS)
def test_param_order_is_top_level_params_in_forward_order(arch):
    model = models.get(arch, NUM_CLASSES)
    shapes = _init_shapes(model)
    assert set(model.param_order) == set(shapes["params"])
    first = {"resnet50": "conv1", "vgg19": "features", "efficientnet_b0": "features"}[arch]
    last = {"resnet50": "fc", "vgg19": "classifier", "efficientnet_b0": "classifier"}[arch]
    assert (model.param_order[0], model.param_order[-1]) == (first, last)


def test_efficientnet_stochastic_depth_probabilities_equal_torchvision():
    """Drop probabilities read off the MBConv modules as they are built."""
    import flax.linen as nn

    torch_model = _torch_meta_model("efficientnet_b0")
    torch_p = [m.stochastic_depth.p for m in torch_model.modules()
               if hasattr(m, "stochastic_depth")]
    ours = []

    def record(next_fun, args, kwargs, context):
        if (isinstance(context.module, models.efficientnet.MBConv)
                and context.method_name == "__call__"):
            ours.append(context.module.drop_prob)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _init_shapes(models.efficientnet_b0(NUM_CLASSES))
    assert ours == pytest.approx(torch_p, abs=1e-12) and len(ours) == 16


def test_layers_defaults_and_aliases():
    resnet = models.resnet50(NUM_CLASSES)
    assert resnet.layers == (
        "stem", "layer1.0", "layer1.1", "layer1", "layer2.0", "layer2.1", "layer2.2", "layer2",
        "layer3.0", "layer3.1", "layer3.2", "layer3.3", "layer3.4", "layer3",
        "layer4.0", "layer4.1", "layer4",
    )
    vgg = models.vgg19(NUM_CLASSES)
    assert vgg.layers == tuple(f"features.{i}" for i in range(37))
    assert {a: vgg.aliases[a] for a in ("conv1_1", "relu5_4", "pool5", "conv5_4", "pool1")} == {
        "conv1_1": "features.0", "relu5_4": "features.35", "pool5": "features.36",
        "conv5_4": "features.34", "pool1": "features.4"}
    eff = models.efficientnet_b0(NUM_CLASSES)
    assert eff.layers == tuple(f"features.{i}" for i in range(9))
    assert (resnet.default_layer, vgg.default_layer, eff.default_layer) == (
        "layer4", "features.35", "features.8")
    for model in (resnet, vgg, eff):
        assert model.resolve_layer(None) == model.default_layer
        assert all(model.resolve_layer(a) == c and c in model.layers
                   for a, c in model.aliases.items())
        assert not set(model.aliases) & set(model.layers)
    assert resnet.resolve_layer("layer4.2") == "layer4"
    assert resnet.resolve_layer("maxpool") == "stem"


def test_init_follows_torchvision():
    """VGG19 init: Kaiming-normal fan-out convs (std sqrt(2 / (9 * out))), zero
    biases, N(0, 0.01) dense layers; shapes equal eval_shape's."""
    model = models.vgg19(NUM_CLASSES)
    variables = model.init(jax.random.key(0, impl="rbg"), image_size=SIZE)
    assert jax.tree_util.tree_map(jnp.shape, variables) == jax.tree_util.tree_map(
        jnp.shape, _init_shapes(model))
    params = variables["params"]
    for index, width in (("0", 64), ("34", 512)):
        kernel = np.asarray(params["features"][index]["kernel"])
        assert kernel.std() == pytest.approx(np.sqrt(2 / (9 * width)), rel=0.05)
        assert not np.any(np.asarray(params["features"][index]["bias"]))
    assert float(params["classifier"]["6"]["kernel"].std()) == pytest.approx(0.01, rel=0.1)


def test_models_of_equal_config_are_equal_and_hashable():
    """So a model can be a static argument of jax.jit and share compilations."""
    assert models.get("resnet50", 3) == models.resnet50(3)
    assert hash(models.vgg19(3)) == hash(models.vgg19(3))
    assert models.resnet50(3) != models.resnet50(4)


# ---- independent references for the VGG helpers (PyTorch) ------------------


@settings(max_examples=10, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_adaptive_avg_pool_matches_torch(h, w, seed):
    import torch

    x = np.random.default_rng(seed).normal(size=(2, 3, h, w)).astype(np.float32)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), 7).numpy()
    ours = np.asarray(adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h, w", [(6, 8), (7, 5)])
def test_max_pool_2x2_matches_torch_values_and_tie_breaking_gradient(h, w):
    """Integer-valued inputs force ties: PyTorch sends the gradient to the first
    maximum of each window, and so must we; odd sizes drop the last row/column."""
    import torch

    rng = np.random.default_rng(h * w)
    x = rng.integers(-2, 3, size=(4, 3, h, w)).astype(np.float32)
    cot = rng.normal(size=(4, 3, h // 2, w // 2)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, 2)
    (yt * torch.from_numpy(cot)).sum().backward()

    def f(xj):
        return jnp.sum(max_pool_2x2(xj) * jnp.asarray(cot.transpose(0, 2, 3, 1)))

    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(max_pool_2x2(xj)).transpose(0, 3, 1, 2),
                                  yt.detach().numpy())
    np.testing.assert_allclose(np.asarray(jax.grad(f)(xj)).transpose(0, 3, 1, 2),
                               xt.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_max_pool_2x2_propagates_nan_like_torch():
    x = jnp.zeros((1, 2, 2, 1)).at[0, 1, 1, 0].set(jnp.nan)
    assert bool(jnp.isnan(max_pool_2x2(x)).all())


# ---- the split -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_head_of_features_equals_apply_at_every_cut_point(built, arch):
    model, variables, x = built[arch]
    logits = model.apply(variables, x)
    scale = float(jnp.abs(logits).max())
    assert logits.shape == (2, NUM_CLASSES) and scale > 0
    channels = {s.name: s.out_channels for s in model.stages}
    for layer in model.layers:
        a = model.features(variables, x, layer)
        assert a.shape[0] == 2 and a.shape[-1] == channels[layer]
        np.testing.assert_allclose(model.head(variables, a, layer), logits,
                                   atol=1e-5 * scale, rtol=1e-5, err_msg=layer)


def test_alias_cut_points_give_the_same_split(built):
    model, variables, x = built["vgg19"]
    np.testing.assert_array_equal(model.features(variables, x, "relu5_4"),
                                  model.features(variables, x, "features.35"))
    np.testing.assert_array_equal(model.features(variables, x),
                                  model.features(variables, x, "features.35"))


def test_jit_equals_eager(built):
    model, variables, x = built["vgg19"]
    np.testing.assert_allclose(jax.jit(model.apply)(variables, x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-7)
    split = jax.jit(lambda v, x: model.head(v, model.features(v, x, "pool5"), "pool5"))
    np.testing.assert_allclose(split(variables, x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-7)


def test_vmap_over_single_images_equals_batched(built):
    model, variables, x = built["resnet50"]
    per_image = jax.vmap(lambda xi: model.apply(variables, xi[None])[0])(x)
    np.testing.assert_allclose(per_image, model.apply(variables, x), rtol=1e-5, atol=1e-5)
    a = model.features(variables, x)
    per_image_head = jax.vmap(lambda ai: model.head(variables, ai[None])[0])(a)
    np.testing.assert_allclose(per_image_head, model.head(variables, a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, layer", [("resnet50", "layer4"), ("resnet50", "layer4.2"),
                                         ("efficientnet_b0", "features.8")])
def test_linear_head_reproduces_the_head(built, arch, layer):
    model, variables, x = built[arch]
    a = model.features(variables, x, layer)
    w, b = model.linear_head(variables, layer)
    assert w.shape == (a.shape[-1], NUM_CLASSES) and b.shape == (NUM_CLASSES,)
    np.testing.assert_allclose(jnp.mean(a, axis=(1, 2)) @ w + b, model.head(variables, a, layer),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, layer", [("resnet50", "layer4.1"), ("resnet50", "layer3"),
                                         ("vgg19", "features.35"), ("vgg19", "features.36"),
                                         ("efficientnet_b0", "features.7")])
def test_linear_head_is_none_for_other_heads(built, arch, layer):
    model, variables, _ = built[arch]
    assert model.linear_head(variables, layer) is None


def _taylor_coefficients(model, variables, a, layer):
    """Orders 1..3 of t -> head(a + t v) at t = 0 along a random direction v."""
    v = jax.random.normal(jax.random.key(7), a.shape)
    zero = jnp.zeros_like(a)
    _, (d1, d2, d3) = jet.jet(lambda z: model.head(variables, z, layer), (a,), ((v, zero, zero),))
    _, jvp = jax.jvp(lambda z: model.head(variables, z, layer), (a,), (v,))
    return d1, d2, d3, jvp


@pytest.mark.parametrize("arch, layer", [("resnet50", "layer4.1"), ("vgg19", "features.35")])
def test_piecewise_linear_heads_have_zero_higher_taylor_terms_under_jet(built, arch, layer):
    """jet runs through the heads (ReLU as max, VGG's pool as where-chain) and
    sees them as piecewise linear: 2nd and 3rd coefficients exactly zero."""
    model, variables, x = built[arch]
    a = model.features(variables, x, layer)
    d1, d2, d3, jvp = _taylor_coefficients(model, variables, a, layer)
    np.testing.assert_allclose(d1, jvp, rtol=1e-4, atol=1e-5 * float(jnp.abs(jvp).max()))
    assert float(jnp.abs(d2).max()) == 0.0 and float(jnp.abs(d3).max()) == 0.0


def test_efficientnet_head_before_last_block_is_smooth_under_jet(built):
    model, variables, x = built["efficientnet_b0"]
    a = model.features(variables, x, "features.7")
    d1, d2, d3, jvp = _taylor_coefficients(model, variables, a, "features.7")
    np.testing.assert_allclose(d1, jvp, rtol=1e-4, atol=1e-5 * float(jnp.abs(jvp).max()))
    assert float(jnp.abs(d2).max()) > 1e-6 and float(jnp.abs(d3).max()) > 1e-6


def test_float64_activations_give_float64_logits_close_to_float32(built, x64):
    """Under x64 a float64 A flows through the (smooth) head in float64, as the
    finite-difference checks of the derivative engine need."""
    model, variables, _ = built["efficientnet_b0"]
    a = np.random.default_rng(0).normal(size=(2, 1, 2, 320))
    s64 = model.head(variables, jnp.asarray(a, jnp.float64), "features.7")
    assert s64.dtype == jnp.float64
    s32 = model.head(variables, jnp.asarray(a, jnp.float32), "features.7")
    assert s32.dtype == jnp.float32
    np.testing.assert_allclose(s64, s32, rtol=1e-4, atol=1e-5)


# ---- train mode ------------------------------------------------------------


def test_resnet_train_mode_uses_batch_statistics_and_updates_them(built):
    model, variables, x = built["resnet50"]
    logits, updates = model.apply(variables, x, train=True)
    # BN bn1 after conv1: new = 0.9 * old + 0.1 * batch mean (torch momentum 0.1).
    kernel = variables["params"]["conv1"]["kernel"]
    y = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    old = variables["batch_stats"]["bn1"]["mean"]
    np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"],
                               0.9 * old + 0.1 * y.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    # Batch statistics, not running ones: other running stats, same train logits ...
    other = {**variables, "batch_stats": jax.tree_util.tree_map(lambda s: s * 1.5 + 0.1,
                                                                variables["batch_stats"])}
    np.testing.assert_allclose(model.apply(other, x, train=True)[0], logits, rtol=1e-4, atol=1e-4)
    # ... while eval mode depends on them and is deterministic.
    eval_logits = model.apply(variables, x)
    np.testing.assert_array_equal(model.apply(variables, x), eval_logits)
    assert not np.allclose(model.apply(other, x), eval_logits, rtol=1e-3)


@pytest.mark.parametrize("arch", ["vgg19", "efficientnet_b0"])
def test_dropout_train_mode_is_random_per_rng_and_reproducible(built, arch):
    model, variables, x = built[arch]
    a, ua = model.apply(variables, x, train=True, rng=jax.random.key(0))
    b, _ = model.apply(variables, x, train=True, rng=jax.random.key(0))
    c, _ = model.apply(variables, x, train=True, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    if arch == "vgg19":
        assert ua == {}
    else:
        changed = jax.tree_util.tree_map(lambda n, o: bool(jnp.any(n != o)),
                                         ua["batch_stats"], variables["batch_stats"])
        assert all(jax.tree_util.tree_leaves(changed))


# ---- bad input -------------------------------------------------------------


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((SIZE, SIZE, 3), np.float32), r"rank 4 .*add a batch axis: x\[None\]"),
        (np.zeros((3, SIZE, SIZE), np.float32), r"rank 4 .*CHW.*transpose\(1, 2, 0\)\[None\]"),
        (np.zeros((1, 3, SIZE, SIZE), np.float32), r"3 channels.*NCHW.*transpose\(0, 2, 3, 1\)"),
        (np.zeros((1, SIZE, SIZE, 1), np.float32), r"3 channels.*grayscale"),
        (np.zeros((1, SIZE, SIZE, 3), np.complex64), r"dtype complex64.*float32"),
        (np.full((1, SIZE, SIZE, 3), "a"), r"dtype <U1.*float32"),
        (np.zeros((1, SIZE, SIZE, 3), bool), r"dtype bool.*float32"),
        (np.zeros((1, 16, SIZE, 3), np.float32),
         r"16x32 px, smaller than the 32 px minimum.*resize"),
    ],
)
def test_bad_images_raise_value_error_naming_the_fix(built, x, message):
    model, variables, _ = built["vgg19"]
    with pytest.raises(ValueError, match=message):
        model.apply(variables, x)
    with pytest.raises(ValueError, match=message):
        model.features(variables, x)


def test_integer_images_are_cast(built):
    model, variables, x = built["vgg19"]
    x = np.arange(x.size, dtype=np.int32).reshape(x.shape) % 7
    np.testing.assert_array_equal(model.apply(variables, x),
                                  model.apply(variables, x.astype(np.float32)))


def test_unknown_layer_lists_valid_names_and_aliases(built):
    model, variables, x = built["resnet50"]
    with pytest.raises(ValueError, match=r"unknown layer 'layer5'.*valid layers: stem, layer1.0, "
                       r".*layer4.*aliases: maxpool -> stem.*layer4.2 -> layer4"):
        model.features(variables, x, "layer5")
    with pytest.raises(ValueError, match="unknown layer 'fc'"):
        model.head(variables, jnp.zeros((1, 1, 1, 2048)), "fc")


def test_head_rejects_activations_of_another_layer(built):
    model, variables, x = built["resnet50"]
    a3 = model.features(variables, x, "layer3")
    with pytest.raises(ValueError, match=re.escape(
            "activations A at layer 'layer4' of resnet50 must be (B, h, w, 2048), got shape "
            "(2, 2, 3, 1024)") + r".*1024 channels come from layer3.0, .*layer3"):
        model.head(variables, a3, "layer4")
    with pytest.raises(ValueError, match=r"must be \(B, h, w, 2048\), got shape \(2048,\)"):
        model.head(variables, jnp.zeros(2048), "layer4")


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="unknown architecture 'resnet18'; choose one of "
                                         "resnet50, vgg19, efficientnet_b0"):
        models.get("resnet18")
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        models.vgg19(0)
    with pytest.raises(ValueError, match="image_size=16 is below the 32 px minimum"):
        models.resnet50(3).init(jax.random.key(0), image_size=16)


def test_stochastic_train_mode_requires_rng(built):
    model, variables, x = built["efficientnet_b0"]
    with pytest.raises(ValueError, match=r"pass rng=jax.random.key\(...\)"):
        model.apply(variables, x, train=True)


@settings(max_examples=12, deadline=None)
@given(size=st.integers(3, 12), channels=st.integers(1, 6), kernel=st.sampled_from([3, 5]),
       stride=st.sampled_from([1, 2]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_depthwise_conv_equals_grouped_nn_conv(size, channels, kernel, stride, bias, seed):
    """DepthwiseConv (shifted slices) is torchvision's Conv2d(C, C, k, groups=C): same
    parameter tree, same initial values, same outputs as Flax's grouped convolution."""
    import flax.linen as nn

    from jaxcam.models.base import DepthwiseConv, conv, conv_init

    pad = kernel // 2
    ref = nn.Conv(channels, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), feature_group_count=channels,
                  use_bias=bias, kernel_init=conv_init)
    ours = conv(channels, kernel, "dw", stride=stride, groups=channels, bias=bias)
    assert isinstance(ours, DepthwiseConv) or channels == 1
    ours = DepthwiseConv(channels, kernel, stride=stride, padding=pad, use_bias=bias)
    x = jax.random.normal(jax.random.key(seed), (2, size, size + 1, channels))
    v_ref, v_ours = ref.init(jax.random.key(seed + 1), x), ours.init(jax.random.key(seed + 1), x)
    assert jax.tree.map(jnp.shape, v_ref) == jax.tree.map(jnp.shape, v_ours)
    np.testing.assert_array_equal(v_ref["params"]["kernel"], v_ours["params"]["kernel"])
    if bias:
        v_ref = {"params": dict(v_ref["params"], bias=jnp.linspace(-1, 1, channels))}
    np.testing.assert_allclose(ours.apply(v_ref, x), ref.apply(v_ref, x), rtol=1e-5, atol=1e-5)


def test_depthwise_conv_rejects_a_channel_mismatch():
    from jaxcam.models.base import DepthwiseConv

    with pytest.raises(ValueError, match="keeps the channel count"):
        DepthwiseConv(4, 3, padding=1).init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))


def test_layer_for_image_size_keeps_the_default_unless_its_map_is_too_coarse():
    from test_compilation import tiny_model, tiny_variables

    model = tiny_model()  # block1 32x32, block2 16x16, block3 (default) 8x8 at 32 px
    variables = tiny_variables(model)
    assert models.layer_for_image_size(model, variables, 32) == "block3"
    assert models.layer_for_image_size(model, variables, 32, min_map_size=9) == "block2"
    assert models.layer_for_image_size(model, variables, 32, min_map_size=17) == "block1"
    # nothing is fine enough: the default layer
    assert models.layer_for_image_size(model, variables, 32, min_map_size=64) == "block3"
