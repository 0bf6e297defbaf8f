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
from jaxcam.checkpoint import LoadedModel
from jaxcam.loading import load
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


# ---------------------------------------------------------------- any model: factories


def _tiny():
    from tests.test_compilation import tiny_model, tiny_variables

    model = tiny_model(num_classes=4)
    return model, tiny_variables(model)


TINY_FACTORY = "tests.test_compilation:tiny_model"


def test_jaxcam_models_record_the_builtin_factory(tmp_path):
    model, variables = model_and_variables()
    meta = checkpoint.read_metadata(checkpoint.save(tmp_path / "c", model, variables))
    assert meta["factory"] == {"name": "jaxcam.models:get",
                               "kwargs": {"arch": ARCH, "num_classes": 3}}


def test_a_model_of_any_factory_restores_only_when_the_caller_allows_it(tmp_path):
    from tests.test_compilation import tiny_model

    model, variables = _tiny()
    ckpt = checkpoint.save(tmp_path / "c", model, variables, class_names="abcd",
                           factory=TINY_FACTORY, factory_kwargs={"num_classes": 4})
    meta = checkpoint.read_metadata(ckpt)
    assert meta["factory"] == {"name": TINY_FACTORY, "kwargs": {"num_classes": 4}}
    assert meta["arch"] == "tiny_cnn" and meta["num_classes"] == 4
    with pytest.raises(ValueError, match=r"built by calling tests\.test_compilation:tiny_model"
                       r"\(\*\*\{\"num_classes\": 4\}\)\. jaxcam does not import or call"):
        checkpoint.restore(ckpt)
    with pytest.raises(ValueError, match="does not import or call"):
        jaxcam.load(ckpt, factories=["some.other:factory"])
    for allowed in ([TINY_FACTORY], TINY_FACTORY, {TINY_FACTORY: tiny_model}):
        bundle = checkpoint.restore(ckpt, factories=allowed)
        assert (bundle.model.arch, bundle.model.num_classes) == ("tiny_cnn", 4)
        assert bundle.class_names == ("a", "b", "c", "d")
        assert_same_variables(variables, bundle.variables)
    # or the caller builds the model: nothing the file names is used
    bundle = jaxcam.load(ckpt, model=tiny_model(num_classes=4))
    assert_same_variables(variables, bundle.variables)
    with pytest.raises(ValueError, match="holds a model with 4 outputs, but the given tiny_cnn "
                       "has num_classes=6"):
        checkpoint.restore(ckpt, model=tiny_model(num_classes=6))


def test_a_hostile_factory_is_refused_before_anything_is_imported_or_called(
        tmp_path, monkeypatch):
    import importlib
    import sys

    model, variables = _tiny()
    ckpt = checkpoint.save(tmp_path / "c", model, variables, factory=TINY_FACTORY,
                           factory_kwargs={"num_classes": 4})
    meta = json.loads((ckpt / "jaxcam.json").read_text())
    called = []
    monkeypatch.setattr(os, "system", lambda *a, **k: called.append(("system", a)))
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda *a, **k: called.append(("import", a)) or real_import(*a, **k))
    pwned = tmp_path / "PWNED"
    for name, kwargs in (("os:system", {"command": f"touch {pwned}"}),
                         ("jaxcam_never_imported_module:run", {"x": 1})):
        (ckpt / "jaxcam.json").write_text(
            json.dumps(meta | {"factory": {"name": name, "kwargs": kwargs}}))
        for call in (lambda: checkpoint.restore(ckpt), lambda: jaxcam.load(ckpt),
                     lambda: jaxcam.load(ckpt, factories=["something:else"])):
            with pytest.raises(ValueError) as err:
                call()
            message = str(err.value)
            assert f"built by calling {name}(**{json.dumps(kwargs)})" in message
            assert "does not import or call code a checkpoint names" in message
            assert f"factories=[{name!r}]" in message and "model=" in message
    assert called == [] and not pwned.exists()
    assert "jaxcam_never_imported_module" not in sys.modules


def test_factory_names_and_kwargs_are_validated_before_writing(tmp_path):
    model, variables = _tiny()
    for bad in ("os.system", "a b:c", ":x", "pkg:", "pkg:fn(1)"):
        with pytest.raises(ValueError, match="importable name 'package.module:function'"):
            checkpoint.save(tmp_path / "c", model, variables, factory=bad)
    with pytest.raises(ValueError, match="must be JSON data"):
        checkpoint.save(tmp_path / "c", model, variables, factory=TINY_FACTORY,
                        factory_kwargs={"f": object()})
    with pytest.raises(ValueError, match="factory_kwargs given without factory"):
        checkpoint.save(tmp_path / "c", model, variables, factory_kwargs={"a": 1})
    assert not (tmp_path / "c").exists()
    ckpt = checkpoint.save(tmp_path / "c", model, variables)  # no factory: model= needed
    with pytest.raises(ValueError, match=r"'tiny_cnn' model, which is not one of jaxcam's .*"
                       r"pass the model: jaxcam.load\(path, model=\.\.\.\)"):
        checkpoint.restore(ckpt)


