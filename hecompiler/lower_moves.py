"""Lowering rules of the data-movement ops: Transpose, Pad, Concat, ReduceSum.

Each is a fixed linear map of the elements, so each lowers to one ``sparse`` linear op (its
matrix as (row, col, value) triples over the flat (c, h, w) tensors) from the operand's layout to
a compact layout of the result: one level and the rotations of its diagonals, whatever the
layouts.  The matrix is read off the reference interpreter's own op (``hecompiler.interp``)
applied to element numbers, so the encrypted op cannot disagree with the reference one.

* Transpose: a permutation (the batch axis must stay first: the lowering packs batch 1);
* Pad (not folded into a convolution): the input elements moved into the larger grid; a non-zero
  pad value is the op's bias;
* Concat: one op per encrypted operand into the result's layout, summed; constant operands are
  a bias;
* ReduceSum: over the spatial axes (2, 3) as global average pooling (rotate-and-sum, no level)
  times H*W, over any other axes a sparse op summing them.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from .errors import LoweringError
from .heprog import LinearOp
from .interp import Interpreter
from .ir import Node
from .layout import Layout, chw
from .lower import LOWERINGS, Lowering, Tensor, lowers


def _numbered(shape) -> np.ndarray:
    """Element k of a tensor of ``shape`` holds k + 1 (0 stays free for 'no element')."""
    return np.arange(1, int(np.prod(shape)) + 1, dtype=np.float64).reshape(shape)


def _gather(moved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the element moves in ``moved``: an op's output computed from numbered
    inputs (entry k + 1 at output position r: input element k lands at r)."""
    flat = moved.reshape(-1)
    rows = np.flatnonzero(flat)
    return rows, flat[rows].astype(np.int64) - 1


def _run(node: Node, *xs: np.ndarray, **attrs) -> np.ndarray:
    """The reference interpreter's op of ``node`` on ``xs`` (``attrs`` override the node's)."""
    view = SimpleNamespace(op=node.op, attrs=dict(node.attrs, **attrs), inputs=node.inputs, output=node.output)
    return np.asarray(getattr(Interpreter, f"op_{node.op}")(None, view, *xs))


def _sparse_op(low: Lowering, node: Node, t: Tensor, rows, cols, vals, out_shape, bias=None,
               lay: Layout | None = None) -> Tensor:
    """Emit one ``sparse`` linear op from ``t`` to ``lay`` (default: compact ``out_shape``)."""
    name = node.output.name
    trip = np.stack([np.asarray(rows, np.float64), np.asarray(cols, np.float64), np.asarray(vals, np.float64)])
    params = {"weight": low.add_weight(name + ".moves", trip)}
    if bias is not None and np.any(bias):
        params["bias"] = low.add_weight(name + ".bias", np.asarray(bias, np.float64).reshape(-1))
    lay = lay or Layout.compact(out_shape, low.prog.params.slots)
    lin = LinearOp("sparse", t.layout, low.layout_id(lay), low.layout(t).shape, lay.shape, params, note=name)
    return low.linear_on(lin, t)


def _shape(low: Lowering, v, what: str):
    try:
        return chw(v.type.shape)
    except LoweringError as e:
        raise LoweringError(f"{low._where()}: {what}: {e}") from None


@lowers("Transpose")
def _lower_transpose(low: Lowering, node: Node) -> Tensor:
    x = node.inputs[0]
    perm = list(node.attrs["perm"])
    if perm and perm[0] != 0 and x.type.shape[perm[0]] != 1:
        raise LoweringError(f"{low._where()}: Transpose perm {perm} moves the batch axis (HE lowering packs "
                            f"one batch-1 tensor)")
    out_shape = _shape(low, node.output, "result")
    rows, cols = _gather(_run(node, _numbered(x.type.shape)))
    if np.array_equal(rows, cols) and low.layout(low.tensor(x)).shape == out_shape:
        return low.tensor(x)  # axes of size 1 only: nothing moves
    return _sparse_op(low, node, low.need(x, 1), rows, cols, np.ones(len(rows)), out_shape)


