"""jaxcam checkpoints: a model's variables (orbax) plus what is needed to rebuild it (JSON).

Layout of a checkpoint directory::

    DIR/
      jaxcam.json     factory (how to rebuild the model), arch, num_classes, class_names,
                      preprocessing, collections, info, jaxcam version
      variables/      orbax-checkpoint (StandardCheckpointer) PyTree of the variables

:func:`restore` rebuilds the model, derives the variable tree's structure and
shapes from it (``model.abstract_variables()``, nothing initialised), and
restores into it. jaxcam's own models are rebuilt from ``arch`` /
``num_classes``. Any other model is rebuilt by the factory the checkpoint
names (``"package.module:function"`` and its keyword arguments, JSON), but only
if the caller allows that factory: a checkpoint is data, and restoring one
never imports or calls anything the file names unless asked to (see
:func:`restore`). A model without ``abstract_variables`` gets the saved tree
as it is.

:func:`save` is atomic: everything is written into a hidden sibling temp
directory ``.DIR.tmp-*`` and renamed to ``DIR`` at the end, so an interrupted
save leaves either no checkpoint or the previous one, never half of one.

:func:`resolve` finds the checkpoint in what users naturally point at: the
checkpoint itself, a training run's output folder (``runs/ham10000``), its
``checkpoints/`` folder or any step folder inside it (``checkpoints/best/78``,
``checkpoints/latest``): all of these mean the run's best model,
``checkpoints/model``, which :func:`jaxcam.train.fit` keeps up to date.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcam.preprocessing import Preprocessing

METADATA_FILE = "jaxcam.json"
VARIABLES_DIR = "variables"
FORMAT = "jaxcam-checkpoint"
FORMAT_VERSION = 1
# The jaxcam checkpoint of a training run's best model, inside the run's checkpoint
# folder (jaxcam.train.fit's ``workdir``), beside the training-state folders.
TRAINING_MODEL_DIR = "model"
TRAINING_STATE_DIRS = ("best", "latest")
# The factory of jaxcam's own models: trusted, it only builds registered architectures.
BUILTIN_FACTORY = "jaxcam.models:get"

CHECKPOINT_HINT = (
    "make one with `jaxcam convert WEIGHTS OUT_DIR --arch resnet50` "
    "(see docs/weights.md for getting torchvision weights)"
)
_FACTORY_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")

Factories = Mapping[str, Callable[..., Any]] | Sequence[str]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to explain.

    Attributes:
      model: an object of jaxcam's model protocol (``.arch``, ``.num_classes``,
        ``features``, ``head``, ...), e.g. a ``jaxcam.models.Model``.
      variables: ``{"params": ..., "batch_stats": ...}`` (VGG19: params only).
      class_names: one name per output, or None when unknown (torchvision files).
      preprocessing: how raw images become inputs (``jaxcam.preprocessing.preprocess``).
      info: free-form facts the writer recorded (training: step, epoch, metric).
    """

    model: Any
    variables: Any = dataclasses.field(repr=False)
    class_names: tuple[str, ...] | None = None
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def num_classes(self) -> int | None:
        return self.model.num_classes


# --------------------------------------------------------------------------- helpers


def _plain(tree: Any) -> Any:
    """FrozenDict / Mapping trees -> plain nested dicts (orbax compares structures)."""
    if hasattr(tree, "items"):
        return {str(k): _plain(v) for k, v in tree.items()}
    return tree


def _numpy_tree(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda v: np.asarray(jax.device_get(v)), _plain(tree))


def _check_variables(model: Any, variables: Any) -> dict[str, Any]:
    """Plain-dict numpy copy of ``variables``; ValueError if it is not ``model``'s tree.

    Models without ``abstract_variables`` (a user's adapted model) are not checked.
    """
    import jax

    if not hasattr(model, "abstract_variables"):
        return _numpy_tree(variables)
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
    return _numpy_tree(got)


def _is_builtin(model: Any) -> bool:
    from jaxcam import models

    return isinstance(model, models.Model) and model.arch in models.ARCHS


