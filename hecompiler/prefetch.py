"""Plaintexts of linear ops made ahead of use, on other threads.

Encoding a diagonal (an inverse FFT and one NTT per prime) costs more than the ct-pt
multiplication that uses it: on Lattigo at N=2^16 it was over half of a ResNet-20's inference.
The executor evaluates on one thread, so on a machine with more cores a backend whose encoder
releases the interpreter lock (``Primitives.encode_threads > 0``; Lattigo's ``hl_encode`` has an
encoder of its own per call) gets the plaintexts of its linear ops made ahead:

* :func:`plaintext_order` replays an op's evaluation (:func:`hecompiler.runtime.run_linear`,
  the code that runs it) on placeholders and records every plaintext it will ask for, in order;
* a :class:`Prefetcher` walks the plaintexts of every linear op still to run, one op after the
  other (:func:`stream_order`), on a producer thread (slot vector, all-zero and constant checks,
  the cache by reference and by content, duplicates not yet taken) and hands the encodings to a
  pool of ``encode_threads`` threads, at most :data:`PREFETCH_BYTES` of encoded plaintexts ahead
  of the evaluation (at least 2, at most 256 plaintexts): the other cores keep encoding while the
  evaluation thread runs a bootstrap, a polynomial or the rest of the previous op;
* the evaluation takes them in the same order (:meth:`Prefetcher.take`); what it waits is the
  encoding the other cores did not hide, which the executor reports as encode time.

The cache is only read off the evaluation thread; the evaluation thread stores what it takes.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .heprog import HEProgram, Instr, PlainRef
from .linear import BsgsPlan
from .runtime import run_linear


#: encoded plaintexts a linear op's prefetcher may hold ahead of its evaluation, in bytes
PREFETCH_BYTES = 256 * 2**20


#: ... and at most this many, whatever their size
PREFETCH_MAX = 256


def prefetch_window(plaintext_bytes: int) -> int:
    """How many encoded plaintexts of ``plaintext_bytes`` each a prefetcher holds ahead: what
    :data:`PREFETCH_BYTES` holds, at least 2 and at most :data:`PREFETCH_MAX` (the executor and
    the cost model both ask here)."""
    return max(2, min(PREFETCH_MAX, PREFETCH_BYTES // max(1, int(plaintext_bytes))))


def room_for(held_bytes: int, held: int, nbytes: int) -> bool:
    """Whether a prefetcher holding ``held`` plaintexts of ``held_bytes`` in all may make one more
    of ``nbytes``: the rule of :func:`prefetch_window`, for plaintexts of mixed sizes."""
    return held < 2 or (held < PREFETCH_MAX and held_bytes + nbytes <= PREFETCH_BYTES)


class _Slot:
    """A placeholder ciphertext of the replay."""

    __slots__ = ()


_CT = _Slot()


class _Recorder:
    """The primitive interface of :func:`run_linear`, recording the plaintexts asked for."""

    def __init__(self) -> None:
        self.order: list[tuple[PlainRef, int]] = []

    def rotate(self, ct, step):
        return _CT

    def rotate_many(self, ct, steps):
        return [_CT for _ in steps]

    def mul_plain(self, ct, ref, level):
        self.order.append((ref, level))
        return _CT

    def mul_plain_add(self, acc, ct, ref, level):
        self.order.append((ref, level))
        return _CT

    def add(self, a, b):
        return _CT

    def rescale(self, ct, scale):
        return _CT

    def add_plain(self, ct, ref, level):
        self.order.append((ref, level))
        return _CT

    def zero(self, level, scale):
        return _CT


def plaintext_order(prog: HEProgram, ins: Instr, plan: BsgsPlan) -> list[tuple[PlainRef, int]]:
    """Every (plaintext, level) the linear instruction ``ins`` asks for, in the order it asks."""
    rec = _Recorder()
    run_linear(prog, ins, [_CT] * len(ins.args), plan, rec)
    return rec.order


def stream_order(prog: HEProgram, start: int, stop: int, plan_of: Callable[[int], BsgsPlan],
                 plans: dict[int, BsgsPlan]) -> Iterator[tuple[PlainRef, int]]:
    """The plaintexts of the linear instructions ``start <= k < stop``, op after op, made lazily
    (on the producer thread); each op's plan (``plan_of(linear id)``) is left in ``plans`` under
    its instruction index for the evaluation to take."""
    for k in range(start, stop):
        ins = prog.instrs[k]
        if ins.op != "linear":
            continue
        plan = plan_of(ins.plain.args[0])
        plans[k] = plan
        yield from plaintext_order(prog, ins, plan)


@dataclass
class Made:
    """One prefetched plaintext: ``pt`` (None: all zero), and what the evaluation thread records
    when it takes it (``kind``: ``"ref"`` / ``"content"`` cache hit, ``"encoded"``; the cache
    key and size of a new encoding)."""

    pt: Any
    kind: str
    key: tuple | None = None
    nbytes: int = 0


class Prefetcher:
    """Makes ``order``'s plaintexts ahead of use (see the module doc).  ``order`` is walked lazily
    on the producer thread (a list, or :func:`stream_order`).  ``vector(ref)`` gives a slot
    vector, ``encode(vec, scale, level)`` / ``encode_scalar(value, scale, level)`` encode it
    (called on the pool's threads), ``cache`` is the executor's
    :class:`~hecompiler.plaintexts.PlaintextCache`, ``zero`` its all-zero marker, ``nbytes(level)``
    the size of one encoded plaintext, and ``share_key(ref, level)`` the cache key of a plaintext
    found without its vector, or None (:meth:`hecompiler.plaintexts.PlaintextFactory.share_key`).
    At most what :func:`room_for` allows is held ahead of the evaluation."""

    def __init__(self, order: Iterable[tuple[PlainRef, int]], vector: Callable[[PlainRef], np.ndarray],
                 encode: Callable, encode_scalar: Callable, cache, zero: Any, nbytes: Callable[[int], int],
                 pool: ThreadPoolExecutor,
                 share_key: Callable[[PlainRef, int], tuple | None] = lambda ref, level: None,
                 plans: dict[int, BsgsPlan] | None = None):
        self._source = iter(order)
        #: the linear ops' plans the producer made (instruction index -> plan: :func:`stream_order`)
        self._plans = plans if plans is not None else {}
        #: what the producer has listed so far (position k: the k-th plaintext asked for)
        self.order: list[tuple[PlainRef, int]] = []
        self._share_key = share_key
        self._vector = vector
        self._encode = encode
        self._encode_scalar = encode_scalar
        self._cache = cache
        self._zero = zero
        self._nbytes = nbytes
        self._pool = pool
        self._futures: dict[int, Future] = {}
        self._sizes: dict[int, int] = {}
        self._held_bytes = 0
        self._ready = threading.Condition()
        self._stop = False
        self._exhausted = False
        self._error: BaseException | None = None
        self._next = 0
        #: most bytes of plaintexts held ahead at once (what the cost model bounds)
        self.peak_held_bytes = 0
        self._thread = threading.Thread(target=self._produce, name="hec-plaintexts", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- producer thread
    def _produce(self) -> None:
        # content key -> (position, its encoding) of the plaintexts not yet taken: a duplicate
        # among them shares the encoding; once taken, the cache has it (or, past its budget, it
        # is made again, as without prefetching): held plaintexts stay within the window
        inflight: dict[tuple, tuple[int, Future]] = {}
        try:
            for k, (ref, level) in enumerate(self._source):
                nb = self._nbytes(level)
                with self._ready:
                    while not self._stop and not room_for(self._held_bytes, k - self._next, nb):
                        self._ready.wait()
                    if self._stop:
                        return
                    self._held_bytes += nb
                    self._sizes[k] = nb
                    self.peak_held_bytes = max(self.peak_held_bytes, self._held_bytes)
                    self.order.append((ref, level))
                if len(inflight) > 16:
                    taken = self._next
                    for key in [key for key, (i, _) in inflight.items() if i < taken]:
                        del inflight[key]
                fut = self._submit(k, ref, level, inflight)
                with self._ready:
                    self._futures[k] = fut
                    self._ready.notify_all()
        except BaseException as e:  # handed to the evaluation thread by take()
            with self._ready:
                self._error = e
                self._ready.notify_all()
        finally:
            with self._ready:
                self._exhausted = True
                self._ready.notify_all()

    def _submit(self, k: int, ref: PlainRef, level: int, inflight: dict) -> Future:
        cache = self._cache
        pt = cache.peek_ref(ref, level)
        if pt is not None:
            return _done(Made(None if pt is self._zero else pt, "ref"))
        key = self._share_key(ref, level)  # a repeated diagonal is found without making it
        if key is not None:
            held = self._held(key, inflight)
            if held is not None:
                return held
        vec = self._vector(ref)
        if not np.any(vec):
            return _done(Made(None, "zero"))
        if np.all(vec == vec[0]):  # a constant: no FFT
            return self._pool.submit(lambda: Made(self._encode_scalar(float(vec[0]), ref.scale, level), "encoded",
                                                  None, self._nbytes(level)))
        if key is None:
            key = cache.content_key(vec, level, ref.scale)
            held = self._held(key, inflight)
            if held is not None:
                return held
        fut = self._pool.submit(lambda: Made(self._encode(vec, ref.scale, level), "encoded", key,
                                             self._nbytes(level)))
        inflight[key] = (k, fut)
        return fut

    def _held(self, key: tuple, inflight: dict) -> Future | None:
        """The plaintext of content ``key`` when the cache holds it or it is being made for a
        plaintext not yet taken; else None."""
        pt = self._cache.peek_content(key)
        if pt is not None:
            return _done(Made(pt, "content", key))
        if key in inflight and inflight[key][0] >= self._next:
            first = inflight[key][1]
            return self._pool.submit(lambda: Made(first.result().pt, "content", key))
        return None

    # ---------------------------------------------------------------- evaluation thread
    def plan(self, k: int, make: Callable[[], BsgsPlan]) -> BsgsPlan:
        """The plan of the linear instruction at index ``k`` as the producer replayed it (waiting
        for it), or ``make()`` when the producer does not reach it."""
        with self._ready:
            while k not in self._plans and self._error is None and not self._exhausted:
                self._ready.wait()
            plan = self._plans.pop(k, None)
        return plan if plan is not None else make()

    def take(self, ref: PlainRef, level: int) -> Made:
        """The next plaintext, which must be ``(ref, level)``; waits for it."""
        k = self._next
        with self._ready:
            while k not in self._futures and self._error is None and not self._exhausted:
                self._ready.wait()
            if k not in self._futures:
                if self._error is not None:
                    raise self._error
                raise RuntimeError(f"plaintext {ref} at level {level} asked beyond the recorded order "
                                   f"({len(self.order)} plaintexts)")
            fut = self._futures.pop(k)
        if self.order[k] != (ref, level):
            raise RuntimeError(f"plaintext {ref} at level {level} asked out of the recorded order "
                               f"(expected {self.order[k]})")
        made = fut.result()
        with self._ready:
            self._next = k + 1
            self._held_bytes -= self._sizes.pop(k)
            self._ready.notify_all()
        return made

    def close(self) -> None:
        """Stop making plaintexts (after the run, or when it failed) and wait for the producer."""
        with self._ready:
            self._stop = True
            self._ready.notify_all()
        self._thread.join()
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f
