"""``jaxcam explain --arch vit_ti_16`` on a torchvision-layout ViT-Ti file: the maps the
command writes are ``jaxcam.explain``'s in-process maps, for Grad-CAM and exact
Grad-CAM++ at the default layer (the last block's ``ln_1``).

Weights: torchvision's ``VisionTransformer`` at ViT-Ti widths (224 px, 14x14 position
embeddings) with every parameter randomised (``tests/test_vit.py``), saved as
``.safetensors``; explained at ``--image-size 48`` (position embeddings resampled to
3x3, a 3x3 map), so the one subprocess compiles little. With random weights a map may
be flat (no positive evidence); the test needs the flags to agree and each method to
have a real map.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

import jaxcam
from jaxcam.io import load_images
from jaxcam.preprocessing import Preprocessing
from tests.test_vit import randomize

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["gradcam", "gradcam++"]
SIZE = 48


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    tm = torchvision.models.vision_transformer.VisionTransformer(
        image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192,
        mlp_dim=768, num_classes=5)
    randomize(tm, seed=3)
    weights = d / "vit_ti_5.safetensors"
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(weights))
    paths = []
    for i, (h, w) in enumerate([(40, 50), (48, 48)]):
        small = np.random.default_rng(i).integers(0, 256, (4, 5, 3), dtype=np.uint8)
        paths.append(d / f"img{i}.png")
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(paths[-1])
    return weights, paths


def test_explain_vit_ti_subprocess_matches_the_library(files, tmp_path):
    weights, paths = files
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = ["explain", *paths, "--arch", "vit_ti_16", "--weights", weights,
            "--image-size", SIZE, "--method", "gradcam", "--method", "gradcam++", "--out", out]
    proc = subprocess.run([sys.executable, "-m", "jaxcam.cli", *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr

    bundle = jaxcam.load(weights, arch="vit_ti_16")
    assert bundle.model.arch == "vit_ti_16"
    # --image-size 48: the torchvision preprocessing scaled (resize 256/224 * 48 = 55)
    prep = dataclasses.replace(bundle.preprocessing, image_size=SIZE,
                               resize_size=round(SIZE * 256 / 224))
    summary = json.loads((out / "predictions.json").read_text())
    settings = summary["settings"]
    assert Preprocessing.from_dict(settings["preprocessing"]) == prep
    assert settings["layer"] == "encoder.layers.encoder_layer_11.ln_1"
    assert settings["methods"] == METHODS and settings["derivatives"] == "exact"
    x, _ = load_images(paths, prep)
    ref = jaxcam.explain(bundle.model, bundle.variables, x, method=METHODS)
    for m in METHODS:
        maps, raw = np.asarray(ref[m].maps), np.asarray(ref[m].raw)
        assert maps.shape == (2, SIZE, SIZE) and raw.shape == (2, 3, 3)
        assert maps.std() > 0.05  # real maps, not flat ones
        flat = [m in entry["explained"][0]["degenerate"] for entry in summary["images"]]
        assert flat == np.asarray(ref[m].degenerate).tolist()
        for i, p in enumerate(paths):
            np.testing.assert_allclose(np.load(out / f"{p.stem}_{m}.npy"), maps[i],
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.load(out / f"{p.stem}_{m}_raw.npy"), raw[i],
                                       rtol=1e-5, atol=1e-6 * float(np.abs(raw).max()))
    assert not np.allclose(ref["gradcam"].maps, ref["gradcam++"].maps, atol=1e-3)
