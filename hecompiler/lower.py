"""HE lowering: a canonical graph IR to an :class:`~hecompiler.heprog.HEProgram`.

Walks the graph in order and keeps, for every graph value, an encrypted
:class:`Tensor`: its ciphertexts, layout, level, scale, and a *pending
scalar* ``alpha`` (the real tensor is ``alpha * decrypt(cts)``).  Pending
scalars are how depth stays minimal:

* a scalar multiply or divide only changes ``alpha`` (no level);
* a linear op absorbs the ``alpha`` of its input into its weights;
* a polynomial substitutes ``alpha`` into its coefficients, and a degree-2
  ``A t^2 + B t + C`` is evaluated as ``A * ((t + B/2A)^2 + C'/A)``: one
  ciphertext product, one level, with ``A`` left pending;
* a residual ``Add`` makes both sides agree on ``alpha``, level and scale by
  adjusting the linear op that produced one side (its weights and the scale
  of its plaintexts are still free), and only multiplies when neither side
  can be adjusted;
* at an output the client multiplies by what is still pending.

Levels run down from the top (fresh) level.  Refreshes come from a
:class:`~hecompiler.refresh.RefreshPlan` (the planner's exact placement) when
one is given; an op that still needs more levels than its input has gets a
``refresh`` of that input first (greedy fallback, counted).  A skip source
read by several Adds is mod-switched once per level and fanned out.  Scales
are planned exactly: every rescale's result is the value the backends set,
every add sees equal scales.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from .errors import CompileBudgetError, LoweringError, LoweringInvariantError, OutOfLevelsError
from .opsem import SCALE_SNAP, OpSemanticsError, result_meta
from .heprog import HEProgram, Instr, IOSpec, LinearOp, Params, PlainRef
from .ir import Graph, Node, Value
from .layout import Layout, chw
from .layout_strategy import decimation, get_strategy
from .linear import (bias_vector, diag_keys, diag_signatures, matrix_entries, plaintext_encodings, plan_bsgs,
                     sharing_order, tensor_matrix)
from .plaintexts import default_op_cache_bytes
from .refresh import LevelModel, NodeInfo, RefreshPlan



@dataclass
class Emission:
    """The ``linear`` instruction of one linear op, kept so a later Add can
    still change the op's multiplier and output scale."""

    lin: int
    instr: int  # index of the ``linear`` instruction
    level_in: int
    scale_in: float


@dataclass
class Tensor:
    cts: list[int]
    layout: int
    level: int
    scale: float
    alpha: float = 1.0
    emission: Emission | None = None
    dirty: bool = False  # slots outside the layout may hold garbage


@dataclass
class LoweringOptions:
    #: weight of one new Galois key, in rotations, when choosing BSGS splits
    key_cost: float = 0.0
    #: the layout strategy (hecompiler.layout_strategy: "multiplexed", "gapped", "aligned"); None:
    #: "multiplexed", and the planner may try the others
    layout: str | None = None
    #: reuse a skip source's level alignment across the Adds it feeds (shared-source lowering)
    share_alignment: bool = True
    #: BSGS plans by (op structure, layouts), shared by the planner's candidates
    plan_cache: dict = field(default_factory=dict, repr=False, compare=False)
    #: time.monotonic() after which lowering stops with CompileBudgetError (None: no limit)
    deadline: float | None = field(default=None, repr=False, compare=False)
    #: a bootstrapping target's refresh input scaling: ``refresh_factor(level, scale, bound)``
    #: (hecompiler.target.Target.refresh_factor) and, per refresh of a tensor in program order,
    #: the largest |slot value| its ciphertexts reach (measured by the simulator)
    refresh_factor: Any = field(default=None, repr=False, compare=False)
    refresh_bounds: tuple[float, ...] | None = field(default=None, repr=False, compare=False)
    #: HE-program passes run on every lowered program (hecompiler.hepasses; "" for none)
    he_passes: str | None = None  # None: hecompiler.hepasses.DEFAULT_HE_PIPELINE
    #: what those passes price with (rotation costs by level, key sizes) and the memory budget
    #: they keep the Galois keys within (the planner sets both)
    cost: Any = field(default=None, repr=False, compare=False)
    max_memory_bytes: int | None = None


@dataclass
class LayerStat:
    node: str
    op: str
    layout_in: str
    layout_out: str
    rotations: int = 0
    diagonals: int = 0
    bound: float = 0.0  # 2 * sqrt(#diagonals)
    level_in: int = 0
    level_out: int = 0
    refreshes: int = 0


