"""Cost model: HE op latencies, noise and memory measured with SEAL, and sizes.

The table is found, in this order: the file named by ``$HECOMPILER_COST_TABLE``
(the word ``bundled`` selects the one below); the table of this machine,
``$XDG_CACHE_HOME/hecompiler/cost_seal.json`` (default ``~/.cache/...``),
written by ``hecompile calibrate`` (under a minute); else the table bundled
with the compiler, ``hecompiler/data/cost_seal.json``, measured on the
machine named in it by ``benchmarks/measure_seal_costs.py``.  Reports say
which (:attr:`CostModel.source`): predictions are only as good as the match
between that machine and the one that runs the program.

An op's cost depends on the ring degree and on the number of primes still
in the ciphertext; between measured prime counts we interpolate, beyond them
we use the quadratic fit the table stores.  Sizes are exact formulas of
SEAL's representation (8-byte words per coefficient per prime).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from .errors import HecError

_PRIMITIVES = ("rotate", "mul_plain", "add", "rescale", "add_plain")

#: program op -> cost-table op
_OP_ALIAS = {"mul": "mul_relin", "refresh": None}


@dataclass(frozen=True)
class BootstrapCircuit:
    """The shape of a CKKS bootstrap (ModRaise, CoeffsToSlots, EvalMod,
    SlotsToCoeffs; Cheon et al. 2018, Bossuat et al. 2021), used to price a
    refresh when the target backend bootstraps instead of asking the client.

    The linear transforms are split into ``cts_levels`` / ``stc_levels``
    sparse factors of the DFT, each a radix-``2^r`` butterfly with ``2^(r+1)-1``
    diagonals evaluated with baby-step/giant-step; EvalMod evaluates a scaled
    cosine of degree ``evalmod_degree`` (Paterson-Stockmeyer) followed by
    ``double_angle`` squarings, on the real and imaginary halves.  Level
    counts and prime sizes are typical of published 128-bit parameter sets at
    N=2^16; a backend's own figures can replace them.
    """

    cts_levels: int = 3
    stc_levels: int = 3
    evalmod_levels: int = 8
    evalmod_degree: int = 30
    double_angle: int = 3
    cts_prime_bits: int = 56
    evalmod_prime_bits: int = 60

    @property
    def levels(self) -> int:
        return self.cts_levels + self.evalmod_levels + self.stc_levels

    def reserved_bits(self, scale_bits: int) -> int:
        """Modulus bits the circuit consumes above the program's own chain
        (SlotsToCoeffs runs at the data scale)."""
        return (self.cts_levels * self.cts_prime_bits + self.evalmod_levels * self.evalmod_prime_bits
                + self.stc_levels * scale_bits)

    def op_counts(self, slots: int) -> list[tuple[str, int, int]]:
        """(op, count, levels below the top of the bootstrap chain it runs at)."""
        k = max(1, int(math.log2(slots)))
        out: list[tuple[str, int, int]] = [("rotate", 1, 0)]  # conjugation: split real and imaginary parts
        depth = 0
        for levels in (self.cts_levels, None, self.stc_levels):
            if levels is None:  # EvalMod on two ciphertexts (real and imaginary halves)
                ps = 2 * math.isqrt(self.evalmod_degree) + math.ceil(math.log2(self.evalmod_degree))
                total, per = 2 * (ps + self.double_angle), self.evalmod_levels
                for j in range(per):
                    muls = total // per + (1 if j < total % per else 0)
                    out += [("mul_relin", muls, depth + j), ("rescale", muls, depth + j)]
                depth += per
                continue
            r = math.ceil(k / levels)
            diags = 2 ** (r + 1) - 1
            rots = 2 * math.ceil(math.sqrt(diags))
            for j in range(levels):
                out += [("rotate", rots, depth + j), ("mul_plain", diags, depth + j),
                        ("add", diags, depth + j), ("rescale", 1, depth + j)]
            depth += levels
        return out


@dataclass(frozen=True)
class RefreshCost:
    """What one refresh of one ciphertext costs beyond compute.

    ``kind="client"`` (what the SEAL backend does): the masked ciphertext goes
    to the key holder and a fresh one comes back; priced as the client's
    decrypt/encrypt, two ciphertext transfers, and one round trip per batch.

    ``kind="bootstrap"``: the target backend bootstraps.  A refresh costs
    ``bootstrap_s`` seconds per ciphertext, or, when that is None, the
    :class:`BootstrapCircuit` priced with this machine's measured op
    latencies; the circuit's levels are reserved above the program's chain
    (so fewer levels fit the security budget).
    """

    kind: str = "client"
    bandwidth_bytes_per_s: float = 125e6  # 1 Gbit/s
    round_trip_s: float = 0.020  # a client on another network, not the same rack
    bootstrap_s: float | None = None
    circuit: BootstrapCircuit = BootstrapCircuit()
    #: keep the circuit's bits above the chain when planning (a target whose backend adds the
    #: bootstrapping primes itself, inside its own budget, sets this False)
    reserve: bool = True
    #: seconds per ciphertext when a batch of several bootstraps runs on all cores (measured)
    bootstrap_parallel_s: float | None = None

    def __post_init__(self):
        if self.kind not in ("client", "bootstrap"):
            raise HecError(f"refresh kind {self.kind!r}: expected 'client' or 'bootstrap'")
        if self.bootstrap_s is not None and not self.bootstrap_s >= 0:
            raise HecError(f"bootstrap price {self.bootstrap_s!r} s: must be a non-negative number")
        if not (self.round_trip_s >= 0 and math.isfinite(self.round_trip_s)):
            raise HecError(f"refresh round trip {self.round_trip_s!r} s (--refresh-rtt-ms): must be a non-negative "
                           "number")
        if not self.bandwidth_bytes_per_s > 0:
            raise HecError(f"refresh bandwidth {self.bandwidth_bytes_per_s!r} B/s: must be positive")

    @property
    def bootstraps(self) -> bool:
        return self.kind == "bootstrap"

    def reserved_bits(self, scale_bits: int) -> int:
        return self.circuit.reserved_bits(scale_bits) if self.bootstraps and self.reserve else 0

    def describe(self, n: int | None = None, top_primes: int | None = None, model: "CostModel | None" = None,
                 slots: int | None = None) -> str:
        if not self.bootstraps:
            return (f"client-aided re-encryption (round trip {self.round_trip_s * 1e3:g} ms per batch, "
                    f"{self.bandwidth_bytes_per_s * 8 / 1e9:g} Gbit/s)")
        c = self.circuit
        if not self.reserve and self.bootstrap_s is not None:
            one = self.bootstrap_s
            sparse = ""
            if model is not None and n is not None and slots is not None and slots != n // 2:
                one = model.bootstrap_rates(n, slots)[0] or one
                sparse = f" of {slots} slots (sparse packing: its own keys)"
            return f"bootstrap (non-interactive){sparse}: {one:.2f} s per ciphertext, measured on the target backend"
        if self.bootstrap_s is not None:
            price = f"{self.bootstrap_s:g} s per ciphertext (given)"
        elif model is not None and n is not None and top_primes is not None:
            price = (f"{model.refresh_seconds(n, top_primes):.1f} s per ciphertext (estimated: the bootstrap "
                     f"circuit priced with this machine's SEAL op latencies)")
        else:
            price = "estimated from the cost table"
        return (f"bootstrap: {price}; circuit {c.cts_levels}+{c.evalmod_levels}+{c.stc_levels} levels "
                f"(CoeffsToSlots+EvalMod+SlotsToCoeffs) reserved above the chain; not modelled: the "
                f"bootstrap's own error (the precision check treats a refresh as a fresh encryption) "
                f"and its keys (memory)")


class CostModel:
    def __init__(self, table: dict | None = None, refresh: RefreshCost | None = None):
        if table is None:
            self.table, self.source = _default_table()
        else:
            self.table, self.source = table, "given table"
        self.refresh = refresh or RefreshCost()
        self.rings = {int(r["poly_degree"]): r for r in self.table["rings"]}

    @property
    def hoists(self) -> bool:
        """The backend hoists the baby-step rotations of one ciphertext (the table prices them)."""
        return self.lattigo and any(r.get("by_primes", {}).get("rotate_hoisted_extra") for r in self.rings.values())

    @property
    def lattigo(self) -> bool:
        """A Lattigo table (backends/lattigo's measurement): hoisted rotations, its key sizes."""
        return str(self.table.get("schema", "")).startswith("hecompiler.cost_lattigo")

    @property
    def pools_by_size(self) -> bool:
        """Whether the backend keeps freed ciphertext memory in pools by allocation size, never
        returned (SEAL's memory pool): its ciphertexts then hold, for each size (level), the most of
        that size ever alive at once, not the most alive at once.  Measured (benchmarks/seal_memory.py):
        ResNet-8 non-interactive at N=2^15 grew 1457 MiB during its evaluation, where the most alive
        at once is 212 MiB and the sum of the per-level peaks 795 MiB."""
        return not self.lattigo

    #: the percent of its live heap a collected runtime lets garbage reach (Lattigo's server sets
    #: Go's GC percent: hecompiler.target.LATTIGO_SERVER_GC_PERCENT); 0 for SEAL (C++, no collector)
    gc_percent: int = 0
    #: the garbage it actually holds, as a multiple of gc_percent (hecompiler.target.LATTIGO_GC_OVERSHOOT)
    gc_overshoot: float = 1.0

    @property
    def encode_cores(self) -> int:
        """Cores the evaluation and the plaintexts encoded ahead share (Lattigo's executor encodes
        on every core of the measured machine but the evaluation's: hecompiler.prefetch and
        backends/lattigo/session.encode_threads; its encoder releases the interpreter lock), 0
        when encoding waits in the evaluation thread (SEAL).  :func:`encode_hidden` spreads an
        op's work over them; with one encoder on two cores ResNet-20 measured 170-172 s where this
        predicts 189 s (the table's encodings, timed at the set's full slot count, cost more than
        a sparse packing's)."""
        if not self.lattigo:
            return 0
        cores = int((self.table.get("machine") or {}).get("cores") or 1)
        return cores if cores > 1 else 0

    @property
    def eval_processes(self) -> int:
        """Processes that share a program's large linear ops (hecompiler.parallel): the SEAL
        executor forks a helper per core beyond its own, up to parallel.DEFAULT_MAX_PROCESSES in all
        (``$HECOMPILER_PROCESSES`` sets the number); priced at the measured machine's cores, or the
        variable when set.  1 for Lattigo and any
        bootstrapping target (its executor does not fork; its encoder already runs on the other
        cores: :attr:`encode_cores`)."""
        if self.lattigo or self.refresh.bootstraps:
            return 1
        from .parallel import default_processes

        return default_processes(int((self.table.get("machine") or {}).get("cores") or 1))

    def transfer_ct_seconds(self, n: int, primes: int) -> tuple[float, float]:
        """(serialize, load) seconds of one ciphertext with ``primes`` primes, as a process hands it
        to another (``ct_save``, ``ct_load``: measured by ``hecompile calibrate`` since the helpers
        came; a table from before prices each as one encoding at that level, which measured 0.55 ms
        against 1.0 and 0.8 ms at N=8192 with two primes)."""
        out = []
        for op in ("ct_save", "ct_load"):
            out.append(self.op_seconds(op if self.measured(op, n) else "encode", n, primes))
        return out[0], out[1]

    def noise(self, n: int) -> dict[str, float]:
        """Measured CKKS error per op at ring degree ``n``: standard deviation times the scale
        (``fresh``, ``rescale``, ``keyswitch``, ``encode``, and ``keyswitch_head``: key
        switching's level in each of the first slots, where it is far larger; see
        backends/seal_costs.py); a bootstrapping table adds ``refresh`` and how it grows with the
        input (``refresh_dc_cubic``, ``refresh_ac_cubic``: backends/sim.py)."""
        nz = self._ring(n).get("noise")
        if not nz:
            raise HecError(f"cost table ({self.source}): no noise measurement at N={n}; run hecompile calibrate")
        out: dict = {k: float(v) for k, v in nz.items()
                     if k in ("fresh", "rescale", "keyswitch", "encode", "refresh", "refresh_dc_cubic", "refresh_ac_cubic")}
        if nz.get("keyswitch_head"):
            out["keyswitch_head"] = [float(v) for v in nz["keyswitch_head"]]
        return out

    @property
    def baseline_bytes(self) -> int:
        """Resident memory of a server process besides what the model counts (measured: the
        compiler and SEAL loaded; Lattigo's server with its keys loaded, less the keys)."""
        return int((self.table.get("memory") or {}).get("baseline_rss_bytes") or BASELINE_BYTES)

    def describe_source(self) -> str:
        m = self.table.get("machine", {})
        return (f"{self.source}: measured {self.table.get('created_utc', '?')} on {m.get('cpu', '?')} "
                f"({m.get('cores', '?')} cores) by {self.table.get('command', '?')}")

    def _ring(self, n: int) -> dict:
        if n in self.rings:
            return self.rings[n]
        raise HecError(f"cost model: ring degree {n} was not measured (measured: {sorted(self.rings)}); "
                       f"run benchmarks/measure_seal_costs.py")

    def measured(self, op: str, n: int) -> bool:
        """Whether the table has a measurement of ``op`` at ring degree ``n``."""
        try:
            ring = self._ring(n)
        except HecError:
            return False
        return any(t is not None for _, t in ring.get("by_primes", {}).get(_OP_ALIAS.get(op, op), []))

    def op_seconds(self, op: str, n: int, primes: int, slots: int | None = None) -> float:
        """Latency of one ``op`` at ring degree ``n`` on a ciphertext with
        ``primes`` primes left (level + 1).  ``slots``: the program's slot count, when it packs
        fewer than ``n/2`` (sparse packing): an op the table measured at that count (``by_slots``:
        encoding, whose DFT is that size) is priced from that measurement."""
        if op == "refresh":
            return self.refresh_seconds(n, primes)
        name = _OP_ALIAS.get(op, op)
        ring = self._ring(n)
        by = ring["by_primes"]
        fits = ring.get("fits", {}).get(name, {})
        if slots is not None and slots < n // 2:
            sparse = ring.get("by_slots", {}).get(str(slots), {}).get("by_primes", {})
            if sparse.get(name):
                by, fits = sparse, {}
        pts = [(p, t) for p, t in by.get(name, []) if t is not None]
        if not pts and name == "encode_constant":  # a table without it: a full-vector encode bounds it
            pts = [(p, t) for p, t in by.get("encode", []) if t is not None]
        if not pts:
            raise HecError(f"cost model: no measurement of {name} at N={n}")
        xs = np.array([p for p, _ in pts], float)
        ys = np.array([t for _, t in pts], float)
        if xs.min() <= primes <= xs.max():
            return float(np.interp(primes, xs, ys))
        if "quadratic" in fits and len(xs) >= 3:
            f = fits["quadratic"]
            return float(max(ys.min(), f[0] + f[1] * primes + f[2] * primes * primes))
        # too few points for a fit: scale the nearest measurement by the prime count
        k = int(np.argmin(np.abs(xs - primes)))
        return float(ys[k] * primes / xs[k])

    def _boots(self, n: int) -> list[dict]:
        """A Lattigo table's bootstrap measurements at ring ``n`` (none otherwise)."""
        if not self.lattigo or n not in self.rings:
            return []
        return self.rings[n].get("bootstrap") or []

    def bootstrap_entry(self, n: int, slots: int | None) -> dict | None:
        """The table's bootstrap measurement of ciphertexts with ``slots`` slots (None: all of
        them), on a Lattigo table; None when it has no such measurement."""
        boots = self._boots(n)
        if slots is None or slots == n // 2:
            return max(boots, key=lambda b: b.get("slots", 0), default=None)
        return next((b for b in boots if b.get("slots") == slots), None)

    def sparse_log_slots(self, n: int) -> list[int]:
        """Slot counts below N/2 (as log2) whose bootstrap the table measured, with its own keys
        and bootstrapper: the sparse packings a bootstrapping program may choose."""
        return sorted({int(b["log_slots"]) for b in self._boots(n)
                       if b.get("slots", n // 2) < n // 2 and "key_bytes" in b and "bootstrapper" in b}, reverse=True)

    def bootstrap_rates(self, n: int, slots: int | None = None) -> tuple[float | None, float | None]:
        """(seconds of one bootstrap alone, seconds per ciphertext of a batch on every core) at
        ``slots`` slots: the sparse packing's own measurement, else the refresh price."""
        sp = self._sparse(n, slots)
        if sp is None:
            return self.refresh.bootstrap_s, self.refresh.bootstrap_parallel_s
        many = sp.get("many") or {}
        return float(sp["wall_s"]), (many["wall_s"] / many["ciphertexts"] if many.get("ciphertexts") else None)

    def refresh_seconds(self, n: int, primes_top: int, slots: int | None = None) -> float:
        """One ciphertext's refresh.  Client-aided: the key holder decrypts
        and encrypts again, plus the transfer of two ciphertexts (the round trip
        is per batch: see :func:`program_cost`).  Bootstrap: the given price (at
        ``slots`` slots, a sparse packing's measured bootstrap), or the circuit at
        this ring."""
        if self.refresh.bootstraps:
            sp = self._sparse(n, slots)
            if sp is not None:
                return float(sp["wall_s"])
            if self.refresh.bootstrap_s is not None:
                return self.refresh.bootstrap_s
            return self.bootstrap_seconds(n, primes_top)
        compute = (self.op_seconds("decrypt", n, 1) + self.op_seconds("encode", n, primes_top)
                   + self.op_seconds("encrypt", n, primes_top))
        return compute + self.transfer_seconds(n, primes_top)

    def transfer_seconds(self, n: int, primes_top: int) -> float:
        """Sending one ciphertext to the key holder (at the bottom level) and one back (at the top)."""
        return (ct_bytes(n, 1) + ct_bytes(n, primes_top)) / self.refresh.bandwidth_bytes_per_s

    def bootstrap_seconds(self, n: int, primes_top: int) -> float:
        """The :class:`BootstrapCircuit` priced op by op: it starts from the
        program's top level plus the circuit's own levels and ends at the top
        (plaintext diagonals precomputed, as bootstrapping libraries do)."""
        c = self.refresh.circuit
        start = primes_top + c.levels
        return sum(count * self.op_seconds(op, n, start - below)
                   for op, count, below in c.op_counts(n // 2) if count)

    def encode_seconds(self, n: int, primes: int, slots: int | None = None) -> float:
        return self.op_seconds("encode", n, primes, slots)

    def generation_seconds(self, n: int) -> float:
        """Making plaintext diagonals from compact weights (numpy), per full diagonal's worth of
        matrix entries (``n/2`` of them), before they are encoded; 0 when not measured."""
        return float(self._ring(n).get("plaintext_generation_s") or 0.0)

    def lookup_seconds(self, n: int) -> float:
        """Checking one product's plaintext and looking it up by content; 0 when not measured."""
        return float(self._ring(n).get("plaintext_lookup_s") or 0.0)

    def keygen(self, n: int, data_primes: int, galois_keys: float, relin: bool,
               slots: int | None = None) -> tuple[float, int]:
        """(seconds, serialized bytes of the server's keys) of generating a program's keys with
        ``data_primes`` primes in its chain, from the one-key times and sizes measured at the
        table's chain for ring ``n``: a key-switching key has one part per data prime over all
        primes plus the special one, so its time and size scale with ``L * (L + 1)``; the public
        key with ``L + 1``.  Lattigo tables add the bootstrapping keys, measured whole."""
        ring = self._ring(n)
        if self.lattigo:
            kg, kb = ring.get("keygen", {}).get("seconds", {}), ring.get("key_bytes", {})
            steps = max(1, len(ring.get("keygen", {}).get("galois_steps") or [1]))
            lt = int(ring.get("chain_length", data_primes))
            r = self.ksk_bytes(n, data_primes) / max(1, self.ksk_bytes(n, lt))
            btp_s = kg.get("bootstrap", 0.0)
            sp = self._sparse(n, slots)  # a sparse packing has its own bootstrapping keys
            if sp is not None:
                btp_s = (sp.get("keygen_seconds") or {}).get("bootstrap", btp_s)
            seconds = (kg.get("secret_public", 0.0) + btp_s
                       + (galois_keys * kg.get("galois", 0.0) / steps + (kg.get("relin", 0.0) if relin else 0.0)) * r)
            upload = (kb.get("public.key", 0) + self.bootstrap_key_bytes(n, slots)
                      + (galois_keys * kb.get("galois_key_one_step", 0) + (kb.get("relin.key", 0) if relin else 0)) * r)
            return seconds, int(upload)
        st, kb = ring.get("setup_s", {}), ring.get("key_bytes", {})
        lt = len(ring.get("coeff_bits", [])) - 1 or data_primes  # the table's data primes
        ksk = data_primes * (data_primes + 1) / (lt * (lt + 1))
        pk = (data_primes + 1) / (lt + 1)
        seconds = (st.get("context", 0.0) + st.get("keygen_secret_public", 0.0) * pk
                   + (galois_keys * st.get("galois_key_one_step", 0.0) + (st.get("relin_keys", 0.0) if relin else 0.0))
                   * ksk)
        size = lambda k: float((kb.get(k) or {}).get("serialized", 0))  # noqa: E731
        upload = size("public_key") * pk + (galois_keys * size("galois_key_one_step")
                                            + (size("relin_keys") if relin else 0)) * ksk
        return seconds, int(upload)

    def ksk_bytes(self, n: int, data_primes: int) -> int:
        """In-memory size of one key-switching key (relinearisation or one rotation) for a chain
        of ``data_primes`` primes: SEAL (one special prime, one part per data prime) or Lattigo
        (its ``P`` primes, ``ceil(Q/P)`` parts)."""
        if self.lattigo:
            p = len(self._ring(n).get("p", [])) or 1
            return math.ceil(data_primes / p) * 2 * n * (data_primes + p) * 8
        return switching_key_bytes(n, data_primes)

    @property
    def keys_per_level(self) -> bool:
        """Whether the backend makes each Galois key with the primes of the highest level it is used
        at (Lattigo: ``EvaluationKeyParameters.LevelQ``); SEAL makes every key at the top."""
        return self.lattigo

    def galois_key_bytes(self, prog, graph=None, needs=None) -> int:
        """In-memory bytes of ``prog``'s Galois keys: each at its level of use where the backend
        makes keys per level (:meth:`hecompiler.heprog.HEProgram.galois_key_levels`, whose
        ``graph`` and ``needs`` price another key set), else all at the top."""
        n, top = prog.params.poly_degree, prog.params.top_level + 1
        if not self.keys_per_level:
            return len(prog.galois_steps if graph is None else graph.keys) * self.ksk_bytes(n, top)
        return sum(self.ksk_bytes(n, lv + 1) for lv in prog.galois_key_levels(graph, needs).values())

    def _sparse(self, n: int, slots: int | None) -> dict | None:
        """A sparse packing's own bootstrap entry (its keys and bootstrapper), else None."""
        if slots is None or slots == n // 2:
            return None
        b = self.bootstrap_entry(n, slots)
        return b if b is not None and "key_bytes" in b else None

    def bootstrap_key_bytes(self, n: int, slots: int | None = None) -> int:
        """The bootstrapping keys' bytes (at ``slots`` slots: that packing's own keys)."""
        if not self.lattigo:
            return 0
        sp = self._sparse(n, slots)
        kb = sp["key_bytes"] if sp is not None else self._ring(n).get("key_bytes", {})
        return int(kb.get("bootstrap.key", 0))

    def bootstrapper_bytes(self, n: int, slots: int | None = None) -> int:
        """Memory of one more concurrent bootstrapping worker (its own copy of the CoeffsToSlots
        and SlotsToCoeffs matrices; the first one is in the server's measured key load), measured;
        0 when the table has no measurement."""
        if not self.lattigo:
            return 0
        sp = self._sparse(n, slots)
        if sp is not None:
            return int(sp.get("worker_heap_bytes", 0))
        boots = self._ring(n).get("bootstrap") or []
        return int(max((b.get("worker_heap_bytes", 0) for b in boots), default=0))

    def bootstrapper_base_bytes(self, n: int, slots: int | None = None) -> int:
        """Memory the first bootstrapping evaluator adds to a server beside its keys (its
        CoeffsToSlots/SlotsToCoeffs matrices), measured; 0 when the table has no measurement."""
        if not self.lattigo:
            return 0
        sp = self._sparse(n, slots)
        b = (sp["bootstrapper"] if sp is not None else self._ring(n).get("bootstrapper")) or {}
        return int(max(b.get("heap_bytes", 0), b.get("rss_bytes", 0)))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def ct_bytes(n: int, primes: int) -> int:
    return 2 * n * primes * 8


def pt_bytes(n: int, primes: int) -> int:
    return n * primes * 8


def switching_key_bytes(n: int, data_primes: int) -> int:
    """One Galois (or relinearisation) key: one key-switching pair per data
    prime, each over all data primes plus the special prime."""
    return data_primes * 2 * n * (data_primes + 1) * 8


def machine_table_path() -> str:
    """Where ``hecompile calibrate`` writes this machine's cost table."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hecompiler", "cost_seal.json")


def load_table(kind: str = "seal") -> tuple[dict, str]:
    """The cost table of a backend (``seal``, ``lattigo-SET``) and where it came from: this
    machine's (user cache, written by ``hecompile calibrate`` / the measuring benchmark) unless
    ``$HECOMPILER_COST_TABLE`` is ``bundled``, else the one bundled with the compiler."""
    if kind == "seal":
        return _default_table()
    fn = f"cost_{kind}.json"
    mine = os.path.join(os.path.dirname(machine_table_path()), fn)
    if os.environ.get("HECOMPILER_COST_TABLE", "") != "bundled" and os.path.exists(mine):
        return _read_table(mine), f"this machine's table {mine}"
    try:
        text = resources.files("hecompiler").joinpath(f"data/{fn}").read_text()
    except FileNotFoundError:
        raise HecError(f"no cost table for {kind}: run benchmarks/measure_{kind.split('-')[0]}_costs.py") from None
    return json.loads(text), f"the bundled table hecompiler/data/{fn}"


def _default_table() -> tuple[dict, str]:
    env = os.environ.get("HECOMPILER_COST_TABLE", "")
    if env and env != "bundled":
        return _read_table(env), f"table {env} ($HECOMPILER_COST_TABLE)"
    if not env and os.path.exists(machine_table_path()):
        return _read_table(machine_table_path()), f"this machine's table {machine_table_path()}"
    return _bundled_table(), "the bundled table (run hecompile calibrate to measure this machine)"


@lru_cache(maxsize=4)
def _read_table(path: str) -> dict:
    try:
        with open(path) as f:
            t = json.load(f)
    except (OSError, ValueError) as e:
        raise HecError(f"cost table {path}: unreadable ({e}); run hecompile calibrate again") from None
    if not isinstance(t, dict) or not isinstance(t.get("rings"), list):
        raise HecError(f"cost table {path}: not a cost table (no rings)")
    return t


@lru_cache(maxsize=1)
def _bundled_table() -> dict:
    try:
        text = resources.files("hecompiler").joinpath("data/cost_seal.json").read_text()
    except FileNotFoundError:
        raise HecError("cost table hecompiler/data/cost_seal.json is missing; "
                       "run benchmarks/measure_seal_costs.py") from None
    return json.loads(text)


@dataclass
class ProgramCost:
    """Predicted latency and memory of running a program with SEAL."""

    seconds: float
    by_op: dict[str, float]
    encode_seconds: float
    op_counts: dict[str, int]
    galois_keys: int
    key_bytes: int
    peak_live_ciphertexts: int
    peak_ciphertext_bytes: int
    #: one linear op's diagonals (float64) plus one encoded plaintext and, where the executor encodes
    #: ahead (Lattigo), the encoded plaintexts its prefetcher holds (hecompiler.prefetch.prefetch_window)
    plaintext_bytes: int
    memory_bytes: int  # predicted peak: keys + ciphertexts + plaintexts + baseline
    refreshes: int
    network_seconds: float = 0.0  # part of ``seconds``: client-aided refresh transfers and round trips
    keygen_seconds: float = 0.0  # client: secret/public, relin and the Galois keys of the program
    key_upload_bytes: int = 0  # serialized evaluation keys the server gets (public, relin, Galois)
    round_trips: int = 0  # batches of client-aided refreshes per inference
    plaintexts: int = 0  # plaintext operands encoded per inference (each at its level)
    plaintext_bytes_all: int = 0  # all of them encoded at their levels: what keeping every one takes
    plaintext_cache_bytes: int = 0  # of those, what the executor's plaintext cache keeps (inside memory_bytes)
    #: part of ``encode_seconds`` hidden behind the evaluation (encoded ahead on other cores; not in ``seconds``)
    overlapped_seconds: float = 0.0
    #: garbage a collected runtime lets grow beside what it holds (Go at the server's GC percent; inside memory_bytes)
    garbage_bytes: int = 0
    #: of ``key_bytes``, the Galois keys (each at its level of use where the backend makes keys per level)
    galois_key_bytes: int = 0
    #: seconds of linear-op work done by helper processes beside the evaluating one, less what passing
    #: ciphertexts to them costs (not in ``seconds``: hecompiler.parallel, split_saving); of
    #: ``encode_seconds`` the part they do; how many processes evaluate
    shared_seconds: float = 0.0
    shared_encode_seconds: float = 0.0
    processes: int = 1
    #: the helper processes' own memory (inside memory_bytes)
    helper_bytes: int = 0

    def served_seconds(self, cache_bytes: int) -> float:
        """One inference after the first in a ``hecompile serve`` worker, which evaluates in one
        process (no helpers: serving.engine.one_process) and keeps ``cache_bytes`` of plaintexts."""
        return repeat_seconds(self.seconds + self.shared_seconds, self.encode_seconds, self.overlapped_seconds,
                              self.plaintext_bytes_all, cache_bytes)

    def repeat_seconds(self, cache_bytes: int) -> float:
        """One inference when an executor keeps ``cache_bytes`` of encoded plaintexts from the
        previous ones (:func:`repeat_seconds`)."""
        return repeat_seconds(self.seconds, self.encode_seconds, self.overlapped_seconds + self.shared_encode_seconds,
                              self.plaintext_bytes_all, cache_bytes)


def repeat_seconds(seconds: float, encode_seconds: float, hidden_seconds: float, plaintext_bytes_all: int,
                   cache_bytes: int) -> float:
    """An inference of ``seconds`` (of which ``encode_seconds`` encoding, ``hidden_seconds`` of that
    on other cores: encoded ahead, or by helper processes) when an executor keeps ``cache_bytes`` of its ``plaintext_bytes_all`` of
    plaintexts from before: the cache fills in program order, and that share of the encoding the
    evaluation waited for is saved.  The compile report's ``predicted_served_seconds``, and a
    server's with the cache it was given."""
    if not plaintext_bytes_all:
        return seconds
    kept = min(1.0, max(0, cache_bytes) / plaintext_bytes_all)
    return seconds - kept * max(0.0, encode_seconds - hidden_seconds)


#: resident memory of the Python process with numpy, onnx, SEAL loaded, when the cost table has
#: no measurement of it (``memory.baseline_rss_bytes``: written by ``hecompile calibrate`` for SEAL,
#: by benchmarks/measure_lattigo_costs.py for a Lattigo set: the server besides its keys)
BASELINE_BYTES = 400 * 2**20


def instr_cost(ins, prog, model: "CostModel") -> tuple[dict[str, float], float, dict[str, int]]:
    """(seconds by primitive op, seconds encoding plaintexts, primitive op counts) of one instruction."""
    n = prog.params.poly_degree
    top_primes = prog.params.top_level + 1
    if ins.op == "linear":
        lin = prog.linears[ins.plain.args[0]]
        c = lin.counts
        pin = ins.level + 2  # primes of the input (one more than the output)
        rot = c.get("rotate", 0) * model.op_seconds("rotate", n, pin)
        if getattr(model, "hoists", False):  # the baby steps of each input ciphertext share one decomposition
            baby = c.get("baby_rotations", 0)
            first = min(baby, prog.layouts[lin.in_layout].n_ct)
            rot += (first * model.op_seconds("rotate", n, pin) + (baby - first)
                    * model.op_seconds("rotate_hoisted_extra", n, pin) - baby * model.op_seconds("rotate", n, pin))
        # products accumulated in place (runtime: mul_plain_add) where the table measured it
        measured = getattr(model, "measured", None)  # a duck-typed model may not say
        acc = c.get("acc_adds", 0) if measured is not None and measured("mul_plain_acc", n) else 0
        by = {"rotate": rot,
              "mul_plain": ((c.get("mul_plain", 0) - acc) * model.op_seconds("mul_plain", n, pin)
                            + acc * (model.op_seconds("mul_plain_acc", n, pin) if acc else 0.0)),
              "add": (c.get("add", 0) - acc) * model.op_seconds("add", n, pin),
              "rescale": c.get("rescale", 0) * model.op_seconds("rescale", n, pin),
              "add_plain": c.get("add_plain", 0) * model.op_seconds("add_plain", n, pin - 1)}
        # making the diagonals costs their matrix entries (every product a full diagonal when the
        # lowering did not count them); each product's plaintext is then checked and looked up by
        # content.  An op with signatures (entries_made) finds a held plaintext by signature
        # instead (a dictionary lookup, not priced): only the output ciphertexts with a plaintext
        # not held make their diagonals (all of them when nothing is held), and only the
        # plaintexts it encodes are checked (priced as the measured check and content lookup)
        signed = "entries_made" in c
        made = c["entries_made"] if signed and plaintexts_held() else c.get("entries")
        full = (made if made is not None else c.get("mul_plain", 0) * prog.params.slots) / prog.params.slots
        lookup = getattr(model, "lookup_seconds", None)  # a duck-typed model may not say
        encodings = linear_encodings(c)
        looked_up = encodings if signed else c.get("mul_plain", 0)
        enc = (full * model.generation_seconds(n) + (looked_up * lookup(n) if lookup else 0.0)
               + encodings * _encode_seconds(model, prog, pin)
               + c.get("add_plain", 0) * _encode_seconds(model, prog, pin - 1))
        return {k: v for k, v in by.items() if v}, enc, {k: v for k, v in c.items() if v and k in _PRIMITIVES}
    # primes of the operand: a rescale or mod-switch drops at least one
    primes = ins.level + 1 if ins.op not in ("rescale", "mod_switch") else ins.level + 2
    if ins.op == "refresh" and prog.params.log_slots is not None:  # a sparse packing's own bootstrap
        t = model.refresh_seconds(n, top_primes, prog.params.slots)
    else:
        t = model.op_seconds(ins.op, n, top_primes if ins.op == "refresh" else primes)
    enc = 0.0
    if ins.plain is not None and ins.op != "refresh":  # a refresh's factor is a relabel, not a plaintext
        enc = model.op_seconds("encode_constant", n, primes) if ins.plain.kind == "scalar" else \
            _encode_seconds(model, prog, primes)
    return {ins.op: t}, enc, {ins.op: 1}


def _encode_seconds(model, prog, primes: int) -> float:
    """One slot vector encoded for ``prog`` at ``primes`` primes: at the program's slot count
    when it packs sparsely and the table measured that count."""
    sparse = prog.params.slots if prog.params.log_slots is not None else None
    return model.op_seconds("encode", prog.params.poly_degree, primes, sparse)


def plaintexts_held() -> bool:
    """Whether the executor keeps encoded plaintexts for reuse (neither cache budget is 0)."""
    from .plaintexts import default_cache_bytes, default_op_cache_bytes

    return default_op_cache_bytes() > 0 and default_cache_bytes() > 0


def linear_encodings(counts: dict) -> int:
    """Diagonals a linear op encodes per inference (``counts`` as the lowering records them):
    what the executor's op-local plaintext tier leaves to encode when identical diagonals share
    one encoding (``counts["plaintexts"]``, simulated by the lowering at the tier's size:
    hecompiler.linear.plaintext_encodings); every product without that count or the tier."""
    uses = counts.get("mul_plain", 0)
    if not plaintexts_held():
        return uses
    return min(uses, counts.get("plaintexts", uses))


def split_shape(ins, prog, processes: int) -> tuple[int, int] | None:
    """(input ciphertexts, ciphertexts coming back: whole outputs or group sums) of a linear op the
    executor shares between ``processes`` processes (hecompiler.parallel), or None when it does not."""
    if ins.op != "linear" or processes < 2:
        return None
    from .parallel import by_outputs, worth_splitting

    lin = prog.linears[ins.plain.args[0]]
    c = lin.counts
    groups = c.get("mul_plain", 0) - c.get("acc_adds", 0)
    n_in, n_out = prog.layouts[lin.in_layout].n_ct, prog.layouts[lin.out_layout].n_ct
    if not worth_splitting(c.get("mul_plain", 0), groups, n_in, n_out, processes):
        return None
    return n_in, (n_out if by_outputs(n_out, processes) else groups)


def split_saving(ins, prog, model, by: dict[str, float], enc: float,
                 processes: int | None = None) -> tuple[float, float]:
    """Seconds a linear op saves when the executor shares it with helper processes
    (hecompiler.parallel; 0 when it does not): its products, their accumulations and its
    encodings spread over :attr:`CostModel.eval_processes`; its rotations, rescales and bias are
    priced on the evaluating process (all of them: an op shared by group sums leaves it every giant
    step; one shared by whole outputs gives the helpers theirs, which this does not count), which
    also serializes the inputs the helpers read and loads what they return.  (The helpers' own
    copies of the baby steps run on their cores, beside the evaluating process's.)  Returns (seconds saved, of the
    op's encoding the part the helpers do).  ``processes``: priced at that many (default the
    model's :attr:`CostModel.eval_processes`)."""
    P = processes if processes is not None else getattr(model, "eval_processes", 1)  # a duck-typed model may not say
    shape = split_shape(ins, prog, P)
    if shape is None:
        return 0.0, 0.0
    n_in, back = shape
    lin = prog.linears[ins.plain.args[0]]
    c = lin.counts
    n = prog.params.poly_degree
    pin = ins.level + 2
    measured = getattr(model, "measured", None)
    acc = c.get("acc_adds", 0) if measured is not None and measured("mul_plain_acc", n) else 0
    shared = by.get("mul_plain", 0.0) + enc + (c.get("acc_adds", 0) - acc) * model.op_seconds("add", n, pin)
    save, load = model.transfer_ct_seconds(n, pin)
    travel = n_in * save + back * (P - 1) / P * load
    return max(0.0, shared * (P - 1) / P - travel), enc * (P - 1) / P


def encode_hidden(by: dict[str, float], enc: float, cores: int) -> float:
    """Seconds of a linear op's encoding hidden behind its evaluation when its plaintexts are
    encoded ahead on ``cores`` cores while one core evaluates (0: encoding waits in line): the
    op takes the longer of its evaluation and all its work spread over the cores."""
    if not cores or not enc:
        return 0.0
    ev = sum(by.values())
    return ev + enc - max(ev, (ev + enc) / cores)


def encode_pipeline(prog, model: "CostModel", costs: list | None = None) -> list[float]:
    """Seconds of each instruction's plaintext encoding hidden behind the evaluation (0 but for
    linear ops), as the executor's prefetcher (:mod:`hecompiler.prefetch`) runs: the other cores
    encode the linear ops' plaintexts in program order, at most a window ahead
    (:func:`~hecompiler.prefetch.prefetch_window`), while the evaluation thread runs every
    instruction.  Before a linear op they have had the instructions since the last one (a
    polynomial, additions) and what they had left over in it; during the op, its own evaluation
    (:func:`encode_hidden`).  A refresh credits nothing: a client-aided one ends the run (the next
    starts with nothing made ahead), and plaintexts made during a bootstrap were measured not to
    shorten the linear ops after it (ResNet-20 at N=2^16 with 2.5 GiB made ahead: 195.6 s against
    193.1 s with 256 MiB; commit 4f7a712).  ``costs``: :func:`instr_cost` of every instruction,
    when known."""
    from .prefetch import prefetch_window

    out = [0.0] * len(prog.instrs)
    cores = getattr(model, "encode_cores", 0)  # a duck-typed model may not say
    if not cores:
        return out
    client = _runs_end_at_refreshes(model)
    n = prog.params.poly_degree
    ahead = 0.0  # seconds of encoding done for the linear ops to come
    for k, ins in enumerate(prog.instrs):
        by, e, _ = costs[k] if costs is not None else instr_cost(ins, prog, model)
        ev = sum(by.values())
        if ins.op == "refresh":
            if client:
                ahead = 0.0
        elif ins.op != "linear" or e <= 0:
            ahead += ev * (cores - 1)
        else:
            n_enc = max(1, linear_encodings(prog.linears[ins.plain.args[0]].counts))
            cap = e * min(1.0, prefetch_window(pt_bytes(n, ins.level + 2)) / n_enc)
            pre = min(ahead, cap)
            rest = e - pre
            out[k] = pre + encode_hidden(by, rest, cores)
            ahead = max(0.0, max(ev, (ev + rest) / cores) * (cores - 1) - rest)
    return out


def _runs_end_at_refreshes(model) -> bool:
    """Whether an evaluation stops at each refresh (client-aided), so the executor's prefetcher
    (one per run) starts over after it."""
    return getattr(getattr(model, "refresh", None), "kind", "client") != "bootstrap"


def linear_temporaries(lin) -> int:
    """Ciphertexts a ``linear`` macro holds besides its inputs and outputs: its baby-step
    rotations, one giant-step accumulator and one running sum (see runtime.run_linear)."""
    if "baby_held" in lin.counts:  # a key-set schedule (hecompiler.rotkeys): its baby trees
        return lin.counts["baby_held"] + 2
    baby = lin.counts.get("baby_rotations")
    if baby is None:  # programs from before the count existed: every rotation, an upper bound
        baby = lin.counts.get("rotate", 0)
    return baby + 2


def program_cost(prog, model: CostModel | None = None) -> ProgramCost:
    """Static prediction for ``prog`` (an HEProgram): no execution needed."""
    model = model or CostModel()
    p = prog.params
    n = p.poly_degree
    by_op: dict[str, float] = {}
    counts: dict[str, int] = {}
    enc = 0.0
    top_primes = p.top_level + 1
    n_pt = pt_all = 0
    op_tier = 0.0  # the plaintext cache's op-local tier: the distinct plaintexts of the largest op
    cores = getattr(model, "encode_cores", 0)  # a duck-typed model may not say
    costs = [instr_cost(ins, prog, model) for ins in prog.instrs]
    hidden = sum(encode_pipeline(prog, model, costs))
    splits = [split_saving(ins, prog, model, by, e) for ins, (by, e, _) in zip(prog.instrs, costs)]
    shared = sum(saved for saved, _ in splits)
    shared_enc = sum(e for _, e in splits)
    for ins, (by, e, cnt) in zip(prog.instrs, costs):
        for k, v in by.items():
            by_op[k] = by_op.get(k, 0.0) + v
        for k, v in cnt.items():
            counts[k] = counts.get(k, 0) + v
        enc += e
        if ins.op == "linear":
            c = prog.linears[ins.plain.args[0]].counts
            nb = pt_bytes(n, ins.level + 2)
            n_enc = linear_encodings(c)
            n_pt += n_enc + c.get("add_plain", 0)
            distinct = min(c.get("mul_plain", 0), c.get("distinct_plaintexts", c.get("mul_plain", 0)))
            pt_all += distinct * nb + c.get("add_plain", 0) * pt_bytes(n, ins.level + 1)
            if n_enc < c.get("mul_plain", 0):  # the executor's op-local tier holds them (begin_op)
                op_tier = max(op_tier, distinct * nb)
        elif ins.plain is not None and ins.op != "refresh" and ins.plain.kind != "scalar":
            n_pt += 1
            pt_all += pt_bytes(n, ins.level + 1)
    # liveness: peak live ciphertexts and their bytes (a linear op also holds its baby rotations)
    last = prog.last_uses()
    live: dict[int, int] = {v: top_primes for io in prog.inputs for v in io.values}
    cur = sum(ct_bytes(n, k) for k in live.values())
    peak_n, peak_b = len(live), cur
    # ciphertexts alive per size (primes), and the most of each at once: a backend that pools its
    # allocations by size and never returns them (SEAL's memory pool) holds the sum of those peaks
    by_size: dict[int, int] = {}
    for q in live.values():
        by_size[q] = by_size.get(q, 0) + 1
    size_peak = dict(by_size)
    from .prefetch import prefetch_window

    diag_max = 0
    ahead = 0  # encoded plaintexts held ahead of the evaluation (hecompiler.prefetch)
    # the executor encodes ahead where the backend's encoder runs off its thread: from each linear
    # op on, up to a window of its plaintexts or what remains of the run's (to a client-aided refresh)
    remaining: dict[int, int] = {}
    if cores > 0:
        left = 0
        client = _runs_end_at_refreshes(model)
        for k in range(len(prog.instrs) - 1, -1, -1):
            ins = prog.instrs[k]
            if ins.op == "refresh" and client:
                left = 0
            elif ins.op == "linear":
                left += prog.linears[ins.plain.args[0]].counts.get("mul_plain", 0)
                remaining[k] = left
    for k, ins in enumerate(prog.instrs):
        extra = 0
        if ins.op == "linear":
            lin = prog.linears[ins.plain.args[0]]
            extra = linear_temporaries(lin)
            diag_max = max(diag_max, lin.counts.get("block_diagonals", lin.counts.get("mul_plain", 0)))
            if k in remaining:
                one = pt_bytes(n, ins.level + 2)  # the products are taken at the input's level
                ahead = max(ahead, min(prefetch_window(one), remaining[k]) * one)
        for o in ins.results:
            live[o] = ins.level + 1
            cur += ct_bytes(n, ins.level + 1)
            by_size[ins.level + 1] = by_size.get(ins.level + 1, 0) + 1
            size_peak[ins.level + 1] = max(size_peak.get(ins.level + 1, 0), by_size[ins.level + 1])
        tmp = extra * ct_bytes(n, ins.level + 2)
        size_peak[ins.level + 2] = max(size_peak.get(ins.level + 2, 0), by_size.get(ins.level + 2, 0) + extra)
        peak_n, peak_b = max(peak_n, len(live) + extra), max(peak_b, cur + tmp)
        for a in set(ins.args):
            if last.get(a, -1) <= k and a in live:
                q = live.pop(a)
                cur -= ct_bytes(n, q)
                by_size[q] -= 1
    if getattr(model, "pools_by_size", False):
        peak_b = max(peak_b, sum(c * ct_bytes(n, q) for q, c in size_peak.items()))
    # plaintext working set: the largest block row of diagonals (float64) plus one encoded plaintext
    from .linear import DIAG_TEMP_BYTES

    pt = diag_max * p.slots * 8 + pt_bytes(n, top_primes) + (DIAG_TEMP_BYTES if diag_max else 0) + ahead
    # each helper process (hecompiler.parallel) holds, beside what it shares with the evaluating one
    # (a fork: program and keys), the inputs of the largest op it shares, the baby-step rotations of
    # them, its part of what comes back, its accumulators, the plaintext working set and its own
    # plaintext caches, which fill as the evaluating process's do (added below, once ``cached`` is known)
    P = getattr(model, "eval_processes", 1)
    helper = 0
    for ins in prog.instrs:
        shape = split_shape(ins, prog, P)
        if shape is not None:
            n_in, back = shape
            held = n_in + linear_temporaries(prog.linears[ins.plain.args[0]]) + -(-back // P)
            helper = max(helper, held * ct_bytes(n, ins.level + 2))
    n_keys = len(prog.galois_steps)
    sparse = {"slots": p.slots} if p.log_slots is not None else {}  # a sparse packing's own bootstrap
    gk_bytes = model.galois_key_bytes(prog)
    kb = (gk_bytes + (1 if prog.needs_relin else 0) * model.ksk_bytes(n, top_primes) + ct_bytes(n, top_primes + 1)
          + model.bootstrap_key_bytes(n, **sparse))
    run = longest = 0
    for ins in prog.instrs:
        run = run + 1 if ins.op == "refresh" else 0
        longest = max(longest, run)
    # a bootstrapping server prepares one evaluator per ciphertext bootstrapped at once (os.cpu_count at most)
    workers = min(longest, os.cpu_count() or 1)
    boot_mem = (model.bootstrapper_base_bytes(n, **sparse) + max(0, workers - 1) * model.bootstrapper_bytes(n, **sparse)
                if model.refresh.bootstraps and workers else 0)
    # one round trip per batch of consecutive refreshes (a tensor's ciphertexts travel together)
    batches = sum(1 for k, ins in enumerate(prog.instrs)
                  if ins.op == "refresh" and (k == 0 or prog.instrs[k - 1].op != "refresh"))
    network = 0.0
    one, par = (model.bootstrap_rates(n, p.slots) if sparse else
                (model.refresh.bootstrap_s, model.refresh.bootstrap_parallel_s))
    if model.refresh.bootstraps and par is not None and one is not None:
        # a batch of several bootstraps runs on every core at once: price those at the measured rate
        run = 0
        saved = 0.0
        for k, ins in enumerate(prog.instrs + [None]):
            if ins is not None and ins.op == "refresh":
                run += 1
                continue
            if run >= 2:
                saved += run * (one - par)
            run = 0
        by_op["refresh"] = by_op.get("refresh", 0.0) - saved
    if batches and not model.refresh.bootstraps:
        by_op["refresh"] = by_op.get("refresh", 0.0) + batches * model.refresh.round_trip_s
        network = batches * model.refresh.round_trip_s + counts.get("refresh", 0) * model.transfer_seconds(n, top_primes)
    seconds = sum(by_op.values()) + enc - hidden - shared
    # keys made at lower levels take less time and bytes: count them as that many keys at the top
    top_keys = gk_bytes / model.ksk_bytes(n, top_primes) if n_keys else 0
    kg, upload = model.keygen(n, top_primes, top_keys, prog.needs_relin, **sparse)
    # the executor keeps encoded plaintexts for reuse (hecompiler.plaintexts.PlaintextCache), up to its
    # budget: resident memory the server holds from the first inference on
    from .plaintexts import default_cache_bytes

    cached = min(default_cache_bytes(), pt_all)
    # past that budget, the op running shares its identical diagonals in an op-local tier
    if pt_all > cached:
        from .plaintexts import default_op_cache_bytes

        cached += int(min(default_op_cache_bytes(), op_tier))
    helper_bytes = (helper + pt + cached) * (P - 1) if helper else 0
    # a Go heap (Lattigo) holds the keys, the bootstrapper, the ciphertexts and the encoded plaintexts, and
    # its collector lets garbage grow to gc_percent of that before it runs, and past it while it marks
    # (gc_overshoot: fitted to ResNet-8's and ResNet-20's servers)
    garbage = int((kb + boot_mem + peak_b + cached) * getattr(model, "gc_percent", 0) / 100
                  * getattr(model, "gc_overshoot", 1.0))
    return ProgramCost(seconds, dict(sorted(by_op.items())), enc, dict(sorted(counts.items())), n_keys, kb,
                       peak_n, peak_b, pt, kb + boot_mem + peak_b + pt + cached + garbage + model.baseline_bytes
                       + helper_bytes,
                       counts.get("refresh", 0), network, kg, upload, batches if not model.refresh.bootstraps else 0,
                       n_pt, pt_all, cached, hidden, garbage, gk_bytes, shared, shared_enc, P, helper_bytes)
