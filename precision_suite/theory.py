"""Mean-field predictions of the failing layer (docs/theory.md).

Forward, pre-activations z_l ~ N(0, q_l) over the batch x width elements (mean field):

    q_l = sigma_w^2 E[x_{l-1}^2] + sigma_b^2,   x_l = phi(z_l),   sigma_w^2 = n_in Var(w), sigma_b^2 = Var(b)

with E[x^2] in closed form for identity (q) and relu (q/2), by quadrature otherwise (``_nodes``).
Two corrections make it predict the layer of one draw of weights rather than the mean over draws:

- **Finite width.** A row of the batch averages n squared units, so each layer multiplies its
  second moment by a factor of relative variance kappa/n, kappa = E[x^4]/E[x^2]^2 - 1 of the layer
  input (2 for a Gaussian, 5 for relu of one). The log-variance accumulates (carried through phi
  with gain beta = dlog E[x^2]/dlog q): a share rho = c^2 is common to all rows (shared weights;
  c is the rows' mean-field correlation), the rest is the row's own. A row's pre-activations are
  N(0, q_l e^{C+R}), C ~ N(-V_C/2, V_C), R ~ N(-V_R/2, V_R), so the mean stays q_l; events are
  judged at the median C and integrated over R: the largest row overflows first and dies last.
- **The format's grid.** Each layer's input is rounded. Below the smallest normal the grid is
  uniform (smallest_subnormal apart), so for identity and relu E[x^2], E[x^4] are sums over its
  cells; survivors of a dying layer round up to a whole subnormal and live a layer or two longer.
  Relative rounding above it, and the grid for other activations, are neglected.

A tensor of B rows x n elements is judged as the measured events judge it (stats.py), with p the
per-element probability of a class in a row and E_R the average over rows:

    overflow   (E_R[(1 - P(|v| >= T_of))^n])^B <= 1/2
    zero       (E_R[(1 - P(|v| > T))^n])^B >= 1/2        T = smallest_subnormal/2 rounds to 0
    underflow  E_R[P(eps rms <= |v| <= T)] >= threshold  (rms of the whole tensor: significant only)

i.e. at the layer where the event's median over draws is crossed. Without spread the first is
k_N sqrt(q) >= T_of with k_N = sqrt(2) erfcinv(1 - 2^(-1/N)), the median of the largest |z| of
N = B n standard normals (~3.76 for N = 4096); the second is the same law for the smallest
survivor: the whole post is zero when even its largest element rounds to zero.

Backward (mean field, no correction), delta_l = dloss/dpre_l, loss = S sum(post_depth * g):

    E[grad_depth^2] = S^2,   E[delta_l^2] = E[grad_l^2] E[phi'(z_l)^2],
    E[grad_{l-1}^2] = n_out Var(w) E[delta_l^2]   (chi_1 = n_out Var(w) E[phi'^2] per layer),
    E[wgrad_l^2] = B E[delta_l^2] E[x_{l-1}^2]     (a sum over the batch, taken as Gaussian).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as _np
from numpy.polynomial.hermite_e import hermegauss as _hermegauss
from numpy.polynomial.legendre import leggauss as _leggauss
from scipy.special import erf as _erf
from scipy.special import erfc as _erfc
from scipy.special import ndtr as _ndtr

from .activations import Activation, get_activation
from .draws import parse_input
from .formats import Format, get_format
from .inits import parse_init

__all__ = ["Profile", "gauss_expect", "predict", "propagate"]

_SQRT2 = math.sqrt(2.0)
_PIXEL_LEVELS = 256  # draws.draw_input: pixels are the integers 0..255


def _gh(order: int):
    """Probabilists' Gauss–Hermite nodes and weights normalized to E over N(0, 1)."""
    x, w = _hermegauss(order)
    return x, w / w.sum()


_GH2_X, _GH2_W = _gh(24)  # per axis of the 2-D correlation integral
_ROW_X, _ROW_W = _gh(32)  # the rows' log-normal spread
_GL_X, _GL_W = _leggauss(8)


