"""Benchmark jaxcam: forward passes, every CAM method, the derivative engines, metrics, scaling.

Run ``python -m experiments.benchmark`` (everything, long on a small CPU) or
pieces of it::

    python -m experiments.benchmark --only forward,methods,torch --archs resnet50 --batch-sizes 8
    python -m experiments.benchmark --only engine
    python -m experiments.benchmark --smoke            # tiny configuration (the test suite runs it)

Sections (``--only``):

- ``forward``: eval-mode ``model.apply`` under ``jax.jit`` (the floor of Grad-CAM).
- ``methods``: ``jaxcam.explain`` for every method, plus all gradient methods in
  one call (they share one forward pass and one set of derivatives).
- ``torch``: the same methods from pytorch-grad-cam, and torchvision's forward,
  on the *same* weights (a torchvision model with random weights, converted
  with ``jaxcam.weights.load_torchvision``), same inputs, same thread count.
  Skipped with a note when torch, torchvision or grad-cam is not installed.
- ``engine``: the derivative engines alone (``taylor`` seconds per image on the
  default layer, ``factored``, the certificate) and, on ResNet-50, Grad-CAM++
  (closed form; exact via ``factored``, at 1000 and at 7 classes) as ratios
  to Grad-CAM.
- ``metrics``: throughput of every metric in ``jaxcam.metrics`` on ResNet-50.
- ``scaling``: Grad-CAM and the forward pass on a batch sharded over 1 and
  over N forced host devices (``--xla_force_host_platform_device_count``),
  each in a fresh subprocess. On a CPU the forced devices share the same
  cores, so this shows the overhead of sharding, not a speed-up.
- ``vit``: exact Grad-CAM++ through a ViT head (``--vit-arch``, one image):
  :mod:`experiments.benchmark_vit`. ``--archs vit_b_16`` also runs the other sections
  on ViT-B/16 (the torch section with a ``reshape_transform`` that drops the class
  token, at torchvision's 224 px only).
- ``adapter``: ``jaxcam.models.from_linen`` of jaxcam's ResNet-50 module against
  the native model, same weights, interleaved (:mod:`experiments.benchmark_adapter`;
  goal adapter / native <= 1.05, issue 15).
- ``first-call``: what a user explaining one image sees. The wall time of a
  whole ``jaxcam explain IMAGE.jpg --weights W.safetensors --arch A --method M``
  (one 400x300 JPEG; random torchvision weights written to a temporary
  ``.safetensors``) in a fresh process, beside an equivalent pytorch-grad-cam
  script (load the ``.pth``, preprocess, GradCAM / GradCAMPlusPlus, overlay,
  save) measured in the same run, interleaved. Cells: ``cold-cache`` (a fresh
  process, an empty compilation cache), ``warm-cache`` (a fresh process, the
  cache the previous cell filled), ``in-process`` (the second image of the
  same size explained by the same process: ``jaxcam.cli.main`` called twice;
  the script's pipeline run twice), each a fresh subprocess, median of
  ``--first-call-repeats``. pytorch-grad-cam has no compilation, so its
  ``process`` cell is the reference of both jaxcam process cells. Also,
  per architecture, what ``jaxcam.explain`` compiles (``compiles`` cells): one
  method, the same call again, five gradient methods in one call, and a
  second image size, each program with its compile time.

What is measured, per cell: see :mod:`jaxcam.timing` (:func:`jaxcam.timing.measure`).

Results are appended to the JSON file ``--out`` after every cell; an
interrupted run started again with the same ``--out`` skips the cells already
measured (``--no-resume`` measures everything again). A markdown table of all
results in the file is printed and written next to it (``.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.benchmark_adapter import section_adapter
from experiments.benchmark_vit import section_vit
from jaxcam import compilation, report, timing
from jaxcam.report import number as _fmt
from jaxcam.timing import measure, measure_interleaved, with_throughput

SECTIONS = ("forward", "methods", "torch", "engine", "metrics", "scaling", "first-call", "vit",
            "adapter")
ARCHS = ("resnet50", "vgg19", "efficientnet_b0")
# not in the default --archs; vit_b_16 is also torchvision's (the torch section's comparison)
VIT_ARCHS = ("vit_b_16", "vit_s_16", "vit_ti_16")

# benchmark label -> (jaxcam method name, extra keyword arguments of jaxcam.explain)
METHOD_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "cam": ("cam", {}),
    "gradcam": ("gradcam", {}),
    "gradcam++_closed": ("gradcam++", {"derivatives": "closed_form"}),
    "gradcam++_exact": ("gradcam++", {"derivatives": "exact"}),
    "xgradcam": ("xgradcam", {}),
    "hirescam": ("hirescam", {}),
    "layercam": ("layercam", {}),
    "scorecam": ("scorecam", {}),
    "shapleycam": ("shapleycam", {}),
}
# The gradient methods that one explain call can compute together.
SHARED_CALL = ("gradcam", "gradcam++_exact", "xgradcam", "hirescam", "layercam")
SHARED_LABEL = "gradient methods, one call"

# benchmark label -> pytorch-grad-cam class (only closed-form Grad-CAM++ exists there)
TORCH_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++_closed": "GradCAMPlusPlus",
    "gradcam++_exact": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
    "shapleycam": "ShapleyCAM",
}

# Keys that identify a cell; a resumed run skips a cell whose key is in the file.
KEY_FIELDS = ("section", "impl", "arch", "image_size", "batch", "method", "num_classes", "devices",
              "cell")


class ResultStore(timing.ResultStore):
    """The benchmark's results file: records keyed by :data:`KEY_FIELDS`."""

    def __init__(self, path: str | os.PathLike, resume: bool = True) -> None:
        super().__init__(path, KEY_FIELDS, resume=resume)


