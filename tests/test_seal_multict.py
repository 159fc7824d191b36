"""SEAL on programs whose tensors span several ciphertexts (N=16384), and ResNet-20 end to end.

A 16x32x32 activation needs two ciphertexts of 8192 slots: its convolutions are block matrices
whose baby-step/giant-step blocks cross ciphertexts, and a depthwise conv over it has all-zero
off-diagonal blocks (channels of one ciphertext never reach the other).  Everything is compared
with onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hecompiler as hc
from hecompiler.backends import seal as SB
from hecompiler.planner import PlanOptions
from hecompiler.plaintexts import PlaintextFactory

from conftest import ort_run


def _wide_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    c, hw = 16, 32

    def init(name, a):
        return numpy_helper.from_array(np.asarray(a, np.float32), name)

    inits = [
        init("w1", rng.normal(0, 0.25, (c, c, 3, 3))), init("b1", rng.normal(0, 0.1, c)),
        init("wd", rng.normal(0, 0.4, (c, 1, 3, 3))), init("bd", rng.normal(0, 0.1, c)),
        init("a", 0.1), init("wg", rng.normal(0, 0.3, (10, c))), init("bg", rng.normal(0, 0.1, 10)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c1", "c1"], ["sq"]),
        helper.make_node("Mul", ["sq", "a"], ["act"]),
        helper.make_node("Conv", ["act", "wd", "bd"], ["dw"], pads=[1, 1, 1, 1], group=c),
        helper.make_node("GlobalAveragePool", ["dw"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["y"], transB=1),
    ]
    g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def wide():
    m = _wide_model()
    res = hc.compile_model(m, hc.CompileOptions(plan=PlanOptions(ring_degrees=(16384,))))
    x = np.random.default_rng(3).uniform(-1, 1, (1, 16, 32, 32)).astype(np.float32)
    return m, res, x


def test_tensors_span_ciphertexts_with_zero_blocks(wide):
    _, res, _ = wide
    prog = res.prog
    assert prog.params.poly_degree == 16384
    assert prog.layouts[prog.inputs[0].layout].n_ct >= 2
    multi = [lo for lo in prog.linears if prog.layouts[lo.in_layout].n_ct >= 2 and prog.layouts[lo.out_layout].n_ct >= 2]
    assert len(multi) >= 2, [lo.note for lo in prog.linears]
    # the depthwise conv: some (out ct, in ct) blocks have no diagonal at all
    pf = PlaintextFactory(prog)
    k = next(i for i, lo in enumerate(prog.linears) if lo.kind == "conv" and lo.params.get("group", 1) > 1)
    lo = prog.linears[k]
    blocks = set(pf.diagonal_keys(k))
    n_in, n_out = prog.layouts[lo.in_layout].n_ct, prog.layouts[lo.out_layout].n_ct
    assert len(blocks) < n_in * n_out  # all-zero blocks are skipped


def test_seal_runs_multi_ciphertext_tensors(wide):
    m, res, x = wide
    ref = ort_run(m, x)[0]
    outs, st = SB.run_encrypted(res.prog, {res.prog.inputs[0].name: x})
    y = outs[res.prog.outputs[0].name]
    err = float(np.abs(y - ref).max() / np.ptp(ref))
    assert err < 1e-4, err
    assert int(np.argmax(y)) == int(np.argmax(ref))
    assert st.op_counts["rotate"] > 0 and st.peak_live_ciphertexts >= 2


@pytest.mark.slow
def test_resnet20_poly_under_seal(models):
    m = models.MODELS["resnet20_poly"]()
    res = hc.compile_model(m)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = ort_run(m, x)[0]
    outs, st = SB.run_encrypted(res.prog, {res.prog.inputs[0].name: x})
    y = outs[res.prog.outputs[0].name]
    err = float(np.abs(y - ref).max() / np.ptp(ref))
    assert err < 1e-3, err
    assert int(np.argmax(y)) == int(np.argmax(ref))
    assert st.refreshes > 0 and st.refresh_round_trips > 0
