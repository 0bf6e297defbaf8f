"""The fast paths stay fast: no recompilation, shared work across methods, bounded chunks, float32.

Counts come from ``jax.monitoring`` events (one per jaxpr trace and one per
XLA compilation), through ``jaxcam.compilation.CompileCounter`` -- the same
counter the benchmark reports as ``recompiles``. The model is a tiny
GAP + dense CNN built from the same ``Stage``/``StagedNet`` machinery as the
real architectures, so every ``jaxcam.explain`` path is exercised in seconds.
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcam
from jaxcam.compilation import CompileCounter
from jaxcam.models.base import Model, Stage, StagedNet, batch_norm, conv, global_average_pool, relu

NUM_CLASSES = 5
IMAGE = 32
ALL_GRADIENT = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "shapleycam", "cam"]


def _conv_bn_relu(features: int, stride: int, name: str, children, x, train: bool):
    x = conv(features, 3, f"{name}_conv", stride=stride)(x)
    return relu(batch_norm(train, f"{name}_bn")(x))


def _dense(num_classes: int, children, x, train: bool):
    return nn.Dense(num_classes, name="fc")(x)


def tiny_model(num_classes: int = NUM_CLASSES, width: int = 8) -> Model:
    """A 3-conv CNN (conv-BN-ReLU blocks, stride 2 twice) + GAP + dense, cut at
    ``block1``/``block2``/``block3`` (default ``block3``: a 8x8 map at 32 px)."""
    stages = (
        Stage("block1", partial(_conv_bn_relu, width, 1, "block1"), out_channels=width),
        Stage("block2", partial(_conv_bn_relu, 2 * width, 2, "block2"), out_channels=2 * width),
        Stage("block3", partial(_conv_bn_relu, 2 * width, 2, "block3"), out_channels=2 * width),
        Stage("avgpool", lambda children, x, train: global_average_pool(x),
              out_channels=2 * width, cut=False, role="gap"),
        Stage("fc", partial(_dense, num_classes), out_channels=num_classes, cut=False,
              role="dense", dense_path=("fc",)),
    )
    return Model(arch="tiny_cnn", num_classes=num_classes, module=StagedNet(stages),
                 default_layer="block3",
                 param_order=("block1_conv", "block1_bn", "block2_conv", "block2_bn",
                              "block3_conv", "block3_bn", "fc"))


def tiny_variables(model: Model, seed: int = 0) -> dict:
    """Random variables without compiling ``init`` (shapes from ``eval_shape``):
    He-normal kernels, small random biases / BN statistics, so that BN is not the
    identity and the head is generic."""
    shapes = jax.eval_shape(model.module.init, jax.random.key(0),
                            jnp.zeros((1, IMAGE, IMAGE, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if "kernel" in name:
            fan_in = math.prod(shape[:-1])
            value = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
        elif "var" in name:
            value = rng.uniform(0.5, 1.5, shape)
        elif "scale" in name:
            value = rng.uniform(0.8, 1.2, shape)
        else:  # bias, mean
            value = 0.1 * rng.standard_normal(shape)
        return jnp.asarray(value, jnp.float32)

    return dict(jax.tree_util.tree_map_with_path(fill, shapes))


def tiny_images(batch: int, seed: int = 1) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((batch, IMAGE, IMAGE, 3)), jnp.float32)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, tiny_variables(model)


def _counting(fn):
    with CompileCounter() as counter:
        out = jax.block_until_ready(fn())
    return out, counter


def test_compile_counter_counts_a_fresh_jit_and_not_a_cached_call():
    f = jax.jit(lambda x: jnp.sin(x) * 3.0)
    x, x8 = np.arange(7.0, dtype=np.float32), np.arange(8.0, dtype=np.float32)
    _, first = _counting(lambda: f(x))
    _, again = _counting(lambda: f(x))
    _, other_shape = _counting(lambda: f(x8))
    assert (first.compiles, again.compiles, other_shape.compiles) == (1, 0, 1)
    assert again.traces == 0 and first.compile_seconds > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="gradcam"),
        dict(method="gradcam++"),  # exact, factored engine behind the certificate
        dict(method=ALL_GRADIENT),
        dict(method="scorecam", scorecam_batch_size=4),
    ],
    ids=["gradcam", "gradcam++exact", "all-gradient", "scorecam"],
)
def test_explain_called_again_with_the_same_shapes_does_not_recompile(tiny, kwargs):
    model, variables = tiny
    x = tiny_images(2)
    first, c1 = _counting(lambda: jaxcam.explain(model, variables, x, **kwargs))
    assert c1.compiles >= 1  # the first call compiles
    # new data, same shapes: served from the cache, no retrace, no recompilation
    x_new = tiny_images(2, seed=7)
    second, c2 = _counting(lambda: jaxcam.explain(model, variables, x_new, **kwargs))
    assert c2.compiles == 0, f"explain recompiled {c2.compiles} time(s) on a repeated call"
    third, c3 = _counting(lambda: jaxcam.explain(model, variables, x, **kwargs))
    assert c3.compiles == 0
    a = first if isinstance(first, dict) else {"m": first}
    b = third if isinstance(third, dict) else {"m": third}
    for name in a:  # same inputs -> bit-identical results from the cached executable
        np.testing.assert_array_equal(np.asarray(a[name].maps), np.asarray(b[name].maps))
        # float32 throughout unless the caller enables x64
        for field in ("maps", "raw", "logits", "weights"):
            value = getattr(a[name], field)
            assert value is None or value.dtype == jnp.float32, (name, field, value.dtype)


def test_a_new_batch_size_compiles_once_then_is_cached(tiny):
    model, variables = tiny
    jaxcam.explain(model, variables, tiny_images(2), method="gradcam")
    x3 = tiny_images(3)
    _, c1 = _counting(lambda: jaxcam.explain(model, variables, x3, method="gradcam"))
    _, c2 = _counting(lambda: jaxcam.explain(model, variables, x3, method="gradcam"))
    assert c1.compiles >= 1 and c2.compiles == 0


class CountingModel:
    """Delegates to a Model and counts how often ``features`` / ``head`` / ``apply``
    are traced (each call on tracers is one appearance in the compiled program)."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self.calls = {"features": 0, "head": 0, "apply": 0}

    def __getattr__(self, name):
        return getattr(self._model, name)

    def features(self, *args, **kwargs):
        self.calls["features"] += 1
        return self._model.features(*args, **kwargs)

    def head(self, *args, **kwargs):
        self.calls["head"] += 1
        return self._model.head(*args, **kwargs)

    def apply(self, *args, **kwargs):
        self.calls["apply"] += 1
        return self._model.apply(*args, **kwargs)


