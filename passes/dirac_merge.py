"""``dirac-merge``: a residual ``Add(x, L(x))`` whose branch ``L`` is a
shape-preserving linear chain around one Conv becomes that Conv with the
identity (Dirac delta) kernel added to its weight.

``x + Conv(x, W, b)`` is ``Conv(x, W + I, b)`` where ``I[o, o mod C/g, ty, tx]
= 1`` at the tap ``(ty, tx)`` that reads the output pixel's own input pixel
(the centre tap for the usual symmetric "same" padding).  Under HE the skip
then costs nothing: no level/scale alignment of ``x``, no ciphertext Add.

Recognised, in any combination (``k``, ``a`` constants):

* the branch: ``Conv`` (odd kernel, stride 1, any dilation, group 1,
  depthwise or grouped, output shape == input shape), optionally on a zero
  ``Pad`` of ``x`` (folded into the pads), optionally followed by a chain of
  ``Mul``/``Div`` by a scalar or per-channel constant (``c * Conv`` gives
  ``c*W`` and bias ``c*b``; per channel ``c_k*W_k``), ``Add``/``Sub`` of such a
  constant (bias), an unfolded ``BatchNormalization`` and degree <= 1 ``Poly``;
* the skip: ``x`` itself or ``x`` through the same kind of constant affine chain
  (``a*x`` gives ``W + a*I``);
* ``Add`` in either operand order, ``Sub(x, L(x))`` (``I - W``) and
  ``Sub(L(x), x)`` (``W - I``).

Refused: strided or shape-changing convs, channel count changes, even kernel
sizes, anything nonlinear between ``x`` and the Add (Relu, Poly of degree
>= 2), two different tensors, constants that vary over batch or pixels.  The
branch's nodes are removed only when nothing else uses them; otherwise they
stay and the new Conv still computes the whole sum.  The result keeps the Add's
value name and node name.  Weights are combined in float64 and stored in the
weight dtype, so the rewrite is exact up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hecompiler.passmanager import Pass, PassResult, register_pass
from hecompiler.rewrite import RewritePattern, apply_patterns, replace_result

#: longest affine chain followed on either side of the Add
MAX_CHAIN = 16


def _channel_const(v, channels: int):
    """A float constant that broadcasts against an NCHW tensor as one value or
    one value per channel: a float64 vector of length ``channels``, else None."""
    if not v.is_constant or not np.issubdtype(v.data.dtype, np.floating) or v.data.ndim > 4:
        return None
    d = v.data.astype(np.float64)
    if d.size == 1:
        return np.full(channels, float(d.reshape(-1)[0]))
    shape = (1,) * (4 - d.ndim) + d.shape
    if shape[0] != 1 or shape[2] != 1 or shape[3] != 1 or shape[1] != channels:
        return None
    return d.reshape(channels)


def _affine_step(node, channels: int):
    """If ``node`` is ``y = s * v + t`` per channel for one run-time operand
    ``v`` and constants, return ``(v, s, t)`` (float64 vectors), else None.
    The node must not broadcast ``v`` to a bigger shape."""
    ins = node.inputs
    ones, zeros = np.ones(channels), np.zeros(channels)
    step = None
    if node.op in ("Mul", "Add", "Sub", "Div") and len(ins) == 2:
        for vi in (0, 1):
            v, c = ins[vi], ins[1 - vi]
            if v.is_constant:
                continue
            k = _channel_const(c, channels)
            if k is None:
                continue
            if node.op == "Mul":
                step = (v, k, zeros)
            elif node.op == "Add":
                step = (v, ones, k)
            elif node.op == "Sub":
                step = (v, ones, -k) if vi == 0 else (v, -ones, k)
            elif vi == 0 and np.all(k != 0):  # Div(v, k); k / v is not affine
                step = (v, 1.0 / k, zeros)
            break
    elif node.op == "BatchNormalization" and all(v.is_constant for v in ins[1:]) \
            and ins[0].type.rank == 4 and ins[0].type.shape[1] == channels:
        scale, beta, mean, var = (v.data.astype(np.float64) for v in ins[1:5])
        s = scale / np.sqrt(var + node.attrs["epsilon"])
        step = (ins[0], s, beta - mean * s)
    elif node.op == "Poly" and len(node.attrs["coeffs"]) <= 2:
        c = list(node.attrs["coeffs"]) + [0.0, 0.0]
        step = (ins[0], np.full(channels, c[1]), np.full(channels, c[0]))
    if step is None or step[0].type != node.output.type:
        return None
    return step


def _peel(v, channels: int, stop):
    """Follow constant affine nodes down from ``v``.  At each value ``u`` on the
    way, ``stop(u)`` may return a result, which ends the walk.  Returns
    ``(stop result, s, t)`` with ``v = s * u + t`` per channel, or None."""
    s, t = np.ones(channels), np.zeros(channels)
    for _ in range(MAX_CHAIN + 1):
        hit = stop(v)
        if hit is not None:
            return hit, s, t
        if v.producer is None:
            return None
        step = _affine_step(v.producer, channels)
        if step is None:
            return None
        v, s1, t1 = step
        # outer(s, t) o inner(s1, t1): s*(s1*u + t1) + t
        s, t = s * s1, s * t1 + t
    return None


def _zero_spatial_pad(pad):
    """A Pad node's [top, left, bottom, right] if it pads only H and W with zeros."""
    p = pad.attrs["pads"]
    if pad.attrs["value"] != 0.0 or len(p) != 8 or any(p[i] for i in (0, 1, 4, 5)):
        return None
    return [p[2], p[3], p[6], p[7]]


