"""ReLU / Clip / MaxPool approximation: fit error bounds, composites, calibration,
the missing-calibration error, out-of-range warnings, MaxPool options, and the
compile flow (CLI flags, report, .hec metadata)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import hecompiler as hc
from hecompiler import polyfit
from hecompiler.calibration import CalibrationError, as_batch, calibrate, check_ranges, evaluate
from hecompiler.cli import main
from hecompiler.compiler import CompileOptions, compile_model
from hecompiler.errors import PassError

from conftest import ort_run

DENSE = np.linspace(-1, 1, 200_001)


# --------------------------------------------------------------------------- polynomial fits

@pytest.mark.parametrize("degree", [4, 8, 14, 15, 16])
def test_relu_minimax_error_bound(degree):
    f = polyfit.relu_fit(degree, "minimax")
    err = np.abs(f(DENSE) - np.maximum(DENSE, 0)).max()
    assert err <= f.max_error * 1.01 + 1e-12  # the reported error is the measured one
    # within 3% of the asymptotic best error 0.2802 / (2 * even degree) (Bernstein's constant)
    assert err <= 1.03 * polyfit.relu_error_estimate(degree)
    assert f.degree <= degree


@pytest.mark.parametrize("degree", [4, 8, 14])
def test_relu_lsq_within_factor_of_minimax(degree):
    ls, mm = polyfit.relu_fit(degree, "lsq"), polyfit.relu_fit(degree, "minimax")
    err = np.abs(ls(DENSE) - np.maximum(DENSE, 0)).max()
    assert mm.max_error <= err <= 2.5 * mm.max_error


def test_abs_and_clip_fits():
    a = polyfit.abs_fit(16)
    assert np.abs(a(DENSE) - np.abs(DENSE)).max() <= 1.03 * 0.2802 / 16
    c = polyfit.clip_fit(15, -0.2, 0.6)
    err = np.abs(c(DENSE) - np.clip(DENSE, -0.2, 0.6)).max()
    assert err <= c.max_error * 1.01 and err < 0.05


def test_data_weighted_fit_is_better_where_the_data_are():
    rng = np.random.default_rng(0)
    data = np.clip(rng.normal(0, 0.15, 100_000), -1, 1)
    counts, edges = np.histogram(data, np.linspace(-1, 1, 65))
    d = polyfit.relu_fit(8, "data", density=(edges, counts))
    m = polyfit.relu_fit(8, "minimax")
    dense = data[:20_000]
    mse = lambda f: float(np.mean((f(dense) - np.maximum(dense, 0)) ** 2))  # noqa: E731
    assert mse(d) < mse(m)
    assert np.abs(d(DENSE) - np.maximum(DENSE, 0)).max() < 0.2  # still bounded on the whole interval


@pytest.mark.parametrize("degrees, bound", [((7, 7, 7), 0.0165), ((5, 5, 5), 0.033), ((7, 7), 0.047)])
def test_composite_sign_error_bounds(degrees, bound):
    c = polyfit.best_composite(degrees)
    relu = DENSE * (1 + c(DENSE)) / 2
    err = np.abs(relu - np.maximum(DENSE, 0)).max()
    assert err <= c.relu_error() * 1.01 + 1e-12 and c.relu_error() <= bound
    far = np.abs(DENSE) >= c.eps
    assert np.abs(c(DENSE[far]) - np.sign(DENSE[far])).max() <= c.sign_error * 1.01
    assert c.depth == sum(polyfit.poly_depth(d) for d in degrees)
    for s in c.stages:  # odd stages
        assert np.allclose(s[::2], 0)


def test_composite_beats_single_away_from_zero():
    c = polyfit.best_composite((7, 7, 7, 7))
    single = polyfit.relu_fit(15)
    away = DENSE[np.abs(DENSE) > 0.1]
    e_c = np.abs(away * (1 + c(away)) / 2 - np.maximum(away, 0)).max()
    e_s = np.abs(single(away) - np.maximum(away, 0)).max()
    assert e_c < e_s / 5


def test_parse_composite():
    assert polyfit.parse_composite("7x7x15") == [7, 7, 15]
    with pytest.raises(ValueError):
        polyfit.parse_composite("7xfoo")
    with pytest.raises(ValueError):
        polyfit.sign_composite([4, 7], 0.05)


# --------------------------------------------------------------------------- small models

def _model(nodes, inits, in_shape, out_shape, name="m"):
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _pool_model(kind, k, s, p, ceil=0, shape=(1, 2, 8, 8)):
    attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, ceil_mode=ceil)
    if kind == "AveragePool":
        attrs["count_include_pad"] = 0
    node = helper.make_node(kind, ["input"], ["y"], name="/pool/" + kind, **attrs)
    out = ort_run(_model([node], {}, list(shape), None), np.zeros(shape, np.float32))[0].shape
    return _model([node], {}, list(shape), list(out))


def _run_pass(model, spec, options=None):
    g = hc.load_onnx(model)
    pm = hc.PassManager(spec, options=options or {})
    pm.run(g)
    return g, pm.ctx.options


@pytest.mark.parametrize("k, s, p, ceil", [(3, 2, 1, 0), (2, 2, 0, 0), (3, 1, 1, 0), (3, 2, 0, 1)])
def test_maxpool_to_avgpool_matches_onnxruntime(k, s, p, ceil):
    x = np.random.default_rng(1).standard_normal((1, 2, 8, 8)).astype(np.float32)
    g, opts = _run_pass(_pool_model("MaxPool", k, s, p, ceil), "maxpool-to-avgpool")
    assert [n.op for n in g.nodes] == ["AveragePool"]
    ref = ort_run(_pool_model("AveragePool", k, s, p, ceil), x)[0]
    np.testing.assert_allclose(hc.run_graph(g, x)[0], ref, rtol=1e-5, atol=1e-6)
    assert opts["approximation"]["activations"][0]["op"] == "MaxPool"


@pytest.mark.parametrize("k, s, p, ceil", [(3, 2, 1, 0), (2, 2, 0, 0), (3, 2, 0, 1)])
@pytest.mark.parametrize("spec", ["maxpool-to-poly{ranges=-2:3}", "maxpool-to-poly{ranges=-2:3,composite=7x7x7}"])
def test_maxpool_to_poly_error_bound(k, s, p, ceil, spec):
    m = _pool_model("MaxPool", k, s, p, ceil)
    g, opts = _run_pass(m, spec)
    assert "MaxPool" not in g.op_counts()
    rec = opts["approximation"]["activations"][0]
    rng = np.random.default_rng(2)
    worst = 0.0
    for _ in range(5):
        x = rng.uniform(-2, 3, (1, 2, 8, 8)).astype(np.float32)
        worst = max(worst, float(np.abs(hc.run_graph(g, x)[0] - ort_run(m, x)[0]).max()))
    assert worst <= rec["fit_max_error"] + 1e-4, (worst, rec)
    assert worst < 0.5


def test_maxpool_to_poly_runs_in_the_simulator():
    from hecompiler.backends.sim import Simulator

    m = _pool_model("MaxPool", 3, 2, 1)
    x = np.random.default_rng(3).uniform(-1, 2, (8, 2, 8, 8)).astype(np.float32)
    res = compile_model(m, CompileOptions(calibration=x, maxpool="poly", check=False))
    y = Simulator(res.prog).run({"input": x[:1]})[0]["y"]
    np.testing.assert_allclose(y, hc.run_graph(res.graph, x[:1])[0], atol=1e-4)
    assert np.abs(y - ort_run(m, x[:1])[0]).max() < 0.3


# --------------------------------------------------------------------------- calibration

def test_calibrate_records_ranges(models):
    m = models.MODELS["tiny_resnet"]()
    x = np.random.default_rng(0).standard_normal((6, 1, 1, 8, 8)).astype(np.float32)
    st = calibrate(m, x)
    relu_inputs = [n.input[0] for n in m.graph.node if n.op_type == "Relu"]
    assert set(relu_inputs) <= set(st)
    s = st[relu_inputs[0]]
    assert s["min"] <= s["q01"] <= s["median"] <= s["q99"] <= s["max"] and s["n"] == 6
    assert sum(s["hist"]["counts"]) == 6 * 4 * 8 * 8
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    assert st[relu.output[0] + "@input"] is st[relu.input[0]]
    with pytest.raises(CalibrationError, match="N inputs shaped like the model input"):
        as_batch(np.zeros((3, 2, 8, 8)), (1, 1, 8, 8))


def test_missing_calibration_is_one_line_error(models, tmp_path, capsys):
    m = models.MODELS["tiny_resnet"]()
    with pytest.raises(PassError, match=r"relu-to-poly needs calibration for that: pass --calibration X\.npy"):
        compile_model(m)
    onnx.save(m, tmp_path / "relu.onnx")
    assert main([str(tmp_path / "relu.onnx"), "-o", str(tmp_path / "m.hec")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/relu/Relu" in err and "--calibration X.npy" in err
    assert not (tmp_path / "m.hec").exists()
    # an explicit range instead of calibration data
    assert main([str(tmp_path / "relu.onnx"), "-o", str(tmp_path / "m.hec"), "--relu-range=-6:6", "-q"]) == 0


def test_out_of_range_warnings(models):
    m = models.MODELS["tiny_resnet"]()
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    g, opts = _run_pass(m, "fold-bn,relu-to-poly,dce", {"calibration": calibrate(m, x)})
    iv = opts["approximation"]["intervals"]
    assert len(iv) == sum(n.op_type == "Relu" for n in m.graph.node)
    assert check_ranges(g, x[:1], iv) == []
    warns = check_ranges(g, 4 * x[:1], iv)
    assert warns and all(w.startswith("warning: %") and "outside the fitted interval" in w for w in warns)
    assert "beyond" in warns[0]


# --------------------------------------------------------------------------- compile flow

def test_compile_with_calibration_reports_fidelity(models):
    m = models.MODELS["torchlike_cnn"]()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, 12)
    res = compile_model(m, CompileOptions(calibration=x, labels=y, heldout=x[:4], heldout_labels=y[:4]))
    a = res.metadata["report"]["approximation"]
    assert {r["op"] for r in a["activations"]} == {"Clip", "Relu", "MaxPool"}
    assert set(a["fidelity"]) == {"calibration", "heldout"}
    f = a["fidelity"]["calibration"]
    assert f["n"] == 12 and 0 <= f["top1_agreement"] <= 1 and "accuracy_approximated" in f
    assert "approximation (changes the function" in res.report_text
    assert not res.metadata["exact"]
    # the encryption error is measured against the graph the passes produced; the approximation's own
    # effect separately, against the original model in onnxruntime
    assert res.fidelity["reference"] == "the rewritten graph (reference interpreter)"
    assert res.fidelity["original_reference"] == "onnxruntime (original model)"
    assert res.fidelity["rewrite_relative_to_range"] > 10 * res.fidelity["relative_to_range"]
    json.dumps(res.metadata)
    direct = evaluate(m, res.graph, x[:4], y[:4])
    assert direct["top1_agreement"] == a["fidelity"]["heldout"]["top1_agreement"]


def test_cli_flags_tiny_model(models, tmp_path, capsys):
    m = models.MODELS["tiny_resnet"]()
    d = tmp_path
    onnx.save(m, d / "relu.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 1, 8, 8)).astype(np.float32)
    np.save(d / "cal.npy", x)
    np.save(d / "y.npy", rng.integers(0, 10, 10))
    np.save(d / "x0.npy", x[:1])
    np.save(d / "xbig.npy", 5 * x[:1])
    np.save(d / "xwide.npy", 1.33 * x[:1])
    np.save(d / "xdiverge.npy", 1.45 * x[:1])
    hec = str(d / "m.hec")
    assert main([str(d / "relu.onnx"), "-o", hec, "--calibration", str(d / "cal.npy"), "--labels", str(d / "y.npy"),
                 "--heldout", str(d / "cal.npy"), "--relu-degree", "8", "--relu-composite", "",
                 "--relu-layers", "*layer2*=5x5"]) == 0
    err = capsys.readouterr().err
    assert "relu-to-poly{degree=8" in err and "fidelity on the heldout set (10 inputs" in err
    _, meta = hc.load_hec(hec)
    acts = meta["report"]["approximation"]["activations"]
    assert any("composite 5x5" in a["approximation"] for a in acts if "layer2" in a["node"])
    assert any(a["degrees"] == [8] for a in acts)
    assert main(["run", hec, "--backend", "sim", "--input", str(d / "x0.npy"), "--reference",
                 str(d / "relu.onnx")]) == 0
    assert "all 5 approximated op inputs inside their fitted intervals" in capsys.readouterr().err
    assert main(["run", hec, "--backend", "sim", "--input", str(d / "xwide.npy"), "--reference",
                 str(d / "relu.onnx"), "-o", str(d / "y.npy")]) == 0
    assert "outside the fitted interval" in capsys.readouterr().err
    # far beyond the calibrated range the polynomials diverge and the chain would overflow: refused
    assert main(["run", hec, "--backend", "sim", "--input", str(d / "xbig.npy"), "-o", str(d / "y2.npy")]) == 1
    assert "the most this program's modulus chain was shown to hold" in capsys.readouterr().err
    assert not (d / "y2.npy").exists()
    # inside that magnitude but driving a composite ReLU into divergence: the precheck refuses it before
    # encrypting (SEAL would decrypt garbage and exit 0)
    assert main(["run", hec, "--input", str(d / "xdiverge.npy"), "-o", str(d / "y3.npy")]) == 1
    err = capsys.readouterr().err
    assert "refused before encryption" in err and "exceeds half the ciphertext modulus" in err
    assert not (d / "y3.npy").exists()
    # the approximated graph can be written back as ONNX
    assert main([str(d / "relu.onnx"), "-o", str(d / "approx.onnx"), "--calibration", str(d / "cal.npy"), "-q"]) == 0
    ops = {n.op_type for n in onnx.load(d / "approx.onnx").graph.node}
    assert "Relu" not in ops


def test_user_pipeline_with_ranges_option(models):
    m = models.MODELS["tiny_resnet"]()
    g, _ = _run_pass(m, "fold-bn,relu-to-poly{ranges=-6:6,degree=7,fit=lsq},dce")
    assert "Relu" not in g.op_counts() and g.op_counts()["Poly"] == 5
    with pytest.raises(PassError, match="fit='nope'"):
        _run_pass(m, "relu-to-poly{fit=nope,ranges=-1:1}")
    with pytest.raises(PassError, match="LO:HI"):
        _run_pass(m, "relu-to-poly{ranges=7}")


# --------------------------------------------------------------------------- torch-style exports

@pytest.mark.parametrize("keepdims", [1, 0])
def test_reducemean_over_space_is_global_average_pool(keepdims):
    """torch.onnx's dynamo exporter writes AdaptiveAvgPool2d(1) as ReduceMean(axes=[-1, -2]) (opset 18)."""
    axes = onnx.numpy_helper.from_array(np.array([-1, -2], np.int64), "axes")
    node = helper.make_node("ReduceMean", ["input", "axes"], ["y"], name="node_mean", keepdims=keepdims)
    out = [1, 3, 1, 1] if keepdims else [1, 3]
    g = helper.make_graph([node], "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], [axes])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    ir = hc.load_onnx(m)
    assert "GlobalAveragePool" in ir.op_counts()
    np.testing.assert_allclose(hc.run_graph(ir, x)[0], ort_run(m, x)[0], rtol=1e-5, atol=1e-6)


def test_resnet18_relu_224_graph_approximates(models):
    """The torchvision-style ReLU + MaxPool + BN ResNet-18 (on a 32x32 input here; the 224 run is in
    benchmarks/run.py --relu224) imports and has every non-polynomial op replaced."""
    m = models.MODELS["resnet18_relu_224"](image_size=32)
    ops = {n.op_type for n in m.graph.node}
    assert {"Relu", "MaxPool", "BatchNormalization"} <= ops
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    from hecompiler.calibration import approximation_setup

    g = hc.load_onnx(m)
    spec, options = approximation_setup(m, g, CompileOptions(calibration=x))
    hc.PassManager(spec, options=options).run(g)
    assert not {"Relu", "MaxPool", "BatchNormalization"} & set(g.op_counts())
    assert g.op_counts()["Poly"] == 17
    f = evaluate(m, g, x)
    assert np.isfinite(f["max_logit_error"])
