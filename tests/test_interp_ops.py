"""Property tests of the ONNX frontend, the reference interpreter and the ONNX
exporter, one op at a time.

Each test builds a single-op ONNX model (opset 17) with ``onnx.helper`` from
hypothesis-drawn parameters, imports it with :func:`hecompiler.load_onnx`,
and checks that both

* the reference interpreter (:func:`hecompiler.run_graph`) and
* the re-exported model (:func:`hecompiler.to_onnx`) run in onnxruntime

agree with onnxruntime on the original model to a relative error of 1e-5
(max abs difference / max(1, max abs reference)).

Examples are derandomized so CI runs are deterministic.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import hecompiler as hc

OPSET = 17
RTOL = 1e-5

PROPS = settings(max_examples=40, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FEW = settings(max_examples=25, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

_SO = ort.SessionOptions()
_SO.intra_op_num_threads = 1
_SO.inter_op_num_threads = 1
_SO.log_severity_level = 3
ort.set_default_logger_severity(3)


# --------------------------------------------------------------------------- helpers

def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), _SO, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    if got.size == 0:
        return 0.0
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


def _model(nodes, inputs: dict[str, tuple], out_name: str = "y", inits: dict[str, np.ndarray] | None = None,
           extra_outputs: tuple = ()) -> onnx.ModelProto:
    """A model with float inputs of the given shapes and one float output
    whose shape is left to inference."""
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()]
    outs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)]
    outs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra_outputs]
    init = [numpy_helper.from_array(np.asarray(a), n) for n, a in (inits or {}).items()]
    graph = helper.make_graph(list(nodes), "single_op", ins, outs, init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="test")
    model.ir_version = 8
    # fill in the output shapes (the checker wants them) and check the test model itself
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def _rand(rng: np.random.Generator, shape, lo: float | None = None) -> np.ndarray:
    """float32 normal values; with ``lo``, magnitudes in [lo, lo + 2) (for divisors)."""
    if lo is None:
        return rng.standard_normal(shape).astype(np.float32)
    mag = rng.uniform(lo, lo + 2.0, shape)
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return np.asarray(mag * sign, np.float32)


def check(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> hc.Graph:
    """onnxruntime on ``model`` vs the interpreter and vs the re-exported graph."""
    ref = _ort(model, feeds)
    graph = hc.load_onnx(model)
    got = hc.run_graph(graph, feeds)
    exported = hc.to_onnx(graph)
    got_ort = _ort(exported, feeds)
    assert len(got) == len(ref) == len(got_ort)
    for r, a, b in zip(ref, got, got_ort):
        assert a.dtype == r.dtype, f"interpreter dtype {a.dtype} != onnxruntime {r.dtype}"
        e1 = _rel_err(a, r)
        e2 = _rel_err(b, r)
        assert e1 <= RTOL, f"interpreter vs onnxruntime: relative error {e1:.3g}\n{hc.print_graph(graph)}"
        assert e2 <= RTOL, f"exported model vs onnxruntime: relative error {e2:.3g}\n{hc.print_graph(graph)}"
    return graph


seeds = st.integers(0, 2**31 - 1)


# --------------------------------------------------------------------------- Conv

@st.composite
def conv_params(draw):
    groups = draw(st.sampled_from(["one", "depthwise", "two"]))
    if groups == "two":
        c = draw(st.sampled_from([2, 4, 6]))
        m = draw(st.sampled_from([2, 4, 6]))
        g = 2
    elif groups == "depthwise":
        c = draw(st.integers(1, 6))
        m = c * draw(st.integers(1, 2))
        g = c
    else:
        c, m, g = draw(st.integers(1, 6)), draw(st.integers(1, 6)), 1
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    p = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h, w = draw(st.integers(5, 12)), draw(st.integers(5, 12))
    assume(d[0] * (k[0] - 1) + 1 <= h + p[0] + p[2])
    assume(d[1] * (k[1] - 1) + 1 <= w + p[1] + p[3])
    return dict(c=c, m=m, g=g, k=k, s=s, d=d, p=p, h=h, w=w, bias=draw(st.booleans()))


@PROPS
@given(conv_params(), seeds)
def test_conv(pr, seed):
    rng = np.random.default_rng(seed)
    x = _rand(rng, (1, pr["c"], pr["h"], pr["w"]))
    inits = {"W": _rand(rng, (pr["m"], pr["c"] // pr["g"]) + pr["k"])}
    ins = ["x", "W"]
    if pr["bias"]:
        inits["B"] = _rand(rng, (pr["m"],))
        ins.append("B")
    node = helper.make_node("Conv", ins, ["y"], name="conv", kernel_shape=list(pr["k"]), strides=list(pr["s"]),
                            pads=list(pr["p"]), dilations=list(pr["d"]), group=pr["g"])
    g = check(_model([node], {"x": x.shape}, inits=inits), {"x": x})
    assert [n.op for n in g.nodes] == ["Conv"]


@PROPS
@given(st.sampled_from(["SAME_UPPER", "SAME_LOWER", "VALID"]), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 5), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2),
       st.integers(1, 2), st.integers(5, 12), st.integers(5, 12), st.booleans(), seeds)
def test_conv_auto_pad(auto, c, m, kh, kw, sh, sw, dh, dw, h, w, bias, seed):
    if auto != "VALID":  # onnxruntime: "Dilation not supported for AutoPadType::SAME_UPPER or SAME_LOWER"
        dh = dw = 1
    assume(dh * (kh - 1) + 1 <= h and dw * (kw - 1) + 1 <= w)
    rng = np.random.default_rng(seed)
    x = _rand(rng, (1, c, h, w))
    inits = {"W": _rand(rng, (m, c, kh, kw))}
    if bias:
        inits["B"] = _rand(rng, (m,))
    node = helper.make_node("Conv", ["x", "W"] + (["B"] if bias else []), ["y"], name="conv", auto_pad=auto,
                            strides=[sh, sw], dilations=[dh, dw])
    g = check(_model([node], {"x": x.shape}, inits=inits), {"x": x})
    if auto != "VALID":
        assert g.outputs[0].shape[2:] == (-(-h // sh), -(-w // sw))


# --------------------------------------------------------------------------- pooling

@st.composite
def pool_params(draw):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, k[0] - 1)), draw(st.integers(0, k[1] - 1)),
         draw(st.integers(0, k[0] - 1)), draw(st.integers(0, k[1] - 1)))
    return dict(k=k, s=s, p=p, ceil=draw(st.integers(0, 1)), cip=draw(st.integers(0, 1)),
                c=draw(st.integers(1, 4)), h=draw(st.integers(3, 10)), w=draw(st.integers(3, 10)))


@PROPS
@given(st.sampled_from(["MaxPool", "AveragePool"]), pool_params(), seeds)
def test_pool(op, pr, seed):
    rng = np.random.default_rng(seed)
    x = _rand(rng, (1, pr["c"], pr["h"], pr["w"]))
    attrs = dict(kernel_shape=list(pr["k"]), strides=list(pr["s"]), pads=list(pr["p"]), ceil_mode=pr["ceil"])
    if op == "AveragePool":
        attrs["count_include_pad"] = pr["cip"]
    node = helper.make_node(op, ["x"], ["y"], name="pool", **attrs)
    g = check(_model([node], {"x": x.shape}), {"x": x})
    assert [n.op for n in g.nodes] == [op]


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_pool_ceil_mode_window_in_right_padding(op):
    """With ceil_mode a last window that would start in the right padding is
    dropped (onnxruntime, onnx.reference and torch agree; ONNX shape inference
    does not, onnx/onnx#5711).  The model declares the true shapes, downstream
    ops included, as a torch export does."""
    x = _rand(np.random.default_rng(0), (1, 2, 3, 4))
    nodes = [helper.make_node(op, ["x"], ["p"], name="pool", kernel_shape=[1, 1], strides=[1, 2], ceil_mode=1),
             helper.make_node("Relu", ["p"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "ceil", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 2])],
                              value_info=[helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 2, 3, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    g = check(model, {"x": x})
    assert g.outputs[0].shape == (1, 2, 3, 2)


@FEW
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9), seeds)
def test_global_average_pool(c, h, w, seed):
    x = _rand(np.random.default_rng(seed), (1, c, h, w))
    check(_model([helper.make_node("GlobalAveragePool", ["x"], ["y"])], {"x": x.shape}), {"x": x})


# --------------------------------------------------------------------------- BN and activations

@FEW
@given(st.integers(1, 6), st.sampled_from([(), (5,), (3, 4), (6, 2)]), st.sampled_from([1e-5, 1e-3, 0.1]), seeds)
def test_batch_normalization(c, spatial, eps, seed):
    rng = np.random.default_rng(seed)
    x = _rand(rng, (1, c, *spatial))
    inits = {"scale": _rand(rng, (c,)), "B": _rand(rng, (c,)), "mean": _rand(rng, (c,)),
             "var": rng.uniform(0.1, 3.0, (c,)).astype(np.float32)}
    node = helper.make_node("BatchNormalization", ["x", "scale", "B", "mean", "var"], ["y"], epsilon=eps)
    check(_model([node], {"x": x.shape}, inits=inits), {"x": x})


@FEW
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), seeds)
def test_relu(rest, seed):
    x = _rand(np.random.default_rng(seed), (1, *rest))
    check(_model([helper.make_node("Relu", ["x"], ["y"])], {"x": x.shape}), {"x": x})


@PROPS
@given(st.sampled_from(["min", "max", "both"]), st.floats(-1.5, 0.5), st.floats(0.0, 2.0), seeds)
def test_clip(which, lo, width, seed):
    x = _rand(np.random.default_rng(seed), (1, 3, 4, 5))
    inits = {}
    if which in ("min", "both"):
        inits["lo"] = np.array(lo, np.float32)
    if which in ("max", "both"):
        inits["hi"] = np.array(lo + width, np.float32)
    ins = ["x", "lo" if "lo" in inits else "", "hi" if "hi" in inits else ""]
    while ins[-1] == "":
        ins.pop()
    node = helper.make_node("Clip", ins, ["y"])
    check(_model([node], {"x": x.shape}, inits=inits), {"x": x})


# --------------------------------------------------------------------------- elementwise binary

# shapes that broadcast against the main input [1, C, H, W] (C=3, H=4, W=5)
_MAIN = (1, 3, 4, 5)
_CONST_SHAPES = [(), (1,), (5,), (4, 5), (3, 1, 1), (1, 3, 1, 1), (1, 1, 4, 1), (1, 3, 4, 5), (3, 4, 5)]
# a second graph input needs a leading 1 (batch)
_INPUT_SHAPES = [(1,), (1, 5), (1, 3, 1, 1), (1, 1, 4, 5), (1, 3, 4, 5), (1, 3, 4, 1)]


@PROPS
@given(st.sampled_from(["Add", "Sub", "Mul", "Div"]),
       st.sampled_from(["tensor_const", "const_tensor", "tensor_tensor", "tensor_tensor_swapped"]),
       st.data(), seeds)
def test_binary_broadcast(op, mode, data, seed):
    rng = np.random.default_rng(seed)
    main_shape = data.draw(st.sampled_from([_MAIN, (1, 3, 1, 1), (1, 1, 4, 5)]), "main shape")
    other = data.draw(st.sampled_from(_CONST_SHAPES if mode in ("tensor_const", "const_tensor") else _INPUT_SHAPES),
                      "other shape")
    try:
        np.broadcast_shapes(main_shape, other)
    except ValueError:
        assume(False)
    x = _rand(rng, main_shape, lo=0.5)  # magnitudes >= 0.5: safe divisors
    b = _rand(rng, other, lo=0.5)
    feeds = {"x": x}
    inputs = {"x": x.shape}
    inits = {}
    if mode == "tensor_const":
        ins = ["x", "b"]
        inits["b"] = b
    elif mode == "const_tensor":
        ins = ["b", "x"]
        inits["b"] = b
    else:
        inputs["b"] = b.shape
        feeds["b"] = b
        ins = ["x", "b"] if mode == "tensor_tensor" else ["b", "x"]
    node = helper.make_node(op, ins, ["y"], name="bin")
    g = check(_model([node], inputs, inits=inits), feeds)
    assert [n.op for n in g.nodes] == [op]


@PROPS
@given(st.sampled_from([2, 3]), st.sampled_from(["float", "int64"]), st.sampled_from([(), (1,)]), seeds)
def test_pow_const_exponent(e, kind, eshape, seed):
    x = _rand(np.random.default_rng(seed), (1, 2, 3, 4))
    exp = np.full(eshape, e, np.float32 if kind == "float" else np.int64)
    node = helper.make_node("Pow", ["x", "e"], ["y"])
    g = check(_model([node], {"x": x.shape}, inits={"e": exp}), {"x": x})
    assert [n.op for n in g.nodes] == ["Pow"]


# --------------------------------------------------------------------------- MatMul / Gemm

@PROPS
@given(st.sampled_from(["vec", "vec_1d_weight", "rank3", "rank4", "const_left"]), st.integers(1, 6),
       st.integers(1, 6), st.integers(1, 6), seeds)
def test_matmul(kind, m, k, n, seed):
    rng = np.random.default_rng(seed)
    if kind == "vec":
        x_shape, w_shape, ins = (1, k), (k, n), ["x", "W"]
    elif kind == "vec_1d_weight":
        x_shape, w_shape, ins = (1, m, k), (k,), ["x", "W"]
    elif kind == "rank3":
        x_shape, w_shape, ins = (1, m, k), (k, n), ["x", "W"]
    elif kind == "rank4":
        x_shape, w_shape, ins = (1, 2, m, k), (k, n), ["x", "W"]
    else:
        x_shape, w_shape, ins = (1, k, n), (m, k), ["W", "x"]
    x = _rand(rng, x_shape)
    node = helper.make_node("MatMul", ins, ["y"])
    check(_model([node], {"x": x_shape}, inits={"W": _rand(rng, w_shape)}), {"x": x})


@PROPS
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.integers(0, 1), st.integers(0, 1),
       st.sampled_from([1.0, 0.5, -2.0]), st.sampled_from([1.0, 0.0, 0.25]),
       st.sampled_from(["none", "N", "1N", "MN"]), seeds)
def test_gemm(m, k, n, trans_a, trans_b, alpha, beta, c_kind, seed):
    rng = np.random.default_rng(seed)
    a_shape = (k, m) if trans_a else (m, k)
    # graph inputs must have batch 1: feed A as [1, *a_shape] and flatten it to 2-D
    x = _rand(rng, (1, *a_shape))
    inits = {"B": _rand(rng, (n, k) if trans_b else (k, n))}
    ins = ["A", "B"]
    if c_kind != "none":
        inits["C"] = _rand(rng, {"N": (n,), "1N": (1, n), "MN": (m, n)}[c_kind])
        ins.append("C")
    nodes = [helper.make_node("Flatten", ["x"], ["A"], axis=2),
             helper.make_node("Gemm", ins, ["y"], name="gemm", alpha=alpha, beta=beta, transA=trans_a,
                              transB=trans_b)]
    g = check(_model(nodes, {"x": x.shape}, inits=inits), {"x": x})
    assert [nd.op for nd in g.nodes] == ["Flatten", "Gemm"]


# --------------------------------------------------------------------------- shape ops

@PROPS
@given(st.lists(st.integers(1, 4), min_size=0, max_size=3), st.data(), seeds)
def test_flatten(rest, data, seed):
    shape = (1, *rest)
    axis = data.draw(st.integers(-len(shape), len(shape)), "axis")
    x = _rand(np.random.default_rng(seed), shape)
    check(_model([helper.make_node("Flatten", ["x"], ["y"], axis=axis)], {"x": shape}), {"x": x})


@PROPS
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.data(), seeds)
def test_reshape_zero_and_minus_one(c, h, w, split, data, seed):
    shape = (1, c, h, w)
    k = data.draw(st.integers(1, 3), "merge from")
    target = list(shape[:k]) + [int(np.prod(shape[k:]))]
    if data.draw(st.booleans(), "append a 1"):
        target.append(1)
    # 0 copies the input dim at the same index (allowzero=0)
    for i in range(min(len(target), len(shape))):
        if target[i] == shape[i] and data.draw(st.booleans(), f"zero {i}"):
            target[i] = 0
    minus = data.draw(st.integers(-1, len(target) - 1), "-1 position")
    if minus >= 0 and target[minus] != 0:
        target[minus] = -1
    x = _rand(np.random.default_rng(seed), shape)
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    g = check(_model([node], {"x": shape}, inits={"shape": np.array(target, np.int64)}), {"x": x})
    assert g.nodes[0].op == "Reshape" and all(d > 0 for d in g.nodes[0].attrs["shape"])


@PROPS
@given(st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=4), st.data(), seeds)
def test_squeeze(rest, data, seed):
    shape = (1, *rest)
    ones = [i for i, d in enumerate(shape) if d == 1]
    mode = data.draw(st.sampled_from(["axes", "all"]), "mode")
    inits = {}
    ins = ["x"]
    if mode == "axes":
        axes = data.draw(st.lists(st.sampled_from(ones), min_size=1, max_size=len(ones), unique=True), "axes")
        axes = [a - len(shape) if data.draw(st.booleans(), f"negative {a}") else a for a in axes]
        inits["axes"] = np.array(axes, np.int64)
        ins.append("axes")
    x = _rand(np.random.default_rng(seed), shape)
    check(_model([helper.make_node("Squeeze", ins, ["y"])], {"x": shape}, inits=inits), {"x": x})


@PROPS
@given(st.lists(st.integers(1, 3), min_size=0, max_size=3), st.data(), seeds)
def test_unsqueeze(rest, data, seed):
    shape = (1, *rest)
    n_new = data.draw(st.integers(1, 2), "new axes")
    out_rank = len(shape) + n_new
    axes = data.draw(st.lists(st.integers(0, out_rank - 1), min_size=n_new, max_size=n_new, unique=True), "axes")
    axes = [a - out_rank if data.draw(st.booleans(), f"negative {a}") else a for a in axes]
    x = _rand(np.random.default_rng(seed), shape)
    node = helper.make_node("Unsqueeze", ["x", "axes"], ["y"])
    check(_model([node], {"x": shape}, inits={"axes": np.array(axes, np.int64)}), {"x": x})


@PROPS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.data(), seeds)
def test_transpose(rest, data, seed):
    shape = (1, *rest)
    attrs = {}
    if data.draw(st.booleans(), "explicit perm"):
        attrs["perm"] = data.draw(st.permutations(range(len(shape))), "perm")
    x = _rand(np.random.default_rng(seed), shape)
    check(_model([helper.make_node("Transpose", ["x"], ["y"], **attrs)], {"x": shape}), {"x": x})


@PROPS
@given(st.lists(st.integers(0, 2), min_size=8, max_size=8), st.sampled_from([0.0, 1.5, -3.25]),
       st.booleans(), seeds)
def test_pad_constant(pads, value, explicit_mode, seed):
    shape = (1, 2, 3, 4)
    x = _rand(np.random.default_rng(seed), shape)
    attrs = {"mode": "constant"} if explicit_mode else {}
    node = helper.make_node("Pad", ["x", "pads", "value"], ["y"], **attrs)
    inits = {"pads": np.array(pads, np.int64), "value": np.array(value, np.float32)}
    g = check(_model([node], {"x": shape}, inits=inits), {"x": x})
    assert g.nodes[0].op == "Pad" and g.nodes[0].attrs["value"] == value


@PROPS
@given(st.integers(-4, 3), st.lists(st.sampled_from(["x", "x2", "c1", "c2"]), min_size=1, max_size=3),
       st.data(), seeds)
def test_concat(axis, operands, data, seed):
    assume("x" in operands or "x2" in operands)
    rng = np.random.default_rng(seed)
    norm = axis % 4
    inputs, feeds, inits = {}, {}, {}
    for nm in dict.fromkeys(operands):  # an operand may repeat (the same tensor twice)
        shape = [1, 2, 3, 4]
        shape[norm] = data.draw(st.integers(1, 3), f"size of {nm}")
        if nm.startswith("x"):
            shape[0] = 1  # graph inputs have batch 1
            inputs[nm] = tuple(shape)
            feeds[nm] = _rand(rng, shape)
        else:
            inits[nm] = _rand(rng, shape)
    node = helper.make_node("Concat", operands, ["y"], axis=axis)
    g = check(_model([node], inputs, inits=inits), feeds)
    assert g.nodes[0].op == "Concat" and g.nodes[0].attrs["axis"] == norm


@PROPS
@given(st.sampled_from(["none", "empty", "given"]), st.integers(0, 1), st.integers(0, 1), st.data(), seeds)
def test_reduce_sum(axes_kind, keepdims, noop, data, seed):
    shape = (1, 2, 3, 4)
    ins = ["x"]
    inits = {}
    if axes_kind != "none":
        axes = [] if axes_kind == "empty" else \
            data.draw(st.lists(st.integers(-4, 3), min_size=1, max_size=3, unique_by=lambda a: a % 4), "axes")
        inits["axes"] = np.array(axes, np.int64)
        ins.append("axes")
    x = _rand(np.random.default_rng(seed), shape)
    node = helper.make_node("ReduceSum", ins, ["y"], keepdims=keepdims, noop_with_empty_axes=noop)
    check(_model([node], {"x": shape}, inits=inits), {"x": x})


# --------------------------------------------------------------------------- trivial ops and Sum

@FEW
@given(st.sampled_from(["Identity", "Dropout", "Dropout_ratio", "Dropout_mask"]),
       st.lists(st.integers(1, 4), min_size=0, max_size=3), seeds)
def test_identity_dropout(kind, rest, seed):
    shape = (1, *rest)
    inits = {}
    outs = ["y"]
    if kind == "Identity":
        node = helper.make_node("Identity", ["x"], outs)
    elif kind == "Dropout":
        node = helper.make_node("Dropout", ["x"], outs)
    elif kind == "Dropout_ratio":
        inits = {"ratio": np.array(0.3, np.float32), "train": np.array(False)}
        node = helper.make_node("Dropout", ["x", "ratio", "train"], outs)
    else:  # an unused mask output is fine
        node = helper.make_node("Dropout", ["x"], ["y", "mask"])
    x = _rand(np.random.default_rng(seed), shape)
    check(_model([node], {"x": shape}, inits=inits), {"x": x})


@PROPS
@given(st.sampled_from(["x", "x2"]), st.lists(st.sampled_from(["x", "x2", "c_full", "c_chan", "c_scalar"]),
                                              max_size=2), st.data(), seeds)
def test_sum(first, others, data, seed):
    operands = list(others)
    operands.insert(data.draw(st.integers(0, len(others)), "position of the run-time operand"), first)
    rng = np.random.default_rng(seed)
    shapes = {"x": (1, 3, 4, 5), "x2": (1, 3, 4, 5), "c_full": (1, 3, 4, 5), "c_chan": (3, 1, 1), "c_scalar": ()}
    inputs = {n: shapes[n] for n in dict.fromkeys(operands) if n.startswith("x")}
    feeds = {n: _rand(rng, s) for n, s in inputs.items()}
    inits = {n: _rand(rng, shapes[n]) for n in dict.fromkeys(operands) if n.startswith("c")}
    node = helper.make_node("Sum", operands, ["y"], name="sum")
    g = check(_model([node], inputs, inits=inits), feeds)
    want = ["Identity"] if len(operands) == 1 else ["Add"] * (len(operands) - 1)
    assert [n.op for n in g.nodes] == want
