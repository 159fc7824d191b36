"""The graph verifier: run by the pass manager after every pass.

Checks single definition of names, that every operand is defined before use
(so ``nodes`` is a topological order and the graph is acyclic), use lists that
match operands, known ops with well-formed attributes, output types that
match the op's type rule, and graph outputs that exist.  All problems are
collected; the error lists each one next to the printed node it concerns.
"""

from __future__ import annotations

from .errors import VerificationError
from .ir import Graph
from . import ops


def verify(graph: Graph, context: str = "") -> None:
    """Raise :class:`VerificationError` listing every broken invariant."""
    problems: list[str] = []
    from .text import fmt_node

    def bad(where: str, msg: str) -> None:
        problems.append(f"  {where}\n    error: {msg}")

    defined: dict[int, str] = {}
    names: dict[str, str] = {}

    def define(v, what: str) -> None:
        if v.name in names:
            bad(what, f"%{v.name} is defined twice (first as {names[v.name]})")
        names[v.name] = what
        defined[id(v)] = v.name

    for v in graph.inputs:
        define(v, f"input %{v.name}")
        if v.producer is not None or v.is_constant:
            bad(f"input %{v.name}", "graph inputs have no producer and no data")
        if not v.type.dtype.startswith("f"):
            bad(f"input %{v.name}", f"graph inputs must be floating point, got {v.type}")
    for name, v in graph.constants.items():
        define(v, f"constant %{v.name}")
        if name != v.name:
            bad(f"constant %{v.name}", f"registered under the name {name!r}")
        if not v.is_constant or v.data.shape != v.type.shape:
            bad(f"constant %{v.name}", "constant data missing or of the wrong shape")

    for node in graph.nodes:
        line = fmt_node(node)
        if node.graph is not graph:
            bad(line, "node does not belong to this graph")
        for i, v in enumerate(node.inputs):
            if id(v) not in defined:
                bad(line, f"operand {i} %{v.name} is used before it is defined (or not in this graph)")
            if (node, i) not in v.uses:
                bad(line, f"operand {i} %{v.name} does not list this node among its uses")
        try:
            attrs = ops.normalize_attrs(node.op, node.attrs, label=node.label)
            if dict(attrs) != dict(node.attrs):
                bad(line, "attributes are not normalised (missing defaults or wrong kinds)")
            want = ops.infer_types(node.op, [v.type for v in node.inputs], attrs, label=node.label,
                                   const_inputs=[v.data for v in node.inputs])
        except VerificationError as e:
            bad(line, str(e).split(": ", 1)[-1])
        else:
            have = [v.type for v in node.outputs]
            if want != have:
                bad(line, f"result types {', '.join(map(str, have))} but {node.op} gives "
                          f"{', '.join(map(str, want))}")
        for v in node.outputs:
            if v.producer is not node:
                bad(line, f"result %{v.name} does not name this node as producer")
            define(v, line)

    for v in graph.values():
        for user, idx in v.uses:
            if user.graph is not graph or idx >= len(user.inputs) or user.inputs[idx] is not v:
                bad(f"%{v.name}", f"stale use by {user.label} operand {idx}")
    if not graph.outputs:
        bad(f"graph {graph.name}", "the graph has no outputs")
    for v in graph.outputs:
        if id(v) not in defined:
            bad(f"return %{v.name}", "returned value is not defined in the graph")

    if problems:
        head = f"IR verification failed{(' ' + context) if context else ''}: {len(problems)} problem(s)"
        raise VerificationError(head + "\n" + "\n".join(problems[:20]) +
                                ("\n  ..." if len(problems) > 20 else ""))
