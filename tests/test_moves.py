"""Data movement under encryption (hecompiler/lower_moves.py and the lowering's layout
conversions): Transpose, standalone Pad, Concat, ReduceSum/ReduceMean, Reshape between any
shapes, Gemm with a run-time C, and element-wise ops on operands in different layouts, each
lowered, run in the simulator and compared with onnxruntime on the original model; one model
under real SEAL encryption; the refusals name the node."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import hecompiler as hc
from hecompiler.backends.sim import Simulator
from hecompiler.errors import HecError
from hecompiler.heprog import Params
from hecompiler.lower import lower

sealapi = pytest.importorskip("tenseal.sealapi")

N, BITS = 8192, (60, 40, 40, 40, 40, 60)
RNG = np.random.default_rng(3)


def _w(*shape):
    return RNG.uniform(-0.5, 0.5, shape).astype(np.float32)


def _model(nodes, inputs, output, inits, opset=17):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    inits = [numpy_helper.from_array(a, n) for n, a in inits.items()]
    ops = [helper.make_opsetid("", opset)]
    # the output's shape from ONNX's own shape inference
    probe = helper.make_model(helper.make_graph(nodes, "moves", vi, [], inits), opset_imports=ops)
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(probe).graph.value_info}
    g = helper.make_graph(nodes, "moves", vi, [inferred[output]], inits)
    return helper.make_model(g, opset_imports=ops)


def _primes():
    return tuple(q.value() for q in sealapi.CoeffModulus.Create(N, list(BITS)))[:-1]


def _run(model, feeds):
    """(simulated HE output, onnxruntime output, program, lowering); test parameters (five levels at
    N=8192: not 128-bit secure, which SEAL is told)."""
    g = hc.load_onnx(model)
    hc.run_pipeline(g)
    prog, low = lower(g, Params(N, BITS, 40, "none"), _primes())
    out, _ = Simulator(prog).run(feeds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, feeds)[0]
    return np.asarray(out[prog.outputs[0].name]), ref, prog, low


def _close(got, ref, tol=1e-6):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.size == ref.size, (got.shape, ref.shape)
    got = got.reshape(ref.shape)
    assert np.abs(got - ref).max() <= tol * max(np.ptp(ref), 1e-3), np.abs(got - ref).max()


def _x(*shape):
    return RNG.uniform(-1, 1, shape).astype(np.float32)


def _conv(name, x, w, y, stride=1, pad=1):
    return helper.make_node("Conv", [x, w], [y], name=name, strides=[stride, stride], pads=[pad] * 4)


# ---------------------------------------------------------------------------- single-operand moves

@pytest.mark.parametrize("perm", [[0, 1, 3, 2], [0, 2, 3, 1], [0, 3, 1, 2]])
def test_transpose_of_a_gapped_tensor(perm):
    """A stride-2 conv leaves a gapped layout; the transpose reads it and a conv follows."""
    shape = [1, 4, 4, 4]
    out_c = [shape[p] for p in perm][1]
    nodes = [_conv("c1", "x", "w1", "a", stride=2), helper.make_node("Transpose", ["a"], ["t"], perm=perm),
             _conv("c2", "t", "w2", "y")]
    m = _model(nodes, [("x", [1, 2, 8, 8])], "y", {"w1": _w(4, 2, 3, 3), "w2": _w(3, out_c, 3, 3)})
    x = _x(1, 2, 8, 8)
    got, ref, prog, low = _run(m, {"x": x})
    _close(got, ref)
    assert any(lin.kind == "sparse" for lin in prog.linears)


@pytest.mark.parametrize("pads, value", [([0, 0, 1, 2, 0, 0, 2, 1], 0.0), ([0, 1, 1, 0, 0, 2, 0, 1], 0.5)])
def test_standalone_pad(pads, value):
    """A Pad no convolution absorbs (the result is squared, then pooled): zeros, or a constant as the
    op's bias; pads on channels too."""
    nodes = [_conv("c1", "x", "w1", "a"),
             helper.make_node("Pad", ["a", "pads", "v"], ["p"], mode="constant"),
             helper.make_node("Mul", ["p", "p"], ["q"]),
             helper.make_node("AveragePool", ["q"], ["y"], kernel_shape=[2, 2], strides=[1, 1])]
    m = _model(nodes, [("x", [1, 2, 5, 5])], "y", {"w1": _w(3, 2, 3, 3), "pads": np.array(pads, np.int64),
                                                    "v": np.array(value, np.float32)})
    got, ref, _, _ = _run(m, {"x": _x(1, 2, 5, 5)})
    _close(got, ref)


