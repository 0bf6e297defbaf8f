"""Tests for jaxcam.train: the loss,
the optimiser schedule, pretrained-weight transfer, and exact resume after an interruption."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcam
from jaxcam import metrics, train

# ----------------------------------------------------------------------------------------
# Loss, weights, schedule
# ----------------------------------------------------------------------------------------


def test_class_weights_inverse_frequency():
    w = train.class_weights([6, 3, 1, 0])
    np.testing.assert_allclose(w, [10 / (4 * 6), 10 / (4 * 3), 10 / (4 * 1), 0.0], rtol=1e-6)
    # the mean weight over the examples is 1 (when every class is present)
    counts = np.array([6, 3, 1])
    assert (train.class_weights(counts) * counts).sum() / counts.sum() == pytest.approx(1.0)


def test_weighted_cross_entropy_matches_manual():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = jnp.array([0, 2])
    w = jnp.array([1.0, 1.0, 3.0])
    logp = jax.nn.log_softmax(logits)
    manual = -(1.0 * logp[0, 0] + 3.0 * logp[1, 2]) / 4.0
    got = train.weighted_cross_entropy(logits, labels, w)
    assert float(got) == pytest.approx(float(manual), rel=1e-6)
    # label smoothing eps: target (1 - eps) onehot + eps / C
    eps = 0.3
    t = (1 - eps) * jax.nn.one_hot(labels, 3) + eps / 3
    manual_s = -(jnp.sum(t * logp, -1) * w[labels]).sum() / w[labels].sum()
    got_s = train.weighted_cross_entropy(logits, labels, w, eps)
    assert float(got_s) == pytest.approx(float(manual_s), rel=1e-6)


def test_schedule_warms_up_then_decays_to_zero():
    cfg = train.TrainConfig(epochs=1, learning_rate=0.1, warmup_fraction=0.2)
    lrs = [train.learning_rate_at(cfg, 100, s) for s in (0, 10, 20, 60, 100)]
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(0.05)
    assert lrs[2] == pytest.approx(0.1)
    assert lrs[3] == pytest.approx(0.05, rel=1e-5)  # half way through the cosine
    assert lrs[4] == pytest.approx(0.0, abs=1e-9)


def test_config_validation():
    with pytest.raises(ValueError, match="monitor must be one of"):
        train.TrainConfig(monitor="f2")
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train.TrainConfig(epochs=0)


def test_transfer_variables_keeps_backbone_replaces_classifier():
    pre = {"params": {"conv": {"kernel": np.ones((3, 3))}, "fc": {"kernel": np.ones((4, 1000))}}}
    fresh = {"params": {"conv": {"kernel": np.zeros((3, 3))}, "fc": {"kernel": np.zeros((4, 7))}}}
    merged, replaced = train.transfer_variables(pre, fresh)
    np.testing.assert_array_equal(merged["params"]["conv"]["kernel"], np.ones((3, 3)))
    np.testing.assert_array_equal(merged["params"]["fc"]["kernel"], np.zeros((4, 7)))
    assert replaced == ["['params']['fc']['kernel']"]
    with pytest.raises(ValueError, match="none of the pretrained weights fit"):
        train.transfer_variables({"params": {"x": np.ones(2)}}, fresh)


# ----------------------------------------------------------------------------------------
# The loop: a tiny stand-in model honouring the model contract (test-only)
# ----------------------------------------------------------------------------------------


class _TinyNet(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=2)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = x.mean((1, 2))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True)
class _TinyModel:
    num_classes: int = 3

    @property
    def module(self):
        return _TinyNet(self.num_classes)

    def init(self, rng, image_size=8):
        return dict(self.module.init(rng, jnp.zeros((1, image_size, image_size, 3))))

    def apply(self, variables, x, train=False, rng=None):
        if not train:
            return self.module.apply(variables, x)
        logits, updates = self.module.apply(
            variables, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
        )
        return logits, dict(updates)


def _toy_data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype(np.int32)
    images = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
    images[..., 0] += labels[:, None, None] * 1.5  # learnable signal
    return images, labels


def _batches_fn(images, labels, batch_size, seed):
    def batches(epoch, start_step):
        order = np.random.default_rng([seed, epoch]).permutation(len(labels))
        for s in range(start_step, len(labels) // batch_size):
            idx = order[s * batch_size : (s + 1) * batch_size]
            yield {"image": images[idx], "label": labels[idx]}

    return batches


def _run(tmp, cfg, hook=None, eval_images=None):
    images, labels = _toy_data()
    model = _TinyModel()
    variables = model.init(jax.random.PRNGKey(0))
    eval_fn = None
    if eval_images is not None:
        ev_x, ev_y = eval_images

        def eval_fn():
            for s in range(0, len(ev_y), 5):  # ragged last batch exercises the padding
                yield {"image": ev_x[s : s + 5], "label": ev_y[s : s + 5]}

    return train.fit(
        model,
        variables,
        _batches_fn(images, labels, cfg.batch_size, cfg.seed),
        len(labels) // cfg.batch_size,
        cfg,
        tmp,
        eval_batches=eval_fn,
        class_counts=np.bincount(labels, minlength=3),
        step_hook=hook,
        progress=False,
        verbose=False,
    )


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    cfg = train.TrainConfig(
        epochs=3, batch_size=8, learning_rate=0.05, checkpoint_every=4, class_weighting=True,
        label_smoothing=0.1,
    )
    ev = _toy_data(12, seed=1)
    full = _run(tmp_path / "full", cfg, eval_images=ev)

    def kill_at_step_10(step):  # mid-epoch 2 (6 steps per epoch), after the save at step 8
        if step == 10:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        _run(tmp_path / "cut", cfg, hook=kill_at_step_10, eval_images=ev)
    resumed = _run(tmp_path / "cut", cfg, eval_images=ev)
    assert resumed.resumed_at_step == 8
    assert resumed.steps == full.steps == 18
    for a, b in zip(
        jax.tree.leaves(full.final_variables), jax.tree.leaves(resumed.final_variables),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.history == full.history
    assert resumed.best_epoch == full.best_epoch
    # a rerun of a finished run does not train again
    again = _run(tmp_path / "cut", cfg, eval_images=ev)
    assert again.steps == 18 and again.history == full.history


def test_training_learns_and_keeps_best(tmp_path):
    cfg = train.TrainConfig(epochs=4, batch_size=8, learning_rate=0.05, checkpoint_every=100)
    ev = _toy_data(30, seed=2)
    res = _run(tmp_path, cfg, eval_images=ev)
    hist = res.history
    assert len(hist) == 4 and [h["epoch"] for h in hist] == [1, 2, 3, 4]
    best = max(range(4), key=lambda i: (hist[i]["val_balanced_accuracy"], -i))
    assert res.best_epoch == best + 1
    assert res.best_value == hist[best]["val_balanced_accuracy"]
    assert hist[-1]["val_accuracy"] > 0.6  # chance is ~1/3
    # batch norm running statistics moved away from their initial values in train mode
    assert not np.allclose(
        np.asarray(jax.tree.leaves(res.final_variables["batch_stats"])[0]), 0.0
    )
    # the best variables evaluate to the recorded best metric (eval mode, running stats)
    model = _TinyModel()
    val = train.evaluate(
        model, res.variables, [{"image": ev[0], "label": ev[1]}], 30, 3
    )
    assert val["balanced_accuracy"] == pytest.approx(res.best_value)


def test_early_stopping_and_mismatched_resume(tmp_path):
    # lr 0: nothing changes, so the metric never improves after epoch 1
    cfg = train.TrainConfig(epochs=5, batch_size=8, learning_rate=0.0, patience=2)
    res = _run(tmp_path, cfg, eval_images=_toy_data(12, seed=1))
    assert res.stopped_early and len(res.history) == 3 and res.best_epoch == 1
    other = dataclasses.replace(cfg, learning_rate=0.1)
    with pytest.raises(ValueError, match="different training run"):
        _run(tmp_path, other, eval_images=_toy_data(12, seed=1))


def _batch_moments(variables, x):
    """Mean and biased variance per channel of _TinyNet's BatchNorm input (its conv)."""
    conv = variables["params"]["Conv_0"]
    y = jax.lax.conv_general_dilated(
        jnp.asarray(x), conv["kernel"], (2, 2), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
    mean = y.mean((0, 1, 2))
    return np.asarray(mean), np.asarray((y**2).mean((0, 1, 2)) - mean**2)


def test_recalibrated_batch_stats_are_the_mean_of_the_batch_statistics():
    images, labels = _toy_data()
    model = _TinyModel()
    variables = model.init(jax.random.PRNGKey(0))
    batches = [{"image": images[i : i + 8], "label": labels[i : i + 8]} for i in (0, 8, 16, 24)]
    out = train.recalibrate_batch_stats(model, variables, iter(batches), num_batches=3)
    moments = [_batch_moments(variables, b["image"]) for b in batches[:3]]  # the 4th unused
    bn = out["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(bn["mean"], np.mean([m for m, _ in moments], 0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(bn["var"], np.mean([v for _, v in moments], 0), rtol=1e-5,
                               atol=1e-6)
    assert out["params"] is variables["params"]
    # nothing to recalibrate: returned unchanged
    assert train.recalibrate_batch_stats(model, variables, iter(batches), 0) == variables
    assert train.recalibrate_batch_stats(model, variables, iter([]), 5) == variables


def test_fit_evaluates_with_batch_stats_recalibrated_under_the_final_weights(tmp_path):
    cfg = train.TrainConfig(epochs=2, batch_size=8, learning_rate=0.05, checkpoint_every=100,
                            bn_recalibration_batches=3)
    res = _run(tmp_path, cfg, eval_images=_toy_data(12, seed=1))
    images, labels = _toy_data()
    last_epoch = _batches_fn(images, labels, 8, cfg.seed)(cfg.epochs - 1, 0)
    final = res.final_variables
    moments = [_batch_moments(final, next(last_epoch)["image"]) for _ in range(3)]
    np.testing.assert_allclose(final["batch_stats"]["BatchNorm_0"]["var"],
                               np.mean([v for _, v in moments], 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bn_recalibration_batches must be >= 0"):
        train.TrainConfig(bn_recalibration_batches=-1)


# ---------------------------------------------------------------- glue over random-access splits


def _source(n=24, size=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[..., 0] = np.where(labels[:, None, None] == 1, 255, images[..., 0])
    return [{"image": images[i], "label": int(labels[i]), "malignant": bool(labels[i] == 1)}
            for i in range(n)], labels


def test_fit_sources_trains_on_the_split_and_resumes_a_finished_run(tmp_path):
    src, labels = _source()
    val, _ = _source(9, seed=1)
    model = _TinyModel()
    variables = model.init(jax.random.PRNGKey(0))
    config = train.TrainConfig(epochs=1, batch_size=8, checkpoint_every=100)
    kw = dict(image_size=8, class_names=("a", "b", "c"), progress=False)
    result, counts = train.fit_sources(model, variables, src, val, config, tmp_path, **kw)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=3))
    assert result.steps == 3 and len(result.history) == 1  # 24 images / batch 8, one epoch
    again, _ = train.fit_sources(model, variables, src, val, config, tmp_path, **kw)
    assert again.steps == 3 and again.history == result.history  # nothing retrained
    with pytest.raises(ValueError, match=r"--batch-size 32 is larger than the training split "
                                         r"\(24 images\)"):
        train.fit_sources(model, variables, src, val,
                          train.TrainConfig(epochs=1, batch_size=32), tmp_path / "x", **kw)


def test_evaluate_source_scores_every_image_once_in_order():
    src, labels = _source(11)
    model = _TinyModel()
    variables = model.init(jax.random.PRNGKey(0))
    report = train.evaluate_source(model, variables, src, 3, image_size=8, batch_size=4)
    cm = np.asarray(report["confusion_matrix"])
    assert report["total"] == 11 and cm.sum(1).tolist() == np.bincount(labels, minlength=3).tolist()
    assert report["accuracy"] == pytest.approx(np.trace(cm) / 11)
    y_true = np.repeat(np.arange(3), cm.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(3), row) for row in cm])
    assert report["kappa"] == pytest.approx(metrics.quadratic_weighted_kappa(y_true, y_pred, 3))


def test_init_model_is_model_init_and_checks_the_image_size():
    model, variables, replaced = train.init_model("vit_ti_16", 4, image_size=32, seed=3)
    expected = model.init(jax.random.PRNGKey(3), image_size=32)
    assert replaced == [] and model.num_classes == 4
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    vit_min = jaxcam.models.get("vit_ti_16", 4).min_image_size
    with pytest.raises(ValueError, match=f"--image-size 16 is below the vit_ti_16 minimum of "
                                         f"{vit_min} px"):
        train.init_model("vit_ti_16", 4, image_size=16)
