"""HE lowering: a canonical graph IR to an :class:`~hecompiler.heprog.HEProgram`.

Walks the graph in order and keeps, for every graph value, an encrypted
:class:`Tensor`: its ciphertexts, layout, level, scale, and a *pending
scalar* ``alpha`` (the real tensor is ``alpha * decrypt(cts)``).  Each op is
lowered by the rule registered for it (:func:`lowers`; the data-movement ops
in :mod:`hecompiler.lower_moves`).  The parts live in their own modules:

* :mod:`hecompiler.progbuilder`: emitting instructions, with the level and
  scale of each from the one op-semantics table (:mod:`hecompiler.opsem`);
* :mod:`hecompiler.lower_align`: pending scalars, and bringing two operands
  to one alpha, level and scale (re-planning the linear op that made one);
* :mod:`hecompiler.layout_strategy`: which layout each tensor takes;
* :mod:`hecompiler.lower_observe`: statistics and the level model, recorded
  as observers of the lowering's events.

A degree-2 polynomial ``A t^2 + B t + C`` is evaluated as
``A * ((t + B/2A)^2 + C'/A)``: one ciphertext product, one level, with ``A``
left pending.  Levels run down from the top (fresh) level.  Refreshes come
from a :class:`~hecompiler.refresh.RefreshPlan` (the planner's exact
placement) when one is given; an op that still needs more levels than its
input has gets a ``refresh`` of that input first (greedy fallback, counted).
A skip source read by several Adds is mod-switched once per level and fanned
out.  Scales are planned exactly: every rescale's result is the value the
backends set, every add sees equal scales.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from .arrays import distinct
from .costmodel import CostModel
from .errors import CompileBudgetError, HecError, LoweringError, LoweringInvariantError, OutOfLevelsError
from .heprog import HEProgram, Instr, IOSpec, LinearOp, Params, PlainRef
from .ir import Graph, Node, Value
from .layout import Layout, chw
from .layout_strategy import decimation, get_strategy
from .linear import diag_keys, diag_signatures, matrix_entries, plaintext_encodings, plan_bsgs, sharing_order
from .plaintexts import default_op_cache_bytes
from .lower_align import HARD_ALPHA, Emission, PendingScalars, Tensor, bad_alpha
from .lower_observe import LayerStat, LevelObserver, LoweringStats, Observer
from .progbuilder import ProgramBuilder
from .refresh import LevelModel, RefreshPlan



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
    #: more observers of the lowering's events (hecompiler.lower_observe.Observer)
    observers: tuple = field(default=(), repr=False, compare=False)


class Lowering(ProgramBuilder, PendingScalars):
    """Lowers a graph, node by node, through the rules registered with :func:`lowers`.  It is a
    :class:`~hecompiler.progbuilder.ProgramBuilder` (levels and scales of what it emits) and
    keeps pending scalars with :class:`~hecompiler.lower_align.PendingScalars`; what it did is
    recorded by its observers (:mod:`hecompiler.lower_observe`): ``stats`` and ``levels``, plus
    those of ``LoweringOptions.observers``."""

    def __init__(self, graph: Graph, params: Params, primes: tuple[int, ...],
                 options: LoweringOptions | None = None, refresh_plan: RefreshPlan | None = None):
        ProgramBuilder.__init__(self, params, primes)
        self.g = graph
        self.opts = options or LoweringOptions()
        self.strategy = get_strategy(self.opts.layout)
        self.t: dict[int, Tensor] = {}
        self.refresh_plan = refresh_plan
        self.refresh_groups: list[int] = []  # index of the first refresh instruction of each refreshed tensor
        # shared-source: a value's ciphertexts brought down to a level once, reused by every reader
        self._aligned: dict[tuple[int, int], Tensor] = {}
        self.bsgs_plans: dict[int, Any] = {}  # linear op id -> its BSGS plan (for the HE passes)
        self.he_report = None  # the HE passes' PipelineReport
        self.he_notes: dict[str, Any] = {}  # what they reported (e.g. the rotation-key trade)
        self.stats = LoweringStats(planned=refresh_plan is not None)
        self.levels = LevelObserver()
        self.observers: list[Observer] = [self.stats, self.levels, *self.opts.observers]

    def tell(self, event: str, *args) -> None:
        """Send an event (``on_linear``, ``on_refresh``...) to every observer."""
        for o in self.observers:
            getattr(o, event)(*args)

    # ================================================================== tensors and layouts
    def layout(self, t: Tensor) -> Layout:
        return self.prog.layouts[t.layout]

    def tensor(self, v: Value) -> Tensor:
        t = self.t.get(id(v))
        if t is None:
            raise LoweringError(f"{self._where()}: operand %{v.name} is not an encrypted tensor "
                                f"(constant operands are only supported where noted)")
        return t

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
        self.tell("on_refresh", self._note() or "?", len(cts), planned)
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
            self.tell("on_shared_alignment")
            return hit
        out = self.to_level(t, level)
        if len(v.uses) > 1:
            self._aligned[key] = out
        return out

    def level_model(self) -> LevelModel:
        """The observed level model (drops per node, ciphertexts per value), for refresh planning."""
        n_ct = {v.name: len(t.cts) for v in self.g.values() if (t := self.t.get(id(v))) is not None}
        return self.levels.level_model(self.g, n_ct, self.top)

    def annotate(self, node: Node) -> dict:
        """DOT annotations of a lowered node: levels, layout, refreshes before it."""
        return self.levels.annotate(node, self.stats.refreshed_before)

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
        if src.n_ct == lay.n_ct and np.array_equal(src.positions, lay.positions) and lay.cyc >= src.cyc:
            return replace(t, layout=self.layout_id(lay))  # (copies a layout does not count are harmless)
        lin = LinearOp("identity", t.layout, self.layout_id(lay), src.shape, lay.shape, {},
                       note=self._note())
        self.tell("on_conversion")
        return self.linear_on(lin, t)

    def _convert_one(self, ta: Tensor, tb: Tensor) -> tuple[Tensor, Tensor, bool, bool]:
        """Two operands of an element-wise op in different layouts: convert one to the other's.
        The one with more levels left pays the conversion's level (on a tie, the one with fewer
        ciphertexts, which has fewer diagonals to apply)."""
        la, lb = self.layout(ta), self.layout(tb)
        if np.array_equal(la.positions, lb.positions) and la.n_ct == lb.n_ct:
            # the same positions: the layout that promises fewer copies holds for both
            if la.cyc >= lb.cyc:
                return ta, replace(tb, layout=ta.layout), False, False
            return replace(ta, layout=tb.layout), tb, False, False
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
        final = lin.out_layout
        if lout.cyc < lin_in.cyc:
            # a result more replicated than the input: the op writes one copy, in the input's
            # period (zeros in the rest of it), and rotations by halves of it copy that copy
            lout = replace(lout, period=lin_in.period)
            lin.out_layout = self.layout_id(lout)
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
                matrix_entries(lin, self.prog.weights, lin_in, lout), sigs is not None
            if self.opts.key_cost == 0:
                self.opts.plan_cache[ck] = cached
        plan, order, (encodings, distinct, made), entries, signed = cached
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
            lin.counts["entries"] = int(entries.sum())
        if entries is not None and signed:
            # those of the output ciphertexts whose diagonals are made: the others' plaintexts are
            # all held, found by signature (hecompiler.plaintexts.PlaintextFactory.share_key)
            lin.counts["entries_made"] = int(entries[made].sum())
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
        note = self._note()
        self.prog.instrs.append(Instr("linear", outs[0], tuple(x.cts), plain=PlainRef("diag", (lid,), s_pt),
                                      level=level - 1, scale=target, note=note, outs=tuple(outs)))
        for o in outs:
            self.meta[o] = (level - 1, target)
        cts, cur, want = outs, lout.cyc, self.prog.layouts[final].cyc
        while cur > want:
            cur //= 2
            cts = [self.add(c, self.rotate(c, cur)) for c in cts]
        copies = len(self.prog.instrs) - start - 1
        self.tell("on_linear", LayerStat.of(self._note(), self.node.op if self.node else "", lin_in.describe(),
                                            self.prog.layouts[final].describe(), plan.rotations + copies // 2,
                                            plan.n_diagonals, level))
        em = Emission(lid, start, level, x.scale, tuple(range(start + 1, len(self.prog.instrs))))
        return Tensor(cts, final, level - 1, target, 1.0, em)

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
        extra = 1 if (bad_alpha(t0.alpha, HARD_ALPHA) or unit) and not fold else 0
        x = self.need(x_val, depth + extra)
        if fold:
            self._replan(x.emission, x.scale, x.alpha)
            x = replace(x, alpha=1.0, emission=None)
        elif bad_alpha(x.alpha, HARD_ALPHA) or unit:  # powers of a far-off alpha would overflow
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
            self.tell("on_node_start", node)
            res = fn(self, node)
            if res is not None:
                self.t[id(node.output)] = res
                lo = min((self.t[id(v)].level for v in enc), default=self.top)
                self.tell("on_node_end", node, res.level, len(res.cts), self.layout(res).describe(), res.alpha,
                          tuple(v.name for v in enc), lo)
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
    lout = low.layout_id(matrix_out_layout(low.layout(t), wm, matrix_prices(low, t.level)))
    lin = LinearOp("matrix", t.layout, lout, chw(x.type.shape), (n, 1, 1), params, note=node.output.name)
    return low.linear(lin, x)


#: a later candidate layout of a dense matrix's outputs must be this much cheaper to be chosen: the
#: earlier ones (consecutive slots) use rotation steps the rest of a network shares, a new layout's
#: steps may each cost a Galois key
MATRIX_LAYOUT_MARGIN = 0.1


def matrix_out_layout(lin_in: Layout, wm: np.ndarray, prices: tuple[float, float] = (1.0, 1.0)) -> Layout:
    """Where a dense matrix ``wm`` (outputs x inputs) writes its outputs.  Candidates, in order:

    * consecutive slots (:meth:`Layout.vector`);
    * spread ``s`` apart (:meth:`Layout.spread`) when the input's elements lie ``s`` apart in their
      ciphertexts: after a global pooling by rotate-and-sum, ResNet-18's classifier takes
      8 x 1,024 diagonals instead of 8 x 4,096, at no level;
    * where the inputs were (:meth:`Layout.placed`, :func:`_placed_outputs`): output ``j`` of
      diagonal block ``b`` at the slot of input ``j`` of block ``b`` (shifted when a block has more
      outputs than inputs).  The differences of output and input slots are then those among the
      inputs' own positions, and a batch's classifier (``batch-to-channels`` makes it B copies of
      the matrix) has the same ones in every image's block: the images share its diagonals.

    Each is priced as its products (:func:`matrix_diagonals`) and its baby-step/giant-step rotations
    at ``prices`` = (seconds per product with its encoding, seconds per rotation); a candidate
    replaces the cheapest before it when it is :data:`MATRIX_LAYOUT_MARGIN` cheaper."""
    slots = lin_in.slots
    n = wm.shape[0]
    pos = lin_in.positions
    cands = [Layout.vector(n, slots)]
    ct, p = pos // slots, pos % slots
    s = 0
    for c in distinct(ct):
        pc = p[ct == c]
        s = int(np.gcd(s, np.gcd.reduce(pc - pc.min())))
    if n <= slots and s > 1 and slots % s == 0:
        cands.append(Layout.spread(n, slots, s))
    placed = _placed_outputs(pos, n, diagonal_blocks(wm))
    if placed is not None:
        cands.append(Layout.placed(placed, slots))
    if len(cands) == 1:
        return cands[0]
    best, best_t = None, 0.0
    for out in cands:
        keys = matrix_diagonals(wm, pos, out.positions, slots)
        t = sum(len(d) for d in keys.values()) * prices[0] + plan_bsgs(keys, slots).rotations * prices[1]
        if best is None or t < (1 - MATRIX_LAYOUT_MARGIN) * best_t:
            best, best_t = out, t
    return best


def matrix_prices(low: "Lowering", level: int) -> tuple[float, float]:
    """(seconds per product with its encoding, seconds per rotation) of a dense matrix at ``level``:
    the planner's cost model, else the default one (this machine's table, else the bundled SEAL one)."""
    cost = low.opts.cost if low.opts.cost is not None else CostModel()
    n, primes = low.prog.params.poly_degree, level + 1
    try:
        slots = low.prog.params.slots if low.prog.params.log_slots is not None else None
        return (cost.op_seconds("mul_plain_acc", n, primes) + cost.encode_seconds(n, primes, slots),
                cost.op_seconds("rotate", n, primes))
    except HecError:  # a ring the table has not measured: a rotation about twice a product with
        return (1.0, 2.0)  # its encoding, as in the bundled SEAL table at N=8192


def _placed_outputs(pos: np.ndarray, n: int, blocks: int, tries: int = 4096) -> np.ndarray | None:
    """Positions for the ``n`` outputs of a matrix of ``blocks`` diagonal blocks whose inputs lie at
    ``pos``: output j of block b where input ``j mod k`` of block b lies (k inputs per block),
    moved by ``t * (j div k)`` when a block has more outputs than inputs, ``t`` the least shift
    that keeps every position distinct; None when no shift up to ``tries`` does."""
    k, per = len(pos) // blocks, n // blocks
    base = pos.reshape(blocks, k)
    m = -(-per // k)
    for t in range(1, tries + 1) if m > 1 else (0,):
        cand = (base[:, None, :] + t * np.arange(m)[None, :, None]).reshape(blocks, m * k)[:, :per].reshape(-1)
        if cand.min() >= 0 and len(distinct(cand)) == n:
            return cand
    return None


def diagonal_blocks(wm: np.ndarray) -> int:
    """The most equal diagonal blocks ``wm`` consists of (zero outside them; 1 for a full matrix)."""
    n, k = wm.shape
    g = int(np.gcd(n, k))
    nz = wm != 0
    for b in sorted((d for d in range(2, g + 1) if g % d == 0), reverse=True):
        blocks = nz.reshape(b, n // b, b, k // b).any(axis=(1, 3))
        if not np.any(blocks & ~np.eye(b, dtype=bool)):
            return b
    return 1


def matrix_diagonals(wm: np.ndarray, pos_in: np.ndarray, pos_out: np.ndarray,
                     slots: int) -> dict[tuple[int, int], np.ndarray]:
    """The diagonals of ``wm`` from inputs at ``pos_in`` to outputs at ``pos_out`` (its ct-pt
    products): :func:`hecompiler.linear.diag_keys` of the matrix op between those positions."""
    lin = LinearOp("matrix", 0, 0, (len(pos_in), 1, 1), (len(pos_out), 1, 1), {"weight": "w"})
    return diag_keys(lin, {"w": wm}, Layout.placed(pos_in, slots), Layout.placed(pos_out, slots))


@lowers("MatMul")
def _lower_matmul(low: "Lowering", node: Node) -> Tensor:
    x, w = node.inputs
    if not w.is_constant or w.type.rank != 2 or x.type.rank != 2:
        raise LoweringError(f"{low._where()}: only [1, K] @ constant [K, N] MatMul is supported")
    n = w.type.shape[1]
    t = low.tensor(x)
    wm = w.data.astype(np.float64).T
    params = {"weight": low.add_weight(node.output.name + ".matrix", wm)}
    lout = low.layout_id(matrix_out_layout(low.layout(t), wm, matrix_prices(low, t.level)))
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
    low.tell("on_linear", LayerStat(node.outputs[0].name, node.op, lay.describe(), out.describe(), rots, 0, 0,
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
