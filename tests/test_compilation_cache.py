"""The persistent compilation cache (jaxcam.compilation): where it lives, that a second
process compiles nothing, concurrent processes, damaged and read-only caches.

Counts come from JAX's own ``jax.monitoring`` events (``CompileCounter``): an
executable JAX builds records ``backend_compile_duration``; one loaded from the
persistent cache records ``/jax/compilation_cache/cache_hits`` too. Each process
is a fresh ``python -c`` worker that explains a tiny CNN (tests/test_compilation.py)
with Grad-CAM and exact Grad-CAM++ and reports its counts, its maps and the
warnings it printed.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcam
from jaxcam import compilation
from jaxcam.compilation import CompileCounter

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import hashlib, json, sys, warnings
warnings.simplefilter("always")
import jaxcam
from jaxcam.compilation import CompileCounter
directory = jaxcam.enable_compilation_cache()  # JAXCAM_COMPILATION_CACHE from the test
import jax, numpy as np
from tests.test_compilation import tiny_images, tiny_model, tiny_variables
model = tiny_model()
with CompileCounter() as counter:
    variables = tiny_variables(model)
    out = jaxcam.explain(model, variables, tiny_images(2), method=["gradcam", "gradcam++"])
    maps = {m: np.asarray(jax.block_until_ready(e.maps)) for m, e in out.items()}
print("RESULT " + json.dumps({
    "directory": None if directory is None else str(directory),
    "compiles": counter.compiles, "cache_hits": counter.cache_hits,
    "xla_compiles": counter.xla_compiles,
    "maps": {m: hashlib.sha256(v.tobytes()).hexdigest() for m, v in maps.items()},
}))
"""


def _drop_dac_override() -> None:
    """preexec_fn: the child loses root's CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so
    permission bits (a chmod 0o555 directory) apply to it as to any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_worker(cache, cwd: Path, *, env_extra=None, background=False):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env[compilation.ENV_VAR] = str(cache)
    env.update(env_extra or {})
    preexec = _drop_dac_override if os.geteuid() == 0 else None
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            preexec_fn=preexec)
    return proc if background else finish(proc)


def finish(proc) -> tuple[dict, list[str]]:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))[7:])
    cache_lines = [ln for ln in stderr.splitlines() if "ompilation cache" in ln]
    return result, cache_lines


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob(f"*{compilation.ENTRY_SUFFIX}"))


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cache filled by one process: (directory, that process's result)."""
    cache = tmp_path_factory.mktemp("cache") / "xla"
    cwd = tmp_path_factory.mktemp("cwd")
    result, lines = run_worker(cache, cwd)
    assert lines == [] and list(cwd.iterdir()) == []  # nothing written to the cwd
    return cache, result


# ------------------------------------------------------------------------- where it lives


def test_cache_directory_rules(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation.ENV_VAR, raising=False)
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.resolve_cache_dir() == tmp_path / "xdg" / "jaxcam" / "xla"
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))  # the user's own
    try:
        assert compilation.resolve_cache_dir() == tmp_path / "jax"
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # ignored, as XDG requires
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation.resolve_cache_dir() == tmp_path / "home" / ".cache" / "jaxcam" / "xla"
    monkeypatch.setenv(compilation.ENV_VAR, str(tmp_path / "env"))
    assert compilation.resolve_cache_dir() == tmp_path / "env"
    assert compilation.resolve_cache_dir(tmp_path / "flag") == tmp_path / "flag"  # flag wins
    for off in ("off", "OFF", "none", "0", "false"):
        assert compilation.resolve_cache_dir(off) is None
        monkeypatch.setenv(compilation.ENV_VAR, off)
        assert compilation.resolve_cache_dir() is None
    # a relative flag is made absolute once, so a later chdir does not move the cache
    monkeypatch.chdir(tmp_path)
    assert compilation.resolve_cache_dir("rel") == tmp_path / "rel"


def test_the_default_is_never_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    default = compilation.default_cache_dir()
    assert default is not None and default.is_absolute()
    assert tmp_path not in default.parents
    assert default.parts[-3:] == (".cache", "jaxcam", "xla")


