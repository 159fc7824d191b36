"""Polynomial approximations of the non-polynomial activations, for HE.

Everything here works on the normalised interval ``t in [-1, 1]``; a pass
maps an activation's calibrated input range ``[-B, B]`` onto it with a
scalar multiply (free under HE: a pending scalar) and scales the result back.

Fits (``method``):

* ``minimax``: best uniform approximation, by Lawson's iteratively
  reweighted least squares on a dense grid, in the Chebyshev basis
  (well-conditioned).  Error within a few percent of the true minimax error.
* ``lsq``: least squares on Chebyshev nodes of the interval (numpy's
  ``Chebyshev.fit``), i.e. near-interpolation; within a small factor of
  minimax.
* ``data``: least squares weighted by the calibrated distribution of the
  activation's inputs (a histogram), plus a uniform floor so the polynomial
  stays bounded on the whole interval: small error where the data are,
  larger near the ends of the range.

Error bounds (uniform, on ``[-1, 1]``; in the activation's units multiply by
``B``): ReLU(t) = (t + |t|)/2, so its error is half that of ``|t|``.  The best
degree-2n approximation of ``|t|`` has error ~ 0.2802/(2n) (Bernstein's
constant), so a degree-d ReLU fit has error about 0.14/d:  d=7 -> ~0.02,
d=15 -> ~0.0095, d=31 -> ~0.0046, d=63 -> ~0.0023 (``tests/test_approximation.py``
checks these bounds).  A single polynomial of degree d costs
``ceil(log2 d) + 1`` levels.

Composite (Lee et al., "Minimax approximation of sign function by composite
polynomial", 2021): sign(t) ~ p_k o ... o p_1 (t), each p_i an odd minimax
polynomial of low degree fitted on the image of the previous stage; error
falls doubly exponentially away from 0, and ReLU(t) = t (1 + sign(t)) / 2
costs one more product.  Precision is then set by ``eps``: for |t| >= eps the
sign error is ``sign_err``; below eps ReLU's error is at most ``eps``
(times ``(1 + max|s|)/2``).  Depth is the sum of the stages' depths plus one.
:func:`best_composite` picks the eps that minimises the uniform bound; measured
bounds on [-1, 1] (ReLU): 5x5 0.079, 7x7 0.046, 5x5x5 0.032, 7x7x7 0.016,
7x7x7x7 0.0039 (depths 9, 9, 13, 13, 17).  The uniform bound is reached only
near 0: for |t| >= eps the error is ``|t| * sign_err / 2``, which is why a
composite can beat a single polynomial of smaller uniform error in practice.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from numpy.polynomial import chebyshev as C

#: grid used to fit and measure errors on [-1, 1]
GRID = 4001


def poly_depth(degree: int) -> int:
    """Levels one Poly of this degree costs in the HE lowering."""
    return 1 if degree <= 2 else (degree - 1).bit_length() + 1


def _grid(n: int = GRID, lo: float = -1.0, hi: float = 1.0, kinks: Sequence[float] = ()) -> np.ndarray:
    """Chebyshev-spaced points plus uniform points plus the kinks."""
    k = np.cos(np.linspace(0, np.pi, n))
    u = np.linspace(-1, 1, n)
    g = np.concatenate([k, u])
    g = lo + (g + 1) * (hi - lo) / 2
    g = np.concatenate([g, np.asarray(kinks, float)])
    return np.unique(g[(g >= lo) & (g <= hi)])


def _basis_degrees(degree: int, parity: str | None) -> list[int]:
    if parity == "even":
        return list(range(0, degree + 1, 2))
    if parity == "odd":
        return list(range(1, degree + 1, 2))
    return list(range(degree + 1))


def _vander(x: np.ndarray, degs: Sequence[int], scale: float) -> np.ndarray:
    full = C.chebvander(x / scale, max(degs))
    return full[:, list(degs)]


def _wlsq(V: np.ndarray, f: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares through the normal equations (the Chebyshev basis keeps them
    well-conditioned at these degrees); lstsq when they are not."""
    Vw = V * w[:, None]
    try:
        # einsum, not BLAS: tall-skinny Gram matrices are faster this way and never oversubscribe cores
        c = np.linalg.solve(np.einsum("ni,nj->ij", V, Vw, optimize=False), np.einsum("ni,n->i", Vw, f, optimize=False))
        if np.all(np.isfinite(c)):
            return c
    except np.linalg.LinAlgError:
        pass
    sw = np.sqrt(w)
    return np.linalg.lstsq(V * sw[:, None], f * sw, rcond=None)[0]


