"""jaxcam.io: every file format and pixel mode comes back as upright uint8 RGB."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxcam.io import inputs_to_uint8, load_image, load_images
from jaxcam.preprocessing import Preprocessing, denormalize, preprocess


def _rgb(h=12, w=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", ["png", "bmp", "tiff"])
def test_lossless_formats_round_trip_exactly(tmp_path, ext):
    image = _rgb()
    path = tmp_path / f"x.{ext}"
    Image.fromarray(image).save(path)
    out = load_image(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, image)


def test_jpeg_is_rgb_not_bgr(tmp_path):
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0] = 230  # pure red
    image[..., 2] = 20
    Image.fromarray(image).save(tmp_path / "red.jpg", quality=95)
    out = load_image(tmp_path / "red.jpg")
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - image).max() <= 3
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 40


def test_grayscale_is_repeated_to_three_channels(tmp_path):
    gray = _rgb()[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))


def test_one_bit_image(tmp_path):
    bits = _rgb()[..., 0] > 127
    Image.fromarray(bits).save(tmp_path / "b.png")
    out = load_image(tmp_path / "b.png")
    np.testing.assert_array_equal(out[..., 1], np.where(bits, 255, 0))


def test_rgba_is_composited_on_white(tmp_path):
    rgb = _rgb(4, 5)
    alpha = np.random.default_rng(1).integers(0, 256, (4, 5), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png").astype(float)
    a = alpha[..., None] / 255.0
    expected = rgb * a + 255.0 * (1 - a)
    assert np.abs(out - expected).max() <= 1.0
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent -> white
    np.testing.assert_array_equal(out[0, 1], rgb[0, 1])  # opaque -> unchanged


def test_gray_alpha_and_palette_transparency(tmp_path):
    gray = np.array([[10, 200]], np.uint8)
    alpha = np.array([[255, 0]], np.uint8)
    Image.fromarray(np.dstack([gray, alpha]), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png"), [[[10] * 3, [255] * 3]])

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=1)
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), [[[0, 0, 255], [255] * 3]])


@pytest.mark.parametrize("ext", ["png", "tiff"])
def test_16bit_grayscale_is_scaled_with_rounding(tmp_path, ext):
    values = np.array([[0, 128, 129, 257, 32896, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / f"d.{ext}")
    out = load_image(tmp_path / f"d.{ext}")
    expected = np.round(values / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(expected, [[0, 0, 1, 1, 128, 255]])


def _png16_rgb(path, arr):
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_rgb_png(tmp_path):
    arr = np.random.default_rng(2).integers(0, 65536, (3, 4, 3)).astype(np.uint16)
    arr[0, 0] = [0, 65535, 32768]
    _png16_rgb(tmp_path / "rgb16.png", arr)
    out = load_image(tmp_path / "rgb16.png")
    assert np.abs(out.astype(int) - np.round(arr / 257.0)).max() <= 1
    np.testing.assert_array_equal(out[0, 0], [0, 255, 128])


def test_float_image_in_unit_range_and_rejected_outside(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tiff")
    np.testing.assert_array_equal(load_image(tmp_path / "f.tiff")[..., 0], [[0, 128, 255]])
    Image.fromarray(values * 300, mode="F").save(tmp_path / "big.tiff")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        load_image(tmp_path / "big.tiff")


def test_32bit_integer_outside_16bit_range_is_rejected(tmp_path):
    Image.fromarray(np.array([[0, 70000]], np.int32), mode="I").save(tmp_path / "i.tiff")
    with pytest.raises(ValueError, match="outside the 16-bit range"):
        load_image(tmp_path / "i.tiff")


# EXIF orientation tag -> how a viewer shows the stored pixels (EXIF 2.3, tag 0x0112).
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.rot90(a[:, ::-1], k=1),  # mirror, then rotate 90 counter-clockwise
    6: lambda a: np.rot90(a, k=-1),  # rotate 90 degrees clockwise
    7: lambda a: np.rot90(a[:, ::-1], k=-1),  # mirror, then rotate 90 clockwise
    8: lambda a: np.rot90(a, k=1),  # rotate 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = _rgb(6, 10, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(
        load_image(tmp_path / "o.png"), ORIENTATIONS[orientation](stored)
    )


def test_exif_rotated_jpeg(tmp_path):
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = 255  # left half white, right half black
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "phone.jpg")
    assert out.shape == (32, 16, 3)  # upright: portrait
    assert out[:16].mean() > 240 and out[16:].mean() < 15  # left half became the top


def test_first_frame_of_an_animation(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(load_image(tmp_path / "anim.gif")[0, 0], [255, 0, 0])


def test_missing_directory_unreadable_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; check the path"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="is a directory, not an image file"):
        load_image(tmp_path)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image format Pillow recognises"):
        load_image(tmp_path / "text.png")
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="image data is corrupt"):
        load_image(tmp_path / "cut.png")


def test_load_images_matches_preprocess_and_shows_the_crop(tmp_path):
    a, b = _rgb(40, 56, seed=3), _rgb(32, 32, seed=4)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    prep = Preprocessing(image_size=32, resize_size=36)
    x, shown = load_images([tmp_path / "a.png", tmp_path / "b.png"], prep)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, np.stack([preprocess(a, prep), preprocess(b, prep)]))
    np.testing.assert_array_equal(
        shown, np.round(np.asarray(denormalize(x, prep)) * 255).astype(np.uint8)
    )
    # With no resize, the displayed pixels are the original ones, exactly.
    same = Preprocessing(image_size=32, resize_size=None)
    np.testing.assert_array_equal(inputs_to_uint8(preprocess(b, same), same), b)
