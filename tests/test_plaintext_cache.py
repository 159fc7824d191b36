"""The executor's cache of encoded plaintexts (hecompiler/plaintexts.py PlaintextCache):
repeated runs on one executor reuse what the first run encoded, identical diagonals are
encoded once (by content), the budget bounds it, and outputs never change."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import build_models as bm  # noqa: E402  (tests/conftest.py puts models/ on sys.path)
import hecompiler as hc
from hecompiler.backends.sim import SimPrimitives
from hecompiler.executor import Executor
from hecompiler.heprog import Params
from hecompiler.lower import LoweringOptions, lower
from hecompiler.plaintexts import SERVING_CACHE_SHARE, PlaintextCache, parse_bytes, serving_cache_bytes
from hecompiler.runtime import pack_inputs

from conftest import ort_run

sealapi = pytest.importorskip("tenseal.sealapi")

N, BITS = 8192, (60, 40, 40, 60)


def _primes(n, bits):
    return tuple(q.value() for q in sealapi.CoeffModulus.Create(n, list(bits)))[:-1]


@pytest.fixture(scope="module")
def tiny():
    model = bm.MODELS["tiny_resnet_poly"]()
    g = hc.load_onnx(model)
    hc.run_pipeline(g)
    prog, _ = lower(g, Params(N, BITS, 40), _primes(N, BITS))
    xs = [np.random.default_rng(s).uniform(-1, 1, (1, 1, 8, 8)).astype(np.float32) for s in (1, 2)]
    return SimpleNamespace(model=model, prog=prog, xs=xs)


def _sim_run(ex, prog, x):
    prim = ex.prim
    cts = {v: prim.fresh(row) for v, row in pack_inputs(prog, {prog.inputs[0].name: x}).items()}
    out, st = ex.run_all(cts)
    (io,) = prog.outputs
    packed = np.stack([out[v].vec for v in io.values])
    return prog.layouts[io.layout].unpack(packed) * io.alpha, st


def _sim_executor(prog, cache_bytes=None):
    prim = SimPrimitives(prog, None, np.random.default_rng(0), True)
    return Executor(prog, prim, None, plaintext_cache_bytes=cache_bytes)


def test_repeated_runs_reuse_plaintexts_in_simulator(tiny):
    prog = tiny.prog
    ex = _sim_executor(prog)
    y1, s1 = _sim_run(ex, prog, tiny.xs[0])
    y2, s2 = _sim_run(ex, prog, tiny.xs[0])
    y3, s3 = _sim_run(ex, prog, tiny.xs[1])
    total = s1.plaintexts + s1.plaintexts_reused
    assert s1.plaintexts > 0 and total > 100
    # the second run encodes nothing that the first kept (the default budget holds all of them)
    assert s2.plaintexts == 0 and s2.plaintexts_reused == total and s3.plaintexts_reused == total
    np.testing.assert_array_equal(y1, y2)
    # the cache changes nothing: a fresh executor without one gives the same outputs
    y3_nocache, s_nc = _sim_run(_sim_executor(prog, 0), prog, tiny.xs[1])
    np.testing.assert_array_equal(y3, y3_nocache)
    assert s_nc.plaintexts_reused == 0 or s_nc.plaintexts_reused < s1.plaintexts_reused
    ref = np.asarray(ort_run(tiny.model, tiny.xs[1])[0], np.float64).reshape(-1)
    assert np.abs(y3.reshape(-1) - ref).max() < 1e-6 * max(1.0, np.ptp(ref))


def test_budget_bounds_the_cache(tiny):
    prog = tiny.prog
    full = _sim_executor(prog)
    _sim_run(full, prog, tiny.xs[0])
    held = full.ptcache.bytes
    assert held > 0
    half = _sim_executor(prog, held // 2)
    _sim_run(half, prog, tiny.xs[0])
    assert 0 < half.ptcache.bytes <= held // 2
    _, s2 = _sim_run(half, prog, tiny.xs[0])
    _, f2 = _sim_run(full, prog, tiny.xs[0])
    assert 0 < s2.plaintexts < f2.plaintexts_reused and s2.plaintexts_reused < f2.plaintexts_reused
    none = _sim_executor(prog, 0)
    _sim_run(none, prog, tiny.xs[0])
    assert none.ptcache.bytes == 0
    _, n2 = _sim_run(none, prog, tiny.xs[0])
    assert n2.plaintexts_reused == 0


def test_parse_bytes():
    assert parse_bytes("512M") == 512 * 2**20 and parse_bytes("2G") == 2 * 2**30
    assert parse_bytes("1048576") == 2**20 and parse_bytes("1.5k") == 1536
    with pytest.raises(Exception, match="expected bytes such as 512M"):
        parse_bytes("lots")


def _pool_model():
    """AveragePool over 8 channels of 32x32: two ciphertexts of 4096 slots with identical
    diagonals (the same pooling in every block)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    g = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_server_keeps_what_the_memory_budget_leaves(monkeypatch):
    """hecompile serve sizes its workers' plaintext cache from the compile report: every plaintext
    of an inference when 80% of the memory left holds them (ResNet-20 under SEAL: 1.32 GiB of
    plaintexts, 7.5 GiB left under the default 8G), else that 80%; garbage of a collected heap
    grows with it; the operator's $HECOMPILER_PLAINTEXT_CACHE wins."""
    monkeypatch.delenv("HECOMPILER_PLAINTEXT_CACHE", raising=False)
    G, M = 2**30, 2**20
    seal = {"predicted_memory_bytes": 476 * M,
            "plaintexts": {"bytes_all": 1416 * M, "cache_bytes": 256 * M, "cache_headroom_bytes": 7716 * M}}
    assert serving_cache_bytes(seal) == 1416 * M  # all of them
    # a worker budget: what it leaves beside the peak without the predicted cache
    assert serving_cache_bytes(seal, worker_memory=1 * G) == int(SERVING_CACHE_SHARE * (1 * G - 220 * M))
    assert serving_cache_bytes(seal, worker_memory=100 * M) == 0
    # a compile budget nearly used up: 80% of the predicted cache plus what is left
    tight = {**seal, "plaintexts": {**seal["plaintexts"], "cache_headroom_bytes": 44 * M}}
    assert serving_cache_bytes(tight) == int(SERVING_CACHE_SHARE * 300 * M)
    # Lattigo: a garbage of 25% of the rest of the peak costs every cached byte 1.25
    gc = {**tight, "predicted_memory_bytes": 1000 * M, "predicted_garbage_bytes": 200 * M}
    assert serving_cache_bytes(gc) == int(SERVING_CACHE_SHARE * 300 * M / 1.25)
    # no budget or no memory prediction in the report (an old program): the default, or all of
    # them if fewer, whatever the worker budget
    assert serving_cache_bytes({"plaintexts": {"bytes_all": 10 * M}}) == 10 * M
    assert serving_cache_bytes({"plaintexts": {"bytes_all": 1 * G}}, worker_memory=8 * G) == 256 * M
    monkeypatch.setenv("HECOMPILER_PLAINTEXT_CACHE", "64M")
    assert serving_cache_bytes(seal) == 64 * M


