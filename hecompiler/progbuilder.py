"""The HE program builder: appends instructions to an :class:`~hecompiler.heprog.HEProgram`.

It owns levels and scales.  Every instruction's result level and scale come from the one
op-semantics table (:func:`hecompiler.opsem.result_meta`), the same table the verifier, the
simulator and the backends apply, so a program the builder accepts is one they accept; an
invalid emission is a bug of the lowering (:class:`LoweringInvariantError`), named by node.
It also interns layouts and weights.  It knows nothing of graphs beyond the node being lowered
(for notes and messages): the lowering (:mod:`hecompiler.lower`) decides what to emit.
"""

from __future__ import annotations

import numpy as np

from .errors import LoweringInvariantError
from .heprog import HEProgram, Instr, Params, PlainRef
from .ir import Node, Value
from .layout import Layout
from .opsem import OpSemanticsError, result_meta


class ProgramBuilder:
    def __init__(self, params: Params, primes: tuple[int, ...]):
        self.prog = HEProgram(params, tuple(primes))
        #: value id -> (level, scale) of every ciphertext emitted so far
        self.meta: dict[int, tuple[int, float]] = {}
        #: the graph node being lowered (instruction notes, error messages)
        self.node: Node | None = None

    @property
    def top(self) -> int:
        return self.prog.params.top_level

    @property
    def delta(self) -> float:
        return self.prog.params.scale

    def _where(self) -> str:
        return f"node {self.node.label}" if self.node is not None else "program"

    def _note(self) -> str:
        return self.node.outputs[0].name if self.node is not None else ""

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
        self.prog.instrs.append(Instr(op, out, tuple(args), step, to_level, plain, level, s, self._note()))
        self.meta[out] = (level, s)
        return out

    def rotate(self, v: int, k: int) -> int:
        k %= self.prog.params.slots
        return v if k == 0 else self._emit("rotate", (v,), step=k)

    def add(self, a: int, b: int) -> int:
        return self._emit("add", (a, b))

    def mod_switch(self, v: int, level: int) -> int:
        return v if self.meta[v][0] == level else self._emit("mod_switch", (v,), to_level=level)

    def layout_id(self, lay: Layout) -> int:
        """The program's index of ``lay`` (added, after its checks, when new)."""
        for k, existing in enumerate(self.prog.layouts):
            if existing == lay:
                return k
        lay.check()
        self.prog.layouts.append(lay)
        return len(self.prog.layouts) - 1

    def weight(self, v: Value, suffix: str = "") -> str:
        """The program's weight name for a graph constant (added once)."""
        name = v.name + suffix
        if name not in self.prog.weights:
            self.prog.weights[name] = np.asarray(v.data)
        return name

    def add_weight(self, name: str, data: np.ndarray) -> str:
        """Add a weight the lowering made, under ``name`` or a numbered variant of it."""
        base, k = name, 0
        while name in self.prog.weights:
            k += 1
            name = f"{base}.{k}"
        self.prog.weights[name] = np.asarray(data)
        return name
