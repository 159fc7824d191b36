"""The skip-connection reference models of Drucker & Zimerman (2023) through the
whole compiler: ``diracnet_poly`` (no skips at all, the identity lives in the
kernels) and ``shared_source_resnet_poly`` (every later block of a stage adds
one shared source). Both have polynomial activations, so they compile exactly
(no calibration), and the slot simulator must reproduce onnxruntime on the
original ONNX model."""

from __future__ import annotations

import numpy as np

import hecompiler as hc
from hecompiler.arch_rewrite import _load_canonical, find_blocks, find_stages, stage_source
from hecompiler.backends.sim import Simulator
from hecompiler.compiler import CompileOptions, compile_model
from hecompiler.lower import LoweringOptions
from hecompiler.planner import PlanOptions
from conftest import ort_run, rel_err

#: exact simulator (no noise) against onnxruntime, relative to the output range; measured ~2e-7
EXACT_TOL = 1e-5
#: the compiler's own fidelity check (simulator with the CKKS noise model); measured ~3e-7
NOISY_TOL = 1e-4


def _input(model, seed=0):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _sim_error(res, model, x) -> float:
    """max |simulated - onnxruntime| / range of the onnxruntime output."""
    ref = ort_run(model, x)[0]
    y = Simulator(res.prog).run({res.graph.inputs[0].name: x})[0][res.graph.outputs[0].name]
    assert y.shape == ref.shape
    assert rel_err(y, ref) < EXACT_TOL
    return float(np.abs(y - ref).max() / np.ptp(ref))


def _check_compiled(res, model):
    assert res.pipeline.exact
    assert res.fidelity["original_reference"] == "onnxruntime (original model)"
    assert res.fidelity["relative_to_range"] < NOISY_TOL, res.fidelity
    assert res.fidelity["end_to_end_relative_to_range"] < NOISY_TOL, res.fidelity
    assert res.fidelity["argmax_agrees"]
    # the compile-time check ran on seed 0 (exact_relative_to_range); one more input here
    assert res.fidelity["exact_relative_to_range"] < EXACT_TOL
    assert _sim_error(res, model, _input(model, 1)) < EXACT_TOL


def _encrypted_adds(graph) -> list:
    return [n for n in graph.nodes if n.op in ("Add", "Sub") and not any(v.is_constant for v in n.inputs)]


# --------------------------------------------------------------------------- diracnet_poly


def test_diracnet_poly_compiles_exactly_without_skip_adds(models):
    model = models.MODELS["diracnet_poly"]()
    res = compile_model(model, CompileOptions())
    _check_compiled(res, model)
    g = res.graph
    # the Dirac kernels alpha*I + beta*W/||W|| were folded to plain conv weights, BN into them,
    # every activation into one Poly node: no Add between encrypted tensors is left
    assert _encrypted_adds(g) == []
    assert g.op_counts() == {"Conv": 6, "Poly": 6, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}, g.op_counts()
    convs = [n for n in g.nodes if n.op == "Conv"]
    assert all(v.is_constant for n in convs for v in n.inputs[1:])
    assert not any(n.op == "Add" for n in g.nodes)
    merge = next(r for r in res.pipeline.records if r.spec == "dirac-merge")
    assert not merge.modified  # nothing to merge: the identity is already inside the kernels
    # the program: one ct-ct multiplication per activation, nothing aligns a skip
    ops = res.prog.op_counts()
    assert ops["mul"] == 6 and ops.get("mod_switch", 0) == 0
    assert res.metadata["report"]["shared_alignments"] == 0


# --------------------------------------------------------------------------- shared_source_resnet_poly