@pytest.mark.parametrize("stride, conversions", [(1, 0), (2, 1)])
def test_reshape_between_image_shapes(stride, conversions):
    """From a compact layout the elements already sit where the new shape's compact layout wants
    them (free); from a strided conv's gapped layout they are moved (one conversion)."""
    nodes = [_conv("c1", "x", "w1", "a", stride=stride), helper.make_node("Reshape", ["a", "s"], ["r"]),
             _conv("c2", "r", "w2", "y")]
    side = 4 * stride
    m = _model(nodes, [("x", [1, 2, side, side])], "y", {"w1": _w(4, 2, 3, 3), "s": np.array([1, 16, 2, 2], np.int64),
                                                          "w2": _w(2, 16, 3, 3)})
    got, ref, prog, low = _run(m, {"x": _x(1, 2, side, side)})
    _close(got, ref)
    assert low.stats.conversions == conversions


@pytest.mark.parametrize("op, axes, keepdims", [("ReduceSum", [1], 1), ("ReduceSum", [2, 3], 0),
                                                 ("ReduceSum", [1, 3], 1), ("ReduceMean", [1], 0),
                                                 ("ReduceMean", [3], 1)])
def test_reductions(op, axes, keepdims):
    nodes = [_conv("c1", "x", "w1", "a"), helper.make_node(op, ["a", "axes"], ["y"], keepdims=keepdims)]
    m = _model(nodes, [("x", [1, 2, 4, 6])], "y", {"w1": _w(3, 2, 3, 3), "axes": np.array(axes, np.int64)},
               opset=18)
    got, ref, _, _ = _run(m, {"x": _x(1, 2, 4, 6)})
    _close(got, ref)


# ---------------------------------------------------------------------------- several operands

@pytest.mark.parametrize("axis", [1, 2, 3])
def test_concat_of_two_branches_and_a_constant(axis):
    """Two conv branches (one strided: another layout) and a constant, concatenated, then a conv."""
    k = np.full([1, 2, 4, 4], 0.25, np.float32)
    k[0, 1] = -0.5
    nodes = [_conv("c1", "x", "w1", "a", stride=2), _conv("c2", "x", "w2", "b", stride=2, pad=1),
             helper.make_node("Concat", ["a", "k", "b"], ["cat"], axis=axis),
             _conv("c3", "cat", "w3", "y")]
    shape = [1, 2, 4, 4]
    shape[axis] *= 3
    m = _model(nodes, [("x", [1, 2, 8, 8])], "y", {"w1": _w(2, 2, 3, 3), "w2": _w(2, 2, 3, 3), "k": k,
                                                    "w3": _w(2, shape[1], 3, 3)})
    got, ref, _, _ = _run(m, {"x": _x(1, 2, 8, 8)})
    _close(got, ref)


def test_add_and_mul_across_layouts():
    """A strided conv's gapped result times a second input in the compact layout (one operand is
    converted), plus the conv's result again.  (An Add alone needs no conversion: the conv writes
    its result in the layout of the Add's other operand.)"""
    nodes = [_conv("c1", "x", "w1", "a", stride=2), helper.make_node("Mul", ["a", "z"], ["s"]),
             helper.make_node("Add", ["s", "a"], ["y"])]
    m = _model(nodes, [("x", [1, 2, 8, 8]), ("z", [1, 3, 4, 4])], "y", {"w1": _w(3, 2, 3, 3)})
    got, ref, _, low = _run(m, {"x": _x(1, 2, 8, 8), "z": _x(1, 3, 4, 4)})
    _close(got, ref)
    assert low.stats.conversions >= 1


