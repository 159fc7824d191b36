"""How the cost model prices a Lattigo program: encoding overlapped with the evaluation on the
table machine's cores, and the Go garbage beside the keys in the predicted memory (issue 11).

Measured against real runs by benchmarks/noninteractive.py (ResNet-20 at 128 bits: predicted
183.6 s, measured 183.9 s); here the arithmetic is checked on the toy-n12 table.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import hecompiler as hc
from hecompiler.costmodel import CostModel, encode_hidden, encode_pipeline, instr_cost, program_cost
from hecompiler.planner import PlanOptions
from hecompiler.prefetch import prefetch_window
from hecompiler.target import LATTIGO_GC_OVERSHOOT, LATTIGO_SERVER_GC_PERCENT, get_target

from conftest import ROOT

TOY = "lattigo:toy-n12"


@pytest.fixture(scope="module")
def toy():
    res = hc.compile_model(str(ROOT / "models" / "tiny_resnet_poly.onnx"),
                           hc.CompileOptions(target=TOY, plan=PlanOptions(security="none")))
    return res, get_target(TOY).cost_model()


def test_encoding_ahead_hides_behind_the_evaluation():
    # one core evaluating 1 s while 3 s of encoding spread over 2 cores: the op takes 2 s
    assert encode_hidden({"rotate": 0.6, "mul_plain": 0.4}, 3.0, 2) == pytest.approx(2.0)
    # encoding shorter than the evaluation: all of it hidden
    assert encode_hidden({"rotate": 1.0}, 0.5, 2) == pytest.approx(0.5)
    # encoding waits in line (SEAL; one core): nothing hidden
    assert encode_hidden({"rotate": 1.0}, 3.0, 0) == 0.0
    assert CostModel().encode_cores == 0 and CostModel().gc_percent == 0


def test_encoding_runs_ahead_across_instructions(toy):
    """The prefetcher keeps encoding the next linear op's plaintexts while the evaluation runs
    anything else: after a long instruction (a polynomial) the op finds a window's worth made. A
    refresh credits nothing (a client-aided one ends the run; what a bootstrap overlaps was
    measured not to help)."""
    res, cost = toy
    prog = res.prog
    cores = cost.encode_cores
    if not cores:
        pytest.skip("the measured machine had one core: nothing is encoded ahead")
    costs = [instr_cost(ins, prog, cost) for ins in prog.instrs]
    k = next(k for k, ins in enumerate(prog.instrs)
             if ins.op == "linear" and k > 0 and prog.instrs[k - 1].op != "linear" and costs[k][1] > 0)
    by, enc, counts = costs[k]
    # an op whose encoding outlasts its evaluation on the other cores (else all of it hides anyway)
    enc = max(enc, 3 * sum(by.values()))
    costs[k] = (by, enc, counts)
    base = encode_pipeline(prog, cost, costs)
    slow = list(costs)
    slow[k - 1] = ({"mul": 1000.0}, 0.0, {})
    after = encode_pipeline(prog, cost, slow)
    n = prog.params.poly_degree
    lin = prog.linears[prog.instrs[k].plain.args[0]]
    from hecompiler.costmodel import linear_encodings, pt_bytes

    window = prefetch_window(pt_bytes(n, prog.instrs[k].level + 2))
    pre = enc * min(1.0, window / max(1, linear_encodings(lin.counts)))
    assert after[k] == pytest.approx(pre + encode_hidden(by, enc - pre, cores))
    assert after[k] >= base[k] and after[k] > encode_hidden(by, enc, cores)
    # the same long instruction as a refresh, a bootstrap or a client-aided one: nothing ahead
    client = type(cost)(cost.table, refresh=replace(cost.refresh, kind="client"))
    slow[k - 1] = ({"refresh": 1000.0}, 0.0, {})
    prog.instrs[k - 1], saved = replace(prog.instrs[k - 1], op="refresh"), prog.instrs[k - 1]
    try:
        # a bootstrap: as if it took no time (what was made before it is still held)
        idle = list(slow)
        idle[k - 1] = ({}, 0.0, {})
        assert encode_pipeline(prog, cost, slow)[k] == pytest.approx(encode_pipeline(prog, cost, idle)[k])
        # a client-aided refresh: the run starts over
        assert encode_pipeline(prog, client, slow)[k] == pytest.approx(encode_hidden(by, enc, cores))
    finally:
        prog.instrs[k - 1] = saved


def test_a_lattigo_program_is_priced_with_the_overlap_and_the_garbage(toy):
    res, cost = toy
    prog = res.prog
    cores = int(cost.table["machine"]["cores"])
    assert cost.encode_cores == (cores if cores > 1 else 0)
    c = program_cost(prog, cost)
    per_instr = encode_pipeline(prog, cost)
    hidden = sum(per_instr)
    for ins, h in zip(prog.instrs, per_instr):
        by, enc, _ = instr_cost(ins, prog, cost)
        # at least what the op's own evaluation hides, at most all of its encoding
        lo = encode_hidden(by, enc, cost.encode_cores) if ins.op == "linear" else 0.0
        assert lo - 1e-12 <= h <= (enc if ins.op == "linear" else 0.0) + 1e-12
    assert c.overlapped_seconds == pytest.approx(hidden) and (hidden > 0) == (cost.encode_cores > 0)
    assert c.seconds == pytest.approx(sum(c.by_op.values()) + c.encode_seconds - hidden)
    # Go lets garbage reach the server's GC percent of what it holds
    assert cost.gc_percent == LATTIGO_SERVER_GC_PERCENT
    assert 0 < c.garbage_bytes < c.memory_bytes
    # ... and past that while it marks: the fitted overshoot multiplies the pacer's goal
    paced = type(cost)(cost.table, refresh=cost.refresh)
    paced.gc_percent, paced.gc_overshoot = cost.gc_percent, 1.0
    assert cost.gc_overshoot == LATTIGO_GC_OVERSHOOT > 1
    assert c.garbage_bytes == pytest.approx(program_cost(prog, paced).garbage_bytes * LATTIGO_GC_OVERSHOOT, abs=2)
    r = res.metadata["report"]
    assert r["predicted_encode_hidden_seconds"] == pytest.approx(hidden, abs=1e-3)
    assert r["predicted_cpu_seconds"] == pytest.approx(r["predicted_seconds"] + hidden, abs=2e-3)
    assert r["predicted_garbage_bytes"] == c.garbage_bytes
    if hidden:
        assert "hidden behind the evaluation" in res.report_text and "on one core" not in res.report_text


def test_target_lattigo_chooses_among_its_sets_by_the_prediction():
    """--target lattigo names no set: the model is planned for each 128-bit set with its own
    measured table (compile only, no keys) and the fastest plan within the budget wins; its set's
    literal is what the program records.  A named set is planned alone."""
    model = str(ROOT / "models" / "tiny_resnet_poly.onnx")
    popts = PlanOptions(max_memory_bytes=16 * 2**30)
    t = get_target("lattigo")
    assert t.name == "lattigo:n16-sparse" and t.alternatives == ("lattigo:n16-sparse-stc4",)
    res = hc.compile_model(model, hc.CompileOptions(target=t, plan=popts, check=False))
    r = res.metadata["report"]
    assert r["target_choices"] == ["lattigo:n16-sparse", "lattigo:n16-sparse-stc4"]
    ok = [cd for cd in r["candidates"] if not cd["rejected"]]
    assert {cd["params"].rsplit("set=", 1)[1] for cd in ok} == {"n16-sparse", "n16-sparse-stc4"}
    fastest = min(ok, key=lambda cd: cd["predicted_seconds"])
    chosen = fastest["params"].rsplit("set=", 1)[1]
    assert r["target"] == f"lattigo:{chosen}" and res.metadata["target"]["name"] == f"lattigo:{chosen}"
    assert r["predicted_seconds"] == pytest.approx(fastest["predicted_seconds"], abs=1e-3)
    lit = res.metadata["target"]["lattigo"]
    assert lit["name"] == chosen and len(res.prog.primes) - 1 <= get_target(f"lattigo:{chosen}").lattigo["max_levels"]
    assert ("stc_log_scales" in lit["bootstrap"]) == (chosen == "n16-sparse-stc4")
    assert "chosen among lattigo:n16-sparse, lattigo:n16-sparse-stc4" in res.report_text
    one = hc.compile_model(model, hc.CompileOptions(target="lattigo:n16-sparse-stc4", plan=popts, check=False))
    assert one.metadata["report"]["target_choices"] is None and "set=" not in one.report_text
    assert one.metadata["target"]["name"] == "lattigo:n16-sparse-stc4" and one.prog.params.top_level <= 8


def test_target_lattigo_that_fits_no_set_names_each_set_and_why():
    from hecompiler.errors import NoPlanError

    with pytest.raises(NoPlanError) as e:
        hc.compile_model(str(ROOT / "models" / "tiny_resnet_poly.onnx"),
                         hc.CompileOptions(target=get_target("lattigo"), plan=PlanOptions(max_memory_bytes=2**30),
                                           check=False))
    msg = str(e.value)
    assert "lattigo:n16-sparse: no parameter set fits" in msg and "lattigo:n16-sparse-stc4: no parameter set fits" in msg
    assert "> budget" in msg


def test_the_plaintexts_encoded_ahead_are_in_the_predicted_peak(toy):
    """The executor holds up to prefetch_window plaintexts ahead of each linear op (Lattigo encodes
    on the other cores): the predicted peak counts the largest such window, which the executor and
    the cost model both take from hecompiler.prefetch."""
    from hecompiler.costmodel import pt_bytes
    from hecompiler.prefetch import PREFETCH_BYTES, prefetch_window

    res, cost = toy
    prog = res.prog

    class InLine(type(cost)):  # the same table, encoding in the evaluation's thread
        encode_cores = 0

    inline = InLine(cost.table, refresh=cost.refresh)
    assert cost.encode_cores > 0
    n = prog.params.poly_degree
    # the prefetcher walks every linear op's plaintexts to the end of the run (no client refresh
    # here): from each op on, a window of them or what remains
    lins = [ins for ins in prog.instrs if ins.op == "linear"]
    remaining = [sum(prog.linears[i.plain.args[0]].counts["mul_plain"] for i in lins[j:]) for j in range(len(lins))]
    want = max(min(prefetch_window(pt_bytes(n, ins.level + 2)), left) * pt_bytes(n, ins.level + 2)
               for ins, left in zip(lins, remaining))
    a, b = program_cost(prog, cost), program_cost(prog, inline)
    assert 0 < want <= max(PREFETCH_BYTES, 2 * pt_bytes(n, len(prog.primes)))
    assert a.plaintext_bytes - b.plaintext_bytes == want
    assert a.memory_bytes - b.memory_bytes >= want
    assert prefetch_window(1) == 256 and prefetch_window(PREFETCH_BYTES) == 2


def test_the_encoders_leave_the_evaluation_a_core(monkeypatch):
    """Plaintexts are encoded ahead on every core but the evaluation's (each encoding holds one of
    Go's GOMAXPROCS processors, which the evaluation would wait for); one core encodes in line;
    $HECOMPILER_ENCODE_THREADS overrides, and a bad value is named."""
    import os

    from hecompiler.backends.lattigo import session

    monkeypatch.delenv("HECOMPILER_ENCODE_THREADS", raising=False)
    for cores, want in ((set(range(8)), 7), ({0, 1}, 1), ({0}, 0)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cores: c, raising=False)
        assert session.encode_threads() == want
    monkeypatch.setenv("HECOMPILER_ENCODE_THREADS", "3")
    assert session.encode_threads() == 3
    monkeypatch.setenv("HECOMPILER_ENCODE_THREADS", "many")
    with pytest.raises(session.LattigoBackendError, match="HECOMPILER_ENCODE_THREADS='many'"):
        session.encode_threads()


def test_a_sparse_packing_encodes_at_its_own_slot_count(toy):
    """A program packing fewer slots than N/2 has its plaintexts priced at that slot count when the
    table measured it (``by_slots``: the DFT is that size), and at the full count otherwise."""
    res, cost = toy
    n = res.prog.params.poly_degree
    ring = cost._ring(n)
    sparse = ring["by_slots"]["512"]["by_primes"]["encode"]
    top = sparse[-1][0]
    assert cost.op_seconds("encode", n, top, 512) == pytest.approx(sparse[-1][1])
    assert cost.op_seconds("encode", n, top, 512) < cost.op_seconds("encode", n, top)
    assert cost.op_seconds("encode", n, top, n // 2) == cost.op_seconds("encode", n, top)
    assert cost.op_seconds("encode", n, top, 256) == cost.op_seconds("encode", n, top)  # not measured
    assert cost.op_seconds("rotate", n, top, 512) == cost.op_seconds("rotate", n, top)
    # the same program at 2^9 slots: its linear ops' plaintexts cost what the table says for 2^9
    prog = res.prog
    sp = replace(prog, params=replace(prog.params, log_slots=9))
    full, part = program_cost(prog, cost), program_cost(sp, cost)
    assert part.encode_seconds < full.encode_seconds


def test_the_simulated_bootstrap_errs_more_with_the_inputs_mean_and_copies(toy):
    """The simulator's bootstrap error (backends/sim.py): the measured floor, plus the cube of the
    slots' mean (the constant coefficient) and of their spread times sqrt(copies), at the rates
    toy-n12's table measured; copies() finds how often a slot vector repeats."""
    from hecompiler.backends.sim import SimPrimitives, copies

    res, cost = toy
    noise = cost.noise(res.prog.params.poly_degree)
    assert noise["refresh_dc_cubic"] > 0 and noise["refresh_ac_cubic"] > 0
    prim = SimPrimitives(res.prog, noise, np.random.default_rng(0), strict=False)
    S = prim.S
    rng = np.random.default_rng(1)
    v = rng.uniform(-1, 1, S // 8)
    assert copies(np.tile(v, 8), S) == 8 and copies(np.concatenate([v, np.zeros(S - S // 8)]), S) == 1
    assert copies(np.zeros(S), S) == 1 and copies(np.full(S, 3.0), S) == S
    batch = np.stack([np.tile(v, 8), rng.uniform(-1, 1, S)])
    assert copies(batch, S).ravel().tolist() == [8, 1]
    floor = noise["refresh"]
    assert float(prim._bootstrap_std(np.zeros(S))) == pytest.approx(floor)
    const = float(prim._bootstrap_std(np.full(S, 4.0)))
    assert const == pytest.approx(np.hypot(floor, noise["refresh_dc_cubic"] * 64), rel=1e-9)
    # the same values zero-padded (mean and spread diluted) against replicated 8 times
    x = rng.uniform(0, 8, S // 8)
    padded = np.concatenate([x, np.zeros(S - S // 8)])
    assert float(prim._bootstrap_std(np.tile(x, 8))) > 10 * float(prim._bootstrap_std(padded))
    got = prim._bootstrap_std(np.stack([np.tile(x, 8), padded]))
    assert got.shape == (2, 1) and got[0, 0] > got[1, 0]
