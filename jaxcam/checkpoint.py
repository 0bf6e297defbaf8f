"""jaxcam checkpoints: a model's variables (orbax) plus what is needed to rebuild it (JSON).

Layout of a checkpoint directory::

    DIR/
      jaxcam.json     arch, num_classes, class_names, preprocessing, jaxcam version
      variables/      orbax-checkpoint (StandardCheckpointer) PyTree of the variables

:func:`restore` needs nothing but the directory: it builds the model from
``jaxcam.json``, derives the variable tree's structure and shapes from the
model (``jax.eval_shape``, nothing initialised), and restores into it.

:func:`save` is atomic: everything is written into a hidden sibling temp
directory ``.DIR.tmp-*`` and renamed to ``DIR`` at the end, so an interrupted
save leaves either no checkpoint or the previous one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcam.loading import CHECKPOINT_HINT, LoadedModel
from jaxcam.preprocessing import Preprocessing

METADATA_FILE = "jaxcam.json"
VARIABLES_DIR = "variables"
FORMAT = "jaxcam-checkpoint"
FORMAT_VERSION = 1


def _plain(tree: Any) -> Any:
    """FrozenDict / Mapping trees -> plain nested dicts (orbax compares structures)."""
    if hasattr(tree, "items"):
        return {str(k): _plain(v) for k, v in tree.items()}
    return tree


def _check_variables(model: Any, variables: Any) -> dict[str, Any]:
    """Plain-dict numpy copy of ``variables``; ValueError if it is not ``model``'s tree."""
    expected = model.abstract_variables()
    got = _plain(variables)
    want_paths = {
        jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(expected)
    }
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    got_paths = {jax.tree_util.keystr(p): v for p, v in got_leaves}
    missing = sorted(set(want_paths) - set(got_paths))
    extra = sorted(set(got_paths) - set(want_paths))
    shapes = sorted(
        f"{k}: {tuple(np.shape(got_paths[k]))} != {tuple(want_paths[k].shape)}"
        for k in set(want_paths) & set(got_paths)
        if tuple(np.shape(got_paths[k])) != tuple(want_paths[k].shape)
    )
    if missing or extra or shapes:
        parts = [
            f"{name} ({len(items)}): {', '.join(items[:10])}"
            for name, items in (
                ("missing", missing),
                ("unexpected", extra),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise ValueError(
            f"variables do not belong to this {model.arch} (num_classes={model.num_classes}): "
            + "; ".join(parts)
            + ". Save the variables returned by model.init / training / load_torchvision "
            "for the same model."
        )
    return jax.tree.map(lambda v: np.asarray(jax.device_get(v)), got)


def save(
    directory: str | os.PathLike,
    model: Any,
    variables: Any,
    class_names: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``variables`` of ``model`` and its metadata to ``directory`` (atomically).

    Args:
      directory: the checkpoint directory to create.
      model: the ``jaxcam.models.Model`` the variables belong to (its ``arch``
        and ``num_classes`` are recorded).
      variables: ``{"params": ..., "batch_stats": ...}`` of ``model``.
      class_names: one name per output, or None.
      preprocessing: how inputs were prepared; default ``Preprocessing()``
        (torchvision's ImageNet eval transform at 224 px).
      overwrite: replace an existing ``directory`` (the old one is kept until the
        new one is complete). Without it an existing directory is an error.

    Returns the checkpoint directory.
    """
    import orbax.checkpoint as ocp

    import jaxcam

    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"{str(directory)!r} already exists; choose another directory or pass overwrite=True"
        )
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != model.num_classes:
            raise ValueError(
                f"{len(class_names)} class names given for a model with {model.num_classes} "
                "outputs; give one name per classifier output, in output order"
            )
    preprocessing = preprocessing or Preprocessing()
    arrays = _check_variables(model, variables)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "num_classes": int(model.num_classes),
        "class_names": class_names,
        "preprocessing": preprocessing.to_dict(),
        "collections": sorted(arrays),
        "jaxcam_version": jaxcam.__version__,
    }

    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = directory.parent / f".{directory.name}.tmp-{token}"
    old = directory.parent / f".{directory.name}.old-{token}"
    try:
        tmp.mkdir()
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp.absolute() / VARIABLES_DIR, arrays)
            checkpointer.wait_until_finished()
        with open(tmp / METADATA_FILE, "w") as f:
            json.dump(metadata, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if directory.exists():
            os.rename(directory, old)
        os.rename(tmp, directory)
    except BaseException:
        if old.exists() and not directory.exists():
            os.rename(old, directory)  # put the previous checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``jaxcam.json`` of a checkpoint directory, validated."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(
            f"checkpoint directory {str(directory)!r} does not exist; {CHECKPOINT_HINT}"
        )
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        if (directory.parent / METADATA_FILE).is_file():
            fix = f"give its parent directory {str(directory.parent)!r}"
        else:
            fix = (
                "for a torchvision weights file use jaxcam.load(path, arch=...); " + CHECKPOINT_HINT
            )
        raise ValueError(
            f"{str(directory)!r} is not a jaxcam checkpoint (no {METADATA_FILE}); {fix}"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{str(meta_path)!r} is not valid JSON ({err}); the checkpoint is "
            "damaged, write it again"
        ) from err
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise ValueError(f"{str(meta_path)!r} is not jaxcam checkpoint metadata")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format version {meta['format_version']} is newer than this jaxcam "
            f"reads ({FORMAT_VERSION}); upgrade jaxcam"
        )
    return meta


def restore(directory: str | os.PathLike) -> LoadedModel:
    """Rebuild the model from ``jaxcam.json`` and restore its variables (float32 jax arrays).

    No initialised model is needed: the variable tree comes from
    ``jax.eval_shape`` of the model's ``init``.
    """
    import orbax.checkpoint as ocp

    from jaxcam import models

    directory = Path(directory)
    meta = read_metadata(directory)
    model = models.get(meta["arch"], num_classes=int(meta["num_classes"]))
    abstract = model.abstract_variables()
    saved = set(meta.get("collections", abstract))
    if saved != set(abstract):
        raise ValueError(
            f"checkpoint {str(directory)!r} has variable collections {sorted(saved)}, but "
            f"{model.arch} needs {sorted(abstract)}; the checkpoint was written by another "
            "version of the model"
        )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory.absolute() / VARIABLES_DIR, abstract)
    variables = jax.tree.map(jnp.asarray, _plain(restored))
    names = meta.get("class_names")
    return LoadedModel(
        model=model,
        variables=variables,
        class_names=None if names is None else tuple(names),
        preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
    )
