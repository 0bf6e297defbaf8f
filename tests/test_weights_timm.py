"""timm -> jaxcam weight import (``load_timm``), telling torchvision from timm files
(``detect_source``, ``jaxcam.load``, ``jaxcam convert``) and timm's preprocessing.

Random timm models (``pretrained=False``, built offline; BatchNorm statistics and affine
parameters randomised as in tests/test_weights.py) are converted and compared with timm
itself in eval mode. ViT parity (every cut point, other image sizes) is in
tests/test_vit.py.
"""

import functools
import math

import jax
import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg

import jaxcam
from jaxcam import cli, models
from jaxcam.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from jaxcam.weights import (
    TIMM_ARCHS,
    TIMM_DEFAULT_CFG,
    WeightsMismatchError,
    WeightsSource,
    detect_source,
    load_timm,
    load_weights,
    match_state_dict,
    timm_key,
    timm_preprocessing,
)

torch.set_num_threads(2)
NUM_CLASSES = 10


@functools.cache
def timm_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model


def state_dict(name: str) -> dict[str, torch.Tensor]:
    return timm_model(name).state_dict()


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert scale > 0, "reference is identically zero, the check would be vacuous"
    return float(np.abs(out - ref).max()) / scale


def assert_same_variables(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(u), np.asarray(v))


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0"])
def test_timm_resnet50_and_efficientnet_b0_logits(name):
    """Logits of timm's ResNet-50 / EfficientNet-B0 loaded into jaxcam's models equal
    timm's (96 px, batch 2): <= 1e-4 x max |logit|, as for torchvision's (float32
    rounding through 50 / 16 blocks is ~1e-6; a wrong tensor gives order-1 errors)."""
    tm = timm_model(name)
    model, variables = load_timm(tm.state_dict(), name)
    assert (model.arch, model.num_classes) == (TIMM_ARCHS[name], NUM_CLASSES)
    n_torch = sum(p.numel() for p in tm.parameters())
    assert sum(v.size for v in jax.tree.leaves(variables["params"])) == n_torch
    x = np.random.default_rng(0).normal(size=(2, 96, 96, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert relative_error(jax.jit(model.apply)(variables, x), ref) <= 1e-4


def test_efficientnet_key_rule_follows_the_module_order():
    """timm's and torchvision's EfficientNet-B0 register the same tensors in the same
    order (torchvision's weights were ported from timm): pair them up and check
    timm_key maps every torchvision key to its partner, with equal shapes."""
    ours = [(k, v.shape) for k, v in torchvision.models.efficientnet_b0().state_dict().items()
            if not k.endswith("num_batches_tracked")]
    theirs = [(k, v.shape) for k, v in timm.create_model("efficientnet_b0", pretrained=False)
              .state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(ours) == len(theirs) == 311
    for (key, shape), (timm_name, timm_shape) in zip(ours, theirs, strict=True):
        assert timm_key(key, "efficientnet_b0") == timm_name
        assert tuple(shape) == tuple(timm_shape), key


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_224"])
def test_vit_keys_and_shapes_match_exactly(name):
    tm = timm.create_model(name, pretrained=False)
    report = match_state_dict({k: v.numpy() for k, v in tm.state_dict().items()},
                              models.get(TIMM_ARCHS[name]), library="timm")
    assert report.ok, report.describe()
    assert timm_key("encoder.layers.encoder_layer_7.self_attention.in_proj_bias",
                    TIMM_ARCHS[name]) == "blocks.7.attn.qkv.bias"


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("name", [*TIMM_DEFAULT_CFG, "timm/efficientnet_b0.ra4_e3600_r224_in1k",
                                  "resnet50.tv_in1k"])
def test_timm_preprocessing_is_timms_eval_transform(name):
    """Resize (timm's floor(size / crop_pct)), crop and mean/std equal what timm's own
    create_transform builds from the pretrained_cfg (default tag when none is given)."""
    bare = name.removeprefix("timm/")
    cfg = get_pretrained_cfg(bare)
    if "." not in bare:
        assert cfg.tag == TIMM_DEFAULT_CFG[bare][0]
    resize, crop = create_transform(**resolve_data_config(pretrained_cfg=cfg.to_dict())
                                    ).transforms[:2]
    prep = timm_preprocessing(name)
    assert (prep.resize_size, prep.image_size) == (resize.size, crop.size[0])
    assert (prep.mean, prep.std) == (tuple(cfg.mean), tuple(cfg.std))
    assert timm_preprocessing(name, 384).resize_size == math.floor(384 / cfg.crop_pct)
    if bare.startswith("vit_"):
        assert prep.mean == prep.std == (0.5, 0.5, 0.5)


def test_preprocessing_of_each_source():
    assert WeightsSource("torchvision", "vit_b_16").preprocessing() == Preprocessing.imagenet(224)
    vit = WeightsSource("timm", "vit_base_patch16_224").preprocessing()
    assert vit == Preprocessing(224, 248, (0.5,) * 3, (0.5,) * 3)
    assert WeightsSource("timm", "resnet50").preprocessing() == Preprocessing(
        224, 235, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match=r"timm has no pretrained tag efficientnet_b0\.nope"):
        timm_preprocessing("efficientnet_b0.nope")


# ---------------------------------------------------------------- which library


def numpy_dict(sd):
    return {k: v.numpy() for k, v in sd.items() if v.is_floating_point()}


def test_detect_source_from_the_keys():
    vit = numpy_dict(state_dict("vit_tiny_patch16_224"))
    assert detect_source(vit) == WeightsSource("timm", "vit_tiny_patch16_224")
    assert detect_source(vit).model_arch == "vit_ti_16"
    eff = numpy_dict(state_dict("efficientnet_b0"))
    assert detect_source(eff) == WeightsSource("timm", "efficientnet_b0")
    tv_eff = numpy_dict(torchvision.models.efficientnet_b0().state_dict())
    assert detect_source(tv_eff) == WeightsSource("torchvision", "efficientnet_b0")
    tv_vit = numpy_dict(torchvision.models.vision_transformer.VisionTransformer(
        224, 16, 12, 3, 192, 768).state_dict())
    assert detect_source(tv_vit) == WeightsSource("torchvision", "vit_ti_16")

    # arch given: the keys pick the library when the architecture agrees
    assert detect_source(vit, "vit_ti_16").library == "timm"
    tagged = detect_source(vit, "timm/vit_tiny_patch16_224.augreg_in21k")
    assert tagged == WeightsSource("timm", "vit_tiny_patch16_224.augreg_in21k")
    assert detect_source(eff, "efficientnet_b0").library == "timm"
    assert detect_source(tv_eff, "efficientnet_b0").library == "torchvision"

    # ResNet-50: timm keeps torchvision's keys, only the preprocessing differs
    resnet = numpy_dict(state_dict("resnet50"))
    with pytest.raises(ValueError, match=r"keys are those of a resnet50, which torchvision "
                                         r"and timm name alike.*resize 256.*resize 235.*"
                                         r"arch='torchvision/resnet50' or arch='timm/resnet50'"):
        detect_source(resnet)
    assert detect_source(resnet, "resnet50") == WeightsSource("torchvision", "resnet50")
    assert detect_source(resnet, "timm/resnet50") == WeightsSource("timm", "resnet50")


def test_unsupported_and_unknown_files_get_a_clear_message():
    base32 = numpy_dict(timm.create_model("vit_base_patch32_224", pretrained=False).state_dict())
    with pytest.raises(ValueError, match=r"they look like a vit_base_patch32_224, which jaxcam "
                                         r"does not import; jaxcam imports torchvision .*vit_b_16"
                                         r".* and timm .*vit_base_patch16_224"):
        detect_source(base32)
    at384 = numpy_dict(torchvision.models.vision_transformer.VisionTransformer(
        384, 16, 12, 3, 192, 768).state_dict())
    with pytest.raises(ValueError, match=r"look like a vit_ti_16 trained at 384 px \(position "
                                         r"embeddings for a 24x24 grid"):
        detect_source(at384)
    with pytest.raises(ValueError, match=r"match no architecture jaxcam knows \(first keys: "
                                         r"a.weight, b.bias\)"):
        detect_source({"a.weight": np.zeros(2, np.float32), "b.bias": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match=r"unsupported timm arch 'vit_large_patch16_224'"):
        load_timm({}, "vit_large_patch16_224")


def test_strict_loading_lists_every_mismatch_in_timms_names():
    sd = numpy_dict(state_dict("vit_tiny_patch16_224"))
    del sd["blocks.3.mlp.fc1.bias"]
    sd["blocks.3.ls1.gamma"] = np.ones(192, np.float32)
    sd["pos_embed"] = np.zeros((1, 50, 192), np.float32)
    with pytest.raises(WeightsMismatchError) as info:
        load_timm(sd, "vit_tiny_patch16_224")
    report = info.value.report
    assert (report.library, report.arch) == ("timm", "vit_ti_16")
    assert report.missing == ("blocks.3.mlp.fc1.bias",)
    assert report.unexpected == ("blocks.3.ls1.gamma",)
    assert report.mismatched == (("pos_embed", (1, 50, 192), (1, 197, 192)),)
    message = str(info.value)
    assert "1 missing keys, 1 unexpected keys, 1 shape mismatches" in message
    for key in ("blocks.3.mlp.fc1.bias", "blocks.3.ls1.gamma", "pos_embed: file (1, 50, 192)"):
        assert key in message

    tv = numpy_dict(torchvision.models.vision_transformer.VisionTransformer(
        224, 16, 12, 3, 192, 768, num_classes=NUM_CLASSES).state_dict())
    with pytest.raises(WeightsMismatchError, match=r"looks like a torchvision vit_ti_16 file, "
                                                   r"not a timm one: load it with jaxcam\.weights"
                                                   r"\.load_torchvision\(path, 'vit_ti_16'\)"):
        load_timm(tv, "vit_tiny_patch16_224")
    with pytest.raises(WeightsMismatchError, match=r"looks like a timm efficientnet_b0 file, not "
                                                   r"a torchvision one: load it with .*load_timm"):
        load_weights(numpy_dict(state_dict("efficientnet_b0")), "vit_b_16")


def test_load_and_convert_a_timm_file_without_saying_so(tmp_path):
    """A timm ViT file (.safetensors, the hub format, or .pth) loads by jaxcam.load and
    converts by `jaxcam convert` with neither arch nor library given, with timm's
    preprocessing; the variables are load_timm's."""
    sd = state_dict("vit_tiny_patch16_224")
    _, expected = load_timm(sd, "vit_tiny_patch16_224")
    timm_prep = Preprocessing(224, 248, (0.5,) * 3, (0.5,) * 3)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    torch.save(sd, tmp_path / "model.pth")
    for path in (tmp_path / "model.safetensors", tmp_path / "model.pth"):
        bundle = jaxcam.load(path)
        assert (bundle.arch, bundle.num_classes) == ("vit_ti_16", NUM_CLASSES)
        assert bundle.preprocessing == timm_prep
        assert_same_variables(bundle.variables, expected)
    assert jaxcam.load(tmp_path / "model.pth", arch="vit_tiny_patch16_224").arch == "vit_ti_16"

    out = tmp_path / "ckpt"
    assert cli.main(["convert", str(tmp_path / "model.safetensors"), str(out)]) == 0
    restored = jaxcam.load(out, arch="vit_tiny_patch16_224")
    assert restored.preprocessing == timm_prep
    assert_same_variables(restored.variables, expected)

    resnet = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict("resnet50").items()}, resnet)
    with pytest.raises(ValueError, match=r"resnet\.safetensors': the keys are those of a "
                                         r"resnet50.*arch='timm/resnet50'"):
        jaxcam.load(resnet)
    assert jaxcam.load(resnet, arch="timm/resnet50").preprocessing.resize_size == 235
    assert jaxcam.load(resnet, arch="resnet50").preprocessing == Preprocessing.imagenet(224)
