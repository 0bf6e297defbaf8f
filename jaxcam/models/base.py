"""The generic model: an ordered list of stages, cut into `features` and `head`.

Every architecture in `jaxcam.models` is a tuple of `Stage`s, input to output.
`StagedNet` (a Flax linen module) runs any contiguous slice of them, and
`Model` (a frozen dataclass) derives `features`, `head`, `apply`, the list of
cut points and the GAP + dense detection from that one list, so nothing is
written per layer. Parameter paths mirror torchvision's module paths
(docs/models.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

Array = jax.Array
Variables = Mapping[str, Any]

# torch BatchNorm2d(eps=1e-5, momentum=0.1): Flax's momentum is 1 - torch's.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# torchvision inits: Kaiming-normal, fan-out, ReLU gain (sqrt 2).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def relu(x: Array) -> Array:
    """ReLU as `max(x, 0)`: `jax.nn.relu`'s custom_jvp breaks `jax.experimental.jet`."""
    return jnp.maximum(x, 0)


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """torchvision's BatchNorm2d: eps 1e-5, momentum 0.1 (Flax 0.9)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_fast_variance=False,
        name=name,
    )


def conv(
    features: int,
    kernel: int,
    name: str,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    padding: int | None = None,
) -> nn.Conv:
    """torchvision's Conv2d with symmetric padding `k // 2` (not "SAME", which
    pads asymmetrically at stride 2). Depthwise convolutions (`groups ==
    features`) are :class:`DepthwiseConv`, same parameters."""
    pad = kernel // 2 if padding is None else padding
    if groups > 1 and groups == features:
        return DepthwiseConv(features, kernel, stride=stride, padding=pad, use_bias=bias,
                             name=name)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=conv_init,
        name=name,
    )


class DepthwiseConv(nn.Module):
    """Depthwise 2-D convolution (torchvision ``Conv2d(C, C, k, groups=C)``), written
    as a sum of ``k*k`` strided shifted slices times per-channel weights.

    ``y[b, i, j, c] = sum_{p,q} x_pad[b, s*i + p, s*j + q, c] * kernel[p, q, 0, c]``
    (+ ``bias[c]``). Same parameters (``kernel`` ``(k, k, 1, C)``, HWIO) and the
    same numbers as ``nn.Conv(feature_group_count=C)`` up to float rounding, but
    XLA:CPU lowers grouped convolutions several times slower than these fused
    elementwise ops (timings in ``docs/performance.md``); all ops are linear, so
    Taylor mode stays exact.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, s, p, c = self.kernel_size, self.stride, self.padding, self.features
        if x.shape[-1] != c:
            raise ValueError(
                f"DepthwiseConv {self.name!r} has {c} channels but its input has "
                f"{x.shape[-1]}; a depthwise convolution keeps the channel count."
            )
        kernel = self.param("kernel", conv_init, (k, k, 1, c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32) \
            if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)  # as nn.Conv does
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        h_out = (x.shape[1] + 2 * p - k) // s + 1
        w_out = (x.shape[2] + 2 * p - k) // s + 1
        y = None
        for i in range(k):
            for j in range(k):
                tap = jax.lax.slice(
                    xp, (0, i, j, 0), (xp.shape[0], i + s * (h_out - 1) + 1,
                                       j + s * (w_out - 1) + 1, c), (1, s, s, 1)
                ) * kernel[i, j, 0]
                y = tap if y is None else y + tap
        return y if bias is None else y + bias


def global_average_pool(x: Array) -> Array:
    """(B, h, w, K) -> (B, K): torchvision's AdaptiveAvgPool2d(1) + flatten."""
    return jnp.mean(x, axis=(1, 2))


