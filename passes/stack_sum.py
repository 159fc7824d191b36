"""``stack-sum``: torch exports ``sum(stack([a, b, c]))`` as
``Unsqueeze`` (a Reshape in the IR) of each operand, ``Concat`` on the new
axis and ``ReduceSum`` over it; this pass rewrites that to ``a + b + c``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hecompiler.passmanager import Pass, PassResult, register_pass
from hecompiler.rewrite import RewritePattern, apply_patterns, replace_result


def _unstacked(v, axis):
    """The tensor that ``v`` is ``unsqueeze(axis)`` of, or None."""
    r = v.producer
    if r is None or r.op != "Reshape":
        return None
    x = r.inputs[0]
    want = list(x.type.shape)
    want.insert(axis, 1)
    return x if list(v.type.shape) == want else None


class StackSum(RewritePattern):
    op = "ReduceSum"

    def match_and_rewrite(self, rs, graph):
        cat = rs.inputs[0].producer
        if cat is None or cat.op != "Concat" or len(rs.attrs["axes"]) != 1:
            return False
        axis = rs.attrs["axes"][0]
        if cat.attrs["axis"] != axis or len(cat.inputs) < 2:
            return False
        parts = [_unstacked(v, axis) for v in cat.inputs]
        if any(p is None for p in parts) or len({p.type for p in parts}) != 1:
            return False
        acc = parts[0]
        for p in parts[1:]:
            acc = graph.add_node("Add", [acc, p], name=rs.name, before=rs).output
        if rs.attrs["keepdims"]:
            acc = graph.add_node("Reshape", [acc], {"shape": list(rs.output.type.shape)}, name=rs.name,
                                 before=rs).output
        replace_result(graph, rs.output, acc.producer)
        return True


@register_pass
@dataclass(frozen=True)
class StackSumToAdds(Pass):
    name = "stack-sum"
    summary = "rewrite ReduceSum(Concat(unsqueezed tensors)) (torch sum(stack(...))) to Adds"
    exact = True

    def run(self, graph, ctx):
        n = apply_patterns(graph, [StackSum()])
        return PassResult(n > 0, [f"rewrote {n} stacked sum(s)"] if n else [])
