"""Layout strategies (hecompiler/layout_strategy.py) and the planner's search over them: each
strategy's program computes the model (simulator against the reference interpreter, one under
SEAL), the power-of-two ("aligned") grid tiles the ciphertexts and cuts a 28x28 network's
rotations and ct-pt multiplications, the planner picks it there and skips it where it would lay
out the graph alike, polyphase layouts keep every tensor of a large image dense after strided
layers and the planner picks them there, and --layout fixes the strategy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hecompiler as hc
from hecompiler.backends.sim import Simulator
from hecompiler.errors import HecError
from hecompiler.heprog import Params
from hecompiler.layout import Layout
from hecompiler.layout_strategy import STRATEGIES, decimation, get_strategy, phase_bounds
from hecompiler.lower import LoweringOptions, lower
from hecompiler.planner import PlanOptions, plan

sealapi = pytest.importorskip("tenseal.sealapi")

N, BITS = 8192, (60, 40, 40, 40, 60)


def _net(side: int, chans=(3, 8, 8, 16), scale=0.3):
    """Convs (the second and third strided) with a small square activation between them."""
    rng = np.random.default_rng(side)
    nodes, inits, x = [], {}, "x"
    for k in range(len(chans) - 1):
        s = 2 if k >= 1 else 1
        inits[f"w{k}"] = rng.uniform(-scale, scale, (chans[k + 1], chans[k], 3, 3)).astype(np.float32)
        inits[f"k{k}"] = np.float32(0.25)
        nodes += [helper.make_node("Conv", [x, f"w{k}"], [f"c{k}"], strides=[s, s], pads=[1, 1, 1, 1]),
                  helper.make_node("Mul", [f"c{k}", f"c{k}"], [f"q{k}"]),
                  helper.make_node("Mul", [f"q{k}", f"k{k}"], [f"m{k}"]),
                  helper.make_node("Add", [f"m{k}", f"c{k}"], [f"a{k}"])]
        x = f"a{k}"
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, chans[0], side, side])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    graph = hc.load_onnx(m)
    hc.run_pipeline(graph)
    return graph


def _primes():
    return tuple(q.value() for q in sealapi.CoeffModulus.Create(N, list(BITS)))[:-1]


def test_aligned_grids_are_powers_of_two_that_tile_the_ciphertexts():
    s = STRATEGIES["aligned"]
    lay = s.input_layout((8, 28, 28), 4096)
    assert lay.grid == (32, 32) and lay.hs == 32 and lay.n_ct == 2
    assert all(p % 1024 == 0 for p in lay.pos) and not lay.channel_straddles
    mux = STRATEGIES["multiplexed"].input_layout((8, 28, 28), 4096)  # 784-slot channel offsets: 5 per ciphertext
    assert mux.pos[1] - mux.pos[0] == 784 and 4096 % 784
    # a 224x224 channel spans 12.25 ciphertexts: laid end to end, channels start mid-ciphertext; on a
    # 256x256 grid every channel starts a ciphertext and every row lies in one
    assert any(p % 4096 for p in STRATEGIES["multiplexed"].input_layout((3, 224, 224), 4096).pos)
    big = s.input_layout((3, 224, 224), 4096)
    assert all(p % 4096 == 0 for p in big.pos) and 4096 % big.hs == 0
    assert s.input_layout((4, 8, 8), 4096) == STRATEGIES["multiplexed"].input_layout((4, 8, 8), 4096)
    with pytest.raises(HecError, match="--layout 'tiles': expected one of multiplexed, gapped, aligned, polyphase, replicated"):
        get_strategy("tiles")


def test_every_strategy_computes_the_model_and_aligned_is_cheapest_at_28x28():
    g = _net(28)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 28, 28)).astype(np.float32)
    want = np.asarray(hc.run_graph(g, x)[0], np.float64).reshape(-1)
    counts = {}
    for name in STRATEGIES:
        prog, low = lower(g, Params(N, BITS, 40, "none"), _primes(), LoweringOptions(layout=name))
        assert low.strategy.name == name
        out, _ = Simulator(prog).run({"x": x})
        got = np.asarray(out[prog.outputs[0].name], np.float64).reshape(-1)
        assert np.abs(got - want).max() <= 1e-6 * np.ptp(want), name
        c = prog.op_counts()
        counts[name] = (c["rotate"], c["mul_plain"])
    assert counts["aligned"][0] < counts["multiplexed"][0] and counts["aligned"][1] < counts["multiplexed"][1], counts
    assert counts["multiplexed"][1] < counts["gapped"][1], counts


def test_the_planner_searches_the_strategies():
    g = _net(28)
    best, cands = plan(g, PlanOptions(ring_degrees=(8192,)))
    assert best.layout == "aligned"
    layouts = {c.layout for c in cands}
    assert layouts == {"multiplexed", "aligned", "polyphase", "replicated", "polyphase:2"}
    assert any("layout=aligned" in c.label for c in cands)
    # fixed by the user: no search
    best, cands = plan(g, PlanOptions(ring_degrees=(8192,), lowering=LoweringOptions(layout="multiplexed")))
    assert best.layout == "multiplexed" and {c.layout for c in cands} == {"multiplexed"}
    # a graph whose images are powers of two: aligned would lay it out alike, so it is not lowered
    best, cands = plan(_net(16), PlanOptions(ring_degrees=(8192,)))
    assert {c.layout for c in cands} == {"multiplexed", "polyphase", "replicated", "polyphase:2"}
    # nor is polyphase where no strided layer follows an input
    flat = _net(16, chans=(3, 4))
    assert decimation(flat)["x"] == 1
    best, cands = plan(flat, PlanOptions(ring_degrees=(8192,)))
    assert {c.layout for c in cands} == {"multiplexed", "replicated"}


@pytest.mark.parametrize("layout", ["aligned", "polyphase"])
def test_aligned_and_polyphase_programs_run_under_seal(layout):
    from hecompiler.backends import seal as SB

    g = _net(12, chans=(2, 4, 4))
    x = np.random.default_rng(2).uniform(-1, 1, (1, 2, 12, 12)).astype(np.float32)
    prog, _ = lower(g, Params(N, BITS, 40, "none"), _primes(), LoweringOptions(layout=layout))
    lay = prog.layouts[prog.inputs[0].layout]
    assert (lay.grid, lay.phase) == (((16, 16), 1) if layout == "aligned" else ((8, 8), 2))
    outs, _ = SB.run_encrypted(prog, {"x": x})
    want = np.asarray(hc.run_graph(g, x)[0], np.float64).reshape(-1)
    got = np.asarray(outs[prog.outputs[0].name], np.float64).reshape(-1)
    assert np.abs(got - want).max() <= 1e-4 * np.ptp(want)


def test_polyphase_layout_places_each_phase_as_a_channel():
    lay = Layout.polyphase((3, 8, 12), 64, 4)  # virtual 48 channels of 2x3, on 2x4 footprints
    assert lay.vshape == (48, 2, 3) and lay.grid == (2, 4) and lay.phase == 4 and len(lay.pos) == 48
    lay.check()
    x = np.arange(3 * 8 * 12, dtype=np.float64).reshape(3, 8, 12)
    np.testing.assert_array_equal(lay.unpack(lay.pack(x)), x)
    # element (c, h, w) is virtual channel (c, h % 4, w % 4) at (h // 4, w // 4)
    P = lay.positions.reshape(3, 8, 12)
    assert P[2, 5, 7] == lay.pos[(2 * 4 + 1) * 4 + 3] + 1 * lay.hs + 1 * lay.ws
    # phase-major: a ciphertext holds one phase of consecutive channels (8 footprints per 64 slots)
    assert [lay.pos[(c * 4) * 4] for c in range(3)] == [0, 8, 16] and lay.pos[1] == 24
    assert "polyphase k=4" in lay.describe()
    assert Layout.from_dict(lay.to_dict()) == lay
    bad = lay.to_dict()
    bad["pos"] = bad["pos"][:3]
    with pytest.raises(HecError, match="polyphase factor 4 does not fit"):
        Layout.from_dict(bad)
    with pytest.raises(HecError, match="polyphase factor 3 does not divide 8x12"):
        Layout.polyphase((3, 8, 12), 64, 3)
    with pytest.raises(HecError, match="no grid to derive a strided layout"):
        lay.strided((3, 4, 6), 2)


def test_polyphase_is_the_decimation_and_strided_layers_halve_it():
    g = _net(28)  # convs of stride 1, 2, 2
    assert decimation(g)["x"] == 4
    s = STRATEGIES["polyphase"]
    lay = s.input_layout((3, 28, 28), 4096, 1, 4)
    assert lay.phase == 4 and lay.grid == (8, 8)
    assert s.output_layout(lay, (8, 28, 28), 1).phase == 4
    half = s.output_layout(lay, (8, 14, 14), 2)
    assert half.phase == 2 and half.kind == "polyphase"
    assert s.output_layout(half, (16, 7, 7), 2).phase == 1
    # a stride that does not divide the phase, or an output the phase does not divide: phase 1
    assert s.output_layout(lay, (8, 10, 10), 3).phase == 1
    assert s.output_layout(lay, (8, 13, 13), 2).phase == 1
    # a batch or an image the decimation does not divide: the aligned layout
    assert s.input_layout((6, 28, 28), 4096, 2, 4) == STRATEGIES["aligned"].input_layout((6, 28, 28), 4096, 2)
    assert s.input_layout((3, 27, 27), 4096, 1, 4) == STRATEGIES["aligned"].input_layout((3, 27, 27), 4096)
    assert s.input_layout((3, 30, 30), 4096, 1, 4).phase == 2


def test_polyphase_bounded_phases():
    """polyphase:K packs at most K x K phases: on a 96x96 image decimated 4 times, K=2 leaves the
    last strided layer's output compact (phase 1) and needs fewer rotations and products than 4 x 4
    phases; but its diagonals repeat across fewer phase pairs, so it encodes more plaintexts and
    the planner, which tries it, keeps polyphase."""
    g = _net(96, chans=(3, 8, 8, 8))
    assert phase_bounds(g) == [2] and phase_bounds(_net(16, chans=(3, 4))) == []
    s = get_strategy("polyphase:2")
    assert s.name == "polyphase:2" and s.input_layout((3, 96, 96), 4096, 1, 4).phase == 2
    assert s.input_layout((3, 96, 96), 4096, 1, 1).phase == 1  # nothing strided downstream
    x = np.random.default_rng(3).uniform(-1, 1, (1, 3, 96, 96)).astype(np.float32)
    want = np.asarray(hc.run_graph(g, x)[0], np.float64).reshape(-1)
    counts = {}
    for name in ("polyphase", "polyphase:2"):
        prog, low = lower(g, Params(N, BITS, 40, "none"), _primes(), LoweringOptions(layout=name))
        assert low.strategy.name == name
        counts[name] = (prog.op_counts()["rotate"], prog.op_counts()["mul_plain"],
                        sorted({lay.phase for lay in prog.layouts}))
        out, _ = Simulator(prog).run({"x": x})
        got = np.asarray(out[prog.outputs[0].name], np.float64).reshape(-1)
        assert np.abs(got - want).max() <= 1e-6 * np.ptp(want), name
    assert counts["polyphase"][2] == [1, 2, 4] and counts["polyphase:2"][2] == [1, 2], counts
    assert counts["polyphase:2"][0] < counts["polyphase"][0] and counts["polyphase:2"][1] < counts["polyphase"][1]
    best, cands = plan(g, PlanOptions(ring_degrees=(8192,), security="none"))
    mine = {c.layout: c for c in cands if c.params == best.params}
    assert best.layout == "polyphase"
    assert mine["polyphase:2"].cost.plaintexts > mine["polyphase"].cost.plaintexts
    assert mine["polyphase:2"].cost.seconds > mine["polyphase"].cost.seconds
    for bad in ("polyphase:3", "polyphase:1", "polyphase:x", "aligned:2"):
        with pytest.raises(HecError, match=f"--layout '{bad}'"):
            get_strategy(bad)


def test_the_planner_picks_a_phase_bound_and_stops_halving_when_it_gets_slower():
    """Five 8-channel convs on 96x96 (decimation 16): 16 x 16 phases of 6x6 leave 8-channel
    ciphertexts mostly empty; the planner tries K = 8, 4, 2 and keeps K=4 (about 3x faster than
    polyphase); K=2, slower than K=4, ends the halving."""
    g = _net(96, chans=(3, 8, 8, 8, 8, 8))
    assert phase_bounds(g) == [2, 4, 8]
    best, cands = plan(g, PlanOptions(ring_degrees=(8192,), security="none"))
    mine = {c.layout: c.cost.seconds for c in cands if c.params == best.params}
    assert best.layout == "polyphase:4", mine
    assert mine["polyphase:4"] < 0.5 * mine["polyphase"] and mine["polyphase:2"] > mine["polyphase:4"], mine
    assert [c.layout for c in cands if c.layout.startswith("polyphase:")] == ["polyphase:8", "polyphase:4", "polyphase:2"]
    x = np.random.default_rng(4).uniform(-1, 1, (1, 3, 96, 96)).astype(np.float32)
    out, _ = Simulator(best.prog).run({"x": x})
    want = np.asarray(hc.run_graph(g, x)[0], np.float64).reshape(-1)
    got = np.asarray(out[best.prog.outputs[0].name], np.float64).reshape(-1)
    assert np.abs(got - want).max() <= 1e-6 * np.ptp(want)


def test_the_phase_search_stops_at_the_first_bound_slower_than_a_fitting_larger_one(monkeypatch):
    """The halving stops once a bound is slower than the larger one before it (which fit): with
    every layout priced slower the fewer phases it has, polyphase:8 (slower than polyphase, which
    fit) is the last one lowered."""
    import hecompiler.planner as P

    real = P.program_cost

    def priced(prog, cost):
        c = real(prog, cost)
        k = max((lay.phase for lay in prog.layouts), default=1)
        c.seconds = 100.0 / k  # fewer phases: slower
        return c

    monkeypatch.setattr(P, "program_cost", priced)
    g = _net(96, chans=(3, 8, 8, 8, 8, 8))
    best, cands = plan(g, PlanOptions(ring_degrees=(8192,), security="none"))
    assert best.layout == "polyphase"
    assert [c.layout for c in cands if c.layout.startswith("polyphase:")] == ["polyphase:8"]


def test_polyphase_wins_when_channels_span_ciphertexts_and_the_planner_picks_it():
    """A 96x96 image spans 2.25 ciphertexts per channel (like a 224x224 one): after each strided
    layer the multiplexed layouts' taps reach into neighbouring ciphertexts, while the polyphase
    layouts stay dense and every conv is a stride-1 conv of whole-ciphertext blocks."""
    g = _net(96, chans=(3, 8, 8, 8))
    best, cands = plan(g, PlanOptions(ring_degrees=(8192,), security="none"))
    assert best.layout == "polyphase"
    mine = {c.layout: c.cost.op_counts for c in cands if c.params == best.params}
    assert mine["polyphase"]["mul_plain"] < 0.8 * mine["aligned"]["mul_plain"], mine
    assert mine["polyphase"]["rotate"] < mine["aligned"]["rotate"], mine
    lays = [lay for lay in best.prog.layouts if lay.phase > 1]
    assert {lay.phase for lay in lays} == {4, 2}
    x = np.random.default_rng(3).uniform(-1, 1, (1, 3, 96, 96)).astype(np.float32)
    out, _ = Simulator(best.prog).run({"x": x})
    want = np.asarray(hc.run_graph(g, x)[0], np.float64).reshape(-1)
    got = np.asarray(out[best.prog.outputs[0].name], np.float64).reshape(-1)
    assert np.abs(got - want).max() <= 1e-6 * np.ptp(want)


def _residual_net():
    """x -> (3x3 stride-2 conv, 1x1 stride-2 conv) -> Add -> square-ish activation -> 3x3 conv: the
    strided convs' results fill an eighth of the slots, replicated 8 times, and the Add re-plans
    one of them (with the rotations that copied it)."""
    rng = np.random.default_rng(5)
    w = {"wa": rng.uniform(-0.3, 0.3, (8, 4, 3, 3)), "wb": rng.uniform(-0.3, 0.3, (8, 4, 1, 1)),
         "wc": rng.uniform(-0.3, 0.3, (8, 8, 3, 3)), "k": np.float32(0.25)}
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wb"], ["b"], strides=[2, 2]),
             helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("Mul", ["s", "s"], ["q"]),
             helper.make_node("Mul", ["q", "k"], ["m"]),
             helper.make_node("Add", ["m", "s"], ["r"]),
             helper.make_node("Conv", ["r", "wc"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in w.items()])
    m = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    graph = hc.load_onnx(m)
    hc.run_pipeline(graph)
    return graph


def test_replicated_layouts_run_under_seal_and_copy_with_rotations():
    from hecompiler.backends import seal as SB

    g = _residual_net()
    x = np.random.default_rng(6).uniform(-1, 1, (1, 4, 16, 16)).astype(np.float32)
    want = np.asarray(hc.run_graph(g, x)[0], np.float64).reshape(-1)
    progs = {name: lower(g, Params(N, BITS, 40, "none"), _primes(), LoweringOptions(layout=name))[0]
             for name in ("multiplexed", "replicated")}
    prog = progs["replicated"]
    assert prog.layouts[prog.inputs[0].layout].period == 1024  # 4x16x16 in 4096 slots
    assert prog.layouts[prog.outputs[0].layout].period == 512  # 8x8x8 on the 16x16 grid, gap 2
    # each strided conv writes one copy in the input's period; rotating by 512 and adding copies it
    assert [i.step for i in prog.instrs if i.op == "rotate" and i.step == 512] == [512, 512]
    for name, p in progs.items():
        out, _ = Simulator(p).run({"x": x})
        got = np.asarray(out[p.outputs[0].name], np.float64).reshape(-1)
        assert np.abs(got - want).max() <= 1e-6 * np.ptp(want), name
    mux, rep = progs["multiplexed"].op_counts(), prog.op_counts()
    assert rep["mul_plain"] < mux["mul_plain"] and rep["rotate"] < mux["rotate"], (mux, rep)
    outs, _ = SB.run_encrypted(prog, {"x": x})
    got = np.asarray(outs[prog.outputs[0].name], np.float64).reshape(-1)
    assert np.abs(got - want).max() <= 1e-4 * np.ptp(want)
