"""Pending scalars: how the lowering keeps multiplications by constants free.

Every encrypted :class:`Tensor` carries a pending scalar ``alpha``: the real tensor is
``alpha * decrypt(cts)``.  A scalar multiply only changes ``alpha``; a linear op absorbs its
input's ``alpha`` into its weights; a polynomial substitutes it into its coefficients.  What
is left is settled here:

* a residual ``Add`` makes both sides agree on ``alpha``, level and scale by re-planning the
  linear op that produced one side (its multiplier and the scale of its plaintexts are still
  free: :class:`Emission`), and multiplies (one level) only when neither side can be adjusted;
* an ``alpha`` far from 1 is multiplied out (:meth:`PendingScalars.materialize`), free when a
  level is spare, since the ciphertext holds ``real / alpha`` and would approach the modulus;
* a graph output's linear op with small weights is scaled up, the factor left for the client
  (encoding rounds plaintexts to ``1/scale``: small weights lose digits);
* at an output the client multiplies by what is still pending.

:class:`PendingScalars` is a part of :class:`hecompiler.lower.Lowering`: it uses the lowering's
tensors (``t``, ``tensor``, ``layout``), its program builder (``_emit``, ``prog``, ``meta``) and
its level moves (``refresh``, ``to_level``, ``shared_to_level``, ``_convert_one``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .errors import LoweringInvariantError
from .heprog import PlainRef
from .ir import Node, Value
from .linear import bias_vector, op_gain
from .opsem import SCALE_SNAP

#: |log2 alpha| above which a pending scalar is multiplied out when it is free (a spare level)
SOFT_ALPHA = 6.0
#: ... and above which it is multiplied out even at the cost of a level
HARD_ALPHA = 20.0
#: the most a graph output's linear op is scaled up by (2^k; see PendingScalars._normalize_output)
OUTPUT_GAIN_BITS = 24


def bad_alpha(alpha: float, limit: float = SOFT_ALPHA) -> bool:
    return alpha == 0 or abs(math.log2(abs(alpha))) > limit


@dataclass
class Emission:
    """The ``linear`` instruction of one linear op, kept so a later Add can
    still change the op's multiplier and output scale."""

    lin: int
    instr: int  # index of the ``linear`` instruction
    level_in: int
    scale_in: float
    #: instructions after it that keep its scale (the rotations and additions that copy a result
    #: into a replicated layout: hecompiler.lower.Lowering.linear_on), re-planned with it
    follow: tuple[int, ...] = ()


@dataclass
class Tensor:
    cts: list[int]
    layout: int
    level: int
    scale: float
    alpha: float = 1.0
    emission: Emission | None = None
    dirty: bool = False  # slots outside the layout may hold garbage


