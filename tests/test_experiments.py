"""End-to-end tests of experiments.ham10000 / experiments.aptos2019 on tiny synthetic
configurations, option parsing, and the fail-fast checks on bad options."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from experiments import aptos2019, common, ham10000
from jaxcam import metrics

TINY = ["--num-images", "40", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
        "--num-figures", "2", "--num-gif", "3", "--no-progress"]


def _check_run(out, methods, has_masks=True):
    """The files exist and the numbers in metrics.json and report.md agree with each other."""
    for name in ("report.md", "metrics.json", "confusion_matrix.png", "training_curves.png",
                 "explanations/test_000.png", "explanations/test_001.png",
                 "explanations.gif"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["synthetic"] is True
    n_test = m["data"]["split_sizes"]["test"]
    n_train = m["data"]["split_sizes"]["train"]
    for split, n in (("test", n_test), ("train", n_train)):
        r = m[split]
        cm = np.asarray(r["confusion_matrix"])
        assert cm.sum() == n == r["total"]
        assert r["accuracy"] == pytest.approx(np.trace(cm) / n)
        assert r["per_class"]["support"] == cm.sum(1).tolist()
        # recompute precision / recall / kappa from the confusion matrix alone
        tp = np.diag(cm)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(cm.sum(1) > 0, tp / cm.sum(1), 0.0)
            precision = np.where(cm.sum(0) > 0, tp / cm.sum(0), 0.0)
        np.testing.assert_allclose(r["per_class"]["recall"], recall)
        np.testing.assert_allclose(r["per_class"]["precision"], precision)
        y_true = np.repeat(np.arange(len(cm)), cm.sum(1))
        y_pred = np.concatenate([np.repeat(np.arange(len(cm)), row) for row in cm])
        kappa = metrics.quadratic_weighted_kappa(y_true, y_pred, len(cm))
        assert r["kappa"] == pytest.approx(kappa)
    assert sum(m["data"]["train_class_counts"]) == n_train
    assert len(m["training"]["history"]) == 1
    ex = m["explanations"]
    assert ex["count"] == n_test
    assert ex["methods"] == list(methods)
    per = ex["metrics"]["per_method"]
    assert list(per) == list(methods)
    for row in per.values():
        assert 0.0 <= row["average_drop"] <= 1.0
        if has_masks:
            assert 0.0 <= row["pointing_game"] <= 1.0
            assert 0.0 <= row["energy_pointing_game"] <= 1.0
    if has_masks:
        assert 0.0 < ex["metrics"]["random_baseline_pointing"] < 1.0
    agr = ex["metrics"]["agreement"]
    assert agr["agree_count"] + agr["disagree_count"] == n_test
    assert len(agr["pairs"]) == len(methods) * (len(methods) - 1) // 2
    with Image.open(out / "explanations.gif") as gif:
        assert gif.n_frames == min(3, n_test)
    report = (out / "report.md").read_text()
    assert "Synthetic data" in report
    assert f"| test accuracy | {100 * m['test']['accuracy']:.2f}% |" in report
    assert f"| test quadratic weighted kappa | {m['test']['kappa']:.3f} |" in report
    assert "reference" not in report.split("## Classification")[1].split("\n")[2]
    return m


@pytest.mark.slow
def test_ham10000_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "ham"
    assert ham10000.main([*TINY, "--out", str(out)]) == 0
    assert "SYNTHETIC lesion set" in capsys.readouterr().out
    m = _check_run(out, ham10000.SPEC.methods)
    assert m["headline"] == {"accuracy": m["test"]["accuracy"]}
    assert m["training"]["resumed_at_step"] is None


def test_explained_layer_is_the_default_unless_its_map_is_coarser_than_4x4():
    import jax

    import jaxcam

    model = jaxcam.models.resnet50(num_classes=4)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image_size=64))
    # layer4 is 7x7 at 224 px, 2x2 at 64 px (layer3 is 4x4 there), 3x3 at 96 px (layer3 6x6)
    assert common.explained_layer(model, variables, 224, None) == "layer4"
    assert common.explained_layer(model, variables, 64, None) == "layer3"
    assert common.explained_layer(model, variables, 96, None) == "layer3"
    assert common.explained_layer(model, variables, 64, "layer4.1") == "layer4.1"
    # CAM moves to the GAP + dense layer; every other method stays at the explained layer
    methods, skipped = common.available_methods(ham10000.SPEC.methods, model, variables,
                                                 "layer3")
    assert methods == {label: ("layer4" if label == "CAM" else "layer3")
                       for label in ham10000.SPEC.methods}
    assert skipped == {}
    vgg = jaxcam.models.vgg19(num_classes=4)
    v_vgg = jax.eval_shape(lambda: vgg.init(jax.random.PRNGKey(0), image_size=64))
    assert common.explained_layer(vgg, v_vgg, 64, None) == "features.35"  # 4x4 at 64 px
    methods, skipped = common.available_methods(ham10000.SPEC.methods, vgg, v_vgg,
                                                 "features.35")
    assert "CAM" not in methods and "global-average-pool + dense" in skipped["CAM"]


@pytest.mark.slow
def test_aptos2019_tiny_end_to_end(tmp_path):
    out = tmp_path / "aptos"
    assert aptos2019.main([*TINY, "--arch", "resnet50", "--out", str(out)]) == 0
    m = _check_run(out, aptos2019.SPEC.methods)
    assert m["headline"] == {"kappa": m["test"]["kappa"]}


def test_data_dir_switches_to_reference_defaults():
    cfg = common.parse_config(ham10000.Ham10000Config, ["--data-dir", "/x"],
                              ham10000.REAL_DEFAULTS, "t")
    assert (cfg.arch, cfg.image_size, cfg.epochs, cfg.data_dir) == ("resnet50", 224, 10, "/x")
    cfg = common.parse_config(ham10000.Ham10000Config, ["--data-dir", "/x", "--epochs", "2"],
                              ham10000.REAL_DEFAULTS, "t")
    assert cfg.epochs == 2 and cfg.image_size == 224
    bare = common.parse_config(ham10000.Ham10000Config, [], ham10000.REAL_DEFAULTS, "t")
    assert bare == ham10000.Ham10000Config() and bare.synthetic
    assert common.parse_config(ham10000.Ham10000Config, ["--class-weighting"], {},
                               "t").class_weighting is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data-dir", "/nonexistent/ham"], "--data-dir '/nonexistent/ham' does not exist"),
        (["--arch", "resnet18"], "unknown --arch 'resnet18'; choose one of resnet50, vgg19"),
        (["--batch-size", "64", "--num-images", "40"], "--batch-size 64 is larger than the "
         "dataset \\(40 images\\)"),
        (["--pretrained", "/nonexistent.pth"], "--pretrained '/nonexistent.pth' is not a file"),
        (["--image-size", "16"], "--image-size must be >= 32"),
    ],
)
def test_bad_options_fail_fast(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert ham10000.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not (out / "tfds").exists() and not (out / "checkpoints").exists()


def test_unwritable_output_dir_fails_fast(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert aptos2019.main(["--out", str(blocker / "run")]) == 2
    assert "is not writable" in capsys.readouterr().err
    with pytest.raises(ValueError, match="choose another --out"):
        common.validate(ham10000.Ham10000Config(out=str(blocker / "run")))