@functools.lru_cache(maxsize=4096)
def _nodes(q: float) -> tuple[_np.ndarray, _np.ndarray]:
    """Nodes and weights of E over z ~ N(0, q): Gauss–Legendre on panels sigma/2 wide out to
    12 sigma (the Gaussian's scale) and 1 wide out to 30 (the activations' own), 0 an edge (kinks).
    Cached (read-only arrays): the backward pass integrates over the forward pass's q values.

    Gauss–Hermite puts its nodes ~ sigma pi / sqrt(2 order) apart and misses the unit-scale
    features of phi and phi' once sigma >> 1 (96 nodes: E[tanh'^2] at q = 100 off by -89%)."""
    if q == 0:
        return _read_only(_np.zeros(1), _np.ones(1))
    s = math.sqrt(q)
    edges = _np.concatenate([s * _np.arange(-24, 25) / 2, _np.arange(-30.0, 31.0)])
    edges = _np.unique(_np.clip(edges, -12 * s, 12 * s))
    half, mid = _np.diff(edges)[:, None] / 2, (edges[:-1] + edges[1:])[:, None] / 2
    z = (mid + half * _GL_X).ravel()
    w = (half * _GL_W).ravel() * _np.exp(-((z / s) ** 2) / 2)
    return _read_only(z, w / w.sum())


def _read_only(*arrays: _np.ndarray) -> tuple:
    """The arrays, made read-only: cached results are shared by every caller."""
    for a in arrays:
        a.setflags(write=False)
    return arrays


def gauss_expect(f, q: float) -> float:
    """E_{z~N(0,q)}[f(z)] by composite Gauss–Legendre quadrature (``_nodes``)."""
    z, w = _nodes(q)
    return float(f(z) @ w)


def _grid(u: float, fmt: Format) -> tuple[float, float]:
    """(E[x^2], E[x^4]) per side in units of (q, q^2) of z ~ N(0, q) rounded to the subnormal grid,
    u = smallest_subnormal / sqrt(q): cells k s up to the smallest normal or 40 sigma (beyond
    them P = 0), then the truncated Gaussian moments of the unrounded tail."""
    cells = min(round(fmt.smallest_normal / fmt.smallest_subnormal), math.ceil(40 / u))
    k = _np.arange(1, cells + 1)
    p = _ndtr(-(k - 0.5) * u) - _ndtr(-(k + 0.5) * u)  # P(z rounds to k s)
    a = (cells + 0.5) * u
    pdf, tail = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), float(_ndtr(-a))
    return float(p @ (k * u) ** 2) + tail + a * pdf, float(p @ (k * u) ** 4) + 3 * tail + (a**3 + 3 * a) * pdf


class _Moments(NamedTuple):
    """Of a layer's output x = phi(z), z ~ N(0, q): E[x^2]; kappa = E[x^4]/E[x^2]^2 - 1; the part
    of kappa that follows the row's ||z||^2, (Cov(x^2, z^2)/E[x^2])^2 / Var(z^2) (orthogonal
    weights fix ||z|| and leave only the rest); beta = dlog E[x^2]/dlog q; E[phi'(z)^2]."""

    m2: float
    kappa: float
    kappa_norm: float
    beta: float
    dphi2: float