class Lowering:
    def __init__(self, graph: Graph, params: Params, primes: tuple[int, ...],
                 options: LoweringOptions | None = None, refresh_plan: RefreshPlan | None = None):
        self.g = graph
        self.opts = options or LoweringOptions()
        self.strategy = get_strategy(self.opts.layout)
        self.prog = HEProgram(params, tuple(primes))
        self.t: dict[int, Tensor] = {}
        self.meta: dict[int, tuple[int, float]] = {}
        self.layers: list[LayerStat] = []
        self.node: Node | None = None
        self.refresh_points: list[str] = []
        self.refresh_plan = refresh_plan
        self.unplanned_refreshes = 0  # refreshes the plan did not foresee (greedy fallback)
        self.refreshed_cts = 0
        self.refreshed_before: dict[str, int] = {}  # node output name -> ciphertexts refreshed for it
        self.refresh_groups: list[int] = []  # index of the first refresh instruction of each refreshed tensor
        self.node_view: dict[int, tuple] = {}  # id(node) -> (level, #ct, layout, alpha) when it was lowered
        self.level_model_nodes: list[NodeInfo] = []  # what this lowering observed, for planning
        # shared-source: a value's ciphertexts brought down to a level once, reused by every reader
        self._aligned: dict[tuple[int, int], Tensor] = {}
        self.shared_alignments = 0
        self.conversions = 0  # layout conversions (identity linear ops) the lowering inserted
        self.bsgs_plans: dict[int, Any] = {}  # linear op id -> its BSGS plan (for the HE passes)
        self.he_report = None  # the HE passes' PipelineReport
        self.he_notes: dict[str, Any] = {}  # what they reported (e.g. the rotation-key trade)

    # ================================================================== instruction emission
    @property
    def top(self) -> int:
        return self.prog.params.top_level

    @property
    def delta(self) -> float:
        return self.prog.params.scale

    def _emit(self, op: str, args: tuple[int, ...], *, step: int = 0, to_level: int = -1,
              plain: PlainRef | None = None, scale: float | None = None) -> int:
        p = self.prog.params
        try:
            level, s = result_meta(op, [self.meta[a] for a in args], self.prog.primes, p.top_level, p.scale,
                                   to_level=to_level, plain_scale=plain.scale if plain is not None else None,
                                   planned_scale=scale)
        except OpSemanticsError as e:
            raise LoweringInvariantError(f"{self._where()}: the lowering emitted an invalid {op}: {e}") from None
        out = self.prog.new_value()
        note = self.node.outputs[0].name if self.node is not None else ""
        self.prog.instrs.append(Instr(op, out, tuple(args), step, to_level, plain, level, s, note))
        self.meta[out] = (level, s)
        return out

    def rotate(self, v: int, k: int) -> int:
        k %= self.prog.params.slots
        return v if k == 0 else self._emit("rotate", (v,), step=k)

    def add(self, a: int, b: int) -> int:
        return self._emit("add", (a, b))

    def mod_switch(self, v: int, level: int) -> int:
        return v if self.meta[v][0] == level else self._emit("mod_switch", (v,), to_level=level)

    # ================================================================== tensors and layouts
    def layout_id(self, lay: Layout) -> int:
        for k, existing in enumerate(self.prog.layouts):
            if existing == lay:
                return k
        lay.check()
        self.prog.layouts.append(lay)
        return len(self.prog.layouts) - 1

    def layout(self, t: Tensor) -> Layout:
        return self.prog.layouts[t.layout]

    def tensor(self, v: Value) -> Tensor:
        t = self.t.get(id(v))
        if t is None:
            raise LoweringError(f"{self._where()}: operand %{v.name} is not an encrypted tensor "
                                f"(constant operands are only supported where noted)")
        return t

    def _where(self) -> str:
        return f"node {self.node.label}" if self.node is not None else "program"

    def weight(self, v: Value, suffix: str = "") -> str:
        name = v.name + suffix
        if name not in self.prog.weights:
            self.prog.weights[name] = np.asarray(v.data)
        return name

    def add_weight(self, name: str, data: np.ndarray) -> str:
        base, k = name, 0
        while name in self.prog.weights:
            k += 1
            name = f"{base}.{k}"
        self.prog.weights[name] = np.asarray(data)
        return name

    # ================================================================== levels
    def refresh(self, t: Tensor, planned: bool = False) -> Tensor:
        """Refresh every ciphertext of ``t``.  On a bootstrapping target whose bootstrap accepts a
        bounded range, the refresh first multiplies its input by a factor (the backends relabel the
        scale: no level, no error) so the measured bound fits, and the inverse stays pending."""
        factor = 1.0
        k = len(self.refresh_groups)
        if self.opts.refresh_factor is not None and self.opts.refresh_bounds is not None \
                and k < len(self.opts.refresh_bounds):
            factor = self.opts.refresh_factor(t.level, t.scale, self.opts.refresh_bounds[k])
        plain = PlainRef("scalar", (factor,), 1.0) if factor != 1.0 else None
        cts = [self._emit("refresh", (c,), plain=plain) for c in t.cts]
        self.refresh_groups.append(len(self.prog.instrs) - len(cts))
        where = self.node.outputs[0].name if self.node else "?"
        self.refresh_points.append(where)
        self.refreshed_before[where] = self.refreshed_before.get(where, 0) + len(cts)
        self.refreshed_cts += len(cts)
        if self.refresh_plan is not None and not planned:
            self.unplanned_refreshes += 1
        return Tensor(cts, t.layout, self.top, self.delta, t.alpha / factor, None, t.dirty)

    def need(self, v: Value, levels: int) -> Tensor:
        """The tensor of ``v`` with at least ``levels`` levels left (refreshing it
        if needed; the refreshed version replaces it for later users too)."""
        t = self.tensor(v)
        if levels > self.top:
            raise OutOfLevelsError(f"{self._where()}: needs {levels} levels but the modulus chain has "
                                f"{self.top}; choose a larger ring or more primes")
        if t.level < levels:
            t = self.refresh(t)
            self.t[id(v)] = t
        return t

    def to_level(self, t: Tensor, level: int) -> Tensor:
        if t.level == level:
            return t
        return Tensor([self.mod_switch(c, level) for c in t.cts], t.layout, level, t.scale, t.alpha, None, t.dirty)

    def shared_to_level(self, v: Value, t: Tensor, level: int) -> Tensor:
        """``to_level`` for a value read by several consumers (a skip source feeding
        several Adds): the mod-switched ciphertexts are made once and fanned out."""
        if t.level == level or not self.opts.share_alignment:
            return self.to_level(t, level)
        key = (id(v), level)
        hit = self._aligned.get(key)
        if hit is not None and hit.cts and self.meta.get(hit.cts[0]) == (level, t.scale) and hit.alpha == t.alpha \
                and hit.layout == t.layout:
            self.shared_alignments += 1
            return hit
        out = self.to_level(t, level)
        if len(v.uses) > 1:
            self._aligned[key] = out
        return out

    def annotate(self, node: Node) -> dict:
        """DOT annotations of a lowered node: levels, layout, refreshes before it."""
        view = self.node_view.get(id(node))  # as lowered (a later refresh of its output does not change it)
        if view is None:
            return {}
        level, n_ct, layout, alpha = view
        lines = [f"level {level}, {n_ct} ct", layout]
        if abs(alpha - 1.0) > 1e-12:
            lines.append(f"pending x{alpha:.3g}")
        extra: dict = {"lines": lines}
        k = self.refreshed_before.get(node.outputs[0].name, 0)
        if k:
            lines.append(f"REFRESH before: {k} ciphertext{'s' if k > 1 else ''}")
            extra.update(color="#d00000", penwidth="3")
        return extra

    def level_model(self) -> LevelModel:
        """The observed level model (drops per node, ciphertexts per value), for refresh planning."""
        n_ct = {v.name: len(t.cts) for v in self.g.values() if (t := self.t.get(id(v))) is not None}
        return LevelModel(self.level_model_nodes, n_ct, [v.name for v in self.g.inputs],
                          [v.name for v in self.g.outputs], self.top)

    # ================================================================== linear ops
    def choose_out_layout(self, node: Node, lin_in: Layout, out_shape, stride: int) -> Layout:
        """Layout for a conv/pool result, as the layout strategy says (the layout of the tensor
        it will be added to when known, else derived from the input's)."""
        return self.strategy.output_layout(lin_in, out_shape, stride, self._add_partner(node.output))

    def convert(self, t: Tensor, lay: Layout) -> Tensor:
        """``t`` in layout ``lay``: the same elements (in (c, h, w) order; the shapes may differ,
        as for a Reshape) at ``lay``'s positions, by an ``identity`` linear op (one level, the
        rotations of its diagonals).  Free when the positions are already those."""
        src = self.layout(t)
        if src.size != lay.size:
            raise LoweringInvariantError(f"{self._where()}: converting {src.describe()} to {lay.describe()}")
        if src.n_ct == lay.n_ct and np.array_equal(src.positions, lay.positions):
            return replace(t, layout=self.layout_id(lay))
        lin = LinearOp("identity", t.layout, self.layout_id(lay), src.shape, lay.shape, {},
                       note=self.node.outputs[0].name if self.node is not None else "")
        self.conversions += 1
        return self.linear_on(lin, t)

    def _convert_one(self, ta: Tensor, tb: Tensor) -> tuple[Tensor, Tensor, bool, bool]:
        """Two operands of an element-wise op in different layouts: convert one to the other's.
        The one with more levels left pays the conversion's level (on a tie, the one with fewer
        ciphertexts, which has fewer diagonals to apply)."""
        la, lb = self.layout(ta), self.layout(tb)
        if np.array_equal(la.positions, lb.positions) and la.n_ct == lb.n_ct:
            return ta, replace(tb, layout=ta.layout), False, False
        if (ta.level, -len(ta.cts)) >= (tb.level, -len(tb.cts)):
            return self.convert(ta, lb), tb, True, False
        return ta, self.convert(tb, la), False, True

    def _add_partner(self, v: Value) -> Layout | None:
        """Layout of the already-lowered other operand of the Add that
        consumes ``v`` alone, if any."""
        if len(v.uses) != 1 or v in self.g.outputs:
            return None
        user, idx = v.uses[0]
        if user.op not in ("Add", "Sub"):
            return None
        other = user.inputs[1 - idx]
        t = self.t.get(id(other))
        return self.layout(t) if t is not None else None

    def linear(self, lin: LinearOp, x_val: Value, out_scale: float | None = None) -> Tensor:
        """Emit linear op ``lin`` on the tensor of ``x_val`` (refreshed first, for every later reader
        too, when it has no level left)."""
        return self.linear_on(lin, self.need(x_val, 1), out_scale)

    def linear_on(self, lin: LinearOp, x: Tensor, out_scale: float | None = None) -> Tensor:
        """Emit linear op ``lin`` on tensor ``x`` (an operand of the node, or one made while
        lowering it).  Its result holds exact zeros off its layout's positions, whatever ``x``
        holds off its own (garbage in unused slots is fine: no diagonal reads it)."""
        if x.level < 1:
            x = self.refresh(x)
        lin.mult *= x.alpha
        lin_in = self.layout(x)
        lin.in_layout = x.layout
        lout = self.prog.layouts[lin.out_layout]
        self.prog.linears.append(lin)
        lid = len(self.prog.linears) - 1
        # the plan depends only on the op's structure and the two layouts: candidates of the planner
        # that share a ring degree share it (the cache lives in the options)
        ck = (lin.kind, json.dumps(lin.params, sort_keys=True), lin.in_shape, lin.out_shape, lin_in, lout,
              self.opts.key_cost)
        cached = self.opts.plan_cache.get(ck) if self.opts.key_cost == 0 else None
        if cached is None:
            keys = diag_keys(lin, self.prog.weights, lin_in, lout)
            if not keys:
                raise LoweringError(f"{self._where()}: the linear op is identically zero")
            plan = plan_bsgs(keys, lin_in.slots, self.opts.key_cost, set(self.prog.galois_steps))
            # identical plaintexts (polyphase convolutions repeat most diagonals): the output
            # ciphertexts that share them one after another, and what the executor's op-local
            # plaintext tier then encodes (one plaintext: N * primes of the input * 8 bytes)
            sigs = diag_signatures(lin, self.prog.weights, lin_in, lout)
            order = sharing_order(plan, sigs, lout)
            room = default_op_cache_bytes() // (self.prog.params.poly_degree * (x.level + 1) * 8)
            cached = plan, order, plaintext_encodings(plan, sigs, order, room), \
                matrix_entries(lin, self.prog.weights, lin_in, lout)
            if self.opts.key_cost == 0:
                self.opts.plan_cache[ck] = cached
        plan, order, (encodings, distinct), entries = cached
        lin.order = list(order)
        self.bsgs_plans[lid] = plan
        level = x.level
        target = self.delta if out_scale is None else out_scale
        q = self.prog.primes[level]
        s_pt = target * q / x.scale
        lin.n1 = plan.n1
        lin.steps = sorted(plan.steps())
        n_out = sum(1 for j in range(lout.n_ct) if j in plan.giant)
        lin.counts = {"rotate": plan.rotations, "mul_plain": plan.n_diagonals, "add": plan.n_adds,
                      "rescale": n_out, "plaintexts": encodings, "distinct_plaintexts": distinct}
        if entries is not None:  # what making its diagonals costs (hecompiler.costmodel)
            lin.counts["entries"] = entries
        if lin.params.get("bias"):
            lin.counts["add_plain"] = lout.n_ct
        # baby-step rotations of the inputs, held while the op runs (live ciphertexts beside its inputs)
        lin.counts["baby_rotations"] = sum(len([b for b in bs if b]) for bs in plan.baby.values())
        # products added into a giant step's accumulator (all but its first): a backend with an
        # in-place multiply-add (Lattigo's MulThenAdd) runs each as one op instead of a mul_plain and an add
        lin.counts["acc_adds"] = sum(len(t) - 1 for gs in plan.giant.values() for t in gs.values())
        # diagonals of one output ciphertext: what a backend holds in memory at once
        lin.counts["block_diagonals"] = max((sum(len(t) for t in gs.values()) for gs in plan.giant.values()),
                                            default=0)
        # every weight reaching an output ciphertext may be zero (pruned channels, rows that see only
        # padding): the backends then make an encryption of zero (plus the bias) at the planned level
        start = len(self.prog.instrs)
        outs = [self.prog.new_value() for _ in range(lout.n_ct)]
        note = self.node.outputs[0].name if self.node is not None else ""
        self.prog.instrs.append(Instr("linear", outs[0], tuple(x.cts), plain=PlainRef("diag", (lid,), s_pt),
                                      level=level - 1, scale=target, note=note, outs=tuple(outs)))
        for o in outs:
            self.meta[o] = (level - 1, target)
        stat = LayerStat(self.node.outputs[0].name, self.node.op, lin_in.describe(), lout.describe(),
                         plan.rotations, plan.n_diagonals, 2 * math.sqrt(plan.n_diagonals), level, level - 1)
        self.layers.append(stat)
        em = Emission(lid, start, level, x.scale)
        return Tensor(outs, lin.out_layout, level - 1, target, 1.0, em)

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

    def _normalize_output(self, v: Value, t: Tensor) -> Tensor:
        """Scale up the weights of a graph output's linear op when they are small, leaving the
        factor pending for the client.  Encoding rounds every plaintext to 1/scale, an error each
        product multiplies by the ciphertext's slots (garbage slots included), so small weights (a
        classifier after a sum-pooling, with a polynomial's leading coefficient pending) lose digits
        (see backends/sim.py).  ``k`` is the largest power of two keeping the op's gain, its largest
        absolute row sum (and bias), at most 1: the output's ciphertext values stay within its
        input's, so no level's modulus is approached that the input did not already approach."""
        if t.emission is None or v.uses or not self._feeds_only(v, t):
            return t
        lin = self.prog.linears[t.emission.lin]
        m = tensor_matrix(lin, self.prog.weights)
        gain = float(abs(m).sum(axis=1).max()) if m.nnz else 0.0
        b = bias_vector(lin, self.prog.weights)
        if b is not None and b.size:
            gain = max(gain, float(np.abs(b).max()))
        if not 0.0 < gain < 0.5:
            return t
        k = 2.0 ** min(math.floor(-math.log2(gain)), OUTPUT_GAIN_BITS)
        self._replan(t.emission, t.scale, k)
        return replace(t, alpha=t.alpha / k, emission=None)

    def _feeds_only(self, v: Value, t: Tensor) -> bool:
        """Whether the linear op that made ``t`` reaches ``v`` and nothing else (through scalar
        Mul/Div, Identity, Flatten...)."""
        p = v.producer
        src = next((u for u in p.inputs if not u.is_constant), None) if p is not None else None
        st = self.t.get(id(src)) if src is not None else None
        if st is None or st.emission is not t.emission:
            return True
        return self._adjustable(src, st, p)

    # ================================================================== alignment
    def _adjustable(self, v: Value, t: Tensor, user: Node) -> bool:
        if t.emission is None:
            return False
        # the emission may come through scalar Mul/Div, Identity, Flatten...: every value from the
        # linear op's output to ``v`` must feed only the next one, else replanning changes them too
        cur, nxt = v, user
        while True:
            if cur in self.g.outputs or len(cur.uses) != 1 or cur.uses[0][0] is not nxt:
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
            if _bad_alpha(lead.alpha) and (lead.level > follow.level or _bad_alpha(lead.alpha, HARD_ALPHA)):
                lead = self.materialize(lead)
            self._replan(follow.emission, lead.scale, follow.alpha / lead.alpha)
            follow = Tensor(follow.cts, follow.layout, follow.level, lead.scale, lead.alpha, None, follow.dirty)
            lv = min(follow.level, lead.level)
            lead_v = vb if fv is va else va
            follow, lead = self.to_level(follow, lv), self.shared_to_level(lead_v, lead, lv)
            return (follow, lead) if fv is va else (lead, follow)
        # neither adjustable: multiply the side with more levels by alpha ratio at a chosen scale
        if _bad_alpha(ta.alpha) or _bad_alpha(tb.alpha):
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

    # ================================================================== polynomials
    def poly(self, x_val: Value, coeffs) -> Tensor:
        c = np.trim_zeros(np.asarray(coeffs, np.float64), "b")
        deg = len(c) - 1
        if deg < 1:
            raise LoweringError(f"{self._where()}: polynomial is constant; the result does not depend on the input")
        depth = _poly_depth(deg)
        # degree >= 3 multiplies powers of the ciphertext itself, which holds t/alpha: with a small
        # alpha (the 1/B an approximating pass puts in front to map [-B, B] to [-1, 1]) its high powers
        # overflow, so fold alpha into the producing linear op when nothing else reads it (free), else
        # multiply it out (one level)
        t0 = self.tensor(x_val)
        unit = deg >= 3 and abs(t0.alpha) < 0.5
        fold = unit and t0.level >= depth and self._adjustable(x_val, t0, self.node)
        extra = 1 if (_bad_alpha(t0.alpha, HARD_ALPHA) or unit) and not fold else 0
        x = self.need(x_val, depth + extra)
        if fold:
            self._replan(x.emission, x.scale, x.alpha)
            x = replace(x, alpha=1.0, emission=None)
        elif _bad_alpha(x.alpha, HARD_ALPHA) or unit:  # powers of a far-off alpha would overflow
            x = self.materialize(x)
        a = x.alpha
        cs = c * a ** np.arange(deg + 1)  # coefficients in the ciphertext's own variable
        lead = cs[-1]
        lay = x.layout
        if x.dirty:
            raise LoweringError(f"{self._where()}: polynomial of a tensor with garbage slots (after a "
                                f"rotate-and-sum) is not supported yet")
        if deg == 1:
            cts = [self._fill_add(ct, cs[0] / lead, lay, j, x.scale) for j, ct in enumerate(x.cts)]
            return Tensor(cts, lay, x.level, x.scale, lead)
        if deg == 2:
            k = cs[1] / (2 * lead)
            c0 = cs[0] / lead - k * k
            out = []
            for j, ct in enumerate(x.cts):
                u = self._fill_add(ct, k, lay, j, x.scale)
                sq = self._emit("mul", (u, u))
                r = self._emit("rescale", (sq,))
                out.append(self._fill_add(r, c0, lay, j, self.meta[r][1]))
            lvl, sc = self.meta[out[0]]
            return Tensor(out, lay, lvl, sc, lead)
        # degree >= 3: powers by repeated squaring-style products (depth ceil(log2 i)),
        # then sum of scalar multiples aligned to the leading power's level and scale
        out = []
        for j, ct in enumerate(x.cts):
            pw = {1: ct}
            for i in range(2, deg + 1):
                hi = 1 << (i - 1).bit_length() - 1
                a_, b_ = pw[hi], pw[i - hi]
                la, lb = self.meta[a_][0], self.meta[b_][0]
                lv = min(la, lb)
                prod = self._emit("mul", (self.mod_switch(a_, lv), self.mod_switch(b_, lv)))
                pw[i] = self._emit("rescale", (prod,))
            lvl_t = min(self.meta[pw[deg]][0],
                        min((self.meta[pw[i]][0] - 1 for i in range(1, deg) if cs[i] != 0), default=self.top))
            s_t = self.meta[pw[deg]][1]
            acc = self.mod_switch(pw[deg], lvl_t)
            for i in range(1, deg):
                if cs[i] == 0:
                    continue
                src = self.mod_switch(pw[i], lvl_t + 1)
                q = self.prog.primes[lvl_t + 1]
                s_pt = s_t * q / self.meta[src][1]
                m = self._emit("mul_plain", (src,), plain=PlainRef("scalar", (float(cs[i] / lead),), s_pt))
                acc = self.add(acc, self._emit("rescale", (m,), scale=s_t))
            out.append(self._fill_add(acc, cs[0] / lead, lay, j, s_t))
        lvl, sc = self.meta[out[0]]
        return Tensor(out, lay, lvl, sc, lead)

    def _fill_add(self, ct: int, value, lay: int, j: int, scale: float) -> int:
        """ct + value on the real slots of layout ``lay`` (value: scalar or per-channel name)."""
        if isinstance(value, (float, np.floating, int)) and value == 0:
            return ct
        if isinstance(value, (float, np.floating, int)):
            value = float(value)
        return self._emit("add_plain", (ct,), plain=PlainRef("fill", (lay, j, value), scale))

    # ================================================================== driver
    def run(self) -> HEProgram:
        g = self.g
        params = self.prog.params
        dec = decimation(g)
        for v in g.inputs:
            for user, idx in v.uses:
                if idx > 0 and user.op in _CONST_OPERANDS:
                    raise LoweringError(f"node {user.label}: operand {idx} (%{v.name}) is a graph input, but "
                                        f"{user.op} {_CONST_OPERANDS[user.op]} must be constants (only the "
                                        f"data is encrypted); make it an initializer")
            try:
                shape = chw(v.type.shape, fold_batch=True)  # a batch: stacked by batch-to-channels
            except LoweringError as e:
                raise LoweringError(f"input %{v.name}: {e}") from None
            batch = int(v.type.shape[0]) if v.type.rank >= 2 else 1
            lay = self.layout_id(self.strategy.input_layout(shape, params.slots, batch, dec.get(v.name, 1)))
            cts = [self.prog.new_value() for _ in range(self.prog.layouts[lay].n_ct)]
            for c in cts:
                self.meta[c] = (self.top, self.delta)
            self.prog.inputs.append(IOSpec(v.name, tuple(v.type.shape), lay, cts))
            self.t[id(v)] = Tensor(cts, lay, self.top, self.delta)
        for k_node, node in enumerate(g.nodes):
            self.node = node
            if self.opts.deadline is not None and time.monotonic() > self.opts.deadline:
                raise CompileBudgetError(f"planning ran out of its compile time budget while lowering node "
                                         f"{k_node + 1} of {len(g.nodes)} ({node.label}) at N={self.prog.params.poly_degree}; raise --max-compile-seconds or give a smaller input "
                                         f"(--input-shape)")
            fn = LOWERINGS.get(node.op)
            if fn is None:
                raise LoweringError(_unsupported(node))
            enc = [v for v in dict.fromkeys(node.inputs) if id(v) in self.t]
            planned = self.refresh_plan.before.get(node.outputs[0].name, ()) if self.refresh_plan else ()
            for v in enc:
                if v.name in planned and self.t[id(v)].level < self.top:
                    self.t[id(v)] = self.refresh(self.t[id(v)], planned=True)
            n_layers = len(self.layers)
            res = fn(self, node)
            if res is not None:
                self.t[id(node.output)] = res
                self.node_view[id(node)] = (res.level, len(res.cts), self.layout(res).describe(), res.alpha)
                lo = min((self.t[id(v)].level for v in enc), default=self.top)
                rot = sum(st.rotations for st in self.layers[n_layers:])
                self.level_model_nodes.append(NodeInfo(node.outputs[0].name, tuple(v.name for v in enc),
                                                       node.outputs[0].name, max(0, lo - res.level),
                                                       1e-3 * (rot + 1)))
        self.node = None
        for v in g.outputs:
            t = self._normalize_output(v, self.tensor(v))
            self.prog.outputs.append(IOSpec(v.name, tuple(v.type.shape), t.layout, list(t.cts), float(t.alpha)))
        return self.prog

    # ------------------------------------------------------------------ helpers of the lowering rules
    def _const_operand(self, node: Node) -> tuple[Value, Value] | None:
        a, b = node.inputs
        if a.is_constant and not b.is_constant:
            return b, a
        if b.is_constant and not a.is_constant:
            return a, b
        return None

    def _sum_window(self, ct: int, count: int, stride: int) -> int:
        """Slot k gets sum_{i<count} x[k + i*stride] (rotate-and-sum, ~2 log2 count rotations)."""
        if count == 1:
            return ct
        half = 1 << (count.bit_length() - 1)
        if half == count:
            acc = ct
            n = 1
            while n < count:
                acc = self.add(acc, self.rotate(acc, n * stride))
                n *= 2
            return acc
        head = self._sum_window(ct, half, stride)
        tail = self._sum_window(self.rotate(ct, half * stride), count - half, stride)
        return self.add(head, tail)

    def _channel_const(self, k: np.ndarray, xv: Value, node: Node, scale: float = 1.0):
        """A constant operand as a fill value: a float, or a per-channel weight name."""
        C, H, W = chw(xv.type.shape)
        k = np.broadcast_to(k, xv.type.shape).reshape(C, H * W)
        if np.all(k == k.reshape(-1)[0]):
            return float(k.reshape(-1)[0] * scale)
        if np.all(k == k[:, :1]):
            return self.add_weight(node.output.name + ".const", k[:, 0] * scale)
        return self.add_weight(node.output.name + ".const", k.reshape(-1) * scale)


