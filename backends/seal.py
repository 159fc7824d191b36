"""Real-encryption executor of an :class:`~hecompiler.heprog.HEProgram` on Microsoft SEAL.

It runs exactly the instructions :mod:`backends.sim` runs (same order, same
plaintext vectors from :class:`~hecompiler.plaintexts.PlaintextFactory`), on
CKKS ciphertexts through the checked wrapper :mod:`backends.seal_ckks`, and
checks the level and the exact scale of every result against the plan.

Roles
-----
* :class:`SealClient` -- the key holder: key generation, ``encrypt_inputs``,
  ``decrypt_outputs``, ``refresh`` (decrypt + re-encrypt at the top level).
* :class:`SealServer` -- the evaluator, built from the public keys only.
  ``run`` executes the whole program with a refresh callback;
  ``run_until_refresh`` is the resumable form for a client and a server that
  are separate commands.
* :func:`run_encrypted` -- both roles in one process, with phase timings.

Levels.  This module uses the program's convention (``level`` = rescales a
ciphertext can still take; fresh = ``params.top_level``).  The wrapper counts
the other way; the conversion is ``seal_level = top_level - level``.

Refresh (client-aided; SEAL has no bootstrapping).  The server sends the
ciphertexts to refresh, the client decrypts each and encrypts it again at the
top level with scale ``2**scale_bits``.  There is no mask: the key holder SEES
these intermediate activations in the clear.  A mask that hides them
statistically would need ~2^40 times their magnitude, which no CKKS level can
hold at the bottom of the chain, and a small mask hides little (uniform noise in
[-1, 1] left the activations readable: correlation 0.28-0.98 on ResNet-20), so
the protocol does not pretend.  Client-aided refresh is for a key holder who may
see the activations (for instance one who also owns the model); the report says so.

Files (for separate client and server commands)
-----------------------------------------------
Key directory (:func:`write_key_dirs` / :func:`read_keys`)::

    keys.json    {"format", "key_set", "params", "primes", "params_fingerprint",
                  "program_sha256", "galois_steps", "relin", "has_secret",
                  "files": {name: sha256}}
    public.key   relin.key (if the program multiplies)   galois.key (if it rotates)
    secret.key   (client directory only)

Every ``*.key`` is the wrapper's ``to_bytes`` envelope (kind, parameter id,
CRC-32, SEAL's own format).  ``keys.json`` binds the keys to one program
(sha256 of its text form, :func:`program_sha256`), one parameter set and one
key set: ``key_set`` is :meth:`KeySet.fingerprint`, the sha256 of public.key.
The client and server directories of one keygen share it.  :func:`client_keygen`
writes both directories all or nothing, under an exclusive lock on each, and
refuses directories that already hold a key set.

Bundle (:class:`Bundle`, used for inputs, refresh requests and responses,
server state and outputs)::

    b"HECBNDL2"                       magic + format version
    uint64 LE  header length H
    H bytes    header, UTF-8 JSON: {"kind", "program_sha256", "key_set",
               "params_fingerprint", "meta", "items": [[name, size], ...]}
    payloads   the items' bytes, in header order
    32 bytes   sha256 of everything above

Item names: ``ct:<value id>`` (a ciphertext, wrapper envelope) and, in a
server state waiting for a refresh, ``req:<value id>`` (the request's ciphertexts).
Every bundle names the key set its ciphertexts are encrypted under; each step
(encrypt, eval, refresh, decrypt) checks it against its key directory and
refuses a mismatch with one line naming the file and both fingerprints, before
writing anything.  Files are written atomically
(:func:`hecompiler.fileio.atomic_write_bytes`).  The state file is the commit
point of ``eval``: it holds the pending request (or the outputs), so an ``eval``
killed after writing it can write them again (:func:`server_reemit`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from hecompiler.costmodel import CostModel, peak_rss_bytes, switching_key_bytes
from hecompiler.errors import HecError
from hecompiler.executor import EvalState, ExecStats, Executor, ExecutionError
from hecompiler.fileio import atomic_write_bytes, atomic_write_text
from hecompiler.heprog import HEProgram, print_program
from hecompiler.runtime import pack_inputs

from .seal_ckks import CkksClient, CkksContext, CkksParams, CkksServer, KeySet, SealError

__all__ = [
    "SealBackendError", "SealStats", "EvalState", "Bundle", "SealClient", "SealServer",
    "run_encrypted", "program_sha256", "params_fingerprint", "make_context",
    "write_keys", "write_key_dirs", "read_keys", "client_keygen", "client_encrypt", "client_refresh",
    "client_decrypt", "server_start", "server_step", "server_reemit", "short",
]

#: relative difference within which a rescaled scale may be relabelled to the planned one
SCALE_RTOL = 1e-9


class SealBackendError(HecError):
    """The SEAL backend refused a program, key set, bundle or run."""


# =========================================================================== fingerprints

def program_sha256(prog: HEProgram) -> str:
    """sha256 (hex) of the program's text form: what keys and bundles are bound to."""
    return hashlib.sha256(print_program(prog).encode("utf-8")).hexdigest()


