"""The slot simulator: runs an HE program on numpy vectors, one per ciphertext.

It executes exactly the instructions the SEAL backend would (same rotations,
same plaintext vectors, same order), without encryption: every ciphertext is
its slot vector of real values.  It checks the planned level and scale of
every result, counts every op, tracks live ciphertexts, and predicts the SEAL
latency from the measured cost table.  Fast enough for ResNet-sized programs.

``noise`` adds an estimate of CKKS error (fresh-encryption and rescale
rounding noise of the right order for the scale), to see how precision
degrades; without it the simulator is exact up to float64 rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from hecompiler.costmodel import CostModel, ct_bytes
from hecompiler.errors import HecError
from hecompiler.heprog import HEProgram
from hecompiler.plaintexts import PlaintextFactory, rot


@dataclass
class RunStats:
    op_counts: dict[str, int] = field(default_factory=dict)
    plaintexts: int = 0
    predicted_seconds: float = 0.0
    predicted_by_op: dict[str, float] = field(default_factory=dict)
    peak_live_ciphertexts: int = 0
    peak_ciphertext_bytes: int = 0
    wall_seconds: float = 0.0
    per_node: dict[str, float] = field(default_factory=dict)  # predicted seconds per graph node


class Simulator:
    name = "sim"

    def __init__(self, prog: HEProgram, cost: CostModel | None = None, noise: bool = False, seed: int = 0):
        self.prog = prog
        self.cost = cost or CostModel()
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def _noise(self, scale: float, n: int) -> np.ndarray:
        # rounding to integers at scale `scale` plus fresh-encryption error (sigma 3.2, ~sqrt(N) terms)
        sigma = 3.2 * np.sqrt(self.prog.params.poly_degree) / scale
        return self.rng.normal(0.0, sigma, n)

    def run(self, inputs: dict[str, np.ndarray], progress=None) -> tuple[dict[str, np.ndarray], RunStats]:
        prog = self.prog
        S = prog.params.slots
        N = prog.params.poly_degree
        pf = PlaintextFactory(prog)
        stats = RunStats()
        t0 = time.perf_counter()
        vals: dict[int, np.ndarray] = {}
        meta: dict[int, tuple[int, float]] = {}
        for io in prog.inputs:
            if io.name not in inputs:
                raise HecError(f"missing input {io.name!r}")
            x = np.asarray(inputs[io.name], np.float64)
            if x.shape != tuple(io.shape):
                raise HecError(f"input {io.name!r}: expected shape {list(io.shape)}, got {list(x.shape)}")
            packed = prog.layouts[io.layout].pack(x)
            for v, row in zip(io.values, packed):
                vals[v] = row + (self._noise(prog.params.scale, S) if self.noise else 0)
                meta[v] = (prog.params.top_level, prog.params.scale)
        last = prog.last_uses()
        counts: dict[str, int] = {}
        by_op: dict[str, float] = {}
        live_peak = 0
        bytes_peak = 0
        for k, ins in enumerate(prog.instrs):
            a = [vals[x] for x in ins.args]
            op = ins.op
            if op == "rotate":
                r = rot(a[0], ins.step)
            elif op == "add":
                r = a[0] + a[1]
            elif op == "sub":
                r = a[0] - a[1]
            elif op == "negate":
                r = -a[0]
            elif op == "add_plain":
                r = a[0] + pf.vector(ins.plain)
            elif op == "mul_plain":
                r = a[0] * pf.vector(ins.plain)
            elif op == "mul":
                r = a[0] * a[1]
            elif op in ("rescale", "mod_switch", "refresh"):
                r = a[0]
                if self.noise and op == "rescale":
                    r = r + self._noise(ins.scale, S)
            else:
                raise HecError(f"instruction {k}: unknown op {op!r}")
            vals[ins.out] = r
            meta[ins.out] = (ins.level, ins.scale)
            counts[op] = counts.get(op, 0) + 1
            primes = (ins.level + 1) if op not in ("rescale", "mod_switch") else ins.level + 2
            cost = self.cost.op_seconds(op, N, primes if op != "refresh" else prog.params.top_level + 1)
            if ins.plain is not None:
                cost += self.cost.encode_seconds(N, primes) if ins.plain.kind != "scalar" else \
                    self.cost.op_seconds("encode_constant", N, primes)
                stats.plaintexts += 1
            by_op[op] = by_op.get(op, 0.0) + cost
            stats.per_node[ins.note] = stats.per_node.get(ins.note, 0.0) + cost
            for x in set(ins.args):
                if last.get(x, -1) <= k:
                    vals.pop(x, None)
            live = len(vals)
            if live > live_peak:
                live_peak = live
            b = sum(ct_bytes(N, meta[v][0] + 1) for v in vals)
            bytes_peak = max(bytes_peak, b)
            if progress is not None:
                progress(1)
        outs = {}
        for io in prog.outputs:
            lay = prog.layouts[io.layout]
            packed = np.stack([vals[v] for v in io.values])
            outs[io.name] = (lay.unpack(packed) * io.alpha).reshape(io.shape)
        stats.op_counts = dict(sorted(counts.items()))
        stats.predicted_by_op = dict(sorted(by_op.items()))
        stats.predicted_seconds = sum(by_op.values())
        stats.peak_live_ciphertexts = live_peak
        stats.peak_ciphertext_bytes = bytes_peak
        stats.wall_seconds = time.perf_counter() - t0
        return outs, stats
