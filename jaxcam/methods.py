"""CAM methods: one registry of method records, and small pure functions of arrays.

Shapes: activations ``A`` (B, h, w, K) on the map's grid; diagonal derivatives
``D1, D2, D3`` like ``A`` (see ``jaxcam.derivatives``; up to a positive
per-image factor, which no method's normalised map depends on); channel weights
``(B, K)``; raw maps ``(B, h, w)``. Unless noted the map is
``L = ReLU(sum_k w_k A_k)`` (:func:`weighted_map`). Everything is batched,
``jit``-able and differentiable.

A method is one :class:`Method` record in the registry: name, label, paper,
default target, the quantities it needs, and a pure function of a
quantities object ``q`` (``q.A``, ``q.D1``, ``q.D2``, ``q.D3``, ``q.HA``,
``q.linear_head``, ``q.class_idx``, ``q.images``, ``q.score``, ``q.log_scale``,
``q.options``; each computed only when used) returning channel weights or a
raw map. ``jaxcam.explain`` computes the shared quantities once per call and
loops over the records; a user's method is one decorated function::

    @jaxcam.methods.register("absgrad", default_target="logit")
    def absgrad(q):
        return jnp.mean(jnp.abs(q.D1), axis=(1, 2))   # channel weights (B, K)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# What a method may ask of ``q`` (documented in docs/architecture.md).
QUANTITIES: tuple[str, ...] = ("A", "D1", "D2", "D3", "HA", "linear_head", "score",
                               "images", "class_idx")
OUTPUTS: tuple[str, ...] = ("weights", "map")

NEGATIVE_DENOMINATOR_RULES: tuple[str, ...] = ("zero", "keep")


@dataclasses.dataclass(frozen=True)
class Method:
    """A CAM method.

    Attributes:
      name: the name ``explain(method=...)`` and ``jaxcam explain --method`` take.
      fn: ``q -> (B, K)`` channel weights (``output="weights"``, the map is
        :func:`weighted_map`) or ``q -> (B, h, w)`` raw map (``output="map"``).
      output: ``"weights"`` | ``"map"``.
      default_target: the target explained when ``target=None``.
      needs: quantities of :data:`QUANTITIES` the method reads; ``explain`` checks
        their preconditions up front (CAM's GAP + dense head, a degenerate ``D2``)
        and ``D2``/``D3`` make ``derivatives=`` apply (then ``q.D1`` comes from the
        same engine as ``D2, D3``).
      label, paper, url, formula, passes: for tables (README, docs, figures).
    """

    name: str
    fn: Callable[[Any], jax.Array]
    output: str = "weights"
    default_target: str = "logit"
    needs: tuple[str, ...] = ("D1",)
    label: str = ""
    paper: str = ""
    url: str = ""
    formula: str = ""
    passes: str = "1"

    @property
    def higher(self) -> bool:
        """Whether the method uses second/third derivatives (``derivatives=`` applies)."""
        return "D2" in self.needs or "D3" in self.needs


_REGISTRY: dict[str, Method] = {}


def register(
    name: str,
    *,
    default_target: str = "logit",
    output: str = "weights",
    needs: Sequence[str] = ("D1",),
    label: str | None = None,
    paper: str = "",
    url: str = "",
    formula: str = "",
    passes: str = "1",
    replace: bool = False,
) -> Callable[[Callable[[Any], jax.Array]], Callable[[Any], jax.Array]]:
    """Decorator: register ``fn(q)`` as the CAM method ``name`` (see :class:`Method`).

    Raises ValueError for a name already registered (unless ``replace=True``), an
    unknown quantity in ``needs`` or an unknown ``output`` or target name.
    """
    from jaxcam import targets as targets_lib

    if not isinstance(name, str) or not name or name == "all" or any(
            ch.isspace() for ch in name):
        raise ValueError(f"method name must be a non-empty word other than 'all', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a method {name!r} is already registered; pick another name or pass "
                         "replace=True")
    bad = [n for n in needs if n not in QUANTITIES]
    if bad:
        raise ValueError(f"method {name!r} needs unknown quantities {bad}; use {QUANTITIES}")
    if output not in OUTPUTS:
        raise ValueError(f"method {name!r}: output must be one of {OUTPUTS}, got {output!r}")
    targets_lib.as_target(default_target)

    def decorate(fn: Callable[[Any], jax.Array]) -> Callable[[Any], jax.Array]:
        if not callable(fn):
            raise ValueError(f"register({name!r}) decorates a function q -> array, got {fn!r}")
        _REGISTRY[name] = Method(name, fn, output, default_target, tuple(needs),
                                 label or name, paper, url, formula, passes)
        return fn

    return decorate


def unregister(name: str) -> None:
    """Remove a registered method (for tests and interactive sessions)."""
    get(name)
    del _REGISTRY[name]


def get(name: str) -> Method:
    """The record of method ``name``; ValueError listing the registered names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown method {name!r}; use one of {names()}.") from None


def names() -> tuple[str, ...]:
    """Registered method names, built-ins first, in registration order."""
    return tuple(_REGISTRY)


class _Names(Sequence):
    """``METHODS``: a live, read-only view of the registered names (a tuple when
    compared, sliced or printed), so a user's registered method shows up everywhere."""

    def __getitem__(self, i):  # type: ignore[override]
        return names()[i]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __contains__(self, item: object) -> bool:
        return item in _REGISTRY

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    def __hash__(self) -> int:
        return hash(names())

    def __repr__(self) -> str:
        return repr(names())


METHODS: Sequence[str] = _Names()


def weighted_map(A: jax.Array, weights: jax.Array) -> jax.Array:
    """``ReLU(sum_k w_k A_k)``: ``A`` (B, h, w, K), weights (B, K) -> (B, h, w)."""
    return jax.nn.relu(jnp.einsum("bhwk,bk->bhw", A, weights))


def cam_weights(W: jax.Array, class_idx: jax.Array) -> jax.Array:
    """CAM (Zhou et al. 2016, arXiv:1512.04150): ``w_k = W[k, c]`` of the GAP + dense
    head ``S = mean_ij(A) @ W + b``; ``W`` (K, C), classes (B,) -> (B, K).

    The CAM map is ``sum_k w_k A_k`` (ReLU'd by :func:`weighted_map` like the
    others; positive evidence only).
    """
    return W.T[class_idx]


def gradcam_weights(D1: jax.Array) -> jax.Array:
    """Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391): ``w_k = mean_ij D1_ijk``."""
    return jnp.mean(D1, axis=(1, 2))


def gradcam_pp_alpha(
    A: jax.Array,
    D2: jax.Array,
    D3: jax.Array,
    *,
    negative_denominator: str = "zero",
    normalize_alpha: bool = False,
) -> jax.Array:
    """Grad-CAM++ coefficients (Chattopadhay et al. 2018, arXiv:1710.11063, eq. 10):
    ``alpha_ijk = D2_ijk / (2 D2_ijk + (sum_ab A_abk) D3_ijk)``.

    Rules (documented in ``docs/derivatives.md``):

    - denominator exactly 0 -> ``alpha = 0`` (as the authors' code, which
      replaces 0 denominators; e.g. ``D2 = D3 = 0``);
    - sign rule, ``negative_denominator="zero"`` (default): ``alpha = 0`` wherever
      the ratio is negative, i.e. the denominator's sign differs from ``D2``'s.
      For targets with ``D2 >= 0`` (``exp``, the closed form, ``softmax`` near
      its mode) that is exactly "negative denominator -> 0": the third-order
      term outweighs ``2 D2`` there (signed activations, smooth heads) and the
      eq. 10 derivation, which wants a non-negative weight of a positive
      gradient, breaks down. For concave targets (``log_softmax``, ``rest``:
      ``D2 = -Var <= 0``) a negative denominator gives a *positive* alpha, which
      is kept. ``"keep"``: only zero denominators are replaced; negative alphas
      stay (pytorch-grad-cam's and the authors' code).
    - ``normalize_alpha``: the authors' per-channel normalisation
      ``alpha /= sum_ij alpha`` (0 where that sum is 0). Off by default.
    """
    if negative_denominator not in NEGATIVE_DENOMINATOR_RULES:
        raise ValueError(
            f"negative_denominator must be one of {NEGATIVE_DENOMINATOR_RULES}, "
            f"got {negative_denominator!r}."
        )
    sum_a = jnp.sum(A, axis=(1, 2), keepdims=True)
    denom = 2.0 * D2 + sum_a * D3
    ok = denom != 0
    alpha = jnp.where(ok, D2 / jnp.where(ok, denom, 1.0), 0.0)
    if negative_denominator == "zero":
        alpha = jnp.where(alpha > 0, alpha, 0.0)
    if normalize_alpha:
        total = jnp.sum(alpha, axis=(1, 2), keepdims=True)
        alpha = jnp.where(total != 0, alpha / jnp.where(total != 0, total, 1.0), 0.0)
    return alpha


def gradcam_pp_weights(
    A: jax.Array,
    D1: jax.Array,
    D2: jax.Array,
    D3: jax.Array,
    *,
    negative_denominator: str = "zero",
    normalize_alpha: bool = False,
) -> jax.Array:
    """Grad-CAM++: ``w_k = sum_ij alpha_ijk ReLU(D1_ijk)`` with
    :func:`gradcam_pp_alpha`. With ``D_n`` exact this is the general eq. 10; with
    ``D_n = exp(S_c) g^n`` it is the usual closed form (eq. 19)."""
    alpha = gradcam_pp_alpha(
        A, D2, D3, negative_denominator=negative_denominator, normalize_alpha=normalize_alpha
    )
    return jnp.sum(alpha * jax.nn.relu(D1), axis=(1, 2))


def xgradcam_weights(A: jax.Array, D1: jax.Array, eps: float = 1e-7) -> jax.Array:
    """XGrad-CAM (Fu et al. 2020, arXiv:2008.02312):
    ``w_k = sum_ij (A_ijk / (sum_ab A_abk + eps)) D1_ijk``."""
    sum_a = jnp.sum(A, axis=(1, 2), keepdims=True)
    return jnp.sum(A / (sum_a + eps) * D1, axis=(1, 2))


def hirescam_map(A: jax.Array, D1: jax.Array) -> jax.Array:
    """HiResCAM (Draelos & Carin 2020, arXiv:2011.08891): ``ReLU(sum_k D1_k * A_k)``."""
    return jax.nn.relu(jnp.sum(D1 * A, axis=-1))


def layercam_map(A: jax.Array, D1: jax.Array) -> jax.Array:
    """LayerCAM (Jiang et al. 2021, IEEE TIP 30): ``ReLU(sum_k ReLU(D1_k) * A_k)``."""
    return jax.nn.relu(jnp.sum(jax.nn.relu(D1) * A, axis=-1))


def shapleycam_weights(D1: jax.Array, HA: jax.Array) -> jax.Array:
    """ShapleyCAM (Cai 2025, arXiv:2501.06261): ``w_k = mean_ij (D1 - 0.5 H A)_ijk``,
    ``H A`` the Hessian of the target w.r.t. ``A`` applied to ``A`` itself
    (see :func:`hessian_times_activations`)."""
    return jnp.mean(D1 - 0.5 * HA, axis=(1, 2))


def hessian_times_activations(f: Callable[[jax.Array], jax.Array], A: jax.Array) -> jax.Array:
    """``H A`` per image by forward-over-reverse (``jvp`` of ``grad``); ``f`` maps
    (B, h, w, K) -> (B,), images independent."""
    grad_f = jax.grad(lambda a: jnp.sum(f(a)))
    return jax.jvp(grad_f, (A,), (A,))[1]


def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of (B, h, w) maps to (B, H, W) (half-pixel centres, like
    OpenCV's ``resize`` used by pytorch-grad-cam)."""
    batch = maps.shape[0]
    return jax.image.resize(maps, (batch,) + tuple(size), method="bilinear")


def normalize_maps(maps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Min-max normalise each (H, W) map to [0, 1].

    Returns ``(normalised, degenerate)``; ``degenerate`` (B,) bool marks maps
    with no spread (all zero after the ReLU, or constant): those are returned
    as zeros, never NaN, and stay differentiable (zero gradient).
    """
    lo = jnp.min(maps, axis=(1, 2), keepdims=True)
    hi = jnp.max(maps, axis=(1, 2), keepdims=True)
    span = hi - lo
    tiny = jnp.finfo(maps.dtype).tiny
    degenerate = span[:, 0, 0] <= tiny
    safe = jnp.where(span > tiny, span, 1.0)
    out = jnp.where(span > tiny, (maps - lo) / safe, 0.0)
    return out, degenerate


def scorecam_weights(
    A: jax.Array,
    images: jax.Array,
    score_fn: Callable[[jax.Array], jax.Array],
    *,
    batch_size: int = 32,
) -> jax.Array:
    """Score-CAM (Wang et al. 2020, arXiv:1910.01279) channel weights (B, K).

    Each channel ``A_k`` is bilinearly upsampled to the input size and min-max
    normalised to [0, 1] (a constant channel gives a zero mask); the input is
    multiplied by it and scored by ``score_fn: (B, H, W, 3) -> (B,)`` (the
    target of the masked image's logits); the weights are a softmax over
    channels of those scores, as in the authors' code. ``batch_size`` channels
    are scored per vectorised chunk (``batch_size * B`` forward passes held in
    memory at once).

    Dead channels are not re-scored: a channel that is zero everywhere (common
    after a ReLU) upsamples to exactly zero, so its masked input is the zero
    image, whose score ``score_fn(0)`` is computed once. Channels are ordered
    per image with the dead ones last, and a chunk in which every channel of
    every image is dead is skipped (``lax.cond``); the weights are the same as
    scoring every channel.
    """
    batch, _, _, channels = A.shape
    size = images.shape[1:3]
    masks = jnp.moveaxis(A, -1, 0)  # (K, B, h, w)
    dead = jnp.all(masks == 0, axis=(2, 3))  # (K, B)
    zero_score = score_fn(jnp.zeros_like(images))  # (B,): the input of every dead channel

    def one(mask):  # (B, h, w) -> (B,)
        up = upsample(mask, size)
        m, _ = normalize_maps(up)
        return score_fn(images * m[..., None])

    chunk = min(int(batch_size), channels)
    n_chunks = -(-channels // chunk)
    pad = n_chunks * chunk - channels
    order = jnp.argsort(dead, axis=0, stable=True)  # (K, B): live channels first
    live_sorted = jnp.pad(~jnp.take_along_axis(dead, order, axis=0), ((0, pad), (0, 0)))
    masks_sorted = jnp.pad(jnp.take_along_axis(masks, order[:, :, None, None], axis=0),
                           ((0, pad), (0, 0), (0, 0), (0, 0)))

    def body(_, xs):
        m, live = xs  # (chunk, B, h, w), (chunk, B)
        scores = jax.lax.cond(
            jnp.any(live),
            lambda m: jax.vmap(one)(m),
            lambda m: jnp.broadcast_to(zero_score, (chunk, batch)),
            m,
        )
        return None, scores

    _, sorted_scores = jax.lax.scan(
        body, None,
        (masks_sorted.reshape((n_chunks, chunk) + masks.shape[1:]),
         live_sorted.reshape(n_chunks, chunk, batch)),
    )
    sorted_scores = sorted_scores.reshape(n_chunks * chunk, batch)[:channels]
    scores = jnp.zeros_like(sorted_scores).at[order, jnp.arange(batch)[None, :]].set(
        sorted_scores)
    scores = jnp.where(dead, zero_score[None, :], scores)  # (K, B)
    return jax.nn.softmax(scores.T, axis=-1)


def placement(name: str, model: Any, variables: Any, layer: str) -> tuple[str | None, str | None]:
    """Where method ``name`` can run on ``model`` asked for at ``layer``:
    ``(layer it runs at, None)`` or ``(None, why it cannot run)``.

    Every method runs at ``layer`` except those that need the linear head (CAM),
    which exist only at a global-average-pool + dense head: at ``layer`` if that is
    one, else at the model's default layer if that is one, else nowhere.
    """
    if "linear_head" not in get(name).needs or model.linear_head(variables, layer) is not None:
        return layer, None
    if model.linear_head(variables, model.default_layer) is not None:
        return model.default_layer, None
    where = layer if layer == model.default_layer else f"{layer} or {model.default_layer}"
    return None, f"{model.arch} has no global-average-pool + dense head at {where}"


# --------------------------------------------------------------------------- records


@register("cam", needs=("A", "linear_head", "class_idx"), label="CAM",
          paper="Zhou et al. 2016", url="https://arxiv.org/abs/1512.04150",
          formula="M = sum_k W[k,c] A_k (GAP + dense heads only)")
def _cam(q):
    return cam_weights(q.linear_head[0], q.class_idx)


@register("gradcam", label="Grad-CAM", paper="Selvaraju et al. 2017",
          url="https://arxiv.org/abs/1610.02391", formula="w_k = mean_ij D1")
def _gradcam(q):
    return gradcam_weights(q.D1)


@register("gradcam++", default_target="exp", needs=("A", "D1", "D2", "D3"),
          label="Grad-CAM++", paper="Chattopadhay et al. 2018",
          url="https://arxiv.org/abs/1710.11063",
          formula="w_k = sum_ij alpha_ijk ReLU(D1), alpha = D2 / (2 D2 + sum(A_k) D3)")
def _gradcam_pp(q):
    return gradcam_pp_weights(
        q.A, q.D1, q.D2, q.D3, negative_denominator=q.options["negative_denominator"],
        normalize_alpha=q.options["normalize_alpha"])


@register("xgradcam", needs=("A", "D1"), label="XGrad-CAM", paper="Fu et al. 2020",
          url="https://arxiv.org/abs/2008.02312", formula="w_k = sum_ij A_ijk / sum(A_k) D1_ijk")
def _xgradcam(q):
    return xgradcam_weights(q.A, q.D1)


@register("hirescam", output="map", needs=("A", "D1"), label="HiResCAM",
          paper="Draelos & Carin 2020", url="https://arxiv.org/abs/2011.08891",
          formula="M = ReLU(sum_k D1_k * A_k)")
def _hirescam(q):
    return hirescam_map(q.A, q.D1)


@register("layercam", output="map", needs=("A", "D1"), label="LayerCAM",
          paper="Jiang et al. 2021", url="https://ieeexplore.ieee.org/document/9462463",
          formula="M = ReLU(sum_k ReLU(D1_k) * A_k)")
def _layercam(q):
    return layercam_map(q.A, q.D1)


@register("scorecam", default_target="softmax", needs=("A", "images", "score"),
          label="Score-CAM", paper="Wang et al. 2020", url="https://arxiv.org/abs/1910.01279",
          formula="w = softmax_k(score(x * norm(up(A_k))))",
          passes="1 + K, chunked; channels that are zero everywhere (dead ReLUs) share one "
                 "score of the zero image, chunks of them are skipped")
def _scorecam(q):
    return scorecam_weights(q.A, q.images, q.score,
                            batch_size=q.options["scorecam_batch_size"])


@register("shapleycam", default_target="rest", needs=("D1", "HA"), label="ShapleyCAM",
          paper="Cai 2025", url="https://arxiv.org/abs/2501.06261",
          formula="w_k = mean_ij (D1 - 0.5 H A)_k")
def _shapleycam(q):
    return shapleycam_weights(q.D1, q.HA)


class _DefaultTargets(Mapping):
    """``DEFAULT_TARGETS``: method name -> its default target, a live view of the registry."""

    def __getitem__(self, name: str) -> str:
        if name not in _REGISTRY:
            raise KeyError(name)
        return _REGISTRY[name].default_target

    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __len__(self) -> int:
        return len(_REGISTRY)


DEFAULT_TARGETS: Mapping[str, str] = _DefaultTargets()
