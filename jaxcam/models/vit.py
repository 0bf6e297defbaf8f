"""Vision transformers (Dosovitskiy et al. 2021, https://arxiv.org/abs/2010.11929) exactly
as torchvision's ``VisionTransformer`` builds them, cut at every block and its LayerNorms.

``vit_b_16`` is torchvision's ``vit_b_16``; ``vit_s_16`` and ``vit_ti_16`` are timm's
``vit_small_patch16_224`` / ``vit_tiny_patch16_224`` in torchvision's layout (timm and
torchvision ViTs compute the same function; only the state-dict keys differ,
``jaxcam.weights.load_timm``). One encoder block, pre-norm::

    h = ln_1(x);  x' = x + out_proj(attention(in_proj(h)));  y = ln_2(x');  out = x' + mlp(y)
    mlp(y) = mlp.3(gelu(mlp.0(y)))       (exact erf GELU, LayerNorm eps 1e-6, no dropout)
    attention: q, k, v = split(in_proj(h), 3), per head softmax(q k^T / sqrt(d_head)) v

Logits are ``heads.head(encoder.ln(x_L)[:, 0])``: the class token after the final norm.

**Parameters** mirror torchvision's module paths, so ``jaxcam.weights`` loads a
torchvision state dict by its mechanical renaming (docs/weights.md): ``conv_proj``
(16x16 stride-16 conv, HWIO), ``class_token`` ``(1, 1, D)``, ``encoder.pos_embedding``
``(1, 1 + g*g, D)`` with ``g = image_size / 16`` (14 for 224), ``encoder.layers.
encoder_layer_{i}.{ln_1, self_attention, ln_2, mlp.0, mlp.3}``, ``encoder.ln``,
``heads.head``. The attention's fused input projection, torch's
``self_attention.in_proj_weight`` ``(3D, D)`` / ``in_proj_bias`` ``(3D,)`` (bare
parameters of ``nn.MultiheadAttention``, not an ``nn.Linear``), is the Dense
``self_attention.in_proj`` here: ``kernel = in_proj_weight.T`` ``(D, 3D)``, columns
``[0, D)`` the queries, ``[D, 2D)`` the keys, ``[2D, 3D)`` the values, head ``j`` at
columns ``[j d_head, (j + 1) d_head)`` of each (timm's ``attn.qkv`` has the same
layout); ``out_proj`` is an ordinary Dense.

**Cut points** (``model.layers``, input to output): ``conv_proj`` (the patch grid
``(B, g, g, D)``), then per block ``encoder.layers.encoder_layer_{i}.ln_1``,
``...ln_2`` and the block output ``encoder.layers.encoder_layer_{i}``, then
``encoder.ln``; tokens ``(B, 1 + g*g, D)`` with the class token first. timm's names are
aliases: ``patch_embed``, ``blocks.{i}``, ``blocks.{i}.norm1``, ``blocks.{i}.norm2``,
``norm``. Default: the last block's ``ln_1`` (``blocks.11.norm1``), pytorch-grad-cam's
documented choice for ViT.

**What crosses the cut.** At a block output or ``encoder.ln`` the activations are the
whole residual stream, so ``head(A)`` needs nothing else. At ``ln_1`` (``ln_2``) the
residual ``x`` (``x'``) bypasses the norm: ``head(variables, A, layer, x=images)``
recomputes it from the images and adds ``A``'s path to it; it does not depend on ``A``,
so derivatives with respect to ``A`` are partial derivatives, what pytorch-grad-cam's
hook on the norm's output gives. ``head(v, features(v, x, l), l, x=x) == apply(v, x)``.

**Image sizes.** Any square size divisible by 16 (at least 32): the position
embeddings of the stored ``g x g`` grid are resampled to the image's grid as timm does
(``timm.layers.resample_abs_pos_embed`` with its defaults, which timm's
``dynamic_img_size=True`` forward uses): bicubic, antialiased, ``align_corners=False``,
the class token's embedding kept. torch's antialiased bicubic is the PIL filter
(Keys ``a = -0.5``, taps renormalised at the borders), which is exactly
``jax.image.resize(..., "bicubic", antialias=True)`` (tests/test_vit.py checks both
against torch); the ``a = -0.75`` kernel is torch's non-antialiased path, which timm
does not use here. torchvision's own ``VisionTransformer`` accepts only its
``image_size``; at that size no resampling happens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from jaxcam.models.base import (
    Model,
    Stage,
    Variables,
    _as_real_array,
    check_num_classes,
    uniform_init,
)

Array = jax.Array
# (residual stream or None, value at the cut): what flows between stages.
Carry = tuple[Array | None, Array]

LN_EPSILON = 1e-6
PATCH_SIZE = 16


@dataclass(frozen=True)
class ViTConfig:
    """A ViT: width ``hidden_dim`` (D), ``num_heads``, ``num_layers`` blocks, MLP width
    ``mlp_dim``, ``patch_size`` px patches, position embeddings stored for
    ``image_size`` px (the grid ``image_size // patch_size``)."""

    hidden_dim: int
    num_heads: int
    num_layers: int
    mlp_dim: int
    num_classes: int = 1000
    patch_size: int = PATCH_SIZE
    image_size: int = 224

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def layer_norm(name: str) -> nn.LayerNorm:
    """torch ``nn.LayerNorm(eps=1e-6)``; two-pass variance (``E[(x - mu)^2]``), as torch."""
    return nn.LayerNorm(epsilon=LN_EPSILON, use_fast_variance=False, name=name)


def gelu(x: Array) -> Array:
    """torch's default ``nn.GELU()``: the exact ``x Phi(x)`` (erf), not the tanh form."""
    return jax.nn.gelu(x, approximate=False)


class SelfAttention(nn.Module):
    """torch ``nn.MultiheadAttention(D, num_heads, batch_first=True)`` on ``(B, T, D)``,
    queries = keys = values = the input; fused ``in_proj`` Dense ``(D, 3D)``."""

    num_heads: int

    @nn.compact
    def __call__(self, h: Array) -> Array:
        b, t, d = h.shape
        head_dim = d // self.num_heads
        # torch: xavier_uniform_ on in_proj_weight (3D, D), zero biases; out_proj keeps
        # nn.Linear's U(+-1/sqrt(D)) weight, its bias is zeroed.
        qkv = nn.Dense(3 * d, kernel_init=nn.initializers.xavier_uniform(),
                       bias_init=nn.initializers.zeros, name="in_proj")(h)
        q, k, v = (z.reshape(b, t, self.num_heads, head_dim) for z in jnp.split(qkv, 3, -1))
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(head_dim)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, t, d)
        return nn.Dense(d, kernel_init=uniform_init(1.0 / math.sqrt(d)),
                        bias_init=nn.initializers.zeros, name="out_proj")(out)