def _layer_moments(act: Activation, q: float, fmt: Format | None) -> _Moments:
    """``_Moments`` at q. Identity and relu in closed form (kappa 2 and 5, kappa_norm 2) with x
    rounded to ``fmt``'s subnormal grid (``_grid``; beta by a central difference); otherwise by
    quadrature, unrounded, beta from Stein's identity dE[f]/dq = E[f(z)(z^2 - q)]/(2 q^2). The
    closed forms are positively homogeneous, phi(z) = z phi'(z): E[phi'^2] = E[phi^2]/q, and
    phi'(0)^2 at q = 0."""
    if act.second_moment_factor is None:
        if q == math.inf:
            return _Moments(math.inf, 0.0, 0.0, 1.0, math.nan)
        z, w = _nodes(q)
        with _np.errstate(over="ignore", invalid="ignore"):  # q near the float64 limit: E[x^2] = inf
            x2 = act.numpy_fn(z) ** 2
            m2 = float(x2 @ w)
            dphi2 = float(act.numpy_grad(z) ** 2 @ w)
            if not 0 < m2 < math.inf or q == 0:
                return _Moments(m2, 0.0, 0.0, 1.0, dphi2)
            stein = float(x2 @ (w * ((z / math.sqrt(q)) ** 2 - 1)))  # Cov(x^2, z^2) / q
            return _Moments(m2, float((x2 / m2) ** 2 @ w) - 1, (stein / m2) ** 2 / 2, stein / (2 * m2), dphi2)
    factor = act.second_moment_factor
    if q == 0:
        return _Moments(0.0, 0.0, 0.0, 1.0, float(act.numpy_grad(_np.zeros(1))[0]) ** 2)
    u = 0.0 if fmt is None else fmt.smallest_subnormal / math.sqrt(q)  # the grid in units of sigma
    if u < 1e-2:  # rounding moves E[x^2] by ~u^2/12: nothing
        return _Moments(factor * q, 3 / factor - 1, 2.0, 1.0, factor)
    if u > 80:  # everything rounds to zero
        return _Moments(0.0, 0.0, 0.0, 1.0, factor)
    m2, m4 = _grid(u, fmt)
    if m2 == 0:
        return _Moments(0.0, 0.0, 0.0, 1.0, factor)
    h = 1e-3  # q e^{+-h} is u e^{-+h/2}; E[x^2] = 2 factor m2(u) q
    up, down = _grid(u * math.exp(-h / 2), fmt)[0], _grid(u * math.exp(h / 2), fmt)[0]
    beta = 1 + math.log(up / down) / (2 * h) if up > 0 and down > 0 else 1.0
    return _Moments(2 * factor * m2 * q, m4 / m2 / m2 / (2 * factor) - 1, 2.0, beta, factor)


def _cross(act: Activation, q: float, c: float) -> float:
    """E[phi(u) phi(v)], (u, v) ~ N(0, q [[1, c], [c, 1]]): identity c q, relu the arc-cosine
    kernel q (sin t + (pi - t) cos t) / (2 pi), t = arccos c; 2-D quadrature otherwise."""
    c = min(max(c, -1.0), 1.0)
    if act.name == "identity":
        return c * q
    if act.name == "relu":
        t = math.acos(c)
        return q * (math.sin(t) + (math.pi - t) * c) / (2 * math.pi)
    s = math.sqrt(q)
    u = s * _GH2_X[:, None]
    v = s * (c * _GH2_X[:, None] + math.sqrt(1 - c * c) * _GH2_X[None, :])
    return q * float(_GH2_W @ ((act.numpy_fn(u) / s) * (act.numpy_fn(v) / s)) @ _GH2_W)


@dataclass(frozen=True)
class Profile:
    """Forward prediction per layer 1..depth: q (mean second moment of pre), x2 = E[x_l^2] (post,
    rounded), dphi2 = E[phi'(z_l)^2], var_common and var_row (log-variance of a row's second
    moment shared by all rows / its own)."""

    q: _np.ndarray
    x2: _np.ndarray
    dphi2: _np.ndarray
    var_common: _np.ndarray
    var_row: _np.ndarray


def propagate(act: Activation, sigma_w2: float, sigma_b2: float, x0: tuple[float, float, float], width: int,
              depth: int, fmt: Format | None = None, orthogonal: bool = False) -> Profile:
    """The forward recursion from the input's (E[x^2], kappa, E[x_b x_b']) (x_b, x_b': two rows).

    q_l = sigma_w^2 E[x_{l-1}^2] + sigma_b^2; rows' correlation c_l = (sigma_w^2 E[x_b x_b'] + sigma_b^2)/q_l;
    V_{l+1} = beta_l^2 V_l + k_l/width, split common : row = c_l^2 : 1 - c_l^2, with k = kappa
    (orthogonal weights: kappa - kappa_norm). The input's rows are independent draws: its kappa is
    all row-level. ``fmt`` None: no rounding. A q that leaves float64 stays inf; a chain whose q
    reaches 0 stays dead. Cached: only identity and relu (the closed forms) see ``fmt``, so the
    other activations share one profile across formats.
    """
    grid = fmt if act.second_moment_factor is not None else None
    return _propagate(act.name, sigma_w2, sigma_b2, tuple(x0), width, depth, grid, orthogonal)