def _lawson(V: np.ndarray, f: np.ndarray, w0: np.ndarray | None = None, iters: int = 400) -> np.ndarray:
    """Minimax coefficients by Lawson's algorithm (IRLS with multiplicative weights)."""
    n = len(f)
    w = np.full(n, 1.0 / n) if w0 is None else w0 / w0.sum()
    best, best_err = None, np.inf
    for _ in range(iters):
        c = _wlsq(V, f, w)
        e = np.abs(V @ c - f)
        m = e.max()
        if m < best_err:
            best, best_err = c, m
        w = w * (e + 1e-300)
        s = w.sum()
        if not np.isfinite(s) or s == 0:
            break
        w /= s
    return best


def _cheb_to_power(degs: Sequence[int], c: np.ndarray, scale: float) -> np.ndarray:
    """Chebyshev coefficients (in x/scale) -> power-basis coefficients in x."""
    full = np.zeros(max(degs) + 1)
    full[list(degs)] = c
    p = C.cheb2poly(full)
    return p / scale ** np.arange(len(p))


@dataclass
class Fit:
    """A polynomial on [-1, 1] (power basis) and its measured uniform error."""

    coeffs: np.ndarray
    max_error: float  # max |p - f| on the fitted set
    method: str
    mean_error: float = 0.0

    @property
    def degree(self) -> int:
        return len(np.trim_zeros(self.coeffs, "b")) - 1

    @property
    def depth(self) -> int:
        return poly_depth(self.degree)

    def __call__(self, t):
        return np.polynomial.polynomial.polyval(t, self.coeffs)


def fit(f: Callable[[np.ndarray], np.ndarray], degree: int, method: str = "minimax",
        parity: str | None = None, kinks: Sequence[float] = (), density: tuple | None = None,
        lo: float = -1.0, hi: float = 1.0) -> Fit:
    """Fit ``f`` on ``[lo, hi]`` (inside [-1, 1]) by a polynomial of ``degree``.

    ``density``: (bin_edges, counts) of the data on [-1, 1] for ``method="data"``.
    """
    if degree < 1:
        raise ValueError("degree must be >= 1")
    degs = _basis_degrees(degree, parity)
    scale = max(abs(lo), abs(hi))
    x = _grid(lo=lo, hi=hi, kinks=kinks)
    fx = f(x)
    V = _vander(x, degs, scale)
    if method == "lsq":
        nodes = lo + (np.cos(np.pi * (np.arange(4 * degree + 8) + 0.5) / (4 * degree + 8)) + 1) * (hi - lo) / 2
        Vn = _vander(nodes, degs, scale)
        c, *_ = np.linalg.lstsq(Vn, f(nodes), rcond=None)
    elif method == "minimax":
        c = _lawson(V, fx)
    elif method == "data":
        if density is None:
            raise ValueError("method 'data' needs the calibrated distribution")
        edges, counts = density
        counts = np.asarray(counts, float)
        dens = counts / max(counts.sum(), 1.0)
        idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(counts) - 1)
        w = dens[idx] / np.maximum(np.diff(edges)[idx], 1e-12)
        w = w / w.mean() + 0.05  # uniform floor: keep the polynomial bounded on the whole interval
        c = _wlsq(V, fx, w)
    else:
        raise ValueError(f"unknown fit method {method!r}; use minimax, lsq or data")
    # the error on a finer grid than the fit's, in the power basis the HE program evaluates
    p = _cheb_to_power(degs, c, scale)
    xf = _grid(4 * GRID, lo, hi, kinks)
    e = np.abs(np.polynomial.polynomial.polyval(xf, p) - f(xf))
    return Fit(p, float(e.max()), method, float(e.mean()))


# --------------------------------------------------------------------------- the activations

def relu_fit(degree: int, method: str = "minimax", density=None) -> Fit:
    """ReLU on [-1, 1]: t/2 + (even fit of |t|)/2, so the odd part is exact."""
    if density is None:
        return _relu_fit_cached(degree, method)
    return _relu_fit(degree, method, density)


@functools.lru_cache(maxsize=128)
def _relu_fit_cached(degree: int, method: str) -> Fit:
    return _relu_fit(degree, method, None)


def _relu_fit(degree: int, method: str, density) -> Fit:
    if degree < 2:
        raise ValueError("a ReLU approximation needs degree >= 2")
    even = degree if degree % 2 == 0 else degree - 1
    a = fit(np.abs, even, method, parity="even", kinks=(0.0,), density=density)
    c = np.zeros(max(len(a.coeffs), 2))
    c[: len(a.coeffs)] = a.coeffs / 2
    c[1] += 0.5
    return Fit(c, a.max_error / 2, method, a.mean_error / 2)


