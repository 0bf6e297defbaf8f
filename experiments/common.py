"""Shared machinery of the experiments: options, data, training, explanations, report.

``experiments.ham10000`` and ``experiments.aptos2019`` differ only in an
:class:`ExperimentSpec` (dataset, methods, headline metric, reference numbers)
and in their config defaults; everything else — option parsing and fail-fast
validation, dataset build, fine-tuning with :mod:`jaxcam.train`, the
classification report, the explanation panels, signed maps, GIF, method
agreement, localization / faithfulness metrics and ``report.md`` +
``metrics.json`` — is here, done one way for both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from jaxcam import compilation, report
from jaxcam.models import ARCHS  # every architecture jaxcam ships
from jaxcam.report import percent as _pct

SYNTHETIC = "synthetic_lesions"

# Display names of the explanation methods: label -> (jaxcam method, derivatives).
METHOD_LABELS: dict[str, tuple[str, str]] = {
    "Grad-CAM": ("gradcam", "exact"),
    "Grad-CAM++ (exact)": ("gradcam++", "exact"),
    "Grad-CAM++ (closed form)": ("gradcam++", "closed_form"),
    "XGrad-CAM": ("xgradcam", "exact"),
    "CAM": ("cam", "exact"),
}


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Options shared by the experiments (each experiment subclasses it with its defaults).

    ``data_dir`` None runs on the synthetic lesion set. ``cache_dir`` holds the
    built TFDS dataset (default ``<out>/tfds``). ``num_images`` sizes the
    synthetic set; ``num_figures`` the explanation panels written;
    ``max_explain`` caps the test images explained for the metrics (None: all).
    """

    data_dir: str | None = None
    pretrained: str | None = None
    arch: str = "resnet50"
    layer: str | None = None
    epochs: int = 2
    image_size: int = 64
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    class_weighting: bool = False
    balanced: bool = False
    patience: int | None = None
    checkpoint_every: int = 100
    num_images: int = 900
    num_figures: int = 4
    num_gif: int = 12
    max_explain: int | None = None
    out: str = "runs/experiment"
    cache_dir: str | None = None
    seed: int = 0
    progress: bool = True

    @property
    def synthetic(self) -> bool:
        return self.data_dir is None


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """What one experiment is: its dataset, methods, metrics and reference numbers."""

    name: str  # module name, e.g. "ham10000"
    title: str
    dataset: str  # TFDS builder for --data-dir
    methods: tuple[str, ...]  # keys of METHOD_LABELS
    headline: str  # "accuracy" | "kappa"
    reference: dict[str, float]  # reference numbers (real dataset), report keys
    reference_source: str
    signed: bool = True  # malignant (red) / benign (blue) display


_HELP = {
    "data_dir": "folder with the Kaggle download; without it the synthetic lesion set is used",
    "pretrained": "torchvision weights file (.pth/.pt/.safetensors) to fine-tune from",
    "arch": f"architecture, one of {', '.join(ARCHS)}",
    "layer": "target layer of the explanations (default: the model's default layer, or the "
             "deepest cut point with a map of at least 4x4 when the default's is coarser)",
    "num_images": "size of the synthetic set (ignored with --data-dir)",
    "max_explain": "explain at most this many test images for the metrics (default: all)",
    "cache_dir": "where the TFDS dataset is built (default: OUT/tfds)",
}