class AdaptedModel:
    """A user's model of the protocol without ``abstract_variables``: a thin wrapper."""

    def __init__(self, inner):
        self._inner = inner
        self.arch, self.num_classes = "adapted", inner.num_classes

    def apply(self, variables, x):
        return self._inner.apply(variables, x)


def test_a_model_without_abstract_variables_restores_the_saved_tree_as_is(tmp_path):
    inner, variables = _tiny()
    model = AdaptedModel(inner)
    ckpt = checkpoint.save(tmp_path / "c", model, variables, factory=TINY_FACTORY)
    bundle = checkpoint.restore(ckpt, model=model)
    assert bundle.model is model
    assert_same_variables(variables, bundle.variables)
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.apply(bundle.variables, x)),
                                  np.asarray(inner.apply(variables, x)))


# ---------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 3-epoch jaxcam.train.fit run of the tiny CNN: (run folder, result, snapshots of
    the model checkpoint's info taken during training)."""
    from jaxcam import train
    from tests.test_compilation import IMAGE, tiny_model, tiny_variables

    run = tmp_path_factory.mktemp("run")
    model = tiny_model(num_classes=4)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 48).astype(np.int32)
    images = rng.standard_normal((48, IMAGE, IMAGE, 3)).astype(np.float32)
    images[..., 0] += labels[:, None, None]  # learnable

    def batches(epoch, start):
        order = np.random.default_rng([1, epoch]).permutation(48)
        for s in range(start, 6):
            idx = order[8 * s: 8 * s + 8]
            yield {"image": images[idx], "label": labels[idx]}

    snapshots = {}

    def hook(step):  # what a user would find on disk during training
        info = json.loads((run / "checkpoints/model/jaxcam.json").read_text())["info"] if (
            run / "checkpoints/model/jaxcam.json").exists() else None
        snapshots[step] = info

    config = train.TrainConfig(epochs=3, batch_size=8, learning_rate=0.05, checkpoint_every=4,
                               monitor="accuracy")

    def fit(workdir, hook=None):
        return train.fit(model, tiny_variables(model), batches, 6, config, workdir,
                         eval_batches=lambda: [{"image": images[:16], "label": labels[:16]}],
                         step_hook=hook, progress=False, verbose=False,
                         class_names=["w", "x", "y", "z"])

    result = fit(run / "checkpoints", hook)
    return run, result, snapshots, model, fit


def test_training_keeps_a_checkpoint_of_the_best_model(trained_run):
    run, result, snapshots, model, _ = trained_run
    bundle = jaxcam.load(run, model=model)
    assert bundle.class_names == ("w", "x", "y", "z")
    assert bundle.preprocessing == Preprocessing(image_size=32, resize_size=None)
    assert bundle.info["epoch"] == result.best_epoch and bundle.info["source"] == "best"
    assert bundle.info["accuracy"] == result.best_value
    assert_same_variables(result.variables, bundle.variables)
    # during training the model checkpoint follows the best epoch seen so far
    history = [h["val_accuracy"] for h in result.history]
    assert snapshots[1] is None  # nothing before the first evaluation
    for epoch in (1, 2):
        best_so_far = max(range(epoch), key=lambda e: (history[e], -e)) + 1
        assert snapshots[6 * epoch + 1]["epoch"] == best_so_far


def test_every_folder_of_a_run_means_its_best_model(trained_run):
    run, result, _, model, fit = trained_run
    best_step = result.history[result.best_epoch - 1]["step"]
    want = run / "checkpoints" / "model"
    latest = max(int(p.name) for p in (run / "checkpoints/latest").iterdir() if p.name.isdigit())
    for path in (run, run / "checkpoints", want, run / "checkpoints/best",
                 run / f"checkpoints/best/{best_step}", run / "checkpoints/latest",
                 run / f"checkpoints/latest/{latest}", run / f"checkpoints/latest/{latest}/state"):
        assert checkpoint.resolve(path) == want, path
    assert jaxcam.load(run / "checkpoints/latest", model=model).info["step"] == best_step


def test_a_run_without_a_model_checkpoint_says_what_it_found_and_rerunning_writes_it(
        trained_run, tmp_path):
    import shutil

    run, result, _, model, fit = trained_run
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    shutil.rmtree(old / "checkpoints" / "model")  # as a run written before this existed
    best_step = result.history[result.best_epoch - 1]["step"]
    for path in (old, old / "checkpoints/best", old / f"checkpoints/best/{best_step}"):
        with pytest.raises(ValueError, match=rf"holds training-state checkpoints \(best/ \(steps "
                           rf"{best_step}\), latest/ .* no model checkpoint .*Rerun the same "
                           "training command"):
            jaxcam.load(path, model=model)
    with pytest.raises(ValueError, match=r"not a jaxcam checkpoint \(no jaxcam.json\) nor a "
                       r"training run \(it holds: notes.txt\)\. Pass a jaxcam checkpoint"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other/notes.txt").write_text("x")
        jaxcam.load(tmp_path / "other")
    again = fit(old / "checkpoints")  # the finished run: no training, the model written
    assert again.steps == result.steps and again.history == result.history
    bundle = jaxcam.load(old, model=model)
    assert bundle.info["step"] == best_step
    assert_same_variables(result.variables, bundle.variables)
