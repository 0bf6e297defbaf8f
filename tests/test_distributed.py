"""Data parallelism (jaxcam.distributed) and dataset explanation (jaxcam.dataset_explain).

Sharded runs use 4 forced host devices (``--xla_force_host_platform_device_count=4``),
which must be set before JAX starts, so they run in one subprocess (a module
fixture) that reports numbers as JSON; the tests assert on them. Inside that
process the reference is the same computation on unsharded inputs, which JAX
runs on a single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxcam import distributed
from jaxcam.dataset_explain import explain_dataset, load_explanations

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DEVICES = 4
METHODS = ["gradcam", "gradcam++", "scorecam"]

WORKER = textwrap.dedent(
    """
    import json, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np, optax
    from jaxcam import distributed
    out = {"joined": distributed.initialize_distributed()}  # no cluster: a no-op, False
    import jaxcam
    from jaxcam.dataset_explain import explain_dataset, load_explanations
    from jaxcam.train import init_state, make_train_step
    from test_compilation import tiny_images, tiny_model, tiny_variables

    METHODS = %(methods)r
    mesh = distributed.data_mesh()
    out["devices"] = mesh.size
    b = np.arange(24, dtype=np.float32).reshape(8, 3)
    s = distributed.shard_batch(b, mesh)
    out["shards"] = sorted([int(sh.index[0].start or 0), list(sh.data.shape), sh.device.id]
                           for sh in s.addressable_shards)
    out["local_rows_equal"] = bool(np.array_equal(distributed.local_rows(s), b))
    try:
        distributed.shard_batch(b[:6], mesh)
    except ValueError as err:
        out["short_batch_error"] = str(err)

    def maxdiff(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    # explain: 8 images sharded 2 per device vs the same call on one device
    model = tiny_model()
    variables = tiny_variables(model)
    x = np.asarray(tiny_images(8))
    ref = jaxcam.explain(model, variables, x, method=METHODS)
    out["reference_devices"] = len(ref["gradcam"].maps.sharding.device_set)
    got = jaxcam.explain(model, distributed.replicate(variables, mesh),
                         distributed.shard_batch(x, mesh), method=METHODS)
    out["explain_output_devices"] = len(got["gradcam"].maps.sharding.device_set)
    out["explain_diff"] = {
        m: {f: maxdiff(getattr(got[m], f), getattr(ref[m], f))
            for f in ("maps", "raw", "weights", "logits") if getattr(ref[m], f) is not None}
        for m in METHODS}
    out["explain_class_equal"] = bool(np.array_equal(got["gradcam"].class_idx,
                                                     ref["gradcam"].class_idx))

    # explain_dataset: two batches of 6 (padded to 8 = 2 per device)
    batches = [{"image": x[:6], "index": np.arange(6)}, {"image": x[2:8], "index": np.arange(2, 8)}]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = explain_dataset(model, variables, batches, tmp, METHODS, progress=False)
        loaded = load_explanations(tmp)
    order = np.concatenate([np.arange(6), np.arange(2, 8)])
    out["dataset_rows"] = manifest["rows"]
    out["dataset_index_equal"] = bool(np.array_equal(loaded["index"], order))
    out["dataset_diff"] = {m: maxdiff(loaded[m + "/maps"], ref[m].maps[order]) for m in METHODS}

    # a train step (train-mode batch norm: statistics over the whole sharded batch)
    tx = optax.sgd(0.1, momentum=0.9)
    step = make_train_step(model, tx, np.ones(model.num_classes, np.float32))
    labels = np.arange(8, dtype=np.int32) %% model.num_classes
    feeds = [{"image": x, "label": labels}, {"image": x[::-1].copy(), "label": labels[::-1].copy()}]
    state_1 = init_state(variables, tx, seed=0)
    state_n = distributed.replicate(init_state(variables, tx, seed=0), mesh)
    losses = []
    for feed in feeds:
        state_1, m1 = step(state_1, feed)
        state_n, mn = step(state_n, distributed.shard_batch(feed, mesh))
        losses.append([float(m1["loss"]), float(mn["loss"])])
    out["train_losses"] = losses
    p1 = jax.tree_util.tree_leaves((state_1.params, state_1.batch_stats))
    pn = jax.tree_util.tree_leaves((state_n.params, state_n.batch_stats))
    out["train_param_diff"] = max(maxdiff(a, b) / (1 + float(np.max(np.abs(a))))
                                  for a, b in zip(p1, pn))
    out["train_param_devices"] = len(pn[0].sharding.device_set)
    print("RESULT " + json.dumps(out))
    """
) % {"methods": METHODS}


@pytest.fixture(scope="module")
def sharded():
    """Run the 4-device worker once; its JSON report."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    ).strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    for var in ("JAXCAM_COORDINATOR", "JAXCAM_NUM_PROCESSES", "JAXCAM_PROCESS_ID"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------- sharded (4 devices)


def test_mesh_spans_every_forced_device_and_splits_rows_evenly(sharded):
    assert sharded["devices"] == DEVICES
    starts = [s[0] for s in sharded["shards"]]
    assert starts == [0, 2, 4, 6]  # 8 rows, 2 per device, each device its own block
    assert all(s[1] == [2, 3] for s in sharded["shards"])
    assert len({s[2] for s in sharded["shards"]}) == DEVICES
    assert sharded["local_rows_equal"]


def test_shard_batch_asks_for_padding_when_rows_do_not_divide(sharded):
    msg = sharded["short_batch_error"]
    assert "batch size 6 is not a multiple of the 4 devices" in msg
    assert "pad_batch(batch, 4)" in msg


def test_initialize_distributed_is_a_no_op_without_a_cluster(sharded):
    assert sharded["joined"] is False


def test_sharded_explain_runs_on_every_device_and_equals_one_device(sharded):
    """Every CAM method is per-image work: splitting the batch over 4 devices
    gives the single-device numbers (float32 rounding at most)."""
    assert sharded["reference_devices"] == 1
    assert sharded["explain_output_devices"] == DEVICES
    assert sharded["explain_class_equal"]
    for method, diffs in sharded["explain_diff"].items():
        for field, diff in diffs.items():
            assert diff <= 1e-5, (method, field, diff)


def test_explain_dataset_on_four_devices_pads_shards_and_matches_one_device(sharded):
    assert sharded["dataset_rows"] == 12  # padded rows (6 -> 8) dropped
    assert sharded["dataset_index_equal"]
    for method, diff in sharded["dataset_diff"].items():
        assert diff <= 1e-5, (method, diff)


def test_sharded_train_step_equals_one_device(sharded):
    """jaxcam.train's jitted step, fed a replicated state and a sharded batch:
    same losses and parameters (batch-norm statistics and the mean loss become
    all-reduces, so agreement is to float32 rounding)."""
    for loss_1, loss_n in sharded["train_losses"]:
        assert abs(loss_1 - loss_n) <= 1e-5 * (1 + abs(loss_1))
    assert sharded["train_param_diff"] <= 1e-5
    assert sharded["train_param_devices"] == DEVICES


# ----------------------------------------------------------------- one device, in process


def test_pad_batch_repeats_the_last_row_and_reports_valid_rows():
    batch = {"image": np.arange(10.0).reshape(5, 2), "label": np.array([3, 1, 4, 1, 5])}
    padded, n = distributed.pad_batch(batch, 4)
    assert n == 5
    np.testing.assert_array_equal(padded["label"], [3, 1, 4, 1, 5, 5, 5, 5])
    np.testing.assert_array_equal(padded["image"][5:], np.tile([[8.0, 9.0]], (3, 1)))
    same, n = distributed.pad_batch(batch, 5)
    assert same is batch and n == 5


@pytest.mark.parametrize(
    "batch, multiple, match",
    [
        ({"a": np.zeros((4, 2)), "b": np.zeros(3)}, 2, r"share the leading \(batch\) size"),
        ({"a": np.zeros((4, 2)), "step": np.float32(1)}, 2, "needs a leading batch axis"),
        (np.zeros((4, 2)), 0, "multiple must be >= 1"),
        (np.zeros((0, 2)), 2, "cannot pad an empty batch"),
    ],
)
def test_pad_batch_rejects_bad_batches(batch, multiple, match):
    with pytest.raises(ValueError, match=match):
        distributed.pad_batch(batch, multiple)


def test_mesh_helpers_reject_bad_meshes():
    with pytest.raises(ValueError, match="at least one device"):
        distributed.data_mesh([])
    other = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("model",))
    with pytest.raises(ValueError, match="with a 'data' axis"):
        distributed.data_sharding(other)


