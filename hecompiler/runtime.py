"""What every backend shares to run a program: packing inputs, expanding a ``linear`` macro.

The executor (:mod:`hecompiler.executor`) hands :func:`run_linear` a small
:class:`Primitives` object over the backend's own ciphertext type (numpy
vectors in the simulator, SEAL or Lattigo ciphertexts); :func:`run_linear`
drives the baby-step/giant-step evaluation with it, in one fixed order, so
every backend executes exactly the same operations (the baby-step rotations
of one input ciphertext go together, so a backend can hoist them).  :class:`LinearPlans` rebuilds
each op's plan from its compact weights (once, when the op first runs) and
checks it is the plan the compiler recorded.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping, Protocol, Sequence

import numpy as np

from .errors import HecError
from .heprog import HEProgram, Instr, PlainRef
from .inputs import check_array
from .linear import BsgsPlan, plan_with_n1
from .plaintexts import PlaintextFactory
from .rotkeys import KeyGraph, LinearSchedule, linear_schedule


def pack_inputs(prog: HEProgram, inputs: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Check the named inputs against the program (shape, dtype, finite values) and pack them:
    input value id -> slot vector."""
    out: dict[int, np.ndarray] = {}
    for io in prog.inputs:
        if io.name not in inputs:
            raise HecError(f"missing input {io.name!r}")
        x = check_array(inputs[io.name], f"input {io.name!r}")
        if x.shape != tuple(io.shape):
            raise HecError(f"input {io.name!r}: expected shape {list(io.shape)}, got {list(x.shape)}")
        out.update(zip(io.values, prog.layouts[io.layout].pack(x)))
    extra = set(inputs) - {io.name for io in prog.inputs}
    if extra:
        raise HecError(f"unknown input(s) {sorted(extra)}; the program takes {[io.name for io in prog.inputs]}")
    return out


class Primitives(Protocol):
    def rotate(self, ct: Any, step: int) -> Any: ...
    def rotate_many(self, ct: Any, steps: Sequence[int]) -> list[Any]: ...  # hoisted where the backend can
    def mul_plain(self, ct: Any, ref: PlainRef, level: int) -> Any: ...
    def mul_plain_add(self, acc: Any, ct: Any, ref: PlainRef, level: int) -> Any: ...  # acc + ct*pt; may update acc
    def add(self, a: Any, b: Any) -> Any: ...
    def rescale(self, ct: Any, scale: float) -> Any: ...
    def add_plain(self, ct: Any, ref: PlainRef, level: int) -> Any: ...
    def zero(self, level: int, scale: float) -> Any: ...


def key_graph(prog: HEProgram) -> KeyGraph:
    """The compositions of rotations over the program's Galois keys (made once per program)."""
    keys = tuple(prog.galois_steps)
    cached = prog.__dict__.get("_key_graph")
    if cached is None or cached.keys != tuple(sorted({k % prog.params.slots for k in keys} - {0})):
        cached = KeyGraph(keys, prog.params.slots)
        prog.__dict__["_key_graph"] = cached
    return cached


class LinearPlans:
    """BSGS plans of a program's linear ops, rebuilt from the weights, and (``tree`` schedule)
    how their rotations run over the program's keys; checked against what the compiler
    recorded."""

    def __init__(self, prog: HEProgram, pf: PlaintextFactory):
        self.prog = prog
        self.pf = pf
        self._plans: dict[int, BsgsPlan] = {}

    def plan(self, lin_id: int) -> BsgsPlan:
        if lin_id not in self._plans:
            lin = self.prog.linears[lin_id]
            plan = plan_with_n1(self.pf.diagonal_keys(lin_id), self.prog.params.slots, lin.n1)
            if sorted(plan.steps()) != sorted(lin.steps):
                raise HecError(f"linear op #{lin_id} ({lin.note}): its weights give rotation steps "
                               f"{sorted(plan.steps())[:6]}... but the program recorded {sorted(lin.steps)[:6]}...")
            if lin.schedule:
                sched = linear_schedule(plan, key_graph(self.prog), lin.schedule == "star")
                if sched.needs(self.prog.params.slots) != sorted(lin.needs) or \
                        sched.rotations != lin.counts.get("rotate", -1):
                    raise HecError(f"linear op #{lin_id} ({lin.note}): over the program's Galois keys its rotations "
                                   f"are {sched.rotations}, composing {sched.needs(self.prog.params.slots)[:6]}..., "
                                   f"but the program recorded {lin.counts.get('rotate')} composing "
                                   f"{sorted(lin.needs)[:6]}...")
                plan.schedule = sched
            self._plans = {lin_id: plan}  # one op at a time, like the diagonals
        return self._plans[lin_id]


