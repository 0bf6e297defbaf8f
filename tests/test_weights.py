"""torchvision -> jaxcam weight import, checked against PyTorch itself.

Random-initialised torchvision models (weights=None, 10 classes) with
randomised BatchNorm statistics and affine parameters, so that a wrong
BN import changes the outputs, are converted and compared in eval mode:
logits at a small size and at 224 px, and the activations at every cut point
of ``model.layers`` against the output of the torchvision module of the same
name (forward hooks).
"""

import functools
import sys
import warnings

import jax
import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import jaxcam
from jaxcam import weights
from jaxcam.preprocessing import Preprocessing
from jaxcam.weights import (
    TorchNotInstalledError,
    WeightsMismatchError,
    WeightsMismatchWarning,
    guess_arch,
    load_torchvision,
)

torch.set_num_threads(2)
NUM_CLASSES = 10
# (arch, small image size for the cut-point check). VGG19 is the slowest: 32 px.
SMALL = {"resnet50": 64, "efficientnet_b0": 64, "vgg19": 32}
# jaxcam cut point -> torchvision module whose output it is (others: the same name).
TORCH_MODULE = {"stem": "maxpool"}


@functools.cache
def torch_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """torchvision `arch` (weights=None) in eval mode, BN statistics and affine randomised."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model


@functools.cache
def converted(arch: str):
    return load_torchvision(torch_model(arch).state_dict(), arch)


def torch_forward(model: torch.nn.Module, x: np.ndarray, names=()) -> tuple[np.ndarray, dict]:
    """Logits and the outputs of the named submodules (NHWC numpy) for NHWC input x."""
    outputs, hooks = {}, []
    for name in names:
        module = model.get_submodule(TORCH_MODULE.get(name, name))

        def hook(_module, _inputs, out, name=name):
            # clone now: a following ReLU(inplace=True) would overwrite the tensor
            outputs[name] = out.detach().clone().permute(0, 2, 3, 1).numpy()

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, outputs


def assert_close_relative(out, ref, rtol, what):
    """max |out - ref| <= rtol * max |ref| (the scale of the reference)."""
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != torch {ref.shape}"
    scale = float(np.abs(ref).max())
    err = float(np.abs(out - ref).max())
    assert scale > 0, f"{what}: reference is identically zero, the check would be vacuous"
    assert err <= rtol * scale, f"{what}: max abs diff {err:.3g} > {rtol} * {scale:.3g}"


def images(size: int, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("arch", ["resnet50", "efficientnet_b0", "vgg19"])
def test_parity_every_cut_point_and_logits(arch):
    """Every cut point and the logits equal torchvision's, at a small input size."""
    tm = torch_model(arch)
    model, variables = converted(arch)
    assert (model.arch, model.num_classes) == (arch, NUM_CLASSES)  # inferred from classifier
    n_torch = sum(p.numel() for p in tm.parameters())
    n_stats = sum(b.numel() for n, b in tm.named_buffers() if "running_" in n)
    sizes = {c: sum(v.size for v in jax.tree.leaves(t)) for c, t in variables.items()}
    assert sizes == ({"params": n_torch} | ({"batch_stats": n_stats} if n_stats else {}))

    x = images(SMALL[arch], batch=2, seed=1)
    ref_logits, ref = torch_forward(tm, x, model.layers)
    run = jax.jit(
        lambda v, x: ({k: model.features(v, x, k) for k in model.layers}, model.apply(v, x))
    )
    acts, logits = run(variables, x)
    assert_close_relative(logits, ref_logits, 1e-4, f"{arch} logits")
    for name in model.layers:
        assert_close_relative(acts[name], ref[name], 1e-4, f"{arch} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "efficientnet_b0", "vgg19"])
def test_parity_logits_224(arch):
    tm = torch_model(arch)
    model, variables = converted(arch)
    x = images(224, batch=1, seed=2)
    ref_logits, _ = torch_forward(tm, x)
    assert_close_relative(jax.jit(model.apply)(variables, x), ref_logits, 1e-4, f"{arch} 224px")


def assert_same_variables(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.dtype == v.dtype and np.array_equal(u, v)


def test_layouts_follow_the_renaming_rule():
    """Spot checks of the documented rule: OIHW -> HWIO, (out, in) -> (in, out), BN."""
    sd = torch_model("efficientnet_b0").state_dict()
    _, v = converted("efficientnet_b0")
    p, s = v["params"], v["batch_stats"]
    np.testing.assert_array_equal(
        p["features"]["0"]["0"]["kernel"], sd["features.0.0.weight"].numpy().transpose(2, 3, 1, 0)
    )
    # depthwise (C, 1, 3, 3) -> (3, 3, 1, C); SE fc1 is a 1x1 conv
    dw = p["features"]["1"]["0"]["block"]["0"]["0"]["kernel"]
    assert dw.shape == (3, 3, 1, 32)
    np.testing.assert_array_equal(dw[1, 2, 0, 5], sd["features.1.0.block.0.0.weight"][5, 0, 1, 2])
    np.testing.assert_array_equal(
        p["classifier"]["1"]["kernel"], sd["classifier.1.weight"].numpy().T
    )
    np.testing.assert_array_equal(p["features"]["0"]["1"]["scale"], sd["features.0.1.weight"])
    np.testing.assert_array_equal(s["features"]["0"]["1"]["var"], sd["features.0.1.running_var"])
    np.testing.assert_array_equal(s["features"]["8"]["1"]["mean"], sd["features.8.1.running_mean"])


def test_pth_safetensors_and_wrapped_checkpoints_give_identical_variables(tmp_path):
    sd = torch_model("efficientnet_b0").state_dict()
    torch.save(sd, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    # a DataParallel training checkpoint: "module." prefixes under "state_dict"
    torch.save(
        {"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ddp.pt"
    )
    _, from_pth = load_torchvision(tmp_path / "w.pth", "efficientnet_b0")
    _, from_st = load_torchvision(str(tmp_path / "w.safetensors"), "efficientnet_b0")
    _, from_ddp = load_torchvision(tmp_path / "ddp.pt", "efficientnet_b0")
    assert_same_variables(from_pth, from_st)
    assert_same_variables(from_pth, from_ddp)
    assert_same_variables(from_pth, converted("efficientnet_b0")[1])


def test_safetensors_needs_no_torch_and_pth_says_how_to_get_it(tmp_path, monkeypatch):
    sd = torch_model("efficientnet_b0").state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    _, variables = load_torchvision(tmp_path / "w.safetensors", "efficientnet_b0")
    assert_same_variables(variables, converted("efficientnet_b0")[1])
    with pytest.raises(TorchNotInstalledError, match=r"pip install torch.*\.safetensors"):
        load_torchvision(tmp_path / "w.pth", "efficientnet_b0")
    assert issubclass(TorchNotInstalledError, ValueError)


def test_resnet18_given_as_resnet50_raises_the_strict_error(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(
        WeightsMismatchError,
        match=r"do not fit resnet50: \d+ missing keys, \d+ unexpected keys, \d+ shape mismatches"
        r"\. This looks like a torchvision resnet18 file.*Is --arch",
    ) as info:
        load_torchvision(tmp_path / "r18.pth", "resnet50")
    report = info.value.report
    assert (
        "layer1.0.conv3.weight" in report.missing and "layer3.5.bn3.running_var" in report.missing
    )
    assert ("fc.weight", (1000, 512), (1000, 2048)) in report.mismatched
    assert ("layer1.0.conv1.weight", (64, 64, 3, 3), (64, 64, 1, 1)) in report.mismatched
    assert not report.unexpected  # resnet18's keys are a subset of resnet50's
    message = str(info.value)
    # lists are cut at 10 entries, with the total count
    assert f"missing ({len(report.missing)}): " in message and "... and" in message
    assert message.count("layer") < 60


@pytest.mark.slow
def test_new_head_strict_error_then_strict_false_keeps_the_backbone():
    """Fine-tuning set-up: 10-class file, 3-class model. (VGG19: its init compiles fastest.)"""
    sd = torch_model("vgg19").state_dict()
    with pytest.raises(WeightsMismatchError, match="different classifier.*strict=False"):
        load_torchvision(sd, "vgg19", num_classes=3)
    with pytest.warns(
        WeightsMismatchWarning,
        match=r"(?s)2 variables of vgg19 .* keep their initial values.*"
        r"classifier\.6\.weight: file \(10, 4096\), vgg19 needs \(3, 4096\)",
    ):
        model, variables = load_torchvision(sd, "vgg19", strict=False, num_classes=3)
    assert model.num_classes == 3
    head = variables["params"]["classifier"].pop("6")
    full = converted("vgg19")[1]["params"]
    try:
        full_head = full["classifier"].pop("6")
        assert_same_variables(variables, {"params": full})  # everything but the head
    finally:
        full["classifier"]["6"] = full_head
    assert head["kernel"].shape == (4096, 3)
    # a fresh torchvision-style VGG head (weight ~ N(0, 0.01), bias 0), not the file's values
    assert abs(float(np.std(head["kernel"])) - 0.01) < 0.001
    assert not np.any(head["bias"])


def test_extra_prefix_is_named():
    sd = {"backbone." + k: v for k, v in torch_model("efficientnet_b0").state_dict().items()}
    with pytest.raises(WeightsMismatchError, match=r"extra 'backbone\.' prefix"):
        load_torchvision(sd, "efficientnet_b0")


_GUESS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext50_32x4d",
    "resnext101_64x4d",
    "vgg11",
    "vgg13_bn",
    "vgg16",
    "vgg19",
    "vgg19_bn",
    "efficientnet_b0",
]


@pytest.mark.parametrize("name", _GUESS + ["efficientnet_b1", "mobilenet_v2"])
def test_guess_arch_names_torchvision_models(name):
    with torch.device("meta"):  # shapes only, no memory, no init time
        sd = getattr(torchvision.models, name)(weights=None).state_dict()
    shapes = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in sd.items()}
    guess = guess_arch(shapes)
    if name in _GUESS:
        assert guess == name
    elif name == "efficientnet_b1":
        assert guess.startswith("an EfficientNet other than B0")
    else:
        assert guess is None


def test_bad_inputs_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="unsupported arch 'resnet18'.*resnet50, vgg19"):
        load_torchvision({"fc.weight": np.zeros((2, 3), np.float32)}, "resnet18")
    with pytest.raises(FileNotFoundError, match="download the torchvision weights yourself"):
        load_torchvision(tmp_path / "nope.pth", "resnet50")
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unsupported weights file extension '\.h5'"):
        load_torchvision(tmp_path / "w.h5", "resnet50")
    with pytest.raises(ValueError, match="is a directory.*jaxcam.load"):
        load_torchvision(tmp_path, "resnet50")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict.*got list"):
        load_torchvision(tmp_path / "list.pth", "resnet50")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pth")
    with pytest.raises(ValueError, match="not pickled models"):
        load_torchvision(tmp_path / "pickled_module.pth", "resnet50")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not read .* as safetensors"):
        load_torchvision(tmp_path / "junk.safetensors", "resnet50")


def test_convert_writes_a_checkpoint_with_torchvision_preprocessing(tmp_path):
    from jaxcam import checkpoint

    sd = torch_model("efficientnet_b0").state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    names = [f"class {i}" for i in range(NUM_CLASSES)]
    with pytest.raises(ValueError, match="3 class names given for a model with 10 outputs"):
        jaxcam.convert(
            tmp_path / "w.safetensors", tmp_path / "bad", "efficientnet_b0", class_names=names[:3]
        )
    assert not (tmp_path / "bad").exists()
    out = jaxcam.convert(
        tmp_path / "w.safetensors",
        tmp_path / "ckpt",
        "efficientnet_b0",
        class_names=names,
        image_size=112,
    )
    bundle = checkpoint.restore(out)
    assert bundle.class_names == tuple(names)
    assert bundle.preprocessing == Preprocessing(image_size=112, resize_size=128)
    assert_same_variables(bundle.variables, converted("efficientnet_b0")[1])
    with pytest.raises(FileExistsError, match="already exists.*overwrite"):
        jaxcam.convert(tmp_path / "w.safetensors", out, "efficientnet_b0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the strict path never warns
        jaxcam.convert(tmp_path / "w.safetensors", out, "efficientnet_b0", overwrite=True)
    assert checkpoint.restore(out).class_names is None


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([2, 4]).flatmap(lambda n: st.tuples(*[st.integers(1, 5)] * n)))
def test_layout_transform_and_torch_shape_are_inverse(shape):
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    flax = weights.to_flax_layout(w, "kernel")
    assert weights.to_torch_shape(flax.shape, "kernel") == shape
    if len(shape) == 4:  # HWIO[h, w, i, o] == OIHW[o, i, h, w]
        o, i, h, x = (s - 1 for s in shape)
        assert flax[h, x, i, o] == w[o, i, h, x]
    else:
        assert flax[shape[1] - 1, 0] == w[0, shape[1] - 1]
    assert weights.to_flax_layout(w, "bias") is w


def test_clean_state_dict_unwraps_strips_and_casts():
    raw = {
        "model": {
            "_orig_mod.module.fc.weight": torch.ones(2, 3, dtype=torch.bfloat16) * 1.5,
            "module.bn.running_var": torch.full((3,), 2.0, dtype=torch.float16),
            "module.bn.num_batches_tracked": torch.tensor(7),
        },
        "optimizer": {"lr": 0.1},
    }
    sd = weights.clean_state_dict(raw)
    assert sorted(sd) == ["bn.running_var", "fc.weight"]
    assert sd["fc.weight"].dtype == np.float32 and np.all(sd["fc.weight"] == 1.5)
    assert sd["bn.running_var"].dtype == np.float32 and np.all(sd["bn.running_var"] == 2.0)
    with pytest.raises(ValueError, match="no floating-point tensors.*non-tensor entries: epoch"):
        weights.clean_state_dict({"epoch": 3})


@pytest.mark.parametrize("arch", ["resnet50", "vit_b_16"])
def test_random_torchvision_is_seeded_and_converted_from_the_same_weights(arch):
    net, model, variables = weights.random_torchvision(arch, 3, seed=5)
    again, _, _ = weights.random_torchvision(arch, 3, seed=5)
    state = net.state_dict()
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert not net.training and all(p.requires_grad for p in net.parameters())
    _, expected = weights.load_torchvision(state, arch)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.arch == arch and model.num_classes == 3
    if arch == "vit_b_16":  # torchvision's zero classifier would make every CAM 0
        w = net.heads.head.weight.detach().numpy()
        assert 0.015 < w.std() < 0.025
