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
from .errors import CompileBudgetError, HecError, LoweringError, NoPlanError, OutOfLevelsError
from .heprog import HEProgram, Params
from .ir import Graph
from .layout_strategy import get_strategy, phase_bounds
from .lower import Lowering, LoweringOptions, lower
from .refresh import RefreshPlan, plan_refreshes
from .primes import chain_primes
from .target import SEAL_RINGS, Target, chain_bits, max_levels, seal_target  # noqa: F401 (re-exported)

DEFAULT_RINGS = SEAL_RINGS  # kept for callers of the old name


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
    #: slots per ciphertext (None: the planner weighs every packing the target offers: all N/2
    #: slots, and on a bootstrapping target the sparse packings whose bootstrap it measured)
    slots: int | None = None

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
        if self.slots is not None and not (isinstance(self.slots, int) and self.slots >= 2
                                           and not self.slots & (self.slots - 1)):
            raise HecError(f"--slots {self.slots}: must be a power of two")


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
    #: the lowering options it was lowered with (cost model and memory budget of the HE passes)
    lowering_options: LoweringOptions | None = None
    #: its layout strategy (hecompiler.layout_strategy)
    layout: str = "multiplexed"
    #: the target it was planned for, when the compiler chose among several (its set is in the label)
    target: Target | None = None

    @property
    def label(self) -> str:
        p = self.params
        sparse = f" slots=2^{p.log_slots}" if p.log_slots is not None else ""
        lay = f" layout={self.layout}" if self.layout != "multiplexed" else ""
        where = f" set={self.target.name.partition(':')[2] or self.target.name}" if self.target is not None else ""
        return f"N={p.poly_degree} L={p.top_level} scale=2^{p.scale_bits}{sparse}{lay}{where}"


def make_primes(n: int, bits: tuple[int, ...]) -> tuple[int, ...]:
    """The data primes q_0..q_L of a chain (the special prime dropped): the ones SEAL makes for
    these sizes, made without SEAL (:mod:`hecompiler.primes`)."""
    return chain_primes(n, bits)[:-1]


def candidate_params(opts: PlanOptions, refresh: RefreshCost | None = None, target: Target | None = None) -> list[Params]:
    """The parameter sets the planner lowers, from the target's rings, security table and chains."""
    refresh = refresh or RefreshCost()
    target = target or seal_target(refresh.kind)
    out = target.candidates(opts.ring_degrees, opts.scale_bits, opts.levels, opts.security, refresh)
    if opts.slots is None:
        return out
    keep = [p for p in out if p.slots == opts.slots]
    if not keep:
        offered = sorted({p.slots for p in out}, reverse=True)
        raise HecError(f"--slots {opts.slots}: target {target.name} offers {', '.join(map(str, offered))} slots per "
                       f"ciphertext (all N/2, and sparse packings whose bootstrap its cost table measured)")
    return keep


