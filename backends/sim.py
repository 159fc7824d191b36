"""The slot simulator: the HE program on numpy vectors, one per ciphertext.

It runs on the same executor as the encrypted backends
(:class:`hecompiler.executor.Executor`): the same instructions, rotations and
plaintext vectors in the same order, with the same level and exact-scale
checks.  Its ciphertext (:class:`SimCt`) is the slot vector of real values
plus the level and scale that encryption would give, computed with the one op
table (:mod:`hecompiler.opsem`) as SEAL computes them: a rescale divides the
scale by the level's prime, a product multiplies the scales, an addition of
two different scales is refused.  Op counts, live ciphertexts and the
predicted latency (measured cost table) come with every run; fast enough for
ResNet-sized programs.

``noise`` adds CKKS error: each fresh encryption, rescale and key switch
(rotation, relinearisation) adds Gaussian noise of the standard deviation
measured on SEAL at that ring degree (per slot for key switching, whose error
is far larger in the first slots) (``noise`` of the cost table, written by
``benchmarks/measure_seal_costs.py`` / ``hecompile calibrate``; see
:meth:`hecompiler.costmodel.CostModel.noise`), in units of the ciphertext's
scale.  Each encoded plaintext vector gets its own fixed rounding error (in
units of the plaintext's scale), which every ct-pt product multiplies by the
ciphertext's slots, garbage slots included: with large ciphertext values and
many products summed into one slot this dominates (a ResNet-18 classifier's
1.3e-4 on SEAL, against 9e-7 predicted without it).  Without ``noise`` the
simulator is exact up to float64 rounding.

It also checks what encryption would get silently wrong: a value whose
magnitude times its scale reaches half the ciphertext modulus of its level
(``Q_l / 2``, the product of the primes still in the chain) wraps around on
decryption.  Such a run raises :class:`ModulusOverflow` (``strict``, the
default) and is recorded in ``ExecStats.modulus_use`` either way.
"""

from __future__ import annotations

import functools

import numpy as np

from hecompiler.costmodel import CostModel
from hecompiler.errors import HecError
from hecompiler.executor import ExecStats, Executor, where
from hecompiler.heprog import HEProgram
from hecompiler.opsem import OpSemanticsError, result_meta
from hecompiler.plaintexts import rot
from hecompiler.runtime import pack_inputs

#: the table's ``encode`` noise is the product error of a ciphertext of slots uniform on [-1, 1]
#: (root mean square 1/sqrt(3)) times a plaintext encoded at the rescale prime (about the 2^40 scale
#: the figure is expressed in): per unit of ciphertext, the encoding error is that figure times
#: sqrt(3), over the plaintext's own scale (backends/seal_costs.py, "noise")
ENCODE_RMS_M = 3.0 ** 0.5

#: the simulator's run statistics are the executor's
RunStats = ExecStats


class ModulusOverflow(HecError):
    """A value too large for the ciphertext modulus at its level: encrypted, it would wrap around."""


class BootstrapRangeError(ModulusOverflow):
    """A value too large for the target's bootstrap: encrypted, it would come out as garbage."""


#: how close two copies of a replicated slot vector must be, relative to its largest value, to
#: count as copies (they differ by the noise of the ops that made them: about 1e-7 of the range)
COPY_TOLERANCE = 1e-4


