"""Parameter planning: ring degree, modulus chain and scale, chosen by cost.

For each candidate parameter set (ring degree N, data prime size = scale
bits, number of data levels L) the graph is lowered, and the program's
latency and memory are predicted with the measured cost table
(:mod:`hecompiler.costmodel`).  The planner keeps the candidates that fit
the memory budget and the refresh limit, and picks the fastest.  All
candidates are 128-bit secure by the HE standard (SEAL's CoeffModulus
limits) unless the user explicitly asks for ``security="none"``.

Fewer, larger primes mean cheaper ops but more refreshes; the planner
weighs both, since a client-aided refresh has a real cost (two ciphertext
transfers and a round trip, see :class:`~hecompiler.costmodel.RefreshCost`).
For a bootstrapping target (``RefreshCost(kind="bootstrap")``) a refresh is
a bootstrap: the chain must leave room for the bootstrap circuit's levels,
and each refreshed ciphertext costs the circuit's price.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from .costmodel import CostModel, ProgramCost, RefreshCost, program_cost
from .estimate import lower_bounds
from .errors import HecError, LoweringError, OutOfLevelsError
from .heprog import HEProgram, Params
from .ir import Graph
from .lower import Lowering, LoweringOptions, lower
from .refresh import RefreshPlan, plan_refreshes
from .security import HE_STANDARD_MAX_BITS, max_bits

#: rings tried when the user gives none: client-aided refresh / a bootstrapping target (a 128-bit
#: bootstrap needs N=2^16 to hold its own ~770 bits of modulus)
DEFAULT_RINGS = {"client": (8192, 16384, 32768), "bootstrap": (65536,)}


@dataclass
class PlanOptions:
    ring_degrees: tuple[int, ...] | None = None  # None: DEFAULT_RINGS for the refresh kind
    security: str = "tc128"  # or "none": only when the user explicitly asks
    max_memory_bytes: int = 8 * 2**30
    max_refreshes: int | None = None
    scale_bits: int | None = None  # None: try 40 and, for small rings, 30
    levels: int | None = None  # None: try the maximum and about half of it
    lowering: LoweringOptions = field(default_factory=LoweringOptions)
    #: place refreshes with the exact DP (hecompiler.refresh) instead of greedily
    optimal_refresh: bool = True
    #: budget for one inference's predicted latency (None: no limit)
    max_seconds: float | None = None
    #: budget for planning (lowering every candidate), in seconds (None: no limit)
    max_compile_seconds: float | None = 600.0

    def __post_init__(self):
        if self.security not in ("tc128", "none"):
            raise HecError(f"security {self.security!r}: expected 'tc128' or 'none'")
        if self.levels is not None and not (isinstance(self.levels, int) and self.levels >= 1):
            raise HecError(f"--levels {self.levels}: a program needs at least 1 data level")
        if self.scale_bits is not None and not (isinstance(self.scale_bits, int) and 20 <= self.scale_bits <= 60):
            raise HecError(f"--scale-bits {self.scale_bits}: the scale must have 20 to 60 bits (SEAL primes are "
                           f"at most 60 bits; below 20 CKKS keeps no useful precision)")
        if self.max_refreshes is not None and self.max_refreshes < 0:
            raise HecError(f"--max-refreshes {self.max_refreshes}: must be 0 (non-interactive) or more")
        if not self.max_memory_bytes > 0:
            raise HecError(f"--max-memory {self.max_memory_bytes}: must be positive")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise HecError(f"--max-seconds {self.max_seconds}: must be positive")
        if self.max_compile_seconds is not None and not self.max_compile_seconds > 0:
            raise HecError(f"--max-compile-seconds {self.max_compile_seconds}: must be positive")


@dataclass
class Candidate:
    params: Params
    primes: tuple[int, ...]
    prog: HEProgram | None
    lowering: Lowering | None
    cost: ProgramCost | None
    reason: str = ""  # why it was rejected, if it was
    greedy_refreshed: int = 0  # ciphertexts a greedy placement refreshes
    refresh_plan: RefreshPlan | None = None  # the optimal placement, when it was used

    @property
    def label(self) -> str:
        p = self.params
        return f"N={p.poly_degree} L={p.top_level} scale=2^{p.scale_bits}"


def chain_bits(n: int, scale_bits: int, levels: int) -> tuple[int, ...]:
    """SEAL order: q_0 (holds the result: scale + 20 bits), L data primes of
    ``scale_bits``, then the special key-switching prime (>= every other)."""
    q0 = min(60, scale_bits + 20)
    special = max(q0, scale_bits)
    return (q0,) + (scale_bits,) * levels + (special,)


def max_levels(n: int, scale_bits: int, security: str, reserved_bits: int = 0) -> int:
    """Data levels that fit ring ``n`` with ``reserved_bits`` of modulus kept
    for a bootstrap circuit above the chain."""
    if security == "none":
        limit = 60 * 30 if n >= 32768 else (max_bits(n) or 0) * 2
    else:
        if max_bits(n) is None:
            raise HecError(f"ring degree {n} has no 128-bit parameters in the HE standard table "
                           f"(supported: {sorted(HE_STANDARD_MAX_BITS['tc128'])}); pass --security none to go beyond")
        limit = max_bits(n)
    q0 = min(60, scale_bits + 20)
    special = max(q0, scale_bits)
    return max(0, (limit - q0 - special - reserved_bits) // scale_bits)


def make_primes(n: int, bits: tuple[int, ...]) -> tuple[int, ...]:
    """The data primes q_0..q_L of a chain (the special prime dropped): the ones SEAL makes for
    these sizes, made without SEAL (:mod:`hecompiler.primes`)."""
    from .primes import chain_primes

    return chain_primes(n, bits)[:-1]


def candidate_params(opts: PlanOptions, refresh: RefreshCost | None = None) -> list[Params]:
    refresh = refresh or RefreshCost()
    rings = opts.ring_degrees or DEFAULT_RINGS[refresh.kind]
    out = []
    too_small = []
    for n in rings:
        if n < 1024 or n & (n - 1):
            raise HecError(f"ring degree {n} is not a power of two >= 1024")
        scales = [opts.scale_bits] if opts.scale_bits else ([40, 30] if n <= 8192 else [40])
        for sb in scales:
            lmax = max_levels(n, sb, opts.security, refresh.reserved_bits(sb))
            if lmax < 1:
                too_small.append(f"N={n} with {sb}-bit primes"
                                 + (f" and {refresh.reserved_bits(sb)} bits kept for bootstrapping"
                                    if refresh.bootstraps else ""))
                continue
            # the maximum and about half; a bootstrapping target trades levels against bootstraps more
            # finely (a bootstrap costs as much as dozens of convolutions), so it also tries quarters
            fracs = (4, 3, 2, 1) if refresh.bootstraps else (4, 2)
            ls = [opts.levels] if opts.levels else sorted({max(1, lmax * f // 4) for f in fracs}, reverse=True)
            for lv in ls:
                if lv > lmax:
                    raise HecError(f"{lv} levels do not fit N={n} at "
                                   f"{'128-bit security' if opts.security == 'tc128' else 'these settings'} (at most {lmax}"
                                   + (" beside the bootstrap circuit)" if refresh.bootstraps else ")"))
                out.append(Params(n, chain_bits(n, sb, lv), sb, opts.security))
    if not out:
        raise HecError(f"ring degree(s) {', '.join(map(str, rings))} hold no multiplicative level "
                       f"at {'128-bit security' if opts.security == 'tc128' else 'these settings'} "
                       f"({'; '.join(too_small)}); use --ring "
                       f"{'65536' if refresh.bootstraps else '8192 or larger'}")
    return out


def plan(graph: Graph, opts: PlanOptions | None = None, cost: CostModel | None = None,
         progress=None) -> tuple[Candidate, list[Candidate]]:
    """Lower ``graph`` under every candidate parameter set; return the best
    and all candidates (with the reason each rejected one was rejected)."""
    opts = opts or PlanOptions()
    cost = cost or CostModel()
    cands: list[Candidate] = []
    best: Candidate | None = None
    queue = candidate_params(opts, cost.refresh)
    extra_done = not cost.refresh.bootstraps or opts.levels is not None
    lowering = opts.lowering
    if opts.max_compile_seconds is not None:
        lowering = replace(lowering, deadline=time.monotonic() + opts.max_compile_seconds)
        lowering.plan_cache = opts.lowering.plan_cache
    while queue:
        params = queue.pop(0)
        primes = make_primes(params.poly_degree, params.coeff_bits)
        lb = lower_bounds(graph, params, cost)
        if lb["memory_bytes"] > opts.max_memory_bytes or (opts.max_seconds and lb["seconds"] > opts.max_seconds):
            why = (f"memory at least {lb['memory_bytes'] / 2**30:.1f} GiB > budget"
                   if lb["memory_bytes"] > opts.max_memory_bytes else
                   f"at least {lb['seconds']:.0f} s per inference > --max-seconds {opts.max_seconds:g}")
            cands.append(Candidate(params, primes, None, None, None, why + " (bound from shapes, not lowered)"))
            continue
        try:
            prog, low = lower(graph, params, primes, lowering)
        except OutOfLevelsError:
            cands.append(Candidate(params, primes, None, None, None, "chain too short"))
            continue
        c = Candidate(params, primes, prog, low, program_cost(prog, cost))
        c.greedy_refreshed = low.refreshed_cts
        if low.refreshed_cts and opts.optimal_refresh:
            c = _place_refreshes(graph, c, opts, cost)
        if c.cost.memory_bytes > opts.max_memory_bytes:
            c.reason = f"memory {c.cost.memory_bytes / 2**30:.1f} GiB > budget"
        elif opts.max_seconds and c.cost.seconds > opts.max_seconds:
            c.reason = f"{c.cost.seconds:.1f} s per inference > --max-seconds {opts.max_seconds:g}"
        elif opts.max_refreshes is not None and c.cost.refreshes > opts.max_refreshes:
            c.reason = f"{c.cost.refreshes} refreshes > {opts.max_refreshes}"
        cands.append(c)
        # keep only the best program so far in memory (large networks have large programs)
        if not c.reason and (best is None or (c.cost.seconds, c.cost.memory_bytes) <
                             (best.cost.seconds, best.cost.memory_bytes)):
            if best is not None:
                best.prog = best.lowering = None
            best = c
        else:
            c.prog = c.lowering = None
        if progress is not None:
            progress(c)
        if not queue and not extra_done and best is not None and best.cost.refreshes:
            # a bootstrap costs as much as many convolutions, so the chain length matters to within a
            # level: add the chains the refresh DP says are worth lowering
            extra_done = True
            tried = {(p.poly_degree, p.scale_bits, p.top_level) for p in (cd.params for cd in cands)}
            p0 = best.params
            lmax = max_levels(p0.poly_degree, p0.scale_bits, opts.security, cost.refresh.reserved_bits(p0.scale_bits))
            for lv in promising_levels(best, cost, lmax):
                if (p0.poly_degree, p0.scale_bits, lv) not in tried:
                    queue.append(Params(p0.poly_degree, chain_bits(p0.poly_degree, p0.scale_bits, lv),
                                        p0.scale_bits, opts.security))
    if best is None:
        table = "; ".join(f"{c.label}: {c.reason}" for c in cands)
        raise HecError(f"no parameter set fits: {table}")
    return best, cands


def promising_levels(cand: Candidate, cost: CostModel, lmax: int, k: int = 2) -> list[int]:
    """The ``k`` chain lengths most likely to be cheapest for a program like
    ``cand``: the refresh DP on its level model gives the refreshed
    ciphertexts at every chain length (a residual network refreshes least
    when the chain fits whole blocks); a length is a candidate when it
    refreshes fewer than every shorter one, and is ranked by the compute of
    ``cand`` scaled to that length's mean rotation cost plus its refreshes."""
    model = cand.lowering.level_model()
    n, l0 = cand.params.poly_degree, cand.params.top_level
    compute0 = cand.cost.seconds - cand.cost.by_op.get("refresh", 0.0)

    def mean_rotate(levels: int) -> float:
        return sum(cost.op_seconds("rotate", n, p) for p in range(2, levels + 2)) / levels

    est: dict[int, float] = {}
    fewest = None
    for lv in range(1, lmax + 1):
        try:
            r = plan_refreshes(replace(model, top=lv)).ciphertexts
        except LoweringError:
            continue
        if fewest is not None and r >= fewest:
            continue
        fewest = r
        est[lv] = compute0 * mean_rotate(lv) / mean_rotate(l0) + r * cost.refresh_seconds(n, lv + 1)
    return sorted(est, key=est.get)[:k]


