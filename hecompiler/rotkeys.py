"""Rotation keys as a budget: which Galois keys a program gets, and how every rotation is
made from them.

A rotation by ``s`` slots needs the Galois key of ``s``, unless it is composed of rotations
by keys ``k1 + k2 + ... = s (mod slots)``: each extra hop is one more key switch, each
missing key saves a whole key-switching key of memory (at N=2^15 with 12 primes, 78 MiB).
This module is the one place that decides how a rotation is composed, so the compiler (which
counts the rotations and prices them) and the runtime (which performs them) cannot disagree:

* :class:`KeyGraph`: shortest compositions over a key set (breadth-first search on the
  cyclic group of slot rotations; ties broken deterministically);
* :func:`baby_tree`: the baby steps of one input ciphertext of a ``linear`` macro, each
  rotated from the nearest baby step already made (Prim's rule), so ``{-33, -32, -31, -1, 1,
  31, 32, 33}`` needs the keys ``{1, -1, 32, -32}`` and no extra rotation;
* :func:`giant_chain`: the giant steps of one output ciphertext accumulated Horner-style
  (``rot(a, g1) + rot(b, g2) = rot(a + rot(b, g2 - g1), g1)``), from both sides of 0, so the
  steps ``{-2n, -n, n, 2n, 3n}`` need only the keys ``n`` and ``-n``, with the same number of
  rotations as one rotation per giant step;
* :func:`select_keys`: the key set itself, greedily: keys are added by the rotation time they
  save (weighted by each rotation's cost at its level), lazily re-evaluated, until nothing
  saves time; every prefix of that order is a valid key set, so the planner can cut it at the
  memory budget and report the trade (keys, bytes, extra rotations).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .arrays import distinct
from .errors import HecError


#: the longest composition of one rotation (in key rotations) the compiler and the runtime use
MAX_HOPS = 16


def signed(step: int, slots: int) -> int:
    """The rotation step as an integer in (-slots/2, slots/2]."""
    s = int(step) % slots
    return s - slots if s > slots // 2 else s


class KeyGraph:
    """Shortest compositions of rotations over ``keys`` (steps mod ``slots``).

    ``dist[s]`` is the fewest key rotations that rotate by ``s`` (-1: unreachable within
    :data:`MAX_HOPS`) and :meth:`path` one such composition, the same on every machine: the
    search expands keys in ascending order of ``step mod slots`` and keeps the first key that
    reaches a slot."""

    def __init__(self, keys: Iterable[int], slots: int):
        self.slots = S = int(slots)
        ks = sorted({int(k) % S for k in keys} - {0})
        self.keys = tuple(ks)
        # breadth-first over the slots as the bits of one integer: a hop by every key is a few
        # shifts of the whole frontier
        dist = np.full(S, -1, np.int32)
        dist[0] = 0
        full = (1 << S) - 1
        front = reached = 1
        d = 0
        while front and ks and d < MAX_HOPS:
            d += 1
            new = 0
            for k in ks:
                new |= (front << k) | (front >> (S - k))
            new &= full & ~reached
            if not new:
                break
            bits = np.unpackbits(np.frombuffer(new.to_bytes((S + 7) // 8, "little"), np.uint8), bitorder="little")
            dist[np.flatnonzero(bits[:S])] = d
            reached |= new
            front = new
        self.dist = dist
        self._last_hop: np.ndarray | None = None

    @property
    def _last(self) -> np.ndarray:
        """The key of the last hop of the path to each slot: the first key, in ascending order,
        from a slot one hop nearer (what a search expanding the keys in that order keeps)."""
        if self._last_hop is None:
            S, dist = self.slots, self.dist
            last = np.zeros(S, np.int64)
            left = dist > 0
            for k in self.keys:
                hit = left & (np.roll(dist, k) == dist - 1)  # np.roll(dist, k)[s] = dist[s - k]
                last[hit] = k
                left &= ~hit
            self._last_hop = last
        return self._last_hop

    def reaches(self, step: int) -> bool:
        return self.dist[int(step) % self.slots] >= 0

    def hops(self, step: int) -> int:
        d = int(self.dist[int(step) % self.slots])
        if d < 0:
            raise HecError(f"rotation by {signed(step, self.slots)} cannot be composed from the Galois keys "
                           f"{[signed(k, self.slots) for k in self.keys][:12]} in {MAX_HOPS} rotations or fewer")
        return d

    def path(self, step: int) -> list[int]:
        """Key steps (mod slots) whose rotations, applied in order, rotate by ``step``."""
        s = int(step) % self.slots
        self.hops(s)
        out = []
        while s:
            k = int(self._last[s])
            out.append(k)
            s = (s - k) % self.slots
        return out[::-1]


# --------------------------------------------------------------------------- schedules

@dataclass(frozen=True)
class Edge:
    """Rotate the ciphertext rotated by ``src`` along ``path`` (key steps) to get ``dst``."""

    src: int
    dst: int
    path: tuple[int, ...]


def baby_tree(steps: Iterable[int], graph: KeyGraph, star: bool = False) -> list[Edge]:
    """How to make the rotations by ``steps`` (of one ciphertext) over the keys of ``graph``:
    Prim's rule on the composition distances, each step made from the nearest one made
    before (0 is the ciphertext itself).  Deterministic: ties go to the smaller |step|, then
    the smaller step.  ``star``: every step made from the ciphertext itself (a backend that
    hoists shares one decomposition among all the first hops)."""
    S = graph.slots
    targets = sorted({signed(s, S) for s in steps} - {0}, key=lambda s: (abs(s), s))
    if not targets:
        return []
    if star:
        return [Edge(0, b, tuple(graph.path(b))) for b in targets]
    t = np.asarray(targets, np.int64)
    best = graph.dist[t % S].astype(np.int64)
    if (best < 0).any():
        graph.hops(int(t[np.flatnonzero(best < 0)[0]]))  # raises with the step named
    src = np.zeros(len(t), np.int64)
    done = np.zeros(len(t), bool)
    edges = []
    for _ in range(len(t)):
        cand = np.where(done, np.iinfo(np.int64).max, best)
        k = int(np.argmin(cand))  # first minimum: targets are in tie-break order
        done[k] = True
        b = int(t[k])
        edges.append(Edge(int(src[k]), b, tuple(graph.path(b - int(src[k])))))
        d = graph.dist[(t - b) % S].astype(np.int64)
        better = (d >= 0) & (d < best) & ~done
        best[better] = d[better]
        src[better] = b
    return edges


def tree_rotations(steps: Iterable[int], graph: KeyGraph) -> int:
    return sum(len(e.path) for e in baby_tree(steps, graph))


@dataclass(frozen=True)
class GiantChain:
    """Horner order of one output ciphertext's giant steps: ``pos`` ascending (> 0), ``neg``
    descending (< 0); each side is folded from its far end toward 0 and the ``zero`` group is
    added last.  ``hops`` are the key paths of each rotation, in evaluation order."""

    pos: tuple[int, ...]
    neg: tuple[int, ...]
    zero: bool
    hops: tuple[tuple[int, ...], ...]

    @property
    def rotations(self) -> int:
        return sum(len(h) for h in self.hops)


def giant_rotations_needed(giants: Iterable[int], slots: int) -> list[int]:
    """The rotation steps of a Horner accumulation of ``giants`` (signed, in evaluation order)."""
    gs = sorted({signed(g, slots) for g in giants})
    pos = [g for g in gs if g > 0]
    neg = sorted((g for g in gs if g < 0), reverse=True)
    out = []
    for side in (pos, neg):
        for k in range(len(side) - 2, -1, -1):
            out.append(side[k + 1] - side[k])
        if side:
            out.append(side[0])
    return out


def giant_chain(giants: Iterable[int], graph: KeyGraph) -> GiantChain:
    S = graph.slots
    gs = sorted({signed(g, S) for g in giants})
    pos = tuple(g for g in gs if g > 0)
    neg = tuple(sorted((g for g in gs if g < 0), reverse=True))
    hops = tuple(tuple(graph.path(r)) for r in giant_rotations_needed(gs, S))
    return GiantChain(pos, neg, 0 in gs, hops)


# --------------------------------------------------------------------------- demands and selection

@dataclass
class Demands:
    """Every rotation a program performs, as what the key set must make: ``trees`` (baby-step
    sets of one ciphertext, made by :func:`baby_tree`) and ``singles`` (one rotation each:
    Horner differences, standalone rotations).  Each maps to ``[uses, weight]``: how many
    times it is performed and the summed weight of those uses (seconds per rotation at the
    level it runs at, or 1 each)."""

    slots: int
    trees: dict[tuple[int, ...], list[float]] = field(default_factory=dict)
    singles: dict[int, list[float]] = field(default_factory=dict)  # step mod slots -> [uses, weight]

    def add_tree(self, steps: Iterable[int], weight: float = 1.0, uses: int = 1) -> None:
        st = tuple(sorted({signed(s, self.slots) for s in steps} - {0}))
        if st:
            e = self.trees.setdefault(st, [0, 0.0])
            e[0] += uses
            e[1] += float(weight) * uses

    def add_single(self, step: int, weight: float = 1.0, uses: int = 1) -> None:
        s = int(step) % self.slots
        if s:
            e = self.singles.setdefault(s, [0, 0.0])
            e[0] += uses
            e[1] += float(weight) * uses

    def direct_keys(self) -> set[int]:
        """The keys with which every rotation is one hop (the lower bound in rotations)."""
        out = set(self.singles)
        for st in self.trees:
            out.update(s % self.slots for s in st)
        return out


#: a rotation a key set cannot make at all counts as this many hops (selection only)
_UNREACHABLE = 64


#: largest tree :func:`_prim` grows with Python lists (above it, numpy)
_PRIM_LISTS = 64


def _prim(D: np.ndarray) -> int:
    """Rotations of Prim's tree from node 0 over the distance matrix ``D`` (``D[r, c]``: hops
    from node r to node c), as :func:`baby_tree` builds it."""
    n = D.shape[0] - 1
    if n <= _PRIM_LISTS:  # baby sets are small: plain lists beat three numpy calls per step
        rows = D.tolist()
        best = rows[0][1:]
        left = list(range(n))
        total = 0
        for _ in range(n):
            k = min(left, key=best.__getitem__)  # the first of the least, as np.argmin
            left.remove(k)
            total += best[k]
            row = rows[k + 1]
            for i in left:
                if row[i + 1] < best[i]:
                    best[i] = row[i + 1]
        return total
    best = D[0, 1:].copy()
    done = np.zeros(n, bool)
    total = 0
    big = np.iinfo(np.int64).max
    for _ in range(n):
        k = int(np.argmin(np.where(done, big, best)))
        done[k] = True
        total += int(best[k])
        np.minimum(best, D[k + 1, 1:], out=best)
    return total


class _Evaluator:
    """Weighted rotation cost of a key set over fixed demands, with cheap one-key additions:
    only the distances of the steps the demands can ask for (singles, and differences inside
    each baby set) are ever read, and a baby set's tree is recounted only when one of its
    distances changed."""

    def __init__(self, dem: Demands, unit: bool = False):
        """``unit``: count rotations (uses) instead of weighing them."""
        c = 0 if unit else 1
        self.S = S = dem.slots
        # each baby set in baby_tree's tie-break order (|step|, step): Prim's rule on a directed
        # distance is not tie-free, and the count must be the one the runtime performs
        trees = [(np.concatenate([[0], np.asarray(sorted(st, key=lambda s: (abs(s), s)), np.int64)]), e[c])
                 for st, e in sorted(dem.trees.items())]
        self.singles = np.asarray(sorted(dem.singles), np.int64)
        self.sw = np.asarray([dem.singles[s][c] for s in sorted(dem.singles)], float)
        need = [self.singles % S] + [((a[None, :] - a[:, None]) % S).reshape(-1) for a, _ in trees]
        self.need = distinct(np.concatenate(need)) if len(need) else np.zeros(0, np.int64)
        self.single_idx = np.searchsorted(self.need, self.singles % S)
        # per tree: the index into ``need`` of every (from, to) difference
        self.trees = [(np.searchsorted(self.need, (a[None, :] - a[:, None]) % S), w) for a, w in trees]
        self.targets = distinct(np.concatenate([self.singles % S] + [a[1:] % S for a, _ in trees]))
        self._memo: tuple[np.ndarray, list[int]] | None = None

    def _dneed(self, dist: np.ndarray) -> np.ndarray:
        d = dist[self.need].astype(np.int64)
        return np.where(d < 0, _UNREACHABLE, d)

    def tree_counts(self, dneed: np.ndarray) -> list[int]:
        memo = self._memo
        if memo is not None and len(memo[0]) == len(dneed):
            changed = dneed != memo[0]
            out = [memo[1][t] if not changed[idx].any() else _prim(dneed[idx])
                   for t, (idx, _) in enumerate(self.trees)]
        else:
            out = [_prim(dneed[idx]) for idx, _ in self.trees]
        return out

    def cost(self, dist: np.ndarray, remember: bool = False) -> float:
        dn = self._dneed(dist)
        counts = self.tree_counts(dn)
        if remember:
            self._memo = (dn, counts)
        c = float(np.dot(dn[self.single_idx], self.sw)) if len(self.singles) else 0.0
        return c + float(sum(w * k for (_, w), k in zip(self.trees, counts)))

    def with_key(self, dist: np.ndarray, k: int) -> np.ndarray:
        """Distances with key ``k`` added, at the needed steps: rotations commute, so a best
        path uses ``k`` some ``m`` times and the old keys for the rest,
        ``min over m of dist(s - m k) + m``."""
        S = self.S
        P = self.need
        d = dist.astype(np.int64)
        d = np.where(d < 0, _UNREACHABLE, d)
        best = d[P].copy()
        m = 1
        while m < best.max(initial=0) and m < _UNREACHABLE:
            np.minimum(best, d[(P - m * k) % S] + m, out=best)
            m += 1
        out = dist.copy()
        out[P] = np.where(best >= _UNREACHABLE, -1, best)
        return out


@dataclass
class KeySelection:
    """The greedy order of keys and what each prefix costs.

    ``order``: keys in the order they were added; ``costs[i]``: weighted rotation cost with
    the first ``i + 1`` keys (``inf`` while some rotation cannot be made); ``rotations[i]``:
    unweighted rotation count with them; ``direct``: the count with a key for every step used
    directly (the old key set, ``len(direct_keys)`` keys)."""

    order: list[int]
    costs: list[float]
    rotations: list[int]
    direct_rotations: int
    direct_keys: list[int]
    slots: int

    def smallest_feasible(self) -> int:
        """The fewest keys (a prefix length) that make every rotation."""
        for i, c in enumerate(self.costs):
            if np.isfinite(c):
                return i + 1
        raise HecError("no key set makes every rotation")

    def prefix(self, n: int) -> list[int]:
        return sorted(self.order[:n])

    def best_within(self, max_keys: int | None) -> int:
        """The prefix length with the lowest cost among those of at most ``max_keys`` keys (the
        shortest of equally cheap ones)."""
        lo = self.smallest_feasible()
        hi = len(self.order) if max_keys is None else min(len(self.order), max_keys)
        if hi < lo:
            raise HecError(f"{max_keys} Galois keys cannot make every rotation of the program (at least {lo} needed)")
        best = min(range(lo - 1, hi), key=lambda i: (self.costs[i], i))
        return best + 1


_SELECTIONS: dict = {}


def select_keys(dem: Demands, max_keys: int | None = None, candidates: Iterable[int] | None = None) -> KeySelection:
    """Greedy key selection (see the module doc).  Candidates: every step used directly, every
    difference inside a baby set, and the powers of two in both directions.  Remembered per
    demands (the planner's parameter candidates of one ring share them)."""
    key = (dem.slots, max_keys, None if candidates is None else tuple(sorted(candidates)),
           tuple(sorted((st, e[0], round(e[1], 9)) for st, e in dem.trees.items())),
           tuple(sorted((s, e[0], round(e[1], 9)) for s, e in dem.singles.items())))
    hit = _SELECTIONS.get(key)
    if hit is None:
        hit = _select_keys(dem, max_keys, candidates)
        if len(_SELECTIONS) > 64:
            _SELECTIONS.clear()
        _SELECTIONS[key] = hit
    return hit


def _select_keys(dem: Demands, max_keys: int | None, candidates: Iterable[int] | None) -> KeySelection:
    S = dem.slots
    ev = _Evaluator(dem)
    direct = sorted(dem.direct_keys())
    g_direct = KeyGraph(direct, S)
    # unweighted rotation counts (a single's weight sums its uses, so count from a unit copy)
    unit = _Evaluator(dem, unit=True)
    direct_rot = int(round(unit.cost(g_direct.dist)))
    if candidates is None:
        cset = set(direct)
        for st in dem.trees:
            a = np.asarray((0,) + st, np.int64)
            cset.update(int(x) % S for x in (a[:, None] - a[None, :]).reshape(-1))
        p = 1
        while p < S:
            cset.update((p, (-p) % S))
            p *= 2
        cset.discard(0)
    else:
        cset = {int(c) % S for c in candidates} - {0}
    cands = sorted(cset)
    empty = np.full(S, -1, np.int32)
    empty[0] = 0
    dist = empty
    cur = ev.cost(dist, remember=True)
    order: list[int] = []
    costs: list[float] = []
    rots: list[int] = []
    # lazy greedy: a candidate's gain only shrinks as keys are added (up to the heuristics), so
    # stale gains are upper bounds; re-evaluate the top until it stays on top
    heap = []
    for c in cands:
        d = ev.with_key(dist, c)
        heap.append((-(cur - ev.cost(d)), c, 0))
    heapq.heapify(heap)
    limit = len(cands) if max_keys is None else max_keys
    while heap and len(order) < limit:
        g, c, stamp = heapq.heappop(heap)
        if stamp != len(order):
            d = ev.with_key(dist, c)
            heapq.heappush(heap, (-(cur - ev.cost(d)), c, len(order)))
            continue
        if -g <= 1e-12 and np.isfinite(cur) and cur < _UNREACHABLE:
            break
        order.append(c)
        dist = KeyGraph(order, S).dist
        cur = ev.cost(dist, remember=True)
        costs.append(cur if not _unreachable(ev, dist) else float("inf"))
        rots.append(int(round(unit.cost(dist))))
        if not np.isfinite(costs[-1]):
            continue
        if rots[-1] <= direct_rot:
            break
    sel = KeySelection(order, costs, rots, direct_rot, direct, S)
    return _prune(sel, ev, unit)


def _unreachable(ev: _Evaluator, dist: np.ndarray) -> bool:
    """Some rotation cannot be made (a single, or a baby step from its input)."""
    return bool((dist[ev.targets] < 0).any())


def _prune(sel: KeySelection, ev: _Evaluator, unit: _Evaluator) -> KeySelection:
    """Drop keys of the final set whose removal costs nothing (a later key made them redundant),
    keeping the order of the rest."""
    if not sel.order or not np.isfinite(sel.costs[-1]):
        return sel
    keys = list(sel.order)
    final = sel.costs[-1]
    for k in sorted(keys, key=lambda k: -keys.index(k)):
        trial = [x for x in keys if x != k]
        if not trial:
            continue
        d = KeyGraph(trial, sel.slots).dist
        if not _unreachable(ev, d) and ev.cost(d) <= final + 1e-12:
            keys = trial
    if keys == sel.order:
        return sel
    costs, rots = [], []
    for i in range(1, len(keys) + 1):
        d = KeyGraph(keys[:i], sel.slots).dist
        costs.append(float("inf") if _unreachable(ev, d) else ev.cost(d))
        rots.append(int(round(unit.cost(d))))
    return KeySelection(keys, costs, rots, sel.direct_rotations, sel.direct_keys, sel.slots)


# --------------------------------------------------------------------------- schedules of linear ops

@dataclass
class LinearSchedule:
    """How a ``tree`` linear op's rotations run over a key set: per input ciphertext its baby
    tree, per output ciphertext its Horner chain; the counts the compiler records."""

    trees: dict[int, list[Edge]]
    chains: dict[int, GiantChain]

    @property
    def rotations(self) -> int:
        return (sum(len(e.path) for es in self.trees.values() for e in es)
                + sum(c.rotations for c in self.chains.values()))

    @property
    def hoisted(self) -> int:
        """Rotations a hoisting backend shares one decomposition for: the distinct first hops
        from each input ciphertext."""
        return sum(len({e.path[0] for e in es if e.src == 0}) for es in self.trees.values())

    @property
    def held(self) -> int:
        """Baby-step ciphertexts alive while the op runs (its largest input tree)."""
        return sum(len(es) for es in self.trees.values())

    def needs(self, slots: int) -> list[int]:
        """The distinct rotations the schedule composes (steps mod slots)."""
        out = set()
        for es in self.trees.values():
            out.update((e.dst - e.src) % slots for e in es)
        for c in self.chains.values():
            for h in c.hops:
                out.add(sum(h) % slots)
        out.discard(0)
        return sorted(out)


#: linear-op schedules over a key set (see hecompiler.heprog.LinearOp.schedule)
SCHEDULES = ("tree", "star")


def linear_schedule(plan, graph: KeyGraph, star: bool = False) -> LinearSchedule:
    """The schedule of a BSGS plan (:class:`hecompiler.linear.BsgsPlan`) over ``graph``'s keys
    (``star``: the baby steps each from the input, see :func:`baby_tree`)."""
    trees = {i: baby_tree(bs, graph, star) for i, bs in plan.baby.items()}
    chains = {j: giant_chain(list(gs), graph) for j, gs in plan.giant.items()}
    return LinearSchedule(trees, chains)


def linear_demands(plan, slots: int, dem: Demands, weight: float = 1.0, star: bool = False,
                   hoisted_weight: float | None = None) -> None:
    """Add what a BSGS plan's ``tree`` (or ``star``) schedule asks of the key set to ``dem``
    (``hoisted_weight``: the price of a star baby step's hoisted first hop)."""
    for bs in plan.baby.values():
        if star:
            for b in bs:
                dem.add_single(b, weight if hoisted_weight is None else hoisted_weight)
        else:
            dem.add_tree(bs, weight)
    for gs in plan.giant.values():
        for r in giant_rotations_needed(list(gs), slots):
            dem.add_single(r, weight)
