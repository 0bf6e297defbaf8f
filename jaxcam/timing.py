"""Measuring JAX calls: wall time after compilation, compile counts, peak memory, and a
resumable JSON store of keyed results (what :mod:`jaxcam.benchmark` is built on).

What :func:`measure` reports, per call it times:

- ``first_call_s``: the first call, tracing + compilation + one run.
- ``compile_s``: the seconds JAX itself reports for tracing and XLA compilation
  during the first call (``jax.monitoring`` events, :class:`CompileCounter`).
- ``step_s``: median wall time of the following calls (at most ``repeats``, fewer
  once ``max_seconds`` of steady-state time is spent), waiting for the result
  (:func:`block_until_ready`). When the first call alone, less its compile time,
  exceeds ``3 * max_seconds``, that one run is the measurement
  (``step_from_first_call: true``).
- ``recompiles``: compilations during the repeated calls (should be 0).
- ``host_peak_mb``: peak resident set size during the measurement (psutil RSS sampled
  every 5 ms by a thread, :class:`PeakRSS`) minus the RSS when it started: the extra
  host memory the call needed. (``ru_maxrss`` is a lifetime maximum, so its deltas
  hide everything below an earlier peak.)
- ``device_peak_mb``: on GPU/TPU, ``peak_bytes_in_use`` of the first device (a
  lifetime peak, JAX cannot reset it); absent on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxcam.compilation import CompileCounter


def block_until_ready(out: Any) -> Any:
    """Wait for every ``jax.Array`` in ``out`` (pytrees, and the dataclasses / dicts /
    lists / NamedTuples that hold arrays, e.g. :class:`jaxcam.Explanation`); returns
    ``out``."""
    import jax

    def arrays(obj: Any) -> list[Any]:
        if isinstance(obj, jax.Array):
            return [obj]
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return [a for f in dataclasses.fields(obj) for a in arrays(getattr(obj, f.name))]
        if isinstance(obj, Mapping):
            return [a for v in obj.values() for a in arrays(v)]
        if isinstance(obj, (list, tuple)):
            return [a for v in obj for a in arrays(v)]
        return []

    jax.block_until_ready(arrays(out))
    return out


class PeakRSS:
    """Peak resident set size of this process while active, sampled by a thread.

    ``with PeakRSS() as rss: ...`` then ``rss.delta_mb`` = ``(peak - start) / 2**20``.
    """

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def device_peak_mb() -> float | None:
    """``peak_bytes_in_use`` of the first local device in MiB; None where the backend
    does not report it (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def measure(
    fn: Callable[[], Any],
    *,
    repeats: int,
    max_seconds: float,
    sync: Callable[[Any], Any] = block_until_ready,
    track_compiles: bool = True,
) -> dict[str, Any]:
    """Time ``fn()``: the first call, then up to ``repeats`` more; the fields are in the
    module docstring. ``sync`` waits for a result (identity for torch, which is
    synchronous on a CPU); ``track_compiles=False`` drops the JAX compile fields."""
    first_counter = CompileCounter()
    steady_counter = CompileCounter()
    steady: list[float] = []
    estimated = False
    with PeakRSS() as rss:
        with first_counter if track_compiles else contextlib.nullcontext():
            t0 = time.perf_counter()
            sync(fn())
            first = time.perf_counter() - t0
        compile_s = first_counter.compile_seconds + first_counter.trace_seconds
        if first - compile_s > 3 * max_seconds > 0:
            # A very slow call (Score-CAM at 224 px, taylor on a CPU): one run is the
            # measurement; its time is the first call minus JAX's compile time.
            steady.append(first - compile_s)
            estimated = True
        with steady_counter if track_compiles else contextlib.nullcontext():
            for _ in range(0 if estimated else max(1, repeats)):
                t0 = time.perf_counter()
                sync(fn())
                steady.append(time.perf_counter() - t0)
                if sum(steady) >= max_seconds:
                    break
    result: dict[str, Any] = {
        "first_call_s": first,
        "step_s": statistics.median(steady),
        "step_min_s": min(steady),
        "repeats": len(steady),
        "host_peak_mb": rss.delta_mb,
    }
    if estimated:
        result["step_from_first_call"] = True
    if track_compiles:
        result["compile_s"] = compile_s
        result["compiles"] = first_counter.compiles
        result["cache_hits"] = first_counter.cache_hits  # loaded from the persistent cache
        result["recompiles"] = steady_counter.compiles
    device_peak = device_peak_mb()
    if device_peak is not None:
        result["device_peak_mb"] = device_peak
    return result


def measure_interleaved(
    calls: Mapping[str, Callable[[], Any]], *, reference: str, rounds: int, max_seconds: float,
    sync: Callable[[Any], Any] = block_until_ready,
) -> dict[str, dict[str, Any]]:
    """Time several calls in alternation: round r runs each call once, in order.

    Every call is compiled (called once) first. On a busy machine the load drifts
    between calls measured minutes apart; alternating exposes them to the same
    load, and the ratio of each call to ``reference`` is taken per round
    (``ratio_to_reference``: the median over rounds), so the ratios survive
    contention much better than the times. Stops after the round in which the
    steady-state time spent reaches ``max_seconds * len(calls)``.
    """
    if reference not in calls:
        raise ValueError(f"reference {reference!r} is not one of the calls {list(calls)}.")
    out: dict[str, dict[str, Any]] = {}
    for label, fn in calls.items():  # compile everything first
        with CompileCounter() as counter:
            t0 = time.perf_counter()
            sync(fn())
            out[label] = {"first_call_s": time.perf_counter() - t0,
                          "compile_s": counter.compile_seconds + counter.trace_seconds,
                          "compiles": counter.compiles}
    times: dict[str, list[float]] = {label: [] for label in calls}
    with CompileCounter() as steady:
        spent = 0.0
        for _ in range(rounds):
            for label, fn in calls.items():
                t0 = time.perf_counter()
                sync(fn())
                times[label].append(time.perf_counter() - t0)
                spent += times[label][-1]
            if spent >= max_seconds * len(calls):
                break
    for label in calls:
        ratios = [t / r for t, r in zip(times[label], times[reference], strict=True)]
        out[label].update(
            step_s=statistics.median(times[label]), step_min_s=min(times[label]),
            repeats=len(times[label]), ratio_to_reference=statistics.median(ratios),
            reference=reference, interleaved=True, recompiles=steady.compiles,
            host_peak_mb=0.0,
        )
    return out


def with_throughput(result: dict[str, Any], batch: int) -> dict[str, Any]:
    """Adds ``images_per_s = batch / step_s`` to ``result`` (in place) and returns it."""
    result["images_per_s"] = batch / result["step_s"]
    return result


class ResultStore:
    """Records (dicts) in a JSON file ``{"meta": ..., "records": [...]}``, rewritten
    atomically after each new record, so an interrupted run resumes where it stopped.

    A record's identity is the values of ``key_fields`` (missing fields count as None):
    :meth:`add` replaces a record with the same key. ``resume=False`` starts empty
    (the file is overwritten at the first save).
    """

    def __init__(self, path: str | os.PathLike, key_fields: Sequence[str],
                 resume: bool = True) -> None:
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self.records: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        if resume and self.path.exists():
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or "records" not in data:
                raise ValueError(
                    f"{self.path} is not a benchmark results file (no 'records'); "
                    "choose another --out or pass --no-resume to overwrite it."
                )
            self.records = list(data["records"])
            self.meta = dict(data.get("meta", {}))
        self._keys = {self._key(r) for r in self.records}

    def _key(self, record: Mapping[str, Any]) -> str:
        return json.dumps([record.get(k) for k in self.key_fields])

    def has(self, **key: Any) -> bool:
        return self._key(key) in self._keys

    def get(self, **key: Any) -> dict[str, Any] | None:
        k = self._key(key)
        return next((r for r in self.records if self._key(r) == k), None)

    def add(self, record: dict[str, Any]) -> None:
        k = self._key(record)
        self.records = [r for r in self.records if self._key(r) != k] + [record]
        self._keys.add(k)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "records": self.records}, indent=1))
        os.replace(tmp, self.path)

    def cell(self, key: dict[str, Any], run: Callable[[], dict[str, Any]],
             log: Callable[[str], None] | None = None) -> None:
        """Record ``{key fields, **run()}`` unless a record with ``key`` is stored; an
        exception in ``run`` is recorded as ``{"error": ...}`` (a broken cell must not
        lose the rest of a long run)."""
        log = log or (lambda msg: print(msg, flush=True))
        label = " ".join(f"{k}={v}" for k, v in key.items() if v is not None)
        if self.has(**key):
            log(f"  skip (already measured): {label}")
            return
        log(f"  measuring {label} ...")
        t0 = time.perf_counter()
        try:
            result = run()
        except Exception as err:
            result = {"error": f"{type(err).__name__}: {err}"[:500]}
            log(f"    ERROR {result['error']}")
        record = {**{k: key.get(k) for k in self.key_fields}, **result}
        self.add(record)
        if "images_per_s" in record:
            log(f"    {record['images_per_s']:.3g} images/s, step {record['step_s']:.3g} s, "
                f"first call {record.get('first_call_s', float('nan')):.3g} s "
                f"({time.perf_counter() - t0:.0f} s for the cell)")


def environment(**extra: Any) -> dict[str, Any]:
    """Versions and hardware a measurement ran on (jax, backend, devices, CPU, Python;
    torch and grad-cam when installed), plus ``extra``."""
    import importlib.metadata

    import jax

    env = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.local_devices()],
        "device_kind": jax.local_devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        **extra,
    }
    for name in ("torch", "grad-cam"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[name] = importlib.metadata.version(name)
    return env


RESULT_PREFIX = "RESULT "


def run_worker(code: str, payload: Any, env: Mapping[str, str] | None = None,
               cwd: str | None = None) -> tuple[float, Any]:
    """Run ``python -c code json(payload)`` in a fresh process; returns (wall seconds of
    the whole process, the JSON it printed on its last line starting with ``RESULT ``).
    RuntimeError with the end of stderr when the process fails or prints no result."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)],
                          capture_output=True, text=True, env=None if env is None else dict(env),
                          cwd=cwd)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-600:]}")
    return wall, json.loads(lines[-1][len(RESULT_PREFIX):])
