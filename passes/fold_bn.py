"""``fold-bn``: BatchNormalization after a Conv or Gemm becomes new weights and bias.

``BN(Conv(x, W, b))`` with ``s = scale / sqrt(var + eps)`` is
``Conv(x, W * s, (b - mean) * s + B)``; likewise for Gemm along its output
columns.  Only folds when the Conv/Gemm result feeds the BN alone and its
weights are constants.  Arithmetic in float64, stored in the weight dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hecompiler.passmanager import Pass, PassResult, register_pass
from hecompiler.rewrite import RewritePattern, apply_patterns, replace_result, sole_user


def _bn_affine(bn):
    scale, beta, mean, var = (v.data.astype(np.float64) for v in bn.inputs[1:5])
    s = scale / np.sqrt(var + bn.attrs["epsilon"])
    return s, beta - mean * s


class FoldIntoConv(RewritePattern):
    op = "BatchNormalization"

    def match_and_rewrite(self, bn, graph):
        y = bn.inputs[0]
        conv = y.producer
        if conv is None or conv.op != "Conv" or sole_user(y, graph) is not bn:
            return False
        if not all(v.is_constant for v in bn.inputs[1:]) or not all(v.is_constant for v in conv.inputs[1:]):
            return False
        s, t = _bn_affine(bn)
        w = conv.inputs[1].data
        b = conv.inputs[2].data.astype(np.float64) if len(conv.inputs) > 2 else np.zeros(w.shape[0])
        w2 = graph.add_constant((w.astype(np.float64) * s[:, None, None, None]).astype(w.dtype),
                                conv.inputs[1].name + ".bn")
        b2 = graph.add_constant((b * s + t).astype(w.dtype), (conv.inputs[2].name if len(conv.inputs) > 2
                                                             else conv.inputs[1].name + ".bias") + ".bn")
        new = graph.add_node("Conv", [conv.inputs[0], w2, b2], dict(conv.attrs), name=conv.name, after=bn)
        replace_result(graph, bn.output, new)
        return True


class FoldIntoGemm(RewritePattern):
    op = "BatchNormalization"

    def match_and_rewrite(self, bn, graph):
        y = bn.inputs[0]
        gemm = y.producer
        if gemm is None or gemm.op != "Gemm" or sole_user(y, graph) is not bn:
            return False
        if not all(v.is_constant for v in bn.inputs[1:]) or not all(v.is_constant for v in gemm.inputs[1:]):
            return False
        a = gemm.attrs
        s, t = _bn_affine(bn)
        bmat = gemm.inputs[1].data
        b64 = bmat.astype(np.float64) * (s[:, None] if a["transB"] else s[None, :])
        c = a["beta"] * gemm.inputs[2].data.astype(np.float64) if len(gemm.inputs) > 2 else np.zeros(s.shape)
        c2 = c * s + t
        w2 = graph.add_constant(b64.astype(bmat.dtype), gemm.inputs[1].name + ".bn")
        cv = graph.add_constant(c2.astype(bmat.dtype), gemm.inputs[1].name + ".bias.bn")
        attrs = dict(a)
        attrs["beta"] = 1.0
        new = graph.add_node("Gemm", [gemm.inputs[0], w2, cv], attrs, name=gemm.name, after=bn)
        replace_result(graph, bn.output, new)
        return True


@register_pass
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = "fold BatchNormalization into the preceding Conv or Gemm weights"
    exact = True

    def run(self, graph, ctx):
        n = apply_patterns(graph, [FoldIntoConv(), FoldIntoGemm()])
        return PassResult(n > 0, [f"folded {n} BatchNormalization(s)"] if n else [])
