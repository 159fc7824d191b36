"""``relu-to-poly``: ReLU and Clip (ReLU6) become polynomials fitted on the
calibrated input range (approximating).

For an activation whose input ``x`` was calibrated to ``[lo, hi]``, the
interval is ``[-B, B]`` with ``B = max(|lo|, |hi|) * (1 + margin)``; the
input is scaled to ``t = x / B`` (a scalar multiply: a pending scalar in the
HE lowering, no level) and

* single polynomial (default): ``relu(x) = B * p(t)`` with ``p`` the
  minimax (or least-squares, or data-weighted) fit of degree ``degree``;
  ``ceil(log2 degree) + 1`` levels; uniform error about ``0.14 B / degree``
  (see :mod:`hecompiler.polyfit`).  ``relu(t) - t/2`` is even, so an odd
  degree gives the polynomial of the even degree below it (15 -> 14);
* composite (``composite=7x7x7``): ``relu(x) = x * (1 + s(t)) / 2`` with
  ``s = p_k o ... o p_1`` a composite minimax approximation of sign (Lee et
  al.), precise for ``|t| >= eps``; depth is the stages' depths plus one.

Clip(x, a, b) is fitted directly (single polynomial), or for composites
written as ``a + relu(x - a) - relu(x - b)`` (only the kinks inside the range).

Ranges come from ``ctx.options["calibration"]`` (``{value name: stats}``,
see :mod:`hecompiler.calibration`) or from the ``ranges`` option
(``"LO:HI"`` for every activation).  Per-layer settings: ``layers`` is
``"GLOB=SPEC;GLOB=SPEC"`` where GLOB matches a node name or its output name
(fnmatch) and SPEC is a degree (``27``) or a composite (``7x7x7``).

What was fitted (interval, degree, depth, fit error) is appended to
``ctx.options["approximation"]`` for the compile report and metadata; the
fitted interval of every activation input goes to
``ctx.options["approximation"]["intervals"]`` for the run-time range check.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from hecompiler.calibration import stats_for
from hecompiler.errors import PassError
from hecompiler.passmanager import Pass, PassResult, register_pass
from hecompiler.polyfit import Composite, best_composite, clip_fit, parse_composite, poly_depth, relu_fit
from hecompiler.rewrite import erase_if_dead

FIT_METHODS = ("minimax", "lsq", "data")


def need_range_message(pass_name: str, node, flag_hint: str = "--relu-range LO:HI") -> str:
    return (f"{pass_name}: node {node.label}: cannot run {node.op} under encryption without a polynomial "
            f"approximation, and {pass_name} needs calibration for that: pass --calibration X.npy (N inputs "
            f"shaped like the model input) or give the range explicitly ({flag_hint}, or the pass option "
            f"ranges=LO:HI)")


def parse_range(text: str, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise PassError(f"{what}: range {text!r} must be LO:HI, e.g. -8:8") from None
    if not lo < hi:
        raise PassError(f"{what}: range {text!r} needs LO < HI")
    return lo, hi


def parse_layers(text: str, what: str) -> list[tuple[str, str]]:
    out = []
    for item in (t.strip() for t in text.split(";")):
        if not item:
            continue
        if "=" not in item:
            raise PassError(f"{what}: layers item {item!r} must be GLOB=SPEC (SPEC: a degree like 27 or a "
                            f"composite like 7x7x7)")
        g, s = item.rsplit("=", 1)
        out.append((g.strip(), s.strip()))
    return out


def _density(stats, B):
    h = (stats or {}).get("hist")
    if not h:
        return None
    return np.asarray(h["edges"], float) / B, np.asarray(h["counts"], float)


class Builder:
    """Appends nodes after ``anchor`` in order (keeps the node list topological)."""

    def __init__(self, graph, anchor, base: str):
        self.g, self.last, self.base = graph, anchor, base

    def const(self, value: float, dtype, hint: str):
        return self.g.add_constant(np.asarray(value, dtype=dtype), f"{self.base}.{hint}")

    def node(self, op, inputs, attrs=None, hint="t"):
        n = self.g.add_node(op, inputs, attrs, name=self.last.name if self.last.name else "",
                            out_names=[self.g.fresh_name(f"{self.base}.{hint}")], after=self.last)
        self.last = n
        return n.output

    def scale(self, x, k: float, hint: str):
        return self.node("Mul", [x, self.const(k, x.type.np_dtype, hint + ".k")], hint=hint)

    def shift(self, x, k: float, hint: str):
        return self.node("Add", [x, self.const(k, x.type.np_dtype, hint + ".k")], hint=hint)

    def poly(self, x, coeffs, hint: str):
        c = np.asarray(coeffs, float)
        c = np.where(np.abs(c) < 1e-12 * np.abs(c).max(), 0.0, c)  # fit round-off in exactly-zero terms
        return self.node("Poly", [x], {"coeffs": [float(v) for v in c]}, hint=hint)

    def sign_chain(self, t, comp: Composite, final_half: bool, hint: str):
        """s(t) through the composite stages; with ``final_half`` the last stage returns (1 + s) / 2."""
        y = t
        for i, c in enumerate(comp.stages):
            c = np.asarray(c, float)
            if final_half and i == len(comp.stages) - 1:
                c = c / 2
                c[0] += 0.5
            y = self.poly(y, c, f"{hint}.s{i + 1}")
        return y


def relu_value(b: Builder, x, B: float, spec, method: str, density, hint: str):
    """relu(x) on [-B, B] built with ``b``; returns (value, degree list, depth, fit error in x units)."""
    t = b.scale(x, 1.0 / B, hint + ".t")
    if isinstance(spec, Composite):
        h = b.sign_chain(t, spec, True, hint)
        y = b.node("Mul", [x, h], hint=hint + ".relu")
        depth = sum(poly_depth(d) for d in spec.degrees) + 1
        return y, spec.degrees, depth, B * spec.relu_error()
    f = relu_fit(spec, method, density)
    p = b.poly(t, f.coeffs, hint + ".p")
    y = b.scale(p, B, hint + ".relu")
    return y, [f.degree], f.depth, B * f.max_error


def parse_spec(pass_name: str, spec, eps: float):
    """A degree (int or digits) or a composite like ``7x7x7``: the degree, or the best Composite."""
    if isinstance(spec, int):
        d = spec
    elif "x" in spec or ":" in spec:
        try:
            return best_composite(tuple(parse_composite(spec)), eps)
        except ValueError as e:
            raise PassError(f"{pass_name}: {e}") from None
    else:
        try:
            d = int(spec)
        except ValueError:
            raise PassError(f"{pass_name}: {spec!r} is neither a degree nor a composite like 7x7x7") from None
    if not 2 <= d <= 63:
        raise PassError(f"{pass_name}: degree {d} out of range 2..63 (use a composite for more precision)")
    return d


@register_pass
@dataclass(frozen=True)
class ReluToPoly(Pass):
    name = "relu-to-poly"
    summary = "ReLU / Clip (ReLU6) -> polynomial fitted on the calibrated input range (approximating)"
    exact = False
    uses_calibration = True

    degree: int = 15
    composite: str = ""
    eps: float = 0.0  # composite: |t| below which sign may be wrong; 0 = the best for the degrees
    margin: float = 0.2
    fit: str = "minimax"
    ranges: str = ""
    layers: str = ""

    def _spec_for(self, node, overrides):
        spec = self.composite or self.degree
        for glob, s in overrides:
            if fnmatch.fnmatchcase(node.name or "", glob) or fnmatch.fnmatchcase(node.output.name, glob):
                spec = s
        return self._parse_spec(spec)

    def _parse_spec(self, spec):
        return parse_spec(self.name, spec, self.eps)

    def run(self, graph, ctx):
        if self.fit not in FIT_METHODS:
            raise PassError(f"{self.name}: fit={self.fit!r}; use one of {', '.join(FIT_METHODS)}")
        if not 0 <= self.margin <= 10:
            raise PassError(f"{self.name}: margin={self.margin} must be in [0, 10]")
        overrides = parse_layers(self.layers, self.name)
        explicit = parse_range(self.ranges, self.name) if self.ranges else None
        record = ctx.options.setdefault("approximation", {})
        acts = record.setdefault("activations", [])
        intervals = record.setdefault("intervals", {})
        todo = [n for n in graph.nodes if n.op in ("Relu", "Clip")]
        for node in todo:
            stats = stats_for(ctx.options, graph, node)
            if stats is not None:
                lo, hi = float(stats["min"]), float(stats["max"])
            elif explicit is not None:
                lo, hi = explicit
            else:
                raise PassError(need_range_message(self.name, node))
            B = max(abs(lo), abs(hi)) * (1 + self.margin)
            if B == 0 or not np.isfinite(B):
                raise PassError(f"{self.name}: node {node.label}: calibrated input range [{lo}, {hi}] is degenerate")
            spec = self._spec_for(node, overrides)
            method = self.fit if stats is not None or self.fit != "data" else "minimax"
            density = _density(stats, B) if method == "data" else None
            x, y_old = node.inputs[0], node.output
            base = graph.fresh_name(y_old.name + ".approx")
            b = Builder(graph, node, base)
            if node.op == "Relu":
                y, degs, depth, err = relu_value(b, x, B, spec, method, density, "r")
            else:
                y, degs, depth, err = self._clip(b, node, x, B, spec, method, density)
            name = y_old.name
            graph.replace_all_uses(y_old, y)
            erase_if_dead(graph, node)
            graph.rename(y, name)
            kind = (f"composite {'x'.join(map(str, degs))} eps={spec.eps:.3g}" if isinstance(spec, Composite)
                    else f"degree {degs[0]} {method}")
            acts.append({"pass": self.name, "node": node.name or name, "op": node.op, "input": x.name,
                         "calibrated": [lo, hi], "source": "calibration" if stats is not None else "ranges",
                         "interval": [-B, B], "approximation": kind, "degrees": degs, "depth": depth,
                         "fit_max_error": err})
            intervals[x.name] = [-B, B]
        notes = [f"{len(todo)} activation(s) -> polynomials"] if todo else []
        if todo:
            errs = [a["fit_max_error"] for a in acts[-len(todo):]]
            notes.append(f"fit error up to {max(errs):.3g} (input units); depth up to "
                         f"{max(a['depth'] for a in acts[-len(todo):])} levels each")
        return PassResult(bool(todo), notes)

    def _clip(self, b: Builder, node, x, B, spec, method, density):
        cmin, cmax = node.attrs["min"], node.attrs["max"]
        a, c = cmin / B, cmax / B
        lo_in, hi_in = a > -1, c < 1  # which kinks fall inside the interval
        if not lo_in and not hi_in:  # Clip is the identity on the whole interval
            y = b.scale(x, 1.0, "c.id")
            return y, [1], 0, 0.0
        if not isinstance(spec, Composite):
            f = clip_fit(spec, max(a, -1.0), min(c, 1.0), method, density)
            t = b.scale(x, 1.0 / B, "c.t")
            p = b.poly(t, f.coeffs, "c.p")
            return b.scale(p, B, "c.clip"), [f.degree], f.depth, B * f.max_error
        # composite: cmin + relu(x - cmin) - relu(x - cmax), keeping only the kinks inside the range
        terms, err, depth = [], 0.0, 0
        if lo_in:
            u = b.shift(x, -cmin, "c.lo")
            Bu = B + abs(cmin)
            r, degs, d1, e1 = relu_value(b, u, Bu, spec, method, None, "c.rlo")
            terms.append(("+", r))
            err, depth = err + e1, max(depth, d1)
        if hi_in:
            v = b.shift(x, -cmax, "c.hi")
            Bv = B + abs(cmax)
            r, degs, d2, e2 = relu_value(b, v, Bv, spec, method, None, "c.rhi")
            terms.append(("-", r))
            err, depth = err + e2, max(depth, d2)
        if lo_in and hi_in:
            y = b.node("Sub", [terms[0][1], terms[1][1]], hint="c.diff")
            y = b.shift(y, cmin, "c.clip")
        elif lo_in:
            y = b.shift(terms[0][1], cmin, "c.clip")
        else:
            y = b.node("Sub", [x, terms[0][1]], hint="c.clip")
        return y, spec.degrees, depth, err
