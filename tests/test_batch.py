"""Batches in the slots (passes/batch_to_channels.py, channel-major layouts in
hecompiler/layout.py): a model compiled for a batch of B inputs gives, for every input, what
onnxruntime gives for it alone (simulator and real SEAL), its per-image convolutions share their
diagonals across the images, the report gives the amortised cost, and ops the pass cannot stack
are refused naming the node."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import build_models as bm  # noqa: E402  (tests/conftest.py puts models/ on sys.path)
import hecompiler as hc
from hecompiler.backends.sim import Simulator
from hecompiler.errors import HecError
from hecompiler.heprog import Params
from hecompiler.layout import Layout
from hecompiler.lower import lower

sealapi = pytest.importorskip("tenseal.sealapi")

N, BITS = 8192, (60, 40, 40, 40, 40, 60)


def _dynamic(model):
    for io in list(model.graph.input) + list(model.graph.output):
        io.type.tensor_type.shape.dim[0].dim_param = "batch"
    del model.graph.value_info[:]
    return model


@pytest.fixture(scope="module")
def tiny():
    return _dynamic(bm.MODELS["tiny_resnet_poly"]())


def _lowered(model, batch):
    g = hc.load_onnx(model, {"input": (batch, 1, 8, 8)})
    hc.run_pipeline(g, "fold-constants,remove-identity,fold-bn,fuse-gemm,fuse-poly,dce,batch-to-channels")
    primes = tuple(q.value() for q in sealapi.CoeffModulus.Create(N, list(BITS)))[:-1]
    return lower(g, Params(N, BITS, 40, "none"), primes)


def _reference(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


def _close(got, ref, tol):
    got = np.asarray(got, np.float64).reshape(ref.shape)
    assert np.abs(got - ref).max() <= tol * np.ptp(ref), np.abs(got - ref).max()
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).all()


@pytest.mark.parametrize("batch", [2, 5])
def test_every_input_of_a_batch_as_if_alone(tiny, batch):
    prog, low = _lowered(tiny, batch)
    assert prog.inputs[0].shape == (batch, 1, 8, 8) and prog.outputs[0].shape == (batch, 10)
    x = np.random.default_rng(batch).uniform(-1, 1, (batch, 1, 8, 8)).astype(np.float32)
    out, _ = Simulator(prog).run({"input": x})
    _close(out[prog.outputs[0].name], _reference(tiny, x), 1e-6)


def test_the_images_share_the_diagonals(tiny):
    """Every convolution of a batch of 4 applies the diagonals of one image (the weights of the 4
    images are the same, at the same offsets): no more diagonals than at batch 1."""
    one = {s.node: s for s in _lowered(tiny, 1)[1].stats.layers}
    four = {s.node: s for s in _lowered(tiny, 4)[1].stats.layers}
    convs = [k for k, s in one.items() if s.op == "Conv"]
    assert convs
    for k in convs:
        assert four[k].diagonals <= one[k].diagonals, (k, four[k].diagonals, one[k].diagonals)
        assert "4 images channel-major" in four[k].layout_out


@pytest.mark.parametrize("batch", [4, 16])
def test_the_images_share_the_classifiers_diagonals(tiny, batch):
    """batch-to-channels makes the classifier B copies of its 10 x 8 matrix (block diagonal). Its
    outputs go where each image's inputs lie (two rows of 8, shifted apart), so every image's
    block has the same slot differences: 35 products at any batch, where consecutive outputs take
    38 per image (at batch 1 they stay consecutive: 3 fewer products but one more rotation is not
    10% cheaper). The diagonals are the extractor's, and the outputs onnxruntime's."""
    from hecompiler.linear import diag_keys
    from hecompiler.lower import diagonal_blocks, matrix_diagonals

    def classifier(b):
        prog, low = _lowered(tiny, b)
        stat = next(s for s in low.stats.layers if s.op == "Gemm")
        return prog, stat, prog.linears[-1]

    _, one, _ = classifier(1)
    prog, stat, lin = classifier(batch)
    assert one.diagonals == 38 and one.layout_out.startswith("vector")
    assert stat.diagonals == 35
    lin_in, lout = prog.layouts[lin.in_layout], prog.layouts[lin.out_layout]
    w = prog.weights[lin.params["weight"]]
    assert lout.kind == "placed" and diagonal_blocks(w) == batch
    consecutive = diag_keys(lin, prog.weights, lin_in, Layout.vector(10 * batch, lin_in.slots))
    assert sum(len(d) for d in consecutive.values()) == 38 * batch
    made = diag_keys(lin, prog.weights, lin_in, lout)
    mine = matrix_diagonals(w, lin_in.positions, lout.positions, lin_in.slots)
    assert made.keys() == mine.keys() and all(np.array_equal(made[k], mine[k]) for k in made)
    assert sum(len(d) for d in made.values()) == 35
    x = np.random.default_rng(batch).uniform(-1, 1, (batch, 1, 8, 8)).astype(np.float32)
    out, _ = Simulator(prog).run({"input": x})
    _close(out[prog.outputs[0].name], _reference(tiny, x), 1e-6)
    # the placed layout survives the .hec file (the client unpacks the outputs by it); these
    # test parameters are insecure on purpose, which the file must record
    import os
    import tempfile

    from hecompiler.hecfile import load_hec, save_hec

    with tempfile.TemporaryDirectory() as d:
        save_hec(os.path.join(d, "p.hec"), prog, {"insecure_ok": True})
        back, _ = load_hec(os.path.join(d, "p.hec"))
    assert back.layouts[lin.out_layout] == lout


def test_diagonal_blocks_of_a_matrix():
    from hecompiler.lower import diagonal_blocks

    w = np.random.default_rng(0).normal(size=(3, 4))
    assert diagonal_blocks(w) == 1
    assert diagonal_blocks(np.kron(np.eye(6), w)) == 6
    leak = np.kron(np.eye(6), w)
    leak[0, -1] = 1.0  # one entry outside the blocks: not block diagonal at any size
    assert diagonal_blocks(leak) == 1
    assert diagonal_blocks(np.kron(np.eye(2), np.kron(np.eye(3), w))) == 6


def test_batch_layouts_are_channel_major_and_round_trip():
    lay = Layout.compact((6, 2, 2), 64, batch=3)  # 3 images of 2 channels: image b channel c is ch 2b + c
    # channel c of image b sits where channel c*3 + b of a plain compact layout would
    assert list(lay.pos) == [(c * 3 + b) * 4 for b in range(3) for c in range(2)]
    assert Layout.from_dict(lay.to_dict()) == lay
    mux = Layout.compact((16, 4, 4), 256, batch=2).strided((16, 2, 2), 2)  # 4 channels share a footprint
    assert mux.batch == 2 and mux.per_fp == 4
    # image 0's channels 0-3 on footprint 0, image 1's on footprint 1, image 0's 4-7 on footprint 2
    fp = [p // 16 for p in mux.pos]
    assert fp == [0, 0, 0, 0, 2, 2, 2, 2, 1, 1, 1, 1, 3, 3, 3, 3]


def test_a_batch_runs_under_seal_and_the_report_amortises(tiny):
    from hecompiler.backends import seal as SB
    from hecompiler.compiler import CompileOptions, compile_model

    res = compile_model(tiny, CompileOptions(input_shapes={"input": (4, 1, 8, 8)}))
    r = res.metadata["report"]
    assert r["batch"] == 4 and r["predicted_seconds_per_input"] == pytest.approx(r["predicted_seconds"] / 4, rel=1e-3)
    assert "batch: 4 inputs per inference" in res.report_text
    x = np.random.default_rng(9).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    outs, _ = SB.run_encrypted(res.prog, {"input": x})
    _close(outs[res.prog.outputs[0].name], _reference(tiny, x), 1e-3)


def test_ops_a_batch_cannot_stack_are_refused():
    w = np.full((2, 1, 3, 3), 0.1, np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "a"], ["y"], axis=1, name="cat")]
    g = helper.make_graph(nodes, "b", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4, 4, 4])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    graph = hc.load_onnx(m)
    with pytest.raises(HecError, match=r"node .*cat.*: Concat on a batch of 3 is not supported yet"):
        hc.run_pipeline(graph, "batch-to-channels")
