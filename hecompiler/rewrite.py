"""Pattern rewriting: local rewrites applied until nothing changes.

A :class:`RewritePattern` names the op it looks at and implements
``match_and_rewrite(node, graph) -> bool``; :func:`apply_patterns` walks the
graph, dispatching each live node to the patterns for its op, and repeats
until a sweep changes nothing.  Dead nodes left behind are removed by the
``dce`` pass or by :func:`erase_if_dead`.
"""

from __future__ import annotations

from typing import ClassVar, Iterable

from .ir import Graph, Node, Value


class RewritePattern:
    #: op this pattern matches (None: every node)
    op: ClassVar[str | None] = None

    def match_and_rewrite(self, node: Node, graph: Graph) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


def apply_patterns(graph: Graph, patterns: Iterable[RewritePattern], max_sweeps: int = 1000) -> int:
    """Apply patterns to a fixpoint; returns the number of rewrites made."""
    by_op: dict[str | None, list[RewritePattern]] = {}
    for p in patterns:
        by_op.setdefault(p.op, []).append(p)
    total = 0
    for _ in range(max_sweeps):
        changed = 0
        for node in list(graph.nodes):
            if node.graph is not graph:
                continue  # erased by an earlier rewrite in this sweep
            for p in by_op.get(node.op, []) + by_op.get(None, []):
                if p.match_and_rewrite(node, graph):
                    changed += 1
                    break
        total += changed
        if not changed:
            return total
    raise RuntimeError("rewrite patterns did not converge")


def sole_user(value: Value, graph: Graph) -> Node | None:
    """The only node using ``value`` (once), or None if it has other uses or
    is a graph output."""
    if len(value.uses) != 1 or value in graph.outputs:
        return None
    return value.uses[0][0]


def erase_if_dead(graph: Graph, node: Node | None) -> None:
    """Remove ``node`` (and then its producers, transitively) if unused."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n is None or n.graph is not graph:
            continue
        if any(v.uses or v in graph.outputs for v in n.outputs):
            continue
        producers = [v.producer for v in n.inputs]
        consts = [v for v in n.inputs if v.is_constant]
        graph.remove_node(n)
        for c in consts:
            if not c.uses and c.name in graph.constants:
                graph.remove_constant(c)
        stack.extend(producers)


def replace_result(graph: Graph, old: Value, new_node: Node) -> None:
    """Make ``new_node``'s result take over ``old``: its uses and its name;
    the old producer (and whatever only it used) is erased."""
    name = old.name
    graph.replace_all_uses(old, new_node.output)
    erase_if_dead(graph, old.producer)
    graph.rename(new_node.output, name)
