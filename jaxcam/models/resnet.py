"""ResNet-50 v1.5 exactly as torchvision builds it (He et al. 2016,
https://arxiv.org/abs/1512.03385; stride on the 3x3 conv of a downsampling
bottleneck), as an ordered list of stages with block-level cut points."""

from __future__ import annotations

import math
from functools import cache, partial

import flax.linen as nn
import jax
from flax.core import FrozenDict

from jaxcam.models.base import (
    Children,
    Model,
    Sequential,
    Stage,
    StagedNet,
    batch_norm,
    check_num_classes,
    conv,
    global_average_pool,
    relu,
    uniform_init,
)

Array = jax.Array

EXPANSION = 4
STAGE_SIZES = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 (stride here, v1.5) -> 1x1 (x4), + shortcut."""

    planes: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out = relu(batch_norm(train, "bn1")(conv(self.planes, 1, "conv1")(x)))
        out = conv(self.planes, 3, "conv2", stride=self.stride)(out)
        out = relu(batch_norm(train, "bn2")(out))
        out = batch_norm(train, "bn3")(conv(self.planes * EXPANSION, 1, "conv3")(out))
        identity = x
        if self.downsample:
            # torchvision: downsample = Sequential(conv1x1(stride), BatchNorm2d) -> "0", "1"
            shortcut = Sequential(name="downsample")
            identity = shortcut(
                "0", partial(conv, self.planes * EXPANSION, 1, stride=self.stride), x
            )
            identity = shortcut("1", partial(batch_norm, train), identity)
        return relu(out + identity)


def _stem(children: Children, x: Array, train: bool) -> Array:
    """conv1 7x7/2 -> bn1 -> ReLU -> max-pool 3x3/2 (padding 1): torchvision's `maxpool` output."""
    x = relu(batch_norm(train, "bn1")(conv(64, 7, "conv1", stride=2)(x)))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _block(container: str, key: str, planes: int, stride: int, downsample: bool,
           children: Children, x: Array, train: bool) -> Array:
    make = partial(Bottleneck, planes, stride, downsample)
    return children(container)(key, make, x, train)


def _gap(children: Children, x: Array, train: bool) -> Array:
    return global_average_pool(x)


def _fc(num_classes: int, in_features: int, children: Children, x: Array, train: bool) -> Array:
    # torch's nn.Linear default init: U(+-1/sqrt(fan_in)) for weight and bias.
    bound = 1.0 / math.sqrt(in_features)
    return nn.Dense(num_classes, kernel_init=uniform_init(bound), bias_init=uniform_init(bound),
                    name="fc")(x)


@cache  # same stages object per config: equal Models share jit caches
def resnet_stages(num_classes: int, stage_sizes: tuple[int, ...] = STAGE_SIZES
                  ) -> tuple[Stage, ...]:
    """stem, layer{s}.{i} for every bottleneck (the last block of stage s is
    named `layer{s}`), then the head: global average pool, fc."""
    stages = [Stage("stem", _stem, out_channels=64)]
    for s, (blocks, planes) in enumerate(zip(stage_sizes, STAGE_WIDTHS, strict=True), start=1):
        for i in range(blocks):
            stride = 1 if (s == 1 or i > 0) else 2
            name = f"layer{s}" if i == blocks - 1 else f"layer{s}.{i}"
            run = partial(_block, f"layer{s}", str(i), planes, stride, i == 0)
            stages.append(Stage(name, run, out_channels=planes * EXPANSION))
    width = STAGE_WIDTHS[-1] * EXPANSION
    stages.append(Stage("avgpool", _gap, out_channels=width, cut=False, role="gap"))
    stages.append(Stage("fc", partial(_fc, num_classes, width), out_channels=num_classes,
                        cut=False, role="dense", dense_path=("fc",)))
    return tuple(stages)


def resnet50(num_classes: int = 1000) -> Model:
    """torchvision's `resnet50(num_classes=...)` in Flax (25,557,032 parameters at
    1000 classes, plus BN running statistics). Cut points: `stem`, `layer{s}.{i}`,
    `layer1`..`layer4`; default `layer4`, whose head is GAP + fc."""
    num_classes = check_num_classes(num_classes)
    aliases = {"maxpool": "stem"}
    aliases.update({f"layer{s}.{n - 1}": f"layer{s}" for s, n in enumerate(STAGE_SIZES, 1)})
    return Model(
        arch="resnet50",
        num_classes=num_classes,
        module=StagedNet(resnet_stages(num_classes)),
        default_layer="layer4",
        aliases=FrozenDict(aliases),
        param_order=("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"),
        stochastic=False,
    )
