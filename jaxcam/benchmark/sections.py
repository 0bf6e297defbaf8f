"""The benchmark's measuring sections: ``forward``, ``methods``, ``torch``, ``engine``,
``metrics``, ``scaling`` (see :mod:`jaxcam.benchmark`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxcam import timing, weights
from jaxcam.benchmark.config import (
    KEY_FIELDS,
    METHOD_SPECS,
    SHARED_CALL,
    SHARED_LABEL,
    TORCH_METHODS,
    VIT_ARCHS,
    BenchmarkConfig,
    ResultStore,
    Workbench,
    cell_key,
    explain_call,
    progress,
    scorecam_chunk,
)
from jaxcam.timing import measure, measure_interleaved, with_throughput


def section_forward(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    import jax

    progress("[forward] eval-mode model.apply under jax.jit")
    for arch in config.archs:
        for batch in config.batch_sizes:
            key = cell_key(config, "forward", arch, batch, "apply")

            def run(arch=arch, batch=batch):
                model, variables, _ = bench.model(arch, config.num_classes)
                x = jax.device_put(bench.images(batch))
                apply = jax.jit(model.apply)
                return with_throughput(
                    measure(lambda: apply(variables, x), repeats=config.repeats,
                            max_seconds=config.max_seconds),
                    batch,
                )

            store.cell(key, run)


def section_methods(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    import jax

    import jaxcam

    progress("[methods] jaxcam.explain, maps upsampled to the input and normalised")
    labels = [m for m in config.methods if m in METHOD_SPECS]
    shared = [m for m in SHARED_CALL if m in labels]
    for arch in config.archs:
        for batch in config.batch_sizes:
            cells = [(label, (label,)) for label in labels]
            if len(shared) > 1:
                cells.append((SHARED_LABEL, tuple(shared)))
            for name, group in cells:
                key = cell_key(config, "methods", arch, batch, name)

                def run(arch=arch, batch=batch, group=group):
                    model, variables, _ = bench.model(arch, config.num_classes)
                    _, reason = jaxcam.methods.placement(METHOD_SPECS[group[0]][0], model,
                                                         variables, model.default_layer)
                    if reason:
                        return {"skipped": f"CAM needs a GAP + dense head; {reason}"}
                    x = jax.device_put(bench.images(batch))
                    call = explain_call(model, variables, x, group)
                    last = {}

                    def explain_and_keep():
                        last["out"] = call()
                        return last["out"]

                    result = measure(explain_and_keep, repeats=config.repeats,
                                     max_seconds=config.max_seconds)
                    if len(group) == 1:  # kept for the torch section's agreement check
                        bench.maps[(arch, batch, group[0])] = np.asarray(last["out"].maps)
                    if len(group) > 1:
                        result["methods"] = list(group)
                    if group == ("scorecam",):
                        result["scorecam_batch_size"] = scorecam_chunk(batch)
                    return with_throughput(result, batch)

                store.cell(key, run)


def section_torch(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    if not bench.use_torch:
        progress(f"[torch] {bench.torch_note}")
        return
    os.environ.setdefault("TQDM_DISABLE", "1")  # ScoreCAM's per-chunk progress bars
    import torch

    torch.set_num_threads(config.threads)
    import pytorch_grad_cam

    progress(
        f"[torch] torchvision forward and pytorch-grad-cam on the same weights "
        f"({torch.get_num_threads()} threads)"
    )
    for arch in config.archs:
        for batch in config.batch_sizes:
            key = cell_key(config, "torch", arch, batch, "apply", impl="torch")

            def run_forward(arch=arch, batch=batch):
                _, _, torch_model = bench.model(arch, config.num_classes)
                x = torch.from_numpy(bench.images(batch).transpose(0, 3, 1, 2).copy())

                def forward():
                    with torch.no_grad():
                        return torch_model(x)

                return with_throughput(
                    measure(forward, repeats=config.repeats, max_seconds=config.max_seconds,
                            sync=lambda out: out, track_compiles=False),
                    batch,
                )

            store.cell(key, run_forward)
            done: dict[str, str] = {}
            for label in config.methods:
                cls_name = TORCH_METHODS.get(label)
                if cls_name is None:
                    continue
                key = dict(key, section="torch", impl="pytorch-grad-cam", method=label)

                def run(arch=arch, batch=batch, label=label, cls_name=cls_name, key=key,
                        done=done):
                    # Grad-CAM++ closed and "exact" map to the same pytorch-grad-cam
                    # class: measure it once, copy the numbers.
                    if cls_name in done:
                        prev = store.get(**dict(key, method=done[cls_name]))
                        if prev and "step_s" in prev:
                            return {k: v for k, v in prev.items() if k not in KEY_FIELDS}
                    model, variables, torch_model = bench.model(arch, config.num_classes)
                    layer = model.resolve_layer(model.default_layer)
                    if cls_name == "ScoreCAM":
                        too_big = _pgc_scorecam_too_big(model, variables, batch,
                                                        config.image_size)
                        if too_big:
                            return {"skipped": too_big}
                    cam = getattr(pytorch_grad_cam, cls_name)(
                        model=torch_model,
                        target_layers=[weights.torchvision_module(torch_model, layer)],
                        reshape_transform=(weights.vit_reshape_transform if arch in VIT_ARCHS
                                           else None),
                    )
                    images = bench.images(batch)
                    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
                    last = {}

                    def cam_and_keep():
                        last["out"] = cam(input_tensor=x, targets=None)
                        return last["out"]

                    result = measure(cam_and_keep, repeats=config.repeats,
                                     max_seconds=config.max_seconds,
                                     sync=lambda out: out, track_compiles=False)
                    ours = bench.maps.get((arch, batch, label))
                    result["agreement"] = _agreement(model, variables, images, label,
                                                     last["out"], ours)
                    result["torch_class"] = cls_name
                    return with_throughput(result, batch)

                store.cell(key, run)
                done.setdefault(cls_name, label)


def _pgc_scorecam_too_big(model, variables, batch: int, size: int) -> str | None:
    """pytorch-grad-cam's ScoreCAM materialises every masked input at once
    (``B x K x 3 x H x W`` float32, plus the ``B x K x H x W`` masks); refuse
    cells that would need more than half the available memory."""
    import jax
    import psutil

    k = jax.eval_shape(lambda v, x: model.features(v, x), variables,
                       jax.ShapeDtypeStruct((1, size, size, 3), np.float32)).shape[-1]
    need = batch * k * 4 * size * size * 4
    available = psutil.virtual_memory().available
    if need > available / 2:
        return (f"pytorch-grad-cam ScoreCAM would materialise {need / 2**30:.1f} GiB of masked "
                f"inputs ({available / 2**30:.1f} GiB available)")
    return None


def _agreement(model, variables, images: np.ndarray, label: str, torch_maps: np.ndarray,
               ours: np.ndarray | None = None) -> dict:
    """How close jaxcam's maps are to pytorch-grad-cam's on the same weights and inputs.

    Reported, not asserted: Grad-CAM, XGrad-CAM, HiResCAM, LayerCAM and
    closed-form Grad-CAM++ should match to float32 rounding; exact Grad-CAM++
    and Score-CAM differ by design (true derivatives; normalisation details).

    ``reference_peak_min``: the smallest per-image maximum of pytorch-grad-cam's maps.
    It normalises ``(cam - min) / (max + 1e-7)``, so where the raw map is far below
    1e-7 (random torchvision EfficientNet-B0: activations ~5e-13 at ``features.8``)
    its maps are flat near 0 while jaxcam's reach 1: ``max_abs_diff`` is then ~1 for
    maps that agree up to scale (``min_pearson`` ~1), and this field says so.
    """
    import jaxcam

    if ours is None:  # the methods section did not run in this process: compute them
        method, kwargs = METHOD_SPECS[label]
        if method == "scorecam":
            kwargs = dict(kwargs, scorecam_batch_size=scorecam_chunk(images.shape[0]))
        ours = jaxcam.explain(model, variables, images, method=method, **kwargs).maps
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(torch_maps, dtype=np.float64)
    if ours.shape != theirs.shape:
        return {"note": f"shapes differ: {ours.shape} vs {theirs.shape}"}
    corr = [
        float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
        if a.std() > 0 and b.std() > 0 else float("nan")
        for a, b in zip(ours, theirs, strict=True)
    ]
    finite = [c for c in corr if math.isfinite(c)]
    return {"max_abs_diff": float(np.abs(ours - theirs).max()),
            "min_pearson": min(finite) if finite else None,
            "reference_peak_min": float(theirs.reshape(len(theirs), -1).max(axis=1).min())}


def section_engine(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    import jax
    import jax.numpy as jnp

    import jaxcam

    progress("[engine] derivative engines alone, and Grad-CAM++ as a ratio to Grad-CAM")
    arch = "resnet50" if "resnet50" in config.archs else config.archs[0]
    batch = config.engine_batch
    c_main = config.engine_num_classes[0]

    prepared: dict[tuple[int, int], Any] = {}

    def setup(num_classes: int, b: int):
        if (num_classes, b) in prepared:
            return prepared[(num_classes, b)]
        model, variables, _ = bench.model(arch, num_classes)
        layer = model.default_layer
        x = jax.device_put(bench.images(b))
        A = jax.jit(lambda v, x: model.features(v, x, layer=layer))(variables, x)
        cls = jnp.argmax(jax.jit(model.apply)(variables, x), axis=-1)

        def f(A):  # exp target of the explained class, one scalar per image
            S = model.head(variables, A, layer=layer)
            return jnp.exp(jnp.take_along_axis(S, cls[:, None], axis=-1)[:, 0])

        prepared[(num_classes, b)] = (model, variables, x, A, f, cls)
        return prepared[(num_classes, b)]

    base = dict(section="engine", impl="jaxcam", arch=arch, image_size=config.image_size,
                num_classes=c_main, devices=1)

    def run_taylor():
        _, _, _, A, f, _ = setup(c_main, 1)
        chunk = config.taylor_chunk_size
        kwargs = {} if chunk is None else {"chunk_size": chunk}
        dd = jax.jit(lambda A: jaxcam.diagonal_derivatives(f, A, engine="taylor", **kwargs))
        result = measure(lambda: dd(A), repeats=1, max_seconds=config.max_seconds)
        result["coordinates_per_image"] = int(np.prod(A.shape[1:]))
        result["chunk_size"] = config.taylor_chunk_size
        result["seconds_per_image"] = result["step_s"]
        return with_throughput(result, 1)

    store.cell(dict(base, batch=1, method="taylor"), run_taylor)

    def run_factored():
        model, variables, x, A, _, cls = setup(c_main, batch)
        layer = model.default_layer
        head = lambda A: model.head(variables, A, layer=layer)
        dd = jax.jit(lambda A: jaxcam.diagonal_derivatives(
            None, A, engine="factored", head=head, target="exp", class_idx=cls, certified=True))
        return with_throughput(
            measure(lambda: dd(A), repeats=config.repeats, max_seconds=config.max_seconds), batch
        )

    store.cell(dict(base, batch=batch, method="factored"), run_factored)

    def run_certificate():
        model, variables, _, A, _, _ = setup(c_main, batch)
        head = lambda A: model.head(variables, A, layer=model.default_layer)
        result = measure(lambda: jaxcam.derivatives.is_piecewise_linear(head, A),
                         repeats=config.repeats, max_seconds=config.max_seconds)
        result["function"] = "jaxcam.derivatives.is_piecewise_linear"
        return with_throughput(result, batch)

    store.cell(dict(base, batch=batch, method="certificate"), run_certificate)

    labels = ("apply", "gradcam", "gradcam++_closed", "gradcam++_exact")
    for num_classes in config.engine_num_classes:
        keys = {label: dict(base, section="engine_ratio", batch=batch, method=label,
                            num_classes=num_classes) for label in labels}
        if all(store.has(**k) for k in keys.values()):
            progress(f"  skip (already measured): ratios at {num_classes} classes")
            continue
        progress(f"  measuring Grad-CAM++ / Grad-CAM / forward, interleaved, "
                 f"{num_classes} classes, batch {batch} ...")
        try:
            model, variables, x, _, _, _ = setup(num_classes, batch)
            apply = jax.jit(model.apply)
            calls = {"apply": lambda apply=apply, v=variables, x=x: apply(v, x)}
            for label in labels[1:]:
                calls[label] = explain_call(model, variables, x, (label,))
            results = measure_interleaved(calls, reference="gradcam",
                                          rounds=max(3, config.repeats),
                                          max_seconds=config.max_seconds)
        except Exception as err:  # keep the rest of a long run
            results = {label: {"error": f"{type(err).__name__}: {err}"[:500]}
                       for label in labels}
        for label in labels:
            record = {**keys[label], **results[label]}
            if "step_s" in record:
                with_throughput(record, batch)
            store.add(record)
            if "ratio_to_reference" in record:
                progress(f"    {label}: {record['step_s']:.3g} s/batch, "
                         f"{record['ratio_to_reference']:.3g}x Grad-CAM")


def _metric_calls(model, variables, x, maps, maps_b) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per metric of ``jaxcam.metrics``, with its defaults.

    ``maps`` are Grad-CAM maps, ``maps_b`` Grad-CAM++ maps (for the agreement
    metrics); masks for localization are the top half of ``maps_b``.
    """
    import jax
    import jax.numpy as jnp

    import jaxcam.metrics as m

    score_fn = lambda images: jax.nn.softmax(model.apply(variables, images), axis=-1)
    class_idx = jnp.argmax(model.apply(variables, x), axis=-1)
    masks = maps_b > 0.5
    explain_fn = lambda v, images: jaxcam_explain()(model, v, images, method="gradcam",
                                                  class_idx=class_idx)
    return {
        "average_drop": lambda: m.average_drop(score_fn, x, maps, class_idx),
        "increase_in_confidence": lambda: m.increase_in_confidence(score_fn, x, maps, class_idx),
        "deletion": lambda: m.deletion(score_fn, x, maps, class_idx),
        "insertion": lambda: m.insertion(score_fn, x, maps, class_idx),
        "road": lambda: m.road(score_fn, x, maps, class_idx, rng=jax.random.key(0)),
        "pointing_game": lambda: m.pointing_game(maps, masks),
        "energy_pointing_game": lambda: m.energy_pointing_game(maps, masks),
        "spearman": lambda: m.spearman(maps, maps_b),
        "ssim": lambda: m.ssim(maps, maps_b),
        "top_k_iou": lambda: m.top_k_iou(maps, maps_b),
        "cascading_randomization": lambda: m.cascading_randomization(
            model, variables, x, explain_fn, rng=jax.random.key(1)),
    }


