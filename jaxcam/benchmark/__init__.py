"""Benchmark jaxcam: forward passes, every CAM method, the derivative engines, metrics, scaling.

Run ``python -m experiments.benchmark`` (or ``python -m jaxcam.benchmark``; everything,
long on a small CPU) or pieces of it::

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
  :mod:`jaxcam.benchmark.vit`. ``--archs vit_b_16`` also runs the other sections
  on ViT-B/16 (the torch section with a ``reshape_transform`` that drops the class
  token, at torchvision's 224 px only).
- ``adapter``: ``jaxcam.models.from_linen`` of jaxcam's ResNet-50 module against
  the native model, same weights, interleaved (:mod:`jaxcam.benchmark.adapter`;
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
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxcam import compilation, timing
from jaxcam.benchmark.adapter import section_adapter
from jaxcam.benchmark.config import (
    ARCHS,
    KEY_FIELDS,
    METHOD_SPECS,
    SECTIONS,
    SHARED_LABEL,
    VIT_ARCHS,
    BenchmarkConfig,
    ResultStore,
    Workbench,
    progress,
    torch_available,
    validate,
)
from jaxcam.benchmark.first_call import section_first_call
from jaxcam.benchmark.render import goal_lines, render_markdown
from jaxcam.benchmark.sections import (
    section_engine,
    section_forward,
    section_methods,
    section_metrics,
    section_scaling,
    section_torch,
)
from jaxcam.benchmark.vit import section_vit

__all__ = [
    "ARCHS", "KEY_FIELDS", "METHOD_SPECS", "SECTIONS", "SHARED_LABEL", "VIT_ARCHS",
    "BenchmarkConfig", "ResultStore", "Workbench", "goal_lines", "main", "parse_args",
    "render_markdown", "run_benchmark", "torch_available", "validate",
]


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


def parse_args(argv: Sequence[str] | None = None,
               prog: str = "python -m jaxcam.benchmark") -> BenchmarkConfig:
    """One flag per :class:`BenchmarkConfig` field (tuples comma-separated), plus
    ``--no-resume``, ``--smoke`` and ``--compilation-cache``."""
    d = BenchmarkConfig()
    p = argparse.ArgumentParser(
        prog=prog,
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



def run_benchmark(config: BenchmarkConfig) -> ResultStore:
    """Run the selected sections, appending to ``config.out``; returns the store."""
    validate(config)
    store = ResultStore(config.out, resume=config.resume)
    store.meta["environment"] = timing.environment(threads=config.threads)
    store.meta["ru_maxrss_mb_at_start"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    store.save()
    bench = Workbench(config)
    if not bench.use_torch:
        progress(bench.torch_note)
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


def main(argv: Sequence[str] | None = None, prog: str = "python -m jaxcam.benchmark") -> int:
    """The command line: parse, run, print and write the markdown; exit status 2 on bad flags."""
    try:
        config = parse_args(argv, prog)
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

