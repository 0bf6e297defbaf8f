"""Supervised fine-tuning of jaxcam models with optax and orbax, resumable.

One training loop for every experiment: AdamW with a warm-up + cosine
schedule, weight decay, optional label smoothing and class weighting, batch
norm statistics updated in train mode, recomputed under each epoch's final
weights (:func:`recalibrate_batch_stats`) and used in eval mode, an evaluation
every epoch, early stopping on a validation metric, and an orbax
``CheckpointManager`` pair keeping the *latest* state (saved every
``checkpoint_every`` steps and at each epoch end) and the *best* one, and
beside them a jaxcam checkpoint of the best model (``workdir/model``:
:func:`jaxcam.checkpoint.save`, with the architecture, class names and
preprocessing), rewritten atomically whenever the best changes, which
``jaxcam.load`` / ``jaxcam explain --weights`` read.

Resuming is exact: the data order is a pure function of ``(seed, epoch)`` (the
caller's ``train_batches(epoch, start_step)``), the dropout key of a step is
``fold_in(key, step)`` and the train step is a pure jitted function of
``(state, batch)``, so rerunning an interrupted run continues from the last
checkpoint and ends with the same parameters as an uninterrupted run.

Also here: the classification metrics the experiments report (confusion
matrix, per-class precision / recall / F1, balanced accuracy, quadratic
weighted kappa), in numpy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxcam import checkpoint
from jaxcam.metrics import classification

Batch = Mapping[str, Any]
BatchesFn = Callable[[int, int], Iterable[Batch]]

EVAL_METRICS = ("accuracy", "balanced_accuracy", "loss", "macro_f1", "kappa")


# --------------------------------------------------------------------------------------
# Configuration and state
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`fit`.

    Attributes:
      epochs: passes over the training set.
      batch_size: images per step (the caller's batches must have this size;
        evaluation batches may be smaller, they are padded to it).
      learning_rate: peak learning rate of the warm-up + cosine schedule.
      warmup_fraction: fraction of all steps spent in the linear warm-up.
      weight_decay: AdamW decoupled weight decay.
      label_smoothing: ``eps`` in ``(1 - eps) * onehot + eps / C``.
      class_weighting: weight each example's loss by ``N / (C * n_y)``
        (inverse class frequency); needs ``class_counts`` in :func:`fit`.
      grad_clip: global-norm clipping threshold, ``None`` for none.
      monitor: validation metric for early stopping and the best checkpoint,
        one of ``EVAL_METRICS``; ``"loss"`` is minimised, the others maximised.
      patience: stop after this many epochs without improvement (``None``: never).
      checkpoint_every: save the latest state every this many steps (and at
        each epoch end).
      bn_recalibration_batches: before each evaluation, recompute the batch-norm
        running statistics from this many training batches under the epoch's final
        weights (:func:`recalibrate_batch_stats`, "precise BN"); 0 keeps the
        exponential moving averages. Why: the averages mix statistics of weights
        that have since changed; early in training from scratch they are far from
        the current weights' (the main job's epoch-1 validation loss was 475 from
        them, 0.56 from recalibrated ones, docs/training.md).
      seed: seeds the dropout keys (the data order is seeded by the caller).
    """

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    class_weighting: bool = False
    grad_clip: float | None = 1.0
    monitor: str = "balanced_accuracy"
    patience: int | None = None
    checkpoint_every: int = 50
    bn_recalibration_batches: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.monitor not in EVAL_METRICS:
            raise ValueError(f"monitor must be one of {EVAL_METRICS}, got {self.monitor!r}.")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}.")
        if self.bn_recalibration_batches < 0:
            raise ValueError("bn_recalibration_batches must be >= 0 (0: keep the running "
                             f"averages), got {self.bn_recalibration_batches}.")

    @property
    def monitor_mode(self) -> str:
        return "min" if self.monitor == "loss" else "max"

    def fingerprint(self) -> str:
        """Hash of the fields that change the trajectory (a resume must match it)."""
        fields = dataclasses.asdict(self)
        fields.pop("checkpoint_every")
        fields.pop("patience")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes; a pytree, saved whole by orbax."""

    step: jax.Array  # int32 scalar, global step count
    params: Any
    batch_stats: Any  # {} for models without batch norm
    opt_state: Any
    key: jax.Array  # uint32 (2,), dropout keys are fold_in(key, step)


@dataclasses.dataclass
class TrainResult:
    """What :func:`fit` returns.

    ``variables`` are the best-epoch weights when an evaluation set was given,
    else the final ones; ``final_variables`` are always the last ones.
    ``history`` has one dict per finished epoch (train loss / accuracy, learning
    rate, and the ``val_*`` metrics).
    """

    variables: dict
    final_variables: dict
    history: list[dict]
    best_epoch: int | None
    best_value: float | None
    stopped_early: bool
    resumed_at_step: int | None
    steps: int


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on a linear warm-up + cosine decay schedule, after optional clipping."""
    warmup = int(round(config.warmup_fraction * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )
    chain = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
    chain.append(optax.adamw(schedule, weight_decay=config.weight_decay))
    return optax.chain(*chain)


def learning_rate_at(config: TrainConfig, total_steps: int, step: int) -> float:
    warmup = int(round(config.warmup_fraction * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(total_steps, warmup + 1), 0.0
    )
    return float(schedule(step))


def class_weights(class_counts: Sequence[int]) -> np.ndarray:
    """Inverse-frequency weights ``w_c = N / (C * n_c)`` (mean weight over examples is 1).

    Classes with no examples get weight 0.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    total, num_classes = counts.sum(), len(counts)
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, total / (num_classes * counts), 0.0)
    return w.astype(np.float32)


def weighted_cross_entropy(logits, labels, weights, label_smoothing: float = 0.0):
    """``sum_i w_{y_i} CE_i / sum_i w_{y_i}`` with optionally smoothed one-hot targets.

    logits (B, C), labels (B,) int, weights (C,) float.
    """
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    ce = optax.softmax_cross_entropy(logits, targets)
    w = weights[labels]
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)


def init_state(variables: Mapping, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = variables["params"]
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        key=jax.random.PRNGKey(seed),
    )


def state_variables(state: TrainState) -> dict:
    out = {"params": state.params}
    if state.batch_stats:
        out["batch_stats"] = state.batch_stats
    return out


def make_train_step(model, tx, weights, label_smoothing: float = 0.0):
    """The jitted, pure ``(state, batch) -> (state, metrics)`` step.

    ``batch`` holds ``"image"`` (B, S, S, 3) normalised and ``"label"`` (B,).
    Batch norm runs in train mode (batch statistics; running averages updated).
    """
    weights = jnp.asarray(weights, jnp.float32)

    def loss_fn(params, state, batch):
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        key = jax.random.fold_in(state.key, state.step)
        logits, updates = model.apply(variables, batch["image"], train=True, rng=key)
        loss = weighted_cross_entropy(logits, batch["label"], weights, label_smoothing)
        return loss, (logits, updates)

    @jax.jit
    def train_step(state: TrainState, batch: Batch):
        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, batch
        )
        param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, param_updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=updates.get("batch_stats", state.batch_stats),
            opt_state=opt_state,
        )
        correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
        return new_state, {"loss": loss, "correct": correct}

    return train_step


def make_batch_stats_fn(model, seed: int = 0) -> Callable:
    """Jitted train-mode call ``(params, batch_stats, images) -> updated batch_stats``
    (the running statistics after one moving-average update), for
    :func:`recalibrate_batch_stats`; build it once and reuse it across epochs."""

    @jax.jit
    def update(params, old, x):
        _, updates = model.apply({"params": params, "batch_stats": old}, x, train=True,
                                 rng=jax.random.PRNGKey(seed))
        return updates["batch_stats"]

    return update


def recalibrate_batch_stats(model, variables: Mapping, batches: Iterable[Batch],
                            num_batches: int, seed: int = 0,
                            stats_fn: Callable | None = None) -> dict:
    """Batch-norm running statistics recomputed under fixed weights ("precise BN").

    Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm" (arXiv:2105.07576), sec. 3:
    the exponential moving average ``r <- m r + (1 - m) b_t`` of the per-batch
    statistics ``b_t`` (mean and biased variance per channel) mixes statistics of
    weights that have since changed. Here every BatchNorm's ``mean`` and ``var``
    become ``(1/n) sum_t b_t`` over the first ``n = num_batches`` of ``batches``
    under ``variables["params"]``, the layers in train mode (as the EMA saw them).
    ``b_t`` is read from the model's own update: with the statistics set to 0 a
    train-mode call returns ``(1 - m) b_t``, and ``m`` is that call's update of
    statistics set to 1 minus it (one more call), so any momentum works.

    ``stats_fn``: :func:`make_batch_stats_fn` of ``model`` (made here when None).

    Returns new variables (``params`` unchanged); the input unchanged when it has
    no ``batch_stats``, ``num_batches`` is 0 or ``batches`` is empty.
    """
    stats = variables.get("batch_stats")
    if not stats or num_batches <= 0:
        return dict(variables)
    update = stats_fn or make_batch_stats_fn(model, seed)
    params = variables["params"]
    zeros = jax.tree.map(jnp.zeros_like, stats)
    total, momentum, n = None, None, 0
    for batch in batches:
        if n >= num_batches:
            break
        x = jnp.asarray(batch["image"])
        scaled = update(params, zeros, x)  # (1 - m) b_t
        if momentum is None:
            momentum = jax.tree.map(jnp.subtract, update(params, jax.tree.map(
                jnp.ones_like, stats), x), scaled)
        total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
        n += 1
    if n == 0:
        return dict(variables)
    new = jax.tree.map(lambda t, m: t / (n * (1.0 - m)), total, momentum)
    return dict(variables, batch_stats=new)


def make_predict_fn(model) -> Callable:
    """Jitted eval-mode forward pass ``(variables, images) -> logits``."""
    return jax.jit(lambda variables, x: model.apply(variables, x))


def predict(
    model,
    variables: Mapping,
    batches: Iterable[Batch],
    batch_size: int,
    predict_fn: Callable | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, np.ndarray]:
    """Eval-mode logits over a finite stream of batches.

    Short batches are padded to ``batch_size`` so that one compiled shape serves
    all. Returns numpy ``logits`` (N, C), ``label`` (N,) and ``index`` (N,) when
    the batches carry them.
    """
    from tqdm.auto import tqdm

    predict_fn = predict_fn or make_predict_fn(model)
    logits, labels, indices = [], [], []
    for batch in tqdm(batches, desc=desc, leave=False, disable=not progress):
        x = np.asarray(batch["image"])
        n = x.shape[0]
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        logits.append(np.asarray(predict_fn(variables, x))[:n])
        if "label" in batch:
            labels.append(np.asarray(batch["label"]))
        if "index" in batch:
            indices.append(np.asarray(batch["index"]))
    out = {"logits": np.concatenate(logits) if logits else np.zeros((0, model.num_classes))}
    if labels:
        out["label"] = np.concatenate(labels)
    if indices:
        out["index"] = np.concatenate(indices)
    return out


def evaluate(
    model,
    variables: Mapping,
    batches: Iterable[Batch],
    batch_size: int,
    num_classes: int,
    predict_fn: Callable | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Loss (unweighted cross-entropy), accuracy, balanced accuracy, macro F1, kappa."""
    out = predict(model, variables, batches, batch_size, predict_fn, progress, "eval")
    logits, labels = out["logits"], out["label"]
    if len(labels) == 0:
        raise ValueError("the evaluation set is empty; give a split with at least one image.")
    logp = logits - _logsumexp(logits)
    loss = float(-np.mean(logp[np.arange(len(labels)), labels]))
    pred = np.argmax(logits, -1)
    report = classification.classification_report(labels, pred, num_classes)
    return {
        "loss": loss,
        "accuracy": report["accuracy"],
        "balanced_accuracy": report["balanced_accuracy"],
        "macro_f1": report["macro"]["f1"],
        "kappa": classification.quadratic_weighted_kappa(labels, pred, num_classes),
    }


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


# --------------------------------------------------------------------------------------
# Fine-tuning from pretrained weights
# --------------------------------------------------------------------------------------


def transfer_variables(pretrained: Mapping, fresh: Mapping) -> tuple[dict, list[str]]:
    """Copy ``pretrained`` into the structure of ``fresh``, keeping fresh leaves that differ.

    Used to fine-tune imported torchvision weights for a new number of classes:
    every leaf whose path and shape match is taken from ``pretrained``; the
    rest (the classifier, whose output width changed) keep ``fresh``'s
    initialisation. Returns the merged variables and the list of replaced
    leaf paths. Raises ``ValueError`` when nothing matches (wrong architecture).
    """
    pre_flat = {
        jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(pretrained)
    }
    replaced: list[str] = []
    matched = 0

    def pick(path, leaf):
        nonlocal matched
        name = jax.tree_util.keystr(path)
        old = pre_flat.get(name)
        if old is not None and np.shape(old) == np.shape(leaf):
            matched += 1
            return jnp.asarray(old, dtype=jnp.asarray(leaf).dtype)
        replaced.append(name)
        return leaf

    merged = jax.tree_util.tree_map_with_path(pick, dict(fresh))
    if matched == 0:
        raise ValueError(
            "none of the pretrained weights fit the model (different architecture?); "
            "pass the --arch the weights were exported from."
        )
    return merged, replaced


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _managers(workdir: Path, config: TrainConfig):
    common = dict(enable_async_checkpointing=False, create=True)
    latest = ocp.CheckpointManager(
        workdir / "latest",
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **common),
        item_names=("state", "meta"),
    )
    best = ocp.CheckpointManager(
        workdir / "best",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1,
            best_fn=lambda m: float(m[config.monitor]),
            best_mode=config.monitor_mode,
            **common,
        ),
        item_names=("state", "meta"),
    )
    return latest, best