def test_initialize_distributed_needs_all_three_settings(monkeypatch):
    monkeypatch.setenv("JAXCAM_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.delenv("JAXCAM_PROCESS_ID", raising=False)
    monkeypatch.setenv("JAXCAM_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="needs all three of coordinator_address"):
        distributed.initialize_distributed()
    # a one-process "cluster" is a plain run: nothing to join
    assert distributed.initialize_distributed("127.0.0.1:1234", 1, 0) is False


@pytest.fixture(scope="module")
def tiny():
    from test_compilation import tiny_model, tiny_variables

    model = tiny_model()
    return model, tiny_variables(model)


def _batches(n_batches: int, batch: int = 3):
    from test_compilation import tiny_images

    x = np.asarray(tiny_images(n_batches * batch, seed=3))
    return [{"image": x[i * batch:(i + 1) * batch], "index": np.arange(i * batch, (i + 1) * batch),
             "mask": np.zeros((batch, 32, 32), np.uint8)} for i in range(n_batches)]


def test_explain_dataset_writes_each_batch_and_resumes_without_recomputing(tiny, tmp_path,
                                                                          monkeypatch):
    import jaxcam
    import jaxcam.explanation as explanation

    model, variables = tiny
    batches = _batches(3)
    calls = []
    real = jaxcam.explain  # resolve the lazy public name before patching the module
    assert real is explanation.explain
    monkeypatch.setattr(explanation, "explain", lambda *a, **k: calls.append(1) or real(*a, **k))
    metric = {"peak": lambda ex, images: ex.maps.max(axis=(1, 2))}

    manifest = explain_dataset(model, variables, batches[:2], tmp_path, "gradcam",
                               metrics=metric, progress=False)
    assert len(calls) == 2 and manifest["rows"] == 6
    assert sorted(p.name for p in tmp_path.glob("batch_*.npz")) == [
        "batch_000000.npz", "batch_000001.npz"]

    # the interrupted run goes on: the 2 batches written are skipped, only the 3rd is computed
    manifest = explain_dataset(model, variables, batches, tmp_path, "gradcam",
                               metrics=metric, progress=False)
    assert len(calls) == 3 and manifest["rows"] == 9
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(on_disk["batches"]) == ["000000", "000001", "000002"]

    loaded = load_explanations(tmp_path)
    x = np.concatenate([b["image"] for b in batches])
    direct = real(model, variables, x, method="gradcam")
    np.testing.assert_allclose(loaded["gradcam/maps"], np.asarray(direct.maps), atol=1e-6)
    np.testing.assert_array_equal(loaded["index"], np.arange(9))
    np.testing.assert_array_equal(loaded["class_idx"], np.asarray(direct.class_idx))
    assert "mask" not in loaded  # dense per-pixel inputs are not copied next to the maps
    np.testing.assert_allclose(loaded["gradcam/peak"], loaded["gradcam/maps"].max(axis=(1, 2)))
    assert on_disk["metric_means"]["gradcam/peak"] == pytest.approx(
        loaded["gradcam/peak"].mean())

    # a deleted batch file is recomputed on the next run, nothing else
    (tmp_path / "batch_000001.npz").unlink()
    explain_dataset(model, variables, batches, tmp_path, "gradcam", metrics=metric,
                    progress=False)
    assert len(calls) == 4


def test_explain_dataset_refuses_to_resume_with_another_configuration(tiny, tmp_path):
    model, variables = tiny
    explain_dataset(model, variables, _batches(1), tmp_path, "gradcam", progress=False)
    with pytest.raises(ValueError, match="written with another configuration"):
        explain_dataset(model, variables, _batches(1), tmp_path, "layercam", progress=False)
    # resume=False starts over with the new configuration
    manifest = explain_dataset(model, variables, _batches(1), tmp_path, "layercam",
                               resume=False, progress=False)
    assert manifest["config"]["methods"] == ["layercam"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(methods=[]), "methods is empty"),
        (dict(methods=["gradcam", "gradcam"]), "lists a name twice"),
        (dict(maps_dtype="int8"), "maps_dtype must be"),
        (dict(metrics={"a/b": lambda ex, x: ex.maps}), "must not contain '/'"),
    ],
)
def test_explain_dataset_rejects_bad_arguments_before_any_work(tiny, tmp_path, kwargs, match):
    model, variables = tiny
    kwargs = {"methods": "gradcam", **kwargs}
    with pytest.raises(ValueError, match=match):
        explain_dataset(model, variables, _batches(1), tmp_path, progress=False, **kwargs)
    assert not list(tmp_path.glob("batch_*"))


