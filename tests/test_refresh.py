"""Refresh placement: the DP is exact (equals brute force on small networks) and
the lowering follows the plan."""

from __future__ import annotations

import numpy as np
import pytest

import hecompiler as hc
from hecompiler.heprog import Params, verify_program
from hecompiler.lower import lower
from hecompiler.planner import chain_bits, make_primes
from hecompiler.refresh import LevelModel, NodeInfo, brute_force, plan_refreshes
from hecompiler.backends.sim import Simulator


def _random_resnet_model(rng, blocks: int, top: int) -> LevelModel:
    """A chain of residual blocks with random drops and ciphertext counts."""
    nodes, n_ct = [], {"x0": int(rng.integers(1, 4))}
    x = "x0"
    k = 0
    for b in range(blocks):
        h = x
        for _ in range(int(rng.integers(1, 4))):
            k += 1
            out = f"v{k}"
            nodes.append(NodeInfo(out, (h,), out, int(rng.integers(0, min(2, top) + 1))))
            n_ct[out] = int(rng.integers(1, 4))
            h = out
        if rng.random() < 0.8:  # the skip Add
            k += 1
            out = f"v{k}"
            nodes.append(NodeInfo(out, (h, x), out, 0))
            n_ct[out] = n_ct[h]
            h = out
        x = h
    return LevelModel(nodes, n_ct, ["x0"], [x], top)


@pytest.mark.parametrize("seed", range(25))
def test_dp_equals_brute_force_on_random_residual_chains(seed):
    rng = np.random.default_rng(seed)
    m = _random_resnet_model(rng, blocks=int(rng.integers(1, 4)), top=int(rng.integers(1, 4)))
    if sum(len(n.inputs) for n in m.nodes) > 14:
        pytest.skip("too many refresh choices for brute force")
    assert plan_refreshes(m).ciphertexts == brute_force(m)


def test_sharing_the_skip_source_refresh():
    """x feeds a two-node branch and the Add: refreshing x once serves both."""
    nodes = [NodeInfo("a", ("x",), "a", 1), NodeInfo("b", ("a",), "b", 1), NodeInfo("y", ("b", "x"), "y", 0),
             NodeInfo("c", ("y",), "c", 1)]
    m = LevelModel(nodes, {"x": 2, "a": 2, "b": 2, "y": 2, "c": 2}, ["x"], ["c"], top=2)
    plan = plan_refreshes(m)
    assert plan.ciphertexts == brute_force(m) == 2


def _tiny(models):
    g = hc.load_onnx(models.MODELS["tiny_resnet_poly"]())
    hc.run_pipeline(g)
    return g


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_lowering_follows_the_optimal_plan_and_stays_correct(models, levels):
    g = _tiny(models)
    n = 8192
    bits = chain_bits(n, 30, levels)
    params = Params(n, bits, 30)
    primes = make_primes(n, bits)
    _, greedy = lower(g, params, primes)
    model = greedy.level_model()
    plan = plan_refreshes(model)
    if sum(len(x.inputs) for x in model.nodes) <= 18:
        assert plan.ciphertexts == brute_force(model)
    prog, low = lower(g, params, primes, refresh_plan=plan)
    verify_program(prog)
    assert low.stats.unplanned_refreshes == 0
    assert low.stats.refreshed_cts == plan.ciphertexts <= greedy.stats.refreshed_cts
    x = np.random.default_rng(0).standard_normal(g.inputs[0].type.shape).astype(np.float32)
    y = Simulator(prog).run({g.inputs[0].name: x})[0][g.outputs[0].name]
    ref = hc.run_graph(g, x)[0]
    assert np.abs(y - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())


def test_replanning_when_the_lowering_deviates_from_the_plan(models, monkeypatch):
    """resnet20_poly at N=2^14, 5 levels: the first plan (on the greedy lowering's level model)
    promises 10 ciphertexts, but an Add's alignment spends a level the model did not show and the
    lowering needs an 11th, so the greedy program (10) would be kept; planning again on what that
    lowering observed gives a plan of 10 that the lowering follows exactly."""
    import hecompiler.planner as planner
    from hecompiler.refresh import plan_refreshes

    g = hc.load_onnx(models.MODELS["resnet20_poly"]())
    hc.run_pipeline(g)
    opts = planner.PlanOptions(ring_degrees=(16384,), levels=5, scale_bits=40)
    monkeypatch.setattr(planner, "REPLANS", 1)
    once, _ = planner.plan(g, opts)
    assert once.refresh_plan is None and once.cost.refreshes == once.greedy_refreshed == 10
    first = plan_refreshes(once.lowering.level_model())
    _, deviated = lower(g, once.params, once.primes, refresh_plan=first)
    assert first.ciphertexts == 10 and deviated.stats.unplanned_refreshes == 1 and deviated.stats.refreshed_cts == 11
    monkeypatch.setattr(planner, "REPLANS", 3)
    best, _ = planner.plan(g, opts)
    assert best.refresh_plan is not None and best.lowering.stats.unplanned_refreshes == 0
    assert best.cost.refreshes == best.refresh_plan.ciphertexts == 10