def test_shared_source_resnet_poly_is_the_rewrite_fixed_point(models):
    """The compiler's block detection sees the model as shared-source blocks, the
    ``shared-source`` rewrite leaves it alone, and the rewrite applied to the plain
    ResNet with the same seed (same weights: same draws in the same order) computes
    exactly this model."""
    model = models.MODELS["shared_source_resnet_poly"]()
    g = _load_canonical(model)
    blocks = find_blocks(g)
    assert [(b.name, b.kind) for b in blocks] == [
        ("/layer1/layer1.0", "identity"), ("/layer1/layer1.1", "long"), ("/layer1/layer1.2", "long"),
        ("/layer2/layer2.0", "projection"), ("/layer2/layer2.1", "identity"), ("/layer2/layer2.2", "long")]
    stages = find_stages(blocks)
    assert [len(st) for st in stages] == [3, 3]
    s1, s2 = (stage_source(st) for st in stages)
    assert s1.name == "/relu/Add_1_output_0" and s2.name == "/layer2/layer2.0/relu_1/Add_1_output_0"
    assert sum(u.op == "Add" for u in s1.users) == 3 and sum(u.op == "Add" for u in s2.users) == 2
    assert all(b.skip is (s1 if b.name.startswith("/layer1") else s2) for b in blocks if b.kind != "projection")
    rep = hc.run_pipeline(g, "shared-source")
    assert not rep.records[0].modified, rep.records[0].notes

    plain = models.GraphBuilder("plain", 17, 0)
    poly = models._poly_setup(plain, models.POLY_A, models.POLY_B, models.POLY_C)
    x = plain.add_input("input", [1, 3, 16, 16])
    models._cifar_resnet(plain, x, 3, widths=[16, 32], blocks=[3, 3], num_classes=10, poly=poly,
                         logits_shape=[1, 10])
    plain = plain.model("plain ResNet, same weights")
    assert {i.name for i in plain.graph.initializer} == {i.name for i in model.graph.initializer}
    rg = _load_canonical(plain)
    rep = hc.run_pipeline(rg, "shared-source")
    assert rep.records[0].modified
    xin = _input(model, 3)
    ref = ort_run(model, xin)[0]
    assert rel_err(hc.run_graph(rg, xin)[0], ref) < 1e-5
    assert rel_err(ort_run(plain, xin)[0], ref) > 1e-3  # the rewrite did change the plain network


def test_shared_source_resnet_poly_compiles_and_shares_alignment(models):
    """Compiled exactly with the default options; the lowering brings the shared
    source down to the Adds' level once and fans it out (``shared_alignments``).
    Without ``share_alignment`` every Add mod-switches the source on its own: the
    same program plus the extra mod-switches, still exact.

    A reuse needs two Adds that read the source at the same level. The default plan
    (N=8192, 2 levels) refreshes after every activation, so every Add of a stage
    meets the source at the same level: 2 reuses in layer1 (3 Adds read s1) and 1 in
    layer2 (2 Adds read s2). With a longer chain (e.g. N=8192, 3 levels of 2^30, or
    N=16384/32768) the optimal refresh placement makes the Adds read the source at
    different levels, and there is nothing to reuse (0, with or without sharing)."""
    model = models.MODELS["shared_source_resnet_poly"]()
    res = compile_model(model, CompileOptions())
    _check_compiled(res, model)
    g = res.graph
    # the canonical graph keeps the six residual Adds and their sharing
    assert len(_encrypted_adds(g)) == 6
    for src, fan in (("/relu/Add_1_output_0", 3), ("/layer2/layer2.0/relu_1/Add_1_output_0", 2)):
        assert sum(u.op == "Add" for u in g.value(src).users) == fan, src
    shared = res.chosen.lowering.stats.shared_alignments
    assert shared == res.metadata["report"]["shared_alignments"]
    assert shared > 0, (res.chosen.label, res.metadata["report"]["refresh_points"])
    assert "shared-source:" in res.report_text

    off = compile_model(model, CompileOptions(plan=PlanOptions(lowering=LoweringOptions(share_alignment=False))))
    _check_compiled(off, model)
    assert off.chosen.lowering.stats.shared_alignments == 0
    assert off.metadata["report"]["shared_alignments"] == 0
    assert off.chosen.label == res.chosen.label
    # the HE pass share-mod-switch then shares what the lowering did not: the same program
    assert off.prog.op_counts() == res.prog.op_counts()

    # the lowering alone (no HE passes): every reuse saves the mod-switch of each of the
    # source's ciphertexts, and nothing else changes
    def raw(share: bool):
        lo = LoweringOptions(share_alignment=share, he_passes="")
        return compile_model(model, CompileOptions(plan=PlanOptions(lowering=lo))).prog.op_counts()

    on_ops, off_ops = raw(True), raw(False)
    assert off_ops.get("mod_switch", 0) - on_ops.get("mod_switch", 0) >= shared
    assert {k: v for k, v in on_ops.items() if k != "mod_switch"} == \
        {k: v for k, v in off_ops.items() if k != "mod_switch"}
