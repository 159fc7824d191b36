"""``share-mod-switch``: mod-switch a value once, as early as its readers allow.

The lowering mod-switches a value wherever an operand must come down to a lower level (an
Add's two sides, a polynomial's powers, a skip source read at several depths).  When every
reader of a value after one of its mod-switches (to level ``l``) only mod-switches it again to
``l`` or lower, those readers take the first mod-switch's result instead: identical switches
disappear, lower ones start from fewer primes, and the value itself dies at the first switch,
so a smaller ciphertext (``l`` + 1 primes) is what stays alive.  Never more live ciphertexts
than before.  Exact: mod-switching drops primes deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..passmanager import PassResult, register_pass
from . import HEPass


@register_pass
@dataclass(frozen=True)
class ShareModSwitch(HEPass):
    name = "share-mod-switch"
    summary = "mod-switch a value once, as early as its readers allow (duplicates removed, the value dies sooner)"
    exact = True

    def run(self, prog, ctx) -> PassResult:
        outputs = {v for io in prog.outputs for v in io.values}
        uses: dict[int, list[int]] = {}  # value -> indices of the instructions reading it
        for k, ins in enumerate(prog.instrs):
            for a in set(ins.args):
                uses.setdefault(a, []).append(k)
        alias: dict[int, int] = {}
        drop: set[int] = set()
        removed = rerouted = 0
        for k, ins in enumerate(prog.instrs):
            if k in drop:
                continue
            if ins.args:
                ins.args = tuple(alias.get(a, a) for a in ins.args)
            if ins.op != "mod_switch":
                continue
            x = ins.args[0]
            later = [u for u in uses.get(x, []) if u > k]
            if x in outputs or not later:
                continue
            lv = ins.to_level
            if not all(prog.instrs[u].op == "mod_switch" and prog.instrs[u].to_level <= lv for u in later):
                continue
            for u in later:
                other = prog.instrs[u]
                if other.to_level == lv:
                    alias[other.out] = ins.out
                    uses.setdefault(ins.out, []).extend(uses.get(other.out, []))
                    drop.add(u)
                    removed += 1
                else:
                    other.args = (ins.out,)
                    uses.setdefault(ins.out, []).append(u)
                    rerouted += 1
            uses[ins.out] = sorted(set(uses.get(ins.out, [])))
        if drop:
            prog.instrs = [ins for k, ins in enumerate(prog.instrs) if k not in drop]
        for io in prog.outputs:
            io.values = [alias.get(v, v) for v in io.values]
        notes = []
        if removed or rerouted:
            notes.append(f"{removed} duplicate mod-switch(es) removed, {rerouted} switched from a lower level")
        return PassResult(modified=bool(removed or rerouted), notes=notes)
