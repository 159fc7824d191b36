"""CKKS with bootstrapping through Lattigo v6 (Go), via our cgo shared library.

The Go side (``backends/lattigo/capi/*.go``, built by ``make`` into
``libheclattigo.so`` next to this file) is a thin layer of primitives over
opaque handles; this module wraps it in small classes.  The executor of an HE
program drives them one instruction at a time.

Classes
-------
* :class:`LattigoParams` -- a checked parameter set built from a JSON-able
  literal (ring, explicit primes, secret, default scale, optional bootstrap).
* :func:`keygen` -- the key holder writes ``client/`` (secret.key 0600,
  public.key) and ``server/`` (public.key, relin.key, galois.key,
  bootstrap.key); the server never gets or opens secret.key.
* :class:`Client` -- encrypt (secret or public key), decrypt.
* :class:`Evaluator` -- the server: every homomorphic primitive, bootstrapping.
* :class:`Ciphertext`, :class:`Plaintext` -- handles, freed by ``close()`` or
  when garbage collected.

Conventions
-----------
* Level: a ciphertext at level ``l`` still has the primes ``q_0 .. q_l`` (Lattigo's
  ``Level()``); fresh ciphertexts are at ``max_level = len(q) - 1``; level 0 has only
  ``q_0``.  ``rescale`` goes from ``l`` to ``l - 1``.
* Scale: a float64, set and read back exactly.  ``mul``/``mul_plain``/``mul_const``
  give ``scale_a * scale_b`` (float64 product); ``rescale`` gives
  ``scale / float(q_l)`` (float64 division, as ``scale / q`` in Python with a float
  scale), dividing by exactly one prime.  ``add``/``sub``/``add_plain`` need equal
  levels and scales (equal up to one ulp) and raise otherwise; nothing is aligned
  silently.
* Rotation: ``rotate(ct, k)`` is a LEFT rotation: slot ``i`` receives slot
  ``i + k`` (``np.roll(v, -k)``).  Its Galois element is ``5^k mod 2N``
  (Lattigo's ``GaloisElement(k)``; SEAL uses generator 3).  Steps are taken
  modulo the slot count.
* Slot vectors are float64 (real parts; imaginary parts are zero on encryption
  and dropped on decryption), at most ``slots`` long (zero padded), passed to Go
  by pointer (one copy into Lattigo's encoder).
* Bootstrap: see :meth:`Evaluator.bootstrap`.

Bootstrapping (same ring for the program and the bootstrap circuit): the
input may be at any level; the output is at ``max_level`` with exactly the
default scale.  Lattigo appends ``bootstrap.depth`` primes (CoeffsToSlots,
EvalMod, SlotsToCoeffs) above the program's chain ``q``; the program's own
levels are untouched.  Slot values must satisfy |v| <= ``max_abs_value``
(message_ratio/256: 1.0 for Lattigo's secure sets).  Measured max abs errors
for |v| <= 1 on the insecure sets: toy-n10 ~4e-8, toy-n12 ~9e-8.

Lattigo v6.1.1 issues worked around on the Go side: ``Evaluator.ShallowCopy``
of the bootstrapper builds its DFT/EvalMod evaluators with the residual
parameters (the copy panics: "level cannot be larger than max level");
``Bootstrap`` relabels a sparsely packed ciphertext as fully packed when both
rings are equal (decrypts to garbage for slots < N/2), so we call ``Evaluate``;
its ``N15QP880H16384H32`` set has no bootstrapping LogP, which makes it 1012
bits, so our ``n15-dense`` uses LogP {56, 56} (880 bits, as its name says).

Every failure in Go (a Lattigo error or a Go panic) comes back as a
:class:`LattigoError` with a one-line message naming the operation; the process
never aborts.  Calls release the GIL (ctypes.CDLL), so ``bootstrap_many`` and
other threads run concurrently.
"""

from __future__ import annotations

import ctypes as C
import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from hecompiler.errors import HecError

__all__ = [
    "LattigoError", "LattigoParams", "BootstrapInfo", "Client", "Evaluator", "Ciphertext", "Plaintext",
    "keygen", "keyset_fingerprint", "reference_literal", "insecure_literal", "REFERENCE_SETS", "INSECURE_SETS",
    "go_memory", "free_os_memory", "set_gc_percent", "set_memory_limit", "live_handles", "library_path",
    "galois_element",
]

LIB_NAME = "libheclattigo.so"


class LattigoError(HecError):
    """A Lattigo backend operation failed (message: one line, names the operation)."""


# ---------------------------------------------------------------- library

