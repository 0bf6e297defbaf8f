"""Maps against pytorch-grad-cam (the library everyone uses) on the same random
torchvision ResNet-50 weights and inputs.

Grad-CAM++: pytorch-grad-cam adds ``eps = 1e-6`` to the alpha denominator
``2 g^2 + sum(A) g^3``; with random weights the median ``g^2`` is ~5e-8, so that
eps changes its maps by ~0.03 (measured, README). Scaling the classifier by 1000
makes ``g^2`` ~1e6 times larger and the eps negligible, and moves the logits to
~-3e4 (``exp(S_c)`` is 0 in float32: jaxcam's scale-free targets are needed).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pgc = pytest.importorskip("pytorch_grad_cam")

import jaxcam  # noqa: E402

SIZE = 160
CLASSES = [1, 4]


@pytest.fixture(scope="module")
def scaled_resnet():
    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=10).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["fc.weight"] *= 1000.0
    net.load_state_dict(state)
    model, variables = jaxcam.weights.load_torchvision(
        {k: v.numpy() for k, v in state.items()}, "resnet50")
    x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    return net, model, variables, x


def _theirs(net, cls, x):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = cls(model=net, target_layers=[net.layer4[-1]])
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    return cam(input_tensor=xt, targets=[ClassifierOutputTarget(c) for c in CLASSES])


@pytest.mark.slow
@pytest.mark.parametrize("name,their_class", [
    ("gradcam++", "GradCAMPlusPlus"), ("gradcam", "GradCAM"), ("xgradcam", "XGradCAM"),
    ("hirescam", "HiResCAM"), ("layercam", "LayerCAM")])
def test_maps_equal_pytorch_grad_cam(scaled_resnet, name, their_class):
    net, model, variables, x = scaled_resnet
    theirs = _theirs(net, getattr(pgc, their_class), x)
    kinds = ("closed_form", "exact") if name == "gradcam++" else ("exact",)
    for derivatives in kinds:
        ex = jaxcam.explain(model, variables, x, method=name, class_idx=CLASSES,
                            derivatives=derivatives)
        logits = np.asarray(ex.logits)[np.arange(2), CLASSES]
        assert np.all(np.abs(logits) > 1000)  # exp(S_c) is 0 or inf in float32 here
        ours = np.asarray(ex.maps)
        for b in range(2):
            if bool(ex.degenerate[b]):  # no positive evidence: both maps are all zero
                assert np.abs(theirs[b]).max() < 1e-6, (name, b)
                continue
            np.testing.assert_allclose(ours[b], theirs[b], atol=2e-3,
                                       err_msg=f"{name} {derivatives} image {b}")
