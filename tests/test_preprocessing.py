"""jaxcam.preprocessing against torchvision's evaluation transform (the reference)."""

import numpy as np
import pytest
import torch  # noqa: E402  (a test dependency: pip install .[test])
import torchvision.transforms as T  # noqa: E402
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from jaxcam.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    center_crop_offsets,
    denormalize,
    normalize,
    preprocess,
    resized_shape,
)


def _torchvision_eval(prep: Preprocessing):
    resize = prep.resize_size if prep.resize_size is not None else (prep.image_size,) * 2
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(prep.image_size),
            T.ToTensor(),
            T.Normalize(prep.mean, prep.std),
        ]
    )


def _smooth_image(rng, h, w):
    """A natural-ish uint8 image: smooth gradients plus texture plus noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(xx / 7.0 + c) * np.cos(yy / 11.0 - c) + rng.normal(0, 20, (h, w))
            for c in range(3)
        ],
        axis=-1,
    )
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "shape,prep",
    [
        ((300, 257, 3), Preprocessing()),  # portrait, odd crop margin (round vs floor)
        ((187, 411, 3), Preprocessing()),  # landscape, upsampling the short side
        ((97, 130, 3), Preprocessing.imagenet(64)),  # resize 73, crop 64: odd margins
        ((120, 90, 3), Preprocessing(image_size=48, resize_size=None)),  # plain resize
    ],
)
def test_uint8_matches_torchvision_exactly(shape, prep):
    """uint8 input: same PIL resize, same size/crop arithmetic -> equal up to float32."""
    img = _smooth_image(np.random.default_rng(0), shape[0], shape[1])
    ref = _torchvision_eval(prep)(Image.fromarray(img)).numpy().transpose(1, 2, 0)
    out = preprocess(img, prep)
    assert out.shape == ref.shape == (prep.image_size, prep.image_size, 3)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_float_input_close_to_torchvision():
    """Float [0, 1] input is resized without 8-bit arithmetic: within one grey level / std.

    PIL's 8-bit resize uses fixed-point filter weights and rounds to uint8
    (error up to ~1 grey level), the float path does not; so the bound is
    1 / 255 / min(std) ~ 0.0175 after normalising (measured max 0.0174 on this
    noisy image, mean 0.005). uint8 inputs take torchvision's own path (above).
    """
    img = _smooth_image(np.random.default_rng(1), 300, 257)
    prep = Preprocessing()
    ref = _torchvision_eval(prep)(Image.fromarray(img)).numpy().transpose(1, 2, 0)
    out = preprocess(img.astype(np.float32) / 255.0, prep)
    bound = 1.0 / 255 / min(IMAGENET_STD) + 1e-3
    diff = np.abs(out - ref)
    assert diff.max() <= bound
    assert diff.mean() < 0.5 * bound  # rounding error averages ~1/4 grey level


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(16, 2000),
    w=st.integers(16, 2000),
    image_size=st.integers(8, 256),
    extra=st.integers(0, 64),
)
def test_sizes_and_offsets_match_torchvision(h, w, image_size, extra):
    """resized_shape / center_crop_offsets are torchvision's (truncating, Python round)."""
    from torchvision.transforms import functional as F

    prep = Preprocessing(image_size=image_size, resize_size=image_size + extra)
    new_h, new_w = resized_shape(h, w, prep)
    assert [new_h, new_w] == F._compute_resized_output_size((h, w), [prep.resize_size])
    # CenterCrop's offsets, observed on a tensor whose values are their own coordinates.
    grid = torch.arange(new_h * new_w).reshape(1, new_h, new_w)
    crop = F.center_crop(grid, [image_size])
    top, left = divmod(int(crop[0, 0, 0]), new_w)
    assert center_crop_offsets(new_h, new_w, image_size) == (top, left)


def test_normalize_denormalize_round_trip():
    x01 = np.random.default_rng(2).uniform(0, 1, (4, 5, 3)).astype(np.float32)
    x = normalize(x01, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(x[..., 1], (x01[..., 1] - 0.456) / 0.224, rtol=1e-6)
    np.testing.assert_allclose(denormalize(x, Preprocessing()), x01, atol=1e-6)


def test_preprocessing_dict_round_trip_and_validation():
    prep = Preprocessing(image_size=96, resize_size=None, mean=(0.5, 0.5, 0.5), std=(0.2,) * 3)
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    assert Preprocessing.imagenet(224) == Preprocessing()
    with pytest.raises(ValueError, match="centre crop would not fit"):
        Preprocessing(image_size=224, resize_size=200)