_lib_lock = threading.Lock()
_lib: C.CDLL | None = None

_ll, _int, _dbl, _ptr, _str = C.c_longlong, C.c_int, C.c_double, C.c_void_p, C.c_char_p
_pll, _pint, _pdbl, _pptr = C.POINTER(C.c_longlong), C.POINTER(C.c_int), C.POINTER(C.c_double), C.POINTER(C.c_void_p)

_SIGNATURES: dict[str, list[Any]] = {
    "hl_handle_free": [_ll],
    "hl_handle_count": [_pll],
    "hl_noop": [_ll, _pll],
    "hl_version": [_pptr],
    "hl_mem_stats": [_pptr],
    "hl_free_os_memory": [],
    "hl_set_gc_percent": [_int, _pint],
    "hl_params_new": [_str, _pll],
    "hl_params_info": [_ll, _pptr],
    "hl_reference_literal": [_str, _pptr],
    "hl_keygen": [_ll, _str, _str, _pll, _pll, _ll, _int, _int, _pptr],
    "hl_load_client": [_ll, _str, _pll],
    "hl_load_server": [_ll, _str, _pll],
    "hl_session_info": [_ll, _pptr],
    "hl_encode": [_ll, _pdbl, _ll, _int, _dbl, _pll],
    "hl_encrypt": [_ll, _pdbl, _ll, _int, _dbl, _int, _pll],
    "hl_decrypt": [_ll, _ll, _pdbl, _ll],
    "hl_ct_info": [_ll, _pint, _pdbl, _pint],
    "hl_ct_set_scale": [_ll, _dbl],
    "hl_ct_copy": [_ll, _pll],
    "hl_pt_info": [_ll, _pint, _pdbl],
    "hl_ct_to_bytes": [_ll, _pptr, _pll],
    "hl_ct_from_bytes": [_ll, _ptr, _ll, _pll],
    "hl_ct_save": [_ll, _str],
    "hl_ct_load": [_ll, _str, _pll],
    "hl_rotate": [_ll, _ll, _ll, _pll],
    "hl_rotate_hoisted": [_ll, _ll, _pll, _ll, _pll],
    "hl_add": [_ll, _ll, _ll, _pll],
    "hl_sub": [_ll, _ll, _ll, _pll],
    "hl_negate": [_ll, _ll, _pll],
    "hl_add_plain": [_ll, _ll, _pdbl, _ll, _dbl, _pll],
    "hl_mul_plain": [_ll, _ll, _pdbl, _ll, _dbl, _pll],
    "hl_add_plain_pt": [_ll, _ll, _ll, _pll],
    "hl_mul_plain_acc": [_ll, _ll, _ll, _ll],
    "hl_mul_plain_pt": [_ll, _ll, _ll, _pll],
    "hl_add_const": [_ll, _ll, _dbl, _pll],
    "hl_mul_const": [_ll, _ll, _dbl, _dbl, _pll],
    "hl_mul": [_ll, _ll, _ll, _pll],
    "hl_rescale": [_ll, _ll, _pll],
    "hl_drop_level": [_ll, _ll, _int, _pll],
    "hl_zero": [_ll, _int, _dbl, _int, _pll],
    "hl_bootstrap": [_ll, _ll, _pll],
    "hl_bootstrap_many": [_ll, _pll, _ll, _int, _pll],
    "hl_bootstrap_prepare": [_ll, _int],
    "hl_bootstrap_bias": [_ll, _int, _dbl, _pdbl],
    "hl_debug_panic": [],
    "hl_debug_encode_matches": [_ll, _pdbl, _ll, _int, _dbl, _pint],
    "hl_set_memory_limit": [_ll, _pll],
}


def library_path() -> Path:
    """Where the shared library is expected (next to this file)."""
    return Path(__file__).resolve().with_name(LIB_NAME)


def _load() -> C.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is None:
            path = library_path()
            if not path.exists():
                raise LattigoError(f"Lattigo backend library {path} is missing; run `make lattigo` (or `make test`) "
                                   f"in the repository root to build it (needs Go >= 1.22)")
            try:
                lib = C.CDLL(str(path))
            except OSError as e:
                raise LattigoError(f"cannot load {path}: {e}; rebuild it with `make`") from None
            for name, argtypes in _SIGNATURES.items():
                try:
                    fn = getattr(lib, name)
                except AttributeError:
                    raise LattigoError(f"{path} lacks {name}: it is stale; rebuild it with `make`") from None
                fn.argtypes = argtypes
                fn.restype = C.c_void_p  # error message (char*), NULL on success
            lib.hl_free_string.argtypes = [C.c_void_p]
            lib.hl_free_string.restype = None
            lib.hl_free_buffer.argtypes = [C.c_void_p]
            lib.hl_free_buffer.restype = None
            _lib = lib
    return _lib


