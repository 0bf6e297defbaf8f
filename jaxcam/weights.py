"""Import torchvision and timm state dicts (``.pth`` / ``.pt`` / ``.safetensors``) into jaxcam.

The Flax variable tree mirrors torchvision's module paths (docs/models.md), so
the import is a mechanical renaming, one rule per leaf:

============================  ======================================  ==================
torch key                     Flax leaf                               value
============================  ======================================  ==================
``m.weight`` (Conv2d)         ``params[...m]["kernel"]``              OIHW -> HWIO
``m.weight`` (Linear)         ``params[...m]["kernel"]``              ``w.T``
``m.weight`` (BN, LayerNorm)  ``params[...m]["scale"]``               as is
``m.bias``                    ``params[...m]["bias"]``                as is
``m.running_mean``            ``batch_stats[...m]["mean"]``           as is
``m.running_var``             ``batch_stats[...m]["var"]``            as is
``m.num_batches_tracked``     (dropped)
``m.in_proj_weight``          ``params[...m]["in_proj"]["kernel"]``   ``w.T`` (D, 3D)
``m.in_proj_bias``            ``params[...m]["in_proj"]["bias"]``     as is
``class_token``               ``params["class_token"]``               as is
``encoder.pos_embedding``     ``params["encoder"]["pos_embedding"]``  as is
============================  ======================================  ==================

``[...m]`` is ``m.split(".")`` as nested dict keys. ``in_proj_weight`` / ``in_proj_bias``
are the bare parameters of torch's ``nn.MultiheadAttention`` (its fused query, key,
value projection), a Dense ``in_proj`` in Flax; ``class_token`` and ``pos_embedding``
are bare ``nn.Parameter`` s of torchvision's ViT. The rule is applied backwards: the
expected torch keys are derived from the model's own variable tree, so nothing here is
written per architecture except the name of the classifier (from which
``num_classes`` is read). VGG19's first dense layer needs no permutation: the Flax
model flattens in torch's C, H, W order.

timm files (:func:`load_timm`) go through the same rule followed by a renaming of
whole keys (:func:`timm_key`): identity for ResNet-50, timm's ``blocks.{i}.attn.qkv``
etc. for ViTs, ``conv_stem`` / ``blocks.{s}.{i}.conv_dw`` etc. for EfficientNet-B0;
the tensors are the same. :func:`detect_source` tells torchvision from timm (and the
architecture) by the keys; :func:`load_weights` dispatches on it and returns the
preprocessing that goes with the weights (docs/weights.md).

``.safetensors`` files are read with ``safetensors.numpy`` (no PyTorch);
``.pth`` / ``.pt`` / ``.bin`` need PyTorch (``torch.load(weights_only=True)``).
jaxcam never downloads anything: see docs/weights.md for getting the files.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcam.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

StateDict = Mapping[str, np.ndarray]

# The torch module holding each architecture's classifier (its weight is (num_classes, in)).
CLASSIFIERS: dict[str, str] = {
    "resnet50": "fc",
    "vgg19": "classifier.6",
    "efficientnet_b0": "classifier.1",
    "vit_b_16": "heads.head",
    "vit_s_16": "heads.head",
    "vit_ti_16": "heads.head",
}
ARCHS: tuple[str, ...] = tuple(CLASSIFIERS)

# timm architecture -> the jaxcam model its tensors load into.
TIMM_ARCHS: dict[str, str] = {
    "vit_base_patch16_224": "vit_b_16",
    "vit_small_patch16_224": "vit_s_16",
    "vit_tiny_patch16_224": "vit_ti_16",
    "resnet50": "resnet50",
    "efficientnet_b0": "efficientnet_b0",
}
LIBRARIES = ("torchvision", "timm")

# torch parameters that sit directly on a module (no weight/bias pair): same name in Flax.
BARE_PARAMETERS = ("class_token", "pos_embedding")
# Flax Dense modules that torch stores as bare parameters <name>_weight / <name>_bias of
# the parent module (nn.MultiheadAttention's fused input projection).
FUSED_LINEARS = ("in_proj",)

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
    """How a torch state dict fits a jaxcam model, in the file's key names.

    Attributes:
      arch: the architecture the state dict was matched against.
      missing: keys the model needs that the state dict lacks.
      unexpected: state-dict keys the model has no place for.
      mismatched: ``(key, shape in the file, shape the model needs)`` in torch layout.
      guess: the architecture the keys look like (in ``library``'s names), or None.
      library: whose key names the file was matched in: "torchvision" or "timm".
    """

    arch: str
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    guess: str | None = None
    library: str = "torchvision"

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
    >>> torch_key("params", ("encoder", "layers", "encoder_layer_0", "self_attention",
    ...                      "in_proj", "kernel"))
    'encoder.layers.encoder_layer_0.self_attention.in_proj_weight'
    """
    if collection == "params" and path[-1] in BARE_PARAMETERS:
        return ".".join(path)
    leaf = {
        ("params", "kernel"): "weight",
        ("params", "scale"): "weight",
        ("params", "bias"): "bias",
        ("batch_stats", "mean"): "running_mean",
        ("batch_stats", "var"): "running_var",
    }.get((collection, path[-1]))
    if leaf is None:
        raise ValueError(f"no torch counterpart for Flax leaf {collection}/{'/'.join(path)}")
    if collection == "params" and len(path) >= 2 and path[-2] in FUSED_LINEARS:
        return ".".join((*path[:-2], f"{path[-2]}_{leaf}"))
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


def _check_library(library: str) -> None:
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}; choose one of {', '.join(LIBRARIES)}")


