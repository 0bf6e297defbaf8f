"""Finite-difference oracle for derivative tests: float64 estimates of
``g'(0), g''(0), g'''(0)`` along lines ``g(t) = f(A + t e_i)``, each with an error
bound, that refuse where no step gives a trustworthy estimate.

A finite-difference check is only as good as its step. Too large a step measures
the function's curvature (truncation), crosses a kink of a ReLU / max-pool head, or
aliases (``sin(3h) / h^3 -> 0`` looks converged); too small a step measures
round-off. None of these failures announces itself: an oracle that keeps "the
best" of a range of steps can keep an estimate that is pure round-off (two noisy
estimates agreeing by coincidence), and then the verdict of a test depends on
which CPU summed the numbers. This oracle finds the line's own scale and *bounds*
each estimate:

1. **Steps.** ``h_k = H 2^{-k}``, ``H`` the caller's hint rounded to a power of two,
   so that every evaluation point ``j h_k / 2`` (``j = -6..6``, 13 per level) is a
   dyadic number; consecutive levels share half their points. *Probes* descend in
   steps of 16 from ``H`` until the noise is measured: two consecutive probes show
   a noise plateau of the same size (within 4x) below ``sqrt(eps) |g|`` (a plateau
   as large as ``g``, or one that moves with the step, is unresolved variation),
   or the values are quantised. From there the ladder *ascends* level by level
   until some order is deep in truncation (its bound ``growth`` times past its
   smallest: the steps have reached the scale on which ``g`` varies, or a kink),
   the values stop being finite, or ``max_up`` levels; never beyond, where steps
   alias. So the steps span the line's scale from below, whatever ``H`` was.
2. **Noise.** ECnoise (Moré & Wild, *Estimating computational noise*, SIAM J. Sci.
   Comput. 33, 2011) on a level's 13 values: ``sigma_k = sqrt(gamma_k
   mean((Delta^k g)^2))``, ``gamma_k = (k!)^2 / (2k)!``; a plateau where three
   consecutive orders agree within 4x and ``Delta^k`` changes sign. The noise of
   ``g(t)`` is ``max(sigma_0, eta |g(t)|)``: ``sigma_0`` measured by the probes,
   ``eta`` the largest relative noise measured on any level (at least ``2 eps``),
   so relative where ``g`` grows (an ``exp`` target: relative errors whatever the
   scale ``e^{S_c}``); and on each level at least ``min_k sigma_k`` (every order's
   estimate contains the noise), which bounds noise that shows no plateau
   (rounding at equally spaced points can be a lattice pattern).
3. **Central estimates with Richardson extrapolation.** 7-point central stencils
   (``O(h^6)`` for ``g', g''``, ``O(h^4)`` for ``g'''``) per level, extrapolated in
   ``h^2`` (Neville tableau, 3 more columns; Ridders' method). Each entry has
   ``err`` (Ridders: its distance to the two entries it was built from) and
   ``R = 3 sum_j |w_j| noise(t_j)`` (every point off by 3 standard deviations,
   propagated through the extrapolation); its bound is ``err + R`` and the entry
   with the smallest bound is kept. ``R`` is computed, not observed, so a
   round-off-dominated entry cannot look good by coincidence.
4. **Kinks.** A kink within the chosen entry's reach (``3 h``, ``h`` its largest
   step) is detected by one-sided estimates: 5-point forward and backward stencils
   on ``[0, 3h]`` and ``[-3h, 0]`` with their own tableaus (powers of ``h``) over
   the same reach, with a kink-robust noise estimate (medians of ``|Delta^k|``,
   ``k = 2..4``, which a kink touches in a minority of places). Forward, backward
   and central must agree within the sums of their bounds, else every order of
   that output is refused: a kink at 0 (a max-pool tie, a ReLU at exactly 0: the
   one-sided derivatives differ, central differences average them) and kinks the
   steps cannot avoid.
5. **Verdict.** ``trusted`` iff the estimate is finite, no kink was detected and
   ``error <= rtol * max(|estimate|, scale)``, ``scale`` the caller's magnitude of
   that derivative (:func:`derivative_scale`: e.g. the largest over the
   coordinates compared, as the relative error ``|x - truth| / max|truth|`` is).
   An exactly zero derivative (``D2`` of a logit through a piecewise-linear head)
   can only be judged against such a scale. Otherwise ``reason`` says why:
   ``"kink"``, ``"round-off"``, ``"truncation"``, ``"zero"`` (indistinguishable
   from 0 at this scale), ``"non-finite"``, and the caller checks another
   coordinate: never the best of bad estimates.

Limit: an error of ``g`` that is *linear* in ``t`` is invisible to any stencil
(e.g. ``exp(a + b t)`` with ``|a|`` ~ 300, where ``fl(a + b t) - a`` rounds ``b t``
to multiples of ulp(a): a relative slope error ~1e-12 at every dyadic step). Bounds
are verified (``tests/test_testing.py``) down to 1e-11 relative; ask for ``rtol``
well above that.

:func:`coordinate_lines` builds ``g`` for ``t -> f(a + t e_i)`` over flat
coordinates ``i`` of one example (jitted, batched evaluations);
:func:`check_coordinates` takes coordinates in order until enough are trusted,
counting the refused ones by reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

EPS = float(np.finfo(np.float64).eps)
REASONS: tuple[str, ...] = ("ok", "kink", "round-off", "truncation", "zero", "non-finite")
_J = np.arange(-6, 7)  # indices of a level's points t = j h / 2
_CENTRAL = np.array([-6, -4, -2, 0, 2, 4, 6])  # t = -3h .. 3h, spacing h
_FORWARD = np.array([0, 1, 3, 5, 6])  # t = 0, h/2, 3h/2, 5h/2, 3h
_GAMMA = np.array([math.factorial(k) ** 2 / math.factorial(2 * k) for k in range(9)])
_MAX_COLUMNS = 3  # Richardson columns beyond the base estimate
_SIGMAS = 3.0  # round-off bound: every point off by up to 3 standard deviations


def _stencil(points: np.ndarray, order: int) -> np.ndarray:
    """Weights ``w`` with ``sum_j w_j p(x_j) = p^(order)(0)`` for every polynomial of
    degree ``< len(points)`` (unit spacing: divide by ``h^order``)."""
    x = np.asarray(points, np.float64)
    vander = np.vander(x, len(x), increasing=True).T
    rhs = np.zeros(len(x))
    rhs[order] = math.factorial(order)
    return np.linalg.solve(vander, rhs)


# (3, points): rows are the orders 1, 2, 3; points in units of h
_W = {
    "central": np.stack([_stencil(_CENTRAL / 2, n) for n in (1, 2, 3)]),
    "forward": np.stack([_stencil(_FORWARD / 2, n) for n in (1, 2, 3)]),
    "backward": np.stack([_stencil(-_FORWARD / 2, n) for n in (1, 2, 3)]),
}
_POINTS = {"central": _CENTRAL + 6, "forward": _FORWARD + 6, "backward": 6 - _FORWARD}
# leading error power per order and its increment per Richardson column: central
# stencils have even error expansions (h^6, h^8, ... for g', g''; h^4, h^6, ... for
# g'''), the 5-point one-sided ones every power from h^(5 - n)
_ORDER = {"central": (np.array([6.0, 6.0, 4.0]), 2.0),
          "forward": (np.array([4.0, 3.0, 2.0]), 1.0),
          "backward": (np.array([4.0, 3.0, 2.0]), 1.0)}
_FACTORIAL = np.array([1.0, 2.0, 6.0])


@dataclasses.dataclass(frozen=True)
class LineDerivatives:
    """Finite-difference estimates of ``g'(0), g''(0), g'''(0)`` along ``n`` lines.

    ``value``, ``error``, ``trusted``, ``reason``, ``step``: shape ``(n, q, 3)``, or
    ``(n, 3)`` when ``g`` returns one output per point; the last axis is the order
    1, 2, 3. ``value``: the central Richardson estimate; ``error``: its bound;
    ``reason``: one of ``REASONS`` (``"ok"`` exactly where trusted); ``step``: the
    largest step ``h`` the estimate and its error estimate used (they reach
    ``3 h``). ``noise``: ``(n, q)`` / ``(n,)`` the absolute noise of ``g`` measured
    near 0. ``evaluations``: ``(n,)`` points of ``g`` evaluated per line."""

    value: np.ndarray
    error: np.ndarray
    trusted: np.ndarray
    reason: np.ndarray
    step: np.ndarray
    noise: np.ndarray
    evaluations: np.ndarray

    @property
    def line_trusted(self) -> np.ndarray:
        """``(n,)``: every output and order of the line is trusted."""
        return self.trusted.reshape(self.trusted.shape[0], -1).all(-1)

    def refused(self) -> dict[str, int]:
        """Lines with some estimate not trusted, counted by the first such reason
        in the order of ``REASONS``."""
        counts: dict[str, int] = {}
        for row in self.reason.reshape(self.reason.shape[0], -1):
            bad = [r for r in REASONS[1:] if r in set(row)]
            if bad:
                counts[bad[0]] = counts.get(bad[0], 0) + 1
        return counts

    def take(self, index: np.ndarray) -> LineDerivatives:
        """The lines ``index`` (an int or bool index of the first axis)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})


