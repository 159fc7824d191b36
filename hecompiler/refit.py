"""Re-fit of weights after an approximating rewrite, by closed-form least squares per layer.

An architecture rewrite (``dirac``, ``shared-source``) changes the function a
network computes.  :func:`refit` brings the rewritten graph back towards the
original one on calibration data:

1. The ORIGINAL graph runs on the calibration inputs in the reference
   interpreter, keeping every intermediate value by name (the targets).
2. The REWRITTEN graph runs forward node by node on the same inputs.  Each
   *affected* Conv (its weights changed, it feeds an Add whose skip operand
   moved, or its input differs from the original because something upstream
   changed) is re-fitted when the walk reaches it, from the rewritten
   network's own activations, so errors are corrected where they arise
   instead of compounding silently; the layers after it then see the
   re-fitted output.
3. Per layer the new weights and bias solve

       min_{W, b} || im2col(a_in) [W; b] - target ||^2 + lam || W - W0 ||^2

   with ``a_in`` the layer's input in the rewritten network, ``W0`` its
   weights before the re-fit (e.g. the Dirac-folded ``W + I``) and ``lam``
   the ridge relative to the mean squared column norm (dimensionless; the
   bias is not shrunk).  Rows are positions x samples, columns
   ``C_in*kh*kw + 1``.  The ridge enters as augmented rows and the system
   is solved with ``np.linalg.lstsq``; when there are many more rows than
   columns, the rows are first compressed exactly through the Gram matrix
   (``A = U S V^T`` gives ``||A w - t||^2 = ||S V^T w - U^T t||^2 + const``),
   which gives the same solution as the full system at a fraction of the cost.

Targets, by the name of the value the layer produces (rewrites keep names:
a Conv that takes over an Add's place takes over its name):

* a Conv whose only user is an ``Add(conv, other)`` (a residual Add that
  stayed, with its skip possibly moved): target = original Add output minus
  the rewritten network's ``other``; when both Add operands are affected
  Convs (a projection block) they are solved jointly for the original Add;
* any other Conv: target = the original value of the same name (for the
  last Conv of a Dirac block that is the original pre-activation
  ``conv2(...) + skip``; for the first, the original ``conv1`` output).
* with ``head=True`` an affected Gemm (the classifier) too, for the original
  logits.

Everything runs batched: the interpreter here is the reference interpreter
with a BLAS im2col convolution and batch-size-agnostic Flatten/Reshape, so
one run covers all calibration samples (ResNet-20, 64 samples: ~4 s for the
whole re-fit on this repository's 2-core machine).
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import HecError
from .interp import Interpreter
from .ir import Graph, Node, Value

#: ops whose batch dimension is independent per sample (what the batched runs support)
_BATCH_SAFE = {"Conv", "BatchNormalization", "Relu", "Clip", "Identity", "Dropout", "Poly", "Add", "Sub", "Mul",
               "Div", "Pow", "MatMul", "Gemm", "Flatten", "Reshape", "MaxPool", "AveragePool",
               "GlobalAveragePool", "Pad", "Concat", "Transpose", "ReduceSum"}

#: compress rows through the Gram matrix when rows > this factor x columns
_COMPRESS_FACTOR = 4


# --------------------------------------------------------------------------- BLAS threads

def _openblas():
    """(get, set) of the thread count of numpy's OpenBLAS, or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln})
        for path in paths:
            lib = ctypes.CDLL(path)
            for get, set_ in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                              ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                              ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                              ("openblas_get_num_threads", "openblas_set_num_threads")):
                if hasattr(lib, get) and hasattr(lib, set_):
                    return getattr(lib, get), getattr(lib, set_)
    except OSError:
        pass
    return None


@contextlib.contextmanager
def blas_single_thread() -> Iterator[None]:
    """Run numpy's BLAS/LAPACK on one thread inside the block (best effort).

    The re-fit's products and solves are small (at most a few hundred
    columns); with OpenBLAS's threads on a busy 2-core machine one 577x577
    solve was measured to stall for 10 s instead of 0.1 s, while one thread
    runs the whole ResNet-20 re-fit in a steady ~4 s."""
    api = _openblas()
    if api is None:
        yield
        return
    get, set_ = api
    old = get()
    set_(1)
    try:
        yield
    finally:
        set_(old)


