"""Refresh placement: where to refresh ciphertexts so that no op runs out of
levels, with as few refreshed ciphertexts as possible.

The level model comes from a first (greedy) lowering: for every graph node
the number of levels it *drops* (an output is at ``min(input levels) - drop``)
and for every encrypted value how many ciphertexts hold it.  A refresh may
be applied to a value just before any node that reads it; the refreshed value
is then what every later reader sees (this is how skip sources are shared:
refresh the block input once and both the branch and the skip benefit).

:func:`plan_refreshes` solves this exactly by dynamic programming over the
graph in topological order.  The DP state is the level of every *live*
encrypted value (produced, still to be read); in residual networks only the
main branch and the skip source are live at once, so the state space is
tiny.  The objective is lexicographic: refreshed ciphertexts first, then the
cost of the ops at the levels they run at (ops are cheaper with fewer
primes).  :func:`brute_force` enumerates every placement, for tests.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .errors import LoweringError


@dataclass
class NodeInfo:
    name: str  # the node's first output name (how the lowering names nodes)
    inputs: tuple[str, ...]  # encrypted operands (distinct)
    output: str | None  # encrypted result, if any
    drop: int  # levels consumed: out = min(inputs) - drop, and min(inputs) >= drop
    weight: float = 0.0  # relative op cost per level of its input (secondary objective)


@dataclass
class LevelModel:
    nodes: list[NodeInfo]
    n_ct: dict[str, int]  # ciphertexts per encrypted value
    inputs: list[str]  # graph inputs (fresh, top level)
    outputs: list[str]
    top: int


@dataclass
class RefreshPlan:
    before: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node -> values refreshed before it
    ciphertexts: int = 0  # refreshed ciphertexts in total
    op_cost: float = 0.0

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.before.values())


def _last_uses(model: LevelModel) -> dict[str, int]:
    last = {}
    for k, n in enumerate(model.nodes):
        for v in n.inputs:
            last[v] = k
    for v in model.outputs:
        last[v] = len(model.nodes)
    return last


def plan_refreshes(model: LevelModel) -> RefreshPlan:
    """The placement with the fewest refreshed ciphertexts (then cheapest ops)."""
    top = model.top
    last = _last_uses(model)
    start = tuple(sorted((v, top) for v in model.inputs if last.get(v, -1) >= 0))
    # state -> (cost tuple, backpointer)
    layer: dict[tuple, tuple[tuple[int, float], tuple | None]] = {start: ((0, 0.0), None)}
    history: list[dict] = []
    for k, n in enumerate(model.nodes):
        nxt: dict[tuple, tuple[tuple[int, float], tuple]] = {}
        for state, (cost, _) in layer.items():
            levels = dict(state)
            for r in range(len(n.inputs) + 1):
                for refresh in itertools.combinations(n.inputs, r):
                    lv = {v: (top if v in refresh else levels[v]) for v in n.inputs}
                    lo = min(lv.values()) if lv else top
                    if lo < n.drop:
                        continue
                    new = dict(levels)
                    for v in refresh:
                        new[v] = top
                    for v in n.inputs:
                        if last[v] <= k:
                            new.pop(v, None)
                    if n.output is not None and last.get(n.output, -1) > k:
                        new[n.output] = lo - n.drop
                    key = tuple(sorted(new.items()))
                    c = (cost[0] + sum(model.n_ct[v] for v in refresh), cost[1] + n.weight * (lo + 1))
                    if key not in nxt or c < nxt[key][0]:
                        nxt[key] = (c, (state, refresh))
        if not nxt:
            raise LoweringError(f"node {n.name}: needs {n.drop} levels, more than the chain's {top}")
        history.append(nxt)
        layer = nxt
    # reconstruct
    best_state = min(layer, key=lambda s: layer[s][0])
    plan = RefreshPlan(ciphertexts=layer[best_state][0][0], op_cost=layer[best_state][0][1])
    state = best_state
    for k in range(len(model.nodes) - 1, -1, -1):
        _, (prev, refresh) = history[k][state]
        if refresh:
            plan.before[model.nodes[k].name] = tuple(refresh)
        state = prev
    return plan


def brute_force(model: LevelModel) -> int:
    """Fewest refreshed ciphertexts over every placement (exponential: tests only)."""
    choices = [(k, v) for k, n in enumerate(model.nodes) for v in n.inputs]
    best = None
    for r in range(len(choices) + 1):
        for subset in itertools.combinations(choices, r):
            cost = sum(model.n_ct[v] for _, v in subset)
            if best is not None and cost >= best:
                continue
            if _feasible(model, set(subset)):
                best = cost
        if best is not None and all(model.n_ct[v] >= 1 for _, v in choices) and best <= r:
            break
    if best is None:
        raise LoweringError("no feasible refresh placement")
    return best


def _feasible(model: LevelModel, refreshes: set[tuple[int, str]]) -> bool:
    levels = {v: model.top for v in model.inputs}
    for k, n in enumerate(model.nodes):
        for v in n.inputs:
            if (k, v) in refreshes:
                levels[v] = model.top
        lo = min((levels[v] for v in n.inputs), default=model.top)
        if lo < n.drop:
            return False
        if n.output is not None:
            levels[n.output] = lo - n.drop
    return True