class PendingScalars:
    """Alignment of pending scalars, levels and scales (a part of ``Lowering``)."""

    def _replan(self, em: Emission, new_scale: float, mult: float = 1.0) -> None:
        """Change a linear op's output scale (its plaintext scale) and multiplier."""
        lin = self.prog.linears[em.lin]
        lin.mult *= mult
        lin.bias_mult *= mult
        q = self.prog.primes[em.level_in]
        s_pt = new_scale * q / em.scale_in
        ins = self.prog.instrs[em.instr]
        got = em.scale_in * s_pt / q
        if ins.op != "linear" or abs(got - new_scale) > SCALE_SNAP * new_scale:
            raise LoweringInvariantError(f"{self._where()}: re-planning instruction {em.instr} ({ins.op}) to scale "
                                         f"{new_scale!r} gives {got!r}")
        ins.plain = replace(ins.plain, scale=s_pt)
        ins.scale = new_scale
        for o in ins.results:
            self.meta[o] = (ins.level, new_scale)
        for k in em.follow:
            f = self.prog.instrs[k]
            f.scale = new_scale
            self.meta[f.out] = (f.level, new_scale)

    def _normalize_output(self, v: Value, t: Tensor) -> Tensor:
        """Scale up the weights of a graph output's linear op when they are small, leaving the
        factor pending for the client.  Encoding rounds every plaintext to 1/scale, an error each
        product multiplies by the ciphertext's slots (garbage slots included), so small weights (a
        classifier after a sum-pooling, with a polynomial's leading coefficient pending) lose digits
        (see backends/sim.py).  ``k`` is the largest power of two keeping the op's gain, its largest
        absolute row sum (and bias), at most 1: the output's ciphertext values stay within its
        input's, so no level's modulus is approached that the input did not already approach."""
        if v.uses or not self._adjustable(v, t, None):
            return t
        lin = self.prog.linears[t.emission.lin]
        gain = op_gain(lin, self.prog.weights)
        b = bias_vector(lin, self.prog.weights)
        if b is not None and b.size:
            gain = max(gain, float(np.abs(b).max()))
        if not 0.0 < gain < 0.5:
            return t
        k = 2.0 ** min(math.floor(-math.log2(gain)), OUTPUT_GAIN_BITS)
        self._replan(t.emission, t.scale, k)
        return replace(t, alpha=t.alpha / k, emission=None)

    def _adjustable(self, v: Value, t: Tensor, user: Node | None) -> bool:
        """Whether the linear op that made ``t`` can be re-planned: it reaches ``v`` and nothing
        else, and ``v`` feeds only ``user`` (None: ``v`` is a graph output nothing reads)."""
        if t.emission is None:
            return False
        # the emission may come through scalar Mul/Div, Identity, Flatten...: every value from the
        # linear op's output to ``v`` must feed only the next one, else replanning changes them too
        cur, nxt = v, user
        while True:
            if nxt is None:
                if cur.uses:
                    return False
            elif cur in self.g.outputs or len(cur.uses) != 1 or cur.uses[0][0] is not nxt:
                return False
            p = cur.producer
            src = next((u for u in p.inputs if not u.is_constant), None) if p is not None else None
            st = self.t.get(id(src)) if src is not None else None
            if st is None or st.emission is not t.emission:
                return True
            cur, nxt = src, p

    def align(self, va: Value, vb: Value) -> tuple[Tensor, Tensor]:
        """Bring two operands of an add to the same layout, alpha, level and scale."""
        ta, tb = self.tensor(va), self.tensor(vb)
        conv_a = conv_b = False
        if ta.layout != tb.layout:
            ta, tb, conv_a, conv_b = self._convert_one(ta, tb)
        # a converted operand is this node's own linear op: its scale can always be replanned
        adj_a = conv_a or self._adjustable(va, ta, self.node)
        adj_b = conv_b or self._adjustable(vb, tb, self.node)
        # choose which side follows the other: an adjustable one, preferring the lower level
        if adj_a and (not adj_b or ta.level <= tb.level):
            follow, lead, fv = ta, tb, va
        elif adj_b:
            follow, lead, fv = tb, ta, vb
        else:
            follow = None
        if follow is not None:
            # the result takes the leader's alpha; when that alpha is far from 1 the ciphertext holds
            # real/alpha, which overflows the modulus downstream: multiply it out on the leader when
            # the leader has a level to spare (a skip branch usually has several)
            if bad_alpha(lead.alpha) and (lead.level > follow.level or bad_alpha(lead.alpha, HARD_ALPHA)):
                lead = self.materialize(lead)
            self._replan(follow.emission, lead.scale, follow.alpha / lead.alpha)
            follow = Tensor(follow.cts, follow.layout, follow.level, lead.scale, lead.alpha, None, follow.dirty)
            lv = min(follow.level, lead.level)
            lead_v = vb if fv is va else va
            follow, lead = self.to_level(follow, lv), self.shared_to_level(lead_v, lead, lv)
            return (follow, lead) if fv is va else (lead, follow)
        # neither adjustable: multiply the side with more levels by alpha ratio at a chosen scale
        if bad_alpha(ta.alpha) or bad_alpha(tb.alpha):
            ta, tb = self.materialize(ta), self.materialize(tb)
        hi, lo = (ta, tb) if ta.level >= tb.level else (tb, ta)
        if hi.level < 1:
            hi = self.refresh(hi)
        ratio = hi.alpha / lo.alpha
        lvl = hi.level
        target_level = min(lvl - 1, lo.level)
        lo = self.to_level(lo, target_level)
        hi = self.to_level(hi, target_level + 1)
        q = self.prog.primes[hi.level]
        s_pt = lo.scale * q / hi.scale
        cts = []
        for c in hi.cts:
            m = self._emit("mul_plain", (c,), plain=PlainRef("scalar", (float(ratio),), s_pt))
            cts.append(self._emit("rescale", (m,), scale=lo.scale))
        hi = Tensor(cts, hi.layout, target_level, lo.scale, lo.alpha, None, hi.dirty)
        return (hi, lo) if ta.level >= tb.level else (lo, hi)

    def materialize(self, t: Tensor) -> Tensor:
        """Multiply a tensor's pending alpha into its ciphertexts (one level)."""
        if t.alpha == 1.0:
            return t
        if t.level < 1:
            t = self.refresh(t)
        q = self.prog.primes[t.level]
        s_pt = self.delta * q / t.scale
        cts = []
        for c in t.cts:
            m = self._emit("mul_plain", (c,), plain=PlainRef("scalar", (float(t.alpha),), s_pt))
            cts.append(self._emit("rescale", (m,), scale=self.delta))
        return Tensor(cts, t.layout, t.level - 1, self.delta, 1.0, None, t.dirty)
