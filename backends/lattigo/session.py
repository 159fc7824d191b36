"""Run HE programs with Lattigo: the executor's primitives, the protocol's two sides, keygen.

A program compiled for a Lattigo target (``hecompile M.onnx -o M.hec --target lattigo``)
records in its ``.hec`` metadata the parameter literal (``meta["target"]["lattigo"]``: ring,
the program's own primes ``q`` explicitly, key-switching primes, secret distribution,
bootstrapping literal).  This module rebuilds the parameters from it, checks the chain is the
program's, and runs the program on the shared executor with bootstrapping as the refresh: the
server runs the whole network alone (no request ever goes to the key holder).

Key directories (:func:`client_keygen`): the Go side writes ``secret.key`` (client, 0600),
``public.key`` (both), ``relin.key``, ``galois.key`` (the program's rotation steps only) and
``bootstrap.key`` (server); every key file carries a header binding it to the parameter set
and to its key set.  ``keys.json`` (protocol.py) is written last, binds the directory to the
program, and records every file's sha256; loading checks the small files' hashes (the Go
headers guard the large ones, whose hashing would cost seconds per load).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from hecompiler.costmodel import peak_rss_bytes
from hecompiler.errors import HecError
from hecompiler.executor import EvalState, ExecStats, Executor, ExecutionError
from hecompiler.target import LATTIGO_SERVER_GC_PERCENT
from hecompiler.heprog import HEProgram
from hecompiler.runtime import pack_inputs

from .. import protocol as P
from ..protocol import BackendError, Bundle, LockedKeyDir, keys_json, read_keys_json, short
from . import Ciphertext, Client, Evaluator, LattigoError, LattigoParams, keygen, set_gc_percent

__all__ = ["LattigoBackendError", "LattigoPrimitives", "LattigoClient", "LattigoServer", "params_for",
           "client_keygen", "open_client", "open_server", "run_encrypted", "client_encrypt", "client_decrypt",
           "server_start", "server_step", "server_reemit"]

#: key files the server may load; the client directory holds secret.key and public.key
SERVER_FILES = ("public.key", "relin.key", "galois.key", "bootstrap.key")
CLIENT_FILES = ("secret.key", "public.key")
#: hashed on every load (the others are large: the Go headers bind them)
_HASHED = ("public.key", "relin.key", "secret.key")


class LattigoBackendError(BackendError):
    """The Lattigo backend refused a program, key set, bundle or run."""


def params_for(prog: HEProgram, meta: Mapping[str, Any] | None) -> LattigoParams:
    """The Lattigo parameters a program was compiled for, checked against its chain."""
    t = (meta or {}).get("target") or {}
    lit = t.get("lattigo")
    if t.get("backend") != "lattigo" or not lit:
        raise LattigoBackendError(f"the program was compiled for {t.get('name', 'seal')}, not for Lattigo: compile it "
                                  f"with --target lattigo")
    try:
        params = LattigoParams(lit)
    except LattigoError as e:
        raise LattigoBackendError(f"the program's Lattigo parameters are refused: {e}") from None
    if tuple(int(q) for q in params.q) != tuple(int(q) for q in prog.primes):
        raise LattigoBackendError("the Lattigo parameters' primes differ from the program's chain")
    if params.slots != prog.params.slots or params.default_scale != prog.params.scale:
        raise LattigoBackendError(f"Lattigo parameters: {params.slots} slots, scale {params.default_scale!r}; the "
                                  f"program plans {prog.params.slots} slots, scale {prog.params.scale!r}")
    limit = t.get("max_log_qp")
    b = params.bootstrap
    total = b.log_qp if b is not None else params.log_qp
    if limit and total > limit + 1e-9:
        raise LattigoBackendError(f"the parameters take {total:.2f} bits of Q*P, above the {limit} bits their "
                                  f"security claim allows")
    if b is not None:
        primes = list(b.q) + list(b.p)
        if len(set(primes)) != len(primes):
            raise LattigoBackendError("the program's primes collide with the bootstrapping circuit's")
    return params


def _guarded(fn):
    def call(self, *a, **kw):
        try:
            return fn(self, *a, **kw)
        except LattigoError as e:
            raise LattigoBackendError(f"Lattigo: {e}") from None
    call.__name__ = fn.__name__
    return call


# =========================================================================== primitives

def encode_threads() -> int:
    """Threads encoding plaintexts ahead of the evaluation: every core but the evaluation's own
    (none on one core), unless ``$HECOMPILER_ENCODE_THREADS`` says.  Each hl_encode runs Go code,
    which needs one of Go's GOMAXPROCS (= cores) processors: with as many encoders as cores the
    evaluation thread waited for one.  ResNet-20 at N=2^16 on 2 cores, the same keys and input
    evaluated four times in turn: 169.9 and 172.1 s with one encoder, 191.1 and 193.3 s with two."""
    env = os.environ.get("HECOMPILER_ENCODE_THREADS", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise LattigoBackendError(f"HECOMPILER_ENCODE_THREADS={env!r}: expected a number of threads") from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cores - 1)


class LattigoPrimitives:
    """The executor's primitives on Lattigo ciphertexts (evaluation keys only); a refresh is a
    bootstrap, run on the spot (several at once on the machine's cores)."""

    name = "Lattigo"
    refresh_kind = "inline"
    bootstraps = True

    def __init__(self, params: LattigoParams, ev: Evaluator, workers: int = 1):
        self.params = params
        self.ev = ev
        self.slots = params.slots
        self.workers = workers
        #: Lattigo encodes without the evaluator's lock (an encoder per call) and ctypes releases
        #: the interpreter's: the executor encodes the linear ops' plaintexts ahead on this many
        #: threads (hecompiler.prefetch; every core but one); $HECOMPILER_ENCODE_THREADS overrides,
        #: 0 turns it off
        self.encode_threads = encode_threads()

    @_guarded
    def meta(self, ct: Ciphertext):
        lv, sc, _ = ct._info()
        return lv, sc

    @_guarded
    def copy(self, ct):
        return ct.copy()

    @_guarded
    def set_scale(self, ct, scale):
        ct.set_scale(scale)
        return ct

    @_guarded
    def encode(self, vec, scale, level):
        return self.ev.encode(vec, level, scale)

    @_guarded
    def encode_scalar(self, value, scale, level):
        return self.ev.encode(np.full(self.slots, float(value)), level, scale)

    @_guarded
    def rotate(self, ct, step):
        return self.ev.rotate(ct, step)

    @_guarded
    def rotate_many(self, ct, steps):
        return self.ev.rotate_hoisted(ct, list(steps))

    @_guarded
    def add(self, a, b):
        return self.ev.add(a, b)

    @_guarded
    def sub(self, a, b):
        return self.ev.sub(a, b)

    @_guarded
    def negate(self, a):
        return self.ev.negate(a)

    @_guarded
    def add_plain(self, ct, pt):
        return self.ev.add_plain(ct, pt)

    @_guarded
    def mul_plain(self, ct, pt):
        return self.ev.mul_plain(ct, pt)

    @_guarded
    def mul_plain_acc(self, acc, ct, pt):
        return self.ev.mul_plain_acc(acc, ct, pt)

    @_guarded
    def mul(self, a, b):
        return self.ev.mul(a, b)

    @_guarded
    def rescale(self, ct):
        return self.ev.rescale(ct)

    @_guarded
    def mod_switch(self, ct, level):
        return self.ev.drop_level(ct, level)

    @_guarded
    def zero(self, level, scale):
        return self.ev.zero(level, scale)

    @_guarded
    def refresh(self, cts):
        if len(cts) == 1:
            return [self.ev.bootstrap(cts[0])]
        return self.ev.bootstrap_many(cts, workers=self.workers)

    def release(self, ct) -> None:
        with contextlib.suppress(Exception):
            ct.close()


# =========================================================================== the two sides

def _largest_refresh_batch(prog: HEProgram) -> int:
    """The most refresh instructions in a row (the executor bootstraps them together)."""
    best = run = 0
    for ins in prog.instrs:
        run = run + 1 if ins.op == "refresh" else 0
        best = max(best, run)
    return best


def _key_set(d: Path) -> str:
    try:
        return hashlib.sha256((d / "public.key").read_bytes()).hexdigest()
    except OSError as e:
        raise LattigoBackendError(f"{d / 'public.key'}: {e.strerror or e}") from None


def _check_files(d: Path, meta: Mapping, names) -> None:
    for fn in names:
        if fn in (meta.get("files") or {}) and fn in _HASHED:
            P.check_key_file(d, meta, fn)
    fp = _key_set(d)
    if meta.get("key_set") != fp:
        raise LattigoBackendError(f"{d}: keys.json names key set {short(meta.get('key_set', ''))} but public.key is "
                                  f"key set {short(fp)}")


class LattigoClient:
    """The key holder: encrypts inputs, decrypts outputs (secret key from ``keys_dir``)."""

    def __init__(self, prog: HEProgram, params: LattigoParams, keys_dir: str | os.PathLike):
        d = Path(keys_dir)
        meta = read_keys_json(prog, d, "lattigo", secret=True, evaluation=False)
        _check_files(d, meta, CLIENT_FILES)
        self.prog, self.params = prog, params
        try:
            self._c = Client(params, d)
        except LattigoError as e:
            raise LattigoBackendError(f"{d}: {e}") from None
        self.key_set = meta["key_set"]

    def encrypt_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[int, Any]:
        try:
            packed = pack_inputs(self.prog, inputs)
        except HecError as e:
            raise LattigoBackendError(str(e)) from None
        top, scale = self.prog.params.top_level, self.prog.params.scale
        return {v: self._c.encrypt(row, level=top, scale=scale, secret=False) for v, row in packed.items()}

    def decrypt_outputs(self, cts: Mapping[int, Any]) -> dict[str, np.ndarray]:
        outs = {}
        for io in self.prog.outputs:
            missing = [v for v in io.values if v not in cts]
            if missing:
                raise LattigoBackendError(f"output {io.name!r}: ciphertext(s) {['%' + str(v) for v in missing]} missing")
            lay = self.prog.layouts[io.layout]
            packed = np.stack([self._c.decrypt(cts[v])[: lay.slots] for v in io.values])
            outs[io.name] = (lay.unpack(packed) * io.alpha).reshape(io.shape)
        return outs

    def refresh(self, ct: Any) -> Any:
        raise LattigoBackendError("a Lattigo program refreshes by bootstrapping on the server; there is nothing for "
                                  "the key holder to answer")

    def ct_to_bytes(self, ct: Any) -> bytes:
        return ct.to_bytes()

    def ct_from_bytes(self, data: bytes) -> Any:
        try:
            return Ciphertext.from_bytes(self.params, data)
        except LattigoError as e:
            raise LattigoBackendError(str(e)) from None


#: Go's GC percent on a server (the cost model predicts the garbage it allows)
SERVER_GC_PERCENT = LATTIGO_SERVER_GC_PERCENT


def server_gc_policy() -> None:
    """Bound Go's garbage beside the keys: ``GOGC`` from the environment when the user set it,
    else :data:`SERVER_GC_PERCENT`."""
    if "GOGC" not in os.environ:
        set_gc_percent(SERVER_GC_PERCENT)


class LattigoServer:
    """Evaluates with the evaluation keys of ``keys_dir`` (never secret.key), on the shared executor."""

    def __init__(self, prog: HEProgram, params: LattigoParams, keys_dir: str | os.PathLike, cost=None):
        d = Path(keys_dir)
        meta = read_keys_json(prog, d, "lattigo", secret=False, evaluation=True)
        _check_files(d, meta, SERVER_FILES)
        self.prog, self.params = prog, params
        self.key_set = meta["key_set"]
        server_gc_policy()
        t = time.perf_counter()
        try:
            self.ev = Evaluator(params, d)
        except LattigoError as e:
            raise LattigoBackendError(f"{d}: {e}") from None
        missing = [k for k in prog.galois_steps if k % params.slots not in {s % params.slots for s in self.ev.steps}]
        if missing:
            raise LattigoBackendError(f"{d}: no Galois key for rotation step(s) {missing[:8]} the program uses")
        have = {s % params.slots: lv for s, lv in self.ev.key_levels.items()}
        low = [(k, have[k], lv) for k, lv in prog.galois_key_levels().items() if have.get(k, lv) < lv]
        if low:
            k, got, lv = low[0]
            raise LattigoBackendError(f"{d}: the Galois key of rotation step {k} is made for level {got}, the program "
                                      f"rotates by it at level {lv} ({len(low)} key(s) too low): make the keys "
                                      f"with this program")
        if prog.needs_relin and not self.ev.has_relin:
            raise LattigoBackendError(f"{d}: the program multiplies ciphertexts but there is no relin key")
        self.refreshes = any(i.op == "refresh" for i in prog.instrs)
        if self.refreshes and not self.ev.has_bootstrap:
            raise LattigoBackendError(f"{d}: the program bootstraps but there is no bootstrap.key")
        if self.refreshes:
            # one bootstrapping evaluator per ciphertext bootstrapped at once (each holds its own
            # CoeffsToSlots/SlotsToCoeffs matrices, GBs at N=2^16): no more than the largest batch
            self.workers = max(1, min(os.cpu_count() or 1, _largest_refresh_batch(prog)))
            try:
                self.ev.prepare_bootstrap(self.workers)
            except LattigoError as e:
                raise LattigoBackendError(f"preparing the bootstrap: {e}") from None
        self.load_seconds = time.perf_counter() - t
        self.prim = LattigoPrimitives(params, self.ev, getattr(self, "workers", 1))
        self.ex = Executor(prog, self.prim, cost)
        sizes = {fn: (d / fn).stat().st_size for fn in SERVER_FILES if (d / fn).exists()}
        self._key_stats = {"galois_keys": len(self.ev.steps), "galois_key_bytes": sizes.get("galois.key", 0),
                           "relin_key_bytes": sizes.get("relin.key", 0)}
        self.key_bytes = sum(sizes.values())

    def start(self, cts: Mapping[int, Any]) -> EvalState:
        try:
            st = self.ex.start(cts)
        except ExecutionError as e:
            raise LattigoBackendError(str(e)) from None
        st.stats.__dict__.update(self._key_stats)
        return st

    def run_until_refresh(self, state: EvalState, response=None, progress=None, request_id=None) -> EvalState:
        try:
            return self.ex.run(state, response, progress, request_id)
        except ExecutionError as e:
            raise LattigoBackendError(str(e)) from None

    def outputs(self, state: EvalState) -> dict[int, Any]:
        try:
            return self.ex.outputs(state)
        except ExecutionError as e:
            raise LattigoBackendError(str(e)) from None

    def run(self, cts: Mapping[int, Any], progress=None) -> tuple[dict[int, Any], ExecStats]:
        state = self.start(cts)
        self.run_until_refresh(state, progress=progress)
        return self.outputs(state), state.stats

    def ct_to_bytes(self, ct: Any) -> bytes:
        return ct.to_bytes()

    def ct_from_bytes(self, data: bytes) -> Any:
        try:
            return Ciphertext.from_bytes(self.params, data)
        except LattigoError as e:
            raise LattigoBackendError(str(e)) from None


# =========================================================================== keys and the module API

def client_keygen(prog: HEProgram, client_dir: str | os.PathLike, server_dir: str | os.PathLike, meta=None) -> dict:
    """Generate a key set for ``prog``: secret + public key into ``client_dir``, public, relin,
    Galois (the program's steps) and bootstrapping keys into ``server_dir`` (never the secret
    key); all or nothing, under a lock on each directory.  Returns the Go side's report
    (seconds and bytes per key kind) with the key set."""
    params = params_for(prog, meta)
    if Path(client_dir).resolve() == Path(server_dir).resolve():
        raise LattigoBackendError("client and server key directories must differ (the server must not get secret.key)")
    dirs = [LockedKeyDir(client_dir, "client")]
    try:
        dirs.append(LockedKeyDir(server_dir, "server"))
        dirs[0].adopt(CLIENT_FILES)
        dirs[1].adopt(SERVER_FILES)
        boots = any(i.op == "refresh" for i in prog.instrs)
        try:
            at = prog.galois_key_levels()  # each key made for the highest level it is used at
            rep = keygen(params, client_dir, server_dir, rotations=list(at), levels=list(at.values()),
                         relin=prog.needs_relin, bootstrap=boots)
        except LattigoError as e:
            raise LattigoBackendError(f"keygen: {e}") from None
        fp = _key_set(Path(client_dir))
        for d, names, secret in ((Path(client_dir), CLIENT_FILES, True), (Path(server_dir), SERVER_FILES, False)):
            files = {fn: _sha256_file(d / fn) for fn in names if (d / fn).exists()}
            if secret:
                os.chmod(d / "secret.key", 0o600)
            dirs[0 if secret else 1].write({"keys.json": keys_json(prog, "lattigo", fp, files, secret,
                                                                  {"relin": prog.needs_relin, "bootstrap": boots})})
        rep["key_set"] = fp
        return rep
    except BaseException:
        for d in dirs:
            d.rollback()
        raise
    finally:
        for d in dirs:
            d.close()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def open_client(prog: HEProgram, keys_dir: str | os.PathLike, meta=None) -> LattigoClient:
    return LattigoClient(prog, params_for(prog, meta), keys_dir)


def open_server(prog: HEProgram, keys_dir: str | os.PathLike, meta=None, cost=None) -> LattigoServer:
    return LattigoServer(prog, params_for(prog, meta), keys_dir, cost)


def client_encrypt(prog: HEProgram, keys_dir, inputs, meta=None) -> Bundle:
    return P.client_encrypt(prog, open_client(prog, keys_dir, meta), inputs)


def client_decrypt(prog: HEProgram, keys_dir, outputs, meta=None) -> dict[str, np.ndarray]:
    return P.client_decrypt(prog, open_client(prog, keys_dir, meta), outputs, keys_dir)


def server_start(prog: HEProgram, keys_dir, input_bundle, meta=None) -> Bundle:
    return P.server_start(prog, open_server(prog, keys_dir, meta), input_bundle, keys_dir)


def server_step(prog: HEProgram, keys_dir, state, response=None, progress=None, meta=None):
    return P.server_step(prog, open_server(prog, keys_dir, meta), state, response, keys_dir, progress)


def server_reemit(prog: HEProgram, keys_dir, state, meta=None):
    return P.server_reemit(prog, open_server(prog, keys_dir, meta), state, keys_dir)


def _scratch_dirs() -> tuple[str, str]:
    """Private directories for the throwaway key set of a one-process run: the client's (secret
    key, a few MB) in RAM (/dev/shm) when the machine has it, so the secret key never reaches a
    disk; the server's evaluation keys (GBs at 128 bits, bootstrapping keys included) on disk, where
    they do not take the memory the evaluation needs.  Both removed after the run."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="hec-lattigo-client-", dir=shm), tempfile.mkdtemp(prefix="hec-lattigo-server-")


def run_encrypted(prog: HEProgram, inputs: Mapping[str, np.ndarray], progress: Callable[[int], Any] | None = None,
                  meta=None, gc_percent: int | None = SERVER_GC_PERCENT) -> tuple[dict[str, np.ndarray], ExecStats]:
    """Keygen (a throwaway key set), encrypt, evaluate with bootstraps, decrypt; phase timings in
    ``stats.phases``.  ``gc_percent`` bounds Go's garbage next to gigabytes of live keys."""
    if gc_percent is not None:
        set_gc_percent(gc_percent)
    client_dir, server_dir = _scratch_dirs()
    try:
        t0 = time.perf_counter()
        client_keygen(prog, os.path.join(client_dir, "client"), os.path.join(server_dir, "server"), meta)
        t1 = time.perf_counter()
        client = open_client(prog, os.path.join(client_dir, "client"), meta)
        cts = client.encrypt_inputs(inputs)
        t2 = time.perf_counter()
        server = open_server(prog, os.path.join(server_dir, "server"), meta)
        t3 = time.perf_counter()
        out_cts, stats = server.run(cts, progress)
        del cts
        t4 = time.perf_counter()
        outs = client.decrypt_outputs(out_cts)
        t5 = time.perf_counter()
        stats.phases = {"keygen": t1 - t0, "encrypt": t2 - t1, "server_load": t3 - t2, "eval": t4 - t3,
                        "decrypt": t5 - t4, "total": t5 - t0}
        stats.peak_rss_bytes = max(stats.peak_rss_bytes, peak_rss_bytes())
        return outs, stats
    finally:
        shutil.rmtree(client_dir, ignore_errors=True)
        shutil.rmtree(server_dir, ignore_errors=True)
