"""The op set of the graph IR: attribute schemas and shape/type rules.

Op names and attribute names follow ONNX, so a user who knows ONNX can read
the IR, and the exporter is a near one-to-one mapping.  The IR is narrower
than ONNX: every attribute is static (a Reshape carries its target shape as
an attribute, a Pad its amounts), tensors are 4-D NCHW for image ops, and
compile-time computations are already folded away by the frontend.

Each op is an :class:`OpDef`; :data:`OPS` maps names to them.  Semantics live
in :mod:`hecompiler.interp` (the reference interpreter), one method per op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import VerificationError
from .ir import TensorType

REQUIRED = object()

#: attribute kinds and the python types they hold
_KINDS = {
    "int": int,
    "float": float,
    "str": str,
    "ints": tuple,
    "floats": tuple,
}


@dataclass(frozen=True)
class OpDef:
    name: str
    min_inputs: int
    max_inputs: int  # -1: variadic
    attrs: Mapping[str, tuple[str, Any]]  # name -> (kind, default or REQUIRED)
    infer: Callable[[list[TensorType], dict, list], list[TensorType]]
    summary: str = ""
    elementwise: bool = False
    linear: bool = False  # linear in its first input (other inputs constant)
    tags: frozenset = field(default_factory=frozenset)


OPS: dict[str, OpDef] = {}


def _op(name: str, n_in: tuple[int, int], attrs: Mapping[str, tuple[str, Any]] | None = None,
        summary: str = "", **kw):
    def deco(fn):
        OPS[name] = OpDef(name, n_in[0], n_in[1], dict(attrs or {}), fn, summary, **kw)
        return fn
    return deco


class _Fail(Exception):
    pass


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise _Fail(msg)


# --------------------------------------------------------------------------- helpers

def broadcast_shapes(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(tuple(a), tuple(b)))
    except ValueError:
        raise _Fail(f"shapes {list(a)} and {list(b)} do not broadcast") from None


def conv_out_dim(size: int, k: int, stride: int, pad_lo: int, pad_hi: int, dilation: int = 1,
                 ceil_mode: int = 0) -> int:
    eff = dilation * (k - 1) + 1
    span = size + pad_lo + pad_hi - eff
    _need(span >= 0, f"kernel {k} larger than padded input {size + pad_lo + pad_hi}")
    if ceil_mode:
        out = -(-span // stride) + 1
        # ONNX/torch: the last window must start inside the input or left padding
        if (out - 1) * stride >= size + pad_lo:
            out -= 1
        return out
    return span // stride + 1


def _same_dtype(types: Sequence[TensorType]) -> str:
    dts = {t.dtype for t in types}
    _need(len(dts) == 1, f"operand dtypes differ: {sorted(dts)}")
    return types[0].dtype


def _rank(t: TensorType, r: int, what: str) -> None:
    _need(t.rank == r, f"{what} must be rank {r}, got {t}")


# --------------------------------------------------------------------------- op definitions

@_op("Conv", (2, 3), {"strides": ("ints", (1, 1)), "pads": ("ints", (0, 0, 0, 0)),
                      "dilations": ("ints", (1, 1)), "group": ("int", 1)},
     "2-D convolution, NCHW, weight [M, C/group, kh, kw], optional bias [M]", linear=True)
def _conv(ts, a, consts):
    x, w = ts[0], ts[1]
    _rank(x, 4, "Conv input")
    _rank(w, 4, "Conv weight")
    _need(len(a["strides"]) == 2 and len(a["pads"]) == 4 and len(a["dilations"]) == 2,
          "strides/dilations need 2 values and pads 4")
    g = a["group"]
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    _need(g >= 1 and c % g == 0 and m % g == 0, f"group={g} must divide channels {c} and {m}")
    _need(cg == c // g, f"weight expects {cg * g} input channels, input has {c}")
    if len(ts) == 3:
        _need(ts[2].shape == (m,), f"bias must be [{m}], got {ts[2]}")
    s, p, d = a["strides"], a["pads"], a["dilations"]
    _need(min(s) >= 1 and min(d) >= 1 and min(p) >= 0, "strides/dilations must be >= 1 and pads >= 0")
    oh = conv_out_dim(h, kh, s[0], p[0], p[2], d[0])
    ow = conv_out_dim(wd, kw, s[1], p[1], p[3], d[1])
    return [TensorType((n, m, oh, ow), _same_dtype(ts))]


@_op("BatchNormalization", (5, 5), {"epsilon": ("float", 1e-5)},
     "inference batch norm: (x - mean) / sqrt(var + eps) * scale + B, per channel", linear=True)
def _bn(ts, a, consts):
    x = ts[0]
    _need(x.rank >= 2, f"BatchNormalization input must have a channel axis, got {x}")
    c = x.shape[1]
    for t, nm in zip(ts[1:], ("scale", "B", "mean", "var")):
        _need(t.shape == (c,), f"{nm} must be [{c}], got {t}")
    return [x]


def _unary(name, summary, attrs=None):
    @_op(name, (1, 1), attrs, summary, elementwise=True)
    def _f(ts, a, consts):
        return [ts[0]]
    return _f


_unary("Relu", "max(x, 0)")
_unary("Clip", "min(max(x, min), max)", {"min": ("float", -math.inf), "max": ("float", math.inf)})
_unary("Identity", "x")
_unary("Dropout", "x (inference mode)")
_unary("Poly", "sum_i coeffs[i] * x**i (a polynomial activation)", {"coeffs": ("floats", REQUIRED)})


def _binary(name, summary):
    @_op(name, (2, 2), None, summary, elementwise=True)
    def _f(ts, a, consts):
        return [TensorType(broadcast_shapes(ts[0].shape, ts[1].shape), _same_dtype(ts))]
    return _f


_binary("Add", "a + b (numpy broadcasting)")
_binary("Sub", "a - b (numpy broadcasting)")
_binary("Mul", "a * b (numpy broadcasting)")
_binary("Div", "a / b (numpy broadcasting)")
_binary("Pow", "a ** b (numpy broadcasting)")


@_op("MatMul", (2, 2), None, "numpy matmul", linear=True)
def _matmul(ts, a, consts):
    x, y = ts
    _need(x.rank >= 1 and y.rank >= 1, "MatMul operands must have rank >= 1")
    xs, ys = list(x.shape), list(y.shape)
    if len(xs) == 1:
        xs = [1] + xs
    if len(ys) == 1:
        ys = ys + [1]
    _need(xs[-1] == ys[-2], f"MatMul inner dimensions differ: {x} @ {y}")
    batch = broadcast_shapes(xs[:-2], ys[:-2])
    out = list(batch) + [xs[-2], ys[-1]]
    if x.rank == 1:
        out.pop(-2)
    if y.rank == 1:
        out.pop(-1)
    return [TensorType(tuple(out), _same_dtype(ts))]


@_op("Gemm", (2, 3), {"alpha": ("float", 1.0), "beta": ("float", 1.0), "transA": ("int", 0),
                      "transB": ("int", 0)},
     "alpha * A' @ B' + beta * C, A' = A.T if transA, B' = B.T if transB", linear=True)
def _gemm(ts, a, consts):
    _rank(ts[0], 2, "Gemm A")
    _rank(ts[1], 2, "Gemm B")
    m, k = ts[0].shape[::-1] if a["transA"] else ts[0].shape
    k2, n = ts[1].shape[::-1] if a["transB"] else ts[1].shape
    _need(k == k2, f"Gemm inner dimensions differ: {k} vs {k2}")
    if len(ts) == 3:
        broadcast_shapes(ts[2].shape, (m, n))
        _need(broadcast_shapes(ts[2].shape, (m, n)) == (m, n), f"Gemm C {ts[2]} does not broadcast to [{m},{n}]")
    return [TensorType((m, n), _same_dtype(ts))]


@_op("Flatten", (1, 1), {"axis": ("int", 1)}, "reshape to 2-D [prod(dims[:axis]), prod(dims[axis:])]", linear=True)
def _flatten(ts, a, consts):
    x = ts[0]
    ax = a["axis"]
    _need(0 <= ax <= x.rank, f"Flatten axis {ax} out of range for rank {x.rank}")
    return [TensorType((int(np.prod(x.shape[:ax], dtype=np.int64)), int(np.prod(x.shape[ax:], dtype=np.int64))), x.dtype)]


@_op("Reshape", (1, 1), {"shape": ("ints", REQUIRED)}, "reshape to a static shape", linear=True)
def _reshape(ts, a, consts):
    shape = a["shape"]
    _need(all(d >= 0 for d in shape), f"Reshape shape {list(shape)} must be fully static (no -1 or 0)")
    _need(int(np.prod(shape, dtype=np.int64)) == ts[0].size,
          f"Reshape to {list(shape)} changes the element count {ts[0].size}")
    return [TensorType(tuple(shape), ts[0].dtype)]


@_op("Transpose", (1, 1), {"perm": ("ints", REQUIRED)}, "permute axes", linear=True)
def _transpose(ts, a, consts):
    perm = a["perm"]
    _need(sorted(perm) == list(range(ts[0].rank)), f"perm {list(perm)} is not a permutation of rank {ts[0].rank}")
    return [TensorType(tuple(ts[0].shape[p] for p in perm), ts[0].dtype)]


@_op("Pad", (1, 1), {"pads": ("ints", REQUIRED), "value": ("float", 0.0)},
     "constant padding; pads = [begin_0..begin_r, end_0..end_r]", linear=True)
def _pad(ts, a, consts):
    x = ts[0]
    p = a["pads"]
    _need(len(p) == 2 * x.rank, f"pads needs {2 * x.rank} values for rank {x.rank}, got {len(p)}")
    _need(min(p) >= 0, "negative pads (cropping) are not supported")
    return [TensorType(tuple(d + p[i] + p[i + x.rank] for i, d in enumerate(x.shape)), x.dtype)]


def _pool(ts, a):
    x = ts[0]
    _rank(x, 4, "pooling input")
    k = a["kernel_shape"]
    s = a["strides"] or (1, 1)
    p = a["pads"] or (0, 0, 0, 0)
    _need(len(k) == 2 and len(s) == 2 and len(p) == 4, "kernel_shape/strides need 2 values and pads 4")
    _need(min(k) >= 1 and min(s) >= 1 and min(p) >= 0, "kernel and strides must be >= 1, pads >= 0")
    _need(p[0] < k[0] and p[1] < k[1] and p[2] < k[0] and p[3] < k[1], "pads must be smaller than the kernel")
    n, c, h, w = x.shape
    oh = conv_out_dim(h, k[0], s[0], p[0], p[2], 1, a["ceil_mode"])
    ow = conv_out_dim(w, k[1], s[1], p[1], p[3], 1, a["ceil_mode"])
    return [TensorType((n, c, oh, ow), x.dtype)]


_POOL_ATTRS = {"kernel_shape": ("ints", REQUIRED), "strides": ("ints", (1, 1)), "pads": ("ints", (0, 0, 0, 0)),
               "ceil_mode": ("int", 0)}


@_op("MaxPool", (1, 1), _POOL_ATTRS, "2-D max pooling")
def _maxpool(ts, a, consts):
    return _pool(ts, a)


@_op("AveragePool", (1, 1), {**_POOL_ATTRS, "count_include_pad": ("int", 0)}, "2-D average pooling", linear=True)
def _avgpool(ts, a, consts):
    return _pool(ts, a)


@_op("GlobalAveragePool", (1, 1), None, "mean over H and W, keeping dims", linear=True)
def _gap(ts, a, consts):
    x = ts[0]
    _need(x.rank >= 3, f"GlobalAveragePool input must be rank >= 3, got {x}")
    return [TensorType(x.shape[:2] + (1,) * (x.rank - 2), x.dtype)]


@_op("Concat", (1, -1), {"axis": ("int", REQUIRED)}, "concatenate along axis")
def _concat(ts, a, consts):
    r = ts[0].rank
    ax = a["axis"]
    _need(0 <= ax < r, f"Concat axis {ax} out of range for rank {r} (axes are stored non-negative)")
    for t in ts[1:]:
        _need(t.rank == r and all(t.shape[i] == ts[0].shape[i] for i in range(r) if i != ax),
              f"Concat operands {ts[0]} and {t} differ off axis {ax}")
    shape = list(ts[0].shape)
    shape[ax] = sum(t.shape[ax] for t in ts)
    return [TensorType(tuple(shape), _same_dtype(ts))]


@_op("ReduceSum", (1, 1), {"axes": ("ints", REQUIRED), "keepdims": ("int", 1)}, "sum over axes", linear=True)
def _reducesum(ts, a, consts):
    x = ts[0]
    axes = a["axes"]
    _need(all(0 <= ax < x.rank for ax in axes) and len(set(axes)) == len(axes),
          f"ReduceSum axes {list(axes)} invalid for rank {x.rank} (axes are stored non-negative)")
    shape = [1 if i in axes else d for i, d in enumerate(x.shape)] if a["keepdims"] else \
        [d for i, d in enumerate(x.shape) if i not in axes]
    return [TensorType(tuple(shape), x.dtype)]


# --------------------------------------------------------------------------- entry points

def op_def(op: str, label: str = "") -> OpDef:
    try:
        return OPS[op]
    except KeyError:
        raise VerificationError(f"{label or op}: unknown IR op {op!r}") from None


def normalize_attrs(op: str, attrs: Mapping[str, Any], label: str = "") -> dict[str, Any]:
    """Check attribute names and kinds and fill defaults (so printed IR is explicit)."""
    d = op_def(op, label)
    out: dict[str, Any] = {}
    unknown = set(attrs) - set(d.attrs)
    if unknown:
        raise VerificationError(f"{label}: {op} has no attribute(s) {sorted(unknown)}; "
                                f"known: {sorted(d.attrs) or 'none'}")
    for name, (kind, default) in d.attrs.items():
        if name in attrs:
            v = attrs[name]
            if kind in ("ints", "floats"):
                if isinstance(v, np.ndarray):
                    v = v.tolist()
                if not isinstance(v, (list, tuple)):
                    raise VerificationError(f"{label}: attribute {name} of {op} must be a list, got {v!r}")
                v = tuple(int(x) if kind == "ints" else float(x) for x in v)
            elif kind == "int":
                if isinstance(v, (float, np.floating)) and float(v) != int(v):
                    raise VerificationError(f"{label}: attribute {name} of {op} must be an int, got {v!r}")
                v = int(v)
            elif kind == "float":
                v = float(v)
            elif kind == "str" and not isinstance(v, str):
                raise VerificationError(f"{label}: attribute {name} of {op} must be a string, got {v!r}")
            out[name] = v
        elif default is REQUIRED:
            raise VerificationError(f"{label}: {op} needs attribute {name}")
        else:
            out[name] = default
    return out


def infer_types(op: str, in_types: Sequence[TensorType], attrs: Mapping[str, Any], label: str = "",
                const_inputs: Sequence[np.ndarray | None] | None = None) -> list[TensorType]:
    """Output types of ``op`` on ``in_types``; raises VerificationError naming ``label``."""
    d = op_def(op, label)
    n = len(in_types)
    if n < d.min_inputs or (d.max_inputs >= 0 and n > d.max_inputs):
        want = f"{d.min_inputs}" if d.min_inputs == d.max_inputs else \
            f"{d.min_inputs}..{'n' if d.max_inputs < 0 else d.max_inputs}"
        raise VerificationError(f"{label}: {op} takes {want} inputs, got {n}")
    try:
        return d.infer(list(in_types), dict(attrs), list(const_inputs or [None] * n))
    except _Fail as e:
        raise VerificationError(f"{label}: {op}: {e}") from None
