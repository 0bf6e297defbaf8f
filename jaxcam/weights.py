"""Import torchvision state dicts (``.pth`` / ``.pt`` / ``.safetensors``) into jaxcam models.

The Flax variable tree mirrors torchvision's module paths (docs/models.md), so
the import is a mechanical renaming, one rule per leaf:

==========================  ====================================  =========================
torch key                   Flax leaf                             value
==========================  ====================================  =========================
``m.weight`` (Conv2d)       ``params[...m]["kernel"]``            ``w.transpose(2, 3, 1, 0)``
                                                                  (OIHW -> HWIO)
``m.weight`` (Linear)       ``params[...m]["kernel"]``            ``w.T`` ((out, in) -> (in, out))
``m.weight`` (BatchNorm2d)  ``params[...m]["scale"]``             as is
``m.bias``                  ``params[...m]["bias"]``              as is
``m.running_mean``          ``batch_stats[...m]["mean"]``         as is
``m.running_var``           ``batch_stats[...m]["var"]``          as is
``m.num_batches_tracked``   (dropped)
==========================  ====================================  =========================

``[...m]`` is ``m.split(".")`` as nested dict keys. The rule is applied
backwards: the expected torch keys are derived from the model's own variable
tree, so nothing here is written per architecture except the name of the
classifier (from which ``num_classes`` is read). VGG19's first dense layer
needs no permutation: the Flax model flattens in torch's C, H, W order.

``.safetensors`` files are read with ``safetensors.numpy`` (no PyTorch);
``.pth`` / ``.pt`` / ``.bin`` need PyTorch (``torch.load(weights_only=True)``).
jaxcam never downloads anything: see docs/weights.md for getting the files.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

StateDict = Mapping[str, np.ndarray]

# The torch module holding each architecture's classifier (its weight is (num_classes, in)).
CLASSIFIERS: dict[str, str] = {
    "resnet50": "fc",
    "vgg19": "classifier.6",
    "efficientnet_b0": "classifier.1",
}
ARCHS: tuple[str, ...] = tuple(CLASSIFIERS)

TORCH_EXTENSIONS = (".pth", ".pt", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors",)

# Prefixes wrappers add in front of every key: DataParallel / DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys of training checkpoints that hold the model's state dict.
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
_MAX_LISTED = 10


class TorchNotInstalledError(ImportError, ValueError):
    """A ``.pth`` / ``.pt`` file was given but PyTorch is not installed."""


class WeightsMismatchError(ValueError):
    """A state dict does not fit the architecture (strict loading).

    Attributes:
      report: the :class:`MatchReport` (missing, unexpected, mismatched keys).
    """

    def __init__(self, message: str, report: MatchReport) -> None:
        super().__init__(message)
        self.report = report


class WeightsMismatchWarning(UserWarning):
    """``strict=False`` loading left some variables at their initial values."""


@dataclass(frozen=True)
class MatchReport:
    """How a torch state dict fits a jaxcam model, in torch key names.

    Attributes:
      arch: the architecture the state dict was matched against.
      missing: torch keys the model needs that the state dict lacks.
      unexpected: state-dict keys the model has no place for.
      mismatched: ``(key, shape in the file, shape the model needs)`` in torch layout.
      guess: the torchvision architecture the keys look like, or None.
    """

    arch: str
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    guess: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """Multi-line human-readable summary (at most 10 entries per list)."""
        lines = []
        for title, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            (
                "shape mismatches",
                [f"{k}: file {f}, {self.arch} needs {m}" for k, f, m in self.mismatched],
            ),
        ):
            if items:
                shown = ", ".join(items[:_MAX_LISTED])
                more = (
                    f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
                )
                lines.append(f"  {title} ({len(items)}): {shown}{more}")
        return "\n".join(lines)


# ---------------------------------------------------------------- reading files


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch state dict file into ``{key: float32 numpy array}``.

    ``.safetensors`` is read with ``safetensors.numpy`` (no PyTorch needed);
    ``.pth`` / ``.pt`` / ``.bin`` with ``torch.load(weights_only=True,
    map_location="cpu")``. Training checkpoints that wrap the state dict under
    ``"state_dict"``, ``"model"`` or ``"model_state_dict"`` are unwrapped, and
    ``module.`` (DataParallel) / ``_orig_mod.`` (torch.compile) prefixes stripped.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist; download the torchvision weights "
            "yourself (see docs/weights.md, e.g. https://download.pytorch.org/models/"
            "resnet50-11ad3fa6.pth) and give its local path"
        )
    if path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a directory, not a weights file; a jaxcam checkpoint "
            "directory is opened with jaxcam.load(path) or jaxcam.checkpoint.restore(path)"
        )
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        raw = _read_safetensors(path)
    elif suffix in TORCH_EXTENSIONS:
        raw = _read_torch(path)
    else:
        raise ValueError(
            f"unsupported weights file extension {path.suffix!r} ({str(path)!r}); give a "
            f"torch state dict saved as {', '.join(TORCH_EXTENSIONS + SAFETENSORS_EXTENSIONS)}"
        )
    return clean_state_dict(raw)


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, TypeError, ValueError) as err:
        raise ValueError(
            f"could not read {str(path)!r} as safetensors ({err}); if the file holds "
            "bfloat16 tensors, convert it to float32 with PyTorch first (docs/weights.md)"
        ) from err


def _read_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise TorchNotInstalledError(
            f"reading {str(path)!r} ({path.suffix}) needs PyTorch, which is not installed: "
            "`pip install torch` (CPU build is enough), or convert the file to .safetensors "
            "on a machine that has PyTorch (docs/weights.md) and load that instead"
        ) from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise ValueError(
            f"torch.load could not read {str(path)!r} as a state dict ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); jaxcam loads plain state dicts "
            "(torch.save(model.state_dict(), path)), not pickled models"
        ) from err


def clean_state_dict(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwrap a training checkpoint, strip wrapper prefixes, convert to float32 numpy.

    Integer tensors (``num_batches_tracked``) are dropped: nothing in a jaxcam
    model corresponds to them.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"expected a state dict (a mapping of names to tensors), got {type(raw).__name__}; "
            "save weights with torch.save(model.state_dict(), path)"
        )
    for key in _STATE_DICT_KEYS:
        if isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    out: dict[str, np.ndarray] = {}
    non_tensors = []
    for key, value in raw.items():
        if not hasattr(value, "shape"):
            non_tensors.append(key)
            continue
        while key.startswith(_WRAPPER_PREFIXES):  # any order, e.g. _orig_mod.module.
            key = key[len(next(p for p in _WRAPPER_PREFIXES if key.startswith(p))) :]
        arr = _to_numpy(value)
        if key.endswith("num_batches_tracked") or not np.issubdtype(arr.dtype, np.floating):
            continue
        out[key] = arr.astype(np.float32)
    if not out:
        raise ValueError(
            "no floating-point tensors found in the state dict"
            + (
                f" (non-tensor entries: {', '.join(map(str, non_tensors[:_MAX_LISTED]))})"
                if non_tensors
                else ""
            )
            + "; expected torch.save(model.state_dict(), path) or a dict with a "
            + " / ".join(repr(k) for k in _STATE_DICT_KEYS)
            + " entry"
        )
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # bfloat16 / float16 have no lossless numpy path otherwise
        return value.numpy()
    return np.asarray(value)


# ---------------------------------------------------------------- the renaming rule


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The torch state-dict key of the Flax leaf ``variables[collection][path]``.

    >>> torch_key("params", ("layer1", "0", "conv1", "kernel"))
    'layer1.0.conv1.weight'
    >>> torch_key("batch_stats", ("features", "0", "1", "var"))
    'features.0.1.running_var'
    """
    leaf = {
        ("params", "kernel"): "weight",
        ("params", "scale"): "weight",
        ("params", "bias"): "bias",
        ("batch_stats", "mean"): "running_mean",
        ("batch_stats", "var"): "running_var",
    }.get((collection, path[-1]))
    if leaf is None:
        raise ValueError(f"no torch counterpart for Flax leaf {collection}/{'/'.join(path)}")
    return ".".join((*path[:-1], leaf))


