"""The no-skips cost bound of benchmarks/skips.py: dropping every residual Add
keeps each block's branch (the deeper operand) and nothing else."""

from __future__ import annotations

import importlib.util

import hecompiler as hc
from conftest import ROOT


def _skips_module():
    spec = importlib.util.spec_from_file_location("skips_bench", ROOT / "benchmarks" / "skips.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_drop_skips_keeps_the_branches(models):
    skips = _skips_module()
    g = hc.load_onnx(models.MODELS["tiny_resnet_poly"]())
    hc.run_pipeline(g)
    convs = g.op_counts()["Conv"]
    assert skips.drop_skips(g) == 2  # the identity block and the downsampling block
    hc.run_pipeline(g, "dce")
    hc.verify(g)
    counts = g.op_counts()
    assert "Add" not in counts
    assert counts["Conv"] == convs - 1  # the 1x1 projection of the downsampling skip is gone
    assert counts["Poly"] == 5  # every activation stays


def test_drop_identity_skips_keeps_projection_blocks(models):
    skips = _skips_module()
    g = hc.load_onnx(models.MODELS["tiny_resnet_poly"]())
    hc.run_pipeline(g)
    convs = g.op_counts()["Conv"]
    assert skips.drop_skips(g, identity_only=True) == 1  # the identity block only
    hc.run_pipeline(g, "dce")
    hc.verify(g)
    counts = g.op_counts()
    assert counts["Add"] == 1 and counts["Conv"] == convs  # the projection block keeps its Add and 1x1 conv
