"""``hoist-rotations``: on a backend that hoists, baby steps straight from their input.

A backend that hoists rotations (Lattigo) decomposes a ciphertext once and then rotates it by
many steps for little more each (``rotate_hoisted_extra`` in its cost table).  The ``tree``
schedule of :mod:`hecompiler.rotkeys` chains baby steps (fewer keys), which gives the hoisting
up; this pass gives each ``linear`` op the ``star`` schedule instead (every baby step from the
input, composed from the keys the next pass selects, their first hops hoisted together), where
the cost table says hoisting is cheaper.  It runs before ``select-rotation-keys``, which keeps
it.  A no-op for backends that do not hoist (SEAL).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..passmanager import PassResult, register_pass
from . import HEPass


@register_pass
@dataclass(frozen=True)
class HoistRotations(HEPass):
    name = "hoist-rotations"
    summary = "on a hoisting backend (Lattigo), make baby steps straight from their input (hoisted together)"
    exact = True
    #: hoist even when the cost model does not say the backend hoists (tests, other backends)
    force: bool = False

    def run(self, prog, ctx) -> PassResult:
        cost = ctx.options.get("cost")
        if not self.force and not (cost is not None and getattr(cost, "hoists", False)):
            return PassResult(modified=False)
        from ..rotkeys import KeyGraph, giant_rotations_needed, linear_schedule
        from .select_rotation_keys import bsgs_plan

        S = prog.params.slots
        n = 0
        for ins in prog.instrs:
            if ins.op != "linear":
                continue
            lid = ins.plain.args[0]
            lin = prog.linears[lid]
            if lin.schedule == "star" or lin.counts.get("baby_rotations", 0) < 2:
                continue
            # each rotation with its own key until select-rotation-keys chooses the key set
            plan = bsgs_plan(prog, lid, ctx.options.get("bsgs_plans"))
            direct = {b for bs in plan.baby.values() for b in bs}
            for gs in plan.giant.values():
                direct.update(r % S for r in giant_rotations_needed(list(gs), S))
            sched = linear_schedule(plan, KeyGraph(direct, S), star=True)
            lin.schedule = "star"
            lin.needs = sched.needs(S)
            lin.counts = dict(lin.counts, rotate=sched.rotations, baby_rotations=sched.hoisted, baby_held=sched.held)
            n += 1
        return PassResult(modified=bool(n), notes=[f"{n} linear op(s) hoist their baby steps"] if n else [])
