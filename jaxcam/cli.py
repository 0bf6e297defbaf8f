"""The ``jaxcam`` command line: ``explain``, ``convert`` and ``data build``.

This module only parses arguments, validates them, calls the library
(:func:`jaxcam.load`, :func:`jaxcam.explain`, :mod:`jaxcam.viz`,
:func:`jaxcam.convert`, :func:`jaxcam.data.build`) and writes files.
Bad input ends with one line on stderr (``jaxcam <command>: error: ...``) and
exit status 2, before any long computation and without leaving output files.

Run it as ``jaxcam ...`` (console script) or ``python -m jaxcam.cli ...``.
Set ``JAXCAM_DEBUG=1`` to get a traceback instead of the one-line error.

``explain`` and ``convert`` use the persistent compilation cache
(:mod:`jaxcam.compilation`; ``--compilation-cache DIR|off``), so a second run
loads the compiled programs instead of compiling them again. Start-up is kept
short: nothing heavy (JAX, Flax, numpy, matplotlib) is imported until a
command needs it, so ``jaxcam --help`` answers at once; the help texts that list
methods, targets and architectures are computed only when shown.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from typing import Any, NoReturn

from jaxcam import compilation

PROG = "jaxcam"
DERIVATIVES = ("exact", "closed_form")

NO_WEIGHTS_MESSAGE = (
    "no weights given: pass --weights PATH, either a torchvision state dict "
    "(.pth/.pt/.safetensors; e.g. torchvision's resnet50-0676ba61.pth from "
    "~/.cache/torch/hub/checkpoints after torchvision.models.resnet50(weights='IMAGENET1K_V1') "
    "ran once on a machine with network access) together with --arch, or a jaxcam checkpoint "
    "directory (made by 'jaxcam convert WEIGHTS OUT_DIR --arch ARCH' or by training); "
    "jaxcam never downloads weights"
)


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit status 2."""


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


class _Lazy:
    """A help text computed when argparse shows it (listing methods, targets and
    architectures needs JAX and Flax, which ``jaxcam --help`` should not import)."""

    def __init__(self, make) -> None:
        self._make = make

    def __str__(self) -> str:
        return self._make()

    def __bool__(self) -> bool:
        return True

    def strip(self) -> str:
        return str(self).strip()

    def __mod__(self, params: Any) -> str:
        return str(self) % params


class _LazyChoices:
    """``choices=`` for argparse, computed on first use."""

    def __init__(self, make) -> None:
        self._make = make
        self._values: tuple[str, ...] | None = None

    def _get(self) -> tuple[str, ...]:
        if self._values is None:
            self._values = tuple(self._make())
        return self._values

    def __contains__(self, value: object) -> bool:
        return value in self._get()

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _methods() -> tuple[str, ...]:
    import jaxcam

    return tuple(jaxcam.METHODS)


def _targets() -> tuple[str, ...]:
    from jaxcam.targets import TARGETS

    return tuple(TARGETS)


def _arch_help() -> str:
    from jaxcam.models import ARCHS

    return ", ".join(ARCHS)


