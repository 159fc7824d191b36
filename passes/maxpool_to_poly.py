"""``maxpool-to-poly``: MaxPool as a tree of polynomial maxima (approximating).

``max(a, b) = b + relu(a - b)``, with relu approximated on the calibrated
range of differences ``[-D, D]``, ``D = (hi - lo) * (1 + margin)`` for an
input calibrated to ``[lo, hi]`` (single minimax polynomial of ``degree``,
or a ``composite`` as in ``relu-to-poly``).  The window is separable: a
row maximum over the kw horizontal shifts, then a column maximum over the kh
vertical shifts, each a balanced tree; a shift is a depthwise Conv with a
one-hot kernel (a linear op: rotations, one level), and the strides are
applied at the end by a one-hot strided depthwise Conv.  Padding acts as
-inf: when the input can be negative it is shifted by the lower end of the
interval first (so the zero padding of the shift convs is below every value)
and shifted back at the end.

Error bound: max is 1-Lipschitz in each argument, so the output error is at
most ``(ceil(log2 kw) + ceil(log2 kh)) * e`` where ``e`` is the relu fit error
on ``[-D, D]`` (reported per node as ``fit_max_error``), while differences stay
within ``[-D, D]``.  Depth: that many relu evaluations in sequence, plus the
shift convs and one alignment multiply per maximum: a 3x3 pool with the
default degree-15 fit costs about 4 * 7 + 3 = 31 levels (the planner inserts
refreshes).  ``maxpool-to-avgpool`` is the cheap alternative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hecompiler.calibration import stats_for
from hecompiler.errors import PassError
from hecompiler.passmanager import Pass, PassResult, register_pass
from hecompiler.polyfit import Composite
from hecompiler.rewrite import erase_if_dead

from .relu_to_poly import FIT_METHODS, Builder, need_range_message, parse_range, parse_spec, relu_value


def _onehot(C: int, kh: int, kw: int, i: int, j: int, dtype) -> np.ndarray:
    w = np.zeros((C, 1, kh, kw), dtype)
    w[:, 0, i, j] = 1
    return w


@register_pass
@dataclass(frozen=True)
class MaxPoolToPoly(Pass):
    name = "maxpool-to-poly"
    summary = "MaxPool -> tree of polynomial maxima max(a,b) = b + relu(a-b) on the calibrated range (approximating)"
    exact = False
    uses_calibration = True

    degree: int = 15
    composite: str = ""
    eps: float = 0.0  # composite: |t| below which sign may be wrong; 0 = the best for the degrees
    margin: float = 0.2
    fit: str = "minimax"
    ranges: str = ""

    def run(self, graph, ctx):
        if self.fit not in FIT_METHODS:
            raise PassError(f"{self.name}: fit={self.fit!r}; use one of {', '.join(FIT_METHODS)}")
        spec = parse_spec(self.name, self.composite or self.degree, self.eps)
        explicit = parse_range(self.ranges, self.name) if self.ranges else None
        record = ctx.options.setdefault("approximation", {})
        acts = record.setdefault("activations", [])
        intervals = record.setdefault("intervals", {})
        todo = [n for n in graph.nodes if n.op == "MaxPool"]
        for node in todo:
            stats = stats_for(ctx.options, graph, node)
            if stats is not None:
                lo, hi = float(stats["min"]), float(stats["max"])
            elif explicit is not None:
                lo, hi = explicit
            else:
                raise PassError(need_range_message(self.name, node, "--maxpool avg, or the pass option"
                                                                    " ranges=LO:HI"))
            half = (hi - lo) / 2 * (1 + self.margin)
            mid = (hi + lo) / 2
            lo_m, hi_m = mid - half, mid + half
            D = 2 * half
            if not D > 0:
                raise PassError(f"{self.name}: node {node.label}: calibrated input range [{lo}, {hi}] is degenerate")
            y, n_max, depth, err = self._rewrite(graph, node, lo_m, D, spec)
            acts.append({"pass": self.name, "node": node.name or node.output.name, "op": "MaxPool",
                         "input": node.inputs[0].name, "calibrated": [lo, hi],
                         "source": "calibration" if stats is not None else "ranges",
                         "interval": [lo_m, hi_m],
                         "approximation": (f"max tree ({n_max} levels of max), relu "
                                           + (f"composite {self.composite} eps={spec.eps:.3g}"
                                              if isinstance(spec, Composite) else f"degree {spec} {self.fit}")),
                         "depth": depth, "fit_max_error": err})
            intervals[node.inputs[0].name] = [lo_m, hi_m]
        return PassResult(bool(todo), [f"{len(todo)} MaxPool(s) -> polynomial max trees"] if todo else [])

    def _rewrite(self, graph, node, lo_m: float, D: float, spec):
        x, y_old = node.inputs[0], node.output
        dt = x.type.np_dtype
        _, C, H, W = x.type.shape
        _, _, oh, ow = y_old.type.shape
        kh, kw = node.attrs["kernel_shape"]
        sh, sw = node.attrs["strides"]
        pt, pl, pb, pr = node.attrs["pads"]
        base = graph.fresh_name(y_old.name + ".approx")
        b = Builder(graph, node, base)
        # rows/cols of the padded input the strided windows need; extra bottom/right padding for ceil_mode
        pb2 = max(0, (oh - 1) * sh + kh - H - pt)
        pr2 = max(0, (ow - 1) * sw + kw - W - pl)
        padded = (pt + pb2 + pl + pr2) > 0
        shift = padded and lo_m < 0
        cur = b.shift(x, -lo_m, "x0") if shift else x
        stats = {"relus": 0, "depth": 0, "err": 0.0, "levels": 0}
        method = self.fit if self.fit != "data" else "minimax"

        def vmax(a, c, tag):
            d = b.node("Sub", [a, c], hint=f"{tag}.d")
            r, _, dep, e = relu_value(b, d, D, spec, method, None, tag)
            stats["relus"] += 1
            stats["err"] = max(stats["err"], e)
            stats["depth"] = max(stats["depth"], dep)
            return b.node("Add", [c, r], hint=f"{tag}.max")

        def tree(vals, tag):
            lvl = 0
            while len(vals) > 1:
                nxt = [vmax(vals[i], vals[i + 1], f"{tag}{lvl}.{i}") for i in range(0, len(vals) - 1, 2)]
                if len(vals) % 2:
                    nxt.append(vals[-1])
                vals, lvl = nxt, lvl + 1
            return vals[0], lvl

        def shifts(v, k, horizontal, pads, tag):
            outs = []
            for j in range(k):
                wk = _onehot(C, 1 if horizontal else k, k if horizontal else 1, 0 if horizontal else j,
                             j if horizontal else 0, dt)
                w = b.g.add_constant(wk, f"{base}.{tag}{j}.w")
                outs.append(b.node("Conv", [v, w], {"strides": [1, 1], "pads": pads, "dilations": [1, 1],
                                                    "group": C}, hint=f"{tag}{j}"))
            return outs

        levels = 0
        if kw > 1 or pl or pr2:
            cur, n = tree(shifts(cur, kw, True, [0, pl, 0, pr2], "h"), "mh")
            levels += n
        if kh > 1 or pt or pb2:
            cur, n = tree(shifts(cur, kh, False, [pt, 0, pb2, 0], "v"), "mv")
            levels += n
        _, _, hm, wm = cur.type.shape
        if (hm, wm) != (oh, ow):
            kxh, kxw = hm - (oh - 1) * sh, wm - (ow - 1) * sw
            w = b.g.add_constant(_onehot(C, kxh, kxw, 0, 0, dt), f"{base}.stride.w")
            cur = b.node("Conv", [cur, w], {"strides": [sh, sw], "pads": [0, 0, 0, 0], "dilations": [1, 1],
                                            "group": C}, hint="stride")
        if shift:
            cur = b.shift(cur, lo_m, "y")
        if cur is x:  # a 1x1 stride-1 MaxPool is the identity
            cur = b.scale(x, 1.0, "id")
        if cur.type.shape != y_old.type.shape:
            raise PassError(f"{self.name}: node {node.label}: internal shape mismatch {cur.type} vs {y_old.type}")
        name = y_old.name
        graph.replace_all_uses(y_old, cur)
        erase_if_dead(graph, node)
        graph.rename(cur, name)
        n_max = levels
        err = n_max * stats["err"]
        depth = n_max * (stats["depth"] + 1) + 3
        return cur, n_max, depth, err
