"""The slot simulator: runs an HE program on numpy vectors, one per ciphertext.

It executes exactly the instructions the SEAL backend would (same rotations,
same plaintext vectors, same order), without encryption: every ciphertext is
its slot vector of real values.  It checks the planned level and scale of
every result, counts every op, tracks live ciphertexts, and predicts the SEAL
latency from the measured cost table.  Fast enough for ResNet-sized programs.

``noise`` adds an estimate of CKKS error (fresh-encryption and rescale
rounding noise of the right order for the scale), to see how precision
degrades; without it the simulator is exact up to float64 rounding.

It also checks what encryption would get silently wrong: a value whose
magnitude times its scale reaches half the ciphertext modulus of its level
(``Q_l / 2``, the product of the primes still in the chain) wraps around on
decryption.  Such a run raises :class:`ModulusOverflow` (``strict``, the
default) and is recorded in ``RunStats.modulus_use`` either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from hecompiler.costmodel import CostModel, ct_bytes, instr_cost
from hecompiler.errors import HecError
from hecompiler.heprog import HEProgram
from hecompiler.plaintexts import PlaintextFactory, rot
from hecompiler.runtime import LinearPlans, pack_inputs, run_linear


@dataclass
class RunStats:
    op_counts: dict[str, int] = field(default_factory=dict)
    plaintexts: int = 0
    encode_seconds: float = 0.0  # predicted, part of predicted_seconds
    predicted_seconds: float = 0.0
    predicted_by_op: dict[str, float] = field(default_factory=dict)
    peak_live_ciphertexts: int = 0
    peak_ciphertext_bytes: int = 0
    wall_seconds: float = 0.0
    per_node: dict[str, float] = field(default_factory=dict)  # predicted seconds per graph node
    #: max over results of |value| * scale / (Q_level / 2): at 1 a real decryption wraps around
    modulus_use: float = 0.0
    modulus_use_at: str = ""


class ModulusOverflow(HecError):
    """A value too large for the ciphertext modulus at its level: encrypted, it would wrap around."""


#: noise constants k in std = k * N / scale (see Simulator._noise)
NOISE_K = {"fresh": 0.12, "rescale": 0.12, "keyswitch": 3.0}


class _NumpyPrimitives:
    """The primitive ops of a ``linear`` macro on slot vectors."""

    def __init__(self, pf: PlaintextFactory, sim: "Simulator"):
        self.pf = pf
        self.sim = sim

    def rotate(self, ct, step):
        r = rot(ct, step)
        return r + self.sim._noise(self.sim._cur_scale, len(r), "keyswitch") if self.sim.noise else r

    def mul_plain(self, ct, ref, level):
        return ct * self.pf.vector(ref)

    def add(self, a, b):
        return a + b

    def rescale(self, ct, scale):
        if self.sim.noise:
            return ct + self.sim._noise(scale, len(ct), "rescale")
        return ct

    def add_plain(self, ct, ref, level):
        return ct + self.pf.vector(ref)

    def zero(self, level, scale):
        return np.zeros(self.pf.S)


class Simulator:
    name = "sim"

    def __init__(self, prog: HEProgram, cost: CostModel | None = None, noise: bool = False, seed: int = 0,
                 strict: bool = True):
        self.prog = prog
        self.strict = strict
        # log2(Q_l / 2) for each level l (primes q_0 .. q_l remain)
        self._half_q_bits = np.cumsum([np.log2(float(q)) for q in prog.primes]) - 1.0
        self.cost = cost or CostModel()
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self._cur_scale = prog.params.scale

    def _noise(self, scale: float, n: int, kind: str = "fresh") -> np.ndarray:
        """CKKS error of one op, in real units: std = k * N / scale, with k
        measured on SEAL (benchmarks/measure_seal_costs.py prints it): fresh
        encryption and rescale rounding ~0.12, key switching (rotation,
        relinearisation) ~3 with the special prime we use."""
        k = NOISE_K[kind]
        return self.rng.normal(0.0, k * self.prog.params.poly_degree / scale, n)

    def _note_magnitude(self, k: int, ins, rs, stats: RunStats) -> None:
        peak = max(float(np.abs(r).max()) for r in rs) if rs else 0.0
        if peak == 0.0:
            return
        use = (2.0 ** (np.log2(peak) + np.log2(ins.scale) - self._half_q_bits[ins.level])
               if np.isfinite(peak) else np.inf)  # inf or NaN: overflowed float64 long before
        if use > stats.modulus_use:
            stats.modulus_use = float(use)
            stats.modulus_use_at = f"instruction {k} ({ins.op} -> %{ins.out}{', ' + ins.note if ins.note else ''})"
        if self.strict and use >= 1.0:
            raise ModulusOverflow(
                f"{stats.modulus_use_at}: a value of magnitude {peak:.4g} at level {ins.level} (scale "
                f"2^{np.log2(ins.scale):.1f}) exceeds half the ciphertext modulus 2^{self._half_q_bits[ins.level] + 1:.1f}: "
                f"encrypted, it would wrap around and the output would be garbage (is the input much larger than "
                f"the program was planned for?)")

    def run(self, inputs: dict[str, np.ndarray], progress=None) -> tuple[dict[str, np.ndarray], RunStats]:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected and reported per value
            return self._run(inputs, progress)

    def _run(self, inputs: dict[str, np.ndarray], progress=None) -> tuple[dict[str, np.ndarray], RunStats]:
        prog = self.prog
        S = prog.params.slots
        N = prog.params.poly_degree
        pf = PlaintextFactory(prog)
        stats = RunStats()
        t0 = time.perf_counter()
        vals: dict[int, np.ndarray] = {}
        meta: dict[int, tuple[int, float]] = {}
        for v, row in pack_inputs(prog, inputs).items():
            vals[v] = row + (self._noise(prog.params.scale, S, "fresh") if self.noise else 0)
            meta[v] = (prog.params.top_level, prog.params.scale)
        last = prog.last_uses()
        counts: dict[str, int] = {}
        by_op: dict[str, float] = {}
        live_peak = 0
        bytes_peak = 0
        plans = LinearPlans(prog, pf)
        prim = _NumpyPrimitives(pf, self)
        for k, ins in enumerate(prog.instrs):
            a = [vals[x] for x in ins.args]
            op = ins.op
            self._cur_scale = meta[ins.args[0]][1] if ins.args else prog.params.scale
            if op == "linear":
                rs = run_linear(prog, ins, a, plans.plan(ins.plain.args[0]), prim)
            elif op == "rotate":
                rs = [rot(a[0], ins.step) + (self._noise(ins.scale, S, "keyswitch") if self.noise else 0)]
            elif op == "add":
                rs = [a[0] + a[1]]
            elif op == "sub":
                rs = [a[0] - a[1]]
            elif op == "negate":
                rs = [-a[0]]
            elif op == "add_plain":
                rs = [a[0] + pf.vector(ins.plain)]
            elif op == "mul_plain":
                rs = [a[0] * pf.vector(ins.plain)]
            elif op == "mul":
                rs = [a[0] * a[1] + (self._noise(ins.scale, S, "keyswitch") if self.noise else 0)]
            elif op == "rescale":
                rs = [a[0] + (self._noise(ins.scale, S, "rescale") if self.noise else 0)]
            elif op == "refresh":
                rs = [a[0] + (self._noise(ins.scale, S, "fresh") if self.noise else 0)]
            elif op == "mod_switch":
                rs = [a[0]]
            else:
                raise HecError(f"instruction {k}: unknown op {op!r}")
            for o, r in zip(ins.results, rs):
                vals[o] = r
                meta[o] = (ins.level, ins.scale)
            self._note_magnitude(k, ins, rs, stats)
            by, enc, cnt = instr_cost(ins, prog, self.cost)
            for op_, n_ in cnt.items():
                counts[op_] = counts.get(op_, 0) + n_
            for op_, t_ in by.items():
                by_op[op_] = by_op.get(op_, 0.0) + t_
            stats.encode_seconds += enc
            stats.per_node[ins.note] = stats.per_node.get(ins.note, 0.0) + sum(by.values()) + enc
            stats.plaintexts += cnt.get("mul_plain", 0) + cnt.get("add_plain", 0)
            for x in set(ins.args):
                if last.get(x, -1) <= k:
                    vals.pop(x, None)
            live = len(vals)
            if live > live_peak:
                live_peak = live
                bytes_peak = max(bytes_peak, sum(ct_bytes(N, meta[v][0] + 1) for v in vals))
            if progress is not None:
                progress(1)
        outs = {}
        for io in prog.outputs:
            lay = prog.layouts[io.layout]
            packed = np.stack([vals[v] for v in io.values])
            outs[io.name] = (lay.unpack(packed) * io.alpha).reshape(io.shape)
        stats.op_counts = dict(sorted(counts.items()))
        stats.predicted_by_op = dict(sorted(by_op.items()))
        stats.predicted_seconds = sum(by_op.values()) + stats.encode_seconds
        stats.peak_live_ciphertexts = live_peak
        stats.peak_ciphertext_bytes = bytes_peak
        stats.wall_seconds = time.perf_counter() - t0
        return outs, stats
