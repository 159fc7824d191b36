"""Plaintext slot vectors, generated on demand from compact weights.

Both backends ask a :class:`PlaintextFactory` for the slot vector of a
:class:`~hecompiler.heprog.PlainRef` just before they encode it.  Diagonals
of a linear op are computed one output ciphertext at a time, when the first
of them is needed, and dropped when the program moves on, so at most one
block row of one op is in memory, never the whole network's.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .errors import HecError
from .heprog import HEProgram, PlainRef
from .linear import bias_vector, cheap_keys, diag_keys, diag_signatures, diagonals


def rot(v: np.ndarray, k: int) -> np.ndarray:
    """Slots move left by k: ``rot(v, k)[i] == v[(i + k) % len(v)]`` (along the last axis: a
    batch of slot vectors moves row by row)."""
    return np.roll(v, -k, axis=-1)


class PlaintextFactory:
    def __init__(self, prog: HEProgram):
        self.prog = prog
        self.S = prog.params.slots
        self._diag_lin = -1
        self._diags: dict = {}
        self._keys_lin = -1  # the linear op whose diagonal keys are kept
        self._keys: dict | None = None
        self._bias: dict[int, np.ndarray] = {}
        self._fill: dict = {}
        self._sigs_lin = -1  # the linear op whose diagonal signatures are kept
        self._sigs: dict | None = None

    def _linear_diagonals(self, lin_id: int, j: int) -> dict:
        """Diagonals of one output ciphertext of one linear op (the only ones kept)."""
        if (lin_id, j) != self._diag_lin:
            lin = self.prog.linears[lin_id]
            lays = self.prog.layouts
            self._diags = {}  # free the previous block before building the next
            if self._keys_lin != lin_id:
                self._keys = cheap_keys(lin, self.prog.weights, lays[lin.in_layout], lays[lin.out_layout])
                self._keys_lin = lin_id
            self._diags = diagonals(lin, self.prog.weights, lays[lin.in_layout], lays[lin.out_layout], j,
                                    self._keys)
            self._diag_lin = (lin_id, j)
        return self._diags

    def share_key(self, ref: PlainRef, level: int) -> tuple | None:
        """A cache key for ``ref`` at ``level`` found without making its slot vector: equal keys,
        equal vectors.  A diagonal of a linear op with signatures (hecompiler.linear.diag_signatures:
        a structured conv/pool/affine whose channels stay within their ciphertexts) turned by a
        giant step is its op, its signature and the turn; None for anything else (the executor
        then hashes the vector).  A polyphase convolution finds most of its products' plaintexts
        this way, without making the diagonals of the output ciphertexts that only repeat them."""
        if ref.kind != "diag":
            return None
        lin_id, j, i, d, r = ref.args
        if lin_id != self._sigs_lin:
            lin = self.prog.linears[lin_id]
            lays = self.prog.layouts
            self._sigs = diag_signatures(lin, self.prog.weights, lays[lin.in_layout], lays[lin.out_layout])
            self._sigs_lin = lin_id
        sig = self._sigs.get((j, i, d)) if self._sigs is not None else None
        return None if sig is None else ("sig", lin_id, sig, r, level, ref.scale)

    def diagonal_keys(self, lin_id: int) -> dict[tuple[int, int], np.ndarray]:
        """{(j, i): sorted d} of the non-zero diagonals of linear op ``lin_id``."""
        lin = self.prog.linears[lin_id]
        lays = self.prog.layouts
        return diag_keys(lin, self.prog.weights, lays[lin.in_layout], lays[lin.out_layout])

    def vector(self, ref: PlainRef) -> np.ndarray:
        k = ref.kind
        if k == "diag":
            lin, j, i, d, r = ref.args
            v = self._linear_diagonals(lin, j).get((j, i, d))
            if v is None:
                raise HecError(f"plaintext {ref}: linear op #{lin} has no diagonal ({j}, {i}, {d})")
            return rot(v, r) if r else v
        if k == "bias":
            lin_id, j = ref.args
            if lin_id not in self._bias:
                lin = self.prog.linears[lin_id]
                b = bias_vector(lin, self.prog.weights)
                self._bias = {lin_id: self.prog.layouts[lin.out_layout].pack(b)}
            return self._bias[lin_id][j]
        if k == "fill":
            lay_id, j, value = ref.args
            key = (lay_id, value)
            if key not in self._fill:
                lay = self.prog.layouts[lay_id]
                C, H, W = lay.shape
                if isinstance(value, str):
                    w = np.asarray(self.prog.weights[value], np.float64).reshape(-1)
                    full = np.repeat(w, H * W) if w.size == C else w
                else:
                    full = np.full(lay.size, float(value))
                if len(self._fill) > 64:
                    self._fill.clear()
                self._fill[key] = lay.pack(full)
            return self._fill[key][j]
        if k == "scalar":
            return np.full(self.S, float(ref.args[0]))
        raise HecError(f"unknown plaintext kind {k!r}")


# --------------------------------------------------------------------------- encoded plaintexts

def parse_bytes(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1048576"`` -> bytes."""
    t = str(text).strip().upper().rstrip("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise HecError(f"plaintext cache size {text!r}: expected bytes such as 512M or 2G") from None


#: encoded plaintexts kept for reuse, unless the executor is given another budget
#: (``$HECOMPILER_PLAINTEXT_CACHE``, e.g. ``2G``; ``0`` turns reuse off)
DEFAULT_CACHE_BYTES = 256 * 2**20


#: the op-local tier: plaintexts of the linear op running, shared by content, least recently used
#: out first (``$HECOMPILER_PLAINTEXT_OP_CACHE``; ``0`` turns it off, and so does a cache budget of 0)
DEFAULT_OP_CACHE_BYTES = 512 * 2**20


def default_op_cache_bytes() -> int:
    import os

    env = os.environ.get("HECOMPILER_PLAINTEXT_OP_CACHE")
    return parse_bytes(env) if env else DEFAULT_OP_CACHE_BYTES


def default_cache_bytes() -> int:
    import os

    env = os.environ.get("HECOMPILER_PLAINTEXT_CACHE")
    return parse_bytes(env) if env else DEFAULT_CACHE_BYTES


#: the share of the memory a serving worker has left that its plaintext cache may fill (the rest
#: is margin for the prediction's error: the pool stops a worker above its budget)
SERVING_CACHE_SHARE = 0.8


def serving_cache_bytes(report: dict, worker_memory: int | None = None, env: bool = True) -> int:
    """The plaintext cache of a serving worker (``hecompile serve``), which answers many queries
    with one program: ``$HECOMPILER_PLAINTEXT_CACHE`` when set, else every plaintext of an
    inference (the report's ``bytes_all``) if :data:`SERVING_CACHE_SHARE` of the memory left for
    them holds them, else that share.  The memory left is ``worker_memory`` less the predicted peak
    without its cache, or (no worker budget) what the compile's ``--max-memory`` leaves: the
    predicted cache plus the report's ``cache_headroom_bytes``.  A collected runtime (Lattigo's Go
    heap) holds garbage in proportion to what lives: the share is divided by the report's ratio of
    garbage to the rest of its peak.  A one-shot ``eval`` keeps :data:`DEFAULT_CACHE_BYTES` (its
    plaintexts are used once).  ``env=False``: the size the budget gives (the compile report's
    prediction of a served inference), whatever the environment says."""
    import os

    given = os.environ.get("HECOMPILER_PLAINTEXT_CACHE") if env else None
    if given:
        return parse_bytes(given)
    pt = report.get("plaintexts") or {}
    want = int(pt.get("bytes_all") or 0)
    cached = int(pt.get("cache_bytes") or 0)
    if not report.get("predicted_memory_bytes"):  # a program without a memory prediction
        return min(want, DEFAULT_CACHE_BYTES) if want else DEFAULT_CACHE_BYTES
    # a serving worker has no helper processes (serving.engine.one_process): their memory is room
    helpers = int(report.get("predicted_helper_bytes") or 0)
    if worker_memory is not None:
        room = int(worker_memory) - (int(report.get("predicted_memory_bytes") or 0) - helpers - cached)
    elif pt.get("cache_headroom_bytes") is not None:
        room = cached + helpers + int(pt["cache_headroom_bytes"])
    else:
        return min(want, DEFAULT_CACHE_BYTES) if want else DEFAULT_CACHE_BYTES
    peak = int(report["predicted_memory_bytes"]) - helpers
    garbage = int(report.get("predicted_garbage_bytes") or 0)
    per_byte = 1.0 + (garbage / (peak - garbage) if peak > garbage > 0 else 0.0)
    return max(0, min(want, int(SERVING_CACHE_SHARE * room / per_byte)))


class PlaintextCache:
    """Encoded plaintexts kept for reuse, within ``budget_bytes``.

    * The same reference at the same level (a diagonal, a bias...) is encoded once for as long
      as it stays cached: repeated inference on one executor (a server answering many queries
      with one key set) skips plaintext generation and encoding for every cached one.
    * Identical slot vectors (equal diagonals of different blocks, of different ciphertexts of
      one channel, of pooling and layout conversions) share one encoding (content hash).

    The cache fills in program order and then stops growing (no eviction): a program runs its
    plaintexts in the same order every time, where an LRU would evict each entry just before
    its reuse.  Past that, the plaintexts of the linear op running (between :meth:`begin_op` and
    :meth:`end_op`) are still shared by content in an op-local tier of ``op_budget_bytes``,
    least recently used out first, dropped when the op ends: a convolution in polyphase layouts
    repeats most of its diagonals across output ciphertexts, which it computes in an order that
    keeps the repeats close (hecompiler.linear.sharing_order; the cost model simulates this tier:
    hecompiler.linear.plaintext_encodings).
    ``stats``: hits by reference, hits by content, encodings, bytes held."""

    def __init__(self, budget_bytes: int | None = None, op_budget_bytes: int | None = None):
        self.budget = default_cache_bytes() if budget_bytes is None else max(0, int(budget_bytes))
        #: the op-local tier's budget (off, unless given, when the cache's is 0: no reuse at all)
        if op_budget_bytes is None:
            op_budget_bytes = default_op_cache_bytes() if self.budget else 0
        self.op_budget = max(0, int(op_budget_bytes))
        self._by_ref: dict = {}
        self._by_content: dict = {}
        self.bytes = 0
        self._op: OrderedDict = OrderedDict()  # content key -> (plaintext, bytes), for the op running
        self._op_on = False
        self.op_bytes = 0
        self.op_peak_bytes = 0
        self.ref_hits = 0
        self.content_hits = 0
        self.encoded = 0

    @staticmethod
    def content_key(vec: np.ndarray, level: int, scale: float) -> tuple:
        import hashlib

        return hashlib.blake2b(np.ascontiguousarray(vec).tobytes(), digest_size=16).digest(), level, scale

    def lookup_ref(self, ref: PlainRef, level: int):
        pt = self._by_ref.get((ref, level))
        if pt is not None:
            self.ref_hits += 1
        return pt

    def peek_ref(self, ref: PlainRef, level: int):
        """What :meth:`lookup_ref` gives, without counting a hit (a prefetch looking ahead)."""
        return self._by_ref.get((ref, level))

    def peek_content(self, key: tuple):
        """What :meth:`lookup_content` gives, without counting a hit (nor using an op-local entry)."""
        pt = self._by_content.get(key)
        if pt is None:
            pt = self._op.get(key, (None, 0))[0]
        return pt

    def lookup_content(self, key: tuple):
        pt = self._by_content.get(key)
        if pt is None and key in self._op:
            self._op.move_to_end(key)
            pt = self._op[key][0]
        if pt is not None:
            self.content_hits += 1
        return pt

    def touch(self, key: tuple) -> None:
        """An op-local entry was used (a prefetched content hit): it is the most recent."""
        if key in self._op:
            self._op.move_to_end(key)

    def begin_op(self, shares: bool = True) -> None:
        """A linear op starts: when it ``shares`` plaintexts (its diagonals repeat), they are shared
        by content beyond the budget's first tier until :meth:`end_op`."""
        self.end_op()
        self._op_on = shares

    def end_op(self) -> None:
        self._op = OrderedDict()
        self.op_bytes = 0
        self._op_on = False

    def store(self, ref: PlainRef, level: int, key: tuple | None, pt, nbytes: int) -> None:
        self.encoded += 1
        if self.bytes + nbytes > self.budget:
            if self._op_on and key is not None and nbytes <= self.op_budget:
                self._op[key] = (pt, nbytes)
                self.op_bytes += nbytes
                while self.op_bytes > self.op_budget:
                    self.op_bytes -= self._op.popitem(last=False)[1][1]
                self.op_peak_bytes = max(self.op_peak_bytes, self.op_bytes)
            return
        self.bytes += nbytes
        self._by_ref[(ref, level)] = pt
        if key is not None:
            self._by_content[key] = pt

    def link(self, ref: PlainRef, level: int, pt, key: tuple | None = None) -> None:
        """Remember ``ref`` for a plaintext already held (a content hit on ``key``; not when the
        op-local tier holds it, which must let it go when the op ends)."""
        if key is not None and key not in self._by_content:
            return
        if (ref, level) not in self._by_ref and len(self._by_ref) < 1 << 22:
            self._by_ref[(ref, level)] = pt

    def clear(self) -> None:
        self._by_ref.clear()
        self._by_content.clear()
        self.bytes = 0
        self.end_op()