def test_the_cli_and_every_experiment_enable_the_cache_before_working(
        monkeypatch, tmp_path, capsys):
    """Each entry point turns the cache on (its --compilation-cache value, else the
    default rules) before any work: recorded by replacing the helper."""
    from experiments import aptos2019, derivatives, ham10000, localization
    from jaxcam import benchmark, cli

    assert jaxcam.enable_compilation_cache is compilation.enable_compilation_cache
    calls = []
    monkeypatch.setattr(compilation, "enable_compilation_cache", lambda p=None: calls.append(p))
    monkeypatch.setattr(benchmark, "run_benchmark", lambda config: calls.append("ran"))
    monkeypatch.setattr(benchmark, "render_markdown", lambda store: "")
    monkeypatch.setattr(derivatives, "run", lambda config: calls.append("ran"))
    flag = ["--compilation-cache", str(tmp_path / "c")]
    bad = ["--epochs", "0", "--out", str(tmp_path / "o")]  # fails in validation
    for main in (ham10000.main, aptos2019.main):
        assert main([*bad, *flag]) == 2
    with pytest.raises(SystemExit):
        localization.main(["--num-images", "0", "--out", str(tmp_path / "o"), *flag])
    benchmark.main(["--out", str(tmp_path / "b.json"), *flag])
    derivatives.main(["--out", str(tmp_path / "d"), *flag])
    with pytest.raises(SystemExit):
        cli.main(["explain", str(tmp_path / "none.jpg"), "--weights", "x", *flag])
    with pytest.raises(SystemExit):  # the option also goes before the command
        cli.main([*flag, "explain", str(tmp_path / "none.jpg"), "--weights", "x"])
    want = str(tmp_path / "c")
    assert calls == [want, want, want, want, "ran", want, "ran", want, want], calls
    calls.clear()
    assert ham10000.main(bad) == 2  # no flag: the default rules (None)
    assert calls == [None]
    capsys.readouterr()


# ------------------------------------------------------------------------- two processes


def test_a_second_process_compiles_nothing_and_gets_the_same_maps(warm, tmp_path):
    cache, first = warm
    assert first["directory"] == str(cache)
    # (a program that two jit objects compile identically is a hit already in the first)
    assert first["xla_compiles"] > 0 and first["cache_hits"] < first["compiles"]
    # every program the first process compiled is on disk, one entry each
    assert len(entries(cache)) == first["xla_compiles"]
    second, lines = run_worker(cache, tmp_path)
    assert lines == []
    assert second["xla_compiles"] == 0, second
    assert second["cache_hits"] == second["compiles"] == first["compiles"]
    assert second["maps"] == first["maps"]  # the same executables: bit-identical maps


def test_concurrent_processes_on_an_empty_cache_then_a_third_compiles_nothing(tmp_path):
    cache = tmp_path / "xla"
    procs = [run_worker(cache, tmp_path, background=True) for _ in range(3)]
    results = [finish(p) for p in procs]
    assert all(lines == [] for _, lines in results)  # no damaged or partial entries read
    assert len({json.dumps(r["maps"]) for r, _ in results}) == 1
    assert not list(cache.glob(".*.tmp"))  # every writer renamed its temporary file
    third, lines = run_worker(cache, tmp_path)
    assert lines == [] and third["xla_compiles"] == 0
    assert third["maps"] == results[0][0]["maps"]


# ------------------------------------------------------------------------- degraded caches


def test_damaged_entries_give_one_warning_line_compile_and_heal(warm, tmp_path):
    _, clean = warm
    # entries are damaged in place: JAX keys them with the cache directory's path (it
    # puts the path in the compile options), so copies elsewhere would never be read
    cache = tmp_path / "xla"
    run_worker(cache, tmp_path)
    for i, f in enumerate(entries(cache)):  # truncated, overwritten, emptied
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2] if i % 3 == 0 else (b"\0" * 64 if i % 3 else b""))
    result, lines = run_worker(cache, tmp_path)
    assert len(lines) == 1 and "damaged compilation cache entry" in lines[0], lines
    # everything compiled again, as in the first process of a clean cache
    assert (result["xla_compiles"], result["cache_hits"]) == (clean["xla_compiles"],
                                                               clean["cache_hits"])
    assert result["maps"] == clean["maps"]
    healed, lines = run_worker(cache, tmp_path)
    assert lines == [] and healed["xla_compiles"] == 0 and healed["maps"] == clean["maps"]


