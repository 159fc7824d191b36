"""hecompiler/rotkeys.py and the rotation-key budget: compositions of rotations over a key set
(key graph, baby trees, Horner giant chains), numerically (simulator and SEAL at a small ring)
and through whole programs whose Galois keys are cut to a budget, checked against the program
with one key per step and against onnxruntime; the verifier and the runtime refuse programs
whose keys cannot make what their ops need."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest

import build_models as bm  # noqa: E402  (tests/conftest.py puts models/ on sys.path)
import hecompiler as hc
from hecompiler.backends.sim import Simulator
from hecompiler.errors import HecError
from hecompiler.heprog import Params, ProgramError, parse_program, print_program, verify_program
from hecompiler.lower import LoweringOptions, lower
from hecompiler.rotkeys import (Demands, KeyGraph, MAX_HOPS, baby_tree, giant_chain, giant_rotations_needed,
                                select_keys, signed, tree_rotations)

from conftest import ort_run

sealapi = pytest.importorskip("tenseal.sealapi")

N, BITS = 8192, (60, 40, 40, 60)
S = N // 2


# --------------------------------------------------------------------------- key graph

def _bfs(keys, slots, step):
    """Fewest rotations by ``keys`` that rotate by ``step`` (plain breadth-first search)."""
    seen = {0: 0}
    front = [0]
    d = 0
    while front and d < MAX_HOPS:
        d += 1
        nxt = []
        for s in front:
            for k in keys:
                t = (s + k) % slots
                if t not in seen:
                    seen[t] = d
                    nxt.append(t)
        front = nxt
    return seen.get(step % slots, -1)


@pytest.mark.parametrize("keys", [(1, 8, -8), (3, -5), (2, 16, -1), (7,)])
def test_key_graph_shortest_paths(keys):
    slots = 64
    g = KeyGraph(keys, slots)
    for s in range(slots):
        want = _bfs(keys, slots, s)
        assert g.dist[s] == want, (keys, s)
        if want >= 0:
            p = g.path(s)
            assert len(p) == want == g.hops(s)
            assert sum(p) % slots == s and all(k in g.keys for k in p)
            if want > 0:  # the tie-break: the last hop is the smallest key from a slot one hop nearer
                assert p[-1] == min(k for k in g.keys if g.dist[(s - k) % slots] == want - 1)
    assert KeyGraph(keys, slots).path(5 if g.reaches(5) else 0) == g.path(5 if g.reaches(5) else 0)  # deterministic


def test_key_graph_on_a_large_ring_matches_a_plain_search():
    slots = 4096
    keys = [int(k) for k in np.random.default_rng(7).choice(np.arange(1, slots), 9, replace=False)] + [1]
    g = KeyGraph(keys, slots)
    for s in range(0, slots, 257):
        assert g.dist[s] == _bfs(keys, slots, s)
    assert g.dist[MAX_HOPS] >= 0 and (KeyGraph([1], slots).dist[MAX_HOPS + 1] == -1)


def test_key_graph_unreachable_names_the_step():
    g = KeyGraph([2], 64)
    assert not g.reaches(3)
    with pytest.raises(HecError, match=r"rotation by 3 cannot be composed from the Galois keys \[2\]"):
        g.path(3)


def test_baby_tree_needs_only_four_keys_and_no_extra_rotation():
    steps = [-33, -32, -31, -1, 1, 31, 32, 33]
    g = KeyGraph([1, -1, 32, -32], S)
    edges = baby_tree(steps, g)
    assert sorted(e.dst for e in edges) == sorted(steps)
    assert all(len(e.path) == 1 for e in edges)
    assert tree_rotations(steps, g) == len(steps)
    made = {0}
    for e in edges:  # every edge starts from a step already made and lands on its own
        assert e.src in made and (e.src + sum(e.path) - e.dst) % S == 0
        made.add(e.dst)
    star = baby_tree(steps, g, star=True)
    assert all(e.src == 0 for e in star) and sum(len(e.path) for e in star) == 12  # +-31, +-33 take two hops


def test_giant_chain_horner_one_rotation_per_giant_step():
    n = 64
    giants = [-2 * n, -n, 0, n, 2 * n, 3 * n]
    assert giant_rotations_needed(giants, S) == [n, n, n, -n, -n]
    ch = giant_chain(giants, KeyGraph([n, -n], S))
    assert ch.pos == (n, 2 * n, 3 * n) and ch.neg == (-n, -2 * n) and ch.zero
    assert ch.rotations == 5


def _horner(x, groups, chain, rotate):
    """Evaluate sum_g rot(acc_g, g) the way runtime._run_tree does, with ``rotate(v, path)``."""
    hops = iter(chain.hops)
    total = None
    for side in (chain.pos, chain.neg):
        t = None
        for k in range(len(side) - 1, -1, -1):
            a = groups[side[k]]
            t = a if t is None else rotate(t, next(hops)) + a
        if side:
            t = rotate(t, next(hops))
            total = t if total is None else total + t
    if chain.zero:
        total = groups[0] if total is None else total + groups[0]
    return total


def test_composed_rotations_equal_direct_in_numpy():
    rng = np.random.default_rng(0)
    giants = [-96, -32, 0, 32, 64, 160]
    groups = {g: rng.standard_normal(S) for g in giants}
    direct = sum(np.roll(v, -g) for g, v in groups.items())
    for keys in ([32, -32], [32, -32, 64, 128], [1, 16, -16]):
        ch = giant_chain(giants, KeyGraph(keys, S))

        def rotate(v, path):
            for k in path:
                v = np.roll(v, -k)
            return v

        np.testing.assert_allclose(_horner(None, groups, ch, rotate), direct, atol=1e-12)


# --------------------------------------------------------------------------- SEAL primitives

@pytest.fixture(scope="module")
def seal_env():
    from hecompiler.backends import seal_ckks as SC

    ctx = SC.CkksContext(SC.CkksParams(N, BITS))
    keys = SC.KeySet.generate(ctx, galois_steps=(1, 16, -8, 64), relin=False)
    client, server = SC.CkksClient(ctx, keys), SC.CkksServer(ctx, keys)
    x = np.random.default_rng(3).uniform(-1, 1, S)
    return SimpleNamespace(client=client, server=server, x=x, ct=client.encrypt(x, 2.0**40))


@pytest.mark.parametrize("step", [17, -7, 200, -23, 3])
def test_composed_rotation_under_seal_matches_roll(seal_env, step):
    e = seal_env
    g = KeyGraph((1, 16, -8, 64), S)
    path = g.path(step)
    assert len(path) >= 2  # no key of its own: really composed
    with pytest.raises(ValueError, match="no Galois key"):
        e.server.rotate(e.ct, step)
    ct = e.ct
    for k in path:
        ct = e.server.rotate(ct, signed(k, S))
    got = e.client.decrypt(ct)
    assert np.abs(got - np.roll(e.x, -step)).max() < 1e-5


def test_horner_chain_under_seal(seal_env):
    """A giant-step chain over keys {16, -8, 64}: the composed sum equals the sum of direct rolls."""
    e = seal_env
    giants = [-24, 0, 16, 48, 80]
    ch = giant_chain(giants, KeyGraph((1, 16, -8, 64), S))
    rng = np.random.default_rng(4)
    vals = {gs: rng.uniform(-1, 1, S) for gs in giants}
    groups = {gs: e.client.encrypt(v, 2.0**40) for gs, v in vals.items()}

    class CtSum:
        def __init__(self, ct):
            self.ct = ct

        def __add__(self, o):
            return CtSum(e.server.add(self.ct, o.ct))

    def rotate(v, path):
        ct = v.ct
        for k in path:
            ct = e.server.rotate(ct, signed(k, S))
        return CtSum(ct)

    out = _horner(None, {g: CtSum(c) for g, c in groups.items()}, ch, rotate)
    want = sum(np.roll(v, -g) for g, v in vals.items())
    assert np.abs(e.client.decrypt(out.ct) - want).max() < 1e-4


# --------------------------------------------------------------------------- whole programs under a key budget

@pytest.fixture(scope="module")
def tiny():
    model = bm.MODELS["tiny_resnet_poly"]()
    g = hc.load_onnx(model)
    hc.run_pipeline(g)
    primes = tuple(q.value() for q in sealapi.CoeffModulus.Create(N, list(BITS)))[:-1]
    x = np.random.default_rng(7).uniform(-1, 1, (1, 1, 8, 8)).astype(np.float32)

    def build(he_passes):
        prog, low = lower(g, Params(N, BITS, 40), primes, LoweringOptions(he_passes=he_passes))
        return prog, low

    direct, _ = build("")
    feeds = {direct.inputs[0].name: x}
    ref = np.asarray(ort_run(model, x)[0], np.float64)
    return SimpleNamespace(model=model, g=g, build=build, direct=direct, x=x, feeds=feeds, ref=ref)


def _out(outs):
    (v,) = outs.values()
    return np.asarray(v, np.float64).reshape(-1)


@pytest.mark.parametrize("max_keys", [4, 6, 9, 0])
def test_budget_programs_match_direct_in_simulator(tiny, max_keys):
    spec = "share-mod-switch,select-rotation-keys" + (f"{{max_keys={max_keys}}}" if max_keys else "")
    prog, low = tiny.build(spec)
    rk = low.he_notes["rotation_keys"]
    n_keys = len(prog.galois_steps)
    assert n_keys == rk["keys"] and n_keys < len(tiny.direct.galois_steps) == rk["keys_before"] == 40
    if max_keys:
        assert n_keys <= max(max_keys, rk["fewest_keys"])
    # the compiler's count of rotations is what the runtime performs, and what the trade says
    sim_out, st = Simulator(prog).run(tiny.feeds)
    assert st.op_counts["rotate"] == prog.op_counts()["rotate"] == rk["rotations"]
    assert rk["rotations"] >= rk["rotations_direct"] == tiny.direct.op_counts()["rotate"]
    d_out, _ = Simulator(tiny.direct).run(tiny.feeds)
    np.testing.assert_allclose(_out(sim_out), _out(d_out), rtol=0, atol=1e-9)
    verify_program(prog)


def test_fewest_keys_program_composes_rotations(tiny):
    prog, low = tiny.build("share-mod-switch,select-rotation-keys{max_keys=1}")
    rk = low.he_notes["rotation_keys"]
    assert rk["keys"] == rk["fewest_keys"] <= 5
    assert rk["rotations"] > 1.5 * rk["rotations_direct"]  # the price of so few keys: many composed rotations
    assert any(lin.schedule == "tree" and len(lin.needs) > 0 for lin in prog.linears)


def test_key_budget_program_under_seal_matches_onnxruntime(tiny):
    from hecompiler.backends import seal as SB

    prog, low = tiny.build("share-mod-switch,select-rotation-keys{max_keys=5}")
    assert len(prog.galois_steps) == 5
    outs, st = SB.run_encrypted(prog, tiny.feeds)
    got = _out(outs)
    assert st.galois_keys == 5
    assert st.op_counts["rotate"] == prog.op_counts()["rotate"] > tiny.direct.op_counts()["rotate"]
    err = np.abs(got - tiny.ref.reshape(-1)).max()
    assert err <= 1e-4 * np.ptp(tiny.ref), (err, np.ptp(tiny.ref))
    assert np.argmax(got) == np.argmax(tiny.ref)
    sim, _ = Simulator(tiny.direct).run(tiny.feeds)
    assert np.abs(got - _out(sim)).max() <= 1e-4 * np.ptp(tiny.ref)


def test_trade_curve_is_monotone(tiny):
    prog, low = tiny.build(None)
    rk = low.he_notes["rotation_keys"]
    curve = rk["curve"]
    ks = [k for k, _ in curve]
    rots = [r for _, r in curve]
    assert ks == sorted(ks) and all(a >= b for a, b in zip(rots, rots[1:])), curve
    assert curve[-1][1] == rk["rotations_direct"] and rk["keys"] == curve[-1][0] < rk["keys_before"]
    # each prefix size, as a budget, gives a program with that many rotations
    prev = None
    for k, r in curve[:: max(1, len(curve) // 4)]:
        p, lw = tiny.build(f"select-rotation-keys{{max_keys={k}}}")
        assert len(p.galois_steps) <= k and p.op_counts()["rotate"] == lw.he_notes["rotation_keys"]["rotations"]
        if prev is not None:
            assert p.op_counts()["rotate"] <= prev
        prev = p.op_counts()["rotate"]


def test_select_keys_prefixes():
    dem = Demands(S)
    dem.add_tree([-33, -32, -31, -1, 1, 31, 32, 33], uses=3)
    for r in giant_rotations_needed([-128, 0, 64, 128, 192], S):
        dem.add_single(r, uses=3)
    sel = select_keys(dem)
    k = sel.best_within(None)
    keys = sel.prefix(k)
    assert len(keys) < len(dem.direct_keys()) and sel.rotations[k - 1] == sel.direct_rotations
    assert sel.direct_rotations == 3 * (8 + 4)
    with pytest.raises(HecError, match="cannot make every rotation"):
        sel.best_within(sel.smallest_feasible() - 1)


# --------------------------------------------------------------------------- verifier, runtime, text

def test_verifier_refuses_keys_that_cannot_compose(tiny):
    prog, _ = tiny.build(None)
    bad = copy.deepcopy(prog)
    bad.rotation_keys = [3]  # multiples of 3 only, and at most 16 hops of them
    with pytest.raises(ProgramError, match=r"linear -> %1, .*: rotation\(s\) \[-1, 2, -7, 7, -16\] of linear op #0 "
                                           r"cannot be composed from the program's Galois keys \[3\]"):
        verify_program(bad)
    bad.rotation_keys = []
    with pytest.raises(ProgramError, match="cannot be composed"):
        verify_program(bad)
    # an unknown schedule is refused by name
    bad = copy.deepcopy(prog)
    bad.linears[0].schedule = "spiral"
    with pytest.raises(ProgramError, match="unknown schedule 'spiral'"):
        verify_program(bad)


def test_runtime_refuses_a_schedule_the_program_miscounts(tiny):
    prog, _ = tiny.build(None)
    bad = copy.deepcopy(prog)
    bad.linears[0].counts["rotate"] += 1
    with pytest.raises(HecError, match=r"linear op #0 .*over the program's Galois keys its rotations are"):
        Simulator(bad).run(tiny.feeds)


def test_keys_and_schedules_round_trip_as_text(tiny):
    prog, _ = tiny.build(None)
    text = print_program(prog)
    assert f"  keys [{', '.join(str(k) for k in sorted(prog.rotation_keys))}]" in text
    assert '"schedule":"tree"' in text and '"needs":[' in text
    back = parse_program(text, weights=prog.weights)
    assert print_program(back) == text
    assert back.rotation_keys == sorted(prog.rotation_keys)
    a, _ = Simulator(prog).run(tiny.feeds)
    b, _ = Simulator(back).run(tiny.feeds)
    np.testing.assert_array_equal(_out(a), _out(b))
    # a program with no keys statement gets one key per step it names
    assert "  keys [" not in print_program(tiny.direct)
    assert parse_program(print_program(tiny.direct), weights=tiny.direct.weights).rotation_keys is None


# --------------------------------------------------------------------------- the trade under --max-memory

def test_max_memory_trades_keys_for_rotations_monotonically(tiny):
    from hecompiler.compiler import CompileOptions, compile_model
    from hecompiler.planner import PlanOptions

    def comp(mem):
        r = compile_model(tiny.model, CompileOptions(check=False, plan=PlanOptions(
            ring_degrees=(N,), levels=2, scale_bits=40, max_memory_bytes=int(mem))))
        return r.metadata["report"], r.report_text, r.prog

    rep, text, prog = comp(8 * 2**30)
    rk = rep["rotation_keys"]
    kb = rk["key_bytes"] // rk["keys"]
    rest = rep["predicted_memory_bytes"] - rk["key_bytes"]
    assert f"rotation keys: {rk['keys']} Galois keys" in text and "trade (keys: memory, rotations):" in text
    rows = [(rk["keys"], rk["key_bytes"], rk["rotations"], rep["predicted_memory_bytes"])]
    for k in (9, 7, 5, 4):
        budget = rest + k * kb + kb // 2
        rep, text, prog = comp(budget)
        rk = rep["rotation_keys"]
        assert rk["keys"] <= k and rk["budget_keys"] == rk["keys"] == len(prog.galois_steps) == rep["galois_keys"]
        assert rep["predicted_memory_bytes"] <= budget
        assert rk["rotations"] == rep["ops"]["rotate"]
        assert f"the memory budget allows {rk['budget_keys']}" in text
        assert f"rotation keys: {rk['keys']} Galois keys ({rk['key_bytes'] / 2**20:.1f} MiB)" in text
        rows.append((rk["keys"], rk["key_bytes"], rk["rotations"], rep["predicted_memory_bytes"]))
    for (k0, b0, r0, m0), (k1, b1, r1, m1) in zip(rows, rows[1:]):
        assert k1 < k0 and b1 < b0 and r1 >= r0 and m1 < m0, rows
    assert rows[-1][2] > rows[0][2]  # fewer keys really cost rotations
    with pytest.raises(HecError, match="memory"):
        comp(rest + 1 * kb)  # fewer than any key set that makes every rotation: no plan


def test_prim_on_lists_counts_as_on_arrays(monkeypatch):
    """Prim's tree count over small baby sets runs on Python lists: the same count, ties broken
    the same way (the first least), as the numpy loop larger sets use."""
    from hecompiler import rotkeys

    rng = np.random.default_rng(5)
    for n in (1, 2, 5, 17, 40, 64):
        for _ in range(50):
            d = rng.integers(0, 4, (n + 1, n + 1))  # few distinct hop counts: many ties
            small = rotkeys._prim(d)
            monkeypatch.setattr(rotkeys, "_PRIM_LISTS", -1)
            assert rotkeys._prim(d) == small
            monkeypatch.setattr(rotkeys, "_PRIM_LISTS", 64)
