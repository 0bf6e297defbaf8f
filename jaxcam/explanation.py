"""``jaxcam.explain``: model + variables + images -> CAM maps, in one jitted call.

The pipeline is pure and differentiable::

    images -> features -> A -> (shared forward + VJP of the head, derivatives)
           -> method records -> weights | raw map -> bilinear upsample -> normalise

``model`` is anything that implements the model protocol (docs/models.md):
jaxcam's own architectures, ``jaxcam.models.from_linen`` / ``from_nnx`` /
``from_functions`` adapters. Several methods in one call share the forward
pass, the head VJP and each target's derivatives: the quantities a method
reads (``q.D1``, ``q.D2``, ...) are computed lazily, once per target, inside
one traced program, so what no method uses is never traced. Compiled functions
are cached per static configuration (model, layer, methods, targets, options),
so repeated calls with the same shapes do not recompile.

Precision. The model's forward pass runs in its own dtype (bfloat16/float16
models stay so); the head is re-run for the derivatives, alphas and maps in
float32 (float64 under x64) — see docs/derivatives.md.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcam import derivatives as deriv
from jaxcam import methods as methods_lib
from jaxcam import targets as targets_lib
from jaxcam.methods import DEFAULT_TARGETS  # noqa: F401  (re-exported)
from jaxcam.models import check_variables

DERIVATIVES: tuple[str, ...] = ("exact", "closed_form", "nested_sum")
EXACT_ENGINES: tuple[str, ...] = deriv.EXACT_ENGINES
NONFINITE: tuple[str, ...] = ("raise", "flag")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Explanation:
    """One method's result for a batch.

    Attributes:
      maps: (B, H, W) in [0, 1]: ``raw`` bilinearly upsampled to the input size,
        min-max normalised per image (zeros where ``degenerate``).
      raw: (B, h, w) map at the layer's resolution, before normalisation, up to
        the positive per-image factor ``exp(log_scale)``.
      weights: (B, K) channel weights up to the same factor, or None (HiResCAM,
        LayerCAM, maps-only methods).
      log_scale: (B,) log of the positive factor the derivatives (hence ``raw``
        and ``weights``) were divided by: ``S_c`` for ``exp(S_c)`` (whose
        derivatives are ``e^{S_c}`` times a polynomial in those of ``S_c``),
        ``log p_c`` for softmax, 0 for the logit. True weights are
        ``exp(log_scale) * weights`` (which can overflow: that is why it is
        carried separately). 0 for methods that use no derivatives.
      class_idx: (B,) explained classes. logits: the model's outputs (B, C) for
        a classifier (any pytree otherwise), computed in the map's precision.
      degenerate: (B,) bool, True where the raw map has no spread (e.g. all
        zero after the ReLU); such maps are left as zeros, never NaN.
      finite: (B,) bool, False where the image, the outputs or the raw map hold
        a NaN or an infinity (works under ``jit``; eager calls raise instead,
        unless ``nonfinite="flag"``; so do calls on arrays another process holds
        rows of).
      method, layer, target: what was computed (``target`` by name).
      derivatives: ``"exact/factored"``, ``"exact/taylor"``, ``"closed_form"``,
        ``"nested_sum"`` for methods that use D2/D3 (Grad-CAM++), ``""`` otherwise.
    """

    maps: jax.Array
    raw: jax.Array
    weights: jax.Array | None
    class_idx: jax.Array
    logits: Any
    degenerate: jax.Array
    finite: jax.Array
    log_scale: jax.Array
    method: str = dataclasses.field(metadata=dict(static=True))
    layer: str = dataclasses.field(metadata=dict(static=True))
    target: str = dataclasses.field(metadata=dict(static=True))
    derivatives: str = dataclasses.field(default="", metadata=dict(static=True))


# static config key -> (model, jitted function, info); the model is kept alive with
# its entry so that an id()-based key can never be reused by another object.
_COMPILED: dict[Any, tuple[Any, Any, dict[str, Any]]] = {}
_CHECKED_VARIABLES: dict[Any, bool] = {}


def _model_key(model: Any) -> Any:
    try:
        hash(model)
    except TypeError:
        return ("id", id(model))
    return model


def _is_traced(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _on_host(tree: Any) -> bool:
    """Whether every leaf can be read here: concrete, and (in a multi-process job)
    fully addressable by this process."""
    return not any(isinstance(x, jax.core.Tracer) or (
        isinstance(x, jax.Array) and not x.is_fully_addressable)
        for x in jax.tree_util.tree_leaves(tree))


def _methods_tuple(method: Any) -> tuple[tuple[methods_lib.Method, ...], bool]:
    if isinstance(method, str):
        names, single = (method,), True
    elif isinstance(method, Sequence) and method and all(isinstance(m, str) for m in method):
        names, single = tuple(method), False
    else:
        raise ValueError(
            f"method must be a method name or a non-empty list of names from "
            f"{methods_lib.names()}, got {method!r}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"method lists {names} with a repeated name; give each method once.")
    return tuple(methods_lib.get(n) for n in names), single


def _cast_floats(tree: Any, dtype: Any) -> Any:
    """Floating leaves of ``tree`` cast to ``dtype`` (ints and bools untouched)."""
    return jax.tree.map(
        lambda v: v.astype(dtype) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v,
        tree)


def _grid_fn(model: Any, layer: str):
    to_grid = getattr(model, "to_grid", None)
    return None if to_grid is None else (lambda a: to_grid(a, layer))


def _degenerate_d2_error(target: targets_lib.Target, model: Any, layer: str) -> ValueError:
    working = "target='exp' (the paper's choice), 'softmax', 'log_softmax', 'rest' or 'sigmoid'"
    if not target.classifier:
        working = (f"the same target with link='exp' (e.g. jaxcam.targets."
                   f"{target.name.split('[')[0].split('(')[0]}(..., link='exp'))")
    return ValueError(
        f"exact Grad-CAM++ with target={target.name!r} is degenerate: the head of "
        f"{getattr(model, 'arch', type(model).__name__)} at {layer!r} is piecewise linear "
        f"and the target is a linear score with the identity link, so its exact D2 is "
        f"identically 0 and every alpha is 0. Use {working}, or derivatives='closed_form'."
    )


class _Context:
    """Everything one traced call shares: the forward pass, the head's VJP, the
    certificate and per-target caches of derivatives."""

    def __init__(self, model, layer, variables, images, class_idx, datas, options,
                 derivatives, engine, info):
        self.model, self.layer, self.options = model, layer, options
        self.derivatives, self.engine, self.info = derivatives, engine, info
        self.variables, self.images, self.datas = variables, images, datas
        A_model = model.features(variables, images, layer)
        self.dtype = jnp.promote_types(jnp.float32, A_model.dtype)
        self.A_raw = A_model.astype(self.dtype)
        v32 = _cast_floats(variables, self.dtype)
        x32 = images.astype(self.dtype)
        self.head = lambda a: model.head(v32, a, layer, x=x32)
        self.out, self.vjp_fn = jax.vjp(self.head, self.A_raw)
        self.to_grid = _grid_fn(model, layer)
        self.A = self.A_raw if self.to_grid is None else self.to_grid(self.A_raw)
        if self.A.ndim != 4:
            raise ValueError(
                f"activations at layer {layer!r} have shape {self.A_raw.shape}, not a (B, h, "
                "w, K) grid; give the model a reshape (to_grid / reshape=) that maps them to "
                "the grid the map is drawn on (e.g. jaxcam.models.tokens_to_grid).")
        leaves = jax.tree_util.tree_leaves(self.out)
        classifier = len(leaves) == 1 and leaves[0].ndim == 2
        if class_idx is not None:
            self.class_idx = class_idx
        elif classifier:
            self.class_idx = jnp.argmax(self.out, axis=-1).astype(jnp.int32)
        else:
            self.class_idx = jnp.zeros((images.shape[0],), jnp.int32)
        self._certified: bool | None = None
        self._cache: dict[Any, Any] = {}

    @property
    def certified(self) -> bool:
        if self._certified is None:
            self._certified = deriv.certify(self.head, self.A_raw)
            self.info["certified"] = self._certified
        return self._certified

    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def grid(self, a):
        return a if self.to_grid is None else self.to_grid(a)

    def first(self, target, data):
        """``(D1, log_scale)`` from one VJP: ``r1(s0) ds/dA``."""
        def make():
            s0 = targets_lib.inner_scores(target, self.out, self.class_idx, data)
            g = self.vjp_fn(deriv._inner_cotangent(target, self.out, self.class_idx, data))[0]
            r1, _, _, log_scale = targets_lib.link_derivatives(target.link, s0)
            d1 = r1.astype(g.dtype).reshape((-1,) + (1,) * (g.ndim - 1)) * g
            return self.grid(d1), log_scale, g
        return self.cached(("first", target), make)

    def higher(self, target, data):
        """The engine's ``Derivatives`` on the grid and the engine used."""
        def make():
            engine = self.engine if self.derivatives == "exact" else self.derivatives
            certified = self.certified if engine in ("auto", "factored") else None
            if engine == "factored" and not certified:
                raise deriv.not_certified_error(
                    f" (model {getattr(self.model, 'arch', '?')}, layer {self.layer!r})")
            resolved, certified = deriv.resolve_engine(
                engine, self.head, self.A_raw, target, self.out, certified=certified)
            if deriv.second_derivative_vanishes(target, resolved, certified):
                raise _degenerate_d2_error(target, self.model, self.layer)
            D, resolved = deriv.target_derivatives(
                self.head, self.A_raw, target, self.class_idx, data, engine=resolved,
                certified=certified, primal=(self.out, self.vjp_fn), to_grid=self.to_grid,
                chunk_size=self.options["chunk_size"],
                class_chunk_size=self.options["class_chunk_size"],
                linear_head=self.linear_head_or_none(), row_head=self.row_head())
            self.info.setdefault("engines", {})[target.name] = resolved
            return D
        return self.cached(("higher", target), make)

    def hessian(self, target, data):
        def make():
            ha, log_scale = deriv.hessian_activation_product(
                self.head, self.A_raw, target, self.class_idx, data)
            return self.grid(ha), log_scale
        return self.cached(("HA", target), make)

    def row_head(self):
        """The model's per-token restriction of the head, if it has one at this layer."""
        fn = getattr(self.model, "row_head", None)
        if fn is None:
            return None
        return fn(_cast_floats(self.variables, self.dtype), self.A_raw, self.layer,
                  x=self.images.astype(self.dtype))

    def linear_head_or_none(self):
        fn = getattr(self.model, "linear_head", None)
        if fn is None or self.A_raw.ndim != 4:
            return None
        return fn(_cast_floats(self.variables, self.dtype), self.layer)

    def score(self, target, data):
        def score_fn(x):
            out = self.model.apply(self.variables, x.astype(self.images.dtype))
            out = _cast_floats(out, self.dtype)
            s = targets_lib.inner_scores(target, out, self.class_idx, data)
            return targets_lib.link_value(target.link, s)
        return score_fn


