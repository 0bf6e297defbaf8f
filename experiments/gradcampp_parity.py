"""Why jaxcam's closed-form Grad-CAM++ differs from pytorch-grad-cam's, measured:
``python -m experiments.gradcampp_parity [--arch resnet50] [--image-size 224] [--batch 2]``.

A random torchvision model (seed 0, 1000 classes, jaxcam's default layer: ResNet-50
``layer4``; a ViT's last block's ``ln_1``, through pytorch-grad-cam's
``reshape_transform``, at the ViT's own 224 px) and random images; three maps per
image: pytorch-grad-cam 1.5.7's ``GradCAMPlusPlus``
(``alpha = g^2 / (2 g^2 + sum(A) g^3 + eps)``, ``eps = 1e-6``), the same class with
``eps = 0`` (only zero denominators set to 0), and
``jaxcam.explain(..., method="gradcam++", derivatives="closed_form")`` on the same
weights (``jaxcam.weights.random_torchvision``); on CNNs also jaxcam's closed form
without the factor ``e^{S_c}`` (``jaxcam.methods`` on ``D_n = g^n``). Prints the
largest map difference of each pair and the size of ``g^2`` next to ``eps``.
"""

from __future__ import annotations

import argparse

import numpy as np

ARCHS = ("resnet50", "vgg19", "efficientnet_b0", "vit_b_16")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.gradcampp_parity")
    p.add_argument("--arch", default="resnet50", choices=ARCHS)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args(argv)
    if a.batch < 1:
        p.error(f"--batch must be at least 1; got {a.batch}")
    if a.image_size < 32:
        p.error(f"--image-size must be at least 32 px; got {a.image_size}")
    vit = a.arch.startswith("vit")
    if vit and a.image_size != 224:
        p.error("torchvision's ViT-B/16 takes 224 px only; drop --image-size")

    import jax
    import jax.numpy as jnp
    import torch
    from pytorch_grad_cam import GradCAMPlusPlus

    import jaxcam
    from jaxcam import methods

    class GradCAMPlusPlusEps0(GradCAMPlusPlus):
        """pytorch-grad-cam's weights with eps = 0 (zero denominators -> alpha 0)."""

        def get_cam_weights(self, input_tensor, target_layers, target_category, activations,
                            grads):
            g2, g3 = grads**2, grads**3
            s = activations.sum(axis=(2, 3), keepdims=True)
            den = 2 * g2 + s * g3
            aij = np.where((grads != 0) & (den != 0), g2 / np.where(den != 0, den, 1), 0)
            return (np.maximum(grads, 0) * aij).sum(axis=(2, 3))

    net, model, variables = jaxcam.weights.random_torchvision(a.arch, 1000, seed=0)
    layer = model.resolve_layer(model.default_layer)
    x = np.random.default_rng(0).normal(size=(a.batch, a.image_size, a.image_size, 3))
    x = x.astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    hooks = dict(model=net, target_layers=[jaxcam.weights.torchvision_module(net, layer)],
                 reshape_transform=jaxcam.weights.vit_reshape_transform if vit else None)

    # S_c ~ 83 for ResNet-50 at 224 px, e^{S_c} at float32's limit: explain never forms
    # it (log_scale)
    ex = jaxcam.explain(model, variables, x, method="gradcam++", derivatives="closed_form")
    ours = np.array(ex.maps)
    cam = GradCAMPlusPlus(**hooks)
    pgc = cam(input_tensor=xt, targets=None)
    # copies: the hooks' tensors are released by the next call, numpy views would dangle
    grads = cam.activations_and_grads.gradients[0].numpy().copy()  # (B, K, h, w), dS_c / dA
    acts = cam.activations_and_grads.activations[0].numpy().copy()
    pgc0 = GradCAMPlusPlusEps0(**hooks)(input_tensor=xt, targets=None)
    pairs = {"pytorch-grad-cam vs its eps=0 formula": (pgc, pgc0),
             "pytorch-grad-cam vs jaxcam explain closed form": (pgc, ours),
             "its eps=0 formula vs jaxcam explain closed form": (pgc0, ours)}
    if not vit:
        # the same closed form without the factor e^{S_c} (alphas do not depend on it,
        # the weights scale with it, the map is normalised): D_n = g^n, g = dS_c / dA
        A = model.features(variables, x, layer)
        g = jax.grad(lambda a: jnp.sum(model.head(variables, a, layer)[
            jnp.arange(a.shape[0]), ex.class_idx]))(A)
        w = methods.gradcam_pp_weights(A, g, g**2, g**3)
        free = np.array(methods.normalize_maps(methods.upsample(
            methods.weighted_map(A, w), x.shape[1:3]))[0])
        pairs["its eps=0 formula vs jaxcam closed form without e^S_c"] = (pgc0, free)
        pairs["pytorch-grad-cam vs jaxcam closed form without e^S_c"] = (pgc, free)

    g2 = grads**2
    den0 = 2 * g2 + acts.sum(axis=(2, 3), keepdims=True) * grads**3
    live = grads > 0  # the positions that enter the weights (ReLU(g) * alpha)
    print(f"{a.arch} (random torchvision init, seed 0), {layer}, {a.image_size} px, "
          f"{a.batch} images; activations >= 0: {bool((acts >= 0).all())}")
    print(f"median g^2 = {np.median(g2):.2g} (eps = 1e-6); positions with g > 0 where "
          f"eps > |2 g^2 + sum(A) g^3|: {np.mean(1e-6 > np.abs(den0[live])):.1%}; "
          f"negative denominators with g > 0: {int(np.sum(den0[live] < 0))}")
    print(f"logit S_c explained: {np.asarray(ex.logits).max(-1).round(2).tolist()}; "
          f"jaxcam.explain maps flagged degenerate: {np.asarray(ex.degenerate).tolist()}")
    for name, (u, v) in pairs.items():
        per_image = [float(np.abs(s - t).max()) for s, t in zip(u, v, strict=True)]
        print(f"{name}: max |map difference| per image "
              + ", ".join(f"{d:.2g}" for d in per_image))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
