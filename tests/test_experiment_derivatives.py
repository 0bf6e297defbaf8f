"""experiments.derivatives: the statistics helpers, and the tiny configuration end to end."""

import json

import numpy as np
import pytest

from experiments import derivatives as study


def test_error_stats_and_map_agreement():
    truth = np.array([[1.0, -2.0, 4.0, 0.5]])
    got = truth + np.array([[0.0, 0.0, 0.4, 0.0]])
    s = study.error_stats(got, truth)
    assert s["max"] == pytest.approx(0.1) and s["median"] == 0.0
    # an all-zero truth is compared in absolute terms
    assert study.error_stats(np.full((1, 3), 0.5), np.zeros((1, 3)))["max"] == 0.5
    a = np.random.default_rng(0).random((2, 10, 10))
    same = study.map_agreement(a, a)
    assert same == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0),
                    "iou_top20": 1.0, "max_abs_diff": 0.0}
    flipped = study.map_agreement(a, 1.0 - a)
    assert flipped["pearson"] == pytest.approx(-1.0) and flipped["iou_top20"] == 0.0


def test_tiny_configuration_end_to_end(tmp_path):
    """ResNet-50 layer4 (piecewise-linear head), trained briefly here and at random init:
    exp through it must come out exact == closed form, and factored == taylor, at float32
    precision, for both."""
    study.main(["--tiny", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(m["arch"], m["layer"], m["init"]) for m in results["models"]] == [
        ("resnet50", "layer4", "trained"), ("resnet50", "layer4", "random")]
    assert 0.0 <= results["training"]["resnet50"]["val_accuracy"] <= 1.0
    assert (tmp_path / "train" / "resnet50" / "checkpoints").is_dir()
    checked = 0
    for layer in results["models"]:
        assert layer["certified"] is True
        exp = layer["targets"]["exp"]
        for engine in ("factored", "closed_form"):
            for quantity in ("D2", "D3", "alpha"):
                assert exp["errors"][engine][quantity]["max"] < 1e-4
        assert exp["maps"]["exact_vs_closed_form"]["max_abs_diff"] < 1e-4
        # softmax-type derivatives carry the factor p (1 - p) (and higher powers): when
        # the briefly trained model is confident (1 - p ~ 1e-5, which depends on the
        # trajectory of two Adam steps) they sit at float32 round-off and the float64
        # FD oracle refuses every coordinate. That row is then not evidence either way;
        # the random-init row (logits within a few units) must be, and is checked
        resolved = 1.0 - max(layer["class_probability"]) > 1e-3
        if layer["init"] == "random":
            assert resolved, layer["class_probability"]
        if not resolved:
            continue
        checked += 1
        softmax = layer["targets"]["softmax"]
        assert softmax["errors"]["factored"]["D2"]["max"] < 1e-3
        assert softmax["errors"]["nested_sum"]["D2"]["max"] > 1e-2  # the row-sum shortcut is off
        # float64 finite differences: every checked estimate was trusted, i.e. its
        # error bound is below FD_RTOL of the scale; taylor's own float64 error is
        # ~1e-15 of it, so the distance between the two is below twice FD_RTOL
        for target in ("exp", "softmax"):
            fd = layer["targets"][target]["finite_differences"]
            assert fd["checked"] == 2, fd  # fd_coords = 2 trusted coordinates found
            assert fd["tried"] == fd["checked"] + sum(fd["refused"].values())
            for n in (1, 2, 3):
                assert fd[f"D{n}_bound"] <= study.FD_RTOL
                assert fd[f"D{n}"]["max"] < 2 * study.FD_RTOL
    assert checked >= 1
    report = (tmp_path / "report.md").read_text()
    assert "| resnet50 | layer4 | random | exp | closed_form |" in report
    assert "| resnet50 | layer4 | trained | exp | closed_form |" in report
    assert "- resnet50: trained here 1 epoch(s) on 8 synthetic lesion images" in report
    # a rerun keeps every finished layer (resume) and reproduces the same numbers
    again = study.run(study.parse_args(["--tiny", "--out", str(tmp_path)]))
    assert again["models"] == results["models"]


def test_bad_options_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="--coords must be >= 1"):
        study.parse_args(["--coords", "0"])
    with pytest.raises(SystemExit, match="no such file"):
        study.parse_args(["--checkpoint", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="unknown architecture 'resnet18'"):
        study.parse_args(["--models", "resnet18:layer4"])
    with pytest.raises(SystemExit, match="use --inits random"):
        study.parse_args(["--num-classes", "7"])
    assert study.parse_args(["--num-classes", "7", "--inits", "random"]).num_classes == 7
    with pytest.raises(SystemExit, match="unknown architecture 'vit_l_16'; use one of "
                                         "resnet50, .*vit_b_16"):
        study.parse_args(["--models", "vit_l_16"])
    with pytest.raises(SystemExit, match="--image-size 100: vit_b_16 cuts images into 16 px"):
        study.parse_args(["--models", "vit_b_16:default", "--image-size", "100"])
    assert study.parse_args(["--models", "vit_ti_16:default", "--image-size", "32",
                             "--inits", "random"]).image_size == 32


def test_vit_layer_on_the_token_grid():
    """ViT-Ti/16 at 32 px (a 2x2 patch grid), random init, at its default layer (the last
    block's first LayerNorm, crossed by the residual stream): the head is smooth
    (GELU, softmax attention, LayerNorm), so no certificate and no ``factored``; the
    generic taylor ground truth agrees with float64 finite differences, the exact map
    (taylor through the model's row_head, the class token's path only) equals the one
    from generic taylor on every grid coordinate, and the closed form is not exact."""
    import jax
    import jax.numpy as jnp

    import jaxcam

    config = study.Config(models=("vit_ti_16:default",), targets=("softmax",), num_images=1,
                          image_size=32, coords=8, fd_coords=2, inits=("random",), plots=False,
                          progress=False)
    model = jaxcam.models.get("vit_ti_16", config.num_classes)
    variables = model.init(jax.random.PRNGKey(0), image_size=32)
    x = jnp.asarray(study._images(1, 32, 0))
    layer = model.resolve_layer(None)
    res = study.study_layer(model, variables, x, layer, config, np.random.default_rng(0))
    assert res["certified"] is False and res["activation_shape"] == [2, 2, 192]
    assert res["token_shape"] == [5, 192]  # the class token is not on the grid
    row = res["targets"]["softmax"]
    assert set(row["errors"]) == {"closed_form", "nested_sum"}
    fd = row["finite_differences"]
    assert fd["checked"] == 2, fd
    for n in (1, 2, 3):
        assert fd[f"D{n}_bound"] <= study.FD_RTOL
        assert fd[f"D{n}"]["max"] < 2 * study.FD_RTOL
    # the closed form e^S g^2, e^S g^3 is wrong through a smooth head: its D2 is off by
    # a large fraction of the largest true D2
    assert row["errors"]["closed_form"]["D2"]["median"] > 0.1
    assert row["maps"]["exact_vs_closed_form"]["max_abs_diff"] > 1e-3
    # row_head's exact derivatives == generic taylor over every grid coordinate
    A = model.features(variables, x, layer)
    cls = jnp.argmax(model.head(variables, A, layer, x=x), -1).astype(jnp.int32)
    assert model.row_head(variables, A, layer, x=x) is not None  # the fast path exists here
    generic = study.engine_fn(model, layer, x, cls, "taylor", "softmax", False,
                              row_head=False)(variables, A)
    for d_fast, d_generic in zip(row["_exact"], generic, strict=True):
        assert d_fast.shape == (1, 2, 2, 192)
        np.testing.assert_allclose(d_fast, d_generic, rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(d_generic).max()))
