"""What each HE-program op does to level and scale: the one table.

The lowering (when it emits an instruction), the verifier (on a whole
program) and every backend's executor (on the ciphertexts it actually holds)
ask :func:`result_meta` what an instruction gives, so the three cannot drift
apart.  A ciphertext's *meta* is ``(level, scale)``: ``level`` is the number of
rescales it can still take (primes ``q_0 .. q_level`` remain), ``scale`` the
exact float the backends reproduce bit for bit.

==============  =============================  ======================================
op              operands must                  result level / scale
==============  =============================  ======================================
rotate          --                             unchanged
add, sub        share level and scale          unchanged
negate          --                             unchanged
add_plain       plaintext at the ct's scale    unchanged
mul_plain       --                             level, scale * plaintext scale
mul             share level                    level, scale_a * scale_b
rescale         level >= 1                     level - 1, scale / q_level (snapped
                                               to the planned value within 1e-9)
mod_switch      target <= level                target level, scale
refresh         --                             top level, 2**scale_bits
linear          share level and scale, >= 1    level - 1, scale * plaintext scale /
                                               q_level (snapped, as rescale)
==============  =============================  ======================================

Every result's scale must also stay inside the modulus of its level (SEAL and
Lattigo refuse a scale of more bits than ``Q_level``): :func:`check_bounds`.
"""

from __future__ import annotations

import math
from typing import Sequence

from .errors import HecError

#: relative difference within which a rescaled scale is snapped to its planned value
SCALE_SNAP = 1e-9

#: ops whose operands must share level and scale
_SAME_LEVEL_AND_SCALE = ("add", "sub")


class OpSemanticsError(HecError):
    """An instruction's operands break the rules of its op (levels, scales, arity)."""


_ARITY = {"rotate": 1, "add": 2, "sub": 2, "negate": 1, "add_plain": 1, "mul_plain": 1, "mul": 2,
          "rescale": 1, "mod_switch": 1, "refresh": 1}


def _snap(got: float, planned: float | None, what: str) -> float:
    if planned is None or planned == got:
        return got
    if abs(got - planned) <= SCALE_SNAP * abs(planned):
        return planned
    raise OpSemanticsError(f"{what} gives scale {got!r}, the plan says {planned!r} (relative difference "
                           f"{abs(got - planned) / abs(planned):.3g} > {SCALE_SNAP})")


def result_meta(op: str, operands: Sequence[tuple[int, float]], primes: Sequence[int], top_level: int,
                fresh_scale: float, *, to_level: int = -1, plain_scale: float | None = None,
                planned_scale: float | None = None) -> tuple[int, float]:
    """``(level, scale)`` of the result of ``op`` on ciphertexts of meta ``operands``.

    ``plain_scale``: the plaintext's encode scale (add_plain, mul_plain, linear);
    ``planned_scale``: the value a rescale (or linear) result is snapped to, when
    the plan gives one.  Raises :class:`OpSemanticsError` naming the rule broken."""
    if op == "linear":
        if not operands:
            raise OpSemanticsError("linear: no operands")
        if len(set(operands)) != 1:
            raise OpSemanticsError(f"linear: the input ciphertexts differ in level or scale {sorted(set(operands))}")
        lv, sc = operands[0]
        if lv < 1:
            raise OpSemanticsError(f"linear: cannot apply a linear op at level {lv} (out of levels)")
        return lv - 1, _snap(sc * plain_scale / primes[lv], planned_scale, "linear (ct-pt products, rescale)")
    n = _ARITY.get(op)
    if n is None:
        raise OpSemanticsError(f"unknown op {op!r}")
    if len(operands) != n:
        raise OpSemanticsError(f"{op} takes {n} operand(s), got {len(operands)}")
    (lv, sc) = operands[0]
    if op in _SAME_LEVEL_AND_SCALE or op == "mul":
        lv1, sc1 = operands[1]
        if lv != lv1:
            raise OpSemanticsError(f"{op}: operand levels differ ({lv} vs {lv1})")
        if op != "mul" and sc != sc1:
            raise OpSemanticsError(f"{op}: scale mismatch ({sc!r} vs {sc1!r})")
    if op in ("rotate", "add", "sub", "negate"):
        return lv, sc
    if op == "add_plain":
        if plain_scale != sc:
            raise OpSemanticsError(f"add_plain: the plaintext scale {plain_scale!r} must equal the ciphertext "
                                   f"scale {sc!r}")
        return lv, sc
    if op == "mul_plain":
        return lv, sc * plain_scale
    if op == "mul":
        return lv, sc * operands[1][1]
    if op == "rescale":
        if lv < 1:
            raise OpSemanticsError(f"rescale: cannot rescale at level {lv} (out of levels)")
        return lv - 1, _snap(sc / primes[lv], planned_scale, "rescale")
    if op == "mod_switch":
        if not 0 <= to_level <= lv:
            raise OpSemanticsError(f"mod_switch: cannot switch from level {lv} to {to_level}")
        return to_level, sc
    # refresh
    return top_level, fresh_scale


def check_bounds(level: int, scale: float, primes: Sequence[int]) -> None:
    """A ciphertext at ``level`` with ``scale`` must keep at least one bit of modulus above the
    scale (and a scale of at least 2^10, below which CKKS keeps no precision)."""
    if level < 0:
        raise OpSemanticsError(f"level {level} < 0")
    bits = math.log2(scale) if scale > 0 else -1.0
    qbits = sum(math.log2(q) for q in primes[: level + 1])
    if bits < 10 or bits > qbits - 1:
        raise OpSemanticsError(f"scale 2^{bits:.1f} out of bounds at level {level} (modulus 2^{qbits:.0f})")


def instr_meta(prog, ins, operands: Sequence[tuple[int, float]]) -> tuple[int, float]:
    """:func:`result_meta` for instruction ``ins`` of ``prog`` (planned scale from the instruction),
    bounds checked."""
    p = prog.params
    plain = ins.plain.scale if ins.plain is not None else None
    level, scale = result_meta(ins.op, operands, prog.primes, p.top_level, p.scale, to_level=ins.to_level,
                               plain_scale=plain, planned_scale=ins.scale if ins.op in ("rescale", "linear") else None)
    check_bounds(level, scale, prog.primes)
    return level, scale