def params_fingerprint(prog: HEProgram) -> str:
    d = {"params": prog.params.to_dict(), "primes": [int(q) for q in prog.primes]}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def make_context(prog: HEProgram) -> CkksContext:
    """The SEAL context of ``prog.params``; its data primes must be ``prog.primes``."""
    p = prog.params
    try:
        ctx = CkksContext(CkksParams(p.poly_degree, tuple(p.coeff_bits), p.security))
    except (SealError, ValueError) as e:
        raise SealBackendError(f"program parameters rejected by SEAL: {e}") from None
    got = tuple(int(q) for q in ctx.primes_at(0))
    want = tuple(int(q) for q in prog.primes)
    if got != want:
        diff = [i for i in range(max(len(got), len(want)))
                if i >= len(got) or i >= len(want) or got[i] != want[i]]
        raise SealBackendError(
            f"the program's primes differ from SEAL's for poly_degree={p.poly_degree}, "
            f"coeff_bits={list(p.coeff_bits)}: first difference at q_{diff[0]} "
            f"(program {want[diff[0]] if diff[0] < len(want) else 'none'}, "
            f"SEAL {got[diff[0]] if diff[0] < len(got) else 'none'}); the program was planned for "
            "another modulus chain")
    return ctx


_peak_rss_bytes = peak_rss_bytes


# =========================================================================== primitives

#: statistics of a SEAL run (the executor's)
SealStats = ExecStats


def _guarded(fn):
    def call(self, *a, **kw):
        try:
            return fn(self, *a, **kw)
        except SealError as e:  # the wrapper's one-line message, as one of ours
            raise SealBackendError(f"SEAL: {e}") from None
    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


class SealPrimitives:
    """The executor's primitives on SEAL ciphertexts (evaluation keys only).  SEAL counts
    levels the other way (``seal_level = top_level - level``); refreshes go to the key holder."""

    name = "SEAL"
    refresh_kind = "client"
    bootstraps = False

    def __init__(self, prog: HEProgram, keys: KeySet):
        self.ctx = keys.ctx
        self.keys = keys
        self.top = prog.params.top_level
        self._s = CkksServer(self.ctx, keys)

    @_guarded
    def meta(self, ct):
        return self.top - self.ctx.level_of(ct), float(ct.scale)

    @_guarded
    def set_scale(self, ct, scale):
        self._s.set_scale(ct, scale)
        return ct

    @_guarded
    def encode(self, vec, scale, level):
        return self._s.encode(vec, scale, self.top - level)

    @_guarded
    def encode_scalar(self, value, scale, level):
        return self._s.encode_constant(value, scale, self.top - level)

    @_guarded
    def rotate(self, ct, step):
        return self._s.rotate(ct, step)

    @_guarded
    def add(self, a, b):
        return self._s.add(a, b)

    @_guarded
    def sub(self, a, b):
        return self._s.sub(a, b)

    @_guarded
    def negate(self, a):
        return self._s.negate(a)

    @_guarded
    def add_plain(self, ct, pt):
        return self._s.add_plain(ct, pt)

    @_guarded
    def mul_plain(self, ct, pt):
        return self._s.multiply_plain(ct, pt)

    @_guarded
    def mul(self, a, b):
        return self._s.relinearize(self._s.multiply(a, b))

    @_guarded
    def rescale(self, ct):
        return self._s.rescale(ct)

    @_guarded
    def mod_switch(self, ct, level):
        return self._s.mod_switch(ct, self.top - level)

    @_guarded
    def zero(self, level, scale):
        """A fresh public-key encryption of zero at ``level`` with ``scale`` (SEAL refuses products
        with an all-zero plaintext; the executor asks for this instead)."""
        import tenseal.sealapi as sealapi

        enc = sealapi.Encryptor(self.ctx.seal, self.keys.public_key)
        ct = sealapi.Ciphertext(self.ctx.seal)
        enc.encrypt_zero(self.ctx.parms_id_at(self.top - level), ct)
        ct.scale = scale
        return ct


