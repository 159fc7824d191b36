"""Encoding precision.  CKKS rounds every plaintext to 1/scale; a ct-pt product multiplies that
fixed error by the ciphertext's slots.  The simulator's noise model carries it (it explained a
ResNet-18 classifier's 1.3e-4 error on SEAL, which the model without it put at 9e-7), and the
lowering scales up a graph output's small weights so they keep their digits."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import hecompiler as hc
from hecompiler.backends.sim import Simulator
from hecompiler.costmodel import CostModel
from hecompiler.heprog import Params
from hecompiler.lower import lower
from hecompiler.lower_align import OUTPUT_GAIN_BITS

sealapi = pytest.importorskip("tenseal.sealapi")
from hecompiler.backends import seal as SB  # noqa: E402

N, BITS = 8192, (60, 40, 40, 60)
IN, OUT = 256, 16


def _gemm(w: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, IN])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, OUT])],
                          [numpy_helper.from_array(w.astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    graph = hc.load_onnx(m)
    hc.run_pipeline(graph, "")
    primes = tuple(q.value() for q in sealapi.CoeffModulus.Create(N, list(BITS)))[:-1]
    prog, _ = lower(graph, Params(N, BITS, 40), primes)
    return graph, prog


def _weights(gain: float) -> np.ndarray:
    """Random weights whose largest absolute row sum is ``gain``."""
    w = np.random.default_rng(3).uniform(-1, 1, (OUT, IN))
    return w * (gain / np.abs(w).sum(axis=1).max())


@pytest.fixture(scope="module")
def x():
    # large ciphertext values (a sum-pooling with a polynomial's leading coefficient pending
    # holds ~3e4): the encoding error of each product grows with them
    return np.random.default_rng(5).uniform(-1e4, 1e4, (1, IN)).astype(np.float32)


def _rms(y, ref) -> float:
    return float(np.sqrt(np.mean((np.asarray(y, np.float64) - ref) ** 2)))


def _quiet_encode(cost: CostModel) -> CostModel:
    table = copy.deepcopy(cost.table)
    for r in table["rings"]:
        r["noise"]["encode"] = 0.0
    return CostModel(table)


def test_simulator_predicts_the_encoding_error(x):
    """With weights of gain 1 (not rescaled) and inputs of magnitude 1e4, encoding dominates
    SEAL's error: the noise model predicts it within 3x, and without its encoding term it falls
    short more than 10x (so this test would catch the term's absence)."""
    graph, prog = _gemm(_weights(1.0))
    assert prog.outputs[0].alpha == 1.0  # gain 1: left as it is
    feeds = {prog.inputs[0].name: x}
    name = prog.outputs[0].name
    exact = Simulator(prog).run(feeds)[0][name]
    ref = np.asarray(hc.run_graph(graph, x)[0], np.float64)
    assert np.abs(exact - ref).max() <= 1e-6 * np.abs(ref).max()  # the interpreter runs in float32
    seal = float(np.exp(np.mean([np.log(_rms(SB.run_encrypted(prog, feeds)[0][name], exact)) for _ in range(2)])))
    sim = float(np.exp(np.mean([np.log(_rms(Simulator(prog, noise=True, seed=s).run(feeds)[0][name], exact))
                                for s in range(3)])))
    quiet = _quiet_encode(CostModel())
    without = float(np.exp(np.mean([np.log(_rms(Simulator(prog, cost=quiet, noise=True, seed=s).run(feeds)[0][name],
                                                exact)) for s in range(3)])))
    assert seal / 3 <= sim <= 3 * seal, (sim, seal)
    assert without < seal / 10, (without, seal)


def test_small_output_weights_are_scaled_up_and_keep_their_digits(x):
    """A graph output's linear op with gain 2^-20 is scaled up by 2^20 (the client divides): its
    relative error on SEAL stays within 3x of the same op at gain 1, where unscaled it would be
    ~10^6 times larger (the encoding error does not shrink with the weights)."""
    _, unit = _gemm(_weights(1.0))
    graph, small = _gemm(_weights(2.0 ** -20))
    assert small.outputs[0].alpha == pytest.approx(2.0 ** -20)
    feeds = {small.inputs[0].name: x}
    name = small.outputs[0].name
    ref = np.asarray(hc.run_graph(graph, x)[0], np.float64)
    exact = Simulator(small).run(feeds)[0][name]  # the client applies alpha: the real output
    np.testing.assert_allclose(exact, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    rel_small = _rms(SB.run_encrypted(small, feeds)[0][name], exact) / np.abs(exact).max()
    ref_unit = np.asarray(Simulator(unit).run(feeds)[0][name], np.float64)
    rel_unit = _rms(SB.run_encrypted(unit, feeds)[0][name], ref_unit) / np.abs(ref_unit).max()
    assert rel_small <= 3 * rel_unit, (rel_small, rel_unit)


def test_output_scaling_is_capped_and_never_shrinks():
    _, tiny = _gemm(_weights(2.0 ** -60))
    assert tiny.outputs[0].alpha == pytest.approx(2.0 ** -OUTPUT_GAIN_BITS)
    _, big = _gemm(_weights(8.0))
    assert big.outputs[0].alpha == 1.0