def explicit_options(cls: type, argv: Sequence[str] | None, help_text: dict[str, str],
                     description: str, prog: str | None = None) -> dict[str, Any]:
    """The options given on the command line, ``{field: value}``: one ``--field-name``
    per field of the dataclass ``cls`` (bools ``--x/--no-x``, ``progress`` as
    ``--no-progress``; int / float / str by the field's type) and
    ``--compilation-cache`` (read by ``compilation.enable_from_argv``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind = field.type if isinstance(field.type, str) else field.type.__name__
        if field.name == "progress":
            parser.add_argument("--no-progress", dest="progress", action="store_false",
                                default=None, help="hide progress bars")
        elif kind == "bool":
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text.get(field.name))
        else:
            conv = int if "int" in kind else float if "float" in kind else str
            parser.add_argument(flag, dest=field.name, type=conv, default=None,
                                help=help_text.get(field.name, f"default {field.default!r}"))
    compilation.add_compilation_cache_option(parser)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    args.pop("compilation_cache", None)
    return args


def parse_config(
    cls: type[ExperimentConfig],
    argv: Sequence[str] | None,
    real_defaults: dict[str, Any],
    description: str,
) -> ExperimentConfig:
    """Command line -> config. Defaults come from ``cls`` for the synthetic set and from
    ``real_defaults`` (the reference setup) when ``--data-dir`` is given; explicit
    options override both."""
    args = explicit_options(cls, argv, _HELP, description)
    base = cls()
    if args.get("data_dir") is not None:
        base = dataclasses.replace(base, **real_defaults)
    return dataclasses.replace(base, **args)


def validate(config: ExperimentConfig) -> Path:
    """Fail fast, before any dataset build or training; returns the output folder."""
    if config.arch not in ARCHS:
        raise ValueError(f"unknown --arch {config.arch!r}; choose one of {', '.join(ARCHS)}.")
    if config.data_dir is not None and not Path(config.data_dir).is_dir():
        raise FileNotFoundError(
            f"--data-dir {config.data_dir!r} does not exist or is not a folder; give the "
            "folder holding the Kaggle download, or leave --data-dir out to use the "
            "synthetic lesion set."
        )
    if config.pretrained is not None and not Path(config.pretrained).is_file():
        raise FileNotFoundError(
            f"--pretrained {config.pretrained!r} is not a file; give a torchvision weights "
            "file (.pth, .pt or .safetensors), e.g. one saved with torch.save(model.state_dict())."
        )
    for name in ("epochs", "image_size", "batch_size", "num_images"):
        if getattr(config, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= 1, got {getattr(config, name)}.")
    if config.image_size < 32:
        raise ValueError(f"--image-size must be >= 32 (the models downsample 32x), got "
                         f"{config.image_size}.")
    if config.synthetic and config.batch_size > config.num_images:
        raise ValueError(
            f"--batch-size {config.batch_size} is larger than the dataset "
            f"({config.num_images} images); lower --batch-size or raise --num-images."
        )
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"output folder {str(out)!r} is not writable ({err.strerror}); choose another --out."
        ) from None
    return out


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    name: str
    splits: dict[str, Any]  # split -> random-access source
    class_names: tuple[str, ...]
    malignant: tuple[bool, ...] | None
    builder_config: dict[str, Any]


def load_data(config: ExperimentConfig, spec: ExperimentSpec, out: Path) -> Data:
    """Build (once, cached) and open the dataset's train / validation / test splits."""
    import jaxcam.data as jdata

    cache = str(Path(config.cache_dir) if config.cache_dir else out / "tfds")
    if config.synthetic:
        name = SYNTHETIC
        n_val = n_test = max(1, round(0.15 * config.num_images))
        builder_config = {"num_train": config.num_images - n_val - n_test,
                          "num_validation": n_val, "num_test": n_test,
                          "image_size": config.image_size, "seed": config.seed}
        print(f"*** No --data-dir: using the SYNTHETIC lesion set ({config.num_images} images, "
              f"{config.image_size} px), not {spec.title}. Numbers below are about the "
              "synthetic set. ***", flush=True)
        splits = jdata.build_splits(name, cache, progress=config.progress, **builder_config)
    else:
        name, builder_config = spec.dataset, {}
        print(f"Using {spec.title} from {config.data_dir}", flush=True)
        splits = jdata.build_splits(name, cache, manual_dir=config.data_dir,
                                    progress=config.progress)
    meta = jdata.info(name)
    return Data(name, splits, tuple(meta.display_names), tuple(meta.malignant), builder_config)


# --------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------


def train_config(config: ExperimentConfig, spec: ExperimentSpec):
    """The :class:`jaxcam.train.TrainConfig` of an experiment's options."""
    from jaxcam import train

    return train.TrainConfig(
        epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, label_smoothing=config.label_smoothing,
        class_weighting=config.class_weighting, patience=config.patience,
        checkpoint_every=config.checkpoint_every, seed=config.seed,
        monitor="kappa" if spec.headline == "kappa" else "balanced_accuracy",
    )


def train_on_synthetic(model, variables, out: Path, *, arch: str | None = None, **kwargs):
    """:func:`jaxcam.train.train_on_synthetic` (``arch`` is ignored: the model's), the name
    ``experiments.derivatives`` calls."""
    from jaxcam import train

    return train.train_on_synthetic(model, variables, out, **kwargs)


