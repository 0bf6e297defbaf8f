"""The derivative-correctness study: ``python -m experiments.derivatives``.

For each model / layer / target it measures how far the Grad-CAM++ inputs
``D2, D3, alpha`` of the ``factored``, ``closed_form`` and ``nested_sum``
engines are from the ``taylor`` engine (ground truth, on sampled
coordinates), checks ``taylor`` against float64 finite differences (``jaxcam.testing``),
compares the resulting maps (exact vs closed form vs nested sum, and
Grad-CAM++ vs Grad-CAM) and times each engine. Writes ``results.json``,
``report.md`` and plots into ``--out``.

Without ``--checkpoint`` each architecture is studied twice: trained briefly here
on the synthetic lesion set (``--train-images``, ``--train-epochs``; cached in
``OUT/train``, a rerun resumes) and randomly initialised (a control: the numbers
then describe the heads' algebra, not what a trained model attends to).
``--inits`` picks either. The images studied are held-out synthetic lesions.

    python -m experiments.derivatives --out results/derivatives
    python -m experiments.derivatives --tiny --out /tmp/deriv   # seconds, for CI
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from jaxcam import compilation

DEFAULT_MODELS: tuple[str, ...] = (
    "resnet50:layer4,layer3",
    "vgg19:default,pool5",
    "efficientnet_b0:features.8,features.7",
    "vit_b_16:default",
)
TARGETS: tuple[str, ...] = ("exp", "softmax", "log_softmax", "logit", "rest")
ENGINES: tuple[str, ...] = ("factored", "closed_form", "nested_sum")
INITS: tuple[str, ...] = ("trained", "random")
# seeds of the studied images, disjoint from the synthetic TFDS splits' (which derive
# their own streams from the builder seed)
EVAL_SEED_TAG = 0x5EED_D0
# a resumed run keeps rows of the same version only: bump it when a change alters the
# numbers of a row (2: jaxcam.testing's FD oracle, the model protocol's grid and head(x=))
STUDY_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Config:
    """Options. ``models``: ``arch:layer,layer`` strings (``default`` = the model's
    default layer). ``coords``: coordinates per image sampled for the ``taylor``
    ground truth; ``fd_coords``: of those, how many (non-zero activations only) are
    checked against float64 finite differences (image 0; coordinates the oracle refuses
    are replaced by other sampled ones and counted). ``inits``: ``trained`` (briefly, here, on
    ``train_images`` synthetic lesions for ``train_epochs`` at ``train_image_size``; the
    convolutional models then run at ``image_size``) and/or ``random`` (the control);
    ignored with ``checkpoint``."""

    models: tuple[str, ...] = DEFAULT_MODELS
    targets: tuple[str, ...] = TARGETS
    num_images: int = 2
    image_size: int = 96
    num_classes: int = 4  # the synthetic lesion classes (the trained models learn them)
    coords: int = 64
    fd_coords: int = 4
    inits: tuple[str, ...] = INITS
    train_images: int = 400
    train_epochs: int = 1
    train_image_size: int = 64  # training cost is the budget: a step at 96 px costs ~2.3x
    train_batch_size: int = 16
    learning_rate: float = 2e-3
    checkpoint: str | None = None
    out: str = "results/derivatives"
    seed: int = 0
    plots: bool = True
    progress: bool = True


TINY = Config(models=("resnet50:layer4",), targets=("exp", "softmax"), num_images=1,
              image_size=64, coords=8, fd_coords=2, plots=False, train_images=8,
              train_epochs=1, train_batch_size=4, train_image_size=64, progress=False)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m experiments.derivatives",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None,
                   help=f"arch:layer,layer ... (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--targets", nargs="+", default=None, choices=TARGETS)
    for flag in ("num-images", "image-size", "num-classes", "coords", "fd-coords",
                 "train-images", "train-epochs", "train-image-size", "seed"):
        p.add_argument(f"--{flag}", type=int, default=None)
    p.add_argument("--inits", nargs="+", default=None, choices=INITS,
                   help="trained (briefly, on the synthetic lesion set) and/or random "
                        "(default: both)")
    p.add_argument("--checkpoint", default=None,
                   help="a jaxcam checkpoint directory or a training run's folder (e.g. "
                        "runs/ham10000: its best model); its arch replaces --models' archs")
    p.add_argument("--out", default=None)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a seconds-long configuration for CI")
    compilation.add_compilation_cache_option(p)  # read by main (enable_from_argv)
    a = p.parse_args(argv)
    base = TINY if a.tiny else Config()
    updates = {k: v for k, v in dict(
        models=tuple(a.models) if a.models else None,
        targets=tuple(a.targets) if a.targets else None, num_images=a.num_images,
        image_size=a.image_size, num_classes=a.num_classes, coords=a.coords,
        fd_coords=a.fd_coords, checkpoint=a.checkpoint, out=a.out, seed=a.seed,
        inits=tuple(dict.fromkeys(a.inits)) if a.inits else None,
        train_images=a.train_images, train_epochs=a.train_epochs,
        train_image_size=a.train_image_size,
    ).items() if v is not None}
    updates.update({k: False for k in ("plots", "progress") if getattr(a, f"no_{k}")})
    config = dataclasses.replace(base, **updates)
    for name in ("num_images", "image_size", "num_classes", "coords", "train_images",
                 "train_epochs", "train_image_size"):
        if getattr(config, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if config.checkpoint is not None and not Path(config.checkpoint).exists():
        raise SystemExit(f"--checkpoint {config.checkpoint}: no such file or directory")
    from jaxcam.data import synthetic

    if "trained" in config.inits and config.checkpoint is None and (
            config.num_classes != synthetic.NUM_CLASSES):
        raise SystemExit(
            f"--num-classes {config.num_classes}: the models trained here learn the "
            f"synthetic lesion set's {synthetic.NUM_CLASSES} classes; use --inits random "
            "for another class count.")
    for flag, size in (("--image-size", config.image_size),
                       ("--train-image-size", config.train_image_size)):
        try:
            synthetic.SyntheticConfig(image_size=size)
        except ValueError as err:
            raise SystemExit(f"{flag} {size}: {err}") from None
    import jaxcam

    trained = "trained" in config.inits and config.checkpoint is None
    for arch, _ in _parse_models(config.models):
        if arch not in jaxcam.models.ARCHS:
            raise SystemExit(f"--models: unknown architecture {arch!r}; use one of "
                             f"{', '.join(jaxcam.models.ARCHS)}.")
        patch = getattr(getattr(jaxcam.models.get(arch, 4), "config", None), "patch_size", 0)
        for flag, size in [("--image-size", config.image_size)] + trained * [
                ("--train-image-size", config.train_image_size)]:
            if patch and size % patch:
                raise SystemExit(
                    f"{flag} {size}: {arch} cuts images into {patch} px patches, so the side "
                    f"must be a multiple of {patch} (e.g. {max(size // patch, 2) * patch} or "
                    f"{(size // patch + 1) * patch})")
    return config


def _parse_models(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    out = []
    for spec in specs:
        arch, _, layers = spec.partition(":")
        out.append((arch, [s for s in layers.split(",") if s] or ["default"]))
    return out


# --------------------------------------------------------------------------- statistics


def error_stats(got: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """|got - truth| / max|truth| per image (absolute where truth is all 0): median,
    99th percentile, max over images and coordinates."""
    got, truth = np.asarray(got, np.float64), np.asarray(truth, np.float64)
    scale = np.abs(truth).max(axis=1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    err = (np.abs(got - truth) / scale).ravel()
    return {"median": float(np.median(err)), "p99": float(np.percentile(err, 99)),
            "max": float(err.max())}


def map_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean over images of Pearson, Spearman (:func:`jaxcam.metrics.agreement.spearman`,
    ties at their average rank), top-20% IoU and max |a - b| of (B, H, W) maps; an image
    whose map is constant (no correlation) is left out of the correlations' means."""
    from jaxcam.metrics import agreement

    spearman = np.asarray(agreement.spearman(np.asarray(a, np.float32), np.asarray(b, np.float32)))
    rows = []
    for x, y, rho in zip(np.asarray(a, np.float64), np.asarray(b, np.float64), spearman,
                         strict=True):
        x, y = x.ravel(), y.ravel()
        ok = x.std() > 0 and y.std() > 0
        pear = float(np.corrcoef(x, y)[0, 1]) if ok else float("nan")
        spear = float(rho) if ok else float("nan")
        k = max(1, int(round(0.2 * x.size)))
        tx, ty = set(np.argsort(-x)[:k]), set(np.argsort(-y)[:k])
        rows.append((pear, spear, len(tx & ty) / len(tx | ty), float(np.abs(x - y).max())))
    with warnings.catch_warnings():  # an all-zero (degenerate) map has no correlation
        warnings.simplefilter("ignore", RuntimeWarning)
        m = np.nanmean(np.array(rows), axis=0)
    return {"pearson": float(m[0]), "spearman": float(m[1]), "iou_top20": float(m[2]),
            "max_abs_diff": float(m[3])}


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` held-out synthetic lesion images (one per class in turn), normalised with
    the ImageNet statistics as the training pipeline does: float32 ``(n, S, S, 3)``."""
    from jaxcam.data import synthetic
    from jaxcam.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    cfg = synthetic.SyntheticConfig(image_size=size)
    out = [synthetic.make_image(np.random.default_rng([seed, EVAL_SEED_TAG, i]), cfg,
                                label=i % synthetic.NUM_CLASSES)[0] for i in range(n)]
    x = (np.stack(out) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return x.astype(np.float32)


def _trained_variables(model, variables, config: Config, out_dir: Path):
    """Train ``model`` briefly on the synthetic lesion set; returns (variables, note)."""
    from experiments import common

    result = common.train_on_synthetic(
        model, variables, out_dir / "train" / model.arch, arch=model.arch,
        synthetic_config="default", num_train=config.train_images,
        image_size=config.train_image_size, epochs=config.train_epochs,
        batch_size=config.train_batch_size, learning_rate=config.learning_rate,
        seed=config.seed, cache_dir=str(out_dir / "train" / "tfds"), progress=config.progress)
    acc = result.history[-1].get("val_accuracy") if result.history else None
    acc_txt = "n/a" if acc is None else f"{acc:.1%}"
    note = (f"trained here {config.train_epochs} epoch(s) on {config.train_images} synthetic "
            f"lesion images at {config.train_image_size} px; validation accuracy {acc_txt} "
            f"(chance 25%); studied at {config.image_size} px")
    return result.variables, note, acc


# --------------------------------------------------------------------------- study


def _timed(fn, *args):
    """(fn(*args), seconds of that one call without compilation): compiled ahead of
    time, then run once (several engines take seconds per call on a CPU)."""
    import jax

    compiled = fn.lower(*args).compile()
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, time.perf_counter() - t0


FD_RTOL = 1e-6  # an FD estimate is trusted when its error bound is below this times the scale


def _finite_differences(model, variables, A, x, layer, targets, cls, candidates, count, seed):
    """taylor (float64) vs float64 finite differences (:mod:`jaxcam.testing`) on image 0.

    ``A`` as the model gives it (grid or tokens), ``candidates`` flat indices into
    ``A[0]``, ``x`` the images (a ViT head recomputes the residual stream from them).
    The oracle estimates every target's ``D1, D2, D3`` (one head call per step level)
    with an error bound and refuses coordinates where no step is trustworthy (a kink of
    a ReLU / max-pool head within reach of every resolvable step, round-off, non-finite
    values). A coordinate is kept when every target and order is trusted at ``FD_RTOL``
    of the scale (:func:`jaxcam.testing.derivative_scale` of ``taylor`` over all
    ``candidates``); refused ones are replaced by the next candidates (fixed random
    order) until ``count`` are kept. Errors are relative to that scale. Returns
    ``{target: {"D1": stats, ..., "checked", "refused", "tried"}}``."""
    import jax
    import jax.numpy as jnp

    from jaxcam import derivatives as deriv
    from jaxcam import targets as targets_lib
    from jaxcam import testing

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
        A64, x64 = jnp.asarray(A[:1], jnp.float64), jnp.asarray(x[:1], jnp.float64)
        c = jnp.asarray(cls[:1])
        phis = [targets_lib.get_target(t) for t in targets]
        candidates = np.random.default_rng([seed, 0xFD]).permutation(np.asarray(candidates))
        truth = []  # (targets, candidates, 3)
        for phi in phis:
            f = partial(jax.jit(lambda v, a, phi=phi: jax.vmap(phi)(
                model.head(v, a, layer, x=x64), c)), v64)
            truth.append(np.stack([np.asarray(d)[0] for d in deriv.taylor_derivatives_at(
                f, A64, jnp.asarray(candidates))], -1))
        truth = np.stack(truth, 1)  # (candidates, targets, 3)
        a0 = np.asarray(A64[0])
        scale = testing.derivative_scale(truth, float(np.sqrt(np.mean(a0**2))) or 1.0)

        def scores(v, pts):  # (P, targets): every target of one head call per point
            # vmapped per point: what depends on x alone (a ViT's residual stream) is
            # computed once, not once per point
            logits = jax.vmap(lambda p: model.head(v, p[None], layer, x=x64)[0])(pts)
            return jnp.stack([jax.vmap(phi, in_axes=(0, None))(logits, c[0]) for phi in phis],
                             -1)

        check = testing.check_coordinates(partial(jax.jit(scores), v64), a0, candidates, count,
                                          rtol=FD_RTOL, scale=scale)
        kept = np.array([np.flatnonzero(candidates == i)[0] for i in check.coords], int)
        out = {}
        for q, name in enumerate(targets):
            row: dict[str, Any] = {"checked": int(check.coords.size), "tried": check.tried,
                                   "refused": dict(check.refused)}
            if check.coords.size:
                err = np.abs(check.fd.value[:, q] - truth[kept, q]) / scale[q]  # (k, 3)
                for n in range(3):
                    e = err[:, n]
                    row[f"D{n + 1}"] = {"median": float(np.median(e)),
                                        "p99": float(np.percentile(e, 99)),
                                        "max": float(e.max())}
                    row[f"D{n + 1}_bound"] = float((check.fd.error[:, q, n] / scale[q, n]).max())
            out[name] = row
        return out
    finally:
        jax.config.update("jax_enable_x64", previous)


def engine_fn(model, layer, x, cls, engine, target, certified, *, row_head=True):
    """``(variables, A) -> (D1, D2, D3)`` of ``engine`` for ``target`` on the model's
    (B, h, w, K) grid (``model.to_grid``) by :func:`jaxcam.derivatives.target_derivatives`;
    ``taylor`` uses the model's ``row_head`` where it has one (a ViT's last ``ln_1``: the
    class token's path only) unless ``row_head=False``."""
    from jaxcam import derivatives as deriv
    from jaxcam import targets as targets_lib

    tgt = targets_lib.as_target(target)
    rows = getattr(model, "row_head", None) if row_head and engine == "taylor" else None

    def fn(v, a):
        D, _ = deriv.target_derivatives(
            lambda a: model.head(v, a, layer, x=x), a, tgt, cls,
            targets_lib.per_image_data(tgt, a.shape[0]), engine=engine, certified=certified,
            to_grid=lambda t: model.to_grid(t, layer),
            linear_head=model.linear_head(v, layer) if a.ndim == 4 else None,
            row_head=None if rows is None else rows(v, a, layer, x=x))
        return D.true()
    return fn


def study_layer(model, variables, x, layer, config: Config, rng) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from jaxcam import derivatives as deriv
    from jaxcam import methods
    from jaxcam import targets as targets_lib

    A = jax.jit(lambda v, x: model.features(v, x, layer))(variables, x)  # grid or tokens
    # jitted functions take the variables as an argument: closing over them would
    # make XLA constant-fold the weights (minutes for VGG19's classifier)
    head_of = lambda v: (lambda a: model.head(v, a, layer, x=x))
    logits = jax.jit(lambda v, a: head_of(v)(a))(variables, A)
    cls = jnp.argmax(logits, -1).astype(jnp.int32)
    certified = deriv.is_piecewise_linear(head_of(variables), A)
    Ag = model.to_grid(A, layer)  # (B, h, w, K): what alphas and maps are computed on
    # each grid cell's flat index into A[0]: the identity for a conv layer, the class
    # token skipped for a ViT
    index = np.asarray(model.to_grid(jnp.arange(A[0].size, dtype=jnp.int32).reshape(
        (1,) + A.shape[1:]), layer)).ravel()
    n_coords = index.size
    coords = np.sort(rng.choice(n_coords, size=min(config.coords, n_coords), replace=False))
    raw = index[coords]  # the sampled grid cells' indices into A[0]
    sum_a = np.asarray(Ag.sum((1, 2)))[:, coords % Ag.shape[-1]][:, None, None, :]
    out: dict[str, Any] = {"layer": layer, "activation_shape": list(Ag.shape[1:]),
                           "coordinates": n_coords, "certified": certified, "targets": {},
                           # softmax probability of the explained class per image: near 1
                           # the softmax-type derivatives vanish to float32 round-off
                           "class_probability": np.asarray(jnp.take_along_axis(
                               jax.nn.softmax(logits, -1), cls[:, None], 1)[:, 0]).tolist()}
    if A.shape != Ag.shape:
        out["token_shape"] = list(A.shape[1:])

    def alpha_at(D2, D3):  # alphas (B, n) from D2, D3 at the sampled coordinates
        return np.asarray(methods.gradcam_pp_alpha(
            jnp.asarray(sum_a), jnp.asarray(D2)[:, None, None, :], jnp.asarray(D3)[:, None, None, :]
        ))[:, 0, 0, :]

    def maps_from(D):
        w = methods.gradcam_pp_weights(Ag, *D)
        raw_map = methods.weighted_map(Ag, w)
        return np.asarray(methods.normalize_maps(methods.upsample(raw_map, x.shape[1:3]))[0])

    g = model.to_grid(jax.jit(jax.grad(lambda a, v: jnp.sum(
        head_of(v)(a)[jnp.arange(A.shape[0]), cls])))(A, variables), layer)
    gradcam = np.asarray(methods.normalize_maps(methods.upsample(
        methods.weighted_map(Ag, methods.gradcam_weights(g)), x.shape[1:3]))[0])

    shared: dict[str, Any] = {}
    fd_all = None  # finite differences of every target, computed once per layer
    for target in config.targets:
        phi = targets_lib.get_target(target)
        f_of = lambda v, phi=phi: (lambda a: jax.vmap(phi)(head_of(v)(a), cls))
        row: dict[str, Any] = {"errors": {}, "seconds": {}, "maps": {}}
        # the ground truth: generic taylor on the whole head at the sampled coordinates
        taylor_at = jax.jit(lambda v, a, f_of=f_of: deriv.taylor_derivatives_at(
            f_of(v), a, jnp.asarray(raw)))
        truth, t_sec = _timed(taylor_at, variables, A)
        row["seconds"]["taylor_sampled"] = t_sec
        row["seconds"]["taylor_full_per_image_est"] = t_sec / len(coords) * n_coords / A.shape[0]
        truth = [np.asarray(t) for t in truth]
        alpha_truth = alpha_at(truth[1], truth[2])
        full = {}
        for engine in ENGINES:
            if engine == "factored" and not certified:
                continue
            if engine == "closed_form" and "closed_form" in shared:
                D, sec = shared["closed_form"]  # eq. 19 does not depend on the target
            else:
                fn = jax.jit(engine_fn(model, layer, x, cls, engine, target, certified))
                D, sec = _timed(fn, variables, A)
            if engine == "closed_form":
                shared["closed_form"] = (D, sec)
            full[engine] = D
            row["seconds"][engine] = sec
            at = [np.asarray(d).reshape(A.shape[0], -1)[:, coords] for d in D]
            row["errors"][engine] = {
                "D2": error_stats(at[1], truth[1]), "D3": error_stats(at[2], truth[2]),
                "alpha": error_stats(alpha_at(at[1], at[2]), alpha_truth),
            }
        if config.fd_coords:
            if fd_all is None:
                try:
                    # exact zeros of a rectified layer sit on kinks of what follows (a
                    # ReLU at 0, a max-pool window of zeros is a tie): not candidates; the
                    # oracle refuses the other kinks it meets
                    nonzero = raw[np.asarray(A[0]).ravel()[raw] != 0]
                    if nonzero.size == 0:
                        raise ValueError("every sampled activation of image 0 is exactly 0 "
                                         "(dead units): no differentiable point to check")
                    fd_all = _finite_differences(model, variables, A, x, layer, config.targets,
                                                 np.asarray(cls), nonzero, config.fd_coords,
                                                 config.seed)
                except Exception as err:  # noqa: BLE001 - reported, not hidden
                    fd_all = {"error": f"{type(err).__name__}: {err}"}
            row["finite_differences"] = dict(fd_all) if "error" in fd_all else fd_all[target]
        exact = full.get("factored")
        if exact is None:  # taylor on every grid coordinate (a ViT's row_head where it has one)
            fn = jax.jit(engine_fn(model, layer, x, cls, "taylor", target, certified))
            exact, sec = _timed(fn, variables, A)
            row["seconds"]["taylor_full"] = sec
        maps = {name: maps_from(D) for name, D in [("exact", exact)] + [
            (e, full[e]) for e in ("closed_form", "nested_sum")]}
        degenerate = bool(np.all(np.asarray(exact[1]) == 0))
        row["exact_D2_identically_zero"] = degenerate
        row["maps"]["exact_vs_closed_form"] = map_agreement(maps["exact"], maps["closed_form"])
        row["maps"]["exact_vs_nested_sum"] = map_agreement(maps["exact"], maps["nested_sum"])
        row["maps"]["gradcampp_exact_vs_gradcam"] = map_agreement(maps["exact"], gradcam)
        row["_maps"] = {k: v[0] for k, v in maps.items()} | {"gradcam": gradcam[0]}
        row["_exact"] = exact
        row["_log_err"] = {e: np.log10(np.abs(
            np.asarray(full[e][1]).reshape(A.shape[0], -1)[:, coords] - truth[1]).ravel()
            / max(np.abs(truth[1]).max(), 1e-30) + 1e-30) for e in full}
        out["targets"][target] = row
    return out


def run(config: Config) -> dict[str, Any]:
    import jax

    import jaxcam

    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = jax.numpy.asarray(_images(config.num_images, config.image_size, config.seed))
    results: dict[str, Any] = {"version": STUDY_VERSION, "config": dataclasses.asdict(config),
                               "models": []}
    done: dict[tuple[str, str], Any] = {}
    partial_file = out_dir / "results.json"
    if partial_file.exists():  # resume: keep finished layers of a run with the same config
        previous = json.loads(partial_file.read_text())
        # rows are keyed by (arch, layer, init): which models and inits are studied, the
        # folder, plots and progress bars do not change a row's numbers
        same = lambda c: {k: v for k, v in c.items()
                          if k not in ("models", "inits", "out", "plots", "progress")}
        if previous.get("version") == STUDY_VERSION and same(previous.get("config", {})) == same(
                json.loads(json.dumps(results["config"]))):
            done = {(m["arch"], m["layer"], m["init"]): m for m in previous["models"]}
            results["training"] = previous.get("training", {})
    specs = _parse_models(config.models)
    runs: list[tuple[str, str, list[str]]] = []  # (arch, init, layers)
    if config.checkpoint is not None:
        bundle = jaxcam.load(config.checkpoint)
        specs = [(a, ls) for a, ls in specs if a == bundle.model.arch] or [
            (bundle.model.arch, ["default"])]
        runs = [(a, "checkpoint", ls) for a, ls in specs]
    else:
        runs = [(a, init, ls) for a, ls in specs for init in config.inits]
    results.setdefault("training", {})
    for arch, init, layers in runs:
        if all((arch, _canonical(arch, layer), init) in done for layer in layers):
            model = variables = None  # nothing left to compute for this model
        elif init == "checkpoint":
            model, variables = bundle.model, bundle.variables
        else:
            model = jaxcam.models.get(arch, config.num_classes)
            variables = model.init(jax.random.PRNGKey(config.seed), image_size=config.image_size)
            if init == "trained":
                print(f"[derivatives] training {arch} briefly on the synthetic lesion set ...",
                      flush=True)
                variables, note, acc = _trained_variables(model, variables, config, out_dir)
                results["training"][arch] = {"note": note, "val_accuracy": acc}
        for layer in layers:
            name = _canonical(arch, layer)
            if (arch, name, init) in done:
                print(f"[derivatives] {arch} {name} ({init}): kept from {partial_file}",
                      flush=True)
                results["models"].append(done[(arch, name, init)])
                continue
            t0 = time.perf_counter()
            print(f"[derivatives] {arch} {name} ({init}) ...", flush=True)
            # coordinates sampled per layer, so a resumed run samples the same ones
            rng = np.random.default_rng([config.seed, zlib.crc32(f"{arch}/{name}".encode())])
            res = study_layer(model, variables, x, name, config, rng)
            res.update(arch=arch, init=init, seconds_total=time.perf_counter() - t0)
            results["models"].append(res)
            partial_file.write_text(json.dumps(_public(results), indent=2))
            (out_dir / "report.md").write_text(markdown(_public(results)))
            print(f"[derivatives] {arch} {name} ({init}) done in {res['seconds_total']:.1f} s",
                  flush=True)
    if config.plots:
        write_plots(results, x, out_dir)
    results = _public(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "report.md").write_text(markdown(results))
    return results


def _canonical(arch: str, layer: str) -> str:
    """A layer spec's canonical cut-point name (``default`` -> the default layer)."""
    import jaxcam

    return jaxcam.models.get(arch, 4).resolve_layer(None if layer == "default" else layer)


def _public(results: dict[str, Any]) -> dict[str, Any]:
    """results without the arrays kept for the plots (keys starting with '_')."""
    models = [dict(m, targets={t: {k: v for k, v in row.items() if not k.startswith("_")}
                               for t, row in m["targets"].items()}) for m in results["models"]]
    return dict(results, models=models)


# --------------------------------------------------------------------------- report


def _key(m: dict[str, Any]) -> str:
    return f"{m['arch']} | {m['layer']} | {m['init']}"


def _fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.1e} / {s['p99']:.1e} / {s['max']:.1e}"


def _table(title: str, columns: Sequence[str], rows: Sequence[str], note: str = "") -> list[str]:
    """A report section: title, note, ``jaxcam.report.table``'s header, ready row lines."""
    from jaxcam import report

    return ["", f"## {title}", ""] + ([note, ""] if note else []) + report.table(
        columns, ()) + list(rows)


def _fd_cells(fd: dict[str, Any]) -> str:
    if "error" in fd:
        return f"{fd['error']} | | | | |"
    refused = ", ".join(f"{v} {k}" for k, v in sorted(fd["refused"].items())) or "none"
    cells = [_fmt(fd[f"D{n}"]) if f"D{n}" in fd else "-" for n in (1, 2, 3)]
    bound = " / ".join(f"{fd[f'D{n}_bound']:.0e}" for n in (1, 2, 3) if f"D{n}_bound" in fd)
    return f"{fd['checked']} ({fd['tried']}; {refused}) | " + " | ".join(cells) + \
        f" | {bound or '-'} |"


def markdown(results: dict[str, Any]) -> str:
    cfg, models = results["config"], results["models"]
    per_target = [(m, t, row) for m in models for t, row in m["targets"].items()]
    base = ["model", "layer", "init", "target"]
    times = ("taylor_sampled", "taylor_full_per_image_est", "taylor_full") + ENGINES
    lines = [
        "# Derivative correctness of Grad-CAM++ inputs", "",
        f"Images: {cfg['num_images']} held-out synthetic lesions, {cfg['image_size']} px; "
        f"{cfg['coords']} sampled coordinates per layer for the `taylor` ground truth; "
        "errors are |x - truth| / max|truth| per image (absolute where the truth is "
        "identically 0), as median / p99 / max.",
        "Regenerate: `python -m experiments.derivatives` (add `--checkpoint DIR` for your own "
        "trained model). `init`: `trained` = trained briefly here on the synthetic lesion set, "
        "`random` = random initialisation (a control).", "",
    ] + [f"- {arch}: {t['note']}" for arch, t in results.get("training", {}).items()]
    lines += _table("Certificate (head piecewise linear?)", base[:3] + [
        "activations", "coordinates", "piecewise linear"], [
        f"| {_key(m)} | {m['activation_shape']} | {m['coordinates']} | "
        f"{'yes' if m['certified'] else 'no'} |" for m in models])
    lines += _table("D2, D3, alpha vs taylor (median / p99 / max relative error)", base + [
        "engine", "D2", "D3", "alpha"], [
        f"| {_key(m)} | {t} | {e} | {_fmt(errs['D2'])} | {_fmt(errs['D3'])} | "
        f"{_fmt(errs['alpha'])} |" for m, t, row in per_target
        for e, errs in row["errors"].items()])
    lines += _table(
        "taylor (float64) vs float64 finite differences (image 0)", base + [
            "checked (tried; refused)", "D1", "D2", "D3", "bound"],
        [f"| {_key(m)} | {t} | " + _fd_cells(row["finite_differences"])
         for m, t, row in per_target if row.get("finite_differences")],
        "`jaxcam.testing`'s oracle: steps from each line's own scale, an error bound per "
        "estimate; a coordinate is checked when every target and order is trusted (bound <= "
        f"{FD_RTOL:g} of the scale, max |taylor| over the sampled coordinates), else refused "
        "and replaced. Errors relative to that scale; `bound`: the largest error bound of the "
        "checked estimates (D1 / D2 / D3).")
    lines += _table("Map-level effect (Grad-CAM++ maps, mean over images)", base + [
        "comparison", "Pearson", "Spearman", "top-20% IoU", "max abs diff"], [
        f"| {_key(m)} | {t}{' (exact D2 == 0: degenerate)' * row['exact_D2_identically_zero']}"
        f" | {comp} | {s['pearson']:.4f} | {s['spearman']:.4f} | {s['iou_top20']:.3f} | "
        f"{s['max_abs_diff']:.2e} |" for m, t, row in per_target
        for comp, s in row["maps"].items()])
    lines += _table(
        "Engine time (seconds per call on the whole batch, after compilation)", base + [
            "taylor (sampled)", "taylor full / image (est.)", "taylor full", *ENGINES],
        [f"| {_key(m)} | {t} | " + " | ".join(
            "-" if row["seconds"].get(k) is None else f"{row['seconds'][k]:.3g}"
            for k in times) + " |" for m, t, row in per_target],
        "`taylor full`: the exact map where `factored` does not apply (a ViT's `row_head` "
        "where it has one); the estimate is the sampled generic pass scaled up.")
    return "\n".join(lines) + "\n"


def write_plots(results: dict[str, Any], x, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxcam.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    image = np.clip(np.asarray(x[0]) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN), 0, 1)
    for m in results["models"]:
        if not all("_log_err" in row for row in m["targets"].values()):
            continue  # a layer kept from a resumed run has no arrays to plot
        tag = f"{m['arch']}_{m['layer']}_{m['init']}".replace(".", "_")
        fig, axes = plt.subplots(1, len(m["targets"]), figsize=(4 * len(m["targets"]), 3),
                                 squeeze=False)
        for ax, (t, row) in zip(axes[0], m["targets"].items(), strict=True):
            for e, v in row["_log_err"].items():
                ax.hist(v, bins=30, alpha=0.5, label=e)
            ax.set(title=f"{t}: log10 rel. error of D2")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"errors_{tag}.png", dpi=80)
        plt.close(fig)
        for t, row in m["targets"].items():
            panels = [("image", image)] + [(k, row["_maps"][k]) for k in
                                           ("exact", "closed_form", "nested_sum", "gradcam")]
            fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3))
            for ax, (title, im) in zip(axes, panels, strict=True):
                ax.imshow(im, cmap=None if im.ndim == 3 else "jet", vmin=0, vmax=1)
                ax.set(title=title, xticks=[], yticks=[])
            fig.suptitle(f"{m['arch']} {m['layer']} ({m['init']}) target={t}")
            fig.savefig(out_dir / f"maps_{tag}_{t}.png", dpi=80)
            plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    compilation.enable_from_argv(argv)
    t0 = time.perf_counter()
    run(config)
    print(f"[derivatives] wrote {config.out}/report.md in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
