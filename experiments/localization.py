"""Multi-instance localization study: which CAM method finds *every* lesion?

``python -m experiments.localization [--checkpoint DIR] [--num-images N] [--out DIR] [--tiny]``

On the synthetic multi-lesion set (2-4 lesions of one class per image, exact
per-lesion masks, :mod:`jaxcam.data.synthetic`), compares Grad-CAM, Grad-CAM++
(exact and closed-form derivatives), XGrad-CAM, CAM, HiResCAM and LayerCAM
(and a smooth random map as the chance level) on

- pointing game and energy pointing game against the union of the lesions,
- the fraction of lesions that receive a local maximum of the map, and the
  fraction that receive at least ``--energy-share`` of its mass,
- Average Drop %, % Increase in Confidence and Win % (Chattopadhyay et al. 2018),

with the metrics of :mod:`jaxcam.metrics`. The model comes from ``--checkpoint``
(a jaxcam checkpoint directory, e.g. written by ``jaxcam.checkpoint.save``) or
is trained here on the ``multi`` configuration of the synthetic TFDS set
(resumable: rerunning picks up ``OUT/checkpoints``); ``--epochs 0`` keeps the
random initialisation (a control). Evaluation images are drawn fresh from the
same generator with their own seeds, so each lesion's mask is exact. Writes
``OUT/localization.md`` (table), ``OUT/localization.json`` and
``OUT/localization_examples.png`` / ``OUT/localization_metrics.png``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import common
from jaxcam import compilation

# label -> (jaxcam method, derivatives): the experiments' methods plus HiResCAM, LayerCAM
METHOD_LABELS: dict[str, tuple[str, str]] = {
    **common.METHOD_LABELS,
    "HiResCAM": ("hirescam", "exact"),
    "LayerCAM": ("layercam", "exact"),
}
RANDOM_LABEL = "Random (smooth)"
WIN_TIE_TOLERANCE = 1e-4  # drops this close tie (equal maps differ by float noise)
EVAL_SEED_TAG = 7  # eval image i uses default_rng([seed, 7, i]); the builder's splits never do


@dataclasses.dataclass(frozen=True)
class LocalizationConfig:
    """Options of the study (``--tiny`` replaces the sizes by :data:`TINY`)."""

    checkpoint: str | None = None
    arch: str = "resnet50"
    layer: str | None = None
    image_size: int = 96
    num_train: int = 600
    epochs: int = 2
    batch_size: int = 16
    learning_rate: float = 2e-3
    num_images: int = 200
    explain_class: str = "label"
    tolerance: float = 0.0
    peak_threshold: float = 0.5
    peak_window: int = 3
    energy_share: float = 0.1
    num_figures: int = 4
    out: str = "runs/localization"
    cache_dir: str | None = None
    seed: int = 0
    tiny: bool = False
    progress: bool = True


# layer4 explicitly: the identity tests (Grad-CAM == CAM) need both at the GAP layer
TINY: dict[str, Any] = dict(image_size=64, layer="layer4", num_train=16, epochs=0, batch_size=4,
                            num_images=4, num_figures=2)

_HELP = {
    "checkpoint": "jaxcam checkpoint directory of a 4-class synthetic-lesion model, or a "
                  "training run's folder (e.g. runs/ham10000: its best model); default: "
                  "train one here",
    "arch": f"architecture when training here, one of {', '.join(common.ARCHS)}",
    "layer": "target layer (default: the model's default layer)",
    "num_train": "synthetic training images when training here",
    "epochs": "training epochs (0 keeps the random initialisation, a control)",
    "num_images": "evaluation images",
    "explain_class": "'label' (the lesions' class) or 'predicted'",
    "tolerance": "pointing-game tolerance in pixels",
    "peak_threshold": "a lesion's local maximum counts if >= this fraction of the map's max",
    "peak_window": "local maxima are maxima of their window x window neighbourhood (odd)",
    "energy_share": "a lesion is covered if it holds at least this share of the map's mass",
    "tiny": f"tiny smoke-test sizes {TINY}",
}


def parse_config(argv: Sequence[str] | None) -> LocalizationConfig:
    args = common.explicit_options(
        LocalizationConfig, argv, _HELP, prog="python -m experiments.localization",
        description="Multi-lesion localization of CAM methods on the synthetic set.")
    base = LocalizationConfig()
    if args.get("tiny"):
        base = dataclasses.replace(base, **TINY)
    return dataclasses.replace(base, **args)


def validate(config: LocalizationConfig) -> None:
    """Fail fast, before any model is built or trained."""
    if config.checkpoint is not None and not Path(config.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {config.checkpoint} does not exist; give a jaxcam "
                                "checkpoint directory, or omit it to train a model here.")
    if config.explain_class not in ("label", "predicted"):
        raise ValueError(f"--explain-class must be 'label' or 'predicted', "
                         f"got {config.explain_class!r}.")
    for name in ("num_images", "batch_size", "num_train"):
        if getattr(config, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= 1, got {getattr(config, name)}.")
    if config.epochs < 0:
        raise ValueError(f"--epochs must be >= 0, got {config.epochs}.")
    if not 0 <= config.energy_share <= 1 or not 0 <= config.peak_threshold <= 1:
        raise ValueError("--energy-share and --peak-threshold are fractions in [0, 1].")
    if config.peak_window < 1 or config.peak_window % 2 == 0:
        raise ValueError(f"--peak-window must be a positive odd number, got {config.peak_window}.")
    from jaxcam.data import synthetic

    synthetic.SyntheticConfig(**_image_fields(config.image_size))  # validates the size


def _image_fields(image_size: int) -> dict[str, Any]:
    """The ``multi`` synthetic configuration at ``image_size``."""
    from jaxcam.data import synthetic

    return {**dataclasses.asdict(synthetic.MULTI), "image_size": image_size}


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def get_model(config: LocalizationConfig, out: Path):
    """(model, variables, preprocessing, how it was obtained)."""
    import jax

    import jaxcam
    from jaxcam.data import synthetic
    from jaxcam.preprocessing import Preprocessing

    if config.checkpoint is not None:
        bundle = jaxcam.load(config.checkpoint)
        if bundle.model.num_classes != synthetic.NUM_CLASSES:
            raise ValueError(
                f"the checkpoint's model has {bundle.model.num_classes} classes; the synthetic "
                f"lesion set has {synthetic.NUM_CLASSES} ({', '.join(synthetic.CLASS_NAMES)}).")
        source = f"checkpoint {config.checkpoint}"
        return bundle.model, bundle.variables, bundle.preprocessing, source
    model = jaxcam.models.get(config.arch, synthetic.NUM_CLASSES)
    init = jax.jit(lambda key: model.init(key, image_size=config.image_size))
    variables = init(jax.random.PRNGKey(config.seed))
    prep = Preprocessing(image_size=config.image_size, resize_size=None)
    if config.epochs == 0:
        return model, variables, prep, "random initialisation (--epochs 0, a control)"
    variables = train_on_multi(config, model, variables, out)
    return model, variables, prep, (f"trained here: {config.epochs} epochs on "
                                    f"{config.num_train} multi-lesion images")


def train_on_multi(config: LocalizationConfig, model, variables, out: Path):
    """Train on the ``multi`` synthetic configuration (:func:`jaxcam.train.train_on_synthetic`)."""
    from jaxcam import train

    return train.train_on_synthetic(
        model, variables, out, synthetic_config="multi",
        num_train=config.num_train, image_size=config.image_size, epochs=config.epochs,
        batch_size=config.batch_size, learning_rate=config.learning_rate, seed=config.seed,
        cache_dir=config.cache_dir, progress=config.progress).variables


# --------------------------------------------------------------------------------------
# Evaluation data
# --------------------------------------------------------------------------------------


def eval_images(config: LocalizationConfig, image_size: int):
    """Fresh multi-lesion images (:func:`jaxcam.data.synthetic.held_out_images`): uint8
    images (N,S,S,3), labels (N,), instance ids (N,S,S)."""
    from jaxcam.data import synthetic

    cfg = synthetic.SyntheticConfig(**_image_fields(image_size))
    return synthetic.held_out_images(cfg, config.num_images, config.seed, EVAL_SEED_TAG)


# --------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------


def smooth_random_maps(rng: np.random.Generator, n: int, raw_shape, size: int) -> np.ndarray:
    """Uniform noise at the CAM layer's resolution, bilinearly upsampled, in [0, 1]."""
    import jax
    import jax.numpy as jnp

    low = rng.uniform(size=(n, *raw_shape)).astype(np.float32)
    up = jax.image.resize(jnp.asarray(low), (n, size, size), "bilinear")
    lo = up.min(axis=(1, 2), keepdims=True)
    return np.asarray((up - lo) / (up.max(axis=(1, 2), keepdims=True) - lo))