# --------------------------------------------------------------------------------------
# Explanations
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Explained:
    """Test-set explanations: maps per method label, and what they explain."""

    images01: np.ndarray  # (N, S, S, 3) display images
    inputs: np.ndarray  # (N, S, S, 3) normalised model inputs
    labels: np.ndarray  # (N,)
    pred: np.ndarray  # (N,)
    probs: np.ndarray  # (N, C)
    masks: np.ndarray | None  # (N, S, S) uint8
    maps: dict[str, np.ndarray]  # label -> (N, S, S) in [0, 1]
    skipped: dict[str, str]  # label -> why
    layers: dict[str, str]  # label -> the layer it was computed at


MIN_MAP_SIZE = 4


def explained_layer(model, variables, image_size: int, layer: str | None) -> str:
    """``layer`` if given, else :func:`jaxcam.models.layer_for_image_size` (the default
    layer unless its map is coarser than ``MIN_MAP_SIZE`` x ``MIN_MAP_SIZE``)."""
    from jaxcam import models

    if layer is not None:
        return model.resolve_layer(layer)
    return models.layer_for_image_size(model, variables, image_size, min_map_size=MIN_MAP_SIZE)


def available_methods(labels: Sequence[str], model, variables, layer: str,
                      method_labels: dict[str, tuple[str, str]] = METHOD_LABELS,
                      ) -> tuple[dict[str, str], dict[str, str]]:
    """``{method label: layer it runs at}`` and ``{skipped label: why}`` for ``labels``
    (keys of ``method_labels``), by :func:`jaxcam.methods.placement` (CAM moves to a
    global-average-pool + dense layer)."""
    from jaxcam import methods

    placed = {label: methods.placement(method_labels[label][0], model, variables, layer)
              for label in labels}
    return ({label: at for label, (at, _) in placed.items() if at is not None},
            {label: why for label, (_, why) in placed.items() if why is not None})


def explain_test_set(config, spec, model, variables, source, predict_fn,
                     layer: str) -> Explained:
    """Explain the predicted class of (up to ``max_explain``) test images with every method
    at ``layer`` (CAM at its GAP + dense layer, see :func:`available_methods`)."""
    import jax
    from tqdm.auto import tqdm

    import jaxcam.data as jdata
    from jaxcam import distributed
    from jaxcam.dataset_explain import explain_groups
    from jaxcam.preprocessing import denormalize

    layers, skipped = available_methods(spec.methods, model, variables, layer)
    triples = {label: (*METHOD_LABELS[label], at) for label, at in layers.items()}
    limit = config.max_explain if config.max_explain is not None else len(source)
    keep: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "label", "mask", "probs",
                                                          *layers)}
    bar = tqdm(total=min(limit, len(source)), desc="explain", disable=not config.progress,
               leave=False)
    seen = 0
    for batch in jdata.batches(source, config.batch_size, config.image_size, train=False,
                               seed=config.seed, drop_remainder=False):
        if seen >= limit:
            break
        n = min(len(batch["label"]), limit - seen)
        x = np.asarray(batch["image"])[:n]
        xp, _ = distributed.pad_batch(x, config.batch_size)  # one compiled shape
        for label, e in explain_groups(model, variables, xp, triples).items():
            keep[label].append(np.asarray(e.maps)[:n])
        keep["image"].append(x)
        keep["label"].append(np.asarray(batch["label"])[:n])
        keep["probs"].append(np.asarray(jax.nn.softmax(predict_fn(variables, xp), -1))[:n])
        if "mask" in batch:
            keep["mask"].append(np.asarray(batch["mask"])[:n])
        seen += n
        bar.update(n)
    bar.close()
    cat = {k: np.concatenate(v) for k, v in keep.items() if v}
    return Explained(
        images01=np.asarray(denormalize(cat["image"])), inputs=cat["image"],
        labels=cat["label"], pred=cat["probs"].argmax(-1), probs=cat["probs"],
        masks=cat.get("mask"), maps={m: cat[m] for m in layers}, skipped=skipped, layers=layers,
    )


