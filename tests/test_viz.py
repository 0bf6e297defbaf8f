"""jaxcam.viz: overlay arithmetic, signed colours, figure contents, GIF files."""

import matplotlib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from jaxcam import viz


def _image(h=16, w=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _heat(h=16, w=20, seed=1):
    return np.random.default_rng(seed).random((h, w))


# ------------------------------------------------------------------ overlay


@pytest.mark.parametrize("cmap", ["jet", "viridis", matplotlib.colormaps["magma"]])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_overlay_is_the_alpha_blend_of_image_and_colormap(cmap, alpha):
    image, heat = _image(), _heat()
    colours = (matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap)(heat)[..., :3]
    expected = np.round(((1 - alpha) * (image / 255.0) + alpha * colours) * 255).astype(np.uint8)
    out = viz.overlay(image, heat, cmap=cmap, alpha=alpha)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, expected)


def test_overlay_endpoints_and_float_images():
    image, heat = _image(), _heat()
    np.testing.assert_array_equal(viz.overlay(image, heat, alpha=0.0), image)
    np.testing.assert_array_equal(viz.overlay(image, heat, alpha=1.0), viz.colorize(heat))
    np.testing.assert_array_equal(
        viz.overlay(image / 255.0, heat, alpha=0.4), viz.overlay(image, heat, alpha=0.4)
    )
    # Out-of-range heat is clipped, not wrapped.
    np.testing.assert_array_equal(viz.colorize(heat * 3 - 1), viz.colorize(np.clip(heat * 3 - 1,
                                                                                    0, 1)))


def test_overlay_is_rgb_not_bgr():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    hot = viz.overlay(red, np.ones((4, 4)), cmap="jet", alpha=0.5)
    # jet(1) is dark red (0.5, 0, 0): red channel stays high, blue stays 0.
    np.testing.assert_array_equal(hot[0, 0], [191, 0, 0])
    cold = viz.colorize(np.zeros((2, 2)), cmap="jet")  # jet(0) is dark blue
    assert cold[0, 0, 2] > 100 and cold[0, 0, 0] == 0


def test_grayscale_images_are_shown_in_gray():
    gray = _image()[..., 0]
    np.testing.assert_array_equal(
        viz.overlay(gray, _heat(), alpha=0.0), np.repeat(gray[..., None], 3, axis=-1)
    )


def test_small_maps_are_resized_to_the_image():
    image = _image()
    constant = np.full((4, 5), 0.25)
    np.testing.assert_array_equal(
        viz.overlay(image, constant), viz.overlay(image, np.full((16, 20), 0.25))
    )
    np.testing.assert_allclose(viz.resize_map(constant, (16, 20)), 0.25, atol=1e-7)


def test_overlay_errors():
    image, heat = _image(), _heat()
    with pytest.raises(ValueError, match=r"alpha \(heatmap opacity\) must be in \[0, 1\]"):
        viz.overlay(image, heat, alpha=1.5)
    with pytest.raises(ValueError, match="heatmap contains NaN or inf"):
        viz.colorize(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="map contains NaN or inf"):
        viz.overlay(image, np.full((2, 2), np.inf))
    with pytest.raises(ValueError, match="unknown colormap 'jett'"):
        viz.overlay(image, heat, cmap="jett")
    with pytest.raises(ValueError, match=r"expected an RGB image \(H, W, 3\)"):
        viz.overlay(np.zeros((4, 4, 2)), heat)
    with pytest.raises(ValueError, match=r"map must have shape \(H, W\)"):
        viz.overlay(image, heat[None])


# ------------------------------------------------------------------ signed maps


def test_signed_colorize_endpoints():
    m = np.array([[1.0, -1.0, 0.0, 0.5]])
    out = viz.signed_colorize(m, positive=(1.0, 0.0, 0.0), negative=(0.0, 0.0, 1.0))
    np.testing.assert_array_equal(
        out[0], [[255, 0, 0], [0, 0, 255], [255, 255, 255], [255, 128, 128]]
    )


def test_signed_overlay_leaves_zero_evidence_untouched():
    image = _image()
    m = np.zeros((16, 20))
    m[:4] = 1.0
    m[4:8] = -0.5
    out = viz.signed_overlay(image, m, positive=(1, 0, 0), negative=(0, 0, 1), alpha=0.8)
    np.testing.assert_array_equal(out[8:], image[8:])
    red = np.round((0.2 * image[:4] / 255 + 0.8 * np.array([1, 0, 0])) * 255)
    blue = np.round((0.6 * image[4:8] / 255 + 0.4 * np.array([0, 0, 1])) * 255)
    np.testing.assert_array_equal(out[:4], red)
    np.testing.assert_array_equal(out[4:8], blue)


def test_signed_map_range_is_checked():
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*scale_signed"):
        viz.signed_colorize(np.array([[2.0, 0.0]]))


