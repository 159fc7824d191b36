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
The key directories, bundles and steps are :mod:`backends.protocol`'s, shared with the
other encrypted backends.  A SEAL key directory holds ``keys.json`` (see protocol), and
``public.key``, ``relin.key`` (if the program multiplies), ``galois.key`` (if it rotates),
``secret.key`` (client directory only): each the wrapper's ``to_bytes`` envelope (kind,
parameter id, CRC-32, SEAL's own format).  Ciphertexts in bundles use the same envelope.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from hecompiler.costmodel import CostModel, peak_rss_bytes, switching_key_bytes
from hecompiler.errors import HecError
from hecompiler.executor import EvalState, ExecStats, Executor, ExecutionError
from hecompiler.heprog import HEProgram
from hecompiler.runtime import pack_inputs

from . import protocol as P
from .protocol import (BackendError, Bundle, LockedKeyDir, keys_json, params_fingerprint, program_sha256,
                       read_keys_json, short)
from .seal_ckks import CkksClient, CkksContext, CkksParams, CkksServer, KeySet, SealError

__all__ = [
    "SealBackendError", "SealStats", "EvalState", "Bundle", "SealClient", "SealServer",
    "run_encrypted", "program_sha256", "params_fingerprint", "make_context",
    "write_keys", "write_key_dirs", "read_keys", "client_keygen", "client_encrypt", "client_refresh",
    "client_decrypt", "server_start", "server_step", "server_reemit", "short",
]

#: relative difference within which a rescaled scale may be relabelled to the planned one
SCALE_RTOL = 1e-9


class SealBackendError(BackendError):
    """The SEAL backend refused a program, key set, bundle or run."""


# =========================================================================== fingerprints

def make_context(prog: HEProgram) -> CkksContext:
    """The SEAL context of ``prog.params``; its data primes must be ``prog.primes``."""
    p = prog.params
    if p.log_slots is not None:
        raise SealBackendError(f"the program packs its ciphertexts sparsely ({p.slots} of the {p.poly_degree // 2} "
                               f"slots, for a cheaper bootstrap): SEAL runs full ciphertexts only; run it with the "
                               f"backend it was compiled for (hecompile inspect shows the target)")
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


class SealEncoder:
    """Encoding only, with no keys: a server makes a program's plaintexts with it before any key set
    arrives (:meth:`hecompiler.executor.Executor.warm`); they are valid under every key set of the
    program's parameters (SEAL checks the parameter id).  :class:`SealPrimitives` encodes the same
    way, with its key set's context."""

    name = "SEAL"

    def __init__(self, prog: HEProgram):
        self.ctx = make_context(prog)
        self.top = prog.params.top_level

    @_guarded
    def encode(self, vec, scale, level):
        return self.ctx.encode(vec, scale, self.top - level)

    @_guarded
    def encode_scalar(self, value, scale, level):
        return self.ctx.encode_constant(value, scale, self.top - level)


class SealPrimitives(SealEncoder):
    """The executor's primitives on SEAL ciphertexts (evaluation keys only).  SEAL counts
    levels the other way (``seal_level = top_level - level``); refreshes go to the key holder."""

    name = "SEAL"
    refresh_kind = "client"
    bootstraps = False
    #: the executor may fork helper processes that share its large linear ops (hecompiler.parallel):
    #: tenseal holds the interpreter lock while it works, and SEAL starts no threads of its own
    forks = True

    def __init__(self, prog: HEProgram, keys: KeySet):
        self.ctx = keys.ctx
        self.keys = keys
        self.top = prog.params.top_level
        self._s = CkksServer(self.ctx, keys)

    @_guarded
    def meta(self, ct):
        return self.top - self.ctx.level_of(ct), float(ct.scale)

    @_guarded
    def to_bytes(self, ct):
        return self.ctx.to_bytes(ct)

    @_guarded
    def from_bytes(self, data):
        """A ciphertext from :meth:`to_bytes`, checked (parameters, checksum, SEAL's validity)."""
        return self.ctx.from_bytes("ciphertext", data)

    @_guarded
    def copy(self, ct):
        return self._s.copy(ct)

    @_guarded
    def set_scale(self, ct, scale):
        self._s.set_scale(ct, scale)
        return ct

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
    def mul_plain_acc(self, acc, ct, pt):
        """acc += ct * pt in place (the executor passes a linear op's own accumulator)."""
        return self._s.multiply_plain_accumulate(acc, ct, pt)

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


