"""``fuse-poly``: a polynomial in one tensor written with Mul/Add/Sub/Div/Pow
nodes and scalar constants becomes one ``Poly`` node.

``Add(Add(Mul(Mul(x, x), a), Mul(x, b)), c)`` is ``Poly(x){coeffs=[c, b, a]}``.
Only polynomials of degree >= 2 are fused (a scalar multiply or add is left
alone: the HE lowering handles those directly).  Interior nodes that nothing
else uses are removed by ``dce``.  Exact up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial import polynomial as P

from hecompiler.passmanager import Pass, PassResult, register_pass

MAX_DEGREE = 64


def _scalar(v):
    if v.is_constant and v.data.size == 1 and (np.issubdtype(v.data.dtype, np.floating) or np.issubdtype(v.data.dtype, np.integer)):
        return float(v.data.reshape(-1)[0])
    return None


def _deg(rep) -> int:
    return len(rep[1]) - 1


def _monomial(rep) -> bool:
    return int(np.count_nonzero(rep[1])) == 1


def _combine(a, b):
    """Common base of two representations (None = constant), or False."""
    if a[0] is None:
        return b[0]
    if b[0] is None or a[0] is b[0]:
        return a[0]
    return False


def _poly_repr(node, rep):
    """(base value, coefficients) of the node's result, or None."""
    ins = node.inputs

    def r(v, compose=False):
        """Representation of operand v.  When ``compose`` (v would be fed
        into a power or polynomial) and v is itself a polynomial of degree
        >= 2, keep v as a new base instead: composing p(q(x)) into one
        high-degree polynomial costs more depth under HE than evaluating
        q and then p."""
        if id(v) in rep:
            base, c = rep[id(v)]
            if compose and len(c) > 2:
                return (v, np.array([0.0, 1.0]))
            return rep[id(v)]
        s = _scalar(v)
        if s is not None:
            return (None, np.array([s]))
        if v.is_constant:
            return None
        return (v, np.array([0.0, 1.0]))

    if node.op in ("Add", "Sub", "Mul"):
        a, b = r(ins[0]), r(ins[1])
        if node.op == "Mul" and a is not None and b is not None and _deg(a) > 1 and _deg(b) > 1 \
                and not (_monomial(a) and _monomial(b)):
            a, b = r(ins[0], compose=True), r(ins[1], compose=True)
        if a is None or b is None or node.output.type != (ins[0].type if a[0] is not None else ins[1].type):
            return None
        base = _combine(a, b)
        if base is False or base is None:
            return None
        if node.op == "Add":
            c = P.polyadd(a[1], b[1])
        elif node.op == "Sub":
            c = P.polysub(a[1], b[1])
        else:
            c = P.polymul(a[1], b[1])
        return (base, c)
    if node.op == "Div":
        a, k = r(ins[0]), _scalar(ins[1])
        if a is None or a[0] is None or k is None or k == 0:
            return None
        return (a[0], a[1] / k)
    if node.op == "Pow":
        a, k = r(ins[0], compose=True), _scalar(ins[1])
        if a is None or a[0] is None or k is None or k != int(k) or not 0 <= k <= MAX_DEGREE:
            return None
        return (a[0], P.polypow(a[1], int(k)))
    if node.op == "Poly":
        a = r(ins[0], compose=True)
        if a is None or a[0] is None:
            return None
        # compose: sum_i c_i * a(x)^i
        out = np.array([0.0])
        for i, ci in enumerate(node.attrs["coeffs"]):
            out = P.polyadd(out, ci * P.polypow(a[1], i))
        return (a[0], out)
    return None


@register_pass
@dataclass(frozen=True)
class FusePoly(Pass):
    name = "fuse-poly"
    summary = "fuse polynomial activations written as Mul/Add/Pow nodes into one Poly node"
    exact = True

    def run(self, graph, ctx):
        rep = {}
        for node in graph.nodes:
            res = _poly_repr(node, rep)
            if res is not None:
                c = P.polytrim(res[1], 0.0) if np.any(res[1]) else np.array([0.0])
                if len(c) - 1 <= MAX_DEGREE:
                    rep[id(node.output)] = (res[0], c)
        fused = 0
        replaced = {}  # id(old value) -> the Poly result that took its place
        for node in list(graph.nodes):
            v = node.outputs[0]
            if id(v) not in rep or node.graph is not graph:
                continue
            base, c = rep[id(v)]
            if len(c) < 3 or node.op == "Poly" and tuple(node.attrs["coeffs"]) == tuple(c) \
                    and node.inputs[0] is base:
                continue
            # only at the root: some user is not part of the polynomial, or it is an output
            absorbed = [id(u.outputs[0]) in rep and rep[id(u.outputs[0])][0] is base for u in v.users]
            if v not in graph.outputs and all(absorbed):
                continue
            new = graph.add_node("Poly", [replaced.get(id(base), base)], {"coeffs": [float(x) for x in c]},
                                 name=node.name, after=node)
            replaced[id(v)] = new.output
            name = v.name
            graph.replace_all_uses(v, new.output)
            graph.rename(v, graph.fresh_name(name + ".unfused"))
            graph.rename(new.output, name)
            fused += 1
        return PassResult(fused > 0, [f"fused {fused} polynomial(s)"] if fused else [])
