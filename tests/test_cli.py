"""The ``jaxcam`` command line, driven as a subprocess and in-process.

Weights: a random torchvision ResNet-50 with 3 classes, saved as
``.safetensors`` and converted by ``jaxcam convert`` (a subprocess), explained
at 64 px. Subprocess runs are few (JAX start-up is slow); most bad-input cases
call ``jaxcam.cli.main`` in-process.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import jaxcam
from jaxcam import cli, viz
from jaxcam.io import load_images
from jaxcam.preprocessing import Preprocessing
from jaxcam.testing import resolved_top_k

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["benign nevus", "melanoma", "keratosis"]
METHODS = ["gradcam", "gradcam++"]


def run_cli(*args, cwd=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "jaxcam.cli", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=900,
    )


def _smooth_image(h, w, seed):
    """A smooth random RGB image (so resizing and JPEG do not destroy it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Every kind of input file: RGB PNG, JPEG, grayscale, RGBA, 16-bit, EXIF-rotated."""
    d = tmp_path_factory.mktemp("images")
    Image.fromarray(_smooth_image(80, 100, 0)).save(d / "rgb.png")
    Image.fromarray(_smooth_image(70, 90, 1)).save(d / "photo.jpg", quality=90)
    Image.fromarray(_smooth_image(64, 80, 2)[..., 0]).save(d / "gray.png")
    rgba = np.dstack([_smooth_image(72, 72, 3), _smooth_image(72, 72, 4)[..., 0]])
    Image.fromarray(rgba, mode="RGBA").save(d / "rgba.png")
    Image.fromarray(_smooth_image(66, 66, 5)[..., 0].astype(np.uint16) * 257).save(d / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_smooth_image(64, 96, 6)).save(d / "rotated.png", exif=exif)
    return [d / n for n in ("rgb.png", "photo.jpg", "gray.png", "rgba.png", "deep.png",
                            "rotated.png")]


@pytest.fixture(scope="module")
def torch_weights(tmp_path_factory):
    """A random torchvision resnet50 (3 classes) as .safetensors."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=3).eval()
    with torch.no_grad():
        net.fc.weight.mul_(0.1)  # moderate logits: probabilities not saturated at 0/1
    path = tmp_path_factory.mktemp("torch") / "resnet50_3.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def converted(torch_weights, tmp_path_factory):
    """``jaxcam convert`` (subprocess) -> (checkpoint dir, CompletedProcess)."""
    d = tmp_path_factory.mktemp("ckpt")
    names = d / "names.txt"
    names.write_text("\n".join(CLASS_NAMES) + "\n")
    ckpt = d / "resnet50_3"
    proc = run_cli("convert", torch_weights, ckpt, "--arch", "resnet50",
                   "--class-names", names, "--image-size", "64")
    return ckpt, proc


@pytest.fixture(scope="module")
def bundle(converted):
    return jaxcam.load(converted[0])


def test_convert_subprocess_writes_the_torchvision_weights(converted, torch_weights, bundle):
    ckpt, proc = converted
    assert proc.returncode == 0, proc.stderr
    assert f"-> {ckpt}" in proc.stdout
    _, expected = jaxcam.weights.load_torchvision(torch_weights, "resnet50")
    got, want = jax.tree.leaves_with_path(bundle.variables), jax.tree.leaves_with_path(expected)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    assert bundle.class_names == tuple(CLASS_NAMES)
    assert bundle.preprocessing == Preprocessing.imagenet(64)


def test_explain_subprocess_matches_the_library(converted, bundle, images, tmp_path):
    ckpt, _ = converted
    out = tmp_path / "out"
    proc = run_cli("explain", *images, "--weights", ckpt, "--layer", "layer3",
                   "--method", "gradcam", "--method", "gradcam++", "--out", out)
    assert proc.returncode == 0, proc.stderr

    stems = [p.stem for p in images]
    expected_files = {"predictions.json"}
    for s in stems:
        expected_files.add(f"{s}_grid.png")
        for m in METHODS:
            expected_files |= {f"{s}_{m}.png", f"{s}_{m}.npy", f"{s}_{m}_raw.npy"}
    assert {p.name for p in out.iterdir()} == expected_files
    assert not list(tmp_path.glob(".jaxcam-explain-*"))  # temp dir cleaned up

    x, shown = load_images(images, bundle.preprocessing)
    ref = jaxcam.explain(bundle.model, bundle.variables, x, method=METHODS, layer="layer3")
    for m in METHODS:
        maps, raw = np.asarray(ref[m].maps), np.asarray(ref[m].raw)
        assert maps.shape == (6, 64, 64) and raw.shape == (6, 4, 4)
        assert maps.std() > 0.05  # real maps, not all-zero ones
        for i, s in enumerate(stems):
            np.testing.assert_allclose(np.load(out / f"{s}_{m}.npy"), maps[i],
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.load(out / f"{s}_{m}_raw.npy"), raw[i],
                                       rtol=1e-5, atol=1e-6)
            png = np.asarray(Image.open(out / f"{s}_{m}.png"))
            want = viz.overlay(shown[i], maps[i], cmap="jet", alpha=0.5).astype(int)
            assert np.abs(png.astype(int) - want).max() <= 1

    logits = np.asarray(ref["gradcam"].logits, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["settings"]["layer"] == "layer3"
    assert summary["settings"]["methods"] == METHODS
    tops = resolved_top_k(logits, 1)[:, 0]  # no near-tie: the CLI's class is this one
    for i, entry in enumerate(summary["images"]):
        top = int(tops[i])
        assert entry["explained"][0]["class_idx"] == top
        assert entry["explained"][0]["class_name"] == CLASS_NAMES[top]
        np.testing.assert_allclose([p["probability"] for p in entry["predictions"]],
                                   np.sort(probs[i])[::-1], rtol=1e-5)
        assert f"1. {CLASS_NAMES[top]} ({top}): {probs[i, top]:.2%}  <- explained" in proc.stdout
    grid = Image.open(out / "rgb_grid.png")
    assert grid.size[0] > grid.size[1]  # one row, three panels


def test_top_k_class_by_name_and_torchvision_file(
    converted, bundle, images, torch_weights, tmp_path, capsys
):
    ckpt, _ = converted
    out = tmp_path / "topk"
    common = ["--weights", str(ckpt), "--method", "gradcam"]  # default layer: layer4
    assert cli.main(["explain", *map(str, images), *common, "--top-k", "2",
                     "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    stems = [p.stem for p in images]
    assert {p.name for p in out.iterdir()} == {"predictions.json"} | {
        f"{s}_grid.png" for s in stems} | {
        f"{s}_top{r}_gradcam{ext}" for s in stems for r in (1, 2)
        for ext in (".png", ".npy", "_raw.npy")}
    assert stdout.count("<- explained") == 2 * len(images)

    x, _ = load_images(images, bundle.preprocessing)
    summary = json.loads((out / "predictions.json").read_text())["images"]
    for r in (1, 2):
        cls = np.array([entry["explained"][r - 1]["class_idx"] for entry in summary])
        ref = jaxcam.explain(bundle.model, bundle.variables, x, method="gradcam", class_idx=cls)
        order = resolved_top_k(ref.logits, 2)  # ranks 1, 2 and 3 apart: no near-tie
        np.testing.assert_array_equal(cls, order[:, r - 1])  # rank r = r-th most probable
        for i, s in enumerate(stems):
            np.testing.assert_allclose(np.load(out / f"{s}_top{r}_gradcam.npy"),
                                       np.asarray(ref.maps)[i], rtol=1e-5, atol=1e-6)

    # A torchvision file works directly (with --arch); --image-size 64 gives the checkpoint's
    # preprocessing (crop 64, resize round(64 * 256 / 224) = 73), so the maps are the same.
    out3 = tmp_path / "torchvision"
    assert cli.main(["explain", *map(str, images), "--weights", str(torch_weights), "--arch",
                     "resnet50", "--image-size", "64", "--method", "gradcam",
                     "--out", str(out3)]) == 0
    capsys.readouterr()
    for s in stems:
        np.testing.assert_allclose(np.load(out3 / f"{s}_gradcam.npy"),
                                   np.load(out / f"{s}_top1_gradcam.npy"), rtol=1e-5, atol=1e-6)
    predictions = json.loads((out3 / "predictions.json").read_text())["images"][0]
    assert predictions["predictions"][0]["class_name"].startswith("class ")  # no names

    out2 = tmp_path / "byname"
    assert cli.main(["explain", *map(str, images), *common, "--class", "MELANOMA",
                     "--out", str(out2)]) == 0
    summary = json.loads((out2 / "predictions.json").read_text())["images"]
    assert {(e["class_idx"], e["class_name"]) for entry in summary
            for e in entry["explained"]} == {(1, "melanoma")}
    ref = jaxcam.explain(bundle.model, bundle.variables, x, method="gradcam", class_idx=1)
    for i, s in enumerate(stems):
        np.testing.assert_allclose(np.load(out2 / f"{s}_gradcam.npy"), np.asarray(ref.maps)[i],
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input


def test_bad_image_subprocess_exits_2_with_one_line(converted, images, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("explain", images[0], tmp_path / "missing.png", "--weights", converted[0],
                   "--out", out)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert re.fullmatch(r"jaxcam explain: error: image file '.*missing\.png' does not exist; "
                        r"check the path\.\n", proc.stderr)
    assert proc.stdout == ""
    assert not out.exists()


def _bad_cases(images, ckpt, torch_weights, tmp):
    img = str(images[0])
    text = tmp / "notes.png"
    text.write_text("not an image")
    a_file = tmp / "a_file"
    a_file.write_text("")
    twin = tmp / "twin"
    twin.mkdir(exist_ok=True)
    Image.open(images[0]).save(twin / "rgb.png")
    w = ["--weights", str(ckpt)]
    return [
        ([img], r"no weights given: pass --weights PATH.*jaxcam convert WEIGHTS OUT_DIR"
                r".*never downloads weights"),
        ([img, "--weights", str(tmp / "nope")], r"--weights '.*nope' does not exist"),
        ([str(tmp / "gone.jpg"), *w], r"image file '.*gone\.jpg' does not exist"),
        ([str(text), *w], r"cannot read '.*notes\.png': not an image format"),
        ([str(tmp), *w], r"is a directory, not an image file"),
        ([img, str(twin / "rgb.png"), *w], r"would write the same output files \(rgb_\*\)"),
        ([img, *w, "--arch", "vgg19"], r"holds a resnet50, but arch='vgg19'"),
        ([img, "--weights", str(torch_weights), "--arch", "vgg19"],
         r"cannot load --weights '.*resnet50_3\.safetensors' as --arch vgg19: .*missing"),
        ([img, "--weights", str(torch_weights)],
         r"keys are those of a resnet50, which torchvision and timm name alike.*"
         r"arch='timm/resnet50'"),
        ([img, *w, "--layer", "layer9"], r"--layer: unknown layer 'layer9' for resnet50; "
                                          r"valid layers: .*layer4"),
        ([img, *w, "--method", "gradcam+++"], r"invalid choice: 'gradcam\+\+\+'"),
        ([img, *w, "--method", "cam", "--layer", "layer3"],
         r"method 'cam' needs a global-average-pool \+ dense head"),
        ([img, *w, "--class", "3"], r"--class 3 is out of range: the model has 3 classes "
                                    r"\(valid: 0\.\.2\)"),
        ([img, *w, "--class", "melanomma"], r"--class 'melanomma' is not a class of this model;"
                                            r" did you mean 'melanoma'\?"),
        ([img, *w, "--top-k", "4"], r"--top-k 4 exceeds the number of classes \(3\)"),
        ([img, *w, "--top-k", "0"], r"--top-k must be at least 1"),
        ([img, *w, "--top-k", "2", "--class", "1"], r"not allowed with argument"),
        ([img, *w, "--image-size", "16"], r"--image-size 16 is too small for resnet50; "
                                          r"use at least 32"),
        ([img, *w, "--target", "probability"], r"argument --target: invalid choice"),
        ([img, *w, "--derivatives", "numeric"], r"argument --derivatives: invalid choice"),
        ([img, *w, "--cmap", "jett"], r"--cmap: unknown colormap 'jett'"),
        ([img, *w, "--alpha", "2"], r"--alpha must be in \[0, 1\]"),
        ([img, *w, "--out", str(a_file)], r"exists and is not a directory"),
        # found by jaxcam.explain itself, after loading but before any file is written
        ([img, *w, "--target", "logit", "--method", "gradcam++"],
         r"exact Grad-CAM\+\+ with target='logit' is degenerate"),
    ]


def test_every_bad_input_exits_2_with_its_message_and_no_files(
    converted, images, torch_weights, tmp_path, capsys
):
    cases = _bad_cases(images, converted[0], torch_weights, tmp_path)
    for k, (argv, pattern) in enumerate(cases):
        out = tmp_path / f"out{k}"
        if "--out" not in argv:
            argv = [*argv, "--out", str(out)]
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["explain", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (argv, err)
        assert err.startswith("jaxcam explain: error: ") and err.count("\n") == 1, err
        assert re.search(pattern, err), (pattern, err)
        assert not out.exists(), argv
    assert not list(tmp_path.glob(".jaxcam-explain-*"))


def test_convert_bad_input(converted, torch_weights, tmp_path, capsys):
    names = tmp_path / "two.txt"
    names.write_text("a\nb\n")
    cases = [
        ([str(tmp_path / "none.pth"), str(tmp_path / "c1"), "--arch", "resnet50"],
         r"WEIGHTS '.*none\.pth' does not exist"),
        ([str(torch_weights), str(converted[0]), "--arch", "resnet50"],
         r"OUT_DIR '.*resnet50_3' already exists; .*--overwrite"),
        ([str(torch_weights), str(tmp_path / "c2"), "--arch", "resnet50", "--class-names",
          str(names)], r"cannot convert .* as resnet50: .*2"),
        ([str(torch_weights), str(tmp_path / "c3"), "--arch", "efficientnet_b0"],
         r"cannot convert .* as efficientnet_b0"),
    ]
    for argv, pattern in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["convert", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        assert re.search(pattern, err), (pattern, err)
    assert not any((tmp_path / c).exists() for c in ("c1", "c2", "c3"))


def test_data_build_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "build", "imagenet", "--data-dir", str(tmp_path / "d")])
    assert exit_info.value.code == 2
    assert re.search(r"unknown dataset 'imagenet'; choose one of .*ham10000",
                     capsys.readouterr().err)
    # a missing folder, or a file given as the folder: the layout the builder reads and
    # where to download it, before anything is built
    (tmp_path / "a_file.zip").write_bytes(b"")
    expected = {
        "ham10000": [r"HAM10000_metadata\.csv", r"HAM10000_images_part_1/",
                     r"kaggle\.com/datasets/kmader/skin-cancer-mnist-ham10000",
                     r"doi\.org/10\.7910/DVN/DBW86T"],
        "aptos2019": [r"train\.csv", r"train_images/",
                      r"kaggle\.com/competitions/aptos2019-blindness-detection"],
    }
    for name, parts in expected.items():
        for folder, problem in ((tmp_path / "nowhere", r"folder .*nowhere does not exist"),
                                (tmp_path / "a_file.zip", r"a_file\.zip is a file, not a folder")):
            with pytest.raises(SystemExit) as exit_info:
                cli.main(["data", "build", name, "--manual-dir", str(folder),
                          "--data-dir", str(tmp_path / "d")])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2
            assert re.search(rf"^jaxcam data build: error: .*{problem}", err), err
            for part in parts + [rf"jaxcam data build {name} --manual-dir MANUAL_DIR"]:
                assert re.search(part, err), (part, err)
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- help and helpers


def test_help_subprocess_and_per_command_help(capsys):
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("explain", "convert", "data"):
        assert command in proc.stdout
    for argv, words in (
        (["explain", "--help"], ["--weights", "--method", "--top-k", "--derivatives",
                                 "--image-size", "--out", *jaxcam.METHODS]),
        (["convert", "--help"], ["WEIGHTS", "OUT_DIR", "--arch", "--class-names"]),
        (["data", "build", "--help"], ["--manual-dir", "--data-dir", "--skip-bad"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for word in words:
            assert word in text, (argv, word)


def test_imagenet_names_are_torchvisions():
    import torchvision

    names = cli.imagenet_class_names()
    assert names == tuple(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(set(names)) == 1000 and names[0] == "tench" and names[-1] == "toilet tissue"


def test_class_names_for():
    assert cli.class_names_for(1000, None) == cli.imagenet_class_names()
    assert cli.class_names_for(3, None) is None
    assert cli.class_names_for(3, ["a", "b", "c"]) == ("a", "b", "c")
    assert cli.class_names_for(1000, ["x"] * 1000) == ("x",) * 1000  # checkpoint's own win
    with pytest.raises(cli.UsageError, match="lists 2 class names for a 3-class model"):
        cli.class_names_for(3, ["a", "b"])


def test_method_expansion():
    assert cli._expand_methods(None) == ["gradcam++"]
    assert cli._expand_methods(["gradcam", "all", "gradcam"]) == ["gradcam", *(
        m for m in jaxcam.METHODS if m != "gradcam")]
    assert cli._expand_methods(["layercam", "gradcam", "layercam"]) == ["layercam", "gradcam"]


# ---------------------------------------------------------------- start-up


def test_help_imports_nothing_heavy():
    """``jaxcam --help`` answers without importing JAX, Flax, numpy, matplotlib or TFDS
    (their import is most of a second each); the method list still shows under
    ``explain --help``, computed when shown."""
    code = ("import sys\nfrom jaxcam import cli\ntry:\n    cli.main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "heavy = {'jax', 'flax', 'numpy', 'matplotlib', 'tensorflow_datasets', 'orbax',"
            " 'torch'}\nprint('LOADED', sorted(heavy & set(sys.modules)))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout and "explain" in proc.stdout


# ---------------------------------------------------------------- --model, recompilation


TINY_FACTORY = "tests.test_compilation:tiny_model"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from jaxcam import checkpoint
    from tests.test_compilation import tiny_model, tiny_variables

    model = tiny_model(num_classes=4)
    variables = tiny_variables(model)
    ckpt = checkpoint.save(tmp_path_factory.mktemp("tiny") / "ckpt", model, variables,
                           class_names=["w", "x", "y", "z"],
                           preprocessing=Preprocessing(image_size=32, resize_size=None),
                           factory=TINY_FACTORY, factory_kwargs={"num_classes": 4})
    return ckpt, model, variables


def test_model_option_builds_the_users_model_and_explains_with_its_checkpoint(
        tiny_checkpoint, images, tmp_path, capsys):
    ckpt, model, variables = tiny_checkpoint
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint alone is not trusted
        cli.main(["explain", str(images[0]), "--weights", str(ckpt), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "does not import or call code a checkpoint names" in err
    assert f"--model {TINY_FACTORY}" in err
    out = tmp_path / "out"
    cli.main(["explain", str(images[0]), "--weights", str(ckpt), "--model", TINY_FACTORY,
              "--method", "gradcam", "--out", str(out)])
    x, _ = load_images(images[:1], Preprocessing(image_size=32, resize_size=None))
    logits = np.asarray(model.apply(variables, x), np.float64)[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    preds = json.loads((out / "predictions.json").read_text())["images"][0]["predictions"]
    np.testing.assert_allclose([p["probability"] for p in preds], np.sort(probs)[::-1],
                               rtol=1e-5)
    assert preds[0]["class_name"] == "wxyz"[int(resolved_top_k(logits[None], 1)[0, 0])]
    for argv, message in (
        (["--model", "tests.nothing_here:f"], "cannot import the model factory"),
        (["--model", "os.system"], "importable name 'package.module:function'"),
        (["--model", "tests.test_compilation:no_such"], "does not exist"),
    ):
        with pytest.raises(SystemExit):
            cli.main(["explain", str(images[0]), "--weights", str(ckpt), *argv,
                      "--out", str(tmp_path / "bad")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_second_image_of_the_same_size_in_the_same_process_never_recompiles(
        converted, tmp_path, capsys):
    """The CLI path in one process (a notebook, a server): after the first image, another
    image file (of another size on disk) explained with the same checkpoint and input
    size compiles nothing, though the model is loaded again; a new input size compiles
    (new shapes). jaxcam's own models compare equal when rebuilt, which is what keeps
    the compiled explanation valid across loads."""
    from jaxcam.compilation import CompileCounter

    ckpt, _ = converted
    files = []
    for i, (w, h) in enumerate([(50, 40), (90, 70)]):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(_smooth_image(h, w, 10 + i)).save(files[-1])
    argv = lambda f, *extra: ["explain", str(f), "--weights", str(ckpt), "--method", "gradcam",
                              "--method", "gradcam++", "--out", str(tmp_path / f.stem), *extra]
    counts = []
    for f, extra in ((files[0], ()), (files[1], ()), (files[1], ("--image-size", "96"))):
        with CompileCounter() as counter:
            cli.main(argv(f, *extra))
        counts.append(counter.compiles)
    assert counts[0] > 0 and counts[1] == 0, counts
    assert counts[2] > 0, counts
    capsys.readouterr()