@settings(max_examples=20, deadline=None)
# subnormal inputs excluded: m / max|m| of a subnormal m underflows to 0 in IEEE
# arithmetic (5e-324 / 2 == 0), which no division-based scaling can avoid
@given(arrays(np.float64, (3, 4), elements=st.floats(-1e3, 1e3, allow_subnormal=False)))
def test_scale_signed_keeps_signs_and_ratios(m):
    s = viz.scale_signed(m)
    peak = np.abs(m).max()
    if peak == 0:
        np.testing.assert_array_equal(s, 0)
        return
    assert np.abs(s).max() == pytest.approx(1.0)
    np.testing.assert_array_equal(np.sign(s), np.sign(m))
    np.testing.assert_allclose(s * peak, m, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ figures


def _panel(ax):
    return np.asarray(ax.get_images()[0].get_array())


def test_method_grid_panels_are_the_overlays():
    images = np.stack([_image(seed=0), _image(seed=1)])
    maps = {"gradcam": np.stack([_heat(seed=2), _heat(seed=3)]),
            "gradcam++": np.stack([_heat(seed=4), _heat(seed=5)])}
    fig = viz.method_grid(images, maps, cmap="viridis", alpha=0.6,
                          row_titles=["cat (90%)", "dog (55%)"], title="t")
    axes = np.asarray(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == ["image", "gradcam", "gradcam++"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["cat (90%)", "dog (55%)"]
    assert fig.get_suptitle() == "t"
    for i in range(2):
        np.testing.assert_array_equal(_panel(axes[i, 0]), images[i])
        for j, name in enumerate(maps, start=1):
            np.testing.assert_array_equal(
                _panel(axes[i, j]), viz.overlay(images[i], maps[name][i], "viridis", 0.6)
            )


def test_method_grid_single_image_and_shape_errors():
    fig = viz.method_grid(_image(), {"a": _heat()}, show_original=False)
    assert len(fig.axes) == 1
    np.testing.assert_array_equal(_panel(fig.axes[0]), viz.overlay(_image(), _heat()))
    with pytest.raises(ValueError, match=r"map 'a' has shape \(2, 16, 20\); expected"):
        viz.method_grid(_image(), {"a": np.zeros((2, 16, 20))})
    with pytest.raises(ValueError, match="got 1 row titles for 2 images"):
        viz.method_grid(np.stack([_image()] * 2), {"a": np.zeros((2, 16, 20))},
                        row_titles=["x"])


def test_side_by_side_panels():
    image, heat = _image(), _heat()
    fig = viz.side_by_side(image, heat, cmap="jet", alpha=0.5, title="melanoma")
    panels = [ax for ax in fig.axes if ax.get_images()][:3]
    assert [ax.get_title() for ax in panels] == ["image", "heatmap", "overlay"]
    np.testing.assert_array_equal(_panel(panels[0]), image)
    np.testing.assert_allclose(_panel(panels[1]), heat)
    assert panels[1].get_images()[0].get_clim() == (0.0, 1.0)
    np.testing.assert_array_equal(_panel(panels[2]), viz.overlay(image, heat))


def test_figure_rendering_and_saving(tmp_path):
    fig = viz.side_by_side(_image(), _heat(), panel_size=1.0)
    arr = viz.figure_to_array(fig)
    w, h = fig.get_size_inches() * fig.dpi
    assert arr.shape == (round(h), round(w), 3) and arr.dtype == np.uint8
    path = viz.save_figure(fig, tmp_path / "sub" / "fig.png", dpi=50)
    with Image.open(path) as saved:
        assert saved.size == (round(w / fig.dpi * 50), round(h / fig.dpi * 50))


def test_save_image_writes_rgb(tmp_path):
    image = _image()
    viz.save_image(image, tmp_path / "o.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), image)


# ------------------------------------------------------------------ GIF


def test_caption_frame_keeps_the_frame_and_adds_text():
    frame = _image(32, 48)
    out = viz.caption_frame(frame, "epoch 12", height=16)
    assert out.shape == (48, 48, 3)
    np.testing.assert_array_equal(out[:32], frame)
    strip = out[32:]
    assert strip.min() < 100  # text drawn in black
    assert (strip == 255).all(axis=-1).mean() > 0.5  # on a white strip


def test_save_gif_frames_durations_and_captions(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [np.tile(np.array(c, np.uint8), (20, 30, 1)) for c in colours]
    path = viz.save_gif(tmp_path / "a.gif", frames, duration_ms=250)
    with Image.open(path) as gif:
        assert gif.n_frames == 3 and gif.info["loop"] == 0
        for k, c in enumerate(colours):
            gif.seek(k)
            assert gif.info["duration"] == 250
            np.testing.assert_array_equal(np.asarray(gif.convert("RGB"))[5, 5], c)
    viz.save_gif(tmp_path / "c.gif", frames, captions=["a", "b", "c"])
    with Image.open(tmp_path / "c.gif") as gif:
        assert gif.size[0] == 30 and gif.size[1] > 20
    with pytest.raises(ValueError, match="got 2 captions for 3 frames"):
        viz.save_gif(tmp_path / "x.gif", frames, captions=["a", "b"])
    with pytest.raises(ValueError, match="all GIF frames must have one shape"):
        viz.save_gif(tmp_path / "x.gif", [frames[0], frames[1][:10]])
    with pytest.raises(ValueError, match="at least one frame"):
        viz.save_gif(tmp_path / "x.gif", [])
    assert not (tmp_path / "x.gif").exists()


# ------------------------------------------------------------------ report figures


def test_signed_map_sign_follows_group():
    heat = np.array([[0.0, 0.5], [1.0, 0.25]])
    np.testing.assert_array_equal(viz.signed_map(heat, True), heat)
    np.testing.assert_array_equal(viz.signed_map(heat, False), -heat)


def test_explanation_panels_draw_each_map_its_overlay_and_the_signed_overlay():
    image = _image(16, 16) / 255.0
    maps = {"A": _heat(16, 16, seed=2), "B": _heat(16, 16, seed=3)}
    mask = np.zeros((16, 16))
    mask[4:9, 4:9] = 1
    fig = viz.explanation_panels(image, maps, mask=mask, positive=False, title="t")
    axes = np.asarray(fig.axes).reshape(3, 3)
    assert [axes[0, j].get_title() for j in range(3)] == ["original", "A", "B"]
    assert fig._suptitle.get_text() == "t"
    for j, heat in enumerate(maps.values(), start=1):
        np.testing.assert_array_equal(axes[0, j].images[0].get_array(), viz.colorize(heat))
        np.testing.assert_array_equal(axes[1, j].images[0].get_array(),
                                      viz.overlay(image, heat))
        np.testing.assert_array_equal(axes[2, j].images[0].get_array(),
                                      viz.signed_overlay(image, -heat))  # benign: blue
    assert axes[1, 0].get_title() == "lesion mask" and axes[1, 0].collections  # the contour
    two_rows = viz.explanation_panels(image, maps)
    assert len(two_rows.axes) == 6 and not np.asarray(two_rows.axes)[3].images


def test_confusion_figure_shows_the_counts_with_labelled_axes():
    m = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 4]])
    fig = viz.confusion_figure(m, ["a", "b", "c"], "test")
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), m)
    assert [t.get_text() for t in ax.texts] == [str(v) for v in m.ravel()]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("predicted", "true", "test")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"confusion matrix \(3, 3\) does not match 2 class"):
        viz.confusion_figure(m, ["a", "b"])


