"""Refresh pricing: client-aided (what SEAL runs) and bootstrap (planning for a
bootstrapping target): the planner's chains, the prices, the report, the CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import hecompiler as hc
from hecompiler.cli import main
from hecompiler.compiler import CompileOptions, compile_model
from hecompiler.costmodel import BootstrapCircuit, CostModel, RefreshCost, program_cost
from hecompiler.errors import HecError
from hecompiler.heprog import Params
from hecompiler.lower import lower
from hecompiler.planner import PlanOptions, candidate_params, chain_bits, make_primes, max_levels
from hecompiler.security import max_bits


def test_circuit_reserves_its_levels_and_prices_them():
    c = BootstrapCircuit()
    assert c.levels == 14
    assert c.reserved_bits(40) == 3 * 56 + 8 * 60 + 3 * 40 == 768
    ops = c.op_counts(32768)
    # CoeffsToSlots and SlotsToCoeffs: 3 radix-2^5 factors each (63 diagonals, 2*ceil(sqrt 63) = 16
    # rotations) plus one conjugation; EvalMod: 2 * (PS for degree 30 = 15, + 3 double angles)
    assert sum(n for op, n, _ in ops if op == "rotate") == 6 * 16 + 1
    assert sum(n for op, n, _ in ops if op == "mul_plain") == 6 * 63
    assert sum(n for op, n, _ in ops if op == "mul_relin") == 36
    assert max(below for _, _, below in ops) == c.levels - 1
    m = CostModel(refresh=RefreshCost(kind="bootstrap"))
    # deeper chains make every op of the circuit dearer
    assert m.refresh_seconds(65536, 5) < m.refresh_seconds(65536, 11) < m.refresh_seconds(65536, 22)
    assert m.refresh_seconds(65536, 11) == pytest.approx(sum(
        n * m.op_seconds(op, 65536, 11 + 14 - below) for op, n, below in ops))
    # a given price wins over the estimate
    assert CostModel(refresh=RefreshCost(kind="bootstrap", bootstrap_s=7.5)).refresh_seconds(65536, 11) == 7.5


def test_bad_refresh_cost_is_refused():
    with pytest.raises(HecError, match="refresh kind 'boot'"):
        RefreshCost(kind="boot")
    with pytest.raises(HecError, match="bootstrap price"):
        RefreshCost(kind="bootstrap", bootstrap_s=-1.0)


def test_bootstrap_target_plans_at_2_16_with_room_for_the_circuit():
    boot = RefreshCost(kind="bootstrap")
    cands = candidate_params(PlanOptions(), boot)
    assert {p.poly_degree for p in cands} == {65536}
    lmax = max_levels(65536, 40, "tc128", 768)
    assert lmax == (1747 - 60 - 60 - 768) // 40 == 21
    assert sorted(p.top_level for p in cands) == sorted({21, 15, 10, 5})
    for p in cands:
        assert sum(p.coeff_bits) + boot.reserved_bits(p.scale_bits) <= max_bits(65536)
    # the client-aided default is unchanged
    assert {p.poly_degree for p in candidate_params(PlanOptions())} == {8192, 16384, 32768}
    # N=2^15 cannot hold a 128-bit bootstrap: the error says why
    with pytest.raises(HecError, match="bits kept for bootstrapping"):
        candidate_params(PlanOptions(ring_degrees=(32768,)), boot)


def _tiny(models):
    g = hc.load_onnx(models.MODELS["tiny_resnet_poly"]())
    hc.run_pipeline(g)
    return g


def test_bootstrap_price_replaces_round_trips(models):
    g = _tiny(models)
    n = 8192
    bits = chain_bits(n, 30, 1)
    prog, low = lower(g, Params(n, bits, 30), make_primes(n, bits))
    refreshes = prog.op_counts()["refresh"]
    assert refreshes == low.stats.refreshed_cts > 0
    client = program_cost(prog, CostModel())
    boot = program_cost(prog, CostModel(refresh=RefreshCost(kind="bootstrap", bootstrap_s=10.0)))
    assert boot.by_op["refresh"] == pytest.approx(10.0 * refreshes)
    # a bootstrapping executor does not share its linear ops with helper processes; SEAL's does
    assert boot.processes == 1 and boot.shared_seconds == 0.0
    assert boot.seconds - client.seconds == pytest.approx(10.0 * refreshes - client.by_op["refresh"]
                                                          + client.shared_seconds)


def test_compile_for_a_bootstrapping_target(models):
    res = compile_model(models.MODELS["tiny_resnet_poly"](), CompileOptions(plan=PlanOptions(levels=2)),
                        CostModel(refresh=RefreshCost(kind="bootstrap", bootstrap_s=20.0)))
    r = res.metadata["report"]
    assert r["params"]["poly_degree"] == 65536 and r["params"]["bootstrap_reserved_bits"] == 768
    assert r["refresh_model"]["kind"] == "bootstrap" and r["refresh_model"]["seconds_per_ciphertext"] == 20.0
    assert "ia.cr/2024/463" in r["params"]["security_note"]
    assert "bootstrap: 20 s per ciphertext (given)" in res.report_text
    assert r["predicted_seconds"] >= 20.0 * r["refreshes"]
    f = r["fidelity"]
    assert f["relative_to_range"] < 1e-3 and f["argmax_agrees"]


def test_cli_refresh_flag(models, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(models.MODELS["tiny_resnet_poly"](), path)
    out = tmp_path / "m.hec"
    assert main([str(path), "-o", str(out), "--refresh", "bootstrap:15", "--levels", "2", "-q"]) == 0
    assert hc.load_hec(str(out))[0].params.poly_degree == 65536
    for bad, msg in [("bootstrap:abc", "bootstrap price must be seconds"), ("boot", "expected 'client'"),
                     ("client:3", "expected 'client'"), ("bootstrap:-2", "bootstrap price")]:
        bad_out = tmp_path / "bad.hec"
        capsys.readouterr()
        assert main([str(path), "-o", str(bad_out), "--refresh", bad]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"hecompile: error: --refresh {bad!r}") and msg in err
        assert not bad_out.exists()


def test_bootstrap_planning_adds_chains_the_refresh_dp_proposes(models):
    """ResNet-20 blocks take 4 levels: the quarter grid (21, 15, 10, 5 levels) misses 4, where every
    refresh falls on a block boundary; the DP over chain lengths proposes it and it wins."""
    import dataclasses

    from hecompiler.planner import plan, promising_levels
    from hecompiler.refresh import plan_refreshes

    g = hc.load_onnx(models.MODELS["resnet20_poly"]())
    hc.run_pipeline(g)
    cost = CostModel(refresh=RefreshCost(kind="bootstrap"))
    best, cands = plan(g, PlanOptions(max_memory_bytes=200 * 2**30), cost)
    levels = [c.params.top_level for c in cands]
    assert levels[:4] == [21, 15, 10, 5] and 4 in levels[4:]
    assert best.params.top_level == 4
    assert best.cost.seconds == min(c.cost.seconds for c in cands)
    # the chosen program follows its plan; the DP over chain lengths estimates the others from its
    # level model (an estimate: an Add's alignment can spend a level differently on another chain)
    model = best.lowering.level_model()
    assert plan_refreshes(model).ciphertexts == best.cost.refreshes == 10
    for c in cands:
        est = plan_refreshes(dataclasses.replace(model, top=c.params.top_level)).ciphertexts
        assert abs(est - c.cost.refreshes) <= 1
    assert 4 in promising_levels(best, cost, 21)