@dataclasses.dataclass
class BenchmarkConfig:
    """What to measure. Defaults: the full benchmark of issue 10 (hours on a 2-core CPU)."""

    only: tuple[str, ...] = SECTIONS
    archs: tuple[str, ...] = ARCHS
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    image_size: int = 224
    methods: tuple[str, ...] = tuple(METHOD_SPECS)
    num_classes: int = 1000
    repeats: int = 5
    max_seconds: float = 20.0
    engine_batch: int = 8
    engine_num_classes: tuple[int, ...] = (1000, 7)
    taylor_chunk_size: int | None = None
    metrics_batch: int = 8
    metric_names: tuple[str, ...] = ()  # empty: every metric
    scaling_devices: tuple[int, ...] = (1, 4)
    scaling_arch: str = "resnet50"
    scaling_batch: int = 8
    first_call_archs: tuple[str, ...] = ("resnet50", "efficientnet_b0")
    first_call_methods: tuple[str, ...] = ("gradcam", "gradcam++")
    first_call_image_size: int = 224
    first_call_num_classes: int = 1000
    first_call_repeats: int = 2
    vit_arch: str = "vit_b_16"
    vit_coordinates: int = 1536  # two token rows of ViT-B/16 for the per-coordinate cells
    threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    out: str = "results/benchmark.json"
    resume: bool = True
    seed: int = 0

    @classmethod
    def first_call_smoke(cls, out: str) -> BenchmarkConfig:
        """The first-call section alone, small: ResNet-50 at 64 px, 10 classes, Grad-CAM."""
        return cls(only=("first-call",), first_call_archs=("resnet50",),
                   first_call_methods=("gradcam",), first_call_image_size=64,
                   first_call_num_classes=10, first_call_repeats=1, out=out)

    @classmethod
    def smoke(cls, out: str) -> BenchmarkConfig:
        """A configuration small enough for the test suite (about a minute on 2 cores)."""
        return cls(
            only=("forward", "methods", "torch", "engine"),
            archs=("resnet50",),
            batch_sizes=(2,),
            image_size=64,
            methods=("gradcam", "gradcam++_exact"),
            num_classes=10,
            repeats=2,
            max_seconds=5.0,
            engine_batch=2,
            engine_num_classes=(10,),
            out=out,
        )


# --------------------------------------------------------------------------- models and data