@functools.lru_cache(maxsize=256)
def _propagate(act_name: str, sigma_w2: float, sigma_b2: float, x0: tuple[float, float, float], width: int,
               depth: int, fmt: Format | None, orthogonal: bool) -> Profile:
    act = get_activation(act_name)
    m2, kappa, m11 = x0
    out = _np.zeros((5, depth))
    vc, vr = 0.0, kappa / width
    for i in range(depth):
        q = sigma_w2 * m2 + sigma_b2
        q = math.inf if math.isnan(q) else q
        c = (sigma_w2 * m11 + sigma_b2) / q if 0 < q < math.inf else 1.0
        mom = _layer_moments(act, q, fmt)
        m2 = mom.m2
        out[:, i] = q, m2, mom.dphi2, vc, vr
        if not 0 < q < math.inf:
            out[:, i:] = out[:, i:i + 1]
            break
        m11 = _cross(act, q, c)
        k = max(mom.kappa - mom.kappa_norm, 0.0) if orthogonal else mom.kappa
        vc = mom.beta**2 * vc + c * c * k / width
        vr = mom.beta**2 * vr + (1 - c * c) * k / width
    return Profile(*_read_only(*out))


# ---- element classes: (P(|v| >= T_of), P(floor <= |v| <= T), P(|v| > T)), elementwise over arrays ----
# ``floor`` is the significance floor eps * rms of the element's tensor: an element below it is
# flushed, not underflowed (smaller than the tensor's own resolution), so it is not counted.


def _gaussian(var, fmt: Format, floor):
    """v ~ N(0, var); var == 0 is an exact zero (no underflow, no overflow). The underflowed share
    max(0, erf(T/(sigma sqrt 2)) - erf(floor/(sigma sqrt 2))); with floor = eps sigma the second
    term is erf(eps/sqrt 2)."""
    s = _np.sqrt(_np.asarray(var, dtype=_np.float64)) * _SQRT2
    with _np.errstate(divide="ignore", invalid="ignore"):
        over = _np.nan_to_num(_erfc(fmt.overflow_threshold / s), nan=1.0)
        under = _np.nan_to_num(_erf(fmt.underflow_threshold / s) - _erf(_np.asarray(floor) / s), nan=0.0)
        nonzero = _np.nan_to_num(_erfc(fmt.underflow_threshold / s), nan=1.0)
    live = s > 0
    return _np.where(live, over, 0.0), _np.where(live, _np.maximum(under, 0.0), 0.0), _np.where(live, nonzero, 0.0)


@functools.cache
def _abs_phi_grid(act_name: str) -> tuple[_np.ndarray, _np.ndarray]:
    """(grid, |phi(grid)|): a grid of z that is linear near 0 (where the activations turn) and
    geometric out to 2^+-1023, shared by every level set of the activation."""
    geo = _np.ldexp(1.0, _np.arange(-1074, 1024))
    grid = _np.unique(_np.concatenate([-geo, _np.linspace(-64, 64, 8193), geo]))
    with _np.errstate(all="ignore"):
        return grid, _np.abs(get_activation(act_name).numpy_fn(grid))


@functools.lru_cache(maxsize=4096)
def _level_set(act_name: str, t: float) -> tuple:
    """The intervals of z where |phi(z)| > t, as ((a, b), ...) with infinite ends allowed."""
    return _level_sets(act_name, [t])[0]


_LEVEL_SETS_AT_ONCE = 64  # thresholds whose grid comparisons are held together (64 x ~10k booleans)


def _level_sets(act_name: str, ts) -> list[tuple]:
    """``_level_set`` for each threshold of ``ts``: the crossings of |phi(z)| = t are bracketed on
    ``_abs_phi_grid``, then bisected to adjacent floats, every threshold's brackets in one bisection."""
    phi = get_activation(act_name).numpy_fn
    grid, abs_phi = _abs_phi_grid(act_name)
    out = []
    for start in range(0, len(ts), _LEVEL_SETS_AT_ONCE):
        t = _np.asarray(ts[start:start + _LEVEL_SETS_AT_ONCE], dtype=_np.float64)
        above = abs_phi[None, :] > t[:, None]
        rows, flips = _np.nonzero(above[:, 1:] != above[:, :-1])
        t_of = t[rows]
        edges = _bisect(lambda z: _np.abs(phi(z)) > t_of, grid[flips], grid[flips + 1])
        for k in range(len(t)):
            mine = rows == k
            bounds = [-math.inf, *edges[mine].tolist(), math.inf]
            inside = [bool(above[k, 0])] + above[k, flips[mine] + 1].tolist()
            out.append(tuple((a, b) for a, b, keep in zip(bounds[:-1], bounds[1:], inside) if keep))
    return out