class Quantities:
    """What a method record reads (``jaxcam.methods``); each computed on first use.

    Attributes: ``A`` (B, h, w, K) grid activations; ``D1, D2, D3`` diagonal
    derivatives on the grid and ``log_scale`` (B,) (true derivatives =
    ``exp(log_scale) * D``; for methods without D2/D3, ``D1`` is one VJP, for
    those with them all three come from the ``derivatives=`` engine); ``HA`` the
    Hessian applied to the activations (same factor); ``linear_head`` ``(W, b)``
    of a GAP + dense head; ``class_idx`` (B,); ``images``; ``score(x) -> (B,)``
    the target's value on other images; ``outputs``; ``target``; ``options``.
    """

    def __init__(self, ctx: _Context, target: targets_lib.Target, data: Any,
                 method: methods_lib.Method):
        self._ctx, self.target, self._data, self._method = ctx, target, data, method
        self.used: set[str] = set()

    def _use(self, name):
        self.used.add(name)

    @property
    def A(self):
        return self._ctx.A

    @property
    def D1(self):
        self._use("D1")
        if self._method.higher:
            return self._ctx.higher(self.target, self._data).D1
        return self._ctx.first(self.target, self._data)[0]

    @property
    def D2(self):
        self._use("D2")
        return self._ctx.higher(self.target, self._data).D2

    @property
    def D3(self):
        self._use("D3")
        return self._ctx.higher(self.target, self._data).D3

    @property
    def HA(self):
        self._use("HA")
        return self._ctx.hessian(self.target, self._data)[0]

    @property
    def log_scale(self):
        if "D2" in self.used or "D3" in self.used or (self._method.higher and "D1" in self.used):
            return self._ctx.higher(self.target, self._data).log_scale
        if "HA" in self.used:
            return self._ctx.hessian(self.target, self._data)[1]
        if "D1" in self.used:
            return self._ctx.first(self.target, self._data)[1]
        return jnp.zeros((self._ctx.images.shape[0],), self._ctx.dtype)

    @property
    def linear_head(self):
        lin = self._ctx.linear_head_or_none()
        if lin is None:
            raise _cam_error(self._ctx.model, self._ctx.layer)
        return lin

    @property
    def class_idx(self):
        return self._ctx.class_idx

    @property
    def images(self):
        return self._ctx.images

    @property
    def outputs(self):
        return self._ctx.out

    @property
    def options(self):
        return self._ctx.options

    def score(self, x):
        return self._ctx.score(self.target, self._data)(x)


