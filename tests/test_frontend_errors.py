"""The ONNX frontend on bad input, and its compile-time folding.

Every bad input must raise a :class:`hecompiler.HecError` (so the CLI prints one
line and exits non-zero) whose message names the file, node or field at
fault.  Models are built with ``onnx.helper`` at opset 17 unless a test is
about the opset.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import hecompiler as hc
from hecompiler.errors import FrontendError, UnsupportedError

OPSET = 17


# --------------------------------------------------------------------------- helpers

def vi(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def const(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def make_model(nodes, inputs, outputs, inits=(), opset: int = OPSET, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
                              producer_name="test")
    model.ir_version = 8
    return model


def relu_model(in_shape=(1, 1, 8, 8), out_shape=None, opset: int = OPSET, elem=TensorProto.FLOAT):
    out_shape = in_shape if out_shape is None else out_shape
    return make_model([helper.make_node("Relu", ["input"], ["y"], name="relu")], [vi("input", in_shape, elem)],
                      [vi("y", out_shape, elem)], opset=opset)


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


def test_error_hierarchy():
    assert issubclass(FrontendError, hc.HecError)
    assert issubclass(UnsupportedError, FrontendError)


# --------------------------------------------------------------------------- files

def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "no_such_dir" / "model.onnx"
    with pytest.raises(FrontendError, match=r"no_such_dir[/\\]model\.onnx: no such file"):
        hc.load_onnx(path)
    with pytest.raises(FrontendError, match=r"model\.onnx: no such file"):
        hc.load_onnx(str(path))


@pytest.mark.parametrize("content", [
    np.random.default_rng(0).bytes(300),
    np.random.default_rng(1).bytes(4096),
    b"\xff\xfe\x00garbage\x00\x01",
    b"this is a text file, not an ONNX model\n",
    b"",
], ids=["random300", "random4k", "garbage", "text", "empty"])
def test_not_an_onnx_file(tmp_path, content):
    path = tmp_path / "junk.onnx"
    path.write_bytes(content)
    # either protobuf cannot parse it, or it parses to something the checker refuses
    with pytest.raises(FrontendError, match=r"junk\.onnx: (not a readable ONNX model|invalid ONNX model)"):
        hc.load_onnx(path)


def test_checker_failure_names_the_file_and_node(tmp_path):
    model = make_model([helper.make_node("Relu", ["nothere"], ["y"], name="relu1")], [vi("input", (1, 1, 8, 8))],
                       [vi("y", (1, 1, 8, 8))])
    with pytest.raises(FrontendError, match=r"^<model>: invalid ONNX model: .*'nothere'.*relu1") as ei:
        hc.load_onnx(model)
    assert "\n" not in str(ei.value)  # one line, the node included
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(FrontendError, match=r"bad\.onnx: invalid ONNX model: .*relu1"):
        hc.load_onnx(path)


def test_checker_failure_duplicate_attribute():
    model = relu_model()
    model.graph.node[0].attribute.extend([helper.make_attribute("alpha", 1.0), helper.make_attribute("alpha", 2.0)])
    with pytest.raises(FrontendError, match=r"invalid ONNX model"):
        hc.load_onnx(model)


def test_good_file_loads(tmp_path):
    path = tmp_path / "ok.onnx"
    onnx.save(relu_model(), path)
    g = hc.load_onnx(path)
    assert [n.op for n in g.nodes] == ["Relu"]


# --------------------------------------------------------------------------- opsets and ops

@pytest.mark.parametrize("opset, hint", [(12, 13), (26, 25), (7, 13)])
def test_unsupported_opset(opset, hint):
    with pytest.raises(UnsupportedError, match=rf"opset {opset} is not supported \(supported: 13 to 25\); "
                                               rf"re-export with opset_version={hint}"):
        hc.load_onnx(relu_model(opset=opset))


@pytest.mark.parametrize("opset", [13, 17, 21, 22, 23, 24, 25])
def test_supported_opsets(opset):
    assert [n.op for n in hc.load_onnx(relu_model(opset=opset)).nodes] == ["Relu"]


def test_no_default_domain_opset():
    model = relu_model()
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("com.acme", 1))
    # the checker refuses it first, naming the node that needs the default domain
    with pytest.raises(FrontendError, match=r"invalid ONNX model: No opset import for domain ''.*relu"):
        hc.load_onnx(model)


def test_unsupported_op_softmax():
    model = make_model([helper.make_node("Softmax", ["input"], ["y"], name="head_softmax", axis=1)],
                       [vi("input", (1, 10))], [vi("y", (1, 10))])
    with pytest.raises(UnsupportedError, match=r"node 'head_softmax' \(Softmax, opset 17\): op Softmax on run-time "
                                               r"tensors is not supported; supported: .*Conv.*Relu") as ei:
        hc.load_onnx(model)
    assert "folded" in str(ei.value)  # says what is supported for constants too


def test_unsupported_op_lstm():
    h, i = 4, 3
    rng = np.random.default_rng(0)
    inits = [const("W", rng.standard_normal((1, 4 * h, i)).astype(np.float32)),
             const("R", rng.standard_normal((1, 4 * h, h)).astype(np.float32))]
    node = helper.make_node("LSTM", ["input", "W", "R"], ["y"], name="lstm_0", hidden_size=h)
    model = make_model([node], [vi("input", (1, 1, i))], [vi("y", (1, 1, 1, h))], inits)
    with pytest.raises(UnsupportedError, match=r"node 'lstm_0' \(LSTM, opset 17\): op LSTM on run-time tensors is "
                                               r"not supported; supported: "):
        hc.load_onnx(model)


def test_unnamed_unsupported_node_is_named_by_its_output():
    model = make_model([helper.make_node("Sigmoid", ["input"], ["sig_out"])], [vi("input", (1, 4))],
                       [vi("sig_out", (1, 4))])
    with pytest.raises(UnsupportedError, match=r"node 'sig_out' \(Sigmoid, opset 17\)"):
        hc.load_onnx(model)


def test_unsupported_op_on_constants_is_folded():
    """An op without a lifter is fine when all its inputs are compile-time."""
    logits = np.array([[1.0, 2.0, 3.0]], np.float32)
    nodes = [helper.make_node("Softmax", ["logits"], ["p"], name="sm", axis=1),
             helper.make_node("Mul", ["input", "p"], ["y"], name="mul")]
    model = make_model(nodes, [vi("input", (1, 3))], [vi("y", (1, 3))], [const("logits", logits)])
    g = hc.load_onnx(model)
    assert [n.op for n in g.nodes] == ["Mul"]
    x = np.array([[1.0, -1.0, 2.0]], np.float32)
    assert rel_err(hc.run_graph(g, x)[0], ort_run(model, {"input": x})[0]) <= 1e-6


def test_custom_domain_op():
    node = helper.make_node("FancyAct", ["input"], ["y"], name="fancy", domain="com.acme")
    model = make_model([node], [vi("input", (1, 1, 8, 8))], [vi("y", (1, 1, 8, 8))],
                       extra_opsets=[helper.make_opsetid("com.acme", 1)])
    with pytest.raises(UnsupportedError, match=r"node 'fancy' \(FancyAct, opset 17\): custom domain 'com\.acme' "
                                               r"is not supported"):
        hc.load_onnx(model)


# --------------------------------------------------------------------------- input shapes and types

def test_dynamic_non_batch_dim():
    model = relu_model(("N", 3, "height", 8))
    with pytest.raises(FrontendError, match=r"input 'input' dim 2 is dynamic \('height'\).*"
                                            r"--input-shape input=1,3,N,8"):
        hc.load_onnx(model)


def test_dynamic_dim_without_name():
    model = relu_model((1, 3, 8, 8))
    model.graph.input[0].type.tensor_type.shape.dim[3].Clear()  # neither dim_value nor dim_param
    model.graph.output[0].type.tensor_type.shape.dim[3].Clear()
    with pytest.raises(FrontendError, match=r"input 'input' dim 3 is dynamic.*--input-shape"):
        hc.load_onnx(model)


def test_input_without_shape():
    # onnx.checker (run first) wants a shape on every graph input; the message names the field
    model = relu_model()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(FrontendError, match=r"^<model>: invalid ONNX model: Field 'shape' of 'type' is required"):
        hc.load_onnx(model)


def test_symbolic_batch_becomes_one():
    g = hc.load_onnx(relu_model(("batch", 1, 8, 8)))
    assert g.inputs[0].name == "input" and g.inputs[0].shape == (1, 1, 8, 8)
    assert g.outputs[0].shape == (1, 1, 8, 8)


def test_input_shapes_fix_a_dynamic_model():
    model = relu_model(("N", "C", "H", "W"))
    g = hc.load_onnx(model, input_shapes={"input": (1, 1, 8, 8)})
    assert g.inputs[0].shape == (1, 1, 8, 8) and g.outputs[0].shape == (1, 1, 8, 8)
    g = hc.load_onnx(model, input_shapes={"input": [1, 3, 5, 7]})
    assert g.inputs[0].shape == (1, 3, 5, 7)


def test_input_shapes_wrong_rank():
    with pytest.raises(FrontendError, match=r"--input-shape for 'input' has rank 3, the model says rank 4"):
        hc.load_onnx(relu_model(("N", "C", "H", "W")), input_shapes={"input": (1, 8, 8)})


def test_input_shapes_contradict_a_fixed_dim():
    with pytest.raises(FrontendError, match=r"--input-shape for 'input' dim 1 is 2, the model fixes it to 1"):
        hc.load_onnx(relu_model(("N", 1, 8, 8)), input_shapes={"input": (1, 2, 8, 8)})


def test_input_shapes_unknown_input_name():
    with pytest.raises(FrontendError, match=r"--input-shape names unknown input\(s\) \['image'\]; "
                                            r"model inputs: \['input'\]"):
        hc.load_onnx(relu_model(("N", 1, 8, 8)), input_shapes={"image": (1, 1, 8, 8)})


def test_a_batch_is_imported_as_it_stands():
    """A batch of inputs (fixed, or given for a symbolic batch axis) reaches the IR; the compile
    driver stacks it (batch-to-channels, tests/test_batch.py)."""
    assert hc.load_onnx(relu_model((2, 1, 8, 8))).inputs[0].type.shape == (2, 1, 8, 8)
    assert hc.load_onnx(relu_model(("N", 1, 8, 8)), input_shapes={"input": (3, 1, 8, 8)}).inputs[0].type.shape \
        == (3, 1, 8, 8)


@pytest.mark.parametrize("elem, name", [(TensorProto.INT64, "INT64"), (TensorProto.INT32, "INT32"),
                                        (TensorProto.BOOL, "BOOL")])
def test_integer_input_is_refused(elem, name):
    model = make_model([helper.make_node("Identity", ["input"], ["y"])], [vi("input", (1, 4), elem)],
                       [vi("y", (1, 4), elem)])
    with pytest.raises(UnsupportedError, match=rf"input 'input' has element type {name}; only float inputs"):
        hc.load_onnx(model)


def test_model_without_runtime_inputs():
    model = make_model([helper.make_node("Relu", ["k"], ["y"])], [], [vi("y", (3,))], [const("k", np.ones(3, np.float32))])
    with pytest.raises(FrontendError, match=r"no run-time inputs"):
        hc.load_onnx(model)


# --------------------------------------------------------------------------- unsupported attributes / forms

def test_batchnorm_training_mode():
    c = 2
    inits = [const("s", np.ones(c, np.float32)), const("b", np.zeros(c, np.float32)),
             const("m", np.zeros(c, np.float32)), const("v", np.ones(c, np.float32))]
    node = helper.make_node("BatchNormalization", ["input", "s", "b", "m", "v"], ["y", "run_mean", "run_var"],
                            name="bn1", training_mode=1)
    model = make_model([node], [vi("input", (1, c, 4, 4))], [vi("y", (1, c, 4, 4))], inits)
    with pytest.raises(UnsupportedError, match=r"node 'bn1' \(BatchNormalization, opset 17\): training_mode=1 is "
                                               r"not supported"):
        hc.load_onnx(model)


def test_dropout_training_mode():
    node = helper.make_node("Dropout", ["input", "ratio", "train"], ["y"], name="drop")
    model = make_model([node], [vi("input", (1, 4))], [vi("y", (1, 4))],
                       [const("ratio", np.array(0.5, np.float32)), const("train", np.array(True))])
    with pytest.raises(UnsupportedError, match=r"node 'drop' \(Dropout, opset 17\): training_mode"):
        hc.load_onnx(model)


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_pad_non_constant_mode(mode):
    node = helper.make_node("Pad", ["input", "pads"], ["y"], name="pad_r", mode=mode)
    model = make_model([node], [vi("input", (1, 1, 8, 8))], [vi("y", (1, 1, 10, 10))],
                       [const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    with pytest.raises(UnsupportedError, match=rf"node 'pad_r' \(Pad, opset 17\): mode='{mode}' is not supported "
                                               r"\(only 'constant'\)"):
        hc.load_onnx(model)


def test_pad_negative_pads():
    node = helper.make_node("Pad", ["input", "pads"], ["y"], name="crop")
    model = make_model([node], [vi("input", (1, 1, 8, 8))], [vi("y", (1, 1, 6, 6))],
                       [const("pads", np.array([0, 0, -1, -1, 0, 0, -1, -1], np.int64))])
    with pytest.raises(UnsupportedError, match=r"node 'crop' \(Pad, opset 17\): negative pads"):
        hc.load_onnx(model)


def test_reshape_with_a_runtime_shape():
    """A shape computed from the encrypted data cannot be static: refused at
    the first node that would turn data into an int shape."""
    nodes = [helper.make_node("ReduceSum", ["input"], ["total"], name="total", keepdims=0),
             helper.make_node("Cast", ["total"], ["n"], name="to_int", to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["n", "ax"], ["shape"], name="unsq"),
             helper.make_node("Reshape", ["input", "shape"], ["y"], name="reshape")]
    model = make_model(nodes, [vi("input", (1, 1, 8, 8))], [vi("y", ("n",))],
                       [const("ax", np.array([0], np.int64))])
    with pytest.raises(UnsupportedError, match=r"node 'to_int' \(Cast, opset 17\): casting a run-time tensor "
                                               r"f32\[\] to i64 is not supported"):
        hc.load_onnx(model)


def test_reshape_shape_from_a_float_input():
    """A Reshape whose shape is a (float) graph input: ONNX type checking refuses it, naming the node."""
    node = helper.make_node("Reshape", ["input", "shape"], ["y"], name="reshape_dyn")
    model = make_model([node], [vi("input", (1, 1, 8, 8)), vi("shape", (1, 2))], [vi("y", ("a", "b"))])
    with pytest.raises(FrontendError, match=r"reshape_dyn"):
        hc.load_onnx(model)


def test_conv_1d_refused():
    node = helper.make_node("Conv", ["input", "w"], ["y"], name="conv1d", kernel_shape=[3])
    model = make_model([node], [vi("input", (1, 2, 16))], [vi("y", (1, 4, 14))],
                       [const("w", np.ones((4, 2, 3), np.float32))])
    with pytest.raises(UnsupportedError, match=r"node 'conv1d' \(Conv, opset 17\): only 2-D convolutions "
                                               r"\(4-D NCHW input\) are supported, input is f32\[1,2,16\]"):
        hc.load_onnx(model)


def test_maxpool_1d_refused():
    node = helper.make_node("MaxPool", ["input"], ["y"], name="pool1d", kernel_shape=[2])
    model = make_model([node], [vi("input", (1, 2, 16))], [vi("y", (1, 2, 15))])
    with pytest.raises(UnsupportedError, match=r"node 'pool1d' \(MaxPool, opset 17\): only 2-D pooling"):
        hc.load_onnx(model)


def test_graph_output_that_is_a_constant():
    nodes = [helper.make_node("Relu", ["input"], ["y"], name="relu"),
             helper.make_node("Constant", [], ["bias_out"], name="k", value=const("v", np.ones(3, np.float32)))]
    model = make_model(nodes, [vi("input", (1, 3))], [vi("y", (1, 3)), vi("bias_out", (3,))])
    with pytest.raises(UnsupportedError, match=r"output 'bias_out' does not depend on the input \(it is a constant\)"):
        hc.load_onnx(model)


def test_graph_output_that_is_an_initializer():
    model = make_model([helper.make_node("Relu", ["input"], ["y"])], [vi("input", (1, 3))],
                       [vi("y", (1, 3)), vi("w_out", (3,))], [const("w_out", np.ones(3, np.float32))])
    with pytest.raises(UnsupportedError, match=r"output 'w_out' does not depend on the input"):
        hc.load_onnx(model)


def test_used_second_output_refused():
    """Only the first output of a lifted op exists in the IR; using another is an error naming it."""
    nodes = [helper.make_node("Dropout", ["input"], ["y", "mask"], name="drop"),
             helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["y", "maskf"], ["z"])]
    model = make_model(nodes, [vi("input", (1, 4))], [vi("z", (1, 4))])
    with pytest.raises(UnsupportedError, match=r"node 'drop' \(Dropout, opset 17\): output 'mask' is used"):
        hc.load_onnx(model)


# --------------------------------------------------------------------------- compile-time folding

def _dirac_model(c: int = 3, seed: int = 0) -> onnx.ModelProto:
    """A DiracNet conv: weight = a * I + b * W / ||W|| (per output channel), computed in the graph."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
    eye = np.zeros((c, c, 3, 3), np.float32)
    eye[np.arange(c), np.arange(c), 1, 1] = 1.0
    a = rng.uniform(0.5, 1.5, (c, 1, 1, 1)).astype(np.float32)
    b = rng.uniform(0.1, 0.5, (c, 1, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("ReduceSumSquare", ["W"], ["sumsq"], name="sumsq", axes=[1, 2, 3], keepdims=1),
             helper.make_node("Sqrt", ["sumsq"], ["norm"], name="norm"),
             helper.make_node("Div", ["W", "norm"], ["w_unit"], name="normalize"),
             helper.make_node("Mul", ["b", "w_unit"], ["bw"], name="scale_w"),
             helper.make_node("Mul", ["a", "I"], ["ai"], name="scale_i"),
             helper.make_node("Add", ["ai", "bw"], ["w_dirac"], name="dirac"),
             helper.make_node("Conv", ["input", "w_dirac"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w_dirac"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [const("W", w), const("I", eye), const("a", a), const("b", b)]
    return make_model(nodes, [vi("input", (1, c, 8, 8))], [vi("y", (1, c, 8, 8))], inits)


def test_dirac_parameterised_weight_folds_to_one_constant():
    model = _dirac_model()
    g = hc.load_onnx(model)
    ops = [n.op for n in g.nodes]
    assert ops == ["Conv", "Conv"]
    assert not {"Mul", "Div", "Add", "Sqrt", "ReduceSumSquare"} & set(ops)
    # both convs share the one folded weight constant
    weights = {id(n.inputs[1]) for n in g.nodes}
    assert len(weights) == 1 and g.nodes[0].inputs[1].is_constant
    assert g.nodes[0].inputs[1].shape == (3, 3, 3, 3)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = ort_run(model, {"input": x})[0]
    assert rel_err(hc.run_graph(g, x)[0], ref) <= 1e-5
    assert rel_err(ort_run(hc.to_onnx(g), {"input": x})[0], ref) <= 1e-5


def test_torch_style_shape_chain_folds_to_static_reshape():
    """x.view(x.size(0), -1) as torch exports it."""
    nodes = [helper.make_node("Shape", ["input"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
             helper.make_node("Concat", ["n1", "minus_one"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["input", "target"], ["y"], name="view")]
    inits = [const("zero", np.array(0, np.int64)), const("axes0", np.array([0], np.int64)),
             const("minus_one", np.array([-1], np.int64))]
    model = make_model(nodes, [vi("input", ("batch", 3, 4, 5))], [vi("y", ("batch", 60))],
                       inits)
    g = hc.load_onnx(model)
    assert [n.op for n in g.nodes] == ["Reshape"]
    assert g.nodes[0].attrs["shape"] == (1, 60)
    assert g.outputs[0].shape == (1, 60)
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(hc.run_graph(g, x)[0], ort_run(model, {"input": x})[0])


def test_cast_chain_on_constants_folds():
    nodes = [helper.make_node("Cast", ["k"], ["k64"], name="c1", to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["k64"], ["k32"], name="c2", to=TensorProto.FLOAT),
             helper.make_node("Add", ["input", "k32"], ["y"], name="add")]
    model = make_model(nodes, [vi("input", (1, 3, 2, 2))], [vi("y", (1, 3, 2, 2))],
                       [const("k", np.array([1, 2, 3], np.int64).reshape(3, 1, 1))])
    g = hc.load_onnx(model)
    assert [n.op for n in g.nodes] == ["Add"]
    k = g.nodes[0].inputs[1]
    assert k.is_constant and k.type.dtype == "f32"
    np.testing.assert_array_equal(k.data.ravel(), [1.0, 2.0, 3.0])
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(hc.run_graph(g, x)[0], ort_run(model, {"input": x})[0], rtol=1e-6)


def test_cast_of_runtime_tensor_to_same_type_is_identity():
    model = make_model([helper.make_node("Cast", ["input"], ["y"], name="noop_cast", to=TensorProto.FLOAT)],
                       [vi("input", (1, 3))], [vi("y", (1, 3))])
    assert [n.op for n in hc.load_onnx(model).nodes] == ["Identity"]


def test_constant_node_folds():
    nodes = [helper.make_node("Constant", [], ["scale"], name="k", value=const("v", np.full((1,), 2.5, np.float32))),
             helper.make_node("Constant", [], ["offset"], name="k2", value_float=-1.0),
             helper.make_node("Mul", ["input", "scale"], ["t"], name="mul"),
             helper.make_node("Add", ["t", "offset"], ["y"], name="add")]
    model = make_model(nodes, [vi("input", (1, 4))], [vi("y", (1, 4))])
    g = hc.load_onnx(model)
    assert [n.op for n in g.nodes] == ["Mul", "Add"]
    assert all(n.inputs[1].is_constant for n in g.nodes)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    np.testing.assert_allclose(hc.run_graph(g, x)[0], x * 2.5 - 1.0)