def _traced_calls(model, variables, method) -> dict[str, int]:
    counting = CountingModel(model)
    x = tiny_images(2)
    counting.calls = {"features": 0, "head": 0, "apply": 0}
    jax.block_until_ready(jaxcam.explain(counting, variables, x, method=method))
    return dict(counting.calls)


def test_methods_requested_together_share_one_forward_pass_and_one_head_vjp(tiny):
    """Grad-CAM, exact Grad-CAM++, XGrad-CAM, HiResCAM and LayerCAM in one call trace
    the backbone (``features``) as often as Grad-CAM alone does and the head as
    often as Grad-CAM++ alone does (its certificate probe + its one VJP): the
    other methods add no forward or backward pass of their own."""
    model, variables = tiny
    together = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"]
    shared = _traced_calls(model, variables, together)
    gradcam = _traced_calls(model, variables, "gradcam")
    gradcam_pp = _traced_calls(model, variables, "gradcam++")
    assert shared["features"] == gradcam["features"] == gradcam_pp["features"]
    assert shared["head"] == gradcam_pp["head"]
    assert shared["apply"] == 0  # no separate full forward pass either
    # and the shared call returns exactly what the separate calls return
    x = tiny_images(2)
    exs = jaxcam.explain(model, variables, x, method=together)
    for m in ("gradcam", "gradcam++"):
        single = jaxcam.explain(model, variables, x, method=m)
        np.testing.assert_allclose(np.asarray(exs[m].maps), np.asarray(single.maps),
                                   rtol=0, atol=1e-6)


def _temp_bytes(fn, *args) -> int:
    """XLA's own estimate of the scratch memory of the compiled program."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    return int(stats.temp_size_in_bytes)


def test_taylor_chunk_size_bounds_the_compiled_scratch_memory(tiny):
    """Smaller ``chunk_size`` -> fewer coordinates in flight -> less scratch memory
    in the compiled program, with identical derivatives."""
    model, variables = tiny
    A = model.features(variables, tiny_images(1), "block3")  # (1, 8, 8, 16): 1024 coords
    f = lambda a: jnp.exp(model.head(variables, a, "block3")[:, 0])
    small = lambda a: jaxcam.diagonal_derivatives(f, a, engine="taylor", chunk_size=8)
    large = lambda a: jaxcam.diagonal_derivatives(f, a, engine="taylor", chunk_size=1024)
    t_small, t_large = _temp_bytes(small, A), _temp_bytes(large, A)
    assert t_small * 4 < t_large, (t_small, t_large)
    for d_small, d_large in zip(jax.jit(small)(A), jax.jit(large)(A), strict=True):
        np.testing.assert_allclose(np.asarray(d_small), np.asarray(d_large), rtol=1e-5,
                                   atol=1e-6)


def test_scorecam_batch_size_bounds_the_compiled_scratch_memory(tiny):
    model, variables = tiny
    x = tiny_images(1)
    run = lambda n: (lambda x: jaxcam.explain(model, variables, x, method="scorecam",
                                              scorecam_batch_size=n).raw)
    t_small, t_large = _temp_bytes(run(1), x), _temp_bytes(run(16), x)
    assert t_small * 4 < t_large, (t_small, t_large)
    np.testing.assert_allclose(np.asarray(run(1)(x)), np.asarray(run(16)(x)), rtol=1e-5,
                               atol=1e-6)