def plaintext_encoder(prog: HEProgram) -> SealEncoder:
    return SealEncoder(prog)


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

    @property
    def key_set(self) -> str:
        return self.keys.fingerprint()

    def ct_to_bytes(self, ct: Any) -> bytes:
        return self.ctx.to_bytes(ct)

    def ct_from_bytes(self, data: bytes) -> Any:
        try:
            return self.ctx.from_bytes("ciphertext", data)
        except SealError as e:
            raise SealBackendError(str(e)) from None

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

    def __init__(self, prog: HEProgram, keys: KeySet, cost: CostModel | None = None,
                 processes: int | None = None):
        """``processes``: how many share the large linear ops (hecompiler.parallel; default
        ``$HECOMPILER_PROCESSES`` or one per core)."""
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
        self.ex = Executor(prog, self.prim, cost, processes=processes)
        n_keys = len(keys.rotation_steps())
        self._key_stats = {
            "galois_keys": n_keys,
            "galois_key_bytes": n_keys * switching_key_bytes(prog.params.poly_degree, self.top + 1),
            "relin_key_bytes": (switching_key_bytes(prog.params.poly_degree, self.top + 1)
                                if keys.relin_keys is not None else 0),
        }

    @property
    def key_set(self) -> str:
        return self.keys.fingerprint()

    def close(self) -> None:
        """Stop the helper processes, if the evaluation forked any (they also stop with this process)."""
        self.ex.close()

    def ct_to_bytes(self, ct: Any) -> bytes:
        return self.ctx.to_bytes(ct)

    def ct_from_bytes(self, data: bytes) -> Any:
        try:
            return self.ctx.from_bytes("ciphertext", data)
        except SealError as e:
            raise SealBackendError(str(e)) from None

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
                  progress: Callable[[int], Any] | None = None, meta=None) -> tuple[dict[str, np.ndarray], SealStats]:
    """Keygen, encrypt, evaluate (client-aided refreshes), decrypt; timings in ``stats.phases``."""
    t0 = time.perf_counter()
    client = SealClient.create(prog)
    server = SealServer(prog, client.public_keys())
    t1 = time.perf_counter()
    cts = client.encrypt_inputs(inputs)
    t2 = time.perf_counter()
    try:
        out_cts, stats = server.run(cts, client.refresh, progress)
    finally:
        server.close()
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


def _key_dir_files(prog: HEProgram, keys: KeySet, include_secret: bool) -> dict[str, bytes]:
    """The files of a key directory, ``keys.json`` last: serialized in memory before any is written."""
    if include_secret and keys.secret_key is None:
        raise SealBackendError("write_keys: include_secret=True but the key set has no secret key")
    out: dict[str, bytes] = {}
    for name, data in keys.to_bytes_dict(include_secret=include_secret).items():
        out[_KEY_FILES[name]] = data
    fp = hashlib.sha256(out["public.key"]).hexdigest()
    if fp != keys.fingerprint():
        raise SealBackendError("write_keys: the public key does not serialize to its fingerprint")
    out["keys.json"] = keys_json(prog, "seal", fp, out, "secret.key" in out, {"relin": keys.relin_keys is not None})
    return out


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
    dirs: list[LockedKeyDir] = []
    try:
        for path, role, _ in plan:
            dirs.append(LockedKeyDir(path, role))
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
    d = LockedKeyDir(keys_dir, "client" if include_secret else "server")
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
    meta = read_keys_json(prog, d, "seal", secret, evaluation)
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


# =========================================================================== file-level flow (protocol.py)

def client_keygen(prog: HEProgram, client_dir: str | os.PathLike,
                  server_dir: str | os.PathLike, meta=None) -> SealClient:
    """Generate keys for ``prog``: secret + public key into ``client_dir`` (all the client needs),
    public + relin + Galois keys into ``server_dir`` (never the secret key); all or nothing."""
    if Path(client_dir).resolve() == Path(server_dir).resolve():
        raise SealBackendError("client and server key directories must differ (the server must not get secret.key)")
    client = SealClient.create(prog)
    write_key_dirs(prog, client.keys, client_dir, server_dir)
    return client


def open_client(prog: HEProgram, keys_dir: str | os.PathLike, meta=None) -> SealClient:
    return SealClient(prog, read_keys(prog, keys_dir, secret=True, evaluation=False))


def open_server(prog: HEProgram, keys_dir: str | os.PathLike, meta=None) -> SealServer:
    return SealServer(prog, read_keys(prog, keys_dir, secret=False))


def client_encrypt(prog: HEProgram, keys_dir: str | os.PathLike, inputs: Mapping[str, np.ndarray]) -> Bundle:
    return P.client_encrypt(prog, open_client(prog, keys_dir), inputs)


def client_refresh(prog: HEProgram, keys_dir: str | os.PathLike, request: "Bundle | str | os.PathLike") -> Bundle:
    return P.client_refresh(prog, open_client(prog, keys_dir), request, keys_dir)


def client_decrypt(prog: HEProgram, keys_dir: str | os.PathLike,
                   outputs: "Bundle | str | os.PathLike") -> dict[str, np.ndarray]:
    return P.client_decrypt(prog, open_client(prog, keys_dir), outputs, keys_dir)


def server_start(prog: HEProgram, keys_dir: str | os.PathLike, input_bundle: "Bundle | str | os.PathLike") -> Bundle:
    return P.server_start(prog, open_server(prog, keys_dir), input_bundle, keys_dir)


def server_step(prog: HEProgram, keys_dir: str | os.PathLike, state: "Bundle | str | os.PathLike",
                response: "Bundle | str | os.PathLike | None" = None,
                progress: Callable[[int], Any] | None = None) -> tuple[Bundle, Bundle | None, Bundle | None]:
    return P.server_step(prog, open_server(prog, keys_dir), state, response, keys_dir, progress)


def server_reemit(prog: HEProgram, keys_dir: str | os.PathLike,
                  state: "Bundle | str | os.PathLike") -> tuple[Bundle | None, Bundle | None]:
    return P.server_reemit(prog, open_server(prog, keys_dir), state, keys_dir)


def state_to_bundle(prog: HEProgram, server: "SealServer", st: EvalState) -> Bundle:
    return P.state_to_bundle(prog, server, st)


def state_from_bundle(prog: HEProgram, server: "SealServer", b: Bundle, keys_dir=None) -> EvalState:
    return P.state_from_bundle(prog, server, b, keys_dir)
