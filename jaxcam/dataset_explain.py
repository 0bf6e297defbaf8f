"""Explain a whole dataset: stream batches, shard each over the devices, write maps as they come.

``explain_batches`` is the in-memory iterator (shard, pad, explain, yield) that
everything which explains more than one batch uses; ``explain_dataset`` runs
it over an iterable of batches (for example ``jaxcam.data.batches(...)``), each
batch split over all devices with a data-parallel mesh (``jaxcam.distributed``),
and writes one ``.npz`` file per batch plus a ``manifest.json`` after every
batch. Started again on the same ``out_dir`` it skips the batches already
written, so a long run that is interrupted loses at most one batch.

Layout of ``out_dir``::

    manifest.json            config, batches done (file, rows, metric means), totals
    batch_000000.npz         "<method>/maps" (n, H, W), "<method>/raw" (n, h, w),
    batch_000001.npz         "<method>/weights" (n, K) when the method has weights,
    ...                      "<method>/<metric>" (n,) per metric, "class_idx" (n,),
                             "logits" (n, C), and the batch's "index"/"label"/... rows

In a multi-process job (see ``jaxcam.distributed.initialize_distributed``)
each process feeds its own slice of every global batch and writes its own
rows to ``batch_XXXXXX.pNN.npz`` and ``manifest.pNN.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcam import distributed

MANIFEST_VERSION = 1

# metric name -> fn(explanation, images) -> per-image values (n,)
MetricFn = Callable[[Any, jax.Array], Any]


def _images_of(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(
                f"a batch dict needs an 'image' entry (B, H, W, 3); got keys {sorted(batch)}. "
                "Pass the batches of jaxcam.data.batches, or arrays of images."
            )
        return batch["image"]
    return batch


def _passthrough(batch: Any) -> dict[str, np.ndarray]:
    """Per-row fields of a batch dict to keep next to the maps (index, label, ...)."""
    if not isinstance(batch, Mapping):
        return {}
    return {
        k: np.asarray(v)
        for k, v in batch.items()
        if k != "image" and np.ndim(v) >= 1 and k not in ("mask",)
    }


def _file_suffix() -> str:
    return "" if jax.process_count() == 1 else f".p{jax.process_index():02d}"


def _config_fingerprint(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _write_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class ExplainedBatch:
    """One explained batch of :func:`explain_batches`.

    Attributes:
      step: the batch's step number; batch: the batch as the iterable gave it;
      batch_images: its images (numpy, this process's rows);
      images: the images as explained: padded to a multiple of the local devices
        and sharded over the mesh; rows: how many of them are real (this process);
      explanations: method name -> :class:`jaxcam.Explanation` of ``images``.
    """

    step: int
    batch: Any
    batch_images: np.ndarray
    images: jax.Array
    rows: int
    explanations: dict[str, Any]

    def local(self, array: Any) -> np.ndarray:
        """This process's real rows of a per-image result (padding dropped), as numpy."""
        return np.asarray(distributed.local_rows(array))[: self.rows]


def explain_groups(
    model: Any,
    variables: Mapping[str, Any],
    x: Any,
    methods: Mapping[str, tuple[str, str, str]],
    *,
    class_idx: Any = None,
    **explain_kwargs: Any,
) -> dict[str, Any]:
    """Explain images ``x (B, H, W, 3)`` with labelled ``{label: (method, derivatives,
    layer)}``: one ``jaxcam.explain`` call per ``(derivatives, layer)``, whose methods
    share the forward pass and the derivatives. Returns ``{label: Explanation}`` in the
    order of ``methods``. With ``class_idx`` None the first call explains each image's
    prediction and the later calls explain the same classes (no re-ranking of near ties).
    """
    from jaxcam.explanation import explain

    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for label, (name, derivatives, layer) in methods.items():
        groups.setdefault((derivatives, layer), []).append((label, name))
    out: dict[str, Any] = {}
    for (derivatives, layer), members in groups.items():
        exs = explain(model, variables, x, method=[name for _, name in members], layer=layer,
                      derivatives=derivatives, class_idx=class_idx, **explain_kwargs)
        for label, name in members:
            out[label] = exs[name]
        if class_idx is None:
            class_idx = out[members[0][0]].class_idx
    return {label: out[label] for label in methods}


def explain_batches(
    model: Any,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    methods: str | Sequence[str] = ("gradcam",),
    *,
    layer: str | None = None,
    target: Any = None,
    derivatives: str = "exact",
    mesh: jax.sharding.Mesh | None = None,
    start_step: int = 0,
    skip: Callable[[int], bool] | None = None,
    explain_kwargs: Mapping[str, Any] | None = None,
) -> Iterator[ExplainedBatch]:
    """Explain every batch of ``batches``, each split over the mesh's devices; yields
    :class:`ExplainedBatch` in order (nothing is written).

    ``batches``: image arrays ``(B, H, W, 3)`` or dicts with an ``"image"`` entry
    (``jaxcam.data.batches``); batch ``i`` is step ``start_step + i``; steps for
    which ``skip(step)`` is true are not explained (nor yielded). Each batch is
    padded to a multiple of the local devices (``distributed.pad_batch``) and
    sharded (``mesh`` default: every device); the variables are replicated once.
    ``methods`` share one forward pass and one set of derivatives per batch.
    """
    from jaxcam.explanation import explain

    method_list = [methods] if isinstance(methods, str) else list(methods)
    mesh = mesh if mesh is not None else distributed.data_mesh()
    variables = distributed.replicate(variables, mesh)
    n_local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    kwargs = dict(explain_kwargs or {})
    for step, batch in enumerate(batches, start=start_step):
        if skip is not None and skip(step):
            continue
        images = np.asarray(_images_of(batch))
        if images.ndim != 4:
            raise ValueError(
                f"batch {step}: images must be (B, H, W, 3); got shape {images.shape}."
            )
        padded, n = distributed.pad_batch(images, n_local)
        x = distributed.shard_batch(padded, mesh)
        result = explain(model, variables, x, method=method_list if len(method_list) > 1
                         else method_list[0], layer=layer, target=target,
                         derivatives=derivatives, **kwargs)
        by_method = result if isinstance(result, Mapping) else {method_list[0]: result}
        yield ExplainedBatch(step, batch, images, x, n, dict(by_method))


def explain_dataset(
    model: Any,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    out_dir: str | os.PathLike,
    methods: str | Sequence[str] = ("gradcam",),
    *,
    layer: str | None = None,
    target: str | None = None,
    derivatives: str = "exact",
    metrics: Mapping[str, MetricFn] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    resume: bool = True,
    start_step: int = 0,
    maps_dtype: str = "float32",
    progress: bool = True,
    explain_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Explain every batch of ``batches`` and write maps and metrics to ``out_dir`` incrementally.

    Args:
      model, variables: a ``jaxcam.models`` model and its variables (replicated
        over the mesh once, up front).
      batches: an iterable of image arrays ``(B, H, W, 3)`` or of dicts with an
        ``"image"`` entry (the batches of ``jaxcam.data.batches``); other per-row
        entries (``"index"``, ``"label"``, ...) are stored next to the maps.
        Batch ``i`` of the iterable is step ``start_step + i``.
      out_dir: directory for ``manifest.json`` and one ``batch_XXXXXX.npz`` per step.
      methods: one method name or several; several share one forward pass and
        one set of derivatives inside ``jaxcam.explain``.
      layer, target, derivatives: passed to ``jaxcam.explain``.
      metrics: optional ``{name: fn(explanation, images) -> (B,) values}``,
        e.g. a closure over a ``jaxcam.metrics`` function; evaluated on the
        sharded batch, stored per image and averaged in the manifest.
      mesh: the data-parallel mesh (default ``jaxcam.distributed.data_mesh()``,
        every device). Each batch is padded to a multiple of the mesh size by
        repeating its last row; padded rows are dropped before writing.
      resume: skip steps whose file is listed in an existing manifest written
        with the same configuration (a different configuration raises
        ``ValueError``). ``resume=False`` starts over (overwrites).
      start_step: the step number of the iterable's first batch (pair it with
        ``jaxcam.data.batches(..., start_step=...)`` to avoid loading batches
        that are already done).
      maps_dtype: ``"float32"`` or ``"float16"`` (halves the disk space of maps).
      explain_kwargs: extra keyword arguments of ``jaxcam.explain``.

    Returns:
      The manifest (a dict): ``config``, ``batches`` (step -> file, rows,
      metric means), ``rows`` and per-method metric means over all rows written.
    """
    method_list = [methods] if isinstance(methods, str) else list(methods)
    if not method_list:
        raise ValueError("methods is empty; name at least one method, e.g. methods=['gradcam'].")
    if len(set(method_list)) != len(method_list):
        raise ValueError(f"methods lists a name twice: {method_list}.")
    if maps_dtype not in ("float32", "float16"):
        raise ValueError(f"maps_dtype must be 'float32' or 'float16'; got {maps_dtype!r}.")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0; got {start_step}.")
    metrics = dict(metrics or {})
    for name, fn in metrics.items():
        if not callable(fn) or "/" in name:
            raise ValueError(
                f"metric {name!r} must map to a callable fn(explanation, images) and its name "
                "must not contain '/'."
            )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = _file_suffix()
    manifest_path = out / f"manifest{suffix}.json"
    config = {
        "arch": getattr(model, "arch", type(model).__name__),
        "num_classes": getattr(model, "num_classes", None),
        "methods": method_list,
        "layer": model.resolve_layer(layer) if hasattr(model, "resolve_layer") else layer,
        "target": target,
        "derivatives": derivatives,
        "metrics": sorted(metrics),
        "maps_dtype": maps_dtype,
        "explain_kwargs": {k: repr(v) for k, v in sorted((explain_kwargs or {}).items())},
    }
    fingerprint = _config_fingerprint(config)
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION, "config": config, "fingerprint": fingerprint, "batches": {},
    }
    if resume and manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{manifest_path} was written with another configuration "
                f"({previous.get('config')}); to resume, call explain_dataset with the same "
                "model, methods, layer, target, derivatives, metrics and maps_dtype; otherwise "
                "pass resume=False (overwrites) or use a new out_dir."
            )
        manifest["batches"] = {
            step: entry for step, entry in previous.get("batches", {}).items()
            if (out / entry["file"]).exists()
        }

    store_dtype = np.float16 if maps_dtype == "float16" else np.float32
    done = lambda step: f"{step:06d}" in manifest["batches"]
    explained = explain_batches(
        model, variables, batches, method_list, layer=layer, target=target,
        derivatives=derivatives, mesh=mesh, start_step=start_step, skip=done,
        explain_kwargs=explain_kwargs)
    if progress:
        from tqdm.auto import tqdm

        explained = tqdm(explained, desc="explain_dataset", unit="batch")
    for item in explained:
        key, n, x, batch = f"{item.step:06d}", item.rows, item.images, item.batch
        images = item.batch_images
        by_method = item.explanations
        arrays: dict[str, np.ndarray] = {}
        metric_means: dict[str, float] = {}
        first = by_method[method_list[0]]
        arrays["class_idx"] = item.local(first.class_idx)
        arrays["logits"] = item.local(first.logits)
        for name in method_list:
            ex = by_method[name]
            arrays[f"{name}/maps"] = item.local(ex.maps).astype(store_dtype)
            arrays[f"{name}/raw"] = item.local(ex.raw)
            if getattr(ex, "weights", None) is not None:
                arrays[f"{name}/weights"] = item.local(ex.weights)
            for metric, fn in metrics.items():
                values = item.local(fn(ex, x)).astype(np.float64)
                arrays[f"{name}/{metric}"] = values
                metric_means[f"{name}/{metric}"] = float(values.mean())
        for field_name, values in _passthrough(batch).items():
            if values.shape[0] == images.shape[0]:
                arrays[field_name] = values
        filename = f"batch_{key}{suffix}.npz"
        _write_npz_atomic(out / filename, arrays)
        manifest["batches"][key] = {"file": filename, "rows": int(n), "metrics": metric_means}
        _summarise(manifest)
        _write_json_atomic(manifest_path, manifest)
    _summarise(manifest)
    _write_json_atomic(manifest_path, manifest)
    return manifest


def _summarise(manifest: dict[str, Any]) -> None:
    """Row-weighted means of every metric over the batches written, and the row count."""
    entries = manifest["batches"].values()
    rows = sum(e["rows"] for e in entries)
    sums: dict[str, float] = {}
    for e in entries:
        for name, mean in e["metrics"].items():
            sums[name] = sums.get(name, 0.0) + mean * e["rows"]
    manifest["rows"] = rows
    manifest["metric_means"] = {k: v / rows for k, v in sorted(sums.items())} if rows else {}


def load_explanations(out_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Concatenate every batch file listed in ``out_dir``'s manifest(s), in step order."""
    out = Path(out_dir)
    manifests = sorted(out.glob("manifest*.json"))
    if not manifests:
        raise FileNotFoundError(
            f"no manifest.json in {out}; write one with jaxcam.dataset_explain.explain_dataset."
        )
    files = []
    for path in manifests:
        entries = json.loads(path.read_text())["batches"]
        files += [(step, entries[step]["file"]) for step in entries]
    parts = [np.load(out / name) for _, name in sorted(files)]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files}