def test_identical_diagonals_are_encoded_once():
    model = _pool_model()
    g = hc.load_onnx(model)
    hc.run_pipeline(g)
    bits = (60, 40, 60)
    prog, _ = lower(g, Params(N, bits, 40), _primes(N, bits))
    assert prog.layouts[prog.inputs[0].layout].n_ct >= 2
    x = np.random.default_rng(5).uniform(-1, 1, (1, 8, 32, 32)).astype(np.float32)
    ex = _sim_executor(prog)
    y, st = _sim_run(ex, prog, x)
    assert ex.ptcache.content_hits > 0 and st.plaintexts_reused == ex.ptcache.content_hits
    # fewer encodings than plaintext operands: the repeats were shared
    assert st.plaintexts < prog.op_counts()["mul_plain"]
    y0, s0 = _sim_run(_sim_executor(prog, 0), prog, x)
    np.testing.assert_array_equal(y, y0)
    assert s0.plaintexts > st.plaintexts
    ref = np.asarray(ort_run(model, x)[0], np.float64)
    np.testing.assert_allclose(y.reshape(ref.shape), ref, atol=1e-6)


def test_repeated_runs_reuse_plaintexts_under_seal(tiny):
    from hecompiler.backends import seal as SB

    prog = tiny.prog
    client = SB.SealClient.create(prog)
    server = SB.SealServer(prog, client.public_keys())
    outs, stats = [], []
    for x in (tiny.xs[0], tiny.xs[0], tiny.xs[1]):
        cts = client.encrypt_inputs({prog.inputs[0].name: x})
        out_cts, st = server.run(cts, client.refresh)
        outs.append(next(iter(client.decrypt_outputs(out_cts).values())).reshape(-1))
        stats.append(st)
    total = stats[0].plaintexts + stats[0].plaintexts_reused
    assert stats[1].plaintexts_reused == total and stats[1].plaintexts == 0
    assert stats[2].plaintexts_reused == total
    for x, y in ((tiny.xs[0], outs[0]), (tiny.xs[0], outs[1]), (tiny.xs[1], outs[2])):
        ref = np.asarray(ort_run(tiny.model, x)[0], np.float64).reshape(-1)
        assert np.abs(y - ref).max() <= 1e-4 * np.ptp(ref)
    assert np.abs(outs[0] - outs[1]).max() <= 1e-5 * np.ptp(outs[0])


