"""Pass registry, pipeline specs, verification after each pass, dumps, reports."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import hecompiler as hc
from hecompiler.ir import Graph, TensorType


def graph_with_identities():
    g = Graph("g")
    x = g.add_input("x", TensorType((1, 3)))
    a = g.add_node("Identity", [x])
    b = g.add_node("Relu", [a.output])
    g.outputs = [b.output]
    return g


@hc.register_pass
@dataclass(frozen=True)
class ScaleOutputs(hc.Pass):
    """A user pass (approximating: it changes the function) with options."""

    name = "test-scale-outputs"
    summary = "multiply every output by a factor"
    exact = False
    factor: float = 2.0
    note: bool = False

    def run(self, graph, ctx):
        outs = []
        for v in graph.outputs:
            k = graph.add_constant(np.array(self.factor, np.float32), "factor")
            outs.append(graph.add_node("Mul", [v, k]).output)
        graph.outputs = outs
        return hc.PassResult(True, [f"scaled by {self.factor}"] if self.note else [])


@hc.register_pass
@dataclass(frozen=True)
class BreakOrder(hc.Pass):
    name = "test-break-order"
    summary = "deliberately breaks the topological order"
    exact = True

    def run(self, graph, ctx):
        graph.nodes.reverse()
        return hc.PassResult(True)


def test_spec_parsing_and_options():
    ps = hc.parse_pipeline("remove-identity, test-scale-outputs{factor=3,note=true},dce")
    assert [p.name for p in ps] == ["remove-identity", "test-scale-outputs", "dce"]
    assert ps[1].factor == 3.0 and ps[1].note is True
    assert ps[1].spec == "test-scale-outputs{factor=3.0,note=true}"


@pytest.mark.parametrize("spec, message", [
    ("no-such-pass", r"unknown pass 'no-such-pass'; known passes: .*fold-bn"),
    ("test-scale-outputs{size=2}", r"pass test-scale-outputs has no option 'size'; options: factor, note"),
    ("test-scale-outputs{factor=big}", r"option factor must be float, got 'big'"),
    ("test-scale-outputs{note=maybe}", r"option note must be bool"),
    ("test-scale-outputs{factor}", r"needs key=value"),
    ("fold-bn;dce", r"cannot parse .;. \(passes are separated by .,.\) at column 8"),
    ("fold-bn,,dce", r"expected a pass name at column 9"),
])
def test_bad_specs(spec, message):
    with pytest.raises(hc.HecError, match=message):
        hc.parse_pipeline(spec)


def test_registration_rules():
    with pytest.raises(hc.PassError, match="kebab-case"):
        @hc.register_pass
        @dataclass(frozen=True)
        class Bad(hc.Pass):
            name = "Bad_Name"
            summary = "x"

    with pytest.raises(hc.PassError, match="already registered"):
        @hc.register_pass
        @dataclass(frozen=True)
        class Dup(hc.Pass):
            name = "dce"
            summary = "x"


def test_report_counts_nodes_and_marks_approximations():
    g = graph_with_identities()
    rep = hc.run_pipeline(g, "remove-identity,test-scale-outputs{note=true}")
    assert not rep.exact
    text = rep.format()
    assert "remove-identity" in text and "exact" in text and "2->1" in text and "Identity -1" in text
    assert "approx" in text and "Mul +1" in text and "scaled by 2.0" in text
    y = hc.run_graph(g, np.array([[-1.0, 0.5, 2.0]], np.float32))[0]
    np.testing.assert_allclose(y, [[0.0, 1.0, 4.0]])


def test_verifier_runs_after_each_pass_and_names_it():
    g = Graph("g")
    x = g.add_input("x", TensorType((1, 3)))
    a = g.add_node("Relu", [x])
    b = g.add_node("Relu", [a.output])
    g.outputs = [b.output]
    with pytest.raises(hc.VerificationError, match=r"after pass test-break-order[\s\S]*used before it is defined"
                                                   r"[\s\S]*passes run: dce, test-break-order"):
        hc.run_pipeline(g, "dce,test-break-order")


def test_dump_after_writes_text_and_dot(tmp_path):
    g = graph_with_identities()
    hc.run_pipeline(g, "remove-identity,dce", dump_after=["all"], dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-input.dot", "00-input.ir", "01-remove-identity.dot", "01-remove-identity.ir",
                     "02-dce.dot", "02-dce.ir"]
    assert hc.parse_graph((tmp_path / "01-remove-identity.ir").read_text()).op_counts() == {"Relu": 1}
    assert (tmp_path / "02-dce.dot").read_text().startswith("digraph")
    with pytest.raises(hc.PassError, match="not in the pipeline: fold-bn"):
        hc.run_pipeline(graph_with_identities(), "dce", dump_after=["fold-bn"], dump_dir=tmp_path)


def test_dot_has_ops_shapes_and_constant_sizes():
    g = Graph("g")
    x = g.add_input("x", TensorType((1, 2, 4, 4)))
    w = g.add_constant(np.ones((3, 2, 3, 3), np.float32), "w")
    c = g.add_node("Conv", [x, w], {"pads": [1, 1, 1, 1]})
    g.outputs = [c.output]
    dot = hc.to_dot(g)
    assert "<b>Conv</b>" in dot and "1x3x4x4" in dot
    assert "54 elems" in dot and 'label="1x2x4x4"' in dot


def test_dot_select_draws_one_part_with_stand_ins_and_skips():
    g = Graph("g")
    x = g.add_input("x", TensorType((1, 2, 4, 4)))
    w = g.add_constant(np.ones((2, 2, 3, 3), np.float32), "w")
    a = g.add_node("Conv", [x, w], {"pads": [1, 1, 1, 1]}, name="/stem/conv")
    b = g.add_node("Conv", [a.output, w], {"pads": [1, 1, 1, 1]}, name="/block/conv")
    s = g.add_node("Add", [b.output, x], name="/block/add")
    c = g.add_node("Conv", [s.output, w], {"pads": [1, 1, 1, 1]}, name="/head/conv")
    g.outputs = [c.output]
    dot = hc.to_dot(g, select="/block/*", show_constants=False)
    assert dot.count("<b>Conv</b>") == 1 and "<b>Add</b>" in dot
    assert f"from %{a.output.name}" in dot  # the branch input, drawn as a stand-in
    assert "input %x" in dot and "style=dashed" in dot  # the skip from the graph input, still a skip
    assert "output %" not in dot and "%w" not in dot
    with pytest.raises(hc.HecError, match=r"--select '/nothing/\*': matches no node"):
        hc.to_dot(g, select="/nothing/*")
