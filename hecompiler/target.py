"""Where a program will run: what the planner needs to know, as data.

A :class:`Target` says which ring degrees and modulus chains are allowed and on which
security table they rest, how the primes are made, what a refresh is there (a client-aided
re-encryption, or a bootstrap: the levels it leaves, the largest value it accepts, its
price), and which measured cost table prices its ops.  The planner takes a Target and never
imports a backend library; the backend named by :attr:`Target.backend` runs the program, with
the parameters :meth:`Target.metadata` records in the ``.hec``.

Targets:

* ``seal``: Microsoft SEAL (through tenseal).  Rings 2^13..2^15 at 128 bits by the HE
  standard (SEAL's ``CoeffModulus`` limits), chains ``q0 + L * scale + special``.  A refresh
  is client-aided (``--refresh client``), or, for planning only, a bootstrap priced from the
  SEAL op table (``--refresh bootstrap``: no SEAL backend can run it).
* ``lattigo`` / ``lattigo:SET``: Lattigo v6 with bootstrapping, non-interactive.  ``SET`` is
  one of Lattigo's default bootstrapping parameter sets (``n16-sparse``, the default:
  N16QP1546H192H32, ring 2^16 with a sparse secret of Hamming weight 192, whose 128-bit claim
  rests on the sparse-secret encapsulation analysis of Bossuat et al., eprint 2022/024, at
  1546 bits of Q*P; ``n15-dense``: N15QP880H16384H32, ring 2^15 with a dense ternary secret,
  within the HE standard's 881 bits) or an INSECURE toy set for tests (``toy-n12``,
  ``toy-n10``).  The program's chain is the set's residual chain (up to its number of
  levels); Lattigo adds the bootstrapping circuit's primes above it, inside the set's budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .costmodel import CostModel, RefreshCost, load_table
from .errors import HecError
from .heprog import Params
from .primes import chain_primes
from .security import HE_STANDARD_MAX_BITS, max_bits, source

#: rings the SEAL target tries when the user gives none: client-aided refresh / a (priced,
#: hypothetical) bootstrapping target (a 128-bit bootstrap needs N=2^16 for its ~770 bits)
SEAL_RINGS = {"client": (8192, 16384, 32768), "bootstrap": (65536,)}


# --------------------------------------------------------------------------- chains (SEAL)

def chain_bits(n: int, scale_bits: int, levels: int) -> tuple[int, ...]:
    """SEAL order: q_0 (holds the result: scale + 20 bits), L data primes of ``scale_bits``,
    then the special key-switching prime (>= every other)."""
    q0 = min(60, scale_bits + 20)
    special = max(q0, scale_bits)
    return (q0,) + (scale_bits,) * levels + (special,)


def max_levels(n: int, scale_bits: int, security: str, reserved_bits: int = 0) -> int:
    """Data levels that fit ring ``n`` with ``reserved_bits`` of modulus kept for a bootstrap
    circuit above the chain."""
    if security == "none":
        limit = 60 * 30 if n >= 32768 else (max_bits(n) or 0) * 2
    else:
        if max_bits(n) is None:
            raise HecError(f"ring degree {n} has no 128-bit parameters in the HE standard table "
                           f"(supported: {sorted(HE_STANDARD_MAX_BITS['tc128'])}); pass --security none to go beyond")
        limit = max_bits(n)
    q0 = min(60, scale_bits + 20)
    special = max(q0, scale_bits)
    return max(0, (limit - q0 - special - reserved_bits) // scale_bits)


# --------------------------------------------------------------------------- targets

@dataclass(frozen=True)
class BootstrapRange:
    """What a bootstrap accepts: slot values with ``|v| <= max_abs``; at level 0 Lattigo
    multiplies by ``round(q0 / (scale * ratio))``, exact when the scale is a power of two
    dividing ``q0 / ratio``'s power of two (our q0 sits just below 2^k)."""

    max_abs: float
    message_ratio: float
    q0_bits: int


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    refresh_kind: str  # "client" | "bootstrap"
    description: str
    #: Lattigo sets: the residual chain and everything the backend needs to rebuild the parameters
    lattigo: dict[str, Any] | None = None
    bootstrap_range: BootstrapRange | None = None
    cost_table: str = "seal"
    #: other targets (specs) the planner weighs against this one: ``--target lattigo`` names no set,
    #: so the model is planned for each of :data:`LATTIGO_CHOICES` and the fastest plan within the
    #: budgets wins
    alternatives: tuple[str, ...] = ()

    @property
    def bootstraps(self) -> bool:
        return self.refresh_kind == "bootstrap"

    # ---------------------------------------------------------------- costs
    def cost_model(self, refresh: RefreshCost | None = None) -> CostModel:
        """The measured op table of this target (and, for Lattigo, its measured bootstrap)."""
        if self.backend == "seal":
            return CostModel(refresh=refresh)
        table, src = load_table(self.cost_table)
        boots = table["rings"][0].get("bootstrap", [])
        full = max(boots, key=lambda b: b.get("slots", 0), default=None)  # the program uses every slot
        if full is None:
            raise HecError(f"cost table {src}: no bootstrap measurement; run benchmarks/measure_lattigo_costs.py")
        many = full.get("many") or {}
        par = many["wall_s"] / many["ciphertexts"] if many.get("ciphertexts") else None
        rc = RefreshCost(kind="bootstrap", bootstrap_s=float(full["wall_s"]), reserve=False,
                         bootstrap_parallel_s=par)
        m = CostModel(table, refresh=rc)
        m.source = src
        m.gc_percent = LATTIGO_SERVER_GC_PERCENT
        m.gc_overshoot = LATTIGO_GC_OVERSHOOT
        return m

    # ---------------------------------------------------------------- parameters
    def candidates(self, ring_degrees, scale_bits, levels, security: str, refresh: RefreshCost) -> list[Params]:
        if self.backend == "lattigo":
            return self._lattigo_candidates(ring_degrees, scale_bits, levels, security)
        rings = ring_degrees or SEAL_RINGS[refresh.kind]
        out, too_small = [], []
        for n in rings:
            if n < 1024 or n & (n - 1):
                raise HecError(f"ring degree {n} is not a power of two >= 1024")
            scales = [scale_bits] if scale_bits else ([40, 30] if n <= 8192 else [40])
            for sb in scales:
                lmax = max_levels(n, sb, security, refresh.reserved_bits(sb))
                if lmax < 1:
                    too_small.append(f"N={n} with {sb}-bit primes"
                                     + (f" and {refresh.reserved_bits(sb)} bits kept for bootstrapping"
                                        if refresh.bootstraps else ""))
                    continue
                # the maximum and about half; a bootstrapping target trades levels against bootstraps
                # more finely (a bootstrap costs as much as dozens of convolutions): quarters too
                fracs = (4, 3, 2, 1) if refresh.bootstraps else (4, 2)
                ls = [levels] if levels else sorted({max(1, lmax * f // 4) for f in fracs}, reverse=True)
                for lv in ls:
                    if lv > lmax:
                        raise HecError(f"{lv} levels do not fit N={n} at "
                                       f"{'128-bit security' if security == 'tc128' else 'these settings'} "
                                       f"(at most {lmax}" + (" beside the bootstrap circuit)" if refresh.bootstraps
                                                             else ")"))
                    out.append(Params(n, chain_bits(n, sb, lv), sb, security))
        if not out:
            raise HecError(f"ring degree(s) {', '.join(map(str, rings))} hold no multiplicative level "
                           f"at {'128-bit security' if security == 'tc128' else 'these settings'} "
                           f"({'; '.join(too_small)}); use --ring "
                           f"{'65536' if refresh.bootstraps else '8192 or larger'}")
        return out

    def _lattigo_candidates(self, ring_degrees, scale_bits, levels, security: str) -> list[Params]:
        s = self.lattigo
        n = 1 << s["log_n"]
        if ring_degrees and tuple(ring_degrees) != (n,):
            raise HecError(f"--ring: target {self.name} runs ring degree {n} only")
        if scale_bits and scale_bits != s["log_default_scale"]:
            raise HecError(f"--scale-bits {scale_bits}: target {self.name} bootstraps to scale "
                           f"2^{s['log_default_scale']}; leave --scale-bits out")
        if s.get("insecure") and security == "tc128":
            raise HecError(f"target {self.name} is an INSECURE test set: compile with --security none")
        if not s.get("insecure") and security != "tc128":
            raise HecError(f"target {self.name} is a 128-bit set; --security none is for the toy sets (toy-n12, "
                           f"toy-n10)")
        lmax = s["max_levels"]
        if levels and not 1 <= levels <= lmax:
            raise HecError(f"--levels {levels}: target {self.name} has {lmax} levels between bootstraps at most")
        sb = s["log_default_scale"]
        ls = [levels] if levels else sorted({lmax, max(1, lmax * 3 // 4), max(1, lmax // 2)}, reverse=True)
        # sparse packings whose (cheaper) bootstrap the cost table measured: the planner weighs
        # fewer slots per ciphertext (more ciphertexts) against the cheaper bootstrap
        packings = [None] + self._sparse_packings(n)
        return [Params(n, (s["q0_bits"],) + (sb,) * lv + (sb,), sb, security, log_slots)
                for log_slots in packings for lv in ls]

    def _sparse_packings(self, n: int) -> list[int]:
        """log2 slot counts below N/2 whose bootstrap the target's cost table measured (none
        without a table: the planner prices only what was measured)."""
        if not self.cost_table:
            return []
        try:
            return self.cost_model().sparse_log_slots(n)
        except HecError:
            return []

    def primes(self, params: Params) -> tuple[int, ...]:
        """The data primes q_0..q_L of ``params`` (SEAL's for these sizes; Lattigo gets them
        explicitly, so the program's chain is the same everywhere)."""
        return chain_primes(params.poly_degree, params.coeff_bits)[:-1]

    def refresh_factor(self, level: int, scale: float, bound: float) -> float:
        """The factor a refresh multiplies its input by (the executor relabels the scale by
        ``1/factor`` just before), so a value of magnitude ``bound`` enters the bootstrap within
        its range and, at level 0, at a power-of-two scale that Lattigo rescales exactly; the
        lowering keeps ``1/factor`` pending.  1 for client-aided refresh."""
        r = self.bootstrap_range
        if r is None:
            return 1.0
        need = max(1.0, bound / r.max_abs)
        # the smallest power of two 2^k >= scale * need: the new scale, exact for Lattigo at level 0
        k = math.ceil(math.log2(scale * need))
        limit = r.q0_bits + 1 - round(math.log2(r.message_ratio))  # at level 0: scale <= 2*q0/ratio
        if level == 0 and k > limit:
            raise HecError(f"a value of magnitude {bound:.3g} cannot enter a bootstrap at level 0 (it would need "
                           f"scale 2^{k} > 2^{limit})")
        return scale / 2.0 ** k

    def metadata(self, params: Params, primes) -> dict[str, Any]:
        """What the backend needs, recorded in the ``.hec``: the backend and, for Lattigo, the
        parameter literal with the program's explicit primes."""
        out: dict[str, Any] = {"name": self.name, "backend": self.backend, "refresh": self.refresh_kind}
        if self.lattigo is not None:
            s = self.lattigo
            lit = {"name": s["set"], "log_n": s["log_n"], "q": [int(q) for q in primes], "log_p": list(s["log_p"]),
                   "secret": dict(s["secret"]), "log_default_scale": s["log_default_scale"],
                   "bootstrap": dict(s["bootstrap"])}
            if params.log_slots is not None:  # sparse packing: Lattigo encodes and bootstraps that many slots
                lit["log_slots"] = params.log_slots
            if s.get("insecure"):
                lit["insecure"] = True
            if s.get("max_log_qp"):
                out["max_log_qp"] = s["max_log_qp"]
            out["lattigo"] = lit
            out["security_source"] = s["security_source"]
        return out

    def security_note(self, params: Params) -> str:
        if params.security != "tc128":
            return "NOT 128-bit secure: explicitly requested"
        if self.lattigo is not None:
            return self.lattigo["security_source"]
        if params.poly_degree > 32768:
            return "128-bit (HE security guidelines ia.cr/2024/463 for N=2^16; SEAL cannot certify it)"
        return f"128-bit ({source(params.poly_degree)}, SEAL CoeffModulus limits)"


#: Go's GC percent on a Lattigo server (unless the user sets GOGC): its live heap is GBs of keys
#: (pointer-free slices, cheap to mark), and Go's default 100 lets garbage grow as large as them.
#: Measured on ResNet-20 at 128 bits (/usr/bin/time on `hecompile eval`, same keys and input):
#: GOGC=20 peak 15.77 GiB, evaluation 182.4 s; GOGC=5 peak 13.80 GiB, 179.8 s
LATTIGO_SERVER_GC_PERCENT = 5

#: Go's garbage on a Lattigo server as a multiple of its GC percent of the live heap: the heap
#: keeps growing while a collection marks (ciphertexts of MBs are allocated at a high rate), so it
#: overshoots the pacer's goal.  Fitted, not measured by a table, to the largest of these runs
#: (the budget is a bound, so the fit is to the worst seen, not the mean): `python
#: benchmarks/lattigo_memory.py` at 2026-12-06 on ResNet-20 (n16-sparse, --max-memory 16G; peak
#: 13.42 GiB) and ResNet-8 (12G; 12.28 GiB) left 8.0% and 7.7% of keys + bootstrapper +
#: ciphertexts + plaintext cache above those, the plaintexts in use and the measured baseline;
#: at 2026-12-07 (one encoder thread, replicated layouts) ResNet-8 under 12G peaked at 12.05 GiB
#: (lattigo_memory.py) and 12.10 GiB (benchmarks/noninteractive.py) where 1.6x predicted 11.98:
#: 8.7% and 9.1%, 1.83 x the 5% the pacer aims at.
LATTIGO_GC_OVERSHOOT = 1.85


#: Lattigo's default bootstrapping sets (circuits/ckks/bootstrapping), as data; the
#: bootstrapping circuit's own primes are added by Lattigo above the residual chain
LATTIGO_SETS: dict[str, dict[str, Any]] = {
    "n16-sparse": {
        "set": "n16-sparse", "log_n": 16, "q0_bits": 60, "log_default_scale": 40, "max_levels": 9,
        "log_p": [61] * 5, "secret": {"h": 192}, "bootstrap": {}, "message_ratio": 256.0, "max_log_qp": 1546,
        "security_source": "128-bit: Lattigo's N16QP1546H192H32 (ring 2^16, sparse secret h=192, ephemeral h=32, "
                           "1546 bits of Q*P with the bootstrapping circuit); its claim rests on the sparse-secret "
                           "encapsulation analysis (Bossuat et al., eprint 2022/024), not on the HE standard table",
    },
    # the same ring, secrets and Q*P bound with SlotsToCoeffs in four levels instead of three: its
    # matrices factor finer, so a bootstrap needs 34 Galois keys instead of 49 (at 2^14 slots), for
    # one residual level fewer (8 x 40 bits make room for the fourth 39-bit StC prime: 1545 bits)
    "n16-sparse-stc4": {
        "set": "n16-sparse-stc4", "base": "n16-sparse", "log_n": 16, "q0_bits": 60, "log_default_scale": 40,
        "max_levels": 8, "log_p": [61] * 5, "secret": {"h": 192}, "bootstrap": {"stc_log_scales": [[39]] * 4},
        "message_ratio": 256.0, "max_log_qp": 1546,
        "security_source": "128-bit: Lattigo's N16QP1546H192H32 (ring 2^16, sparse secret h=192, ephemeral h=32) "
                           "with SlotsToCoeffs in 4 levels and 8 residual levels, within its 1546 bits of Q*P "
                           "with the bootstrapping circuit; its claim rests on the sparse-secret encapsulation "
                           "analysis (Bossuat et al., eprint 2022/024), not on the HE standard table",
    },
    "n15-dense": {
        "set": "n15-dense", "log_n": 15, "q0_bits": 40, "log_default_scale": 31, "max_levels": 4,
        "log_p": [57, 56], "secret": {"h": 16384}, "message_ratio": 256.0, "max_log_qp": 881,
        "bootstrap": {"log_p": [56, 56], "cts_log_scales": [[52], [52]], "stc_log_scales": [[30, 30]],
                      "evalmod_log_scale": 55},
        "security_source": "128-bit: Lattigo's N15QP880H16384H32 (ring 2^15, dense ternary secret) within the HE "
                           "standard's 881 bits of Q*P with the bootstrapping circuit",
    },
    "toy-n12": {
        "set": "toy-n12", "log_n": 12, "q0_bits": 60, "log_default_scale": 40, "max_levels": 3,
        "log_p": [61, 61], "secret": {"p": 2 / 3}, "bootstrap": {"log_message_ratio": 12}, "message_ratio": 4096.0,
        "insecure": True, "security_source": "NOT secure: ring 2^12 test set",
    },
    "toy-n10": {
        "set": "toy-n10", "log_n": 10, "q0_bits": 60, "log_default_scale": 40, "max_levels": 2,
        "log_p": [61, 61], "secret": {"p": 2 / 3}, "bootstrap": {"log_message_ratio": 14}, "message_ratio": 16384.0,
        "insecure": True, "security_source": "NOT secure: ring 2^10 test set",
    },
}


def seal_target(refresh: str = "client") -> Target:
    desc = ("SEAL (tenseal): client-aided refresh" if refresh == "client" else
            "SEAL op costs with a priced, hypothetical bootstrap (planning only: SEAL cannot bootstrap)")
    return Target("seal", "seal", refresh, desc)


#: the 128-bit sets ``--target lattigo`` chooses among (each with its measured cost table): the
#: planner lowers the model for each and keeps the fastest plan that fits the budgets
LATTIGO_CHOICES = ("n16-sparse", "n16-sparse-stc4")


def get_target(spec: str | None, refresh: str = "client") -> Target:
    """``seal`` (default), ``lattigo`` (the planner chooses among :data:`LATTIGO_CHOICES`, the
    first being the target returned, the others its ``alternatives``) or ``lattigo:SET``."""
    spec = (spec or "seal").strip()
    if spec == "seal":
        return seal_target(refresh)
    name, _, set_name = spec.partition(":")
    if name != "lattigo":
        raise HecError(f"--target {spec!r}: expected seal, lattigo or lattigo:SET (sets: {', '.join(LATTIGO_SETS)})")
    if not set_name:
        first = get_target(f"lattigo:{LATTIGO_CHOICES[0]}")
        return replace(first, alternatives=tuple(f"lattigo:{s}" for s in LATTIGO_CHOICES[1:]))
    if set_name not in LATTIGO_SETS:
        raise HecError(f"--target {spec!r}: unknown Lattigo set {set_name!r}; sets: {', '.join(LATTIGO_SETS)}")
    s = LATTIGO_SETS[set_name]
    # |v| up to message_ratio / 256 keeps EvalMod's sine approximation accurate (backends/lattigo)
    rng = BootstrapRange(max_abs=s["message_ratio"] / 256.0, message_ratio=s["message_ratio"], q0_bits=s["q0_bits"])
    return Target(f"lattigo:{set_name}", "lattigo", "bootstrap", f"Lattigo v6 bootstrapping, set {set_name}",
                  lattigo=dict(s), bootstrap_range=rng, cost_table=f"lattigo-{set_name}")


def target_of(meta: dict | None) -> Target:
    """The target a compiled program records (SEAL with client refresh for older programs)."""
    t = (meta or {}).get("target") or {}
    name = t.get("name") or "seal"
    return get_target(name, t.get("refresh", "client") if name == "seal" else "bootstrap")
