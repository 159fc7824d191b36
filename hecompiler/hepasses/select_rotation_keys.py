"""``select-rotation-keys``: the program's Galois keys, chosen under a budget.

Without it a program gets one Galois key per rotation step it names (ResNet-8 at N=2^15: 151
keys, 31 GiB).  This pass (see :mod:`hecompiler.rotkeys`) switches every ``linear`` op to the
``tree`` schedule (baby steps from the nearest one made, giant steps Horner-style: the
same number of rotations, far fewer distinct steps), picks the key set greedily by the
rotation time each key saves (rotations counted, a hoisted one at its price relative to
a full one from ``ctx.options["cost"]``), and cuts that order at the budget: ``max_keys``, or the bytes
of Galois keys ``max_key_bytes``, or what is left of ``ctx.options["max_memory_bytes"]``
beside the rest of the program's predicted memory.  Where the backend makes each key at
the level it is used at (Lattigo) the budget and the report count each key so, with the
levels the program uses it at under the key set being priced (a key on the path of a
composed rotation is used at that rotation's level); elsewhere every key is at the top.
A standalone ``rotate`` by a step without a key becomes a chain of rotations by keys
(visible in the program text).

What was traded goes to ``ctx.options["rotation_keys"]`` (the report prints it): keys and
bytes before and after, extra rotations, and the trade curve (keys -> rotations).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..heprog import Instr
from ..passmanager import PassResult, register_pass
from ..rotkeys import Demands, KeyGraph, linear_demands, linear_schedule, select_keys, signed
from . import HEPass


def bsgs_plan(prog, lin_id: int, plans: dict | None):
    """The BSGS plan of linear op ``lin_id`` (the lowering's, or rebuilt from the weights)."""
    if plans and lin_id in plans:
        return plans[lin_id]
    from ..linear import diag_keys, plan_with_n1

    lin = prog.linears[lin_id]
    lays = prog.layouts
    return plan_with_n1(diag_keys(lin, prog.weights, lays[lin.in_layout], lays[lin.out_layout]),
                        prog.params.slots, lin.n1)


def _hoisted_ratio(cost, n: int, primes: int) -> float:
    """What a hoisted rotation costs, in rotations (two digits: the key choice is the same for
    every chain length of a ring, so the planner's candidates share it)."""
    return round(cost.op_seconds("rotate_hoisted_extra", n, primes) / cost.op_seconds("rotate", n, primes), 2)


@register_pass
@dataclass(frozen=True)
class SelectRotationKeys(HEPass):
    name = "select-rotation-keys"
    summary = ("choose the Galois keys under a budget (max_keys, max_key_bytes or the memory budget); "
               "every rotation composed from them")
    exact = True
    max_keys: int = 0  # 0: no limit of its own
    max_key_bytes: int = 0  # 0: no limit of its own

    def run(self, prog, ctx) -> PassResult:
        opts = ctx.options
        cost = opts.get("cost")
        plans = opts.get("bsgs_plans")
        S, n = prog.params.slots, prog.params.poly_degree
        top = prog.params.top_level + 1
        dem = Demands(S)
        lin_plans = {}
        hoists = bool(cost is not None and getattr(cost, "hoists", False))
        for ins in prog.instrs:
            if ins.op == "linear":
                lid = ins.plain.args[0]
                plan = lin_plans[lid] = bsgs_plan(prog, lid, plans)
                star = prog.linears[lid].schedule == "star"
                hw = _hoisted_ratio(cost, n, top) if star and hoists else None
                linear_demands(plan, S, dem, 1.0, star=star, hoisted_weight=hw)
            elif ins.op == "rotate" and ins.step % S:
                dem.add_single(ins.step, 1.0)
        before = prog.used_steps if prog.rotation_keys is None else list(prog.rotation_keys)
        key_bytes = self._key_bytes(cost, n, top)  # one key at the top level (the budget's unit)
        bytes_before = self._all_key_bytes(prog, cost, key_bytes)
        if not dem.trees and not dem.singles:
            prog.rotation_keys = []
            opts["rotation_keys"] = {"keys": 0, "keys_before": len(before), "key_bytes": 0, "key_bytes_before":
                                     bytes_before, "rotations": 0, "rotations_direct": 0, "curve": []}
            return PassResult(modified=bool(before), notes=[])
        sel = select_keys(dem)
        cap = self.max_keys or None
        budget = self._key_budget(prog, opts, cost, key_bytes)
        limits = [b for b in (self.max_key_bytes or None, budget) if b is not None]
        if limits:
            k = max(0, int(min(limits) // max(1, key_bytes)))  # every key at the top fits
            if cost is not None and cost.keys_per_level:
                k = self._most_keys_within(prog, cost, sel, lin_plans, min(limits), k, cap)
            cap = k if cap is None else min(cap, k)
        fewest = sel.smallest_feasible()
        if cap is not None and cap < fewest:
            cap = fewest  # cannot do with fewer: the planner rejects the plan for memory if it must
        count = sel.best_within(cap)
        keys = sel.prefix(count)
        prog.rotation_keys = keys
        graph = KeyGraph(keys, S)
        for lid, plan in lin_plans.items():
            lin = prog.linears[lid]
            lin.schedule = "star" if lin.schedule == "star" else "tree"
            sched = linear_schedule(plan, graph, lin.schedule == "star")
            lin.needs = sched.needs(S)
            lin.counts = dict(lin.counts, rotate=sched.rotations, baby_rotations=sched.hoisted,
                              baby_held=sched.held)
        split = self._split_rotations(prog, graph)
        curve = sorted({(i + 1, sel.rotations[i]) for i in range(len(sel.order))
                        if sel.costs[i] != float("inf")})
        trade = {"keys": len(keys), "keys_before": len(before), "key_bytes": self._all_key_bytes(prog, cost, key_bytes),
                 "key_bytes_before": bytes_before, "rotations": sel.rotations[count - 1],
                 "rotations_direct": sel.direct_rotations,
                 "budget_keys": cap, "fewest_keys": fewest, "curve": curve,
                 "keys_list": [signed(k, S) for k in keys]}
        opts["rotation_keys"] = trade
        extra = trade["rotations"] - trade["rotations_direct"]
        note = (f"{len(keys)} Galois keys instead of {len(before)} ({_mib(trade['key_bytes'])} instead of "
                f"{_mib(trade['key_bytes_before'])}), {extra:+d} rotations"
                + (f"; {split} standalone rotation(s) composed" if split else "")
                + (f"; budget {cap} keys" if cap is not None else ""))
        return PassResult(modified=True, notes=[note])

    @staticmethod
    def _key_bytes(cost, n: int, top: int) -> int:
        if cost is not None:
            return int(cost.ksk_bytes(n, top))
        from ..costmodel import switching_key_bytes

        return switching_key_bytes(n, top)

    @staticmethod
    def _most_keys_within(prog, cost, sel, lin_plans: dict, limit: float, fits: int, cap: int | None) -> int:
        """The longest prefix of the selection order whose keys, each at the level the program
        would use it at with that key set, take at most ``limit`` bytes (``fits`` keys do even
        at the top).  Bisection: more keys take more bytes (the check is exact at every probe)."""
        S = prog.params.slots
        hi = len(sel.order) if cap is None else min(cap, len(sel.order))
        lo = max(fits, sel.smallest_feasible() - 1)
        if hi <= fits:
            return fits
        best = fits

        def key_bytes(count: int) -> int:
            graph = KeyGraph(sel.prefix(sel.best_within(count)), S)
            needs = {lid: linear_schedule(plan, graph, prog.linears[lid].schedule == "star").needs(S)
                     for lid, plan in lin_plans.items()}
            return cost.galois_key_bytes(prog, graph, needs)

        while lo < hi:
            mid = (lo + hi + 1) // 2
            if key_bytes(mid) <= limit:
                best = lo = mid
            else:
                hi = mid - 1
        return best

    @staticmethod
    def _all_key_bytes(prog, cost, key_bytes: int) -> int:
        """The program's Galois keys' bytes: at their levels of use where the backend makes keys per
        level."""
        if cost is not None:
            return int(cost.galois_key_bytes(prog))
        return len(prog.galois_steps) * key_bytes

    @staticmethod
    def _key_budget(prog, opts, cost, key_bytes: int) -> float | None:
        """Bytes of Galois keys that fit the memory budget beside the rest of the program."""
        mem = opts.get("max_memory_bytes")
        if not mem or cost is None:
            return None
        from ..costmodel import program_cost

        c = program_cost(prog, cost)
        rest = c.memory_bytes - c.galois_key_bytes
        return max(0.0, mem - rest)

    @staticmethod
    def _split_rotations(prog, graph: KeyGraph) -> int:
        """Standalone rotations by steps without a key become chains of rotations by keys."""
        S = prog.params.slots
        out, split, alias = [], 0, {}
        for ins in prog.instrs:
            if ins.args:
                ins.args = tuple(alias.get(a, a) for a in ins.args)
            if ins.op != "rotate" or ins.step % S == 0 or ins.step % S in graph.keys:
                out.append(ins)
                continue
            path = graph.path(ins.step)
            split += 1
            src = ins.args[0]
            for k, step in enumerate(path):
                last = k == len(path) - 1
                v = ins.out if last else prog.new_value()
                out.append(Instr("rotate", v, (src,), step=step, level=ins.level, scale=ins.scale, note=ins.note))
                src = v
        prog.instrs = out
        return split


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"