def _save(manager, step: int, state: TrainState, meta: dict, metrics: dict | None = None):
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
        ),
        metrics=metrics,
        force=True,
    )
    manager.wait_until_finished()


def _restore(manager, step: int, like: TrainState) -> tuple[TrainState, dict]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return out["state"], dict(out["meta"])


def _saved_model_step(workdir: Path) -> int | None:
    """The training step of the model checkpoint in ``workdir``, None if there is none."""
    meta_path = workdir / checkpoint.TRAINING_MODEL_DIR / checkpoint.METADATA_FILE
    try:
        return json.loads(meta_path.read_text()).get("info", {}).get("step")
    except (OSError, ValueError):
        return None


def _first_image_side(train_batches: BatchesFn, eval_batches) -> int:
    source = eval_batches() if eval_batches is not None else train_batches(0, 0)
    return int(np.shape(next(iter(source))["image"])[1])


def _save_model(workdir: Path, model, variables: Mapping, info: dict,
                class_names: Sequence[str] | None, preprocessing: Any | None,
                image_size: int | None) -> None:
    """``workdir/model``: the jaxcam checkpoint of ``variables`` (atomic overwrite)."""
    from jaxcam.preprocessing import Preprocessing

    if preprocessing is None:  # what jaxcam.data.batches does without a prep
        preprocessing = Preprocessing(image_size=int(image_size), resize_size=None)
    checkpoint.save(workdir / checkpoint.TRAINING_MODEL_DIR, model, variables,
                    class_names=class_names, preprocessing=preprocessing, info=info,
                    overwrite=True)


