"""``remove-identity``: drop Identity, Dropout (inference), and Reshape/Flatten/Pad
that do not change their operand."""

from __future__ import annotations

from dataclasses import dataclass

from hecompiler.passmanager import Pass, PassResult, register_pass
from hecompiler.rewrite import RewritePattern, apply_patterns


class _Forward(RewritePattern):
    """Replace a node that returns its operand unchanged by that operand."""

    def __init__(self, op, cond=lambda n: True):
        self.op = op
        self.cond = cond

    def match_and_rewrite(self, node, graph):
        x = node.inputs[0]
        if not self.cond(node) or x.type != node.output.type:
            return False
        out = node.output
        if out in graph.outputs:
            # the graph output keeps its name: only fold into a private producer
            if x.producer is None or x in graph.outputs or len(x.uses) != 1:
                return False
            name = out.name
            graph.replace_all_uses(out, x)
            graph.remove_node(node)
            graph.rename(x, name)
            return True
        graph.replace_all_uses(out, x)
        graph.remove_node(node)
        return True


PATTERNS = [
    _Forward("Identity"),
    _Forward("Dropout"),
    _Forward("Reshape"),
    _Forward("Flatten"),
    _Forward("Pad", lambda n: not any(n.attrs["pads"])),
]


@register_pass
@dataclass(frozen=True)
class RemoveIdentity(Pass):
    name = "remove-identity"
    summary = "drop Identity, Dropout and shape-preserving Reshape/Flatten/Pad"
    exact = True

    def run(self, graph, ctx):
        n = apply_patterns(graph, PATTERNS)
        return PassResult(n > 0, [f"removed {n} node(s)"] if n else [])