class MLPBlock(nn.Module):
    """torchvision's ``MLPBlock``: ``3`` Linear(gelu(``0`` Linear(y))) (dropouts p=0)."""

    mlp_dim: int

    @nn.compact
    def __call__(self, y: Array) -> Array:
        # torchvision: xavier_uniform_ weights, N(0, 1e-6) biases.
        dense = partial(nn.Dense, kernel_init=nn.initializers.xavier_uniform(),
                        bias_init=nn.initializers.normal(1e-6))
        return dense(y.shape[-1], name="3")(gelu(dense(self.mlp_dim, name="0")(y)))


class EncoderBlock(nn.Module):
    """One pre-norm block; its three pieces are the stages between its cut points."""

    num_heads: int
    mlp_dim: int

    def setup(self) -> None:
        self.ln_1 = layer_norm("ln_1")
        self.self_attention = SelfAttention(self.num_heads)
        self.ln_2 = layer_norm("ln_2")
        self.mlp = MLPBlock(self.mlp_dim)

    def first_norm(self, carry: Carry) -> Carry:
        """``(_, x) -> (x, ln_1(x))``: the residual travels beside the norm's output."""
        x = carry[1]
        return x, self.ln_1(x)

    def attention_and_second_norm(self, carry: Carry) -> Carry:
        """``(x, h) -> (x', ln_2(x'))`` with ``x' = x + attention(h)``."""
        x, h = carry
        x = x + self.self_attention(h)
        return x, self.ln_2(x)

    def mlp_residual(self, carry: Carry) -> Carry:
        """``(x', y) -> (None, x' + mlp(y))``: the block output is the whole stream."""
        x, y = carry
        return None, x + self.mlp(y)

    def __call__(self, x: Array) -> Array:
        return self.mlp_residual(self.attention_and_second_norm(self.first_norm((None, x))))[1]


