"""NTT-friendly primes for a CKKS modulus chain, made without any HE library.

:func:`chain_primes` makes the primes SEAL's ``CoeffModulus::Create`` makes for the same ring
degree and bit sizes (checked against SEAL in the tests): for each bit size ``b`` it walks
down from ``2**b`` over the numbers ``= 1 (mod 2N)`` until it has as many primes as the
sizes list asks for, then hands them out, smallest first, in the order the sizes are listed.  Lattigo accepts the
primes explicitly, so one program's chain is the same on every backend, and the planner needs
no backend library to know it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from .errors import HecError

#: deterministic Miller-Rabin bases for every n < 3.3e24 (covers 64-bit numbers)
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@lru_cache(maxsize=256)
def _primes_of_size(n: int, bits: int, count: int) -> tuple[int, ...]:
    factor = 2 * n
    out: list[int] = []
    value = ((1 << bits) - 1) // factor * factor + 1  # the largest value = 1 (mod 2N) below 2^bits
    lower = 1 << (bits - 1)
    while len(out) < count:
        if value <= lower:
            raise HecError(f"there are only {len(out)} primes of {bits} bits that are 1 mod 2N for N={n}; "
                           f"{count} were asked for: use fewer levels, other prime sizes or a smaller ring")
        if is_prime(value):
            out.append(value)
        value -= factor
    return tuple(out)


def chain_primes(n: int, bits: Sequence[int]) -> tuple[int, ...]:
    """Primes of the given bit sizes (SEAL order: q_0 .. q_L, then the special prime), all
    ``= 1 (mod 2n)``, distinct, as SEAL's ``CoeffModulus::Create`` makes them."""
    if n < 2 or n & (n - 1):
        raise HecError(f"ring degree {n} is not a power of two")
    bits = [int(b) for b in bits]
    bad = [b for b in bits if not 17 <= b <= 60]
    if bad:
        raise HecError(f"prime sizes {bad} bits: each prime must have 17 to 60 bits (SEAL and Lattigo limits)")
    need: dict[int, int] = {}
    for b in bits:
        need[b] = need.get(b, 0) + 1
    pools = {b: list(_primes_of_size(n, b, k)) for b, k in need.items()}
    return tuple(pools[b].pop() for b in bits)  # SEAL hands out the smallest of the found primes first
