"""The benchmark's ``first-call`` section: a whole ``jaxcam explain`` of one image in
fresh processes beside the equivalent pytorch-grad-cam script (see :mod:`jaxcam.benchmark`).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxcam import compilation, timing
from jaxcam.benchmark.config import (
    KEY_FIELDS,
    BenchmarkConfig,
    ResultStore,
    Workbench,
    progress,
)

# --------------------------------------------------------------------------- first call

FIRST_CALL_CELLS = ("cold-cache", "warm-cache", "in-process")
FIRST_CALL_SHARED = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam")

# The equivalent pytorch-grad-cam script: load the weights, preprocess, explain, overlay,
# save; one image per call of `explain_image`, run once (`process`) or twice (`in-process`).
PGC_SCRIPT = r"""
import json, sys, time
import numpy as np
import torch, torchvision
from PIL import Image
from torchvision import transforms
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import show_cam_on_image

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def explain_image(path, out_png):
    model = getattr(torchvision.models, args["arch"])(weights=None,
                                                      num_classes=args["num_classes"])
    model.load_state_dict(torch.load(args["weights"], map_location="cpu", weights_only=True))
    model.eval()
    layer = model
    for part in args["layer"].split("."):
        layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
    prep = transforms.Compose([transforms.Resize(args["resize"]),
                               transforms.CenterCrop(args["size"]), transforms.ToTensor(),
                               transforms.Normalize(MEAN, STD)])
    x = prep(Image.open(path).convert("RGB"))[None]
    method = GradCAMPlusPlus if args["method"] == "gradcam++" else GradCAM
    with method(model=model, target_layers=[layer]) as cam:
        heat = cam(input_tensor=x, targets=None)[0]
    shown = (x[0].permute(1, 2, 0).numpy() * STD + MEAN).clip(0, 1).astype(np.float32)
    Image.fromarray(show_cam_on_image(shown, heat, use_rgb=True)).save(out_png)


times = []
for i, image in enumerate(args["images"]):
    t0 = time.perf_counter()
    explain_image(image, f"{args['out']}/pgc_{i}.png")
    times.append(time.perf_counter() - t0)
print("RESULT " + json.dumps({"calls_s": times}))
"""

# jaxcam.cli.main called once per image in one process, each call counted.
JAXCAM_CLI_WORKER = r"""
import json, sys, time
from jaxcam import cli
from jaxcam.compilation import CompileCounter

args = json.loads(sys.argv[1])
calls, compiles = [], []
for i, argv in enumerate(args["argvs"]):
    with CompileCounter() as counter:
        t0 = time.perf_counter()
        cli.main(argv)
        calls.append(time.perf_counter() - t0)
    compiles.append({"compiles": counter.compiles, "cache_hits": counter.cache_hits})
print("RESULT " + json.dumps({"calls_s": calls, "compiles": compiles}))
"""

# What jaxcam.explain compiles: one method, again, several methods, a second image size.
COMPILES_WORKER = r"""
import json, sys
import jax, numpy as np
import jaxcam
from jaxcam.compilation import CompileCounter

args = json.loads(sys.argv[1])
model, variables = jaxcam.weights.load_torchvision(args["weights"], args["arch"])
rng = np.random.default_rng(0)
def images(size):
    return rng.standard_normal((1, size, size, 3), dtype=np.float32)
steps = [("one method", args["method"], args["size"]),
         ("the same call again, new image", args["method"], args["size"]),
         ("five gradient methods in one call", args["shared"], args["size"]),
         ("one method, second image size", args["method"], args["second_size"])]
out = []
for label, method, size in steps:
    x = images(size)
    with CompileCounter() as c:
        jax.block_until_ready(jaxcam.explain(model, variables, x, method=method))
    out.append({"step": label, "method": method, "image_size": size,
                "compiles": c.compiles, "compile_s": c.compile_seconds,
                "traces": c.traces, "trace_s": c.trace_seconds,
                "programs": sorted(c.programs, key=lambda p: -p[1])})
print("RESULT " + json.dumps(out))
"""


def _smooth_jpeg(path: Path, width: int, height: int, seed: int) -> None:
    """A smooth random RGB JPEG (a photo-like input; resizing does not destroy it)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=90)


_run_worker = timing.run_worker  # one name for the subprocess workers (tests replace it)