def test_explain_dataset_names_the_missing_image_entry(tiny, tmp_path):
    model, variables = tiny
    with pytest.raises(ValueError, match="needs an 'image' entry"):
        explain_dataset(model, variables, [{"pixels": np.zeros((1, 32, 32, 3))}], tmp_path,
                        progress=False)


def test_load_explanations_without_a_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="explain_dataset"):
        load_explanations(tmp_path)


# ----------------------------------------------------------------- two processes

PROCESS_WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from jaxcam import distributed
    assert distributed.initialize_distributed()
    import jax
    from jaxcam.dataset_explain import explain_dataset
    from test_compilation import tiny_images, tiny_model, tiny_variables

    model = tiny_model()
    variables = tiny_variables(model)
    x = np.asarray(tiny_images(8))
    rank = jax.process_index()
    # each process feeds its own half of every global batch of 8
    batches = [{"image": x[4 * rank:4 * rank + 4], "index": np.arange(4) + 4 * rank}]
    explain_dataset(model, variables, batches, sys.argv[1], %(methods)r, progress=False)
    print("RESULT " + json.dumps({"processes": jax.process_count(),
                                  "devices": jax.device_count(),
                                  "gloo": jax.config.jax_cpu_collectives_implementation}))
    """
) % {"methods": METHODS}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_localhost_give_the_one_process_rows(tmp_path):
    """2 processes x 2 CPU devices (gloo collectives) write the same explain_dataset
    rows as a single process explaining the whole batch."""
    from test_compilation import tiny_images, tiny_model, tiny_variables

    import jaxcam

    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + " --xla_force_host_platform_device_count=2").strip()
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
        env.update(JAXCAM_COORDINATOR=f"127.0.0.1:{port}", JAXCAM_NUM_PROCESSES="2",
                   JAXCAM_PROCESS_ID=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-c", PROCESS_WORKER, str(tmp_path)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=ROOT))
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, err[-3000:]
        reports.append(json.loads(lines[-1][len("RESULT "):]))
    assert all(r == {"processes": 2, "devices": 4, "gloo": "gloo"} for r in reports)
    loaded = load_explanations(tmp_path)
    model = tiny_model()
    ref = jaxcam.explain(model, tiny_variables(model), np.asarray(tiny_images(8)),
                         method=METHODS)
    order = np.argsort(loaded["index"])
    np.testing.assert_array_equal(loaded["index"][order], np.arange(8))
    for m in METHODS:
        diff = np.abs(loaded[m + "/maps"][order] - np.asarray(ref[m].maps)).max()
        assert diff <= 1e-5, (m, diff)


def test_map_padded_calls_fn_on_one_shape_and_keeps_the_valid_rows():
    a, b = np.arange(7.0), np.arange(7.0)[:, None] * np.ones((7, 2))
    shapes = []

    def fn(x, y):
        shapes.append((x.shape, y.shape))
        return {"sum": x + y[:, 0], "y": y}

    out = distributed.map_padded(fn, (a, b), 3)
    assert shapes == [((3,), (3, 2))] * 3  # 3 + 3 + 1 padded to 3
    np.testing.assert_array_equal(out["sum"], 2 * a)
    np.testing.assert_array_equal(out["y"], b)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        distributed.map_padded(fn, (a, b), 0)


def test_explain_groups_makes_one_call_per_engine_and_layer_and_pins_the_class(tiny,
                                                                               monkeypatch):
    import jaxcam
    import jaxcam.explanation as explanation
    from jaxcam.dataset_explain import explain_groups

    model, variables = tiny
    x = np.asarray(_batches(1)[0]["image"])
    methods = {"G": ("gradcam", "exact", "block3"), "X": ("xgradcam", "exact", "block3"),
               "G++ closed": ("gradcam++", "closed_form", "block3"),
               "G early": ("gradcam", "exact", "block2")}
    real, calls = jaxcam.explain, []
    monkeypatch.setattr(explanation, "explain",
                        lambda *a, **k: calls.append((k["method"], k["layer"])) or real(*a, **k))
    out = explain_groups(model, variables, x, methods)
    assert list(out) == list(methods)
    assert calls == [(["gradcam", "xgradcam"], "block3"), (["gradcam++"], "block3"),
                     (["gradcam"], "block2")]
    for label, (name, derivatives, layer) in methods.items():
        alone = real(model, variables, x, method=name, derivatives=derivatives, layer=layer,
                     class_idx=out["G"].class_idx)
        np.testing.assert_allclose(out[label].maps, alone.maps, atol=1e-6)
        np.testing.assert_array_equal(out[label].class_idx, out["G"].class_idx)
