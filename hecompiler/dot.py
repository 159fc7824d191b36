"""DOT pictures of a graph IR (through the ``graphviz`` package's source builder).

Each node shows its op, its result name and shape; constants appear as small
grey boxes with their shape and element count; edges are labelled with the
shape they carry.  Nodes are coloured by kind (linear, activation, add,
pooling, shape).  ``annotate`` lets later stages add lines or styles per
node (levels, layouts, skip marks) without changing this module.
"""

from __future__ import annotations

import fnmatch
import html
from typing import Callable, Mapping

import graphviz

from .errors import HecError
from .ir import Graph, Node, Value

_COLOURS = {
    "linear": "#cfe2ff", "act": "#ffe5b4", "add": "#d4f4d4", "pool": "#e8d8f8", "shape": "#eeeeee",
    "other": "#ffffff",
}
_KIND = {
    "Conv": "linear", "Gemm": "linear", "MatMul": "linear", "BatchNormalization": "linear",
    "Relu": "act", "Clip": "act", "Poly": "act", "Pow": "act",
    "Add": "add", "Sub": "add", "Mul": "add", "Div": "add",
    "MaxPool": "pool", "AveragePool": "pool", "GlobalAveragePool": "pool",
    "Flatten": "shape", "Reshape": "shape", "Transpose": "shape", "Pad": "shape", "Concat": "shape",
    "ReduceSum": "shape", "Identity": "shape", "Dropout": "shape",
}

Annotator = Callable[[Node], Mapping[str, str] | None]


def _shape(v: Value) -> str:
    return "x".join(str(d) for d in v.type.shape) or "scalar"


def skip_edges(graph: Graph) -> set[tuple[int, int]]:
    """(id(value), id(add node)) of residual skip edges, from the graph's structure.

    For a two-input Add/Sub of encrypted values, the fork point is its immediate dominator in
    the dataflow graph (networkx): every path from the input to the Add passes through it.  The
    skip is the operand whose producer is closer to the fork (longest path, in nodes): the
    identity edge of an identity block (distance 0), the projection shortcut of a downsampling
    block (one conv) rather than its main branch (two or more).  Equal distances: no skip."""
    import networkx as nx

    src = "input"
    G = nx.DiGraph()
    G.add_node(src)
    for n in graph.nodes:
        G.add_node(id(n))
        for v in n.inputs:
            if v.is_constant:
                continue
            G.add_edge(id(v.producer) if v.producer is not None else src, id(n))
    idom = nx.immediate_dominators(G, src)
    order = list(nx.topological_sort(G))
    dist_from: dict = {}

    def longest(d) -> dict:
        if d not in dist_from:
            dist = {d: 0}
            for u in order:
                if u in dist:
                    for w in G.successors(u):
                        dist[w] = max(dist.get(w, 0), dist[u] + 1)
            dist_from[d] = dist
        return dist_from[d]

    out = set()
    for n in graph.nodes:
        if n.op not in ("Add", "Sub") or len(n.inputs) != 2 or any(v.is_constant for v in n.inputs):
            continue
        ends = [id(v.producer) if v.producer is not None else src for v in n.inputs]
        if ends[0] == ends[1] or id(n) not in idom:
            continue
        dist = longest(idom[id(n)])
        lens = [dist.get(e, -1) for e in ends]
        if lens[0] == lens[1] or min(lens) < 0:
            continue
        k = 0 if lens[0] < lens[1] else 1
        out.add((id(n.inputs[k]), id(n)))
    return out


def _selected(graph: Graph, select: str | None) -> set[int] | None:
    """ids of the nodes whose source name or an output name matches the glob
    ``select`` (None: every node)."""
    if select is None:
        return None
    keep = {id(n) for n in graph.nodes
            if fnmatch.fnmatchcase(n.name, select) or any(fnmatch.fnmatchcase(v.name, select) for v in n.outputs)}
    if not keep:
        raise HecError(f"--select {select!r}: matches no node (node names look like "
                       f"{graph.nodes[0].name or graph.nodes[0].outputs[0].name!r})" if graph.nodes else
                       f"--select {select!r}: the graph has no nodes")
    return keep


