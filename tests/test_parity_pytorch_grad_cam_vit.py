"""First-order maps on a ViT against pytorch-grad-cam, same random weights and inputs.

pytorch-grad-cam explains a ViT through a ``reshape_transform`` (its tutorial's: drop
the class token, reshape the ``g*g`` patch tokens row-major to ``(B, D, g, g)``) at
``model.encoder.layers[-1].ln_1``, the last block's first LayerNorm; jaxcam's default
layer is the same module and its token-to-grid reshape is the same. Its hooks read the
gradient of the logit with respect to the LayerNorm's output with the residual stream
that bypasses the norm held fixed, as jaxcam's ``head(v, A, layer, x=images)`` does.

Model: torchvision's ``VisionTransformer`` at ViT-Ti widths (D 192, 3 heads, 12 blocks,
MLP 768, 16 px patches) at 224 px (a 14x14 grid: torchvision's ViT accepts only its
configured size), every parameter randomised (``tests/test_vit.py``), loaded with
``jaxcam.weights.load_torchvision(state_dict, "vit_ti_16")``. Maps: both libraries
apply a ReLU, min-max normalise on the grid and upsample bilinearly to 224 px (cv2
against jaxcam's half-pixel bilinear resize); compared to 2e-3 absolute.
"""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pgc = pytest.importorskip("pytorch_grad_cam")

import jaxcam  # noqa: E402
from tests.test_vit import randomize  # noqa: E402

SIZE = 224
GRID = SIZE // 16
CLASSES = [1, 4]
LAYER = "encoder.layers.encoder_layer_11.ln_1"
PAIRS = [("gradcam", "GradCAM"), ("xgradcam", "XGradCAM"), ("hirescam", "HiResCAM"),
         ("layercam", "LayerCAM")]


def reshape_transform(tensor):
    """pytorch-grad-cam's ViT recipe: ``(B, 1 + g*g, D)`` tokens -> ``(B, D, g, g)``."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), GRID, GRID, tensor.size(2))
    return result.permute(0, 3, 1, 2)


@functools.cache
def setup():
    torch.manual_seed(0)
    net = torchvision.models.vision_transformer.VisionTransformer(
        image_size=SIZE, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192,
        mlp_dim=768, num_classes=6)
    randomize(net, seed=5)
    model, variables = jaxcam.weights.load_torchvision(net.state_dict(), "vit_ti_16")
    x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    return net, model, variables, x


@functools.cache
def ours():
    _, model, variables, x = setup()
    assert model.default_layer == LAYER
    return jaxcam.explain(model, variables, x, method=[m for m, _ in PAIRS],
                          class_idx=CLASSES, target="logit")


def theirs(their_class: str) -> np.ndarray:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net, _, _, x = setup()
    cam = getattr(pgc, their_class)(model=net, target_layers=[net.encoder.layers[-1].ln_1],
                                    reshape_transform=reshape_transform)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    return cam(input_tensor=xt, targets=[ClassifierOutputTarget(c) for c in CLASSES])


@pytest.mark.parametrize("name,their_class", PAIRS)
def test_vit_maps_equal_pytorch_grad_cam(name, their_class):
    ex = ours()[name]
    ref = theirs(their_class)
    maps = np.asarray(ex.maps)
    assert maps.shape == ref.shape == (2, SIZE, SIZE)
    assert np.asarray(ex.raw).shape == (2, GRID, GRID)
    for b in range(2):
        if bool(ex.degenerate[b]):  # no positive evidence: both maps are all zero
            assert np.abs(ref[b]).max() < 1e-6, (name, b)
            continue
        assert maps[b].std() > 0.05  # a real map
        np.testing.assert_allclose(maps[b], ref[b], atol=2e-3, err_msg=f"{name} image {b}")


def test_vit_closed_form_gradcam_pp_equals_pytorch_grad_cams_formula_without_its_eps():
    """Closed-form Grad-CAM++ on a ViT is pytorch-grad-cam's ``GradCAMPlusPlus`` (its
    hooks, ``reshape_transform``, ReLU, normalisation and resize) once its ``eps = 1e-6``
    is removed from the alpha denominator ``2 g^2 + sum(A) g^3``.

    That eps is why the two libraries' ViT Grad-CAM++ maps differ (0.56 and 0.22 here):
    on this ViT the logit's gradients are small (median ``g^2`` ~8e-9), so eps outweighs
    the denominator at almost every position with ``g > 0`` and pytorch-grad-cam's alpha
    becomes ``g^2 / eps`` instead of ~1/2. Checked first, so the comparison below is not
    vacuous. (On ResNet-50 the parity test scales the classifier instead, which makes the
    eps negligible; on a ViT that scaling also makes ``sum(A) g^3`` cancel ``2 g^2``
    (signed LayerNorm outputs), and the maps become ill-conditioned in float32.) Neither
    sign rule matters here: no denominator at ``g > 0`` is negative.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class GradCAMPlusPlusNoEps(pgc.GradCAMPlusPlus):
        def get_cam_weights(self, input_tensor, target_layers, target_category,
                            activations, grads):
            g2, g3 = grads**2, grads**3
            den = 2 * g2 + activations.sum(axis=(2, 3), keepdims=True) * g3
            alpha = np.where((grads != 0) & (den != 0), g2 / np.where(den != 0, den, 1), 0)
            return (np.maximum(grads, 0) * alpha).sum(axis=(2, 3))

    net, model, variables, x = setup()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    targets = [ClassifierOutputTarget(c) for c in CLASSES]
    layer = [net.encoder.layers[-1].ln_1]
    cam = pgc.GradCAMPlusPlus(model=net, target_layers=layer,
                              reshape_transform=reshape_transform)
    with_eps = cam(input_tensor=xt, targets=targets)
    g = cam.activations_and_grads.gradients[0].numpy().copy()
    A = cam.activations_and_grads.activations[0].numpy().copy()
    den = 2 * g**2 + A.sum(axis=(2, 3), keepdims=True) * g**3
    live = g > 0
    assert np.mean(np.abs(den[live]) < 1e-6) > 0.9, "eps no longer dominates: see docstring"
    assert not (den[live] < 0).any()
    no_eps = GradCAMPlusPlusNoEps(model=net, target_layers=layer,
                                  reshape_transform=reshape_transform)(input_tensor=xt,
                                                                       targets=targets)
    assert np.abs(with_eps - no_eps).max() > 0.1  # the eps is what differs
    ex = jaxcam.explain(model, variables, x, method="gradcam++", derivatives="closed_form",
                        class_idx=CLASSES)
    maps = np.asarray(ex.maps)
    for b in range(2):
        assert not bool(ex.degenerate[b]) and maps[b].std() > 0.05
        np.testing.assert_allclose(maps[b], no_eps[b], atol=2e-3, err_msg=f"image {b}")


def test_the_librarys_hook_helpers_are_pytorch_grad_cams_vit_recipe():
    """``jaxcam.weights.torchvision_module`` finds the module of a cut point by its name,
    and ``jaxcam.weights.vit_reshape_transform`` is the tutorial's reshape above (the
    benchmark and ``experiments.gradcampp_parity`` use both)."""
    net, model, _, _ = setup()
    assert jaxcam.weights.torchvision_module(net, LAYER) is net.encoder.layers[-1].ln_1
    resnet = torchvision.models.resnet50(weights=None)
    assert jaxcam.weights.torchvision_module(resnet, "layer4.2") is resnet.layer4[2]
    tokens = torch.randn(2, 1 + GRID * GRID, 192)
    assert torch.equal(jaxcam.weights.vit_reshape_transform(tokens), reshape_transform(tokens))