def explanation_metrics(config, model, variables, ex: Explained) -> dict[str, Any]:
    """Localization (vs masks), faithfulness (average drop) and agreement between methods.

    Per method: pointing-game hit rate and energy pointing game against the
    lesion masks (when the dataset has them), Average Drop (:func:`jaxcam.metrics.drop`
    averaged, as a fraction; lower is better) and Increase in Confidence (Chattopadhyay
    et al. 2018). Per pair of methods: mean Spearman rank correlation and top-20% IoU;
    images where every pair's IoU >= 0.5 count as "all methods agree".
    """
    import jax

    from jaxcam import metrics
    from jaxcam.distributed import map_padded

    out: dict[str, Any] = {"per_method": {}, "agreement": {}}
    n = len(ex.labels)

    def mean_of(fn, *arrays) -> float:
        return float(np.mean(map_padded(fn, arrays, config.batch_size)))

    @jax.jit
    def confidence(v, x, m, c):  # variables are an argument, not constants folded into HLO
        return metrics.confidence_scores(lambda z: jax.nn.softmax(model.apply(v, z), -1),
                                         x, m, c)

    pointing, energy = jax.jit(metrics.pointing_game), jax.jit(metrics.energy_pointing_game)
    spearman = jax.jit(metrics.spearman)
    top20_iou = jax.jit(lambda a, b: metrics.top_k_iou(a, b, 20.0))

    if ex.masks is not None:
        out["random_baseline_pointing"] = float(ex.masks.reshape(n, -1).mean())
    for label, maps in ex.maps.items():
        row: dict[str, float] = {}
        if ex.masks is not None:
            row["pointing_game"] = mean_of(pointing, maps, ex.masks)
            row["energy_pointing_game"] = mean_of(energy, maps, ex.masks)
        scores = metrics.ConfidenceScores(*map_padded(
            partial(confidence, variables), (ex.inputs, maps, ex.pred), config.batch_size))
        row["average_drop"] = float(np.mean(metrics.drop(scores)))
        row["increase_in_confidence"] = float(np.mean(scores.original < scores.explained))
        out["per_method"][label] = row

    labels = list(ex.maps)
    pairs, pair_iou = {}, []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            iou = map_padded(top20_iou, (ex.maps[a], ex.maps[b]), config.batch_size)
            pairs[f"{a} vs {b}"] = {"spearman": mean_of(spearman, ex.maps[a], ex.maps[b]),
                                    "top20_iou": float(np.mean(iou))}
            pair_iou.append(iou)
    out["agreement"]["pairs"] = pairs
    if pair_iou:
        agree = np.min(np.stack(pair_iou), axis=0) >= 0.5
        correct = ex.pred == ex.labels
        out["agreement"].update({
            "rule": "all pairwise top-20% IoU >= 0.5",
            "agree_count": int(agree.sum()),
            "disagree_count": int((~agree).sum()),
            "accuracy_agree": float(correct[agree].mean()) if agree.any() else None,
            "accuracy_disagree": float(correct[~agree].mean()) if (~agree).any() else None,
        })
    return out


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def explanation_figure(ex: Explained, i: int, class_names, malignant, signed: bool):
    """Original | each method; rows: heatmap, overlay (and signed overlay)."""
    from jaxcam import viz

    pred = int(ex.pred[i])
    group = "" if malignant is None else (" (malignant)" if malignant[pred] else " (benign)")
    return viz.explanation_panels(
        ex.images01[i], {label: m[i] for label, m in ex.maps.items()},
        mask=None if ex.masks is None else ex.masks[i],
        positive=bool(malignant[pred]) if signed and malignant is not None else None,
        title=f"true: {class_names[int(ex.labels[i])]} | predicted: {class_names[pred]}"
              f"{group}, p={ex.probs[i, pred]:.2f}")


