"""jaxcam: class-activation-map explanations for JAX/Flax image classifiers.

The public API, re-exported lazily (PEP 562) so that ``import jaxcam`` stays
fast and does not pull in TensorFlow Datasets or matplotlib until they are
used. Everything listed in ``__all__`` is importable from here.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None means the module itself.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    # submodules
    "models": ("jaxcam.models", None),
    "weights": ("jaxcam.weights", None),
    "checkpoint": ("jaxcam.checkpoint", None),
    "data": ("jaxcam.data", None),
    "metrics": ("jaxcam.metrics", None),
    "viz": ("jaxcam.viz", None),
    "train": ("jaxcam.train", None),
    "targets": ("jaxcam.targets", None),
    "methods": ("jaxcam.methods", None),
    "derivatives": ("jaxcam.derivatives", None),
    "preprocessing": ("jaxcam.preprocessing", None),
    "io": ("jaxcam.io", None),
    "series": ("jaxcam.series", None),
    "distributed": ("jaxcam.distributed", None),
    "dataset_explain": ("jaxcam.dataset_explain", None),
    "loading": ("jaxcam.loading", None),
    "compilation": ("jaxcam.compilation", None),
    "timing": ("jaxcam.timing", None),
    "report": ("jaxcam.report", None),
    "testing": ("jaxcam.testing", None),
    "benchmark": ("jaxcam.benchmark", None),
    # functions and types
    "explain": ("jaxcam.explanation", "explain"),
    "Explanation": ("jaxcam.explanation", "Explanation"),
    "METHODS": ("jaxcam.methods", "METHODS"),
    "diagonal_derivatives": ("jaxcam.derivatives", "diagonal_derivatives"),
    "load": ("jaxcam.loading", "load"),
    "LoadedModel": ("jaxcam.checkpoint", "LoadedModel"),
    "Preprocessing": ("jaxcam.preprocessing", "Preprocessing"),
    "load_image": ("jaxcam.io", "load_image"),
    "convert": ("jaxcam.loading", "convert"),
    "enable_compilation_cache": ("jaxcam.compilation", "enable_compilation_cache"),
    "explain_dataset": ("jaxcam.dataset_explain", "explain_dataset"),
    "explain_batches": ("jaxcam.dataset_explain", "explain_batches"),
    "explain_groups": ("jaxcam.dataset_explain", "explain_groups"),
    "load_explanations": ("jaxcam.dataset_explain", "load_explanations"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'jaxcam' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