# =========================================================================== client

class SealClient:
    """Holds the secret key: key generation, encryption, decryption, refresh."""

    def __init__(self, prog: HEProgram, keys: KeySet):
        if keys.secret_key is None:
            raise SealBackendError("SealClient: the key set has no secret key")
        self.prog = prog
        self.ctx = keys.ctx
        self.keys = keys
        self._c = CkksClient(self.ctx, keys)

    @classmethod
    def create(cls, prog: HEProgram) -> "SealClient":
        """New keys for ``prog``: public, relin (if it multiplies), Galois for its rotations only."""
        ctx = make_context(prog)
        keys = KeySet.generate(ctx, galois_steps=prog.galois_steps, relin=prog.needs_relin)
        return cls(prog, keys)

    def public_keys(self) -> KeySet:
        """The evaluation keys for a server (no secret key)."""
        return self.keys.without_secret()

    def encrypt_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[int, Any]:
        try:
            packed = pack_inputs(self.prog, inputs)
        except HecError as e:
            raise SealBackendError(str(e)) from None
        return {v: self._c.encrypt(row, self.prog.params.scale, 0) for v, row in packed.items()}

    def decrypt_outputs(self, cts: Mapping[int, Any]) -> dict[str, np.ndarray]:
        prog = self.prog
        outs = {}
        for io in prog.outputs:
            missing = [v for v in io.values if v not in cts]
            if missing:
                raise SealBackendError(f"output {io.name!r}: ciphertext(s) {['%' + str(v) for v in missing]} missing")
            lay = prog.layouts[io.layout]
            packed = np.stack([self._c.decrypt(cts[v])[: lay.slots] for v in io.values])
            outs[io.name] = (lay.unpack(packed) * io.alpha).reshape(io.shape)
        return outs

    def refresh(self, ct: Any) -> Any:
        """Decrypt and encrypt again at the top level with scale 2**scale_bits (the key holder
        sees this intermediate value: client-aided refresh is not private against it)."""
        return self._c.reencrypt(ct, scale=self.prog.params.scale, level=0)


# =========================================================================== server

class SealServer:
    """Evaluates the program with the public evaluation keys only, on the shared
    :class:`~hecompiler.executor.Executor` (client-aided refreshes suspend the evaluation)."""

    def __init__(self, prog: HEProgram, keys: KeySet, cost: CostModel | None = None):
        if keys.secret_key is not None:
            raise SealBackendError("SealServer: refusing a key set that contains the secret key; "
                                   "give the server SealClient.public_keys()")
        ctx = keys.ctx
        got = tuple(int(q) for q in ctx.primes_at(0))
        if got != tuple(int(q) for q in prog.primes):
            raise SealBackendError("SealServer: the keys' modulus chain differs from the program's primes")
        missing = [k for k in prog.galois_steps if not keys.has_rotation(k)]
        if missing:
            raise SealBackendError(f"SealServer: no Galois key for rotation step(s) {missing[:8]} the program uses")
        if prog.needs_relin and keys.relin_keys is None:
            raise SealBackendError("SealServer: the program multiplies ciphertexts but there is no relin key")
        self.prog = prog
        self.ctx = ctx
        self.keys = keys
        self.top = prog.params.top_level
        self.prim = SealPrimitives(prog, keys)
        self.ex = Executor(prog, self.prim, cost)
        n_keys = len(keys.rotation_steps())
        self._key_stats = {
            "galois_keys": n_keys,
            "galois_key_bytes": n_keys * switching_key_bytes(prog.params.poly_degree, self.top + 1),
            "relin_key_bytes": (switching_key_bytes(prog.params.poly_degree, self.top + 1)
                                if keys.relin_keys is not None else 0),
        }

    @property
    def has_secret_key(self) -> bool:
        return self.keys.secret_key is not None or self.prim._s.keys.secret_key is not None

    def start(self, cts: Mapping[int, Any]) -> EvalState:
        """Initial state from the encrypted inputs (value id -> Ciphertext)."""
        try:
            st = self.ex.start(cts)
        except ExecutionError as e:
            raise SealBackendError(str(e)) from None
        st.stats.__dict__.update(self._key_stats)
        return st

    def run_until_refresh(self, state: EvalState, response: Mapping[int, Any] | None = None,
                          progress: Callable[[int], Any] | None = None,
                          request_id: str | None = None) -> EvalState:
        """Continue from ``state`` until the end of the program or the next refresh(es) (see
        :meth:`hecompiler.executor.Executor.run`)."""
        try:
            return self.ex.run(state, response, progress, request_id)
        except ExecutionError as e:
            raise SealBackendError(str(e)) from None

    def outputs(self, state: EvalState) -> dict[int, Any]:
        try:
            return self.ex.outputs(state)
        except ExecutionError as e:
            raise SealBackendError(str(e)) from None

    def run(self, cts: Mapping[int, Any], refresh_fn: Callable[[Any], Any],
            progress: Callable[[int], Any] | None = None) -> tuple[dict[int, Any], SealStats]:
        """Execute the whole program; ``refresh_fn(ct) -> fresh ct`` is the client."""
        state = self.start(cts)
        try:
            out = self.ex.run_all_from(state, refresh_fn, progress)
        except ExecutionError as e:
            raise SealBackendError(str(e)) from None
        return out, state.stats


