"""Linear ops shared between processes, for backends whose evaluation holds one core.

SEAL through tenseal evaluates on one thread and holds the interpreter lock
while it encodes and multiplies, so neither threads nor the executor's
encoding-ahead (:mod:`hecompiler.prefetch`) reach a second core.  Processes
do.  A linear op's output ciphertext is a sum over giant steps of rotated
*group sums*: products of the inputs' baby-step rotations with diagonals,
independent of one another and most of the op's work.  So the executor
splits the groups of a large op into contiguous runs of the order in which it
makes them (:func:`hecompiler.runtime.group_order`: neighbours share
plaintexts), keeps the first run and hands each other run to a *helper*:

* a helper is a fork of the evaluating process, made the first time an op is
  worth splitting, so it holds the program, its weights, the evaluation keys
  and the plaintext cache as they were then (no secret key: the server never
  has one);
* it receives the input ciphertexts its run reads, serialized by the backend
  (SEAL's own format), makes its group sums with
  :func:`hecompiler.runtime.run_groups`, which encodes its own plaintexts,
  and sends them back serialized;
* meanwhile the evaluating process makes its own run, then takes the helpers'
  sums as :func:`hecompiler.runtime.run_linear` reaches them, and does the
  giant-step rotations and the rescales: the same operations as in one
  process, on the same operands.

Every process rotates the inputs its run reads (baby steps are not shared),
and the evaluating process serializes those inputs and loads the helpers'
sums: an op is split only when its products outnumber the ciphertexts that
travel by :data:`MIN_PRODUCTS_PER_CIPHERTEXT` (:func:`worth_splitting`, which
the cost model uses too).  Backends that cannot fork safely (Lattigo: the Go
runtime's threads) do not ask for helpers; Lattigo already encodes on the
other cores.
"""

from __future__ import annotations

import os
import resource
import time
import traceback
import weakref
from typing import Any, Callable, Sequence

from .errors import HecError

#: an op is split only when its ct-pt products are at least this many times the ciphertexts that
#: would travel between processes (inputs and group sums): each travels serialized (about 1 ms at
#: N=8192 with two primes, benchmarks/parallel.py) where a product costs about as much
MIN_PRODUCTS_PER_CIPHERTEXT = 4


class HelperError(HecError):
    """A helper process failed or died while making its part of a linear op."""


#: the default's ceiling: every helper holds its own plaintext caches and working set (about 1 GiB
#: for ResNet-18 at 224, as much as the evaluating process's evaluation), and only two processes
#: have been measured (a 2-core machine); ``$HECOMPILER_PROCESSES`` or ``--processes`` go past it
DEFAULT_MAX_PROCESSES = 4


def default_processes(cores: int | None = None) -> int:
    """Processes that evaluate a program (the evaluating one and its helpers):
    ``$HECOMPILER_PROCESSES`` when set, else one per core (``cores``, default this machine's) up
    to :data:`DEFAULT_MAX_PROCESSES`."""
    env = os.environ.get("HECOMPILER_PROCESSES")
    if env is not None and env.strip():
        try:
            n = int(env)
        except ValueError:
            raise HecError(f"HECOMPILER_PROCESSES={env!r}: expected a whole number of processes") from None
        if n < 1:
            raise HecError(f"HECOMPILER_PROCESSES={env!r}: at least 1 process")
        return n
    return max(1, min(cores if cores is not None else (os.cpu_count() or 1), DEFAULT_MAX_PROCESSES))


#: and only when it has at least this many products: a shared op also pays a round trip through the
#: pipes and the helper's own copy of its plan, which the cost model does not price.  The tiny CNN
#: (324 products in 5 ops) measured no faster shared: 0.51-0.67 s of evaluation on two processes
#: against 0.53-0.79 s on one (three runs each, hecompile run --processes 2 and 1, 2026-12-07)
MIN_PRODUCTS = 128

#: a linear op with at least this many output ciphertexts per process is shared by whole output
#: ciphertexts; one with fewer, by giant-step group sums
OUTPUTS_PER_PROCESS = 2


def by_outputs(n_out: int, processes: int) -> bool:
    """Whether an op with ``n_out`` output ciphertexts is shared by whole outputs (else by groups)."""
    return n_out >= OUTPUTS_PER_PROCESS * processes