def _default_targets() -> str:
    from jaxcam.explanation import DEFAULT_TARGETS

    return ", ".join(f"{m}: {t}" for m, t in DEFAULT_TARGETS.items())


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxcam`` argument parser with its subcommands."""
    import jaxcam

    parser = _Parser(
        prog=PROG,
        description="Class-activation-map explanations for JAX/Flax image classifiers.",
        epilog="Run 'jaxcam COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"jaxcam {jaxcam.__version__}")
    compilation.add_compilation_cache_option(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    ex = commands.add_parser(
        "explain",
        help="explain images: overlays, a grid per image, raw maps, predictions",
        description=(
            "Explain the predictions of a classifier on image files. Writes into --out, per "
            "image: an overlay PNG per method (STEM_METHOD.png), the map at input resolution "
            "in [0, 1] (STEM_METHOD.npy) and before upsampling (STEM_METHOD_raw.npy), a grid "
            "of all methods (STEM_grid.png), plus predictions.json; prints the predicted "
            "classes. With --top-k K > 1 the files are STEM_topR_METHOD.*, R = 1..K."
        ),
        epilog="example: jaxcam explain cat.jpg --weights ckpt/resnet50 --method gradcam "
        "--method gradcam++ --top-k 2 --out out/",
    )
    ex.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG/PNG/BMP/TIFF image files")
    ex.add_argument("--arch", help=_Lazy(lambda: f"architecture of the weights: {_arch_help()}, "
                    "or a timm name (vit_base_patch16_224, timm/resnet50, ...); optional: read "
                    "from the keys of a torchvision/timm file, from a checkpoint's metadata"))
    ex.add_argument("--weights", help="torchvision or timm .pth/.pt/.safetensors file, jaxcam "
                    "checkpoint directory, or a training run's folder (e.g. runs/ham10000: "
                    "its best model) (required; nothing is downloaded)")
    ex.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY",
                    help="your own model: a function that builds it (imported; called with "
                    "the keyword arguments the checkpoint records when it names the same "
                    "factory, else with none); --weights is then its jaxcam checkpoint")
    ex.add_argument("--import", action="append", dest="imports", default=[],
                    metavar="MODULE",
                    help="import a Python module (on PYTHONPATH) before anything else, "
                    "repeatable: e.g. one whose @jaxcam.methods.register(NAME) functions "
                    "make --method NAME available")
    ex.add_argument("--layer", help="target layer (name or alias); default: the model's "
                    "default layer (layer4, features.36, features.8)")
    ex.add_argument("--method", action="append", dest="methods", metavar="METHOD",
                    choices=_LazyChoices(lambda: (*_methods(), "all")),
                    help=_Lazy(lambda: f"CAM method, repeatable: {', '.join(_methods())}, or "
                               "'all' (default: gradcam++)"))
    which = ex.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_", metavar="CLASS",
                       help="class to explain for every image: an index or a class name "
                       "(default: each image's predicted class)")
    which.add_argument("--top-k", type=int, metavar="K",
                       help="explain each image's K most probable classes")
    ex.add_argument("--target", choices=_LazyChoices(_targets), metavar="TARGET",
                    help=_Lazy(lambda: f"scalar of the logits that is explained: "
                               f"{', '.join(_targets())} (default per method: "
                               f"{_default_targets()})"))
    ex.add_argument("--derivatives", choices=DERIVATIVES, default="exact",
                    help="Grad-CAM++ derivatives: exact (autodiff, default) or closed_form "
                    "(the paper's exp-target shortcut g^2, g^3)")
    ex.add_argument("--image-size", type=int, metavar="S",
                    help="model input side (default: the checkpoint's, 224 for torchvision "
                    "files); the resize-before-crop size scales with it")
    ex.add_argument("--out", default="jaxcam_out", metavar="DIR",
                    help="output directory (default: ./jaxcam_out)")
    ex.add_argument("--cmap", default="jet", help="matplotlib colormap (default: jet)")
    ex.add_argument("--alpha", type=float, default=0.5,
                    help="heatmap opacity in the overlays, 0..1 (default: 0.5)")
    ex.add_argument("--batch-size", type=int, default=16,
                    help="images per explain call (default: 16)")
    compilation.add_compilation_cache_option(ex)
    ex.set_defaults(func=cmd_explain)

    cv = commands.add_parser(
        "convert",
        help="convert torchvision or timm weights into a jaxcam checkpoint",
        description="Convert a torchvision or timm state dict (.pth/.pt/.safetensors) into a "
        "jaxcam checkpoint directory (weights, architecture, class names, preprocessing).",
    )
    cv.add_argument("weights", metavar="WEIGHTS",
                    help="torchvision or timm .pth/.pt/.safetensors file")
    cv.add_argument("out_dir", metavar="OUT_DIR",
                    help="checkpoint directory to create (must not exist, see --overwrite)")
    cv.add_argument("--arch", help=_Lazy(lambda: f"{_arch_help()}, or a timm name "
                    "(vit_base_patch16_224, timm/resnet50, ...); default: read from the keys"))
    cv.add_argument("--class-names", metavar="FILE",
                    help="text file with one class name per line, in class-index order "
                    "(default: ImageNet names for 1000-class weights, none otherwise)")
    cv.add_argument("--image-size", type=int, default=224, metavar="S",
                    help="input size recorded in the checkpoint (default: 224)")
    cv.add_argument("--overwrite", action="store_true",
                    help="replace OUT_DIR if it exists")
    compilation.add_compilation_cache_option(cv)
    cv.set_defaults(func=cmd_convert)

    data = commands.add_parser(
        "data", help="datasets: 'jaxcam data build NAME'",
        description="Dataset commands.",
    )
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND",
                                        parser_class=_Parser)
    data_commands.required = True
    build = data_commands.add_parser(
        "build", help="prepare a dataset (ham10000, aptos2019, synthetic_lesions)",
        description="Build a TFDS dataset from files you downloaded yourself "
        "(--manual-dir); nothing is downloaded. Re-running resumes.",
    )
    build.add_argument("name", metavar="NAME",
                       help="dataset: ham10000, aptos2019 or synthetic_lesions")
    build.add_argument("--manual-dir", metavar="DIR",
                       help="folder holding the downloaded archives/files")
    build.add_argument("--data-dir", metavar="DIR",
                       help="where to write the prepared dataset (default: TFDS's)")
    build.add_argument("--skip-bad", action="store_true",
                       help="skip unreadable or inconsistent records (listed in the summary) "
                       "instead of stopping")
    build.add_argument("--overwrite", action="store_true",
                       help="rebuild even if a build exists (swapped in only once complete)")
    build.add_argument("--config", metavar="NAME",
                       help="builder config, e.g. 'multi' for synthetic_lesions")
    build.set_defaults(func=cmd_data_build)
    return parser


# --------------------------------------------------------------------- explain


@dataclasses.dataclass
class ExplainPlan:
    """Everything ``jaxcam explain`` needs, validated; built before any heavy work."""

    paths: list[str]
    stems: list[str]
    images: list[Any]  # uint8 (H, W, 3) arrays
    bundle: Any  # LoadedModel
    preprocessing: Any  # Preprocessing
    layer: str
    methods: list[str]
    class_idx: int | None
    top_k: int
    class_names: tuple[str, ...] | None
    target: str | None
    derivatives: str
    out: str
    cmap: str
    alpha: float
    batch_size: int


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in torchvision's index order."""
    text = resources.files("jaxcam").joinpath("assets/imagenet_classes.txt").read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


