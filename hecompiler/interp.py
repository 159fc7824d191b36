"""Reference interpreter of the graph IR in numpy: the semantic oracle.

One method per op (``op_Conv``, ``op_Relu``, ...), in the style of
``torch.fx.Interpreter``; subclass and override a method to change or trace
one op.  Arithmetic runs in float64 and results are cast back to the value's
dtype, so the interpreter is at least as accurate as onnxruntime.

The same interpreter is the constant folder (:mod:`hecompiler.passes.fold_constants`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import InterpreterError
from .ir import Graph, Node


class Interpreter:
    def __init__(self, graph: Graph):
        self.graph = graph

    # ------------------------------------------------------------------ driving
    def run(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray,
            keep: bool = False) -> list[np.ndarray] | dict[str, np.ndarray]:
        """Run the graph.  ``feeds`` maps input names to arrays (or is a list
        in input order, or one array for a one-input graph).  Returns the
        outputs as a list, or with ``keep`` a dict of every value by name."""
        env = self._bind(feeds)
        for node in self.graph.nodes:
            args = [env[id(v)] for v in node.inputs]
            outs = self.run_node(node, args)
            for v, o in zip(node.outputs, outs):
                env[id(v)] = o
        if keep:
            return {v.name: env[id(v)] for v in self.graph.values() if id(v) in env}
        return [env[id(v)] for v in self.graph.outputs]

    def _bind(self, feeds) -> dict[int, np.ndarray]:
        g = self.graph
        if isinstance(feeds, np.ndarray):
            feeds = [feeds]
        if not isinstance(feeds, Mapping):
            feeds = list(feeds)
            if len(feeds) != len(g.inputs):
                raise InterpreterError(f"graph {g.name} takes {len(g.inputs)} inputs, got {len(feeds)}")
            feeds = {v.name: a for v, a in zip(g.inputs, feeds)}
        env: dict[int, np.ndarray] = {}
        for v in g.inputs:
            if v.name not in feeds:
                raise InterpreterError(f"missing input %{v.name} ({v.type})")
            a = np.asarray(feeds[v.name])
            if a.shape != v.type.shape:
                raise InterpreterError(f"input %{v.name}: expected shape {list(v.type.shape)}, got {list(a.shape)}")
            env[id(v)] = a.astype(v.type.np_dtype, copy=False)
        extra = set(feeds) - {v.name for v in g.inputs}
        if extra:
            raise InterpreterError(f"unknown input(s) {sorted(extra)}; graph inputs are "
                                   f"{[v.name for v in g.inputs]}")
        for v in g.constants.values():
            env[id(v)] = v.data
        return env

    def run_node(self, node: Node, args: list[np.ndarray]) -> list[np.ndarray]:
        fn = getattr(self, "op_" + node.op, None)
        if fn is None:
            raise InterpreterError(f"{node.label}: the interpreter has no rule for op {node.op}")
        out = fn(node, *args)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [np.asarray(o).astype(v.type.np_dtype, copy=False) for o, v in zip(outs, node.outputs)]

    # ------------------------------------------------------------------ ops
    def op_Conv(self, node, x, w, b=None):
        return conv2d(x, w, b, node.attrs["strides"], node.attrs["pads"], node.attrs["dilations"],
                      node.attrs["group"])

    def op_BatchNormalization(self, node, x, scale, bias, mean, var):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        inv = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + node.attrs["epsilon"])
        return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)

    def op_Relu(self, node, x):
        return np.maximum(x, 0)

    def op_Clip(self, node, x):
        return np.clip(x, node.attrs["min"], node.attrs["max"])

    def op_Identity(self, node, x):
        return x

    op_Dropout = op_Identity

    def op_Poly(self, node, x):
        return poly_eval(node.attrs["coeffs"], x.astype(np.float64))

    def op_Add(self, node, a, b):
        return a.astype(np.float64) + b

    def op_Sub(self, node, a, b):
        return a.astype(np.float64) - b

    def op_Mul(self, node, a, b):
        return a.astype(np.float64) * b

    def op_Div(self, node, a, b):
        if np.issubdtype(a.dtype, np.integer):
            return np.floor_divide(a, b)
        return a.astype(np.float64) / b

    def op_Pow(self, node, a, b):
        return np.power(a.astype(np.float64), b)

    def op_MatMul(self, node, a, b):
        return np.matmul(a.astype(np.float64), b)

    def op_Gemm(self, node, a, b, c=None):
        at = node.attrs
        a = a.T if at["transA"] else a
        b = b.T if at["transB"] else b
        y = at["alpha"] * (a.astype(np.float64) @ b)
        if c is not None:
            y = y + at["beta"] * c.astype(np.float64)
        return y

    def op_Flatten(self, node, x):
        return x.reshape(node.output.type.shape)

    def op_Reshape(self, node, x):
        return x.reshape(node.attrs["shape"])

    def op_Transpose(self, node, x):
        return np.transpose(x, node.attrs["perm"])

    def op_Pad(self, node, x):
        p = node.attrs["pads"]
        r = x.ndim
        return np.pad(x, [(p[i], p[i + r]) for i in range(r)], constant_values=node.attrs["value"])

    def op_MaxPool(self, node, x):
        return pool2d(x, node.attrs, node.output.type.shape, "max")

    def op_AveragePool(self, node, x):
        return pool2d(x, node.attrs, node.output.type.shape, "avg")

    def op_GlobalAveragePool(self, node, x):
        return x.astype(np.float64).mean(axis=tuple(range(2, x.ndim)), keepdims=True)

    def op_Concat(self, node, *xs):
        return np.concatenate(xs, axis=node.attrs["axis"])

    def op_ReduceSum(self, node, x):
        return x.astype(np.float64).sum(axis=tuple(node.attrs["axes"]), keepdims=bool(node.attrs["keepdims"]))


# --------------------------------------------------------------------------- kernels

def poly_eval(coeffs: Sequence[float], x: np.ndarray) -> np.ndarray:
    """Horner evaluation of sum_i coeffs[i] x^i."""
    y = np.zeros_like(x, dtype=np.float64)
    for c in reversed(coeffs):
        y = y * x + c
    return y


def conv2d(x, w, b, strides, pads, dilations, group):
    """NCHW convolution in float64 (im2col through a strided view)."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    eh, ew = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
    win = sliding_window_view(xp, (eh, ew), axis=(2, 3))
    win = win[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]  # N C OH OW kh kw
    oh, ow = win.shape[2], win.shape[3]
    win = win.reshape(n, group, cg, oh, ow, kh, kw)
    wg = w.reshape(group, m // group, cg, kh, kw)
    y = np.einsum("ngchwij,gmcij->ngmhw", win, wg, optimize=True).reshape(n, m, oh, ow)
    if b is not None:
        y = y + b.astype(np.float64).reshape(1, m, 1, 1)
    return y


def pool2d(x, attrs, out_shape, kind):
    """Max/average pooling with explicit pads and ceil_mode (ONNX semantics)."""
    k, s, p = attrs["kernel_shape"], attrs["strides"], attrs["pads"]
    n, c, h, w = x.shape
    oh, ow = out_shape[2], out_shape[3]
    # extend the right/bottom edge so that every output window fits (ceil_mode)
    hi_h = max(p[2], (oh - 1) * s[0] + k[0] - h - p[0])
    hi_w = max(p[3], (ow - 1) * s[1] + k[1] - w - p[1])
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p[0], hi_h), (p[1], hi_w)), constant_values=fill)
    win = sliding_window_view(xp, tuple(k), axis=(2, 3))[:, :, ::s[0], ::s[1]][:, :, :oh, :ow]
    if kind == "max":
        return win.max(axis=(-2, -1))
    total = win.sum(axis=(-2, -1))
    # divisor: real elements, plus explicit pads when count_include_pad
    inside = np.zeros((h + p[0] + hi_h, w + p[1] + hi_w))
    if attrs.get("count_include_pad", 0):
        inside[: p[0] + h + p[2], : p[1] + w + p[3]] = 1
    else:
        inside[p[0]: p[0] + h, p[1]: p[1] + w] = 1
    cnt = sliding_window_view(inside, tuple(k))[::s[0], ::s[1]][:oh, :ow].sum(axis=(-2, -1))
    return total / cnt


def run(graph: Graph, feeds, keep: bool = False):
    """Shorthand for ``Interpreter(graph).run(feeds, keep)``."""
    return Interpreter(graph).run(feeds, keep)