def run_study(config: LocalizationConfig, model, variables, prep, images_u8, labels, ids):
    """Explain and score every method; returns (per-method summary, per-image arrays, extras)."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from jaxcam import distributed, metrics
    from jaxcam.dataset_explain import explain_groups
    from jaxcam.preprocessing import normalize

    layer = common.explained_layer(model, variables, prep.image_size, config.layer)
    method_layers, skipped = common.available_methods(METHOD_LABELS, model, variables, layer,
                                                      METHOD_LABELS)
    triples = {lab: (*METHOD_LABELS[lab], at) for lab, at in method_layers.items()}

    n, s = len(labels), images_u8.shape[1]
    max_inst = int(ids.max()) if ids.size else 1
    inst = ids[:, None] == np.arange(1, max_inst + 1)[None, :, None, None]  # (N, K, S, S)
    union = ids > 0
    x_all = normalize(images_u8.astype(np.float32) / 255.0, prep.mean, prep.std)

    tol, thr, win, share = (config.tolerance, config.peak_threshold, config.peak_window,
                            config.energy_share)

    @jax.jit
    def score_batch(variables, x, maps, cls, masks, inst_masks):
        score_fn = lambda z: jax.nn.softmax(model.apply(variables, z), axis=-1)
        y, o = metrics.confidence_scores(score_fn, x, maps, cls)
        cov = metrics.instance_coverage(maps, inst_masks, peak_threshold=thr, window=win,
                                        energy_share=share)
        return dict(
            pointing=metrics.pointing_game(maps, masks, tolerance=tol),
            energy=metrics.energy_pointing_game(maps, masks),
            peaks=cov.peaks, shares=cov.shares, valid=cov.valid, y=y, o=o)

    bs = config.batch_size
    per: dict[str, dict[str, list]] = {}
    maps_keep: dict[str, list] = {}
    preds, raw_shape = [], None
    rng = np.random.default_rng([config.seed, 11])
    t_explain = t_metrics = 0.0
    bar = tqdm(total=n, desc="localization", disable=not config.progress, leave=False)
    for start in range(0, n, bs):
        sl = slice(start, start + bs)
        # one compiled batch shape: the last batch repeats its last image
        (x, cls, masks, inst_masks), k = distributed.pad_batch(
            (x_all[sl], labels[sl], union[sl], inst[sl]), bs)
        t0 = time.perf_counter()
        # class_idx=None explains each image's prediction (explain takes the argmax)
        exs = explain_groups(model, variables, x, triples,
                             class_idx=cls if config.explain_class == "label" else None)
        first = next(iter(exs.values()))
        cls = np.asarray(first.class_idx)
        preds.append(np.asarray(jnp.argmax(first.logits, -1))[:k])  # logits: any method's
        batch_maps = {lab: np.asarray(e.maps) for lab, e in exs.items()}
        raw_shape = next(e.raw.shape[1:] for lab, e in exs.items() if triples[lab][2] == layer)
        batch_maps[RANDOM_LABEL] = smooth_random_maps(rng, bs, raw_shape, s)
        t_explain += time.perf_counter() - t0
        t0 = time.perf_counter()
        for lab, m in batch_maps.items():
            out = score_batch(variables, x, m, cls, masks, inst_masks)
            row = per.setdefault(lab, {})
            for key, v in out.items():
                row.setdefault(key, []).append(np.asarray(v)[:k])
            if start == 0:
                maps_keep[lab] = m[:k]
        t_metrics += time.perf_counter() - t0
        bar.update(k)
    bar.close()
    order = [lab for lab in METHOD_LABELS if lab in per] + [RANDOM_LABEL]
    arrays = {lab: {key: np.concatenate(v) for key, v in per[lab].items()} for lab in order}
    summary = summarize(arrays, config.energy_share)
    extras = dict(pred=np.concatenate(preds), maps=maps_keep, skipped=skipped, layer=layer,
                  method_layers=method_layers,
                  raw_shape=tuple(int(v) for v in raw_shape),
                  seconds_explain=t_explain, seconds_metrics=t_metrics)
    return summary, arrays, extras


def summarize(arrays: dict[str, dict[str, np.ndarray]], energy_share: float) -> dict[str, dict]:
    """Per-method numbers (percentages) from the per-image arrays."""
    from jaxcam import metrics

    drops = {lab: metrics.drop(metrics.ConfidenceScores(a["y"], a["o"]))
             for lab, a in arrays.items() if lab != RANDOM_LABEL}
    wins = ({lab: float(v) for lab, v in
             metrics.win_percentage(drops, tie_tolerance=WIN_TIE_TOLERANCE).items()}
            if len(drops) >= 2 else {})
    out = {}
    for lab, a in arrays.items():
        valid = a["valid"]
        n_inst = int(valid.sum())
        all_found = np.all(a["peaks"] | ~valid, axis=1)
        out[lab] = {
            "pointing_game": 100 * float(np.mean(a["pointing"])),
            "energy_pointing_game": 100 * float(np.mean(a["energy"])),
            "lesions_with_peak": 100 * float((a["peaks"] & valid).sum() / max(n_inst, 1)),
            "lesions_with_energy": 100 * float(((a["shares"] >= energy_share) & valid).sum()
                                               / max(n_inst, 1)),
            "images_all_lesions_peaked": 100 * float(np.mean(all_found)),
            "average_drop": 100 * float(np.mean(metrics.drop(metrics.ConfidenceScores(
                a["y"], a["o"])))),
            "increase_in_confidence": 100 * float(np.mean(a["y"] < a["o"])),
            "win": wins.get(lab),
            "num_lesions": n_inst,
        }
    return out


COLUMNS = (
    ("pointing_game", "Pointing game"),
    ("energy_pointing_game", "Energy PG"),
    ("lesions_with_peak", "Lesions with a peak"),
    ("lesions_with_energy", "Lesions with >= {share:.0%} energy"),
    ("images_all_lesions_peaked", "Images: every lesion peaked"),
    ("average_drop", "Avg Drop (lower better)"),
    ("increase_in_confidence", "Incr. in Conf."),
    ("win", "Win"),
)


def markdown_table(summary: dict[str, dict], energy_share: float) -> str:
    heads = [h.format(share=energy_share) for _, h in COLUMNS]
    lines = ["| Method | " + " | ".join(f"{h} (%)" for h in heads) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for lab, row in summary.items():
        cells = ["-" if row[k] is None else f"{row[k]:.1f}" for k, _ in COLUMNS]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def examples_figure(images_u8, ids, maps: dict[str, np.ndarray], labels, class_names,
                    threshold: float, window: int):
    from jaxcam import metrics, viz

    k = next(iter(maps.values())).shape[0]
    fig = viz.method_grid(images_u8[:k], maps,
                          row_titles=[class_names[int(c)] for c in labels[:k]],
                          title="multi-lesion localization (green: lesions, white: local maxima)")
    axes = np.asarray(fig.axes).reshape(k, len(maps) + 1)
    for i in range(k):
        for j, m in enumerate([None, *maps.values()]):
            axes[i, j].contour(ids[i] > 0, levels=[0.5], colors="lime", linewidths=0.8)
            if m is not None:
                peaks = np.asarray(metrics.local_maxima(m[i:i + 1], threshold=threshold,
                                                        window=window))[0]
                if peaks.any():  # outline the local-maximum pixels (plateaus are regions)
                    axes[i, j].contour(peaks, levels=[0.5], colors="white", linewidths=0.8)
    return fig


def metrics_figure(summary: dict[str, dict], energy_share: float):
    from jaxcam import viz

    series = {"pointing_game": "pointing game", "energy_pointing_game": "energy PG",
              "lesions_with_peak": "lesions with a peak",
              "lesions_with_energy": f"lesions with >= {energy_share:.0%} energy"}
    return viz.grouped_bar_figure(summary, series, ylabel="%", ylim=(0, 100))


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = parse_config(argv)
    compilation.enable_from_argv(argv)
    try:
        validate(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from jaxcam import viz
    from jaxcam.data import synthetic

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, variables, prep, source = get_model(config, out)
    print(f"model: {model.arch} ({source})", flush=True)
    images_u8, labels, ids = eval_images(config, prep.image_size)
    summary, arrays, extras = run_study(config, model, variables, prep, images_u8, labels, ids)
    accuracy = float(np.mean(extras["pred"] == labels))

    table = markdown_table(summary, config.energy_share)
    header = (
        f"# Multi-lesion localization\n\n"
        f"{config.num_images} synthetic images with 2-4 lesions of one class "
        f"({next(iter(summary.values()))['num_lesions']} lesions), "
        f"{prep.image_size} px; model {model.arch} at `{extras['layer']}` "
        f"(maps {extras['raw_shape'][0]}x{extras['raw_shape'][1]}), {source}; accuracy on "
        f"these images {100 * accuracy:.1f}%. Explained class: {config.explain_class}. "
        f"Pointing-game tolerance {config.tolerance:g} px; a lesion 'has a peak' when a "
        f"{config.peak_window}x{config.peak_window} local maximum >= "
        f"{config.peak_threshold:g} x the map's maximum lies on it. Win % compares the CAM "
        f"methods (not the random map); drops within {WIN_TIE_TOLERANCE:g} tie and share the "
        f"image. All numbers in %.\n\n"
    )
    skipped = "".join(f"\n- {k} skipped: {v}." for k, v in extras["skipped"].items())
    skipped += "".join(f"\n- {k} is computed at `{at}`, the global-average-pool + dense layer "
                       "(CAM exists only there)." for k, at in extras["method_layers"].items()
                       if at != extras["layer"])
    if config.layer is None and extras["layer"] != model.default_layer:
        skipped += (f"\n- Layer `{extras['layer']}`, not the default `{model.default_layer}`: "
                    f"at {prep.image_size} px the default's map is coarser than 4x4 "
                    "(`--layer` chooses).")
    command = "python -m experiments.localization " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])
    (out / "localization.md").write_text(
        header + table + "\n" + skipped + f"\n\nRegenerate: `{command.strip()}`\n")
    result = {
        "config": dataclasses.asdict(config),
        "model": {"arch": model.arch, "layer": extras["layer"], "source": source,
                  "method_layers": extras["method_layers"],
                  "map_shape": list(extras["raw_shape"]), "image_size": prep.image_size},
        "accuracy": accuracy,
        "methods": summary,
        "skipped": extras["skipped"],
        "seconds": {"explain": extras["seconds_explain"], "metrics": extras["seconds_metrics"],
                    "total": time.perf_counter() - t_start},
    }
    (out / "localization.json").write_text(json.dumps(result, indent=2))
    k = min(config.num_figures, config.num_images, config.batch_size)
    if k > 0:
        shown = {lab: m[:k] for lab, m in extras["maps"].items()}
        viz.save_figure(examples_figure(images_u8, ids, shown, labels,
                                        synthetic.DISPLAY_NAMES, config.peak_threshold,
                                        config.peak_window),
                        out / "localization_examples.png")
    viz.save_figure(metrics_figure(summary, config.energy_share), out / "localization_metrics.png")
    print(table, flush=True)
    print(f"wrote {out / 'localization.md'}, localization.json and figures", flush=True)
    return result


if __name__ == "__main__":
    main()
