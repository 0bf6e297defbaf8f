"""Adapters: a user's flax.linen or flax.nnx Module, or two plain JAX functions, as a
model jaxcam can explain (the model protocol, docs/models.md "Model protocol").

A cut point is a submodule whose ``__call__`` returns one floating array. Its name is
the framework's own module path: linen, the scope path joined by ``/``
(``"block2/conv_a"``); NNX, the attribute path joined by ``.`` (``"blocks.1.norm1"``).
``features(variables, x, layer)`` runs the model on ``x`` up to that submodule and
returns its output ``A``; ``head(variables, A, layer, x=x)`` runs the whole model on
``x`` with that submodule's output replaced by ``A``. Whatever crosses the cut without
going through ``A`` (a skip connection around it, a ViT's class token) is therefore
recomputed from ``x`` and held fixed: derivatives of ``head`` with respect to ``A`` are
partial derivatives, ``dS/dA`` with every other path frozen, which is what
pytorch-grad-cam's hooks compute. Under ``jit`` the part before the cut that the head
does not need is dead code that XLA removes (measured in docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

Array = jax.Array

DEFAULT_INPUT_SHAPE = (1, 224, 224, 3)

# Keyword arguments of a module's ``__call__`` that select eval mode, and their eval values.
EVAL_CALL_KWARGS: Mapping[str, bool] = FrozenDict({
    "train": False,
    "training": False,
    "is_training": False,
    "deterministic": True,
    "use_running_average": True,
})

# NNX module attributes set (through ``nnx.view``) to put a module in eval mode.
NNX_EVAL_ATTRIBUTES: Mapping[str, bool] = FrozenDict({
    "deterministic": True,
    "use_running_average": True,
})


# ---- token layouts ---------------------------------------------------------------


@dataclass(frozen=True)
class TokensToGrid:
    """``(B, N, D)`` tokens -> ``(B, h, w, D)`` grid: drop the first
    ``num_prefix_tokens`` (class / register tokens), lay the remaining ``h * w`` tokens
    out row-major (``token n + i * w + j`` -> cell ``(i, j)``). A pure re-indexing (a slice
    and a reshape), so it maps derivatives exactly as it maps activations."""

    num_prefix_tokens: int = 1
    grid: tuple[int, int] | None = None

    def __call__(self, tokens: Array) -> Array:
        if getattr(tokens, "ndim", 0) != 3:
            raise ValueError(
                f"tokens_to_grid expects tokens shaped (B, N, D), got shape "
                f"{tuple(getattr(tokens, 'shape', ()))}; it is for token activations (a ViT "
                "block), not a conv feature map, which needs no reshape"
            )
        n, d = tokens.shape[-2], tokens.shape[-1]
        m = n - self.num_prefix_tokens
        if self.grid is None:
            side = math.isqrt(max(m, 0))
            if m <= 0 or side * side != m:
                raise ValueError(
                    f"tokens_to_grid: {n} tokens minus {self.num_prefix_tokens} prefix tokens "
                    f"leaves {m}, not a square number; pass grid=(h, w) or the right "
                    "num_prefix_tokens"
                )
            h = w = side
        else:
            h, w = self.grid
            if h * w != m:
                raise ValueError(
                    f"tokens_to_grid: grid {h}x{w} = {h * w} cells but there are {m} tokens "
                    f"after the {self.num_prefix_tokens} prefix tokens (of {n})"
                )
        return tokens[:, self.num_prefix_tokens:].reshape(tokens.shape[0], h, w, d)


def tokens_to_grid(num_prefix_tokens: int = 1, grid: tuple[int, int] | None = None
                   ) -> TokensToGrid:
    """The `reshape=` for ViT-style layers: ``(B, N, D)`` tokens whose first
    ``num_prefix_tokens`` are class / register tokens, followed by an ``h x w`` grid of
    patch tokens in row-major order (a square when ``grid`` is None), to ``(B, h, w, D)``.
    Like pytorch-grad-cam's ``reshape_transform`` for ViTs, minus its NCHW transpose."""
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) \
            or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    if grid is not None:
        if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1
                                 for g in grid):
            raise ValueError(f"grid must be (h, w), two positive ints, got {grid!r}")
        grid = (int(grid[0]), int(grid[1]))
    return TokensToGrid(num_prefix_tokens, grid)


# ---- what one forward pass calls ------------------------------------------------


@dataclass(frozen=True)
class CutInfo:
    """What one traced forward pass (at the example input) saw of one submodule.

    output: "array" for one floating array, else a description ("a tuple of 2 arrays").
    shape, dtype: of the output at the example input (arrays only).
    calls: how many times it was called (> 1: shared, cannot be cut).
    is_output: its output is returned by the model as is (cutting there leaves no head).
    """

    name: str
    output: str
    shape: tuple[int, ...] | None
    dtype: str | None
    calls: int
    is_output: bool


def _describe(out: Any) -> str:
    if isinstance(out, jax.Array | np.ndarray):
        if jnp.issubdtype(out.dtype, jnp.inexact):
            return "array"
        return f"a {out.dtype} array (not floating, so it cannot be differentiated)"
    if out is None:
        return "None"
    leaves = jax.tree_util.tree_leaves(out)
    if isinstance(out, tuple | list):
        return f"a {type(out).__name__} of {len(out)} elements ({len(leaves)} arrays)"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out)}"
    return f"a {type(out).__name__}"