def class_names_for(
    num_classes: int, checkpoint_names: Sequence[str] | None
) -> tuple[str, ...] | None:
    """Names to print: the checkpoint's own; else ImageNet's for a 1000-class model; else None."""
    if checkpoint_names is not None:
        if len(checkpoint_names) != num_classes:
            raise UsageError(
                f"the checkpoint lists {len(checkpoint_names)} class names for a "
                f"{num_classes}-class model; fix its class names (re-run 'jaxcam convert' "
                "with --class-names)"
            )
        return tuple(checkpoint_names)
    return imagenet_class_names() if num_classes == 1000 else None


def _class_name(names: Sequence[str] | None, idx: int) -> str:
    return names[idx] if names is not None else f"class {idx}"


def _parse_class(value: str, names: Sequence[str] | None, num_classes: int) -> int:
    """``--class``: an index in ``0..C-1`` or a class name (case-insensitive)."""
    try:
        idx = int(value)
    except ValueError:
        idx = None
    if idx is not None:
        if not 0 <= idx < num_classes:
            raise UsageError(
                f"--class {idx} is out of range: the model has {num_classes} classes "
                f"(valid: 0..{num_classes - 1})"
            )
        return idx
    if names is None:
        raise UsageError(
            f"--class {value!r} is not an index and the weights carry no class names; "
            f"give an index 0..{num_classes - 1}"
        )
    lowered = [n.lower() for n in names]
    if value.lower() in lowered:
        return lowered.index(value.lower())
    close = difflib.get_close_matches(value.lower(), lowered, n=3, cutoff=0.6)
    hint = (
        "did you mean " + ", ".join(repr(names[lowered.index(c)]) for c in close) + "?"
        if close
        else "give a class index or an exact class name"
    )
    raise UsageError(f"--class {value!r} is not a class of this model; {hint}")


def _expand_methods(requested: list[str] | None) -> list[str]:
    """Methods in request order, duplicates dropped; ``all`` -> every method."""
    import jaxcam

    requested = requested or ["gradcam++"]
    out: list[str] = []
    for m in requested:
        for name in jaxcam.METHODS if m == "all" else [m]:
            if name not in out:
                out.append(name)
    return out