def _bisect(test, lo: _np.ndarray, hi: _np.ndarray) -> _np.ndarray:
    """Per bracket, where ``test`` flips between lo and hi (test(lo) != test(hi)), to adjacent floats:
    all brackets at once. Grid neighbours are at most a factor 2 (or 1/64) apart, so ~60 halvings
    reach adjacent floats; each keeps the half whose ends still disagree."""
    lo, hi = lo.copy(), hi.copy()
    with _np.errstate(all="ignore"):
        at_lo = test(lo)
        for _ in range(2200):  # a bound for brackets spanning subnormals; ~60 in practice
            mid = lo + (hi - lo) / 2
            open_ = (mid > lo) & (mid < hi)
            if not open_.any():
                break
            left = test(mid) != at_lo  # the flip lies in [lo, mid]
            hi = _np.where(open_ & left, mid, hi)
            lo = _np.where(open_ & ~left, mid, lo)
    return lo + (hi - lo) / 2


def _mass(intervals, sigma):
    """P(z in union of intervals), z ~ N(0, sigma^2); upper tails through ndtr(-x) for accuracy."""
    out = _np.zeros_like(sigma)
    with _np.errstate(divide="ignore", invalid="ignore"):
        for a, b in intervals:
            lo, hi = a / sigma, b / sigma
            upper = _np.nan_to_num(_ndtr(-lo) - _ndtr(-hi))
            lower = _np.nan_to_num(_ndtr(hi) - _ndtr(lo))
            out += _np.where(lo > 0, upper, lower)
    return out


def _post(act: Activation, var, fmt: Format, floor):
    """post = phi(z), z ~ N(0, var): identity is z; relu is z above 0 and an exact zero below;
    otherwise the level sets of |phi| (exact zeros of the wide computation count as flushed).
    ``floor``: per layer (axis 0), eps * the post tensor's rms."""
    if act.name == "identity":
        return _gaussian(var, fmt, floor)
    if act.name == "relu":
        return tuple(0.5 * p for p in _gaussian(var, fmt, floor))
    sigma = _np.sqrt(var)
    nonzero = _mass(_level_set(act.name, fmt.underflow_threshold), sigma)
    under = _np.zeros_like(sigma)
    rows = _np.flatnonzero(_np.ravel(floor) < fmt.underflow_threshold)  # else nothing flushed counts
    for i, level_set in zip(rows, _level_sets(act.name, _np.ravel(floor)[rows])):
        under[i] = _np.maximum(_mass(level_set, sigma[i]) - nonzero[i], 0.0)
    return _mass(_level_set(act.name, fmt.overflow_threshold), sigma), under, nonzero


def _delta(act: Activation, q, grad2, fmt: Format):
    """delta = grad * phi'(z), z ~ N(0, q): a Gaussian scale mixture, by quadrature over z (relu:
    half exact zeros, half N(0, grad2)); where phi'(z) == 0 delta is an exact zero. The
    significance floor is eps * rms(delta), rms^2 = grad2 E[phi'^2]."""
    if act.name == "identity":
        return _gaussian(grad2, fmt, fmt.eps * _np.sqrt(grad2))
    if act.name == "relu":
        live = _np.where(q > 0, grad2, 0.0)
        return tuple(0.5 * p for p in _gaussian(live, fmt, fmt.eps * _np.sqrt(live / 2)))
    # every layer's quadrature nodes end to end, layer i's from starts[i]: one array pass each
    nodes = [_nodes(qi) for qi in q]
    z, w = _np.concatenate([n[0] for n in nodes]), _np.concatenate([n[1] for n in nodes])
    counts = _np.array([len(n[0]) for n in nodes])
    starts = _np.concatenate([[0], _np.cumsum(counts)[:-1]])
    with _np.errstate(over="ignore", invalid="ignore"):
        var = _np.repeat(_np.asarray(grad2, dtype=_np.float64), counts) * act.numpy_grad(z) ** 2
        floor = fmt.eps * _np.sqrt(_np.add.reduceat(var * w, starts))
        return tuple(_np.add.reduceat(p * w, starts) for p in _gaussian(var, fmt, _np.repeat(floor, counts)))