def _rotate_path(prim: Primitives, ct: Any, path: Sequence[int]) -> Any:
    for k in path:
        ct = prim.rotate(ct, k)
    return ct


Group = tuple  # (j, g): output ciphertext j's giant-step group g (its products summed before rotating by g)


def _schedule(prog: HEProgram, lin, plan: BsgsPlan) -> LinearSchedule | None:
    if not lin.schedule:
        return None
    sched = getattr(plan, "schedule", None)
    return sched if sched is not None else linear_schedule(plan, key_graph(prog), lin.schedule == "star")


def group_order(prog: HEProgram, ins: Instr, plan: BsgsPlan) -> list[Group]:
    """The giant-step groups of linear op ``ins`` in the order :func:`run_linear` makes their
    products (each group: the products of one output ciphertext summed before one rotation)."""
    lin = prog.linears[ins.plain.args[0]]
    S = prog.params.slots
    sched = _schedule(prog, lin, plan)
    out: list[Group] = []
    for j in lin.order or range(prog.layouts[lin.out_layout].n_ct):
        groups = plan.giant.get(j)
        if not groups:
            continue
        if sched is None:
            out.extend((j, g) for g in groups)
            continue
        by_signed = {(g - S if g > S // 2 else g): g for g in groups}
        chain = sched.chains[j]
        for side in (chain.pos, chain.neg):
            out.extend((j, by_signed[side[k]]) for k in range(len(side) - 1, -1, -1))
        if chain.zero:
            out.append((j, by_signed[0]))
    return out


def group_products(plan: BsgsPlan, group: Group) -> int:
    j, g = group
    return len(plan.giant[j][g])


def inputs_read(plan: BsgsPlan, groups: Collection[Group]) -> set[int]:
    """The input ciphertexts that the given giant-step groups of a linear op read."""
    return {i for (j, g) in groups for (i, _, _) in plan.giant[j][g]}


def part_inputs(plan: BsgsPlan, outputs: Collection[int], groups: Collection[Group]) -> set[int]:
    """The input ciphertexts a part of a linear op reads: whole ``outputs`` and group sums ``groups``."""
    return inputs_read(plan, list(groups) + [(j, g) for j in outputs for g in plan.giant.get(j, ())])


def _babies(prog: HEProgram, plan: BsgsPlan, sched: LinearSchedule | None, xs: Sequence[Any], prim: Primitives,
            inputs: Collection[int] | None) -> dict:
    """The baby-step rotations of the inputs (those in ``inputs``, or all): (input, step) -> ct.
    A ``tree`` schedule makes them along each input's tree (the first hops hoisted together)."""
    S = prog.params.slots
    baby = {}
    if sched is None:
        for i, bs in plan.baby.items():
            if inputs is not None and i not in inputs:
                continue
            steps = [b for b in bs if b]
            for b, r in zip(steps, prim.rotate_many(xs[i], steps) if steps else []):
                baby[(i, b)] = r
            if len(steps) < len(bs):
                baby[(i, 0)] = xs[i]
        return baby
    for i, edges in sched.trees.items():
        if inputs is not None and i not in inputs:
            continue
        first = sorted({e.path[0] for e in edges if e.src == 0})
        hoisted = dict(zip(first, prim.rotate_many(xs[i], first))) if first else {}
        made = {0: xs[i]}
        for e in edges:
            if e.src == 0:
                ct = _rotate_path(prim, hoisted[e.path[0]], e.path[1:])
            else:
                ct = _rotate_path(prim, made[e.src], e.path)
            made[e.dst] = ct
        del hoisted
        for b in plan.baby[i]:
            baby[(i, b)] = made[b - S if b > S // 2 else b]
    return baby


def _group_acc(lin_id: int, group: Group, terms, baby: dict, prim: Primitives, s_pt: float, level_in: int,
               S: int) -> Any:
    j, g = group
    acc = None
    for (i, b, d) in terms:
        ref = PlainRef("diag", (lin_id, j, i, d, -g % S), s_pt)
        acc = prim.mul_plain(baby[(i, b)], ref, level_in) if acc is None else \
            prim.mul_plain_add(acc, baby[(i, b)], ref, level_in)
    return acc


def _finish(prog: HEProgram, ins: Instr, plan: BsgsPlan, sched: LinearSchedule | None, j: int, acc_of,
            prim: Primitives) -> Any:
    """Output ciphertext ``j`` of linear op ``ins`` from its group sums (``acc_of(j, g)``): the
    giant-step rotations and sums, the rescale and the bias."""
    lin_id = ins.plain.args[0]
    lin = prog.linears[lin_id]
    S = prog.params.slots
    if j not in plan.giant:  # every weight reaching this ciphertext is zero
        r = prim.zero(ins.level, ins.scale)
    elif sched is None:
        total = None
        for g in plan.giant[j]:
            acc = acc_of(j, g)
            if g % S:
                acc = prim.rotate(acc, g)
            total = acc if total is None else prim.add(total, acc)
        r = prim.rescale(total, ins.scale)
    else:
        # giant steps accumulated Horner-style from both sides of 0, every rotation composed
        # from the program's keys (hecompiler.rotkeys)
        by_signed = {(g - S if g > S // 2 else g): g for g in plan.giant[j]}
        chain = sched.chains[j]
        hops = iter(chain.hops)
        total = None
        for side in (chain.pos, chain.neg):
            t = None
            for k in range(len(side) - 1, -1, -1):
                a = acc_of(j, by_signed[side[k]])
                t = a if t is None else prim.add(_rotate_path(prim, t, next(hops)), a)
            if side:
                t = _rotate_path(prim, t, next(hops))
                total = t if total is None else prim.add(total, t)
        if chain.zero:
            a = acc_of(j, by_signed[0])
            total = a if total is None else prim.add(total, a)
        r = prim.rescale(total, ins.scale)
    if lin.params.get("bias"):
        r = prim.add_plain(r, PlainRef("bias", (lin_id, j), ins.scale), ins.level)
    return r


def _group_reader(prog: HEProgram, ins: Instr, plan: BsgsPlan, baby: dict, prim: Primitives, given=None):
    lin_id = ins.plain.args[0]
    S = prog.params.slots
    level_in = ins.level + 1
    s_pt = ins.plain.scale

    def acc_of(j: int, g: int) -> Any:
        if given is not None and (j, g) in given:
            return given[(j, g)]
        return _group_acc(lin_id, (j, g), plan.giant[j][g], baby, prim, s_pt, level_in, S)

    return acc_of


def run_part(prog: HEProgram, ins: Instr, xs: Sequence[Any], plan: BsgsPlan, prim: Primitives,
             outputs: Sequence[int] = (), groups: Sequence[Group] = ()) -> tuple[dict[int, Any], dict[Group, Any]]:
    """A part of linear op ``ins``: the given output ciphertexts whole, and the sums of the given
    giant-step groups (before their giant-step rotation), from the inputs they read (the others
    in ``xs`` may be None).  What a process sharing the op makes (:mod:`hecompiler.parallel`)."""
    lin = prog.linears[ins.plain.args[0]]
    sched = _schedule(prog, lin, plan)
    baby = _babies(prog, plan, sched, xs, prim, part_inputs(plan, outputs, groups))
    acc_of = _group_reader(prog, ins, plan, baby, prim)
    outs = {j: _finish(prog, ins, plan, sched, j, acc_of, prim) for j in outputs}
    return outs, {gr: acc_of(*gr) for gr in groups}


def run_linear(prog: HEProgram, ins: Instr, xs: Sequence[Any], plan: BsgsPlan, prim: Primitives,
               given: Mapping[Group, Any] | None = None, given_outputs: Mapping[int, Any] | None = None) -> list[Any]:
    """Evaluate a ``linear`` macro: returns one ciphertext per output ciphertext.  Parts made
    elsewhere (:func:`run_part`, by a helper process: hecompiler.parallel): ``given_outputs``, whole
    output ciphertexts, and ``given``, the sums of some giant-step groups; each is read when the
    evaluation reaches it, and only the inputs the rest reads are rotated here."""
    lin_id = ins.plain.args[0]
    lin = prog.linears[lin_id]
    lout = prog.layouts[lin.out_layout]
    if lout.n_ct != len(ins.results):
        raise HecError(f"linear op #{lin_id}: {len(ins.results)} results for {lout.n_ct} output ciphertexts")
    sched = _schedule(prog, lin, plan)
    used = None
    if given is not None or given_outputs is not None:
        used = inputs_read(plan, [(j, g) for j, gs in plan.giant.items() for g in gs
                                  if (given is None or (j, g) not in given)
                                  and (given_outputs is None or j not in given_outputs)])
    baby = _babies(prog, plan, sched, xs, prim, used)
    acc_of = _group_reader(prog, ins, plan, baby, prim, given)
    outs: list[Any] = [None] * lout.n_ct
    for j in lin.order or range(lout.n_ct):
        if given_outputs is not None and j in given_outputs:
            outs[j] = given_outputs[j]
        else:
            outs[j] = _finish(prog, ins, plan, sched, j, acc_of, prim)
    return outs