class _Recorder:
    """Records every submodule call of one forward pass, in the order outputs appear."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.starts: list[str] = []
        self.outputs: dict[str, Any] = {}

    def __call__(self, name: str, next_fun: Callable[..., Any], args: tuple, kwargs: dict
                 ) -> Any:
        if name not in self.calls:
            self.starts.append(name)
        self.calls[name] = self.calls.get(name, 0) + 1
        out = next_fun(*args, **kwargs)
        self.outputs.setdefault(name, out)
        return out

    def infos(self, final: Any) -> tuple[CutInfo, ...]:
        finals = {id(leaf) for leaf in jax.tree_util.tree_leaves(final)}
        infos = []
        for name, out in self.outputs.items():
            kind = _describe(out)
            array = kind == "array"
            infos.append(CutInfo(
                name, kind, tuple(out.shape) if array else None,
                str(out.dtype) if array else None, self.calls[name],
                array and id(out) in finals,
            ))
        return tuple(infos)


class _Captured(BaseException):
    """Carries the cut point's output out of the forward pass (``features`` stops there).
    A BaseException, so a user's ``except Exception`` in the model does not swallow it."""


class _Capture:
    def __init__(self, target: str) -> None:
        self.target = target

    def __call__(self, name: str, next_fun: Callable[..., Any], args: tuple, kwargs: dict
                 ) -> Any:
        out = next_fun(*args, **kwargs)
        if name == self.target:
            raise _Captured(out)
        return out


class _Substitute:
    """Replaces the cut point's output by ``A``. The submodule still runs (its output
    gives the expected shape); under jit nothing uses that output, so XLA drops it."""

    def __init__(self, model: _AdaptedModel, target: str, a: Any) -> None:
        self.model, self.target, self.a, self.calls = model, target, a, 0

    def __call__(self, name: str, next_fun: Callable[..., Any], args: tuple, kwargs: dict
                 ) -> Any:
        out = next_fun(*args, **kwargs)
        if name != self.target:
            return out
        self.calls += 1
        if self.calls > 1:
            raise ValueError(self.model._shared_message(name, self.calls))
        shape = tuple(getattr(self.a, "shape", ()))
        if not isinstance(out, jax.Array) or tuple(out.shape) != shape:
            raise ValueError(
                f"activations A at layer {name!r} of {self.model.arch} must have shape "
                f"{tuple(getattr(out, 'shape', ()))} (the layer's output on these images), got "
                f"{shape}; compute them with model.features(variables, x, layer={name!r}) and "
                "pass the same images and layer to head"
            )
        return self.a


# ---- linen: method interceptors --------------------------------------------------


def _linen_interceptor(handler: Callable[..., Any]) -> Callable[..., Any]:
    def interceptor(next_fun: Callable[..., Any], args: tuple, kwargs: dict,
                    context: nn.module.InterceptorContext) -> Any:
        if context.method_name != "__call__" or not context.module.path:
            return next_fun(*args, **kwargs)
        return handler("/".join(context.module.path), next_fun, args, kwargs)

    return interceptor


# ---- NNX: a per-instance __call__ substitution -----------------------------------

# Python looks `__call__` up on the type, so an instance attribute cannot replace it.
# The adapter merges a fresh copy of the module graph for every run and switches the
# class of the copies it watches to a subclass whose __call__ consults the active taps
# (a thread-local stack of {id(instance): (name, handler)}); the user's objects and
# classes are never touched, and the copies are discarded after the run.
_NNX_TAPS = threading.local()


