"""Cost model: HE op latencies measured on this machine with SEAL, and sizes.

Latencies come from ``hecompiler/data/cost_seal.json``, written by
``benchmarks/measure_seal_costs.py`` (re-run it on your machine to re-fit).
An op's cost depends on the ring degree and on the number of primes still
in the ciphertext; between measured prime counts we interpolate, beyond them
we use the quadratic fit the benchmark stores.  Sizes are exact formulas of
SEAL's representation (8-byte words per coefficient per prime).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from .errors import HecError

#: program op -> cost-table op
_OP_ALIAS = {"mul": "mul_relin", "refresh": None}


@dataclass(frozen=True)
class RefreshCost:
    """What one client-aided refresh of one ciphertext costs beyond compute:
    the masked ciphertext goes to the client and a fresh one comes back."""

    bandwidth_bytes_per_s: float = 125e6  # 1 Gbit/s
    round_trip_s: float = 0.0005


class CostModel:
    def __init__(self, table: dict | None = None, refresh: RefreshCost | None = None):
        self.table = table if table is not None else _default_table()
        self.refresh = refresh or RefreshCost()
        self.rings = {int(r["poly_degree"]): r for r in self.table["rings"]}

    def _ring(self, n: int) -> dict:
        if n in self.rings:
            return self.rings[n]
        raise HecError(f"cost model: ring degree {n} was not measured (measured: {sorted(self.rings)}); "
                       f"run benchmarks/measure_seal_costs.py")

    def op_seconds(self, op: str, n: int, primes: int) -> float:
        """Latency of one ``op`` at ring degree ``n`` on a ciphertext with
        ``primes`` primes left (level + 1)."""
        if op == "refresh":
            return self.refresh_seconds(n, primes)
        name = _OP_ALIAS.get(op, op)
        ring = self._ring(n)
        pts = [(p, t) for p, t in ring["by_primes"].get(name, []) if t is not None]
        if not pts:
            raise HecError(f"cost model: no measurement of {name} at N={n}")
        xs = np.array([p for p, _ in pts], float)
        ys = np.array([t for _, t in pts], float)
        if xs.min() <= primes <= xs.max():
            return float(np.interp(primes, xs, ys))
        fit = ring["fits"][name]["quadratic"]
        return float(max(ys.min(), fit[0] + fit[1] * primes + fit[2] * primes * primes))

    def refresh_seconds(self, n: int, primes_top: int) -> float:
        """Server masks (add_plain), client decrypts and re-encrypts, server
        unmasks, plus the transfer of two ciphertexts and a round trip."""
        compute = (self.op_seconds("add_plain", n, 1) + self.op_seconds("decrypt", n, 1)
                   + self.op_seconds("encode", n, primes_top) + self.op_seconds("encrypt", n, primes_top)
                   + self.op_seconds("add_plain", n, primes_top))
        transfer = (ct_bytes(n, 1) + ct_bytes(n, primes_top)) / self.refresh.bandwidth_bytes_per_s
        return compute + transfer + self.refresh.round_trip_s

    def encode_seconds(self, n: int, primes: int) -> float:
        return self.op_seconds("encode", n, primes)


def ct_bytes(n: int, primes: int) -> int:
    return 2 * n * primes * 8


def pt_bytes(n: int, primes: int) -> int:
    return n * primes * 8


def switching_key_bytes(n: int, data_primes: int) -> int:
    """One Galois (or relinearisation) key: one key-switching pair per data
    prime, each over all data primes plus the special prime."""
    return data_primes * 2 * n * (data_primes + 1) * 8


@lru_cache(maxsize=1)
def _default_table() -> dict:
    try:
        text = resources.files("hecompiler").joinpath("data/cost_seal.json").read_text()
    except FileNotFoundError:
        raise HecError("cost table hecompiler/data/cost_seal.json is missing; "
                       "run benchmarks/measure_seal_costs.py") from None
    return json.loads(text)
