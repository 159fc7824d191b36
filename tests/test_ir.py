"""Graph IR invariants: editing API, immutability, verifier messages, text round trips."""

from __future__ import annotations

import numpy as np
import pytest

import hecompiler as hc
from hecompiler.ir import Graph, TensorType


def small_graph():
    g = Graph("g")
    x = g.add_input("x", TensorType((1, 2, 4, 4)))
    w = g.add_constant(np.ones((2, 2, 3, 3), np.float32), "w")
    c = g.add_node("Conv", [x, w], {"pads": [1, 1, 1, 1]})
    r = g.add_node("Relu", [c.output])
    g.outputs = [r.output]
    return g


def test_build_infers_types_and_fills_defaults():
    g = small_graph()
    conv = g.nodes[0]
    assert conv.output.type == TensorType((1, 2, 4, 4))
    assert dict(conv.attrs) == {"dilations": (1, 1), "group": 1, "pads": (1, 1, 1, 1), "strides": (1, 1)}
    hc.verify(g)


def test_inputs_and_attrs_are_immutable():
    g = small_graph()
    n = g.nodes[0]
    with pytest.raises(AttributeError, match="set_input"):
        n.inputs = ()
    with pytest.raises(TypeError):
        n.attrs["group"] = 2
    with pytest.raises(ValueError):
        g.constants["w"].data[0, 0, 0, 0] = 3.0


def test_replace_all_uses_keeps_use_lists():
    g = small_graph()
    conv, relu = g.nodes
    clip = g.add_node("Clip", [conv.output], {"min": 0.0, "max": 6.0}, after=conv)
    g.replace_all_uses(conv.output, clip.output)
    # the clip itself must keep using the conv: fix it back
    clip.set_input(0, conv.output)
    assert relu.inputs[0] is clip.output
    assert [(n.op, i) for n, i in conv.output.uses] == [("Clip", 0)]
    hc.verify(g)


def test_remove_used_node_is_refused():
    g = small_graph()
    with pytest.raises(ValueError, match="still used"):
        g.remove_node(g.nodes[0])


def test_clone_prints_identically():
    g = small_graph()
    assert hc.print_graph(g.clone()) == hc.print_graph(g)


def test_verifier_reports_type_mismatch_beside_the_node():
    text = """graph g(%x: f32[1,2,4,4]) {
  %w = const f32[2,2,3,3] b64"%s"
  %c = Conv(%x, %w) : f32[1,2,2,2]
  return %c
}
"""
    import base64
    raw = base64.b64encode(np.zeros(36, np.float32).tobytes()).decode()
    hc.verify(hc.parse_graph(text.replace("%s", raw)))  # 4x4 conv 3x3, no pads: 2x2 is right
    g2 = hc.parse_graph(text.replace("%s", raw).replace("f32[1,2,2,2]", "f32[1,2,3,3]"))
    with pytest.raises(hc.VerificationError) as e:
        hc.verify(g2)
    msg = str(e.value)
    assert "  %c = Conv(%x, %w) {dilations=[1, 1]" in msg
    assert "error: result types f32[1,2,3,3] but Conv gives f32[1,2,2,2]" in msg


def test_verifier_catches_use_before_definition():
    g = small_graph()
    g.nodes.reverse()
    with pytest.raises(hc.VerificationError, match="used before it is defined"):
        hc.verify(g)


def test_verifier_catches_bad_shapes_at_build_time():
    g = Graph("g")
    x = g.add_input("x", TensorType((1, 3, 4, 4)))
    w = g.add_constant(np.ones((2, 2, 3, 3), np.float32), "w")
    with pytest.raises(hc.VerificationError, match="weight expects 2 input channels, input has 3"):
        g.add_node("Conv", [x, w])
    with pytest.raises(hc.VerificationError, match="has no attribute"):
        g.add_node("Relu", [x], {"alpha": 1.0})
    with pytest.raises(hc.VerificationError, match="unknown IR op 'Softmax'"):
        g.add_node("Softmax", [x])


def test_special_floats_and_quoted_names_round_trip():
    g = Graph("odd name")
    x = g.add_input("in put", TensorType((1, 4)))
    k = g.add_constant(np.array([np.inf, -np.inf, -0.0, 1e-30], np.float32), "k:1")
    big = g.add_constant(np.linspace(-1, 1, 40).astype(np.float32).reshape(1, 40)[:, :4].repeat(10, 0)[:1], "big")
    a = g.add_node("Add", [x, k])
    m = g.add_node("Mul", [a.output, big], name="weird \"loc\"")
    c = g.add_node("Clip", [m.output], {"min": -np.inf, "max": 6.0})
    g.outputs = [c.output]
    text = hc.print_graph(g)
    assert '%"in put"' in text and "inf" in text and "-0.0" in text
    g2 = hc.parse_graph(text)
    assert hc.print_graph(g2) == text
    np.testing.assert_array_equal(g2.constants["k:1"].data, g.constants["k:1"].data)
    assert np.signbit(g2.constants["k:1"].data[2])


def test_large_constants_round_trip_bit_exactly():
    g = Graph("g")
    x = g.add_input("x", TensorType((1, 100)))
    data = np.random.default_rng(1).standard_normal((1, 100)).astype(np.float32)
    c = g.add_constant(data, "c")
    g.outputs = [g.add_node("Add", [x, c]).output]
    text = hc.print_graph(g)
    assert 'b64"' in text
    np.testing.assert_array_equal(hc.parse_graph(text).constants["c"].data, data)


@pytest.mark.parametrize("bad, message", [
    ('  %y = Relu(%nope) : f32[1,4]\n', r"<ir>:3:\d+: use of undefined value %nope"),
    ('  %y = Relu(%x) : f32[1,4]\n  %y = Relu(%x) : f32[1,4]\n', r"value %y is defined twice"),
    ('  %y = Relu(%x) {alpha=1.0} : f32[1,4]\n', r"Relu has no attribute"),
    ('  %y = Relu(%x) : f32[1,4\n', r"<ir>:4:3: unexpected 'return'"),
    ('  %c = const f32[3] [1.0, 2.0]\n', r"constant %c: 2 values for f32\[3\]"),
    ('  %c = const f32[30] <30 elements>\n', r"<ir>:3:\d+: unexpected"),
])
def test_parse_errors_point_at_the_source(bad, message):
    text = "graph g(%x: f32[1,4]) {\n  %z = Relu(%x) : f32[1,4]\n" + bad + "  return %z\n}\n"
    with pytest.raises(hc.ParseError, match=message) as e:
        hc.parse_graph(text)
    assert "^" in str(e.value)


def test_elided_print_is_for_reading_only():
    g = Graph("g")
    x = g.add_input("x", TensorType((1, 100)))
    c = g.add_constant(np.zeros((1, 100), np.float32), "c")
    g.outputs = [g.add_node("Add", [x, c]).output]
    text = hc.print_graph(g, elide_constants=16)
    assert "<100 elements>" in text
    with pytest.raises(hc.ParseError):
        hc.parse_graph(text)