def _call(name: str, *args: Any) -> None:
    lib = _load()
    err = getattr(lib, name)(*args)
    if err:
        msg = C.string_at(err).decode("utf-8", "replace")
        lib.hl_free_string(err)
        raise LattigoError(msg.replace("\n", " "))


def _call_json(name: str, *args: Any) -> Any:
    out = C.c_void_p()
    _call(name, *args, C.byref(out))
    try:
        return json.loads(C.string_at(out.value).decode())
    finally:
        _load().hl_free_string(out.value)


def _out_handle(name: str, *args: Any) -> int:
    h = C.c_longlong()
    _call(name, *args, C.byref(h))
    return h.value


def _free_handle(h: int) -> None:
    lib = _lib
    if lib is not None and h:
        err = lib.hl_handle_free(h)
        if err:
            lib.hl_free_string(err)


def _vec(values: Any, slots: int, what: str = "values") -> np.ndarray:
    v = np.ascontiguousarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise LattigoError(f"{what}: expected a 1-D slot vector, got shape {v.shape}")
    if v.size > slots:
        raise LattigoError(f"{what}: {v.size} values for {slots} slots")
    if not np.all(np.isfinite(v)):
        raise LattigoError(f"{what}: contains NaN or infinity")
    return v


def _dptr(v: np.ndarray) -> Any:
    return v.ctypes.data_as(_pdbl)


def galois_element(step: int, n: int) -> int:
    """Lattigo's Galois element of a left rotation by ``step`` slots: 5^step mod 2N."""
    return pow(5, step % (2 * n), 2 * n)


# ---------------------------------------------------------------- parameters

#: Lattigo's secure bootstrapping sets (circuits/ckks/bootstrapping/default_parameters.go)
REFERENCE_SETS = {
    "n16-sparse": "N16QP1546H192H32: ring 2^16, sparse secret h=192, ephemeral h=32, residual Q 60+9x40, P 5x61",
    "n15-dense": "N15QP880H16384H32: ring 2^15, dense secret h=N/2, ephemeral h=32, residual Q 40+4x31, P 2x56",
}

#: INSECURE small sets for tests and development (never for real data).
INSECURE_SETS: dict[str, dict[str, Any]] = {
    # ring 2^10, two residual levels; the message ratio is raised by 16-LogN as Lattigo's own tests do
    "toy-n10": {"name": "toy-n10", "insecure": True, "log_n": 10, "log_q": [60, 40, 40], "log_p": [61, 61],
                "secret": {"p": 2 / 3}, "log_default_scale": 40,
                "bootstrap": {"log_message_ratio": 14}},
    # ring 2^12, three residual levels
    "toy-n12": {"name": "toy-n12", "insecure": True, "log_n": 12, "log_q": [60, 40, 40, 40], "log_p": [61, 61],
                "secret": {"p": 2 / 3}, "log_default_scale": 40,
                "bootstrap": {"log_message_ratio": 12}},
    # ring 2^12 without bootstrapping, five levels (fast primitive tests)
    "toy-n12-nobtp": {"name": "toy-n12-nobtp", "insecure": True, "log_n": 12, "log_q": [60, 40, 40, 40, 40, 40],
                      "log_p": [61], "secret": {"p": 2 / 3}, "log_default_scale": 40},
}


def reference_literal(name: str) -> dict[str, Any]:
    """The literal of one of Lattigo's secure bootstrapping sets (``n16-sparse``,
    ``n15-dense``) with its residual data primes ``q`` and key-switching primes
    ``p`` as Lattigo generates them; the bootstrapping primes are added on top by
    Lattigo (see :attr:`LattigoParams.bootstrap`)."""
    if name not in REFERENCE_SETS:
        raise LattigoError(f"unknown reference set {name!r}; known: {sorted(REFERENCE_SETS)}")
    return _call_json("hl_reference_literal", name.encode())


def insecure_literal(name: str) -> dict[str, Any]:
    """A small INSECURE set for tests (primes as bit sizes; LattigoParams resolves them)."""
    if name not in INSECURE_SETS:
        raise LattigoError(f"unknown insecure set {name!r}; known: {sorted(INSECURE_SETS)}")
    return json.loads(json.dumps(INSECURE_SETS[name]))