class Sequential(nn.Module):
    """A torchvision `nn.Sequential`: children named "0", "1", ..., built lazily.

    Each call builds and runs one child, `make(name=key)(*args, **kwargs)`, so
    consecutive stages can live in the same container (params
    `["layer1"]["0"]`, `["layer1"]["1"]`, ...) yet be run one at a time.
    """

    @nn.compact
    def __call__(self, key: str, make: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> Any:
        return make(name=key)(*args, **kwargs)


class Children:
    """Per-call registry of the `Sequential` containers of a `StagedNet`, so a
    container that several stages use is created once per call."""

    def __init__(self) -> None:
        self._made: dict[str, Sequential] = {}

    def __call__(self, name: str) -> Sequential:
        if name not in self._made:
            self._made[name] = Sequential(name=name)
        return self._made[name]


StageFn = Callable[[Children, Array, bool], Array]


@dataclass(frozen=True)
class Stage:
    """One step of a model, `x -> run(children, x, train)`.

    name: cut-point name (torchvision module path) when `cut`, else a label.
    out_channels: channels of this stage's output (for checking `A`).
    role: "block" (anything), "gap" (global average pool to (B, K)),
        "dropout" (identity in eval mode) or "dense" (one dense layer whose
        parameters sit at `params[dense_path]`). `Model.linear_head` reads it.
    """

    name: str
    run: StageFn
    out_channels: int | None = None
    cut: bool = True
    role: str = "block"
    dense_path: tuple[str, ...] = ()


class StagedNet(nn.Module):
    """Runs `stages[start:stop]`; the Flax module behind every `Model`."""

    stages: tuple[Stage, ...]

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, start: int = 0, stop: int | None = None
    ) -> Array:
        children = Children()
        for stage in self.stages[start:stop]:
            x = stage.run(children, x, train)
        return x