def worth_splitting(products: int, groups: int, n_in: int, n_out: int, processes: int) -> bool:
    """Whether a linear op of ``products`` ct-pt products in ``groups`` giant-step groups, from
    ``n_in`` to ``n_out`` ciphertexts, is shared between ``processes`` processes: the ciphertexts
    that would travel are the inputs (to each helper) and what the helpers return (their output
    ciphertexts, or their group sums)."""
    if processes < 2 or groups < 2 or products < MIN_PRODUCTS:
        return False
    back = n_out if by_outputs(n_out, processes) else groups
    return products >= MIN_PRODUCTS_PER_CIPHERTEXT * (n_in + back * (processes - 1) / processes)


def _runs(units: Sequence, work: Sequence[int], parts: int) -> list[list]:
    """``units`` in at most ``parts`` contiguous runs of about equal ``work`` (each cut where the
    running sum is nearest its share)."""
    parts = max(1, min(parts, len(units)))
    total = sum(work)
    runs: list[list] = []
    cur: list = []
    acc = 0
    for u, w in zip(units, work):
        target = total * (len(runs) + 1) / parts
        if len(runs) < parts - 1 and cur and acc + w > target and target - acc < acc + w - target:
            runs.append(cur)  # the cut before this unit is nearer the target than the one after it
            cur = []
        cur.append(u)
        acc += w
        if len(runs) < parts - 1 and acc >= total * (len(runs) + 1) / parts:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def split_work(plan, outputs: Sequence[int], groups: Sequence[tuple], parts: int) -> list[tuple[list, list]]:
    """The parts of a linear op for ``parts`` processes, each ``(output ciphertexts, group sums)``:
    contiguous runs of about equal products, of ``outputs`` (the op's output ciphertexts in
    evaluation order) when there are enough of them (:func:`by_outputs`), else of ``groups`` (its
    giant-step groups in evaluation order: runtime.group_order)."""
    from .runtime import group_products

    if by_outputs(len(outputs), parts):
        work = [1 + sum(len(t) for t in plan.giant.get(j, {}).values()) for j in outputs]
        return [(run, []) for run in _runs(list(outputs), work, parts)]
    work = [group_products(plan, gr) for gr in groups]
    return [([], run) for run in _runs(list(groups), work, parts)]


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


#: what a helper is forked with (the executor and the backend's serializers), set only while forking
#: so that no Process object keeps the executor alive
_handoff: tuple | None = None


def _serve(conn) -> None:
    """A helper's loop: parts of linear ops until told to stop (None) or the pipe closes."""
    from .executor import ExecStats, _LinearAdapter
    from .runtime import run_part

    ex, to_bytes, from_bytes = _handoff
    prog = ex.prog
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        k, given, outputs, groups = msg
        try:
            t = time.perf_counter()
            ins = prog.instrs[k]
            lid = ins.plain.args[0]
            lin = prog.linears[lid]
            xs: list[Any] = [None] * prog.layouts[lin.in_layout].n_ct
            for i, b in given.items():
                xs[i] = from_bytes(b)
            stats = ExecStats()
            ex.ptcache.begin_op(lin.counts.get("plaintexts", 0) < lin.counts.get("mul_plain", 0))
            try:
                outs, accs = run_part(prog, ins, xs, ex.plans.plan(lid), _LinearAdapter(ex, stats), outputs, groups)
            finally:
                ex.ptcache.end_op()
            made = {j: to_bytes(ct) for j, ct in outs.items()}, {gr: to_bytes(ct) for gr, ct in accs.items()}
            del outs, accs
            conn.send(("ok", made, {"plaintexts": stats.plaintexts, "plaintexts_reused": stats.plaintexts_reused,
                                    "encode_seconds": stats.encode_seconds,
                                    "seconds": time.perf_counter() - t, "rss": _rss_bytes()}))
        except BaseException as e:  # noqa: BLE001 -- reported to the evaluating process, which raises it
            try:
                conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc(limit=4)))
            except (OSError, ValueError):
                return