def plan(graph: Graph, opts: PlanOptions | None = None, cost: CostModel | None = None,
         progress=None, target: Target | None = None) -> tuple[Candidate, list[Candidate]]:
    """Lower ``graph`` under every candidate parameter set of ``target`` (SEAL by default);
    return the best and all candidates (with the reason each rejected one was rejected)."""
    opts = opts or PlanOptions()
    cost = cost or CostModel()
    cands: list[Candidate] = []
    best: Candidate | None = None
    target = target or seal_target(cost.refresh.kind)
    queue = candidate_params(opts, cost.refresh, target)
    extra_done = not cost.refresh.bootstraps or opts.levels is not None
    lowering = replace(opts.lowering, cost=cost, max_memory_bytes=opts.max_memory_bytes)
    if opts.max_compile_seconds is not None:
        lowering.deadline = time.monotonic() + opts.max_compile_seconds
    lowering.plan_cache = opts.lowering.plan_cache
    final_opts = replace(lowering, deadline=None)  # what realize() and later re-lowerings use
    while queue:
        params = queue.pop(0)
        primes = target.primes(params)
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
        c = Candidate(params, primes, prog, low, program_cost(prog, cost), lowering_options=final_opts,
                      layout=low.strategy.name)
        c.greedy_refreshed = low.stats.refreshed_cts
        if low.stats.refreshed_cts and opts.optimal_refresh:
            c = _place_refreshes(graph, c, opts, cost, lowering)
        if (low.stats.refreshed_cts and opts.levels is None and opts.scale_bits is None and target.backend == "seal"
                and params.top_level == max_levels(params.poly_degree, params.scale_bits, opts.security,
                                                   cost.refresh.reserved_bits(params.scale_bits))):
            # the longest chain of these primes needs refreshes: smaller primes hold more levels (a
            # 30-bit chain keeps 20 bits above the scale at the bottom; the precision check decides)
            depth = prog.levels_used()
            for sb in (30,):
                if sb < params.scale_bits and \
                        max_levels(params.poly_degree, sb, opts.security, cost.refresh.reserved_bits(sb)) >= depth \
                        and not any(q.poly_degree == params.poly_degree and q.scale_bits == sb and q.top_level == depth
                                    for q in [cd.params for cd in cands] + queue):
                    queue.append(Params(params.poly_degree, chain_bits(params.poly_degree, sb, depth), sb,
                                        opts.security))
        if not low.stats.refreshed_cts and opts.levels is None and prog.levels_used() < params.top_level:
            # the chain has levels the program never uses: a shorter one is cheaper in every op and
            # in key memory (keys grow with the square of the chain)
            lv = max(1, prog.levels_used())
            if not any(q.poly_degree == params.poly_degree and q.scale_bits == params.scale_bits
                       and q.top_level == lv and q.log_slots == params.log_slots
                       for q in [cd.params for cd in cands] + queue):
                bits = (params.coeff_bits[0],) + (params.scale_bits,) * lv + (params.coeff_bits[-1],)
                queue.insert(0, replace(params, coeff_bits=bits))
        _check_budgets(c, opts)
        cands.append(c)
        best = _keep_cheaper(best, c)
        if progress is not None:
            progress(c)
        if not queue and not extra_done and best is not None and best.cost.refreshes:
            # a bootstrap costs as much as many convolutions, so the chain length matters to within a
            # level: add the chains the refresh DP says are worth lowering
            extra_done = True
            tried = {(p.poly_degree, p.scale_bits, p.top_level, p.log_slots) for p in (cd.params for cd in cands)}
            p0 = best.params
            lmax = max(c.params.top_level for c in cands)
            if target.backend == "seal":
                lmax = max_levels(p0.poly_degree, p0.scale_bits, opts.security,
                                  cost.refresh.reserved_bits(p0.scale_bits))
            for lv in promising_levels(best, cost, lmax):
                if (p0.poly_degree, p0.scale_bits, lv, p0.log_slots) not in tried:
                    bits = (p0.coeff_bits[0],) + (p0.scale_bits,) * lv + (p0.coeff_bits[-1],)
                    queue.append(replace(p0, coeff_bits=bits, security=opts.security))
    lowered = [c for c in cands if c.cost is not None]  # (not those refused from their shapes alone)
    if best is None and opts.lowering.layout is None and lowered:
        # nothing fits with the default layouts: a leaner strategy may, at the parameters that came
        # closest (the least memory; a replicated layout needs fewer keys and plaintexts)
        seed = min(lowered, key=lambda c: (c.cost.memory_bytes, c.cost.seconds))
        best = _search_layouts(graph, seed, cands, opts, cost, lowering, final_opts, progress)
        if best.reason:
            best = None
    elif best is not None and opts.lowering.layout is None:
        best = _search_layouts(graph, best, cands, opts, cost, lowering, final_opts, progress)
    if best is None:
        table = "; ".join(f"{c.label}: {c.reason}" for c in cands)
        raise NoPlanError(f"no parameter set fits: {table}")
    return best, cands


def _keep_cheaper(best: Candidate | None, c: Candidate) -> Candidate | None:
    """The faster (then smaller) of ``best`` and ``c`` when ``c`` fits its budgets (any ``c`` that
    fits, when ``best`` does not); only that one keeps its program in memory (large networks have
    large programs)."""
    if not c.reason and (best is None or best.reason or (c.cost.seconds, c.cost.memory_bytes) <
                         (best.cost.seconds, best.cost.memory_bytes)):
        if best is not None:
            best.prog = best.lowering = None
        return c
    c.prog = c.lowering = None
    return best


def _check_budgets(c: Candidate, opts: PlanOptions) -> None:
    """Set ``c.reason`` when the candidate breaks a budget (memory, seconds, refreshes)."""
    if c.cost.memory_bytes > opts.max_memory_bytes:
        c.reason = f"memory {c.cost.memory_bytes / 2**30:.1f} GiB > budget"
    elif opts.max_seconds and c.cost.seconds > opts.max_seconds:
        c.reason = f"{c.cost.seconds:.1f} s per inference > --max-seconds {opts.max_seconds:g}"
    elif opts.max_refreshes is not None and c.cost.refreshes > opts.max_refreshes:
        c.reason = f"{c.cost.refreshes} refreshes > {opts.max_refreshes}"


