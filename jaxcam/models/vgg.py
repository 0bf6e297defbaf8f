"""VGG19 without batch norm exactly as torchvision builds it (Simonyan &
Zisserman 2015, https://arxiv.org/abs/1409.1556): every entry of torchvision's
`features` Sequential (conv, ReLU, max-pool) is a cut point `features.<i>`."""

from __future__ import annotations

from functools import cache, partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from jaxcam.models.base import (
    Children,
    Model,
    Stage,
    StagedNet,
    check_num_classes,
    conv,
    relu,
)

Array = jax.Array

# torchvision cfgs["E"]: conv widths, "M" = 2x2 max-pool.
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
             512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
POOL_SIZE = 7
HIDDEN = 4096
DROPOUT = 0.5


def max_pool_2x2(x: Array) -> Array:
    """2x2 / stride 2 max-pool (floor mode) as a chain of `where` over the four
    strided slices, in row-major window order, so the first maximum wins a tie
    and NaN propagates (as in PyTorch), and `jax.experimental.jet` works
    (reduce_window_max has no jet rule). (B, H, W, K) -> (B, H // 2, W // 2, K)."""
    h, w = (x.shape[1] // 2) * 2, (x.shape[2] // 2) * 2
    x = x[:, :h, :w]
    out = x[:, 0::2, 0::2]
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        v = x[:, dy::2, dx::2]
        out = jnp.where((v > out) | jnp.isnan(v), v, out)
    return out


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging matrix of torch's AdaptiveAvgPool: row i averages
    input positions floor(i*size/out) .. ceil((i+1)*size/out) - 1."""
    p = np.zeros((out, size), np.float32)
    for i in range(out):
        start = (i * size) // out
        end = -((-(i + 1) * size) // out)
        p[i, start:end] = 1.0 / (end - start)
    return p


def adaptive_avg_pool(x: Array, out: int = POOL_SIZE) -> Array:
    """torch's AdaptiveAvgPool2d((out, out)) on NHWC: (B, H, W, K) -> (B, out, out, K)."""
    ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], out), x.dtype)
    pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], out), x.dtype)
    return jnp.einsum("ih,jw,bhwk->bijk", ph, pw, x)


def _conv(index: int, width: int, children: Children, x: Array, train: bool) -> Array:
    return children("features")(str(index), partial(conv, width, 3, bias=True), x)


def _relu(children: Children, x: Array, train: bool) -> Array:
    return relu(x)


def _pool(children: Children, x: Array, train: bool) -> Array:
    return max_pool_2x2(x)


def _avgpool_flatten(children: Children, x: Array, train: bool) -> Array:
    """Adaptive pool to 7x7, then flatten in torch's C, H, W order (so torch's
    classifier.0 weight imports as a plain transpose)."""
    x = adaptive_avg_pool(x)
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def _dense(index: int, width: int, children: Children, x: Array, train: bool) -> Array:
    # torchvision VGG init: Linear weights N(0, 0.01), bias 0.
    make = partial(nn.Dense, width, kernel_init=nn.initializers.normal(0.01))
    return children("classifier")(str(index), make, x)


def _dropout(children: Children, x: Array, train: bool) -> Array:
    return nn.Dropout(DROPOUT, deterministic=not train)(x)


def _classifier_relu(children: Children, x: Array, train: bool) -> Array:
    return relu(x)


@cache  # same stages object per config: equal Models share jit caches
def vgg_stages(num_classes: int, cfg: tuple = VGG19_CFG) -> tuple[Stage, ...]:
    """`features.<i>` for every conv / ReLU / pool of torchvision's Sequential,
    then the head: adaptive pool + flatten, classifier.0 .. classifier.6."""
    stages = []
    width = 3
    for v in cfg:
        if v == "M":
            stages.append(Stage(f"features.{len(stages)}", _pool, out_channels=width))
        else:
            width = v
            stages.append(Stage(f"features.{len(stages)}", partial(_conv, len(stages), v),
                                out_channels=v))
            stages.append(Stage(f"features.{len(stages)}", _relu, out_channels=v))
    flat = width * POOL_SIZE * POOL_SIZE
    stages.append(Stage("avgpool", _avgpool_flatten, out_channels=flat, cut=False))
    head = [
        ("classifier.0", partial(_dense, 0, HIDDEN), "dense", HIDDEN),
        ("classifier.1", _classifier_relu, "block", HIDDEN),
        ("classifier.2", _dropout, "dropout", HIDDEN),
        ("classifier.3", partial(_dense, 3, HIDDEN), "dense", HIDDEN),
        ("classifier.4", _classifier_relu, "block", HIDDEN),
        ("classifier.5", _dropout, "dropout", HIDDEN),
        ("classifier.6", partial(_dense, 6, num_classes), "dense", num_classes),
    ]
    for name, run, role, k in head:
        path = tuple(name.split(".")) if role == "dense" else ()
        stages.append(Stage(name, run, out_channels=k, cut=False, role=role, dense_path=path))
    return tuple(stages)


def vgg_aliases(cfg: tuple = VGG19_CFG) -> dict[str, str]:
    """conv{b}_{i}, relu{b}_{i}, pool{b} -> features.<index> (b: block, i: conv in block)."""
    aliases, index, block, conv_in_block = {}, 0, 1, 1
    for v in cfg:
        if v == "M":
            aliases[f"pool{block}"] = f"features.{index}"
            index, block, conv_in_block = index + 1, block + 1, 1
        else:
            aliases[f"conv{block}_{conv_in_block}"] = f"features.{index}"
            aliases[f"relu{block}_{conv_in_block}"] = f"features.{index + 1}"
            index, conv_in_block = index + 2, conv_in_block + 1
    return aliases


def vgg19(num_classes: int = 1000) -> Model:
    """torchvision's `vgg19(num_classes=...)` (no BN) in Flax: 143,667,240
    parameters at 1000 classes. Cut points `features.0` .. `features.36`
    (aliases `conv5_4`, `relu5_4`, `pool5`, ...); default `features.35`
    (`relu5_4`, the last rectified conv output, before the last max-pool)."""
    num_classes = check_num_classes(num_classes)
    return Model(
        arch="vgg19",
        num_classes=num_classes,
        module=StagedNet(vgg_stages(num_classes)),
        default_layer="features.35",
        aliases=FrozenDict(vgg_aliases()),
        param_order=("features", "classifier"),
        stochastic=True,
    )