def test_a_warmed_cache_serves_the_first_inference(tiny):
    """A server encodes the program's plaintexts before any key set arrives (Executor.warm with
    SEAL's key-less encoder): the first inference then encodes nothing, and its answer is right."""
    from hecompiler.backends import seal as SB

    prog = tiny.prog
    client = SB.SealClient.create(prog)
    server = SB.SealServer(prog, client.public_keys())
    warm = Executor(prog, SB.plaintext_encoder(prog), None, plaintext_cache_bytes=0)
    warm.ptcache = server.ex.ptcache
    made = warm.warm()
    assert made.plaintexts > 0 and server.ex.ptcache.bytes > 0
    cts = client.encrypt_inputs({prog.inputs[0].name: tiny.xs[0]})
    out_cts, st = server.run(cts, client.refresh)
    assert st.plaintexts == 0 and st.plaintexts_reused >= made.plaintexts
    y = next(iter(client.decrypt_outputs(out_cts).values())).reshape(-1)
    ref = np.asarray(ort_run(tiny.model, tiny.xs[0])[0], np.float64).reshape(-1)
    assert np.abs(y - ref).max() <= 1e-4 * np.ptp(ref)
    # a cache too small for them all: warming stops when it is full, and never goes past it
    small = Executor(prog, SB.plaintext_encoder(prog), None, plaintext_cache_bytes=server.ex.ptcache.bytes // 3)
    part = small.warm()
    assert 0 < part.plaintexts < made.plaintexts and small.ptcache.bytes <= small.ptcache.budget


def test_cache_unit():
    from hecompiler.heprog import PlainRef

    c = PlaintextCache(100, op_budget_bytes=60)
    r1, r2 = PlainRef("diag", (0, 0, 0, 1, 0), 2.0**40), PlainRef("diag", (0, 1, 1, 1, 0), 2.0**40)
    v = np.arange(8.0)
    k = c.content_key(v, 1, 2.0**40)
    assert c.content_key(v.copy(), 1, 2.0**40) == k != c.content_key(v, 0, 2.0**40)
    assert c.lookup_ref(r1, 1) is None and c.lookup_content(k) is None
    c.store(r1, 1, k, "pt", 60)
    assert c.lookup_ref(r1, 1) == "pt" and c.lookup_ref(r1, 0) is None
    assert c.lookup_content(k) == "pt"
    c.link(r2, 1, "pt")
    assert c.lookup_ref(r2, 1) == "pt"
    c.store(PlainRef("bias", (0, 0), 1.0), 1, None, "b", 60)  # over the budget: not kept
    assert c.bytes == 60 and c.encoded == 2
    assert (c.ref_hits, c.content_hits) == (2, 1)
    # past the budget, a linear op that shares plaintexts keeps them by content until it ends
    k2, k3 = c.content_key(v + 1, 1, 2.0**40), c.content_key(v + 2, 1, 2.0**40)
    c.begin_op(True)
    c.store(r2, 1, k2, "p2", 60)
    assert c.lookup_content(k2) == "p2" and c.lookup_ref(r2, 1) == "pt"
    c.store(r2, 1, k3, "p3", 60)  # the op tier holds one: the least recently used goes
    assert c.lookup_content(k2) is None and c.lookup_content(k3) == "p3"
    assert (c.bytes, c.op_bytes, c.op_peak_bytes) == (60, 60, 60)
    c.link(r1, 0, "p3", k3)  # an op-local plaintext is not remembered by reference past the op
    assert c.lookup_ref(r1, 0) is None
    c.end_op()
    assert c.lookup_content(k3) is None and c.op_bytes == 0 and c.lookup_content(k) == "pt"
    c.begin_op(False)  # an op whose diagonals do not repeat keeps nothing
    c.store(r2, 1, k2, "p2", 60)
    assert c.lookup_content(k2) is None


# --------------------------------------------------------------------------- prefetch (hecompiler.prefetch)

class _ThreadedSim(SimPrimitives):
    """The simulator's primitives with plaintexts made ahead on threads, as Lattigo's are; it
    records which thread encoded each one."""

    def __init__(self, prog, threads):
        super().__init__(prog, None, np.random.default_rng(0), True)
        self.encode_threads = threads
        self.encoded_on = []

    def encode(self, vec, scale, level):
        import threading

        self.encoded_on.append(threading.current_thread().name)
        return super().encode(vec, scale, level)


@pytest.mark.parametrize("cache_bytes", [0, None])
def test_prefetched_plaintexts_give_the_same_run(tiny, cache_bytes):
    """Plaintexts encoded ahead on other threads: the same outputs (bit for bit in the exact
    simulator), the same plaintext counts and reuse, across repeated runs and with the cache off;
    the encodings happen off the evaluation thread."""
    prog = tiny.prog
    plain = Executor(prog, SimPrimitives(prog, None, np.random.default_rng(0), True), None,
                     plaintext_cache_bytes=cache_bytes)
    prim = _ThreadedSim(prog, 2)
    pre = Executor(prog, prim, None, plaintext_cache_bytes=cache_bytes)
    try:
        for x in tiny.xs:
            y0, s0 = _sim_run(plain, prog, x)
            y1, s1 = _sim_run(pre, prog, x)
            np.testing.assert_array_equal(y0, y1)
            assert (s1.plaintexts, s1.plaintexts_reused) == (s0.plaintexts, s0.plaintexts_reused)
        # linear ops' plaintexts are encoded on the pool; only standalone mul_plain/add_plain on the
        # evaluation thread
        standalone = sum(i.op in ("mul_plain", "add_plain") for i in prog.instrs) * len(tiny.xs)
        on_pool = sum(n.startswith("hec-encode") for n in prim.encoded_on)
        assert on_pool > 0 and len(prim.encoded_on) - on_pool <= standalone
        assert pre.ptcache.bytes == plain.ptcache.bytes
    finally:
        pre.close()


def test_the_prefetcher_holds_at_most_its_window(monkeypatch):
    """A stream of plaintexts of mixed sizes: the producer stops when the next would pass the
    window's bytes (but always holds two), and the evaluation takes them in order."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import hecompiler.prefetch as pf
    from hecompiler.heprog import PlainRef

    monkeypatch.setattr(pf, "PREFETCH_BYTES", 65)
    assert pf.room_for(0, 0, 10**12) and pf.room_for(5, 1, 10**12) and not pf.room_for(60, 2, 10)
    assert pf.room_for(55, 2, 10) and not pf.room_for(0, pf.PREFETCH_MAX, 1)
    refs = [(PlainRef("scalar", (float(i + 1),), 1.0), i % 3) for i in range(40)]
    sizes = {0: 30, 1: 20, 2: 10}
    gate = threading.Event()

    def encode_scalar(v, scale, level):
        gate.wait(5)
        return ("pt", v, level)

    class NoCache:
        def peek_ref(self, ref, level):
            return None

        def peek_content(self, key):
            return None

    seen = []
    with ThreadPoolExecutor(2) as pool:
        pre = pf.Prefetcher(iter(refs), lambda ref: np.full(4, ref.args[0]), None, encode_scalar, NoCache(), None,
                            lambda level: sizes[level], pool)
        try:
            time.sleep(0.2)  # the producer fills the window and waits: 30 + 20 + 10, the next 30 would pass 65
            assert len(pre.order) == 3 and pre.peak_held_bytes == 60
            gate.set()
            for ref, level in refs:
                seen.append(pre.take(ref, level).pt)
            assert pre.peak_held_bytes <= 65
            with pytest.raises(RuntimeError, match="beyond the recorded order"):
                pre.take(*refs[0])
        finally:
            pre.close()
    assert seen == [("pt", float(i + 1), i % 3) for i in range(40)]


def test_plaintext_order_is_the_order_of_use(tiny):
    """The replay (hecompiler.prefetch.plaintext_order) lists exactly the plaintexts, with their
    levels, that evaluating each linear op asks for, in order."""
    from hecompiler.prefetch import plaintext_order

    prog = tiny.prog
    asked = []

    class Spy(SimPrimitives):
        def encode(self, vec, scale, level):
            return super().encode(vec, scale, level)

    ex = Executor(prog, Spy(prog, None, np.random.default_rng(0), True), None, plaintext_cache_bytes=0)
    orig = ex._plain
    ex._plain = lambda ref, level, stats: (asked.append((ref, level)), orig(ref, level, stats))[1]
    _sim_run(ex, prog, tiny.xs[0])
    want = []
    for ins in prog.instrs:
        if ins.op == "linear":
            want += plaintext_order(prog, ins, ex.plans.plan(ins.plain.args[0]))
        elif ins.plain is not None and ins.op in ("mul_plain", "add_plain"):
            want.append((ins.plain, ins.level))
    assert len(want) > 20 and asked == want


def test_prefetch_failure_reaches_the_evaluation(tiny):
    """An encoding that fails on a worker thread raises in the evaluation, and the executor stays
    usable."""
    prog = tiny.prog

    class Failing(_ThreadedSim):
        fail = True

        def encode(self, vec, scale, level):
            if self.fail:
                raise hc.HecError("encoder broke")
            return super().encode(vec, scale, level)

    prim = Failing(prog, 2)
    ex = Executor(prog, prim, None, plaintext_cache_bytes=0)
    try:
        with pytest.raises(hc.HecError, match="encoder broke"):
            _sim_run(ex, prog, tiny.xs[0])
        prim.fail = False
        y, _ = _sim_run(ex, prog, tiny.xs[0])
        y0, _ = _sim_run(_sim_executor(prog, 0), prog, tiny.xs[0])
        np.testing.assert_array_equal(y, y0)
    finally:
        ex.close()


@pytest.mark.parametrize("threads", [0, 2])
def test_a_polyphase_conv_encodes_its_distinct_diagonals_once(threads):
    """A convolution in polyphase layouts repeats most diagonals across its output ciphertexts:
    with the cache's first tier full (as on a large network), the op-local tier still encodes
    each distinct diagonal once, no more often than the lowering's count (``plaintexts``) that
    the cost model prices, and the outputs are those of a run that shares nothing."""
    from test_layout_strategy import _net

    g = _net(32, chans=(3, 16, 16, 16))
    prog, _ = lower(g, Params(N, BITS, 40, "none", log_slots=8), _primes(N, BITS), LoweringOptions(layout="polyphase"))
    lins = [prog.linears[i.plain.args[0]] for i in prog.instrs if i.op == "linear"]
    products = sum(lin.counts["mul_plain"] for lin in lins)
    distinct = sum(lin.counts["plaintexts"] for lin in lins)
    assert distinct < 0.6 * products, (distinct, products)
    x = np.random.default_rng(4).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    standalone = sum(i.op in ("mul_plain", "add_plain") for i in prog.instrs) + sum(
        lin.counts.get("add_plain", 0) for lin in lins)
    runs = {}
    for op_tier in (0, 1 << 30):
        prim = _ThreadedSim(prog, threads) if threads else SimPrimitives(prog, None, np.random.default_rng(0), True)
        ex = Executor(prog, prim, None, plaintext_cache_bytes=0)
        ex.ptcache = PlaintextCache(0, op_budget_bytes=op_tier)  # first tier full from the start
        try:
            runs[op_tier] = _sim_run(ex, prog, x)
        finally:
            ex.close()
    # the output ciphertexts run phase after phase of each channel group: an order kept by the
    # program text and checked to be a permutation
    from hecompiler.heprog import ProgramError, parse_program, print_program, verify_program

    assert any(lin.order for lin in lins)
    again = parse_program(print_program(prog), prog.weights)
    assert [lin.order for lin in again.linears] == [lin.order for lin in prog.linears]
    bad = next(lin for lin in again.linears if lin.order)
    bad.order = [bad.order[0]] * len(bad.order)
    with pytest.raises(ProgramError, match="order is not a permutation"):
        verify_program(again)
    (y0, s0), (y1, s1) = runs[0], runs[1 << 30]
    np.testing.assert_array_equal(y0, y1)
    assert s0.plaintexts + s0.plaintexts_reused == products + standalone
    if not threads:  # (plaintexts made ahead share a duplicate within the prefetch window even so)
        assert s0.plaintexts_reused == 0
    assert 0.9 * distinct <= s1.plaintexts - standalone <= distinct, (s1.plaintexts, standalone, distinct)
    assert s1.plaintexts + s1.plaintexts_reused == products + standalone


def test_repeated_diagonals_are_found_by_signature_without_making_them():
    """A polyphase convolution's products whose plaintexts repeat are found by their diagonals'
    signatures (PlaintextFactory.share_key), so the executor makes the diagonals of exactly the
    output ciphertexts the lowering counted as made (``entries_made``, what the cost model prices
    for generation), fewer than all; equal keys are equal vectors, and the run's outputs equal a
    run that shares nothing."""
    from hecompiler import linear as L
    from hecompiler.heprog import PlainRef
    from hecompiler.plaintexts import PlaintextFactory
    from test_layout_strategy import _net

    g = _net(32, chans=(3, 16, 16, 16))
    prog, _ = lower(g, Params(N, BITS, 40, "none", log_slots=8), _primes(N, BITS), LoweringOptions(layout="polyphase"))
    lin_ids = [i.plain.args[0] for i in prog.instrs if i.op == "linear"]
    signed = [k for k in lin_ids if "entries_made" in prog.linears[k].counts]
    assert signed and sum(prog.linears[k].counts["entries_made"] for k in signed) < \
        sum(prog.linears[k].counts["entries"] for k in signed)
    x = np.random.default_rng(5).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    runs = {}
    for op_tier in (0, 1 << 30):
        ex = _sim_executor(prog, 0)
        ex.ptcache = PlaintextCache(0, op_budget_bytes=op_tier)
        made = []
        build = ex.pf._linear_diagonals

        def recording(lin_id, j, build=build, made=made):
            if (lin_id, j) != ex.pf._diag_lin:
                made.append((lin_id, j))
            return build(lin_id, j)

        ex.pf._linear_diagonals = recording
        runs[op_tier] = _sim_run(ex, prog, x), made
    ((y0, _), made0), ((y1, _), made1) = runs[0], runs[1 << 30]
    np.testing.assert_array_equal(y0, y1)
    lays = prog.layouts
    for k in signed:
        lin = prog.linears[k]
        per_ct = L.matrix_entries(lin, prog.weights, lays[lin.in_layout], lays[lin.out_layout])
        assert sum(per_ct[j] for (lid, j) in made1 if lid == k) == lin.counts["entries_made"]
        assert sum(per_ct[j] for (lid, j) in made0 if lid == k) == lin.counts["entries"]  # nothing held
    # equal keys, equal vectors; none for a plaintext that is not a diagonal
    pf = PlaintextFactory(prog)
    lin_id = signed[0]
    keys = pf.diagonal_keys(lin_id)
    by_key: dict = {}
    for (j, i), ds in keys.items():
        for d in ds.tolist():
            for r in (0, 3):
                ref = PlainRef("diag", (lin_id, j, i, d, r), 2.0**40)
                key = pf.share_key(ref, 1)
                assert key is not None and key[1] == lin_id
                np.testing.assert_array_equal(by_key.setdefault(key, pf.vector(ref)), pf.vector(ref))
    assert len(by_key) < sum(len(ds) for ds in keys.values()) * 2
    assert pf.share_key(PlainRef("scalar", (0.5,), 2.0**40), 1) is None