def _run_cli(argv: list[str], env: dict[str, str], cwd: str) -> float:
    """Wall seconds of ``python -m jaxcam.cli ARGV`` in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jaxcam.cli", *argv], capture_output=True,
                          text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"jaxcam explain failed ({proc.returncode}): {proc.stderr[-600:]}")
    return wall


def _first_call_files(config: BenchmarkConfig, arch: str, work: Path) -> dict[str, Any]:
    """Random torchvision weights (.pth for torch, .safetensors for jaxcam) and two JPEGs."""
    import torch
    from safetensors.torch import save_file

    import jaxcam

    net, _, _ = jaxcam.weights.random_torchvision(arch, config.first_call_num_classes,
                                                  config.seed)
    state = net.state_dict()
    pth, st = work / f"{arch}.pth", work / f"{arch}.safetensors"
    torch.save(state, pth)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    images = [work / "photo_a.jpg", work / "photo_b.jpg"]
    for i, path in enumerate(images):
        _smooth_jpeg(path, 400, 300, config.seed + i)
    prep = jaxcam.Preprocessing.imagenet(config.first_call_image_size)
    layer = jaxcam.models.get(arch, config.first_call_num_classes).default_layer
    return {"pth": str(pth), "safetensors": str(st), "images": [str(p) for p in images],
            "resize": prep.resize_size, "layer": layer}


def section_first_call(config: BenchmarkConfig, bench: Workbench, store: ResultStore) -> None:
    import shutil
    import tempfile

    if not bench.use_torch:
        progress(f"[first-call] {bench.torch_note}")
        return
    size = config.first_call_image_size
    progress(f"[first-call] whole `jaxcam explain` of one 400x300 JPEG at {size} px in fresh "
             "processes, beside the pytorch-grad-cam script (interleaved)")
    root = str(Path(__file__).resolve().parents[2])
    base_env = dict(os.environ)
    base_env["PYTHONPATH"] = root + os.pathsep + base_env.get("PYTHONPATH", "")
    base_env.pop(compilation.ENV_VAR, None)  # every cell says which cache it uses
    for arch in config.first_call_archs:
        work = Path(tempfile.mkdtemp(prefix=f"jaxcam-first-call-{arch}-"))
        try:
            files = _first_call_files(config, arch, work)
            for method in config.first_call_methods:
                _first_call_cells(config, store, arch, method, files, work, base_env, root)
            _compiles_cell(config, store, arch, files, base_env, root)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _first_call_cells(config, store, arch, method, files, work: Path, base_env, root) -> None:

    size, classes = config.first_call_image_size, config.first_call_num_classes
    key = dict(section="first_call", arch=arch, image_size=size, batch=1, method=method,
               num_classes=classes, devices=1)
    cells = [("jaxcam", c) for c in FIRST_CALL_CELLS] + [
        ("pytorch-grad-cam", "process"), ("pytorch-grad-cam", "in-process")]
    todo = [(impl, cell) for impl, cell in cells if not store.has(**key, impl=impl, cell=cell)]
    if not todo:
        progress(f"  skip (already measured): {arch} {method}")
        return
    progress(f"  measuring {arch} {method}: {len(todo)} cells x "
             f"{config.first_call_repeats} repeats ...")

    def cli_argv(image: str, out: str, cache: str) -> list[str]:
        argv = [image, "--weights", files["safetensors"], "--arch", arch, "--method", method,
                "--out", out, "--compilation-cache", cache]
        if size != 224:
            argv += ["--image-size", str(size)]
        return ["explain", *argv]

    pgc_args = dict(arch=arch, weights=files["pth"], num_classes=classes, method=method,
                    layer=files["layer"], resize=files["resize"], size=size,
                    threads=config.threads, out=str(work))
    times: dict[tuple[str, str], list[float]] = {c: [] for c in cells}
    extra: dict[tuple[str, str], dict[str, Any]] = {c: {} for c in cells}
    errors: dict[tuple[str, str], str] = {}
    # other work on the machine slows torch's threads more than XLA's: keep the load seen
    load_before = os.getloadavg()[0]

    def attempt(cell, fn):
        if cell not in todo or cell in errors:
            return
        try:
            fn()
        except Exception as err:  # a broken cell must not lose the others
            errors[cell] = f"{type(err).__name__}: {err}"[:500]
            progress(f"    ERROR {cell}: {errors[cell]}")

    for r in range(config.first_call_repeats):
        cache = work / f"cache-{method}-{r}"
        out = str(work / "out")

        def cold(cache=cache, out=out):
            times["jaxcam", "cold-cache"].append(
                _run_cli(cli_argv(files["images"][0], out, str(cache)), base_env, root))
            extra["jaxcam", "cold-cache"]["programs_cached"] = len(
                list(cache.glob("*.jaxcam-xla")))

        def warm(cache=cache, out=out):
            if not cache.is_dir():  # the cold cell failed or was measured before
                _run_cli(cli_argv(files["images"][0], out, str(cache)), base_env, root)
            times["jaxcam", "warm-cache"].append(
                _run_cli(cli_argv(files["images"][1], out, str(cache)), base_env, root))

        def in_process(out=out):
            argvs = [cli_argv(img, f"{out}/{i}", "off") for i, img in enumerate(files["images"])]
            _, res = _run_worker(JAXCAM_CLI_WORKER, {"argvs": argvs}, base_env, root)
            times["jaxcam", "in-process"].append(res["calls_s"][1])
            extra["jaxcam", "in-process"].update(
                first_call_in_process_s=res["calls_s"][0],
                second_call_compiles=res["compiles"][1]["compiles"])

        def pgc_process():
            wall, _ = _run_worker(PGC_SCRIPT, dict(pgc_args, images=files["images"][:1]),
                                  base_env, root)
            times["pytorch-grad-cam", "process"].append(wall)

        def pgc_in_process():
            _, res = _run_worker(PGC_SCRIPT, dict(pgc_args, images=files["images"]),
                                 base_env, root)
            times["pytorch-grad-cam", "in-process"].append(res["calls_s"][1])
            extra["pytorch-grad-cam", "in-process"]["first_call_in_process_s"] = res[
                "calls_s"][0]

        # interleaved, so that drift in the machine's load hits both libraries alike
        attempt(("pytorch-grad-cam", "process"), pgc_process)
        attempt(("jaxcam", "cold-cache"), cold)
        attempt(("jaxcam", "warm-cache"), warm)
        attempt(("pytorch-grad-cam", "in-process"), pgc_in_process)
        attempt(("jaxcam", "in-process"), in_process)
    for impl, cell in todo:
        record = {**{k: None for k in KEY_FIELDS}, **key, "impl": impl, "cell": cell}
        if (impl, cell) in errors:
            record["error"] = errors[impl, cell]
        else:
            values = times[impl, cell]
            record.update(wall_s=statistics.median(values), wall_all_s=values,
                          repeats=len(values), **extra[impl, cell],
                          load_avg_1min=[load_before, os.getloadavg()[0]])
            record["weights"] = "safetensors" if impl == "jaxcam" else "pth"
        store.add(record)
        if "wall_s" in record:
            progress(f"    {impl} {cell}: {record['wall_s']:.2f} s")


def _compiles_cell(config, store, arch, files, base_env, root) -> None:
    key = dict(section="first_call", impl="jaxcam", arch=arch,
               image_size=config.first_call_image_size, batch=1,
               method=config.first_call_methods[-1], num_classes=config.first_call_num_classes,
               devices=1, cell="compiles")
    if store.has(**key):
        progress(f"  skip (already measured): {arch} compiles")
        return
    progress(f"  counting what jaxcam.explain compiles ({arch}) ...")
    second = config.first_call_image_size + 32
    payload = dict(weights=files["safetensors"], arch=arch, method=key["method"],
                   shared=list(FIRST_CALL_SHARED), size=config.first_call_image_size,
                   second_size=second)
    env = dict(base_env, **{compilation.ENV_VAR: "off"})
    try:
        wall, steps = _run_worker(COMPILES_WORKER, payload, env, root)
        record = {**key, "steps": steps, "wall_s": wall}
    except Exception as err:
        record = {**key, "error": f"{type(err).__name__}: {err}"[:500]}
    store.add(record)
    for step in record.get("steps", []):
        progress(f"    {step['step']}: {step['compiles']} compilations, "
                 f"{step['compile_s']:.2f} s compiling, {step['trace_s']:.2f} s tracing")
