"""Per-op lowering rules registered by op (hecompiler.lower.LOWERINGS, ``@lowers("Conv")``): the
lowering dispatches through the registry, a rule registered for an op replaces the built-in one,
and an op without a rule is refused naming the node."""

from __future__ import annotations

import numpy as np
import pytest

import hecompiler as hc
from hecompiler import lower as L
from hecompiler.backends.sim import Simulator
from hecompiler.errors import LoweringError
from hecompiler.heprog import Params

sealapi = pytest.importorskip("tenseal.sealapi")

N, BITS = 8192, (60, 40, 40, 60)


def _model(op="Div"):
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((2, 2, 1, 1), 0.5, np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node(op, ["c", "k"], ["y"])]
    g = helper.make_graph(nodes, "rules", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(4.0), "k")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _lower(model):
    g = hc.load_onnx(model)
    hc.run_pipeline(g, "")
    primes = tuple(q.value() for q in sealapi.CoeffModulus.Create(N, list(BITS)))[:-1]
    return g, L.lower(g, Params(N, BITS, 40), primes)


def test_registry_covers_the_built_in_ops():
    for op in ("Conv", "AveragePool", "BatchNormalization", "Gemm", "MatMul", "GlobalAveragePool", "Flatten",
               "Reshape", "Identity", "Dropout", "Add", "Sub", "Mul", "Div", "Poly", "Pow"):
        assert callable(L.LOWERINGS.get(op)), op
    assert "Relu" not in L.LOWERINGS and "MaxPool" not in L.LOWERINGS


def test_dispatch_goes_through_the_registry(monkeypatch):
    seen = []
    builtin = L.LOWERINGS["Div"]

    def div_rule(low, node):
        seen.append(node.op)
        return builtin(low, node)

    monkeypatch.setitem(L.LOWERINGS, "Div", div_rule)
    g, (prog, _) = _lower(_model("Div"))
    assert seen == ["Div"]
    x = np.random.default_rng(0).uniform(-1, 1, (1, 2, 4, 4)).astype(np.float32)
    out, _ = Simulator(prog).run({"x": x})
    want = np.asarray(hc.run_graph(g, x)[0])
    np.testing.assert_allclose(out["y"], want, atol=1e-9)


def test_a_registered_rule_replaces_the_built_in_one(monkeypatch):
    """A user rule (here: Div lowered as a multiplication by the reciprocal, via the builder's
    pending scalar) is what the lowering runs."""
    from dataclasses import replace

    monkeypatch.setattr(L, "LOWERINGS", dict(L.LOWERINGS))

    @L.lowers("Div")
    def twice(low, node):
        t = low.tensor(node.inputs[0])
        return replace(t, alpha=t.alpha * 2.0 / float(node.inputs[1].data))

    g, (prog, _) = _lower(_model("Div"))
    x = np.random.default_rng(1).uniform(-1, 1, (1, 2, 4, 4)).astype(np.float32)
    out, _ = Simulator(prog).run({"x": x})
    want = 2.0 * np.asarray(hc.run_graph(g, x)[0])
    np.testing.assert_allclose(out["y"], want, atol=1e-9)


def test_an_op_without_a_rule_is_refused_by_node(monkeypatch):
    monkeypatch.setattr(L, "LOWERINGS", {k: v for k, v in L.LOWERINGS.items() if k != "Div"})
    with pytest.raises(LoweringError, match=r"node .*y.*: cannot run Div under encryption: this op has no HE lowering"):
        _lower(_model("Div"))


def test_an_observer_sees_the_lowerings_events():
    """A user's observer (LoweringOptions.observers) gets the events the built-in statistics
    and level model are recorded from: one node end per node, one linear op per Conv."""
    from hecompiler.lower_observe import Observer

    class Count(Observer):
        def __init__(self):
            self.linear, self.ends, self.starts = [], [], 0

        def on_node_start(self, node):
            self.starts += 1

        def on_linear(self, stat):
            self.linear.append((stat.node, stat.op, stat.level_in, stat.level_out))

        def on_node_end(self, node, level, n_ct, layout, alpha, input_names, input_level):
            self.ends.append((node.op, input_level - level, alpha))

    g = hc.load_onnx(_model("Div"))
    hc.run_pipeline(g, "")
    primes = tuple(q.value() for q in sealapi.CoeffModulus.Create(N, list(BITS)))[:-1]
    obs = Count()
    low = L.Lowering(g, Params(N, BITS, 40), primes, L.LoweringOptions(observers=(obs,)))
    low.run()
    assert obs.starts == len(g.nodes) == len(obs.ends)
    assert obs.linear == [(s.node, s.op, s.level_in, s.level_out) for s in low.stats.layers]
    assert [op for op, _, _ in obs.ends] == ["Conv", "Div"]
    assert obs.ends[0][1] == 1 and obs.ends[1][1] == 0  # the conv takes a level, the scalar Div none
    assert obs.ends[1][2] == pytest.approx(0.25)  # Div by 4: pending, not multiplied
    assert [n.drop for n in low.level_model().nodes] == [1, 0]


def _pool_gemm(n_out: int):
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(2).normal(0, 0.1, (n_out, 64)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "pool_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_classifier_after_pooling_writes_its_outputs_spread():
    """After a global pooling by rotate-and-sum the 64 sums lie 64 slots apart; 100 outputs in
    consecutive slots would take all 4096 diagonals (every slot difference occurs), spread in
    columns 64 apart they take 64 x 2 = 128, at no extra level; the program computes the model."""
    import os
    import tempfile

    from hecompiler.hecfile import load_hec, save_hec
    from hecompiler.layout import Layout
    from hecompiler.linear import diag_keys

    g, (prog, low) = _lower(_pool_gemm(100))
    gemm = next(s for s in low.stats.layers if s.op == "Gemm")
    assert gemm.diagonals == 128 and gemm.layout_out.startswith("spread 100x1x1 in 1 ct")
    lin = prog.linears[-1]
    lin_in, lout = prog.layouts[lin.in_layout], prog.layouts[lin.out_layout]
    consecutive = diag_keys(lin, prog.weights, lin_in, Layout.vector(100, lin_in.slots))
    assert sum(len(d) for d in consecutive.values()) == 4096
    assert sorted(lout.positions[:3]) == [0, 64, 128] and lout.positions[64] == 1  # column-major
    x = np.random.default_rng(4).normal(0, 1, (1, 64, 8, 8)).astype(np.float32)
    ref = np.asarray(hc.run_graph(g, x)[0], np.float64)
    out = Simulator(prog).run({prog.inputs[0].name: x})[0][prog.outputs[0].name]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # the layout survives the .hec file
    with tempfile.TemporaryDirectory() as d:
        save_hec(os.path.join(d, "p.hec"), prog, {})
        back, _ = load_hec(os.path.join(d, "p.hec"))
    assert back.layouts[lin.out_layout] == lout


def test_consecutive_outputs_stay_when_spreading_saves_nothing():
    """Inputs in consecutive slots (stride 1): the outputs stay consecutive."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(2).normal(0, 0.1, (10, 64)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                          [numpy_helper.from_array(w, "w")])
    _, (prog, low) = _lower(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    gemm = next(s for s in low.stats.layers if s.op == "Gemm")
    assert gemm.layout_out.startswith("vector 10x1x1")
