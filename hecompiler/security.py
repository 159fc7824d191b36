"""128/192/256-bit limits on the total modulus bits (log2 of Q*P) per ring
degree, for a uniform ternary secret and classical attacks.

Up to N=2^15 these are the HomomorphicEncryption.org standard's numbers, which
SEAL enforces (``CoeffModulus::MaxBitCount``).  For N=2^16 (128-bit only) the
limit is the one of the "Security Guidelines for Implementing Homomorphic
Encryption" (Bossuat et al., ia.cr/2024/463), which OpenFHE enforces; SEAL has
no entry there, so such programs plan and simulate, and the SEAL backend
refuses them at 128 bits.
"""

from __future__ import annotations

HE_STANDARD_MAX_BITS: dict[str, dict[int, int]] = {
    "tc128": {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881, 65536: 1747},
    "tc192": {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    "tc256": {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}


def max_bits(poly_degree: int, security: str = "tc128") -> int | None:
    """The limit, or None when the tables have no entry for this ring degree."""
    return HE_STANDARD_MAX_BITS.get(security, {}).get(poly_degree)


def source(poly_degree: int) -> str:
    return "HE security guidelines, ia.cr/2024/463" if poly_degree > 32768 else "HE standard"
