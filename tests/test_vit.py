"""jaxcam's ViTs (jaxcam/models/vit.py) against torchvision and timm, and the model protocol.

Random models (torchvision ``VisionTransformer``, timm ``vit_*``, ``pretrained=False``)
with every LayerNorm, bias, class token and position embedding randomised (their
initial values are 1, 0 or tiny, which would hide a swapped or missing parameter), in
eval mode, N(0, 1) inputs. Compared: the logits and every cut point of
``model.layers`` against forward hooks on the module of the same (torchvision) or
aliased (timm) name, and the gradient of a logit with respect to a LayerNorm's output
against torch autograd through a hook (what pytorch-grad-cam computes).

Tolerance: max |diff| <= 1e-4 * max |reference| per tensor. Both sides are float32
through 12 pre-norm blocks; the LayerNorms rescale each block's input to unit
variance, so rounding errors stay relative (measured: <= 2e-6, docs/weights.md),
while a wrong layout, epsilon, GELU form, head split or position-embedding kernel
gives errors of order 1e-2 .. 1.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from jax.experimental import jet
from timm.layers import resample_abs_pos_embed

from jaxcam import models
from jaxcam.models.vit import Heads, resample_position_embedding
from jaxcam.weights import load_timm, load_torchvision

torch.set_num_threads(2)
NUM_CLASSES = 10
TIMM_NAMES = {"vit_ti_16": "vit_tiny_patch16_224", "vit_s_16": "vit_small_patch16_224",
              "vit_b_16": "vit_base_patch16_224"}


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """LayerNorm affine ~ U(0.5, 1.5) / N(0, 0.1); Linear and in_proj weights
    N(0, 1/fan_in) (attention far from uniform), biases N(0, 0.1); class token and
    position embeddings N(0, 1), so an interpolation error reaches the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            params = dict(m.named_parameters(recurse=False))
            for name, p in params.items():
                if isinstance(m, torch.nn.LayerNorm):
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if name == "weight"
                            else 0.1 * torch.randn(p.shape, generator=gen))
                elif name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                elif p.ndim == 2:  # Linear weight, MultiheadAttention in_proj_weight
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
                elif name in ("class_token", "cls_token", "pos_embedding", "pos_embed"):
                    p.copy_(torch.randn(p.shape, generator=gen))
    return module.eval()


@functools.cache
def torchvision_vit(arch: str) -> torch.nn.Module:
    """torchvision's vit_b_16, or its VisionTransformer at ViT-Ti's widths (no torchvision
    builder exists for those; jaxcam's vit_ti_16 uses the same layout)."""
    torch.manual_seed(0)
    if arch == "vit_b_16":
        model = torchvision.models.vit_b_16(weights=None, num_classes=NUM_CLASSES)
    else:
        model = torchvision.models.vision_transformer.VisionTransformer(
            image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192,
            mlp_dim=768, num_classes=NUM_CLASSES)
    return randomize(model, seed=1)


@functools.cache
def timm_vit(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=NUM_CLASSES,
                              dynamic_img_size=True)
    return randomize(model, seed=2)


def torch_module_name(model, layer: str, library: str) -> str:
    """The torch module whose output is jaxcam's cut point `layer`."""
    if library == "torchvision":
        return layer
    # timm: jaxcam's aliases are timm's module names
    return next(alias for alias, canonical in model.aliases.items()
                if canonical == layer and alias != "patch_embed")