# ====================================================================== per-op lowering rules
#: ONNX/IR op -> its lowering rule ``rule(low, node) -> Tensor``: ``low`` is the
#: :class:`Lowering` (the program builder: levels, scales, layouts, refreshes, linear ops and
#: polynomials), ``node`` the graph node; the rule returns the node's output tensor.  Rules are
#: registered by op with :func:`lowers`, as the frontend registers its lifters; an op without
#: one is refused with a one-line error naming the node.
LOWERINGS: dict[str, Callable[["Lowering", Node], "Tensor | None"]] = {}


def lowers(*ops: str):
    """Register a lowering rule for ``ops`` (a later registration of an op replaces the earlier)."""
    def deco(fn):
        for op in ops:
            LOWERINGS[op] = fn
        return fn
    return deco


@lowers("Conv")
def _lower_conv(low: "Lowering", node: Node) -> Tensor:
    x = node.inputs[0]
    w = node.inputs[1]
    if not w.is_constant:
        raise LoweringError(f"{low._where()}: Conv weights must be constants (encrypted weights are "
                            f"not supported)")
    t = low.tensor(x)
    in_shape, out_shape = chw(x.type.shape), chw(node.output.type.shape)
    lout = low.choose_out_layout(node, low.layout(t), out_shape, node.attrs["strides"][0]
                                 if node.attrs["strides"][0] == node.attrs["strides"][1] else 1)
    params = {"weight": low.weight(w), "strides": list(node.attrs["strides"]), "pads": list(node.attrs["pads"]),
              "dilations": list(node.attrs["dilations"]), "group": node.attrs["group"]}
    if len(node.inputs) > 2:
        params["bias"] = low.weight(node.inputs[2])
    lin = LinearOp("conv", t.layout, low.layout_id(lout), in_shape, out_shape, params, note=node.output.name)
    return low.linear(lin, x)