def test_gemm_with_a_run_time_bias():
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "b1"], ["c"], transB=1),
             helper.make_node("Gemm", ["f", "b2", "c"], ["y"], transB=1, beta=0.5)]
    m = _model(nodes, [("x", [1, 2, 3, 3])], "y", {"b1": _w(5, 18), "b2": _w(5, 18)})
    got, ref, _, _ = _run(m, {"x": _x(1, 2, 3, 3)})
    _close(got, ref)


def test_concat_runs_under_seal():
    from hecompiler.backends import seal as SB

    nodes = [_conv("c1", "x", "w1", "a", stride=2), _conv("c2", "x", "w2", "b"),
             helper.make_node("AveragePool", ["b"], ["bp"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Concat", ["a", "bp"], ["cat"], axis=1),
             helper.make_node("Transpose", ["cat"], ["y"], perm=[0, 1, 3, 2])]
    m = _model(nodes, [("x", [1, 2, 8, 8])], "y", {"w1": _w(2, 2, 3, 3), "w2": _w(3, 2, 3, 3)})
    x = _x(1, 2, 8, 8)
    sim, ref, prog, _ = _run(m, {"x": x})
    outs, _ = SB.run_encrypted(prog, {"x": x})
    _close(outs[prog.outputs[0].name], ref, tol=1e-4)


# ---------------------------------------------------------------------------- refusals

def test_refusals_name_the_node():
    nodes = [_conv("c1", "x", "w1", "a"), helper.make_node("Transpose", ["a"], ["y"], perm=[1, 0, 2, 3],
                                                           name="swap_batch")]
    m = _model(nodes, [("x", [1, 2, 4, 4])], "y", {"w1": _w(3, 2, 3, 3)})
    g = hc.load_onnx(m)
    hc.run_pipeline(g)
    with pytest.raises(HecError, match=r"swap_batch.*batch"):
        lower(g, Params(N, BITS, 40), _primes())
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "b", "c"], ["y"], name="g1")]
    m = _model(nodes, [("x", [1, 2, 2, 2]), ("c", [1, 1])], "y", {"b": _w(8, 3)})
    with pytest.raises(HecError, match=r"g1.*run-time C of shape \[1, 1\]"):
        hc.load_onnx(m)


def test_sparse_ops_round_trip_through_hec_and_bad_ones_are_refused(tmp_path):
    from hecompiler.hecfile import load_hec, save_hec

    nodes = [_conv("c1", "x", "w1", "a", stride=2), helper.make_node("Transpose", ["a"], ["y"], perm=[0, 1, 3, 2])]
    m = _model(nodes, [("x", [1, 2, 8, 8])], "y", {"w1": _w(2, 2, 3, 3)})
    x = _x(1, 2, 8, 8)
    got, ref, prog, _ = _run(m, {"x": x})
    save_hec(tmp_path / "t.hec", prog, {"insecure_ok": True})
    back, _ = load_hec(tmp_path / "t.hec")
    out, _ = Simulator(back).run({"x": x})
    np.testing.assert_allclose(out["y"], got, atol=1e-12)
    sparse = next(lin for lin in prog.linears if lin.kind == "sparse")
    name = sparse.params["weight"]
    for bad, why in ((lambda t: t[0].__setitem__(0, 10**6), "rows must be integers in"),
                     (lambda t: t[1].__setitem__(0, 0.5), "rows must be integers in"),
                     (lambda t: t.resize((2, t.shape[1]), refcheck=False), "expected \\[3, nnz\\]")):
        trip = np.array(prog.weights[name])
        bad(trip)
        prog.weights[name] = trip
        with pytest.raises(HecError, match=r"bad.hec: cannot save: the program is invalid: linear #\d+ \(sparse, y\): "
                                           r"weight 'y.moves'.*" + why):
            save_hec(tmp_path / "bad.hec", prog, {"insecure_ok": True})
        prog.weights[name] = back.weights[name]
