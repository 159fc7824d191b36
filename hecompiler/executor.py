"""The one executor of HE programs; backends supply primitives.

:class:`Executor` runs a program instruction by instruction on any backend:
it dispatches each op to the backend's :class:`Primitives`, expands ``linear``
macros (:func:`hecompiler.runtime.run_linear`), makes the plaintexts (from the
compact weights, at the level where they are used), checks every result's
level and exact scale against the plan with the one op table
(:mod:`hecompiler.opsem`), frees ciphertexts after their last use, keeps
statistics (measured and, given a cost model, predicted), reports progress in
units of work, and handles refreshes the way the backend does them:

* ``refresh_kind == "client"`` (SEAL): the evaluation stops at a batch of
  consecutive refreshes and returns; the key holder answers the request and
  :meth:`Executor.run` resumes with the response.  :class:`EvalState` is all
  there is to save in between.
* ``refresh_kind == "inline"`` (bootstrapping backends, the simulator): the
  backend's :meth:`Primitives.refresh` refreshes the batch on the spot.

Backends never see instructions, only primitive operations on their own
ciphertext type; a backend that can hoist rotations implements
``rotate_many``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from .costmodel import (CostModel, encode_pipeline, instr_cost, linear_temporaries, peak_rss_bytes, split_saving,
                        split_shape)
from .errors import HecError
from .heprog import LINEAR_PRIMITIVES, HEProgram, Instr, PlainRef
from .opsem import SCALE_SNAP, OpSemanticsError, instr_meta
from .plaintexts import PlaintextCache, PlaintextFactory
from .parallel import HelperError, Helpers, RemoteParts, by_outputs, default_processes, split_work
from .prefetch import Prefetcher, stream_order
from .runtime import LinearPlans, group_order, part_inputs, run_linear


#: an all-zero plaintext, remembered as such (the product is an encryption of zero)
_ZERO = object()

class ExecutionError(HecError):
    """A program could not be executed: a bad state, a refused ciphertext, or a backend result
    that disagrees with the plan."""


class Primitives(Protocol):
    """What a backend implements, on its own ciphertext (and plaintext) types."""

    name: str
    #: "client": refreshes go to the key holder (the executor suspends); "inline": :meth:`refresh`
    refresh_kind: str

    def meta(self, ct: Any) -> tuple[int, float]: ...           # (level, exact scale)
    def set_scale(self, ct: Any, scale: float) -> Any: ...      # relabel after a rescale (snap)
    def encode(self, vec: np.ndarray, scale: float, level: int) -> Any: ...
    def encode_scalar(self, value: float, scale: float, level: int) -> Any: ...
    def rotate(self, ct: Any, step: int) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def sub(self, a: Any, b: Any) -> Any: ...
    def negate(self, a: Any) -> Any: ...
    def add_plain(self, ct: Any, pt: Any) -> Any: ...
    def mul_plain(self, ct: Any, pt: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...                    # with relinearisation
    def rescale(self, ct: Any) -> Any: ...                       # divide by q_level
    def mod_switch(self, ct: Any, level: int) -> Any: ...
    def zero(self, level: int, scale: float) -> Any: ...
    # optional: rotate_many(ct, steps) -> list (hoisted), refresh(cts) -> list (inline refresh),
    # observe(k, ins, results) (after every instruction), release(ct)


def where(k: int, ins: Instr) -> str:
    return f"instruction {k} ({ins.op} -> %{ins.out}{', ' + ins.note if ins.note else ''})"


# --------------------------------------------------------------------------- statistics

@dataclass
class ExecStats:
    """What a run did and cost.  ``seconds_by_op`` is measured wall time (a ``linear`` macro's
    time is under ``"linear"``); ``predicted_by_op`` what the cost model says for the same ops."""

    op_counts: dict[str, int] = field(default_factory=dict)
    seconds_by_op: dict[str, float] = field(default_factory=dict)
    encode_seconds: float = 0.0  # plaintext generation + encoding the evaluation waited for (inside seconds_by_op)
    plaintexts: int = 0
    plaintexts_reused: int = 0  # served by the executor's plaintext cache (same reference or same content)
    refreshes: int = 0  # ciphertexts refreshed (client-aided or bootstrapped)
    refresh_round_trips: int = 0  # batches sent to the key holder
    bootstraps: int = 0
    peak_live_ciphertexts: int = 0
    peak_rss_bytes: int = 0
    galois_keys: int = 0
    galois_key_bytes: int = 0
    relin_key_bytes: int = 0
    eval_seconds: float = 0.0  # wall time spent evaluating (client refresh time included in one-process runs)
    phases: dict[str, float] = field(default_factory=dict)  # keygen/encrypt/eval/decrypt/total (one-process runs)
    per_node: dict[str, float] = field(default_factory=dict)  # measured seconds per graph node
    predicted_by_op: dict[str, float] = field(default_factory=dict)
    predicted_encode_seconds: float = 0.0
    predicted_per_node: dict[str, float] = field(default_factory=dict)
    #: the simulator's check of value magnitudes against the modulus (see backends/sim.py)
    modulus_use: float = 0.0
    modulus_use_at: str = ""
    #: the simulator's check of bootstrap inputs against the target's range (largest |v| / limit)
    bootstrap_use: float = 0.0
    #: in a simulator batch run, the two above for each row (arrays of the batch size; None otherwise)
    modulus_use_rows: Any = None
    bootstrap_use_rows: Any = None
    #: linear ops shared with helper processes (hecompiler.parallel): how many, the ciphertexts that
    #: travelled, the seconds this process spent serializing and loading them, the helpers' own
    #: seconds (encoding included) and their largest resident memory
    split_linears: int = 0
    transfer_ciphertexts: int = 0
    transfer_seconds: float = 0.0
    helper_seconds: float = 0.0
    helper_encode_seconds: float = 0.0
    helper_peak_rss_bytes: int = 0

    #: predicted seconds of linear-op work the helper processes take off this one (costmodel.split_saving)
    predicted_shared_seconds: float = 0.0

    @property
    def predicted_seconds(self) -> float:
        return sum(self.predicted_by_op.values()) + self.predicted_encode_seconds - self.predicted_shared_seconds

    @property
    def wall_seconds(self) -> float:
        return self.eval_seconds

    def add(self, op: str, seconds: float, n: int = 1) -> None:
        self.op_counts[op] = self.op_counts.get(op, 0) + n
        self.seconds_by_op[op] = self.seconds_by_op.get(op, 0.0) + seconds

    def add_linear(self, counts: Mapping[str, int], seconds: float) -> None:
        for op, n in counts.items():
            if op in LINEAR_PRIMITIVES:
                self.op_counts[op] = self.op_counts.get(op, 0) + n
        self.seconds_by_op["linear"] = self.seconds_by_op.get("linear", 0.0) + seconds

    def to_dict(self) -> dict:
        return {k: (dict(sorted(v.items())) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ExecStats":
        s = cls()
        for k, v in d.items():
            if k in s.__dict__:
                setattr(s, k, dict(v) if isinstance(v, dict) else v)
        return s

    def format(self) -> str:
        lines = []
        if self.phases:
            lines.append("phases: " + ", ".join(f"{k} {v:.3f} s" for k, v in self.phases.items()))
        boot = f", {self.bootstraps} bootstraps" if self.bootstraps else ""
        lines.append(f"eval {self.eval_seconds:.3f} s, {self.refreshes} refreshes in "
                     f"{self.refresh_round_trips} round trips{boot}, encode {self.encode_seconds:.3f} s "
                     f"({self.plaintexts} plaintexts" + (f", {self.plaintexts_reused} reused" if self.plaintexts_reused else "") + ")")
        if self.split_linears:
            lines.append(f"{self.split_linears} linear ops shared with helper processes: {self.helper_seconds:.3f} s "
                         f"in the helpers ({self.helper_encode_seconds:.3f} s encoding), {self.transfer_ciphertexts} "
                         f"ciphertexts passed ({self.transfer_seconds:.3f} s here)")
        lines.append(f"  {'op':<10} {'count':>6}  {'time':>10}")
        for op in sorted(self.op_counts):
            t = self.seconds_by_op.get(op)
            n = self.op_counts[op]
            tt = f"{t:8.3f} s  {1e3 * t / max(n, 1):8.3f} ms/op" if t else "(in linear)"
            lines.append(f"  {op:<10} {n:>6}  {tt}")
        if "linear" in self.seconds_by_op:
            lines.append(f"  {'linear':<10} {'':>6}  {self.seconds_by_op['linear']:8.3f} s  (convolutions and "
                         f"other linear ops: their rotations, ct-pt mults, adds, rescales, encoding)")
        helpers = f" (each helper process {self.helper_peak_rss_bytes / 2**20:.0f} MiB at most)" \
            if self.helper_peak_rss_bytes else ""
        lines.append(f"peak live ciphertexts {self.peak_live_ciphertexts}, peak RSS "
                     f"{self.peak_rss_bytes / 2**20:.0f} MiB{helpers}, Galois keys {self.galois_keys} "
                     f"({self.galois_key_bytes / 2**20:.1f} MiB)")
        return "\n".join(lines)


@dataclass
class EvalState:
    """Where a resumable evaluation stands.

    ``pc``: index of the next instruction; ``live``: value id -> ciphertext; while waiting for
    the key holder: ``pending`` (indices of the refresh instructions), ``request`` (refresh
    output id -> the ciphertext to refresh, what is sent) and ``request_id`` (echoed back)."""

    pc: int = 0
    live: dict[int, Any] = field(default_factory=dict)
    pending: list[int] = field(default_factory=list)
    request: dict[int, Any] = field(default_factory=dict)
    request_id: str = ""
    stats: ExecStats = field(default_factory=ExecStats)

    @property
    def waiting(self) -> bool:
        return bool(self.pending)

    def done(self, prog: HEProgram) -> bool:
        return self.pc >= len(prog.instrs) and not self.pending


def work_units(prog: HEProgram, ins: Instr) -> int:
    """Progress units of an instruction: the primitive ops it runs (a linear macro's rotations,
    ct-pt multiplications, additions, rescales), at least one."""
    if ins.op == "linear":
        c = prog.linears[ins.plain.args[0]].counts
        return max(1, sum(c.get(op, 0) for op in LINEAR_PRIMITIVES))
    return 1


def total_work(prog: HEProgram) -> int:
    return sum(work_units(prog, ins) for ins in prog.instrs)


class ProgressLog:
    """A ``progress(n)`` callback for :meth:`Executor.run` (or any count of work) that shows up
    where the user looks: a tqdm bar when ``stream`` is a terminal, and otherwise (a log file, a
    service's journal, a pipe) a line every ``interval`` seconds and one at the end, with the
    percentage, the count, the rate and the ETA::

        hecompile: seal eval: 37% (1024/2745 work units), 12.1 s, ETA 20.6 s

    The executor counts work units (:func:`work_units`: the rotations, ct-pt multiplications,
    additions and rescales a macro runs), not instructions, so a convolution of 300 diagonals
    weighs 300 times an addition.  ``prefix`` starts every line (e.g. a session id)."""

    def __init__(self, total: int, desc: str, stream=None, interval: float = 10.0, tty: bool | None = None,
                 unit: str = "work units", prefix: str = "hecompile: ", enabled: bool = True):
        import sys

        self.total = max(0, int(total))
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.interval = float(interval)
        self.unit = unit
        self.prefix = prefix
        self.done = 0
        self.enabled = enabled
        self.t0 = time.monotonic()
        self._last = self.t0
        self._closed = False
        if tty is None:
            try:
                tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                tty = False
        self.bar = None
        if enabled and tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=" " + unit.split()[-1], file=self.stream, leave=False)

    def line(self) -> str:
        el = time.monotonic() - self.t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = ""
        if 0 < self.done < self.total and el > 0:
            eta = f", ETA {el * (self.total - self.done) / self.done:.1f} s"
        return (f"{self.prefix}{self.desc}: {pct:.0f}% ({self.done}/{self.total} {self.unit}), "
                f"{el:.1f} s{eta}")

    def __call__(self, n: int = 1) -> None:
        self.done += int(n)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval and self.done < self.total:
            self._last = now
            self._write(self.line())

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Finish: the bar disappears; in logs a last line is written when earlier lines were (a
        run shorter than ``interval`` writes none)."""
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self._last > self.t0:
            self._write(self.line())

    def __enter__(self) -> "ProgressLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- the executor

class _LinearAdapter:
    """The primitive interface :func:`run_linear` drives, on a backend, with plaintexts made
    and encoded here and rescaled scales snapped to the plan."""

    def __init__(self, ex: "Executor", stats: ExecStats, pre: Prefetcher | None = None):
        self.ex = ex
        self.p = ex.prim
        self.stats = stats
        self.pre = pre
        self._acc = getattr(self.p, "mul_plain_acc", None)

    def _pt(self, ref, level):
        if self.pre is None:
            return self.ex._plain(ref, level, self.stats)
        return self.ex._take(self.pre, ref, level, self.stats)

    def rotate(self, ct, step):
        return self.p.rotate(ct, step)

    def rotate_many(self, ct, steps):
        many = getattr(self.p, "rotate_many", None)
        return many(ct, list(steps)) if many is not None else [self.p.rotate(ct, s) for s in steps]

    def mul_plain(self, ct, ref, level):
        pt = self._pt(ref, level)
        return self.ex.prim.zero(level, self.ex.prim.meta(ct)[1] * ref.scale) if pt is None else \
            self.p.mul_plain(ct, pt)

    def mul_plain_add(self, acc, ct, ref, level):
        """acc + ct * ref: in place with the backend's ``mul_plain_acc`` (acc is the linear op's own
        temporary), else a product and an addition."""
        pt = self._pt(ref, level)
        if pt is None:
            return acc
        if self._acc is not None:
            return self._acc(acc, ct, pt)
        return self.p.add(acc, self.p.mul_plain(ct, pt))

    def add(self, a, b):
        return self.p.add(a, b)

    def rescale(self, ct, scale):
        return self.ex._snap(self.p.rescale(ct), scale, "linear: rescale")

    def add_plain(self, ct, ref, level):
        pt = self._pt(ref, level)
        return ct if pt is None else self.p.add_plain(ct, pt)

    def zero(self, level, scale):
        return self.p.zero(level, scale)


class Executor:
    """Runs ``prog`` on backend primitives ``prim`` (see the module doc)."""

    def __init__(self, prog: HEProgram, prim: Primitives, cost: CostModel | None = None,
                 plaintext_cache_bytes: int | None = None, processes: int | None = None):
        self.prog = prog
        self.prim = prim
        self.cost = cost
        self.pf = PlaintextFactory(prog)
        #: encoded plaintexts reused within a run and across runs (hecompiler.plaintexts.PlaintextCache)
        self.ptcache = PlaintextCache(plaintext_cache_bytes)
        self.plans = LinearPlans(prog, self.pf)
        self.last = prog.last_uses()
        self.top = prog.params.top_level
        self.delta = prog.params.scale
        self._observe = getattr(prim, "observe", None)
        #: threads encoding a linear op's plaintexts ahead of its evaluation (hecompiler.prefetch),
        #: when the backend's encoder runs beside its evaluator
        self.encode_threads = int(getattr(prim, "encode_threads", 0) or 0)
        self._pool = None
        #: predicted seconds of encoding hidden per instruction (costmodel.encode_pipeline), when predicting
        self._hidden: list[float] | None = None
        #: processes sharing the large linear ops (hecompiler.parallel), where the backend forks safely
        #: and serializes its ciphertexts: this one and ``processes - 1`` helpers, forked when first needed
        can_fork = bool(getattr(prim, "forks", False))
        if processes is None:
            processes = default_processes() if can_fork else 1
        if processes < 1:
            raise ExecutionError(f"processes={processes}: at least 1")
        self.processes = processes if can_fork else 1
        self._helpers: Helpers | None = None
        self._shares: bool | None = None  # whether any linear op is shared (known at the first run)

    # ------------------------------------------------------------------ helpers
    def _plain(self, ref: PlainRef, level: int, stats: ExecStats) -> Any:
        """The encoded plaintext of ``ref`` at ``level``, or None when it is all zeros (the
        product is then an encryption of zero: SEAL refuses such products)."""
        t = time.perf_counter()
        if ref.kind == "scalar":
            v = float(ref.args[0])
            pt = None if v == 0.0 else self.prim.encode_scalar(v, ref.scale, level)
            stats.plaintexts += pt is not None
        else:
            pt = self.ptcache.lookup_ref(ref, level)
            if pt is not None:
                stats.plaintexts_reused += 1
            else:
                pt = self._encode(ref, level, stats)
            if pt is _ZERO:
                pt = None
        stats.encode_seconds += time.perf_counter() - t
        return pt

    def _take(self, pre: Prefetcher, ref: PlainRef, level: int, stats: ExecStats) -> Any:
        """The next prefetched plaintext (``ref`` at ``level``), recorded in the cache and the
        statistics as :meth:`_plain` would; the time waited for it counts as encode time."""
        t = time.perf_counter()
        made = pre.take(ref, level)
        cache = self.ptcache
        if made.kind == "ref":
            cache.ref_hits += 1
            stats.plaintexts_reused += 1
        elif made.kind == "content":
            cache.content_hits += 1
            cache.touch(made.key)
            cache.link(ref, level, made.pt, made.key)
            stats.plaintexts_reused += 1
        elif made.kind == "zero":
            cache.store(ref, level, None, _ZERO, 0)
        else:
            cache.store(ref, level, made.key, made.pt, made.nbytes)
            stats.plaintexts += 1
        stats.encode_seconds += time.perf_counter() - t
        return made.pt

    def _stream(self, state: EvalState) -> Prefetcher | None:
        """The plaintexts of the linear ops this run will reach, made ahead on the encoding
        threads (None when the backend encodes on the evaluation thread): every op to the end, or
        (client-aided refresh, where the run stops at a refresh) to the next refresh."""
        if not self.encode_threads:
            return None
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.encode_threads, thread_name_prefix="hec-encode")
        instrs = self.prog.instrs
        stop = len(instrs)
        if self.prim.refresh_kind == "client":
            stop = next((k for k in range(state.pc, len(instrs)) if instrs[k].op == "refresh"), stop)
        plans: dict[int, Any] = {}
        return Prefetcher(stream_order(self.prog, state.pc, stop, self.plans.plan, plans), self.pf.vector,
                          self.prim.encode, self.prim.encode_scalar, self.ptcache, _ZERO, self._pt_bytes, self._pool,
                          self.pf.share_key, plans)

    def _pt_bytes(self, level: int) -> int:
        """Bytes of one encoded plaintext at ``level`` (what the cache and the prefetch window count)."""
        return self.prog.params.poly_degree * (level + 1) * 8

    def warm(self) -> ExecStats:
        """Encode the plaintexts of the program's linear ops into the cache, in program order, until
        it holds no more: what a server does before its first request (a plaintext depends on the
        program and the parameters only, so ``prim`` needs no keys: its ``encode`` and
        ``encode_scalar`` are all that is asked).  The cache then answers the first inference as
        it would answer a second one."""
        from .prefetch import plaintext_order

        stats = ExecStats()
        t = time.perf_counter()
        for ins in self.prog.instrs:
            if ins.op in ("add_plain", "mul_plain"):
                wanted = [(ins.plain, ins.level)]
            elif ins.op == "linear":
                wanted = plaintext_order(self.prog, ins, self.plans.plan(ins.plain.args[0]))
            else:
                continue
            for ref, level in wanted:
                if ref.kind == "scalar":
                    continue  # encoded as it is used (no FFT)
                if self.ptcache.bytes + self._pt_bytes(level) > self.ptcache.budget:
                    stats.encode_seconds = time.perf_counter() - t
                    return stats
                self._plain(ref, level, stats)
        stats.encode_seconds = time.perf_counter() - t
        return stats

    def close(self) -> None:
        """Stop the encoding threads and the helper processes, if any."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        helpers, self._helpers = self._helpers, None
        if helpers is not None:
            helpers.close()

    def _fork_helpers(self) -> None:
        """Fork the helper processes before the evaluation, when any linear op will be shared: a
        fork holds on to the memory of its parent at that moment, so the earlier the leaner (the
        program, the keys and the inputs, not the ciphertexts and plaintexts of a run under way)."""
        if self._helpers is not None or self.processes < 2:
            return
        if self._shares is None:
            self._shares = any(self._split(ins, self.prog.linears[ins.plain.args[0]], None, counts_only=True)
                               for ins in self.prog.instrs if ins.op == "linear")
        if self._shares:
            try:
                self._helpers = Helpers(self, self.processes - 1, self.prim.to_bytes, self.prim.from_bytes)
            except OSError as e:  # no room for another process: evaluate alone, and say so
                import sys

                print(f"hecompiler: could not fork helper processes ({e}); evaluating in one process",
                      file=sys.stderr)
                self.processes = 1

    def _split(self, ins: Instr, lin, plan, counts_only: bool = False) -> list[tuple[list, list]] | None:
        """The parts of ``lin`` (output ciphertexts, group sums) this process and each helper make,
        or None when the op runs here alone (hecompiler.parallel.worth_splitting; ``counts_only``:
        whether it is shared, from the op's counts, without a plan)."""
        if split_shape(ins, self.prog, self.processes) is None:  # the cost model's rule, not a copy of it
            return None
        if counts_only:
            return [([], [])]
        n_out = self.prog.layouts[lin.out_layout].n_ct
        parts = split_work(plan, list(lin.order or range(n_out)),
                           group_order(self.prog, ins, plan) if not by_outputs(n_out, self.processes) else [],
                           self.processes)
        return parts if len(parts) > 1 else None

    def _run_split(self, k: int, ins: Instr, args: list, plan, parts: list[tuple[list, list]], stats: ExecStats,
                   adapter: "_LinearAdapter") -> list[Any]:
        """Linear op ``k`` with the parts after the first made by the helpers while this process
        makes the first (see hecompiler.parallel)."""
        if self._helpers is None:
            self._helpers = Helpers(self, self.processes - 1, self.prim.to_bytes, self.prim.from_bytes)
        helpers = self._helpers
        try:
            t = time.perf_counter()
            for h, (outs, groups) in enumerate(parts[1:]):
                given = {i: self.prim.to_bytes(args[i]) for i in sorted(part_inputs(plan, outs, groups))}
                helpers.submit(h, k, given, outs, groups)
                stats.transfer_ciphertexts += len(given)
            stats.transfer_seconds += time.perf_counter() - t
            remote = RemoteParts(helpers, parts[1:], self.prim.from_bytes, stats)
            outs = run_linear(self.prog, ins, args, plan, adapter, given=remote.groups, given_outputs=remote.outputs)
            remote.finish()
            stats.split_linears += 1
            return outs
        except BaseException:
            # a helper still busy (or dead) cannot serve the next op: start over without them
            self._helpers = None
            helpers.close()
            raise

    def _held(self, ref: PlainRef, level: int, key: tuple | None, stats: ExecStats) -> Any:
        """The cached plaintext of content ``key`` (None: no key, or not held), remembered for
        ``ref`` too."""
        pt = self.ptcache.lookup_content(key) if key is not None else None
        if pt is not None:
            self.ptcache.link(ref, level, pt, key)
            stats.plaintexts_reused += 1
        return pt

    def _encode(self, ref: PlainRef, level: int, stats: ExecStats) -> Any:
        """Generate and encode ``ref`` at ``level`` (a constant vector as a scalar, an all-zero
        one as nothing), sharing the encoding of an identical vector already cached."""
        cache = self.ptcache
        key = self.pf.share_key(ref, level)  # a repeated diagonal is found without making it
        pt = self._held(ref, level, key, stats)
        if pt is not None:
            return pt
        vec = self.pf.vector(ref)
        nbytes = self._pt_bytes(level)
        if not np.any(vec):
            cache.store(ref, level, None, _ZERO, 0)
            return _ZERO
        if np.all(vec == vec[0]):  # a constant: no FFT
            pt = self.prim.encode_scalar(float(vec[0]), ref.scale, level)
            cache.store(ref, level, None, pt, nbytes)
            stats.plaintexts += 1
            return pt
        if key is None:
            key = cache.content_key(vec, level, ref.scale)
            pt = self._held(ref, level, key, stats)
            if pt is not None:
                return pt
        pt = self.prim.encode(vec, ref.scale, level)
        cache.store(ref, level, key, pt, nbytes)
        stats.plaintexts += 1
        return pt

    def _snap(self, ct: Any, planned: float, what: str) -> Any:
        got = self.prim.meta(ct)[1]
        if got != planned:
            if not abs(got - planned) <= SCALE_SNAP * abs(planned):
                raise ExecutionError(f"{what}: {self.prim.name} gives scale {got!r}, the plan {planned!r} "
                                     f"(relative difference {abs(got - planned) / abs(planned):.3g} > {SCALE_SNAP})")
            ct = self.prim.set_scale(ct, planned)
        return ct

    def _check(self, k: int, ins: Instr, cts: Sequence[Any]) -> None:
        for ct in cts:
            lv, sc = self.prim.meta(ct)
            if lv != ins.level or sc != ins.scale:
                raise ExecutionError(f"{where(k, ins)}: {self.prim.name} gives level {lv}, scale {sc!r} but the "
                                     f"program plans level {ins.level}, scale {ins.scale!r}")

    def _note_live(self, state: EvalState) -> None:
        n = len(state.live) + len(state.request)
        if n > state.stats.peak_live_ciphertexts:
            state.stats.peak_live_ciphertexts = n

    def _free(self, k: int, ins: Instr, live: dict[int, Any]) -> None:
        release = getattr(self.prim, "release", None)
        for x in set(ins.args):
            if self.last.get(x, -1) <= k:
                ct = live.pop(x, None)
                if release is not None and ct is not None:
                    release(ct)

    def _predict(self, k: int, ins: Instr, stats: ExecStats) -> None:
        if self.cost is None:
            return
        by, enc, _ = instr_cost(ins, self.prog, self.cost)
        for op, t in by.items():
            stats.predicted_by_op[op] = stats.predicted_by_op.get(op, 0.0) + t
        if self._hidden is None:  # encoded ahead on other cores: what the evaluation waits for
            self._hidden = encode_pipeline(self.prog, self.cost)
        saved = 0.0
        if self.processes > 1:  # priced at the processes this executor has, not the table's machine's
            saved = split_saving(ins, self.prog, self.cost, by, enc, self.processes)[0]
        enc -= self._hidden[k]
        stats.predicted_encode_seconds += enc
        stats.predicted_shared_seconds += saved
        stats.predicted_per_node[ins.note] = (stats.predicted_per_node.get(ins.note, 0.0) + sum(by.values()) + enc
                                              - saved)

    # ------------------------------------------------------------------ one instruction
    def _exec(self, k: int, ins: Instr, live: dict[int, Any], stats: ExecStats,
              pre: Prefetcher | None = None) -> list[Any]:
        args = [live[a] for a in ins.args]
        try:  # the plan must be what the op table gives for the operands actually held
            want = instr_meta(self.prog, ins, [self.prim.meta(a) for a in args])
        except OpSemanticsError as e:
            raise ExecutionError(f"{where(k, ins)}: {e}") from None
        if want != (ins.level, ins.scale):
            raise ExecutionError(f"{where(k, ins)}: the program plans level {ins.level}, scale {ins.scale!r}, but "
                                 f"its operands give level {want[0]}, scale {want[1]!r} (a tampered or "
                                 f"inconsistent program)")
        p = self.prim
        op = ins.op
        if op == "linear":
            lin = self.prog.linears[ins.plain.args[0]]
            # the macro's baby-step rotations and accumulators are alive beside the program's values
            held = len(live) + linear_temporaries(lin) + self.prog.layouts[lin.out_layout].n_ct
            stats.peak_live_ciphertexts = max(stats.peak_live_ciphertexts, held)
            # the plan the prefetcher replayed (made on its thread), else made here
            lid = ins.plain.args[0]
            plan = pre.plan(k, lambda: self.plans.plan(lid)) if pre is not None else self.plans.plan(lid)
            self.ptcache.begin_op(lin.counts.get("plaintexts", 0) < lin.counts.get("mul_plain", 0))
            try:
                adapter = _LinearAdapter(self, stats, pre)
                runs = self._split(ins, lin, plan) if pre is None else None
                if runs is not None:
                    try:
                        return self._run_split(k, ins, args, plan, runs, stats, adapter)
                    except HelperError as e:
                        raise ExecutionError(f"{where(k, ins)}: {e}") from None
                return run_linear(self.prog, ins, args, plan, adapter)
            finally:
                self.ptcache.end_op()
        if op == "rotate":
            return [p.rotate(args[0], ins.step)]
        if op == "add":
            return [p.add(args[0], args[1])]
        if op == "sub":
            return [p.sub(args[0], args[1])]
        if op == "negate":
            return [p.negate(args[0])]
        if op == "add_plain":
            pt = self._plain(ins.plain, ins.level, stats)
            return [args[0] if pt is None else p.add_plain(args[0], pt)]
        if op == "mul_plain":
            pt = self._plain(ins.plain, ins.level, stats)
            return [p.zero(ins.level, ins.scale) if pt is None else p.mul_plain(args[0], pt)]
        if op == "mul":
            return [p.mul(args[0], args[1])]
        if op == "rescale":
            return [self._snap(p.rescale(args[0]), ins.scale, where(k, ins))]
        if op == "mod_switch":
            return [p.mod_switch(args[0], ins.to_level)]
        raise ExecutionError(f"{where(k, ins)}: unknown op {op!r}")

    # ------------------------------------------------------------------ evaluation
    def start(self, cts: Mapping[int, Any]) -> EvalState:
        """The initial state from the encrypted inputs (value id -> ciphertext), checked: every
        input present, fresh (top level, scale 2**scale_bits)."""
        want = [v for io in self.prog.inputs for v in io.values]
        missing = [v for v in want if v not in cts]
        if missing:
            raise ExecutionError(f"input ciphertext(s) {['%' + str(v) for v in missing[:8]]} missing")
        extra = set(cts) - set(want)
        if extra:
            raise ExecutionError(f"unexpected input ciphertext(s) {['%' + str(v) for v in sorted(extra)[:8]]}")
        live = {}
        for v in want:
            try:
                lv, sc = self.prim.meta(cts[v])
            except HecError as e:
                raise ExecutionError(f"input %{v}: {e}") from None
            if lv != self.top or sc != self.delta:
                raise ExecutionError(f"input %{v}: level {lv}, scale {sc!r}; expected a fresh ciphertext at level "
                                     f"{self.top}, scale {self.delta!r}")
            live[v] = cts[v]
        st = EvalState(live=live)
        self._note_live(st)
        return st

    def run(self, state: EvalState, response: Mapping[int, Any] | None = None,
            progress: Callable[[int], Any] | None = None, request_id: str | None = None) -> EvalState:
        """Continue from ``state`` to the end of the program, or (client-aided refresh) to the next
        batch of refreshes, whose request is then in ``state.request``.  If ``state`` waits for the
        key holder, ``response`` (refresh output id -> fresh ciphertext) answers it (and
        ``request_id``, when given, must match).  ``progress(n)`` is called with units of work
        (:func:`work_units`).  The state is modified in place and returned."""
        prog = self.prog
        stats = state.stats
        t_run = time.perf_counter()
        try:
            if state.pending:
                if response is None:
                    raise ExecutionError(f"the evaluation waits for {len(state.pending)} refresh(es) "
                                         f"(instruction {state.pending[0]}); a response is needed")
                self._apply_response(state, response, request_id, progress)
            elif response is not None:
                raise ExecutionError("got a refresh response but the evaluation is not waiting for one")
            self._fork_helpers()
            pre = self._stream(state)
            try:
                self._loop(state, pre, progress)
            finally:
                if pre is not None:
                    pre.close()
            return state
        finally:
            stats.eval_seconds += time.perf_counter() - t_run
            stats.peak_rss_bytes = max(stats.peak_rss_bytes, peak_rss_bytes())

    def _loop(self, state: EvalState, pre: Prefetcher | None, progress) -> None:
        """Run instructions from ``state.pc`` to the end or to a client-aided refresh."""
        prog, stats, instrs = self.prog, state.stats, self.prog.instrs
        while state.pc < len(instrs):
            k = state.pc
            ins = instrs[k]
            if ins.op == "refresh":
                if self.prim.refresh_kind == "client":
                    self._request_batch(state)
                    return
                self._refresh_inline(state, progress)
                continue
            missing = [a for a in ins.args if a not in state.live]
            if missing:
                raise ExecutionError(f"{where(k, ins)}: operand %{missing[0]} is not live (bad state)")
            t = time.perf_counter()
            try:
                rs = self._exec(k, ins, state.live, stats, pre)
            except ExecutionError:
                raise
            except HecError as e:
                raise ExecutionError(f"{where(k, ins)}: {e}") from None
            self._check(k, ins, rs)
            for o, ct in zip(ins.results, rs):
                state.live[o] = ct
            if self._observe is not None:
                self._observe(k, ins, rs, stats)
            self._free(k, ins, state.live)
            dt = time.perf_counter() - t
            if ins.op == "linear":
                stats.add_linear(prog.linears[ins.plain.args[0]].counts, dt)
            else:
                stats.add(ins.op, dt)
            stats.per_node[ins.note] = stats.per_node.get(ins.note, 0.0) + dt
            self._predict(k, ins, stats)
            self._note_live(state)
            state.pc = k + 1
            if progress is not None:
                progress(work_units(prog, ins))

    def _batch(self, state: EvalState) -> list[int]:
        """The refresh instructions from ``state.pc`` that can go together (none reads another's result)."""
        out, made, k = [], set(), state.pc
        instrs = self.prog.instrs
        while k < len(instrs) and instrs[k].op == "refresh" and instrs[k].args[0] not in made:
            ins = instrs[k]
            if ins.args[0] not in state.live:
                raise ExecutionError(f"{where(k, ins)}: operand %{ins.args[0]} is not live (bad state)")
            out.append(k)
            made.add(ins.out)
            k += 1
        return out

    def _refresh_input(self, ins: Instr, ct: Any) -> Any:
        """A refresh's input, multiplied by the refresh's factor when it has one (a relabel of the
        scale by ``1/factor``: the value decrypts to ``factor`` times itself; no level, no error),
        so it fits the bootstrap's range.  The live ciphertext is left as it is."""
        if ins.plain is None:
            return ct
        f = float(ins.plain.args[0])
        copy = getattr(self.prim, "copy", None)
        if copy is not None:
            ct = copy(ct)
        return self.prim.set_scale(ct, self.prim.meta(ct)[1] / f)

    def _refresh_inline(self, state: EvalState, progress) -> None:
        batch = self._batch(state)
        instrs = self.prog.instrs
        t = time.perf_counter()
        try:
            fresh = self.prim.refresh([self._refresh_input(instrs[k], state.live[instrs[k].args[0]]) for k in batch])
        except HecError as e:
            raise ExecutionError(f"{where(batch[0], instrs[batch[0]])}: refresh: {e}") from None
        dt = time.perf_counter() - t
        for k, ct in zip(batch, fresh):
            ins = instrs[k]
            ct = self._snap(ct, ins.scale, where(k, ins))
            self._check(k, ins, [ct])
            state.live[ins.out] = ct
            if self._observe is not None:
                self._observe(k, ins, [ct], state.stats)
            self._free(k, ins, state.live)
            self._predict(k, ins, state.stats)
            state.stats.per_node[ins.note] = state.stats.per_node.get(ins.note, 0.0) + dt / len(batch)
            if progress is not None:
                progress(1)
        state.stats.refreshes += len(batch)
        if getattr(self.prim, "bootstraps", False):
            state.stats.bootstraps += len(batch)
        state.stats.add("refresh", dt, n=len(batch))
        state.pc = batch[-1] + 1
        self._note_live(state)

    def _request_batch(self, state: EvalState) -> None:
        t = time.perf_counter()
        instrs = self.prog.instrs
        for k in self._batch(state):
            ins = instrs[k]
            state.pending.append(k)
            state.request[ins.out] = self._refresh_input(ins, state.live[ins.args[0]])
            self._free(k, ins, state.live)
        state.request_id = secrets.token_hex(16)
        state.stats.refresh_round_trips += 1
        state.stats.add("refresh", time.perf_counter() - t, n=0)
        self._note_live(state)

    def _apply_response(self, state: EvalState, response: Mapping[int, Any], request_id: str | None,
                        progress) -> None:
        if request_id is not None and request_id != state.request_id:
            raise ExecutionError(f"the refresh response answers request {request_id}, but the evaluation waits "
                                 f"for request {state.request_id} (stale or foreign response)")
        if set(response) != set(state.request):
            raise ExecutionError(f"the refresh response holds ciphertexts {sorted(response)}, expected "
                                 f"{sorted(state.request)}")
        t = time.perf_counter()
        for k in state.pending:
            ins = self.prog.instrs[k]
            ct = response[ins.out]
            try:
                lv, sc = self.prim.meta(ct)
            except HecError as e:
                raise ExecutionError(f"{where(k, ins)}: bad refreshed ciphertext: {e}") from None
            if lv != self.top or sc != self.delta:
                raise ExecutionError(f"{where(k, ins)}: the key holder returned level {lv}, scale {sc!r}; expected "
                                     f"level {self.top}, scale {self.delta!r}")
            self._check(k, ins, [ct])
            state.live[ins.out] = ct
            self._predict(k, ins, state.stats)
            if progress is not None:
                progress(1)
        n = len(state.pending)
        state.pc = state.pending[-1] + 1
        state.pending, state.request, state.request_id = [], {}, ""
        state.stats.refreshes += n
        state.stats.add("refresh", time.perf_counter() - t, n=n)
        self._note_live(state)

    def outputs(self, state: EvalState) -> dict[int, Any]:
        if not state.done(self.prog):
            raise ExecutionError(f"the evaluation is not finished (next instruction {state.pc})")
        return {v: state.live[v] for io in self.prog.outputs for v in io.values}

    def run_all(self, cts: Mapping[int, Any], refresh_fn: Callable[[Any], Any] | None = None,
                progress: Callable[[int], Any] | None = None) -> tuple[dict[int, Any], ExecStats]:
        """The whole program; ``refresh_fn(ct) -> fresh ct`` is the key holder (client-aided refresh)."""
        state = self.start(cts)
        return self.run_all_from(state, refresh_fn, progress), state.stats

    def run_all_from(self, state: EvalState, refresh_fn: Callable[[Any], Any] | None = None,
                     progress: Callable[[int], Any] | None = None) -> dict[int, Any]:
        """:meth:`run_all` from a started state; returns the output ciphertexts."""
        self.run(state, progress=progress)
        while state.pending:
            if refresh_fn is None:
                raise ExecutionError("the program refreshes through the key holder, but no refresh_fn was given")
            t = time.perf_counter()
            resp = {v: refresh_fn(ct) for v, ct in state.request.items()}
            dt = time.perf_counter() - t
            state.stats.add("refresh", dt, n=0)
            state.stats.eval_seconds += dt
            self.run(state, resp, progress=progress, request_id=state.request_id)
        return self.outputs(state)
