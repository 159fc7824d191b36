"""What runs in a worker: the program loaded once, key sets loaded once each, evaluation steps.

An :class:`Engine` lives in each worker process (``hecompile serve --workers N``) or in each
Dask worker (``--scheduler``).  It holds the program (loaded and validated once, its sha256
pinned) and a small LRU of the backend's server sides by key set: the Galois keys are read and
deserialized once per worker, not once per request.  A job is a dict; the answer is a dict
(plain bytes and numbers, so it crosses a pipe or Dask unchanged)::

    {"op": "validate", "key_set", "keys_dir" | "key_files"}                 load and check a key set
    {"op": "start", "key_set", "keys_dir" | "key_files", "inputs", "label"}   first step
    {"op": "resume", ..., "state", "response", "label"}                       after a refresh

    -> {"ok": True, "state", "request" | None, "outputs" | None, "seconds", "stats", "rss"}
    -> {"ok": False, "status", "error"}   status 400: the client's data was refused; 500: ours

Steps are the protocol's :func:`~hecompiler.backends.protocol.server_start` and
:func:`~hecompiler.backends.protocol.server_step`, so every bundle is checked against the
program, the parameters and the key set exactly as the file-based ``hecompile eval`` does.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from typing import Any

from ..errors import HecError


def one_process() -> None:
    """A serving worker evaluates in its own process only: no helper processes share its linear ops
    (hecompiler.parallel), since the pool holds each worker to its memory budget by that process's
    resident memory, and ``--workers`` is how a server uses its cores.  ``$HECOMPILER_PROCESSES``
    set for the server still decides."""
    os.environ.setdefault("HECOMPILER_PROCESSES", "1")


def proc_rss(pid: int | str = "self") -> tuple[int, int]:
    """(current, peak) resident set size of process ``pid``, bytes (Linux /proc; 0 elsewhere)."""
    cur = peak = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return cur, peak


class Engine:
    def __init__(self, hec_path: str, key_cache: int = 2, verify_key=None, log_interval: float = 10.0,
                 plaintext_cache: int | None = None, warm: bool = False):
        from .. import backends
        from ..backends.protocol import pin_program_sha256
        from ..hecfile import load_hec

        self.prog, self.meta = load_hec(hec_path, verify_key=verify_key)
        self.sha = pin_program_sha256(self.prog)
        self.backend_name = backends.for_program(self.meta)
        self.backend = backends.get(self.backend_name)
        self.key_cache = max(1, int(key_cache))
        self.servers: OrderedDict[str, Any] = OrderedDict()
        self.key_loads = 0  # key sets read and deserialized (once each while cached)
        #: encoded plaintexts, shared by the key sets (see _share_plaintexts): a cache of
        #: ``plaintext_cache`` bytes, or (None) the first executor's default one
        self.ptcache = None
        if plaintext_cache is not None:
            from ..plaintexts import PlaintextCache

            self.ptcache = PlaintextCache(plaintext_cache)
        #: what warming the cache did (Executor.warm's statistics), when it was warmed
        self.warm_stats = self._warm() if warm else None
        self.log_interval = log_interval
        from ..executor import total_work, work_units

        self.total = total_work(self.prog)
        self._prefix = [0]
        for ins in self.prog.instrs:
            self._prefix.append(self._prefix[-1] + work_units(self.prog, ins))

    def _warm(self):
        """Fill the plaintext cache before any request, with the backend's key-less encoder
        (``plaintext_encoder``): the first inference then encodes no more than a later one."""
        make = getattr(self.backend, "plaintext_encoder", None)
        if make is None or self.ptcache is None or not self.ptcache.budget:
            return None
        from ..executor import Executor

        ex = Executor(self.prog, make(self.prog), None, plaintext_cache_bytes=0)
        ex.ptcache = self.ptcache
        return ex.warm()

    # ------------------------------------------------------------------ key sets
    def server(self, key_set: str, keys_dir: str | None = None, key_files: dict | None = None):
        srv = self.servers.get(key_set)
        if srv is not None:
            self.servers.move_to_end(key_set)
            return srv
        while len(self.servers) >= self.key_cache:
            self.servers.popitem(last=False)
        tmp = None
        try:
            if keys_dir is None:  # Dask: the key files came with the task; the backend reads a directory
                if not key_files:
                    raise HecError(f"key set {key_set[:16]}: no key files")
                tmp = tempfile.mkdtemp(prefix="hec-keys-")
                for name, data in key_files.items():
                    if "/" in name or name in (".", "..") or name == "secret.key":
                        raise HecError(f"key set {key_set[:16]}: refusing key file {name!r}")
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(data)
                keys_dir = tmp
            srv = self.backend.open_server(self.prog, keys_dir, self.meta)
            self.key_loads += 1
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self._share_plaintexts(srv)
        if getattr(srv, "key_set", key_set) != key_set:
            raise HecError(f"the key files are key set {srv.key_set[:16]}, not {key_set[:16]}")
        if getattr(srv, "has_secret_key", False):
            raise HecError(f"key set {key_set[:16]} holds a secret key: refused")
        self.servers[key_set] = srv
        return srv

    def _share_plaintexts(self, srv) -> None:
        """One cache of encoded plaintexts for every key set of this worker: a plaintext depends on
        the program and the parameters, not on the keys, so a second key set costs its keys only
        (the digits model: ~300 MiB more per key set with a cache each, ~40 MiB shared).  Every key
        set of a program has the same parameters, so a plaintext encoded under one is valid under
        another (SEAL checks the parameter id, Lattigo the ring)."""
        ex = getattr(srv, "ex", None)
        if ex is None or not hasattr(ex, "ptcache"):
            return
        if self.ptcache is None:
            self.ptcache = ex.ptcache
        else:
            ex.ptcache = self.ptcache

    # ------------------------------------------------------------------ jobs
    def run(self, job: dict) -> dict:
        out = self._run(job)
        out["key_loads"] = self.key_loads
        return out

    def _run(self, job: dict) -> dict:
        t0 = time.perf_counter()
        op = job.get("op")
        label = str(job.get("label", ""))[:8]
        try:
            try:
                srv = self.server(job["key_set"], job.get("keys_dir"), job.get("key_files"))
            except HecError as e:
                status = 400 if op == "validate" else 500
                return {"ok": False, "status": status, "error": f"key set {str(job.get('key_set'))[:16]}: {e}"}
            if op == "validate":
                return {"ok": True, "seconds": time.perf_counter() - t0, "rss": proc_rss()}
            return self._step(srv, job, label, t0)
        except HecError as e:
            return {"ok": False, "status": 400, "error": str(e)}
        except MemoryError:
            return {"ok": False, "status": 503, "error": "the worker ran out of memory"}
        except Exception as e:  # a bug: say so, keep serving
            traceback.print_exc(file=sys.stderr)
            return {"ok": False, "status": 500, "error": f"internal error in the worker: {type(e).__name__}: {e}"}

    def _step(self, srv, job: dict, label: str, t0: float) -> dict:
        from ..backends import protocol as P
        from ..executor import ProgressLog

        prog = self.prog
        if job["op"] == "start":
            state = P.server_start(prog, srv, P.Bundle.from_bytes(job["inputs"], "the inputs"))
            response = None
        elif job["op"] == "resume":
            state = P.Bundle.from_bytes(job["state"], "the session state")
            response = P.Bundle.from_bytes(job["response"], "the refresh response")
        else:
            raise HecError(f"unknown job {job['op']!r}")
        pc = int(state.meta.get("pc", 0)) if job["op"] == "resume" else 0
        log = ProgressLog(self.total, f"session {label} eval", tty=False, interval=self.log_interval,
                          prefix="hecompile serve: ")
        log.done = self._prefix[min(pc, len(self._prefix) - 1)]
        try:
            st, req, outs = P.server_step(prog, srv, state, response, progress=log)
        finally:
            log.close()
        stats = (outs.meta.get("stats") if outs is not None else None) or {}
        return {"ok": True, "state": st.to_bytes(), "request": req.to_bytes() if req is not None else None,
                "outputs": outs.to_bytes() if outs is not None else None, "seconds": time.perf_counter() - t0,
                "stats": {k: stats.get(k) for k in ("eval_seconds", "refreshes", "refresh_round_trips",
                                                     "peak_rss_bytes")},
                "rss": proc_rss()}


# =========================================================================== local worker process

def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the server process dies (even by SIGKILL), so no
    orphaned worker keeps evaluating and holding keys."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def worker_main(conn, hec_path: str, key_cache: int, verify_key, parent_pid: int, log_interval: float,
                plaintext_cache: int | None = None, warm: bool = False) -> None:
    """A local worker process: load the program, say ready, answer jobs until the pipe closes."""
    import signal

    _die_with_parent()
    one_process()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops its workers itself
    if os.getppid() != parent_pid:
        return
    try:
        eng = Engine(hec_path, key_cache, verify_key, log_interval, plaintext_cache, warm)
    except HecError as e:
        conn.send({"ok": False, "status": 500, "error": str(e)})
        return
    if eng.warm_stats is not None:
        c = eng.ptcache
        sys.stderr.write(f"hecompile serve: worker {os.getpid()}: {eng.warm_stats.plaintexts} plaintexts encoded "
                         f"ahead in {eng.warm_stats.encode_seconds:.1f} s ({c.bytes / 2**20:.0f} MiB of the "
                         f"{c.budget / 2**20:.0f} MiB cache)\n")
        sys.stderr.flush()
    conn.send({"ok": True, "ready": os.getpid(), "rss": proc_rss()})
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            conn.send(eng.run(job))
        except (BrokenPipeError, OSError):
            return


# =========================================================================== Dask task

_ENGINES: dict[str, Engine] = {}


def dask_run(hec_bytes: bytes, hec_sha: str, key_files: dict | None, job: dict, key_cache: int = 2,
             plaintext_cache: int | None = None) -> dict:
    """One job on a Dask worker.  ``hec_bytes`` and ``key_files`` are futures the server scattered
    once (broadcast): Dask hands each worker its copy, the Engine here loads them once."""
    eng = _ENGINES.get(hec_sha)
    if eng is None:
        one_process()
        fd, path = tempfile.mkstemp(prefix="hec-prog-", suffix=".hec")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(hec_bytes)
            eng = Engine(path, key_cache, plaintext_cache=plaintext_cache)
        finally:
            os.unlink(path)
        if eng.sha != hec_sha:
            return {"ok": False, "status": 500, "error": "the program shipped to the Dask worker has another sha256"}
        _ENGINES[hec_sha] = eng
    job = dict(job)
    job["key_files"] = key_files
    job["keys_dir"] = None
    out = eng.run(job)
    try:
        from distributed import get_worker

        out["worker"] = get_worker().address
    except Exception:
        pass
    return out