#: re-plans when a lowering deviates from its refresh plan (see _place_refreshes)
REPLANS = 3


def _place_refreshes(graph: Graph, greedy: Candidate, opts: PlanOptions, cost: CostModel) -> Candidate:
    """Exact refresh placement (DP) on the level model the greedy lowering
    observed.  Where the lowering then deviates from the plan (an Add's
    alignment or a pending scalar spends a level the model did not show, and
    a refresh the plan did not foresee follows), plan again on what that
    lowering observed, a few times; keep the best program."""
    best = greedy
    model = greedy.lowering.level_model()
    tried = set()
    for _ in range(REPLANS):
        rplan = plan_refreshes(model)
        key = tuple(sorted(rplan.before.items()))
        if key in tried:
            break
        tried.add(key)
        prog, low = lower(graph, greedy.params, greedy.primes, opts.lowering, rplan)
        c = Candidate(greedy.params, greedy.primes, prog, low, program_cost(prog, cost))
        c.greedy_refreshed = greedy.lowering.refreshed_cts
        c.refresh_plan = rplan
        if (c.cost.refreshes, c.cost.seconds) <= (best.cost.refreshes, best.cost.seconds):
            best = c
        if not low.unplanned_refreshes:
            break
        model = low.level_model()
    return best


def ranked(cands: list[Candidate]) -> list[Candidate]:
    """Acceptable candidates, fastest first."""
    ok = [c for c in cands if c.cost is not None and not c.reason]
    return sorted(ok, key=lambda c: (c.cost.seconds, c.cost.memory_bytes))


def realize(graph: Graph, cand: Candidate, opts: PlanOptions) -> Candidate:
    """Lower ``graph`` again for a candidate whose program was dropped."""
    if cand.prog is None:
        cand.prog, cand.lowering = lower(graph, cand.params, cand.primes, opts.lowering, cand.refresh_plan)
    return cand
