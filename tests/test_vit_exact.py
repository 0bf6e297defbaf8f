"""Exact Grad-CAM++ through a ViT head: the per-token fast path (``ViTModel.row_head``)
is the head with one row replaced, its ``taylor`` derivatives equal the generic
per-coordinate pass through the whole block, and both equal float64 finite
differences (jaxcam.testing's oracle) on sampled coordinates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcam
from jaxcam import derivatives as deriv
from jaxcam import targets, testing
from jaxcam.models.vit import ViTConfig, _vit


def _tiny(num_layers=2):
    # D 32, 2 heads, MLP 64, 16 px patches, native 32 px (a 2x2 grid, 5 tokens)
    return _vit("vit_tiny_test", ViTConfig(32, 2, num_layers, 64, num_classes=5, image_size=32))


def _setup(model, side, seed=0, dtype=jnp.float64):
    v = model.init(jax.random.PRNGKey(seed))
    v = jax.tree_util.tree_map(lambda z: z.astype(dtype), v)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, side, side, 3), dtype)
    layer = model.default_layer
    A = model.features(v, x, layer)
    return v, x, layer, A


@pytest.mark.parametrize("side", [32, 48])
def test_row_head_is_the_head_with_one_row_replaced(x64, side):
    model = _tiny()
    v, x, layer, A = _setup(model, side)
    g = model.row_head(v, A, layer, x=x)
    r = jax.random.normal(jax.random.PRNGKey(7), (A.shape[0], A.shape[2]), A.dtype)
    for t in (0, 1, A.shape[1] - 1):  # the class token (its query moves too) and patches
        want = model.head(v, A.at[:, t].set(r), layer, x=x)
        got = jax.jit(g)(jnp.int32(t), r)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert not np.allclose(want, model.head(v, A, layer, x=x))  # row t matters


def test_row_head_only_at_the_last_blocks_first_norm():
    model = _tiny()
    v, x, _, _ = _setup(model, 32, dtype=jnp.float32)
    assert model.default_layer == "encoder.layers.encoder_layer_1.ln_1"
    for layer in ("encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_1.ln_2",
                  "encoder.layers.encoder_layer_1", "encoder.ln"):
        assert model.row_head(v, model.features(v, x, layer), layer, x=x) is None
    with pytest.raises(ValueError, match="needs the images"):
        model.row_head(v, model.features(v, x, model.default_layer), model.default_layer)


def _derivatives(model, v, x, layer, A, target, fast):
    head = lambda a: model.head(v, a, layer, x=x)
    t = targets.as_target(target)
    c = jnp.argmax(head(A), -1).astype(jnp.int32)
    D, engine = deriv.target_derivatives(
        head, A, t, c, engine="taylor", to_grid=lambda a: model.to_grid(a, layer),
        row_head=model.row_head(v, A, layer, x=x) if fast else None)
    assert engine == "taylor"
    return D.true(), c


@pytest.mark.parametrize("target", ["exp", "logit", "softmax"])
def test_fast_path_equals_generic_taylor_on_vit_ti(target):
    """ViT-Ti/16 (D 192, 12 blocks) at 32 px, float32: the per-token path and the
    generic per-coordinate pass through the whole last block give the same D1..D3."""
    model = jaxcam.models.vit_ti_16(10)
    v, x, layer, A = _setup(model, 32, dtype=jnp.float32)
    fast, _ = _derivatives(model, v, x, layer, A, target, fast=True)
    slow, _ = _derivatives(model, v, x, layer, A, target, fast=False)
    for f, s in zip(fast, slow, strict=True):
        assert f.shape == (2, 2, 2, 192)
        top = float(jnp.max(jnp.abs(s)))
        assert top > 0
        # float32 rounding of two different summation orders of the same numbers
        np.testing.assert_allclose(f, s, rtol=0, atol=2e-5 * top)


@pytest.mark.parametrize("target", ["exp", "softmax"])
def test_fast_path_equals_float64_finite_differences(x64, target):
    """taylor through the fast path == the oracle at 6 trusted coordinates per image,
    within its error bound plus 1e-12 of the scale (taylor's own float64 rounding)."""
    model = _tiny()
    v, x, layer, A = _setup(model, 48, seed=3)
    (d1, d2, d3), c = _derivatives(model, v, x, layer, A, target, fast=True)
    D = np.stack([np.asarray(d).reshape(2, -1) for d in (d1, d2, d3)], -1)  # (B, n, 3)
    phi = targets.get_target(target)
    grid_a = model.to_grid(A, layer)
    rng = np.random.default_rng(0)
    for b in range(2):
        def f(a, b=b):  # a: the grid (batch of lines, g, g, D) -> (lines,)
            tokens = jnp.concatenate(
                [jnp.broadcast_to(A[b:b + 1, :1], (a.shape[0], 1, A.shape[2])),
                 a.reshape(a.shape[0], -1, A.shape[2])], axis=1)
            xs = jnp.broadcast_to(x[b:b + 1], (a.shape[0],) + x.shape[1:])
            return jax.vmap(phi, in_axes=(0, None))(model.head(v, tokens, layer, x=xs), c[b])
        length = float(jnp.sqrt(jnp.mean(grid_a[b] ** 2)))
        scale = testing.derivative_scale(D[b], length, value=f(grid_a[b:b + 1])[0])
        check = testing.check_coordinates(f, grid_a[b], rng.permutation(D.shape[1]), 6,
                                          scale=scale)
        assert check.coords.size == 6, check.refused
        err = np.abs(check.fd.value - D[b, check.coords])
        assert np.all(err <= check.fd.error + 1e-12 * scale), (err, check.fd.error)


def test_explain_uses_the_fast_path_and_differs_from_the_closed_form():
    """explain(derivatives="exact") on a ViT runs taylor through row_head (the same map
    as without it) and the exact Grad-CAM++ map is not the closed form's."""
    model = _tiny()
    v, x, layer, A = _setup(model, 48, dtype=jnp.float32)

    class NoRows:  # the same model without its row_head
        def __init__(self, m):
            self._m = m

        def __getattr__(self, name):
            if name == "row_head":
                raise AttributeError(name)
            return getattr(self._m, name)

    calls = []

    class Spy(NoRows):  # the model, counting calls of its row_head
        def row_head(self, *args, **kwargs):
            calls.append(args[2])
            return self._m.row_head(*args, **kwargs)

    exact = jaxcam.explain(Spy(model), v, x, method="gradcam++", derivatives="exact")
    assert calls == [layer]
    generic = jaxcam.explain(NoRows(model), v, x, method="gradcam++", derivatives="exact")
    closed = jaxcam.explain(model, v, x, method="gradcam++", derivatives="closed_form")
    assert exact.derivatives == generic.derivatives == "exact/taylor"
    np.testing.assert_allclose(exact.maps, generic.maps, atol=1e-4)
    assert float(jnp.max(jnp.abs(exact.maps - closed.maps))) > 1e-2
