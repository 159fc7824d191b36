"""``dce``: remove nodes whose results nothing uses, and unused constants."""

from __future__ import annotations

from dataclasses import dataclass

from hecompiler.passmanager import Pass, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    name = "dce"
    summary = "remove nodes and constants that do not contribute to an output"
    exact = True

    def run(self, graph, ctx):
        live = {id(v) for v in graph.outputs}
        dead_nodes = []
        for node in reversed(graph.nodes):
            if any(id(v) in live for v in node.outputs):
                live.update(id(v) for v in node.inputs)
            else:
                dead_nodes.append(node)
        for node in dead_nodes:  # reverse order: users before producers
            graph.remove_node(node)
        dead_consts = [v for v in graph.constants.values() if not v.uses and v not in graph.outputs]
        for v in dead_consts:
            graph.remove_constant(v)
        notes = []
        if dead_nodes:
            notes.append(f"removed {len(dead_nodes)} node(s)")
        if dead_consts:
            notes.append(f"removed {len(dead_consts)} constant(s)")
        return PassResult(bool(dead_nodes or dead_consts), notes)
