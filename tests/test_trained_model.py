"""After training, explain a new image with the model the main job trained.

``python -m experiments.ham10000`` (its tiny configuration, as in
tests/test_experiments.py) trains a model; ``jaxcam explain NEW.jpg --weights
RUN_DIR`` must then explain a new image file with that run's best model: the
predictions it prints and writes are the model's own (recomputed here from the
loaded checkpoint, the checkpoint's preprocessing and ``model.apply``), and
every folder of the run names the same model.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

import jaxcam
from experiments import ham10000
from jaxcam import cli
from jaxcam.io import load_image
from jaxcam.preprocessing import preprocess

TINY = ["--num-images", "40", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
        "--num-figures", "1", "--num-gif", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ham")
    assert ham10000.main([*TINY, "--out", str(out)]) == 0
    return out


def _new_image(path, seed=3):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((70, 90), Image.BILINEAR).save(path, quality=92)
    return path


@pytest.mark.slow
def test_the_main_jobs_model_explains_a_new_image_through_the_cli(run, tmp_path, capsys):
    metrics = json.loads((run / "metrics.json").read_text())
    model_dir = run / "checkpoints" / "model"
    assert metrics["model"]["checkpoint"] == str(model_dir)
    report = (run / "report.md").read_text()
    assert "## The trained model" in report and f"--weights {run}" in report
    assert metrics["model"]["explain_command"] in report

    image = _new_image(tmp_path / "new_lesion.jpg")
    capsys.readouterr()
    cli.main(["explain", str(image), "--weights", str(run), "--method", "gradcam",
              "--method", "gradcam++", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())

    # the model's own predictions on the same file, from the checkpoint alone
    bundle = jaxcam.load(model_dir)
    assert bundle.class_names == tuple(metrics["data"]["class_names"])
    assert bundle.info["epoch"] == metrics["training"]["best_epoch"]
    x = preprocess(load_image(image), bundle.preprocessing)[None]
    assert x.shape == (1, 32, 32, 3)
    probs = np.asarray(jax.nn.softmax(bundle.model.apply(bundle.variables, x), -1))[0]
    order = np.argsort(-probs, kind="stable")
    preds = written["images"][0]["predictions"]
    assert [p["class_idx"] for p in preds] == order[: len(preds)].tolist()
    # float32 softmax of the same logits from another compiled program: last-bit level
    np.testing.assert_allclose([p["probability"] for p in preds], probs[order[: len(preds)]],
                               rtol=0, atol=1e-5)
    assert [p["class_name"] for p in preds] == [bundle.class_names[c] for c in order[:len(preds)]]
    top = bundle.class_names[order[0]]
    assert f"1. {top} ({order[0]}): {probs[order[0]]:.2%}  <- explained" in printed
    assert written["settings"]["arch"] == metrics["config"]["arch"]
    # the maps are the library's own for that model and image
    ex = jaxcam.explain(bundle.model, bundle.variables, x, method=["gradcam", "gradcam++"],
                        layer=written["settings"]["layer"])
    for m in ("gradcam", "gradcam++"):
        saved = np.load(tmp_path / "out" / f"new_lesion_{m}.npy")
        np.testing.assert_allclose(saved, np.asarray(ex[m].maps)[0], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_every_folder_of_the_run_explains_with_the_same_model(run, tmp_path):
    image = _new_image(tmp_path / "img.png", seed=4)
    best_step = max(int(p.name) for p in (run / "checkpoints/best").iterdir()
                    if p.name.isdigit())
    outputs = []
    for i, weights in enumerate((run, run / "checkpoints", run / "checkpoints/model",
                                 run / f"checkpoints/best/{best_step}",
                                 run / "checkpoints/latest")):
        out = tmp_path / f"out{i}"
        cli.main(["explain", str(image), "--weights", str(weights), "--method", "gradcam",
                  "--out", str(out)])
        outputs.append((json.loads((out / "predictions.json").read_text())["images"][0]
                        ["predictions"], np.load(out / "img_gradcam.npy")))
    for preds, heat in outputs[1:]:
        assert preds == outputs[0][0]
        np.testing.assert_array_equal(heat, outputs[0][1])


def test_a_folder_that_is_no_model_fails_with_what_was_found(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "best" / "12").mkdir(parents=True)
    image = _new_image(tmp_path / "img.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["explain", str(image), "--weights", str(tmp_path / "run"),
                  "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds training-state checkpoints (best/ (steps 12))" in err
    assert "Rerun the same training command" in err
    assert "for a torchvision weights file use" not in err  # the old, wrong fix
    assert not (tmp_path / "out").exists()