def write_gif(path: Path, ex: Explained, label: str, class_names, malignant, count: int,
              size: int = 160) -> str:
    """Frames: original | overlay of ``label``'s map (signed when malignancy is known)."""
    from jaxcam import viz

    frames, captions = [], []
    for i in range(min(count, len(ex.labels))):
        pred = int(ex.pred[i])
        positive = None if malignant is None else bool(malignant[pred])
        frames.append(viz.overlay_pair(ex.images01[i], ex.maps[label][i], positive=positive,
                                       size=size))
        group = "" if positive is None else ("malignant" if positive else "benign")
        captions.append(f"pred {class_names[pred]} {group} (true {class_names[int(ex.labels[i])]})")
    return viz.save_gif(path, frames, captions=captions, duration_ms=900)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def write_report(out: Path, spec: ExperimentSpec, config: ExperimentConfig, data: Data,
                 results: dict[str, Any]) -> None:
    """``report.md`` and ``metrics.json`` from the collected results."""
    (out / "metrics.json").write_text(json.dumps(results, indent=2,
                                                 default=report.json_default))
    train_r, test_r = results["train"], results["test"]
    names = data.class_names
    lines = [f"# {spec.title}: fine-tuning and CAM explanations", ""]
    if config.synthetic:
        lines += [
            f"> **Synthetic data.** No `--data-dir` was given, so this run used the synthetic "
            f"lesion set ({config.num_images} images, {config.image_size} px, "
            f"{len(names)} classes), not {spec.title}. The numbers describe the synthetic set; "
            "the reference numbers of the real study are not comparable and are not shown.", "",
        ]
    else:
        lines += [f"Dataset: {spec.title} from `{config.data_dir}`.", ""]
    lines += ["## Setup", "", *report.table(["option", "value"], (
        (k, f"`{v}`") for k, v in dataclasses.asdict(config).items()))]
    sizes = results["data"]["split_sizes"]
    lines += ["", f"Splits: train {sizes['train']}, validation {sizes['validation']}, "
              f"test {sizes['test']} images. Training took {results['timing']['train_s']:.0f} s "
              f"({results['training']['steps']} steps, best epoch "
              f"{results['training']['best_epoch']}).", ""]
    lines += ["## Classification", ""]
    head = ["metric", "ours"] + ([] if config.synthetic else ["reference"])
    rows = [
        ("train accuracy", train_r["accuracy"], "train_accuracy"),
        ("test accuracy", test_r["accuracy"], "test_accuracy"),
        ("test balanced accuracy", test_r["balanced_accuracy"], "test_balanced_accuracy"),
        ("test macro F1", test_r["macro"]["f1"], "test_macro_f1"),
        ("test weighted F1", test_r["weighted"]["f1"], "test_weighted_f1"),
        ("test quadratic weighted kappa", test_r["kappa"], "test_kappa"),
    ]

    def cell(label: str, v: float | None) -> str:
        plain = "F1" in label or "kappa" in label
        return "" if v is None else (f"{v:.3f}" if plain else _pct(v))

    lines += report.table(head, ([label, cell(label, ours)] + (
        [] if config.synthetic else [cell(label, spec.reference.get(key))])
        for label, ours, key in rows))
    if not config.synthetic:
        lines += ["", f"Reference: {spec.reference_source}."]
    lines += ["", f"Chance level (uniform guess): {_pct(1 / len(names))}; majority class: "
              f"{_pct(max(test_r['per_class']['support']) / max(test_r['total'], 1))}.", ""]
    pc = test_r["per_class"]
    scores = [(name, pc["precision"][c], pc["recall"][c], pc["f1"][c], pc["support"][c])
              for c, name in enumerate(names)] + [
        (f"*{avg} avg*", test_r[avg]["precision"], test_r[avg]["recall"], test_r[avg]["f1"],
         test_r["total"]) for avg in ("macro", "weighted")]
    lines += ["### Per class (test)", "", *report.table(
        ["class", "precision", "recall", "F1", "support"],
        ([n, f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", k] for n, p, r, f, k in scores))]
    lines += ["", "![confusion matrix](confusion_matrix.png)", "",
              "![training curves](training_curves.png)", ""]
    exm = results.get("explanations")
    if exm:
        lines += ["## Explanations", "",
                  f"Maps for the predicted class of {exm['count']} test images, at layer "
                  f"`{exm['layer']}`. Figures: " + ", ".join(
                      f"[{Path(p).name}]({p})" for p in exm["figures"]) + ".", "",
                  f"Animated: ![test images]({exm['gif']})", ""]
        for label, at in exm.get("method_layers", {}).items():
            if at != exm["layer"]:
                lines.append(f"- {label} is computed at `{at}`, the model's global-average-pool "
                             f"+ dense layer (CAM exists only there).")
        if results["config"].get("layer") is None and exm["layer"] != exm["default_layer"]:
            lines.append(f"- Layer `{exm['layer']}`, not the default `{exm['default_layer']}`: "
                         f"at {results['config']['image_size']} px the default's map is coarser "
                         f"than {MIN_MAP_SIZE}x{MIN_MAP_SIZE}; pass `--layer` to choose.")
        for label, why in exm["skipped"].items():
            lines.append(f"- {label} skipped: {why}.")
        per = exm["metrics"]["per_method"]
        if per:
            has_masks = "random_baseline_pointing" in exm["metrics"]
            head = ["method"] + (["pointing game", "energy pointing game"] if has_masks else [])
            head += ["average drop", "increase in confidence"]
            lines += ["", "### Localization and faithfulness", "", *report.table(head, (
                [label] + ([_pct(row["pointing_game"]), f"{row['energy_pointing_game']:.3f}"]
                           if has_masks else [])
                + [_pct(row["average_drop"]), _pct(row["increase_in_confidence"])]
                for label, row in per.items()))]
            if has_masks:
                lines += ["", "Pointing game: the map's maximum falls inside the lesion mask. "
                          "Random baseline (a uniformly random point): "
                          f"{_pct(exm['metrics']['random_baseline_pointing'])} (mean mask area "
                          "fraction). Energy pointing game: share of the map's mass inside "
                          "the mask (the same baseline applies)."]
            lines += ["", "Average drop (lower is better): mean relative drop of the explained "
                      "class's probability when the image is multiplied by the map; increase in "
                      "confidence: share of images where it rises (Chattopadhyay et al. 2018)."]
        agr = exm["metrics"]["agreement"]
        if agr.get("pairs"):
            lines += ["", "### Method agreement", "", *report.table(
                ["pair", "Spearman", "top-20% IoU"],
                ([pair, f"{v['spearman']:.3f}", f"{v['top20_iou']:.3f}"]
                 for pair, v in agr["pairs"].items()))]
            if "agree_count" in agr:
                lines += ["", f"Images where all methods agree ({agr['rule']}): "
                          f"{agr['agree_count']}, accuracy {_pct(agr['accuracy_agree'])}; "
                          f"where they disagree: {agr['disagree_count']}, accuracy "
                          f"{_pct(agr['accuracy_disagree'])}."]
        lines.append("")
    trained = results.get("model")
    if trained:
        lines += ["## The trained model", "",
                  f"The best model (epoch {trained['epoch']}) is the jaxcam checkpoint "
                  f"`{trained['checkpoint']}` (architecture, class names, preprocessing). "
                  "Explain a new image with it:", "", "```bash",
                  trained["explain_command"], "```", "",
                  "`--weights` also takes the run folder, its `checkpoints/` folder or a "
                  "step folder in it; all mean this best model. From Python: "
                  f"`jaxcam.load({str(out)!r})`.", ""]
    t = results["timing"]
    lines += ["## Timing", "", " | ".join(f"{k}: {v:.0f} s" for k, v in t.items()), "",
              "Wall-clock seconds per phase; `cpu_s` is the process CPU time over all "
              "threads (on an otherwise idle machine, wall time is about cpu_s / cores).", ""]
    (out / "report.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------


def trained_model_entry(out: Path, result) -> dict[str, Any]:
    """Where :func:`jaxcam.train.fit` wrote the best model, and the command to explain with it."""
    from jaxcam import checkpoint

    model_dir = out / "checkpoints" / checkpoint.TRAINING_MODEL_DIR
    return {"checkpoint": str(model_dir), "epoch": result.best_epoch,
            "explain_command": f"jaxcam explain IMAGE.jpg --weights {out} "
                               f"--method gradcam++ --out {out / 'explain'}"}


def run(config: ExperimentConfig, spec: ExperimentSpec) -> dict[str, Any]:
    """Validate, build data, train (resumable), evaluate, explain, write the report."""
    from jaxcam import train, viz

    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    out = validate(config)
    data = load_data(config, spec, out)
    timing["data_s"] = time.perf_counter() - t0
    num_classes = len(data.class_names)
    model, variables, replaced = train.init_model(config.arch, num_classes,
                                                  image_size=config.image_size,
                                                  seed=config.seed, pretrained=config.pretrained)
    layer = explained_layer(model, variables, config.image_size, config.layer)

    t = time.perf_counter()
    predict_fn = train.make_predict_fn(model)  # one compiled forward pass for every split
    result, counts = train.fit_sources(
        model, variables, data.splits["train"], data.splits["validation"],
        train_config(config, spec), out / "checkpoints", image_size=config.image_size,
        class_names=data.class_names, balanced=config.balanced, progress=config.progress,
        predict_fn=predict_fn)
    timing["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    reports = {s: train.evaluate_source(model, result.variables, data.splits[s], num_classes,
                                        image_size=config.image_size,
                                        batch_size=config.batch_size, seed=config.seed,
                                        predict_fn=predict_fn) for s in ("train", "test")}
    timing["evaluate_s"] = time.perf_counter() - t
    test_r = reports["test"]
    viz.save_figure(viz.confusion_figure(test_r["confusion_matrix"], data.class_names,
                                         f"test, accuracy {_pct(test_r['accuracy'])}"),
                    out / "confusion_matrix.png")
    viz.save_figure(viz.training_curves_figure(result.history), out / "training_curves.png")
    print(f"train accuracy {_pct(reports['train']['accuracy'])} | test accuracy "
          f"{_pct(test_r['accuracy'])} | balanced {_pct(test_r['balanced_accuracy'])} | "
          f"macro F1 {test_r['macro']['f1']:.3f} | kappa {test_r['kappa']:.3f}", flush=True)
    if not config.synthetic and spec.reference:
        print("reference (" + spec.reference_source + "): " + ", ".join(
            f"{k} {v:.4g}" for k, v in spec.reference.items()), flush=True)

    t = time.perf_counter()
    ex = explain_test_set(config, spec, model, result.variables, data.splits["test"],
                          predict_fn, layer)
    exm = explanation_metrics(config, model, result.variables, ex)
    figures = []
    for i in range(min(config.num_figures, len(ex.labels))):
        fig = explanation_figure(ex, i, data.class_names, data.malignant, spec.signed)
        figures.append(f"explanations/test_{i:03d}.png")
        viz.save_figure(fig, out / figures[-1])
    gif_label = "Grad-CAM++ (exact)" if "Grad-CAM++ (exact)" in ex.maps else next(iter(ex.maps))
    write_gif(out / "explanations.gif", ex, gif_label, data.class_names,
              data.malignant if spec.signed else None, config.num_gif)
    timing["explain_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t0
    timing["cpu_s"] = time.process_time()  # all threads; / cores = wall time on an idle machine

    results = {
        "experiment": spec.name,
        "dataset": data.name,
        "synthetic": config.synthetic,
        "config": dataclasses.asdict(config),
        "data": {
            "class_names": list(data.class_names),
            "malignant": None if data.malignant is None else list(data.malignant),
            "split_sizes": {s: len(src) for s, src in data.splits.items()},
            "train_class_counts": counts.tolist(),
        },
        "training": {
            "history": result.history,
            "best_epoch": result.best_epoch,
            "best_value": result.best_value,
            "stopped_early": result.stopped_early,
            "steps": result.steps,
            "resumed_at_step": result.resumed_at_step,
            "reinitialised_from_pretrained": replaced,
        },
        "train": reports["train"],
        "test": reports["test"],
        "headline": {spec.headline: reports["test"][spec.headline]},
        "reference": None if config.synthetic else spec.reference,
        "explanations": {
            "count": int(len(ex.labels)),
            "layer": layer,
            "default_layer": model.default_layer,
            "methods": list(ex.maps),
            "skipped": ex.skipped,
            "method_layers": ex.layers,
            "figures": figures,
            "gif": "explanations.gif",
            "metrics": exm,
        },
        "timing": timing,
        "model": trained_model_entry(out, result),
    }
    write_report(out, spec, config, data, results)
    print(f"Report: {out / 'report.md'} ({timing['total_s']:.0f} s in all)", flush=True)
    print(f"Model: {results['model']['checkpoint']}; explain a new image with: "
          f"{results['model']['explain_command']}", flush=True)
    return results


def main(cls: type[ExperimentConfig], spec: ExperimentSpec, real_defaults: dict[str, Any],
         argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn bad input into a one-line error with exit status 2."""
    config = parse_config(cls, argv, real_defaults, f"{spec.title}: fine-tune and explain.")
    compilation.enable_from_argv(argv)
    try:
        run(config, spec)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

