"""jaxcam checkpoints (orbax + JSON metadata) and jaxcam.load."""

import functools
import json
import os

import jax
import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

import jaxcam
from jaxcam import checkpoint, models
from jaxcam.loading import LoadedModel, load
from jaxcam.preprocessing import Preprocessing
from jaxcam.weights import load_torchvision

torch.set_num_threads(2)
ARCH = "efficientnet_b0"  # the smallest of the three (5M parameters): fast to write


@functools.cache
def torch_state_dict():
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None, num_classes=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


@functools.cache
def model_and_variables():
    # variables from a torchvision state dict: exact values, no (slow) jitted init
    return load_torchvision(torch_state_dict(), ARCH)


def assert_same_variables(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert isinstance(v, jax.Array) and u.dtype == v.dtype and np.array_equal(u, v)


def leftovers(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith("."))


def test_round_trip_restores_identical_variables_and_metadata(tmp_path):
    model, variables = model_and_variables()
    prep = Preprocessing(image_size=96, resize_size=None, mean=(0.5, 0.4, 0.3), std=(0.2,) * 3)
    names = ["nevus", "melanoma", "keratosis"]
    out = checkpoint.save(
        tmp_path / "ckpt", model, variables, class_names=names, preprocessing=prep
    )
    assert out == tmp_path / "ckpt" and leftovers(tmp_path) == []
    meta = json.loads((out / "jaxcam.json").read_text())
    assert meta["arch"] == ARCH and meta["num_classes"] == 3
    assert meta["jaxcam_version"] == jaxcam.__version__
    bundle = checkpoint.restore(out)
    assert isinstance(bundle, LoadedModel)
    assert (bundle.model.arch, bundle.model.num_classes) == (ARCH, 3)
    assert bundle.class_names == tuple(names)
    assert bundle.preprocessing == prep
    assert_same_variables(variables, bundle.variables)
    # jaxcam.load on the directory is the same thing
    again = jaxcam.load(out)
    assert again.class_names == tuple(names) and again.preprocessing == prep
    assert_same_variables(variables, again.variables)


def test_defaults_are_torchvision_preprocessing_and_no_names(tmp_path):
    model, variables = model_and_variables()
    bundle = checkpoint.restore(checkpoint.save(tmp_path / "c", model, variables))
    assert bundle.class_names is None and bundle.preprocessing == Preprocessing()


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_leaves_no_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch, exc):
    model, variables = model_and_variables()
    old = checkpoint.save(tmp_path / "ckpt", model, variables, class_names=["a", "b", "c"])

    def fail(*args, **kwargs):  # after orbax has written the variables
        raise exc

    monkeypatch.setattr(checkpoint.json, "dump", fail)
    with pytest.raises(type(exc)):
        checkpoint.save(tmp_path / "new", model, variables)
    assert not (tmp_path / "new").exists()
    with pytest.raises(type(exc)):
        checkpoint.save(old, model, variables, class_names=["x", "y", "z"], overwrite=True)
    monkeypatch.undo()
    assert leftovers(tmp_path) == []  # no temp or backup directories left behind
    assert checkpoint.restore(old).class_names == ("a", "b", "c")  # the previous one, intact
    checkpoint.save(old, model, variables, class_names=["x", "y", "z"], overwrite=True)
    assert checkpoint.restore(old).class_names == ("x", "y", "z")
    assert leftovers(tmp_path) == []


def test_save_rejects_bad_input_before_writing(tmp_path):
    model, variables = model_and_variables()
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists; choose another directory or pass"):
        checkpoint.save(tmp_path / "exists", model, variables)
    with pytest.raises(ValueError, match="2 class names given for a model with 3 outputs"):
        checkpoint.save(tmp_path / "c", model, variables, class_names=["a", "b"])
    other = models.get(ARCH, num_classes=5)
    with pytest.raises(
        ValueError,
        match=r"do not belong to this efficientnet_b0 \(num_classes=5\)"
        r": shape mismatches \(2\).*classifier",
    ):
        checkpoint.save(tmp_path / "c", other, variables)
    assert sorted(os.listdir(tmp_path)) == ["exists"]


def test_restore_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*jaxcam convert"):
        checkpoint.restore(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a jaxcam checkpoint.*arch="):
        checkpoint.restore(tmp_path)
    model, variables = model_and_variables()
    ckpt = checkpoint.save(tmp_path / "ckpt", model, variables)
    with pytest.raises(ValueError, match="give its parent directory"):
        checkpoint.restore(ckpt / "variables")
    meta = json.loads((ckpt / "jaxcam.json").read_text())
    (ckpt / "jaxcam.json").write_text(json.dumps(meta | {"collections": ["params"]}))
    with pytest.raises(ValueError, match=r"collections \['params'\].*needs \['batch_stats', "):
        checkpoint.restore(ckpt)
    (ckpt / "jaxcam.json").write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(ValueError, match="version 99 is newer .* upgrade jaxcam"):
        checkpoint.restore(ckpt)


def test_load_torchvision_files_and_checks(tmp_path):
    weights_file = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in torch_state_dict().items()}, weights_file)
    bundle = load(weights_file, arch=ARCH)
    assert bundle.class_names is None and bundle.preprocessing == Preprocessing.imagenet(224)
    assert_same_variables(model_and_variables()[1], bundle.variables)
    detected = load(weights_file)  # torchvision's EfficientNet-B0 keys say what it is
    assert detected.model == bundle.model and detected.preprocessing == bundle.preprocessing
    assert_same_variables(detected.variables, bundle.variables)
    with pytest.raises(ValueError, match="has 3 classes, but num_classes=7"):
        load(weights_file, arch=ARCH, num_classes=7)

    ckpt = checkpoint.save(tmp_path / "ckpt", bundle.model, bundle.variables)
    with pytest.raises(ValueError, match="holds a efficientnet_b0, but arch='resnet50'"):
        load(ckpt, arch="resnet50")
    assert load(ckpt, arch=ARCH, num_classes=3).model.arch == ARCH
    with pytest.raises(FileNotFoundError, match=r"does not exist\. .*jaxcam convert WEIGHTS"):
        load(tmp_path / "nothing.pth", arch=ARCH)
    assert jaxcam.load is load and jaxcam.LoadedModel is LoadedModel
