"""ONNX frontend: an ``onnx.ModelProto`` (or file) to a graph IR.

What it does, in order:

1. loads the file and runs ``onnx.checker`` (a malformed model is refused
   with the checker's reason and the file name).  Only regular files are read
   (a FIFO or device is refused before reading, opened without blocking), the
   model file is at most 2 GiB (protobuf's own limit) and external data files
   at most :data:`MAX_EXTERNAL_BYTES` in total, checked before reading them;
2. checks the default-domain opset is one we support (13 to 25: opsets 22-25
   changed none of the ops we lift beyond widening their type lists, which
   ``tests/test_security_files.py`` checks against the ONNX schemas);
3. fixes the input shapes: a symbolic batch dimension becomes 1 (or what
   ``input_shapes`` says), any other symbolic dimension is an error that
   tells the user to pass ``--input-shape``; a zero dimension, or a tensor of
   more than :data:`MAX_TENSOR_ELEMENTS` elements, is refused before anything
   is allocated (intermediate tensors too, from ONNX shape inference and our
   own);
4. runs ONNX shape inference on the fixed model, to cross-check our types;
5. walks the nodes in order.  A node whose inputs are all known at compile
   time (initializers, ``Constant`` outputs, ``Shape`` of a static tensor, and
   anything computed from those) is evaluated right here with
   ``onnx.reference`` - so Dirac-parameterised weights written as graph ops
   and the Shape/Gather/Concat chains torch emits for ``F.pad`` and ``view``
   fold to constants.  Every other node is *lifted* to IR ops by one lifter
   function per ONNX op type.  An op without a lifter is refused with one line
   naming the node, op, opset, and what is supported.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import FrontendError, UnsupportedError, VerificationError
from .ir import DTYPES, Graph, TensorType, Value, dtype_of

MIN_OPSET, MAX_OPSET = 13, 25

#: protobuf cannot parse a message over 2 GiB: a larger .onnx keeps its weights as external data
MAX_MODEL_BYTES = 2**31
#: all external data files of one model together
MAX_EXTERNAL_BYTES = 4 * 2**30
#: elements of any one tensor (input, constant or intermediate): 2^27 is 1 GiB as float64 and far
#: beyond what a CNN under HE can hold (a 224x224 ResNet-50's largest tensor has 0.8 M)
MAX_TENSOR_ELEMENTS = 2**27

_ONNX_TO_DTYPE = {
    onnx.TensorProto.FLOAT: "f32", onnx.TensorProto.DOUBLE: "f64", onnx.TensorProto.FLOAT16: "f16",
    onnx.TensorProto.INT64: "i64", onnx.TensorProto.INT32: "i32", onnx.TensorProto.INT16: "i16",
    onnx.TensorProto.INT8: "i8", onnx.TensorProto.UINT8: "u8", onnx.TensorProto.BOOL: "bool",
}

# ops that must never be evaluated at compile time even with known inputs
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}


# --------------------------------------------------------------------------- context

@dataclass
class _Ctx:
    graph: Graph
    opset: int
    known: dict[str, np.ndarray] = field(default_factory=dict)  # compile-time tensors
    values: dict[str, Value] = field(default_factory=dict)  # run-time IR values
    node: onnx.NodeProto | None = None

    # ---- naming the current node in errors
    @property
    def where(self) -> str:
        n = self.node
        return f"node {n.name or n.output[0]!r} ({n.op_type}, opset {self.opset})"

    def fail(self, msg: str) -> FrontendError:
        return UnsupportedError(f"{self.where}: {msg}")

    # ---- operands
    def has(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def is_known(self, name: str) -> bool:
        return name in self.known

    def const(self, i: int, what: str) -> np.ndarray:
        """Input ``i`` as a compile-time array (error if it is a run-time value)."""
        name = self.node.input[i]
        if name not in self.known:
            raise self.fail(f"{what} (input {i}, {name!r}) must be known at compile time")
        return self.known[name]

    def value(self, i: int) -> Value:
        """Input ``i`` as an IR value (constants are materialised once)."""
        name = self.node.input[i]
        if name in self.values:
            return self.values[name]
        if name in self.known:
            arr = self.known[name]
            try:
                dtype_of(arr)
            except TypeError:
                raise self.fail(f"input {name!r} has unsupported dtype {arr.dtype}") from None
            problem = _shape_problem(f"constant {name!r}", arr.shape, str(arr.dtype))
            if problem:
                raise FrontendError(f"{self.where}: {problem}")
            v = self.graph.add_constant(arr, name)
            self.values[name] = v
            return v
        raise FrontendError(f"{self.where}: input {name!r} is not defined by any earlier node")

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    # ---- results
    def emit(self, op: str, inputs: Sequence[Value], attrs: Mapping | None = None, out: int | None = 0,
             suffix: str = "") -> Value:
        """Emit one IR node; if ``out`` is an index, its result is bound to
        that ONNX output name."""
        n = self.node
        names = None
        if out is not None:
            target = n.output[out]
            names = [target if target not in self.graph._names else self.graph.fresh_name(target)]
        else:
            names = [self.graph.fresh_name((n.output[0] or n.op_type) + suffix)]
        try:
            node = self.graph.add_node(op, list(inputs), attrs, out_names=names, name=n.name)
        except VerificationError as e:
            raise FrontendError(f"{self.where}: {str(e).split(': ', 1)[-1]}") from None
        problem = _shape_problem(f"output {names[0]!r}", node.output.type.shape, node.output.type.dtype)
        if problem:
            raise FrontendError(f"{self.where}: {problem}")
        if out is not None:
            self.values[n.output[out]] = node.output
        return node.output

    def bind(self, out: int, v: Value) -> None:
        self.values[self.node.output[out]] = v

    def no_extra_outputs(self, keep: int, used: set[str]) -> None:
        for name in self.node.output[keep:]:
            if name and name in used:
                raise self.fail(f"output {name!r} is used but only the first {keep} output(s) are supported")


def _fmt_bytes(n: int) -> str:
    for unit, k in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _size_problem(what: str, shape: Sequence[int], dtype: str = "f32") -> str | None:
    """Why a tensor of ``shape`` is too large to compile (more than MAX_TENSOR_ELEMENTS elements),
    or None.  Python integers only: nothing is allocated."""
    shape = [int(d) for d in shape]
    n = math.prod(shape)
    if n <= MAX_TENSOR_ELEMENTS:
        return None
    itemsize = np.dtype(DTYPES[dtype]).itemsize if dtype in DTYPES else 4
    return (f"{what} has shape {shape}: {n} elements ({_fmt_bytes(n * itemsize)} as {dtype}), over the limit of "
            f"{MAX_TENSOR_ELEMENTS} elements per tensor (far beyond what a program under HE can hold)")


def _shape_problem(what: str, shape: Sequence[int], dtype: str = "f32") -> str | None:
    """Why a run-time tensor (or a constant it is computed with) of ``shape`` cannot be compiled:
    a zero dimension (an empty tensor) or too many elements; None if it can."""
    if any(int(d) == 0 for d in shape):
        return (f"{what} has a zero dimension (shape {[int(d) for d in shape]}): an empty tensor cannot be "
                f"encrypted or computed on; fix the model")
    return _size_problem(what, shape, dtype)


def _onnx_type_name(code) -> str:
    try:
        return onnx.TensorProto.DataType.Name(int(code))
    except (ValueError, TypeError):
        return f"unknown type {code!r}"


# --------------------------------------------------------------------------- lifters

LIFTERS: dict[str, Callable[[_Ctx], None]] = {}


def lifter(*op_types: str):
    def deco(fn):
        for t in op_types:
            LIFTERS[t] = fn
        return fn
    return deco


def _spatial_pads(ctx: _Ctx, in_hw: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> list[int]:
    auto = ctx.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        pads = list(ctx.attr("pads", [0] * (2 * len(in_hw))))
        return pads
    if auto == "VALID":
        return [0] * (2 * len(in_hw))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        lo, hi = [], []
        for size, k, s, d in zip(in_hw, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            lo.append(small if auto == "SAME_UPPER" else big)
            hi.append(big if auto == "SAME_UPPER" else small)
        return lo + hi
    raise ctx.fail(f"auto_pad={auto!r} is not supported")


@lifter("Conv")
def _lift_conv(ctx: _Ctx) -> None:
    x = ctx.value(0)
    if x.type.rank != 4:
        raise ctx.fail(f"only 2-D convolutions (4-D NCHW input) are supported, input is {x.type}")
    w = ctx.value(1)
    if w.type.rank != 4:
        raise ctx.fail(f"weight must be 4-D, got {w.type}")
    k = list(ctx.attr("kernel_shape", w.type.shape[2:]))
    if tuple(k) != w.type.shape[2:]:
        raise ctx.fail(f"kernel_shape {k} disagrees with the weight shape {list(w.type.shape)}")
    strides = list(ctx.attr("strides", [1, 1]))
    dil = list(ctx.attr("dilations", [1, 1]))
    pads = _spatial_pads(ctx, x.type.shape[2:], k, strides, dil)
    ins = [x, w] + ([ctx.value(2)] if ctx.has(2) else [])
    ctx.emit("Conv", ins, {"strides": strides, "pads": pads, "dilations": dil, "group": ctx.attr("group", 1)})


@lifter("BatchNormalization")
def _lift_bn(ctx: _Ctx) -> None:
    if ctx.attr("training_mode", 0):
        raise ctx.fail("training_mode=1 is not supported (export the model in eval mode)")
    ins = [ctx.value(i) for i in range(5)]
    ctx.emit("BatchNormalization", ins, {"epsilon": ctx.attr("epsilon", 1e-5)})


@lifter("Relu", "Identity")
def _lift_unary(ctx: _Ctx) -> None:
    ctx.emit(ctx.node.op_type, [ctx.value(0)])


@lifter("Dropout")
def _lift_dropout(ctx: _Ctx) -> None:
    if ctx.has(2) and bool(np.asarray(ctx.const(2, "training_mode"))):
        raise ctx.fail("training_mode=True is not supported (export the model in eval mode)")
    ctx.emit("Dropout", [ctx.value(0)])


@lifter("Clip")
def _lift_clip(ctx: _Ctx) -> None:
    lo = float(ctx.const(1, "min")) if ctx.has(1) else -np.inf
    hi = float(ctx.const(2, "max")) if ctx.has(2) else np.inf
    ctx.emit("Clip", [ctx.value(0)], {"min": lo, "max": hi})


@lifter("Add", "Sub", "Mul", "Div")
def _lift_binary(ctx: _Ctx) -> None:
    a, b = ctx.value(0), ctx.value(1)
    ctx.emit(ctx.node.op_type, [a, b])


@lifter("Pow")
def _lift_pow(ctx: _Ctx) -> None:
    a = ctx.value(0)
    name = ctx.node.input[1]
    if name in ctx.known and ctx.known[name].dtype != a.type.np_dtype:
        # ONNX allows an exponent of another type; the IR wants one dtype
        b = ctx.graph.add_constant(ctx.known[name].astype(a.type.np_dtype), name)
    else:
        b = ctx.value(1)
    ctx.emit("Pow", [a, b])


@lifter("Sum")
def _lift_sum(ctx: _Ctx) -> None:
    n = len(ctx.node.input)
    if n == 1:
        ctx.emit("Identity", [ctx.value(0)])
        return
    acc = ctx.value(0)
    for i in range(1, n):
        acc = ctx.emit("Add", [acc, ctx.value(i)], out=0 if i == n - 1 else None, suffix=f".sum{i}")


@lifter("MatMul")
def _lift_matmul(ctx: _Ctx) -> None:
    ctx.emit("MatMul", [ctx.value(0), ctx.value(1)])


@lifter("Gemm")
def _lift_gemm(ctx: _Ctx) -> None:
    attrs = {"alpha": ctx.attr("alpha", 1.0), "beta": ctx.attr("beta", 1.0),
             "transA": ctx.attr("transA", 0), "transB": ctx.attr("transB", 0)}
    c = ctx.value(2) if ctx.has(2) else None
    if c is None or c.is_constant:
        ctx.emit("Gemm", [ctx.value(0), ctx.value(1)] + ([c] if c is not None else []), attrs)
        return
    # a bias computed at run time: the product, then an Add of beta * C (in the product's shape)
    y = ctx.emit("Gemm", [ctx.value(0), ctx.value(1)], attrs, out=None, suffix=".product")
    if tuple(c.type.shape) != tuple(y.type.shape):
        if c.type.size != y.type.size:
            raise ctx.fail(f"a run-time C of shape {list(c.type.shape)} broadcast to {list(y.type.shape)} is not "
                           f"supported (only a C with the result's elements)")
        c = ctx.emit("Reshape", [c], {"shape": list(y.type.shape)}, out=None, suffix=".c")
    if attrs["beta"] != 1.0:
        k = ctx.graph.add_constant(np.asarray(attrs["beta"], np.float32), ctx.node.output[0] + ".beta")
        c = ctx.emit("Mul", [c, k], out=None, suffix=".beta_c")
    ctx.emit("Add", [y, c])


@lifter("Flatten")
def _lift_flatten(ctx: _Ctx) -> None:
    x = ctx.value(0)
    axis = ctx.attr("axis", 1)
    if axis < 0:
        axis += x.type.rank
    ctx.emit("Flatten", [x], {"axis": axis})


def _reshape_to(ctx: _Ctx, x: Value, shape: Sequence[int]) -> None:
    ctx.emit("Reshape", [x], {"shape": [int(d) for d in shape]})


@lifter("Reshape")
def _lift_reshape(ctx: _Ctx) -> None:
    x = ctx.value(0)
    target = [int(d) for d in ctx.const(1, "shape")]
    allowzero = ctx.attr("allowzero", 0)
    out = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            if i >= x.type.rank:
                raise ctx.fail(f"shape {target} copies dim {i} that the input {x.type} does not have")
            d = x.type.shape[i]
        out.append(d)
    if out.count(-1) > 1:
        raise ctx.fail(f"shape {target} has more than one -1")
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        if known == 0 or x.type.size % known:
            raise ctx.fail(f"cannot reshape {x.type} to {target}")
        out[out.index(-1)] = x.type.size // known
    _reshape_to(ctx, x, out)


def _axes(ctx: _Ctx, rank: int, input_index: int, required: bool = True) -> list[int] | None:
    axes = ctx.attr("axes")
    if axes is None and ctx.has(input_index):
        axes = [int(a) for a in ctx.const(input_index, "axes")]
    if axes is None:
        if required:
            raise ctx.fail("axes are required")
        return None
    return sorted(a + rank if a < 0 else a for a in axes)


@lifter("Squeeze")
def _lift_squeeze(ctx: _Ctx) -> None:
    x = ctx.value(0)
    axes = _axes(ctx, x.type.rank, 1, required=False)
    if axes is None:
        axes = [i for i, d in enumerate(x.type.shape) if d == 1]
    for a in axes:
        if x.type.shape[a] != 1:
            raise ctx.fail(f"cannot squeeze axis {a} of size {x.type.shape[a]}")
    _reshape_to(ctx, x, [d for i, d in enumerate(x.type.shape) if i not in axes])


@lifter("Unsqueeze")
def _lift_unsqueeze(ctx: _Ctx) -> None:
    x = ctx.value(0)
    raw = ctx.attr("axes")
    if raw is None:
        raw = [int(a) for a in ctx.const(1, "axes")]
    out_rank = x.type.rank + len(raw)
    axes = sorted(a + out_rank if a < 0 else a for a in raw)
    shape = list(x.type.shape)
    for a in axes:
        shape.insert(a, 1)
    _reshape_to(ctx, x, shape)


@lifter("Transpose")
def _lift_transpose(ctx: _Ctx) -> None:
    x = ctx.value(0)
    perm = ctx.attr("perm", list(range(x.type.rank))[::-1])
    ctx.emit("Transpose", [x], {"perm": list(perm)})


@lifter("Pad")
def _lift_pad(ctx: _Ctx) -> None:
    x = ctx.value(0)
    mode = ctx.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise ctx.fail(f"mode={mode!r} is not supported (only 'constant')")
    r = x.type.rank
    pads = [int(p) for p in ctx.const(1, "pads")]
    value = float(np.asarray(ctx.const(2, "constant_value")).reshape(-1)[0]) if ctx.has(2) else 0.0
    if ctx.has(3):  # opset 18+: axes
        axes = [int(a) + r if a < 0 else int(a) for a in ctx.const(3, "axes")]
        full = [0] * (2 * r)
        for j, a in enumerate(axes):
            full[a], full[a + r] = pads[j], pads[j + len(axes)]
        pads = full
    if len(pads) != 2 * r:
        raise ctx.fail(f"pads has {len(pads)} values, input rank {r} needs {2 * r}")
    if min(pads) < 0:
        raise ctx.fail(f"negative pads (cropping) {pads} are not supported")
    ctx.emit("Pad", [x], {"pads": pads, "value": value})


def _pool_attrs(ctx: _Ctx, x: Value) -> dict:
    if x.type.rank != 4:
        raise ctx.fail(f"only 2-D pooling (4-D NCHW input) is supported, input is {x.type}")
    k = list(ctx.attr("kernel_shape"))
    s = list(ctx.attr("strides", [1, 1]))
    d = list(ctx.attr("dilations", [1, 1]))
    if d != [1, 1]:
        raise ctx.fail(f"dilations={d} is not supported for pooling")
    if ctx.attr("storage_order", 0):
        raise ctx.fail("storage_order=1 is not supported")
    pads = _spatial_pads(ctx, x.type.shape[2:], k, s, d)
    return {"kernel_shape": k, "strides": s, "pads": pads, "ceil_mode": ctx.attr("ceil_mode", 0)}


@lifter("MaxPool")
def _lift_maxpool(ctx: _Ctx) -> None:
    x = ctx.value(0)
    ctx.emit("MaxPool", [x], _pool_attrs(ctx, x))


@lifter("AveragePool")
def _lift_avgpool(ctx: _Ctx) -> None:
    x = ctx.value(0)
    a = _pool_attrs(ctx, x)
    a["count_include_pad"] = ctx.attr("count_include_pad", 0)
    ctx.emit("AveragePool", [x], a)


@lifter("GlobalAveragePool")
def _lift_gap(ctx: _Ctx) -> None:
    ctx.emit("GlobalAveragePool", [ctx.value(0)])


@lifter("Concat")
def _lift_concat(ctx: _Ctx) -> None:
    ins = [ctx.value(i) for i in range(len(ctx.node.input))]
    axis = ctx.attr("axis")
    if axis < 0:
        axis += ins[0].type.rank
    ctx.emit("Concat", ins, {"axis": axis})


@lifter("ReduceSum")
def _lift_reducesum(ctx: _Ctx) -> None:
    x = ctx.value(0)
    axes = _axes(ctx, x.type.rank, 1, required=False)
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            ctx.emit("Identity", [x])
            return
        axes = list(range(x.type.rank))
    ctx.emit("ReduceSum", [x], {"axes": axes, "keepdims": ctx.attr("keepdims", 1)})


@lifter("ReduceMean")
def _lift_reducemean(ctx: _Ctx) -> None:
    """torch.onnx's dynamo exporter writes AdaptiveAvgPool2d(1) / x.mean((2, 3)) as a ReduceMean over
    the spatial axes: that is a GlobalAveragePool (plus a Reshape when keepdims=0); a mean over
    other axes is a ReduceSum divided by the count."""
    x = ctx.value(0)
    axes = _axes(ctx, x.type.rank, 1, required=False)
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            ctx.emit("Identity", [x])
            return
        axes = list(range(x.type.rank))
    if x.type.rank != 4 or axes != [2, 3]:
        # any other mean: the sum over the axes, divided by their size (a scalar: no level)
        n = int(np.prod([x.type.shape[a] for a in axes]))
        s = ctx.emit("ReduceSum", [x], {"axes": axes, "keepdims": ctx.attr("keepdims", 1)}, out=None, suffix=".sum")
        ctx.emit("Div", [s, ctx.graph.add_constant(np.asarray(n, np.float32), ctx.node.output[0] + ".count")])
        return
    if ctx.attr("keepdims", 1):
        ctx.emit("GlobalAveragePool", [x])
        return
    gap = ctx.emit("GlobalAveragePool", [x], out=None, suffix=".gap")
    _reshape_to(ctx, gap, list(x.type.shape[:2]))


@lifter("Cast")
def _lift_cast(ctx: _Ctx) -> None:
    x = ctx.value(0)
    to = _ONNX_TO_DTYPE.get(ctx.attr("to"))
    if to != x.type.dtype:
        # our dtype name when the IR has the type (as the tensor is shown), else ONNX's name: never a number
        raise ctx.fail(f"casting a run-time tensor {x.type} to {to or _onnx_type_name(ctx.attr('to'))} is not "
                       f"supported")
    ctx.emit("Identity", [x])


# --------------------------------------------------------------------------- driver

def _read_regular(path: str, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes.  Opened without
    blocking (a FIFO would wait for a writer forever) and checked with fstat before any read (a
    device such as /dev/zero never ends)."""
    what = path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FrontendError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise FrontendError(f"{what}: is a directory, not an ONNX model") from None
    except OSError as e:
        raise FrontendError(f"{what}: cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FrontendError(f"{what}: is a directory, not an ONNX model")
        if not stat.S_ISREG(st.st_mode):
            raise FrontendError(f"{what}: not a regular file (FIFO, device or socket); give the model file itself")
        if st.st_size > limit:
            raise FrontendError(f"{what}: the file is {st.st_size} bytes, over the {limit}-byte limit")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 24, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise FrontendError(f"{what}: the file grew past the {limit}-byte limit while being read")
        return b"".join(chunks)
    except OSError as e:
        raise FrontendError(f"{what}: cannot read: {e.strerror or e}") from None
    except MemoryError:
        raise FrontendError(f"{what}: not enough memory to read it") from None
    finally:
        os.close(fd)


def _external_data(model: onnx.ModelProto, path: str) -> None:
    """Check, then load, the external data files of ``model`` (stored next to ``path``): each must be
    a regular file inside the model's directory, and together at most MAX_EXTERNAL_BYTES.  onnx
    checks offsets and lengths against the file itself when it reads."""
    from onnx import external_data_helper as edh

    base = os.path.dirname(os.path.abspath(path))
    tensors = [t for t in edh._get_all_tensors(model) if edh.uses_external_data(t)]
    if not tensors:
        return
    total = 0
    sizes: dict[str, int] = {}
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"{path}: tensor {t.name!r}: external data {loc!r}"
        if not loc or os.path.isabs(loc) or ".." in loc.replace("\\", "/").split("/"):
            raise FrontendError(f"{where}: the location must be a file name relative to the model's directory")
        full = os.path.join(base, loc)
        if full not in sizes:
            try:
                st = os.stat(full)
            except FileNotFoundError:
                raise FrontendError(f"{where}: no such file {full}") from None
            except OSError as e:
                raise FrontendError(f"{where}: cannot access {full}: {e.strerror or e}") from None
            if not stat.S_ISREG(st.st_mode):
                raise FrontendError(f"{where}: {full} is not a regular file (FIFO, device or socket)")
            sizes[full] = st.st_size
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") not in (None, "") else sizes[full] - offset
        except ValueError:
            raise FrontendError(f"{where}: offset/length are not integers") from None
        if offset < 0 or length < 0 or offset + length > sizes[full]:
            raise FrontendError(f"{where}: offset {offset} and length {length} are outside the {sizes[full]}-byte "
                                f"file {full}")
        total += length
        if total > MAX_EXTERNAL_BYTES:
            raise FrontendError(f"{where}: external data of {total} bytes so far, over the {MAX_EXTERNAL_BYTES}-"
                                f"byte limit (in {full})")
    try:
        edh.load_external_data_for_model(model, base)
    except MemoryError:
        raise FrontendError(f"{path}: not enough memory to load its external data ({total} bytes)") from None
    except Exception as e:  # noqa: BLE001 - onnx raises ValueError/OSError/its own checker errors
        msg = " ".join(str(e).split())
        raise FrontendError(f"{path}: cannot load its external data ({type(e).__name__}: {msg[:200]})") from None


def _load(model_or_path) -> tuple[onnx.ModelProto, str]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, "<model>"
    path = os.fspath(model_or_path)
    data = _read_regular(path, MAX_MODEL_BYTES)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:
        raise FrontendError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    del data
    _external_data(model, path)
    return model, path


def _opset(model: onnx.ModelProto, src: str) -> int:
    ver = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            ver = imp.version
    if ver is None:
        raise UnsupportedError(f"{src}: the model imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= ver <= MAX_OPSET:
        raise UnsupportedError(f"{src}: opset {ver} is not supported (supported: {MIN_OPSET} to {MAX_OPSET}); "
                               f"re-export with opset_version={min(max(ver, MIN_OPSET), MAX_OPSET)}")
    return ver


def _fixed_input_types(model: onnx.ModelProto, src: str,
                       input_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, TensorType]:
    inits = {i.name for i in model.graph.initializer}
    given = dict(input_shapes or {})
    types: dict[str, TensorType] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise UnsupportedError(f"{src}: input {inp.name!r} is not a tensor")
        dtype = _ONNX_TO_DTYPE.get(tt.elem_type)
        if dtype is None or not dtype.startswith("f"):
            raise UnsupportedError(f"{src}: input {inp.name!r} has element type "
                                   f"{onnx.TensorProto.DataType.Name(tt.elem_type)}; only float inputs can be encrypted")
        if inp.name in given:
            shape = tuple(int(d) for d in given.pop(inp.name))
            for i, d in enumerate(shape):
                if d <= 0:
                    raise FrontendError(f"{src}: input {inp.name!r}: --input-shape dim {i} is {d}; dimensions must be "
                                        f"positive")
            if tt.HasField("shape"):
                dims = tt.shape.dim
                if len(dims) != len(shape):
                    raise FrontendError(f"{src}: --input-shape for {inp.name!r} has rank {len(shape)}, "
                                        f"the model says rank {len(dims)}")
                for i, (d, s) in enumerate(zip(dims, shape)):
                    if d.HasField("dim_value") and d.dim_value != s:
                        raise FrontendError(f"{src}: --input-shape for {inp.name!r} dim {i} is {s}, "
                                            f"the model fixes it to {d.dim_value}")
        else:
            if not tt.HasField("shape"):
                raise FrontendError(f"{src}: input {inp.name!r} has no shape; give --input-shape {inp.name}=N,C,H,W")
            shape = []
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value <= 0:
                    raise FrontendError(f"{src}: input {inp.name!r} dim {i} is {d.dim_value}: a model input with a "
                                        f"zero (empty) dimension cannot be compiled; fix the model's input shape")
                if d.HasField("dim_value"):
                    shape.append(d.dim_value)
                elif i == 0:
                    shape.append(1)  # symbolic batch: we compile for one image
                else:
                    sym = d.dim_param or "?"
                    raise FrontendError(f"{src}: input {inp.name!r} dim {i} is dynamic ({sym!r}); HE programs "
                                        f"need static shapes: give --input-shape {inp.name}=" +
                                        ",".join(str(x.dim_value or (1 if j == 0 else 'N'))
                                                 for j, x in enumerate(tt.shape.dim)))
            shape = tuple(shape)
        problem = _shape_problem(f"input {inp.name!r}", shape, dtype)
        if problem:
            raise FrontendError(f"{src}: {problem}")
        types[inp.name] = TensorType(shape, dtype)
    if given:
        raise FrontendError(f"{src}: --input-shape names unknown input(s) {sorted(given)}; model inputs: {sorted(types)}")
    if not types:
        raise FrontendError(f"{src}: the model has no run-time inputs")
    return types


def _with_fixed_inputs(model: onnx.ModelProto, types: Mapping[str, TensorType]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        if inp.name in types:
            dims = inp.type.tensor_type.shape.dim
            del dims[:]
            for d in types[inp.name].shape:
                dims.add().dim_value = d
    # infer from the inputs alone: strict inference refuses declared shapes that disagree with its own,
    # and ONNX's own are wrong for some ceil_mode pooling (onnx/onnx#5711) where the declared ones are right
    del m.graph.value_info[:]
    for out in m.graph.output:
        out.type.tensor_type.ClearField("shape")
    return m


def _inferred_types(model: onnx.ModelProto, src: str) -> dict[str, TensorType]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise FrontendError(f"{src}: ONNX shape inference failed: {str(e).strip().splitlines()[-1][:300]}") from None
    out: dict[str, TensorType] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or tt.elem_type not in _ONNX_TO_DTYPE:
            continue
        dims = tt.shape.dim
        # a negative size (a kernel larger than its padded input) is left to the lifter, which names the node
        if all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
            out[vi.name] = TensorType(tuple(d.dim_value for d in dims), _ONNX_TO_DTYPE[tt.elem_type])
    return out


def _evaluate(ctx: _Ctx, node: onnx.NodeProto) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    feeds = {}
    for name in node.input:
        if name:
            # only for Shape/Size: a zero-strided view of the right shape, so nothing is allocated
            feeds[name] = ctx.known[name] if name in ctx.known else \
                np.broadcast_to(np.zeros((), ctx.values[name].type.np_dtype), ctx.values[name].type.shape)
    try:
        return ReferenceEvaluator(node, opsets={"": ctx.opset}).run(None, feeds)
    except Exception as e:
        raise FrontendError(f"{ctx.where}: failed to evaluate at compile time: "
                            f"{type(e).__name__}: {str(e).strip()[:300]}") from None


def load_onnx(model_or_path, input_shapes: Mapping[str, Sequence[int]] | None = None,
              name: str | None = None) -> Graph:
    """Import an ONNX model (path or ModelProto) as a verified graph IR."""
    model, src = _load(model_or_path)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        # the checker's message spans lines (the node is on the 2nd): keep it all, on one line
        msg = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
        raise FrontendError(f"{src}: invalid ONNX model: {(msg or type(e).__name__)[:300]}") from None
    opset = _opset(model, src)
    in_types = _fixed_input_types(model, src, input_shapes)
    fixed = _with_fixed_inputs(model, in_types)
    onnx_types = _inferred_types(fixed, src)

    gname = name or model.graph.name or "main"
    g = Graph(gname)
    ctx = _Ctx(g, opset)
    for init in model.graph.initializer:
        # before numpy_helper allocates it; a zero dimension is refused only where the constant is used
        # at run time (empty compile-time tensors, such as the axes of a Pad, are fine)
        problem = _size_problem(f"initializer {init.name!r}", init.dims, _ONNX_TO_DTYPE.get(init.data_type, "f32"))
        if problem:
            raise FrontendError(f"{src}: {problem}")
        try:
            ctx.known[init.name] = numpy_helper.to_array(init)
        except MemoryError:
            raise FrontendError(f"{src}: initializer {init.name!r}: not enough memory for shape {list(init.dims)}") \
                from None
        except Exception as e:  # noqa: BLE001 - data that does not match its dims/type
            raise FrontendError(f"{src}: initializer {init.name!r} is unreadable ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]})") from None
    for iname, t in in_types.items():
        ctx.values[iname] = g.add_input(iname, t)

    used: set[str] = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        ctx.node = node
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedError(f"{ctx.where}: custom domain {node.domain!r} is not supported")
        for oname in node.output:  # before evaluating or lifting: nothing too large is ever allocated
            t = onnx_types.get(oname)
            problem = t is not None and _size_problem(f"output {oname!r}", t.shape, t.dtype)
            if problem:
                raise FrontendError(f"{ctx.where}: {problem}")
        ins = [i for i in node.input if i]
        all_known = all(i in ctx.known for i in ins)
        static_shape_query = node.op_type in ("Shape", "Size") and ins and ins[0] in ctx.values
        if (all_known or static_shape_query) and node.op_type not in _NONDETERMINISTIC:
            for oname, arr in zip(node.output, _evaluate(ctx, node)):
                if oname:
                    ctx.known[oname] = np.asarray(arr)
            continue
        lift = LIFTERS.get(node.op_type)
        if lift is None:
            raise UnsupportedError(
                f"{ctx.where}: op {node.op_type} on run-time tensors is not supported; supported: "
                f"{', '.join(sorted(LIFTERS))} (any op whose inputs are known at compile time is folded)")
        lift(ctx)
        ctx.no_extra_outputs(1, used)
        for oname in node.output[:1]:
            v = ctx.values.get(oname)
            if v is not None and oname in onnx_types and onnx_types[oname] != v.type:
                if node.op_type in ("MaxPool", "AveragePool") and ctx.attr("ceil_mode", 0):
                    # ONNX shape inference keeps a ceil_mode window that starts in the right padding
                    # (onnx/onnx#5711); onnxruntime, onnx.reference and torch drop it, as we do.
                    # Shapes ONNX inferred downstream of this node are off too: stop cross-checking.
                    onnx_types = {}
                    continue
                raise FrontendError(f"{ctx.where}: output {oname!r} is {v.type} here but ONNX shape inference "
                                    f"says {onnx_types[oname]}")
    ctx.node = None
    outs = []
    for o in model.graph.output:
        if o.name in ctx.values:
            outs.append(ctx.values[o.name])
        elif o.name in ctx.known:
            raise UnsupportedError(f"{src}: output {o.name!r} does not depend on the input (it is a constant)")
        else:
            raise FrontendError(f"{src}: output {o.name!r} is not produced by any node")
    g.outputs = outs
    from .verify import verify

    verify(g, "after ONNX import")
    return g