class RemoteParts:
    """What the helpers make of one linear op, as :func:`hecompiler.runtime.run_linear` reads it
    (``given_outputs``: :attr:`outputs`, ``given``: :attr:`groups`): a helper's answer is awaited
    the first time one of its ciphertexts is read."""

    def __init__(self, helpers: "Helpers", parts: Sequence[tuple[list, list]], from_bytes: Callable[[bytes], Any],
                 stats):
        self.helpers = helpers
        self.from_bytes = from_bytes
        self.stats = stats
        self.outputs = _View(self, {j: h for h, (outs, _) in enumerate(parts) for j in outs})
        self.groups = _View(self, {tuple(gr): h for h, (_, grs) in enumerate(parts) for gr in grs})
        self.waiting = set(range(len(parts)))

    def collect(self, h: int) -> None:
        made, measured = self.helpers.result(h)
        self.waiting.discard(h)
        t = time.perf_counter()
        for view, got in zip((self.outputs, self.groups), made):
            for key, b in got.items():
                view.got[tuple(key) if isinstance(key, (tuple, list)) else key] = self.from_bytes(b)
        st = self.stats
        st.transfer_seconds += time.perf_counter() - t
        st.transfer_ciphertexts += len(made[0]) + len(made[1])
        st.plaintexts += measured["plaintexts"]
        st.plaintexts_reused += measured["plaintexts_reused"]
        st.helper_seconds += measured["seconds"]
        st.helper_encode_seconds += measured["encode_seconds"]
        st.helper_peak_rss_bytes = max(st.helper_peak_rss_bytes, measured["rss"])

    def finish(self) -> None:
        """Await every helper not yet heard (a run that did not read all their ciphertexts)."""
        for h in sorted(self.waiting):
            self.collect(h)


class _View:
    """One kind of a helper's ciphertexts (outputs or group sums), read as a mapping."""

    def __init__(self, parts: RemoteParts, assigned: dict):
        self.parts = parts
        self.assigned = assigned  # key -> helper
        self.got: dict = {}

    def __contains__(self, key) -> bool:
        return key in self.assigned

    def __getitem__(self, key) -> Any:
        h = self.assigned[key]
        if h in self.parts.waiting:
            self.parts.collect(h)
        return self.got.pop(key)


class Helpers:
    """``n`` helper processes forked from the evaluating one (see the module doc)."""

    def __init__(self, ex, n: int, to_bytes: Callable[[Any], bytes], from_bytes: Callable[[bytes], Any]):
        import multiprocessing as mp

        global _handoff
        ctx = mp.get_context("fork")
        self.conns = []
        self.procs = []
        _handoff = (ex, to_bytes, from_bytes)
        try:
            for _ in range(n):
                a, b = ctx.Pipe()
                p = ctx.Process(target=_serve, args=(b,), daemon=True, name="hecompiler-helper")
                p.start()
                b.close()
                self.conns.append(a)
                self.procs.append(p)
        except BaseException:
            _stop(self.conns, self.procs)  # the ones already started
            raise
        finally:
            _handoff = None
        self._finalizer = weakref.finalize(self, _stop, list(self.conns), list(self.procs))

    @property
    def n(self) -> int:
        return len(self.procs)

    def submit(self, h: int, k: int, given: dict[int, bytes], outputs: Sequence[int], groups: Sequence[tuple]) -> None:
        """Ask helper ``h`` for the ``outputs`` (whole output ciphertexts) and the sums of the
        giant-step ``groups`` of instruction ``k`` (a linear op), given the input ciphertexts they
        read (index -> serialized)."""
        try:
            self.conns[h].send((k, given, list(outputs), [tuple(gr) for gr in groups]))
        except (OSError, ValueError) as e:
            raise HelperError(f"helper process {h + 1}: cannot send it its part ({e}); "
                              f"{self._exit(h)}") from None

    def result(self, h: int) -> tuple[tuple[dict, dict], dict]:
        """Helper ``h``'s answer: (output -> serialized ciphertext, group -> serialized sum), and
        what it measured."""
        try:
            msg = self.conns[h].recv()
        except (EOFError, OSError):
            raise HelperError(f"helper process {h + 1} died while making its part of a linear op "
                              f"({self._exit(h)}; out of memory?)") from None
        if msg[0] != "ok":
            raise HelperError(f"helper process {h + 1}: {msg[1]}")
        return msg[1], msg[2]

    def _exit(self, h: int) -> str:
        p = self.procs[h]
        p.join(timeout=1.0)
        return f"exit code {p.exitcode}" if p.exitcode is not None else "still running"

    def close(self) -> None:
        self._finalizer()


def _stop(conns, procs) -> None:
    for c in conns:
        try:
            c.send(None)
        except (OSError, ValueError):
            pass
    for p in procs:
        p.join(timeout=5.0)
        if p.is_alive():
            p.terminate()
            p.join(timeout=1.0)
    for c in conns:
        c.close()
