"""The benchmark's first-call section (jaxcam.benchmark --only first-call), small.

No timing assertions (the machine is shared): every cell ran in its own process
without error, the cold-cache run filled the cache that the warm-cache run then
used, the second image in one process compiled nothing, the same ``explain`` call
again compiled nothing, and the table and goal lines report ratios of numbers
measured in the same run.
"""

from __future__ import annotations

import math

import pytest

from jaxcam import benchmark as bm
from jaxcam.benchmark import first_call as first_call_section
from jaxcam.report import number

pytestmark = pytest.mark.skipif(not bm.torch_available()[0],
                                reason="the section compares with pytorch-grad-cam")


@pytest.fixture(scope="module")
def first_call(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "first_call.json"
    config = bm.BenchmarkConfig.first_call_smoke(str(out))
    return config, bm.run_benchmark(config)


def _record(store, impl, cell):
    return next(r for r in store.records if r["impl"] == impl and r.get("cell") == cell)


@pytest.mark.slow
def test_every_first_call_cell_is_measured_in_the_same_run(first_call):
    config, store = first_call
    assert not [r for r in store.records if "error" in r]
    cells = {(r["impl"], r["cell"]) for r in store.records}
    assert cells == {("jaxcam", "cold-cache"), ("jaxcam", "warm-cache"), ("jaxcam", "in-process"),
                     ("pytorch-grad-cam", "process"), ("pytorch-grad-cam", "in-process"),
                     ("jaxcam", "compiles")}
    for r in store.records:
        assert r["section"] == "first_call" and r["arch"] == "resnet50"
        assert r["image_size"] == config.first_call_image_size
        assert math.isfinite(r["wall_s"]) and r["wall_s"] > 0
        if r["cell"] != "compiles":
            assert r["repeats"] == len(r["wall_all_s"]) == config.first_call_repeats
    # the cold run compiled into its (fresh) cache; the in-process second image compiled none
    assert _record(store, "jaxcam", "cold-cache")["programs_cached"] > 0
    inproc = _record(store, "jaxcam", "in-process")
    assert inproc["second_call_compiles"] == 0
    assert inproc["first_call_in_process_s"] > inproc["wall_s"]  # the first paid compiling


@pytest.mark.slow
def test_what_explain_compiles_is_counted_step_by_step(first_call):
    _, store = first_call
    steps = {s["step"]: s for s in _record(store, "jaxcam", "compiles")["steps"]}
    assert steps["one method"]["compiles"] >= 1
    assert steps["the same call again, new image"]["compiles"] == 0
    assert steps["one method, second image size"]["compiles"] >= 1
    for s in steps.values():
        assert len(s["programs"]) == s["compiles"]
        assert sum(p[1] for p in s["programs"]) == pytest.approx(s["compile_s"])


@pytest.mark.slow
def test_first_call_table_and_goals_use_ratios_from_the_same_run(first_call):
    _, store = first_call
    text = bm.render_markdown(store)
    assert "### First call: one image, whole command, fresh processes" in text
    assert "### What `jaxcam.explain` compiles" in text
    cold = _record(store, "jaxcam", "cold-cache")["wall_s"]
    pgc = _record(store, "pytorch-grad-cam", "process")["wall_s"]
    assert f"{number(cold / pgc)}x" in text
    goals = bm.goal_lines(store)
    assert any(g.startswith(f"resnet50 gradcam first call, cold-cache: {cold / pgc:.2f}x")
               for g in goals)
    assert any("second image in the same process: 0 compilations (goal 0: met)" in g
               for g in goals)


@pytest.mark.slow
def test_a_second_run_on_the_same_file_measures_nothing(first_call, monkeypatch):
    config, store = first_call
    monkeypatch.setattr(first_call_section, "_run_cli", lambda *a: pytest.fail("measured again"))
    monkeypatch.setattr(first_call_section, "_run_worker", lambda *a: pytest.fail("measured again"))
    again = bm.run_benchmark(config)
    assert len(again.records) == len(store.records)


def test_bad_first_call_options_exit_2_before_any_work(capsys, tmp_path):
    for argv, message in ((["--first-call-methods", "scorecam"], "--first-call-methods"),
                          (["--first-call-archs", "vit"], "--first-call-archs"),
                          (["--first-call-repeats", "0"], "--first-call-repeats")):
        assert bm.main(["--only", "first-call", "--out", str(tmp_path / "x.json"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
