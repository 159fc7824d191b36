"""Linear ops on packed slots: matrices, diagonals, and baby-step/giant-step plans.

A :class:`~hecompiler.heprog.LinearOp` maps a tensor in layout A to a tensor
in layout B.  In slot space it is a block matrix: block (j, i) maps input
ciphertext i to output ciphertext j, and the diagonal method writes each
block as ``sum_d diag_d * rot(x_i, d)``.  With baby-step/giant-step
(``d = g + b``)::

    y_j = sum_g rot( sum_i sum_b rot(diag_{j,i,g+b}, -g) * rot(x_i, b), g )

so the baby rotations ``rot(x_i, b)`` are shared by every output ciphertext
and each output needs one rotation per giant step.

This module computes, from compact weights only:

* :func:`diag_keys` - which (j, i, d) diagonals are non-zero.  For
  convolutions and pooling between compatible layouts (the output grid is the
  input grid times the stride, see :mod:`hecompiler.layout`) this enumerates
  (out channel, in channel, tap) only, never the spatial positions, so the
  compile time of a 224x224 ResNet-50 stays small;
* :func:`diagonals` - their values, built when a program is loaded (the
  ``.hec`` file stores compact weights, not expanded plaintexts);
* :func:`plan_bsgs` - the baby/giant split that minimises rotations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .arrays import distinct
from .errors import LoweringError
from .heprog import LinearOp
from .layout import Layout


# --------------------------------------------------------------------------- tensor-space matrices

def _conv_geometry(lin: LinearOp, w: np.ndarray):
    p = lin.params
    s0, s1 = p["strides"]
    d0, d1 = p.get("dilations", (1, 1))
    return (lin.in_shape, lin.out_shape, (s0, s1), (p["pads"][0], p["pads"][1]), (d0, d1),
            p.get("group", 1), w.shape[1:])


def _conv_entries(lin: LinearOp, w: np.ndarray, out_rows: np.ndarray | None = None):
    """(rows, cols, vals) of a convolution / pooling in (c, h, w) flat order;
    only those of the output elements ``out_rows`` (flat indices) when given,
    enumerating just their taps, so one ciphertext's share of a large layer
    costs its own size, not its channels' whole images."""
    if out_rows is not None:
        return _conv_entries_rows(lin, w, out_rows)
    (C, H, W), (M, OH, OW), (s0, s1), (pt, pl), (d0, d1), group, (cg, kh, kw) = _conv_geometry(lin, w)
    co = np.arange(M)
    cil = np.arange(cg)
    ci = (co[:, None] // (M // group)) * cg + cil[None, :]  # [co, cil]
    oh, ow = np.arange(OH), np.arange(OW)
    ih = oh[None, :] * s0 + (np.arange(kh) * d0)[:, None] - pt  # [kh, oh]
    iw = ow[None, :] * s1 + (np.arange(kw) * d1)[:, None] - pl  # [kw, ow]
    vh = (ih >= 0) & (ih < H)
    vw = (iw >= 0) & (iw < W)
    # full index grid [co, cil, kh, kw, oh, ow]
    sh = (len(co), cg, kh, kw, OH, OW)
    valid = np.broadcast_to(vh[None, None, :, None, :, None] & vw[None, None, None, :, None, :], sh)
    rows = np.broadcast_to((co[:, None, None, None, None, None] * OH + oh[None, None, None, None, :, None]) * OW
                           + ow[None, None, None, None, None, :], sh)
    cols = np.broadcast_to((ci[:, :, None, None, None, None] * H + ih[None, None, :, None, :, None]) * W
                           + iw[None, None, None, :, None, :], sh)
    vals = np.broadcast_to(w[co][:, :, :, :, None, None], sh)
    m = valid & (vals != 0)
    return rows[m], cols[m], vals[m]


def _conv_entries_rows(lin: LinearOp, w: np.ndarray, out_rows: np.ndarray):
    (C, H, W), (M, OH, OW), (s0, s1), (pt, pl), (d0, d1), group, (cg, kh, kw) = _conv_geometry(lin, w)
    r = np.asarray(out_rows, np.int64)
    co, rem = np.divmod(r, OH * OW)
    oh, ow = np.divmod(rem, OW)
    ci = (co // (M // group))[:, None] * cg + np.arange(cg)[None, :]  # [R, cg]
    ih = oh[:, None] * s0 + (np.arange(kh) * d0)[None, :] - pt  # [R, kh]
    iw = ow[:, None] * s1 + (np.arange(kw) * d1)[None, :] - pl  # [R, kw]
    sh = (len(r), cg, kh, kw)
    valid = np.broadcast_to(((ih >= 0) & (ih < H))[:, None, :, None] & ((iw >= 0) & (iw < W))[:, None, None, :], sh)
    rows = np.broadcast_to(r[:, None, None, None], sh)
    cols = (ci[:, :, None, None] * H + ih[:, None, :, None]) * W + iw[:, None, None, :]
    vals = w[co]
    m = valid & (vals != 0)
    return rows[m], cols[m], vals[m]


def _pool_weights(lin: LinearOp) -> tuple[np.ndarray, np.ndarray | None]:
    """Average pooling as a depthwise conv; the divisor per output position."""
    p = lin.params
    C, H, W = lin.in_shape
    _, OH, OW = lin.out_shape
    kh, kw = p["kernel"]
    w = np.ones((C, 1, kh, kw))
    if p.get("count_include_pad", 0):
        # window cells inside input or explicit pads
        lo_h = np.arange(OH) * p["strides"][0] - p["pads"][0]
        lo_w = np.arange(OW) * p["strides"][1] - p["pads"][1]
        ch = np.clip(lo_h + kh, None, H + p["pads"][2]) - np.maximum(lo_h, -p["pads"][0])
        cw = np.clip(lo_w + kw, None, W + p["pads"][3]) - np.maximum(lo_w, -p["pads"][1])
    else:
        lo_h = np.arange(OH) * p["strides"][0] - p["pads"][0]
        lo_w = np.arange(OW) * p["strides"][1] - p["pads"][1]
        ch = np.minimum(lo_h + kh, H) - np.maximum(lo_h, 0)
        cw = np.minimum(lo_w + kw, W) - np.maximum(lo_w, 0)
    return w, np.outer(ch, cw).astype(np.float64)


def tensor_matrix(lin: LinearOp, weights: dict[str, np.ndarray], rows_subset: np.ndarray | None = None) -> sp.csr_matrix:
    """The op as a sparse [out_size, in_size] matrix over (c, h, w) flat tensors
    (including ``mult``, excluding the bias).  With ``rows_subset`` only those
    output elements' rows are filled (convolutions and pools then enumerate
    only those elements' taps, which bounds time and memory on large layers)."""
    out_size = int(np.prod(lin.out_shape))
    in_size = int(np.prod(lin.in_shape))
    subset = None if rows_subset is None else distinct(rows_subset)
    if lin.kind == "conv":
        rows, cols, vals = _conv_entries(lin, np.asarray(weights[lin.params["weight"]], np.float64), subset)
    elif lin.kind == "pool":
        w, cnt = _pool_weights(lin)
        pl = LinearOp("conv", 0, 0, lin.in_shape, lin.out_shape,
                      {"strides": lin.params["strides"], "pads": lin.params["pads"], "group": lin.in_shape[0]})
        rows, cols, vals = _conv_entries(pl, w, subset)
        vals = vals / cnt.reshape(-1)[rows % (lin.out_shape[1] * lin.out_shape[2])]
    elif lin.kind == "matrix":
        m = np.asarray(weights[lin.params["weight"]], np.float64)
        r, c = np.nonzero(m)
        rows, cols, vals = r, c, m[r, c]
    elif lin.kind == "gap":
        C, H, W = lin.in_shape
        cols = np.arange(C * H * W)
        rows, vals = cols // (H * W), np.full(cols.size, 1.0 / (H * W))
    elif lin.kind == "identity":
        idx = np.arange(in_size)
        rows, cols, vals = idx, idx, np.ones(in_size)
    elif lin.kind == "sparse":
        # data movement (Transpose, Pad, Concat, Reshape between layouts, ReduceSum): the matrix
        # itself, as a [3, nnz] weight of (row, col, value) triples
        t = np.asarray(weights[lin.params["weight"]], np.float64)
        rows, cols, vals = t[0].astype(np.int64), t[1].astype(np.int64), t[2]
    elif lin.kind == "affine":
        scale = np.asarray(weights[lin.params["weight"]], np.float64).reshape(-1)
        C, H, W = lin.in_shape
        idx = np.arange(C * H * W)
        rows, cols, vals = idx, idx, scale[idx // (H * W)]
    else:
        raise LoweringError(f"linear op kind {lin.kind!r} is unknown")
    if subset is not None and lin.kind not in ("conv", "pool"):  # conv and pool enumerated the subset only
        keep = np.isin(rows, subset)
        rows, cols, vals = rows[keep], cols[keep], np.asarray(vals)[keep]
    return sp.csr_matrix((np.asarray(vals, np.float64) * lin.mult, (rows, cols)), shape=(out_size, in_size))


def op_gain(lin: LinearOp, weights: dict[str, np.ndarray]) -> float:
    """The op's largest absolute row sum (including ``mult``, excluding the bias).  A conv's comes
    from its weights (an output that sees every tap; one near the border sees fewer, so this
    bounds it from above) without enumerating its taps; other ops' from their matrix."""
    if lin.kind == "conv":
        w = np.abs(np.asarray(weights[lin.params["weight"]], np.float64))
        return float(w.reshape(w.shape[0], -1).sum(axis=1).max() * abs(lin.mult)) if w.size else 0.0
    m = tensor_matrix(lin, weights)
    return float(abs(m).sum(axis=1).max()) if m.nnz else 0.0


def bias_vector(lin: LinearOp, weights: dict[str, np.ndarray]) -> np.ndarray | None:
    """The bias as a flat (c, h, w) vector, or None."""
    name = lin.params.get("bias")
    if not name:
        return None
    b = np.asarray(weights[name], np.float64).reshape(-1) * lin.bias_mult
    C, H, W = lin.out_shape
    if b.size == C:
        return np.repeat(b, H * W)
    if b.size == C * H * W:
        return b
    raise LoweringError(f"linear op bias {name!r} has {b.size} values for output {lin.out_shape}")


# --------------------------------------------------------------------------- diagonals

def cyclic_length(lin_in: Layout, lout: Layout) -> int:
    """The length C the op's diagonals are cyclic in: the output's period when replicated
    (:meth:`Layout.replicated`), else the slots.  An input whose period is C or divides it reads
    the same values at ``x[(k + d) mod C]`` as at ``x[k + d]``, so diagonals are taken mod C: a
    diagonal d mod C is the rotation by its signed representative (in (-C/2, C/2], as a step mod
    slots, so rotations of replicated and full tensors share Galois keys), and its slot vector is
    C-periodic.  An output more replicated than its input is not one linear op (the lowering
    applies the op into the input's period, then copies: ``hecompiler.lower``)."""
    C = lout.cyc
    if lin_in.cyc > C:
        raise LoweringError(f"linear op from {lin_in.describe()} to {lout.describe()}: the output repeats "
                            f"every {C} slots, the input every {lin_in.cyc}")
    return C


def _lift(d, C: int, S: int):
    """Diagonal offsets ``d`` taken mod C, as rotation steps mod S (signed representative)."""
    d = np.asarray(d, np.int64) % C
    if C == S:
        return d
    return np.where(d > C // 2, d - C, d) % S


def _structured_ok(lin: LinearOp, lin_in: Layout, lout: Layout) -> bool:
    """Whether a conv/pool/affine op's diagonals are independent of (h, w): the output's
    virtual grid must be the input's times the virtual stride (the stride, times the output's
    polyphase factor over the input's, which must be whole)."""
    if lin.kind not in ("conv", "pool", "affine"):
        return False
    ki, ko = lin_in.phase, lout.phase
    s0, s1 = lin.params.get("strides", (1, 1))
    if (s0 * ko) % ki or (s1 * ko) % ki:
        return False
    _, H, W = lin_in.vshape
    _, OH, OW = lout.vshape
    if lin_in.hs == 0 and H > 1 or lin_in.ws == 0 and W > 1:
        return False
    return (OH == 1 or lout.hs == s0 * ko // ki * lin_in.hs) and (OW == 1 or lout.ws == s1 * ko // ki * lin_in.ws)


def _valid_range(n_out: int, stride: int, off: int, n_in: int) -> tuple[int, int]:
    """Output indices o with 0 <= o*stride + off < n_in, as [lo, hi] (empty: lo > hi)."""
    lo = max(0, -(off // stride) if off < 0 else 0)
    while lo < n_out and lo * stride + off < 0:
        lo += 1
    hi = min(n_out - 1, (n_in - 1 - off) // stride) if n_in - 1 - off >= 0 else -1
    return lo, hi


@dataclass
class _Terms:
    """The (co, ci) pairs of one output phase (P, Q) and tap: the weights ``w``, the output and
    input (virtual) positions of their channels ``po`` and ``pin`` (at virtual (0, 0)), and the
    diagonal ``delta`` = P_in - P_out, the same at every output position of the rectangle
    ``rect`` = (oh_lo, oh_hi, ow_lo, ow_hi) of the virtual output grid where the tap is valid."""
    P: int
    Q: int
    rect: tuple[int, int, int, int]
    w: np.ndarray
    po: np.ndarray
    pin: np.ndarray
    delta: np.ndarray


def _structured_terms(lin: LinearOp, weights, lin_in: Layout, lout: Layout):
    """The terms of a conv/pool/affine op (:class:`_Terms`), from (co, ci, tap) and the output
    phases, never enumerating spatial positions."""
    C, H, W = lin.in_shape
    M, OH, OW = lin.out_shape
    p = lin.params
    if lin.kind == "affine":
        w = np.asarray(weights[p["weight"]], np.float64).reshape(-1, 1, 1, 1)
        group, s, pads, dil = C, (1, 1), (0, 0, 0, 0), (1, 1)
    elif lin.kind == "pool":
        w, _ = _pool_weights(lin)
        group, s, pads, dil = C, p["strides"], p["pads"], (1, 1)
    else:
        w = np.asarray(weights[p["weight"]], np.float64)
        group, s, pads, dil = p.get("group", 1), p["strides"], p["pads"], p.get("dilations", (1, 1))
    _, cg, kh, kw = w.shape
    pos_in = np.asarray(lin_in.pos, np.int64)
    pos_out = np.asarray(lout.pos, np.int64)
    co = np.arange(M)
    ci = (co[:, None] // (M // group)) * cg + np.arange(cg)[None, :]  # [M, cg]
    # polyphase layouts: output phase (P, Q) of tap (a, b) reads input phase (p, q) at a virtual
    # offset (oy, ox); the virtual op is a convolution of stride s * ko / ki (1, or s when ki = 1)
    ki, ko = lin_in.phase, lout.phase
    H, W, OH, OW = H // ki, W // ki, OH // ko, OW // ko
    sv = (s[0] * ko // ki, s[1] * ko // ki)
    for P, a in ((P, a) for P in range(ko) for a in range(kh)):
        oy, pp = divmod(s[0] * P + a * dil[0] - pads[0], ki)
        oh_lo, oh_hi = _valid_range(OH, sv[0], oy, H)
        if oh_lo > oh_hi:
            continue
        for Q, b in ((Q, b) for Q in range(ko) for b in range(kw)):
            ox, qq = divmod(s[1] * Q + b * dil[1] - pads[1], ki)
            ow_lo, ow_hi = _valid_range(OW, sv[1], ox, W)
            if ow_lo > ow_hi:
                continue
            nz = w[:, :, a, b] != 0
            if not nz.any():
                continue
            off = oy * lin_in.hs + ox * lin_in.ws
            cc, kk = np.nonzero(nz)
            po = pos_out[(cc * ko + P) * ko + Q]
            pin = pos_in[(ci[cc, kk] * ki + pp) * ki + qq]
            yield _Terms(P, Q, (oh_lo, oh_hi, ow_lo, ow_hi), w[cc, kk, a, b], po, pin, pin + off - po)


def _structured_keys(lin: LinearOp, weights, lin_in: Layout, lout: Layout) -> dict[tuple[int, int], np.ndarray]:
    """Diagonal keys of a conv/pool/affine op from (co, ci, tap), never
    enumerating spatial positions except rows that cross a ciphertext
    boundary (only when a channel footprint spans ciphertexts)."""
    S = lin_in.slots
    C = cyclic_length(lin_in, lout)
    straddle = lin_in.channel_straddles or lout.channel_straddles
    _, OH, OW = lout.vshape
    hs_o = lout.hs if OH > 1 else 0
    ws_o = lout.ws if OW > 1 else 0
    NI = lin_in.n_ct + 1
    found: list[np.ndarray] = []  # keys (j * NI + i) * S + d

    def enc(j, i, d):
        return distinct((np.asarray(j, np.int64) * NI + np.asarray(i, np.int64)) * S + np.asarray(d, np.int64))

    for t in _structured_terms(lin, weights, lin_in, lout):
        po, delta = t.po, t.delta
        if not straddle:
            found.append(enc(po // S, t.pin // S, _lift(delta, C, S)))
            continue
        oh_lo, oh_hi, ow_lo, ow_hi = t.rect
        rows = np.arange(oh_lo, oh_hi + 1)
        ps = po[:, None] + rows[None, :] * hs_o + ow_lo * ws_o  # [pairs, rows] first valid position
        pe = ps + (ow_hi - ow_lo) * ws_o
        dl = delta[:, None]
        simple = (ps // S == pe // S) & ((ps + dl) // S == (pe + dl) // S)
        pi, ri = np.nonzero(simple)
        found.append(enc(ps[pi, ri] // S, (ps[pi, ri] + delta[pi]) // S, delta[pi] % S))
        pi, ri = np.nonzero(~simple)
        if len(pi) == 0:
            continue
        if (ow_hi - ow_lo) * ws_o >= S:  # a row longer than a ciphertext: enumerate its points
            for p_, r_ in zip(pi, ri):
                pts = ps[p_, r_] + np.arange(ow_hi - ow_lo + 1) * ws_o
                js, is_ = pts // S, (pts + delta[p_]) // S
                found.append(enc(js, is_, np.full(js.shape, delta[p_] % S)))
            continue
        # a row shorter than a ciphertext crosses at most one output and one input boundary:
        # its (out ct, in ct) pairs are the first, the last, and the one between the crossings
        a0, dd = ps[pi, ri], delta[pi]
        a1 = pe[pi, ri]
        js, je, is_, ie = a0 // S, a1 // S, (a0 + dd) // S, (a1 + dd) // S
        big = np.iinfo(np.int64).max
        tj = np.where(js != je, -((a0 - (js + 1) * S) // ws_o), big)  # first point index in the next out ct
        ti = np.where(is_ != ie, -((a0 + dd - (is_ + 1) * S) // ws_o), big)
        dm = dd % S
        m1, m2 = tj < ti, ti < tj
        found.append(enc(np.concatenate([js, je, je[m1], js[m2]]), np.concatenate([is_, ie, is_[m1], ie[m2]]),
                         np.concatenate([dm, dm, dm[m1], dm[m2]])))
    if not found:
        return {}
    return _decode_keys(distinct(np.concatenate(found)), NI, S)


def matrix_entries(lin: LinearOp, weights, lin_in: Layout, lout: Layout) -> np.ndarray | None:
    """Non-zero entries of a conv/pool/affine op's matrix (its multiply-accumulates) per output
    ciphertext, from its terms (a channel spanning ciphertexts counts in its first); None for
    another op.  Making an output ciphertext's diagonals costs about its entries
    (hecompiler.costmodel)."""
    if not _structured_ok(lin, lin_in, lout):
        return None
    out = np.zeros(lout.n_ct, np.int64)
    for t in _structured_terms(lin, weights, lin_in, lout):
        area = (t.rect[1] - t.rect[0] + 1) * (t.rect[3] - t.rect[2] + 1)
        np.add.at(out, np.minimum(t.po // lin_in.slots, lout.n_ct - 1), area)
    return out


def _mix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (splitmix64's finaliser) on uint64 arrays (wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


#: a second seed for the signatures' other 64 bits
_SIG_SALT = np.uint64(0x9E3779B97F4A7C15)


def diag_signatures(lin: LinearOp, weights, lin_in: Layout, lout: Layout) -> dict[tuple[int, int, int], int] | None:
    """A 128-bit content signature per non-zero diagonal {(j, i, d): int}: equal signatures,
    equal slot vectors.  A diagonal is the sum of its terms, each a weight on a rectangle of its
    output channel's footprint; the signature hashes that multiset (the footprint's offset in the
    ciphertext, the weight, the rectangle, and for a pooling the output phase, whose divisors
    differ at the border) twice, with two seeds.  Convolutions in polyphase layouts repeat the
    same diagonals in every phase whose tap stays inside the virtual grid, so they need far fewer
    encodings than products, and the executor finds the repeats by signature without making
    their slot vectors (hecompiler.plaintexts.PlaintextFactory.share_key).
    None when the op is not a structured conv/pool/affine or a channel spans ciphertexts (its
    diagonals are then counted as all different)."""
    if not _structured_ok(lin, lin_in, lout) or lin_in.channel_straddles or lout.channel_straddles:
        return None
    S = lin_in.slots
    C = cyclic_length(lin_in, lout)
    NI = lin_in.n_ct + 1
    keys, hashes, hashes2 = [], [], []
    for t in _structured_terms(lin, weights, lin_in, lout):
        keys.append((t.po // S * NI + t.pin // S) * S + _lift(t.delta, C, S))
        rect = hash((t.rect, (t.P, t.Q) if lin.kind == "pool" else None)) & 0xFFFFFFFFFFFFFFFF
        base = (t.po % S).astype(np.uint64) ^ np.uint64(rect)
        wbits = np.ascontiguousarray(t.w, np.float64).view(np.uint64)
        hashes.append(_mix64(_mix64(base) ^ wbits))
        hashes2.append(_mix64(_mix64(base ^ _SIG_SALT) ^ wbits ^ _SIG_SALT))
    if not keys:
        return {}
    k = np.concatenate(keys)
    uk, inv = np.unique(k, return_inverse=True)
    sig = np.zeros(len(uk), np.uint64)
    np.add.at(sig, inv, np.concatenate(hashes))
    sig2 = np.zeros(len(uk), np.uint64)
    np.add.at(sig2, inv, np.concatenate(hashes2))
    blk, d = np.divmod(uk, S)
    j, i = np.divmod(blk, NI)
    return dict(zip(zip(j.tolist(), i.tolist(), d.tolist()),
                    (a << 64 | b for a, b in zip(sig.tolist(), sig2.tolist()))))


def _uses(plan: "BsgsPlan", sigs: dict, j: int):
    """The plaintexts output ciphertext ``j``'s products use, in the order the runtime asks: a
    product's plaintext is its diagonal turned by its giant step (runtime.run_linear), so two
    are equal when their diagonals' signatures and giant steps are."""
    return [(sigs[(j, i, d)], g) for g, terms in plan.giant.get(j, {}).items() for (i, _b, d) in terms]


def sharing_order(plan: "BsgsPlan", sigs: dict | None, lout: Layout) -> list[int]:
    """An order of the output ciphertexts that puts those sharing plaintexts next to each other:
    by the first channel they hold, then the set of plaintexts they use, then the index.  In a
    polyphase layout the phases of a channel group follow one another, and phases whose taps
    see the same masks (the same set) run back to back.  Empty (the natural order) without
    signatures, or when the natural order is that."""
    if sigs is None:
        return []
    C, H, W = lout.shape
    cts = lout.positions // lout.slots
    first = np.full(lout.n_ct, C, np.int64)
    np.minimum.at(first, cts, np.repeat(np.arange(C, dtype=np.int64), H * W))
    sets: dict[frozenset, int] = {}
    key = [(int(first[j]), sets.setdefault(frozenset(_uses(plan, sigs, j)), len(sets)), j) for j in range(lout.n_ct)]
    order = [j for *_k, j in sorted(key)]
    return [] if order == list(range(lout.n_ct)) else order


def plaintext_encodings(plan: "BsgsPlan", sigs: dict | None, order: list[int],
                        capacity: int) -> tuple[int, int, list[int]]:
    """(encodings, distinct plaintexts, the output ciphertexts whose diagonals are made) of a
    linear op run in ``order`` when the executor keeps at most ``capacity`` of its plaintexts,
    least recently used out first (hecompiler.plaintexts.PlaintextCache's op-local tier): what
    the cost model prices.  An output ciphertext all of whose plaintexts are held is never made
    (the executor finds them by signature).  Every product is an encoding, and every output
    ciphertext made, without signatures or capacity."""
    if sigs is None or capacity <= 0:
        return plan.n_diagonals, plan.n_diagonals, sorted(plan.giant)
    from collections import OrderedDict

    held: OrderedDict = OrderedDict()
    seen: set = set()
    made = []
    n = 0
    for j in order or sorted(plan.giant):
        fresh = 0
        for u in _uses(plan, sigs, j):
            if u in held:
                held.move_to_end(u)
                continue
            fresh += 1
            seen.add(u)
            held[u] = None
            if len(held) > capacity:
                held.popitem(last=False)
        n += fresh
        if fresh:
            made.append(j)
    return n, len(seen), sorted(made)


def _slot_entries(lin: LinearOp, weights, lin_in: Layout, lout: Layout, out_ct: int | None = None):
    rows = None
    if out_ct is not None:
        S = lin_in.slots
        rows = np.flatnonzero(lout.positions // S == out_ct)
    m = tensor_matrix(lin, weights, rows).tocoo()
    S = lin_in.slots
    po = lout.positions[m.row]
    pi = lin_in.positions[m.col]
    return po // S, pi // S, _lift(pi - po, cyclic_length(lin_in, lout), S), po % S, m.data


def cheap_keys(lin: LinearOp, weights, lin_in: Layout, lout: Layout) -> dict | None:
    """The op's diagonal keys when they are found without enumerating its matrix (a structured
    conv/pool/affine op), else None."""
    return _structured_keys(lin, weights, lin_in, lout) if _structured_ok(lin, lin_in, lout) else None


def diag_keys(lin: LinearOp, weights, lin_in: Layout, lout: Layout) -> dict[tuple[int, int], np.ndarray]:
    """Non-zero diagonals per block: {(j, i): sorted array of d}."""
    if _structured_ok(lin, lin_in, lout):
        return _structured_keys(lin, weights, lin_in, lout)
    j, i, d, _, _ = _slot_entries(lin, weights, lin_in, lout)
    S = lin_in.slots
    NI = lin_in.n_ct + 1
    return _decode_keys(distinct((j * NI + i) * S + d), NI, S)


def _decode_keys(uk: np.ndarray, NI: int, S: int) -> dict[tuple[int, int], np.ndarray]:
    """Sorted unique keys (j * NI + i) * S + d -> {(j, i): sorted array of d}."""
    blk, d = np.divmod(uk, S)
    cuts = np.flatnonzero(np.diff(blk)) + 1
    out = {}
    for seg_b, seg_d in zip(np.split(blk, cuts), np.split(d, cuts)):
        if len(seg_b):
            j, i = divmod(int(seg_b[0]), NI)
            out[(j, i)] = seg_d.astype(np.int64)
    return out


#: matrix entries turned into diagonals at a time (bounds the temporaries)
_DIAG_CHUNK_ENTRIES = 1 << 17
#: bytes those temporaries take at most: per entry the sparse row/col/value (16), output and input
#: positions and the key (24), np.unique's order and inverse (16), the scatter's indices (16)
DIAG_TEMP_BYTES = _DIAG_CHUNK_ENTRIES * 72


def diagonals(lin: LinearOp, weights, lin_in: Layout, lout: Layout,
              out_ct: int | None = None, keys: dict | None = None) -> dict[tuple[int, int, int], np.ndarray]:
    """Values of every non-zero diagonal: {(j, i, d): vector of ``slots`` floats}
    where ``y_j[k] += diag[k] * x_i[(k + d) % slots]``; only output
    ciphertext ``out_ct``'s when given.  ``keys``: the op's :func:`cheap_keys`, when the caller
    keeps them (a polyphase convolution's take a loop over phases and taps to find: asking for
    each output ciphertext's diagonals would find them all again).

    The matrix entries are turned into diagonals a few hundred thousand at a time, so the
    temporaries stay a few tens of MB however large the op (the diagonals themselves are what
    a backend must hold: ``block_diagonals * slots`` floats)."""
    S = lin_in.slots
    C = cyclic_length(lin_in, lout)
    NI = lin_in.n_ct + 1
    rows = np.arange(len(lout.positions)) if out_ct is None else np.flatnonzero(lout.positions // S == out_ct)
    if not len(rows):
        return {}
    # entries per output row, from a first slice (conv rows all read about the same number of inputs)
    probe = tensor_matrix(lin, weights, rows[: min(len(rows), 64)])
    per_row = max(1, probe.nnz // max(1, min(len(rows), 64)))
    step = max(1, _DIAG_CHUNK_ENTRIES // per_row)
    index: dict[int, int] = {}
    if keys is None:
        keys = cheap_keys(lin, weights, lin_in, lout)
    if keys is not None:  # the diagonals are known: size the result once
        for (jj, ii), ds in keys.items():
            if out_ct is None or jj == out_ct:
                for dd in ds:
                    index[(jj * NI + ii) * S + int(dd)] = len(index)
    dense = np.zeros((len(index), S))
    # key -> row of ``dense`` through a lookup table over (input ct, diagonal) when one output
    # ciphertext is asked for (the executor's case): no sort of the entries
    lut = np.full(NI * S, -1, np.int64) if out_ct is not None else None
    if lut is not None:
        for k, r in index.items():
            lut[k % (NI * S)] = r
    for lo in range(0, len(rows), step):
        m = tensor_matrix(lin, weights, rows[lo:lo + step]).tocoo()
        po = lout.positions[m.row]  # tensor_matrix keeps the rows numbered as in the whole op
        pi = lin_in.positions[m.col]
        local = (pi // S) * S + _lift(pi - po, C, S)
        if lut is not None:
            at = lut[local]
            new = at < 0
            if new.any():  # diagonals not known in advance
                for k in distinct(local[new]):
                    lut[k] = index.setdefault((out_ct * NI) * S + int(k), len(index))
                at = lut[local]
        else:
            key = (po // S) * (NI * S) + local
            uk, inv = np.unique(key, return_inverse=True)
            at = np.fromiter((index.setdefault(int(k), len(index)) for k in uk), np.int64, len(uk))[inv]
        if len(index) > len(dense):
            grown = np.zeros((max(len(index), 2 * len(dense)), S))
            grown[: len(dense)] = dense
            dense = grown
        # one matrix entry per (output slot, diagonal): an output position and a diagonal of one
        # input ciphertext name one input position, and the matrix sums repeated entries
        # (tensor_matrix is a CSR matrix), so a plain scatter is exact
        dense.reshape(-1)[at * S + po % S] = m.data
    if C < S:  # a replicated output: every diagonal repeats its first C slots
        dense[:, C:] = np.tile(dense[:, :C], (1, S // C - 1))
    out = {}
    for k, r in index.items():
        blk, dd = divmod(k, S)
        jj, ii = divmod(blk, NI)
        out[(jj, ii, dd)] = dense[r]
    return out


# --------------------------------------------------------------------------- baby-step / giant-step

@dataclass
class BsgsPlan:
    n1: int
    baby: dict[int, list[int]]  # input ct -> baby steps used (0 first if used)
    giant: dict[int, dict[int, list[tuple[int, int, int]]]]  # out j -> g -> [(i, b, d)]
    #: the runtime's schedule over the program's keys (hecompiler.rotkeys.LinearSchedule), when
    #: the op has one
    schedule: object = None

    @property
    def rotations(self) -> int:
        return sum(len([b for b in bs if b]) for bs in self.baby.values()) + \
            sum(len([g for g in gs if g]) for gs in self.giant.values())

    @property
    def n_diagonals(self) -> int:
        return sum(len(t) for gs in self.giant.values() for t in gs.values())

    @property
    def n_adds(self) -> int:
        """ct-ct additions: inside each giant group, and across groups."""
        return sum(sum(len(t) - 1 for t in gs.values()) + len(gs) - 1 for gs in self.giant.values())

    def steps(self) -> set[int]:
        s = {b for bs in self.baby.values() for b in bs if b}
        s |= {g for gs in self.giant.values() for g in gs if g}
        return s


def _centered(d: np.ndarray, n1: int, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Split d = g + b with b the residue of d mod n1 closest to 0 (as a
    rotation step in (-S/2, S/2]) and g = d - b (mod S)."""
    ds = np.where(d > S // 2, d - S, d)  # signed
    b = ((ds + n1 // 2) % n1) - n1 // 2
    g = (ds - b) % S
    return b, g


def plan_bsgs(keys: dict[tuple[int, int], np.ndarray], slots: int, key_cost: float = 0.0,
              existing_steps: set[int] | None = None) -> BsgsPlan:
    """Choose the baby-step size n1 minimising rotations (plus ``key_cost``
    per new Galois key)."""
    existing = existing_steps or set()
    best = None
    # candidate baby-step sizes: powers of two, and the natural strides of the op (the smallest
    # distinct offsets: a tap row, a channel footprint), which fit non-power-of-two images
    alld = distinct(np.concatenate([ds for ds in keys.values()])) if keys else np.array([], np.int64)
    signed = distinct(np.abs(np.where(alld > slots // 2, alld - slots, alld)))
    cands = sorted({1 << k for k in range(slots.bit_length()) if (1 << k) <= slots} |
                   {int(v) for v in signed[signed > 1][:48]} |
                   {int(v) * m for v in signed[signed > 1][:8] for m in (2, 3, 4, 6, 8) if int(v) * m <= slots})
    if not keys:
        return plan_with_n1(keys, slots, 1)
    # all keys as flat arrays, scored per candidate with vectorised unique counts
    J = np.concatenate([np.full(len(ds), j, np.int64) for (j, i), ds in keys.items()])
    I = np.concatenate([np.full(len(ds), i, np.int64) for (j, i), ds in keys.items()])
    D = np.concatenate([np.asarray(ds, np.int64) for ds in keys.values()])
    ex = np.array(sorted(existing), np.int64)
    for n1 in cands:
        b, g = _centered(D, n1, slots)
        b = b % slots
        ub = distinct(I * slots + b)
        ug = distinct(J * slots + g)
        rot = int(np.count_nonzero(ub % slots)) + int(np.count_nonzero(ug % slots))
        cost = float(rot)
        if key_cost:
            steps = np.setdiff1d(distinct(np.concatenate([ub % slots, ug % slots])), np.array([0]))
            cost += key_cost * len(np.setdiff1d(steps, ex))
        if best is None or cost < best[0]:
            best = (cost, n1)
    return plan_with_n1(keys, slots, best[1])


def plan_with_n1(keys: dict[tuple[int, int], np.ndarray], slots: int, n1: int) -> BsgsPlan:
    """The BSGS schedule for a given baby-step size (deterministic)."""
    baby_l: dict[int, set] = {}
    giant_l: dict[int, dict[int, list]] = {}
    for (j, i), ds in keys.items():
        b, g = _centered(ds, n1, slots)
        for dd, bb, gg in zip(ds.tolist(), (b % slots).tolist(), g.tolist()):
            baby_l.setdefault(i, set()).add(bb)
            giant_l.setdefault(j, {}).setdefault(gg, []).append((i, bb, dd))
    baby_sorted = {i: sorted(v) for i, v in sorted(baby_l.items())}
    giant_sorted = {j: {g: sorted(t) for g, t in sorted(gs.items())} for j, gs in sorted(giant_l.items())}
    return BsgsPlan(n1, baby_sorted, giant_sorted)