def test_a_read_only_cache_is_reused_with_one_warning_line_and_not_written(warm, tmp_path):
    _, clean = warm
    populated, empty = tmp_path / "populated", tmp_path / "empty"
    run_worker(populated, tmp_path)
    empty.mkdir()
    before = sorted(p.name for p in populated.iterdir())
    for d in (populated, empty):
        d.chmod(0o555)
    try:
        reused, lines = run_worker(populated, tmp_path)
        assert len(lines) == 1 and "is read-only" in lines[0], lines
        assert reused["xla_compiles"] == 0 and reused["maps"] == clean["maps"]
        compiled, lines = run_worker(empty, tmp_path)
        assert len(lines) == 1 and "is read-only" in lines[0], lines
        # nothing can be written, so nothing is a hit: every program compiled
        assert compiled["xla_compiles"] == compiled["compiles"] == clean["compiles"]
        assert compiled["maps"] == clean["maps"]
    finally:
        for d in (populated, empty):
            d.chmod(0o755)
    assert sorted(p.name for p in populated.iterdir()) == before and not list(empty.iterdir())


def test_a_cache_path_that_is_a_file_compiles_with_one_warning_line(warm, tmp_path):
    _, clean = warm
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    result, lines = run_worker(blocker, tmp_path)
    assert len(lines) == 1 and "cannot create the compilation cache directory" in lines[0]
    assert result["directory"] is None and result["maps"] == clean["maps"]
    result, lines = run_worker(blocker / "sub", tmp_path)
    assert len(lines) == 1 and result["directory"] is None
    assert blocker.read_text() == "x"


def test_off_writes_nothing(tmp_path):
    result, lines = run_worker("off", tmp_path, env_extra={"XDG_CACHE_HOME": str(tmp_path)})
    assert lines == [] and result["directory"] is None and result["cache_hits"] == 0
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- entry format


def test_entries_carry_their_length_and_checksum():
    value = os.urandom(1000)
    data = compilation._entry_bytes(value)
    assert compilation._entry_value(data) == value
    assert compilation._entry_value(data[:-1]) is None  # truncated
    flipped = bytearray(data)
    flipped[-10] ^= 1
    assert compilation._entry_value(bytes(flipped)) is None  # one bit
    assert compilation._entry_value(b"") is None
    assert compilation._entry_value(data + b"x") is None


def test_in_process_enable_switches_directory_and_off(tmp_path, monkeypatch):
    """In this process: entries go to the directory in use; 'off' stops writing."""
    f = jax.jit(lambda x: jnp.tanh(x) * 7.0 + 1.25)
    x = np.arange(5.0, dtype=np.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert jaxcam.enable_compilation_cache(tmp_path / "a") == tmp_path / "a"
        with CompileCounter() as c:
            jax.block_until_ready(f(x))
        assert c.compiles == 1 and len(entries(tmp_path / "a")) >= 1
        assert compilation.compilation_cache_dir() == tmp_path / "a"
        written = len(entries(tmp_path / "a"))
        assert jaxcam.enable_compilation_cache("off") is None
        g = jax.jit(lambda x: jnp.cos(x) - 3.5)
        with CompileCounter() as c:
            jax.block_until_ready(g(x))
        assert c.compiles == 1 and c.cache_hits == 0
        assert len(entries(tmp_path / "a")) == written  # nothing written once off
        # the directory jaxcam configured is not later taken for one the user gave JAX
        monkeypatch.delenv(compilation.ENV_VAR)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert compilation.resolve_cache_dir() == tmp_path / "xdg" / "jaxcam" / "xla"
    finally:
        compilation.disable_compilation_cache()
    assert compilation.compilation_cache_dir() is None


def test_compile_counter_attributes_each_program_to_the_cache_or_xla(tmp_path):
    try:
        compilation.enable_compilation_cache(tmp_path)
        f = jax.jit(lambda x: jnp.sin(x) * 2.0 + 0.125)
        x = np.arange(9.0, dtype=np.float32)
        with CompileCounter() as first:
            jax.block_until_ready(f(x))
        f2 = jax.jit(lambda x: jnp.sin(x) * 2.0 + 0.125)  # same program, new jit object
        with CompileCounter() as second:
            jax.block_until_ready(f2(x))
    finally:
        compilation.disable_compilation_cache()
    assert (first.compiles, first.cache_hits, first.xla_compiles) == (1, 0, 1)
    assert (second.compiles, second.cache_hits, second.xla_compiles) == (1, 1, 0)
    assert [p[2] for p in first.programs] == [False] and [p[2] for p in second.programs] == [True]