def _cam_error(model: Any, layer: str) -> ValueError:
    return ValueError(
        f"CAM needs a head that is global average pooling then one dense layer; "
        f"{getattr(model, 'arch', type(model).__name__)} at layer {layer!r} has another head. "
        "Use 'gradcam' (equal to CAM / (h*w) on such heads) or a layer whose head is GAP + "
        "dense."
    )


def _build(model, layer, records, tgts, derivatives, engine, options, has_class, info):
    """The jitted computation for one static configuration."""

    def run(variables, images, class_idx, datas):
        ctx = _Context(model, layer, variables, images, class_idx if has_class else None,
                       datas, options, derivatives, engine, info)
        finite_in = jnp.all(jnp.isfinite(images.reshape(images.shape[0], -1)), axis=1)
        finite_out = jnp.all(jnp.stack([
            jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
            for leaf in jax.tree_util.tree_leaves(ctx.out)]), axis=0)
        out = {}
        for record, t in zip(records, tgts, strict=True):
            q = Quantities(ctx, t, datas[t.name], record)
            result = record.fn(q)
            if record.output == "weights":
                weights, raw = result, methods_lib.weighted_map(ctx.A, result)
            else:
                weights, raw = None, result
            raw = raw.astype(ctx.dtype)
            maps, degenerate = methods_lib.normalize_maps(
                methods_lib.upsample(raw, images.shape[1:3]))
            finite = finite_in & finite_out & jnp.all(jnp.isfinite(raw), axis=(1, 2))
            out[record.name] = (maps, raw, weights, degenerate, finite, q.log_scale)
        return out, ctx.out, ctx.class_idx

    return jax.jit(run)