def _user_model(factory: str, weights: str) -> Any:
    """``--model pkg.mod:fn``: the user's model, built by the factory they typed (trusted)."""
    from jaxcam import checkpoint

    if not os.path.isdir(weights):
        raise UsageError(
            f"--model needs --weights to be a jaxcam checkpoint directory of that model "
            f"(jaxcam.checkpoint.save(DIR, model, variables, factory={factory!r})); "
            f"{weights!r} is a file"
        )
    try:
        fn = checkpoint.import_factory(factory)
        recorded = checkpoint._factory_of(checkpoint.read_metadata(weights))
        kwargs = recorded[1] if recorded and recorded[0] == factory else {}
    except (ValueError, OSError) as e:
        raise UsageError(f"--model {factory}: {_one_line(e)}") from None
    try:
        return fn(**kwargs)
    except TypeError as e:
        raise UsageError(f"--model {factory}: calling it with {kwargs} failed: {_one_line(e)}"
                         ) from None


def _load_weights(weights: str, arch: str | None, factory: str | None = None):
    import jaxcam
    from jaxcam.weights import model_arch as weights_arch

    if not os.path.exists(weights):
        raise UsageError(
            f"--weights {weights!r} does not exist; give a torchvision .pth/.pt/.safetensors "
            "file, a jaxcam checkpoint directory or a training run's folder"
        )
    model = _user_model(factory, weights) if factory else None
    try:
        bundle = jaxcam.load(weights, arch=arch, model=model)
    except (ValueError, KeyError, TypeError, OSError) as e:
        what = f" as --arch {arch}" if arch else ""
        raise UsageError(f"cannot load --weights {weights!r}{what}: {_one_line(e)}") from None
    if arch is not None and bundle.model.arch != weights_arch(arch):
        raise UsageError(
            f"--weights {weights!r} is a {bundle.model.arch} checkpoint but --arch is {arch}; "
            f"drop --arch or pass --arch {bundle.model.arch}"
        )
    return bundle


def plan_explain(args: argparse.Namespace) -> ExplainPlan:
    """Validate every input of ``jaxcam explain``; raises :class:`UsageError`."""
    from jaxcam.io import load_image

    if args.weights is None:
        raise UsageError(NO_WEIGHTS_MESSAGE)
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a directory; choose another")
    from jaxcam.viz import get_cmap

    try:
        get_cmap(args.cmap)
    except ValueError as e:
        raise UsageError(f"--cmap: {e}") from None
    methods = _expand_methods(args.methods)

    images, stems = [], []
    for path in args.images:
        try:
            images.append(load_image(path))
        except (ValueError, OSError) as e:
            raise UsageError(_one_line(e)) from None
        stems.append(os.path.splitext(os.path.basename(path))[0])
    seen: dict[str, str] = {}
    for path, stem in zip(args.images, stems, strict=True):
        if stem in seen:
            raise UsageError(
                f"images {seen[stem]!r} and {path!r} would write the same output files "
                f"({stem}_*); rename one or explain them in separate runs"
            )
        seen[stem] = path

    bundle = _load_weights(args.weights, args.arch, args.model)
    model = bundle.model
    prep = bundle.preprocessing
    if args.image_size is not None and args.image_size != prep.image_size:
        size = args.image_size
        resize = None if prep.resize_size is None else round(
            size * prep.resize_size / prep.image_size)
        prep = dataclasses.replace(prep, image_size=size, resize_size=resize)
    min_size = getattr(model, "min_image_size", 1)
    if prep.image_size < min_size:
        raise UsageError(
            f"--image-size {prep.image_size} is too small for {model.arch}; "
            f"use at least {min_size}"
        )
    try:
        layer = model.resolve_layer(args.layer) if args.layer else model.default_layer
    except ValueError as e:
        raise UsageError(f"--layer: {_one_line(e)}") from None

    if "cam" in methods and model.linear_head(bundle.variables, layer) is None:
        if "cam" in (args.methods or []):  # asked for by name, not only through 'all'
            raise UsageError(
                f"method 'cam' needs a global-average-pool + dense head after the layer, "
                f"which {model.arch} at layer {layer!r} does not have; use gradcam (its "
                "generalisation) or a layer followed by such a head"
            )
        methods.remove("cam")
        print(f"note: skipping 'cam' ({model.arch} at {layer} has no GAP + dense head)",
              file=sys.stderr)

    num_classes = model.num_classes
    names = class_names_for(num_classes, bundle.class_names)
    class_idx = None if args.class_ is None else _parse_class(args.class_, names, num_classes)
    top_k = args.top_k or 1
    if top_k > num_classes:
        raise UsageError(
            f"--top-k {top_k} exceeds the number of classes ({num_classes}); "
            f"use at most {num_classes}"
        )
    return ExplainPlan(
        paths=list(args.images), stems=stems, images=images, bundle=bundle,
        preprocessing=prep, layer=layer, methods=methods, class_idx=class_idx, top_k=top_k,
        class_names=names, target=args.target,
        derivatives=args.derivatives, out=args.out, cmap=args.cmap, alpha=args.alpha,
        batch_size=args.batch_size,
    )