@functools.cache
def _tapped_class(cls: type) -> type:
    original = cls.__call__

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        stack = getattr(_NNX_TAPS, "stack", None)
        tap = stack[-1].get(id(self)) if stack else None
        if tap is None:
            return original(self, *args, **kwargs)
        name, handler = tap
        return handler(name, functools.partial(original, self), args, kwargs)

    namespace = {"__call__": __call__, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    return type(cls)(cls.__name__, (cls,), namespace)


def _nnx_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _run_nnx(graphdef: Any, state: Any, x: Array, kwargs: Mapping[str, Any],
             handler: Callable[..., Any], only: str | None) -> Any:
    """``merge(graphdef, state)(x, **kwargs)`` with the submodule named `only` (all
    callable submodules when None) reporting its calls to `handler`."""
    module = nnx.merge(graphdef, state)
    taps = {}
    for path, sub in nnx.iter_modules(module):
        name = _nnx_name(path)
        if not path or (only is not None and name != only) or not callable(sub):
            continue
        object.__setattr__(sub, "__class__", _tapped_class(type(sub)))
        taps[id(sub)] = (name, handler)
    stack = getattr(_NNX_TAPS, "stack", None)
    if stack is None:
        stack = _NNX_TAPS.stack = []
    stack.append(taps)
    try:
        return module(x, **kwargs)
    finally:
        stack.pop()


# ---- the models ------------------------------------------------------------------


def _plain_dicts(tree: Any) -> Any:
    if isinstance(tree, Mapping) and not isinstance(tree, nnx.State):
        return {k: _plain_dicts(v) for k, v in tree.items()}
    return tree


@dataclass(frozen=True, kw_only=True)
class _AdaptedModel:
    """What the three adapters share: layer names, checks, `to_grid`, `head`'s contract.

    Attributes (the model protocol): arch, num_classes (C of (B, C) outputs, else None),
    layers (cut points in the order their outputs are computed), default_layer,
    aliases (none), param_order, min_image_size (1: the adapter knows no minimum),
    stochastic (False: adapters run eval mode only). `cuts` holds what the traced
    forward pass saw of every submodule, cut points or not.
    """

    arch: str
    num_classes: int | None
    layers: tuple[str, ...]
    default_layer: str
    reshape: Any = None
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float32"
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    cuts: tuple[CutInfo, ...] = field(default=(), compare=False, repr=False)
    param_order: tuple[str, ...] = field(default=(), compare=False)
    aliases: Mapping[str, str] = field(default_factory=lambda: FrozenDict({}), compare=False)
    min_image_size: int = field(default=1, compare=False)
    stochastic: bool = field(default=False, compare=False)

    # ---- layers ----------------------------------------------------------------

    def _info(self, name: str) -> CutInfo | None:
        return next((c for c in self.cuts if c.name == name), None)

    def resolve_layer(self, name: str | None) -> str:
        """`name` if it is a cut point (None -> `default_layer`); else ValueError listing
        the cut points and the closest names."""
        if name is None:
            return self.default_layer
        if isinstance(name, str) and name in self.layers:
            return name
        info = self._info(name) if isinstance(name, str) else None
        if info is not None:
            raise ValueError(
                f"submodule {name!r} of {self.arch} returns {info.output}, not one floating "
                "array, so it cannot be a cut point; cut at a submodule that returns an "
                "array (one of its children, or the submodule that consumes its output), or "
                "write the cut yourself with jaxcam.models.from_functions"
            )
        close = difflib.get_close_matches(str(name), self.layers, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown layer {name!r} for {self.arch}{hint} Valid layers (in order): "
            f"{', '.join(self.layers)}"
        )

    def _shared_message(self, name: str, calls: int) -> str:
        return (
            f"submodule {name!r} of {self.arch} is called {calls} times in one forward pass "
            "(shared weights, or one module object used twice), so a cut there is "
            "ambiguous: A would replace every call's output at once. Cut at a submodule "
            "called once (its parent, or the modules around the call you mean), or give it "
            "one instance per use"
        )

    def _cut(self, layer: str | None) -> str:
        name = self.resolve_layer(layer)
        info = self._info(name)
        if info is not None and info.calls > 1:
            raise ValueError(self._shared_message(name, info.calls))
        return name

    # ---- input checks ----------------------------------------------------------

    def _check_images(self, x: Any) -> Array:
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = jnp.asarray(x)
        if self.input_shape is not None:
            want = self.input_shape
            if x.ndim != len(want) or x.shape[-1] != want[-1]:
                fix = ""
                if x.ndim == len(want) - 1:
                    fix = "; add a batch axis: x[None]"
                elif x.ndim == len(want) and x.ndim == 4 and x.shape[1] == want[-1]:
                    fix = "; this looks like NCHW, Flax models take NHWC: x.transpose(0, 2, 3, 1)"
                raise ValueError(
                    f"images x of shape {tuple(x.shape)} do not match {self.arch}'s example "
                    f"input_shape {want} (rank {len(want)}, {want[-1]} channels last){fix}"
                )
        return x

    # ---- the protocol ----------------------------------------------------------

    def to_grid(self, a: Array, layer: str | None = None) -> Array:
        """The ``(B, h, w, K)`` grid the map of `layer` is drawn on: ``reshape(A)`` when
        the adapter was given a `reshape` (a function, or a mapping layer -> function),
        else ``A`` itself when it is 4-D (NHWC). Must be (and `tokens_to_grid` is) a pure
        re-indexing, since explain applies it to the derivatives as well as to A."""
        name = self.resolve_layer(layer)
        fn = self.reshape.get(name) if isinstance(self.reshape, Mapping) else self.reshape
        if fn is None:
            if getattr(a, "ndim", None) == 4:
                return a
            raise ValueError(
                f"activations at layer {name!r} of {self.arch} have shape "
                f"{tuple(getattr(a, 'shape', ()))}, not a (B, h, w, K) grid; pass reshape= "
                "to the adapter to say how they lie on the image grid (tokens with a class "
                "token: reshape=jaxcam.models.tokens_to_grid(num_prefix_tokens=1))"
            )
        grid = fn(a)
        if getattr(grid, "ndim", None) != 4:
            raise ValueError(
                f"reshape for layer {name!r} of {self.arch} returned shape "
                f"{tuple(getattr(grid, 'shape', ()))}; it must return a (B, h, w, K) grid"
            )
        return grid

    def _missing_x(self, name: str) -> ValueError:
        return ValueError(
            f"{self.arch}.head needs the images: it reruns the model on them with layer "
            f"{name!r}'s output replaced by A, so that paths crossing the cut (skip "
            "connections, class tokens) are recomputed and held fixed; call "
            f"model.head(variables, A, layer={name!r}, x=x)"
        )

    def linear_head(self, variables: Any, layer: str | None = None
                    ) -> tuple[Array, Array] | None:
        """``(W (K, C), b (C,))`` when the head at `layer` is exactly global average
        pooling of A over (h, w) then one dense layer, ``S = mean_ij(A) @ W + b``, with
        nothing else reaching the output (what CAM needs); else None. Detected from the
        head's jaxpr at the example input (cached per layer), never numerically."""
        name = self._cut(layer)
        found = _linear_head_paths(self, name)
        if found is None:
            return None
        leaves = {jax.tree_util.keystr(p): v
                  for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
        w_path, b_path = found
        if w_path not in leaves or (b_path is not None and b_path not in leaves):
            return None
        w = leaves[w_path]
        b = leaves[b_path] if b_path is not None else jnp.zeros(w.shape[-1:], w.dtype)
        return w, b

    def abstract_variables(self) -> Any:
        raise NotImplementedError


def _eval_call_kwargs(fn: Callable[..., Any], given: Mapping[str, Any] | None
                      ) -> tuple[tuple[str, Any], ...]:
    """Eval-mode keyword arguments of `fn`'s signature (EVAL_CALL_KWARGS), updated with
    the caller's `given` ones, as sorted hashable items."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {k: v for k, v in EVAL_CALL_KWARGS.items() if k in params}
    kwargs.update(given or {})
    items = tuple(sorted(kwargs.items()))
    try:
        hash(items)
    except TypeError:
        raise ValueError(
            f"call_kwargs values must be hashable (bools, numbers, strings, tuples), got "
            f"{dict(items)}"
        ) from None
    return items


def _check_reshape(reshape: Any) -> Any:
    if reshape is None or callable(reshape):
        return reshape
    if isinstance(reshape, Mapping):
        bad = [k for k, v in reshape.items() if not callable(v)]
        if bad:
            raise ValueError(f"reshape values must be functions; {bad} are not")
        return FrozenDict(dict(reshape))
    raise ValueError(
        f"reshape must be a function A -> (B, h, w, K), a mapping layer -> function, or "
        f"None; got {type(reshape).__name__}"
    )


def _choose_default(arch: str, cuts: tuple[CutInfo, ...], layers: tuple[str, ...],
                    reshape: Any, default_layer: str | None) -> str:
    """The caller's `default_layer`, else the last cut point, called once, whose output
    is not returned by the model as is, and which lies on a grid: 4-D without a reshape,
    or accepted by the reshape (checked abstractly). Else the last such array at all."""
    if default_layer is not None:
        if default_layer not in layers:
            close = difflib.get_close_matches(str(default_layer), layers, n=3, cutoff=0.5)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ValueError(
                f"default_layer {default_layer!r} is not a cut point of {arch}{hint}; cut "
                f"points: {', '.join(layers)}"
            )
        return default_layer
    usable = [c for c in cuts if c.output == "array" and c.calls == 1 and not c.is_output]

    def on_grid(c: CutInfo) -> bool:
        fn = reshape.get(c.name) if isinstance(reshape, Mapping) else reshape
        if fn is None:
            return len(c.shape) == 4
        try:
            out = jax.eval_shape(fn, jax.ShapeDtypeStruct(c.shape, jnp.dtype(c.dtype)))
        except Exception:  # noqa: BLE001 - any failure means "not this layer's layout"
            return False
        return getattr(out, "ndim", len(getattr(out, "shape", ()))) == 4

    gridded = [c for c in usable if on_grid(c)]
    chosen = gridded or usable
    if not chosen:
        raise ValueError(
            f"{arch} has no submodule called once that returns a floating array before its "
            f"output (cut points: {', '.join(layers) or 'none'}); a module whose work happens "
            "in its own __call__ has no cut point: split it into submodules, or use "
            "jaxcam.models.from_functions"
        )
    return chosen[-1].name


def _num_classes(out: Any) -> int | None:
    if isinstance(out, jax.Array | jax.ShapeDtypeStruct) and len(out.shape) == 2:
        return int(out.shape[1])
    return None


def _param_order(starts: list[str], top_keys: list[str], sep: str) -> tuple[str, ...]:
    """Top-level parameter groups ordered by the first call of their submodule."""
    order = []
    for name in starts:
        top = name.split(sep)[0]
        if top in top_keys and top not in order:
            order.append(top)
    return tuple(order + sorted(k for k in top_keys if k not in order))


def _example_input(input_shape: Any, input_dtype: Any) -> jax.ShapeDtypeStruct:
    if isinstance(input_shape, int) or not all(
            isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 1
            for d in input_shape):
        raise ValueError(
            f"input_shape must be the full shape of an example batch, positive ints, e.g. "
            f"(1, 224, 224, 3); got {input_shape!r}"
        )
    return jax.ShapeDtypeStruct(tuple(int(d) for d in input_shape), jnp.dtype(input_dtype))


def _check_hashable(obj: Any, what: str) -> None:
    try:
        hash(obj)
    except TypeError as err:
        raise ValueError(
            f"{what} must be hashable (jaxcam uses models as static jit arguments): {err}; "
            "use tuples instead of lists for its attributes"
        ) from None


# ---- linen -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LinenModel(_AdaptedModel):
    """A flax.linen Module as a jaxcam model (built by `from_linen`). `variables` are the
    module's own (``module.init(...)``: ``{"params": ..., "batch_stats": ...}``)."""

    module: nn.Module

    def _kwargs(self) -> dict[str, Any]:
        return dict(self.call_kwargs)

    def _run(self, variables: Any, x: Array, handler: Callable[..., Any] | None) -> Any:
        if handler is None:
            return self.module.apply(variables, x, **self._kwargs())
        with nn.intercept_methods(_linen_interceptor(handler)):
            return self.module.apply(variables, x, **self._kwargs())

    def apply(self, variables: Any, x: Array) -> Any:
        """The module's output, ``module.apply(variables, x, **call_kwargs)`` (eval mode;
        no collection is mutable, so running statistics are read, never updated)."""
        return self._run(variables, self._check_images(x), None)

    def features(self, variables: Any, x: Array, layer: str | None = None) -> Array:
        """The output of submodule `layer` when the model runs on `x` (the rest of the
        forward pass is not run)."""
        name = self._cut(layer)
        x = self._check_images(x)
        try:
            self._run(variables, x, _Capture(name))
        except _Captured as captured:
            return captured.args[0]
        raise ValueError(f"layer {name!r} of {self.arch} was not called on these images")

    def head(self, variables: Any, a: Array, layer: str | None = None,
             x: Array | None = None) -> Any:
        """The model's output on `x` with submodule `layer`'s output replaced by `a`.
        ``head(v, features(v, x, l), l, x=x) == apply(v, x)``."""
        name = self._cut(layer)
        if x is None:
            raise self._missing_x(name)
        sub = _Substitute(self, name, a)
        out = self._run(variables, self._check_images(x), sub)
        if sub.calls == 0:
            raise ValueError(f"layer {name!r} of {self.arch} was not called on these images")
        return out

    def init(self, rng: Array, image_size: int | None = None) -> dict[str, Any]:
        """Fresh variables, ``module.init`` on zeros of the example input shape (with H and
        W set to `image_size` when given and the input is 4-D)."""
        shape = list(self.input_shape)
        if image_size is not None and len(shape) == 4:
            shape[1] = shape[2] = int(image_size)
        x = jnp.zeros(shape, self.input_dtype)
        rngs = {"params": rng, "dropout": rng}
        return dict(self.module.init(rngs, x, **self._kwargs()))

    def abstract_variables(self) -> dict[str, Any]:
        """The variable tree as `jax.ShapeDtypeStruct` leaves (``jax.eval_shape`` of
        `init` at the example input), plain dicts, nothing computed."""
        return _plain_dicts(_linen_abstract(self))


@functools.lru_cache(maxsize=32)
def _linen_abstract(model: LinenModel) -> Any:
    return jax.eval_shape(lambda key: model.init(key), jax.random.key(0))


def from_linen(
    module: nn.Module,
    *,
    input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE,
    input_dtype: Any = jnp.float32,
    call_kwargs: Mapping[str, Any] | None = None,
    default_layer: str | None = None,
    reshape: Callable[[Array], Array] | Mapping[str, Callable[[Array], Array]] | None = None,
    name: str | None = None,
) -> LinenModel:
    """Any flax.linen Module as a jaxcam model; its variables go to ``jaxcam.explain``.

    Args:
      module: the (unbound) module; it must be hashable (tuples, not lists, as fields).
      input_shape: an example batch shape. One forward pass is traced at it, abstractly
        (``jax.eval_shape``: nothing is computed), to find the cut points, their shapes,
        the output shape and the variable shapes. Other image sizes work later if the
        model accepts them.
      call_kwargs: keyword arguments for ``module.__call__``. Default: eval mode, read
        from the signature: ``train`` / ``training`` / ``is_training`` -> False,
        ``deterministic`` / ``use_running_average`` -> True, for those it has; the
        given ones override. Collections are never mutable, so a BatchNorm must read its
        running statistics in this mode (``use_running_average=not train``).
      default_layer: the layer for ``layer=None``. Default: the last cut point called
        once whose output is not the model's output and lies on a grid (4-D, or accepted
        by `reshape`); pass it for transformers, whose last such layer (the final norm)
        feeds only the class token.
      reshape: activations -> ``(B, h, w, K)`` grid (`tokens_to_grid` for ViTs), or a
        mapping layer -> function; `to_grid` applies it.
      name: `arch` (default: the module's class name).

    Layer names are scope paths joined by ``/`` (``"block2/conv_a"``, ``"layers_0"``),
    listed in `layers` in the order their outputs are computed (a parent after its
    children). Submodules inside lifted transforms (``nn.scan``, ``nn.remat``,
    ``nn.vmap``) cannot be cut.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"from_linen takes a flax.linen Module, got {type(module).__name__}"
            + ("; for an NNX module use jaxcam.models.from_nnx"
               if isinstance(module, nnx.Module) else "")
        )
    _check_hashable(module, "the linen module")
    example = _example_input(input_shape, input_dtype)
    reshape = _check_reshape(reshape)
    kwargs = _eval_call_kwargs(type(module).__call__, call_kwargs)
    probe = LinenModel(arch=name or type(module).__name__, num_classes=None, layers=(),
                       default_layer="", module=module, input_shape=example.shape,
                       input_dtype=str(example.dtype), call_kwargs=kwargs)
    abstract = probe.abstract_variables()
    recorder = _Recorder()
    infos: list[tuple[CutInfo, ...]] = []

    def traced(variables: Any, x: Array) -> Any:
        out = probe._run(variables, x, recorder)
        infos.append(recorder.infos(out))
        return out

    try:
        out = jax.eval_shape(traced, abstract, example)
    except (flax.errors.ModifyScopeVariableError, flax.errors.InvalidRngError) as err:
        raise ValueError(
            f"{probe.arch} with call_kwargs {dict(kwargs)} is not in eval mode: {err}. "
            "Adapters run the model in eval mode, with no mutable collection and no rng; "
            "pass call_kwargs that select it (e.g. {'train': False}), and build BatchNorm "
            "with use_running_average=not train, Dropout with deterministic=not train"
        ) from None
    cuts = infos[0]
    layers = tuple(c.name for c in cuts if c.output == "array")
    params = abstract.get("params", {})
    return dataclasses.replace(
        probe,
        num_classes=_num_classes(out),
        layers=layers,
        default_layer=_choose_default(probe.arch, cuts, layers, reshape, default_layer),
        reshape=reshape,
        cuts=cuts,
        param_order=_param_order(recorder.starts, list(params), "/"),
    )


# ---- NNX -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NNXModel(_AdaptedModel):
    """A flax.nnx Module as a jaxcam model (built by `from_nnx`), held as its (hashable)
    graph definition; the variables explain takes are the module's `nnx.State`."""

    graphdef: Any
    abstract_state: Any = field(default=None, compare=False, repr=False)

    def _run(self, state: Any, x: Array, handler: Callable[..., Any] | None,
             only: str | None = None) -> Any:
        if handler is None:
            return nnx.merge(self.graphdef, state)(x, **dict(self.call_kwargs))
        return _run_nnx(self.graphdef, state, x, dict(self.call_kwargs), handler, only)

    def apply(self, variables: Any, x: Array) -> Any:
        """``merge(graphdef, variables)(x, **call_kwargs)`` in eval mode. The module copy
        is discarded, so nothing the call mutates (RNG counts) leaks out: pure."""
        return self._run(variables, self._check_images(x), None)

    def features(self, variables: Any, x: Array, layer: str | None = None) -> Array:
        """The output of submodule `layer` when the model runs on `x`."""
        name = self._cut(layer)
        x = self._check_images(x)
        try:
            self._run(variables, x, _Capture(name), only=name)
        except _Captured as captured:
            return captured.args[0]
        raise ValueError(f"layer {name!r} of {self.arch} was not called on these images")

    def head(self, variables: Any, a: Array, layer: str | None = None,
             x: Array | None = None) -> Any:
        """The model's output on `x` with submodule `layer`'s output replaced by `a`."""
        name = self._cut(layer)
        if x is None:
            raise self._missing_x(name)
        sub = _Substitute(self, name, a)
        out = self._run(variables, self._check_images(x), sub, only=name)
        if sub.calls == 0:
            raise ValueError(f"layer {name!r} of {self.arch} was not called on these images")
        return out

    def abstract_variables(self) -> Any:
        """The state as `jax.ShapeDtypeStruct` leaves (an `nnx.State`)."""
        return jax.tree.map(lambda s: s, self.abstract_state)


def from_nnx(
    module: nnx.Module,
    *,
    input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE,
    input_dtype: Any = jnp.float32,
    call_kwargs: Mapping[str, Any] | None = None,
    eval_attributes: Mapping[str, Any] | None = None,
    default_layer: str | None = None,
    reshape: Callable[[Array], Array] | Mapping[str, Callable[[Array], Array]] | None = None,
    name: str | None = None,
) -> tuple[NNXModel, Any]:
    """Any flax.nnx Module as a jaxcam model. Returns ``(model, state)``; `state` (an
    `nnx.State`) is what ``jaxcam.explain`` takes as `variables` (``nnx.state(module)``
    of the same module later, after training, works as well).

    Eval mode: ``nnx.view(module, **eval_attributes)`` (default ``deterministic=True,
    use_running_average=True``, flax's ``module.eval()`` without mutating `module`), and
    `call_kwargs` as for `from_linen` (eval values for ``train`` / ``deterministic`` ...
    keywords of ``__call__``). Layer names are attribute paths joined by ``.``
    (``"blocks.1.norm1"``, list indices included); a submodule reachable by two paths is
    named by the first (sorted) one. Submodules run inside NNX transforms (``nnx.scan``,
    ``nnx.remat``, ``nnx.vmap``) are copies the adapter does not see and cannot be cut.
    The other arguments are as for `from_linen`.
    """
    if not isinstance(module, nnx.Module):
        raise ValueError(
            f"from_nnx takes a flax.nnx Module, got {type(module).__name__}"
            + ("; for a linen module use jaxcam.models.from_linen"
               if isinstance(module, nn.Module) else "")
        )
    example = _example_input(input_shape, input_dtype)
    reshape = _check_reshape(reshape)
    attributes = dict(NNX_EVAL_ATTRIBUTES if eval_attributes is None else eval_attributes)
    viewed = nnx.view(module, raise_if_not_found=False, **attributes) if attributes else module
    graphdef, state = nnx.split(viewed)
    _check_hashable(graphdef, "the NNX graph definition")
    kwargs = _eval_call_kwargs(type(module).__call__, call_kwargs)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    probe = NNXModel(arch=name or type(module).__name__, num_classes=None, layers=(),
                     default_layer="", graphdef=graphdef, abstract_state=abstract,
                     input_shape=example.shape, input_dtype=str(example.dtype),
                     call_kwargs=kwargs)
    recorder = _Recorder()
    infos: list[tuple[CutInfo, ...]] = []

    def traced(st: Any, x: Array) -> Any:
        out = probe._run(st, x, recorder)
        infos.append(recorder.infos(out))
        return out

    out = jax.eval_shape(traced, state, example)
    cuts = infos[0]
    layers = tuple(c.name for c in cuts if c.output == "array")
    params = [k for k in nnx.state(viewed, nnx.Param)]
    model = dataclasses.replace(
        probe,
        num_classes=_num_classes(out),
        layers=layers,
        default_layer=_choose_default(probe.arch, cuts, layers, reshape, default_layer),
        reshape=reshape,
        cuts=cuts,
        param_order=_param_order(recorder.starts, [str(k) for k in params], "."),
    )
    return model, state


# ---- plain JAX -------------------------------------------------------------------


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


@dataclass(frozen=True, kw_only=True)
class FunctionsModel(_AdaptedModel):
    """Two plain JAX functions as a jaxcam model (built by `from_functions`)."""

    features_fn: Callable[..., Any]
    head_fn: Callable[..., Any]
    apply_fn: Callable[..., Any] | None = None
    linear_head_fn: Callable[..., Any] | None = None

    def _layer_kw(self, fn: Callable[..., Any], name: str) -> dict[str, Any]:
        return {"layer": name} if _accepts(fn, "layer") else {}

    def apply(self, variables: Any, x: Array) -> Any:
        """``apply(variables, x)`` when given, else the head at the default layer on the
        features at the default layer."""
        if self.apply_fn is not None:
            return self.apply_fn(variables, x)
        a = self.features(variables, x)
        return self.head(variables, a, x=x)

    def features(self, variables: Any, x: Array, layer: str | None = None) -> Array:
        name = self.resolve_layer(layer)
        return self.features_fn(variables, x, **self._layer_kw(self.features_fn, name))

    def head(self, variables: Any, a: Array, layer: str | None = None,
             x: Array | None = None) -> Any:
        name = self.resolve_layer(layer)
        kwargs = self._layer_kw(self.head_fn, name)
        if _accepts(self.head_fn, "x"):
            if x is None:
                raise self._missing_x(name)
            expected = jax.eval_shape(
                lambda v, im: self.features(v, im, name), variables, x).shape
            if tuple(a.shape) != tuple(expected):
                raise ValueError(
                    f"activations A at layer {name!r} of {self.arch} must have shape "
                    f"{tuple(expected)} (features of these images), got {tuple(a.shape)}"
                )
            kwargs["x"] = x
        return self.head_fn(variables, a, **kwargs)

    def linear_head(self, variables: Any, layer: str | None = None
                    ) -> tuple[Array, Array] | None:
        """What the given `linear_head(variables, layer)` returns; None without one."""
        if self.linear_head_fn is None:
            return None
        name = self.resolve_layer(layer)
        return self.linear_head_fn(variables, **self._layer_kw(self.linear_head_fn, name))

    def abstract_variables(self) -> Any:
        raise ValueError(
            f"{self.arch} was built from plain functions, whose variables jaxcam cannot "
            "know; save and restore its variables yourself"
        )


def from_functions(
    features: Callable[..., Array],
    head: Callable[..., Any],
    *,
    num_classes: int | None = None,
    layers: tuple[str, ...] = ("features",),
    default_layer: str | None = None,
    reshape: Callable[[Array], Array] | Mapping[str, Callable[[Array], Array]] | None = None,
    apply: Callable[..., Any] | None = None,
    linear_head: Callable[..., Any] | None = None,
    name: str = "functions",
) -> FunctionsModel:
    """Two plain JAX functions as a jaxcam model.

    ``features(variables, x[, layer]) -> A`` and ``head(variables, A[, layer][, x]) ->
    outputs``: a parameter named ``layer`` receives the cut-point name (needed when
    `layers` has more than one), one named ``x`` the images (for paths that cross the
    cut; then `head` requires them). `num_classes`: C of (B, C) outputs, None otherwise.
    `apply(variables, x)` defaults to `head` on `features` at `default_layer` (default
    ``layers[-1]``); `linear_head(variables[, layer]) -> (W, b) | None` enables CAM. The
    functions must be hashable (plain functions are) for the model to be a static jit
    argument.
    """
    if not callable(features) or not callable(head):
        raise ValueError("from_functions needs two functions: features and head")
    if isinstance(layers, str) or not layers or not all(isinstance(s, str) for s in layers):
        raise ValueError(f"layers must be a non-empty tuple of names, got {layers!r}")
    layers = tuple(layers)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers has repeated names: {layers}")
    if len(layers) > 1:
        missing = [n for n, f in (("features", features), ("head", head))
                   if not _accepts(f, "layer")]
        if missing:
            raise ValueError(
                f"with several layers {layers}, {' and '.join(missing)} must take a `layer` "
                "argument to know which cut to compute"
            )
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    if default_layer is None:
        default_layer = layers[-1]
    elif default_layer not in layers:
        raise ValueError(f"default_layer {default_layer!r} is not in layers {layers}")
    for fn, what in ((features, "features"), (head, "head"), (apply, "apply"),
                     (linear_head, "linear_head")):
        if fn is not None:
            _check_hashable(fn, what)
    return FunctionsModel(
        arch=name, num_classes=num_classes, layers=layers, default_layer=default_layer,
        reshape=_check_reshape(reshape), features_fn=features, head_fn=head,
        apply_fn=apply, linear_head_fn=linear_head,
    )


# ---- GAP + dense detection (CAM) -------------------------------------------------


@functools.lru_cache(maxsize=64)
def _linear_head_paths(model: _AdaptedModel, layer: str) -> tuple[str, str | None] | None:
    """Key paths (``jax.tree_util.keystr``) of ``W`` and ``b`` when the head's jaxpr
    computes its only output as ``dot_general(reduce_sum_{1,2}(A) / (h w), W) [+ b]``
    with W, b leaves of the variables; None otherwise (including when anything from the
    images reaches the output)."""
    abstract = model.abstract_variables()
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaf_paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
    leaves = [leaf for _, leaf in leaves_with_path]
    example = jax.ShapeDtypeStruct(model.input_shape, jnp.dtype(model.input_dtype))
    a_struct = jax.eval_shape(
        lambda v, x: model.features(v, x, layer), abstract, example)

    def head(leaf_list: list[Any], a: Array, x: Array) -> Any:
        return model.head(jax.tree_util.tree_unflatten(treedef, leaf_list), a, layer, x=x)

    try:
        closed = jax.make_jaxpr(head)(leaves, a_struct, example)
    except Exception:  # noqa: BLE001 - a head we cannot trace is not a linear head
        return None
    jaxpr = closed.jaxpr
    if len(jaxpr.outvars) != 1 or len(a_struct.shape) != 4:
        return None
    n = len(leaves)
    env: dict[Any, Any] = {}
    for i, var in enumerate(jaxpr.invars):
        env[var] = ("leaf", i) if i < n else (("A",) if i == n else ("x",))
    out = _symbolic(jaxpr, [env[v] for v in jaxpr.invars], closed.consts)[0]
    h, w = a_struct.shape[1:3]
    match = _match_gap_dense(out, h * w)
    if match is None:
        return None
    wi, bi = match
    if len(leaves[wi].shape) != 2 or (bi is not None and leaves[bi].shape != leaves[wi].shape[1:]):
        return None
    return leaf_paths[wi], (leaf_paths[bi] if bi is not None else None)


_CALLS = ("pjit", "jit", "closed_call", "core_call")


def _symbolic(jaxpr: Any, inputs: list[Any], consts: list[Any]) -> list[Any]:
    """Evaluate a jaxpr on symbols: each value becomes ``(primitive, params, *args)``;
    inputs are the given symbols, literals ``("lit", value)``; nested jit calls inlined."""
    env: dict[Any, Any] = dict(zip(jaxpr.invars, inputs, strict=True))
    env.update({v: ("const",) for v in jaxpr.constvars})

    def read(v: Any) -> Any:
        if isinstance(v, jax.extend.core.Literal):
            return ("lit", v.val)
        return env[v]

    for eqn in jaxpr.eqns:
        args = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS and "jaxpr" in eqn.params:
            inner = eqn.params["jaxpr"]
            inner_jaxpr = getattr(inner, "jaxpr", inner)
            outs = _symbolic(inner_jaxpr, args, list(getattr(inner, "consts", [])))
        else:
            outs = [(name, eqn.params, *args)] if len(eqn.outvars) == 1 else [
                (name, eqn.params, i, *args) for i in range(len(eqn.outvars))]
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


_TRANSPARENT = ("convert_element_type", "copy", "copy_p")


def _strip(e: Any) -> Any:
    while isinstance(e, tuple) and e[0] in _TRANSPARENT:
        e = e[2]
    return e


def _leaf(e: Any, allow_shape_ops: bool) -> int | None:
    e = _strip(e)
    while allow_shape_ops and isinstance(e, tuple) and e[0] in ("reshape", "broadcast_in_dim"):
        e = _strip(e[2])
    return e[1] if isinstance(e, tuple) and e[0] == "leaf" else None


def _match_gap_dense(out: Any, hw: int) -> tuple[int, int | None] | None:
    """(index of W, index of b or None) when `out` is dot(mean_{1,2}(A), W) [+ b]."""
    out = _strip(out)
    bias = None
    if isinstance(out, tuple) and out[0] == "add":
        for y, b in ((out[2], out[3]), (out[3], out[2])):
            bi = _leaf(b, allow_shape_ops=True)
            if bi is not None and _strip(y)[0] == "dot_general":
                out, bias = _strip(y), bi
                break
        else:
            return None
    if not (isinstance(out, tuple) and out[0] == "dot_general"):
        return None
    (contract, batch) = out[1]["dimension_numbers"]
    if tuple(map(tuple, contract)) != ((1,), (0,)) or any(len(b) for b in batch):
        return None
    wi = _leaf(out[3], allow_shape_ops=False)
    mean = _strip(out[2])
    if wi is None or not (isinstance(mean, tuple) and mean[0] == "div"):
        return None
    total, divisor = _strip(mean[2]), _strip(mean[3])
    if not (isinstance(divisor, tuple) and divisor[0] == "lit"
            and float(np.asarray(divisor[1])) == float(hw)):
        return None
    if not (isinstance(total, tuple) and total[0] == "reduce_sum"
            and tuple(total[1]["axes"]) == (1, 2) and _strip(total[2]) == ("A",)):
        return None
    return wi, bias