@lowers("AveragePool")
def _lower_averagepool(low: "Lowering", node: Node) -> Tensor:
    x = node.inputs[0]
    t = low.tensor(x)
    a = node.attrs
    in_shape, out_shape = chw(x.type.shape), chw(node.output.type.shape)
    stride = a["strides"][0] if a["strides"][0] == a["strides"][1] else 1
    lout = low.choose_out_layout(node, low.layout(t), out_shape, stride)
    params = {"kernel": list(a["kernel_shape"]), "strides": list(a["strides"]), "pads": list(a["pads"]),
              "count_include_pad": a["count_include_pad"]}
    lin = LinearOp("pool", t.layout, low.layout_id(lout), in_shape, out_shape, params, note=node.output.name)
    return low.linear(lin, x)


@lowers("BatchNormalization")
def _lower_batchnormalization(low: "Lowering", node: Node) -> Tensor:
    x = node.inputs[0]
    if not all(v.is_constant for v in node.inputs[1:]):
        raise LoweringError(f"{low._where()}: BatchNormalization parameters must be constants")
    scale, beta, mean, var = (v.data.astype(np.float64) for v in node.inputs[1:])
    s = scale / np.sqrt(var + node.attrs["epsilon"])
    t = low.tensor(x)
    shape = chw(x.type.shape)
    params = {"weight": low.add_weight(node.output.name + ".scale", s),
              "bias": low.add_weight(node.output.name + ".shift", beta - mean * s)}
    lin = LinearOp("affine", t.layout, t.layout, shape, shape, params, note=node.output.name)
    return low.linear(lin, x)