def _check_factory(factory: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(factory, str) or not _FACTORY_NAME.match(factory):
        raise ValueError(
            f"factory must be an importable name 'package.module:function', got {factory!r}"
        )
    try:
        return json.loads(json.dumps(dict(kwargs)))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"factory_kwargs of {factory!r} must be JSON data (numbers, strings, lists, "
            f"dicts): {err}"
        ) from None


def import_factory(name: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (dots after ``:`` are attributes).

    Only call this for a name the user gave (a command-line option, code):
    importing runs the module's code.
    """
    _check_factory(name, {})
    module_name, _, attr = name.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import the model factory {name!r}: {err}") from None
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ValueError(
                f"the model factory {name!r} does not exist: module {module_name!r} has no "
                f"attribute {attr!r}"
            ) from None
    if not callable(value):
        raise ValueError(f"the model factory {name!r} is not callable")
    return value


# --------------------------------------------------------------------------- save


def save(
    directory: str | os.PathLike,
    model: Any,
    variables: Any,
    class_names: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    *,
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``variables`` of ``model`` and its metadata to ``directory`` (atomically).

    Args:
      directory: the checkpoint directory to create.
      model: the model the variables belong to (its ``arch`` and ``num_classes``
        are recorded; a model with ``abstract_variables`` has its tree checked).
      variables: ``{"params": ..., "batch_stats": ...}`` of ``model``.
      class_names: one name per output, or None.
      preprocessing: how inputs were prepared; default ``Preprocessing()``
        (torchvision's ImageNet eval transform at 224 px).
      factory: ``"package.module:function"`` such that
        ``function(**factory_kwargs)`` rebuilds ``model``. Default for jaxcam's
        own models: ``"jaxcam.models:get"`` with ``arch`` / ``num_classes``.
        Without one (another model), :func:`restore` needs ``model=``.
      factory_kwargs: the factory's keyword arguments, JSON data.
      info: JSON facts to keep with the checkpoint (training writes its step,
        epoch and monitored metric); returned as ``LoadedModel.info``.
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
    num_classes = getattr(model, "num_classes", None)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise ValueError(
                f"{len(class_names)} class names given for a model with {num_classes} "
                "outputs; give one name per classifier output, in output order"
            )
    if factory is None and factory_kwargs is not None:
        raise ValueError("factory_kwargs given without factory; pass factory='pkg.mod:fn' too")
    if factory is None and _is_builtin(model):
        factory, factory_kwargs = BUILTIN_FACTORY, {"arch": model.arch,
                                                    "num_classes": int(num_classes)}
    factory_record = None
    if factory is not None:
        factory_record = {"name": factory,
                          "kwargs": _check_factory(factory, factory_kwargs or {})}
    try:
        info_record = json.loads(json.dumps(dict(info or {})))
    except (TypeError, ValueError) as err:
        raise ValueError(f"info must be JSON data: {err}") from None
    preprocessing = preprocessing or Preprocessing()
    arrays = _check_variables(model, variables)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": str(getattr(model, "arch", type(model).__name__)),
        "num_classes": None if num_classes is None else int(num_classes),
        "factory": factory_record,
        "class_names": class_names,
        "preprocessing": preprocessing.to_dict(),
        "collections": sorted(arrays),
        "info": info_record,
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


# --------------------------------------------------------------------------- finding one


def _steps(folder: Path) -> list[int]:
    """Orbax step folders (integer names) inside ``folder``, ascending."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _is_training_workdir(folder: Path) -> bool:
    return (folder / TRAINING_MODEL_DIR / METADATA_FILE).is_file() or any(
        _steps(folder / name) for name in TRAINING_STATE_DIRS
    )


def _training_workdir(path: Path) -> Path | None:
    """The ``jaxcam.train.fit`` checkpoint folder that ``path`` is, holds or is inside of."""
    for candidate in (path / "checkpoints", path):
        if _is_training_workdir(candidate):
            return candidate
    # a step folder, or a folder inside one: checkpoints/best/78, checkpoints/latest/12/state
    for parent in list(path.parents)[:3]:
        first = path.relative_to(parent).parts[0]
        if first in TRAINING_STATE_DIRS and _is_training_workdir(parent):
            return parent
    return None


def _listing(directory: Path, limit: int = 8) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    except OSError:
        return ""
    if not names:
        return " (it is empty)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f" (it holds: {', '.join(names[:limit])}{more})"


def resolve(path: str | os.PathLike) -> Path:
    """The jaxcam checkpoint directory ``path`` designates.

    ``path`` may be a checkpoint directory (it holds ``jaxcam.json``), a
    training run's output folder (holding ``checkpoints/``), a
    :func:`jaxcam.train.fit` checkpoint folder (``best/``, ``latest/``,
    ``model/``) or a folder inside ``best/`` / ``latest/``: all but the first
    mean the run's best model, ``<checkpoints>/model``. Raises
    FileNotFoundError / ValueError saying what was found and what to pass.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint directory {str(path)!r} does not exist; {CHECKPOINT_HINT}"
        )
    if (path / METADATA_FILE).is_file():
        return path
    if not path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a file, not a jaxcam checkpoint directory; for a torchvision "
            "weights file use jaxcam.load(path, arch=...) (--arch)"
        )
    if (path.parent / METADATA_FILE).is_file():
        raise ValueError(
            f"{str(path)!r} is not a jaxcam checkpoint (no {METADATA_FILE}); it is inside one: "
            f"give its parent directory {str(path.parent)!r}"
        )
    workdir = _training_workdir(path)
    if workdir is not None:
        model_dir = workdir / TRAINING_MODEL_DIR
        if (model_dir / METADATA_FILE).is_file():
            return model_dir
        found = ", ".join(
            f"{name}/ (steps {', '.join(map(str, _steps(workdir / name)))})"
            for name in TRAINING_STATE_DIRS
            if _steps(workdir / name)
        )
        raise ValueError(
            f"{str(path)!r} belongs to a training run whose checkpoint folder {str(workdir)!r} "
            f"holds training-state checkpoints ({found}) but no model checkpoint "
            f"{str(model_dir)!r}, which jaxcam.train.fit writes since jaxcam 0.1 (the run "
            "was written by an older version). Rerun the same training command with the "
            "same output folder: a finished run is not retrained, and the run's best model "
            f"is written to {str(model_dir)!r}"
        )
    raise ValueError(
        f"{str(path)!r} is not a jaxcam checkpoint (no {METADATA_FILE}) nor a training "
        f"run{_listing(path)}. Pass a jaxcam checkpoint directory (one holding "
        f"{METADATA_FILE}: {CHECKPOINT_HINT}, or jaxcam.checkpoint.save), the output folder "
        "of a training run (e.g. runs/ham10000: its best model is checkpoints/model), or a "
        "torchvision weights file (.pth/.safetensors) with arch=... (--arch)"
    )


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``jaxcam.json`` of the checkpoint :func:`resolve` finds, validated."""
    meta_path = resolve(directory) / METADATA_FILE
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


# --------------------------------------------------------------------------- restore


def _factory_of(meta: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    record = meta.get("factory")
    if record is None:
        return None
    if not isinstance(record, Mapping) or not isinstance(record.get("name"), str):
        raise ValueError("the checkpoint's 'factory' entry is malformed; write it again")
    kwargs = record.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError("the checkpoint's factory kwargs are not a JSON object; write it again")
    return record["name"], dict(kwargs)


def _build_model(directory: Path, meta: Mapping[str, Any], factories: Factories | None) -> Any:
    """The model the metadata describes, calling only factories the caller allowed."""
    from jaxcam import models

    factory = _factory_of(meta)
    if factory is None or factory[0] == BUILTIN_FACTORY:
        kwargs = factory[1] if factory else {"arch": meta.get("arch"),
                                             "num_classes": meta.get("num_classes")}
        if set(kwargs) != {"arch", "num_classes"} or kwargs["arch"] not in models.ARCHS:
            raise ValueError(
                f"checkpoint {str(directory)!r} holds a {meta.get('arch')!r} model, which is not "
                f"one of jaxcam's ({', '.join(models.ARCHS)}), and names no factory to build "
                "it; pass the model: jaxcam.load(path, model=...) / "
                "jaxcam.checkpoint.restore(path, model=...)"
            )
        return models.get(kwargs["arch"], num_classes=int(kwargs["num_classes"]))
    name, kwargs = factory
    call = f"{name}(**{json.dumps(kwargs)})"
    if isinstance(factories, str):
        factories = (factories,)
    if isinstance(factories, Mapping):
        fn = factories.get(name)
    elif factories is not None and name in factories:
        fn = import_factory(name)
    else:
        fn = None
    if fn is None:
        raise ValueError(
            f"checkpoint {str(directory)!r} says its model is built by calling {call}. "
            "jaxcam does not import or call code a checkpoint names unless you allow it "
            "(a checkpoint is data; it may come from someone else). If you trust this "
            f"factory, pass factories={{{name!r}: function}} or factories=[{name!r}] "
            f"(CLI: --model {name}); or build the model yourself and pass model=..."
        )
    return fn(**kwargs)


def restore(
    directory: str | os.PathLike,
    *,
    model: Any | None = None,
    factories: Factories | None = None,
) -> LoadedModel:
    """Rebuild the model and restore its variables (jax arrays, as saved).

    Args:
      directory: a checkpoint, or anything :func:`resolve` accepts (a training
        run's folder: its best model).
      model: the model, built by the caller; nothing the checkpoint names is
        then imported or called. Its variable tree must match the saved one.
      factories: factories the caller trusts, for a checkpoint of a model that is
        not one of jaxcam's own: ``{"pkg.mod:fn": fn}`` (called as is) or a
        sequence of names ``["pkg.mod:fn"]`` (imported, then called). The
        checkpoint's factory is called with its recorded keyword arguments only
        if its name is listed; otherwise ValueError, before anything is
        imported. jaxcam's own models (``"jaxcam.models:get"``) need no listing.

    No initialised model is needed: the variable tree comes from the model's
    ``abstract_variables()`` (``jax.eval_shape`` of ``init``). A model without
    it (a user's adapted model) gets the saved tree as it is.
    """
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    directory = resolve(directory)
    meta = read_metadata(directory)
    if model is None:
        model = _build_model(directory, meta, factories)
    saved_classes = meta.get("num_classes")
    have_classes = getattr(model, "num_classes", None)
    if saved_classes is not None and have_classes is not None and saved_classes != have_classes:
        raise ValueError(
            f"checkpoint {str(directory)!r} holds a model with {saved_classes} outputs, but the "
            f"given {getattr(model, 'arch', 'model')} has num_classes={have_classes}; build the "
            f"model with {saved_classes} classes"
        )
    if hasattr(model, "abstract_variables"):
        abstract = model.abstract_variables()
        saved = set(meta.get("collections", abstract))
        if saved != set(abstract):
            raise ValueError(
                f"checkpoint {str(directory)!r} has variable collections {sorted(saved)}, but "
                f"{model.arch} needs {sorted(abstract)}; the checkpoint was written by another "
                "version of the model"
            )
    else:
        abstract = None
    with ocp.StandardCheckpointer() as checkpointer:
        path = directory.absolute() / VARIABLES_DIR
        try:
            restored = checkpointer.restore(path, abstract) if abstract else checkpointer.restore(
                path)
        except ValueError as err:
            raise ValueError(
                f"the variables in {str(directory)!r} do not fit the "
                f"{getattr(model, 'arch', 'given model')}: {err}"
            ) from None
    variables = jax.tree.map(jnp.asarray, _plain(restored))
    names = meta.get("class_names")
    return LoadedModel(
        model=model,
        variables=variables,
        class_names=None if names is None else tuple(names),
        preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
        info=dict(meta.get("info") or {}),
    )
