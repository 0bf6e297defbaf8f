"""``jaxcam.explain``: model + variables + images -> CAM maps, in one jitted call.

The pipeline is pure and differentiable: ``images -> features -> A -> (one VJP
of the head, derivatives) -> weights -> raw map -> bilinear upsample ->
min-max normalise``. Several methods in one call share the forward pass, the
head VJP and each target's derivatives. Compiled functions are cached per
static configuration (model, layer, methods, targets, options, shapes), so
repeated calls with the same shapes do not recompile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcam import derivatives as deriv
from jaxcam import methods as methods_lib
from jaxcam import targets as targets_lib

DERIVATIVES: tuple[str, ...] = ("exact", "closed_form", "nested_sum")
EXACT_ENGINES: tuple[str, ...] = ("auto", "factored", "taylor")

# The target each method explains when target=None: the logit for first-order
# methods (what other libraries do), exp(S_c) for Grad-CAM++ (the paper),
# softmax for Score-CAM (the authors' code scores softmax probabilities) and
# ReST for ShapleyCAM (its paper's target; with a logit through a
# piecewise-linear head its Hessian term vanishes and it equals Grad-CAM).
DEFAULT_TARGETS: dict[str, str] = {
    "cam": "logit",
    "gradcam": "logit",
    "gradcam++": "exp",
    "xgradcam": "logit",
    "hirescam": "logit",
    "layercam": "logit",
    "scorecam": "softmax",
    "shapleycam": "rest",
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Explanation:
    """One method's result for a batch.

    Attributes:
      maps: (B, H, W) in [0, 1]: ``raw`` bilinearly upsampled to the input size,
        min-max normalised per image (zeros where ``degenerate``).
      raw: (B, h, w) map at the layer's resolution, before normalisation.
      weights: (B, K) channel weights, or None (HiResCAM, LayerCAM).
      class_idx: (B,) explained classes. logits: (B, C) model outputs.
      degenerate: (B,) bool, True where the raw map has no spread (e.g. all
        zero after the ReLU); such maps are left as zeros, never NaN.
      method, layer, target: what was computed (``target`` by name).
      derivatives: ``"exact/factored"``, ``"exact/taylor"``, ``"closed_form"``,
        ``"nested_sum"`` for Grad-CAM++, ``""`` otherwise.
    """

    maps: jax.Array
    raw: jax.Array
    weights: jax.Array | None
    class_idx: jax.Array
    logits: jax.Array
    degenerate: jax.Array
    method: str = dataclasses.field(metadata=dict(static=True))
    layer: str = dataclasses.field(metadata=dict(static=True))
    target: str = dataclasses.field(metadata=dict(static=True))
    derivatives: str = dataclasses.field(default="", metadata=dict(static=True))


# static config key -> (model, jitted function); the model is kept alive with
# its entry so that an id()-based key can never be reused by another object.
_COMPILED: dict[Any, tuple[Any, Any]] = {}
_CERTIFICATES: dict[Any, bool] = {}
_SHAPES: dict[Any, tuple[Any, Any]] = {}


def _model_key(model: Any) -> Any:
    try:
        hash(model)
    except TypeError:
        return ("id", id(model))
    return model


def _is_traced(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _head_is_piecewise_linear(model, variables, layer: str, a_shape, dtype) -> bool:
    """The factored engine's certificate for ``model.head`` at ``layer``, at a
    Gaussian probe point (one image), cached per model/layer/shape."""
    key = (_model_key(model), layer, tuple(a_shape[1:]), jnp.dtype(dtype).name)
    if key in _CERTIFICATES:
        return _CERTIFICATES[key]
    if _is_traced(variables):
        raise ValueError(
            "explain(derivatives='exact', engine='auto'|'factored') certifies the head once "
            "with concrete variables; here they are traced (jit/grad over variables). Call "
            "explain once outside the transformation first, or pass engine='taylor'."
        )
    probe = jax.random.normal(jax.random.PRNGKey(0), (1,) + tuple(a_shape[1:]), dtype)
    result = deriv.is_piecewise_linear(lambda a: model.head(variables, a, layer), probe)
    _CERTIFICATES[key] = result
    return result


def _methods_tuple(method: Any) -> tuple[tuple[str, ...], bool]:
    if isinstance(method, str):
        names, single = (method,), True
    elif isinstance(method, Sequence) and method and all(isinstance(m, str) for m in method):
        names, single = tuple(method), False
    else:
        raise ValueError(
            f"method must be a method name or a non-empty list of names from "
            f"{methods_lib.METHODS}, got {method!r}."
        )
    for name in names:
        if name not in methods_lib.METHODS:
            raise ValueError(f"Unknown method {name!r}; use one of {methods_lib.METHODS}.")
    if len(set(names)) != len(names):
        raise ValueError(f"method lists {names} with a repeated name; give each method once.")
    return names, single


def _build(model, layer, names, tgts, derivatives, engine, linear, options, has_class):
    """The jitted computation for one static configuration."""
    negative = options["negative_denominator"]
    normalize_alpha = options["normalize_alpha"]

    def run(variables, images, class_idx):
        A = model.features(variables, images, layer)
        head = lambda a: model.head(variables, a, layer)
        logits, vjp_fn = jax.vjp(head, A)
        batch, num_classes = logits.shape
        c = class_idx if has_class else jnp.argmax(logits, axis=-1).astype(jnp.int32)
        onehot = jax.nn.one_hot(c, num_classes, dtype=logits.dtype)
        g = vjp_fn(onehot)[0]  # dS_c/dA, shared by every method and target
        s_c = jnp.take_along_axis(logits, c[:, None], axis=1)[:, 0]
        lin = model.linear_head(variables, layer) if linear else None
        cache: dict[Any, Any] = {}

        def f_of(t):
            phi = targets_lib.get_target(t)
            return lambda a: jax.vmap(phi)(head(a), c)

        def first(t):
            if ("D1", t) not in cache:
                if t == "logit":
                    d1 = g
                elif t == "exp":
                    d1 = jnp.exp(s_c)[:, None, None, None] * g
                else:
                    d1 = vjp_fn(targets_lib.target_grad_logits(t, logits, c))[0]
                cache[("D1", t)] = d1
            return cache[("D1", t)]

        def higher(t):
            key = ("D", derivatives, t)
            if key not in cache:
                if derivatives == "closed_form":
                    cache[key] = deriv.closed_form_from_gradient(s_c, g)
                elif derivatives == "nested_sum":
                    cache[key] = deriv.nested_sum_derivatives(f_of(t), A)
                elif engine == "factored":
                    cache[key] = deriv.factored_from_vjp(
                        logits, vjp_fn, A, t, c, g=g,
                        chunk_size=options["chunk_size"],
                        class_chunk_size=options["class_chunk_size"], linear_head=lin,
                    )
                else:
                    cache[key] = deriv.taylor_derivatives(
                        f_of(t), A, chunk_size=options["chunk_size"]
                    )
            return cache[key]

        out = {}
        for name, t in zip(names, tgts, strict=True):
            weights = None
            if name == "cam":
                weights = methods_lib.cam_weights(lin[0], c)
            elif name == "gradcam":
                weights = methods_lib.gradcam_weights(first(t))
            elif name == "gradcam++":
                D1, D2, D3 = higher(t)
                weights = methods_lib.gradcam_pp_weights(
                    A, D1, D2, D3, negative_denominator=negative,
                    normalize_alpha=normalize_alpha,
                )
            elif name == "xgradcam":
                weights = methods_lib.xgradcam_weights(A, first(t))
            elif name == "shapleycam":
                HA = methods_lib.hessian_times_activations(f_of(t), A)
                weights = methods_lib.shapleycam_weights(first(t), HA)
            elif name == "scorecam":
                def score_fn(x, phi=t):
                    return targets_lib.target_scores(phi, model.apply(variables, x), c)

                weights = methods_lib.scorecam_weights(
                    A, images, score_fn, batch_size=options["scorecam_batch_size"]
                )
            if name == "hirescam":
                raw = methods_lib.hirescam_map(A, first(t))
            elif name == "layercam":
                raw = methods_lib.layercam_map(A, first(t))
            else:
                raw = methods_lib.weighted_map(A, weights)
            maps, degenerate = methods_lib.normalize_maps(
                methods_lib.upsample(raw, images.shape[1:3])
            )
            out[name] = (maps, raw, weights, degenerate)
        return out, logits, c

    return jax.jit(run)


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
) -> Explanation | dict[str, Explanation]:
    """Explain ``images`` with one or several CAM methods.

    Args:
      model, variables: a ``jaxcam.models`` model and its variables.
      images: (B, H, W, 3) float, normalised as the model expects.
      method: a name from ``jaxcam.METHODS`` -> an :class:`Explanation`; or a
        list/tuple of names -> dict name -> Explanation (one shared forward
        pass, head VJP and derivative computation per target).
      layer: cut point (None: ``model.default_layer``).
      target: name in ``jaxcam.targets.TARGETS`` or callable ``phi(S, c)``; None
        uses each method's default (``DEFAULT_TARGETS``: logit for first-order
        methods, exp for Grad-CAM++).
      class_idx: int, (B,) ints, or None (each image's argmax).
      derivatives: Grad-CAM++'s ``D2, D3``: ``"exact"`` (true diagonal,
        ``engine`` = ``"auto"`` | ``"factored"`` | ``"taylor"``), ``"closed_form"``
        (eq. 19, ``exp(S_c) g^n`` for every target, as other libraries), or
        ``"nested_sum"`` (Hessian row sums; for study only).
      normalize_alpha, negative_denominator: see
        :func:`jaxcam.methods.gradcam_pp_alpha`.
      chunk_size, class_chunk_size: memory bounds of the derivative engines
        (see :func:`jaxcam.diagonal_derivatives`); scorecam_batch_size:
        channels scored per vectorised chunk.

    Raises ValueError up front for unknown names, a class index out of range,
    CAM on a head that is not GAP + dense, and exact Grad-CAM++ on a ``logit``
    target through a piecewise-linear head (its ``D2`` is identically 0).
    """
    names, single = _methods_tuple(method)
    if derivatives not in DERIVATIVES:
        raise ValueError(f"Unknown derivatives {derivatives!r}; use one of {DERIVATIVES}.")
    if engine not in EXACT_ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; use one of {EXACT_ENGINES}.")
    if negative_denominator not in methods_lib.NEGATIVE_DENOMINATOR_RULES:
        raise ValueError(
            f"negative_denominator must be one of {methods_lib.NEGATIVE_DENOMINATOR_RULES}, "
            f"got {negative_denominator!r}."
        )
    for label, value in (("chunk_size", chunk_size), ("class_chunk_size", class_chunk_size),
                         ("scorecam_batch_size", scorecam_batch_size)):
        if value is not None and (not isinstance(value, int | np.integer) or value < 1):
            raise ValueError(f"{label} must be a positive integer, got {value!r}.")
    if target is not None:
        targets_lib.validate_target(target)
    layer = model.resolve_layer(layer)
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    # model.features validates the images (rank, channels, size) with a clear ValueError.
    shape_key = (_model_key(model), layer, tuple(images.shape), str(images.dtype))
    if shape_key not in _SHAPES:
        _SHAPES[shape_key] = (model, jax.eval_shape(
            lambda v, x: model.features(v, x, layer), variables, images))
    a_shape = _SHAPES[shape_key][1]
    batch = images.shape[0]
    cls = None
    if class_idx is not None:
        dummy = jax.ShapeDtypeStruct((batch, model.num_classes), jnp.float32)
        cls = targets_lib.select_class(dummy, class_idx)
    tgts = tuple(DEFAULT_TARGETS[n] if target is None else target for n in names)

    linear = model.linear_head(variables, layer) is not None
    if "cam" in names and not linear:
        raise ValueError(
            f"CAM needs a head that is global average pooling then one dense layer; "
            f"{model.arch} at layer {layer!r} has another head. Use 'gradcam' (equal to "
            "CAM / (h*w) on such heads) or a layer whose head is GAP + dense."
        )
    resolved = engine
    if "gradcam++" in names and derivatives == "exact":
        pp_target = tgts[names.index("gradcam++")]
        if engine in ("auto", "factored") or pp_target == "logit":
            certified = _head_is_piecewise_linear(
                model, variables, layer, a_shape.shape, a_shape.dtype
            )
            if engine == "factored" and not certified:
                raise deriv._not_certified_error(f" (model {model.arch}, layer {layer!r})")
            if engine == "auto":
                resolved = "factored" if certified else "taylor"
            if pp_target == "logit" and certified:
                raise ValueError(
                    f"exact Grad-CAM++ with target='logit' is degenerate: the head of "
                    f"{model.arch} at {layer!r} is piecewise linear, so the exact D2 of a "
                    "logit is identically 0 and every alpha is 0. Use target='exp' (the "
                    "paper's choice), 'softmax', 'log_softmax' or 'rest', or "
                    "derivatives='closed_form'."
                )
    options = dict(
        negative_denominator=negative_denominator, normalize_alpha=bool(normalize_alpha),
        chunk_size=chunk_size, class_chunk_size=class_chunk_size,
        scorecam_batch_size=int(scorecam_batch_size),
    )
    key = (_model_key(model), layer, names, tgts, derivatives, resolved, linear,
           tuple(sorted(options.items())), cls is not None)
    if key not in _COMPILED:
        fn = _build(model, layer, names, tgts, derivatives, resolved, linear, options,
                    cls is not None)
        _COMPILED[key] = (model, fn)
    out, logits, c = _COMPILED[key][1](variables, images, cls)
    used = {"exact": f"exact/{resolved}"}.get(derivatives, derivatives)
    results = {}
    for name, t in zip(names, tgts, strict=True):
        maps, raw, weights, degenerate = out[name]  # (jit returns dicts in sorted order)
        results[name] = Explanation(
            maps=maps, raw=raw, weights=weights, class_idx=c, logits=logits,
            degenerate=degenerate, method=name, layer=layer,
            target=targets_lib.target_name(t), derivatives=used if name == "gradcam++" else "",
        )
    return results[names[0]] if single else results
