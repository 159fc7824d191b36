"""Thin, checked wrapper around ``tenseal.sealapi`` (Microsoft SEAL 4.x) for CKKS.

This module is the only place that talks to SEAL.  The HE-program executor calls it;
it depends on nothing else in the repository (only numpy and tenseal).

Roles
-----
* :class:`CkksParams`  -- plain, JSON-able description of the encryption parameters.
* :class:`CkksContext` -- the SEAL context built from them: modulus chain, levels, scales,
  encoding, and (de)serialization of every SEAL object to ``bytes``.
* :class:`KeySet`      -- secret / public / relinearization / Galois keys.  Galois keys are
  generated only for the rotation steps a program uses.
* :class:`CkksClient`  -- the key holder: ``encrypt``, ``decrypt``, ``reencrypt`` (refresh).
* :class:`CkksServer`  -- the untrusted evaluator; never sees the secret key.

Conventions (read these before writing an executor)
---------------------------------------------------
Modulus chain.  ``CkksParams.coeff_bits`` is passed unchanged to
``CoeffModulus.Create``; following SEAL, the LAST prime is the *special* prime used only
for key switching and never holds data.  The other ``chain_length = len(coeff_bits) - 1``
primes are the data primes.  ``coeff_bits[0]`` is the base prime that survives to the end;
rescaling drops data primes from the back: first ``coeff_bits[-2]``, then ``coeff_bits[-3]``,
...  A typical chain is ``(60, 40, 40, ..., 40, 60)`` with ciphertext scale ``2**40``.

Levels.  *level = number of rescales (or modulus switches) already consumed.*
``0`` is a fresh ciphertext with all ``chain_length`` data primes; the lowest level is
``max_level = chain_length - 1`` where only the base prime is left and no rescale is possible.
A ciphertext at level ``l`` has ``num_primes(l) = chain_length - l`` active primes; SEAL
op costs grow with that number.  (SEAL's own ``chain_index`` counts the other way.)
``depth = chain_length - 1`` is the number of rescales a fresh ciphertext can take.

Scales.  SEAL tracks the scale as a C ``double`` and does exactly this arithmetic:
``multiply_plain``/``multiply`` -> ``s_ct * s_other``; ``rescale`` ->
``s / double(prime_at(level))``; ``add``/``sub`` need ``s_a == s_b`` (within 1 ulp), and
``add_plain`` needs the plaintext at the same scale as the ciphertext.
:meth:`CkksContext.rescaled_scale` reproduces the rescale arithmetic bit-for-bit, so a
planner can predict every scale exactly.  The rule that makes scale management exact:

    encode the plaintext multiplier at ``scale = ctx.exact_plain_scale(level)``
    (``= float(prime_at(level))``); then ``rescale(multiply_plain(ct, pt))`` returns a
    ciphertext whose scale is *bit-identical* to ``ct.scale`` whenever ``ct.scale`` is a
    power of two (``(2**k * q) / q == 2**k`` exactly in IEEE double).

For ct x ct products ``s*s/q`` is not a power of two; either choose operand scales with
``s_a * s_b == 2**k * q`` (e.g. ``s_a = 2**k``, ``s_b = q``) or re-label the result with
:meth:`CkksContext.set_scale`, which multiplies the decrypted value by ``old/new``
(~1e-7 relative for 40-bit primes).  ``Ciphertext.scale`` is a plain read/write float
property in tenseal.sealapi; :meth:`set_scale` is the checked way to write it.

Rotations.  ``rotate(ct, k)`` is a LEFT rotation by ``k`` slots (slot ``i`` receives
slot ``i + k``; ``np.roll(v, -k)``); negative ``k`` rotates right.  It uses the Galois
element ``galois_element(k, N) = pow(3, k mod (N/2), 2N)``, the same element SEAL's
``rotate_vector`` uses; keys for ``k`` and ``k - N/2`` are the same key.  Step 0 (mod N/2)
needs no key.

Serialization.  tenseal.sealapi only exposes ``save(path)`` / ``load(context, path)``
(no stream or bytes API; the ``Serializable`` return types of ``create_*_keys()`` cannot be
converted to Python), so :meth:`CkksContext.to_bytes` goes through an anonymous in-memory
file (``memfd_create``: no directory entry, nothing on disk, gone when the process dies).  Bytes are SEAL's own (zstd-compressed) format inside a 44-byte envelope:
``b"HECKKS" | format version (1 byte) | kind (1 byte) | key parms_id (4 x uint64 LE) |
CRC-32 of the SEAL bytes (uint32 LE)``.  Loading checks the envelope (kind, parameters,
checksum), SEAL's header (declared size == length), then SEAL's full validity check
(``is_valid_for``), and raises :class:`SealError`
(a ``ValueError``) with a one-line message on any mismatch.  Raw SEAL bytes (no
envelope) are accepted too.

Errors.  Every misuse raises :class:`SealError` (subclass of ``ValueError``) with the
operation name in the message.  Conditions that SEAL reports cryptically (missing Galois
key, level or scale mismatch, zero plaintext -> "transparent ciphertext", scale overflow,
rescale at the last level, ciphertext of size 3 given to rotate) are checked in Python first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import struct
import sys
import zlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

try:  # keep the pure-Python parts (params, tables) importable without tenseal
    import tenseal.sealapi as _seal
except ImportError as _exc:  # pragma: no cover - tenseal is a hard dependency of the project
    _seal = None
    _SEAL_IMPORT_ERROR: Exception | None = _exc
else:
    _SEAL_IMPORT_ERROR = None

__all__ = [
    "SealError",
    "HE_STANDARD_MAX_BITS",
    "SECURITY_LEVELS",
    "max_coeff_modulus_bits",
    "galois_element",
    "CkksParams",
    "CkksContext",
    "KeySet",
    "CkksClient",
    "CkksServer",
]


class SealError(ValueError):
    """A SEAL operation, parameter set or serialized object was rejected."""


# HomomorphicEncryption.org standard (ternary secret, classical attacks): maximal total
# bit count of the coefficient modulus, including the special prime.  These are exactly
# the numbers SEAL's CoeffModulus.MaxBitCount returns; SEAL has no entry above 32768.
HE_STANDARD_MAX_BITS: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}

#: Accepted ``CkksParams.security`` values and the bit level each one enforces.
SECURITY_LEVELS: dict[str, int | None] = {"tc128": 128, "tc192": 192, "tc256": 256, "none": None}

MIN_POLY_DEGREE = 1 << 12
MAX_POLY_DEGREE = 1 << 17
MAX_PRIME_BITS = 60  # SEAL_USER_MOD_BIT_COUNT_MAX
MAX_PRIMES = 64  # SEAL_COEFF_MOD_COUNT_MAX

_ENVELOPE_MAGIC = b"HECKKS"
_ENVELOPE_VERSION = 1
_ENVELOPE_LEN = len(_ENVELOPE_MAGIC) + 2 + 32 + 4
_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header_size, major, minor, compr, reserved, size
_KINDS = ("ciphertext", "plaintext", "public_key", "relin_keys", "galois_keys", "secret_key")
_KIND_CODE = {k: i + 1 for i, k in enumerate(_KINDS)}
_CODE_KIND = {v: k for k, v in _KIND_CODE.items()}
_EPS = sys.float_info.epsilon


def _require_seal() -> Any:
    if _seal is None:
        raise SealError(f"tenseal is not installed (needed for the SEAL backend): {_SEAL_IMPORT_ERROR}")
    return _seal


def _security_bits(security: int | str) -> int | None:
    if isinstance(security, str):
        if security not in SECURITY_LEVELS:
            raise ValueError(f"security={security!r}: expected one of {sorted(SECURITY_LEVELS)}")
        return SECURITY_LEVELS[security]
    if security in (128, 192, 256):
        return int(security)
    raise ValueError(f"security={security!r}: expected 128, 192 or 256")


def max_coeff_modulus_bits(poly_degree: int, security: int | str = 128) -> int:
    """Largest total coefficient-modulus bit count allowed by the HE standard.

    ``security`` is 128, 192, 256 or one of ``"tc128"``, ``"tc192"``, ``"tc256"``.  The value
    comes from SEAL's ``CoeffModulus.MaxBitCount`` (identical to :data:`HE_STANDARD_MAX_BITS`).
    Raises ``ValueError`` for degrees the standard table does not cover (SEAL: 1024..32768),
    because SEAL cannot certify such parameters.
    """
    bits = _security_bits(security)
    if bits is None:
        raise ValueError("security='none' has no bit limit")
    n = int(poly_degree)
    value = 0
    if _seal is not None:
        level = {128: _seal.SEC_LEVEL_TYPE.TC128, 192: _seal.SEC_LEVEL_TYPE.TC192,
                 256: _seal.SEC_LEVEL_TYPE.TC256}[bits]
        value = int(_seal.CoeffModulus.MaxBitCount(n, level))
    else:  # pragma: no cover
        value = HE_STANDARD_MAX_BITS[bits].get(n, 0)
    if value <= 0:
        raise ValueError(
            f"poly_degree={n}: the HE standard table (as in SEAL) has no {bits}-bit entry for this "
            f"ring degree (covered: {sorted(HE_STANDARD_MAX_BITS[bits])}); SEAL cannot certify it, "
            "use security='none' to build it unchecked")
    return value


def galois_element(step: int, poly_degree: int) -> int:
    """Galois element of a LEFT rotation by ``step`` slots: ``3**(step mod N/2) mod 2N``."""
    n = int(poly_degree)
    return pow(3, int(step) % (n // 2), 2 * n)


# --------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class CkksParams:
    """CKKS encryption parameters (JSON-able).

    ``coeff_bits``: bit sizes of the RNS primes in SEAL order -- ``coeff_bits[0]`` is the base
    prime kept to the end, ``coeff_bits[-1]`` is the special (key-switching) prime, the ones in
    between are dropped by successive rescales from the back.  ``security`` is ``"tc128"``
    (default; enforced through SEAL's HE-standard check), ``"tc192"``, ``"tc256"`` or ``"none"``
    (no check; must be asked for explicitly).
    """

    poly_degree: int
    coeff_bits: tuple[int, ...]
    security: str = "tc128"

    def __post_init__(self) -> None:
        if isinstance(self.coeff_bits, (list, tuple)):
            object.__setattr__(self, "coeff_bits", tuple(self.coeff_bits))

    # derived quantities -------------------------------------------------------------
    @property
    def slot_count(self) -> int:
        return self.poly_degree // 2

    @property
    def total_bits(self) -> int:
        return int(sum(self.coeff_bits))

    @property
    def chain_length(self) -> int:
        """Number of data levels (= number of data primes = len(coeff_bits) - 1)."""
        return len(self.coeff_bits) - 1

    @property
    def depth(self) -> int:
        """Number of rescales a fresh ciphertext can take."""
        return len(self.coeff_bits) - 2

    @property
    def max_bits(self) -> int | None:
        """Bit budget under ``security`` (``None`` when security='none')."""
        bits = SECURITY_LEVELS.get(self.security)
        return None if bits is None else max_coeff_modulus_bits(self.poly_degree, bits)

    @classmethod
    def for_depth(cls, poly_degree: int, depth: int, scale_bits: int = 40, base_bits: int = 60,
                  special_bits: int = 60, security: str = "tc128") -> "CkksParams":
        """Chain ``(base, scale_bits x depth, special)``: ``depth`` rescales at scale 2**scale_bits."""
        if depth < 0:
            raise ValueError(f"depth={depth}: must be >= 0")
        return cls(int(poly_degree), (base_bits,) + (scale_bits,) * int(depth) + (special_bits,), security)

    def validate(self) -> "CkksParams":
        """Check the parameters; raise ``ValueError`` naming the offending field. Returns self."""
        n = self.poly_degree
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"CkksParams.poly_degree={n!r}: must be an int")
        if n < MIN_POLY_DEGREE or n > MAX_POLY_DEGREE or n & (n - 1):
            raise ValueError(f"CkksParams.poly_degree={n}: must be a power of two in "
                             f"[2^12, 2^17] = [{MIN_POLY_DEGREE}, {MAX_POLY_DEGREE}]")
        if self.security not in SECURITY_LEVELS:
            raise ValueError(f"CkksParams.security={self.security!r}: expected one of "
                             f"{sorted(SECURITY_LEVELS)}")
        cb = self.coeff_bits
        if not isinstance(cb, tuple) or not all(
                isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in cb):
            raise ValueError(f"CkksParams.coeff_bits={cb!r}: must be a sequence of ints")
        if len(cb) < 2:
            raise ValueError(f"CkksParams.coeff_bits={list(cb)}: need at least 2 primes "
                             "(data primes plus the special key-switching prime last)")
        if len(cb) > MAX_PRIMES:
            raise ValueError(f"CkksParams.coeff_bits: {len(cb)} primes, SEAL allows at most {MAX_PRIMES}")
        min_bits = int(math.log2(2 * n)) + 2  # primes must be = 1 mod 2N
        for i, b in enumerate(cb):
            if b < min_bits or b > MAX_PRIME_BITS:
                raise ValueError(f"CkksParams.coeff_bits[{i}]={b}: each prime must have "
                                 f"{min_bits}..{MAX_PRIME_BITS} bits at poly_degree={n}")
        bits = SECURITY_LEVELS[self.security]
        if bits is not None:
            try:
                limit = max_coeff_modulus_bits(n, bits)
            except ValueError as exc:
                raise ValueError(f"CkksParams.poly_degree={n} with security={self.security!r}: {exc}") from None
            if self.total_bits > limit:
                raise ValueError(
                    f"CkksParams.coeff_bits={list(cb)}: total {self.total_bits} bits exceeds the "
                    f"{limit}-bit maximum for {bits}-bit security at poly_degree={n} (HE standard); "
                    "use fewer or smaller primes, a larger poly_degree, or security='none'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": "ckks", "poly_degree": int(self.poly_degree),
                "coeff_bits": [int(b) for b in self.coeff_bits], "security": self.security}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CkksParams":
        """Inverse of :meth:`to_dict`; validates and names any bad or unknown field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"CkksParams: expected a dict, got {type(d).__name__}")
        unknown = set(d) - {"scheme", "poly_degree", "coeff_bits", "security"}
        if unknown:
            raise ValueError(f"CkksParams: unknown field(s) {sorted(unknown)}")
        if d.get("scheme", "ckks") != "ckks":
            raise ValueError(f"CkksParams.scheme={d['scheme']!r}: only 'ckks' is supported")
        for key in ("poly_degree", "coeff_bits"):
            if key not in d:
                raise ValueError(f"CkksParams.{key}: missing")
        cb = d["coeff_bits"]
        if not isinstance(cb, (list, tuple)):
            raise ValueError(f"CkksParams.coeff_bits={cb!r}: must be a list of ints")
        return cls(d["poly_degree"], tuple(cb), d.get("security", "tc128")).validate()


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _memory_file(data: bytes = b""):
    """A path to an anonymous in-memory file (``memfd_create``) holding ``data``.

    SEAL (through tenseal.sealapi) serializes only to and from a path.  The file
    lives in memory, has no name in any directory and disappears with its last
    descriptor, so keys and ciphertexts never touch a disk, and a killed process
    leaves nothing behind.  Linux only (``os.memfd_create``)."""
    if not hasattr(os, "memfd_create"):
        raise SealError("serialization needs os.memfd_create (Linux): keys must not pass through temporary files")
    fd = os.memfd_create("hec-seal", os.MFD_CLOEXEC)
    try:
        if data:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        yield fd, f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _seal_save(obj: Any) -> bytes:
    with _memory_file() as (fd, path):
        obj.save(path)
        size = os.fstat(fd).st_size
        out = bytearray(size)
        view, off = memoryview(out), 0
        while off < size:  # one read returns at most ~2 GiB on Linux
            n = os.preadv(fd, [view[off:]], off)
            if n <= 0:
                raise SealError(f"serialization: read {off} of {size} bytes")
            off += n
        return bytes(out)


