"""EfficientNet-B0 exactly as torchvision builds it (Tan & Le 2019,
https://arxiv.org/abs/1905.11946): MBConv blocks with squeeze-excitation and
SiLU, stochastic depth in train mode; cut points `features.0` .. `features.8`.

Its heads are smooth (SiLU, sigmoid) except at `features.8` (GAP + dense):
where exact higher-order derivatives differ from the piecewise-linear closed
forms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, partial

import flax.linen as nn
import jax
import jax.numpy as jnp
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
    uniform_init,
)

Array = jax.Array


@dataclass(frozen=True)
class MBConvConfig:
    """One torchvision MBConvConfig row: a stage of `num_layers` MBConv blocks."""

    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    num_layers: int


# torchvision _efficientnet_conf("efficientnet_b0"): width and depth multipliers 1.0,
# so _make_divisible(c, 8) leaves every width unchanged.
B0_CONFIG = (
    MBConvConfig(1, 3, 1, 32, 16, 1),
    MBConvConfig(6, 3, 2, 16, 24, 2),
    MBConvConfig(6, 5, 2, 24, 40, 2),
    MBConvConfig(6, 3, 2, 40, 80, 3),
    MBConvConfig(6, 5, 1, 80, 112, 3),
    MBConvConfig(6, 5, 2, 112, 192, 4),
    MBConvConfig(6, 3, 1, 192, 320, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
STOCHASTIC_DEPTH_PROB = 0.2
DROPOUT = 0.2


class ConvNormActivation(nn.Module):
    """torchvision's Conv2dNormActivation: "0" conv (no bias) -> "1" BN -> SiLU (optional)."""

    features: int
    kernel: int
    stride: int = 1
    groups: int = 1
    activation: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = conv(self.features, self.kernel, "0", stride=self.stride, groups=self.groups)(x)
        x = batch_norm(train, "1")(x)
        return jax.nn.silu(x) if self.activation else x


class SqueezeExcitation(nn.Module):
    """x * sigmoid(fc2(silu(fc1(mean_hw(x))))), fc1/fc2 1x1 convs with bias."""

    squeeze_channels: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = jax.nn.silu(conv(self.squeeze_channels, 1, "fc1", bias=True)(s))
        s = jax.nn.sigmoid(conv(x.shape[-1], 1, "fc2", bias=True)(s))
        return x * s


class MBConv(nn.Module):
    """torchvision's MBConv: [expand 1x1] -> depthwise kxk -> SE -> project 1x1,
    plus the input (through stochastic depth) when stride 1 and in == out."""

    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel: int
    stride: int
    drop_prob: float

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        block = Sequential(name="block")
        expanded = self.in_channels * self.expand_ratio
        index = 0
        h = x
        if expanded != self.in_channels:
            h = block(str(index), partial(ConvNormActivation, expanded, 1), h, train)
            index += 1
        depthwise = partial(ConvNormActivation, expanded, self.kernel, self.stride, expanded)
        h = block(str(index), depthwise, h, train)
        # torchvision: squeeze channels from the block's *input* width.
        h = block(str(index + 1), partial(SqueezeExcitation, max(1, self.in_channels // 4)), h)
        project = partial(ConvNormActivation, self.out_channels, 1, activation=False)
        h = block(str(index + 2), project, h, train)
        if self.stride == 1 and self.in_channels == self.out_channels:
            h = self._stochastic_depth(h, train) + x
        return h

    def _stochastic_depth(self, h: Array, train: bool) -> Array:
        """torchvision StochasticDepth(p, "row"): drop each sample's branch with
        probability p in train mode, scale survivors by 1 / (1 - p)."""
        if not train or self.drop_prob == 0.0:
            return h
        keep = 1.0 - self.drop_prob
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (h.shape[0], 1, 1, 1))
        return h * mask.astype(h.dtype) / keep


class MBStage(nn.Module):
    """One `features.<s>` Sequential of MBConv blocks "0", "1", ...."""

    config: MBConvConfig
    first_block_id: int
    total_blocks: int

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = self.config
        for j in range(c.num_layers):
            block_id = self.first_block_id + j
            x = MBConv(
                in_channels=c.in_channels if j == 0 else c.out_channels,
                out_channels=c.out_channels,
                expand_ratio=c.expand_ratio,
                kernel=c.kernel,
                stride=c.stride if j == 0 else 1,
                drop_prob=STOCHASTIC_DEPTH_PROB * block_id / self.total_blocks,
                name=str(j),
            )(x, train)
        return x


def _feature(index: int, make: partial, children: Children, x: Array, train: bool) -> Array:
    return children("features")(str(index), make, x, train)


def _gap(children: Children, x: Array, train: bool) -> Array:
    return global_average_pool(x)


def _dropout(children: Children, x: Array, train: bool) -> Array:
    return nn.Dropout(DROPOUT, deterministic=not train)(x)


def _classifier(num_classes: int, children: Children, x: Array, train: bool) -> Array:
    # torchvision EfficientNet init: U(+-1/sqrt(out_features)), bias 0.
    make = partial(nn.Dense, num_classes, kernel_init=uniform_init(1.0 / math.sqrt(num_classes)))
    return children("classifier")("1", make, x)


@cache  # same stages object per config: equal Models share jit caches
def efficientnet_stages(num_classes: int, config: tuple[MBConvConfig, ...] = B0_CONFIG
                        ) -> tuple[Stage, ...]:
    """features.0 (stem), features.1..7 (MBConv stages), features.8 (1x1 conv to
    1280), then the head: GAP, classifier.0 (dropout), classifier.1 (dense)."""
    stem = partial(ConvNormActivation, STEM_CHANNELS, 3, 2)
    stages = [Stage("features.0", partial(_feature, 0, stem), out_channels=STEM_CHANNELS)]
    total = sum(c.num_layers for c in config)
    first = 0
    for s, c in enumerate(config, start=1):
        make = partial(MBStage, c, first, total)
        stages.append(Stage(f"features.{s}", partial(_feature, s, make),
                            out_channels=c.out_channels))
        first += c.num_layers
    last = len(config) + 1
    stages.append(Stage(f"features.{last}",
                        partial(_feature, last, partial(ConvNormActivation, LAST_CHANNELS, 1)),
                        out_channels=LAST_CHANNELS))
    stages.append(Stage("avgpool", _gap, out_channels=LAST_CHANNELS, cut=False, role="gap"))
    stages.append(Stage("classifier.0", _dropout, out_channels=LAST_CHANNELS, cut=False,
                        role="dropout"))
    stages.append(Stage("classifier.1", partial(_classifier, num_classes),
                        out_channels=num_classes, cut=False, role="dense",
                        dense_path=("classifier", "1")))
    return tuple(stages)


def efficientnet_b0(num_classes: int = 1000) -> Model:
    """torchvision's `efficientnet_b0(num_classes=...)` in Flax: 5,288,548
    parameters at 1000 classes. Cut points `features.0` .. `features.8`;
    default `features.8`, whose head is GAP + dropout + dense."""
    num_classes = check_num_classes(num_classes)
    return Model(
        arch="efficientnet_b0",
        num_classes=num_classes,
        module=StagedNet(efficientnet_stages(num_classes)),
        default_layer="features.8",
        aliases=FrozenDict({}),
        param_order=("features", "classifier"),
        stochastic=True,
    )