def jaxcam_explain():
    import jaxcam

    return jaxcam.explain


def section_metrics(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    import jax

    import jaxcam

    progress("[metrics] jaxcam.metrics throughput on ResNet-50")
    arch = "resnet50"
    batch = config.metrics_batch
    model, variables, _ = bench.model(arch, config.num_classes)
    x = jax.device_put(bench.images(batch))
    exs = jaxcam.explain(model, variables, x, method=["gradcam", "gradcam++"])
    calls = _metric_calls(model, variables, x, exs["gradcam"].maps, exs["gradcam++"].maps)
    for name, call in calls.items():
        if config.metric_names and name not in config.metric_names:
            continue
        key = cell_key(config, "metrics", arch, batch, name)
        store.cell(key, lambda call=call: with_throughput(
            measure(call, repeats=config.repeats, max_seconds=config.max_seconds), batch))


SCALING_WORKER = r"""
import json, sys, time
import jax, numpy as np
import jaxcam
from jaxcam import distributed
from jaxcam.timing import measure
args = json.loads(sys.argv[1])
arch, image_size, batch, num_classes, repeats, max_seconds = (
    args[k] for k in ("arch", "image_size", "batch", "num_classes", "repeats", "max_seconds"))
model = jaxcam.models.get(arch, num_classes)
variables = model.init(jax.random.key(0), image_size=image_size)
mesh = distributed.data_mesh()
variables = distributed.replicate(variables, mesh)
x = np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
x = distributed.shard_batch(x, mesh)
apply = jax.jit(model.apply)
out = {"devices": len(jax.devices()),
       "forward": measure(lambda: apply(variables, x), repeats=repeats, max_seconds=max_seconds),
       "gradcam": measure(lambda: jaxcam.explain(model, variables, x, method="gradcam"),
                          repeats=repeats, max_seconds=max_seconds)}
print("RESULT " + json.dumps(out))
"""


def section_scaling(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    progress(
        "[scaling] batch sharded over forced host devices, one fresh process each "
        "(forced CPU devices share the same cores)"
    )
    root = str(Path(__file__).resolve().parents[2])
    for devices in config.scaling_devices:
        base = dict(section="scaling", impl="jaxcam", arch=config.scaling_arch,
                    image_size=config.image_size, batch=config.scaling_batch,
                    num_classes=config.num_classes, devices=devices)
        if store.has(**base, method="apply") and store.has(**base, method="gradcam"):
            progress(f"  skip (already measured): devices={devices}")
            continue
        progress(f"  measuring devices={devices} ...")
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        payload = dict(arch=config.scaling_arch, image_size=config.image_size,
                       batch=config.scaling_batch, num_classes=config.num_classes,
                       repeats=config.repeats, max_seconds=config.max_seconds)
        try:
            _, out = timing.run_worker(SCALING_WORKER, payload, env, root)
        except RuntimeError as err:
            for method in ("apply", "gradcam"):
                store.add({**base, "method": method, "error": str(err)[:500]})
            progress(f"    ERROR {err}")
            continue
        for method, name in (("apply", "forward"), ("gradcam", "gradcam")):
            record = {**base, "method": method, "devices_seen": out["devices"], **out[name]}
            store.add(with_throughput(record, config.scaling_batch))
            progress(f"    {method}: {record['images_per_s']:.3g} images/s")