# --------------------------------------------------------------------------- pieces


def _ecnoise(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noise of 13 equally spaced values ``v`` (..., 13) (Moré & Wild's ECnoise):
    ``(sigma, found)``. ``found`` is False where no difference order shows a noise
    plateau (the smooth part dominates: ``sigma`` is then NaN). Where fewer than 7
    values are distinct the level is quantised (differences of a few ulps): the
    noise is then at most half the spread of the values, which is returned,
    found."""
    # in units of the largest value, so that squares neither overflow (e^{600}) nor
    # underflow (e^{-600})
    unit = np.abs(v).max(-1, keepdims=True)
    unit = np.where(np.isfinite(unit) & (unit > 0), unit, 1.0)
    v = v / unit
    sig = np.full(v.shape[:-1] + (9,), np.nan)
    sign_change = np.zeros(v.shape[:-1] + (9,), bool)
    d = v
    with np.errstate(invalid="ignore", over="ignore"):
        for k in range(1, 9):
            d = np.diff(d, axis=-1)
            sig[..., k] = np.sqrt(_GAMMA[k] * np.mean(d * d, axis=-1))
            sign_change[..., k] = (d.min(-1) < 0) & (d.max(-1) > 0)
        sigma = np.full(v.shape[:-1], np.nan)
        found = np.zeros(v.shape[:-1], bool)
        for k in range(6, 0, -1):  # the smallest order with a plateau wins
            trio = sig[..., k:k + 3]
            exact = np.all(trio == 0, -1)  # exact arithmetic: no noise at all
            ok = ((trio.max(-1) <= 4 * trio.min(-1)) & sign_change[..., k]) | exact
            sigma = np.where(ok, sig[..., k], sigma)
            found |= ok
        flat = v.reshape(-1, v.shape[-1])
        distinct = np.array([len(np.unique(row)) for row in flat]).reshape(v.shape[:-1])
        quantised = (distinct < 7) & np.all(np.isfinite(v), -1)
        sigma = np.where(quantised, np.ptp(v, axis=-1) / 2, sigma)
    return sigma * unit[..., 0], found | quantised


def _noise_model(V: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sigma0, eta, found)`` from levels ``V`` (q, L, 13): the largest noise
    measured on them (absolute) and relative to the level's magnitude, floored at
    ``2 eps`` relative; ``found`` (q, L) where ECnoise measured it."""
    sig, found = _ecnoise(V)
    mag = np.abs(V).max(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma0 = np.where(found, sig, 0.0).max(-1)
        rel = np.where(found & (mag > 0), sig / mag, 0.0).max(-1)
    return sigma0, np.maximum(rel, 2 * EPS), found


def _base(V, hs, noise, kind):
    """Stencil estimates and their round-off bounds: (q, L, 3) each, from the
    levels' values ``V`` and noise (q, L, 13) and steps ``hs`` (L,)."""
    pts, W = _POINTS[kind], _W[kind]
    hn = hs[:, None] ** np.arange(1, 4)
    with np.errstate(invalid="ignore", over="ignore"):
        est = np.einsum("qlj,nj->qln", V[..., pts], W) / hn
        R = _SIGMAS * np.einsum("qlj,nj->qln", noise[..., pts], np.abs(W)) / hn
    return est, R


def _tableau(base: np.ndarray, R0: np.ndarray, kind: str):
    """Richardson (Neville) tableau over levels (axis 1, coarse -> fine, ratio 2):
    value, bound (= Ridders' err + round-off R), R, each (q, L, C, 3); and the
    coarsest level (L, C) each entry (with its error estimate) depends on."""
    p0, dp = _ORDER[kind]
    q, L, _ = base.shape
    C = _MAX_COLUMNS + 1
    T = np.full((q, L, C, 3), np.nan)
    R = np.full_like(T, np.nan)
    E = np.full_like(T, np.nan)
    T[:, :, 0], R[:, :, 0] = base, R0
    with np.errstate(invalid="ignore", over="ignore"):
        E[:, 1:, 0] = np.abs(base[:, 1:] - base[:, :-1])
        for j in range(1, C):
            f = 2.0 ** (p0 + dp * (j - 1)) - 1.0
            fine, coarse = T[:, j:, j - 1], T[:, j - 1:L - 1, j - 1]
            T[:, j:, j] = fine + (fine - coarse) / f
            R[:, j:, j] = ((f + 1) * R[:, j:, j - 1] + R[:, j - 1:L - 1, j - 1]) / f
            E[:, j:, j] = np.maximum(np.abs(T[:, j:, j] - fine), np.abs(T[:, j:, j] - coarse))
    coarsest = np.arange(L)[:, None] - np.maximum(np.arange(C), 1)[None, :]
    return T, E + R, R, coarsest


def _pick(T, B, allowed):
    """The entry with the smallest bound where ``allowed`` (q, L, C, 3): value, bound,
    flat (level * C + column) index, each (q, 3)."""
    b = np.where(allowed & np.isfinite(B) & np.isfinite(T), B, np.inf)
    q, L, C, _ = b.shape
    b2 = b.transpose(0, 3, 1, 2).reshape(q, 3, L * C)
    t2 = T.transpose(0, 3, 1, 2).reshape(q, 3, L * C)
    i = np.argmin(b2, axis=-1)
    return (np.take_along_axis(t2, i[..., None], -1)[..., 0],
            np.take_along_axis(b2, i[..., None], -1)[..., 0], i)


def _past_best(base: np.ndarray, R: np.ndarray, at: int, growth: float) -> np.ndarray:
    """(q, 3): the bound of level ``at`` (its distance to the neighbouring level plus
    its round-off bound) is ``growth`` times the smallest such bound over the
    levels, or not finite."""
    with np.errstate(invalid="ignore"):
        diff = np.abs(np.diff(base, axis=1))  # (q, L - 1, 3)
        b = np.concatenate([diff[:, :1], diff], axis=1) + R  # level 0 uses its finer neighbour
        b = np.where(np.isfinite(b), b, np.inf)
        best = b.min(axis=1)
        here = b[:, at]
        return (here >= growth * best) | ~np.isfinite(here) | ~np.isfinite(best)


def _median_noise(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A kink-robust ECnoise on 13 values ``v`` (..., 13): ``sigma_k`` from the median
    of ``|Delta^k|`` (``k = 2, 3, 4``: a kink between two points touches ``k`` of the
    ``13 - k`` differences, a minority), a plateau where the three agree within 4x.
    (sigma, found)."""
    unit = np.abs(v).max(-1, keepdims=True)
    unit = np.where(np.isfinite(unit) & (unit > 0), unit, 1.0)
    d = v / unit
    sig = []
    with np.errstate(invalid="ignore", over="ignore"):
        for k in range(1, 5):
            d = np.diff(d, axis=-1)
            if k >= 2:
                sig.append(np.sqrt(_GAMMA[k]) * np.median(np.abs(d), axis=-1) / 0.6745)
        trio = np.stack(sig, -1)
        found = (trio.max(-1) <= 4 * trio.min(-1)) & np.all(np.isfinite(v), -1)
    return trio.max(-1) * unit[..., 0], found


def _noise(V, sigma0, eta, robust=False):
    """Noise of each value ``V`` (q, L, 13): ``max(sigma0, eta' |g|)``, ``eta'`` the
    largest of the model's ``eta`` and the relative noise measured on every level of
    ``V`` that shows a noise plateau below ``sqrt(eps) |g|``. The probes measure the
    noise at tiny steps, where a sum like ``S + w t`` rounds in steps of ulp(S) (a
    staircase, smaller than the noise at working steps): the levels themselves see
    the noise at their own scale. ``robust``: levels measured with the kink-robust
    estimate (a kink's differences look like noise to ECnoise; the kink test must
    not count them as noise)."""
    sig, found = (_median_noise if robust else _ecnoise)(V)
    mag = np.abs(V).max(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = found & (mag > 0) & (sig <= np.sqrt(EPS) * mag)
        rel = np.where(ok, sig / np.where(mag > 0, mag, 1.0), 0.0).max(-1)  # (q,)
    eta = np.maximum(eta, rel)
    noise = np.maximum(sigma0[:, None, None], eta[:, None, None] * np.abs(V))
    if robust:
        return noise
    # and at least each level's own upper bound: ECnoise's sigma_k of every difference
    # order contains the noise (plus the smooth part), so min_k sigma_k bounds it even
    # where no plateau is recognised (rounding at equally spaced points can be a
    # lattice pattern, not random); orders k <= 6 keep >= 7 differences
    unit = np.where(np.isfinite(mag) & (mag > 0), mag, 1.0)[..., None]
    d, local = V / unit, np.full(V.shape[:-1], np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        for k in range(1, 7):
            d = np.diff(d, axis=-1)
            local = np.fmin(local, np.sqrt(_GAMMA[k] * np.mean(d * d, axis=-1)))
    return np.maximum(noise, (local * unit[..., 0])[..., None])


def _estimate(V, hs, sigma0, eta):
    """One line's estimates from its levels ``V`` (q, L, 13) (coarse -> fine) at steps
    ``hs`` (L,): value, error bound, reason (if not trusted), step, each (q, 3)."""
    q, L, _ = V.shape
    noise = _noise(V, sigma0, eta)
    robust = _noise(V, sigma0, eta, robust=True)
    finite = np.all(np.isfinite(V), -1)  # (q, L)
    bad = np.concatenate([np.zeros((q, 1), int), np.cumsum(~finite, -1)], -1)  # (q, L + 1)
    T, B, R, coarsest = _tableau(*_base(V, hs, noise, "central"), "central")
    lo = np.clip(coarsest, 0, L - 1)
    # an entry is usable when every level it depends on is finite
    span_ok = ((bad[:, np.arange(L)[:, None] + 1] - bad[:, lo]) == 0) & (coarsest >= 0)
    span_ok = np.broadcast_to(span_ok[..., None], T.shape)
    value, bound, idx = _pick(T, B, span_ok)
    C = T.shape[2]
    reach = np.take_along_axis(np.broadcast_to(coarsest.ravel(), (q, 3, L * C)),
                               idx[..., None], -1)[..., 0]  # (q, 3) coarsest level
    reach = np.clip(reach, 0, L - 1)
    step = hs[reach]
    R_at = np.take_along_axis(R.transpose(0, 3, 1, 2).reshape(q, 3, -1), idx[..., None],
                              -1)[..., 0]
    # one-sided tableaus over the same reach: a kink within it shows as disagreement
    sided = []
    for kind in ("forward", "backward"):
        Ts, Bs, _, cs = _tableau(*_base(V, hs, robust, kind), kind)
        within = span_ok & (cs[None, :, :, None] >= reach[:, None, None, :])
        sided.append(_pick(Ts, Bs, within)[:2])
    (vf, ef), (vb, eb) = sided
    with np.errstate(invalid="ignore"):
        kink = ((np.abs(vf - vb) > ef + eb) | (np.abs(value - vf) > bound + ef)
                | (np.abs(value - vb) > bound + eb) | ~np.isfinite(ef + eb))
        good = np.isfinite(value) & np.isfinite(bound)
        kink = kink & good
        # a kink seen by any order: g is not smooth within reach, refuse all orders
        kink = np.broadcast_to(kink.any(-1, keepdims=True), kink.shape)
        reason = np.where(~good, "non-finite", np.where(
            kink, "kink", np.where(2 * R_at >= bound, "round-off", "truncation")))
    return value, bound, reason.astype(object), step


def _quantised(V: np.ndarray) -> bool:
    """Every output of the level ``V`` (q, 13) has fewer than 7 distinct values."""
    return all(len(np.unique(row)) < 7 for row in V)


# --------------------------------------------------------------------------- oracle


def finite_difference_derivatives(
    g: Callable[[np.ndarray, np.ndarray], Any],
    num_lines: int,
    *,
    step: float | Sequence[float] | np.ndarray = 1.0,
    min_step: float | Sequence[float] | np.ndarray = 0.0,
    rtol: float = 1e-6,
    scale: Any = None,
    growth: float = 100.0,
    max_down: int = 60,
    max_up: int = 64,
) -> LineDerivatives:
    """Estimate ``g_i'(0), g_i''(0), g_i'''(0)`` for ``i < num_lines`` with error bounds
    and a trust verdict (the algorithm: this module's docstring).

    ``g(lines, t)``: ``lines`` int ``(p,)``, ``t`` float64 ``(p, m)`` -> values
    ``(p, m)`` or ``(p, m, q)`` (``q`` outputs per line that share the evaluations,
    e.g. several targets of one head call). ``step``: per line, where the ladder
    starts (any positive value; it adapts to the line's scale); ``min_step``: per
    line, the smallest spacing that still moves the argument exactly (e.g. 2 ulps of
    the coordinate's value). ``rtol``: the trusted relative error; ``scale``:
    magnitudes the error is relative to, broadcast against ``(n, q, 3)`` (default:
    each estimate's own ``|value|``). ``growth``: how far past its best level (a
    factor of the bound) the ascent goes before it stops; ``max_down``: the deepest
    probe level, ``max_up``: the most levels of ascent. Lines are independent: a
    line's result does not depend on the others in the call.
    """
    n = int(num_lines)
    if n < 1:
        raise ValueError(f"num_lines must be >= 1, got {num_lines}")
    hint = np.broadcast_to(np.asarray(step, np.float64), (n,))
    if not np.all(np.isfinite(hint) & (hint > 0)):
        raise ValueError("step must be positive and finite for every line")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    H = 2.0 ** np.round(np.log2(hint))
    min_step = np.broadcast_to(np.asarray(min_step, np.float64), (n,))
    cache: list[dict[float, np.ndarray]] = [{} for _ in range(n)]
    shape: dict[str, Any] = {}
    evaluations = np.zeros(n, int)

    def evaluate(lines: np.ndarray, k: np.ndarray) -> None:
        """Fill the cache of ``lines`` with the 13 points of their levels ``k``."""
        lines = np.asarray(lines, int)
        if lines.size == 0:
            return
        k = np.broadcast_to(np.asarray(k, int), lines.shape)
        t_all = (H[lines] * 2.0 ** -k.astype(np.float64))[:, None] * _J[None, :] / 2
        cols = [c for c in range(len(_J))
                if any(float(t_all[r, c]) not in cache[i] for r, i in enumerate(lines))]
        if cols:
            t = t_all[:, cols]  # exact dyadic numbers
            out = np.asarray(g(lines, t), np.float64)
            if out.shape[:2] != t.shape:
                raise ValueError(f"g(lines, t) returned shape {out.shape} for t of shape "
                                 f"{t.shape}; expected {t.shape} or {t.shape + ('q',)}")
            shape.setdefault("single", out.ndim == 2)
            out = out.reshape(t.shape + (-1,))
            for r, i in enumerate(lines):
                for c, tc in enumerate(t[r]):
                    cache[i][float(tc)] = out[r, c]
            evaluations[lines] += len(cols)

    def levels(i: int, ks) -> np.ndarray:
        """(q, L, 13) values of line i at levels ks."""
        h = H[i] * 2.0 ** -np.asarray(ks, np.float64)
        V = np.array([[cache[i][float(t)] for t in hk * _J / 2] for hk in h])  # (L, 13, q)
        return V.transpose(2, 0, 1)

    def steps(i: int, ks) -> np.ndarray:
        return H[i] * 2.0 ** -np.asarray(ks, np.float64)

    everyone = np.arange(n)
    # 1. probe down in steps of 16 until the noise is measured: two consecutive probes
    # show a noise plateau of the same size (within 4x) below sqrt(eps) |g|, or the
    # values are quantised. A plateau that moves with the step, or one as large as g
    # itself, is unresolved variation (a step far above the line's scale aliases:
    # sin(100 t) sampled at h = 1 looks like noise), not round-off.
    bottom = np.zeros(n, int)
    previous: dict[int, np.ndarray] = {}
    active, k = everyone, 0
    evaluate(active, 0)
    while active.size:
        keep = []
        for i in active:
            V = levels(i, [k])[:, 0]  # (q, 13)
            sig, found = _ecnoise(V)
            small = found & (sig <= np.sqrt(EPS) * np.abs(V).max(-1))
            prev = previous.get(int(i))
            stationary = prev is not None and bool(np.all(
                small & prev[1] & (np.maximum(sig, prev[0]) <= 4 * np.minimum(sig, prev[0])
                                   + 1e-300)))
            previous[int(i)] = (np.where(small, sig, np.nan), small)
            bottom[i] = k
            if not (stationary or _quantised(V)):
                keep.append(i)
        k += 4
        active = np.array(keep, int)
        active = active[(H[active] * 2.0 ** -k / 2 >= min_step[active])] if active.size else active
        if k > max_down:
            break
        evaluate(active, k)
    # the noise model: the two finest probes, both in the noise regime
    model = [_noise_model(levels(i, [kk for kk in (bottom[i] - 4, bottom[i]) if kk >= 0]))[:2]
             for i in everyone]
    sigma0 = np.stack([m[0] for m in model])  # (n, q)
    eta = np.stack([m[1] for m in model])
    # 2. ascend level by level from the noise until some order is deep in truncation
    # (its bound `growth` times past its best: the steps have reached the scale on which
    # g varies, or a kink), the values stop being finite, or max_up is reached. Never
    # beyond: larger steps alias (sin(3h) / h^3 -> 0 looks converged).
    top = bottom.copy()
    active, u = everyone, 0
    while active.size and u < max_up:
        u += 1
        evaluate(active, bottom[active] - u)
        keep = []
        for i in active:
            ks = list(range(bottom[i] - u, bottom[i] + 1))
            V = levels(i, ks)
            if not np.all(np.isfinite(V[:, 0])):
                continue
            top[i] = ks[0]
            base, R = _base(V, steps(i, ks), _noise(V, sigma0[i], eta[i]), "central")
            if not np.any(_past_best(base, R, 0, growth)):
                keep.append(i)
        active = np.array(keep, int)

    q = sigma0.shape[1]
    value = np.full((n, q, 3), np.nan)
    error = np.full((n, q, 3), np.inf)
    reason = np.full((n, q, 3), "non-finite", dtype=object)
    used = np.full((n, q, 3), np.nan)
    for i in everyone:
        ks = list(range(top[i], bottom[i] + 1))
        value[i], error[i], reason[i], used[i] = _estimate(
            levels(i, ks), steps(i, ks), sigma0[i], eta[i])

    mag = np.abs(value)
    if scale is not None:
        mag = np.maximum(mag, np.broadcast_to(np.asarray(scale, np.float64), value.shape))
    with np.errstate(invalid="ignore"):
        small = error <= rtol * mag
        indistinct = np.abs(value) <= error
    usable = (reason != "non-finite") & (reason != "kink")
    trusted = usable & small
    reason = np.where(trusted, "ok", np.where(usable & indistinct, "zero", reason)).astype(str)
    if shape.get("single"):
        value, error, trusted, reason, used = (a[:, 0] for a in (value, error, trusted,
                                                                 reason, used))
        sigma0 = sigma0[:, 0]
    return LineDerivatives(value=value, error=error, trusted=trusted, reason=reason,
                           step=used, noise=sigma0, evaluations=evaluations)


# --------------------------------------------------------------------------- coordinates


@dataclasses.dataclass
class CoordinateLines:
    """``g(lines, t) = f(a + t e_{coords[line]})`` for a function ``f`` of one example's
    activations ``a`` (float64), evaluated in jitted batches of perturbed copies.

    ``f`` maps a batch ``(P, *a.shape)`` to ``(P,)`` or ``(P, q)``, each row a function
    of its own example only (eval mode). ``step``: each line's starting step, the
    typical magnitude of ``a`` (the line's own value where larger); ``min_step``: 2
    ulps of the coordinate's value, below which ``a_i + t`` would round. Every batch is
    padded to ``chunk_size`` points, so that ``f`` compiles once."""

    f: Callable[[Any], Any]
    a: np.ndarray
    coords: np.ndarray
    chunk_size: int = 64

    def __post_init__(self) -> None:
        import jax

        if not jax.config.jax_enable_x64:
            raise ValueError("coordinate_lines needs float64: enable it with "
                             "jax.config.update('jax_enable_x64', True) (the tests' x64 "
                             "fixture does) before building the lines")
        self.a = np.asarray(self.a, np.float64)
        self.coords = np.asarray(self.coords, np.int64).ravel()
        if self.coords.size and (self.coords.min() < 0 or self.coords.max() >= self.a.size):
            raise ValueError(f"coordinates must lie in [0, {self.a.size}) (flat indices of "
                             f"an example of shape {self.a.shape})")
        self._f = jax.jit(self.f)
        self.evaluations = 0
        values = np.abs(self.a.ravel()[self.coords])
        typical = float(np.sqrt(np.mean(self.a ** 2))) or 1.0
        self.step = np.maximum(values, typical)
        self.min_step = 2 * np.spacing(values)

    def __call__(self, lines: np.ndarray, t: np.ndarray) -> np.ndarray:
        import jax.numpy as jnp

        lines, t = np.asarray(lines), np.asarray(t, np.float64)
        p, m = t.shape
        flat = np.broadcast_to(self.a.ravel(), (p * m, self.a.size)).copy()
        flat[np.arange(p * m), np.repeat(self.coords[lines], m)] += t.ravel()
        out = []
        for start in range(0, p * m, self.chunk_size):
            chunk = flat[start:start + self.chunk_size]
            size = self.chunk_size
            padded = np.concatenate([chunk, np.broadcast_to(chunk[:1], (size - len(chunk),
                                                                        chunk.shape[1]))])
            y = np.asarray(self._f(jnp.asarray(padded.reshape((size,) + self.a.shape))))
            out.append(y[:len(chunk)])
        self.evaluations += p * m
        y = np.concatenate(out).astype(np.float64)
        return y.reshape((p, m) + y.shape[1:])


def coordinate_lines(f: Callable[[Any], Any], a: Any, coords: Any, *,
                     chunk_size: int = 64) -> CoordinateLines:
    """The lines ``t -> f(a + t e_i)`` for flat coordinates ``coords`` of one example
    ``a`` (no batch axis), ready for :func:`finite_difference_derivatives`."""
    return CoordinateLines(f, a, coords, chunk_size)


@dataclasses.dataclass(frozen=True)
class CoordinateCheck:
    """Result of :func:`check_coordinates`: ``coords`` (k,) the trusted coordinates (in
    the order tried), ``fd`` their :class:`LineDerivatives`, ``refused`` the refused
    coordinates counted by reason, ``tried`` how many coordinates were examined."""

    coords: np.ndarray
    fd: LineDerivatives
    refused: dict[str, int]
    tried: int


def check_coordinates(
    f: Callable[[Any], Any],
    a: Any,
    candidates: Any,
    count: int,
    *,
    rtol: float = 1e-6,
    scale: Any = None,
    chunk_size: int = 64,
) -> CoordinateCheck:
    """Finite differences of ``t -> f(a + t e_i)`` at up to ``count`` trusted
    coordinates, taken in order from ``candidates`` (e.g. a random permutation):
    coordinates the oracle refuses (for any output or order) are replaced by the
    next candidates, and counted. ``scale`` as in
    :func:`finite_difference_derivatives`, broadcast against ``(q, 3)`` or ``(3,)``."""
    candidates = np.asarray(candidates, np.int64).ravel()
    kept, results, refused, tried = [], [], {}, 0
    while len(kept) < count and tried < candidates.size:
        batch = candidates[tried:tried + max(count - len(kept), 1)]
        tried += batch.size
        lines = coordinate_lines(f, a, batch, chunk_size=chunk_size)
        res = finite_difference_derivatives(lines, batch.size, step=lines.step,
                                            min_step=lines.min_step, rtol=rtol,
                                            scale=None if scale is None else
                                            np.asarray(scale, np.float64)[None])
        for reason, c in res.refused().items():
            refused[reason] = refused.get(reason, 0) + c
        ok = res.line_trusted
        kept.extend(batch[ok].tolist())
        results.append(res.take(ok))
    fd = _concat(results) if results else None
    return CoordinateCheck(coords=np.array(kept, np.int64), fd=fd, refused=refused,
                           tried=tried)


def _concat(parts: list[LineDerivatives]) -> LineDerivatives:
    return LineDerivatives(**{
        f.name: np.concatenate([getattr(p, f.name) for p in parts])
        for f in dataclasses.fields(LineDerivatives)})


def derivative_scale(exact: Any, length: float, value: Any = None) -> np.ndarray:
    """The magnitude a check of each derivative is relative to: ``max_i |D_n|`` over
    the checked coordinates (axis 0 of ``exact``, ``(n, ..., 3)``), as the relative
    error ``|x - truth| / max|truth|`` is. Where that is 0 (a derivative that is
    exactly zero, e.g. ``D2`` of a logit through a piecewise-linear head), the
    first-order change over ``length`` (the scale of the coordinates, e.g. the RMS
    activation), ``max_i |D_1| / length^(n - 1)``; where ``D_1`` is zero too (every
    unit after the layer dead: the function is constant), ``|value| / length^n``
    with ``value`` the function's value (shape ``exact.shape[1:-1]``). Shape
    ``exact.shape[1:]``."""
    exact = np.abs(np.asarray(exact, np.float64))
    top = exact.max(axis=0)
    powers = float(length) ** np.arange(3)
    scale = np.where(top > 0, top, top[..., :1] / powers)
    if value is not None:
        constant = np.abs(np.asarray(value, np.float64))[..., None] / (powers * float(length))
        scale = np.where(scale > 0, scale, constant)
    return scale


def resolved_top_k(scores: Any, k: int = 1, *, rtol: float = 1e-4) -> np.ndarray:
    """The indices ``(B, k)`` of each row's ``k`` largest scores, in order, after checking
    that the ranking is *resolved*: every gap between consecutive scores among the top
    ``k + 1`` (the ``k``-th against the next one too) exceeds ``rtol`` times the row's
    largest magnitude. A test that compares a class chosen in one program with one
    chosen in another (a CLI run, a compiled function, another library) depends on
    the last bits of the logits when two of them nearly tie, which differ between CPUs
    (vector width, summation order); this makes such a fixture fail everywhere, with a
    message, instead of passing or failing by the machine."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 2 or not 1 <= k < s.shape[1]:
        raise ValueError(f"scores must be (B, C) with 1 <= k < C, got shape {s.shape}, k={k}")
    order = np.argsort(-s, axis=-1, kind="stable")
    top = np.take_along_axis(s, order[:, : k + 1], axis=-1)
    gaps = -np.diff(top, axis=-1)  # (B, k)
    scale = np.abs(s).max(-1, keepdims=True)
    bad = np.argwhere(gaps <= rtol * scale)
    if bad.size:
        b, r = bad[0]
        raise AssertionError(
            f"near-tie in row {b}: the scores ranked {r + 1} and {r + 2} differ by "
            f"{gaps[b, r]:.3g} (<= {rtol:g} x {scale[b, 0]:.3g}); the ranking depends on "
            "float rounding, so the fixture is ill-conditioned: pick another seed or input")
    return order[:, :k]