# =========================================================================== one process

def run_encrypted(prog: HEProgram, inputs: Mapping[str, np.ndarray],
                  progress: Callable[[int], Any] | None = None) -> tuple[dict[str, np.ndarray], SealStats]:
    """Keygen, encrypt, evaluate (client-aided refreshes), decrypt; timings in ``stats.phases``."""
    t0 = time.perf_counter()
    client = SealClient.create(prog)
    server = SealServer(prog, client.public_keys())
    t1 = time.perf_counter()
    cts = client.encrypt_inputs(inputs)
    t2 = time.perf_counter()
    out_cts, stats = server.run(cts, client.refresh, progress)
    del cts
    t3 = time.perf_counter()
    outs = client.decrypt_outputs(out_cts)
    t4 = time.perf_counter()
    stats.phases = {"keygen": t1 - t0, "encrypt": t2 - t1, "eval": t3 - t2, "decrypt": t4 - t3, "total": t4 - t0}
    stats.peak_rss_bytes = max(stats.peak_rss_bytes, _peak_rss_bytes())
    return outs, stats


# =========================================================================== key directories

_KEY_FILES = {"public_key": "public.key", "relin_keys": "relin.key", "galois_keys": "galois.key",
              "secret_key": "secret.key"}
KEYS_FORMAT = 2


def short(fingerprint: str) -> str:
    """How a key-set fingerprint is shown to users: its first 16 hex digits."""
    return str(fingerprint)[:16]