@lowers("Pad")
def _lower_pad(low: Lowering, node: Node) -> Tensor:
    x = node.inputs[0]
    pads = list(node.attrs["pads"])
    if pads[0] or pads[x.type.rank]:
        raise LoweringError(f"{low._where()}: Pad pads the batch axis ({pads}); HE lowering packs batch 1")
    out_shape = _shape(low, node.output, "result")
    rows, cols = _gather(_run(node, _numbered(x.type.shape), value=0.0))
    bias = _run(node, np.zeros(x.type.shape)) if node.attrs["value"] else None
    return _sparse_op(low, node, low.need(x, 1), rows, cols, np.ones(len(rows)), out_shape, bias)


@lowers("Concat")
def _lower_concat(low: Lowering, node: Node) -> Tensor:
    out_shape = _shape(low, node.output, "result")
    enc = [k for k, v in enumerate(node.inputs) if not v.is_constant]
    if not enc:
        raise LoweringError(f"{low._where()}: Concat of constants only (fold it before lowering)")
    # constants (and zeros where the encrypted operands go) make the bias of the first operand's op
    zero_or_const = [np.asarray(v.data, np.float64) if v.is_constant else np.zeros(v.type.shape)
                     for v in node.inputs]
    bias = _run(node, *zero_or_const)
    # every encrypted operand at one level, so their ops' results add up without alignment
    ts = [low.need(node.inputs[k], 1) for k in enc]
    lv = min(t.level for t in ts)
    ts = [low.to_level(t, lv) for t in ts]
    lay = Layout.compact(out_shape, low.prog.params.slots)
    parts = []
    for n, (k, t) in enumerate(zip(enc, ts)):
        numbered = [_numbered(v.type.shape) if i == k else np.zeros(v.type.shape) for i, v in enumerate(node.inputs)]
        rows, cols = _gather(_run(node, *numbered))
        parts.append(_sparse_op(low, node, t, rows, cols, np.ones(len(rows)), out_shape,
                                bias if n == 0 else None, lay))
    cts = list(parts[0].cts)
    for p in parts[1:]:
        cts = [low.add(a, b) for a, b in zip(cts, p.cts)]
    head = parts[0]
    return Tensor(cts, head.layout, head.level, head.scale, head.alpha, None, False)


@lowers("ReduceSum")
def _lower_reducesum(low: Lowering, node: Node) -> Tensor:
    x = node.inputs[0]
    axes = sorted(node.attrs["axes"])
    if 0 in axes and x.type.shape[0] != 1:
        raise LoweringError(f"{low._where()}: ReduceSum over the batch axis; HE lowering packs batch 1")
    axes = [a for a in axes if x.type.shape[a] != 1]  # summing an axis of size 1 moves nothing
    out_shape = _shape(low, node.output, "result")
    if x.type.rank == 4 and axes == [2, 3]:
        # the spatial sum is the global average pool (rotate-and-sum, no level) times H*W
        t = LOWERINGS["GlobalAveragePool"](low, node)
        return replace(t, alpha=t.alpha * x.type.shape[2] * x.type.shape[3])
    t = low.tensor(x)
    if not axes:
        return low.convert(low.need(x, 1), Layout.compact(out_shape, low.prog.params.slots)) \
            if low.layout(t).shape != out_shape else t
    # output element of every input element: its coordinates with the summed axes at 0
    idx = np.indices(x.type.shape)
    keep = [i for i in range(x.type.rank) if i not in axes]
    kept_shape = [x.type.shape[i] for i in keep]
    cols = np.arange(int(np.prod(x.type.shape)))
    rows = np.ravel_multi_index([idx[i].reshape(-1) for i in keep], kept_shape) if keep else np.zeros_like(cols)
    return _sparse_op(low, node, low.need(x, 1), rows, cols, np.ones(len(cols)), out_shape)
