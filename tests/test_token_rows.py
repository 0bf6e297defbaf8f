"""The Taylor engine's per-token path (``row_head``): a transformer block read at the
class token, restricted to what one token row reaches, gives the same exact
derivatives as the generic per-coordinate pass through the whole block."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jaxcam
from jaxcam import derivatives as deriv

N_SIDE, D, HEADS, C = 3, 8, 2, 4
N = 1 + N_SIDE * N_SIDE


def _params(seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    s = 1 / np.sqrt(D)
    return {"qkv": jax.random.normal(k[0], (D, 3 * D)) * s,
            "proj": jax.random.normal(k[1], (D, D)) * s,
            "fc1": jax.random.normal(k[2], (D, 2 * D)) * s,
            "fc2": jax.random.normal(k[3], (2 * D, D)) * s,
            "head": jax.random.normal(k[4], (D, C)),
            "r": jax.random.normal(k[5], (N, D))}


def _ln(z):
    mu = z.mean(-1, keepdims=True)
    return (z - mu) / jnp.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-6)


def _mlp_out(p, y0):
    z0 = y0 + jax.nn.gelu(_ln(y0) @ p["fc1"], approximate=False) @ p["fc2"]
    return _ln(z0) @ p["head"]


def _split(a):  # (B, N, D) -> (B, H, N, D/H)
    return a.reshape(a.shape[0], a.shape[1], HEADS, D // HEADS).transpose(0, 2, 1, 3)


@dataclasses.dataclass(frozen=True)
class AttnModel:
    """features: tokens (B, N, D) = x-derived residual stream r + a LayerNorm; the cut
    is that LayerNorm's output A; head: attention + MLP + LN + classifier at the class
    token, with the residual stream r crossing the cut (recomputed from x)."""

    fast: bool = True
    arch: str = "attn"
    num_classes: int = C
    default_layer: str = "ln1"
    layers: tuple = ("ln1",)

    def resolve_layer(self, name):
        return "ln1"

    def stream(self, v, x):
        return v["r"][None] + x.mean((1, 2, 3))[:, None, None]  # (B, N, D)

    def features(self, v, x, layer=None):
        return _ln(self.stream(v, x))

    def _attend(self, v, A, r):
        q, k, val = (_split(z) for z in jnp.split(A @ v["qkv"], 3, axis=-1))
        att = jax.nn.softmax(q[:, :, :1] @ k.transpose(0, 1, 3, 2) / np.sqrt(D // HEADS), -1)
        o = (att @ val).transpose(0, 2, 1, 3).reshape(A.shape[0], D)
        return r[:, 0] + o @ v["proj"]

    def head(self, v, A, layer=None, x=None):
        return _mlp_out(v, self._attend(v, A, self.stream(v, x)))

    def to_grid(self, A, layer=None):
        return A[:, 1:].reshape(A.shape[0], N_SIDE, N_SIDE, A.shape[-1])

    def row_head(self, v, A, layer=None, x=None):
        if not self.fast:
            return None
        r0 = self.stream(v, x)[:, 0]
        q, k, val = (_split(z) for z in jnp.split(A @ v["qkv"], 3, axis=-1))
        q0 = q[:, :, :1]  # (B, H, 1, dh): the class token's query, fixed (t >= 1)
        logits = (q0 @ k.transpose(0, 1, 3, 2))[:, :, 0] / np.sqrt(D // HEADS)  # (B, H, N)

        def g(t, a):  # row t (>= 1) replaced by a (B, D)
            kt, vt = (z.reshape(a.shape[0], HEADS, D // HEADS)
                      for z in jnp.split(a @ v["qkv"][:, D:], 2, axis=-1))
            lt = jnp.einsum("bhd,bhd->bh", q0[:, :, 0], kt) / np.sqrt(D // HEADS)
            att = jax.nn.softmax(logits.at[:, :, t].set(lt), -1)  # (B, H, N)
            o = jnp.einsum("bhn,bhnd->bhd", att, val.at[:, :, t].set(vt))
            return _mlp_out(v, r0 + o.reshape(a.shape[0], D) @ v["proj"])

        return g

    def apply(self, v, x):
        return self.head(v, self.features(v, x), x=x)


def test_row_head_equals_the_head_with_one_row_replaced(x64):
    model, v = AttnModel(), _params(0)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    A = model.features(v, x)
    g = model.row_head(v, A, x=x)
    a = jax.random.normal(jax.random.PRNGKey(2), (2, D))
    for t in (1, 4, N - 1):
        np.testing.assert_allclose(g(t, a), model.head(v, A.at[:, t].set(a), x=x), rtol=1e-12)


def test_token_rows_equal_the_generic_taylor_pass(x64):
    """Exact D1..D3 (softmax target, smooth head: the Taylor engine) are the same along
    the per-token path and the generic per-coordinate path, and so are the maps."""
    v = _params(3)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, 3))
    fast = jaxcam.explain(AttnModel(True), v, x, method=["gradcam++", "gradcam"],
                          target="softmax")
    slow = jaxcam.explain(AttnModel(False), v, x, method=["gradcam++", "gradcam"],
                          target="softmax")
    assert fast["gradcam++"].derivatives == "exact/taylor"
    for name in fast:
        np.testing.assert_allclose(fast[name].weights, slow[name].weights, rtol=1e-10,
                                   atol=1e-14)
        np.testing.assert_allclose(fast[name].maps, slow[name].maps, atol=1e-10)
    # and the rows themselves, through the dispatcher
    model = AttnModel(True)
    A = model.features(v, x)
    target = jaxcam.targets.as_target("exp")
    c = jnp.array([0, 2])
    head = lambda a: model.head(v, a, x=x)
    kw = dict(engine="taylor", to_grid=model.to_grid)
    ref, _ = deriv.target_derivatives(head, A, target, c, **kw)
    got, _ = deriv.target_derivatives(head, A, target, c, row_head=model.row_head(v, A, x=x),
                                      **kw)
    for r, q in zip(ref, got, strict=True):
        np.testing.assert_allclose(q, r, rtol=1e-10, atol=1e-14)
