"""The benchmark's markdown report: one table per section, and the goals.
"""

from __future__ import annotations

from typing import Any

from jaxcam import report
from jaxcam.benchmark.config import (
    KEY_FIELDS,
    ResultStore,
)
from jaxcam.report import number as _fmt

# --------------------------------------------------------------------------- report


def _ok(r: dict | None) -> bool:
    return bool(r) and "step_s" in r


def _flat(agree: dict) -> str:
    """A note beside ``max abs diff`` when pytorch-grad-cam's maps were flat (its
    normalisation eps 1e-7 above the raw map, :func:`sections._agreement`)."""
    peak = agree.get("reference_peak_min")
    return f" (pgc map flat, peak {_fmt(peak)})" if peak is not None and peak < 0.5 else ""


def render_markdown(store: ResultStore) -> str:
    """Markdown tables of every record in the store, one per section, plus the goals."""
    recs = store.records
    out: list[str] = []
    meta = store.meta.get("environment", {})
    if meta:
        out.append(
            f"Environment: {meta.get('backend')} ({meta.get('device_kind')}), "
            f"{meta.get('cpu_count')} CPU cores, jax {meta.get('jax')}, "
            f"torch {meta.get('torch', '-')}, grad-cam {meta.get('grad-cam', '-')}, "
            f"{meta.get('threads')} threads.\n"
        )

    def find(**key: Any) -> dict | None:
        return store.get(**{k: key.get(k) for k in KEY_FIELDS})

    fwd = [r for r in recs if r["section"] == "forward"]
    if fwd:
        out += ["### Eval-mode forward pass (`model.apply`, jit)", "",
                "| arch | image | batch | jaxcam s/batch | jaxcam images/s | compile s | "
                "torch s/batch | torch images/s | jaxcam / torch time |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in fwd:
            t = find(**dict(r, section="torch", impl="torch"))
            ratio = r["step_s"] / t["step_s"] if _ok(r) and _ok(t) else None
            out.append(
                f"| {r['arch']} | {r['image_size']} | {r['batch']} | {_fmt(r.get('step_s'))} | "
                f"{_fmt(r.get('images_per_s'))} | {_fmt(r.get('compile_s'))} | "
                f"{_fmt(t.get('step_s') if t else None)} | "
                f"{_fmt(t.get('images_per_s') if t else None)} | {_fmt(ratio)} |"
            )
        out.append("")

    meth = [r for r in recs if r["section"] == "methods"]
    if meth:
        dev = any("device_peak_mb" in r for r in meth)
        out += ["### CAM methods (`jaxcam.explain`) vs pytorch-grad-cam, same weights and inputs",
                "",
                "| arch | image | batch | method | jaxcam images/s | s/batch | compile s | "
                "recompiles | host peak MB |" + (" device peak MB |" if dev else "")
                + " / forward | pytorch-grad-cam images/s | speed-up | max abs diff |",
                "|---|---|---|---|---|---|---|---|---|" + ("---|" if dev else "")
                + "---|---|---|---|"]
        for r in meth:
            if not _ok(r):
                note = r.get("skipped") or r.get("error", "")
                out.append(f"| {r['arch']} | {r['image_size']} | {r['batch']} | {r['method']} | "
                           f"n/a: {note[:80]} |" + " |" * (9 if dev else 8))
                continue
            f = find(**dict(r, section="forward", method="apply"))
            t = find(**dict(r, section="torch", impl="pytorch-grad-cam"))
            agree = (t or {}).get("agreement", {}) if t else {}
            out.append(
                f"| {r['arch']} | {r['image_size']} | {r['batch']} | {r['method']} | "
                f"{_fmt(r['images_per_s'])} | {_fmt(r['step_s'])} | {_fmt(r.get('compile_s'))} | "
                f"{r.get('recompiles', '-')} | {_fmt(r.get('host_peak_mb'))} |"
                + (f" {_fmt(r.get('device_peak_mb'))} |" if dev else "")
                + f" {_fmt(r['step_s'] / f['step_s'] if _ok(f) else None)} | "
                f"{_fmt(t['images_per_s'] if _ok(t) else None)} | "
                f"{_fmt(r['images_per_s'] / t['images_per_s'] if _ok(t) else None)} | "
                f"{_fmt(agree.get('max_abs_diff'))}{_flat(agree)} |"
            )
        out.append("")

    eng = [r for r in recs if r["section"] == "engine"]
    if eng:
        out += ["### Derivative engines alone (default layer, `exp` target)", "",
                "| engine | arch | image | batch | coordinates / image | s/batch | s/image "
                "| compile s |",
                "|---|---|---|---|---|---|---|---|"]
        for r in eng:
            if not _ok(r):
                out.append(f"| {r['method']} | {r['arch']} | {r['image_size']} | {r['batch']} | "
                           f"n/a: {(r.get('skipped') or r.get('error', ''))[:80]} | | | |")
                continue
            out.append(
                f"| {r['method']} | {r['arch']} | {r['image_size']} | {r['batch']} | "
                f"{r.get('coordinates_per_image', '-')} | {_fmt(r['step_s'])} | "
                f"{_fmt(r['step_s'] / r['batch'])} | {_fmt(r.get('compile_s'))} |"
            )
        out.append("")
    ratio = [r for r in recs if r["section"] == "engine_ratio"]
    if ratio:
        out += ["### Grad-CAM++ and the forward pass as ratios to Grad-CAM (calls interleaved)",
                "", "| arch | image | batch | classes | Grad-CAM s | `model.apply` | "
                "closed-form Grad-CAM++ | exact Grad-CAM++ (factored) |",
                "|---|---|---|---|---|---|---|---|"]
        for c in sorted({r["num_classes"] for r in ratio}, reverse=True):
            row = {r["method"]: r for r in ratio if r["num_classes"] == c}
            g = row.get("gradcam")
            if not _ok(g):
                continue
            rel = {m: _fmt(_ratio(row.get(m), g)) + "x" if _ratio(row.get(m), g) else "-"
                   for m in ("apply", "gradcam++_closed", "gradcam++_exact")}
            out.append(f"| {g['arch']} | {g['image_size']} | {g['batch']} | {c} | "
                       f"{_fmt(g['step_s'])} | {rel['apply']} | {rel['gradcam++_closed']} | "
                       f"{rel['gradcam++_exact']} |")
        out.append("")

    met = [r for r in recs if r["section"] == "metrics"]
    if met:
        out += ["### Metrics (`jaxcam.metrics`, defaults)", "", *report.table(
            ["metric", "arch", "image", "batch", "images/s", "s/batch", "compile s"],
            ([r["method"], r["arch"], r["image_size"], r["batch"], _fmt(r.get("images_per_s")),
              _fmt(r.get("step_s")), _fmt(r.get("compile_s"))] for r in met)), ""]

    sc = [r for r in recs if r["section"] == "scaling"]
    if sc:
        def vs_one(r):
            one = find(**dict(r, devices=1))
            return r["images_per_s"] / one["images_per_s"] if _ok(r) and _ok(one) else None

        out += ["### Data-parallel sharding over forced host devices", "", *report.table(
            ["call", "arch", "image", "batch", "devices", "images/s", "vs 1 device"],
            ([r["method"], r["arch"], r["image_size"], r["batch"], r["devices"],
              _fmt(r.get("images_per_s")), _fmt(vs_one(r))]
             for r in sorted(sc, key=lambda r: (r["method"], r["devices"])))), ""]

    vit = [r for r in recs if r["section"] == "vit"]
    if vit:
        out += ["### ViT: exact Grad-CAM++ through the head (one image)", "", *report.table(
            ["method", "arch", "image", "s/image", "compile s", "coordinates",
             "s/coordinate"],
            ([r["method"], r["arch"], r["image_size"], _fmt(r.get("step_s")),
              _fmt(r.get("compile_s")), r.get("coordinates", "-"),
              _fmt(r.get("seconds_per_coordinate"))] for r in vit)), ""]

    adapter = [r for r in recs if r["section"] == "adapter"]
    if adapter:
        out += ["### Adapter: `from_linen(ResNet-50 module)` / the native model (one image)",
                "", *report.table(
                    ["method", "image", "adapter s", "native s", "adapter / native",
                     "GFLOP adapter / native", "max abs diff"],
                    ([r["method"], r["image_size"], _fmt(r.get("step_s")),
                      _fmt(r.get("native_step_s")), _fmt(r.get("ratio_to_native")),
                      f"{(r.get('flops_adapter') or 0) / 1e9:.3f} / "
                      f"{(r.get('flops_native') or 0) / 1e9:.3f}",
                      _fmt(r.get("max_abs_diff"))] for r in adapter)), ""]

    out += first_call_tables(store)
    goals = goal_lines(store)
    if goals:
        out += ["### Goals (issues 10, 18)", ""] + [f"- {g}" for g in goals] + [""]
    return "\n".join(out)


def _first_call(store: ResultStore, r: dict[str, Any], impl: str, cell: str) -> dict | None:
    found = _lookup(store, r, impl=impl, cell=cell)
    return found if found and "wall_s" in found else None


def first_call_tables(store: ResultStore) -> list[str]:
    """The first-call table (seconds and ratios to pytorch-grad-cam) and what compiles."""
    rows = [r for r in store.records if r["section"] == "first_call"
            and r["impl"] == "jaxcam" and r.get("cell") == "cold-cache"]
    out: list[str] = []
    if rows:
        out += ["### First call: one image, whole command, fresh processes", "",
                "| arch | image | method | jaxcam cold cache s | jaxcam warm cache s | "
                "pytorch-grad-cam process s | cold / pgc | warm / pgc | jaxcam in-process "
                "2nd image s | pgc in-process 2nd image s | in-process / pgc | "
                "programs cached |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cold = _first_call(store, r, "jaxcam", "cold-cache")
            warm = _first_call(store, r, "jaxcam", "warm-cache")
            inproc = _first_call(store, r, "jaxcam", "in-process")
            pgc = _first_call(store, r, "pytorch-grad-cam", "process")
            pgc_in = _first_call(store, r, "pytorch-grad-cam", "in-process")

            def s_(rec):
                return _fmt(rec["wall_s"]) if rec else "-"

            def ratio(a, b):
                return _fmt(a["wall_s"] / b["wall_s"]) + "x" if a and b else "-"

            out.append(f"| {r['arch']} | {r['image_size']} | {r['method']} | {s_(cold)} | "
                       f"{s_(warm)} | {s_(pgc)} | {ratio(cold, pgc)} | {ratio(warm, pgc)} | "
                       f"{s_(inproc)} | {s_(pgc_in)} | {ratio(inproc, pgc_in)} | "
                       f"{(cold or {}).get('programs_cached', '-')} |")
        out.append("")
    comp = [r for r in store.records if r["section"] == "first_call" and r.get("cell") ==
            "compiles" and "steps" in r]
    if comp:
        out += ["### What `jaxcam.explain` compiles (one image, in one process, no cache)", "",
                "| arch | step | image | compilations | compile s | traces | trace s | "
                "slowest programs (s) |", "|---|---|---|---|---|---|---|---|"]
        for r in comp:
            for st in r["steps"]:
                top = ", ".join(f"{name} {sec:.2f}" for name, sec, _ in st["programs"][:3])
                out.append(f"| {r['arch']} | {st['step']} | {st['image_size']} | "
                           f"{st['compiles']} | {_fmt(st['compile_s'])} | {st['traces']} | "
                           f"{_fmt(st['trace_s'])} | {top} |")
        out.append("")
    return out


def _ratio(record: dict | None, reference: dict | None) -> float | None:
    """``record``'s time over ``reference``'s: the paired per-round median when the
    two were measured interleaved, else the ratio of their medians."""
    if not (_ok(record) and _ok(reference)):
        return None
    if "ratio_to_reference" in record and record.get("reference") == reference["method"]:
        return record["ratio_to_reference"]
    return record["step_s"] / reference["step_s"]


def _lookup(store: ResultStore, record: dict[str, Any], **change: Any) -> dict | None:
    """The record whose key equals ``record``'s with the fields in ``change`` replaced."""
    return store.get(**{k: change.get(k, record.get(k)) for k in KEY_FIELDS})


def goal_lines(store: ResultStore) -> list[str]:
    """One line per issue-10 goal that the store has the numbers for: measured vs target."""
    lines = []
    for r in store.records:
        if r["section"] == "first_call" and r["impl"] == "jaxcam" and r.get("cell") in (
                "cold-cache", "warm-cache") and "wall_s" in r:
            pgc = _first_call(store, r, "pytorch-grad-cam", "process")
            if pgc:
                v, target = r["wall_s"] / pgc["wall_s"], 1.3 if r["cell"] == "cold-cache" else 1.0
                lines.append(f"{r['arch']} {r['method']} first call, {r['cell']}: {v:.2f}x the "
                             f"pytorch-grad-cam script (goal <= {target}x: "
                             f"{'met' if v <= target else 'missed'})")
        if r["section"] == "first_call" and r.get("cell") == "in-process" and r[
                "impl"] == "jaxcam" and "second_call_compiles" in r:
            n = r["second_call_compiles"]
            lines.append(f"{r['arch']} {r['method']} second image in the same process: {n} "
                         f"compilations (goal 0: {'met' if n == 0 else 'missed'})")
    ratio = [r for r in store.records if r["section"] == "engine_ratio" and _ok(r)]
    for c, target in ((1000, 1.3), (7, 1.1)):
        row = {r["method"]: r for r in ratio if r["num_classes"] == c}
        g, e, f = row.get("gradcam"), row.get("gradcam++_exact"), row.get("apply")
        v = _ratio(e, g)
        if v is not None:
            lines.append(f"exact Grad-CAM++ / Grad-CAM at {c} classes: {v:.2f}x "
                         f"(goal <= {target}x: {'met' if v <= target else 'missed'})")
        v = _ratio(f, g)
        if v is not None and g["batch"] == 8 and c == 1000:
            v = 1 / v
            lines.append(f"{g['arch']} Grad-CAM / model.apply time at batch 8, interleaved: "
                         f"{v:.2f}x (goal <= 1.15x: {'met' if v <= 1.15 else 'missed'})")
    for r in store.records:
        if r["section"] == "methods" and r["method"] == "gradcam" and r["batch"] == 8 and _ok(r):
            t = _lookup(store, r, section="torch", impl="pytorch-grad-cam")
            f = _lookup(store, r, section="forward", method="apply")
            if _ok(t):
                v = r["images_per_s"] / t["images_per_s"]
                lines.append(f"{r['arch']} Grad-CAM batch 8 throughput vs pytorch-grad-cam: "
                             f"{v:.2f}x (goal >= 2x: {'met' if v >= 2 else 'missed'})")
            if _ok(f):
                v = r["step_s"] / f["step_s"]
                lines.append(f"{r['arch']} Grad-CAM batch 8 time / model.apply time: {v:.2f}x "
                             f"(goal <= 1.15x: {'met' if v <= 1.15 else 'missed'})")
        if r["section"] == "methods" and r["method"] == "scorecam" and _ok(r):
            t = _lookup(store, r, section="torch", impl="pytorch-grad-cam")
            if _ok(t):
                v = r["images_per_s"] / t["images_per_s"]
                lines.append(f"{r['arch']} Score-CAM batch {r['batch']} throughput vs "
                             f"pytorch-grad-cam: {v:.2f}x "
                             f"(goal >= 3x: {'met' if v >= 3 else 'missed'})")
        if r["section"] == "engine" and r["method"] == "taylor" and _ok(r):
            v = r["step_s"]
            lines.append(f"taylor engine, {r['arch']} {r.get('coordinates_per_image')} coordinates "
                         f"at {r['image_size']} px: {v:.1f} s/image "
                         f"(goal < 20 s: {'met' if v < 20 else 'missed'})")
    return lines