@dataclass(frozen=True)
class BootstrapInfo:
    """What a bootstrap consumes and gives, for a parameter set.

    ``output_level`` is the residual top level (= ``max_level``); ``depth`` the
    levels of the extended chain the circuit consumes above it (CoeffsToSlots +
    EvalMod + SlotsToCoeffs); ``q``/``p`` the full bootstrapping chain;
    ``message_ratio`` = Q_0/|m*scale| Lattigo scales the input to.
    ``max_abs_value``: the largest |slot value| we accept as bootstrap input
    (see :meth:`Evaluator.bootstrap`).  ``level0_exact_scale``: the scale
    Q_0/(ratio*R), R = round(Q_0/(ratio*default_scale)), at which a level-0 input
    is bootstrapped without bias (any level >= 1 input is exact anyway)."""

    output_level: int
    depth: int
    cts_depth: int
    evalmod_depth: int
    stc_depth: int
    q: tuple[int, ...]
    p: tuple[int, ...]
    log_qp: float
    log_slots: int
    ephemeral_h: int
    log_message_ratio: int
    message_ratio: float
    k: int
    galois_elements: int
    max_abs_value: float
    level0_exact_scale: float


#: see Evaluator.bootstrap: |values| up to this fraction of the message ratio keep the
#: sine approximation of EvalMod within its accuracy (measured: tests/test_lattigo_primitives.py)
MAX_VALUE_FRACTION_OF_RATIO = 1 / 256


class LattigoParams:
    """A checked parameter set.

    ``literal`` keys: ``log_n``; ``q`` (explicit data primes q_0..q_L, each
    1 mod 2N) or ``log_q`` (bit sizes, Lattigo picks primes); ``p`` or ``log_p``
    (key-switching primes); ``secret``: ``{"h": H}`` (exactly H non-zero ternary
    coefficients) or ``{"p": density}`` (2/3 = Lattigo's dense default);
    ``log_default_scale`` (<= 60); optional ``log_slots`` (default log_n - 1);
    optional ``bootstrap``: ``{}`` for Lattigo's defaults or any of ``log_p``,
    ``ephemeral_h``, ``log_message_ratio``, ``cts_log_scales``, ``stc_log_scales``,
    ``evalmod_log_scale``, ``k``, ``mod1_degree``, ``double_angle``,
    ``mod1_inv_degree`` (Lattigo's bootstrapping.ParametersLiteral fields).
    """

    def __init__(self, literal: Mapping[str, Any]):
        try:
            text = json.dumps(dict(literal))
        except (TypeError, ValueError) as e:
            raise LattigoError(f"params: literal is not JSON-able: {e}") from None
        self._h = _out_handle("hl_params_new", text.encode())
        self.info: dict[str, Any] = _call_json("hl_params_info", self._h)
        i = self.info
        self.literal: dict[str, Any] = i["literal"]
        self.name: str = self.literal.get("name", "")
        self.insecure: bool = bool(self.literal.get("insecure", False))
        self.log_n: int = i["log_n"]
        self.n: int = i["n"]
        self.log_slots: int = i["log_slots"]
        self.slots: int = i["slots"]
        self.max_level: int = i["max_level"]
        self.q: tuple[int, ...] = tuple(int(x) for x in i["q"])
        self.p: tuple[int, ...] = tuple(int(x) for x in i["p"])
        self.default_scale: float = float(i["default_scale"])
        self.log_qp: float = float(i["log_qp"])
        self.fingerprint: str = i["fingerprint"]
        b = i.get("bootstrap")
        self.bootstrap: BootstrapInfo | None = None
        if b:
            self.bootstrap = BootstrapInfo(
                output_level=b["output_level"], depth=b["depth"], cts_depth=b["cts_depth"],
                evalmod_depth=b["evalmod_depth"], stc_depth=b["stc_depth"],
                q=tuple(int(x) for x in b["q"]), p=tuple(int(x) for x in b["p"]), log_qp=float(b["log_qp"]),
                log_slots=b["log_slots"], ephemeral_h=b["ephemeral_h"], log_message_ratio=b["log_message_ratio"],
                message_ratio=float(b["message_ratio"]), k=b["k"], galois_elements=b["galois_elements"],
                max_abs_value=float(b["message_ratio"]) * MAX_VALUE_FRACTION_OF_RATIO,
                level0_exact_scale=float(b["level0_exact_scale"]))

    @classmethod
    def reference(cls, name: str) -> "LattigoParams":
        return cls(reference_literal(name))

    @classmethod
    def insecure_set(cls, name: str) -> "LattigoParams":
        return cls(insecure_literal(name))

    @property
    def handle(self) -> int:
        return self._h

    def bits(self) -> list[float]:
        """log2 of each data prime q_0..q_L."""
        return [math.log2(q) for q in self.q]

    def galois_element(self, step: int) -> int:
        return galois_element(step % self.slots, self.n)

    def bootstrap_bias(self, level: int, scale: float) -> float:
        """Relative bias e - 1 a bootstrap leaves on an input at (level, scale): 0 above
        level 0 (we convert the scale exactly first); at level 0 Lattigo multiplies by the
        integer round(q_0/(scale*ratio)) and the rounding is not corrected."""
        out = C.c_double()
        _call("hl_bootstrap_bias", self._h, int(level), float(scale), C.byref(out))
        return out.value

    def describe(self) -> str:
        b = self.bootstrap
        s = (f"Lattigo CKKS N=2^{self.log_n}, {self.slots} slots, levels 0..{self.max_level} "
             f"(q bits {[round(x, 1) for x in self.bits()]}), P {len(self.p)} primes, logQP {self.log_qp:.1f}, "
             f"scale 2^{math.log2(self.default_scale):g}")
        if b:
            s += (f"; bootstrap: +{b.depth} levels (CtS {b.cts_depth}, EvalMod {b.evalmod_depth}, StC {b.stc_depth}), "
                  f"logQP {b.log_qp:.1f}, output level {b.output_level}")
        if self.insecure:
            s += "; INSECURE"
        return s

    def __repr__(self) -> str:
        return f"LattigoParams({self.name or self.fingerprint[:12]}: {self.describe()})"

    def __del__(self) -> None:
        _free_handle(getattr(self, "_h", 0))