def abs_fit(degree: int, method: str = "minimax", density=None) -> Fit:
    even = degree if degree % 2 == 0 else degree - 1
    return fit(np.abs, even, method, parity="even", kinks=(0.0,), density=density)


def clip_fit(degree: int, lo: float, hi: float, method: str = "minimax", density=None) -> Fit:
    """clip(t, lo, hi) on [-1, 1] (lo, hi already in normalised units)."""
    return fit(lambda t: np.clip(t, lo, hi), degree, method,
               kinks=[k for k in (lo, hi) if -1 < k < 1], density=density)


@dataclass
class Composite:
    """sign(t) ~ stages[-1](... stages[0](t)) for eps <= |t| <= 1."""

    stages: list[np.ndarray] = field(default_factory=list)  # power-basis coefficients, each odd
    eps: float = 0.0
    sign_error: float = 0.0  # max |s(t) - sign(t)| for eps <= |t| <= 1
    sup: float = 1.0  # max |s(t)| on [-1, 1]

    def __call__(self, t):
        y = np.asarray(t, float)
        for c in self.stages:
            y = np.polynomial.polynomial.polyval(y, c)
        return y

    @property
    def degrees(self) -> list[int]:
        return [len(np.trim_zeros(c, "b")) - 1 for c in self.stages]

    @property
    def depth(self) -> int:
        return sum(poly_depth(d) for d in self.degrees)

    def relu_error(self) -> float:
        """Bound on |t (1 + s(t))/2 - relu(t)| over [-1, 1]."""
        return max(self.sign_error / 2, self.eps * (1 + self.sup) / 2)

    def abs_error(self) -> float:
        """Bound on |t s(t) - |t|| over [-1, 1]."""
        return max(self.sign_error, self.eps * (1 + self.sup))


def sign_composite(degrees: Sequence[int], eps: float) -> Composite:
    """Odd minimax stages for sign on [eps, 1], each fitted on the image of
    the previous one (Lee et al.'s composite construction, with Lawson fits)."""
    if not 0 < eps < 1:
        raise ValueError("eps must be in (0, 1)")
    stages = []
    a, b = eps, 1.0
    for d in degrees:
        d = int(d)
        if d < 3 or d % 2 == 0:
            raise ValueError(f"composite stage degrees must be odd and >= 3, got {d}")
        degs = _basis_degrees(d, "odd")
        x = _grid(1001, a, b)
        V = _vander(x, degs, b)
        c = _lawson(V, np.ones_like(x), iters=200)
        p = _cheb_to_power(degs, c, b)
        stages.append(p)
        y = np.polynomial.polynomial.polyval(x, p)
        a, b = float(y.min()), float(y.max())
        if a <= 0:
            raise ValueError(f"composite stage of degree {d} does not separate the signs on its interval")
    comp = Composite(stages, eps)
    tt = _grid(20001, eps, 1.0)
    comp.sign_error = float(np.abs(comp(tt) - 1).max())
    allt = _grid(20001, 0.0, 1.0)
    comp.sup = float(np.abs(comp(allt)).max())
    return comp


@functools.lru_cache(maxsize=64)
def best_composite(degrees: tuple[int, ...], eps: float = 0.0) -> Composite:
    """The composite for ``degrees``; with ``eps=0`` the eps (searched over powers of sqrt(2) from
    1/4 down to 2^-12) that minimises the uniform ReLU error bound."""
    if eps:
        return sign_composite(degrees, eps)
    cache: dict[int, Composite | None] = {}

    def at(k: int) -> Composite | None:
        if k not in cache:
            try:
                cache[k] = sign_composite(degrees, 2 ** (-k / 2))
            except ValueError:
                cache[k] = None
        return cache[k]

    def err(k: int) -> float:
        c = at(k)
        return c.relu_error() if c is not None else math.inf

    coarse = min(range(4, 25, 3), key=err)
    best = min(range(max(4, coarse - 2), min(24, coarse + 2) + 1), key=err)
    if at(best) is None:
        raise ValueError(f"composite {'x'.join(map(str, degrees))}: no stage sequence separates the signs")
    return at(best)


def parse_composite(spec: str) -> list[int]:
    """``"7x7x15"`` (or ``"7:7:15"``) -> [7, 7, 15]."""
    parts = [p for p in spec.replace(":", "x").replace("-", "x").split("x") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"composite {spec!r}: give stage degrees like 7x7x15") from None


def relu_error_estimate(degree: int) -> float:
    """~0.14/degree: the asymptotic best uniform error of a degree-d ReLU fit on [-1, 1]."""
    even = degree if degree % 2 == 0 else degree - 1
    return 0.2802 / even / 2 if even else math.inf