# ---------------------------------------------------------------- timm's key names

# jaxcam's torch-style ViT keys -> timm's; the first matching pattern applies.
_TIMM_VIT_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement) for pattern, replacement in (
        (r"^class_token$", "cls_token"),
        (r"^conv_proj\.", "patch_embed.proj."),
        (r"^encoder\.pos_embedding$", "pos_embed"),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$",
         r"blocks.\1.attn.qkv.\2"),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.",
         r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.3\.", r"blocks.\1.mlp.fc2."),
        (r"^encoder\.ln\.", "norm."),
        (r"^heads\.head\.", "head."),
    )
)
# torchvision EfficientNet MBConv `block.{j}.{m}` -> timm's module, per block kind.
# Depthwise-separable blocks (expand ratio 1: stage 1) have no expansion conv, and timm
# names their projection `conv_pw` / `bn2`; inverted-residual blocks use `conv_pw` for
# the expansion and `conv_pwl` / `bn3` for the projection.
_TIMM_DS_BLOCK = {("0", "0"): "conv_dw", ("0", "1"): "bn1", ("1", "fc1"): "se.conv_reduce",
                  ("1", "fc2"): "se.conv_expand", ("2", "0"): "conv_pw", ("2", "1"): "bn2"}
_TIMM_IR_BLOCK = {("0", "0"): "conv_pw", ("0", "1"): "bn1", ("1", "0"): "conv_dw",
                  ("1", "1"): "bn2", ("2", "fc1"): "se.conv_reduce",
                  ("2", "fc2"): "se.conv_expand", ("3", "0"): "conv_pwl", ("3", "1"): "bn3"}
_TIMM_EFFICIENTNET_TOP = {"features.0.0": "conv_stem", "features.0.1": "bn1",
                          "features.8.0": "conv_head", "features.8.1": "bn2",
                          "classifier.1": "classifier"}
_MBCONV_KEY = re.compile(r"^features\.(\d+)\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$")