def torch_forward(tm, x: np.ndarray, names) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and the outputs of the named submodules (NHWC for 4-D) for NHWC x."""
    outputs, hooks = {}, []
    for name in names:
        def hook(_module, _inputs, out, name=name):
            out = out.detach().clone()
            outputs[name] = (out.permute(0, 2, 3, 1) if out.ndim == 4 else out).numpy()

        hooks.append(tm.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, outputs


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
    scale = float(np.abs(ref).max())
    assert scale > 0, "reference is identically zero, the check would be vacuous"
    return float(np.abs(out - ref).max()) / scale


def images(size: int, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def check_parity(model, variables, tm, library: str, size: int, cut_points: bool = True):
    x = images(size, batch=2, seed=size)
    layers = model.layers if cut_points else ()
    names = {layer: torch_module_name(model, layer, library) for layer in layers}
    ref_logits, ref = torch_forward(tm, x, names.values())
    errors = {"logits": relative_error(model.apply(variables, x), ref_logits)}
    for layer, name in names.items():
        errors[layer] = relative_error(model.features(variables, x, layer), ref[name])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, (library, model.arch, size, worst, errors[worst])
    return errors


# ---------------------------------------------------------------- parity


def test_torchvision_vit_ti_layout_parity_224():
    """torchvision's VisionTransformer at ViT-Ti widths, 224 px: logits and all 38 cut
    points (no position-embedding resampling at the native size)."""
    tm = torchvision_vit("vit_ti_16")
    model, variables = load_torchvision(tm.state_dict(), "vit_ti_16")
    assert (model.arch, model.num_classes) == ("vit_ti_16", NUM_CLASSES)
    assert sum(v.size for v in jax.tree.leaves(variables)) == sum(
        p.numel() for p in tm.parameters())
    check_parity(model, variables, tm, "torchvision", 224)


@pytest.mark.slow
def test_torchvision_vit_b_16_parity_224():
    tm = torchvision_vit("vit_b_16")
    model, variables = load_torchvision(tm.state_dict(), "vit_b_16")
    check_parity(model, variables, tm, "torchvision", 224)


@pytest.mark.parametrize("size", [224, 160])
def test_timm_vit_tiny_parity(size):
    """timm's vit_tiny_patch16_224 at 224 px, and with dynamic_img_size=True at 160 px
    (position embeddings resampled 14x14 -> 10x10): logits and every cut point."""
    tm = timm_vit("vit_ti_16")
    model, variables = load_timm(tm.state_dict(), "vit_tiny_patch16_224")
    assert model.arch == "vit_ti_16"
    check_parity(model, variables, tm, "timm", size)


@pytest.mark.parametrize(("arch", "size"), [("vit_ti_16", 288), ("vit_s_16", 96)])
def test_timm_vit_logits_at_other_sizes(arch, size):
    """Upsampled (288 px: 18x18) and downsampled (96 px: 6x6) position embeddings; ViT-S."""
    tm = timm_vit(arch)
    model, variables = load_timm(tm.state_dict(), TIMM_NAMES[arch])
    assert sum(v.size for v in jax.tree.leaves(variables)) == sum(
        p.numel() for p in tm.parameters())
    check_parity(model, variables, tm, "timm", size, cut_points=False)


@pytest.mark.parametrize("layer", [
    "encoder.layers.encoder_layer_11.ln_1",
    "encoder.layers.encoder_layer_11.ln_2",
    "encoder.layers.encoder_layer_5.ln_1",
    "encoder.layers.encoder_layer_5",
])
def test_gradient_wrt_a_layer_output_is_torchs_hook_gradient(layer):
    """d logit_c / dA with A the output of `layer`, everything else (the residual stream
    that bypasses a LayerNorm) a function of x only: what torch autograd gives for a
    hooked module output, i.e. what pytorch-grad-cam's GradCAM reads."""
    tm = torchvision_vit("vit_ti_16")
    model, variables = load_torchvision(tm.state_dict(), "vit_ti_16")
    x = images(224, batch=2, seed=7)
    classes = np.array([3, 8])
    held = {}

    def hook(_module, _inputs, out):
        held["a"] = out.detach().requires_grad_(True)
        return held["a"]  # downstream of the hook only; the residual keeps its own path

    handle = tm.get_submodule(layer).register_forward_hook(hook)
    try:
        logits = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        logits[torch.arange(2), torch.from_numpy(classes)].sum().backward()
    finally:
        handle.remove()
    ref = held["a"].grad.numpy()

    a = model.features(variables, x, layer)

    def score(a):
        return model.head(variables, a, layer, x=x)[jnp.arange(2), classes].sum()

    assert relative_error(jax.grad(score)(a), ref) <= 1e-4


# ---------------------------------------------------------------- position embeddings


