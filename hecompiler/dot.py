"""DOT pictures of a graph IR (through the ``graphviz`` package's source builder).

Each node shows its op, its result name and shape; constants appear as small
grey boxes with their shape and element count; edges are labelled with the
shape they carry.  Nodes are coloured by kind (linear, activation, add,
pooling, shape).  ``annotate`` lets later stages add lines or styles per
node (levels, layouts, skip marks) without changing this module.
"""

from __future__ import annotations

import html
from typing import Callable, Mapping

import graphviz

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


def to_dot(graph: Graph, title: str | None = None, annotate: Annotator | None = None,
           show_constants: bool = True) -> str:
    """DOT source for ``graph``.  ``annotate(node)`` may return extra graphviz
    attributes for that node; a ``"lines"`` entry adds label lines."""
    d = graphviz.Digraph(name=graph.name, graph_attr={"rankdir": "TB", "fontname": "Helvetica",
                                                      "label": title or graph.name, "labelloc": "t"},
                         node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica",
                                    "fontsize": "10"},
                         edge_attr={"fontname": "Helvetica", "fontsize": "8"})
    ids: dict[int, str] = {}
    for i, v in enumerate(graph.inputs):
        ids[id(v)] = f"in{i}"
        d.node(f"in{i}", f"input %{v.name}\n{v.type}", shape="ellipse", fillcolor="#fff3b0")
    if show_constants:
        for i, v in enumerate(graph.constants.values()):
            if not v.uses:
                continue
            ids[id(v)] = f"c{i}"
            d.node(f"c{i}", f"%{v.name}\n{v.type}\n{v.type.size} elems", fontsize="8", fillcolor="#f4f4f4",
                   style="filled", color="#bbbbbb")
    for i, n in enumerate(graph.nodes):
        nid = f"n{i}"
        for v in n.outputs:
            ids[id(v)] = nid
        extra = dict(annotate(n) or {}) if annotate else {}
        lines = [f"<b>{html.escape(n.op)}</b>", html.escape("%" + n.outputs[0].name),
                 html.escape(", ".join(_shape(v) for v in n.outputs))]
        lines += [html.escape(str(s)) for s in extra.pop("lines", [])]
        attrs = {"fillcolor": _COLOURS[_KIND.get(n.op, "other")]}
        attrs.update({k: str(val) for k, val in extra.items()})
        d.node(nid, "<" + "<br/>".join(lines) + ">", **attrs)
        for v in n.inputs:
            src = ids.get(id(v))
            if src is not None:
                d.edge(src, nid, label=_shape(v))
    for i, v in enumerate(graph.outputs):
        d.node(f"out{i}", f"output %{v.name}\n{v.type}", shape="ellipse", fillcolor="#fff3b0")
        if id(v) in ids:
            d.edge(ids[id(v)], f"out{i}", label=_shape(v))
    return d.source
