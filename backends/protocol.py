"""The client/server protocol every encrypted backend shares.

A backend (SEAL, Lattigo) supplies two sides over its own ciphertext type:

* a **client** (:class:`ClientSide`): holds the secret key; ``encrypt_inputs``,
  ``decrypt_outputs``, ``refresh`` (client-aided re-encryption), and the ciphertext
  (de)serialization ``ct_to_bytes`` / ``ct_from_bytes``;
* a **server** (:class:`ServerSide`): evaluation keys only; ``start``,
  ``run_until_refresh`` and ``outputs`` of the shared executor
  (:class:`hecompiler.executor.Executor`), and the same (de)serialization.

Everything else is here, once: the bundle file format, key-directory metadata and locking,
and the steps of the split commands (encrypt, eval, refresh, decrypt) with their checks:
every bundle names the program, the parameters and the key set it belongs to, each step
refuses a mismatch with one line naming the file and both fingerprints, and writes nothing.

Bundle (inputs, refresh requests and responses, server state, outputs)::

    b"HECBNDL2"                       magic + format version
    uint64 LE  header length H
    H bytes    header, UTF-8 JSON: {"kind", "program_sha256", "key_set",
               "params_fingerprint", "meta", "items": [[name, size], ...]}
    payloads   the items' bytes, in header order
    32 bytes   sha256 of everything above

Item names: ``ct:<value id>`` (a ciphertext in the backend's own format) and, in a server
state waiting for a refresh, ``req:<value id>``.  The state file is the commit point of
``eval``: it holds the pending request (or the outputs), so an ``eval`` killed after writing it
can write them again (:func:`server_reemit`).

Key directory: ``keys.json`` (written last: what makes a directory a key directory)::

    {"format", "backend", "key_set", "params", "primes", "params_fingerprint",
     "program_sha256", "galois_steps", "has_secret", "files": {name: sha256}, ...}

``key_set`` is the sha256 of the public key file; the client and server directories of one
keygen share it.  :class:`LockedKeyDir` writes a directory under an exclusive lock, refuses
one that already holds keys, and removes what it wrote on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from hecompiler.errors import HecError
from hecompiler.executor import EvalState, ExecStats
from hecompiler.fileio import atomic_write_bytes
from hecompiler.heprog import HEProgram, print_program

KEYS_FORMAT = 3


class BackendError(HecError):
    """An encrypted backend refused a program, key set, bundle or run."""


# =========================================================================== fingerprints

def program_sha256(prog: HEProgram) -> str:
    """sha256 (hex) of the program: its text form and its weights (names, shapes, bytes), so
    keys and bundles are bound to what the program computes, weights included.

    A program object carrying ``program_digest`` answers with it: a client's weightless view
    (:class:`hecompiler.clientfile.ClientProgram`, which holds the full program's digest since it
    has neither instructions nor weights to hash), or a server program whose digest was computed
    once at load (:func:`pin_program_sha256`)."""
    digest = getattr(prog, "program_digest", None)
    if digest is not None:
        return str(digest)
    h = hashlib.sha256(print_program(prog).encode("utf-8"))
    for name in sorted(prog.weights):
        w = np.ascontiguousarray(prog.weights[name])
        h.update(f"\n{name} {w.dtype.str} {list(w.shape)}\n".encode())
        h.update(w.tobytes())
    return h.hexdigest()


def pin_program_sha256(prog: HEProgram) -> str:
    """Compute ``prog``'s sha256 once and keep it on the object (``program_digest``): a server
    checks every bundle against it, and the program it serves never changes."""
    prog.program_digest = None  # type: ignore[attr-defined]
    prog.program_digest = program_sha256(prog)  # type: ignore[attr-defined]
    return prog.program_digest  # type: ignore[attr-defined]


def params_fingerprint(prog: HEProgram) -> str:
    d = {"params": prog.params.to_dict(), "primes": [int(q) for q in prog.primes]}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def short(fingerprint: str) -> str:
    """How a key-set fingerprint is shown to users: its first 16 hex digits."""
    return str(fingerprint)[:16]


# =========================================================================== the two sides

class ClientSide(Protocol):
    key_set: str

    def encrypt_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[int, Any]: ...
    def decrypt_outputs(self, cts: Mapping[int, Any]) -> dict[str, np.ndarray]: ...
    def refresh(self, ct: Any) -> Any: ...
    def ct_to_bytes(self, ct: Any) -> bytes: ...
    def ct_from_bytes(self, data: bytes) -> Any: ...


class ServerSide(Protocol):
    key_set: str

    def start(self, cts: Mapping[int, Any]) -> EvalState: ...
    def run_until_refresh(self, state: EvalState, response: Mapping[int, Any] | None = None,
                          progress: Callable[[int], Any] | None = None,
                          request_id: str | None = None) -> EvalState: ...
    def outputs(self, state: EvalState) -> dict[int, Any]: ...
    def ct_to_bytes(self, ct: Any) -> bytes: ...
    def ct_from_bytes(self, data: bytes) -> Any: ...


# =========================================================================== bundles

_MAGIC = b"HECBNDL2"
_OLD_MAGICS = (b"HECBNDL1",)
KINDS = ("inputs", "request", "response", "state", "outputs")


@dataclass
class Bundle:
    """A file of serialized ciphertexts with a JSON header (see the module doc).  ``source``
    (not stored) is where it was read from, for messages."""

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
            raise BackendError(f"{source}: a bundle of an older hecompiler (not bound to a key set); encrypt again")
        if data[:8] != _MAGIC:
            raise BackendError(f"{source}: not a ciphertext bundle (bad magic)")
        if len(data) < 8 + 8 + 32:
            raise BackendError(f"{source}: truncated ({len(data)} bytes)")
        body, digest = data[:-32], data[-32:]
        if hashlib.sha256(body).digest() != digest:
            raise BackendError(f"{source}: corrupt or truncated (sha256 mismatch)")
        (hlen,) = struct.unpack_from("<Q", body, 8)
        if 16 + hlen > len(body):
            raise BackendError(f"{source}: corrupt header length {hlen}")
        try:
            head = json.loads(body[16:16 + hlen].decode("utf-8"))
            kind, items, key_set = head["kind"], head["items"], str(head["key_set"])
            psha, pfp, meta = head["program_sha256"], head["params_fingerprint"], head["meta"]
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"{source}: corrupt header: {e}") from None
        if kind not in KINDS:
            raise BackendError(f"{source}: unknown bundle kind {kind!r}")
        off = 16 + hlen
        out: dict[str, bytes] = {}
        for name, size in items:
            if size < 0 or off + size > len(body):
                raise BackendError(f"{source}: item {name!r} runs past the end")
            out[str(name)] = body[off:off + size]
            off += size
        if off != len(body):
            raise BackendError(f"{source}: {len(body) - off} trailing bytes")
        return Bundle(kind, psha, pfp, key_set, meta, out, source)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @staticmethod
    def load(path: str | os.PathLike) -> "Bundle":
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BackendError(f"{path}: {e.strerror or e}") from None
        return Bundle.from_bytes(data, str(path))


def as_bundle(b: "Bundle | str | os.PathLike") -> Bundle:
    return b if isinstance(b, Bundle) else Bundle.load(b)


def new_bundle(prog: HEProgram, kind: str, key_set: str, meta: dict | None = None) -> Bundle:
    return Bundle(kind, program_sha256(prog), params_fingerprint(prog), key_set, dict(meta or {}))


def check_bundle(b: Bundle, prog: HEProgram, kind: str, key_set: str, keys_dir: str | os.PathLike | None) -> None:
    """``b`` is a ``kind`` bundle of ``prog`` under ``key_set`` (read from ``keys_dir``)."""
    src = b.source or f"the {b.kind} bundle"
    if b.kind != kind:
        raise BackendError(f"{src}: expected a {kind} bundle, got a {b.kind} bundle")
    if b.params_fingerprint != params_fingerprint(prog):
        raise BackendError(f"{src}: the {kind} bundle was made for other encryption parameters")
    if b.program_sha256 != program_sha256(prog):
        raise BackendError(f"{src}: the {kind} bundle was made for another program")
    if b.key_set != key_set:
        where = f"{keys_dir} holds" if keys_dir is not None else "these keys are"
        raise BackendError(f"{src}: encrypted under key set {short(b.key_set)}, but {where} key set "
                           f"{short(key_set)}: wrong keys")


def put_cts(b: Bundle, side, cts: Mapping[int, Any], prefix: str = "ct:") -> None:
    for v, ct in cts.items():
        b.items[f"{prefix}{int(v)}"] = side.ct_to_bytes(ct)


def get_cts(b: Bundle, side, prefix: str = "ct:") -> dict[int, Any]:
    out = {}
    for name, data in b.items.items():
        if name.startswith(prefix):
            try:
                out[int(name[len(prefix):])] = side.ct_from_bytes(data)
            except (HecError, ValueError) as e:
                raise BackendError(f"{b.source or b.kind + ' bundle'}, ciphertext {name}: {e}") from None
    return out


def state_to_bundle(prog: HEProgram, server: ServerSide, st: EvalState) -> Bundle:
    """Server-side state file: the live ciphertexts and the pending request."""
    b = new_bundle(prog, "state", server.key_set, {"pc": st.pc, "pending": st.pending, "request_id": st.request_id,
                                                   "request": sorted(st.request), "stats": st.stats.to_dict()})
    put_cts(b, server, st.live)
    put_cts(b, server, st.request, "req:")
    return b


def state_from_bundle(prog: HEProgram, server: ServerSide, b: Bundle, keys_dir=None) -> EvalState:
    check_bundle(b, prog, "state", server.key_set, keys_dir)
    m = b.meta
    try:
        st = EvalState(pc=int(m["pc"]), pending=[int(k) for k in m["pending"]], request_id=str(m["request_id"]),
                       stats=ExecStats.from_dict(m["stats"]))
    except (KeyError, TypeError, ValueError) as e:
        raise BackendError(f"{b.source or 'state bundle'}: corrupt state: {e}") from None
    st.live = get_cts(b, server)
    st.request = get_cts(b, server, "req:")
    if len(st.pending) != len(st.request):
        raise BackendError(f"{b.source or 'state bundle'}: inconsistent pending refreshes")
    return st


# =========================================================================== the steps

def client_encrypt(prog: HEProgram, client: ClientSide, inputs: Mapping[str, np.ndarray]) -> Bundle:
    b = new_bundle(prog, "inputs", client.key_set)
    put_cts(b, client, client.encrypt_inputs(inputs))
    return b


def client_refresh(prog: HEProgram, client: ClientSide, request: "Bundle | str | os.PathLike", keys_dir=None) -> Bundle:
    """Answer a refresh request: decrypt each ciphertext and encrypt it again at the top level."""
    req = as_bundle(request)
    check_bundle(req, prog, "request", client.key_set, keys_dir)
    cts = get_cts(req, client)
    resp = new_bundle(prog, "response", client.key_set, {"request_id": req.meta.get("request_id", "")})
    put_cts(resp, client, {v: client.refresh(ct) for v, ct in cts.items()})
    return resp


def client_decrypt(prog: HEProgram, client: ClientSide, outputs: "Bundle | str | os.PathLike",
                   keys_dir=None) -> dict[str, np.ndarray]:
    b = as_bundle(outputs)
    check_bundle(b, prog, "outputs", client.key_set, keys_dir)
    return client.decrypt_outputs(get_cts(b, client))


def server_start(prog: HEProgram, server: ServerSide, input_bundle: "Bundle | str | os.PathLike",
                 keys_dir=None) -> Bundle:
    """Initial server state (a ``state`` bundle) from an ``inputs`` bundle."""
    b = as_bundle(input_bundle)
    check_bundle(b, prog, "inputs", server.key_set, keys_dir)
    return state_to_bundle(prog, server, server.start(get_cts(b, server)))


def _emit(prog: HEProgram, server: ServerSide, st: EvalState) -> tuple[Bundle | None, Bundle | None]:
    """What a state has for the client: ``(request, None)`` while it waits, ``(None, outputs)`` at the end."""
    if st.pending:
        req = new_bundle(prog, "request", server.key_set, {"request_id": st.request_id})
        put_cts(req, server, st.request)
        return req, None
    outs = new_bundle(prog, "outputs", server.key_set, {"stats": st.stats.to_dict()})
    put_cts(outs, server, server.outputs(st))
    return None, outs


def server_step(prog: HEProgram, server: ServerSide, state: "Bundle | str | os.PathLike",
                response: "Bundle | str | os.PathLike | None" = None, keys_dir=None,
                progress: Callable[[int], Any] | None = None) -> tuple[Bundle, Bundle | None, Bundle | None]:
    """Continue the evaluation: ``(state, request, None)`` when the key holder must refresh (send
    ``request``, call again with its response), or ``(state, None, outputs)`` at the end.  Save
    the state first: it is the commit point (:func:`server_reemit` rebuilds the rest)."""
    st = state_from_bundle(prog, server, as_bundle(state), keys_dir)
    resp_cts = rid = None
    if response is not None:
        rb = as_bundle(response)
        check_bundle(rb, prog, "response", server.key_set, keys_dir)
        rid = str(rb.meta.get("request_id", ""))
        resp_cts = get_cts(rb, server)
    server.run_until_refresh(st, resp_cts, progress=progress, request_id=rid)
    req, outs = _emit(prog, server, st)
    return state_to_bundle(prog, server, st), req, outs


def server_reemit(prog: HEProgram, server: ServerSide, state: "Bundle | str | os.PathLike",
                  keys_dir=None) -> tuple[Bundle | None, Bundle | None]:
    """The request (or the outputs) of a saved state, again: an ``eval`` interrupted after it
    saved its state loses nothing."""
    st = state_from_bundle(prog, server, as_bundle(state), keys_dir)
    if not st.pending and not st.done(prog):
        raise BackendError(f"{state}: the evaluation neither waits for a refresh nor is finished "
                           f"(next instruction {st.pc}): give --response")
    return _emit(prog, server, st)


# =========================================================================== key directories

class LockedKeyDir:
    """A key directory being written: created if missing (0700), locked exclusively (``flock``
    on the directory itself, so nothing is left behind), refused if it already holds a key set.
    ``write`` writes files; on failure ``rollback`` removes what this writer wrote."""

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
            raise BackendError(f"{path}: cannot create the {role} key directory: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise BackendError(f"{path}: another keygen is writing this {role} key directory; "
                               "wait for it or use another directory") from None
        if role == "server" and (self.path / "secret.key").exists():
            self.close()
            raise BackendError(f"{path}: holds a secret.key; refusing to write server keys there "
                               "(use a separate directory for the server)")
        if (self.path / "keys.json").exists():
            self.close()
            fp = peek_key_set(self.path)
            raise BackendError(f"{path}: already holds key set {short(fp)}; keygen never replaces keys "
                               "(ciphertexts under them could not be decrypted again): remove the directory "
                               "or choose another")

    def write(self, files: Mapping[str, bytes]) -> None:
        for fn, data in files.items():
            target = self.path / fn
            atomic_write_bytes(target, data, mode=0o600 if fn == "secret.key" else None)
            self.written.append(target)

    def adopt(self, names) -> None:
        """Files another writer (the Go side) put in the directory, removed too on rollback."""
        self.written.extend(self.path / n for n in names)

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


def peek_key_set(d: Path) -> str:
    try:
        return str(json.loads((Path(d) / "keys.json").read_text()).get("key_set", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def keys_json(prog: HEProgram, backend: str, key_set: str, files: Mapping[str, bytes | str],
              has_secret: bool, extra: Mapping[str, Any] | None = None) -> bytes:
    """The ``keys.json`` of a key directory; ``files`` maps file names to their bytes (or sha256)."""
    meta = {"format": KEYS_FORMAT, "backend": backend, "key_set": key_set,
            "params": prog.params.to_dict(), "primes": [int(q) for q in prog.primes],
            "params_fingerprint": params_fingerprint(prog), "program_sha256": program_sha256(prog),
            "galois_steps": list(prog.galois_steps), "has_secret": has_secret,
            "files": {fn: (b if isinstance(b, str) else hashlib.sha256(b).hexdigest()) for fn, b in files.items()}}
    meta.update(extra or {})
    return (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()


def read_keys_json(prog: HEProgram, keys_dir: str | os.PathLike, backend: str, secret: bool,
                   evaluation: bool) -> dict:
    """The checked ``keys.json`` of ``keys_dir`` for ``prog``: the right format, backend, parameters
    and program; a server (``secret=False``, ``evaluation=True``) is refused a directory holding the
    secret key."""
    d = Path(keys_dir)
    mpath = d / "keys.json"
    if not d.is_dir():
        raise BackendError(f"{d}: no such key directory")
    try:
        meta = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise BackendError(f"{d}: not a key directory (no keys.json; an interrupted keygen leaves none)") from None
    except (OSError, ValueError) as e:
        raise BackendError(f"{mpath}: unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != KEYS_FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else meta
        raise BackendError(f"{mpath}: key directory format {fmt!r}, expected {KEYS_FORMAT}"
                           + (" (made by an older hecompiler: run keygen again)" if isinstance(fmt, int) else ""))
    if meta.get("backend", backend) != backend:
        raise BackendError(f"{d}: holds {meta.get('backend')} keys, but the program runs on {backend}")
    if meta.get("params_fingerprint") != params_fingerprint(prog):
        raise BackendError(f"{d}: the keys were made for other encryption parameters "
                           f"({meta.get('params')}) than the program's ({prog.params.to_dict()})")
    if meta.get("program_sha256") != program_sha256(prog):
        raise BackendError(f"{d}: the keys were made for another program (program sha256 "
                           f"{str(meta.get('program_sha256'))[:16]}..., this program {program_sha256(prog)[:16]}...)")
    if not secret and evaluation and (meta.get("has_secret") or (d / "secret.key").exists()):
        raise BackendError(f"{d}: holds the secret key; the server gets the server key directory, never the "
                           "client's")
    if secret and not (d / "secret.key").exists():
        raise BackendError(f"{d}: no secret.key (this is a server key directory)")
    return meta


def check_key_file(d: Path, meta: Mapping, fn: str) -> None:
    """``fn`` in key directory ``d`` is the file ``keys.json`` names (sha256), streamed."""
    want = (meta.get("files") or {}).get(fn)
    if want is None:
        raise BackendError(f"{d / fn}: not listed in keys.json")
    h = hashlib.sha256()
    try:
        with open(d / fn, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise BackendError(f"{d / fn}: {e.strerror or e}") from None
    if h.hexdigest() != want:
        raise BackendError(f"{d / fn}: corrupt or replaced (sha256 does not match keys.json)")
