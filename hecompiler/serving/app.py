"""``hecompile serve``: the HTTP front end (aiohttp) over a worker pool (see :mod:`.pool`).

The front end parses and checks every body before it takes a worker (magic, sha256, bundle
kind, program, parameters, key set, the refresh request a response answers), so garbage costs
no evaluation; admits at most ``capacity`` jobs with ``--queue`` more waiting (503 beyond, with
``Retry-After``); gives each request a deadline (``--timeout``, queueing included: 504 past it);
keeps sessions and key sets on disk (:mod:`.store`); and logs one line per request.  The API is
in :mod:`.wire`.

Not here: authentication and TLS.  Anyone who reaches the port can upload key sets (bounded by
``--max-key-sets`` and ``--max-key-bytes``) and run inferences; everything they send and get is
encrypted under their own keys, but put the server behind an authenticating TLS proxy when the
network is not yours.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import HecError
from . import wire
from .pool import DaskPool, LocalPool, PoolError
from .store import Session, Store, body_sha, valid_id

log = logging.getLogger("hecompiler.serve")


@dataclass
class ServeConfig:
    program: str
    host: str = "127.0.0.1"
    port: int = 8000
    store: str = "hecompile-store"
    workers: int = 1
    queue: int = 16
    timeout: float = 300.0
    worker_memory: int | None = None  # bytes; None: from the compile report
    #: encoded plaintexts each worker keeps across requests (bytes); None: what the memory budget
    #: leaves (hecompiler.plaintexts.serving_cache_bytes)
    plaintext_cache: int | None = None
    #: local workers encode the program's plaintexts into that cache before they take requests
    warm: bool = True
    max_request_bytes: int | None = None  # None: from the program's ciphertext sizes
    max_key_bytes: int | None = None  # None: from the program's evaluation-key sizes
    session_ttl: float = 600.0
    max_sessions: int = 256
    max_key_sets: int = 64
    key_sets_per_worker: int | None = None
    scheduler: str | None = None
    verify_key: str | None = None
    log_interval: float = 10.0
    grace: float = 30.0  # seconds running evaluations get to finish on SIGTERM



#: on shutdown, a session whose last step was answered longer ago than this is not waited for
SESSION_STEP_GAP = 60.0


class HttpError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())
        self.retry_after = retry_after


def _fmt_bytes(n: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.1f} {unit}"
    return f"{n} B"


def _max_refresh_batch(prog) -> int:
    best = run = 0
    for ins in prog.instrs:
        run = run + 1 if ins.op == "refresh" else 0
        best = max(best, run)
    return best


class Gate:
    """At most ``capacity`` jobs at once, at most ``max_queue`` waiting (503 beyond)."""

    def __init__(self, capacity: int, max_queue: int):
        self.capacity = capacity
        self.max_queue = max_queue
        self.sem = asyncio.Semaphore(capacity)
        self.waiting = 0
        self.running = 0

    async def run(self, fn, deadline: float, timeout: float, retry_after: float):
        if self.sem.locked() and self.waiting >= self.max_queue:
            raise HttpError(503, f"the server is busy: {self.running} evaluations running and {self.waiting} waiting, "
                                 f"the most it queues (--queue {self.max_queue}); retry later", retry_after)
        self.waiting += 1
        try:
            await asyncio.wait_for(self.sem.acquire(), max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise HttpError(504, f"waited for a free worker longer than this server's per-request timeout of "
                                 f"{timeout:g} s (--timeout)") from None
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            return await fn()
        finally:
            self.running -= 1
            self.sem.release()


class Server:
    def __init__(self, cfg: ServeConfig):
        from .. import backends
        from ..backends.protocol import params_fingerprint, pin_program_sha256
        from ..clientfile import client_file_bytes
        from ..costmodel import switching_key_bytes
        from ..hecfile import _load

        self.cfg = cfg
        ld = _load(cfg.program, cfg.verify_key)
        self.prog, self.meta = ld.prog, ld.metadata
        self.sha = pin_program_sha256(self.prog)
        self.params_fp = params_fingerprint(self.prog)
        self.backend_name = backends.for_program(self.meta)
        backends.get(self.backend_name)  # the backend must be importable here too
        self.client_file = client_file_bytes(self.prog, self.meta, str(ld.manifest.get("digest", "")))
        p = self.prog.params
        report = self.meta.get("report") or {}
        n, primes = p.poly_degree, p.top_level + 1
        ct_bytes = 2 * n * primes * 8 + 4096  # a fresh ciphertext, uncompressed, with its envelope
        n_in = sum(len(io.values) for io in self.prog.inputs)
        most = max(n_in, _max_refresh_batch(self.prog), 1)
        self.max_request = cfg.max_request_bytes or (2 * most * ct_bytes + (1 << 20))
        ksk = switching_key_bytes(n, primes)
        keys = (len(self.prog.galois_steps) + 1) * ksk + 2 * n * primes * 8
        self.key_bytes = int(report.get("key_upload_bytes") or keys)
        self.max_keys = cfg.max_key_bytes or int(1.5 * max(keys, self.key_bytes) + (16 << 20))
        predicted = int(report.get("predicted_memory_bytes") or 0)
        self.predicted_memory = predicted
        # A worker serving one key set holds the interpreter, the program's encoded plaintexts (kept
        # across requests, up to the cache budget: what the memory budget leaves, so a repeated
        # query encodes nothing) and the loaded keys (about 3x their file size at most, measured);
        # each further key set it keeps loaded costs its keys only, since the worker's key sets
        # share one plaintext cache (engine.Engine._share_plaintexts).
        from ..plaintexts import serving_cache_bytes

        self.plaintext_cache = (cfg.plaintext_cache if cfg.plaintext_cache is not None
                                else serving_cache_bytes(report, cfg.worker_memory))
        pt_bytes = min(int((report.get("plaintexts") or {}).get("bytes_all") or 0), self.plaintext_cache)
        cached = int((report.get("plaintexts") or {}).get("cache_bytes") or 0)
        self.per_key_set_bytes = max(3 * self.key_bytes, 1)
        self.one_key_set_bytes = max(predicted - min(cached, predicted) + pt_bytes,
                                     (128 << 20) + pt_bytes + self.per_key_set_bytes)
        if cfg.worker_memory is not None:
            if predicted and cfg.worker_memory < predicted:
                log.warning("--worker-memory %s is below the %s the compile report predicts per inference: "
                            "requests will likely be stopped", _fmt_bytes(cfg.worker_memory), _fmt_bytes(predicted))
            self.memory_budget = cfg.worker_memory
        else:
            self.memory_budget = int(1.5 * self.one_key_set_bytes) + (512 << 20)
        self.key_cache = cfg.key_sets_per_worker or max(
            1, min(8, (self.memory_budget - self.one_key_set_bytes) // self.per_key_set_bytes + 1))
        self.store = Store(cfg.store, self.sha)
        if cfg.scheduler:
            self.pool = DaskPool(cfg.scheduler, cfg.program, self.sha, cfg.timeout, self.key_cache,
                                 capacity=cfg.workers if cfg.workers and cfg.workers > 0 else None,
                                 plaintext_cache=self.plaintext_cache)
        else:
            self.pool = LocalPool(cfg.program, cfg.workers, cfg.timeout, self.memory_budget, self.key_cache,
                                  cfg.verify_key, cfg.log_interval, plaintext_cache=self.plaintext_cache,
                                  warm=cfg.warm)
        self.gate: Gate | None = None
        self.upload_slots = asyncio.Semaphore(2)
        self.locks: dict[str, asyncio.Lock] = {}
        self.closing = False
        #: sessions of this process waiting for their client's next refresh step -> when the last
        #: step was answered; on shutdown, the recent ones may still finish (see close)
        self.open_sessions: dict[str, float] = {}
        self.started = time.time()
        self.counts = {"requests": 0, "answers": 0, "errors": 0}
        # a worker evaluates in one process (engine.one_process): without the helper processes the
        # compile report may have priced in (hecompiler.parallel)
        self.predicted_seconds = float(report.get("predicted_seconds") or 1.0) \
            + float(report.get("predicted_shared_seconds") or 0.0)
        # with this server's plaintext cache (warmed at start, or filled by the first request)
        from ..costmodel import repeat_seconds

        self.predicted_served_seconds = repeat_seconds(
            self.predicted_seconds, float(report.get("predicted_encode_seconds") or 0.0),
            float(report.get("predicted_encode_hidden_seconds") or 0.0),
            int((report.get("plaintexts") or {}).get("bytes_all") or 0), self.plaintext_cache)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.pool.start()
        self.gate = Gate(self.pool.capacity, self.cfg.queue)
        n = self.store.expire_sessions()
        if n:
            log.info("dropped %d expired session(s) from %s", n, self.store.sessions)

    def _in_flight(self) -> int:
        """Evaluations running, plus sessions whose client is between two refresh steps (answered
        in the last ``SESSION_STEP_GAP`` seconds: one abandoned longer ago does not hold a shutdown)."""
        now = time.monotonic()
        recent = sum(now - t < SESSION_STEP_GAP for t in self.open_sessions.values())
        return (self.gate.running if self.gate else 0) + recent

    async def close(self, grace: float = 0.0) -> None:
        """Refuse new inferences (503), give the ones already in flight (running, or a session
        between refresh steps) up to ``grace`` seconds to finish and answer, then stop the
        workers (what still runs gets a 503; a session's state stays on disk for a restart)."""
        self.closing = True
        end = time.monotonic() + grace
        n = self._in_flight()
        if n and grace > 0:
            log.info("waiting up to %g s for %d inference(s) in flight (--grace)", grace, n)
        while self._in_flight() and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if self._in_flight():
            log.info("stopping with %d inference(s) in flight after %g s", self._in_flight(), grace)
        await self.pool.close()

    async def expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(30)
            with contextlib.suppress(Exception):
                self.store.expire_sessions()
            old = time.monotonic() - self.cfg.session_ttl
            for sid in [k for k, t in self.open_sessions.items() if t < old]:
                self.open_sessions.pop(sid, None)

    # ------------------------------------------------------------------ helpers
    def _retry_after(self) -> float:
        return max(1.0, round(self.predicted_served_seconds * (1 + self.gate.waiting) / max(1, self.gate.capacity)))

    async def _read(self, request, limit: int, what: str) -> bytes:
        cl = request.content_length
        if cl is not None and cl > limit:
            raise HttpError(413, f"{what} of {cl} bytes is larger than this server's limit of {limit} bytes "
                                 f"(the program's ciphertexts need at most that; --max-request-bytes)")
        buf = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            buf += chunk
            if len(buf) > limit:
                raise HttpError(413, f"{what} is larger than this server's limit of {limit} bytes "
                                     f"(--max-request-bytes)")
        return bytes(buf)

    def _bundle(self, body: bytes, kind: str, key_set: str | None, what: str):
        from ..backends.protocol import Bundle, short

        if not body:
            raise HttpError(400, f"{what}: empty body; expected a {kind} bundle")
        try:
            b = Bundle.from_bytes(body, what)
        except HecError as e:
            raise HttpError(400, str(e)) from None
        if b.kind != kind:
            raise HttpError(400, f"{what}: a {b.kind} bundle, expected a {kind} bundle")
        if b.program_sha256 != self.sha:
            raise HttpError(409, f"{what}: made for another program (program sha256 {b.program_sha256[:16]}, this "
                                 f"server runs {self.sha[:16]}): use this server's client file (GET /v1/client)")
        if b.params_fingerprint != self.params_fp:
            raise HttpError(409, f"{what}: made for other encryption parameters than this server's program")
        if key_set is not None and b.key_set != key_set:
            raise HttpError(409, f"{what}: encrypted under key set {short(b.key_set)}, but the request is for key "
                                 f"set {short(key_set)}: wrong keys")
        return b

    async def _job(self, job: dict) -> dict:
        # loading and checking a key set is not an evaluation: it gets at least two minutes
        limit = self.cfg.timeout if job["op"] != "validate" else max(self.cfg.timeout, 120.0)
        deadline = time.monotonic() + limit

        async def go():
            if self.closing and job["op"] == "start":  # queued before the shutdown began: not started
                raise HttpError(503, "the server is shutting down; retry when it is back", 5)
            return await self.pool.run(job, deadline)

        try:
            res = await self.gate.run(go, deadline, self.cfg.timeout, self._retry_after())
        except PoolError as e:
            if self.closing:
                raise HttpError(503, "the server is shutting down; the evaluation was stopped: retry when it is "
                                     "back", 5) from None
            raise HttpError(e.status, str(e)) from None
        if self.closing and not res.get("ok"):
            raise HttpError(503, "the server is shutting down; retry when it is back", 5)
        if not res.get("ok"):
            raise HttpError(int(res.get("status", 500)), str(res.get("error", "evaluation failed")))
        return res

    def _lock(self, sid: str) -> asyncio.Lock:
        lk = self.locks.get(sid)
        if lk is None:
            lk = self.locks[sid] = asyncio.Lock()
        return lk

    def _answer(self, s: Session, data: bytes, seconds: float | None = None):
        from aiohttp import web

        headers = {wire.H_SESSION: s.sid, wire.H_STEP: s.last_kind, wire.H_REQUEST_ID: s.request_id,
                   wire.H_KEY_SET: s.key_set}
        if seconds is not None:
            headers[wire.H_SECONDS] = f"{seconds:.3f}"
        return web.Response(body=data, content_type="application/octet-stream", headers=headers)

    async def _commit_step(self, s: Session, res: dict, body: bytes) -> bytes:
        """A step's result: the state (commit point), the answer, the record; returns the answer."""
        from ..backends.protocol import Bundle

        if res.get("outputs") is not None:
            answer, s.done, s.last_kind, s.request_id = res["outputs"], True, "done", ""
            s.expires = time.time() + min(self.cfg.session_ttl, 120.0)
            state = None
            self.open_sessions.pop(s.sid, None)
        else:
            self.open_sessions[s.sid] = time.monotonic()
            answer, s.last_kind = res["request"], "refresh"
            s.request_id = str(Bundle.from_bytes(answer, "request").meta.get("request_id", ""))
            s.expires = time.time() + self.cfg.session_ttl
            state = res["state"]
        s.step += 1
        s.last_body_sha = body_sha(body)
        self.store.save_session(s, state, answer)
        return answer

    # ------------------------------------------------------------------ handlers
    async def health(self, request):
        from aiohttp import web

        p = self.prog.params
        return web.json_response({
            "status": "shutting down" if self.closing else "ok",
            "program_sha256": self.sha, "params_fingerprint": self.params_fp, "backend": self.backend_name,
            "refresh": (((self.meta.get("report") or {}).get("refresh_model") or {}).get("kind", "client")
                        if any(i.op == "refresh" for i in self.prog.instrs) else "none"),
            "params": {"ring_degree": p.poly_degree, "top_level": p.top_level, "security": p.security},
            "source_model": self.meta.get("source_model"),
            "pool": self.pool.info(),
            "capacity": self.gate.capacity if self.gate else None,
            "queue": {"running": self.gate.running if self.gate else 0,
                      "waiting": self.gate.waiting if self.gate else 0, "max": self.cfg.queue},
            "key_sets": len(self.store.keyset_ids()), "sessions": len(self.store.session_ids()),
            "limits": {"max_request_bytes": self.max_request, "max_key_bytes": self.max_keys,
                       "timeout_seconds": self.cfg.timeout, "worker_memory_bytes": self.memory_budget,
                       "session_ttl_seconds": self.cfg.session_ttl, "max_sessions": self.cfg.max_sessions,
                       "max_key_sets": self.cfg.max_key_sets, "key_sets_per_worker": self.key_cache,
                       "plaintext_cache_bytes": self.plaintext_cache},
            "predicted_seconds": self.predicted_seconds,
            "predicted_served_seconds": round(self.predicted_served_seconds, 3),
            "uptime_seconds": time.time() - self.started, "counts": self.counts,
        })

    async def client_file_handler(self, request):
        from aiohttp import web

        return web.Response(body=self.client_file, content_type="application/json")

    async def get_keys(self, request):
        from aiohttp import web

        ks = request.match_info["key_set"]
        if not self.store.has_keyset(ks):
            raise HttpError(404, f"unknown key set {ks[:16]}: upload its evaluation keys first (POST /v1/keys)")
        return web.json_response({"key_set": ks, "program_sha256": self.sha})

    async def post_keys(self, request):
        from aiohttp import web

        from ..backends.protocol import read_keys_json

        cl = request.content_length  # checked against the limit after the header (which names the program)
        if self.upload_slots.locked():
            raise HttpError(503, "two key uploads are already being received; retry shortly", 2)
        async with self.upload_slots:
            staged = self.store.new_staging()
            try:
                key_set, head = await self._receive_keys(request, staged, cl)
                if self.store.has_keyset(key_set):
                    return web.json_response({"key_set": key_set, "stored": False}, status=200)
                if len(self.store.keyset_ids()) >= self.cfg.max_key_sets:
                    raise HttpError(503, f"the server holds its maximum of {self.cfg.max_key_sets} key sets "
                                         "(--max-key-sets)")
                try:
                    meta = read_keys_json(self.prog, staged, self.backend_name, secret=False, evaluation=True)
                except HecError as e:
                    status = 409 if "another program" in str(e) or "other encryption parameters" in str(e) else 400
                    raise HttpError(status, str(e).replace(str(staged), "the uploaded keys")) from None
                listed = set((meta.get("files") or {}))
                sent = {n for n, _, _ in head} - {"keys.json"}
                if listed != sent:
                    raise HttpError(400, f"key upload: keys.json lists {sorted(listed)} but the upload holds "
                                         f"{sorted(sent)}")
                for name, _, sha in head:
                    if name != "keys.json" and meta["files"][name] != sha:
                        raise HttpError(400, f"key upload: {name} does not match keys.json (sha256)")
                if meta.get("key_set") != key_set:
                    raise HttpError(400, "key upload: the header and keys.json name different key sets")
                await self._job({"op": "validate", "key_set": key_set, "keys_dir": str(staged)})
                created = self.store.commit_keyset(staged, key_set)
                log.info("key set %s stored (%s)", key_set[:16], _fmt_bytes(sum(s for _, s, _ in head)))
                return web.json_response({"key_set": key_set, "stored": created}, status=201 if created else 200)
            finally:
                if staged.exists():
                    import shutil

                    shutil.rmtree(staged, ignore_errors=True)

    async def _receive_keys(self, request, staged: Path, cl: int | None):
        """Stream a key upload into ``staged``, checking it as it comes; returns (key_set, file list)."""
        r = request.content

        async def exactly(n: int, what: str) -> bytes:
            try:
                return await r.readexactly(n)
            except asyncio.IncompleteReadError as e:
                raise HttpError(400, f"key upload: truncated in {what} ({len(e.partial)} of {n} bytes)") from None

        first = await exactly(16, "the header")
        if first[:8] != wire.KEYS_MAGIC:
            raise HttpError(400, "not a key upload (bad magic); send the evaluation keys as hecompiler.client does")
        (hlen,) = struct.unpack_from("<Q", first, 8)
        if hlen > wire.MAX_HEADER:
            raise HttpError(400, f"key upload: header of {hlen} bytes is too large")
        raw = await exactly(hlen, "the header")
        try:
            head = json.loads(raw.decode("utf-8"))
            files = wire.check_upload_header(head)
        except wire.WireError as e:
            raise HttpError(400, str(e)) from None
        except (UnicodeDecodeError, ValueError) as e:
            raise HttpError(400, f"key upload: bad header ({type(e).__name__}: {e})") from None
        if head.get("program_sha256") != self.sha:
            raise HttpError(409, f"key upload: the keys were made for another program (program sha256 "
                                 f"{str(head.get('program_sha256'))[:16]}, this server runs {self.sha[:16]})")
        if head.get("params_fingerprint") != self.params_fp:
            raise HttpError(409, "key upload: the keys were made for other encryption parameters")
        if head.get("backend", self.backend_name) != self.backend_name:
            raise HttpError(409, f"key upload: {head.get('backend')} keys, this server runs {self.backend_name}")
        key_set = head["key_set"]
        if not valid_id(key_set):
            raise HttpError(400, "key upload: malformed key set id")
        total = 16 + hlen + sum(s for _, s, _ in files) + 32
        if total > self.max_keys or (cl is not None and cl > self.max_keys):
            raise HttpError(413, f"key upload of {max(total, cl or 0)} bytes is larger than this server's limit of "
                                 f"{self.max_keys} bytes (this program's evaluation keys are about "
                                 f"{_fmt_bytes(self.key_bytes)}; --max-key-bytes)")
        if cl is not None and cl != total:
            raise HttpError(400, f"key upload: Content-Length {cl} but the header describes {total} bytes")
        h = hashlib.sha256(first + raw)
        for name, size, sha in files:
            fh = hashlib.sha256()
            left = size
            with os.fdopen(os.open(staged / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                while left:
                    try:
                        chunk = await r.readexactly(min(left, wire.CHUNK))
                    except asyncio.IncompleteReadError as e:
                        raise HttpError(400, f"key upload: truncated in {name} ({size - left + len(e.partial)} of "
                                             f"{size} bytes)") from None
                    f.write(chunk)
                    fh.update(chunk)
                    h.update(chunk)
                    left -= len(chunk)
                f.flush()
                os.fsync(f.fileno())  # once per key set: what is committed to the store is on disk
            if fh.hexdigest() != sha:
                raise HttpError(400, f"key upload: {name} is corrupt (sha256 mismatch)")
        trailer = await exactly(32, "the trailer")
        if trailer != h.digest():
            raise HttpError(400, "key upload: corrupt (sha256 of the whole upload mismatch)")
        if await r.read(1):
            raise HttpError(400, "key upload: trailing bytes after the trailer")
        return key_set, files

    async def infer(self, request):
        key_set = request.headers.get(wire.H_KEY_SET)
        prog_id = request.headers.get(wire.H_PROGRAM)
        if prog_id is not None and prog_id != self.sha:
            raise HttpError(409, f"the request is for program {prog_id[:16]}, this server runs {self.sha[:16]}")
        body = await self._read(request, self.max_request, "request body")
        b = self._bundle(body, "inputs", key_set, "request body")
        if not self.store.has_keyset(b.key_set):
            raise HttpError(404, f"unknown key set {b.key_set[:16]}: upload its evaluation keys first (POST /v1/keys)")
        if len(self.store.session_ids()) >= self.cfg.max_sessions:
            raise HttpError(503, f"the server holds its maximum of {self.cfg.max_sessions} sessions "
                                 "(--max-sessions); retry later", self._retry_after())
        sid = secrets.token_hex(16)
        t = time.perf_counter()
        res = await self._job({"op": "start", "key_set": b.key_set, "keys_dir": str(self.store.keyset_dir(b.key_set)),
                               "inputs": body, "label": sid})
        now = time.time()
        s = Session(sid, b.key_set, now, now + self.cfg.session_ttl)
        answer = await self._commit_step(s, res, body)
        request["hec"] = f"session {sid[:8]} key set {b.key_set[:16]} -> {s.last_kind}"
        return self._answer(s, answer, time.perf_counter() - t)

    async def refresh(self, request):
        sid = request.match_info["sid"]
        s = self.store.load_session(sid)
        if s is None or s.expires <= time.time():
            raise HttpError(404, f"unknown session {sid[:16]}: it finished, expired (--session-ttl "
                                 f"{self.cfg.session_ttl:g} s) or never existed; send the inputs again")
        async with self._lock(sid):
            s = self.store.load_session(sid) or s
            body = await self._read(request, self.max_request, "refresh response")
            if body_sha(body) == s.last_body_sha and s.step > 1:
                request["hec"] = f"session {sid[:8]} replayed step {s.step}"
                return self._answer(s, self.store.read_answer(sid))
            if s.done:
                raise HttpError(409, f"session {sid[:16]} is finished: its outputs were sent")
            b = self._bundle(body, "response", s.key_set, "refresh response")
            rid = str(b.meta.get("request_id", ""))
            if rid != s.request_id:
                raise HttpError(409, f"the refresh response answers request {rid[:16] or '(none)'}, but session "
                                     f"{sid[:16]} waits for request {s.request_id[:16]} (stale or foreign response)")
            if not self.store.has_keyset(s.key_set):
                raise HttpError(404, f"key set {s.key_set[:16]} of session {sid[:16]} was deleted")
            try:
                state = self.store.read_state(sid)
            except OSError:
                raise HttpError(410, f"session {sid[:16]} lost its state (the store was changed); send the inputs "
                                     "again") from None
            t = time.perf_counter()
            res = await self._job({"op": "resume", "key_set": s.key_set,
                                   "keys_dir": str(self.store.keyset_dir(s.key_set)), "state": state,
                                   "response": body, "label": sid})
            answer = await self._commit_step(s, res, body)
            request["hec"] = f"session {sid[:8]} step {s.step} -> {s.last_kind}"
            return self._answer(s, answer, time.perf_counter() - t)

    async def get_session(self, request):
        from aiohttp import web

        sid = request.match_info["sid"]
        s = self.store.load_session(sid)
        if s is None:
            raise HttpError(404, f"unknown session {sid[:16]}")
        return web.json_response({"session": sid, "key_set": s.key_set, "step": s.step, "done": s.done,
                                  "waiting_for": s.request_id or None, "expires_in": s.expires - time.time()})

    async def delete_session(self, request):
        from aiohttp import web

        sid = request.match_info["sid"]
        if self.store.load_session(sid) is None:
            raise HttpError(404, f"unknown session {sid[:16]}")
        self.store.delete_session(sid)
        self.open_sessions.pop(sid, None)
        self.locks.pop(sid, None)
        return web.json_response({"session": sid, "deleted": True})

    # ------------------------------------------------------------------ app
    def app(self):
        from aiohttp import web

        @web.middleware
        async def errors(request, handler):
            t = time.perf_counter()
            self.counts["requests"] += 1
            status = 500
            try:
                if self.closing and request.path not in ("/health", "/v1/health") and not (
                        request.method == "POST" and request.match_info.get("sid") in self.open_sessions):
                    raise HttpError(503, "the server is shutting down; retry when it is back", 5)
                resp = await handler(request)
                status = resp.status
                self.counts["answers"] += 1
                return resp
            except HttpError as e:
                status = e.status
                self.counts["errors"] += 1
                headers = {"Retry-After": str(int(e.retry_after))} if e.retry_after else None
                log.info("%s %s %d %.3f s: %s", request.method, request.path, status, time.perf_counter() - t,
                         e.message)
                return web.Response(status=e.status, body=wire.error_json(e.message), content_type="application/json",
                                    headers=headers)
            except web.HTTPException as e:
                status = e.status
                self.counts["errors"] += 1
                return web.Response(status=e.status, body=wire.error_json(e.reason or "HTTP error"),
                                    content_type="application/json")
            except (ConnectionResetError, asyncio.CancelledError):
                status = 499
                raise
            except Exception as e:  # a bug: one line to the client, the trace to the log
                self.counts["errors"] += 1
                log.exception("internal error on %s %s", request.method, request.path)
                return web.Response(status=500, body=wire.error_json(f"internal error: {type(e).__name__}: {e}"),
                                    content_type="application/json")
            finally:
                if status < 400:
                    log.info("%s %s %d %.3f s%s", request.method, request.path, status, time.perf_counter() - t,
                             f" {request['hec']}" if "hec" in request else "")

        app = web.Application(middlewares=[errors], client_max_size=self.max_request)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/v1/client", self.client_file_handler)
        app.router.add_post("/v1/keys", self.post_keys)
        app.router.add_get("/v1/keys/{key_set}", self.get_keys)
        app.router.add_post("/v1/infer", self.infer)
        app.router.add_post("/v1/sessions/{sid}/refresh", self.refresh)
        app.router.add_get("/v1/sessions/{sid}", self.get_session)
        app.router.add_delete("/v1/sessions/{sid}", self.delete_session)
        return app


async def serve(cfg: ServeConfig, ready=None) -> None:
    """Run until SIGINT/SIGTERM.  ``ready(url)`` is called once the port is bound and the
    workers are up."""
    from aiohttp import web

    server = Server(cfg)
    await server.start()
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, shutdown_timeout=10.0)
    try:
        await site.start()
    except OSError as e:
        await server.close()
        await runner.cleanup()
        raise HecError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    sock = site._server.sockets[0]  # the bound port (--port 0 picks a free one)
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else '[' + host + ']'}:{port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    expiry = asyncio.create_task(server.expiry_loop())
    p = server.prog.params
    pool = (f"Dask scheduler {cfg.scheduler} ({server.pool.capacity} at once)" if cfg.scheduler else
            f"{cfg.workers} worker process(es), {_fmt_bytes(server.memory_budget)} memory budget each")
    pool += f", plaintext cache {_fmt_bytes(server.plaintext_cache)} per worker"
    log.info("serving %s (program %s, %s, N=%d) on %s: %s, queue %d, timeout %g s, store %s, %d key set(s) on disk",
             cfg.program, server.sha[:16], server.backend_name, p.poly_degree, url, pool, cfg.queue, cfg.timeout,
             server.store.base, len(server.store.keyset_ids()))
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening beyond loopback without TLS or authentication: put it behind an authenticating TLS "
                    "proxy when the network is not yours (the data itself stays encrypted)")
    if ready is not None:
        ready(url)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        expiry.cancel()
        await server.close(cfg.grace)
        await runner.cleanup()


def run_server(cfg: ServeConfig) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s hecompile serve: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)

    def ready(url: str) -> None:
        sys.stdout.write(f"listening on {url}\n")
        sys.stdout.flush()

    asyncio.run(serve(cfg, ready))
    return 0
