"""hecompiler/parallel.py: linear ops shared with helper processes under SEAL.

The tiny ResNet at a small insecure ring (N=8192) is too small for the executor to share its ops
by itself, so the tests lower the threshold: every op is then split between this process and a
forked helper, and the result must be what one process computes (the same SEAL operations), and
onnxruntime's within the usual tolerance."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest

sealapi = pytest.importorskip("tenseal.sealapi")

import hecompiler as hc  # noqa: E402
from hecompiler import parallel  # noqa: E402
from hecompiler.backends import seal as SB  # noqa: E402
from hecompiler.costmodel import CostModel, program_cost, split_saving, instr_cost  # noqa: E402
from hecompiler.executor import ExecutionError  # noqa: E402
from hecompiler.runtime import group_order, group_products  # noqa: E402

from conftest import seal_tiny  # noqa: E402

N, BITS = 8192, (60, 40, 40, 60)


@pytest.fixture(scope="module")
def tiny():
    return seal_tiny(11, N, BITS)


def _run(prog, feeds, processes, keys=None):
    client = SB.SealClient(prog, keys) if keys is not None else SB.SealClient.create(prog)
    server = SB.SealServer(prog, client.public_keys(), processes=processes)
    try:
        cts = client.encrypt_inputs(feeds)
        out, st = server.run(cts, client.refresh)
        return client.decrypt_outputs(out), st, client.keys
    finally:
        server.close()


def test_split_work_is_contiguous_and_balanced():
    plan = SimpleNamespace(giant={0: {0: [1] * 10, 5: [1] * 10}, 1: {0: [1] * 10, 7: [1] * 30}})
    order = [(0, 0), (0, 5), (1, 0), (1, 7)]
    # two outputs for two processes: by group sums
    parts = parallel.split_work(plan, [0, 1], order, 2)
    assert all(not outs for outs, _ in parts)
    assert [gr for _, run in parts for gr in run] == order
    assert [sum(len(plan.giant[j][g]) for j, g in run) for _, run in parts] == [30, 30]
    many = parallel.split_work(plan, [0, 1], order, 8)  # more parts than groups: at most one run per group
    assert len(many) <= 4 and [gr for _, run in many for gr in run] == order and all(run for _, run in many)
    # enough outputs: by whole outputs, in their evaluation order, balanced by products
    plan = SimpleNamespace(giant={j: {0: [1] * (10 if j < 2 else 30)} for j in range(4)})
    parts = parallel.split_work(plan, [3, 2, 1, 0], [], 2)
    assert parts == [([3], []), ([2, 1, 0], [])]
    assert parallel.split_work(plan, [3, 2, 1, 0], [], 1) == [([3, 2, 1, 0], [])]


def test_worth_splitting_weighs_products_against_ciphertexts_passed():
    assert not parallel.worth_splitting(10_000, 100, 4, 1, 1)  # one process
    assert not parallel.worth_splitting(10_000, 1, 4, 1, 2)  # one group: nothing to share
    k = parallel.MIN_PRODUCTS_PER_CIPHERTEXT
    # one output: its 100 group sums, half of them from the helper, and the 4 inputs travel
    assert parallel.worth_splitting(k * (4 + 50), 100, 4, 1, 2)
    assert not parallel.worth_splitting(k * (4 + 50) - 1, 100, 4, 1, 2)
    # eight outputs: half of them come back whole
    assert parallel.worth_splitting(max(k * (4 + 4), parallel.MIN_PRODUCTS), 100, 4, 8, 2)
    assert not parallel.worth_splitting(parallel.MIN_PRODUCTS - 1, 100, 4, 8, 2)  # too small an op
    assert parallel.MIN_PRODUCTS > k * (4 + 4)


def test_processes_from_the_environment(monkeypatch):
    monkeypatch.delenv("HECOMPILER_PROCESSES", raising=False)
    assert parallel.default_processes(2) == 2
    assert parallel.default_processes(64) == parallel.DEFAULT_MAX_PROCESSES  # each helper holds its own caches
    monkeypatch.setenv("HECOMPILER_PROCESSES", "3")
    assert parallel.default_processes() == 3
    monkeypatch.setenv("HECOMPILER_PROCESSES", "16")
    assert parallel.default_processes(64) == 16  # asked for: no ceiling
    monkeypatch.setenv("HECOMPILER_PROCESSES", "0")
    with pytest.raises(hc.HecError, match="HECOMPILER_PROCESSES='0'"):
        parallel.default_processes()
    monkeypatch.setenv("HECOMPILER_PROCESSES", "two")
    with pytest.raises(hc.HecError, match="whole number"):
        parallel.default_processes()


def test_shared_ops_compute_what_one_process_does(tiny, monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PRODUCTS_PER_CIPHERTEXT", 0)
    monkeypatch.setattr(parallel, "MIN_PRODUCTS", 0)
    one, st1, keys = _run(tiny.prog, tiny.feeds, processes=1)
    two, st2, _ = _run(tiny.prog, tiny.feeds, processes=2, keys=keys)
    n_lin = sum(1 for ins in tiny.prog.instrs if ins.op == "linear")
    assert st1.split_linears == 0
    # every linear op with two groups or more was shared
    plans = SB.SealServer(tiny.prog, keys.without_secret(), processes=1).ex.plans
    shareable = sum(1 for ins in tiny.prog.instrs if ins.op == "linear"
                    and len(group_order(tiny.prog, ins, plans.plan(ins.plain.args[0]))) > 1)
    assert 0 < st2.split_linears == shareable <= n_lin
    assert st2.transfer_ciphertexts > 0 and st2.helper_seconds > 0
    assert st2.helper_peak_rss_bytes > 0
    name = tiny.prog.outputs[0].name
    ptp = np.ptp(tiny.ref)
    # the same operations on the same operands, under fresh encryption noise of the refreshes
    assert np.abs(one[name] - two[name]).max() <= 1e-5 * ptp
    assert np.abs(two[name].ravel() - tiny.ref.ravel()).max() <= 1e-3 * ptp
    # the helpers encoded their share: the plaintexts counted are at least one process's
    assert st2.plaintexts >= st1.plaintexts


def test_a_dead_helper_is_an_execution_error(tiny, monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PRODUCTS_PER_CIPHERTEXT", 0)
    monkeypatch.setattr(parallel, "MIN_PRODUCTS", 0)
    real = parallel.Helpers.submit

    def submit(self, h, k, given, outputs, groups):
        os.kill(self.procs[h].pid, signal.SIGKILL)
        self.procs[h].join()
        return real(self, h, k, given, outputs, groups)

    monkeypatch.setattr(parallel.Helpers, "submit", submit)
    with pytest.raises((ExecutionError, SB.SealBackendError), match="helper process 1"):
        _run(tiny.prog, tiny.feeds, processes=2)


def test_the_cost_model_prices_the_helpers(tiny, monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PRODUCTS_PER_CIPHERTEXT", 0)
    monkeypatch.setattr(parallel, "MIN_PRODUCTS", 0)
    monkeypatch.setenv("HECOMPILER_PROCESSES", "1")
    one = program_cost(tiny.prog, CostModel())
    monkeypatch.setenv("HECOMPILER_PROCESSES", "2")
    model = CostModel()
    two = program_cost(tiny.prog, model)
    assert one.processes == 1 and one.shared_seconds == 0.0
    assert two.processes == 2 and two.shared_seconds > 0
    assert two.seconds == pytest.approx(one.seconds - two.shared_seconds)
    # each op: at most the (P-1)/P of its products and encodings, less the ciphertexts passed
    for ins in tiny.prog.instrs:
        if ins.op != "linear":
            continue
        by, enc, _ = instr_cost(ins, tiny.prog, model)
        saved, enc_shared = split_saving(ins, tiny.prog, model, by, enc)
        assert 0 <= saved <= (by.get("mul_plain", 0) + by.get("add", 0) + enc) / 2 + 1e-12
        assert enc_shared == pytest.approx(enc / 2)
    # a served inference that keeps every plaintext saves only the encoding left to this process
    full = two.plaintext_bytes_all
    assert two.repeat_seconds(full) == pytest.approx(
        two.seconds - (two.encode_seconds - two.overlapped_seconds - two.shared_encode_seconds))


def test_group_order_covers_every_group_once(tiny):
    keys = SB.SealClient.create(tiny.prog).public_keys()
    server = SB.SealServer(tiny.prog, keys, processes=1)
    for ins in tiny.prog.instrs:
        if ins.op != "linear":
            continue
        plan = server.ex.plans.plan(ins.plain.args[0])
        order = group_order(tiny.prog, ins, plan)
        want = {(j, g) for j, gs in plan.giant.items() for g in gs}
        assert len(order) == len(want) and set(order) == want
        lin = tiny.prog.linears[ins.plain.args[0]]
        assert sum(group_products(plan, gr) for gr in order) == lin.counts["mul_plain"]


def _wide_conv(seed: int = 0):
    """A 16x32x32 convolution and square: four ciphertexts in and out at N=8192."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c, hw = 16, 32
    inits = [numpy_helper.from_array(rng.normal(0, 0.25, (c, c, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c1", "c1"], ["y"])]
    g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def test_ops_with_many_outputs_are_shared_by_whole_outputs(monkeypatch):
    from conftest import ort_run
    from hecompiler.planner import PlanOptions

    m = _wide_conv()
    res = hc.compile_model(m, hc.CompileOptions(plan=PlanOptions(ring_degrees=(8192,))))
    prog = res.prog
    x = np.random.default_rng(5).uniform(-1, 1, (1, 16, 32, 32)).astype(np.float32)
    ref = np.asarray(ort_run(m, x), np.float64)
    modes = []
    real = parallel.split_work

    def spy(plan, outputs, groups, parts):
        got = real(plan, outputs, groups, parts)
        modes.append("outputs" if got[0][0] else "groups")
        return got

    monkeypatch.setattr("hecompiler.executor.split_work", spy)
    one, st1, keys = _run(prog, {prog.inputs[0].name: x}, processes=1)
    two, st2, _ = _run(prog, {prog.inputs[0].name: x}, processes=2, keys=keys)
    assert st2.split_linears >= 1 and "outputs" in modes
    name = prog.outputs[0].name
    ptp = np.ptp(ref)
    assert np.abs(one[name] - two[name]).max() <= 1e-5 * ptp
    assert np.abs(two[name].reshape(ref.shape) - ref).max() <= 1e-3 * ptp


def test_cli_refuses_a_bad_process_count(tmp_path, capsys):
    from hecompiler.cli import main

    for bad, msg in (("0", "0: at least 1 process"), ("two", "'two' is not a whole number of processes")):
        with pytest.raises(SystemExit) as e:
            main(["run", str(tmp_path / "m.hec"), "--input", str(tmp_path / "x.npy"), "--processes", bad])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