class EncoderLayers(nn.Module):
    """torchvision's ``encoder.layers`` Sequential: ``encoder_layer_0`` .. ``_{L-1}``."""

    config: ViTConfig

    def setup(self) -> None:
        for i in range(self.config.num_layers):
            setattr(self, f"encoder_layer_{i}",
                    EncoderBlock(self.config.num_heads, self.config.mlp_dim))

    def block(self, i: int) -> EncoderBlock:
        return getattr(self, f"encoder_layer_{i}")

    def __call__(self, x: Array) -> Array:
        for i in range(self.config.num_layers):
            x = self.block(i)(x)
        return x


def resample_position_embedding(pos: Array, old_grid: int, new_grid: int) -> Array:
    """``(1, 1 + old^2, D) -> (1, 1 + new^2, D)``: the patch part resampled on its grid
    (bicubic, antialiased, half-pixel centres: timm's ``resample_abs_pos_embed``
    defaults), the class token's row kept. Identity when the grids agree."""
    if new_grid == old_grid:
        return pos
    d = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, old_grid, old_grid, d)
    grid = jax.image.resize(grid, (1, new_grid, new_grid, d), "bicubic", antialias=True)
    return jnp.concatenate([pos[:, :1], grid.reshape(1, new_grid * new_grid, d)], axis=1)


class Encoder(nn.Module):
    """torchvision's ``encoder``: ``pos_embedding``, ``layers``, final ``ln``."""

    config: ViTConfig

    def setup(self) -> None:
        c = self.config
        self.pos_embedding = self.param(  # torchvision: N(0, 0.02) ("from BERT")
            "pos_embedding", nn.initializers.normal(0.02), (1, 1 + c.grid * c.grid, c.hidden_dim),
            jnp.float32)
        self.layers = EncoderLayers(c)
        self.ln = layer_norm("ln")

    def position_embedding(self, grid: int) -> Array:
        return resample_position_embedding(self.pos_embedding, self.config.grid, grid)

    def __call__(self, x: Array) -> Array:
        return self.ln(self.layers(x))


class Heads(nn.Module):
    """torchvision's ``heads`` Sequential with its one ``head`` Linear."""

    num_classes: int

    @nn.compact
    def __call__(self, cls: Array) -> Array:
        # torchvision zero-initialises heads.head (a fine-tuning convention); a zero head
        # makes every logit 0 and every map of a fresh or head-randomised model (cascading
        # randomisation) identically 0, so it gets torch's nn.Linear default U(+-1/sqrt(D)).
        bound = 1.0 / math.sqrt(cls.shape[-1])
        return nn.Dense(self.num_classes, kernel_init=uniform_init(bound),
                        bias_init=uniform_init(bound), name="head")(cls)


class VisionTransformer(nn.Module):
    """The Flax module behind :func:`vit_b_16` & co.: runs ``stages[start:stop]``, like
    ``StagedNet``, on a carry ``(residual or None, value)`` (the images for stage 0)."""

    config: ViTConfig

    @property
    def stages(self) -> tuple[Stage, ...]:
        return vit_stages(self.config)

    def setup(self) -> None:
        c = self.config
        fan_in = 3 * c.patch_size * c.patch_size
        # torchvision: trunc_normal_(std=sqrt(1/fan_in)) truncated at +-2 absolute, i.e.
        # at ~55 std for 16x16 patches: a plain normal.
        self.conv_proj = nn.Conv(
            c.hidden_dim, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
            padding="VALID", kernel_init=nn.initializers.normal(math.sqrt(1.0 / fan_in)),
            bias_init=nn.initializers.zeros, name="conv_proj")
        self.class_token = self.param("class_token", nn.initializers.zeros,
                                      (1, 1, c.hidden_dim), jnp.float32)
        self.encoder = Encoder(c)
        self.heads = Heads(c.num_classes)

    def __call__(self, x: Any, train: bool = False, start: int = 0, stop: int | None = None
                 ) -> Any:
        for stage in self.stages[start:stop]:
            x = stage.run(self, x, train)
        return x


# ---- stages: (net, carry, train) -> carry, net the bound VisionTransformer ----------------


def _patch_embedding(net: VisionTransformer, x: Array, train: bool) -> Carry:
    return None, net.conv_proj(x)


def _tokens(net: VisionTransformer, carry: Carry, train: bool) -> Carry:
    """Patch grid ``(B, g, g, D)`` -> tokens ``(B, 1 + g*g, D)``: class token first,
    then the patches in row-major order (torch's ``flatten(2)`` of NCHW), plus the
    position embeddings."""
    grid = carry[1]
    b, g, _, d = grid.shape
    cls = jnp.broadcast_to(net.class_token.astype(grid.dtype), (b, 1, d))
    tokens = jnp.concatenate([cls, grid.reshape(b, g * g, d)], axis=1)
    return None, tokens + net.encoder.position_embedding(g)