@dataclass
class _Branch:
    conv: object      # the Conv node
    x: object         # the tensor the conv reads (under any folded Pad)
    pads: list        # the conv's pads with the Pad folded in
    padded: bool


def _as_branch(v, graph):
    """``v`` as a Conv that keeps the shape of its (unpadded) input, or None."""
    conv = v.producer
    if conv is None or conv.op != "Conv" or not all(u.is_constant for u in conv.inputs[1:]):
        return None
    a = conv.attrs
    w = conv.inputs[1].data
    x = conv.inputs[0]
    pads = list(a["pads"])
    padded = False
    if x.producer is not None and x.producer.op == "Pad":
        extra = _zero_spatial_pad(x.producer)
        if extra is not None:
            x = x.producer.inputs[0]
            pads = [p + e for p, e in zip(pads, extra)]
            padded = True
    if x.is_constant or x.type.rank != 4 or tuple(a["strides"]) != (1, 1):
        return None
    kh, kw = w.shape[2:]
    if kh % 2 == 0 or kw % 2 == 0:
        return None  # no centre tap
    if conv.output.type.shape != x.type.shape or conv.output.type.dtype != x.type.dtype:
        return None  # channel count or spatial shape changes
    if not np.issubdtype(w.dtype, np.floating):
        return None
    d = a["dilations"]
    # output pixel i reads input pixel i - pad_top + d*k at tap k: the identity tap has d*k == pad_top
    if pads[0] % d[0] or pads[1] % d[1] or pads[0] // d[0] >= kh or pads[1] // d[1] >= kw:
        return None
    return _Branch(conv, x, pads, padded)


def _fmt(coef: np.ndarray, what: str) -> str:
    """``coef * what`` for the note: ``what``, ``-what``, ``0.5*(what)`` or ``c_k*(what)`` (per channel)."""
    if np.all(coef == coef[0]):
        c = float(coef[0])
        if c == 1.0:
            return what
        if c == -1.0:
            return "-" + what
        return f"{c:g}*({what})" if " " in what else f"{c:g}*{what}"
    return f"c_k*({what})"


class _MergeSkip(RewritePattern):
    def __init__(self, notes: list[str]):
        self.notes = notes

    def match_and_rewrite(self, node, graph):
        if len(node.inputs) != 2 or any(v.type != node.output.type for v in node.inputs):
            return False
        if node.output.type.rank != 4 or not np.issubdtype(node.output.type.np_dtype, np.floating):
            return False
        channels = node.output.type.shape[1]
        sign = -1.0 if node.op == "Sub" else 1.0
        for li in (0, 1):
            lv, sv = node.inputs[li], node.inputs[1 - li]
            branch = _peel(lv, channels, lambda u: _as_branch(u, graph))
            if branch is None:
                continue
            br, sl, tl = branch
            skip = _peel(sv, channels, lambda u, x=br.x: u if u is x else None)
            if skip is None:
                continue
            _, ss, ts = skip
            kl, ks = (1.0, sign) if li == 0 else (sign, 1.0)
            self._rewrite(node, graph, br, kl * sl, kl * tl, ks * ss, ks * ts)
            return True
        return False

    def _rewrite(self, node, graph, br, sl, tl, ss, ts):
        """out = sl * Conv(x) + tl + ss * x + ts, per output channel."""
        conv = br.conv
        wv = conv.inputs[1]
        w = wv.data
        m, cg, kh, kw = w.shape
        d = conv.attrs["dilations"]
        ty, tx = br.pads[0] // d[0], br.pads[1] // d[1]
        w2 = w.astype(np.float64) * sl[:, None, None, None]
        o = np.arange(m)
        w2[o, o % cg, ty, tx] += ss
        b = conv.inputs[2].data.astype(np.float64) if len(conv.inputs) > 2 else np.zeros(m)
        b2 = b * sl + tl + ts
        inputs = [br.x, graph.add_constant(w2.astype(w.dtype), wv.name + ".dirac")]
        if len(conv.inputs) > 2 or np.any(b2):
            bname = conv.inputs[2].name if len(conv.inputs) > 2 else wv.name + ".bias"
            inputs.append(graph.add_constant(b2.astype(w.dtype), bname + ".dirac"))
        attrs = dict(conv.attrs)
        attrs["pads"] = br.pads
        new = graph.add_node("Conv", inputs, attrs, name=node.name or conv.name, after=node)
        g = conv.attrs["group"]
        kind = f"{kh}x{kw}" + (" depthwise" if g > 1 and g == m else f" group={g}" if g > 1 else "")
        terms = [_fmt(sl, f"{kind} conv"), _fmt(ss, "identity")]
        expr = terms[0] + "".join(f" - {t[1:]}" if t.startswith("-") else f" + {t}" for t in terms[1:])
        if expr.startswith("-") and not terms[1].startswith("-"):  # identity - conv, not -conv + identity
            expr = terms[1] + " - " + terms[0][1:]
        where = conv.name or "%" + conv.output.name
        replace_result(graph, node.output, new)
        extra = " (Pad folded)" if br.padded else ""
        if conv.graph is graph:
            extra += " (the original conv stays: its result has other users)"
        self.notes.append(f"merged skip into {where}: {expr}{extra}")


class _MergeAdd(_MergeSkip):
    op = "Add"


class _MergeSub(_MergeSkip):
    op = "Sub"


@register_pass
@dataclass(frozen=True)
class DiracMerge(Pass):
    name = "dirac-merge"
    summary = "residual Add(x, Conv(x)) (with scalar/BN/Pad around it) -> one Conv with kernel W + I"
    exact = True

    def run(self, graph, ctx):
        notes: list[str] = []
        n = apply_patterns(graph, [_MergeAdd(notes), _MergeSub(notes)])
        return PassResult(n > 0, notes)