@pytest.mark.parametrize("grid", [2, 6, 10, 13, 14, 18, 24])
def test_position_embedding_resampling_is_torchs_antialiased_bicubic(grid):
    """jaxcam's resampling == timm's resample_abs_pos_embed (its defaults, which timm's
    dynamic_img_size forward uses) == F.interpolate(bicubic, antialias=True,
    align_corners=False), class token kept. Float32, <= 16 taps with weights summing to
    1: rounding ~1e-7 relative, so 1e-5. torch's non-antialiased kernel (a = -0.75)
    differs by > 1e-2, so the check tells them apart."""
    pos = torch.randn(1, 1 + 14 * 14, 32, generator=torch.Generator().manual_seed(grid))
    ours = np.asarray(resample_position_embedding(jnp.asarray(pos.numpy()), 14, grid))
    ref = resample_abs_pos_embed(pos, [grid, grid], [14, 14], num_prefix_tokens=1).numpy()
    assert relative_error(ours, ref) <= 1e-5
    square = pos[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    direct = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False,
                           antialias=True).permute(0, 2, 3, 1).reshape(1, grid * grid, 32)
    assert relative_error(ours[:, 1:], direct.numpy()) <= 1e-5
    np.testing.assert_array_equal(ours[:, 0], pos.numpy()[:, 0])
    if grid != 14:
        plain = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False,
                              antialias=False).permute(0, 2, 3, 1).reshape(1, grid * grid, 32)
        assert relative_error(ours[:, 1:], plain.numpy()) > 1e-2


# ---------------------------------------------------------------- the model protocol


@functools.cache
def tiny():
    """vit_ti_16 with the random torchvision-layout weights (built for the parity tests
    anyway; cheaper than compiling model.init)."""
    return load_torchvision(torchvision_vit("vit_ti_16").state_dict(), "vit_ti_16")


def test_layers_aliases_default_and_registration():
    model = models.get("vit_b_16")
    assert models.ARCHS["vit_b_16"] is models.vit_b_16
    assert len(model.layers) == 2 + 3 * 12
    assert model.layers[:4] == ("conv_proj", "encoder.layers.encoder_layer_0.ln_1",
                                "encoder.layers.encoder_layer_0.ln_2",
                                "encoder.layers.encoder_layer_0")
    assert model.layers[-1] == "encoder.ln"
    assert model.default_layer == "encoder.layers.encoder_layer_11.ln_1"
    assert model.resolve_layer(None) == model.resolve_layer("blocks.11.norm1") \
        == model.default_layer
    assert model.resolve_layer("blocks.3.norm2") == "encoder.layers.encoder_layer_3.ln_2"
    assert model.resolve_layer("blocks.3") == "encoder.layers.encoder_layer_3"
    assert model.resolve_layer("norm") == "encoder.ln"
    assert model.resolve_layer("patch_embed") == "conv_proj"
    with pytest.raises(ValueError, match=r"unknown layer 'blocks.12' for vit_b_16; valid "
                                         r"layers: conv_proj, .*encoder.ln"):
        model.resolve_layer("blocks.12")
    assert model.linear_head({}, None) is None
    assert model.min_image_size % 16 == 0
    # frozen and hashable: equal configs are equal (one jit cache entry)
    assert model == models.vit_b_16() and hash(model) == hash(models.vit_b_16())
    assert model != models.vit_b_16(num_classes=10)


def test_parameter_tree_counts_and_param_order():
    """vit_b_16 has torchvision's 86,567,656 parameters at 1000 classes; param_order is
    the top-level groups, input to output."""
    model = models.get("vit_b_16")
    abstract = model.abstract_variables()
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract)) == 86_567_656
    params = abstract["params"]
    assert set(params) == set(model.param_order)
    assert model.param_order == ("conv_proj", "class_token", "encoder", "heads")
    block = params["encoder"]["layers"]["encoder_layer_0"]
    assert block["self_attention"]["in_proj"]["kernel"].shape == (768, 3 * 768)
    assert params["encoder"]["pos_embedding"].shape == (1, 197, 768)
    assert params["conv_proj"]["kernel"].shape == (16, 16, 3, 768)
    assert set(abstract) == {"params"}


def test_head_of_features_is_apply_at_every_kind_of_cut():
    """head(v, features(v, x, l), l, x=x) == apply(v, x) at the patch grid, both
    LayerNorms of a block (the residual recomputed from x), a block output and the final
    norm: the same operations in the same order, so equal to float32 rounding, 1e-6."""
    model, variables = tiny()
    x = images(32, batch=2, seed=3)
    logits = np.asarray(model.apply(variables, x))
    for layer in ("conv_proj", "blocks.10.norm1", "blocks.10.norm2", "blocks.10", "norm"):
        a = model.features(variables, x, layer)
        assert relative_error(model.head(variables, a, layer, x=x), logits) <= 1e-6, layer