#: layout strategies the planner tries beside the default at the chosen parameters ("gapped" is
#: searchable with --layout but not tried: it holds the same diagonals in emptier ciphertexts);
#: and ``polyphase:K`` for every bound K below a graph input's decimation (``phase_bounds``)
SEARCHED_LAYOUTS = ("aligned", "polyphase", "replicated")


def _search_layouts(graph: Graph, best: Candidate, cands: list[Candidate], opts: PlanOptions, cost: CostModel,
                    lowering: LoweringOptions, final_opts: LoweringOptions, progress=None) -> Candidate:
    """The chosen parameters lowered with each other layout strategy (refreshes placed again for
    each); the cheapest that fits the budgets wins.  A strategy that lays out this graph exactly
    as the chosen one is skipped.  The phase bounds are tried from the largest down, and no
    further once one is slower than the larger bound before it and that one fit (fewer phases
    encode more plaintexts: ResNet-18's predicted time grows at every halving)."""
    phased = None  # the last polyphase candidate lowered
    for name in SEARCHED_LAYOUTS + tuple(f"polyphase:{k}" for k in reversed(phase_bounds(graph))):
        strat = get_strategy(name)
        if name == best.layout or not _strategy_differs(graph, strat, get_strategy(best.layout), best.params.slots):
            continue
        lo = replace(lowering, layout=name)
        try:
            prog, low = lower(graph, best.params, best.primes, lo)
        except (OutOfLevelsError, CompileBudgetError):
            continue
        c = Candidate(best.params, best.primes, prog, low, program_cost(prog, cost),
                      lowering_options=replace(final_opts, layout=name), layout=name)
        c.greedy_refreshed = low.stats.refreshed_cts
        if low.stats.refreshed_cts and opts.optimal_refresh:
            c = _place_refreshes(graph, c, opts, cost, lo)
        _check_budgets(c, opts)
        cands.append(c)
        best = _keep_cheaper(best, c)
        if progress is not None:
            progress(c)
        if name.startswith("polyphase"):
            if name != "polyphase" and phased is not None and not phased.reason \
                    and c.cost.seconds > phased.cost.seconds:
                break
            phased = c
    return best


def _strategy_differs(graph: Graph, strat, other, slots: int) -> bool:
    """Whether ``strat`` lays out the graph's inputs otherwise than ``other`` (from there on the
    two derive the same layouts alike, unless one replicates small tensors and the other not:
    which tensors are small is known only when lowered)."""
    from .layout import chw
    from .layout_strategy import decimation

    if strat.replicate != other.replicate:
        return True

    dec = decimation(graph)
    for v in graph.inputs:
        try:
            shape = chw(v.type.shape, fold_batch=True)
        except HecError:
            return False
        batch = int(v.type.shape[0]) if v.type.rank >= 2 else 1
        k = dec.get(v.name, 1)
        if strat.input_layout(shape, slots, batch, k) != other.input_layout(shape, slots, batch, k):
            return True
    return False


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
        est[lv] = compute0 * mean_rotate(lv) / mean_rotate(l0) + r * cost.refresh_seconds(n, lv + 1,
                                                                                         cand.params.slots)
    return sorted(est, key=est.get)[:k]


#: re-plans when a lowering deviates from its refresh plan (see _place_refreshes)
REPLANS = 3


def _place_refreshes(graph: Graph, greedy: Candidate, opts: PlanOptions, cost: CostModel,
                     lowering: LoweringOptions | None = None) -> Candidate:
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
        prog, low = lower(graph, greedy.params, greedy.primes, lowering or opts.lowering, rplan)
        c = Candidate(greedy.params, greedy.primes, prog, low, program_cost(prog, cost),
                      lowering_options=greedy.lowering_options, layout=greedy.layout)
        c.greedy_refreshed = greedy.lowering.stats.refreshed_cts
        c.refresh_plan = rplan
        if (c.cost.refreshes, c.cost.seconds) <= (best.cost.refreshes, best.cost.seconds):
            best = c
        if not low.stats.unplanned_refreshes:
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
        cand.prog, cand.lowering = lower(graph, cand.params, cand.primes, cand.lowering_options or opts.lowering,
                                         cand.refresh_plan)
    return cand
