"""The ``vit`` section of :mod:`jaxcam.benchmark`: exact Grad-CAM++ through a ViT head.

Cells (ViT-B/16 by default, one image, the default layer ``encoder_layer_11.ln_1``):

- ``gradcam++_exact``: the whole ``jaxcam.explain(..., derivatives="exact")`` call,
  after compilation: the ``taylor`` engine over every coordinate of the 14 x 14 x 768
  grid (150,528 at 224 px), one token row at a time through ``ViTModel.row_head``.
- ``taylor_rows`` / ``taylor_generic``: seconds per coordinate of the per-token path and
  of the generic per-coordinate pass through the whole last block (every token), on the
  same ``--vit-coordinates`` coordinates (the first token rows of the grid): the generic
  path over all coordinates would take hours, so it is timed on a sample, and
  ``ratio_to_rows`` is the speed-up of the per-token path.
- ``gradcam``, ``gradcam++_closed``: the first-order baseline and the closed form.
"""

from __future__ import annotations

from typing import Any

from jaxcam.benchmark.config import METHOD_SPECS, progress


def section_vit(config: Any, bench: Any, store: Any) -> None:
    import jax
    import jax.numpy as jnp

    import jaxcam
    from jaxcam import derivatives as deriv
    from jaxcam import targets
    from jaxcam.timing import measure, with_throughput

    arch = config.vit_arch
    progress(f"[vit] exact Grad-CAM++ through the {arch} head (one image)")
    base = dict(section="vit", impl="jaxcam", arch=arch, image_size=config.image_size,
                batch=1, num_classes=config.num_classes, devices=1)
    cache: dict[str, Any] = {}

    def setup():
        if not cache:
            model = jaxcam.models.get(arch, config.num_classes)
            variables = model.init(jax.random.key(config.seed), image_size=config.image_size)
            x = jax.device_put(bench.images(1))
            cache.update(model=model, variables=variables, x=x)
        return cache["model"], cache["variables"], cache["x"]

    for label in ("gradcam", "gradcam++_closed", "gradcam++_exact"):
        def run(label=label):
            model, variables, x = setup()
            name, extra = METHOD_SPECS[label]
            f = jax.jit(lambda v, x: jaxcam.explain(model, v, x, method=name, **extra).raw)
            result = measure(lambda: f(variables, x), repeats=config.repeats,
                             max_seconds=config.max_seconds)
            return with_throughput(result, 1)

        store.cell(dict(base, method=label), run)

    def coordinate_cell(rows: bool):
        model, variables, x = setup()
        layer = model.default_layer
        A = model.features(variables, x, layer)
        d = A.shape[2]
        tokens = 1 + jnp.arange(max(1, config.vit_coordinates // d), dtype=jnp.int32)
        t = targets.as_target("exp")
        c = jnp.argmax(model.head(variables, A, layer, x=x), -1).astype(jnp.int32)
        # weights and image are arguments of the jitted function: closed over, XLA would
        # constant-fold the attention of the fixed tokens (minutes of compilation)
        if rows:
            def fn(v, x, A):
                g = model.row_head(v, A, layer, x=x)
                s_row = lambda i, a: targets.inner_scores(t, g(i, a), c, None)
                return deriv.taylor_rows(s_row, A, tokens)
        else:
            coords = (tokens[:, None] * d + jnp.arange(d)[None]).reshape(-1)

            def fn(v, x, A):
                s = lambda a: targets.inner_scores(t, model.head(v, a, layer, x=x), c, None)
                return deriv.taylor_derivatives_at(s, A, coords)
        fn = jax.jit(fn)
        result = measure(lambda: fn(variables, x, A), repeats=1, max_seconds=config.max_seconds)
        n = int(tokens.size) * d
        result.update(coordinates=n, seconds_per_coordinate=result["step_s"] / n,
                      full_grid_coordinates=int(model.to_grid(A, layer)[0].size))
        return result

    store.cell(dict(base, method="taylor_rows"), lambda: coordinate_cell(True))
    store.cell(dict(base, method="taylor_generic"), lambda: coordinate_cell(False))
    rows = store.get(**dict(base, method="taylor_rows"))
    generic = store.get(**dict(base, method="taylor_generic"))
    key = "seconds_per_coordinate"
    if rows and generic and key in rows and key in generic:
        ratio = generic["seconds_per_coordinate"] / rows["seconds_per_coordinate"]
        progress(f"    per-token path {ratio:.3g}x faster per coordinate than the generic "
                 f"pass ({rows['seconds_per_coordinate'] * 1e6:.3g} vs "
                 f"{generic['seconds_per_coordinate'] * 1e6:.3g} us)")