def fit(
    model,
    variables: Mapping,
    train_batches: BatchesFn,
    steps_per_epoch: int,
    config: TrainConfig,
    workdir: str | Path,
    eval_batches: Callable[[], Iterable[Batch]] | None = None,
    class_counts: Sequence[int] | None = None,
    step_hook: Callable[[int], None] | None = None,
    progress: bool = True,
    predict_fn: Callable | None = None,
    verbose: bool = True,
    class_names: Sequence[str] | None = None,
    preprocessing: Any | None = None,
) -> TrainResult:
    """Train ``model`` from ``variables``; resume from ``workdir`` if it holds a run.

    Args:
      model: a jaxcam model (``apply(variables, x, train=True, rng=key)`` ->
        ``(logits, {"batch_stats": ...})``; ``apply(variables, x)`` -> logits).
      variables: initial ``{"params", "batch_stats"?}``.
      train_batches: ``(epoch, start_step) -> iterable`` of training batches of
        exactly ``config.batch_size`` images, in an order that is a pure
        function of ``(seed, epoch)``; ``start_step`` batches are skipped.
      steps_per_epoch: number of batches ``train_batches`` yields from step 0.
      config: hyper-parameters.
      workdir: checkpoint folder (``latest/`` and ``best/``). An existing run
        there is resumed when its config fingerprint matches; a finished run is
        not retrained.
      eval_batches: ``() -> iterable`` of validation batches, evaluated after
        every epoch; ``None`` skips evaluation (no early stopping, no best).
      class_counts: training-set class counts, needed for class weighting.
      step_hook: called with the global step after every step (and after a
        checkpoint that step); an exception it raises interrupts training the
        way a kill would.
      progress: show tqdm bars (loss and accuracy).
      verbose: print one summary line per epoch (and when resuming).
      predict_fn: a jitted ``(variables, x) -> logits`` to reuse for evaluation
        (default: :func:`make_predict_fn`).
      class_names, preprocessing: recorded in the model checkpoint
        ``workdir/model`` (a ``jaxcam.preprocessing.Preprocessing``; default:
        resize straight to the training images' side, ImageNet mean/std, what
        ``jaxcam.data.batches`` does by default).

    The model checkpoint ``workdir/model`` holds the best-epoch model (the final
    one without ``eval_batches``); its ``info`` records ``step``, ``epoch`` and
    the monitored metric. After an interruption, or for a run written before
    it existed, it is brought up to date when ``fit`` runs again.
    """
    from tqdm.auto import tqdm

    if steps_per_epoch < 1:
        raise ValueError(
            f"steps_per_epoch must be >= 1, got {steps_per_epoch}: the training set is "
            f"smaller than one batch of {config.batch_size}; lower the batch size."
        )
    num_classes = model.num_classes
    if config.class_weighting:
        if class_counts is None:
            raise ValueError("class_weighting=True needs class_counts (training-set counts).")
        weights = class_weights(class_counts)
    else:
        weights = np.ones((num_classes,), np.float32)
    total_steps = config.epochs * steps_per_epoch
    tx = make_optimizer(config, total_steps)
    state = init_state(variables, tx, config.seed)
    train_step = make_train_step(model, tx, weights, config.label_smoothing)
    predict_fn = predict_fn or make_predict_fn(model)

    workdir = Path(workdir).absolute()
    latest, best = _managers(workdir, config)
    meta: dict[str, Any] = {
        "fingerprint": config.fingerprint(),
        "epoch": 0,
        "step_in_epoch": 0,
        "loss_sum": 0.0,
        "correct": 0,
        "seen": 0,
        "history": [],
        "best_value": None,
        "best_epoch": None,
        "bad_epochs": 0,
        "stopped": False,
        "steps_per_epoch": steps_per_epoch,
    }
    resumed_at = None
    if latest.latest_step() is not None:
        state, saved = _restore(latest, latest.latest_step(), state)
        if saved.get("fingerprint") != meta["fingerprint"] or (
            saved.get("steps_per_epoch") != steps_per_epoch
        ):
            raise ValueError(
                f"{workdir} holds checkpoints of a different training run (other "
                "hyper-parameters or dataset); use another output folder or delete it."
            )
        meta = saved
        resumed_at = int(state.step)
        if verbose:
            print(f"Resuming from step {resumed_at} (epoch {meta['epoch'] + 1}) in {workdir}")

    def write_model(step: int, variables_: Mapping, source: str) -> None:
        info = {"step": step, "epoch": meta["best_epoch"] if source == "best" else meta["epoch"],
                "source": source, "monitor": config.monitor,
                config.monitor: meta["best_value"] if source == "best" else None,
                "fingerprint": meta["fingerprint"]}
        _save_model(workdir, model, variables_, info, class_names, preprocessing,
                    meta.get("image_size"))

    def better(value: float) -> bool:
        if meta["best_value"] is None:
            return True
        return value < meta["best_value"] if config.monitor_mode == "min" else (
            value > meta["best_value"]
        )

    stats_fn = None  # the batch-norm recalibration call, jitted on first use
    while meta["epoch"] < config.epochs and not meta["stopped"]:
        epoch = meta["epoch"]
        start = meta["step_in_epoch"]
        bar = tqdm(
            total=steps_per_epoch,
            initial=start,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=True,
        )
        step_in_epoch = start
        for batch in train_batches(epoch, start):
            if step_in_epoch >= steps_per_epoch:
                break
            feed = {"image": jnp.asarray(batch["image"]), "label": jnp.asarray(batch["label"])}
            if feed["image"].shape[0] != config.batch_size:
                raise ValueError(
                    f"train_batches yielded a batch of {feed['image'].shape[0]} images, "
                    f"expected {config.batch_size}; drop the remainder in training."
                )
            meta.setdefault("image_size", int(feed["image"].shape[1]))
            state, m = train_step(state, feed)
            step_in_epoch += 1
            meta["loss_sum"] += float(m["loss"]) * config.batch_size
            meta["correct"] += int(m["correct"])
            meta["seen"] += config.batch_size
            meta["step_in_epoch"] = step_in_epoch
            bar.update(1)
            bar.set_postfix(
                loss=f"{meta['loss_sum'] / meta['seen']:.4f}",
                acc=f"{meta['correct'] / meta['seen']:.3f}",
            )
            global_step = int(state.step)
            if global_step % config.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                _save(latest, global_step, state, meta)
            if step_hook is not None:
                step_hook(global_step)
        bar.close()
        if step_in_epoch < steps_per_epoch:
            raise ValueError(
                f"train_batches yielded {step_in_epoch} batches in epoch {epoch}, "
                f"expected steps_per_epoch={steps_per_epoch}."
            )

        record = {
            "epoch": epoch + 1,
            "step": int(state.step),
            "lr": learning_rate_at(config, total_steps, int(state.step)),
            "train_loss": meta["loss_sum"] / max(meta["seen"], 1),
            "train_accuracy": meta["correct"] / max(meta["seen"], 1),
        }
        metrics = None
        if config.bn_recalibration_batches and state.batch_stats:
            stats_fn = stats_fn or make_batch_stats_fn(model, config.seed)  # one per fit
            recalibrated = recalibrate_batch_stats(
                model, state_variables(state), train_batches(epoch, 0),
                config.bn_recalibration_batches, config.seed, stats_fn)
            state = state.replace(batch_stats=recalibrated["batch_stats"])
        if eval_batches is not None:
            val = evaluate(
                model, state_variables(state), eval_batches(), config.batch_size,
                num_classes, predict_fn,
            )
            record.update({f"val_{k}": v for k, v in val.items()})
            value = val[config.monitor]
            if better(value):
                meta["best_value"], meta["best_epoch"], meta["bad_epochs"] = value, epoch + 1, 0
                metrics = val
            else:
                meta["bad_epochs"] += 1
                if config.patience is not None and meta["bad_epochs"] >= config.patience:
                    meta["stopped"] = True
            if verbose:
                print(
                    f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} "
                    f"acc {record['train_accuracy']:.3f} | val loss {val['loss']:.4f} "
                    f"acc {val['accuracy']:.3f} bal.acc {val['balanced_accuracy']:.3f}"
                    + ("  (stopping early)" if meta["stopped"] else ""),
                    flush=True,
                )
        meta["history"].append(record)
        meta.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, correct=0, seen=0)
        if metrics is not None:
            _save(best, int(state.step), state, meta, metrics)
            write_model(int(state.step), state_variables(state), "best")
        _save(latest, int(state.step), state, meta)

    final_vars = state_variables(state)
    best_vars = final_vars
    model_step, source = int(state.step), "final"
    if eval_batches is not None and best.best_step() is not None:
        best_state, _ = _restore(best, best.best_step(), state)
        best_vars = state_variables(best_state)
        model_step, source = int(best.best_step()), "best"
    if _saved_model_step(workdir) != model_step:  # interrupted before it was written, or older
        if "image_size" not in meta and preprocessing is None:
            meta["image_size"] = _first_image_side(train_batches, eval_batches)
        write_model(model_step, best_vars, source)
    latest.close()
    best.close()
    return TrainResult(
        variables=best_vars,
        final_variables=final_vars,
        history=list(meta["history"]),
        best_epoch=meta["best_epoch"],
        best_value=meta["best_value"],
        stopped_early=bool(meta["stopped"]),
        resumed_at_step=resumed_at,
        steps=int(state.step),
    )