def test_training_curves_plot_the_history():
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 2 / e, "train_accuracy": 0.1 * e,
                "val_accuracy": 0.2 * e, "val_balanced_accuracy": 0.15 * e} for e in (1, 2, 3)]
    loss, acc = viz.training_curves_figure(history).axes
    assert (loss.get_title(), acc.get_title(), loss.get_xlabel()) == ("loss", "accuracy", "epoch")
    got = {(ax.get_title(), line.get_label()): list(line.get_ydata())
           for ax in (loss, acc) for line in ax.get_lines()}
    assert got == {("loss", "train"): [1.0, 0.5, 1 / 3], ("loss", "validation"): [2.0, 1.0, 2 / 3],
                   ("accuracy", "train"): [0.1, 0.2, 0.1 * 3],
                   ("accuracy", "validation"): [0.2, 0.4, 0.2 * 3],
                   ("accuracy", "validation (balanced)"): [0.15, 0.3, 0.15 * 3]}


def test_grouped_bar_figure_bar_heights_and_labels():
    rows = {"Grad-CAM": {"p": 10.0, "q": 20.0}, "CAM": {"p": 30.0, "q": 40.0}}
    fig = viz.grouped_bar_figure(rows, {"p": "pointing", "q": "energy"}, ylabel="%",
                                 ylim=(0, 100))
    ax = fig.axes[0]
    assert [b.get_height() for b in ax.patches] == [10.0, 30.0, 20.0, 40.0]  # series by series
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["pointing", "energy"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Grad-CAM", "CAM"]
    assert ax.get_ylabel() == "%" and ax.get_ylim() == (0.0, 100.0)


def test_overlay_pair_is_the_image_beside_its_overlay():
    image, heat = _image(16, 16), _heat(16, 16)
    pair = viz.overlay_pair(image, heat, size=16)
    assert pair.shape == (16, 32, 3) and pair.dtype == np.uint8
    np.testing.assert_array_equal(pair[:, :16], image)  # resizing 32x16 -> 32x16: identity
    np.testing.assert_array_equal(pair[:, 16:], viz.overlay(image, heat))
    signed = viz.overlay_pair(image, heat, positive=True, size=16)
    np.testing.assert_array_equal(signed[:, 16:], viz.signed_overlay(image, heat))