def _seal_load(obj: Any, context: Any, data: bytes) -> None:
    with _memory_file(data) as (_fd, path):
        obj.load(context, path)


def _pid_bytes(pid: Sequence[int]) -> bytes:
    return struct.pack("<4Q", *pid)


def _same_scale(a: float, b: float) -> bool:
    """SEAL's ``are_close``: equal up to one ulp of the larger magnitude."""
    return abs(a - b) < _EPS * max(abs(a), abs(b), 1.0)


def _fmt_scale(s: float) -> str:
    return f"{s!r} (2^{math.log2(s):.6f})" if s > 0 and math.isfinite(s) else repr(s)


# --------------------------------------------------------------------------- context
class CkksContext:
    """A SEAL CKKS context plus level/scale bookkeeping, encoding and serialization."""

    def __init__(self, params: CkksParams):
        seal = _require_seal()
        if not isinstance(params, CkksParams):
            raise SealError(f"CkksContext: expected CkksParams, got {type(params).__name__}")
        self.params = params.validate()
        n = params.poly_degree
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(n)
        try:
            parms.set_coeff_modulus(seal.CoeffModulus.Create(n, list(params.coeff_bits)))
        except (ValueError, RuntimeError) as exc:
            raise SealError(f"CkksParams.coeff_bits={list(params.coeff_bits)}: SEAL cannot find "
                            f"distinct NTT primes of these sizes for poly_degree={n}: {exc}") from None
        sec = {"tc128": seal.SEC_LEVEL_TYPE.TC128, "tc192": seal.SEC_LEVEL_TYPE.TC192,
               "tc256": seal.SEC_LEVEL_TYPE.TC256, "none": seal.SEC_LEVEL_TYPE.NONE}[params.security]
        self.seal = seal.SEALContext(parms, True, sec)
        if not self.seal.parameters_set():
            raise SealError(f"CkksParams {params.to_dict()}: SEAL rejected the parameters: "
                            f"{self.seal.parameters_error_message()}")
        # Walk the data chain: level 0 = first (largest) data parms.
        self._pids: list[tuple[int, ...]] = []
        self._primes: list[list[int]] = []
        self._total_bits: list[int] = []
        cd = self.seal.first_context_data()
        while cd is not None:
            self._pids.append(tuple(cd.parms_id()))
            self._primes.append([m.value() for m in cd.parms().coeff_modulus()])
            self._total_bits.append(int(cd.total_coeff_modulus_bit_count()))
            cd = cd.next_context_data()
        self._level_by_pid = {pid: lvl for lvl, pid in enumerate(self._pids)}
        self.key_parms_id: tuple[int, ...] = tuple(self.seal.key_parms_id())
        self._key_pid_bytes = _pid_bytes(self.key_parms_id)
        self.all_primes: list[int] = [m.value() for m in self.seal.key_context_data().parms().coeff_modulus()]
        assert len(self._pids) == params.chain_length, (len(self._pids), params.chain_length)
        self.encoder = seal.CKKSEncoder(self.seal)
        self.evaluator = seal.Evaluator(self.seal)

    # ---- shape of the chain ---------------------------------------------------------
    @property
    def poly_degree(self) -> int:
        return self.params.poly_degree

    @property
    def slot_count(self) -> int:
        return self.params.poly_degree // 2

    @property
    def chain_length(self) -> int:
        """Number of data levels; valid levels are ``0 .. chain_length - 1``."""
        return len(self._pids)

    @property
    def max_level(self) -> int:
        """Lowest level (only the base prime left): ``chain_length - 1``."""
        return len(self._pids) - 1

    @property
    def depth(self) -> int:
        """Rescales available to a fresh ciphertext (= ``max_level``)."""
        return len(self._pids) - 1

    @property
    def special_prime(self) -> int:
        return self.all_primes[-1]

    @property
    def is_secure(self) -> bool:
        return self.params.security != "none"

    def _check_level(self, level: int, what: str = "level") -> int:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise SealError(f"{what}={level!r}: must be an int")
        if not 0 <= level <= self.max_level:
            raise SealError(f"{what}={level}: valid levels are 0..{self.max_level} "
                            f"(chain of {self.chain_length} data primes)")
        return int(level)

    def num_primes(self, level: int) -> int:
        """Active RNS primes of a ciphertext at ``level`` (= chain_length - level)."""
        return self.chain_length - self._check_level(level)

    def parms_id_at(self, level: int) -> list[int]:
        return list(self._pids[self._check_level(level)])

    def primes_at(self, level: int) -> list[int]:
        """Active data primes at ``level`` (base prime first)."""
        return list(self._primes[self._check_level(level)])

    def prime_at(self, level: int) -> int:
        """The prime the next rescale drops from a ciphertext at ``level``."""
        level = self._check_level(level)
        if level == self.max_level:
            raise SealError(f"level={level} is the last level (only the base prime left); "
                            "there is no prime to rescale by")
        return self._primes[level][-1]

    def total_bits_at(self, level: int) -> int:
        """Bit count of the product of the active primes at ``level`` (SEAL's scale bound)."""
        return self._total_bits[self._check_level(level)]

    def level_of(self, obj: Any) -> int:
        """Level of a Ciphertext or Plaintext (0 = fresh, see module docstring)."""
        try:
            pid = tuple(obj.parms_id())
        except AttributeError:
            raise SealError(f"level_of: expected a SEAL Ciphertext or Plaintext, got {type(obj).__name__}") from None
        try:
            return self._level_by_pid[pid]
        except KeyError:
            raise SealError("level_of: object does not belong to this context's modulus chain "
                            f"({self.describe_short()})") from None

    # ---- scales -----------------------------------------------------------------------
    @staticmethod
    def scale_of(obj: Any) -> float:
        return float(obj.scale)

    def exact_plain_scale(self, level: int) -> float:
        """Plaintext scale for multiply_plain at ``level`` that the next rescale cancels exactly."""
        return float(self.prime_at(level))

    def rescaled_scale(self, scale: float, level: int) -> float:
        """The scale SEAL assigns after rescaling a ciphertext of ``scale`` at ``level``."""
        return float(scale) / float(self.prime_at(level))

    @staticmethod
    def same_scale(a: float, b: float) -> bool:
        """True when SEAL considers the scales equal (within one ulp)."""
        return _same_scale(float(a), float(b))

    def check_scale(self, scale: float, level: int, what: str = "scale") -> float:
        """Raise unless ``scale`` is finite, positive and fits SEAL's bound at ``level``."""
        try:
            s = float(scale)
        except (TypeError, ValueError):
            raise SealError(f"{what}={scale!r}: must be a float") from None
        if not math.isfinite(s) or s <= 0:
            raise SealError(f"{what}={scale!r}: must be finite and > 0")
        bound = self.total_bits_at(level)
        if int(math.log2(s)) >= bound:
            raise SealError(f"{what}={_fmt_scale(s)} does not fit the {bound}-bit modulus at "
                            f"level {level} (SEAL: scale out of bounds); rescale earlier or lower the scale")
        return s

    def set_scale(self, ct: Any, scale: float) -> None:
        """Overwrite ``ct.scale`` exactly (relabels the value: decrypts to value * old/new)."""
        self._check_ct(ct, "set_scale")
        ct.scale = self.check_scale(scale, self.level_of(ct), "set_scale: scale")

    # ---- object checks ----------------------------------------------------------------
    def _check_ct(self, ct: Any, op: str, name: str = "ciphertext") -> int:
        seal = _seal
        if not isinstance(ct, seal.Ciphertext):
            raise SealError(f"{op}: {name} must be a SEAL Ciphertext, got {type(ct).__name__}")
        if ct.size() < 2 or not seal.is_metadata_valid_for(ct, self.seal):
            raise SealError(f"{op}: {name} is empty or was made for different encryption parameters "
                            f"({self.describe_short()})")
        lvl = self._level_by_pid.get(tuple(ct.parms_id()))
        if lvl is None:
            raise SealError(f"{op}: {name} is not at a data level of this context")
        return lvl

    def _check_pt(self, pt: Any, op: str) -> int:
        seal = _seal
        if not isinstance(pt, seal.Plaintext):
            raise SealError(f"{op}: plaintext must be a SEAL Plaintext, got {type(pt).__name__}")
        if not pt.is_ntt_form() or not seal.is_metadata_valid_for(pt, self.seal):
            raise SealError(f"{op}: plaintext is empty, not CKKS-encoded, or made for different "
                            f"encryption parameters ({self.describe_short()})")
        lvl = self._level_by_pid.get(tuple(pt.parms_id()))
        if lvl is None:
            raise SealError(f"{op}: plaintext is not at a data level of this context")
        return lvl

    def _call(self, op: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise SealError(f"{op}: SEAL rejected the operation: {exc}") from None

    def copy(self, ct: Any) -> Any:
        """Deep copy of a ciphertext (sealapi has no copy constructor or pickling)."""
        self._check_ct(ct, "copy")
        out = _seal.Ciphertext()
        self._call("copy", self.evaluator.mod_switch_to, ct, ct.parms_id(), out)
        return out

    # ---- encoding ---------------------------------------------------------------------
    def _slot_vector(self, values: Any, op: str) -> list[float]:
        arr = np.asarray(values)
        if np.iscomplexobj(arr):
            raise SealError(f"{op}: complex values are not supported (real CKKS slots only)")
        try:
            arr = arr.astype(np.float64, copy=False)
        except (TypeError, ValueError):
            raise SealError(f"{op}: values must be numeric, got dtype {arr.dtype}") from None
        if arr.ndim != 1:
            raise SealError(f"{op}: values must be a 1-D vector, got shape {arr.shape}")
        if arr.size == 0:
            raise SealError(f"{op}: values is empty")
        if arr.size > self.slot_count:
            raise SealError(f"{op}: {arr.size} values do not fit {self.slot_count} slots "
                            f"(poly_degree={self.poly_degree})")
        bad = ~np.isfinite(arr)
        if bad.any():
            raise SealError(f"{op}: values[{int(np.argmax(bad))}] is not finite")
        return arr.tolist()

    def encode(self, values: Any, scale: float, level: int = 0) -> Any:
        """Encode a real vector (len <= slot_count; zero-padded) at ``scale`` and ``level``."""
        level = self._check_level(level)
        s = self.check_scale(scale, level, "encode: scale")
        vals = self._slot_vector(values, "encode")
        pt = _seal.Plaintext()
        self._call("encode", self.encoder.encode, vals, list(self._pids[level]), s, pt)
        return pt

    def encode_constant(self, value: float, scale: float, level: int = 0) -> Any:
        """Encode ``value`` into every slot (cheaper than a full vector)."""
        level = self._check_level(level)
        s = self.check_scale(scale, level, "encode_constant: scale")
        v = float(value)
        if not math.isfinite(v):
            raise SealError(f"encode_constant: value={value!r} is not finite")
        pt = _seal.Plaintext()
        self._call("encode_constant", self.encoder.encode, v, list(self._pids[level]), s, pt)
        return pt

    def decode(self, pt: Any) -> np.ndarray:
        self._check_pt(pt, "decode")
        return np.asarray(self._call("decode", self.encoder.decode_double, pt), dtype=np.float64)

    # ---- serialization ----------------------------------------------------------------
    @staticmethod
    def _kind_of(obj: Any) -> str:
        seal = _require_seal()
        for kind, cls in (("ciphertext", seal.Ciphertext), ("plaintext", seal.Plaintext),
                          ("public_key", seal.PublicKey), ("relin_keys", seal.RelinKeys),
                          ("galois_keys", seal.GaloisKeys), ("secret_key", seal.SecretKey)):
            if isinstance(obj, cls):
                return kind
        raise SealError(f"to_bytes: cannot serialize {type(obj).__name__}")

    def to_bytes(self, obj: Any) -> bytes:
        """Serialize a Ciphertext, Plaintext, PublicKey, RelinKeys, GaloisKeys or SecretKey."""
        kind = self._kind_of(obj)
        if not _seal.is_metadata_valid_for(obj, self.seal):
            raise SealError(f"to_bytes: {kind} does not belong to this context ({self.describe_short()})")
        blob = _seal_save(obj)
        head = (_ENVELOPE_MAGIC + bytes([_ENVELOPE_VERSION, _KIND_CODE[kind]]) + self._key_pid_bytes
                + struct.pack("<I", zlib.crc32(blob)))
        return head + blob

    def from_bytes(self, kind: str, data: bytes) -> Any:
        """Load an object of ``kind`` (one of ciphertext, plaintext, public_key, relin_keys,
        galois_keys, secret_key) made by :meth:`to_bytes` for these parameters."""
        seal = _require_seal()
        if kind not in _KIND_CODE:
            raise SealError(f"from_bytes: unknown kind {kind!r}; expected one of {list(_KINDS)}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SealError(f"from_bytes({kind}): expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if data[:len(_ENVELOPE_MAGIC)] == _ENVELOPE_MAGIC:
            if len(data) < _ENVELOPE_LEN:
                raise SealError(f"from_bytes({kind}): truncated: {len(data)} bytes, the header alone is {_ENVELOPE_LEN}")
            version, code = data[6], data[7]
            if version != _ENVELOPE_VERSION:
                raise SealError(f"from_bytes({kind}): unsupported format version {version} (expected {_ENVELOPE_VERSION})")
            got = _CODE_KIND.get(code, f"unknown kind code {code}")
            if got != kind:
                raise SealError(f"from_bytes({kind}): the bytes hold a {got}, not a {kind}")
            if data[8:40] != self._key_pid_bytes:
                raise SealError(f"from_bytes({kind}): the {kind} was made for different encryption "
                                f"parameters than this context ({self.describe_short()})")
            blob = data[_ENVELOPE_LEN:]
            crc: int | None = struct.unpack_from("<I", data, 40)[0]
        elif len(data) >= 2 and struct.unpack_from("<H", data)[0] == _SEAL_MAGIC:
            blob, crc = data, None  # raw SEAL serialization
        else:
            raise SealError(f"from_bytes({kind}): not a serialized SEAL object (bad magic; "
                            f"{len(data)} bytes)")
        if len(blob) < _SEAL_HEADER.size:
            raise SealError(f"from_bytes({kind}): truncated: {len(blob)} bytes of SEAL data, "
                            f"header needs {_SEAL_HEADER.size}")
        magic, hsize, _major, _minor, _compr, _res, size = _SEAL_HEADER.unpack_from(blob)
        if magic != _SEAL_MAGIC or hsize != _SEAL_HEADER.size:
            raise SealError(f"from_bytes({kind}): corrupt SEAL header")
        if size != len(blob):
            what = "truncated" if size > len(blob) else "has trailing garbage"
            raise SealError(f"from_bytes({kind}): {what}: SEAL header declares {size} bytes, "
                            f"{len(blob)} present")
        if crc is not None and zlib.crc32(blob) != crc:
            raise SealError(f"from_bytes({kind}): corrupt data (checksum mismatch)")
        cls = {"ciphertext": seal.Ciphertext, "plaintext": seal.Plaintext,
               "public_key": seal.PublicKey, "relin_keys": seal.RelinKeys,
               "galois_keys": seal.GaloisKeys, "secret_key": seal.SecretKey}[kind]
        obj = cls()
        try:
            _seal_load(obj, self.seal, blob)  # SEAL's load() runs is_valid_for itself
        except (ValueError, RuntimeError, TypeError) as exc:
            raise SealError(f"from_bytes({kind}): corrupt data or different encryption parameters "
                            f"({self.describe_short()}): SEAL says: {exc}") from None
        if not seal.is_valid_for(obj, self.seal):
            raise SealError(f"from_bytes({kind}): not valid for this context ({self.describe_short()})")
        if kind in ("ciphertext", "plaintext") and tuple(obj.parms_id()) not in self._level_by_pid:
            raise SealError(f"from_bytes({kind}): not at a data level of this context")
        return obj

    def ciphertext_from_bytes(self, data: bytes) -> Any:
        return self.from_bytes("ciphertext", data)

    def plaintext_from_bytes(self, data: bytes) -> Any:
        return self.from_bytes("plaintext", data)

    # ---- description ------------------------------------------------------------------
    def describe_short(self) -> str:
        p = self.params
        return f"poly_degree={p.poly_degree}, coeff_bits={list(p.coeff_bits)}, security={p.security}"

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for reports."""
        p = self.params
        return {
            **p.to_dict(),
            "slot_count": self.slot_count,
            "chain_length": self.chain_length,
            "depth": self.depth,
            "total_bits": p.total_bits,
            "max_bits": p.max_bits,
            "secure": self.is_secure,
            "primes": [int(q) for q in self.all_primes],
        }

    def __repr__(self) -> str:
        return f"CkksContext({self.describe_short()})"


# --------------------------------------------------------------------------- keys
class KeySet:
    """CKKS keys.  Any field may be ``None``; the server copy has no secret key.

    Galois keys exist only for the rotation steps requested.  Serialize with
    :meth:`to_bytes_dict` / :meth:`from_bytes_dict` (``{name: bytes}``).
    """

    FIELDS = ("secret_key", "public_key", "relin_keys", "galois_keys")

    def __init__(self, ctx: CkksContext, secret_key: Any = None, public_key: Any = None,
                 relin_keys: Any = None, galois_keys: Any = None):
        seal = _require_seal()
        if not isinstance(ctx, CkksContext):
            raise SealError(f"KeySet: expected a CkksContext, got {type(ctx).__name__}")
        self.ctx = ctx
        self.secret_key = secret_key
        self.public_key = public_key
        self.relin_keys = relin_keys
        self.galois_keys = galois_keys
        self._steps_cache: list[int] | None = None
        self._fingerprint: str | None = None
        for name, cls in (("secret_key", seal.SecretKey), ("public_key", seal.PublicKey),
                          ("relin_keys", seal.RelinKeys), ("galois_keys", seal.GaloisKeys)):
            obj = getattr(self, name)
            if obj is None:
                continue
            if not isinstance(obj, cls):
                raise SealError(f"KeySet.{name}: expected a SEAL {cls.__name__}, got {type(obj).__name__}")
            if not seal.is_metadata_valid_for(obj, ctx.seal):
                raise SealError(f"KeySet.{name}: empty or made for different encryption parameters "
                                f"({ctx.describe_short()})")

    @staticmethod
    def _normalize_steps(ctx: CkksContext, steps: Iterable[int]) -> list[int]:
        out = set()
        for k in steps:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise SealError(f"galois_steps: {k!r} is not an int")
            k = int(k) % ctx.slot_count
            if k:
                out.add(k)
        return sorted(out)

    @classmethod
    def generate(cls, ctx: CkksContext, galois_steps: Iterable[int] = (), relin: bool = True) -> "KeySet":
        """Secret + public key, relin keys if ``relin``, Galois keys for ``galois_steps`` only.

        Steps are left rotations (negative = right) and are reduced mod slot_count; step 0
        needs no key.  With no steps, ``galois_keys`` is ``None``.
        """
        seal = _require_seal()
        steps = cls._normalize_steps(ctx, galois_steps)
        kg = seal.KeyGenerator(ctx.seal)
        sk = kg.secret_key()
        pk = seal.PublicKey()
        kg.create_public_key(pk)
        rk = None
        if relin:
            rk = seal.RelinKeys()
            kg.create_relin_keys(rk)
        gk = None
        if steps:
            gk = seal.GaloisKeys()
            kg.create_galois_keys(sorted({galois_element(k, ctx.poly_degree) for k in steps}), gk)
        ks = cls(ctx, sk, pk, rk, gk)
        ks._steps_cache = steps
        return ks

    def with_rotations(self, galois_steps: Iterable[int]) -> "KeySet":
        """New KeySet whose Galois keys cover the current steps plus ``galois_steps``
        (SEAL cannot append keys, so all are regenerated; needs the secret key)."""
        seal = _require_seal()
        if self.secret_key is None:
            raise SealError("with_rotations: needs the secret key (client side)")
        steps = self._normalize_steps(self.ctx, list(self.rotation_steps()) + list(galois_steps))
        gk = None
        if steps:
            kg = seal.KeyGenerator(self.ctx.seal, self.secret_key)
            gk = seal.GaloisKeys()
            kg.create_galois_keys(sorted({galois_element(k, self.ctx.poly_degree) for k in steps}), gk)
        ks = KeySet(self.ctx, self.secret_key, self.public_key, self.relin_keys, gk)
        ks._steps_cache = steps
        return ks

    def has_rotation(self, step: int) -> bool:
        k = int(step) % self.ctx.slot_count
        if k == 0:
            return True
        return self.galois_keys is not None and self.galois_keys.has_key(
            galois_element(k, self.ctx.poly_degree))

    def rotation_steps(self) -> list[int]:
        """Left-rotation steps in ``1 .. slot_count-1`` that have a key (step -k == slots-k)."""
        if self._steps_cache is None:
            if self.galois_keys is None:
                self._steps_cache = []
            else:
                n, gk = self.ctx.poly_degree, self.galois_keys
                self._steps_cache = [k for k in range(1, n // 2) if gk.has_key(pow(3, k, 2 * n))]
        return list(self._steps_cache)

    def fingerprint(self) -> str:
        """The key-set id: sha256 (hex) of the serialized public key.  Every key directory and
        every file of ciphertexts is bound to it."""
        if self._fingerprint is None:
            if self.public_key is None:
                raise SealError("KeySet.fingerprint: the key set has no public key")
            self._fingerprint = hashlib.sha256(self.ctx.to_bytes(self.public_key)).hexdigest()
        return self._fingerprint

    def without_secret(self) -> "KeySet":
        """The evaluation keys a server may hold (no secret key)."""
        ks = KeySet(self.ctx, None, self.public_key, self.relin_keys, self.galois_keys)
        ks._steps_cache = self._steps_cache
        ks._fingerprint = self._fingerprint
        return ks

    def to_bytes_dict(self, include_secret: bool = False) -> dict[str, bytes]:
        """``{field: bytes}`` for each present key; the secret key only if asked for."""
        out = {}
        for name in self.FIELDS:
            obj = getattr(self, name)
            if obj is None or (name == "secret_key" and not include_secret):
                continue
            out[name] = self.ctx.to_bytes(obj)
        return out

    @classmethod
    def from_bytes_dict(cls, ctx: CkksContext, d: Mapping[str, bytes]) -> "KeySet":
        unknown = set(d) - set(cls.FIELDS)
        if unknown:
            raise SealError(f"KeySet.from_bytes_dict: unknown field(s) {sorted(unknown)}")
        kinds = {"secret_key": "secret_key", "public_key": "public_key",
                 "relin_keys": "relin_keys", "galois_keys": "galois_keys"}
        return cls(ctx, **{name: ctx.from_bytes(kinds[name], b) for name, b in d.items()})

    def summary(self) -> dict[str, Any]:
        return {"secret_key": self.secret_key is not None, "public_key": self.public_key is not None,
                "relin_keys": self.relin_keys is not None, "rotation_steps": self.rotation_steps()}


# --------------------------------------------------------------------------- roles
class CkksClient:
    """Key holder: encrypts inputs, decrypts outputs, re-encrypts for client-aided refresh."""

    def __init__(self, ctx: CkksContext, keys: KeySet):
        seal = _require_seal()
        if keys.secret_key is None:
            raise SealError("CkksClient: the KeySet has no secret key")
        if keys.ctx.key_parms_id != ctx.key_parms_id:
            raise SealError(f"CkksClient: the keys belong to different encryption parameters ({ctx.describe_short()})")
        self.ctx = ctx
        self.keys = keys
        if keys.public_key is not None:
            self._encryptor = seal.Encryptor(ctx.seal, keys.public_key)
        else:
            self._encryptor = seal.Encryptor(ctx.seal, keys.secret_key)
        self._decryptor = seal.Decryptor(ctx.seal, keys.secret_key)

    def encode(self, values: Any, scale: float, level: int = 0) -> Any:
        return self.ctx.encode(values, scale, level)

    def encrypt_plain(self, pt: Any) -> Any:
        self.ctx._check_pt(pt, "encrypt")
        ct = _seal.Ciphertext()
        self.ctx._call("encrypt", self._encryptor.encrypt, pt, ct)
        return ct

    def encrypt(self, values: Any, scale: float, level: int = 0) -> Any:
        """Encrypt a float vector (len <= slot_count, zero-padded) at ``scale`` and ``level``."""
        return self.encrypt_plain(self.ctx.encode(values, scale, level))

    def decrypt(self, ct: Any) -> np.ndarray:
        """Decrypt and decode all ``slot_count`` slots to float64."""
        self.ctx._check_ct(ct, "decrypt")
        pt = _seal.Plaintext()
        self.ctx._call("decrypt", self._decryptor.decrypt, ct, pt)
        return np.asarray(self.ctx._call("decrypt", self.ctx.encoder.decode_double, pt), dtype=np.float64)

    def reencrypt(self, ct: Any, scale: float | None = None, level: int = 0) -> Any:
        """Client-aided refresh: decrypt, then encrypt fresh at ``level`` (default scale: ct's)."""
        vals = self.decrypt(ct)
        return self.encrypt(vals, float(ct.scale) if scale is None else scale, level)


class CkksServer:
    """Untrusted evaluator.  Holds only evaluation keys (the secret key is dropped)."""

    def __init__(self, ctx: CkksContext, keys: KeySet | None = None):
        if keys is not None and keys.ctx.key_parms_id != ctx.key_parms_id:
            raise SealError(f"CkksServer: the keys belong to different encryption parameters ({ctx.describe_short()})")
        self.ctx = ctx
        self.keys = (keys or KeySet(ctx)).without_secret()
        self._ev = ctx.evaluator

    # encoding and bookkeeping --------------------------------------------------------
    def encode(self, values: Any, scale: float, level: int = 0) -> Any:
        """Plaintext at ``level`` (its parms_id) and ``scale``; see CkksContext.encode."""
        return self.ctx.encode(values, scale, level)

    def encode_constant(self, value: float, scale: float, level: int = 0) -> Any:
        return self.ctx.encode_constant(value, scale, level)

    def level_of(self, obj: Any) -> int:
        return self.ctx.level_of(obj)

    def scale_of(self, obj: Any) -> float:
        return self.ctx.scale_of(obj)

    def set_scale(self, ct: Any, scale: float) -> None:
        self.ctx.set_scale(ct, scale)

    def copy(self, ct: Any) -> Any:
        return self.ctx.copy(ct)

    # checks ---------------------------------------------------------------------------
    def _pair(self, op: str, a: Any, b: Any) -> int:
        la = self.ctx._check_ct(a, op, "first ciphertext")
        lb = self.ctx._check_ct(b, op, "second ciphertext")
        if la != lb:
            raise SealError(f"{op}: operands are at different levels ({la} vs {lb}); "
                            "mod_switch the higher one down first")
        return la

    def _same_scales(self, op: str, a: float, b: float, what: str) -> None:
        if not _same_scale(float(a), float(b)):
            raise SealError(f"{op}: scale mismatch: {what} {_fmt_scale(float(a))} vs {_fmt_scale(float(b))}")

    def _ct_pt(self, op: str, ct: Any, pt: Any) -> int:
        lc = self.ctx._check_ct(ct, op)
        lp = self.ctx._check_pt(pt, op)
        if lc != lp:
            raise SealError(f"{op}: ciphertext is at level {lc} but plaintext at level {lp}; "
                            "encode the plaintext at the ciphertext's level")
        return lc

    def _check_product_scale(self, op: str, s: float, level: int) -> None:
        bound = self.ctx.total_bits_at(level)
        if not (s > 0 and math.isfinite(s)) or int(math.log2(s)) >= bound:
            raise SealError(f"{op}: result scale {_fmt_scale(s)} does not fit the {bound}-bit modulus "
                            f"at level {level}; rescale an operand first")

    # linear ops -----------------------------------------------------------------------
    def add(self, a: Any, b: Any) -> Any:
        self._pair("add", a, b)
        self._same_scales("add", a.scale, b.scale, "operand scales")
        out = _seal.Ciphertext()
        self.ctx._call("add", self._ev.add, a, b, out)
        return out

    def sub(self, a: Any, b: Any) -> Any:
        self._pair("sub", a, b)
        self._same_scales("sub", a.scale, b.scale, "operand scales")
        if a is b:
            raise SealError("sub: a - a is an all-zero (transparent) ciphertext, which SEAL refuses to make")
        out = _seal.Ciphertext()
        self.ctx._call("sub", self._ev.sub, a, b, out)
        return out

    def negate(self, a: Any) -> Any:
        self.ctx._check_ct(a, "negate")
        out = _seal.Ciphertext()
        self.ctx._call("negate", self._ev.negate, a, out)
        return out

    def add_plain(self, ct: Any, pt: Any) -> Any:
        self._ct_pt("add_plain", ct, pt)
        self._same_scales("add_plain", ct.scale, pt.scale, "ciphertext vs plaintext scale")
        out = _seal.Ciphertext()
        self.ctx._call("add_plain", self._ev.add_plain, ct, pt, out)
        return out

    def sub_plain(self, ct: Any, pt: Any) -> Any:
        self._ct_pt("sub_plain", ct, pt)
        self._same_scales("sub_plain", ct.scale, pt.scale, "ciphertext vs plaintext scale")
        out = _seal.Ciphertext()
        self.ctx._call("sub_plain", self._ev.sub_plain, ct, pt, out)
        return out

    def multiply_plain(self, ct: Any, pt: Any) -> Any:
        """ct * pt; result scale = ct.scale * pt.scale (rescale afterwards)."""
        lvl = self._ct_pt("multiply_plain", ct, pt)
        if pt.is_zero():
            raise SealError("multiply_plain: the plaintext is all zeros; SEAL refuses to produce a "
                            "transparent ciphertext -- skip this term instead")
        self._check_product_scale("multiply_plain", float(ct.scale) * float(pt.scale), lvl)
        out = _seal.Ciphertext()
        self.ctx._call("multiply_plain", self._ev.multiply_plain, ct, pt, out)
        return out

    def multiply_plain_accumulate(self, acc: Any, ct: Any, pt: Any) -> Any:
        """``acc += ct * pt`` in place, returning ``acc`` (a linear op's accumulator: the sum needs
        no ciphertext of its own, and one call checks what two would)."""
        op = "multiply_plain_accumulate"
        lvl = self._ct_pt(op, ct, pt)
        if pt.is_zero():
            raise SealError(f"{op}: the plaintext is all zeros; skip this term instead")
        s = float(ct.scale) * float(pt.scale)
        self._check_product_scale(op, s, lvl)
        la = self.ctx._check_ct(acc, op, "accumulator")
        if la != lvl:
            raise SealError(f"{op}: the accumulator is at level {la}, the product at level {lvl}")
        self._same_scales(op, acc.scale, s, "accumulator vs product scale")
        prod = _seal.Ciphertext()
        self.ctx._call(op, self._ev.multiply_plain, ct, pt, prod)
        self.ctx._call(op, self._ev.add_inplace, acc, prod)
        return acc

    def rotate(self, ct: Any, step: int) -> Any:
        """Left rotation by ``step`` slots (negative = right), ``np.roll(v, -step)``."""
        self.ctx._check_ct(ct, "rotate")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise SealError(f"rotate: step={step!r} must be an int")
        if ct.size() != 2:
            raise SealError(f"rotate: ciphertext has size {ct.size()}; relinearize it first")
        k = int(step) % self.ctx.slot_count
        if k == 0:
            return self.ctx.copy(ct)
        if not self.keys.has_rotation(k):
            avail = self.keys.rotation_steps()
            shown = avail if len(avail) <= 16 else avail[:16] + ["..."]
            raise SealError(f"rotate: no Galois key for rotation step {int(step)} (left {k}, element "
                            f"{galois_element(k, self.ctx.poly_degree)}); keys exist for steps {shown}")
        out = _seal.Ciphertext()
        self.ctx._call("rotate", self._ev.rotate_vector, ct, k, self.keys.galois_keys, out)
        return out

    # multiplicative ops ---------------------------------------------------------------
    def multiply(self, a: Any, b: Any) -> Any:
        """ct x ct (result has size 3; relinearize next). Result scale = a.scale * b.scale."""
        lvl = self._pair("multiply", a, b)
        self._check_product_scale("multiply", float(a.scale) * float(b.scale), lvl)
        out = _seal.Ciphertext()
        self.ctx._call("multiply", self._ev.multiply, a, b, out)
        return out

    def relinearize(self, ct: Any) -> Any:
        self.ctx._check_ct(ct, "relinearize")
        if self.keys.relin_keys is None:
            raise SealError("relinearize: no relinearization keys (generate the KeySet with relin=True)")
        if ct.size() > 3:
            raise SealError(f"relinearize: ciphertext has size {ct.size()}; only size 3 is supported")
        out = _seal.Ciphertext()
        self.ctx._call("relinearize", self._ev.relinearize, ct, self.keys.relin_keys, out)
        return out

    def rescale(self, ct: Any) -> Any:
        """Drop the last active prime q: level + 1, scale / q (exactly as rescaled_scale)."""
        lvl = self.ctx._check_ct(ct, "rescale")
        if lvl >= self.ctx.max_level:
            raise SealError(f"rescale: ciphertext is at the last level {lvl}; no prime left to drop "
                            "(the program needs more levels or a refresh)")
        new = self.ctx.rescaled_scale(ct.scale, lvl)
        if new < 2.0:
            raise SealError(f"rescale: scale {_fmt_scale(float(ct.scale))} / prime "
                            f"{self.ctx.prime_at(lvl)} = {new!r} < 2 would destroy all precision")
        out = _seal.Ciphertext()
        self.ctx._call("rescale", self._ev.rescale_to_next, ct, out)
        return out

    def mod_switch(self, ct: Any, to_level: int) -> Any:
        """Drop primes without dividing (scale unchanged) down to ``to_level``."""
        lvl = self.ctx._check_ct(ct, "mod_switch")
        to_level = self.ctx._check_level(to_level, "mod_switch: to_level")
        if to_level < lvl:
            raise SealError(f"mod_switch: cannot go up from level {lvl} to level {to_level}")
        out = _seal.Ciphertext()
        self.ctx._call("mod_switch", self._ev.mod_switch_to, ct, list(self.ctx._pids[to_level]), out)
        return out

    def mod_switch_plain(self, pt: Any, to_level: int) -> Any:
        lvl = self.ctx._check_pt(pt, "mod_switch_plain")
        to_level = self.ctx._check_level(to_level, "mod_switch_plain: to_level")
        if to_level < lvl:
            raise SealError(f"mod_switch_plain: cannot go up from level {lvl} to level {to_level}")
        out = _seal.Plaintext()
        self.ctx._call("mod_switch_plain", self._ev.mod_switch_to, pt, list(self.ctx._pids[to_level]), out)
        return out