def batches_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Number of batches one epoch yields."""
    if drop_remainder:
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


# ---------------------------------------------------------------- fine-tuning on TFDS splits


def init_model(arch: str, num_classes: int, *, image_size: int, seed: int = 0,
               pretrained: str | None = None, verbose: bool = True):
    """``(model, variables, replaced)``: ``jaxcam.models.get(arch, num_classes)``
    initialised for ``image_size`` px, or fine-tuning from the torchvision / jaxcam
    weights file ``pretrained`` (its classifier re-initialised for ``num_classes``;
    ``replaced`` lists the re-initialised tensors, :func:`transfer_variables`).
    ValueError when ``image_size`` is below the architecture's minimum."""
    import jaxcam

    model = jaxcam.models.get(arch, num_classes)
    min_size = getattr(model, "min_image_size", 32)
    if image_size < min_size:
        raise ValueError(f"--image-size {image_size} is below the {arch} minimum of "
                         f"{min_size} px.")
    variables = model.init(jax.random.PRNGKey(seed), image_size=image_size)
    replaced: list[str] = []
    if pretrained:
        loaded = jaxcam.load(pretrained, arch=arch)
        variables, replaced = transfer_variables(loaded.variables, variables)
        if verbose:
            print(f"Fine-tuning from {pretrained}: new classifier for {num_classes} "
                  f"classes ({len(replaced)} tensors re-initialised).", flush=True)
    return model, variables, replaced


