"""Sparse packing: ciphertexts of fewer than N/2 slots, for a cheaper bootstrap (issue 11).

A bootstrapping target whose cost table measured a bootstrap of 2^k < N/2 slots (with its own
keys and bootstrapper) offers that packing to the planner, which weighs more ciphertexts
against the cheaper bootstrap.  Fast tests use the INSECURE toy-n12 set (N=4096: 2048 slots,
sparse 1024 and 512 measured in its bundled table).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

import hecompiler as hc
from hecompiler.backends.sim import Simulator
from hecompiler.errors import HecError
from hecompiler.heprog import Params
from hecompiler.planner import PlanOptions
from hecompiler.target import get_target

from conftest import ROOT, ort_run

L = pytest.importorskip("hecompiler.backends.lattigo")
LS = pytest.importorskip("hecompiler.backends.lattigo.session")

TINY = ROOT / "models" / "tiny_resnet_poly.onnx"
TOY = "lattigo:toy-n12"


def _compile(slots=None, **kw):
    return hc.compile_model(str(TINY), hc.CompileOptions(target=TOY, plan=PlanOptions(security="none", slots=slots),
                                                         **kw))


@pytest.fixture(scope="module")
def x():
    return np.load(ROOT / "models" / "tiny_resnet_poly.input.npy")


@pytest.fixture(scope="module")
def sparse():
    return _compile(slots=1024)


def test_params_carry_the_packing_through_text_and_files(sparse, tmp_path):
    p = Params(4096, (60, 40, 40), 40, "none", 10)
    assert p.slots == 1024 and Params.from_dict(p.to_dict()) == p
    assert "log_slots" not in Params(4096, (60, 40, 40), 40).to_dict()  # full packing: files as before
    prog = sparse.prog
    assert prog.params.log_slots == 10 and all(lay.slots == 1024 for lay in prog.layouts)
    assert hc.parse_program(hc.print_program(prog), prog.weights).params == prog.params
    hec = tmp_path / "s.hec"
    hc.save_hec(hec, prog, sparse.metadata)
    prog2, meta = hc.load_hec(hec)
    assert prog2.params.log_slots == 10 and meta["target"]["lattigo"]["log_slots"] == 10


def test_a_packing_beyond_the_ring_is_refused(sparse, tmp_path):
    bad = dataclasses.replace(sparse.prog, params=dataclasses.replace(sparse.prog.params, log_slots=11))
    with pytest.raises(HecError, match=r"params: log_slots 11 must be in 1\.\.10"):
        hc.save_hec(tmp_path / "bad.hec", bad, sparse.metadata)


def test_the_planner_weighs_the_measured_packings():
    res = _compile()
    labels = [c["params"] for c in res.metadata["report"]["candidates"]]
    assert any(label.endswith("slots=2^10") for label in labels) and any(label.endswith("slots=2^9")
                                                                         for label in labels)
    assert any("slots=" not in label for label in labels)
    # the chosen one is the cheapest predicted among the feasible candidates
    ok = [c for c in res.metadata["report"]["candidates"] if not c["rejected"] and c["predicted_seconds"]]
    chosen = next(c for c in ok if c["chosen"])
    assert chosen["predicted_seconds"] == min(c["predicted_seconds"] for c in ok)


def test_a_sparse_bootstrap_is_priced_and_sized_from_its_own_measurement(sparse):
    cost = get_target(TOY).cost_model()
    entry = cost.bootstrap_entry(4096, 1024)
    assert entry is not None and entry["slots"] == 1024 and "key_bytes" in entry
    assert cost.refresh_seconds(4096, 4, 1024) == pytest.approx(entry["wall_s"])
    assert cost.bootstrap_key_bytes(4096, 1024) == entry["key_bytes"]["bootstrap.key"]
    assert cost.bootstrapper_base_bytes(4096, 1024) == max(entry["bootstrapper"]["heap_bytes"],
                                                           entry["bootstrapper"]["rss_bytes"])
    full = cost.bootstrap_entry(4096, None)
    assert full["slots"] == 2048 and cost.refresh_seconds(4096, 4) == pytest.approx(full["wall_s"])
    r = sparse.metadata["report"]
    assert r["bootstrap_key_bytes"] == entry["key_bytes"]["bootstrap.key"]
    assert r["refresh_model"]["seconds_per_ciphertext"] == pytest.approx(entry["wall_s"], rel=1e-3)
    assert "of 1024 slots" in r["refresh_model"]["description"]
    with pytest.raises(HecError, match="--slots 256: target lattigo:toy-n12 offers 2048, 1024, 512"):
        _compile(slots=256)


@pytest.mark.parametrize("slots", [1024, 2048])
def test_both_packings_run_with_real_bootstraps_and_match_onnxruntime(slots, sparse, x):
    res = sparse if slots == 1024 else _compile(slots=2048)
    prog = res.prog
    assert prog.params.slots == slots and (prog.params.log_slots is None) == (slots == 2048)
    n_refresh = sum(i.op == "refresh" for i in prog.instrs)
    outs, st = LS.run_encrypted(prog, {prog.inputs[0].name: x}, meta=res.metadata)
    y = outs[prog.outputs[0].name]
    ref = ort_run(onnx.load(TINY), x)[0]
    assert np.abs(y - ref).max() <= res.fidelity["error_bound"]["max_abs_error"]
    assert np.argmax(y) == np.argmax(ref)
    assert n_refresh > 0 and st.bootstraps == n_refresh


def test_seal_refuses_a_sparse_program(sparse, x):
    from hecompiler.backends.seal import SealBackendError, make_context

    with pytest.raises(SealBackendError, match="packs its ciphertexts sparsely \\(1024 of the 2048 slots"):
        make_context(sparse.prog)


def test_a_batched_simulation_equals_separate_runs(sparse, x):
    prog = sparse.prog
    name, out = prog.inputs[0].name, prog.outputs[0].name
    xs = np.stack([x, -0.5 * x, np.zeros_like(x)])
    target = get_target(TOY)
    ys, st = Simulator(prog, strict=False, target=target).run_batch({name: xs})
    uses = []
    for k, xi in enumerate(xs):
        y, s1 = Simulator(prog, strict=False, target=target).run({name: xi})
        np.testing.assert_allclose(ys[out][k], y[out], rtol=0, atol=1e-12)
        uses.append(s1.modulus_use)
    assert st.modulus_use == pytest.approx(max(uses))
    with pytest.raises(HecError, match="different batch sizes"):
        Simulator(prog, strict=False, target=target).run_batch({name: xs, "other": xs[:2]})
