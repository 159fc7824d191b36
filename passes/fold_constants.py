"""``fold-constants``: evaluate nodes whose operands are all constants.

The reference interpreter computes the result, which replaces the node as a
constant of the same name.  Nodes that produce a graph output are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from hecompiler.interp import Interpreter
from hecompiler.passmanager import Pass, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "evaluate nodes whose operands are all constants (reference interpreter)"
    exact = True

    def run(self, graph, ctx):
        interp = Interpreter(graph)
        folded = 0
        for node in list(graph.nodes):
            if not node.inputs or not all(v.is_constant for v in node.inputs):
                continue
            if any(v in graph.outputs for v in node.outputs):
                continue
            results = interp.run_node(node, [v.data for v in node.inputs])
            olds = list(node.outputs)
            tmp = [graph.add_constant(r, o.name + ".folded") for o, r in zip(olds, results)]
            for o, t in zip(olds, tmp):
                graph.replace_all_uses(o, t)
            inputs = list(node.inputs)
            graph.remove_node(node)
            for o, t in zip(olds, tmp):
                graph.rename(t, o.name)
            for v in inputs:
                if not v.uses and v.name in graph.constants and v not in graph.outputs:
                    graph.remove_constant(v)
            folded += 1
        return PassResult(folded > 0, [f"folded {folded} node(s)"] if folded else [])