@lowers("Gemm")
def _lower_gemm(low: "Lowering", node: Node) -> Tensor:
    a = node.attrs
    x, w = node.inputs[0], node.inputs[1]
    if not w.is_constant or (len(node.inputs) > 2 and not node.inputs[2].is_constant):
        raise LoweringError(f"{low._where()}: Gemm B and C must be constants")
    if a["transA"] or x.type.shape[0] != 1:
        raise LoweringError(f"{low._where()}: Gemm needs A of shape [1, K] without transA")
    wm = w.data.astype(np.float64)
    wm = (wm if a["transB"] else wm.T) * a["alpha"]  # [N, K]
    t = low.tensor(x)
    n = wm.shape[0]
    params = {"weight": low.add_weight(node.output.name + ".matrix", wm)}
    if len(node.inputs) > 2:
        c = np.broadcast_to(node.inputs[2].data.astype(np.float64) * a["beta"], (1, n)).reshape(-1)
        params["bias"] = low.add_weight(node.output.name + ".bias", c)
    lout = low.layout_id(Layout.vector(n, low.prog.params.slots))
    lin = LinearOp("matrix", t.layout, lout, chw(x.type.shape), (n, 1, 1), params, note=node.output.name)
    return low.linear(lin, x)


@lowers("MatMul")
def _lower_matmul(low: "Lowering", node: Node) -> Tensor:
    x, w = node.inputs
    if not w.is_constant or w.type.rank != 2 or x.type.rank != 2:
        raise LoweringError(f"{low._where()}: only [1, K] @ constant [K, N] MatMul is supported")
    n = w.type.shape[1]
    t = low.tensor(x)
    params = {"weight": low.add_weight(node.output.name + ".matrix", w.data.astype(np.float64).T)}
    lout = low.layout_id(Layout.vector(n, low.prog.params.slots))
    lin = LinearOp("matrix", t.layout, lout, chw(x.type.shape), (n, 1, 1), params, note=node.output.name)
    return low.linear(lin, x)


