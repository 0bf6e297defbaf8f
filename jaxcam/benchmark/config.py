"""What the benchmark measures: its configuration, cell keys, method labels, the
models and inputs the sections share (:class:`Workbench`), and the results store.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxcam import timing

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


def progress(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- sections


def cell_key(config: BenchmarkConfig, section: str, arch: str, batch: int, method: str,
             impl: str = "jaxcam") -> dict[str, Any]:
    """The key of a one-device cell at ``config``'s image size and class count."""
    return dict(section=section, impl=impl, arch=arch, image_size=config.image_size,
                batch=batch, method=method, num_classes=config.num_classes, devices=1)




# Score-CAM: masked images scored per vectorised chunk (channels per chunk x batch),
# so that the chunk's memory does not grow with the batch size.
SCORECAM_IMAGES_PER_CHUNK = 64


def scorecam_chunk(batch: int) -> int:
    """``scorecam_batch_size`` (channels per chunk) for a batch of ``batch`` images."""
    return max(1, SCORECAM_IMAGES_PER_CHUNK // batch)


def explain_call(model, variables, x, labels: Sequence[str], **extra: Any) -> Callable[[], Any]:
    import jaxcam

    if len(labels) == 1:
        method, kwargs = METHOD_SPECS[labels[0]]
        if method == "scorecam":
            kwargs = dict(kwargs, scorecam_batch_size=scorecam_chunk(x.shape[0]))
        return lambda: jaxcam.explain(model, variables, x, method=method, **kwargs, **extra)
    methods = [METHOD_SPECS[label][0] for label in labels]
    return lambda: jaxcam.explain(model, variables, x, method=methods, **extra)



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