# ---------------------------------------------------------------- keys

def keygen(params: LattigoParams, client_dir: str | os.PathLike, server_dir: str | os.PathLike,
           rotations: Iterable[int] = (), relin: bool = True, bootstrap: bool | None = None,
           levels: Iterable[int] | None = None) -> dict[str, Any]:
    """Generate a key set (the key holder's job).

    ``client_dir`` gets secret.key (mode 0600) and public.key; ``server_dir`` gets
    public.key, relin.key (if ``relin``), galois.key (one key per distinct
    left-rotation step mod slots, generated and written one at a time) and
    bootstrap.key (Lattigo's bootstrapping keys, streamed one Galois key at a time;
    default: when the parameters bootstrap).  Every file is written to a temp file
    and renamed.  ``levels`` (one per rotation, default the top): the level each rotation's key
    is made for, the highest it is used at (fewer primes: smaller and quicker to make; a
    ciphertext above its key's level is refused).  Returns a report: seconds and bytes per key
    kind, the steps, their keys' levels and Galois elements."""
    steps = np.ascontiguousarray([int(k) for k in rotations], dtype=np.int64)
    lv = np.full(steps.size, -1, dtype=np.int64) if levels is None else \
        np.ascontiguousarray([int(v) for v in levels], dtype=np.int64)
    if lv.size != steps.size:
        raise LattigoError(f"keygen: {lv.size} levels for {steps.size} rotations")
    flag = -1 if bootstrap is None else int(bool(bootstrap))
    return _call_json("hl_keygen", params.handle, os.fsencode(client_dir), os.fsencode(server_dir),
                      steps.ctypes.data_as(_pll), lv.ctypes.data_as(_pll), steps.size, int(relin), flag)


def keyset_fingerprint(key_dir: str | os.PathLike) -> str:
    """sha256 hex of the key set's public.key file (client and server copies are identical)."""
    path = Path(key_dir) / "public.key"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise LattigoError(f"key set fingerprint: cannot read {path}: {e.strerror}") from None


# ---------------------------------------------------------------- ciphertexts