@lowers("GlobalAveragePool")
def _lower_globalaveragepool(low: "Lowering", node: Node) -> Tensor:
    x = node.inputs[0]
    t = low.tensor(x)
    lay = low.layout(t)
    C, H, W = chw(x.type.shape)
    if lay.channel_straddles or lay.hs == 0 and H > 1 or lay.phase > 1:
        # rotations cannot sum across ciphertexts (nor a channel's phases, which lie apart): a
        # block-matrix average instead, each channel's result where its phase (0, 0) was
        out = Layout((C, 1, 1), lay.slots, lay.n_ct, lay.pos[::lay.phase ** 2], 0, 0, "flat", lay.gap, (0, 0),
                     lay.per_fp)
        lin = LinearOp("gap", t.layout, low.layout_id(out), (C, H, W), (C, 1, 1), {}, note=node.output.name)
        return low.linear(lin, x)
    cts = list(t.cts)
    rots = 0
    for count, stride in ((W, lay.ws), (H, lay.hs)):
        if count > 1:
            cts = [low._sum_window(c, count, stride) for c in cts]
            rots += _sum_rotations(count) * len(cts)
    out = Layout((C, 1, 1), lay.slots, lay.n_ct, lay.pos, 0, 0, "sum", lay.gap, (0, 0), lay.per_fp)
    lid = low.layout_id(out)
    low.layers.append(LayerStat(node.outputs[0].name, node.op, lay.describe(), out.describe(), rots, 0, 0,
                                t.level, t.level))
    return Tensor(cts, lid, t.level, t.scale, t.alpha / (H * W), None, True)