def to_dot(graph: Graph, title: str | None = None, annotate: Annotator | None = None,
           show_constants: bool = True, select: str | None = None) -> str:
    """DOT source for ``graph``.  ``annotate(node)`` may return extra graphviz
    attributes for that node; a ``"lines"`` entry adds label lines.  Residual
    skip edges are drawn dashed and blue; a value feeding several skips (a
    shared source) is drawn with a thick purple border and says how many.
    ``select`` (a glob over node and value names, e.g. ``'/layer1/*'``) draws
    only the matching nodes; values they read from elsewhere appear as small
    ``from %name`` ellipses, so one stage of a large network stays readable."""
    keep = _selected(graph, select)
    used = None if keep is None else {id(v) for n in graph.nodes if id(n) in keep for v in n.inputs}
    d = graphviz.Digraph(name=graph.name, graph_attr={"rankdir": "TB", "fontname": "Helvetica",
                                                      "label": title or graph.name, "labelloc": "t"},
                         node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica",
                                    "fontsize": "10"},
                         edge_attr={"fontname": "Helvetica", "fontsize": "8"})
    ids: dict[int, str] = {}
    for i, v in enumerate(graph.inputs):
        if used is not None and id(v) not in used:
            continue
        ids[id(v)] = f"in{i}"
        d.node(f"in{i}", f"input %{v.name}\n{v.type}", shape="ellipse", fillcolor="#fff3b0")
    if show_constants:
        for i, v in enumerate(graph.constants.values()):
            if not v.uses or (used is not None and id(v) not in used):
                continue
            ids[id(v)] = f"c{i}"
            d.node(f"c{i}", f"%{v.name}\n{v.type}\n{v.type.size} elems", fontsize="8", fillcolor="#f4f4f4",
                   style="filled", color="#bbbbbb")
    skips = skip_edges(graph)
    fan: dict[int, int] = {}
    for vid, _ in skips:
        fan[vid] = fan.get(vid, 0) + 1
    for i, v in enumerate(graph.inputs):
        if fan.get(id(v), 0) > 1 and id(v) in ids:
            d.node(f"in{i}", f"input %{v.name}\n{v.type}\nshared skip source x{fan[id(v)]}", shape="ellipse",
                   fillcolor="#fff3b0", color="#7b2cbf", penwidth="3")
    for i, n in enumerate(graph.nodes):
        nid = f"n{i}"
        if keep is not None and id(n) not in keep:
            for k, v in enumerate(n.outputs):
                if id(v) in used:  # read by a drawn node: a small stand-in
                    ids[id(v)] = f"{nid}_{k}"
                    shared = f"\nshared skip source x{fan[id(v)]}" if fan.get(id(v), 0) > 1 else ""
                    d.node(f"{nid}_{k}", f"from %{v.name}{shared}", shape="ellipse", fontsize="8",
                           fillcolor="#ffffff", color="#7b2cbf" if shared else "#999999",
                           penwidth="3" if shared else "1")
            continue
        for v in n.outputs:
            ids[id(v)] = nid
        extra = dict(annotate(n) or {}) if annotate else {}
        lines = [f"<b>{html.escape(n.op)}</b>", html.escape("%" + n.outputs[0].name),
                 html.escape(", ".join(_shape(v) for v in n.outputs))]
        if fan.get(id(n.outputs[0]), 0) > 1:
            lines.append(f"shared skip source x{fan[id(n.outputs[0])]}")
        lines += [html.escape(str(s)) for s in extra.pop("lines", [])]
        attrs = {"fillcolor": _COLOURS[_KIND.get(n.op, "other")]}
        if fan.get(id(n.outputs[0]), 0) > 1:
            attrs.update(color="#7b2cbf", penwidth="3")
        attrs.update({k: str(val) for k, val in extra.items()})
        d.node(nid, "<" + "<br/>".join(lines) + ">", **attrs)
        for v in n.inputs:
            src = ids.get(id(v))
            if src is None:
                continue
            if (id(v), id(n)) in skips:
                d.edge(src, nid, label="skip " + _shape(v), style="dashed", color="#1f6feb", penwidth="2",
                       fontcolor="#1f6feb", constraint="false")
            else:
                d.edge(src, nid, label=_shape(v))
    for i, v in enumerate(graph.outputs):
        if keep is not None and (v.producer is None or id(v.producer) not in keep):
            continue
        d.node(f"out{i}", f"output %{v.name}\n{v.type}", shape="ellipse", fillcolor="#fff3b0")
        if id(v) in ids:
            d.edge(ids[id(v)], f"out{i}", label=_shape(v))
    return d.source