def timm_key(key: str, arch: str) -> str:
    """timm's state-dict key for jaxcam's torch-style ``key`` of model ``arch``.

    >>> timm_key("encoder.layers.encoder_layer_3.self_attention.in_proj_weight", "vit_b_16")
    'blocks.3.attn.qkv.weight'
    >>> timm_key("features.2.0.block.3.1.running_var", "efficientnet_b0")
    'blocks.1.0.bn3.running_var'
    """
    if arch == "resnet50":  # timm's ResNet keeps torchvision's names
        return key
    if arch.startswith("vit_"):
        for pattern, replacement in _TIMM_VIT_RULES:
            if pattern.search(key):
                return pattern.sub(replacement, key, count=1)
    elif arch == "efficientnet_b0":
        from jaxcam.models.efficientnet import B0_CONFIG

        module, _, leaf = key.rpartition(".")
        if module in _TIMM_EFFICIENTNET_TOP:
            return f"{_TIMM_EFFICIENTNET_TOP[module]}.{leaf}"
        if m := _MBCONV_KEY.match(key):
            stage, block, sub, part, leaf = m.groups()
            depthwise_separable = B0_CONFIG[int(stage) - 1].expand_ratio == 1
            table = _TIMM_DS_BLOCK if depthwise_separable else _TIMM_IR_BLOCK
            if (sub, part) in table:
                return f"blocks.{int(stage) - 1}.{block}.{table[sub, part]}.{leaf}"
    raise ValueError(f"no timm counterpart for {arch} key {key!r}")


def _file_key(library: str, arch: str) -> Callable[[str, tuple[str, ...]], str]:
    """``(collection, flax path) -> key in a `library` state dict of `arch`."""
    _check_library(library)
    if library == "timm":
        return lambda collection, path: timm_key(torch_key(collection, path), arch)
    return torch_key


# ---------------------------------------------------------------- matching


def infer_num_classes(state_dict: StateDict, arch: str, library: str = "torchvision"
                      ) -> int | None:
    """``num_classes`` from the classifier weight ``(num_classes, in)``, None if absent."""
    _check_arch(arch)
    key = CLASSIFIERS[arch] + ".weight"
    weight = state_dict.get(timm_key(key, arch) if library == "timm" else key)
    if weight is None or weight.ndim != 2:
        return None
    return int(weight.shape[0])


def match_state_dict(
    state_dict: StateDict, model: Any, abstract: Mapping[str, Any] | None = None,
    library: str = "torchvision",
) -> MatchReport:
    """Compare a cleaned state dict with ``model``'s variables (the file's key names,
    torch layouts). ``library``: whose key names the file uses ("torchvision", "timm").

    ``abstract``: the model's variable tree (shapes only), if already computed.
    """
    key_of = _file_key(library, model.arch)
    if abstract is None:
        abstract = model.abstract_variables()
    expected: dict[str, tuple[int, ...]] = {}
    for collection, tree in abstract.items():
        for path, leaf in _leaves(tree):
            expected[key_of(collection, path)] = to_torch_shape(tuple(leaf.shape), path[-1])
    missing = tuple(k for k in expected if k not in state_dict)
    unexpected = tuple(k for k in state_dict if k not in expected)
    mismatched = tuple(
        (k, tuple(state_dict[k].shape), shape)
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != shape
    )
    guess = guess_timm_arch(state_dict) if library == "timm" else guess_arch(state_dict)
    return MatchReport(model.arch, missing, unexpected, mismatched, guess, library)