# --------------------------------------------------------------------------- im2col and batched runs

def im2col(x: np.ndarray, kernel: tuple[int, int], strides, pads, dilations) -> np.ndarray:
    """Patches of an NCHW tensor as rows: ``[N*OH*OW, C*kh*kw]``, in the column
    order of ``W.reshape(M, C*kh*kw)`` (so ``im2col(x) @ W.reshape(M, -1).T`` is
    the convolution, samples major, then output rows, then output columns)."""
    kh, kw = kernel
    n, c = x.shape[:2]
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    eh, ew = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
    win = sliding_window_view(xp, (eh, ew), axis=(2, 3))
    win = win[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]  # N C OH OW kh kw
    oh, ow = win.shape[2], win.shape[3]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)


def _conv_fast(node: Node, x, w, b) -> np.ndarray:
    """The interpreter's convolution through im2col + one matrix product (BLAS)."""
    attrs = node.attrs
    m, cg, kh, kw = w.shape
    groups = attrs["group"]
    n = x.shape[0]
    outs = []
    for gi in range(groups):
        xs = x[:, gi * cg:(gi + 1) * cg]
        ws = np.asarray(w[gi * (m // groups):(gi + 1) * (m // groups)], np.float64)
        cols = im2col(xs, (kh, kw), attrs["strides"], attrs["pads"], attrs["dilations"])
        outs.append(cols @ ws.reshape(ws.shape[0], -1).T)
    y = np.concatenate(outs, axis=1) if groups > 1 else outs[0]
    oh, ow = node.output.type.shape[2:]
    y = y.reshape(n, oh, ow, m).transpose(0, 3, 1, 2)
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape(1, m, 1, 1)
    return y


class BatchInterpreter(Interpreter):
    """The reference interpreter on a batch: inputs may have any leading
    (batch) size in place of the graph's batch of 1.  Only ops that treat
    samples independently are allowed (checked up front)."""

    def __init__(self, graph: Graph):
        super().__init__(graph)
        for node in graph.nodes:
            bad = node.op not in _BATCH_SAFE
            if node.op == "Reshape":
                bad = node.attrs["shape"][0] != 1 or node.inputs[0].type.shape[0] != 1
            elif node.op == "Flatten":
                bad = node.attrs["axis"] != 1
            elif node.op == "Transpose":
                bad = node.attrs["perm"][0] != 0
            elif node.op == "Concat":
                bad = node.attrs["axis"] in (0, -len(node.output.type.shape))
            elif node.op == "ReduceSum":
                bad = 0 in node.attrs["axes"] or not node.attrs["keepdims"]
            elif node.op == "Pad":
                bad = node.attrs["pads"][0] != 0 or node.attrs["pads"][len(node.attrs["pads"]) // 2] != 0
            elif node.op in ("MatMul", "Gemm"):
                bad = node.inputs[0].type.rank != 2 or node.attr("transA", 0) != 0 or \
                    not all(v.is_constant for v in node.inputs[1:])
            if not bad and node.op in ("Add", "Sub", "Mul", "Div", "Pow"):
                # a run-time operand must carry the batch dimension
                bad = any(not v.is_constant and (v.type.rank == 0 or v.type.shape[0] != 1) for v in node.inputs)
            if bad:
                raise HecError(f"{node.label}: the re-fit runs calibration samples as one batch and cannot "
                               f"batch this node (op {node.op}, {dict(node.attrs)})")

    def _bind(self, feeds):
        g = self.graph
        if isinstance(feeds, np.ndarray):
            feeds = {g.inputs[0].name: feeds}
        env = {}
        for v in g.inputs:
            a = np.asarray(feeds[v.name])
            if a.shape[1:] != v.type.shape[1:]:
                raise HecError(f"input %{v.name}: expected samples of shape {list(v.type.shape[1:])}, "
                               f"got {list(a.shape[1:])}")
            env[id(v)] = a.astype(v.type.np_dtype, copy=False)
        for v in g.constants.values():
            env[id(v)] = v.data
        return env

    def op_Conv(self, node, x, w, b=None):
        return _conv_fast(node, x, w, b)

    def op_Flatten(self, node, x):
        return x.reshape(x.shape[0], -1)

    def op_Reshape(self, node, x):
        return x.reshape((x.shape[0],) + tuple(node.attrs["shape"][1:]))

    def op_MaxPool(self, node, x):
        from .interp import pool2d

        return pool2d(x, node.attrs, (x.shape[0],) + node.output.type.shape[1:], "max")

    def op_AveragePool(self, node, x):
        from .interp import pool2d

        return pool2d(x, node.attrs, (x.shape[0],) + node.output.type.shape[1:], "avg")


def run_batch(graph: Graph, x: np.ndarray, keep: bool = False):
    """Run ``graph`` on a batch of samples ``x`` ([N, ...input shape without batch]);
    returns the outputs (list), or with ``keep`` every value by name."""
    with np.errstate(all="ignore"), blas_single_thread():
        return BatchInterpreter(graph).run({graph.inputs[0].name: x}, keep=keep)


# --------------------------------------------------------------------------- least squares

def ridge_lstsq(blocks: Iterable[tuple[np.ndarray, np.ndarray]], w0: np.ndarray, ridge: float,
                free: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Solve ``min ||A w - T||^2 + lam ||w - w0||^2`` (over the non-``free`` rows of w).

    ``blocks`` yields row blocks ``(A_i, T_i)`` of the system, consumed once
    (so a large im2col matrix never needs to exist whole); ``w0`` is
    ``[cols, k]``; ``free`` marks unregularised columns (the bias).
    ``lam = ridge * mean squared norm of the regularised columns of A``.  The
    ridge is a block of augmented rows ``sqrt(lam) * [I | 0]`` with right-hand
    side ``sqrt(lam) * w0``, and the augmented system is solved by
    ``np.linalg.lstsq``.  When there are more than ``_COMPRESS_FACTOR`` times
    as many rows as columns, ``A`` is first replaced by the square ``S V^T``
    of its SVD ``A = U S V^T`` (from the eigendecomposition of ``A^T A``) and
    ``T`` by ``U^T T``, which changes ``||A w - T||^2`` only by a constant: the
    same solution at a fraction of the cost.

    Returns ``(w, rel_before, rel_after)``: the solution and the relative
    residuals ``||A w - T|| / ||T - mean(T)||`` at ``w0`` and at the solution.
    """
    cols, k = w0.shape
    free = np.zeros(cols, bool) if free is None else free
    G = np.zeros((cols, cols))
    H = np.zeros((cols, k))
    tt, tsum, rows = 0.0, np.zeros(k), 0
    kept: list[tuple[np.ndarray, np.ndarray]] | None = []
    for a, t in blocks:
        G += a.T @ a
        H += a.T @ t
        tt += float((t * t).sum())
        tsum += t.sum(axis=0)
        rows += a.shape[0]
        if kept is not None:
            kept.append((a, t))
            if rows > _COMPRESS_FACTOR * cols:
                kept = None  # too many rows: compress (below) and let the blocks go
    if kept is None:
        s2, V = np.linalg.eigh(G)
        pos = s2 > max(float(s2.max()), 1e-300) * 1e-13
        s = np.sqrt(s2[pos])
        A = s[:, None] * V[:, pos].T
        T = (V[:, pos].T @ H) / s[:, None]
    else:
        A = np.concatenate([a for a, _ in kept])
        T = np.concatenate([t for _, t in kept])
    reg = ~free
    lam = ridge * float(np.diag(G)[reg].mean()) if reg.any() else 0.0
    if lam > 0:
        A = np.concatenate([A, np.sqrt(lam) * np.eye(cols)[reg]])
        T = np.concatenate([T, np.sqrt(lam) * w0[reg]])
    w, *_ = np.linalg.lstsq(A, T, rcond=None)
    t_var = max(tt - float((tsum * tsum).sum()) / max(rows, 1), 1e-300)

    def rel(wv):  # ||A wv - T|| from the Gram matrix
        r2 = float(np.einsum("ik,ij,jk->", wv, G, wv) - 2 * np.einsum("ik,ik->", wv, H) + tt)
        return float(np.sqrt(max(r2, 0.0) / t_var))

    return w, rel(w0), rel(w)


# --------------------------------------------------------------------------- which layers

def changed_nodes(original: Graph, rewritten: Graph) -> set[int]:
    """ids of the rewritten graph's nodes that compute something else than the
    original node of the same output name (new, different op/operands/weights)."""
    orig = {v.name: v for v in original.values()}
    out: set[int] = set()
    for node in rewritten.nodes:
        o = orig.get(node.outputs[0].name)
        p = o.producer if o is not None else None
        same = p is not None and p.op == node.op and dict(p.attrs) == dict(node.attrs) and \
            len(p.inputs) == len(node.inputs)
        if same:
            for a, b in zip(p.inputs, node.inputs):
                if a.name != b.name or a.is_constant != b.is_constant or \
                        (a.is_constant and not np.array_equal(a.data, b.data)):
                    same = False
                    break
        if not same:
            out.add(id(node))
    return out


def affected_nodes(original: Graph, rewritten: Graph) -> set[int]:
    """Changed nodes and everything downstream of them (their inputs differ)."""
    dirty = changed_nodes(original, rewritten)
    for node in rewritten.nodes:
        if any(v.producer is not None and id(v.producer) in dirty for v in node.inputs):
            dirty.add(id(node))
    return dirty


# --------------------------------------------------------------------------- the re-fit

@dataclass
class LayerFit:
    layer: str           # the layer's node (source name), "a + b" when fitted jointly
    output: str          # its output value(s)
    op: str
    target: str          # the original value it was fitted to ("X - Y": minus the rewritten Y)
    target_kind: str     # in words
    rows: int
    cols: int
    rel_error_before: float   # ||A w0 - t|| / ||t - mean t|| with the rewritten weights
    rel_error_after: float    # same with the re-fitted weights

    def as_dict(self) -> dict:
        return asdict(self)


def _sole_add_user(v: Value, graph: Graph) -> Node | None:
    if len(v.uses) == 1 and v not in graph.outputs and v.uses[0][0].op == "Add" and \
            len(v.uses[0][0].inputs) == 2:
        return v.uses[0][0]
    return None


class _Layer:
    """Design-matrix view of one Conv/Gemm: columns of its weights (+ bias)."""

    def __init__(self, node: Node):
        self.node = node
        w = node.inputs[1].data
        if node.op == "Conv":
            self.kernel = tuple(w.shape[2:])
            self.w_mat = w.reshape(w.shape[0], -1).astype(np.float64).T        # [C*kh*kw, M]
        else:
            a = node.attrs
            b = w.astype(np.float64) * a["alpha"]
            self.w_mat = b.T if a["transB"] else b                               # [in, out]
        self.m = self.w_mat.shape[1]
        if len(node.inputs) > 2:
            c = node.inputs[2].data.astype(np.float64)
            c = c * node.attrs["beta"] if node.op == "Gemm" else c
            self.bias = np.broadcast_to(c.reshape(-1), (self.m,)).astype(np.float64)
        else:
            self.bias = np.zeros(self.m)

    @property
    def cols(self) -> int:
        return self.w_mat.shape[0]

    def design(self, x: np.ndarray) -> np.ndarray:
        if self.node.op == "Conv":
            a = self.node.attrs
            return im2col(x, self.kernel, a["strides"], a["pads"], a["dilations"])
        return np.asarray(x, np.float64).reshape(x.shape[0], -1)

    def rows_of(self, y: np.ndarray) -> np.ndarray:
        """A [N, M, OH, OW] / [N, M] output as rows matching :meth:`design`."""
        y = np.asarray(y, np.float64)
        return y.transpose(0, 2, 3, 1).reshape(-1, self.m) if y.ndim == 4 else y.reshape(-1, self.m)

    def store(self, graph: Graph, w_mat: np.ndarray, bias: np.ndarray) -> Node:
        """Write new weights and bias into the graph (constant names kept)."""
        node = self.node
        w_old = node.inputs[1]
        dt = w_old.data.dtype
        if node.op == "Conv":
            w_new = w_mat.T.reshape(w_old.shape)
        else:
            a = node.attrs
            w_new = (w_mat.T if a["transB"] else w_mat) / a["alpha"]
        _swap_constant(graph, node, 1, w_new.astype(dt))
        if len(node.inputs) > 2:
            b_old = node.inputs[2]
            scale = node.attrs["beta"] if node.op == "Gemm" else 1.0
            if b_old.shape != (self.m,) or scale == 0:
                raise HecError(f"{node.label}: cannot re-fit a bias of shape {list(b_old.shape)}")
            _swap_constant(graph, node, 2, (bias / scale).astype(dt))
            return node
        # no bias operand yet: rebuild the node with one
        b = graph.add_constant(bias.astype(dt), w_old.name + ".bias")
        attrs = dict(node.attrs)
        new = graph.add_node(node.op, list(node.inputs) + [b], attrs, name=node.name, after=node)
        from .rewrite import replace_result

        replace_result(graph, node.output, new)
        self.node = new
        return new


def _args(node: Node, env: dict) -> list[np.ndarray]:
    return [v.data if v.is_constant else env[id(v)] for v in node.inputs]


def _swap_constant(graph: Graph, node: Node, index: int, data: np.ndarray) -> None:
    old = node.inputs[index]
    new = graph.add_constant(data, old.name + ".refit")
    node.set_input(index, new)
    if not old.uses and old not in graph.outputs:
        name = old.name
        graph.remove_constant(old)
        graph.rename(new, name)


def refit(original: Graph, rewritten: Graph, x: np.ndarray, ridge: float = 1e-3, head: bool = False,
          scope: str = "affected", reference: dict[str, np.ndarray] | None = None,
          frozen: Iterable[str] = ()) -> list[LayerFit]:
    """Re-fit the rewritten graph's affected Conv weights (in place) on calibration
    inputs ``x`` ([N, ...input shape without batch]) so that it reproduces the
    original graph; see the module docstring.

    ``scope``: ``"affected"`` (default: the convs the rewrite changed and every
    conv downstream of a change, whose input now differs) or ``"changed"``
    (only convs the rewrite changed, or whose output feeds a changed Add).
    ``head``: also re-fit an affected Gemm (the classifier) for the original
    logits.  ``frozen``: output names of layers to leave as they are.
    ``reference``: the original graph's values on ``x`` (``run_batch(original,
    x, keep=True)``) if already computed.  Returns one :class:`LayerFit` per
    re-fitted layer, in graph order."""
    if scope not in ("affected", "changed"):
        raise HecError(f"refit: scope must be 'affected' or 'changed', got {scope!r}")
    if ridge < 0 or not np.isfinite(ridge):
        raise HecError(f"refit: ridge must be a non-negative number, got {ridge}")
    ref = reference if reference is not None else run_batch(original, x, keep=True)
    changed = changed_nodes(original, rewritten)
    dirty = affected_nodes(original, rewritten) if scope == "affected" else set(changed)
    # the layer feeding a changed Add (its skip operand moved) must now produce something else
    for node in rewritten.nodes:
        if node.op == "Add" and id(node) in changed:
            dirty.update(id(v.producer) for v in node.inputs if v.producer is not None)
    fit_ops = {"Conv"} | ({"Gemm"} if head else set())
    frozen = set(frozen)
    orig_op = {n.outputs[0].name: n.op for n in original.nodes}

    def fittable(node: Node | None) -> bool:
        if node is None or node.op not in fit_ops or id(node) not in dirty or node.output.name in frozen:
            return False
        if not all(v.is_constant for v in node.inputs[1:]):
            return False
        if node.op == "Gemm" and node.attrs["transA"] or node.op == "Conv" and node.attrs["group"] != 1:
            return False
        return True

    def deferred(node: Node) -> bool:
        """Fitted at the Add it feeds (for the original Add output) rather than alone."""
        add = _sole_add_user(node.output, rewritten)
        return add is not None and add.output.name in ref

    interp = BatchInterpreter(rewritten)
    fits: list[LayerFit] = []
    with np.errstate(all="ignore"), blas_single_thread():
        env = interp._bind({rewritten.inputs[0].name: x})
        for node in list(rewritten.nodes):
            if node.graph is not rewritten:
                continue
            if node.op == "Add" and len(node.inputs) == 2 and node.output.name in ref:
                layers = [v.producer for v in node.inputs
                          if fittable(v.producer) and _sole_add_user(v, rewritten) is node]
                # a convolution feeding this Add is fitted here, for the original Add output
                if layers:
                    others = [v for v in node.inputs if v.producer not in layers]
                    target = np.asarray(ref[node.output.name], np.float64)
                    for v in others:
                        target = target - env[id(v)]
                    kind = "original Add result" + (" minus the rewritten skip operand" if others else "")
                    fit, _ = _fit(rewritten, [_Layer(n) for n in layers], env, target,
                                  node.output.name + "".join(" - " + v.name for v in others), kind, ridge, interp)
                    fits.append(fit)
            elif fittable(node) and node.output.name in ref and not deferred(node):
                op0 = orig_op.get(node.output.name)
                kind = "original output" if op0 == node.op else \
                    "original pre-activation conv + skip (the removed Add)" if op0 == "Add" else \
                    f"original {op0} result (this layer replaced it)"
                fit, nodes = _fit(rewritten, [_Layer(node)], env, np.asarray(ref[node.output.name], np.float64),
                                  node.output.name, kind, ridge, interp)
                fits.append(fit)
                node = nodes[0]
            outs = interp.run_node(node, _args(node, env))
            for v, o in zip(node.outputs, outs):
                env[id(v)] = o
    return fits


def _fit(graph: Graph, layers: list[_Layer], env: dict, target: np.ndarray, target_name: str, target_kind: str,
         ridge: float, interp: Interpreter) -> tuple[LayerFit, list[Node]]:
    """Solve for ``layers`` (jointly: their outputs are summed) against ``target``;
    store the weights; recompute the layers' outputs in ``env``."""
    n = target.shape[0]
    m = layers[0].m
    t_rows = layers[0].rows_of(target)
    # columns: [layer0 weights | bias | layer1 weights | ...]; one shared bias
    w0 = [layers[0].w_mat, (sum(L.bias for L in layers))[None, :]] + [L.w_mat for L in layers[1:]]
    w0 = np.concatenate(w0)
    free = np.zeros(w0.shape[0], bool)
    free[layers[0].cols] = True
    chunk = max(1, min(n, (1 << 22) // max(1, t_rows.shape[0] // n * w0.shape[0])))

    def blocks():
        for s in range(0, n, chunk):
            parts = []
            for i, L in enumerate(layers):
                d = L.design(env[id(L.node.inputs[0])][s:s + chunk])
                parts.append(d)
                if i == 0:
                    parts.append(np.ones((d.shape[0], 1)))
            a = np.concatenate(parts, axis=1)
            r0 = s * (t_rows.shape[0] // n)
            yield a, t_rows[r0:r0 + a.shape[0]]

    if any(not np.all(np.isfinite(env[id(L.node.inputs[0])])) for L in layers):
        raise HecError(f"re-fit of {layers[0].node.label}: its input is not finite on the calibration data")
    w, before, after = ridge_lstsq(blocks(), w0, ridge, free)
    off = 0
    nodes = []
    for i, L in enumerate(layers):
        wm = w[off:off + L.cols]
        off += L.cols
        bias = np.zeros(m)
        if i == 0:
            bias = w[off]
            off += 1
        nodes.append(L.store(graph, wm, bias))
        node = L.node
        out = interp.run_node(node, _args(node, env))
        env[id(node.output)] = out[0]
    fit = LayerFit(" + ".join(L.node.name or "%" + L.node.output.name for L in layers),
                   " + ".join(L.node.output.name for L in layers), "+".join(L.node.op for L in layers),
                   target_name, target_kind, int(t_rows.shape[0]), int(w0.shape[0]), before, after)
    return fit, nodes
