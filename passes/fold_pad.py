"""``fold-pad``: a zero-valued spatial Pad in front of a Conv (or an AveragePool
that counts pads) becomes part of that op's own ``pads`` attribute.

The Pad node stays if something else uses its result.
"""

from __future__ import annotations

from dataclasses import dataclass

from hecompiler.passmanager import Pass, PassResult, register_pass
from hecompiler.rewrite import RewritePattern, apply_patterns, erase_if_dead, replace_result


def _spatial_pads(pad):
    """The Pad node's [top, left, bottom, right] if it pads only H and W with 0."""
    p = pad.attrs["pads"]
    if pad.attrs["value"] != 0.0 or len(p) != 8 or any(p[i] for i in (0, 1, 4, 5)):
        return None
    return [p[2], p[3], p[6], p[7]]


class FoldPadIntoConv(RewritePattern):
    op = "Conv"

    def match_and_rewrite(self, conv, graph):
        pad = conv.inputs[0].producer
        if pad is None or pad.op != "Pad":
            return False
        extra = _spatial_pads(pad)
        if extra is None:
            return False
        attrs = dict(conv.attrs)
        attrs["pads"] = [a + b for a, b in zip(conv.attrs["pads"], extra)]
        new = graph.add_node("Conv", [pad.inputs[0]] + list(conv.inputs[1:]), attrs, name=conv.name, after=conv)
        replace_result(graph, conv.output, new)
        erase_if_dead(graph, pad)
        return True


class FoldPadIntoAvgPool(RewritePattern):
    op = "AveragePool"

    def match_and_rewrite(self, pool, graph):
        pad = pool.inputs[0].producer
        if pad is None or pad.op != "Pad":
            return False
        extra = _spatial_pads(pad)
        if extra is None or pool.attrs["ceil_mode"]:
            return False
        if any(pool.attrs["pads"]) and not pool.attrs["count_include_pad"]:
            return False  # mixing counted and uncounted padding is not expressible
        attrs = dict(pool.attrs)
        attrs["pads"] = [a + b for a, b in zip(pool.attrs["pads"], extra)]
        attrs["count_include_pad"] = 1
        if any(attrs["pads"][i] >= attrs["kernel_shape"][i % 2] for i in range(4)):
            return False
        new = graph.add_node("AveragePool", [pad.inputs[0]], attrs, name=pool.name, after=pool)
        replace_result(graph, pool.output, new)
        erase_if_dead(graph, pad)
        return True


@register_pass
@dataclass(frozen=True)
class FoldPad(Pass):
    name = "fold-pad"
    summary = "fold zero Pad nodes into the pads of the following Conv/AveragePool"
    exact = True

    def run(self, graph, ctx):
        n = apply_patterns(graph, [FoldPadIntoConv(), FoldPadIntoAvgPool()])
        return PassResult(n > 0, [f"folded {n} Pad(s)"] if n else [])