def _block_piece(i: int, piece: str, net: VisionTransformer, carry: Carry, train: bool
                 ) -> Carry:
    return getattr(net.encoder.layers.block(i), piece)(carry)


def _final_norm(net: VisionTransformer, carry: Carry, train: bool) -> Carry:
    return None, net.encoder.ln(carry[1])


def _classifier(net: VisionTransformer, carry: Carry, train: bool) -> Array:
    return net.heads(carry[1][:, 0])


def block_name(i: int) -> str:
    return f"encoder.layers.encoder_layer_{i}"


@cache  # same stages object per config: equal Models share jit caches
def vit_stages(config: ViTConfig) -> tuple[Stage, ...]:
    """conv_proj; tokens (not a cut); per block ln_1, ln_2, the block; encoder.ln; head."""
    d = config.hidden_dim
    stages = [Stage("conv_proj", _patch_embedding, out_channels=d),
              Stage("encoder.input", _tokens, out_channels=d, cut=False)]
    for i in range(config.num_layers):
        name = block_name(i)
        stages += [
            Stage(f"{name}.ln_1", partial(_block_piece, i, "first_norm"), out_channels=d),
            Stage(f"{name}.ln_2", partial(_block_piece, i, "attention_and_second_norm"),
                  out_channels=d),
            Stage(name, partial(_block_piece, i, "mlp_residual"), out_channels=d),
        ]
    stages += [Stage("encoder.ln", _final_norm, out_channels=d),
               Stage("heads.head", _classifier, out_channels=config.num_classes, cut=False,
                     role="dense", dense_path=("heads", "head"))]
    return tuple(stages)