@lowers("Flatten", "Reshape")
def _lower_reshape(low: "Lowering", node: Node) -> Tensor:
    x = node.inputs[0]
    t = low.tensor(x)
    lay = low.layout(t)
    new_shape = chw(node.output.type.shape, fold_batch=True)  # the same elements in the same order
    if new_shape == lay.shape:
        return t
    if new_shape[1:] == (1, 1):
        pos = tuple(int(p) for p in lay.positions)
        out = Layout(new_shape, lay.slots, lay.n_ct, pos, 0, 0, "flat", 1, (0, 0), 1)
        return replace(t, layout=low.layout_id(out), emission=t.emission)
    # the same elements in (c, h, w) order, laid out afresh for the new shape
    return low.convert(low.need(x, 1), Layout.compact(new_shape, lay.slots))


@lowers("Identity", "Dropout")
def _lower_identity(low: "Lowering", node: Node) -> Tensor:
    return low.tensor(node.inputs[0])


@lowers("Add")
def _lower_add(low: "Lowering", node: Node, negate_b: bool = False) -> Tensor:
    co = low._const_operand(node)
    if co is not None:
        xv, cv = co
        t = low.tensor(xv)
        k = cv.data.astype(np.float64)
        if negate_b and node.inputs[0] is cv:  # c - x
            t = replace(t, alpha=-t.alpha, emission=None)
        elif negate_b:
            k = -k
        name = low._channel_const(k, xv, node, scale=1.0 / t.alpha)
        cts = [low._fill_add(c, name, t.layout, j, t.scale) for j, c in enumerate(t.cts)]
        return Tensor(cts, t.layout, t.level, t.scale, t.alpha, None, t.dirty)
    a, b = node.inputs
    if a is b:
        if negate_b:
            raise LoweringError(f"{low._where()}: x - x is identically zero")
        t = low.tensor(a)
        return replace(t, alpha=2.0 * t.alpha, emission=None)
    ta, tb = low.align(a, b)
    op = "sub" if negate_b else "add"
    cts = [low._emit(op, (x, y)) for x, y in zip(ta.cts, tb.cts)]
    return Tensor(cts, ta.layout, ta.level, ta.scale, ta.alpha, None, ta.dirty or tb.dirty)


@lowers("Sub")
def _lower_sub(low: "Lowering", node: Node) -> Tensor:
    return _lower_add(low, node, negate_b=True)


