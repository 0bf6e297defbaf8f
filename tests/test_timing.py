"""jaxcam.timing: the resumable result store, interleaving order, call counts, RSS, workers.

No timing assertions: the tests count calls, compilations and records, never seconds.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcam import timing

KEYS = ("section", "method", "batch")


def test_result_store_reloads_what_was_written_and_replaces_by_key(tmp_path):
    path = tmp_path / "sub" / "results.json"
    store = timing.ResultStore(path, KEYS)
    store.meta["environment"] = {"backend": "cpu"}
    store.add({"section": "a", "method": "m", "batch": 1, "step_s": 1.0})
    store.add({"section": "a", "method": "m", "batch": 2, "step_s": 2.0})
    store.add({"section": "a", "method": "m", "batch": 1, "step_s": 3.0})  # same key: replaced
    again = timing.ResultStore(path, KEYS)
    assert again.records == store.records == [
        {"section": "a", "method": "m", "batch": 2, "step_s": 2.0},
        {"section": "a", "method": "m", "batch": 1, "step_s": 3.0}]
    assert again.meta == {"environment": {"backend": "cpu"}}
    assert again.has(section="a", method="m", batch=1)
    assert not again.has(section="a", method="m", batch=3)
    assert again.get(section="a", method="m", batch=2)["step_s"] == 2.0
    # fields that are not keys do not matter; missing key fields count as None
    assert again.get(section="a", method="m", batch=2, step_s=99.0)["step_s"] == 2.0
    store.add({"section": "b"})
    assert timing.ResultStore(path, KEYS).has(section="b", method=None)
    assert timing.ResultStore(path, KEYS, resume=False).records == []
    assert not path.with_suffix(".json.tmp").exists()  # written atomically, no leftover


def test_result_store_refuses_a_file_that_is_not_a_results_file(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no 'records'.*--no-resume"):
        timing.ResultStore(path, KEYS)


def test_cell_measures_once_then_skips_and_records_errors(tmp_path):
    store = timing.ResultStore(tmp_path / "r.json", KEYS)
    calls, log = [], []
    key = dict(section="s", method="m", batch=4)

    def run():
        calls.append(1)
        return timing.with_throughput({"step_s": 0.5}, 4)

    store.cell(key, run, log.append)
    store.cell(key, run, log.append)
    assert len(calls) == 1
    assert store.records == [{"section": "s", "method": "m", "batch": 4, "step_s": 0.5,
                              "images_per_s": 8.0}]
    assert any(line.startswith("  skip (already measured): section=s method=m batch=4")
               for line in log)

    def broken():
        raise RuntimeError("out of memory")

    store.cell(dict(key, batch=8), broken, log.append)
    assert store.get(**dict(key, batch=8)) == {**dict(key, batch=8),
                                                "error": "RuntimeError: out of memory"}
    assert timing.ResultStore(tmp_path / "r.json", KEYS).records == store.records


def test_measure_interleaved_alternates_the_calls_round_by_round():
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    out = timing.measure_interleaved(calls, reference="b", rounds=3, max_seconds=1e9,
                                     sync=lambda x: x)
    # one compiling call each, then three rounds a, b, c (never a, a, a, b, ...)
    assert order == ["a", "b", "c"] * 4
    assert set(out) == {"a", "b", "c"}
    for row in out.values():
        assert row["repeats"] == 3 and row["interleaved"] and row["reference"] == "b"
    assert out["b"]["ratio_to_reference"] == 1.0
    with pytest.raises(ValueError, match="reference 'z' is not one of the calls"):
        timing.measure_interleaved(calls, reference="z", rounds=1, max_seconds=1.0)


def test_measure_counts_calls_and_compilations():
    n = {"calls": 0}
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)  # a fresh function: compiles once
    x = jnp.arange(7.0)

    def call():
        n["calls"] += 1
        return f(x)

    result = timing.measure(call, repeats=3, max_seconds=1e9)
    assert n["calls"] == 4 and result["repeats"] == 3  # the first call, then 3 steady
    assert result["compiles"] >= 1 and result["recompiles"] == 0
    assert result["step_min_s"] <= result["step_s"]
    assert "step_from_first_call" not in result
    plain = timing.measure(lambda: None, repeats=2, max_seconds=1e9, sync=lambda o: o,
                           track_compiles=False)
    assert plain["repeats"] == 2 and "compile_s" not in plain


def test_block_until_ready_finds_arrays_in_dataclasses_dicts_and_tuples(monkeypatch):
    @dataclasses.dataclass
    class Holder:
        maps: jax.Array
        extra: dict

    a, b, c = jnp.ones(2), jnp.zeros(3), jnp.arange(4)
    seen = []
    monkeypatch.setattr(jax, "block_until_ready", lambda xs: seen.extend(xs))
    out = Holder(a, {"b": b, "rest": (c, "text", 3)})
    assert timing.block_until_ready(out) is out
    assert [id(v) for v in seen] == [id(a), id(b), id(c)]


def test_peak_rss_sees_an_allocation_held_inside_the_block():
    with timing.PeakRSS() as rss:
        block = np.ones(8 * 2**20)  # 64 MiB, touched
    assert rss.delta_mb >= 60
    assert block.sum() == 8 * 2**20


def test_run_worker_returns_the_result_line_and_raises_with_stderr():
    code = ("import json, sys; a = json.loads(sys.argv[1]); print('noise'); "
            "print('RESULT ' + json.dumps({'twice': 2 * a['x']}))")
    wall, out = timing.run_worker(code, {"x": 21})
    assert out == {"twice": 42} and wall > 0
    with pytest.raises(RuntimeError, match=r"worker failed \(3\).*went wrong"):
        timing.run_worker("import sys; sys.stderr.write('went wrong'); sys.exit(3)", {})
    with pytest.raises(RuntimeError, match=r"worker failed \(0\)"):
        timing.run_worker("print('no result')", {})


def test_environment_names_the_versions_and_keeps_extra_fields():
    env = timing.environment(threads=3)
    assert env["jax"] == jax.__version__ and env["backend"] == jax.default_backend()
    assert env["threads"] == 3
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
