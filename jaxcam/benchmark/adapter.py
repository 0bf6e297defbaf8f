"""The ``adapter`` section of :mod:`jaxcam.benchmark`: what ``from_linen`` costs.

jaxcam's own ResNet-50 (native ``Model``, cut at ``layer4``) against the same Flax
module wrapped by ``jaxcam.models.from_linen`` (cut at ``layer4/2``, the same tensor),
same variables, same image, one image per call, jitted ``jaxcam.explain(...).raw``:

- ``gradcam`` and ``gradcam++_exact`` (the certificate-checked factored engine), timed
  interleaved (native, adapter, native, ...;
  :func:`jaxcam.timing.measure_interleaved`), so ``ratio_to_native`` (adapter / native,
  median over rounds; goal <= 1.05) sees the same machine load on both sides;
- ``flops_native`` / ``flops_adapter``: XLA's cost analysis of the two compiled
  programs (equal when the adapter's interceptors add nothing and jit drops the
  unused forward pass after the cut); ``max_abs_diff``: the raw maps agree.

Run alone: ``python -m experiments.benchmark --only adapter --repeats 5``.
"""

from __future__ import annotations

from typing import Any

from jaxcam.benchmark.config import METHOD_SPECS, progress

LABELS = ("gradcam", "gradcam++_exact")


def _flops(f: Any, *args: Any) -> float | None:
    cost = f.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return None if not cost or "flops" not in cost else float(cost["flops"])


def section_adapter(config: Any, bench: Any, store: Any) -> None:
    import jax
    import numpy as np

    import jaxcam
    from jaxcam.timing import measure_interleaved, with_throughput

    progress("[adapter] from_linen(ResNet-50 module) vs the native model (one image)")
    s = config.image_size
    base = dict(section="adapter", impl="from_linen", arch="resnet50", image_size=s,
                batch=1, num_classes=config.num_classes, devices=1)
    cache: dict[str, Any] = {}

    def setup():
        if not cache:
            native, variables, _ = bench.model("resnet50", config.num_classes)
            adapted = jaxcam.models.from_linen(native.module, input_shape=(1, s, s, 3),
                                               name="resnet50")
            cache.update(models={"native": (native, "layer4"), "adapter": (adapted, "layer4/2")},
                         variables=variables, x=jax.device_put(bench.images(1)))
        return cache["models"], cache["variables"], cache["x"]

    for label in LABELS:
        def run(label=label):
            models, v, x = setup()
            name, extra = METHOD_SPECS[label]
            fns = {
                side: jax.jit(lambda v, x, m=m, layer=layer: jaxcam.explain(
                    m, v, x, method=name, layer=layer, **extra).raw)
                for side, (m, layer) in models.items()
            }
            timed = measure_interleaved({side: (lambda f=f: f(v, x)) for side, f in
                                            fns.items()}, reference="native",
                                           rounds=config.repeats, max_seconds=config.max_seconds)
            raws = {side: np.asarray(f(v, x)) for side, f in fns.items()}
            result = dict(timed["adapter"], native_step_s=timed["native"]["step_s"],
                          native_step_min_s=timed["native"]["step_min_s"],
                          ratio_to_native=timed["adapter"]["ratio_to_reference"],
                          max_abs_diff=float(np.abs(raws["adapter"] - raws["native"]).max()))
            for side, f in fns.items():
                result[f"flops_{side}"] = _flops(f, v, x)
            progress(f"    {label}: adapter {result['step_s']:.4g} s, native "
                     f"{result['native_step_s']:.4g} s, ratio {result['ratio_to_native']:.3f}"
                     f" (flops {result['flops_adapter']} vs {result['flops_native']})")
            return with_throughput(result, 1)

        store.cell(dict(base, method=label), run, log=progress)