class Ciphertext:
    """A ciphertext handle (Go owns the data).  Immutable through the API except
    :meth:`set_scale`."""

    __slots__ = ("_h", "params", "__weakref__")

    def __init__(self, params: LattigoParams, handle: int):
        self.params = params
        self._h = handle

    @property
    def handle(self) -> int:
        if not self._h:
            raise LattigoError("ciphertext: used after close()")
        return self._h

    def _info(self) -> tuple[int, float, int]:
        lv, sc, dg = C.c_int(), C.c_double(), C.c_int()
        _call("hl_ct_info", self.handle, C.byref(lv), C.byref(sc), C.byref(dg))
        return lv.value, sc.value, dg.value

    @property
    def level(self) -> int:
        return self._info()[0]

    @property
    def scale(self) -> float:
        return self._info()[1]

    def set_scale(self, scale: float) -> None:
        """Relabel the scale (exact float64): the value decrypts to value * old/new."""
        _call("hl_ct_set_scale", self.handle, float(scale))

    def copy(self) -> "Ciphertext":
        return Ciphertext(self.params, _out_handle("hl_ct_copy", self.handle))

    def to_bytes(self) -> bytes:
        ptr, n = C.c_void_p(), C.c_longlong()
        _call("hl_ct_to_bytes", self.handle, C.byref(ptr), C.byref(n))
        try:
            return C.string_at(ptr.value, n.value)
        finally:
            _load().hl_free_buffer(ptr.value)

    @classmethod
    def from_bytes(cls, params: LattigoParams, data: bytes | bytearray | memoryview) -> "Ciphertext":
        buf = bytes(data)
        return cls(params, _out_handle("hl_ct_from_bytes", params.handle, C.c_char_p(buf), len(buf)))

    def save(self, path: str | os.PathLike) -> None:
        """Stream to ``path`` (temp file + rename)."""
        _call("hl_ct_save", self.handle, os.fsencode(path))

    @classmethod
    def load(cls, params: LattigoParams, path: str | os.PathLike) -> "Ciphertext":
        return cls(params, _out_handle("hl_ct_load", params.handle, os.fsencode(path)))

    def close(self) -> None:
        h, self._h = self._h, 0
        _free_handle(h)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        if not self._h:
            return "Ciphertext(closed)"
        lv, sc, _ = self._info()
        return f"Ciphertext(level={lv}, scale=2^{math.log2(sc):.4f})"


class Plaintext:
    """An encoded slot vector at a level and scale (from :meth:`Evaluator.encode`)."""

    __slots__ = ("_h", "params")

    def __init__(self, params: LattigoParams, handle: int):
        self.params, self._h = params, handle

    @property
    def handle(self) -> int:
        if not self._h:
            raise LattigoError("plaintext: used after close()")
        return self._h

    def _info(self) -> tuple[int, float]:
        lv, sc = C.c_int(), C.c_double()
        _call("hl_pt_info", self.handle, C.byref(lv), C.byref(sc))
        return lv.value, sc.value

    @property
    def level(self) -> int:
        return self._info()[0]

    @property
    def scale(self) -> float:
        return self._info()[1]

    def close(self) -> None:
        h, self._h = self._h, 0
        _free_handle(h)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------- sessions