def _key_dir_files(prog: HEProgram, keys: KeySet, include_secret: bool) -> dict[str, bytes]:
    """The files of a key directory, ``keys.json`` last: serialized in memory before any is written."""
    if include_secret and keys.secret_key is None:
        raise SealBackendError("write_keys: include_secret=True but the key set has no secret key")
    out: dict[str, bytes] = {}
    for name, data in keys.to_bytes_dict(include_secret=include_secret).items():
        out[_KEY_FILES[name]] = data
    meta = {"format": KEYS_FORMAT, "key_set": hashlib.sha256(out["public.key"]).hexdigest(),
            "params": prog.params.to_dict(), "primes": [int(q) for q in prog.primes],
            "params_fingerprint": params_fingerprint(prog), "program_sha256": program_sha256(prog),
            "galois_steps": list(prog.galois_steps), "relin": keys.relin_keys is not None,
            "has_secret": "secret.key" in out, "files": {fn: hashlib.sha256(b).hexdigest() for fn, b in out.items()}}
    if meta["key_set"] != keys.fingerprint():
        raise SealBackendError("write_keys: the public key does not serialize to its fingerprint")
    out["keys.json"] = (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()
    return out


class _LockedKeyDir:
    """A key directory being written: created if missing (0700), locked exclusively
    (``flock`` on the directory itself, so nothing is left behind), refused if it
    already holds a key set.  ``write`` writes the files; on failure ``rollback``
    removes what this writer wrote."""

    def __init__(self, path: str | os.PathLike, role: str):
        import fcntl

        self.path = Path(path)
        self.role = role
        self.written: list[Path] = []
        self.created = not self.path.exists()
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise SealBackendError(f"{path}: cannot create the {role} key directory: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise SealBackendError(f"{path}: another keygen is writing this {role} key directory; "
                                   "wait for it or use another directory") from None
        if role == "server" and (self.path / "secret.key").exists():
            self.close()
            raise SealBackendError(f"{path}: holds a secret.key; refusing to write server keys there "
                                   "(use a separate directory for the server)")
        if (self.path / "keys.json").exists():
            self.close()
            fp = _peek_key_set(self.path)
            raise SealBackendError(f"{path}: already holds key set {short(fp)}; keygen never replaces keys "
                                   "(ciphertexts under them could not be decrypted again): remove the directory "
                                   "or choose another")

    def write(self, files: Mapping[str, bytes]) -> None:
        for fn, data in files.items():
            target = self.path / fn
            atomic_write_bytes(target, data, mode=0o600 if fn == "secret.key" else None)
            self.written.append(target)

    def rollback(self) -> None:
        for f in self.written:
            with contextlib.suppress(OSError):
                f.unlink()
        if self.created:
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _peek_key_set(d: Path) -> str:
    try:
        return str(json.loads((d / "keys.json").read_text()).get("key_set", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def write_key_dirs(prog: HEProgram, keys: KeySet, client_dir: str | os.PathLike,
                   server_dir: str | os.PathLike | None) -> None:
    """Write the client directory (secret + public key) and the server directory (public,
    relin, Galois keys; never the secret key) all or nothing: every file is serialized first,
    both directories are locked, ``keys.json`` (what makes a directory a key directory) is
    written last, and any failure removes everything this call wrote."""
    plan = [(client_dir, "client", _key_dir_files(prog, KeySet(keys.ctx, keys.secret_key, keys.public_key),
                                                   include_secret=True))]
    if server_dir is not None:
        if Path(client_dir).resolve() == Path(server_dir).resolve():
            raise SealBackendError("client and server key directories must differ (the server must not get "
                                   "secret.key)")
        plan.append((server_dir, "server", _key_dir_files(prog, keys.without_secret(), include_secret=False)))
    dirs: list[_LockedKeyDir] = []
    try:
        for path, role, _ in plan:
            dirs.append(_LockedKeyDir(path, role))
        for d, (_, _, files) in zip(dirs, plan):
            d.write({fn: b for fn, b in files.items() if fn != "keys.json"})
        for d, (_, _, files) in zip(dirs, plan):
            d.write({"keys.json": files["keys.json"]})
    except BaseException:
        for d in dirs:
            d.rollback()
        raise
    finally:
        for d in dirs:
            d.close()


def write_keys(prog: HEProgram, keys: KeySet, keys_dir: str | os.PathLike, include_secret: bool) -> None:
    """Write one key directory (see :func:`write_key_dirs`): the secret key only with
    ``include_secret``; a directory that already holds keys, or a secret.key for a server
    directory, is refused."""
    d = _LockedKeyDir(keys_dir, "client" if include_secret else "server")
    try:
        d.write(_key_dir_files(prog, keys, include_secret))
    except BaseException:
        d.rollback()
        raise
    finally:
        d.close()


def read_keys(prog: HEProgram, keys_dir: str | os.PathLike, secret: bool, evaluation: bool = True) -> KeySet:
    """Load the key set in ``keys_dir`` for ``prog``; with ``secret`` the secret key is required,
    without it secret.key is never read, and a directory holding one is refused for evaluation (the
    server must not be handed the client's directory).  ``evaluation=False`` skips the relin and
    Galois keys (the client does not need them).  Keys made for another program or other parameters
    are refused.  The returned key set's :meth:`KeySet.fingerprint` is the directory's key set."""
    d = Path(keys_dir)
    mpath = d / "keys.json"
    if not d.is_dir():
        raise SealBackendError(f"{d}: no such key directory")
    try:
        meta = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise SealBackendError(f"{d}: not a key directory (no keys.json; an interrupted keygen leaves none)") from None
    except (OSError, ValueError) as e:
        raise SealBackendError(f"{mpath}: unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != KEYS_FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else meta
        raise SealBackendError(f"{mpath}: key directory format {fmt!r}, expected {KEYS_FORMAT}"
                               + (" (made by an older hecompiler: run keygen again)" if fmt == 1 else ""))
    if meta.get("params_fingerprint") != params_fingerprint(prog):
        raise SealBackendError(f"{d}: the keys were made for other encryption parameters "
                               f"({meta.get('params')}) than the program's ({prog.params.to_dict()})")
    if meta.get("program_sha256") != program_sha256(prog):
        raise SealBackendError(f"{d}: the keys were made for another program (program sha256 "
                               f"{str(meta.get('program_sha256'))[:16]}..., this program "
                               f"{program_sha256(prog)[:16]}...)")
    if not secret and evaluation and (meta.get("has_secret") or (d / "secret.key").exists()):
        raise SealBackendError(f"{d}: holds the secret key; the server gets the server key directory, never "
                               "the client's")
    ctx = make_context(prog)
    files = meta.get("files", {})
    blobs = {}
    for name, fn in _KEY_FILES.items():
        if (name == "secret_key" and not secret) or (name in ("relin_keys", "galois_keys") and not evaluation):
            continue
        if fn not in files:
            continue
        try:
            data = (d / fn).read_bytes()
        except OSError as e:
            raise SealBackendError(f"{d / fn}: {e.strerror or e}") from None
        if hashlib.sha256(data).hexdigest() != files[fn]:
            raise SealBackendError(f"{d / fn}: corrupt or replaced (sha256 does not match keys.json)")
        blobs[name] = data
    if secret and "secret_key" not in blobs:
        raise SealBackendError(f"{d}: no secret.key (this is a server key directory)")
    if "public_key" not in blobs:
        raise SealBackendError(f"{d}: no public.key")
    fp = hashlib.sha256(blobs["public_key"]).hexdigest()
    if meta.get("key_set") != fp:
        raise SealBackendError(f"{d}: keys.json names key set {short(meta.get('key_set', ''))} but public.key is "
                               f"key set {short(fp)}")
    try:
        keys = KeySet.from_bytes_dict(ctx, blobs)
    except SealError as e:
        raise SealBackendError(f"{d}: {e}") from None
    keys._fingerprint = fp
    if secret:
        _check_key_pair(keys, d)
    return keys


def _check_key_pair(keys: KeySet, d: Path) -> None:
    """The secret key belongs to the public key: an encryption of zero under the public key
    decrypts to (almost) zero with the secret key; with another secret key it decrypts to noise
    of the size of the modulus."""
    client = CkksClient(keys.ctx, keys)
    ct = client.encrypt(np.zeros(keys.ctx.slot_count), 2.0 ** 20, 0)
    if not float(np.abs(client.decrypt(ct)).max()) < 1.0:
        raise SealBackendError(f"{d}: secret.key does not belong to public.key (key set {short(keys.fingerprint())}): "
                               "the directory mixes two key sets")


# =========================================================================== bundles

_MAGIC = b"HECBNDL2"
_OLD_MAGICS = (b"HECBNDL1",)
_KINDS = ("inputs", "request", "response", "state", "outputs")


@dataclass
class Bundle:
    """A file of serialized ciphertexts with a JSON header; see module doc.  ``source`` (not
    stored) is where it was read from, for messages."""

    kind: str
    program_sha256: str
    params_fingerprint: str
    key_set: str
    meta: dict = field(default_factory=dict)
    items: dict[str, bytes] = field(default_factory=dict)
    source: str = field(default="", compare=False)

    def to_bytes(self) -> bytes:
        head = json.dumps({"kind": self.kind, "program_sha256": self.program_sha256, "key_set": self.key_set,
                           "params_fingerprint": self.params_fingerprint, "meta": self.meta,
                           "items": [[n, len(b)] for n, b in self.items.items()]},
                          sort_keys=True).encode("utf-8")
        body = b"".join([_MAGIC, struct.pack("<Q", len(head)), head, *self.items.values()])
        return body + hashlib.sha256(body).digest()

    @staticmethod
    def from_bytes(data: bytes, source: str = "<bundle>") -> "Bundle":
        data = bytes(data)
        if data[:8] in _OLD_MAGICS:
            raise SealBackendError(f"{source}: a bundle of an older hecompiler (not bound to a key set); "
                                   "encrypt again")
        if data[:8] != _MAGIC:
            raise SealBackendError(f"{source}: not a ciphertext bundle (bad magic)")
        if len(data) < 8 + 8 + 32:
            raise SealBackendError(f"{source}: truncated ({len(data)} bytes)")
        body, digest = data[:-32], data[-32:]
        if hashlib.sha256(body).digest() != digest:
            raise SealBackendError(f"{source}: corrupt or truncated (sha256 mismatch)")
        (hlen,) = struct.unpack_from("<Q", body, 8)
        if 16 + hlen > len(body):
            raise SealBackendError(f"{source}: corrupt header length {hlen}")
        try:
            head = json.loads(body[16:16 + hlen].decode("utf-8"))
            kind, items, key_set = head["kind"], head["items"], str(head["key_set"])
            psha, pfp, meta = head["program_sha256"], head["params_fingerprint"], head["meta"]
        except (ValueError, KeyError, TypeError) as e:
            raise SealBackendError(f"{source}: corrupt header: {e}") from None
        if kind not in _KINDS:
            raise SealBackendError(f"{source}: unknown bundle kind {kind!r}")
        off = 16 + hlen
        out: dict[str, bytes] = {}
        for name, size in items:
            if size < 0 or off + size > len(body):
                raise SealBackendError(f"{source}: item {name!r} runs past the end")
            out[str(name)] = body[off:off + size]
            off += size
        if off != len(body):
            raise SealBackendError(f"{source}: {len(body) - off} trailing bytes")
        return Bundle(kind, psha, pfp, key_set, meta, out, source)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @staticmethod
    def load(path: str | os.PathLike) -> "Bundle":
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise SealBackendError(f"{path}: {e.strerror or e}") from None
        return Bundle.from_bytes(data, str(path))


def _as_bundle(b: "Bundle | str | os.PathLike") -> Bundle:
    return b if isinstance(b, Bundle) else Bundle.load(b)


def _new_bundle(prog: HEProgram, kind: str, keys: KeySet, meta: dict | None = None) -> Bundle:
    return Bundle(kind, program_sha256(prog), params_fingerprint(prog), keys.fingerprint(), dict(meta or {}))


def _check_bundle(b: Bundle, prog: HEProgram, kind: str, keys: KeySet, keys_dir: str | os.PathLike | None) -> None:
    """``b`` is a ``kind`` bundle of ``prog`` under the key set ``keys`` (read from ``keys_dir``)."""
    src = b.source or f"the {b.kind} bundle"
    if b.kind != kind:
        raise SealBackendError(f"{src}: expected a {kind} bundle, got a {b.kind} bundle")
    if b.params_fingerprint != params_fingerprint(prog):
        raise SealBackendError(f"{src}: the {kind} bundle was made for other encryption parameters")
    if b.program_sha256 != program_sha256(prog):
        raise SealBackendError(f"{src}: the {kind} bundle was made for another program")
    if b.key_set != keys.fingerprint():
        where = f"{keys_dir} holds" if keys_dir is not None else "these keys are"
        raise SealBackendError(f"{src}: encrypted under key set {short(b.key_set)}, but {where} key set "
                               f"{short(keys.fingerprint())}: wrong keys")


def _put_cts(b: Bundle, ctx: CkksContext, cts: Mapping[int, Any], prefix: str = "ct:") -> None:
    for v, ct in cts.items():
        b.items[f"{prefix}{int(v)}"] = ctx.to_bytes(ct)


def _get_cts(b: Bundle, ctx: CkksContext, prefix: str = "ct:") -> dict[int, Any]:
    out = {}
    for name, data in b.items.items():
        if name.startswith(prefix):
            try:
                out[int(name[len(prefix):])] = ctx.from_bytes("ciphertext", data)
            except (SealError, ValueError) as e:
                raise SealBackendError(f"{b.source or b.kind + ' bundle'}, ciphertext {name}: {e}") from None
    return out


def state_to_bundle(prog: HEProgram, keys: KeySet, st: EvalState) -> Bundle:
    """Server-side state file: the live ciphertexts and the pending request."""
    b = _new_bundle(prog, "state", keys, {"pc": st.pc, "pending": st.pending, "request_id": st.request_id,
                                          "request": sorted(st.request), "stats": st.stats.to_dict()})
    _put_cts(b, keys.ctx, st.live)
    _put_cts(b, keys.ctx, st.request, "req:")
    return b


def state_from_bundle(prog: HEProgram, keys: KeySet, b: Bundle, keys_dir=None) -> EvalState:
    _check_bundle(b, prog, "state", keys, keys_dir)
    m = b.meta
    try:
        st = EvalState(pc=int(m["pc"]), pending=[int(k) for k in m["pending"]], request_id=str(m["request_id"]),
                       stats=SealStats.from_dict(m["stats"]))
    except (KeyError, TypeError, ValueError) as e:
        raise SealBackendError(f"{b.source or 'state bundle'}: corrupt state: {e}") from None
    st.live = _get_cts(b, keys.ctx)
    st.request = _get_cts(b, keys.ctx, "req:")
    if len(st.pending) != len(st.request):
        raise SealBackendError(f"{b.source or 'state bundle'}: inconsistent pending refreshes")
    return st


# =========================================================================== file-level flow

def client_keygen(prog: HEProgram, client_dir: str | os.PathLike,
                  server_dir: str | os.PathLike) -> SealClient:
    """Generate keys for ``prog``: secret + public key into ``client_dir`` (all the client needs),
    public + relin + Galois keys into ``server_dir`` (never the secret key); all or nothing."""
    if Path(client_dir).resolve() == Path(server_dir).resolve():
        raise SealBackendError("client and server key directories must differ (the server must not get secret.key)")
    client = SealClient.create(prog)
    write_key_dirs(prog, client.keys, client_dir, server_dir)
    return client


def _client(prog: HEProgram, keys_dir) -> SealClient:
    return SealClient(prog, read_keys(prog, keys_dir, secret=True, evaluation=False))


def client_encrypt(prog: HEProgram, keys_dir: str | os.PathLike, inputs: Mapping[str, np.ndarray]) -> Bundle:
    client = _client(prog, keys_dir)
    b = _new_bundle(prog, "inputs", client.keys)
    _put_cts(b, client.ctx, client.encrypt_inputs(inputs))
    return b


def client_refresh(prog: HEProgram, keys_dir: str | os.PathLike, request: "Bundle | str | os.PathLike") -> Bundle:
    """Answer a refresh request: decrypt each ciphertext and encrypt it again at the top level."""
    req = _as_bundle(request)
    client = _client(prog, keys_dir)
    _check_bundle(req, prog, "request", client.keys, keys_dir)
    cts = _get_cts(req, client.ctx)
    resp = _new_bundle(prog, "response", client.keys, {"request_id": req.meta.get("request_id", "")})
    _put_cts(resp, client.ctx, {v: client.refresh(ct) for v, ct in cts.items()})
    return resp


def client_decrypt(prog: HEProgram, keys_dir: str | os.PathLike,
                   outputs: "Bundle | str | os.PathLike") -> dict[str, np.ndarray]:
    b = _as_bundle(outputs)
    client = _client(prog, keys_dir)
    _check_bundle(b, prog, "outputs", client.keys, keys_dir)
    return client.decrypt_outputs(_get_cts(b, client.ctx))


def _server(prog: HEProgram, keys_dir) -> SealServer:
    return SealServer(prog, read_keys(prog, keys_dir, secret=False))


def server_start(prog: HEProgram, keys_dir: str | os.PathLike, input_bundle: "Bundle | str | os.PathLike") -> Bundle:
    """Initial server state (a ``state`` bundle) from an ``inputs`` bundle."""
    b = _as_bundle(input_bundle)
    server = _server(prog, keys_dir)
    _check_bundle(b, prog, "inputs", server.keys, keys_dir)
    st = server.start(_get_cts(b, server.ctx))
    return state_to_bundle(prog, server.keys, st)


def _emit(prog: HEProgram, server: SealServer, st: EvalState) -> tuple[Bundle | None, Bundle | None]:
    """What a state has for the client: ``(request, None)`` while it waits, ``(None, outputs)`` at the end."""
    if st.pending:
        req = _new_bundle(prog, "request", server.keys, {"request_id": st.request_id})
        _put_cts(req, server.ctx, st.request)
        return req, None
    outs = _new_bundle(prog, "outputs", server.keys, {"stats": st.stats.to_dict()})
    _put_cts(outs, server.ctx, server.outputs(st))
    return None, outs


def server_step(prog: HEProgram, keys_dir: str | os.PathLike, state: "Bundle | str | os.PathLike",
                response: "Bundle | str | os.PathLike | None" = None,
                progress: Callable[[int], Any] | None = None) -> tuple[Bundle, Bundle | None, Bundle | None]:
    """Continue the evaluation: returns ``(state, request, None)`` when the client must refresh
    (send ``request``, call again with its response), or ``(state, None, outputs)`` at the end.
    Save the state first: it is the commit point (:func:`server_reemit` rebuilds the rest)."""
    server = _server(prog, keys_dir)
    st = state_from_bundle(prog, server.keys, _as_bundle(state), keys_dir)
    resp_cts = rid = None
    if response is not None:
        rb = _as_bundle(response)
        _check_bundle(rb, prog, "response", server.keys, keys_dir)
        rid = str(rb.meta.get("request_id", ""))
        resp_cts = _get_cts(rb, server.ctx)
    server.run_until_refresh(st, resp_cts, progress=progress, request_id=rid)
    req, outs = _emit(prog, server, st)
    return state_to_bundle(prog, server.keys, st), req, outs


def server_reemit(prog: HEProgram, keys_dir: str | os.PathLike,
                  state: "Bundle | str | os.PathLike") -> tuple[Bundle | None, Bundle | None]:
    """The request (or the outputs) of a saved state, again: an ``eval`` interrupted after it
    saved its state loses nothing."""
    server = _server(prog, keys_dir)
    st = state_from_bundle(prog, server.keys, _as_bundle(state), keys_dir)
    if not st.pending and not st.done(prog):
        raise SealBackendError(f"{state}: the evaluation neither waits for a refresh nor is finished "
                               f"(next instruction {st.pc}): give --response")
    return _emit(prog, server, st)