def fit_sources(
    model,
    variables: Mapping,
    train_source,
    val_source,
    config: TrainConfig,
    workdir: str | Path,
    *,
    image_size: int,
    class_names: Sequence[str],
    balanced: bool = False,
    progress: bool = True,
    predict_fn: Callable | None = None,
) -> tuple[TrainResult, np.ndarray]:
    """:func:`fit` on random-access TFDS splits (``jaxcam.data.load``): training batches
    from ``train_source`` at ``image_size`` px (class-balanced sampling with
    ``balanced``), validation on ``val_source``, the ImageNet preprocessing that
    ``jaxcam.data.batches`` applies. Returns ``(result, class_counts)``, the training
    split's label counts ``(num_classes,)``. ValueError when the batch is larger than
    the training split."""
    from jaxcam import data as jdata
    from jaxcam.data.pipeline import source_labels
    from jaxcam.preprocessing import Preprocessing

    n_train, bs = len(train_source), config.batch_size
    if bs > n_train:
        raise ValueError(f"--batch-size {bs} is larger than the training split "
                         f"({n_train} images); lower --batch-size.")
    labels = source_labels(train_source)
    counts = np.bincount(labels, minlength=len(class_names))

    def train_batches(epoch: int, start_step: int):
        return jdata.batches(train_source, bs, image_size, train=True, seed=config.seed,
                             epoch=epoch, start_step=start_step, balanced=balanced,
                             labels=labels)

    def eval_batches():
        return jdata.batches(val_source, bs, image_size, train=False, seed=config.seed,
                             drop_remainder=False)

    result = fit(
        model, variables, train_batches, batches_per_epoch(n_train, bs), config,
        Path(workdir), eval_batches=eval_batches, class_counts=counts, progress=progress,
        predict_fn=predict_fn, class_names=class_names,
        # what jdata.batches does: resize straight to image_size, ImageNet mean/std
        preprocessing=Preprocessing(image_size=image_size, resize_size=None),
    )
    return result, counts


