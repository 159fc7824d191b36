"""``dirac-merge`` on ONNX models: residual ``Add(x, BN(Conv(x)))`` skips become
one Conv each, the function is unchanged (interpreter and exported ONNX against
onnxruntime on the original model), DiracNet still compiles, and under HE the
merged program does less work at no more depth."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hecompiler as hc
from conftest import ort_run, rel_err

WITHOUT_MERGE = hc.DEFAULT_PIPELINE.replace("dirac-merge,", "")


class _Builder:
    """A tiny onnx.helper graph builder (opset 17, float32 initializers)."""

    def __init__(self, shape, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shape = list(shape)
        self.n = 0

    def param(self, name, value, dtype=np.float32):
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op, inputs, name, **attrs):
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv_bn(self, scope, x, c, k, group=1, pads=None, dilation=1, bias=False, bn=True):
        scale = 1.0 / (k * np.sqrt(c // group))
        w = self.param(f"{scope}.conv.weight", scale * self.rng.standard_normal((c, c // group, k, k)))
        ins = [x, w]
        if bias:
            ins.append(self.param(f"{scope}.conv.bias", 0.1 * self.rng.standard_normal(c)))
        p = dilation * (k - 1) // 2
        y = self.op("Conv", ins, f"/{scope}/conv/Conv", kernel_shape=[k, k], group=group,
                    pads=pads if pads is not None else [p, p, p, p], strides=[1, 1], dilations=[dilation, dilation])
        if bn:
            y = self.op("BatchNormalization",
                        [y, self.param(f"{scope}.bn.weight", self.rng.uniform(0.5, 1.5, c)),
                         self.param(f"{scope}.bn.bias", 0.1 * self.rng.standard_normal(c)),
                         self.param(f"{scope}.bn.running_mean", 0.1 * self.rng.standard_normal(c)),
                         self.param(f"{scope}.bn.running_var", self.rng.uniform(0.5, 1.5, c))],
                        f"/{scope}/bn/BatchNormalization", epsilon=1e-5)
        return y

    def poly(self, scope, x):
        """0.125 x^2 + 0.5 x + 0.25, written as torch exports it."""
        a, b, c = (self.param(f"{scope}.{n}", v) for n, v in (("a", 0.125), ("b", 0.5), ("c", 0.25)))
        sq = self.op("Mul", [x, x], f"/{scope}/Mul")
        t = self.op("Add", [self.op("Mul", [sq, a], f"/{scope}/Mul_1"), self.op("Mul", [x, b], f"/{scope}/Mul_2")],
                    f"/{scope}/Add")
        return self.op("Add", [t, c], f"/{scope}/Add_1")

    def model(self, out):
        g = helper.make_graph(self.nodes, "dirac", [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m = onnx.shape_inference.infer_shapes(m)
        onnx.checker.check_model(m, full_check=True)
        return m


def residual_model(c=4, k=3, group=1, blocks=2, h=6, form="add", seed=0):
    """``blocks`` x (y = poly(skip(y, BN(Conv(y))))) on 1 x c x h x h."""
    b = _Builder([1, c, h, h], seed)
    y = "x"
    for i in range(blocks):
        scope = f"layer{i}"
        if form == "pad":  # torch's F.pad in front of a pad-0 conv
            p = (k - 1) // 2
            pads = b.param(f"{scope}.pads", [0, 0, p, p, 0, 0, p, p], np.int64)
            src = b.op("Pad", [y, pads], f"/{scope}/Pad", mode="constant")
            r = b.conv_bn(scope, src, c, k, group, pads=[0, 0, 0, 0])
        else:
            r = b.conv_bn(scope, y, c, k, group, bias=(i % 2 == 1))
        if form == "add":
            y = b.op("Add", [y, r], f"/{scope}/Add")
        elif form == "swapped" or form == "pad":
            y = b.op("Add", [r, y], f"/{scope}/Add")
        elif form == "sub":
            y = b.op("Sub", [y, r], f"/{scope}/Sub")
        elif form == "mul":  # y + 0.5 * r
            y = b.op("Add", [y, b.op("Mul", [b.param(f"{scope}.alpha", 0.5), r], f"/{scope}/Mul")], f"/{scope}/Add")
        elif form == "div_scaled_skip":  # 2*y + r / 4
            s = b.op("Mul", [y, b.param(f"{scope}.a", 2.0)], f"/{scope}/Mul")
            y = b.op("Add", [s, b.op("Div", [r, b.param(f"{scope}.d", 4.0)], f"/{scope}/Div")], f"/{scope}/Add")
        else:
            raise ValueError(form)
        y = b.poly(f"act{i}", y)
    return b.model(y)


def _check(model, merges, seed=1):
    """Default pipeline on ``model``: ``merges`` skips merged, no Add/Sub/BN/Pad
    left, one Conv per merged skip named after its Add, same function."""
    g = hc.load_onnx(model)
    report = hc.run_pipeline(g)
    assert report.exact
    rec = next(r for r in report.records if r.spec == "dirac-merge")
    assert len(rec.notes) == merges, rec.notes
    assert all(n.startswith("merged skip into /layer") for n in rec.notes)
    ops = g.op_counts()
    assert not {"Add", "Sub", "Mul", "Div", "BatchNormalization", "Pad"} & set(ops), ops
    assert ops["Conv"] == merges, ops
    skip_ops = {n.name for n in model.graph.node if n.op_type in ("Add", "Sub") and "/layer" in n.name}
    assert {n.name for n in g.nodes if n.op == "Conv"} == skip_ops
    x = np.random.default_rng(seed).standard_normal(g.inputs[0].type.shape).astype(np.float32)
    ref = ort_run(model, x)[0]
    assert rel_err(hc.run_graph(g, x)[0], ref) < 1e-5
    assert rel_err(ort_run(hc.to_onnx(g), x)[0], ref) < 1e-5
    return g, report


@pytest.mark.parametrize("c, k, group", [(1, 3, 1), (3, 3, 1), (8, 3, 1), (4, 5, 1), (6, 1, 1), (4, 3, 4), (6, 3, 2)],
                         ids=["c1-3x3", "c3-3x3", "c8-3x3", "c4-5x5", "c6-1x1", "c4-3x3-depthwise", "c6-3x3-group2"])
def test_conv_bn_skips_merge_and_match_onnxruntime(c, k, group):
    _check(residual_model(c=c, k=k, group=group), merges=2)


@pytest.mark.parametrize("form", ["swapped", "sub", "mul", "div_scaled_skip", "pad"])
def test_skip_forms_merge_and_match_onnxruntime(form):
    _check(residual_model(c=4, k=3, form=form, seed=3), merges=2)


def test_dilated_conv_merges():
    b = _Builder([1, 3, 7, 7], seed=5)
    y = b.op("Add", ["x", b.conv_bn("layer0", "x", 3, 3, dilation=2)], "/layer0/Add")
    _check(b.model(y), merges=1)


def test_note_names_the_conv_and_what_was_merged():
    g = hc.load_onnx(residual_model(c=2, k=3, form="mul", blocks=1))
    report = hc.run_pipeline(g)
    notes = next(r for r in report.records if r.spec == "dirac-merge").notes
    assert notes == ["merged skip into /layer0/conv/Conv: 0.5*(3x3 conv) + identity"]


def test_bn_is_folded_before_the_merge():
    """Add(x, BN(Conv(x))): fold-bn turns the branch into one Conv with bias, then
    dirac-merge runs; run alone, dirac-merge takes the BN into the kernel itself,
    with the same result."""
    model = residual_model(c=3, k=3, blocks=1)
    pipe = hc.DEFAULT_PIPELINE.split(",")
    assert pipe.index("fold-bn") < pipe.index("dirac-merge") < pipe.index("fuse-poly")
    g = hc.load_onnx(model)
    report = hc.run_pipeline(g)
    deltas = {r.spec: r.op_delta for r in report.records}
    assert deltas["fold-bn"] == {"BatchNormalization": -1}
    assert deltas["dirac-merge"] == {"Add": -1}
    g2 = hc.load_onnx(model)
    hc.run_pipeline(g2, "dirac-merge")
    assert "BatchNormalization" not in g2.op_counts()
    assert [n.name for n in g2.nodes if n.op == "Conv"] == ["/layer0/Add"]
    w = [n.inputs[1].data for n in g.nodes if n.op == "Conv"][0]
    w2 = [n.inputs[1].data for n in g2.nodes if n.op == "Conv"][0]
    np.testing.assert_allclose(w2, w, rtol=1e-6, atol=1e-7)


def test_conv_with_other_users_stays():
    """The conv result also feeds a second branch: it stays, the skip still merges."""
    b = _Builder([1, 4, 5, 5], seed=2)
    r = b.conv_bn("layer0", "x", 4, 3, bn=False, bias=True)
    y = b.op("Add", ["x", r], "/layer0/Add")
    z = b.op("Add", [b.poly("act", y), b.poly("act2", r)], "/out/Add")
    model = b.model(z)
    g = hc.load_onnx(model)
    hc.run_pipeline(g)
    assert g.op_counts()["Conv"] == 2
    assert [n.name for n in g.nodes if n.op == "Conv"] == ["/layer0/conv/Conv", "/layer0/Add"]
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)
    ref = ort_run(model, x)[0]
    assert rel_err(hc.run_graph(g, x)[0], ref) < 1e-5
    assert rel_err(ort_run(hc.to_onnx(g), x)[0], ref) < 1e-5


@pytest.mark.parametrize("case", ["stride2", "stride2_same_shape", "channels", "relu", "poly", "other_tensor",
                                  "even_kernel", "per_pixel_mul"])
def test_refused(case):
    """None of these is x + linear(x) with a stride-1, shape-preserving, odd-sized
    conv: nothing merges and the function is unchanged."""
    c = 2
    hw = {"stride2": 2, "stride2_same_shape": 1}.get(case, 4)
    b = _Builder([1, c, hw, hw], seed=4)
    w = b.param("w", b.rng.standard_normal((c, c, 3, 3)))
    same = dict(pads=[1, 1, 1, 1])
    skip = "x"
    if case == "stride2":  # 2x2 -> 1x1, broadcast back by the Add
        r = b.op("Conv", ["x", w], "/layer0/conv/Conv", strides=[2, 2], **same)
    elif case == "stride2_same_shape":  # on a 1x1 map the shape is kept, the stride still refused
        r = b.op("Conv", ["x", w], "/layer0/conv/Conv", strides=[2, 2], **same)
    elif case == "channels":  # 2 -> 1 channel, broadcast back over the channels by the Add
        r = b.op("Conv", ["x", b.param("w1", b.rng.standard_normal((1, c, 3, 3)))], "/layer0/conv/Conv", **same)
    elif case == "relu":
        r = b.op("Relu", [b.op("Conv", ["x", w], "/layer0/conv/Conv", **same)], "/layer0/Relu")
    elif case == "poly":
        r = b.poly("act", b.op("Conv", ["x", w], "/layer0/conv/Conv", **same))
    elif case == "other_tensor":  # Add(x, Conv(x*x))
        r = b.op("Conv", [b.op("Mul", ["x", "x"], "/sq/Mul"), w], "/layer0/conv/Conv", **same)
    elif case == "even_kernel":  # 2x2 "same" conv: no centre tap
        r = b.op("Conv", ["x", b.param("w1", b.rng.standard_normal((c, c, 2, 2)))], "/layer0/conv/Conv",
                 pads=[0, 0, 1, 1])
    elif case == "per_pixel_mul":
        r = b.op("Mul", [b.op("Conv", ["x", w], "/layer0/conv/Conv", **same),
                         b.param("pix", b.rng.standard_normal((1, 1, hw, hw)))], "/layer0/Mul")
    y = b.op("Add", [skip, r], "/layer0/Add")
    model = b.model(y)
    g = hc.load_onnx(model)
    report = hc.run_pipeline(g)
    rec = next(r for r in report.records if r.spec == "dirac-merge")
    assert not rec.modified and not rec.notes
    assert "Add" in g.op_counts()
    x = np.random.default_rng(0).standard_normal((1, c, hw, hw)).astype(np.float32)
    assert rel_err(hc.run_graph(g, x)[0], ort_run(model, x)[0]) < 1e-5


# --------------------------------------------------------------------------- DiracNet


def test_diracnet_model_compiles_and_matches(models):
    """The DiracNet reference model (Dirac weights computed in the graph, no residual
    Adds): nothing to merge, and the default pipeline keeps its function."""
    model = models.MODELS["diracnet"]()
    g = hc.load_onnx(model)
    report = hc.run_pipeline(g)
    rec = next(r for r in report.records if r.spec == "dirac-merge")
    assert not rec.modified
    x = np.random.default_rng(0).standard_normal(g.inputs[0].type.shape).astype(np.float32)
    ref = ort_run(model, x)[0]
    assert rel_err(hc.run_graph(g, x)[0], ref) < 1e-5
    assert rel_err(ort_run(hc.to_onnx(g), x)[0], ref) < 1e-5


def test_residual_form_equals_dirac_parameterisation():
    """``a*x + b*Conv(x, W/||W||)`` merges to exactly the kernel that a DiracNet
    computes in the graph as ``a*I + b*W/||W||``."""
    c, a, bb = 4, 0.75, 1.5
    rng = np.random.default_rng(9)
    w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
    dirac = np.zeros((c, c, 3, 3), np.float32)
    dirac[np.arange(c), np.arange(c), 1, 1] = 1.0

    d = _Builder([1, c, 5, 5])
    nrm = d.op("ReduceL2", [d.param("w", w)], "/norm/ReduceL2", keepdims=1)
    wn = d.op("Div", ["w", nrm], "/norm/Div")
    kern = d.op("Add", [d.op("Mul", [d.param("a", a), d.param("I", dirac)], "/Mul"),
                        d.op("Mul", [d.param("b", bb), wn], "/Mul_1")], "/Add")
    dirac_model = d.model(d.op("Conv", ["x", kern], "/conv/Conv", pads=[1, 1, 1, 1]))

    r = _Builder([1, c, 5, 5])
    wn_const = r.param("wn", w / np.linalg.norm(w.astype(np.float64)))
    s = r.op("Mul", ["x", r.param("a", a)], "/skip/Mul")
    br = r.op("Mul", [r.op("Conv", ["x", wn_const], "/conv/Conv", pads=[1, 1, 1, 1]), r.param("b", bb)], "/Mul")
    res_model = r.model(r.op("Add", [s, br], "/Add"))

    kernels = []
    for m in (dirac_model, res_model):
        g = hc.load_onnx(m)
        hc.run_pipeline(g)
        assert g.op_counts() == {"Conv": 1}, g.op_counts()
        kernels.append(g.nodes[0].inputs[1].data)
    np.testing.assert_allclose(kernels[1], kernels[0], rtol=1e-6, atol=1e-6)
    x = rng.standard_normal((1, c, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(ort_run(res_model, x)[0], ort_run(dirac_model, x)[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- under HE


def test_merge_saves_he_work():
    """x -> conv -> poly -> Add(y, conv(y)): with the merge the program has no
    ciphertext Add and no level alignment for the skip, at no more depth, and the
    simulator still matches onnxruntime."""
    b = _Builder([1, 2, 4, 4], seed=0)
    y = b.poly("act", b.conv_bn("stem", "x", 2, 3, bn=False))
    out = b.op("Add", [y, b.conv_bn("layer0", y, 2, 3, bn=False, bias=True)], "/layer0/Add")
    model = b.model(out)
    res = {}
    for label, spec in (("merged", hc.DEFAULT_PIPELINE), ("plain", WITHOUT_MERGE)):
        r = hc.compile_model(model, hc.CompileOptions(passes=spec))
        assert r.fidelity["relative_to_range"] < 1e-3
        res[label] = r
    merged, plain = res["merged"], res["plain"]
    assert "Add" not in merged.graph.op_counts() and "Add" in plain.graph.op_counts()
    mo, po = merged.prog.op_counts(), plain.prog.op_counts()
    assert mo.get("add", 0) < po.get("add", 0)
    assert mo.get("add", 0) + mo.get("mod_switch", 0) < po.get("add", 0) + po.get("mod_switch", 0)
    for op in ("rotate", "mul_plain", "mul", "rescale"):  # the identity lands on a diagonal the conv has
        assert mo.get(op, 0) <= po.get(op, 0), op
    assert merged.prog.levels_used() <= plain.prog.levels_used()