class _Session:
    _loader = ""

    def __init__(self, params: LattigoParams, key_dir: str | os.PathLike):
        self.params = params
        self.key_dir = Path(key_dir)
        self._h = _out_handle(self._loader, params.handle, os.fsencode(key_dir))
        info = _call_json("hl_session_info", self._h)
        self.steps: tuple[int, ...] = tuple(info.get("steps") or ())
        #: step -> the level its Galois key is made for
        self.key_levels: dict[int, int] = dict(zip(self.steps, info.get("levels") or ()))
        self.has_relin: bool = bool(info["relin"])
        self.has_bootstrap: bool = bool(info["bootstrap"])

    @property
    def handle(self) -> int:
        if not self._h:
            raise LattigoError(f"{type(self).__name__}: used after close()")
        return self._h

    def _ct(self, name: str, *args: Any) -> Ciphertext:
        return Ciphertext(self.params, _out_handle(name, self.handle, *args))

    def _level(self, level: int | None) -> int:
        return self.params.max_level if level is None else int(level)

    def _scale(self, scale: float | None) -> float:
        return self.params.default_scale if scale is None else float(scale)

    def encrypt(self, values: Any, level: int | None = None, scale: float | None = None) -> Ciphertext:
        """Public-key encryption of a float64 slot vector at ``level`` (default: top)
        and ``scale`` (default: the default scale), both exact."""
        v = _vec(values, self.params.slots)
        return self._ct("hl_encrypt", _dptr(v), v.size, self._level(level), self._scale(scale), 0)

    def encode(self, values: Any, level: int | None = None, scale: float | None = None) -> Plaintext:
        """Encode a float64 slot vector; callable from several threads at once (each call has an
        encoder of its own and does not wait for the evaluator)."""
        v = _vec(values, self.params.slots)
        return Plaintext(self.params, _out_handle("hl_encode", self.handle, _dptr(v), v.size,
                                                  self._level(level), self._scale(scale)))

    def encode_matches_lattigo(self, values: Any, level: int | None = None, scale: float | None = None) -> bool:
        """Whether this library's encoding of ``values`` is Lattigo's Encoder.Encode, coefficient
        for coefficient (a check for tests: the library encodes without Lattigo's per-coefficient
        allocations)."""
        v = _vec(values, self.params.slots)
        out = C.c_int(0)
        _call("hl_debug_encode_matches", self.handle, _dptr(v), v.size, self._level(level), self._scale(scale),
              C.byref(out))
        return bool(out.value)

    def close(self) -> None:
        h, self._h = self._h, 0
        _free_handle(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Client(_Session):
    """The key holder: loads ``secret.key`` and ``public.key`` from ``client_dir``."""

    _loader = "hl_load_client"

    def encrypt(self, values: Any, level: int | None = None, scale: float | None = None,
                secret: bool = True) -> Ciphertext:
        """Encrypt with the secret key (default; smaller fresh noise) or the public key."""
        v = _vec(values, self.params.slots)
        return self._ct("hl_encrypt", _dptr(v), v.size, self._level(level), self._scale(scale), int(secret))

    def decrypt(self, ct: Ciphertext) -> np.ndarray:
        """The real parts of all slots, float64."""
        out = np.empty(self.params.slots, dtype=np.float64)
        _call("hl_decrypt", self.handle, ct.handle, _dptr(out), out.size)
        return out


class Evaluator(_Session):
    """The server: loads public.key, relin.key, galois.key, bootstrap.key (whichever
    exist) from ``server_dir``; never opens secret.key.  Every op returns a new
    ciphertext and leaves its inputs unchanged."""

    _loader = "hl_load_server"

    def rotate(self, ct: Ciphertext, k: int) -> Ciphertext:
        """Left rotation by ``k``: slot i gets slot i+k (np.roll(v, -k)); k=0 copies."""
        return self._ct("hl_rotate", ct.handle, int(k))

    def rotate_hoisted(self, ct: Ciphertext, steps: Sequence[int]) -> list[Ciphertext]:
        """Several left rotations of one ciphertext sharing one key-switch decomposition."""
        ks = np.ascontiguousarray([int(k) for k in steps], dtype=np.int64)
        outs = np.zeros(ks.size, dtype=np.int64)
        _call("hl_rotate_hoisted", self.handle, ct.handle, ks.ctypes.data_as(_pll), ks.size,
              outs.ctypes.data_as(_pll))
        return [Ciphertext(self.params, int(h)) for h in outs]

    def add(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        return self._ct("hl_add", a.handle, b.handle)

    def sub(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        return self._ct("hl_sub", a.handle, b.handle)

    def negate(self, a: Ciphertext) -> Ciphertext:
        return self._ct("hl_negate", a.handle)

    def add_plain(self, ct: Ciphertext, values: Any, scale: float | None = None) -> Ciphertext:
        """ct + values, encoded at ct's level with ct's scale (``scale``, when given,
        must equal it)."""
        if isinstance(values, Plaintext):
            return self._ct("hl_add_plain_pt", ct.handle, values.handle)
        v = _vec(values, self.params.slots)
        return self._ct("hl_add_plain", ct.handle, _dptr(v), v.size, ct.scale if scale is None else float(scale))

    def mul_plain(self, ct: Ciphertext, values: Any, scale: float | None = None) -> Ciphertext:
        """ct * values encoded at ct's level with exactly ``scale``; result scale
        ct.scale * scale, same level (no rescale)."""
        if isinstance(values, Plaintext):
            return self._ct("hl_mul_plain_pt", ct.handle, values.handle)
        if scale is None:
            raise LattigoError("mul_plain: give the plaintext scale")
        v = _vec(values, self.params.slots)
        return self._ct("hl_mul_plain", ct.handle, _dptr(v), v.size, float(scale))

    def mul_plain_acc(self, acc: Ciphertext, ct: Ciphertext, pt: Plaintext) -> Ciphertext:
        """acc += ct * pt, in place (no product ciphertext); acc's scale must be ct's times pt's.
        Returns acc."""
        _call("hl_mul_plain_acc", self.handle, acc.handle, ct.handle, pt.handle)
        return acc

    def add_const(self, ct: Ciphertext, c: float) -> Ciphertext:
        return self._ct("hl_add_const", ct.handle, float(c))

    def mul_const(self, ct: Ciphertext, c: float, scale: float) -> Ciphertext:
        """ct * round(c*scale) (an exact integer product); result scale ct.scale * scale."""
        return self._ct("hl_mul_const", ct.handle, float(c), float(scale))

    def mul(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        """a * b then relinearisation; same level required; scale a.scale * b.scale."""
        return self._ct("hl_mul", a.handle, b.handle)

    def rescale(self, ct: Ciphertext) -> Ciphertext:
        """Divide by exactly one prime q_l: level l-1, scale / float(q_l)."""
        return self._ct("hl_rescale", ct.handle)

    def drop_level(self, ct: Ciphertext, to_level: int) -> Ciphertext:
        """Drop primes down to ``to_level`` without dividing (scale unchanged)."""
        return self._ct("hl_drop_level", ct.handle, int(to_level))

    def zero(self, level: int, scale: float, encrypted: bool = False) -> Ciphertext:
        """A ciphertext of zero: the trivial (0, 0) (exact, free) or a fresh public-key
        encryption of zero (``encrypted=True``)."""
        return self._ct("hl_zero", int(level), float(scale), int(encrypted))

    def bootstrap(self, ct: Ciphertext) -> Ciphertext:
        """Refresh: a new ciphertext at ``params.bootstrap.output_level`` (= max_level)
        with exactly the default scale, decrypting to the same values.

        Input: any level of the residual chain.  At level >= 1 we first bring the
        scale exactly to the one Lattigo's ScaleDown expects (an integer product and
        one rescale), so any scale works whose product with |values| fits the
        level; at level 0 the scale must be at most 2*q_0/ratio and the output
        carries the relative bias ``params.bootstrap_bias(0, scale)`` (none at
        ``params.bootstrap.level0_exact_scale``; e.g. up to 7e-6 for prime scales
        at n16-sparse and 6e-4 at n15-dense, far above their bootstrap precision).  Values must
        satisfy |v| <= ``params.bootstrap.max_abs_value`` (EvalMod approximates
        x mod 1 by a scaled sine around 0; precision degrades as |v|/ratio grows).
        """
        return self._ct("hl_bootstrap", ct.handle)

    def bootstrap_many(self, cts: Sequence[Ciphertext], workers: int | None = None) -> list[Ciphertext]:
        """Bootstrap several ciphertexts concurrently on ``workers`` goroutines (default:
        the CPU count), each with its own shallow copy of the bootstrapping evaluator."""
        hs = np.ascontiguousarray([c.handle for c in cts], dtype=np.int64)
        if hs.size == 0:
            return []
        outs = np.zeros(hs.size, dtype=np.int64)
        w = (os.cpu_count() or 1) if workers is None else int(workers)
        _call("hl_bootstrap_many", self.handle, hs.ctypes.data_as(_pll), hs.size, w, outs.ctypes.data_as(_pll))
        return [Ciphertext(self.params, int(h)) for h in outs]

    def prepare_bootstrap(self, workers: int = 1) -> None:
        """Build the bootstrapping evaluator (DFT matrices) and ``workers - 1`` copies now."""
        _call("hl_bootstrap_prepare", self.handle, int(workers))


# ---------------------------------------------------------------- runtime

def go_memory() -> dict[str, int]:
    """Go runtime memory (runtime.MemStats): heap_alloc, heap_inuse, heap_sys, sys, ..."""
    return _call_json("hl_mem_stats")


def free_os_memory() -> None:
    """Run the Go GC and return freed memory to the OS (debug.FreeOSMemory)."""
    _call("hl_free_os_memory")


def set_gc_percent(percent: int) -> int:
    """debug.SetGCPercent; returns the previous value (lower = less memory, more GC)."""
    old = C.c_int()
    _call("hl_set_gc_percent", int(percent), C.byref(old))
    return old.value


def set_memory_limit(limit_bytes: int) -> int:
    """Go's soft memory limit (debug.SetMemoryLimit; a negative value only reads it);
    returns the previous limit.  With GBs of bootstrapping keys live, the default GC
    (GOGC=100) lets garbage grow to the size of the live heap; a limit or a lower
    GC percent (:func:`set_gc_percent`, or the GOGC environment variable) bounds it."""
    old = C.c_longlong()
    _call("hl_set_memory_limit", int(limit_bytes), C.byref(old))
    return old.value


def live_handles() -> int:
    """Objects alive in the Go handle table (for leak checks)."""
    n = C.c_longlong()
    _call("hl_handle_count", C.byref(n))
    return n.value


def version() -> dict[str, Any]:
    return _call_json("hl_version")


def debug_panic() -> None:
    """Make the library panic inside Go; raises LattigoError (tests the recover path)."""
    _call("hl_debug_panic")


def noop(x: int = 0) -> int:
    """A trivial round trip through the library (measures the ctypes call overhead)."""
    out = C.c_longlong()
    _call("hl_noop", int(x), C.byref(out))
    return out.value
