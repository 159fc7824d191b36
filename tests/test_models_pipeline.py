"""Every reference model, and models shaped like torch.onnx.export output, through
import + the default canonical pipeline: the interpreter and the exported ONNX
agree with onnxruntime on the original to 1e-4 relative error, and the IR
round-trips through its textual form."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import hecompiler as hc
from conftest import ort_run, rel_err

SMALL = ["tiny_resnet", "tiny_resnet_poly", "resnet20", "resnet20_poly", "diracnet", "diracnet_poly",
         "shared_source_resnet_poly", "torchlike_cnn", "torchlike_shape_chains", "torchlike_stack_sum", "dynamic_batch"]
CASES = [(name, opset) for name in SMALL for opset in (13, 17)]


def _build(models, name, opset):
    fn = models.MODELS[name]
    return fn(opset=opset) if "opset" in inspect.signature(fn).parameters else fn()


@pytest.mark.parametrize("name, opset", CASES, ids=[f"{n}-op{o}" for n, o in CASES])
def test_canonical_pipeline_matches_onnxruntime(models, name, opset):
    model = _build(models, name, opset)
    g = hc.load_onnx(model)
    before = len(g.nodes)
    report = hc.run_pipeline(g)
    assert report.exact
    x = np.random.default_rng(7).standard_normal(g.inputs[0].type.shape).astype(np.float32)
    ref = ort_run(model, x)[0]
    assert rel_err(hc.run_graph(g, x)[0], ref) < 1e-4
    assert rel_err(ort_run(hc.to_onnx(g), x)[0], ref) < 1e-4
    # canonical form: no BN left after a conv, no identities, no explicit pads before convs
    ops = g.op_counts()
    assert not {"BatchNormalization", "Identity", "Dropout", "Pad", "MatMul", "ReduceSum"} & set(ops), ops
    assert len(g.nodes) <= before
    text = hc.print_graph(g)
    assert hc.print_graph(hc.parse_graph(text)) == text


def test_diracnet_weights_fold_to_plain_convs(models):
    g = hc.load_onnx(models.MODELS["diracnet"]())
    ops = g.op_counts()
    assert not {"Mul", "Div", "Sqrt", "ReduceSum", "ReduceL2"} & set(ops), ops
    assert ops["Conv"] >= 4


def test_torch_shape_chains_fold_to_static_reshapes(models):
    g = hc.load_onnx(models.MODELS["torchlike_shape_chains"]())
    assert all(n.op not in {"Shape", "Gather", "Concat", "ConstantOfShape", "Cast"} or n.op == "Concat"
               for n in g.nodes)
    for n in g.nodes:
        if n.op == "Reshape":
            assert all(d >= 0 for d in n.attrs["shape"])


def test_stack_sum_becomes_adds(models):
    g = hc.load_onnx(models.MODELS["torchlike_stack_sum"]())
    hc.run_pipeline(g)
    assert "Concat" not in g.op_counts() and "ReduceSum" not in g.op_counts()