def _as_real_array(x: Any, what: str) -> Array:
    """Cast to a floating array or raise ValueError for uncastable dtypes."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what} could not be converted to an array ({err}); pass a "
                             "float32 array") from None
    dtype = np.dtype(x.dtype)
    # jnp.issubdtype knows the ml_dtypes floats (bfloat16, float8) that numpy does not
    if dtype == np.bool_ or not (jnp.issubdtype(dtype, jnp.integer)
                                 or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(
            f"{what} has dtype {dtype}, which cannot be cast to a real float image; pass a "
            "float32, float16 or bfloat16 array (normalised with "
            "jaxcam.preprocessing.normalize), or uint8/int values to be cast"
        )
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(x)
    return jnp.asarray(x, dtype=jnp.float32)


@functools.lru_cache(maxsize=16)
def _jitted_init(module: StagedNet) -> Callable[[Array, Array], Any]:
    """One jitted `module.init` per module, so repeated `Model.init` calls reuse
    the compilation (XLA drops the forward pass; only the initialisers run)."""
    return jax.jit(module.init)


@dataclass(frozen=True)
class Model:
    """A torchvision architecture in Flax, cut at named layers.

    Attributes:
        arch: "resnet50" | "vgg19" | "efficientnet_b0".
        num_classes: C, the classifier's output width.
        module: the `StagedNet` linen module (its `stages` define everything).
        default_layer: the cut point `features`/`head` use when `layer=None`.
        aliases: readable or torchvision names -> canonical cut-point names.
        param_order: top-level keys of `variables["params"]`, input -> output.
        stochastic: whether train mode needs an `rng` (dropout, stochastic depth).
        min_image_size: the smallest H and W accepted.
    """

    arch: str
    num_classes: int
    module: StagedNet
    default_layer: str
    aliases: Mapping[str, str] = field(default_factory=lambda: FrozenDict({}))
    param_order: tuple[str, ...] = ()
    stochastic: bool = False
    min_image_size: int = 32

    def __post_init__(self) -> None:
        # A FrozenDict keeps the model hashable (usable as a static jit argument).
        object.__setattr__(self, "aliases", FrozenDict(dict(self.aliases)))
        bad = [n for n in (self.default_layer, *self.aliases.values()) if n not in self.layers]
        if bad:
            raise ValueError(f"{self.arch}: {bad} are not cut points; cut points: {self.layers}")

    # ---- layers --------------------------------------------------------

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.module.stages

    @property
    def layers(self) -> tuple[str, ...]:
        """Cut-point names, input -> output order (aliases not included)."""
        return tuple(s.name for s in self.stages if s.cut)

    def resolve_layer(self, name: str | None) -> str:
        """Canonical cut-point name for `name` (an alias or a cut point; None ->
        `default_layer`). Raises ValueError listing the valid names."""
        if name is None:
            return self.default_layer
        if isinstance(name, str):
            if name in self.aliases:
                return self.aliases[name]
            if name in self.layers:
                return name
        aliases = ", ".join(f"{a} -> {c}" for a, c in self.aliases.items()) or "none"
        raise ValueError(
            f"unknown layer {name!r} for {self.arch}; valid layers: {', '.join(self.layers)}; "
            f"aliases: {aliases}"
        )

    def _stage_index(self, layer: str | None) -> int:
        name = self.resolve_layer(layer)
        return next(i for i, s in enumerate(self.stages) if s.cut and s.name == name)

    # ---- input checks --------------------------------------------------

    def _check_images(self, x: Any) -> Array:
        x = _as_real_array(x, "images x")
        shape = tuple(x.shape)
        if x.ndim != 4:
            if x.ndim == 3 and shape[-1] == 3:
                fix = "add a batch axis: x[None]"
            elif x.ndim == 3 and shape[0] == 3:
                fix = ("this looks like one CHW image; jaxcam wants NHWC: "
                       "x.transpose(1, 2, 0)[None]")
            else:
                fix = "pass a batch of images shaped (B, H, W, 3)"
            raise ValueError(f"images x must have rank 4 (B, H, W, 3), got shape {shape}; {fix}")
        if shape[-1] != 3:
            if shape[1] == 3:
                fix = ("this looks like NCHW (B, 3, H, W); jaxcam models take NHWC: "
                       "x.transpose(0, 2, 3, 1)")
            else:
                fix = "pass RGB images (convert grayscale with jnp.repeat(x, 3, axis=-1))"
            raise ValueError(
                f"images x must have 3 channels in the last axis (NHWC), got shape {shape}; {fix}"
            )
        h, w = shape[1], shape[2]
        if min(h, w) < self.min_image_size:
            raise ValueError(
                f"images are {h}x{w} px, smaller than the {self.min_image_size} px minimum of "
                f"{self.arch}; resize them to at least {self.min_image_size} px (224 is typical, "
                "see jaxcam.preprocessing.preprocess)"
            )
        return x

    def _check_activations(self, a: Any, layer: str) -> Array:
        a = _as_real_array(a, f"activations A at {layer!r}")
        stage = self.stages[self._stage_index(layer)]
        k = stage.out_channels
        if a.ndim != 4 or a.shape[-1] != k:
            others = [s.name for s in self.stages if s.cut and s.out_channels == a.shape[-1]]
            hint = (f"; arrays with {a.shape[-1]} channels come from {', '.join(others)}"
                    if a.ndim == 4 and others else "")
            raise ValueError(
                f"activations A at layer {layer!r} of {self.arch} must be (B, h, w, {k}), got "
                f"shape {tuple(a.shape)}; compute them with model.features(variables, x, "
                f"layer={layer!r}) and pass the same layer to head{hint}"
            )
        return a

    # ---- forward -------------------------------------------------------

    def init(self, rng: Array, image_size: int = 224) -> dict[str, Any]:
        """Fresh variables `{"params": ..., "batch_stats": ...}` (VGG: no batch_stats),
        initialised as torchvision does. Shapes do not depend on `image_size`; it
        only sets the size of the dummy image traced through the model."""
        if int(image_size) < self.min_image_size:
            raise ValueError(
                f"image_size={image_size} is below the {self.min_image_size} px minimum of "
                f"{self.arch}; use image_size >= {self.min_image_size}"
            )
        x = jnp.zeros((1, int(image_size), int(image_size), 3), jnp.float32)
        return dict(_jitted_init(self.module)(rng, x))

    def apply(
        self, variables: Variables, x: Array, train: bool = False, rng: Array | None = None
    ) -> Array | tuple[Array, dict[str, Any]]:
        """Logits (B, C). Eval mode (running BN statistics, no dropout) by default.

        `train=True` uses batch statistics and dropout / stochastic depth (with
        `rng`) and returns `(logits, {"batch_stats": new})` (`{}` for VGG19).
        """
        x = self._check_images(x)
        if not train:
            return self.module.apply(variables, x, train=False)
        if rng is None and self.stochastic:
            raise ValueError(
                f"{self.arch} in train mode applies dropout; pass rng=jax.random.key(...)"
            )
        rngs = {"dropout": rng} if rng is not None else {}
        logits, updates = self.module.apply(
            variables, x, train=True, rngs=rngs, mutable=["batch_stats"]
        )
        return logits, dict(updates)

    def features(self, variables: Variables, x: Array, layer: str | None = None) -> Array:
        """Activations A (B, h, w, K) at `layer` (eval mode): stages up to and including it."""
        x = self._check_images(x)
        i = self._stage_index(layer)
        return self.module.apply(variables, x, train=False, start=0, stop=i + 1)

    def head(self, variables: Variables, a: Array, layer: str | None = None,
             x: Array | None = None) -> Array:
        """Logits (B, C) from activations A at `layer` (eval mode): the remaining stages.

        `head(variables, features(variables, x, layer), layer) == apply(variables, x)`.
        `x` (the images) is part of the model protocol (docs/models.md) for models
        whose cut is crossed by other paths; nothing crosses a `StagedNet` cut, so
        it is ignored here.
        """
        del x
        name = self.resolve_layer(layer)
        a = self._check_activations(a, name)
        i = self._stage_index(name)
        return self.module.apply(variables, a, train=False, start=i + 1)

    def to_grid(self, a: Array, layer: str | None = None) -> Array:
        """The `(B, h, w, K)` grid a map is drawn on; conv activations already are one."""
        del layer
        return a

    def abstract_variables(self) -> dict[str, Any]:
        """The variable tree as `jax.ShapeDtypeStruct` leaves, in plain (mutable) dicts:
        `jax.eval_shape` of `init`, nothing computed or compiled; cached per model."""
        return _plain_dicts(_abstract_variables(self))

    def linear_head(self, variables: Variables, layer: str | None = None
                    ) -> tuple[Array, Array] | None:
        """`(W (K, C), b (C,))` when the head at `layer` is exactly global average
        pooling then one dense layer in eval mode, so `S = mean_ij(A) @ W + b`
        (what CAM needs); else None."""
        rest = [s for s in self.stages[self._stage_index(layer) + 1:] if s.role != "dropout"]
        if [s.role for s in rest] != ["gap", "dense"]:
            return None
        dense = variables["params"]
        for key in rest[1].dense_path:
            dense = dense[key]
        return dense["kernel"], dense["bias"]


@functools.lru_cache(maxsize=32)
def _abstract_variables(model: Model) -> Any:
    return jax.eval_shape(lambda key: model.init(key, image_size=64), jax.random.key(0))


def _plain_dicts(tree: Any) -> Any:
    """Mapping trees (FrozenDict included) -> fresh nested plain dicts."""
    if isinstance(tree, Mapping):
        return {k: _plain_dicts(v) for k, v in tree.items()}
    return tree


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def variables_mismatch(expected: Any, variables: Any) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, shape mismatches)`` of ``variables`` against the
    abstract tree ``expected`` (paths joined by ``/``)."""
    want, got = leaf_shapes(expected), leaf_shapes(variables)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = sorted(f"{k}: {got[k]} != {want[k]}" for k in set(want) & set(got)
                    if got[k] != want[k])
    return missing, unexpected, shapes


def uniform_init(bound: float) -> Callable[..., Array]:
    """U(-bound, bound): torch's Linear default uses bound = 1/sqrt(fan_in)."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def check_num_classes(num_classes: int) -> int:
    """The classifier width, or ValueError."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes
