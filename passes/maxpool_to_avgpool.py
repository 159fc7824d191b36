"""``maxpool-to-avgpool``: MaxPool becomes AveragePool with the same kernel,
strides, pads and ceil_mode (approximating).

The average over each window replaces the maximum; padded positions are not
counted (``count_include_pad=0``), so a border window averages its real
elements only, like MaxPool ignores its -inf padding.  Needs no calibration
and no levels beyond the one every linear op takes.  How much it changes a
model trained with MaxPool shows in the compile report's fidelity section;
``maxpool-to-poly`` is the closer (and much deeper) alternative.
"""

from __future__ import annotations

from dataclasses import dataclass

from hecompiler.passmanager import Pass, PassResult, register_pass
from hecompiler.rewrite import replace_result


@register_pass
@dataclass(frozen=True)
class MaxPoolToAvgPool(Pass):
    name = "maxpool-to-avgpool"
    summary = "MaxPool -> AveragePool with the same window (approximating)"
    exact = False

    def run(self, graph, ctx):
        todo = [n for n in graph.nodes if n.op == "MaxPool"]
        record = ctx.options.setdefault("approximation", {}).setdefault("activations", [])
        for node in todo:
            a = dict(node.attrs)
            a["count_include_pad"] = 0
            new = graph.add_node("AveragePool", [node.inputs[0]], a, name=node.name, after=node)
            record.append({"pass": self.name, "node": node.name or node.output.name, "op": "MaxPool",
                           "input": node.inputs[0].name, "approximation": "AveragePool "
                           f"{list(a['kernel_shape'])} stride {list(a['strides'])}", "depth": 1})
            replace_result(graph, node.output, new)
        return PassResult(bool(todo), [f"{len(todo)} MaxPool(s) -> AveragePool"] if todo else [])