def _masks(classes, weights, per_row: int, rows: int, threshold: float):
    """Per-layer (overflow, underflow, zero) of a tensor of ``rows`` x ``per_row`` elements whose
    classes are given per layer (axis 0) and row scale (axis 1, averaged with ``weights``)."""
    over, under, nonzero = (_np.clip(_np.asarray(c, dtype=_np.float64), 0.0, 1.0).reshape(len(c), -1) for c in classes)
    with _np.errstate(divide="ignore", over="ignore"):
        none_over = (_np.exp(per_row * _np.log1p(-over)) @ weights) ** rows
        all_zero = (_np.exp(per_row * _np.log1p(-nonzero)) @ weights) ** rows
    return none_over <= 0.5, under @ weights >= threshold, all_zero >= 0.5


def _first(masks, last: bool) -> dict:
    out = {}
    for name, mask in zip(("first_overflow", "first_underflow", "first_zero"), masks):
        idx = _np.flatnonzero(mask)
        out[name] = None if not idx.size else int(idx[-1] if last else idx[0]) + 1
    return out


# ---- the theory block ----


def _not_applicable(reason: str) -> dict:
    return {"applicable": False, "reason": reason, "first_overflow": None, "first_underflow": None,
            "first_zero": None, "rms": None, "backward": None}


def _input_moments(spec) -> tuple[float, float, float]:
    """(E[x^2], kappa, E[x_b x_b']) of the input: normal (1, 2, 0); shifted m + s N(0,1) from
    E[x^2] = m^2+s^2, E[x^4] = m^4+6m^2s^2+3s^4, cross m^2; pixels uniform on 0..255."""
    if spec.kind == "pixels":
        k = _np.arange(_PIXEL_LEVELS, dtype=_np.float64)
        m2, m4, m1 = float(_np.mean(k**2)), float(_np.mean(k**4)), float(_np.mean(k))
    else:
        m1, s = spec.mean, spec.std
        m2, m4 = m1 * m1 + s * s, m1**4 + 6 * m1 * m1 * s * s + 3 * s**4
    return m2, m4 / m2 / m2 - 1, m1 * m1


def _why_not(case, init) -> str | None:
    if parse_input(case.input).kind == "outliers":
        return "outlier channels are scaled in every layer's matmul input: the chain is not x_l = phi(W x_{l-1})"
    if case.norm != "none":
        return f"{case.norm} rescales every layer from the batch: there is no drift to propagate"
    if case.residual is not None:
        return "residual connections add the layer input back: the chain is not x_l = phi(W x_{l-1})"
    if init.mean != 0.0:
        return (f"weights have mean {init.mean!r}: pre-activations are not zero-mean "
                "(the Gaussian picture needs E[w] = 0)")
    if init.data_dependent:
        return "lsuv sets each layer's scale from the batch (data-dependent, not drawn): no mean-field recursion"
    return None