def evaluate_source(model, variables: Mapping, source, num_classes: int, *, image_size: int,
                    batch_size: int, seed: int = 0, predict_fn: Callable | None = None
                    ) -> dict[str, Any]:
    """Classification report of a random-access split (every image, in order):
    :func:`jaxcam.metrics.classification_report` of the argmax predictions plus
    ``"kappa"`` (:func:`jaxcam.metrics.quadratic_weighted_kappa`)."""
    from jaxcam import data as jdata

    out = predict(model, variables,
                  jdata.batches(source, batch_size, image_size, train=False, seed=seed,
                                drop_remainder=False), batch_size, predict_fn)
    pred = np.argmax(out["logits"], -1)
    report = classification.classification_report(out["label"], pred, num_classes)
    report["kappa"] = classification.quadratic_weighted_kappa(out["label"], pred, num_classes)
    return report


def train_on_synthetic(model, variables: Mapping, workdir: str | Path, *,
                       synthetic_config: str = "default", num_train: int, image_size: int,
                       epochs: int, batch_size: int, learning_rate: float, seed: int = 0,
                       cache_dir: str | None = None, progress: bool = True) -> TrainResult:
    """Train ``model`` briefly on a synthetic lesion configuration (``"default"``: one
    lesion per image, or ``"multi"``), to get a model that has learned something.

    Builds (cached) ``num_train`` training and ``max(1, num_train // 10)`` validation
    images at ``image_size`` into ``cache_dir`` (default ``workdir/tfds``), trains with
    :func:`fit_sources` (checkpoints in ``workdir/checkpoints``: rerunning resumes) and
    returns the :class:`TrainResult` (best-epoch ``variables``, ``history`` with
    ``val_accuracy``).
    """
    from jaxcam import data as jdata

    name = "synthetic_lesions"
    builder_config = {"config": synthetic_config, "num_train": num_train,
                      "num_validation": max(1, num_train // 10), "num_test": 1,
                      "image_size": image_size, "seed": seed}
    cache = str(Path(cache_dir) if cache_dir else Path(workdir) / "tfds")
    splits = jdata.build_splits(name, cache, ("train", "validation"), progress=progress,
                                **builder_config)
    config = TrainConfig(epochs=epochs, batch_size=min(batch_size, num_train),
                         learning_rate=learning_rate, seed=seed, checkpoint_every=100)
    result, _ = fit_sources(model, variables, splits["train"], splits["validation"], config,
                            Path(workdir) / "checkpoints", image_size=image_size,
                            class_names=jdata.info(name).display_names,
                            progress=progress)
    return result