def _explain_kwargs(plan: ExplainPlan) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"layer": plan.layer, "derivatives": plan.derivatives}
    if plan.target is not None:
        kwargs["target"] = plan.target
    return kwargs


def run_explain(plan: ExplainPlan) -> tuple[Any, Any, list[dict[str, Any]]]:
    """The heavy part: predictions and explanations, in memory.

    Returns ``shown`` (uint8 ``(B, S, S, 3)``, the model's view of each image),
    ``probs`` (``(B, C)``, softmax of the logits) and, per explained rank, a dict
    ``{"class_idx": (B,), "maps": {method: (B, S, S)}, "raw": {method: (B, h, w)},
    "degenerate": {method: (B,)}}``.

    Without ``--class``/``--top-k`` this is exactly ``jaxcam.explain(model,
    variables, x, method=methods, layer=..., derivatives=..., target=...)`` with
    ``class_idx=None`` (each image's predicted class). The logits come from the
    first explain call, so there is no separate forward pass.
    """
    import numpy as np
    from tqdm import tqdm

    import jaxcam
    from jaxcam.io import inputs_to_uint8
    from jaxcam.preprocessing import preprocess

    model, variables = plan.bundle.model, plan.bundle.variables
    x = np.stack([preprocess(img, plan.preprocessing) for img in plan.images]).astype(np.float32)
    shown = inputs_to_uint8(x, plan.preprocessing)
    chunks = [slice(i, i + plan.batch_size) for i in range(0, len(x), plan.batch_size)]
    kwargs = _explain_kwargs(plan)
    batch = len(x)
    ranks = [
        {"class_idx": np.zeros(batch, np.int32), "maps": {}, "raw": {}, "degenerate": {}}
        for _ in range(plan.top_k)
    ]
    logits = np.zeros((batch, model.num_classes), np.float64)
    progress = tqdm(total=plan.top_k * len(chunks), desc="explain", unit="batch",
                    disable=plan.top_k * len(chunks) < 2, leave=False)
    for s in chunks:
        for r, rank in enumerate(ranks):
            if plan.class_idx is not None:
                cls = np.full(len(x[s]), plan.class_idx, np.int32)
            elif r == 0:
                cls = None  # each image's argmax: the library's default call
            else:
                cls = np.argsort(-logits[s], axis=-1, kind="stable")[:, r].astype(np.int32)
            result = jaxcam.explain(model, variables, x[s], method=list(plan.methods),
                                    class_idx=cls, **kwargs)
            first = result[plan.methods[0]]
            if r == 0:
                logits[s] = np.asarray(first.logits, np.float64)
            rank["class_idx"][s] = np.asarray(first.class_idx)
            for name in plan.methods:
                for key, value in (("maps", result[name].maps), ("raw", result[name].raw),
                                   ("degenerate", result[name].degenerate)):
                    rank[key].setdefault(name, []).append(np.asarray(value))
            progress.update()
    progress.close()
    for rank in ranks:
        for key in ("maps", "raw", "degenerate"):
            rank[key] = {m: np.concatenate(v) for m, v in rank[key].items()}
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    return shown, probs, ranks