def test_to_grid_drops_the_class_token_and_reshapes_row_major():
    model, variables = tiny()
    x = images(48, batch=2, seed=4)
    a = np.asarray(model.features(variables, x))
    grid = np.asarray(model.to_grid(a))
    assert grid.shape == (2, 3, 3, 192)
    for i in range(3):
        for j in range(3):
            np.testing.assert_array_equal(grid[:, i, j], a[:, 1 + 3 * i + j])
    patches = model.features(variables, x, "conv_proj")
    assert model.to_grid(patches, "conv_proj") is patches
    with pytest.raises(ValueError, match=r"expects tokens \(B, 1 \+ g\*g, D\), got shape "
                                         r"\(2, 9, 192\)"):
        model.to_grid(a[:, 1:])


def test_fresh_head_is_live_and_jet_works_through_the_head():
    """A fresh heads.head is torch's nn.Linear default U(+-1/sqrt(D)), not torchvision's
    zeros (which would make every map of a fresh or head-randomised model 0); Taylor
    mode (jet) runs through the ViT head at the default layer (softmax, erf GELU,
    LayerNorm) and gives nested-jvp values (float32, |d^n| ~ 0.1..10: 1e-4 relative)."""
    head = Heads(NUM_CLASSES).init(jax.random.key(0), jnp.zeros((1, 192)))["params"]["head"]
    bound = 1 / np.sqrt(192)
    for leaf in (head["kernel"], head["bias"]):
        assert 0.5 * bound < float(jnp.abs(leaf).max()) <= bound

    model, variables = tiny()
    x = images(32, batch=1, seed=5)
    a = model.features(variables, x)

    def score(a):
        return model.head(variables, a, x=x)[0, 3]

    def both(a, direction):
        zeros = jnp.zeros_like(a)
        _, by_jet = jet.jet(score, (a,), ((direction, zeros, zeros),))
        derivative = [lambda t: score(a + t * direction)]
        for _ in range(3):
            derivative.append(lambda t, f=derivative[-1]: jax.jvp(f, (t,), (1.0,))[1])
        return by_jet, [d(0.0) for d in derivative[1:]]

    by_jet, by_jvp = jax.jit(both)(a, jax.random.normal(jax.random.key(1), a.shape))
    assert min(abs(float(d)) for d in by_jvp) > 1e-3  # a smooth head: no order vanishes
    np.testing.assert_allclose(np.array(by_jet), np.array(by_jvp), rtol=1e-4)


def test_bad_inputs_name_the_fix():
    model, variables = tiny()
    x = images(32, batch=2, seed=6)
    layer = model.default_layer
    a = model.features(variables, x)
    with pytest.raises(ValueError, match=r"needs the images: the residual stream bypasses "
                                         r"this LayerNorm.*x=images"):
        model.head(variables, a, layer)
    model.head(variables, model.features(variables, x, "blocks.11"), "blocks.11")  # no x needed
    with pytest.raises(ValueError, match=r"images x \(2, 48, 48, 3\) give \(B, T\) = \(2, 10\)"):
        model.head(variables, a, layer, x=images(48, batch=2, seed=6))
    with pytest.raises(ValueError, match=r"are tokens \(B, 1 \+ g\*g, 192\).*got shape "
                                         r"\(2, 5, 100\)"):
        model.head(variables, a[..., :100], layer, x=x)
    with pytest.raises(ValueError, match=r"square images, got 32x48 px"):
        model.apply(variables, np.zeros((1, 32, 48, 3), np.float32))
    with pytest.raises(ValueError, match=r"divisible by its 16 px patches, got 40 px; resize "
                                         r"to 32 or 48 px"):
        model.apply(variables, np.zeros((1, 40, 40, 3), np.float32))
    with pytest.raises(ValueError, match=r"smaller than the 32 px minimum"):
        model.apply(variables, np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"NCHW"):
        model.apply(variables, np.zeros((1, 3, 32, 32), np.float32))