def to_flax_layout(value: np.ndarray, flax_leaf: str) -> np.ndarray:
    """torch layout -> Flax layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if flax_leaf == "kernel" and value.ndim == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if flax_leaf == "kernel" and value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def to_torch_shape(flax_shape: tuple[int, ...], flax_leaf: str) -> tuple[int, ...]:
    """Inverse of :func:`to_flax_layout` on shapes (for error messages)."""
    if flax_leaf == "kernel" and len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if flax_leaf == "kernel" and len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, (*prefix, str(key)))
        else:
            yield (*prefix, str(key)), value


def _set_leaf(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _to_mutable(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _to_mutable(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


# ---------------------------------------------------------------- matching


def _check_arch(arch: str) -> None:
    if arch not in CLASSIFIERS:
        raise ValueError(
            f"unsupported arch {arch!r}; jaxcam imports torchvision {', '.join(ARCHS)}"
        )


def infer_num_classes(state_dict: StateDict, arch: str) -> int | None:
    """``num_classes`` from the classifier weight ``(num_classes, in)``, None if absent."""
    _check_arch(arch)
    weight = state_dict.get(CLASSIFIERS[arch] + ".weight")
    if weight is None or weight.ndim != 2:
        return None
    return int(weight.shape[0])


def match_state_dict(
    state_dict: StateDict, model: Any, abstract: Mapping[str, Any] | None = None
) -> MatchReport:
    """Compare a cleaned state dict with ``model``'s variables (torch names and layouts).

    ``abstract``: the model's variable tree (shapes only), if already computed.
    """
    if abstract is None:
        abstract = model.abstract_variables()
    expected: dict[str, tuple[int, ...]] = {}
    for collection, tree in abstract.items():
        for path, leaf in _leaves(tree):
            expected[torch_key(collection, path)] = to_torch_shape(tuple(leaf.shape), path[-1])
    missing = tuple(k for k in expected if k not in state_dict)
    unexpected = tuple(k for k in state_dict if k not in expected)
    mismatched = tuple(
        (k, tuple(state_dict[k].shape), shape)
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != shape
    )
    return MatchReport(model.arch, missing, unexpected, mismatched, guess_arch(state_dict))


def guess_arch(state_dict: StateDict) -> str | None:
    """Name the torchvision architecture a state dict's keys and shapes look like.

    Recognises ResNet-18/34/50/101/152, Wide ResNet-50/101-2, ResNeXt,
    VGG-11/13/16/19 (with and without BN) and EfficientNet-B0 (other
    EfficientNets are named as such). None when unrecognised.
    """
    keys = set(state_dict)

    def count(prefix: str) -> int:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        return len({m.group(1) for k in keys if (m := pat.match(k))})

    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        blocks = tuple(count(f"layer{s}.") for s in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in keys
        names = {
            ((2, 2, 2, 2), False): "resnet18",
            ((3, 4, 6, 3), False): "resnet34",
            ((3, 4, 6, 3), True): "resnet50",
            ((3, 4, 23, 3), True): "resnet101",
            ((3, 8, 36, 3), True): "resnet152",
        }
        name = names.get((blocks, bottleneck))
        if name is None:
            return None
        conv2 = state_dict.get("layer1.0.conv2.weight")
        if bottleneck and conv2 is not None and conv2.shape[0] != 64:
            out_channels, per_group = conv2.shape[0], conv2.shape[1]
            if per_group != out_channels:  # grouped 3x3 conv: ResNeXt
                return f"resnext{name[6:]}_{out_channels // per_group}x{per_group}d"
            return f"wide_{name}_{out_channels // 64}"
        return name
    if "classifier.6.weight" in keys and any(k.startswith("features.") for k in keys):
        convs = sum(
            1
            for k in keys
            if k.startswith("features.") and k.endswith(".weight") and state_dict[k].ndim == 4
        )
        depth = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}.get(convs)
        if depth is None:
            return None
        bn = any(k.startswith("features.") and k.endswith("running_mean") for k in keys)
        return depth + ("_bn" if bn else "")
    if "features.0.0.weight" in keys and any(".block." in k for k in keys):
        blocks = tuple(count(f"features.{s}.") for s in range(1, 8))
        stem = state_dict["features.0.0.weight"].shape[0]
        if blocks == (1, 2, 2, 3, 3, 4, 1) and stem == 32:
            return "efficientnet_b0"
        return f"an EfficientNet other than B0 (blocks per stage {blocks}, stem {stem} channels)"
    return None


def _mismatch_message(report: MatchReport, source: str) -> str:
    n = (len(report.missing), len(report.unexpected), len(report.mismatched))
    head = (
        f"the weights in {source} do not fit {report.arch}: {n[0]} missing keys, "
        f"{n[1]} unexpected keys, {n[2]} shape mismatches."
    )
    if report.guess and report.guess != report.arch:
        what = report.guess if report.guess.startswith("an ") else f"a torchvision {report.guess}"
        cause = (
            f" This looks like {what} file; jaxcam supports {', '.join(ARCHS)}. "
            f"Is --arch (arch={report.arch!r}) right?"
        )
    elif report.guess == report.arch and not report.missing and not report.unexpected:
        cause = (
            f" The file is a {report.arch} with a different classifier or widths; for a new "
            "head (fine-tuning) load with strict=False, which keeps the randomly "
            "initialised layers that do not fit."
        )
    elif report.guess == report.arch:
        cause = f" The file looks like a {report.arch} but is incomplete or modified."
    else:
        cause = (
            f" Is arch={report.arch!r} (--arch) right, and is the file a torchvision state dict?"
        )
    prefix_hint = _prefix_hint(report)
    return (
        head
        + cause
        + prefix_hint
        + "\n"
        + report.describe()
        + "\nPass strict=False to load the tensors that fit and keep the rest at their "
        "initial values."
    )


def _prefix_hint(report: MatchReport) -> str:
    """If the unexpected keys are '<one prefix>.<missing key>', say so."""
    if not report.missing or not report.unexpected:
        return ""
    missing = set(report.missing)
    prefixes = {
        k.split(".", 1)[0] for k in report.unexpected if "." in k and k.split(".", 1)[1] in missing
    }
    if len(prefixes) == 1:
        (p,) = prefixes
        return f" Keys carry an extra {p + '.'!r} prefix; strip it from the state dict."
    return ""


# ---------------------------------------------------------------- public entry points


def load_torchvision(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    arch: str,
    strict: bool = True,
    *,
    num_classes: int | None = None,
    rng: jax.Array | None = None,
) -> tuple[Any, dict[str, Any]]:
    """torchvision weights -> ``(model, variables)`` for ``arch``.

    Args:
      path_or_state_dict: a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file,
        or a state dict (torch tensors or numpy arrays).
      arch: ``"resnet50"``, ``"vgg19"`` or ``"efficientnet_b0"``.
      strict: if True (default), every variable must come from the file with
        the right shape and the file must hold nothing else, else
        :class:`WeightsMismatchError` (a ValueError) lists missing keys,
        unexpected keys and shape mismatches and names the likely cause. If
        False, the tensors that fit are loaded, the other variables keep a
        fresh torchvision-style initialisation (from ``rng``, default key 0),
        and a :class:`WeightsMismatchWarning` lists what did not fit.
      num_classes: default: read from the classifier weight ``(num_classes, in)``.
        A different value makes the classifier a mismatch (useful with
        ``strict=False`` to put a new head on an ImageNet backbone).
      rng: key for the variables the file does not provide (strict=False only).

    Returns:
      ``(model, variables)`` with ``variables = {"params": ..., "batch_stats": ...}``
      (VGG19: params only), float32 jax arrays.
    """
    from jaxcam import models

    _check_arch(arch)
    if isinstance(path_or_state_dict, Mapping):
        state_dict, source = clean_state_dict(path_or_state_dict), "the given state dict"
    else:
        state_dict = read_state_dict(path_or_state_dict)
        source = repr(str(path_or_state_dict))
    inferred = infer_num_classes(state_dict, arch)
    if num_classes is None:
        num_classes = inferred if inferred is not None else 1000
    model = models.get(arch, num_classes=int(num_classes))
    abstract = model.abstract_variables()
    report = match_state_dict(state_dict, model, abstract)
    if not report.ok and strict:
        raise WeightsMismatchError(_mismatch_message(report, source), report)

    if report.ok:
        base = abstract
    else:
        base = _to_mutable(model.init(rng if rng is not None else jax.random.key(0), 64))
        warnings.warn(
            f"strict=False: {len(report.missing) + len(report.mismatched)} variables of "
            f"{arch} were not in {source} (or had another shape) and keep their initial "
            f"values; {len(report.unexpected)} keys of the file were ignored.\n"
            + report.describe(),
            WeightsMismatchWarning,
            stacklevel=2,
        )
    bad = set(report.missing) | {k for k, _, _ in report.mismatched}
    variables: dict[str, Any] = {}
    for collection, tree in base.items():
        for path, leaf in _leaves(tree):
            key = torch_key(collection, path)
            if key in bad:
                value = jnp.asarray(leaf)
            else:
                value = jnp.asarray(to_flax_layout(state_dict[key], path[-1]))
            _set_leaf(variables.setdefault(collection, {}), path, value)
    return model, variables