@dataclass(frozen=True)
class ViTModel(Model):
    """A vision transformer behind the model protocol (docs/models.md): activations are
    tokens ``(B, 1 + g*g, D)`` (``conv_proj``: the grid ``(B, g, g, D)``), the LayerNorm
    cuts are crossed by the residual stream (``head(..., x=images)``), and
    :meth:`to_grid` drops the class token."""

    @property
    def config(self) -> ViTConfig:
        return self.module.config

    def _crossed(self, layer: str) -> bool:
        """Whether the residual stream bypasses `layer` (its LayerNorm cuts)."""
        return layer.endswith((".ln_1", ".ln_2"))

    # ---- checks ----------------------------------------------------------

    def _check_images(self, x: Any) -> Array:
        x = super()._check_images(x)
        h, w = x.shape[1], x.shape[2]
        p = self.config.patch_size
        if h != w:
            raise ValueError(
                f"{self.arch} takes square images, got {h}x{w} px: its token grid is drawn "
                f"as a g x g map (to_grid); crop or resize to a square (jaxcam.preprocessing."
                f"preprocess does)")
        if h % p:
            raise ValueError(
                f"{self.arch} needs an image side divisible by its {p} px patches, got {h} px; "
                f"resize to {h // p * p} or {(h // p + 1) * p} px (224 is its native size)")
        return x

    def _tokens_for(self, side: int) -> int:
        g = side // self.config.patch_size
        return 1 + g * g

    def _check_activations(self, a: Any, layer: str, x: Array | None = None) -> Array:
        a = _as_real_array(a, f"activations A at {layer!r}")
        d = self.config.hidden_dim
        how = (f"compute them with model.features(variables, x, layer={layer!r}) and pass the "
               "same layer to head")
        if layer == "conv_proj":
            if a.ndim != 4 or a.shape[-1] != d or a.shape[1] != a.shape[2]:
                raise ValueError(
                    f"activations A at 'conv_proj' of {self.arch} are the patch grid (B, g, g, "
                    f"{d}), got shape {tuple(a.shape)}; {how}")
            return a
        if a.ndim != 3 or a.shape[-1] != d or math.isqrt(a.shape[1] - 1) ** 2 != a.shape[1] - 1:
            raise ValueError(
                f"activations A at layer {layer!r} of {self.arch} are tokens (B, 1 + g*g, {d}) "
                f"(class token first), got shape {tuple(a.shape)}; {how}")
        if x is not None and (a.shape[0] != x.shape[0]
                              or a.shape[1] != self._tokens_for(x.shape[1])):
            raise ValueError(
                f"activations A at {layer!r} have shape {tuple(a.shape)} but the images x "
                f"{tuple(x.shape)} give (B, T) = ({x.shape[0]}, {self._tokens_for(x.shape[1])}); "
                "pass the images the activations were computed from")
        return a

    # ---- the protocol ----------------------------------------------------

    def features(self, variables: Variables, x: Array, layer: str | None = None) -> Array:
        """Activations at `layer` (eval mode): tokens ``(B, 1 + g*g, D)``, or the patch
        grid ``(B, g, g, D)`` at ``conv_proj``."""
        x = self._check_images(x)
        i = self._stage_index(layer)
        return self.module.apply(variables, x, train=False, start=0, stop=i + 1)[1]

    def head(self, variables: Variables, a: Array, layer: str | None = None,
             x: Array | None = None) -> Array:
        """Logits ``(B, C)`` with the output of `layer` replaced by `a` (eval mode).

        At a LayerNorm cut (``...ln_1``, ``...ln_2``) the residual stream that bypasses
        the norm is recomputed from the images `x` (required there) and does not depend
        on `a`: derivatives of the result with respect to `a` are partial derivatives.
        """
        name = self.resolve_layer(layer)
        i = self._stage_index(name)
        if self._crossed(name) and x is None:
            raise ValueError(
                f"head at {name!r} of {self.arch} needs the images: the residual stream "
                "bypasses this LayerNorm and is recomputed from them; call "
                f"model.head(variables, A, {name!r}, x=images)")
        if x is not None:
            x = self._check_images(x)
        a = self._check_activations(a, name, x)
        residual = None
        if self._crossed(name):  # a function of x alone: held fixed as A varies
            residual = self.module.apply(variables, x, train=False, start=0, stop=i + 1)[0]
        return self.module.apply(variables, (residual, a), train=False, start=i + 1)

    def to_grid(self, a: Array, layer: str | None = None) -> Array:
        """Tokens ``(B, 1 + g*g, D)`` -> ``(B, g, g, D)``: the class token dropped, the
        patches in row-major order (a slice and a reshape, no arithmetic); the patch
        grid at ``conv_proj`` is returned as is."""
        name = self.resolve_layer(layer)
        if name == "conv_proj":
            return a
        g = math.isqrt(max(a.shape[1] - 1, 0)) if a.ndim == 3 else -1
        if g < 1 or g * g != a.shape[1] - 1:
            raise ValueError(
                f"to_grid at {name!r} of {self.arch} expects tokens (B, 1 + g*g, D), got "
                f"shape {tuple(a.shape)}")
        return a[:, 1:].reshape(a.shape[0], g, g, a.shape[2])

    def row_head(self, variables: Variables, a: Array, layer: str | None = None,
                 x: Array | None = None) -> Callable[[Array, Array], Array] | None:
        """The head with one token row replaced, restricted to what that row reaches
        (the ``row_head`` of docs/models.md, used by the ``taylor`` engine), at the
        last block's first LayerNorm; None at every other layer.

        ``g(t, r)`` (``t`` a token index, ``r`` (B, D)) equals
        ``head(variables, a.at[:, t].set(r), layer, x=x)``. The head reads the class
        token only, so row ``t`` reaches the logits through its own key and value rows
        (and the class token's query when ``t = 0``), the class token's attention
        weights, and one token's out-projection, LayerNorm, MLP, final norm and
        classifier: with ``qkv = a W + b`` computed once,

            s_j = q_0 . k_j / sqrt(c)   (row t's key k_t = r W_k + b_k),
            o   = sum_j softmax(s)_j v_j,
            x_0' = x_0 + o W_o + b_o,   x_0'' = x_0' + MLP(LN_2(x_0')),
            logits = head(LN(x_0'')),

        per head, about ``N`` times less work per coordinate than the whole block over
        all ``N`` tokens.
        """
        name = self.resolve_layer(layer)
        c = self.config
        last = c.num_layers - 1
        if name != f"{block_name(last)}.ln_1":
            return None
        if x is None:
            raise ValueError(f"row_head at {name!r} needs the images x (the residual stream)")
        x = self._check_images(x)
        a = self._check_activations(a, name, x)
        i = self._stage_index(name)
        stream = self.module.apply(variables, x, train=False, start=0, stop=i + 1)[0]
        params = variables["params"]
        block = params["encoder"]["layers"][f"encoder_layer_{last}"]
        attn = block["self_attention"]
        heads, d = c.num_heads, c.hidden_dim
        head_dim = d // heads
        b, n = a.shape[0], a.shape[1]

        def dense(p, z):
            return z @ p["kernel"] + p["bias"]

        qkv0 = dense(attn["in_proj"], a)  # (B, N, 3D), fixed
        q0 = qkv0[:, 0, :d]
        k0 = qkv0[:, :, d:2 * d].reshape(b, n, heads, head_dim)
        v0 = qkv0[:, :, 2 * d:].reshape(b, n, heads, head_dim)
        x0 = stream[:, 0]
        ln_2, ln = layer_norm("ln_2"), layer_norm("ln")
        mlp = MLPBlock(c.mlp_dim)
        classifier = Heads(c.num_classes)

        def g(t: Array, r: Array) -> Array:
            qkv_t = dense(attn["in_proj"], r)  # (B, 3D)
            q = jnp.where(t == 0, qkv_t[:, :d], q0).reshape(b, heads, head_dim)
            k_t = qkv_t[:, d:2 * d].reshape(b, heads, head_dim)
            v_t = qkv_t[:, 2 * d:].reshape(b, heads, head_dim)
            scale = 1.0 / math.sqrt(head_dim)
            s = jnp.einsum("bhc,bkhc->bhk", q, k0) * scale  # (B, H, N)
            s_t = jnp.einsum("bhc,bhc->bh", q, k_t) * scale
            s = jax.lax.dynamic_update_slice_in_dim(s, s_t[..., None], t, axis=2)
            w = jax.nn.softmax(s, axis=-1)
            v_old = jax.lax.dynamic_index_in_dim(v0, t, axis=1, keepdims=False)  # (B, H, c)
            w_t = jax.lax.dynamic_index_in_dim(w, t, axis=2, keepdims=False)  # (B, H)
            o = jnp.einsum("bhk,bkhc->bhc", w, v0) + w_t[..., None] * (v_t - v_old)
            y = x0 + dense(attn["out_proj"], o.reshape(b, d))
            y = y + mlp.apply({"params": block["mlp"]}, ln_2.apply({"params": block["ln_2"]}, y))
            cls = ln.apply({"params": params["encoder"]["ln"]}, y)
            return classifier.apply({"params": params["heads"]}, cls)

        return g

    def linear_head(self, variables: Variables, layer: str | None = None) -> None:
        """None: no cut of a ViT is followed by GAP + dense (the head reads the class
        token after attention), so CAM does not apply."""
        self.resolve_layer(layer)
        return None