def torch_available() -> tuple[bool, str]:
    """Whether the PyTorch comparison can run, and a note saying why not."""
    missing = [
        name
        for name, module in (
            ("torch", "torch"),
            ("torchvision", "torchvision"),
            ("grad-cam", "pytorch_grad_cam"),
        )
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        return False, (
            f"PyTorch comparison skipped: {', '.join(missing)} not installed "
            "(pip install 'jaxcam[bench]' adds torch, torchvision and grad-cam)."
        )
    return True, ""


class Workbench:
    """Models, weights and inputs shared by the sections, built once per (arch, classes)."""

    def __init__(self, config: BenchmarkConfig) -> None:
        self.config = config
        self.use_torch, self.torch_note = torch_available()
        self._models: dict[tuple[str, int], tuple[Any, Any, Any]] = {}
        # (arch, batch, method label) -> jaxcam maps of the methods section's last call
        self.maps: dict[tuple[str, int, str], np.ndarray] = {}

    def model(self, arch: str, num_classes: int) -> tuple[Any, Any, Any]:
        """``(jaxcam model, variables, torch model or None)`` with the same weights.

        With torch installed: a torchvision model with random weights (its own
        initialisers), converted with ``jaxcam.weights.load_torchvision``, so
        both libraries run exactly the same network. Without: ``model.init``.
        """
        key = (arch, num_classes)
        if key not in self._models:
            import jax

            import jaxcam

            torch_model = None
            if self.use_torch:
                torch_model, model, variables = jaxcam.weights.random_torchvision(
                    arch, num_classes, self.config.seed)
            else:
                model = jaxcam.models.get(arch, num_classes)
                variables = model.init(
                    jax.random.key(self.config.seed), image_size=self.config.image_size
                )
            self._models = {k: v for k, v in self._models.items() if k[0] == arch}
            self._models[key] = (model, variables, torch_model)
        return self._models[key]

    def images(self, batch: int) -> np.ndarray:
        """Normalised-looking float32 images ``(B, S, S, 3)``, the same for every run."""
        rng = np.random.default_rng(self.config.seed)
        s = self.config.image_size
        return rng.standard_normal((batch, s, s, 3), dtype=np.float32)


def _progress(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- sections


def cell_key(config: BenchmarkConfig, section: str, arch: str, batch: int, method: str,
             impl: str = "jaxcam") -> dict[str, Any]:
    """The key of a one-device cell at ``config``'s image size and class count."""
    return dict(section=section, impl=impl, arch=arch, image_size=config.image_size,
                batch=batch, method=method, num_classes=config.num_classes, devices=1)


def section_forward(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    import jax

    _progress("[forward] eval-mode model.apply under jax.jit")
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


# Score-CAM: masked images scored per vectorised chunk (channels per chunk x batch),
# so that the chunk's memory does not grow with the batch size.
SCORECAM_IMAGES_PER_CHUNK = 64


def scorecam_chunk(batch: int) -> int:
    """``scorecam_batch_size`` (channels per chunk) for a batch of ``batch`` images."""
    return max(1, SCORECAM_IMAGES_PER_CHUNK // batch)


def _explain_call(model, variables, x, labels: Sequence[str], **extra: Any) -> Callable[[], Any]:
    import jaxcam

    if len(labels) == 1:
        method, kwargs = METHOD_SPECS[labels[0]]
        if method == "scorecam":
            kwargs = dict(kwargs, scorecam_batch_size=scorecam_chunk(x.shape[0]))
        return lambda: jaxcam.explain(model, variables, x, method=method, **kwargs, **extra)
    methods = [METHOD_SPECS[label][0] for label in labels]
    return lambda: jaxcam.explain(model, variables, x, method=methods, **extra)


def section_methods(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    import jax

    import jaxcam

    _progress("[methods] jaxcam.explain, maps upsampled to the input and normalised")
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
                    call = _explain_call(model, variables, x, group)
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


def _torch_layer(torch_model, arch: str, layer: str):
    """The torchvision module whose output is jaxcam's cut point ``layer``."""
    module = torch_model
    for part in layer.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def vit_reshape_transform(tokens):
    """pytorch-grad-cam's ``reshape_transform`` for a ViT: tokens ``(B, 1 + g*g, D)``, the
    class token first, -> the patch grid ``(B, D, g, g)`` (channels first), as jaxcam's
    ViT ``to_grid`` does (without the transpose)."""
    g = math.isqrt(tokens.shape[1] - 1)
    return tokens[:, 1:].reshape(tokens.shape[0], g, g, tokens.shape[2]).permute(0, 3, 1, 2)


def section_torch(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    if not bench.use_torch:
        _progress(f"[torch] {bench.torch_note}")
        return
    os.environ.setdefault("TQDM_DISABLE", "1")  # ScoreCAM's per-chunk progress bars
    import torch

    torch.set_num_threads(config.threads)
    import pytorch_grad_cam

    _progress(
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
                        model=torch_model, target_layers=[_torch_layer(torch_model, arch, layer)],
                        reshape_transform=vit_reshape_transform if arch in VIT_ARCHS else None,
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
            "min_pearson": min(finite) if finite else None}


def section_engine(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    import jax
    import jax.numpy as jnp

    import jaxcam

    _progress("[engine] derivative engines alone, and Grad-CAM++ as a ratio to Grad-CAM")
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
            _progress(f"  skip (already measured): ratios at {num_classes} classes")
            continue
        _progress(f"  measuring Grad-CAM++ / Grad-CAM / forward, interleaved, "
                  f"{num_classes} classes, batch {batch} ...")
        try:
            model, variables, x, _, _, _ = setup(num_classes, batch)
            apply = jax.jit(model.apply)
            calls = {"apply": lambda apply=apply, v=variables, x=x: apply(v, x)}
            for label in labels[1:]:
                calls[label] = _explain_call(model, variables, x, (label,))
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
                _progress(f"    {label}: {record['step_s']:.3g} s/batch, "
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

    _progress("[metrics] jaxcam.metrics throughput on ResNet-50")
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
    _progress(
        "[scaling] batch sharded over forced host devices, one fresh process each "
        "(forced CPU devices share the same cores)"
    )
    root = str(Path(__file__).resolve().parent.parent)
    for devices in config.scaling_devices:
        base = dict(section="scaling", impl="jaxcam", arch=config.scaling_arch,
                    image_size=config.image_size, batch=config.scaling_batch,
                    num_classes=config.num_classes, devices=devices)
        if store.has(**base, method="apply") and store.has(**base, method="gradcam"):
            _progress(f"  skip (already measured): devices={devices}")
            continue
        _progress(f"  measuring devices={devices} ...")
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        payload = dict(arch=config.scaling_arch, image_size=config.image_size,
                       batch=config.scaling_batch, num_classes=config.num_classes,
                       repeats=config.repeats, max_seconds=config.max_seconds)
        try:
            _, out = _run_worker(SCALING_WORKER, payload, env, root)
        except RuntimeError as err:
            for method in ("apply", "gradcam"):
                store.add({**base, "method": method, "error": str(err)[:500]})
            _progress(f"    ERROR {err}")
            continue
        for method, name in (("apply", "forward"), ("gradcam", "gradcam")):
            record = {**base, "method": method, "devices_seen": out["devices"], **out[name]}
            store.add(with_throughput(record, config.scaling_batch))
            _progress(f"    {method}: {record['images_per_s']:.3g} images/s")


# --------------------------------------------------------------------------- first call

FIRST_CALL_CELLS = ("cold-cache", "warm-cache", "in-process")
FIRST_CALL_SHARED = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam")

# The equivalent pytorch-grad-cam script: load the weights, preprocess, explain, overlay,
# save; one image per call of `explain_image`, run once (`process`) or twice (`in-process`).
PGC_SCRIPT = r"""
import json, sys, time
import numpy as np
import torch, torchvision
from PIL import Image
from torchvision import transforms
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import show_cam_on_image

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def explain_image(path, out_png):
    model = getattr(torchvision.models, args["arch"])(weights=None,
                                                      num_classes=args["num_classes"])
    model.load_state_dict(torch.load(args["weights"], map_location="cpu", weights_only=True))
    model.eval()
    layer = model
    for part in args["layer"].split("."):
        layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
    prep = transforms.Compose([transforms.Resize(args["resize"]),
                               transforms.CenterCrop(args["size"]), transforms.ToTensor(),
                               transforms.Normalize(MEAN, STD)])
    x = prep(Image.open(path).convert("RGB"))[None]
    method = GradCAMPlusPlus if args["method"] == "gradcam++" else GradCAM
    with method(model=model, target_layers=[layer]) as cam:
        heat = cam(input_tensor=x, targets=None)[0]
    shown = (x[0].permute(1, 2, 0).numpy() * STD + MEAN).clip(0, 1).astype(np.float32)
    Image.fromarray(show_cam_on_image(shown, heat, use_rgb=True)).save(out_png)


times = []
for i, image in enumerate(args["images"]):
    t0 = time.perf_counter()
    explain_image(image, f"{args['out']}/pgc_{i}.png")
    times.append(time.perf_counter() - t0)
print("RESULT " + json.dumps({"calls_s": times}))
"""

# jaxcam.cli.main called once per image in one process, each call counted.
JAXCAM_CLI_WORKER = r"""
import json, sys, time
from jaxcam import cli
from jaxcam.compilation import CompileCounter

args = json.loads(sys.argv[1])
calls, compiles = [], []
for i, argv in enumerate(args["argvs"]):
    with CompileCounter() as counter:
        t0 = time.perf_counter()
        cli.main(argv)
        calls.append(time.perf_counter() - t0)
    compiles.append({"compiles": counter.compiles, "cache_hits": counter.cache_hits})
print("RESULT " + json.dumps({"calls_s": calls, "compiles": compiles}))
"""

# What jaxcam.explain compiles: one method, again, several methods, a second image size.
COMPILES_WORKER = r"""
import json, sys
import jax, numpy as np
import jaxcam
from jaxcam.compilation import CompileCounter

args = json.loads(sys.argv[1])
model, variables = jaxcam.weights.load_torchvision(args["weights"], args["arch"])
rng = np.random.default_rng(0)
def images(size):
    return rng.standard_normal((1, size, size, 3), dtype=np.float32)
steps = [("one method", args["method"], args["size"]),
         ("the same call again, new image", args["method"], args["size"]),
         ("five gradient methods in one call", args["shared"], args["size"]),
         ("one method, second image size", args["method"], args["second_size"])]
out = []
for label, method, size in steps:
    x = images(size)
    with CompileCounter() as c:
        jax.block_until_ready(jaxcam.explain(model, variables, x, method=method))
    out.append({"step": label, "method": method, "image_size": size,
                "compiles": c.compiles, "compile_s": c.compile_seconds,
                "traces": c.traces, "trace_s": c.trace_seconds,
                "programs": sorted(c.programs, key=lambda p: -p[1])})
print("RESULT " + json.dumps(out))
"""


def _smooth_jpeg(path: Path, width: int, height: int, seed: int) -> None:
    """A smooth random RGB JPEG (a photo-like input; resizing does not destroy it)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=90)


_run_worker = timing.run_worker  # one name for the subprocess workers (tests replace it)


def _run_cli(argv: list[str], env: dict[str, str], cwd: str) -> float:
    """Wall seconds of ``python -m jaxcam.cli ARGV`` in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jaxcam.cli", *argv], capture_output=True,
                          text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"jaxcam explain failed ({proc.returncode}): {proc.stderr[-600:]}")
    return wall


def _first_call_files(config: BenchmarkConfig, arch: str, work: Path) -> dict[str, Any]:
    """Random torchvision weights (.pth for torch, .safetensors for jaxcam) and two JPEGs."""
    import torch
    from safetensors.torch import save_file

    import jaxcam

    net, _, _ = jaxcam.weights.random_torchvision(arch, config.first_call_num_classes,
                                                  config.seed)
    state = net.state_dict()
    pth, st = work / f"{arch}.pth", work / f"{arch}.safetensors"
    torch.save(state, pth)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    images = [work / "photo_a.jpg", work / "photo_b.jpg"]
    for i, path in enumerate(images):
        _smooth_jpeg(path, 400, 300, config.seed + i)
    prep = jaxcam.Preprocessing.imagenet(config.first_call_image_size)
    layer = jaxcam.models.get(arch, config.first_call_num_classes).default_layer
    return {"pth": str(pth), "safetensors": str(st), "images": [str(p) for p in images],
            "resize": prep.resize_size, "layer": layer}


def section_first_call(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    import shutil
    import tempfile

    if not bench.use_torch:
        _progress(f"[first-call] {bench.torch_note}")
        return
    size = config.first_call_image_size
    _progress(f"[first-call] whole `jaxcam explain` of one 400x300 JPEG at {size} px in fresh "
              "processes, beside the pytorch-grad-cam script (interleaved)")
    root = str(Path(__file__).resolve().parent.parent)
    base_env = dict(os.environ)
    base_env["PYTHONPATH"] = root + os.pathsep + base_env.get("PYTHONPATH", "")
    base_env.pop(compilation.ENV_VAR, None)  # every cell says which cache it uses
    for arch in config.first_call_archs:
        work = Path(tempfile.mkdtemp(prefix=f"jaxcam-first-call-{arch}-"))
        try:
            files = _first_call_files(config, arch, work)
            for method in config.first_call_methods:
                _first_call_cells(config, store, arch, method, files, work, base_env, root)
            _compiles_cell(config, store, arch, files, base_env, root)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _first_call_cells(config, store, arch, method, files, work: Path, base_env, root) -> None:

    size, classes = config.first_call_image_size, config.first_call_num_classes
    key = dict(section="first_call", arch=arch, image_size=size, batch=1, method=method,
               num_classes=classes, devices=1)
    cells = [("jaxcam", c) for c in FIRST_CALL_CELLS] + [
        ("pytorch-grad-cam", "process"), ("pytorch-grad-cam", "in-process")]
    todo = [(impl, cell) for impl, cell in cells if not store.has(**key, impl=impl, cell=cell)]
    if not todo:
        _progress(f"  skip (already measured): {arch} {method}")
        return
    _progress(f"  measuring {arch} {method}: {len(todo)} cells x "
              f"{config.first_call_repeats} repeats ...")

    def cli_argv(image: str, out: str, cache: str) -> list[str]:
        argv = [image, "--weights", files["safetensors"], "--arch", arch, "--method", method,
                "--out", out, "--compilation-cache", cache]
        if size != 224:
            argv += ["--image-size", str(size)]
        return ["explain", *argv]

    pgc_args = dict(arch=arch, weights=files["pth"], num_classes=classes, method=method,
                    layer=files["layer"], resize=files["resize"], size=size,
                    threads=config.threads, out=str(work))
    times: dict[tuple[str, str], list[float]] = {c: [] for c in cells}
    extra: dict[tuple[str, str], dict[str, Any]] = {c: {} for c in cells}
    errors: dict[tuple[str, str], str] = {}
    # other work on the machine slows torch's threads more than XLA's: keep the load seen
    load_before = os.getloadavg()[0]

    def attempt(cell, fn):
        if cell not in todo or cell in errors:
            return
        try:
            fn()
        except Exception as err:  # a broken cell must not lose the others
            errors[cell] = f"{type(err).__name__}: {err}"[:500]
            _progress(f"    ERROR {cell}: {errors[cell]}")

    for r in range(config.first_call_repeats):
        cache = work / f"cache-{method}-{r}"
        out = str(work / "out")

        def cold(cache=cache, out=out):
            times["jaxcam", "cold-cache"].append(
                _run_cli(cli_argv(files["images"][0], out, str(cache)), base_env, root))
            extra["jaxcam", "cold-cache"]["programs_cached"] = len(
                list(cache.glob("*.jaxcam-xla")))

        def warm(cache=cache, out=out):
            if not cache.is_dir():  # the cold cell failed or was measured before
                _run_cli(cli_argv(files["images"][0], out, str(cache)), base_env, root)
            times["jaxcam", "warm-cache"].append(
                _run_cli(cli_argv(files["images"][1], out, str(cache)), base_env, root))

        def in_process(out=out):
            argvs = [cli_argv(img, f"{out}/{i}", "off") for i, img in enumerate(files["images"])]
            _, res = _run_worker(JAXCAM_CLI_WORKER, {"argvs": argvs}, base_env, root)
            times["jaxcam", "in-process"].append(res["calls_s"][1])
            extra["jaxcam", "in-process"].update(
                first_call_in_process_s=res["calls_s"][0],
                second_call_compiles=res["compiles"][1]["compiles"])

        def pgc_process():
            wall, _ = _run_worker(PGC_SCRIPT, dict(pgc_args, images=files["images"][:1]),
                                  base_env, root)
            times["pytorch-grad-cam", "process"].append(wall)

        def pgc_in_process():
            _, res = _run_worker(PGC_SCRIPT, dict(pgc_args, images=files["images"]),
                                 base_env, root)
            times["pytorch-grad-cam", "in-process"].append(res["calls_s"][1])
            extra["pytorch-grad-cam", "in-process"]["first_call_in_process_s"] = res[
                "calls_s"][0]

        # interleaved, so that drift in the machine's load hits both libraries alike
        attempt(("pytorch-grad-cam", "process"), pgc_process)
        attempt(("jaxcam", "cold-cache"), cold)
        attempt(("jaxcam", "warm-cache"), warm)
        attempt(("pytorch-grad-cam", "in-process"), pgc_in_process)
        attempt(("jaxcam", "in-process"), in_process)
    for impl, cell in todo:
        record = {**{k: None for k in KEY_FIELDS}, **key, "impl": impl, "cell": cell}
        if (impl, cell) in errors:
            record["error"] = errors[impl, cell]
        else:
            values = times[impl, cell]
            record.update(wall_s=statistics.median(values), wall_all_s=values,
                          repeats=len(values), **extra[impl, cell],
                          load_avg_1min=[load_before, os.getloadavg()[0]])
            record["weights"] = "safetensors" if impl == "jaxcam" else "pth"
        store.add(record)
        if "wall_s" in record:
            _progress(f"    {impl} {cell}: {record['wall_s']:.2f} s")


def _compiles_cell(config, store, arch, files, base_env, root) -> None:
    key = dict(section="first_call", impl="jaxcam", arch=arch,
               image_size=config.first_call_image_size, batch=1,
               method=config.first_call_methods[-1], num_classes=config.first_call_num_classes,
               devices=1, cell="compiles")
    if store.has(**key):
        _progress(f"  skip (already measured): {arch} compiles")
        return
    _progress(f"  counting what jaxcam.explain compiles ({arch}) ...")
    second = config.first_call_image_size + 32
    payload = dict(weights=files["safetensors"], arch=arch, method=key["method"],
                   shared=list(FIRST_CALL_SHARED), size=config.first_call_image_size,
                   second_size=second)
    env = dict(base_env, **{compilation.ENV_VAR: "off"})
    try:
        wall, steps = _run_worker(COMPILES_WORKER, payload, env, root)
        record = {**key, "steps": steps, "wall_s": wall}
    except Exception as err:
        record = {**key, "error": f"{type(err).__name__}: {err}"[:500]}
    store.add(record)
    for step in record.get("steps", []):
        _progress(f"    {step['step']}: {step['compiles']} compilations, "
                  f"{step['compile_s']:.2f} s compiling, {step['trace_s']:.2f} s tracing")


# --------------------------------------------------------------------------- report


def _ok(r: dict | None) -> bool:
    return bool(r) and "step_s" in r


def render_markdown(store: ResultStore) -> str:
    """Markdown tables of every record in the store, one per section, plus the goals."""
    recs = store.records
    out: list[str] = []
    meta = store.meta.get("environment", {})
    if meta:
        out.append(
            f"Environment: {meta.get('backend')} ({meta.get('device_kind')}), "
            f"{meta.get('cpu_count')} CPU cores, jax {meta.get('jax')}, "
            f"torch {meta.get('torch', '-')}, grad-cam {meta.get('grad-cam', '-')}, "
            f"{meta.get('threads')} threads.\n"
        )

    def find(**key: Any) -> dict | None:
        return store.get(**{k: key.get(k) for k in KEY_FIELDS})

    fwd = [r for r in recs if r["section"] == "forward"]
    if fwd:
        out += ["### Eval-mode forward pass (`model.apply`, jit)", "",
                "| arch | image | batch | jaxcam s/batch | jaxcam images/s | compile s | "
                "torch s/batch | torch images/s | jaxcam / torch time |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in fwd:
            t = find(**dict(r, section="torch", impl="torch"))
            ratio = r["step_s"] / t["step_s"] if _ok(r) and _ok(t) else None
            out.append(
                f"| {r['arch']} | {r['image_size']} | {r['batch']} | {_fmt(r.get('step_s'))} | "
                f"{_fmt(r.get('images_per_s'))} | {_fmt(r.get('compile_s'))} | "
                f"{_fmt(t.get('step_s') if t else None)} | "
                f"{_fmt(t.get('images_per_s') if t else None)} | {_fmt(ratio)} |"
            )
        out.append("")

    meth = [r for r in recs if r["section"] == "methods"]
    if meth:
        dev = any("device_peak_mb" in r for r in meth)
        out += ["### CAM methods (`jaxcam.explain`) vs pytorch-grad-cam, same weights and inputs",
                "",
                "| arch | image | batch | method | jaxcam images/s | s/batch | compile s | "
                "recompiles | host peak MB |" + (" device peak MB |" if dev else "")
                + " / forward | pytorch-grad-cam images/s | speed-up | max abs diff |",
                "|---|---|---|---|---|---|---|---|---|" + ("---|" if dev else "")
                + "---|---|---|---|"]
        for r in meth:
            if not _ok(r):
                note = r.get("skipped") or r.get("error", "")
                out.append(f"| {r['arch']} | {r['image_size']} | {r['batch']} | {r['method']} | "
                           f"n/a: {note[:80]} |" + " |" * (9 if dev else 8))
                continue
            f = find(**dict(r, section="forward", method="apply"))
            t = find(**dict(r, section="torch", impl="pytorch-grad-cam"))
            agree = (t or {}).get("agreement", {}) if t else {}
            out.append(
                f"| {r['arch']} | {r['image_size']} | {r['batch']} | {r['method']} | "
                f"{_fmt(r['images_per_s'])} | {_fmt(r['step_s'])} | {_fmt(r.get('compile_s'))} | "
                f"{r.get('recompiles', '-')} | {_fmt(r.get('host_peak_mb'))} |"
                + (f" {_fmt(r.get('device_peak_mb'))} |" if dev else "")
                + f" {_fmt(r['step_s'] / f['step_s'] if _ok(f) else None)} | "
                f"{_fmt(t['images_per_s'] if _ok(t) else None)} | "
                f"{_fmt(r['images_per_s'] / t['images_per_s'] if _ok(t) else None)} | "
                f"{_fmt(agree.get('max_abs_diff'))} |"
            )
        out.append("")

    eng = [r for r in recs if r["section"] == "engine"]
    if eng:
        out += ["### Derivative engines alone (default layer, `exp` target)", "",
                "| engine | arch | image | batch | coordinates / image | s/batch | s/image "
                "| compile s |",
                "|---|---|---|---|---|---|---|---|"]
        for r in eng:
            if not _ok(r):
                out.append(f"| {r['method']} | {r['arch']} | {r['image_size']} | {r['batch']} | "
                           f"n/a: {(r.get('skipped') or r.get('error', ''))[:80]} | | | |")
                continue
            out.append(
                f"| {r['method']} | {r['arch']} | {r['image_size']} | {r['batch']} | "
                f"{r.get('coordinates_per_image', '-')} | {_fmt(r['step_s'])} | "
                f"{_fmt(r['step_s'] / r['batch'])} | {_fmt(r.get('compile_s'))} |"
            )
        out.append("")
    ratio = [r for r in recs if r["section"] == "engine_ratio"]
    if ratio:
        out += ["### Grad-CAM++ and the forward pass as ratios to Grad-CAM (calls interleaved)",
                "", "| arch | image | batch | classes | Grad-CAM s | `model.apply` | "
                "closed-form Grad-CAM++ | exact Grad-CAM++ (factored) |",
                "|---|---|---|---|---|---|---|---|"]
        for c in sorted({r["num_classes"] for r in ratio}, reverse=True):
            row = {r["method"]: r for r in ratio if r["num_classes"] == c}
            g = row.get("gradcam")
            if not _ok(g):
                continue
            rel = {m: _fmt(_ratio(row.get(m), g)) + "x" if _ratio(row.get(m), g) else "-"
                   for m in ("apply", "gradcam++_closed", "gradcam++_exact")}
            out.append(f"| {g['arch']} | {g['image_size']} | {g['batch']} | {c} | "
                       f"{_fmt(g['step_s'])} | {rel['apply']} | {rel['gradcam++_closed']} | "
                       f"{rel['gradcam++_exact']} |")
        out.append("")

    met = [r for r in recs if r["section"] == "metrics"]
    if met:
        out += ["### Metrics (`jaxcam.metrics`, defaults)", "", *report.table(
            ["metric", "arch", "image", "batch", "images/s", "s/batch", "compile s"],
            ([r["method"], r["arch"], r["image_size"], r["batch"], _fmt(r.get("images_per_s")),
              _fmt(r.get("step_s")), _fmt(r.get("compile_s"))] for r in met)), ""]

    sc = [r for r in recs if r["section"] == "scaling"]
    if sc:
        def vs_one(r):
            one = find(**dict(r, devices=1))
            return r["images_per_s"] / one["images_per_s"] if _ok(r) and _ok(one) else None

        out += ["### Data-parallel sharding over forced host devices", "", *report.table(
            ["call", "arch", "image", "batch", "devices", "images/s", "vs 1 device"],
            ([r["method"], r["arch"], r["image_size"], r["batch"], r["devices"],
              _fmt(r.get("images_per_s")), _fmt(vs_one(r))]
             for r in sorted(sc, key=lambda r: (r["method"], r["devices"])))), ""]

    vit = [r for r in recs if r["section"] == "vit"]
    if vit:
        out += ["### ViT: exact Grad-CAM++ through the head (one image)", "", *report.table(
            ["method", "arch", "image", "s/image", "compile s", "coordinates",
             "s/coordinate"],
            ([r["method"], r["arch"], r["image_size"], _fmt(r.get("step_s")),
              _fmt(r.get("compile_s")), r.get("coordinates", "-"),
              _fmt(r.get("seconds_per_coordinate"))] for r in vit)), ""]

    adapter = [r for r in recs if r["section"] == "adapter"]
    if adapter:
        out += ["### Adapter: `from_linen(ResNet-50 module)` / the native model (one image)",
                "", *report.table(
                    ["method", "image", "adapter s", "native s", "adapter / native",
                     "GFLOP adapter / native", "max abs diff"],
                    ([r["method"], r["image_size"], _fmt(r.get("step_s")),
                      _fmt(r.get("native_step_s")), _fmt(r.get("ratio_to_native")),
                      f"{(r.get('flops_adapter') or 0) / 1e9:.3f} / "
                      f"{(r.get('flops_native') or 0) / 1e9:.3f}",
                      _fmt(r.get("max_abs_diff"))] for r in adapter)), ""]

    out += first_call_tables(store)
    goals = goal_lines(store)
    if goals:
        out += ["### Goals (issues 10, 18)", ""] + [f"- {g}" for g in goals] + [""]
    return "\n".join(out)


def _first_call(store: ResultStore, r: dict[str, Any], impl: str, cell: str) -> dict | None:
    found = _lookup(store, r, impl=impl, cell=cell)
    return found if found and "wall_s" in found else None


def first_call_tables(store: ResultStore) -> list[str]:
    """The first-call table (seconds and ratios to pytorch-grad-cam) and what compiles."""
    rows = [r for r in store.records if r["section"] == "first_call"
            and r["impl"] == "jaxcam" and r.get("cell") == "cold-cache"]
    out: list[str] = []
    if rows:
        out += ["### First call: one image, whole command, fresh processes", "",
                "| arch | image | method | jaxcam cold cache s | jaxcam warm cache s | "
                "pytorch-grad-cam process s | cold / pgc | warm / pgc | jaxcam in-process "
                "2nd image s | pgc in-process 2nd image s | in-process / pgc | "
                "programs cached |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cold = _first_call(store, r, "jaxcam", "cold-cache")
            warm = _first_call(store, r, "jaxcam", "warm-cache")
            inproc = _first_call(store, r, "jaxcam", "in-process")
            pgc = _first_call(store, r, "pytorch-grad-cam", "process")
            pgc_in = _first_call(store, r, "pytorch-grad-cam", "in-process")

            def s_(rec):
                return _fmt(rec["wall_s"]) if rec else "-"

            def ratio(a, b):
                return _fmt(a["wall_s"] / b["wall_s"]) + "x" if a and b else "-"

            out.append(f"| {r['arch']} | {r['image_size']} | {r['method']} | {s_(cold)} | "
                       f"{s_(warm)} | {s_(pgc)} | {ratio(cold, pgc)} | {ratio(warm, pgc)} | "
                       f"{s_(inproc)} | {s_(pgc_in)} | {ratio(inproc, pgc_in)} | "
                       f"{(cold or {}).get('programs_cached', '-')} |")
        out.append("")
    comp = [r for r in store.records if r["section"] == "first_call" and r.get("cell") ==
            "compiles" and "steps" in r]
    if comp:
        out += ["### What `jaxcam.explain` compiles (one image, in one process, no cache)", "",
                "| arch | step | image | compilations | compile s | traces | trace s | "
                "slowest programs (s) |", "|---|---|---|---|---|---|---|---|"]
        for r in comp:
            for st in r["steps"]:
                top = ", ".join(f"{name} {sec:.2f}" for name, sec, _ in st["programs"][:3])
                out.append(f"| {r['arch']} | {st['step']} | {st['image_size']} | "
                           f"{st['compiles']} | {_fmt(st['compile_s'])} | {st['traces']} | "
                           f"{_fmt(st['trace_s'])} | {top} |")
        out.append("")
    return out


def _ratio(record: dict | None, reference: dict | None) -> float | None:
    """``record``'s time over ``reference``'s: the paired per-round median when the
    two were measured interleaved, else the ratio of their medians."""
    if not (_ok(record) and _ok(reference)):
        return None
    if "ratio_to_reference" in record and record.get("reference") == reference["method"]:
        return record["ratio_to_reference"]
    return record["step_s"] / reference["step_s"]


def _lookup(store: ResultStore, record: dict[str, Any], **change: Any) -> dict | None:
    """The record whose key equals ``record``'s with the fields in ``change`` replaced."""
    return store.get(**{k: change.get(k, record.get(k)) for k in KEY_FIELDS})


def goal_lines(store: ResultStore) -> list[str]:
    """One line per issue-10 goal that the store has the numbers for: measured vs target."""
    lines = []
    for r in store.records:
        if r["section"] == "first_call" and r["impl"] == "jaxcam" and r.get("cell") in (
                "cold-cache", "warm-cache") and "wall_s" in r:
            pgc = _first_call(store, r, "pytorch-grad-cam", "process")
            if pgc:
                v, target = r["wall_s"] / pgc["wall_s"], 1.3 if r["cell"] == "cold-cache" else 1.0
                lines.append(f"{r['arch']} {r['method']} first call, {r['cell']}: {v:.2f}x the "
                             f"pytorch-grad-cam script (goal <= {target}x: "
                             f"{'met' if v <= target else 'missed'})")
        if r["section"] == "first_call" and r.get("cell") == "in-process" and r[
                "impl"] == "jaxcam" and "second_call_compiles" in r:
            n = r["second_call_compiles"]
            lines.append(f"{r['arch']} {r['method']} second image in the same process: {n} "
                         f"compilations (goal 0: {'met' if n == 0 else 'missed'})")
    ratio = [r for r in store.records if r["section"] == "engine_ratio" and _ok(r)]
    for c, target in ((1000, 1.3), (7, 1.1)):
        row = {r["method"]: r for r in ratio if r["num_classes"] == c}
        g, e, f = row.get("gradcam"), row.get("gradcam++_exact"), row.get("apply")
        v = _ratio(e, g)
        if v is not None:
            lines.append(f"exact Grad-CAM++ / Grad-CAM at {c} classes: {v:.2f}x "
                         f"(goal <= {target}x: {'met' if v <= target else 'missed'})")
        v = _ratio(f, g)
        if v is not None and g["batch"] == 8 and c == 1000:
            v = 1 / v
            lines.append(f"{g['arch']} Grad-CAM / model.apply time at batch 8, interleaved: "
                         f"{v:.2f}x (goal <= 1.15x: {'met' if v <= 1.15 else 'missed'})")
    for r in store.records:
        if r["section"] == "methods" and r["method"] == "gradcam" and r["batch"] == 8 and _ok(r):
            t = _lookup(store, r, section="torch", impl="pytorch-grad-cam")
            f = _lookup(store, r, section="forward", method="apply")
            if _ok(t):
                v = r["images_per_s"] / t["images_per_s"]
                lines.append(f"{r['arch']} Grad-CAM batch 8 throughput vs pytorch-grad-cam: "
                             f"{v:.2f}x (goal >= 2x: {'met' if v >= 2 else 'missed'})")
            if _ok(f):
                v = r["step_s"] / f["step_s"]
                lines.append(f"{r['arch']} Grad-CAM batch 8 time / model.apply time: {v:.2f}x "
                             f"(goal <= 1.15x: {'met' if v <= 1.15 else 'missed'})")
        if r["section"] == "methods" and r["method"] == "scorecam" and _ok(r):
            t = _lookup(store, r, section="torch", impl="pytorch-grad-cam")
            if _ok(t):
                v = r["images_per_s"] / t["images_per_s"]
                lines.append(f"{r['arch']} Score-CAM batch {r['batch']} throughput vs "
                             f"pytorch-grad-cam: {v:.2f}x "
                             f"(goal >= 3x: {'met' if v >= 3 else 'missed'})")
        if r["section"] == "engine" and r["method"] == "taylor" and _ok(r):
            v = r["step_s"]
            lines.append(f"taylor engine, {r['arch']} {r.get('coordinates_per_image')} coordinates "
                         f"at {r['image_size']} px: {v:.1f} s/image "
                         f"(goal < 20 s: {'met' if v < 20 else 'missed'})")
    return lines


# --------------------------------------------------------------------------- entry point


def _csv(cast: Callable[[str], Any]) -> Callable[[str], tuple]:
    return lambda s: tuple(cast(v.strip()) for v in s.split(",") if v.strip())


FLAGS = {"metric_names": "--metrics"}  # field -> flag where they differ
HELP = {
    "only": f"comma-separated sections out of {','.join(SECTIONS)}",
    "methods": f"out of {','.join(METHOD_SPECS)}",
    "max_seconds": "stop repeating a cell once its steady-state time exceeds this",
    "metric_names": "metric names for the metrics section (default: all)",
    "first_call_methods": "jaxcam explain --method values (gradcam, gradcam++)",
    "first_call_repeats": "fresh processes per first-call cell (the median is reported)",
    "vit_arch": f"out of {','.join(VIT_ARCHS)}",
    "vit_coordinates": "coordinates (whole token rows) of the vit section's per-coordinate "
                       "cells",
    "threads": "torch.set_num_threads for the PyTorch comparison",
    "out": "results JSON (markdown written next to it)",
}


def parse_args(argv: Sequence[str] | None = None) -> BenchmarkConfig:
    """One flag per :class:`BenchmarkConfig` field (tuples comma-separated), plus
    ``--no-resume``, ``--smoke`` and ``--compilation-cache``."""
    d = BenchmarkConfig()
    p = argparse.ArgumentParser(
        prog="python -m experiments.benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(BenchmarkConfig):
        if field.name == "resume":
            continue
        cast = int if "int" in field.type else float if "float" in field.type else str
        p.add_argument(FLAGS.get(field.name, "--" + field.name.replace("_", "-")),
                       dest=field.name, default=getattr(d, field.name),
                       type=_csv(cast) if field.type.startswith("tuple") else cast,
                       help=HELP.get(field.name))
    compilation.add_compilation_cache_option(p)
    p.add_argument("--no-resume", action="store_true", help="measure every cell again")
    p.add_argument("--smoke", action="store_true",
                   help="tiny configuration (ResNet-50 at 32 px, batch 2, two methods)")
    a = vars(p.parse_args(argv))
    smoke, resume = a.pop("smoke"), not a.pop("no_resume")
    a.pop("compilation_cache", None)
    if smoke:
        return dataclasses.replace(BenchmarkConfig.smoke(a["out"]), resume=resume)
    config = BenchmarkConfig(**a, resume=resume)
    validate(config)
    return config


def validate(config: BenchmarkConfig) -> None:
    """Reject a bad configuration before any model is built."""
    bad = [s for s in config.only if s not in SECTIONS]
    if bad:
        raise ValueError(f"unknown section(s) {bad} in --only; choose from {list(SECTIONS)}.")
    bad = [a for a in config.archs if a not in (*ARCHS, "vit_b_16")]
    if bad:
        raise ValueError(f"unknown arch(s) {bad} in --archs; choose from "
                         f"{[*ARCHS, 'vit_b_16']}.")
    if config.vit_arch not in VIT_ARCHS:
        raise ValueError(f"unknown --vit-arch {config.vit_arch!r}; choose from {list(VIT_ARCHS)}.")
    if config.vit_coordinates < 1:
        raise ValueError(f"--vit-coordinates must be at least 1; got {config.vit_coordinates}.")
    bad = [m for m in config.methods if m not in METHOD_SPECS]
    if bad:
        raise ValueError(f"unknown method(s) {bad} in --methods; choose from {list(METHOD_SPECS)}.")
    if not config.batch_sizes or min(config.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers; got {config.batch_sizes}.")
    if config.image_size < 32:
        raise ValueError(f"--image-size must be at least 32 px; got {config.image_size}.")
    if config.repeats < 1:
        raise ValueError(f"--repeats must be at least 1; got {config.repeats}.")
    bad = [a for a in config.first_call_archs if a not in ARCHS]
    if bad:
        raise ValueError(f"unknown arch(s) {bad} in --first-call-archs; choose from "
                         f"{list(ARCHS)}.")
    bad = [m for m in config.first_call_methods if m not in ("gradcam", "gradcam++")]
    if bad:
        raise ValueError(f"unknown method(s) {bad} in --first-call-methods; choose from "
                         "['gradcam', 'gradcam++'] (the methods both libraries share).")
    if config.first_call_repeats < 1:
        raise ValueError(f"--first-call-repeats must be at least 1; got "
                         f"{config.first_call_repeats}.")


def run_benchmark(config: BenchmarkConfig) -> ResultStore:
    """Run the selected sections, appending to ``config.out``; returns the store."""
    validate(config)
    store = ResultStore(config.out, resume=config.resume)
    store.meta["environment"] = timing.environment(threads=config.threads)
    store.meta["ru_maxrss_mb_at_start"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    store.save()
    bench = Workbench(config)
    if not bench.use_torch:
        _progress(bench.torch_note)
    sections = {
        "forward": section_forward, "methods": section_methods, "torch": section_torch,
        "engine": section_engine, "metrics": section_metrics, "scaling": section_scaling,
        "first-call": section_first_call, "vit": section_vit, "adapter": section_adapter,
    }
    for name in SECTIONS:  # fixed order, whatever order --only lists them in
        if name in config.only:
            sections[name](config, bench, store)
    store.meta["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    store.save()
    return store


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    compilation.enable_from_argv(argv)  # the first-call section sets its own, per cell
    store = run_benchmark(config)
    table = render_markdown(store)
    Path(config.out).with_suffix(".md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