def copies(vec: np.ndarray, slots: int) -> np.ndarray | int:
    """How many times over a slot vector repeats (``slots`` over its least power-of-two period;
    per row of a batch, as a column): a replicated layout (``hecompiler.layout.Layout.replicated``)
    puts the message's polynomial on every r-th coefficient, each sqrt(r) times larger than the
    same values spread over all slots, and a bootstrap's error grows with the coefficients
    (:meth:`SimPrimitives._bootstrap_std`).  A vector of zeros counts once."""
    v = np.asarray(vec, np.float64).reshape(-1, slots)
    out = np.ones((len(v), 1))
    for row, x in enumerate(v):
        top = float(np.abs(x).max())
        if not top > 0 or not np.isfinite(top):
            continue
        p = slots
        while p > 1 and p % 2 == 0 and np.abs(x.reshape(-1, p // 2) - x[: p // 2]).max() <= COPY_TOLERANCE * top:
            p //= 2
        out[row, 0] = slots // p
    return out if np.ndim(vec) > 1 else int(out[0, 0])


class SimCt:
    """A simulated ciphertext: slot values (real units) with the level and scale encryption gives."""

    __slots__ = ("vec", "level", "scale")

    def __init__(self, vec: np.ndarray, level: int, scale: float):
        self.vec = vec
        self.level = level
        self.scale = scale


class SimPt:
    __slots__ = ("vec", "scale", "level")

    def __init__(self, vec, scale: float, level: int):
        self.vec = vec
        self.scale = scale
        self.level = level


class SimPrimitives:
    """The backend primitives on :class:`SimCt` (see :class:`hecompiler.executor.Primitives`)."""

    name = "the simulator"
    refresh_kind = "inline"
    bootstraps = False

    def copy(self, ct: SimCt) -> SimCt:
        return ct  # SimCt is never modified in place

    def __init__(self, prog: HEProgram, noise: dict[str, float] | None, rng: np.random.Generator, strict: bool,
                 bootstrap_max_abs: float | None = None):
        self.prog = prog
        #: a bootstrapping target accepts refresh inputs with |v| <= this (None: no limit)
        self.boot_max = bootstrap_max_abs
        self.refresh_peaks: dict[int, float] = {}  # refresh instruction -> largest |input slot|
        self._pending_peaks: list = []  # per refreshed ciphertext its largest |input slot| (per row in a batch run)
        self.S = prog.params.slots
        self.primes = prog.primes
        self.top = prog.params.top_level
        self.delta = prog.params.scale
        self.noise = noise
        self._stds: dict = {}
        self.rng = rng
        self.strict = strict
        # log2(Q_l / 2) for each level l (primes q_0 .. q_l remain)
        self._half_q_bits = np.cumsum([np.log2(float(q)) for q in prog.primes]) - 1.0

    # ---------------------------------------------------------------- helpers
    def _meta(self, op: str, cts, **kw) -> tuple[int, float]:
        try:
            return result_meta(op, [(c.level, c.scale) for c in cts], self.primes, self.top, self.delta, **kw)
        except OpSemanticsError as e:
            raise HecError(f"the simulator refuses it, as encryption would: {e}") from None

    def _noisy(self, vec: np.ndarray, kind: str, scale: float) -> np.ndarray:
        if not self.noise:
            return vec
        return vec + self.rng.normal(0.0, 1.0, vec.shape) * (self._std(kind) / scale)

    def _std(self, kind: str):
        """Standard deviation (times the scale) of op ``kind``'s error: a number, or per slot when
        the measurement has a profile (key switching's first slots)."""
        if kind not in self._stds:
            std = self.noise[kind]
            head = self.noise.get(kind + "_head")
            if head:
                v = np.full(self.S, std)
                v[: len(head)] = head[: self.S]
                std = v
            self._stds[kind] = std
        return self._stds[kind]

    def fresh(self, vec: np.ndarray) -> SimCt:
        return SimCt(self._noisy(np.asarray(vec, np.float64), "fresh", self.delta), self.top, self.delta)

    # ---------------------------------------------------------------- primitives
    def meta(self, ct: SimCt) -> tuple[int, float]:
        return ct.level, ct.scale

    def set_scale(self, ct: SimCt, scale: float) -> SimCt:
        # relabelling changes what the ciphertext decrypts to by old/new (as in SEAL)
        return SimCt(ct.vec * (ct.scale / scale), ct.level, scale)

    def encode(self, vec: np.ndarray, scale: float, level: int) -> SimPt:
        # encoding rounds the plaintext's coefficients to 1/scale: a fixed error per plaintext, in
        # every slot (zeros included), which a ct-pt product multiplies by the ciphertext's slots
        if self.noise and self.noise.get("encode"):
            vec = np.asarray(vec, np.float64)
            vec = vec + self.rng.normal(0.0, 1.0, vec.shape) * (self.noise["encode"] * ENCODE_RMS_M / scale)
        return SimPt(vec, scale, level)

    def encode_scalar(self, value: float, scale: float, level: int) -> SimPt:
        return SimPt(value, scale, level)

    def rotate(self, ct: SimCt, step: int) -> SimCt:
        return SimCt(self._noisy(rot(ct.vec, step), "keyswitch", ct.scale), ct.level, ct.scale)

    def rotate_many(self, ct: SimCt, steps) -> list[SimCt]:
        return [self.rotate(ct, s) for s in steps]

    def add(self, a: SimCt, b: SimCt) -> SimCt:
        lv, sc = self._meta("add", (a, b))
        return SimCt(a.vec + b.vec, lv, sc)

    def sub(self, a: SimCt, b: SimCt) -> SimCt:
        lv, sc = self._meta("sub", (a, b))
        return SimCt(a.vec - b.vec, lv, sc)

    def negate(self, a: SimCt) -> SimCt:
        return SimCt(-a.vec, a.level, a.scale)

    def _check_pt(self, ct: SimCt, pt: SimPt, op: str) -> None:
        if pt.level != ct.level:
            raise HecError(f"the simulator refuses it, as encryption would: {op}: plaintext encoded at level "
                           f"{pt.level}, ciphertext at level {ct.level}")

    def add_plain(self, ct: SimCt, pt: SimPt) -> SimCt:
        self._check_pt(ct, pt, "add_plain")
        lv, sc = self._meta("add_plain", (ct,), plain_scale=pt.scale)
        return SimCt(ct.vec + pt.vec, lv, sc)

    def mul_plain(self, ct: SimCt, pt: SimPt) -> SimCt:
        self._check_pt(ct, pt, "mul_plain")
        lv, sc = self._meta("mul_plain", (ct,), plain_scale=pt.scale)
        return SimCt(ct.vec * pt.vec, lv, sc)

    def mul(self, a: SimCt, b: SimCt) -> SimCt:
        lv, sc = self._meta("mul", (a, b))
        return SimCt(self._noisy(a.vec * b.vec, "keyswitch", sc), lv, sc)

    def rescale(self, ct: SimCt) -> SimCt:
        lv, sc = self._meta("rescale", (ct,))
        return SimCt(self._noisy(ct.vec, "rescale", sc), lv, sc)

    def mod_switch(self, ct: SimCt, level: int) -> SimCt:
        lv, sc = self._meta("mod_switch", (ct,), to_level=level)
        return SimCt(ct.vec, lv, sc)

    def zero(self, level: int, scale: float) -> SimCt:
        return SimCt(np.zeros(self.S), level, scale)

    def refresh(self, cts: list[SimCt]) -> list[SimCt]:
        self._pending_peaks = [np.abs(c.vec).max(axis=-1) if c.vec.size else 0.0 for c in cts]
        if not (self.noise and "refresh" in self.noise):  # client-aided: a fresh encryption
            return [SimCt(self._noisy(c.vec, "fresh", self.delta), self.top, self.delta) for c in cts]
        return [SimCt(c.vec + self.rng.normal(0.0, 1.0, c.vec.shape) * (self._bootstrap_std(c.vec) / self.delta),
                      self.top, self.delta) for c in cts]

    def _bootstrap_std(self, vec: np.ndarray):
        """A bootstrap's error (std times the scale) on input slots ``vec`` (per row of a batch): the
        measured floor, plus the growth of its sine approximation with the cube of the message
        polynomial's coefficients.  The constant coefficient is the slots' mean; the others, for a
        zero-mean vector of standard deviation s repeated r times (a replicated layout: every r-th
        coefficient, sqrt(r) times larger), grow as (s sqrt(r))^3.  Both rates are measured on the
        target (``refresh_dc_cubic`` on a constant vector, ``refresh_ac_cubic`` on a uniform one,
        ``benchmarks/measure_lattigo_costs.py --refresh-growth``); a table without them has the floor
        only.  toy-n12 at the bootstrap's range 16: a constant vector errs by 1.6e-3, a uniform one
        on [-16, 16] by 8.9e-7, the floor is 1e-7; zero padding divides the mean (so a replicated
        tensor, which has none, errs more than the same tensor padded with zeros)."""
        base = self._std("refresh")
        dc, ac = self.noise.get("refresh_dc_cubic"), self.noise.get("refresh_ac_cubic")
        if not dc and not ac:
            return base
        v = np.asarray(vec, np.float64).reshape(-1, self.S)
        mean = v.mean(axis=1, keepdims=True)
        spread = np.sqrt(np.maximum((v * v).mean(axis=1, keepdims=True) - mean * mean, 0.0) * copies(v, self.S))
        std = np.sqrt(np.square(base) + np.square((dc or 0.0) * np.abs(mean) ** 3) + np.square((ac or 0.0) * spread ** 3))
        return std if np.ndim(vec) > 1 else std.reshape(())

    # ---------------------------------------------------------------- the modulus check
    def observe(self, k: int, ins, results, stats: ExecStats) -> None:
        if ins.op == "refresh" and self._pending_peaks:
            inp_rows = self._pending_peaks.pop(0)
            inp = float(np.max(inp_rows))
            self.refresh_peaks[k] = inp
            if self.boot_max is not None:
                use = inp / self.boot_max if np.isfinite(inp) else np.inf
                if use > stats.bootstrap_use:
                    stats.bootstrap_use = float(use)
                if np.ndim(inp_rows):
                    stats.bootstrap_use_rows = _row_max(stats.bootstrap_use_rows, np.where(
                        np.isfinite(inp_rows), inp_rows / self.boot_max, np.inf))
                if self.strict and use > 1.0:
                    raise BootstrapRangeError(
                        f"{where(k, ins)}: a value of magnitude {inp:.4g} enters a bootstrap that accepts "
                        f"|v| <= {self.boot_max:g}: encrypted, the output would be garbage (is the input much "
                        f"larger than the program was planned for?)")
        rows = [np.abs(r.vec).max(axis=-1) for r in results if r.vec.size]  # per batch row in a batch run
        if not rows:
            return
        row_peak = functools.reduce(np.maximum, rows)
        peak = float(np.max(row_peak))
        if peak == 0.0:
            return
        with np.errstate(divide="ignore"):  # inf or NaN: overflowed float64 long before
            row_use = np.where(np.isfinite(row_peak), 2.0 ** (np.log2(row_peak) + np.log2(ins.scale)
                                                               - self._half_q_bits[ins.level]), np.inf)
        use = float(np.max(row_use))
        if np.ndim(row_use):
            stats.modulus_use_rows = _row_max(stats.modulus_use_rows, row_use)
        if use > stats.modulus_use:
            stats.modulus_use = float(use)
            stats.modulus_use_at = where(k, ins)
        if self.strict and use >= 1.0:
            raise ModulusOverflow(
                f"{where(k, ins)}: a value of magnitude {peak:.4g} at level {ins.level} (scale "
                f"2^{np.log2(ins.scale):.1f}) exceeds half the ciphertext modulus "
                f"2^{self._half_q_bits[ins.level] + 1:.1f}: encrypted, it would wrap around and the output would be "
                f"garbage (is the input much larger than the program was planned for?)")


def _row_max(old, new):
    """The running per-row maximum of a batch run's statistic (``old`` None at first)."""
    new = np.asarray(new, np.float64)
    return new.copy() if old is None else np.maximum(old, new)


class Simulator:
    """Runs a program in the slot simulator: ``Simulator(prog).run({name: x}) -> (outputs, stats)``."""

    name = "sim"

    def __init__(self, prog: HEProgram, cost: CostModel | None = None, noise: bool = False, seed: int = 0,
                 strict: bool = True, target=None):
        """``target`` (:class:`hecompiler.target.Target`): where the program will run; its cost
        table prices the ops and gives the noise, and a bootstrapping target's refreshes are
        checked against the bootstrap's input range."""
        self.prog = prog
        self.cost = cost or (target.cost_model() if target is not None else CostModel())
        self.noise = noise
        self.strict = strict
        self.rng = np.random.default_rng(seed)
        consts = self.cost.noise(prog.params.poly_degree) if noise else None
        rng = getattr(target, "bootstrap_range", None)
        self.prim = SimPrimitives(prog, consts, self.rng, strict, rng.max_abs if rng is not None else None)

    def run(self, inputs: dict[str, np.ndarray], progress=None) -> tuple[dict[str, np.ndarray], ExecStats]:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected and reported per value
            return self._run(inputs, progress, batch=None)

    def run_batch(self, inputs: dict[str, np.ndarray], progress=None) -> tuple[dict[str, np.ndarray], ExecStats]:
        """Run ``B`` inputs at once: each named input is an array ``(B, *shape)``, each output comes
        back as ``(B, *shape)``.  Every ciphertext's slot vector becomes a ``(B, slots)`` array, so
        one pass over the program does the work of ``B`` runs (the compile-time checks run a
        program on many inputs).  Rows get independent noise draws; the statistics (modulus use,
        refresh peaks) are the largest over the rows, as ``B`` separate runs would report them."""
        sizes = {len(v) for v in inputs.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise HecError(f"run_batch: the inputs have different batch sizes {sorted(sizes)}" if len(sizes) > 1
                           else "run_batch: give each input as a non-empty batch (B, *shape)")
        with np.errstate(over="ignore", invalid="ignore"):
            return self._run(inputs, progress, batch=sizes.pop())

    def _run(self, inputs, progress, batch):
        prog = self.prog
        ex = Executor(prog, self.prim, self.cost)
        if batch is None:
            packed = pack_inputs(prog, inputs)
        else:
            rows = [pack_inputs(prog, {k: v[b] for k, v in inputs.items()}) for b in range(batch)]
            packed = {v: np.stack([r[v] for r in rows]) for v in rows[0]}
        cts = {v: self.prim.fresh(row) for v, row in packed.items()}
        out_cts, stats = ex.run_all(cts, progress=progress)
        outs = {}
        for io in prog.outputs:
            lay = prog.layouts[io.layout]
            packed = np.stack([np.broadcast_to(out_cts[v].vec, (self.prim.S,) if batch is None else (batch, self.prim.S))
                               for v in io.values], axis=-2)  # (..., n_ct, slots)
            if batch is None:
                outs[io.name] = (lay.unpack(packed) * io.alpha).reshape(io.shape)
            else:
                outs[io.name] = np.stack([(lay.unpack(p) * io.alpha).reshape(io.shape) for p in packed])
        return outs, stats