def _check_images_finite(images: Any, nonfinite: str) -> None:
    if nonfinite != "raise" or not _on_host(images):
        return
    arr = np.asarray(images, dtype=np.float32).reshape(np.shape(images)[0], -1)
    bad = np.flatnonzero(~np.all(np.isfinite(arr), axis=1))
    if bad.size:
        raise ValueError(
            f"images {bad.tolist()} contain NaN or infinite pixels; fix or drop them (or pass "
            "nonfinite='flag' to get Explanation.finite = False for them instead)."
        )


def _check_model_protocol(model: Any) -> None:
    for name in ("features", "head", "resolve_layer"):
        if not callable(getattr(model, name, None)):
            raise ValueError(
                f"model {model!r} lacks {name}(): jaxcam explains models that implement the "
                "model protocol (docs/models.md): jaxcam.models.*, or wrap yours with "
                "jaxcam.models.from_linen / from_nnx / from_functions."
            )
    try:
        params = inspect.signature(model.head).parameters
    except (TypeError, ValueError):
        return
    if "x" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(
            f"{type(model).__name__}.head must accept x= (the images, for paths that cross "
            "the cut; docs/models.md): def head(self, variables, A, layer=None, x=None)."
        )


def _check_variables_once(model: Any, variables: Any) -> None:
    if _is_traced(variables):
        return
    key = (_model_key(model), jax.tree_util.tree_structure(variables),
           tuple(np.shape(v) for v in jax.tree_util.tree_leaves(variables)))
    if key not in _CHECKED_VARIABLES:
        check_variables(model, variables)
        _CHECKED_VARIABLES[key] = True


