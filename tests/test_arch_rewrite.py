"""Architecture rewrites (``dirac``, ``shared-source``), the least-squares re-fit, the fidelity
report, ONNX export of the result and the ``hecompile rewrite`` command."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import hecompiler as hc
from hecompiler.arch_rewrite import (_load_canonical, find_blocks, find_stages, rewrite_model, save,
                                     stage_source)
from hecompiler.cli import main
from hecompiler.errors import HecError
from hecompiler.passes.dirac_rewrite import dirac_delta
from hecompiler.refit import changed_nodes, refit, ridge_lstsq, run_batch
from conftest import ort_run, rel_err


def _tiny2_poly(models):
    """tiny_resnet_poly with two blocks per stage, so that shared-source has something to share."""
    g = models.GraphBuilder("tiny2_poly", 17, 0)
    poly = models._poly_setup(g, models.POLY_A, models.POLY_B, models.POLY_C)
    x = g.add_input("input", [1, 1, 8, 8])
    models._cifar_resnet(g, x, 1, widths=[4, 8], blocks=[2, 2], num_classes=10, poly=poly, logits_shape=[1, 10])
    return g.model("tiny residual CNN, two blocks per stage, polynomial activations")


@pytest.fixture(scope="module")
def canon(models):
    cache = {}

    def get(name):
        if name not in cache:
            m = _tiny2_poly(models) if name == "tiny2_poly" else models.MODELS[name]()
            cache[name] = (m, _load_canonical(m))
        return cache[name][0], cache[name][1].clone()

    return get


def _data(graph, n, seed):
    shape = graph.inputs[0].type.shape[1:]
    return np.random.default_rng(seed).standard_normal((n,) + shape).astype(np.float32)


def _adds(graph):
    return [n for n in graph.nodes if n.op == "Add"]


# --------------------------------------------------------------------------- block detection

@pytest.mark.parametrize("name", ["resnet20", "resnet20_poly"])
def test_blocks_resnet20(canon, name):
    _, g = canon(name)
    blocks = find_blocks(g)
    assert len(blocks) == 9
    assert [b.kind for b in blocks].count("identity") == 7
    proj = [b for b in blocks if b.kind == "projection"]
    assert [b.name for b in proj] == ["/layer2/layer2.0", "/layer3/layer3.0"]
    assert all(b.projection.inputs[1].shape[2:] == (1, 1) for b in proj)
    assert all(len(b.convs) == 2 and len(b.acts) == 1 and b.out_act is not None for b in blocks)
    stages = find_stages(blocks)
    assert [[b.name for b in st] for st in stages] == [[f"/layer{s}/layer{s}.{i}" for i in range(3)]
                                                        for s in (1, 2, 3)]
    # stage 1 shares the stem output; stages 2 and 3 the output of their projection block
    assert stage_source(stages[0]) is stages[0][0].input
    assert stage_source(stages[1]) is stages[1][0].output
    assert stage_source(stages[0], "first") is stages[0][0].output


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_resnet_poly"])
def test_blocks_tiny(canon, name):
    _, g = canon(name)
    blocks = find_blocks(g)
    assert [(b.name, b.kind) for b in blocks] == [("/layer1/layer1.0", "identity"), ("/layer2/layer2.0", "projection")]
    assert [len(st) for st in find_stages(blocks)] == [1, 1]


def test_no_blocks_in_a_plain_cnn(canon):
    _, g = canon("diracnet")
    assert find_blocks(g) == []


# --------------------------------------------------------------------------- the rewrites (structure)

def test_dirac_rewrite_structure(canon):
    _, g = canon("resnet20_poly")
    orig = g.clone()
    blocks = {b.name: b for b in find_blocks(orig)}
    rep = hc.run_pipeline(g, "dirac")
    assert not rep.exact and rep.records[0].op_delta == {"Add": -7}
    hc.verify(g)
    # only the two channel-changing projection blocks keep their Add and shortcut
    left = find_blocks(g)
    assert [(b.name, b.kind) for b in left] == [("/layer2/layer2.0", "projection"), ("/layer3/layer3.0", "projection")]
    assert any("kept (channels change 16->32" in n for n in rep.records[0].notes)
    for name, b in blocks.items():
        if b.kind != "identity":
            continue
        c1, c2 = (g.value(c.output.name if i == 0 else b.add.output.name).producer for i, c in enumerate(b.convs))
        # conv' = conv + I at the centre tap, the block is a plain chain x -> conv1' -> act -> conv2' -> act
        for new, old in ((c1, b.convs[0]), (c2, b.convs[1])):
            assert new.op == "Conv"
            want = old.inputs[1].data.astype(np.float64) + dirac_delta(old.inputs[1].shape, np.float64)
            np.testing.assert_allclose(new.inputs[1].data, want, rtol=0, atol=1e-6)
            assert new.inputs[1].name.endswith(".dirac")
        assert c1.inputs[0].name == b.input.name
        assert c2.inputs[0].producer.op == "Poly" and c2.inputs[0].producer.inputs[0] is c1.output
        assert [u.op for u in c2.output.users] == ["Poly"] and c2.output.users[0].output.name == b.output.name


def test_dirac_rewrite_says_why_bottlenecks_stay(models):
    """A bottleneck keeps C channels end to end but its 1x1 convs change them: no identity fits."""
    g = models.GraphBuilder("bottleneck_poly", 17, 0)
    poly = models._poly_setup(g, models.POLY_A, models.POLY_B, models.POLY_C)
    x = g.add_input("input", [1, 8, 4, 4])
    x = models._bottleneck(g, "layer1.0", x, 8, 2, 1, poly)
    g.add_output(x, [1, 8, 4, 4])
    graph = _load_canonical(g.model("one identity bottleneck"))
    rep = hc.run_pipeline(graph, "dirac")
    assert rep.records[0].op_delta == {}
    assert any("identity block kept (its convs change channels (8->2->2->8): an identity fits only a conv "
               "from C to C channels)" in n for n in rep.records[0].notes)


def test_shared_source_structure(canon):
    _, g = canon("resnet20_poly")
    orig = g.clone()
    rep = hc.run_pipeline(g, "shared-source")
    hc.verify(g)
    assert rep.records[0].op_delta == {} and rep.records[0].modified
    adds = {n.name: n for n in _adds(g)}
    assert len(adds) == 9
    stem = orig.value("/relu/Add_1_output_0")
    # stage 1: every Add takes its skip from the stem output (the stage input)
    for i in range(3):
        assert stem.name in [v.name for v in adds[f"/layer1/layer1.{i}/Add"].inputs]
    assert sum(u.op == "Add" for u in g.value(stem.name).users) == 3
    # stages 2 and 3: from the output of the projection block that opens the stage
    for s in (2, 3):
        src = f"/layer{s}/layer{s}.0/relu_1/Add_1_output_0"
        for i in (1, 2):
            assert src in [v.name for v in adds[f"/layer{s}/layer{s}.{i}/Add"].inputs]
        assert "downsample" in " ".join(v.name for v in adds[f"/layer{s}/layer{s}.0/Add"].inputs)
    kinds = [b.kind for b in find_blocks(g)]
    assert kinds == ["identity", "long", "long", "projection", "identity", "long", "projection", "identity", "long"]
    changed = changed_nodes(orig, g)
    assert sorted(n.name for n in g.nodes if id(n) in changed) == \
        ["/layer1/layer1.1/Add", "/layer1/layer1.2/Add", "/layer2/layer2.2/Add", "/layer3/layer3.2/Add"]


def test_shared_source_first_block_output(canon):
    _, g = canon("resnet20_poly")
    hc.run_pipeline(g, "shared-source{source=first}")
    add = g.value("/layer1/layer1.2/Add_output_0").producer
    assert "/layer1/layer1.0/relu_1/Add_1_output_0" in [v.name for v in add.inputs]
    with pytest.raises(HecError, match="source must be"):
        hc.run_pipeline(g, "shared-source{source=middle}")


def test_both_rewrites_dirac_convs_plus_long_skips(canon):
    _, g = canon("resnet20_poly")
    hc.run_pipeline(g, "shared-source,dirac")
    hc.verify(g)
    # Adds left: the long skips from the shared sources (2 + 1 + 1) and the two projections
    assert len(_adds(g)) == 6
    kinds = [(b.name, b.kind) for b in find_blocks(g)]
    assert kinds == [("/layer1/layer1.1", "long"), ("/layer1/layer1.2", "long"), ("/layer2/layer2.0", "projection"),
                     ("/layer2/layer2.2", "long"), ("/layer3/layer3.0", "projection"), ("/layer3/layer3.2", "long")]
    long1 = find_blocks(g)[0]
    assert long1.skip.name == "/relu/Add_1_output_0"
    assert all(c.inputs[1].name.endswith(".dirac") for c in long1.convs)


# --------------------------------------------------------------------------- re-fit

def test_ridge_lstsq_row_compression_is_exact(monkeypatch):
    import hecompiler.refit as rf

    rng = np.random.default_rng(1)
    a = rng.standard_normal((400, 12))
    a[:, -1] = 1.0
    t = a @ rng.standard_normal((12, 3)) + 0.1 * rng.standard_normal((400, 3))
    w0 = rng.standard_normal((12, 3))
    free = np.zeros(12, bool)
    free[-1] = True
    blocks = [(a[:150], t[:150]), (a[150:], t[150:])]
    w_c, b_c, a_c = ridge_lstsq(blocks, w0, 1e-2, free)          # 400 rows > 4 x 12: compressed
    monkeypatch.setattr(rf, "_COMPRESS_FACTOR", 10**9)
    w_f, b_f, a_f = ridge_lstsq(blocks, w0, 1e-2, free)          # the full augmented system
    np.testing.assert_allclose(w_c, w_f, rtol=1e-8, atol=1e-10)
    assert abs(a_c - a_f) < 1e-9 and abs(b_c - b_f) < 1e-9 and a_c < b_c
    # the ridge pulls towards w0 (not towards zero); the bias column is free
    w_big, *_ = ridge_lstsq(blocks, w0, 1e6, free)
    np.testing.assert_allclose(w_big[:-1], w0[:-1], atol=1e-4)


def test_refit_of_an_unchanged_graph_fits_nothing(canon):
    _, g = canon("tiny_resnet_poly")
    assert refit(g, g.clone(), _data(g, 4, 0)) == []


@pytest.fixture(scope="module")
def rewritten(canon):
    cache = {}

    def get(name, kind):
        if (name, kind) not in cache:
            m, g = canon(name)
            cal, held = _data(g, 64, 0), _data(g, 32, 1)
            cache[name, kind] = rewrite_model(m, (kind,), cal, held)
        return cache[name, kind]

    return get


@pytest.mark.parametrize("name,kind", [("tiny_resnet_poly", "dirac"), ("tiny2_poly", "shared-source"),
                                       ("resnet20_poly", "dirac"), ("resnet20_poly", "shared-source")])
def test_refit_improves_fidelity(rewritten, name, kind):
    g, rep, text = rewritten(name, kind)
    hc.verify(g)
    f = rep["fidelity"]
    for s in ("calibration", "heldout"):
        before, after = f[s]["before_refit"], f[s]["after_refit"]
        assert after["mean_abs"] < before["mean_abs"], (s, before, after)
        assert after["max_abs"] < before["max_abs"]
        assert after["top1_agree"] >= 0.9
    assert f["heldout"]["n"] == 32 and f["calibration"]["n"] == 64
    assert rep["refit"] and all(r["rel_error_after"] <= r["rel_error_before"] + 1e-9 for r in rep["refit"])
    for word in ("before re-fit", "after re-fit", "held-out", "calibration", "top-1 agree", kind):
        assert word in text


def test_refit_targets(rewritten):
    _, rep, _ = rewritten("tiny_resnet_poly", "dirac")
    fits = {r["layer"]: r for r in rep["refit"]}
    # conv1' -> the original conv1 output; conv2' -> the original pre-activation conv2 + skip (the removed Add)
    assert fits["/layer1/layer1.0/conv1/Conv"]["target"] == "/layer1/layer1.0/bn1/BatchNormalization_output_0"
    assert fits["/layer1/layer1.0/conv2/Conv"]["target"] == "/layer1/layer1.0/Add_output_0"
    # the projection block downstream: conv2 and the shortcut jointly, for the original Add
    joint = fits["/layer2/layer2.0/conv2/Conv + /layer2/layer2.0/downsample/downsample.0/Conv"]
    assert joint["target"] == "/layer2/layer2.0/Add_output_0" and joint["cols"] == 8 * 9 + 1 + 4
    _, rep, _ = rewritten("tiny2_poly", "shared-source")
    moved = [r for r in rep["refit"] if " - " in r["target"]]
    assert moved and all(r["target"].startswith(r["target"].split(" - ")[0]) for r in moved)


def test_exported_onnx_matches_rewritten_graph(rewritten, tmp_path):
    for name, kind in [("tiny_resnet_poly", "dirac"), ("resnet20_poly", "dirac"), ("resnet20_poly", "shared-source")]:
        g, _, _ = rewritten(name, kind)
        path = tmp_path / f"{name}.{kind}.onnx"
        save(g, path)
        x = _data(g, 1, 7)
        assert rel_err(ort_run(onnx.load(path), x)[0], hc.run_graph(g, x)[0]) < 1e-4
        # the batched re-fit interpreter agrees with the reference interpreter
        xs = _data(g, 3, 8)
        ys = run_batch(g, xs)[0]
        for i in range(3):
            np.testing.assert_allclose(ys[i], hc.run_graph(g, xs[i:i + 1])[0][0], rtol=1e-5, atol=1e-6)


def test_rewritten_model_loads_and_compiles(rewritten, tmp_path):
    g, _, _ = rewritten("tiny_resnet_poly", "dirac")
    path = tmp_path / "tiny.he.onnx"
    save(g, path)
    back = hc.load_onnx(path)
    assert back.op_counts().get("Add", 0) >= 1 and len(find_blocks(_load_canonical(back))) == 1
    result = hc.compile_model(str(path))
    assert result.prog is not None and result.fidelity["argmax_agrees"]
    assert result.fidelity["relative_to_range"] < 1e-3


def test_rewrite_model_errors(canon, models):
    m, g = canon("tiny_resnet_poly")
    x = _data(g, 8, 0)
    with pytest.raises(HecError, match=r"--calibration X.npy"):
        rewrite_model(m, ("dirac",), None)
    with pytest.raises(HecError, match=r"calibration: shape \[8, 2, 8, 8\].*\[1, 1, 8, 8\]"):
        rewrite_model(m, ("dirac",), np.zeros((8, 2, 8, 8), np.float32))
    with pytest.raises(HecError, match="choose from"):
        rewrite_model(m, ("diract",), x)
    with pytest.raises(HecError, match="one block, nothing to share"):
        rewrite_model(m, ("shared-source",), x)
    with pytest.raises(HecError, match="no residual blocks found"):
        plain = models.MODELS["diracnet"]()
        rewrite_model(plain, ("dirac",), _data(_load_canonical(plain), 4, 0))
    # [N, 1, C, H, W] is accepted too
    rewrite_model(m, ("dirac",), x[:, None])


# --------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_files(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("rw")
    onnx.save(models.MODELS["tiny_resnet_poly"](), d / "tiny.onnx")
    onnx.save(models.MODELS["diracnet"](), d / "plain.onnx")
    rng = np.random.default_rng(0)
    np.save(d / "cal.npy", rng.standard_normal((32, 1, 8, 8)).astype(np.float32))
    np.save(d / "held.npy", rng.standard_normal((16, 1, 8, 8)).astype(np.float32))
    np.save(d / "bad.npy", rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    np.save(d / "plain_cal.npy", rng.standard_normal((4, 3, 16, 16)).astype(np.float32))
    return d


def test_cli_rewrite(cli_files, tmp_path, capsys):
    d = cli_files
    out = tmp_path / "tiny.he.onnx"
    rc = main(["rewrite", str(d / "tiny.onnx"), "-o", str(out), "--kind", "dirac", "--calibration", str(d / "cal.npy"),
               "--heldout", str(d / "held.npy"), "--ridge", "1e-3", "--report", str(tmp_path / "r.json")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "after re-fit" in cap.out and "held-out" in cap.out and "wrote" in cap.err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["kinds"] == ["dirac"] and rep["fidelity"]["heldout"]["n"] == 16
    assert [b.kind for b in find_blocks(_load_canonical(str(out)))] == ["projection"]
    # and it compiles again
    assert main([str(out), "-o", str(tmp_path / "tiny.he.hec"), "-q", "--no-check"]) == 0


@pytest.mark.parametrize("args,msg", [
    (["--kind", "dirac"], "--calibration X.npy is required (N inputs, same shape as the model input)"),
    (["--kind", "dirac", "--calibration", "{d}/bad.npy"], "--calibration {d}/bad.npy: shape [32, 3, 8, 8] but the "
                                                           "model input %input is [1, 1, 8, 8]"),
    (["--kind", "dirac", "--calibration", "{d}/nope.npy"], "--calibration {d}/nope.npy: no such file"),
    (["--kind", "dirac", "--calibration", "{d}/cal.npy", "--heldout", "{d}/bad.npy"], "--heldout {d}/bad.npy: shape"),
    (["--kind", "shared-source", "--calibration", "{d}/cal.npy"], "one block, nothing to share"),
    (["--kind", "dirac", "--calibration", "{d}/cal.npy", "--ridge", "-1"], "--ridge -1.0: must be a non-negative"),
])
def test_cli_rewrite_errors(cli_files, tmp_path, capsys, args, msg):
    d = cli_files
    out = tmp_path / "o.onnx"
    rc = main(["rewrite", str(d / "tiny.onnx"), "-o", str(out)] + [a.format(d=d) for a in args])
    err = capsys.readouterr().err
    assert rc == 1 and msg.format(d=d) in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_rewrite_model_without_blocks(cli_files, tmp_path, capsys):
    d = cli_files
    rc = main(["rewrite", str(d / "plain.onnx"), "-o", str(tmp_path / "o.onnx"), "--kind", "dirac",
               "--calibration", str(d / "plain_cal.npy")])
    err = capsys.readouterr().err
    assert rc == 1 and "plain.onnx: no residual blocks found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