@lowers("Mul")
def _lower_mul(low: "Lowering", node: Node) -> Tensor:
    co = low._const_operand(node)
    if co is not None:
        xv, cv = co
        t = low.tensor(xv)
        k = cv.data.astype(np.float64)
        if k.size == 1:
            if float(k.reshape(-1)[0]) == 0.0:
                raise LoweringError(f"{low._where()}: multiplication by zero (result does not depend "
                                    f"on the input)")
            return replace(t, alpha=t.alpha * float(k.reshape(-1)[0]))
        t = low.need(xv, 1)
        name = low._channel_const(k, xv, node)
        q = low.prog.primes[t.level]
        cts = []
        for j, c in enumerate(t.cts):
            m = low._emit("mul_plain", (c,), plain=PlainRef("fill", (t.layout, j, name), q))
            cts.append(low._emit("rescale", (m,), scale=t.scale))
        return Tensor(cts, t.layout, t.level - 1, t.scale, t.alpha, None, False)  # the fill masks garbage
    a, b = node.inputs
    if a is b:
        return low.poly(a, [0.0, 0.0, 1.0])
    ta, tb = low.need(a, 1), low.need(b, 1)
    if ta.layout != tb.layout:
        ta, tb, _, _ = low._convert_one(ta, tb)
        if min(ta.level, tb.level) < 1:  # the conversion took the last level of the lower operand
            ta, tb = (low.refresh(ta) if ta.level < 1 else ta), (low.refresh(tb) if tb.level < 1 else tb)
    lv = min(ta.level, tb.level)
    ta, tb = low.to_level(ta, lv), low.to_level(tb, lv)
    cts = []
    for x, y in zip(ta.cts, tb.cts):
        cts.append(low._emit("rescale", (low._emit("mul", (x, y)),)))
    lvl, sc = low.meta[cts[0]]
    return Tensor(cts, ta.layout, lvl, sc, ta.alpha * tb.alpha, None, ta.dirty or tb.dirty)


@lowers("Div")
def _lower_div(low: "Lowering", node: Node) -> Tensor:
    x, c = node.inputs
    if not c.is_constant or c.data.size != 1 or x.is_constant:
        raise LoweringError(f"{low._where()}: only division by a scalar constant is supported")
    k = float(c.data.reshape(-1)[0])
    if k == 0:
        raise LoweringError(f"{low._where()}: division by zero")
    t = low.tensor(x)
    return replace(t, alpha=t.alpha / k)


@lowers("Poly")
def _lower_poly(low: "Lowering", node: Node) -> Tensor:
    return low.poly(node.inputs[0], node.attrs["coeffs"])


@lowers("Pow")
def _lower_pow(low: "Lowering", node: Node) -> Tensor:
    x, e = node.inputs
    if not e.is_constant or e.data.size != 1 or float(e.data.reshape(-1)[0]) != int(e.data.reshape(-1)[0]) \
            or not 1 <= int(e.data.reshape(-1)[0]) <= 64:
        raise LoweringError(f"{low._where()}: only integer powers 1..64 by a constant are supported")
    k = int(e.data.reshape(-1)[0])
    return low.poly(x, [0.0] * k + [1.0])


#: |log2 alpha| above which a pending scalar is multiplied out when it is free (a spare level)
SOFT_ALPHA = 6.0
#: ... and above which it is multiplied out even at the cost of a level
HARD_ALPHA = 20.0


#: the most a graph output's linear op is scaled up by (2^k; see Lowering._normalize_output)
OUTPUT_GAIN_BITS = 24


def _bad_alpha(alpha: float, limit: float = SOFT_ALPHA) -> bool:
    return alpha == 0 or abs(math.log2(abs(alpha))) > limit


def _poly_depth(deg: int) -> int:
    return 1 if deg <= 2 else max(1, (deg - 1).bit_length()) + 1


def _sum_rotations(count: int) -> int:
    if count <= 1:
        return 0
    half = 1 << (count.bit_length() - 1)
    if half == count:
        return count.bit_length() - 1
    return _sum_rotations(half) + 1 + _sum_rotations(count - half)


#: ops whose operands after the first must be compile-time constants
_CONST_OPERANDS = {"Conv": "weights and bias", "Gemm": "B and C", "MatMul": "weights",
                   "BatchNormalization": "parameters", "Pow": "exponents", "Div": "divisors"}

_NOT_HE = {
    "Relu": "ReLU is not a polynomial: compile with --calibration X.npy (or --relu-range LO:HI) so the "
            "relu-to-poly pass replaces it by a fitted polynomial, or train the model with a polynomial activation",
    "Clip": "Clip/ReLU6 is not a polynomial: compile with --calibration X.npy (or --relu-range LO:HI) so the "
            "relu-to-poly pass replaces it by a fitted polynomial",
    "MaxPool": "MaxPool is not linear: compile with --maxpool avg to replace it by AveragePool (approximating) or "
               "--maxpool poly for a polynomial max (with --calibration)",
}


def _unsupported(node: Node) -> str:
    why = _NOT_HE.get(node.op, "this op has no HE lowering yet")
    return f"node {node.label}: cannot run {node.op} under encryption: {why}"


def lower(graph: Graph, params: Params, primes, options: LoweringOptions | None = None,
          refresh_plan: RefreshPlan | None = None) -> tuple[HEProgram, Lowering]:
    """Lower ``graph`` to an HE program, then run the HE-program passes of the options (by
    default :data:`hecompiler.hepasses.DEFAULT_HE_PIPELINE`: mod-switch sharing, hoisting where
    the cost model's backend hoists, rotation-key selection within the memory budget)."""
    low = Lowering(graph, params, primes, options, refresh_plan)
    prog = low.run()
    run_he_passes(prog, low)
    return prog, low


def run_he_passes(prog: HEProgram, low: Lowering) -> None:
    from .hepasses import DEFAULT_HE_PIPELINE
    from .passmanager import PassManager

    opts = low.opts
    spec = DEFAULT_HE_PIPELINE if opts.he_passes is None else opts.he_passes
    if not spec:
        return
    # refresh groups are instruction indices: passes insert and remove instructions, so follow them
    # by the value each group's first refresh defines
    group_values = [prog.instrs[k].out for k in low.refresh_groups]
    ctx = {"cost": opts.cost, "max_memory_bytes": opts.max_memory_bytes, "bsgs_plans": low.bsgs_plans}
    pm = PassManager(spec, options=ctx)
    low.he_report = pm.run(prog)
    low.he_notes = {k: v for k, v in pm.ctx.options.items() if k not in ctx}
    where = {ins.out: k for k, ins in enumerate(prog.instrs) if ins.op == "refresh"}
    low.refresh_groups = [where[v] for v in group_values]


# the data-movement ops' rules live in their own module (registered on import)
from . import lower_moves  # noqa: E402,F401