def explain(
    model: Any,
    variables: Any,
    images: jax.Array,
    method: str | Sequence[str] = "gradcam++",
    layer: str | None = None,
    target: targets_lib.TargetSpec | None = None,
    class_idx: Any = None,
    derivatives: str = "exact",
    *,
    engine: str = "auto",
    normalize_alpha: bool = False,
    negative_denominator: str = "zero",
    chunk_size: int | None = None,
    class_chunk_size: int | None = None,
    scorecam_batch_size: int = 32,
    nonfinite: str = "raise",
) -> Explanation | dict[str, Explanation]:
    """Explain ``images`` with one or several CAM methods.

    Args:
      model, variables: a model implementing the protocol (``jaxcam.models.*``, or
        an adapted linen / NNX / plain-JAX model) and its variables.
      images: (B, H, W, 3) float (float32, float16 or bfloat16), normalised as the
        model expects.
      method: a registered method name (``jaxcam.METHODS``) -> an
        :class:`Explanation`; or a list/tuple of names -> dict name -> Explanation
        (one shared forward pass, head VJP and derivative computation per target).
      layer: cut point (None: ``model.default_layer``).
      target: a name in ``jaxcam.targets.TARGETS``, a ``jaxcam.targets.Target``
        (``regression``, ``segmentation``, ``custom``) or callable ``phi(out, c)``;
        None uses each method's default (``jaxcam.methods.DEFAULT_TARGETS``: logit
        for first-order methods, exp for Grad-CAM++).
      class_idx: int, (B,) ints, or None (each image's argmax).
      derivatives: D2, D3 of methods that use them (Grad-CAM++): ``"exact"`` (true
        diagonal, ``engine`` = ``"auto"`` | ``"factored"`` | ``"taylor"``),
        ``"closed_form"`` (eq. 19, ``exp(S_c) g^n`` for every target, as other
        libraries), or ``"nested_sum"`` (Hessian row sums; for study only).
      normalize_alpha, negative_denominator: see
        :func:`jaxcam.methods.gradcam_pp_alpha`.
      chunk_size, class_chunk_size: memory bounds of the derivative engines
        (see :func:`jaxcam.diagonal_derivatives`); scorecam_batch_size:
        channels scored per vectorised chunk.
      nonfinite: ``"raise"`` (eager calls: ValueError naming the images whose
        pixels, outputs or maps are not finite) or ``"flag"`` (only
        ``Explanation.finite``). Under ``jit`` it is always a flag.

    Raises ValueError up front for unknown names, a class index out of range,
    variables of another model, non-finite images, CAM on a head that is not
    GAP + dense, and exact Grad-CAM++ on a linear identity-link target
    (``logit``) through a piecewise-linear head (its ``D2`` is identically 0).
    """
    records, single = _methods_tuple(method)
    if derivatives not in DERIVATIVES:
        raise ValueError(f"Unknown derivatives {derivatives!r}; use one of {DERIVATIVES}.")
    if engine not in EXACT_ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; use one of {EXACT_ENGINES}.")
    if negative_denominator not in methods_lib.NEGATIVE_DENOMINATOR_RULES:
        raise ValueError(
            f"negative_denominator must be one of {methods_lib.NEGATIVE_DENOMINATOR_RULES}, "
            f"got {negative_denominator!r}."
        )
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}.")
    for label, value in (("chunk_size", chunk_size), ("class_chunk_size", class_chunk_size),
                         ("scorecam_batch_size", scorecam_batch_size)):
        if value is not None and (not isinstance(value, int | np.integer) or value < 1):
            raise ValueError(f"{label} must be a positive integer, got {value!r}.")
    _check_model_protocol(model)
    tgts = tuple(targets_lib.as_target(r.default_target if target is None else target)
                 for r in records)
    layer = model.resolve_layer(layer)
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    if np.ndim(images) < 1:
        raise ValueError("images must be a batch (B, H, W, 3).")
    _check_variables_once(model, variables)
    batch = images.shape[0]
    num_classes = getattr(model, "num_classes", None)
    for t in tgts:
        if t.classifier and num_classes is None:
            raise ValueError(
                f"target {t.name!r} needs a classifier's (B, C) logits, but this model's "
                "outputs are not (num_classes is None); use jaxcam.targets.regression(...), "
                "segmentation(...) or custom(...)."
            )
        if t.needs_class and class_idx is None and num_classes is None:
            raise ValueError(
                f"target {t.name!r} uses a class index and the model's outputs are not (B, C) "
                "logits to take an argmax of; pass class_idx=."
            )
    cls = None if class_idx is None else targets_lib.check_class_idx(class_idx, batch,
                                                                     num_classes)
    if any("linear_head" in r.needs for r in records) and not _is_traced(variables):
        lin = getattr(model, "linear_head", None)
        if lin is None or lin(variables, layer) is None:
            raise _cam_error(model, layer)
    _check_images_finite(images, nonfinite)
    datas = {t.name: targets_lib.per_image_data(t, batch) for t in tgts}
    options = dict(
        negative_denominator=negative_denominator, normalize_alpha=bool(normalize_alpha),
        chunk_size=chunk_size, class_chunk_size=class_chunk_size,
        scorecam_batch_size=int(scorecam_batch_size),
    )
    key = (_model_key(model), layer, tuple(r for r in records), tgts, derivatives, engine,
           tuple(sorted(options.items())), cls is not None)
    if key not in _COMPILED:
        info: dict[str, Any] = {}
        fn = _build(model, layer, records, tgts, derivatives, engine, options,
                    cls is not None, info)
        _COMPILED[key] = (model, fn, info)
    _, fn, info = _COMPILED[key]
    out, logits, c = fn(variables, images, cls, datas)
    engines = info.get("engines", {})
    results = {}
    for record, t in zip(records, tgts, strict=True):
        maps, raw, weights, degenerate, finite, log_scale = out[record.name]
        used = ""
        if record.higher:
            used = (f"exact/{engines.get(t.name, engine)}" if derivatives == "exact"
                    else derivatives)
        results[record.name] = Explanation(
            maps=maps, raw=raw, weights=weights, class_idx=c, logits=logits,
            degenerate=degenerate, finite=finite, log_scale=log_scale, method=record.name,
            layer=layer, target=t.name, derivatives=used,
        )
    if nonfinite == "raise" and _on_host(images) and not _is_traced(variables):
        bad = sorted({int(i) for ex in results.values()
                      for i in np.flatnonzero(~np.asarray(ex.finite))})
        if bad:
            raise ValueError(
                f"the explanation of images {bad} is not finite (NaN or infinite outputs or "
                "maps: overflowing logits or weights); check the model and variables, or "
                "pass nonfinite='flag' to get Explanation.finite = False for them."
            )
    return results[records[0].name] if single else results
