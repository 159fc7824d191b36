"""Textual form of the graph IR: a printer and a lark parser that round-trip.

``parse_graph(print_graph(g))`` rebuilds ``g`` exactly and printing it again
gives the same text; pass tests compare this text against golden files.

Layout::

    graph tiny(%input: f32[1,1,8,8]) {
      %w = const f32[4,1,3,3] b64"AACAPwAA..."          # raw little-endian bytes
      %k = const f32[2] [0.5, -1.25]                      # small constants as numbers
      %y = Conv(%input, %w) {dilations=[1, 1], group=1, pads=[1, 1, 1, 1], strides=[1, 1]} : f32[1,4,8,8] loc("/conv/Conv")
      return %y
    }

All attributes are printed (defaults included), sorted by name.  Names that
are not ``[A-Za-z0-9_.-/]+`` are printed quoted: ``%"weird name"``.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from importlib import resources

import numpy as np
from lark import Lark, Token, Tree, UnexpectedInput

from .errors import ParseError, VerificationError
from .ir import DTYPES, Graph, Node, TensorType, Value, name_is_bare

#: constants with at most this many elements print as a readable list
SMALL_CONSTANT = 16


# --------------------------------------------------------------------------- printing

def fmt_name(name: str) -> str:
    return name if name_is_bare(name) else json.dumps(name)


def fmt_value(v: Value) -> str:
    return "%" + fmt_name(v.name)


def fmt_float(x: float) -> str:
    if np.isnan(x):
        return "nan"
    if np.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(float(x))


def _fmt_scalar(x, dtype: str) -> str:
    if dtype.startswith("f"):
        if np.isnan(x):
            return "nan"
        if np.isinf(x):
            return "inf" if x > 0 else "-inf"
        return str(x)  # numpy prints the shortest repr that round-trips in its dtype
    return str(int(x))


def fmt_attr(v) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(fmt_attr(x) for x in v) + "]"
    if isinstance(v, float):
        return fmt_float(v)
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


def fmt_const(v: Value, elide: int | None = None) -> str:
    data = v.data
    if elide is not None and data.size > elide:
        return f"<{data.size} elements>"
    if data.size <= SMALL_CONSTANT:
        return "[" + ", ".join(_fmt_scalar(x, v.type.dtype) for x in data.reshape(-1)) + "]"
    raw = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()
    return 'b64"' + base64.b64encode(raw).decode("ascii") + '"'


def fmt_node(node: Node) -> str:
    res = ", ".join(fmt_value(v) for v in node.outputs)
    args = ", ".join(fmt_value(v) for v in node.inputs)
    attrs = ""
    if node.attrs:
        attrs = " {" + ", ".join(f"{k}={fmt_attr(v)}" for k, v in node.attrs.items()) + "}"
    types = ", ".join(str(v.type) for v in node.outputs)
    loc = f" loc({json.dumps(node.name)})" if node.name else ""
    return f"{res} = {node.op}({args}){attrs} : {types}{loc}"


def print_graph(g: Graph, elide_constants: int | None = None) -> str:
    """The textual form.  ``elide_constants=N`` abbreviates constants with
    more than N elements (for reading; such text does not parse back)."""
    params = ", ".join(f"{fmt_value(v)}: {v.type}" for v in g.inputs)
    lines = [f"graph {fmt_name(g.name)}({params}) {{"]
    for v in g.constants.values():
        lines.append(f"  {fmt_value(v)} = const {v.type} {fmt_const(v, elide_constants)}")
    for n in g.nodes:
        lines.append("  " + fmt_node(n))
    lines.append("  return " + ", ".join(fmt_value(v) for v in g.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- parsing

@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("hecompiler").joinpath("ir.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _unquote(tok: str) -> str:
    return json.loads(tok) if tok.startswith('"') else tok


def _vname(tok: Token) -> str:
    return _unquote(str(tok)[1:])


def _number(tree: Tree):
    s = str(tree.children[0])
    if any(c in s for c in ".eEn") or "inf" in s:
        return float(s)
    return int(s)


def _type(tree: Tree) -> TensorType:
    dtype = str(tree.children[0])
    dims = tuple(int(t) for t in tree.children[1:] if t is not None)
    return TensorType(dims, dtype)


def _attr(tree):
    if isinstance(tree, Tree):
        if tree.data == "number":
            return _number(tree)
        if tree.data == "astring":
            return _unquote(str(tree.children[0]))
        if tree.data == "alist":
            return tuple(_attr(c) for c in tree.children if c is not None)
    raise AssertionError(tree)


class _Builder:
    def __init__(self, text: str, source: str):
        self.text = text
        self.source = source
        self.graph: Graph | None = None
        self.env: dict[str, Value] = {}

    def err(self, meta_or_tok, msg: str) -> ParseError:
        line = getattr(meta_or_tok, "line", None)
        col = getattr(meta_or_tok, "column", None)
        where = f"{self.source}:{line}:{col}: " if line else f"{self.source}: "
        snippet = ""
        if line:
            src_line = self.text.splitlines()[line - 1]
            snippet = "\n  " + src_line[:200] + "\n  " + " " * (col - 1) + "^"
        return ParseError(where + msg + snippet)

    def lookup(self, tok: Token) -> Value:
        name = _vname(tok)
        if name not in self.env:
            raise self.err(tok, f"use of undefined value %{name}")
        return self.env[name]

    def define(self, tok: Token, v: Value) -> None:
        self.env[v.name] = v

    def build(self, tree: Tree) -> Graph:
        kids = tree.children
        gname = _unquote(str(kids[0].children[0]))
        g = self.graph = Graph(gname)
        for ch in kids[1:]:
            if ch is None:
                continue
            if ch.data == "param":
                tok, ty = ch.children
                name = _vname(tok)
                if name in self.env:
                    raise self.err(tok, f"value %{name} is defined twice")
                self.env[name] = g.add_input(name, _type(ty))
            elif ch.data in ("const_def",):
                self.const(ch)
            elif ch.data == "node_def":
                self.node(ch)
            elif ch.data == "ret":
                g.outputs = [self.lookup(t) for t in ch.children if t is not None]
        return g

    def const(self, ch: Tree) -> None:
        tok, ty, data = ch.children
        name = _vname(tok)
        if name in self.env:
            raise self.err(tok, f"value %{name} is defined twice")
        t = _type(ty)
        dt = np.dtype(DTYPES[t.dtype])
        if data.data == "const_b64":
            try:
                raw = base64.b64decode(_unquote(str(data.children[0])), validate=True)
            except Exception:
                raise self.err(tok, f"constant %{name}: invalid base64 data") from None
            if len(raw) != t.size * dt.itemsize:
                raise self.err(tok, f"constant %{name}: {len(raw)} bytes of data for {t} "
                                    f"(needs {t.size * dt.itemsize})")
            arr = np.frombuffer(raw, dtype=dt.newbyteorder("<")).astype(dt).reshape(t.shape)
        else:
            nums = [str(c.children[0]) for c in data.children if c is not None]
            if len(nums) != t.size:
                raise self.err(tok, f"constant %{name}: {len(nums)} values for {t} (needs {t.size})")
            if t.dtype.startswith("f"):
                arr = np.array([float(x) for x in nums], dtype=np.float64).astype(dt).reshape(t.shape)
            else:
                try:
                    arr = np.array([int(x) for x in nums], dtype=dt).reshape(t.shape)
                except ValueError:
                    raise self.err(tok, f"constant %{name}: non-integer value in {t.dtype} data") from None
        self.env[name] = self.graph.add_constant(arr, name, exact_name=True)

    def node(self, ch: Tree) -> None:
        kids = ch.children
        k = next(i for i, c in enumerate(kids) if isinstance(c, Token) and c.type == "OPNAME")
        results, optok, argtree, rest, loc = kids[:k], kids[k], kids[k + 1], kids[k + 2:-1], kids[-1]
        op = str(optok)
        args = [c for c in argtree.children if c is not None]
        attrs_tree = next((c for c in rest if isinstance(c, Tree) and c.data == "attrs"), None)
        types = [_type(c) for c in rest if isinstance(c, Tree) and c.data == "type"]
        inputs = [self.lookup(t) for t in args]
        attrs = {}
        if attrs_tree is not None:
            for a in attrs_tree.children:
                if a is None:
                    continue
                key = str(a.children[0])
                if key in attrs:
                    raise self.err(a.meta, f"attribute {key} given twice")
                attrs[key] = _attr(a.children[1])
        names = [_vname(t) for t in results]
        for t, n in zip(results, names):
            if n in self.env:
                raise self.err(t, f"value %{n} is defined twice")
        if len(types) != len(names):
            raise self.err(optok, f"{op}: {len(names)} results but {len(types)} types")
        name = _unquote(str(loc.children[0])) if loc is not None else ""
        try:
            node = self.graph.add_node(op, inputs, attrs, out_types=types, out_names=names, name=name)
        except VerificationError as e:
            raise self.err(optok, str(e)) from None
        for v in node.outputs:
            self.env[v.name] = v


def parse_graph(text: str, source: str = "<ir>") -> Graph:
    """Parse the textual IR.  Raises :class:`ParseError` with line, column and
    a caret under the offending token."""
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        ctx = e.get_context(text, span=60).rstrip("\n")
        what = "unexpected input"
        tok = getattr(e, "token", None)
        if tok is not None:
            what = f"unexpected {str(tok)[:40]!r}" if str(tok) else "unexpected end of input"
        raise ParseError(f"{source}:{e.line}:{e.column}: {what}\n{ctx}") from None
    return _Builder(text, source).build(tree)
