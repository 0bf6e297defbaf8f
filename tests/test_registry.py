"""The method registry: a user's method is one decorated function, and runs alone, in a
multi-method call and from the command line; the built-in records are what the
tables say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcam
from jaxcam import methods
from jaxcam.explanation import DEFAULT_TARGETS

SIZE = 32


@pytest.fixture
def absgrad():
    @jaxcam.methods.register("absgrad", default_target="logit", label="AbsGrad",
                             formula="w_k = mean_ij |D1|")
    def _absgrad(q):  # channel weights (B, K)
        return jnp.mean(jnp.abs(q.D1), axis=(1, 2))

    yield "absgrad"
    methods.unregister("absgrad")


@pytest.fixture
def tiny():
    model = jaxcam.models.resnet50(num_classes=3)
    return model, model.init(jax.random.PRNGKey(0), image_size=SIZE)


def test_user_method_alone_and_with_others(absgrad, tiny):
    model, v = tiny
    x = jax.random.normal(jax.random.PRNGKey(1), (2, SIZE, SIZE, 3))
    assert "absgrad" in jaxcam.METHODS and jaxcam.METHODS[-1] == "absgrad"
    assert DEFAULT_TARGETS["absgrad"] == "logit"
    alone = jaxcam.explain(model, v, x, method="absgrad", layer="layer3")
    together = jaxcam.explain(model, v, x, method=["gradcam", "absgrad"], layer="layer3")
    A = model.features(v, x, "layer3")
    c = alone.class_idx  # the class explain chose (not re-derived in another program)
    g = jax.grad(lambda a: jnp.sum(model.head(v, a, "layer3")[jnp.arange(2), c]))(A)
    expected = jnp.mean(jnp.abs(g), axis=(1, 2))
    np.testing.assert_allclose(alone.weights, expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(together["absgrad"].maps, alone.maps, atol=1e-6)
    np.testing.assert_allclose(together["gradcam"].weights, jnp.mean(g, axis=(1, 2)),
                               rtol=1e-5, atol=1e-8)
    assert alone.method == "absgrad" and alone.target == "logit"


def test_a_method_that_returns_a_map(tiny):
    @methods.register("gradnorm_map", output="map", needs=("D1",))
    def _gradnorm(q):
        return jnp.sqrt(jnp.sum(q.D1**2, axis=-1))

    try:
        model, v = tiny
        x = jax.random.normal(jax.random.PRNGKey(2), (1, SIZE, SIZE, 3))
        ex = jaxcam.explain(model, v, x, method="gradnorm_map", layer="layer3")
        assert ex.weights is None and ex.raw.shape == (1, 2, 2)
    finally:
        methods.unregister("gradnorm_map")


def test_registration_errors():
    with pytest.raises(ValueError, match="'gradcam' is already registered"):
        methods.register("gradcam")(lambda q: q.D1)
    with pytest.raises(ValueError, match=r"needs unknown quantities \['D4'\]"):
        methods.register("x", needs=("D4",))(lambda q: q.D1)
    with pytest.raises(ValueError, match="output must be one of"):
        methods.register("x", output="heatmap")(lambda q: q.D1)
    with pytest.raises(ValueError, match="Unknown target 'probability'"):
        methods.register("x", default_target="probability")(lambda q: q.D1)
    with pytest.raises(ValueError, match="other than 'all'"):
        methods.register("all")(lambda q: q.D1)
    with pytest.raises(ValueError, match=r"Unknown method 'nope'; use one of \('cam'"):
        methods.get("nope")
    assert "x" not in jaxcam.METHODS


def test_builtin_records_match_the_readme_table():
    """README's methods table is generated from the registry's records: the rows must
    name every registered built-in with its formula and paper link."""
    readme = open("README.md").read()
    for name in ("cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam",
                 "scorecam", "shapleycam"):
        record = methods.get(name)
        assert f"| `{name}` | `{record.formula}` | [{record.paper}]({record.url}) |" in readme
    assert methods.get("gradcam++").higher and not methods.get("gradcam").higher
    assert methods.get("gradcam++").default_target == "exp"
