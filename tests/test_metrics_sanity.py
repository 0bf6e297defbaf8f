"""Cascading randomisation on a toy model whose map is known in closed form."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcam import metrics

S = 32


@dataclasses.dataclass(frozen=True)
class PositionalModel:
    """score(x) = exp(head) * sum_ij pos_ij * mean_c x_ijc.

    Its input-gradient map is |pos| * exp(head) / 3: re-initialising ``head``
    only rescales the map (same ranking), re-initialising ``pos`` replaces it by
    an independent random field.
    """

    param_order: tuple[str, ...] = ("pos", "head")

    def init(self, rng, image_size):
        k1, k2 = jax.random.split(rng)
        return {"params": {"pos": jax.random.normal(k1, (image_size, image_size)),
                           "head": {"scale": jax.random.normal(k2, ())}}}

    def apply(self, variables, x):
        p = variables["params"]
        s = jnp.exp(p["head"]["scale"]) * jnp.sum(p["pos"] * jnp.mean(x, -1), axis=(1, 2))
        return s[:, None]


MODEL = PositionalModel()


@jax.jit
def saliency(variables, x):
    g = jax.grad(lambda z: jnp.sum(MODEL.apply(variables, z)))(x)
    return jnp.sum(jnp.abs(g), axis=-1)


def test_correlation_stays_one_after_head_and_drops_to_zero_after_all_layers():
    variables = MODEL.init(jax.random.PRNGKey(0), S)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, S, S, 3))
    out = metrics.cascading_randomization(MODEL, variables, x, saliency,
                                          rng=jax.random.PRNGKey(2))
    assert out.layers == ("head", "pos")
    np.testing.assert_allclose(out.maps[0], saliency(variables, x), rtol=1e-6)
    np.testing.assert_allclose(out.spearman[0], 1.0, atol=1e-5)  # only rescaled
    np.testing.assert_allclose(out.ssim[0], 1.0, atol=1e-4)
    assert np.all(np.abs(np.asarray(out.spearman[1])) < 0.15)  # sd ~ 1/sqrt(1024)
    assert np.all(np.asarray(out.ssim[1]) < 0.3)


def test_a_map_that_ignores_the_parameters_passes_as_unchanged():
    # An edge detector of the input alone: the check must flag it (correlation 1).
    variables = MODEL.init(jax.random.PRNGKey(0), S)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, S, S, 3))
    edges = lambda v, z: jnp.abs(jnp.diff(z.mean(-1), axis=1, append=0.0))
    out = metrics.cascading_randomization(MODEL, variables, x, edges, rng=jax.random.PRNGKey(2))
    np.testing.assert_allclose(out.spearman, 1.0, atol=1e-6)


def test_sanity_errors_name_the_problem():
    variables = MODEL.init(jax.random.PRNGKey(0), S)
    x = jnp.zeros((1, S, S, 3))
    with pytest.raises(ValueError, match="model must define param_order"):
        metrics.cascading_randomization(object(), variables, x, saliency, rng=jax.random.PRNGKey(0))
    bad = dataclasses.replace(MODEL, param_order=("pos", "classifier"))
    with pytest.raises(ValueError, match=r"param_order names \['classifier'\]"):
        metrics.cascading_randomization(bad, variables, x, saliency, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"explain_fn must return maps of shape \(B, H, W\)"):
        metrics.cascading_randomization(MODEL, variables, x, lambda v, z: z,
                                        rng=jax.random.PRNGKey(0))
