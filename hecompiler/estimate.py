"""Bounds computed from shapes alone, before anything is lowered.

:func:`lower_bounds` gives, for a parameter set, a lower bound on the memory a program must
hold (the ciphertexts of the input at the top level, and of the largest linear op's input and
output at the lowest level a linear op can read) and on its latency (each ct-pt multiplication
handles at most ``slots`` multiply-accumulates), so the planner drops candidates that cannot
fit the budgets (``--max-memory``, ``--max-seconds``) before spending time lowering them.
"""

from __future__ import annotations

import math

from .costmodel import CostModel, ct_bytes
from .errors import HecError
from .heprog import Params
from .ir import Graph

_LINEAR = ("Conv", "Gemm", "MatMul", "AveragePool", "GlobalAveragePool", "BatchNormalization")


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape else 1


def _taps(node) -> int:
    """Input elements one output element of ``node`` reads."""
    if node.op == "Conv":
        w = node.inputs[1].type.shape
        return _numel(w[1:])  # C_in/group * kh * kw
    if node.op in ("Gemm", "MatMul"):
        x = node.inputs[0].type.shape
        return int(x[-1]) if x else 1
    if node.op == "AveragePool":
        return _numel(node.attr("kernel_shape", (1,)))
    if node.op == "GlobalAveragePool":
        return _numel(node.inputs[0].type.shape[2:])
    return 1


def lower_bounds(graph: Graph, params: Params, cost: CostModel | None = None) -> dict:
    """Lower bounds on a program's peak memory (bytes) and latency (seconds) under ``params``:
    the input at the top level plus the largest activation held beside its consumer's output at
    one level above the bottom (two primes), and ``sum(MACs) / slots`` ct-pt multiplications at
    two primes.  Anything the lowering builds costs at least this much."""
    n, slots = params.poly_degree, params.slots
    top = params.top_level + 1
    inputs = sum(math.ceil(_numel(v.type.shape) / slots) for v in graph.inputs)
    mem = inputs * ct_bytes(n, top)
    peak_act = 0
    for node in graph.nodes:
        if node.op in _LINEAR:
            cts_in = math.ceil(_numel(node.inputs[0].type.shape) / slots)
            cts_out = math.ceil(_numel(node.outputs[0].type.shape) / slots)
            peak_act = max(peak_act, cts_in + cts_out)
    mem = max(mem, peak_act * ct_bytes(n, 2))
    macs = sum(_numel(nd.outputs[0].type.shape) * _taps(nd) for nd in graph.nodes if nd.op in _LINEAR)
    mults = math.ceil(macs / slots)
    seconds = 0.0
    if cost is not None:
        try:
            seconds = mults * (cost.op_seconds("mul_plain", n, 2) + cost.op_seconds("encode", n, 2))
        except HecError:
            seconds = 0.0
    return {"memory_bytes": mem, "ct_pt_mults": mults, "seconds": seconds}
