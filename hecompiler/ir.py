"""The graph IR: typed values, nodes with attributes, constants as numpy arrays.

A :class:`Graph` owns

* ``inputs``: the run-time tensors (the data that will be encrypted),
* ``constants``: compile-time tensors (weights), each a :class:`Value` whose
  ``data`` is a read-only numpy array,
* ``nodes``: operations, kept in a topological order,
* ``outputs``: the values the graph returns.

Every value has a static :class:`TensorType` (shape and dtype).  Every value
knows its producer node (``None`` for inputs and constants) and its uses, a
list of ``(node, operand index)`` pairs kept up to date by the editing methods
of :class:`Graph` and :class:`Node`.  Attributes and constant data are
immutable; node operands are edited through :meth:`Node.set_input` or
:meth:`Graph.replace_all_uses` so the use lists cannot go stale.

The op set (what ops exist, their attributes and shape rules) lives in
:mod:`hecompiler.ops`; the textual form in :mod:`hecompiler.text`; the checker
in :mod:`hecompiler.verify`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

#: IR dtype names and their numpy types.
DTYPES: dict[str, type] = {
    "f32": np.float32,
    "f64": np.float64,
    "f16": np.float16,
    "i64": np.int64,
    "i32": np.int32,
    "i16": np.int16,
    "i8": np.int8,
    "u8": np.uint8,
    "bool": np.bool_,
}
_NP_TO_DTYPE = {np.dtype(v): k for k, v in DTYPES.items()}


def dtype_of(array: np.ndarray) -> str:
    """The IR dtype name of a numpy array (raises on unsupported dtypes)."""
    try:
        return _NP_TO_DTYPE[np.dtype(array.dtype)]
    except KeyError:
        raise TypeError(f"unsupported numpy dtype {array.dtype}") from None


@dataclass(frozen=True)
class TensorType:
    """A static tensor type: every dimension is a known non-negative int."""

    shape: tuple[int, ...]
    dtype: str = "f32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise TypeError(f"unknown dtype {self.dtype!r}")
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise TypeError(f"negative dimension in shape {shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    @classmethod
    def of(cls, array: np.ndarray) -> "TensorType":
        return cls(tuple(array.shape), dtype_of(array))


# --------------------------------------------------------------------------- attributes

AttrValue = int | float | str | tuple  # tuples of ints, floats or strings


def freeze_attr(name: str, value: Any) -> AttrValue:
    """Normalise an attribute value to an immutable python value.

    ints stay ints, floats stay floats, lists/arrays become tuples.  Anything
    else is rejected so that mistakes show up where the node is built.
    """
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        items = tuple(freeze_attr(name, v) for v in value)
        if any(isinstance(v, tuple) for v in items):
            raise TypeError(f"attribute {name!r}: nested lists are not supported")
        return items
    raise TypeError(f"attribute {name!r}: unsupported value {value!r} of type {type(value).__name__}")


# --------------------------------------------------------------------------- values and nodes

_NAME_OK = re.compile(r"^[A-Za-z0-9_.\-/]+$")


class Value:
    """A tensor in the graph: a graph input, a constant, or a node output."""

    __slots__ = ("name", "type", "producer", "uses", "_data")

    def __init__(self, name: str, type: TensorType, data: np.ndarray | None = None):
        self.name = name
        self.type = type
        self.producer: Node | None = None
        self.uses: list[tuple[Node, int]] = []
        self._data: np.ndarray | None = None
        if data is not None:
            arr = np.array(data, dtype=type.np_dtype, copy=True)
            if arr.shape != type.shape:
                raise TypeError(f"constant %{name}: data shape {arr.shape} != type shape {type.shape}")
            arr.setflags(write=False)
            self._data = arr

    @property
    def data(self) -> np.ndarray | None:
        """Constant data (read-only), or ``None`` for run-time values."""
        return self._data

    @property
    def is_constant(self) -> bool:
        return self._data is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def users(self) -> list["Node"]:
        """Distinct nodes that use this value, in use order."""
        seen: dict[int, Node] = {}
        for node, _ in self.uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """An operation.  ``inputs`` and ``attrs`` are immutable views; edit with
    :meth:`set_input` (keeps use lists right) or build a new node."""

    __slots__ = ("op", "name", "_inputs", "outputs", "_attrs", "graph")

    def __init__(self, op: str, inputs: Sequence[Value], outputs: Sequence[Value],
                 attrs: Mapping[str, Any] | None = None, name: str = ""):
        self.op = op
        self.name = name
        self._inputs: tuple[Value, ...] = tuple(inputs)
        self.outputs: tuple[Value, ...] = tuple(outputs)
        frozen = {k: freeze_attr(k, v) for k, v in sorted((attrs or {}).items())}
        self._attrs = MappingProxyType(frozen)
        self.graph: Graph | None = None

    @property
    def inputs(self) -> tuple[Value, ...]:
        return self._inputs

    @inputs.setter
    def inputs(self, _value: Any) -> None:
        raise AttributeError("node inputs are immutable: use node.set_input(i, value) or "
                             "graph.replace_all_uses(old, new)")

    @property
    def attrs(self) -> Mapping[str, AttrValue]:
        return self._attrs

    def attr(self, key: str, default: Any = None) -> Any:
        return self._attrs.get(key, default)

    @property
    def output(self) -> Value:
        """The single output of a one-output node."""
        if len(self.outputs) != 1:
            raise ValueError(f"node {self.label} has {len(self.outputs)} outputs")
        return self.outputs[0]

    @property
    def label(self) -> str:
        """How errors name this node: its output and op (and source name)."""
        out = ", ".join("%" + v.name for v in self.outputs)
        src = f" ({self.name})" if self.name else ""
        return f"{out} = {self.op}{src}"

    def set_input(self, index: int, value: Value) -> None:
        old = self._inputs[index]
        old.uses.remove((self, index))
        ins = list(self._inputs)
        ins[index] = value
        self._inputs = tuple(ins)
        value.uses.append((self, index))

    def __repr__(self) -> str:
        return f"<Node {self.label}>"


# --------------------------------------------------------------------------- graph

class Graph:
    """A function from ``inputs`` to ``outputs``; see the module docstring."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.constants: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self._names: set[str] = set()
        self._counter = itertools.count()

    # ---- names
    def fresh_name(self, hint: str = "t") -> str:
        """A value name not used yet in this graph, derived from ``hint``."""
        hint = hint or "t"
        if hint not in self._names:
            return hint
        base = re.sub(r"\.\d+$", "", hint)
        while True:
            cand = f"{base}.{next(self._counter)}"
            if cand not in self._names:
                return cand

    def _claim(self, name: str) -> None:
        if not name:
            raise ValueError("value names must be non-empty")
        if name in self._names:
            raise ValueError(f"value name %{name} is already defined")
        self._names.add(name)

    # ---- building
    def add_input(self, name: str, type: TensorType) -> Value:
        self._claim(name)
        v = Value(name, type)
        self.inputs.append(v)
        return v

    def add_constant(self, data: np.ndarray, name: str = "const", exact_name: bool = False) -> Value:
        """Add a constant; ``name`` is a hint unless ``exact_name``."""
        data = np.asarray(data)
        if not exact_name:
            name = self.fresh_name(name)
        self._claim(name)
        v = Value(name, TensorType.of(data), data)
        self.constants[name] = v
        return v

    def add_node(self, op: str, inputs: Sequence[Value], attrs: Mapping[str, Any] | None = None,
                 *, out_types: Sequence[TensorType] | None = None, out_names: Sequence[str] | None = None,
                 name: str = "", before: Node | None = None, after: Node | None = None) -> Node:
        """Create a node, infer its output types (unless given) and insert it.

        By default the node is appended; ``before``/``after`` insert it next to
        an existing node, which is how passes keep the order topological.
        """
        from . import ops  # late import: ops depends on ir

        label = name or op
        attrs = ops.normalize_attrs(op, dict(attrs or {}), label=label)
        if out_types is None:
            out_types = ops.infer_types(op, [v.type for v in inputs], attrs, label=label,
                                        const_inputs=[v.data for v in inputs])
        if out_names is None:
            out_names = [self.fresh_name(name or op.lower()) if i == 0 else self.fresh_name(f"{name or op.lower()}.{i}")
                         for i in range(len(out_types))]
        if len(out_names) != len(out_types):
            raise ValueError(f"{op}: {len(out_names)} output names for {len(out_types)} outputs")
        outs = []
        for n, t in zip(out_names, out_types):
            self._claim(n)
            outs.append(Value(n, t))
        node = Node(op, inputs, outs, attrs, name)
        for v in outs:
            v.producer = node
        for i, v in enumerate(node.inputs):
            v.uses.append((node, i))
        node.graph = self
        if before is not None:
            self.nodes.insert(self.nodes.index(before), node)
        elif after is not None:
            self.nodes.insert(self.nodes.index(after) + 1, node)
        else:
            self.nodes.append(node)
        return node

    # ---- editing
    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every user of ``old`` (and the graph outputs) use ``new``."""
        if old is new:
            return
        for node, idx in list(old.uses):
            node.set_input(idx, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs are unused."""
        for v in node.outputs:
            if v.uses or v in self.outputs:
                raise ValueError(f"cannot remove {node.label}: output %{v.name} is still used")
        for i, v in enumerate(node.inputs):
            v.uses.remove((node, i))
        self.nodes.remove(node)
        for v in node.outputs:
            self._names.discard(v.name)
        node.graph = None

    def remove_constant(self, value: Value) -> None:
        if value.uses or value in self.outputs:
            raise ValueError(f"constant %{value.name} is still used")
        del self.constants[value.name]
        self._names.discard(value.name)

    def rename(self, value: Value, new_name: str) -> None:
        if new_name == value.name:
            return
        self._claim(new_name)
        self._names.discard(value.name)
        if value.is_constant:
            del self.constants[value.name]
            self.constants[new_name] = value
        value.name = new_name

    # ---- queries
    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.constants.values()
        for n in self.nodes:
            yield from n.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(f"no value %{name} in graph {self.name}")

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def to_networkx(self):
        """A networkx DiGraph over nodes (keyed by node index) with value edges.

        Graph inputs and constants are not vertices; edge attribute ``value``
        names the tensor carried.
        """
        import networkx as nx

        g = nx.MultiDiGraph()
        index = {id(n): i for i, n in enumerate(self.nodes)}
        for i, n in enumerate(self.nodes):
            g.add_node(i, node=n)
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                if v.producer is not None and id(v.producer) in index:
                    g.add_edge(index[id(v.producer)], i, value=v.name)
        return g

    def topo_sort(self) -> None:
        """Reorder ``nodes`` topologically (stable: keeps the current order
        where dependencies allow).  Raises on a cycle."""
        import networkx as nx

        g = self.to_networkx()
        try:
            order = list(nx.lexicographical_topological_sort(g))
        except nx.NetworkXUnfeasible:
            raise ValueError(f"graph {self.name} has a cycle") from None
        self.nodes = [self.nodes[i] for i in order]

    def clone(self) -> "Graph":
        """A deep copy (constant arrays are shared: they are read-only)."""
        g = Graph(self.name)
        vmap: dict[int, Value] = {}
        for v in self.inputs:
            vmap[id(v)] = g.add_input(v.name, v.type)
        for v in self.constants.values():
            nv = Value(v.name, v.type)
            nv._data = v._data
            g._claim(v.name)
            g.constants[v.name] = nv
            vmap[id(v)] = nv
        for n in self.nodes:
            nn = g.add_node(n.op, [vmap[id(v)] for v in n.inputs], dict(n.attrs),
                            out_types=[v.type for v in n.outputs], out_names=[v.name for v in n.outputs],
                            name=n.name)
            for v, nv in zip(n.outputs, nn.outputs):
                vmap[id(v)] = nv
        g.outputs = [vmap[id(v)] for v in self.outputs]
        return g

    def __str__(self) -> str:
        from .text import print_graph

        return print_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes, {len(self.constants)} constants>"


def name_is_bare(name: str) -> bool:
    """Whether a value name can be printed without quotes."""
    return bool(_NAME_OK.match(name))


def iter_uses(values: Iterable[Value]) -> Iterator[tuple[Node, int]]:
    for v in values:
        yield from v.uses
