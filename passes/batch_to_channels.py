"""``batch-to-channels``: a batch of B inputs becomes one input of B times the channels.

The HE lowering packs one tensor of batch 1.  A model whose input has batch B > 1 is rewritten
into the same computation on the images stacked along the channel axis: every run-time value of
shape (B, C, ...) becomes (1, B*C, ...), which has the same elements in the same (row-major)
order, so the client packs the batch as it stands and the slots of a ciphertext hold several
images side by side.  Every op then acts on each image's channels alone:

* Conv: its weights repeated B times, ``group`` times B (B independent convolutions, whose
  diagonals the images share: the rotations do not grow with B);
* BatchNormalization: its parameters repeated; Gemm / MatMul: a block-diagonal matrix of B copies
  (run-time bias: stacked like any value); constant operands of element-wise ops: broadcast to
  the batch and stacked;
* element-wise ops, pooling, global average pooling: unchanged (they act per channel);
* Flatten and Reshape keeping the batch axis first: the new shape stacked.

The graph inputs and outputs keep their batch shapes (a Reshape at each end, free in the
lowering: the positions agree).  An op whose per-image structure is not a per-channel one
(Concat, Transpose, Pad, ReduceSum over channels...) is refused, naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hecompiler.errors import HecError
from hecompiler.passmanager import Pass, PassResult, register_pass

#: ops that act on each channel (or element) alone: the same node on the stacked tensor
_PER_CHANNEL = {"Relu", "Clip", "Identity", "Dropout", "Poly", "AveragePool", "MaxPool", "GlobalAveragePool"}
#: element-wise ops with possibly constant operands (broadcast over the batch, then stacked)
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow"}
#: largest block-diagonal matrix (entries) a batched Gemm/MatMul may make
MAX_BLOCK_ENTRIES = 1 << 26


class BatchError(HecError):
    """A batched model this pass cannot stack."""


def batch_size(graph) -> int:
    """The batch of the graph's run-time inputs (1 when they have none or disagree: the lowering
    then says what it needs)."""
    bs = {int(v.type.shape[0]) for v in graph.inputs if v.type.rank >= 2}
    return bs.pop() if len(bs) == 1 else 1


def stacked(shape, b: int) -> list[int]:
    return [1, b * int(shape[1]), *[int(d) for d in shape[2:]]]


@register_pass
@dataclass(frozen=True)
class BatchToChannels(Pass):
    name = "batch-to-channels"
    summary = "a batch of B inputs as one input with B times the channels (each op per image)"
    exact = True

    def run(self, graph, ctx):
        b = batch_size(graph)
        if b == 1:
            return PassResult(False, [])
        old_nodes = list(graph.nodes)
        m = {}  # old run-time value -> its stacked counterpart
        first = old_nodes[0] if old_nodes else None
        for v in graph.inputs:
            if v.type.rank < 2:
                raise BatchError(f"input %{v.name}: a batch of {b} needs inputs of rank >= 2, got {v.type}")
            r = graph.add_node("Reshape", [v], {"shape": stacked(v.type.shape, b)}, name=v.name + ".stack",
                               before=first)
            m[v] = r.output
        for node in old_nodes:
            new = _stack_node(graph, node, m, b)
            m[node.output] = new
        outs = []
        for o in graph.outputs:
            if o not in m:
                raise BatchError(f"output %{o.name} is not computed from the inputs")
            name = o.name
            graph.rename(o, graph.fresh_name(name + ".unstacked"))
            back = graph.add_node("Reshape", [m[o]], {"shape": [int(d) for d in o.type.shape]}, out_names=[name],
                                  name=name + ".unstack")
            outs.append(back.output)
        graph.outputs = outs
        replaced = {id(v): v for n in old_nodes for v in n.inputs if v.is_constant}
        for node in reversed(old_nodes):
            graph.remove_node(node)
        for v in replaced.values():  # the per-image constants the stacked ones replace
            if not v.uses and v not in graph.outputs:
                graph.remove_constant(v)
        return PassResult(True, [f"batch of {b}: {len(old_nodes)} node(s) act on the images stacked along "
                                 f"the channels"])


def _const(graph, data: np.ndarray, like) -> "object":
    return graph.add_constant(np.ascontiguousarray(data).astype(like.data.dtype), like.name + ".batched")


def _stack_node(graph, node, m: dict, b: int):
    """Add the stacked version of ``node`` (before it) and return its output value."""
    op, a = node.op, dict(node.attrs)
    ins = [m.get(v, v) for v in node.inputs]
    runtime = [v for v in node.inputs if v in m]
    where = f"node {node.label}"

    def add(op_, inputs, attrs):
        # the stacked value takes the old one's name (reports, DOT and errors keep naming it), except
        # a graph output, whose name goes to the Reshape that unstacks it
        old = node.output
        name = graph.fresh_name(old.name + ".stacked")
        if old not in graph.outputs:
            name, _ = old.name, graph.rename(old, graph.fresh_name(old.name + ".unbatched"))
        try:
            return graph.add_node(op_, inputs, attrs, name=node.name, before=node, out_names=[name]).output
        except HecError as e:
            raise BatchError(f"{where}: a batch of {b}: {e}") from None

    if not runtime:
        raise BatchError(f"{where}: computes from constants only (fold it first)")
    if op in _PER_CHANNEL:
        return add(op, ins, a)
    if op == "Conv":
        w = node.inputs[1]
        if not w.is_constant or (len(node.inputs) > 2 and not node.inputs[2].is_constant):
            raise BatchError(f"{where}: Conv weights must be constants")
        ins[1] = _const(graph, np.tile(w.data, (b, 1, 1, 1)), w)
        if len(ins) > 2:
            ins[2] = _const(graph, np.tile(node.inputs[2].data, b), node.inputs[2])
        a["group"] = int(a.get("group", 1)) * b
        return add(op, ins, a)
    if op == "BatchNormalization":
        for k in range(1, 5):
            ins[k] = _const(graph, np.tile(node.inputs[k].data, b), node.inputs[k])
        return add(op, ins, a)
    if op in _ELEMENTWISE:
        out_shape = tuple(node.output.type.shape)
        if out_shape[:1] != (b,):
            raise BatchError(f"{where}: its result {list(out_shape)} does not keep the batch axis first")
        for k, v in enumerate(node.inputs):
            if v.is_constant and v.data.size > 1:
                full = np.broadcast_to(v.data, out_shape) if v.data.ndim <= len(out_shape) else None
                if full is None:
                    raise BatchError(f"{where}: constant %{v.name} of shape {list(v.data.shape)} does not broadcast "
                                     f"to {list(out_shape)}")
                ins[k] = _const(graph, full.reshape(stacked(out_shape, b)), v)
            elif v in m and tuple(v.type.shape) != out_shape:
                raise BatchError(f"{where}: run-time operand %{v.name} {list(v.type.shape)} is broadcast to "
                                 f"{list(out_shape)} (not supported with a batch)")
        return add(op, ins, a)
    if op in ("Flatten", "Reshape"):
        out_shape = [int(d) for d in node.output.type.shape]
        if op == "Flatten" and a.get("axis", 1) != 1 or out_shape[:1] != [b] or len(out_shape) < 2:
            raise BatchError(f"{where}: a batch of {b}: {op} to {out_shape} does not keep the batch axis first")
        return add("Reshape", [ins[0]], {"shape": stacked(out_shape, b)})
    if op in ("Gemm", "MatMul"):
        return _stack_matmul(graph, node, ins, a, b, add, where)
    raise BatchError(f"{where}: {op} on a batch of {b} is not supported yet (compile the model with batch 1)")


def _stack_matmul(graph, node, ins, a, b, add, where):
    w = node.inputs[1]
    if not w.is_constant:
        raise BatchError(f"{where}: {node.op} weights must be constants")
    if w.data.size * b * b > MAX_BLOCK_ENTRIES:
        raise BatchError(f"{where}: a batch of {b} makes a {b}x{b}-block matrix of {w.data.size * b * b} entries "
                         f"(limit {MAX_BLOCK_ENTRIES})")
    if node.op == "Gemm" and a.get("transA", 0):
        raise BatchError(f"{where}: Gemm with transA on a batch is not supported")
    ins[1] = _const(graph, np.kron(np.eye(b, dtype=w.data.dtype), w.data) + 0.0, w)  # + 0.0: no -0.0 entries
    if node.op == "Gemm" and len(node.inputs) > 2:
        c = node.inputs[2]
        n = node.output.type.shape[1]
        if c.is_constant:
            ins[2] = _const(graph, np.broadcast_to(c.data, (b, n)).reshape(1, b * n), c)
        elif tuple(c.type.shape) != (b, n):
            raise BatchError(f"{where}: run-time C {list(c.type.shape)} on a batch of {b}")
    return add(node.op, ins, a)