def predict(case) -> dict:
    """The case's ``theory`` block (docs/theory.md): predicted events forward and backward.

    ``rms``: the predicted pre-activation RMS, sqrt(q_l e^{-V_C/2}) (the median over draws); a scaled
    format's block carries ``notes``: the predictions are its storage format's, quantization's are not made;
    ``backward.rms``: the RMS of delta_l = dloss/dpre_l, loss scale included. A null event means
    "not within depth". Orthogonal weights (gain g) qualify: W x has norm g ||x|| and nearly
    Gaussian entries, the recursion with sigma_w^2 = g^2. A non-normal input enters through its
    moments: zero-mean weights make pre_1 zero-mean Gaussian whatever the input's mean, with
    q_1 = sigma_w^2 E[x_0^2] (pixels: the second moment, mean included, not the variance).
    """
    init = parse_init(case.init)
    reason = _why_not(case, init)
    if reason is not None:
        return _not_applicable(reason)
    act, fmt = get_activation(case.activation), get_format(case.format)
    n, depth, batch = case.width, case.depth, case.batch
    var_w = init.std(n, n) ** 2
    sigma_w2 = n * var_w
    sigma_b2 = var_w if case.bias else 0.0  # draws.draw_bias: std = init.std(n_in, n_out)
    x0 = _input_moments(parse_input(case.input))
    prof = propagate(act, sigma_w2, sigma_b2, x0, n, depth, fmt if fmt.has_wider else None,
                     orthogonal=init.name == "orthogonal")
    with _np.errstate(over="ignore", invalid="ignore"):
        rows = _np.exp(-(prof.var_common + prof.var_row)[:, None] / 2 + _np.sqrt(prof.var_row)[:, None] * _ROW_X)
        var = prof.q[:, None] * _np.where(prof.q[:, None] > 0, rows, 0.0)
    with _np.errstate(over="ignore", invalid="ignore"):  # each tensor's rms over all its rows
        rms_pre = _np.sqrt(prof.q * _np.exp(-prof.var_common / 2))[:, None]
        rms_post = rms_pre if act.name == "identity" else rms_pre / _SQRT2 if act.name == "relu" else \
            _np.sqrt(prof.x2)[:, None]
    pre = _masks(_gaussian(var, fmt, fmt.eps * rms_pre), _ROW_W, n, batch, case.underflow_threshold)
    post = _masks(_post(act, var, fmt, fmt.eps * rms_post), _ROW_W, n, batch, case.underflow_threshold)
    forward = _first((pre[0] | post[0], pre[1] | post[1], post[2]), last=False)
    with _np.errstate(over="ignore", invalid="ignore"):
        rms = _np.sqrt(prof.q * _np.exp(-prof.var_common / 2))
    out = {"applicable": True, "reason": None, **forward, "rms": rms.tolist()}
    out["backward"] = _backward(case, act, fmt, prof, forward, sigma_w2, x0[0])
    if fmt.scaling is not None:
        out["notes"] = (f"the range predictions are the {fmt.scaling.storage} storage's (pre, post and the gradients "
                        f"are kept in it); {fmt.name}'s quantization of the matmul inputs (gemm_in, gemm_w, "
                        "grad_gemm_in: flush, saturation, qerr) is not predicted")
    return out


def _backward(case, act, fmt, prof: Profile, forward, sigma_w2, x0_2) -> dict:
    """The backward block (mean field); above a predicted forward death x = 0 and pre = 0 exactly."""
    if forward["first_overflow"] is not None:
        return {"applicable": False, "reason": f"the forward pass is predicted to overflow at layer "
                f"{forward['first_overflow']}: gradients meet inf/NaN activations",
                "first_overflow": None, "first_underflow": None, "first_zero": None, "rms": None}
    depth, n, batch = case.depth, case.width, case.batch
    q, x2, dphi2 = prof.q.copy(), _np.concatenate([[x0_2], prof.x2[:-1]]), prof.dphi2.copy()  # x2: E[x_{l-1}^2]
    dead = forward["first_zero"]
    if dead is not None and not case.bias:  # x_l = 0 from the dead layer on, so pre_{l+1} = 0 exactly
        q[dead:], x2[dead:] = 0.0, 0.0
        dphi2[dead:] = _layer_moments(act, 0.0, None).dphi2
    grad2 = _np.empty(depth)
    g2 = case.loss_scale**2
    with _np.errstate(over="ignore", invalid="ignore"):  # gradients may leave float64: inf
        for layer in range(depth - 1, -1, -1):
            grad2[layer] = g2
            g2 = sigma_w2 * dphi2[layer] * g2  # sigma_w^2 = n_out Var(w): the layers are square
        delta2 = grad2 * dphi2
        one = _np.ones(1)
        thr = case.underflow_threshold
        wgrad2 = batch * delta2 * x2
        grad = _masks(_gaussian(grad2, fmt, fmt.eps * _np.sqrt(grad2)), one, n, batch, thr)
        delta = _masks(_delta(act, q, grad2, fmt), one, n, batch, thr)
        wgrad = _masks(_gaussian(wgrad2, fmt, fmt.eps * _np.sqrt(wgrad2)), one, n, n, thr)
    events = _first((grad[0] | delta[0] | wgrad[0], grad[1] | delta[1] | wgrad[1], grad[2] | delta[2]), last=True)
    return {"applicable": True, "reason": None, **events, "rms": _np.sqrt(delta2).tolist()}
