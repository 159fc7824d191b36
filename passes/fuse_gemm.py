"""``fuse-gemm``: a 2-D MatMul by a constant becomes a Gemm, and a constant bias
Add after a Gemm moves into its C operand.

Together they turn torch's ``Flatten -> MatMul -> Add`` classifier into one
``Gemm`` (the Flatten stays: it is what makes the operand 2-D).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hecompiler.passmanager import Pass, PassResult, register_pass
from hecompiler.rewrite import RewritePattern, apply_patterns, replace_result, sole_user


class MatMulToGemm(RewritePattern):
    op = "MatMul"

    def match_and_rewrite(self, mm, graph):
        a, w = mm.inputs
        if a.type.rank != 2 or w.type.rank != 2 or not w.is_constant:
            return False
        new = graph.add_node("Gemm", [a, w], {}, name=mm.name, after=mm)
        replace_result(graph, mm.output, new)
        return True


class BiasIntoGemm(RewritePattern):
    op = "Add"

    def match_and_rewrite(self, add, graph):
        for gi in (0, 1):
            y, c = add.inputs[gi], add.inputs[1 - gi]
            gemm = y.producer
            if gemm is None or gemm.op != "Gemm" or len(gemm.inputs) != 2 or not c.is_constant:
                continue
            if sole_user(y, graph) is not add or add.output.type != y.type:
                continue
            m, n = y.type.shape
            cd = c.data
            if cd.ndim > 2:
                if cd.size != n and cd.size != m * n:
                    continue
                cd = cd.reshape(-1) if cd.size == n else cd.reshape(m, n)
            cv = c if cd is c.data else graph.add_constant(np.ascontiguousarray(cd), c.name + ".gemm")
            attrs = dict(gemm.attrs)
            attrs["beta"] = 1.0
            new = graph.add_node("Gemm", list(gemm.inputs) + [cv], attrs, name=gemm.name, after=add)
            replace_result(graph, add.output, new)
            return True
        return False


@register_pass
@dataclass(frozen=True)
class FuseGemm(Pass):
    name = "fuse-gemm"
    summary = "2-D MatMul by a constant (+ constant bias Add) -> Gemm"
    exact = True

    def run(self, graph, ctx):
        n = apply_patterns(graph, [MatMulToGemm(), BiasIntoGemm()])
        return PassResult(n > 0, [f"{n} rewrite(s)"] if n else [])