def _vit(arch: str, config: ViTConfig) -> ViTModel:
    check_num_classes(config.num_classes)
    last = config.num_layers - 1
    aliases = {"patch_embed": "conv_proj", "patch_embed.proj": "conv_proj",
               "norm": "encoder.ln"}
    for i in range(config.num_layers):
        aliases[f"blocks.{i}"] = block_name(i)
        aliases[f"blocks.{i}.norm1"] = f"{block_name(i)}.ln_1"
        aliases[f"blocks.{i}.norm2"] = f"{block_name(i)}.ln_2"
    return ViTModel(
        arch=arch,
        num_classes=config.num_classes,
        module=VisionTransformer(config),
        default_layer=f"{block_name(last)}.ln_1",
        aliases=FrozenDict(aliases),
        param_order=("conv_proj", "class_token", "encoder", "heads"),
        stochastic=False,
        min_image_size=2 * config.patch_size,
    )


def vit_b_16(num_classes: int = 1000) -> ViTModel:
    """torchvision's ``vit_b_16`` (= timm's ``vit_base_patch16_224``): D 768, 12 heads,
    12 blocks, MLP 3072; 86,567,656 parameters at 1000 classes."""
    return _vit("vit_b_16", ViTConfig(768, 12, 12, 3072, check_num_classes(num_classes)))


def vit_s_16(num_classes: int = 1000) -> ViTModel:
    """timm's ``vit_small_patch16_224`` in torchvision's layout: D 384, 6 heads, 12 blocks,
    MLP 1536."""
    return _vit("vit_s_16", ViTConfig(384, 6, 12, 1536, check_num_classes(num_classes)))


def vit_ti_16(num_classes: int = 1000) -> ViTModel:
    """timm's ``vit_tiny_patch16_224`` in torchvision's layout: D 192, 3 heads, 12 blocks,
    MLP 768."""
    return _vit("vit_ti_16", ViTConfig(192, 3, 12, 768, check_num_classes(num_classes)))