def _count_indices(keys: set[str], prefix: str) -> int:
    """How many distinct integers ``n`` appear in keys ``<prefix><n>.*``."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in keys if (m := pat.match(k))})


# (width, depth, patch) -> name, as torchvision / timm call their ViTs.
_TORCHVISION_VITS = {(768, 12, 16): "vit_b_16", (768, 12, 32): "vit_b_32",
                     (1024, 24, 16): "vit_l_16", (1024, 24, 32): "vit_l_32",
                     (1280, 32, 14): "vit_h_14", (384, 12, 16): "vit_s_16",
                     (192, 12, 16): "vit_ti_16"}
_TIMM_VIT_WIDTHS = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def _vit_geometry(state_dict: StateDict, cls: str, pos: str, patch: str, blocks: str
                  ) -> tuple[int, int, int, int] | None:
    """(width, depth, patch size, stored grid side) of a ViT state dict, or None."""
    if cls not in state_dict or pos not in state_dict or patch not in state_dict:
        return None
    width = int(state_dict[cls].shape[-1])
    depth = _count_indices(set(state_dict), blocks)
    patch_size = int(state_dict[patch].shape[-1])
    tokens = int(state_dict[pos].shape[1]) - 1
    return width, depth, patch_size, math.isqrt(tokens)


def guess_arch(state_dict: StateDict) -> str | None:
    """Name the torchvision architecture a state dict's keys and shapes look like.

    Recognises ResNet-18/34/50/101/152, Wide ResNet-50/101-2, ResNeXt,
    VGG-11/13/16/19 (with and without BN), EfficientNet-B0 (other
    EfficientNets are named as such) and ViT-B/16, B/32, L/16, L/32, H/14 (plus
    jaxcam's vit_s_16 / vit_ti_16 in torchvision's layout; another training size is
    named). None when unrecognised.
    """
    keys = set(state_dict)

    def count(prefix: str) -> int:
        return _count_indices(keys, prefix)

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
    vit = _vit_geometry(state_dict, "class_token", "encoder.pos_embedding", "conv_proj.weight",
                        "encoder.layers.encoder_layer_")
    if vit is not None:
        width, depth, patch, grid = vit
        name = _TORCHVISION_VITS.get((width, depth, patch))
        if name is None:
            return f"a ViT other than {', '.join(sorted(set(_TORCHVISION_VITS.values())))} " \
                   f"(width {width}, {depth} blocks, {patch} px patches)"
        if grid * patch != 224 and name in CLASSIFIERS:
            return (f"{name} trained at {grid * patch} px (position embeddings for a "
                    f"{grid}x{grid} grid; jaxcam's {name} stores them for 224 px)")
        return name
    return None


def guess_timm_arch(state_dict: StateDict) -> str | None:
    """Name the timm architecture a state dict's keys and shapes look like.

    Recognises ViTs (``vit_{tiny,small,base,large,huge}_patch{p}_{size}``),
    EfficientNet-B0 (others named as such) and ResNets, whose keys are torchvision's
    (named as :func:`guess_arch` does). None when unrecognised.
    """
    keys = set(state_dict)
    vit = _vit_geometry(state_dict, "cls_token", "pos_embed", "patch_embed.proj.weight",
                        "blocks.")
    if vit is not None:
        width, depth, patch, grid = vit
        word = _TIMM_VIT_WIDTHS.get(width)
        if word is None:
            return f"a timm ViT of width {width} ({depth} blocks, {patch} px patches)"
        return f"vit_{word}_patch{patch}_{grid * patch}"
    if "conv_stem.weight" in keys and any(k.startswith("blocks.") for k in keys):
        blocks = tuple(_count_indices(keys, f"blocks.{s}.") for s in range(7))
        stem = state_dict["conv_stem.weight"].shape[0]
        if blocks == (1, 2, 2, 3, 3, 4, 1) and stem == 32 and "conv_head.weight" in keys:
            return "efficientnet_b0"
        return f"an EfficientNet other than B0 (blocks per stage {blocks}, stem {stem} channels)"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return guess_arch(state_dict)
    return None


def _mismatch_message(report: MatchReport, source: str, state_dict: StateDict) -> str:
    n = (len(report.missing), len(report.unexpected), len(report.mismatched))
    head = (
        f"the weights in {source} do not fit {report.arch}: {n[0]} missing keys, "
        f"{n[1]} unexpected keys, {n[2]} shape mismatches."
    )
    timm = report.library == "timm"
    supported = ", ".join(TIMM_ARCHS if timm else ARCHS)
    guess = TIMM_ARCHS.get(report.guess, report.guess) if timm else report.guess
    other = guess_arch(state_dict) if timm else guess_timm_arch(state_dict)
    if report.guess is None and other in (CLASSIFIERS if timm else TIMM_ARCHS):
        loader, other_library = (("load_torchvision", "torchvision") if timm
                                 else ("load_timm", "timm"))
        cause = (
            f" This looks like a {other_library} {other} file, not a {report.library} one: "
            f"load it with jaxcam.weights.{loader}(path, {other!r}), or with jaxcam.load(path) "
            "(jaxcam convert), which tell the libraries apart by the keys."
        )
    elif guess and guess != report.arch:
        what = (report.guess if report.guess.startswith(("an ", "a "))
                else f"a {report.library} {report.guess}")
        cause = (
            f" This looks like {what} file; jaxcam supports {report.library} {supported}. "
            f"Is --arch (arch={report.arch!r}) right?"
        )
    elif guess == report.arch and not report.missing and not report.unexpected:
        cause = (
            f" The file is a {report.arch} with a different classifier or widths; for a new "
            "head (fine-tuning) load with strict=False, which keeps the randomly "
            "initialised layers that do not fit."
        )
    elif guess == report.arch:
        cause = f" The file looks like a {report.arch} but is incomplete or modified."
    else:
        cause = (
            f" Is arch={report.arch!r} (--arch) right, and is the file a {report.library} "
            "state dict?"
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


def _state_dict_and_source(path_or_state_dict: str | os.PathLike | Mapping[str, Any]
                           ) -> tuple[dict[str, np.ndarray], str]:
    if isinstance(path_or_state_dict, Mapping):
        return clean_state_dict(path_or_state_dict), "the given state dict"
    return read_state_dict(path_or_state_dict), repr(str(path_or_state_dict))


def _load(state_dict: dict[str, np.ndarray], source: str, arch: str, library: str,
          strict: bool, num_classes: int | None, rng: jax.Array | None
          ) -> tuple[Any, dict[str, Any]]:
    """The strict (or not) import of a cleaned state dict into jaxcam's ``arch``."""
    from jaxcam import models

    inferred = infer_num_classes(state_dict, arch, library)
    if num_classes is None:
        num_classes = inferred if inferred is not None else 1000
    model = models.get(arch, num_classes=int(num_classes))
    abstract = model.abstract_variables()
    report = match_state_dict(state_dict, model, abstract, library)
    if not report.ok and strict:
        raise WeightsMismatchError(_mismatch_message(report, source, state_dict), report)

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
            stacklevel=3,
        )
    key_of = _file_key(library, arch)
    bad = set(report.missing) | {k for k, _, _ in report.mismatched}
    variables: dict[str, Any] = {}
    for collection, tree in base.items():
        for path, leaf in _leaves(tree):
            key = key_of(collection, path)
            if key in bad:
                value = jnp.asarray(leaf)
            else:
                value = jnp.asarray(to_flax_layout(state_dict[key], path[-1]))
            _set_leaf(variables.setdefault(collection, {}), path, value)
    return model, variables


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
      arch: ``"resnet50"``, ``"vgg19"``, ``"efficientnet_b0"`` or ``"vit_b_16"``
        (``"vit_s_16"`` / ``"vit_ti_16"``: the same layout at other widths).
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
      (VGG19 and ViTs: params only), float32 jax arrays.
    """
    _check_arch(arch)
    state_dict, source = _state_dict_and_source(path_or_state_dict)
    return _load(state_dict, source, arch, "torchvision", strict, num_classes, rng)


def _split_timm_name(arch: str) -> tuple[str, str | None]:
    """``"timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"`` -> (name, tag); the
    ``timm/`` prefix (the Hugging Face hub's) and the tag are optional."""
    name = arch.removeprefix("timm/")
    name, _, tag = name.partition(".")
    return name, tag or None


def load_timm(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    arch: str,
    strict: bool = True,
    *,
    num_classes: int | None = None,
    rng: jax.Array | None = None,
) -> tuple[Any, dict[str, Any]]:
    """timm weights -> ``(model, variables)``, exactly as :func:`load_torchvision`
    (strict by default, every mismatch listed, in timm's key names).

    Args:
      path_or_state_dict: ``model.safetensors`` as the Hugging Face hub ships timm
        weights, a ``.pth`` / ``.pt`` / ``.bin`` file, or a state dict.
      arch: timm's name: ``"vit_base_patch16_224"``, ``"vit_small_patch16_224"``,
        ``"vit_tiny_patch16_224"``, ``"resnet50"`` or ``"efficientnet_b0"``, optionally
        as a hub id, ``"timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"`` (the
        pretrained tag matters only for the preprocessing, :func:`timm_preprocessing`).
        The model is jaxcam's ``vit_b_16``, ``vit_s_16``, ``vit_ti_16``, ``resnet50``,
        ``efficientnet_b0`` (``TIMM_ARCHS``).
      strict, num_classes, rng: as in :func:`load_torchvision`.
    """
    name, _ = _split_timm_name(arch)
    if name not in TIMM_ARCHS:
        raise ValueError(
            f"unsupported timm arch {arch!r}; jaxcam imports timm {', '.join(TIMM_ARCHS)}"
        )
    state_dict, source = _state_dict_and_source(path_or_state_dict)
    return _load(state_dict, source, TIMM_ARCHS[name], "timm", strict, num_classes, rng)


# ---------------------------------------------------------------- where a file came from

# timm's default pretrained tag of each architecture: (tag, crop_pct, mean, std), as
# timm 1.0's pretrained_cfg gives them (tests/test_weights_timm.py compares).
_HALF = (0.5, 0.5, 0.5)
TIMM_DEFAULT_CFG: dict[str, tuple[str, float, tuple[float, ...], tuple[float, ...]]] = {
    "vit_base_patch16_224": ("augreg2_in21k_ft_in1k", 0.9, _HALF, _HALF),
    "vit_small_patch16_224": ("augreg_in21k_ft_in1k", 0.9, _HALF, _HALF),
    "vit_tiny_patch16_224": ("augreg_in21k_ft_in1k", 0.9, _HALF, _HALF),
    "resnet50": ("a1_in1k", 0.95, IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b0": ("ra_in1k", 0.875, IMAGENET_MEAN, IMAGENET_STD),
}


def timm_preprocessing(arch: str, image_size: int = 224) -> Preprocessing:
    """timm's eval preprocessing for ``arch`` (``name`` or ``timm/name.tag``) at
    ``image_size``: resize the shorter side to ``floor(image_size / crop_pct)``, centre
    crop, the tag's mean/std (ViTs 0.5/0.5; ResNet-50 ``a1_in1k`` and EfficientNet-B0
    ``ra_in1k``: ImageNet's). A tag other than the default is looked up in timm's own
    registry (``timm.models.get_pretrained_cfg``, offline), which needs timm installed.
    timm resizes bicubically; jaxcam's resize is bilinear (docs/weights.md)."""
    name, tag = _split_timm_name(arch)
    if name not in TIMM_DEFAULT_CFG:
        raise ValueError(f"unsupported timm arch {arch!r}; choose one of {', '.join(TIMM_ARCHS)}")
    default_tag, crop_pct, mean, std = TIMM_DEFAULT_CFG[name]
    if tag is not None and tag != default_tag:
        try:
            from timm.models import get_pretrained_cfg
        except ImportError:
            raise ValueError(
                f"the preprocessing of {arch!r} (a non-default pretrained tag) comes from "
                f"timm's registry: `pip install timm`, or drop the tag for {name}.{default_tag}"
            ) from None
        try:
            cfg = get_pretrained_cfg(f"{name}.{tag}")
        except RuntimeError:  # timm's answer to an unknown tag
            cfg = None
        if cfg is None:
            raise ValueError(f"timm has no pretrained tag {name}.{tag}; see timm.list_pretrained"
                             f"({name + '.*'!r})")
        crop_pct, mean, std = cfg.crop_pct, tuple(cfg.mean), tuple(cfg.std)
    return Preprocessing(image_size=int(image_size),
                         resize_size=math.floor(int(image_size) / crop_pct),
                         mean=tuple(mean), std=tuple(std))


@dataclass(frozen=True)
class WeightsSource:
    """Which library and architecture a state dict is from (:func:`detect_source`).

    Attributes:
      library: "torchvision" or "timm".
      arch: the library's name (timm: with its pretrained tag when one was given).
    """

    library: str
    arch: str

    @property
    def model_arch(self) -> str:
        """The jaxcam model the weights load into (``jaxcam.models.get``)."""
        return TIMM_ARCHS[_split_timm_name(self.arch)[0]] if self.library == "timm" else self.arch

    def preprocessing(self, image_size: int = 224) -> Preprocessing:
        """The eval preprocessing that goes with these weights: torchvision's
        (:meth:`Preprocessing.imagenet`) or timm's (:func:`timm_preprocessing`)."""
        if self.library == "timm":
            return timm_preprocessing(self.arch, image_size)
        return Preprocessing.imagenet(int(image_size))


def _requested(arch: str) -> tuple[str | None, str]:
    """``arch`` as the user wrote it -> (library or None, name with any tag)."""
    for library in LIBRARIES:
        if arch.startswith(library + "/"):
            return library, arch[len(library) + 1:]
    return None, arch


def model_arch(arch: str) -> str:
    """The jaxcam model name for any accepted ``arch`` spelling: jaxcam/torchvision
    names as they are, timm names (``vit_base_patch16_224``, ``timm/resnet50.a1_in1k``)
    through ``TIMM_ARCHS``."""
    library, name = _requested(arch)
    base = _split_timm_name(name)[0]
    if library == "timm" or (library is None and base in TIMM_ARCHS and name not in CLASSIFIERS):
        return TIMM_ARCHS.get(base, base)
    return name


def detect_source(state_dict: StateDict, arch: str | None = None) -> WeightsSource:
    """Tell from its keys which library (torchvision or timm) and which architecture
    a cleaned state dict comes from.

    With ``arch=None`` the keys decide; a ResNet-50 is ambiguous (timm keeps
    torchvision's keys; only the preprocessing differs), so is a file matching
    nothing supported: both raise ValueError naming what the keys look like and the
    ``arch=`` that settles it. With ``arch`` (a jaxcam/torchvision name such as
    ``"vit_b_16"``, a timm name such as ``"vit_base_patch16_224"``, or either prefixed
    ``"torchvision/"`` / ``"timm/"``, timm names with an optional ``.tag``) the keys
    choose the library when the architecture agrees; otherwise the source is the one
    ``arch`` names and loading it reports the mismatch.
    """
    torchvision_guess, timm_guess = guess_arch(state_dict), guess_timm_arch(state_dict)
    found = []
    if torchvision_guess in CLASSIFIERS:
        found.append(WeightsSource("torchvision", torchvision_guess))
    if timm_guess in TIMM_ARCHS:
        found.append(WeightsSource("timm", timm_guess))
    if arch is not None:
        library, name = _requested(arch)
        wanted = model_arch(arch)
        fits = [s for s in found if s.model_arch == wanted
                and (library is None or s.library == library)]
        if library is None and len(fits) > 1:  # a ResNet-50 given as "resnet50"
            fits = [s for s in fits if s.library == "torchvision"]
        if fits:
            base, _ = _split_timm_name(name)
            named = fits[0].library == "timm" and base in TIMM_ARCHS  # keep the user's tag
            return WeightsSource(fits[0].library, name) if named else fits[0]
        if library is None:
            if name not in CLASSIFIERS and _split_timm_name(name)[0] not in TIMM_ARCHS:
                raise ValueError(
                    f"unsupported arch {arch!r}; jaxcam imports torchvision "
                    f"{', '.join(ARCHS)} and timm {', '.join(TIMM_ARCHS)}")
            library = "torchvision" if name in CLASSIFIERS else "timm"
        if library == "timm":
            base, _ = _split_timm_name(name)
            if base not in TIMM_ARCHS:
                raise ValueError(f"unsupported timm arch {arch!r}; jaxcam imports timm "
                                 f"{', '.join(TIMM_ARCHS)}")
            return WeightsSource("timm", name)
        _check_arch(name)
        return WeightsSource("torchvision", name)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = " or ".join(f"arch={s.library + '/' + s.arch!r}" for s in found)
        recipes = "; ".join(
            f"{s.library}: resize {p.resize_size}, crop {p.image_size}, mean {p.mean}"
            for s in found if (p := s.preprocessing()))
        raise ValueError(
            f"the keys are those of a {found[0].model_arch}, which torchvision and timm name "
            f"alike, so they do not say whose eval preprocessing goes with them ({recipes}): "
            f"pass {names} (--arch; a bare {found[0].arch!r} means torchvision's)")
    seen = [g for g in (torchvision_guess, timm_guess) if g is not None]
    if seen:
        what = seen[0] if seen[0].startswith(("a ", "an ")) else f"a {seen[0]}"
        looks = f"they look like {what}, which jaxcam does not import"
    else:
        first = ", ".join(sorted(state_dict)[:5])
        looks = f"they match no architecture jaxcam knows (first keys: {first})"
    raise ValueError(
        f"cannot tell the architecture from the keys: {looks}; jaxcam imports torchvision "
        f"{', '.join(ARCHS)} and timm {', '.join(TIMM_ARCHS)}. Pass arch= (--arch) to see "
        "which keys do not fit")


def load_weights(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    arch: str | None = None,
    strict: bool = True,
    *,
    image_size: int = 224,
) -> tuple[Any, dict[str, Any], Preprocessing]:
    """A torchvision or timm file (or state dict) -> ``(model, variables, preprocessing)``.

    The library and, with ``arch=None``, the architecture come from the keys
    (:func:`detect_source`); the preprocessing is the library's eval transform for the
    weights at ``image_size`` (:meth:`WeightsSource.preprocessing`: torchvision's
    resize 256 / crop 224 with ImageNet mean/std; timm's crop_pct resize with the
    pretrained tag's mean/std, 0.5/0.5 for ViTs). Loading is strict by default.
    """
    state_dict, source = _state_dict_and_source(path_or_state_dict)
    try:
        origin = detect_source(state_dict, arch)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    prep = origin.preprocessing(image_size)  # before the load: validates image_size
    model, variables = _load(state_dict, source, origin.model_arch, origin.library, strict,
                             None, None)
    return model, variables, prep



def random_torchvision(arch: str, num_classes: int = 1000, seed: int = 0):
    """``(torch_model, model, variables)``: torchvision's ``arch`` with its own random
    initialisation (``torch.manual_seed(seed)``, ``weights=None``), in eval mode with
    gradients on (pytorch-grad-cam needs them), and jaxcam's conversion of it
    (:func:`load_torchvision`): the same network in both libraries, for comparisons.

    torchvision initialises a ViT's classifier ``heads.head`` to zeros, which makes
    every gradient, hence every CAM, exactly 0; its weight is drawn from
    ``N(0, 0.02^2)`` instead (ViT's usual initialisation scale)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes).eval()
    if arch.startswith("vit_"):
        with torch.no_grad():
            net.heads.head.weight.normal_(0.0, 0.02)
    for p in net.parameters():
        p.requires_grad_(True)
    model, variables = load_torchvision(net.state_dict(), arch)
    return net, model, variables


def torchvision_module(net: Any, layer: str) -> Any:
    """The submodule of torchvision model ``net`` whose output is jaxcam's cut point
    ``layer`` (a canonical name, :meth:`Model.resolve_layer`): jaxcam names cut points by
    torchvision's module paths (``"layer4"``, ``"features.35"``,
    ``"encoder.layers.encoder_layer_11.ln_1"``). For hooks, e.g. pytorch-grad-cam's
    ``target_layers``."""
    module = net
    for part in layer.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def vit_reshape_transform(tokens: Any) -> Any:
    """pytorch-grad-cam's ``reshape_transform`` for a torchvision ViT: torch tokens
    ``(B, 1 + g*g, D)``, the class token first, -> the patch grid ``(B, D, g, g)``
    (channels first), as jaxcam's ViT ``to_grid`` does (without the transpose)."""
    g = math.isqrt(tokens.shape[1] - 1)
    return tokens[:, 1:].reshape(tokens.shape[0], g, g, tokens.shape[2]).permute(0, 3, 1, 2)