def _write_explain_outputs(
    plan: ExplainPlan, shown: Any, probs: Any, ranks: list[dict[str, Any]],
    directory: str,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Write every output file into ``directory``; returns file names and the summary."""
    import numpy as np

    from jaxcam import viz

    files: list[str] = []
    summary: list[dict[str, Any]] = []
    names = plan.class_names
    num_top = min(5, probs.shape[1])
    for i, (path, stem) in enumerate(zip(plan.paths, plan.stems, strict=True)):
        order = np.argsort(-probs[i], kind="stable")
        entry: dict[str, Any] = {
            "image": path,
            "predictions": [
                {"class_idx": int(c), "class_name": _class_name(names, int(c)),
                 "probability": float(probs[i, c])}
                for c in order[:num_top]
            ],
            "explained": [],
        }
        row_titles, grid_maps = [], {m: [] for m in plan.methods}
        for r, rank in enumerate(ranks):
            c = int(rank["class_idx"][i])
            prefix = stem if plan.top_k == 1 else f"{stem}_top{r + 1}"
            written = {}
            for m in plan.methods:
                heat = rank["maps"][m][i]
                viz.save_image(viz.overlay(shown[i], heat, cmap=plan.cmap, alpha=plan.alpha),
                               os.path.join(directory, f"{prefix}_{m}.png"))
                np.save(os.path.join(directory, f"{prefix}_{m}.npy"), heat)
                np.save(os.path.join(directory, f"{prefix}_{m}_raw.npy"), rank["raw"][m][i])
                written[m] = [f"{prefix}_{m}.png", f"{prefix}_{m}.npy", f"{prefix}_{m}_raw.npy"]
                files.extend(written[m])
                grid_maps[m].append(heat)
            label = f"{_class_name(names, c)} ({probs[i, c]:.1%})"
            row_titles.append(label)
            entry["explained"].append({
                "rank": r + 1, "class_idx": c, "class_name": _class_name(names, c),
                "probability": float(probs[i, c]), "files": written,
                # a flat raw map (e.g. all zero after the ReLU) is saved as zeros
                "degenerate": [m for m in plan.methods if bool(rank["degenerate"][m][i])],
            })
        fig = viz.method_grid(
            np.repeat(shown[i][None], len(ranks), axis=0),
            {m: np.stack(v) for m, v in grid_maps.items()},
            cmap=plan.cmap, alpha=plan.alpha, row_titles=row_titles,
            title=f"{os.path.basename(path)} - {plan.bundle.model.arch} @ {plan.layer}",
        )
        viz.save_figure(fig, os.path.join(directory, f"{stem}_grid.png"))
        files.append(f"{stem}_grid.png")
        entry["grid"] = f"{stem}_grid.png"
        summary.append(entry)
    settings = {
        "arch": plan.bundle.model.arch, "layer": plan.layer, "methods": plan.methods,
        "target": plan.target, "derivatives": plan.derivatives,
        "preprocessing": plan.preprocessing.to_dict(),
    }
    with open(os.path.join(directory, "predictions.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "images": summary}, f, indent=2)
    files.append("predictions.json")
    return files, summary


def _publish(tmp: str, out: str, files: list[str]) -> None:
    """Move finished files from ``tmp`` into ``out`` (created if needed)."""
    os.makedirs(out, exist_ok=True)
    for name in files:
        os.replace(os.path.join(tmp, name), os.path.join(out, name))


def cmd_explain(args: argparse.Namespace) -> int:
    plan = plan_explain(args)
    shown, probs, ranks = run_explain(plan)
    parent = os.path.dirname(os.path.abspath(plan.out))
    os.makedirs(parent, exist_ok=True)
    # Write everything into a sibling temp dir first, so a failure leaves no partial output.
    tmp = tempfile.mkdtemp(prefix=".jaxcam-explain-", dir=parent)
    try:
        files, summary = _write_explain_outputs(plan, shown, probs, ranks, tmp)
        _publish(tmp, plan.out, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for entry in summary:
        print(entry["image"])
        explained = {e["class_idx"] for e in entry["explained"]}
        for rank, p in enumerate(entry["predictions"], start=1):
            mark = "  <- explained" if p["class_idx"] in explained else ""
            print(f"  {rank}. {p['class_name']} ({p['class_idx']}): {p['probability']:.2%}{mark}")
        shown_classes = {p["class_idx"] for p in entry["predictions"]}
        for e in entry["explained"]:
            if e["class_idx"] not in shown_classes:
                print(f"  explained: {e['class_name']} ({e['class_idx']}): "
                      f"{e['probability']:.2%}")
            if e["degenerate"]:
                print(f"warning: {entry['image']}: the {', '.join(e['degenerate'])} map for "
                      f"{e['class_name']!r} is flat (no positive evidence at {plan.layer}); "
                      "saved as zeros", file=sys.stderr)
    print(f"wrote {len(files)} files to {plan.out} (methods: {', '.join(plan.methods)}; "
          f"layer: {plan.layer})")
    return 0


# --------------------------------------------------------------------- convert, data


def _read_class_names(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"--class-names {path!r} does not exist; give a text file with one "
                         "class name per line")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise UsageError(f"--class-names {path!r} holds no names; one class name per line")
    return names


def cmd_convert(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.weights):
        raise UsageError(
            f"WEIGHTS {args.weights!r} does not exist or is not a file; give a torchvision "
            "or timm .pth/.pt/.safetensors file"
        )
    if os.path.exists(args.out_dir) and not args.overwrite:
        raise UsageError(f"OUT_DIR {args.out_dir!r} already exists; choose a new directory "
                         "or pass --overwrite to replace it")
    if args.image_size < 1:
        raise UsageError(f"--image-size must be positive, got {args.image_size}")
    class_names = _read_class_names(args.class_names) if args.class_names else None
    from jaxcam.loading import convert

    try:  # checkpoint.save is atomic: a failure leaves no partial OUT_DIR
        convert(args.weights, args.out_dir, args.arch, class_names=class_names,
                image_size=args.image_size, overwrite=args.overwrite)
    except (ValueError, KeyError, FileExistsError) as e:
        what = f" as {args.arch}" if args.arch else ""
        raise UsageError(f"cannot convert {args.weights!r}{what}: {_one_line(e)}") from None
    print(f"converted {args.weights} ({args.arch or 'architecture from the keys'}) -> "
          f"{args.out_dir}")
    print(f"explain with: jaxcam explain IMAGE --weights {args.out_dir}")
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    """``jaxcam data build``: :func:`jaxcam.data.build`, which validates every input
    file before writing and prints its own summary (counts per split and class,
    skipped records)."""
    import jaxcam.data

    if args.name not in jaxcam.data.DATASETS:
        raise UsageError(f"unknown dataset {args.name!r}; choose one of "
                         f"{', '.join(jaxcam.data.DATASETS)}")
    # a missing or wrong folder: the expected layout and where to download it
    jaxcam.data.check_manual_dir(args.name, args.manual_dir)
    config = {} if args.config is None else {"config": args.config}
    jaxcam.data.build(args.name, manual_dir=args.manual_dir, data_dir=args.data_dir,
                      skip_bad=args.skip_bad, overwrite=args.overwrite, **config)
    return 0


# --------------------------------------------------------------------- entry point


def requested_imports(argv: Sequence[str]) -> list[str]:
    """The ``--import MODULE`` / ``--import=MODULE`` values of an ``explain`` command line,
    in order (read before parsing, so that ``--method`` choices include what they
    register wherever on the line ``--import`` stands)."""
    argv = list(argv)
    i = 0  # skip the top-level options to the command word
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--compilation-cache" else 1
    if i >= len(argv) or argv[i] != "explain":
        return []
    rest = argv[i + 1:]
    if "--" in rest:
        rest = rest[:rest.index("--")]
    modules = []
    for i, token in enumerate(rest):
        if token == "--import" and i + 1 < len(rest):
            modules.append(rest[i + 1])
        elif token.startswith("--import="):
            modules.append(token.partition("=")[2])
    return modules


def import_modules(modules: Sequence[str]) -> None:
    """``--import``: import each module (running its code, e.g. method registrations).

    Raises :class:`UsageError` naming the module that failed and why.
    """
    import importlib

    for name in modules:
        if name.endswith(".py") or any(not part.isidentifier() for part in name.split(".")):
            raise UsageError(f"--import {name!r} is not a module name; give a dotted Python "
                             "module name such as 'mymethods' (for mymethods.py, its folder "
                             "on PYTHONPATH) or 'mypkg.cams'")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise UsageError(f"--import {name}: importing module {name!r} failed: "
                                 f"{_one_line(e)}") from None  # a module it imports
            raise UsageError(
                f"--import {name}: cannot import module {name!r} ({_one_line(e)}); check the "
                "name and put its folder on PYTHONPATH"
            ) from None
        except Exception as e:
            if os.environ.get("JAXCAM_DEBUG"):
                raise
            raise UsageError(f"--import {name}: importing module {name!r} failed: "
                             f"{type(e).__name__}: {_one_line(e)}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxcam`` console script. Returns 0; exits 2 on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # before parsing: the modules may register methods that --method then accepts
        import_modules(requested_imports(argv))
    except UsageError as e:
        print(f"{PROG} explain: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command if args.command != "data" else f"data {args.data_command}"
    try:
        if args.command in ("explain", "convert"):  # the commands that compile
            compilation.enable_from_args(args)
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        if os.environ.get("JAXCAM_DEBUG"):
            raise  # full traceback, for bug reports
        # data builders explain the expected folder layout over several lines; keep those
        message = str(e) if args.command == "data" else _one_line(e)
        print(f"{PROG} {command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
