"""``python -m experiments.gradcampp_parity``: what it prints is the measurement README
quotes (pytorch-grad-cam's Grad-CAM++ without its eps equals jaxcam's closed form)."""

import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("pytorch_grad_cam")

from experiments import gradcampp_parity  # noqa: E402


def _differences(text: str, pair: str) -> list[float]:
    line = next(ln for ln in text.splitlines() if ln.startswith(pair + ":"))
    return [float(v) for v in re.findall(r"[-+0-9.e]+", line.split("per image")[1])]


def test_small_resnet_run_prints_each_pair_and_the_eps_free_formula_matches(capsys):
    assert gradcampp_parity.main(["--image-size", "64", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "resnet50 (random torchvision init, seed 0), layer4, 64 px, 1 images" in out
    assert re.search(r"median g\^2 = [0-9.e+-]+ \(eps = 1e-6\)", out)
    (same,) = _differences(out, "its eps=0 formula vs jaxcam explain closed form")
    assert same < 1e-4
    (free,) = _differences(out, "its eps=0 formula vs jaxcam closed form without e^S_c")
    assert free < 1e-4
    (with_eps,) = _differences(out, "pytorch-grad-cam vs its eps=0 formula")
    (ours,) = _differences(out, "pytorch-grad-cam vs jaxcam explain closed form")
    assert abs(with_eps - ours) < 1e-4  # the whole difference is the eps


@pytest.mark.parametrize("argv, message", [
    (["--arch", "vit_b_16", "--image-size", "96"], "224 px only"),
    (["--batch", "0"], "--batch must be at least 1; got 0"),
    (["--image-size", "16"], "--image-size must be at least 32 px; got 16"),
    (["--arch", "alexnet"], "invalid choice: 'alexnet'"),
])
def test_bad_flags_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        gradcampp_parity.main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err
