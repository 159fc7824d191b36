"""Where evaluation runs: a pool of local worker processes, or a Dask cluster.

Both offer ``await pool.run(job, deadline)`` (see :mod:`.engine` for jobs and answers) and
``capacity`` (jobs at once).  The server's front end admits at most ``capacity`` jobs, keeps at
most ``--queue`` more waiting (503 beyond), and gives each its deadline (``--timeout``).

Local pool (default).  ``--workers N`` processes (``spawn``: a clean interpreter, no forked
event loop), each loading the program once and caching key sets.  A process is used by one job
at a time.  While a job runs, its thread polls the worker: past the deadline the worker is
killed and replaced (the client gets 504), above the memory budget (``--worker-memory``,
resident set size read from /proc every 0.1 s) it is killed and replaced (503 naming the
budget), and a worker that dies (a crash in native code) is replaced (500).  The other workers
keep serving.  Workers get SIGKILL when the server process dies (``PR_SET_PDEATHSIG``).

Dask pool (``--scheduler ADDRESS``, the optional ``distributed`` extra).  The program is
scattered to every worker once at start and each key set once when first used (broadcast); a
job is one Dask task (one evaluation segment: the whole inference when the program needs no
client-aided refresh).  Dask cannot stop a running task: past the deadline the client gets 504
and the task's result is dropped.  Memory limits are the Dask workers' own (``dask worker
--memory-limit``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import time
from pathlib import Path

from ..errors import HecError
from .engine import proc_rss


class PoolError(HecError):
    """A job could not be run; ``status`` is the HTTP status the client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _fmt(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


class _Worker:
    """The server's handle on one worker process (its methods block: they run in a thread)."""

    def __init__(self, pool: "LocalPool", index: int):
        self.pool = pool
        self.index = index
        self.proc = None
        self.conn = None
        self.peak_rss = 0
        self.jobs = 0
        self.restarts = 0
        self.key_loads = 0  # by this worker's processes, restarts included
        self._loads_now = 0  # by its current process

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        from .engine import worker_main

        p = ctx.Process(target=worker_main, name=f"hecompile-serve-worker-{self.index}",
                        args=(child, self.pool.hec_path, self.pool.key_cache, self.pool.verify_key, os.getpid(),
                              self.pool.log_interval, self.pool.plaintext_cache, self.pool.warm), daemon=True)
        p.start()
        child.close()
        self.proc, self.conn = p, parent
        self._loads_now = 0
        deadline = time.monotonic() + self.pool.start_timeout
        while not parent.poll(0.2):
            if not p.is_alive() or time.monotonic() > deadline:
                self.kill()
                raise PoolError(500, f"worker {self.index} did not start (exit code {p.exitcode})")
        try:
            msg = parent.recv()
        except (EOFError, OSError):
            self.kill()
            raise PoolError(500, f"worker {self.index} died while starting") from None
        if not msg.get("ok"):
            self.kill()
            raise PoolError(500, f"worker {self.index}: {msg.get('error')}")

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(5)
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.proc = self.conn = None

    def stop(self) -> None:
        if self.conn is not None and self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(2)
            except (OSError, ValueError):
                pass
        self.kill()

    def call(self, job: dict, deadline: float) -> dict:
        if self.pool.closing:
            raise PoolError(503, "the server is shutting down; retry when it is back")
        if self.proc is None or not self.proc.is_alive():
            self.kill()
            self.restarts += 1
            self.start()
        proc, conn = self.proc, self.conn  # kill() from another thread (shutdown) clears the fields
        pid = proc.pid

        def died(what: str) -> PoolError:
            code = proc.exitcode
            self.kill()
            return PoolError(500, f"the worker died {what} (exit code {code}); it was restarted, the other "
                                  "requests were not affected")

        try:
            conn.send(job)
        except (OSError, ValueError, AttributeError):
            raise died("before the job reached it") from None
        budget = self.pool.memory_budget

        def over_budget(rss: int) -> PoolError:
            self.kill()
            return PoolError(503, f"the evaluation needed more than the worker memory budget of {_fmt(budget)} "
                                  f"(--worker-memory; it reached {_fmt(rss)}); the worker was restarted")

        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise PoolError(504, f"the evaluation took longer than this server's per-request timeout of "
                                     f"{self.pool.timeout:g} s (--timeout); the worker was stopped")
            try:
                ready = conn.poll(min(0.1, left))
            except (OSError, ValueError):
                raise died("while evaluating") from None
            if ready:
                try:
                    out = conn.recv()
                except (EOFError, OSError, ValueError):
                    raise died("while evaluating") from None
                self.jobs += 1
                rss, peak = proc_rss(pid)
                self.peak_rss = max(self.peak_rss, peak)
                if budget and rss > budget:  # a job quicker than one poll is held to the budget too
                    raise over_budget(rss)
                loads = int(out.get("key_loads", self._loads_now))
                self.key_loads += max(0, loads - self._loads_now)
                self._loads_now = loads
                return out
            if not proc.is_alive():
                raise died("while evaluating")
            if budget:
                rss = proc_rss(pid)[0]
                self.peak_rss = max(self.peak_rss, rss)
                if rss > budget:
                    raise over_budget(rss)

    def info(self) -> dict:
        alive = self.proc is not None and self.proc.is_alive()
        cur, peak = proc_rss(self.proc.pid) if alive else (0, 0)
        self.peak_rss = max(self.peak_rss, peak)
        return {"pid": self.proc.pid if alive else None, "rss_bytes": cur, "peak_rss_bytes": self.peak_rss,
                "jobs": self.jobs, "restarts": self.restarts, "key_loads": self.key_loads}


class LocalPool:
    kind = "local"

    def __init__(self, hec_path: str, workers: int, timeout: float, memory_budget: int, key_cache: int,
                 verify_key=None, log_interval: float = 10.0, start_timeout: float = 300.0,
                 plaintext_cache: int | None = None, warm: bool = False):
        self.hec_path = str(Path(hec_path).resolve())
        self.plaintext_cache = plaintext_cache
        #: workers fill their plaintext cache before they say ready (engine.Engine._warm)
        self.warm = warm
        self.n = max(1, int(workers))
        self.timeout = timeout
        self.memory_budget = memory_budget
        self.key_cache = key_cache
        self.verify_key = verify_key
        self.log_interval = log_interval
        self.start_timeout = start_timeout
        self.workers = [_Worker(self, i) for i in range(self.n)]
        self.threads = concurrent.futures.ThreadPoolExecutor(self.n, thread_name_prefix="hec-worker")
        self.idle: asyncio.Queue | None = None
        self.closing = False

    @property
    def capacity(self) -> int:
        return self.n

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.idle = asyncio.Queue()
        await asyncio.gather(*(loop.run_in_executor(self.threads, w.start) for w in self.workers))
        for w in self.workers:
            self.idle.put_nowait(w)

    async def run(self, job: dict, deadline: float) -> dict:
        loop = asyncio.get_running_loop()
        left = deadline - time.monotonic()
        try:
            w = await asyncio.wait_for(self.idle.get(), max(left, 0.001))
        except asyncio.TimeoutError:
            raise PoolError(504, f"no worker became free within this server's per-request timeout of "
                                 f"{self.timeout:g} s (--timeout)") from None
        try:
            return await loop.run_in_executor(self.threads, w.call, job, deadline)
        finally:
            self.idle.put_nowait(w)

    def info(self) -> dict:
        return {"kind": self.kind, "workers": [w.info() for w in self.workers]}

    async def close(self) -> None:
        self.closing = True
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, w.stop) for w in self.workers), return_exceptions=True)
        self.threads.shutdown(wait=False, cancel_futures=True)


class DaskPool:
    kind = "dask"

    def __init__(self, address: str, hec_path: str, program_sha256: str, timeout: float, key_cache: int,
                 capacity: int | None = None, plaintext_cache: int | None = None):
        self.address = address
        self.plaintext_cache = plaintext_cache
        self.hec_path = hec_path
        self.sha = program_sha256
        self.timeout = timeout
        self.key_cache = key_cache
        self._capacity = capacity
        self.client = None
        self._hec = None
        self._keys: dict[str, object] = {}
        self._key_locks: dict[str, asyncio.Lock] = {}
        self.jobs = 0

    @property
    def capacity(self) -> int:
        return self._capacity or 1

    async def start(self) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise HecError("--scheduler needs Dask distributed: pip install 'hecompiler[distributed]'") from None
        try:
            self.client = await asyncio.wait_for(Client(self.address, asynchronous=True, timeout=30), 60)
        except (OSError, asyncio.TimeoutError, TimeoutError) as e:
            raise HecError(f"--scheduler {self.address}: cannot connect to the Dask scheduler ({e or type(e).__name__})") \
                from None
        info = self.client.scheduler_info()
        workers = info.get("workers", {})
        if not workers:
            try:
                await self.client.wait_for_workers(1, timeout=60)
            except (asyncio.TimeoutError, TimeoutError):
                raise HecError(f"--scheduler {self.address}: the cluster has no workers") from None
            workers = self.client.scheduler_info().get("workers", {})
        if self._capacity is None:
            self._capacity = max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
        data = Path(self.hec_path).read_bytes()
        (self._hec,) = await self.client.scatter([data], broadcast=True, hash=False)  # the program, shipped once

    async def _key_future(self, key_set: str, keys_dir: str):
        fut = self._keys.get(key_set)
        if fut is not None:
            return fut
        lock = self._key_locks.setdefault(key_set, asyncio.Lock())
        async with lock:
            fut = self._keys.get(key_set)
            if fut is None:
                d = Path(keys_dir)
                files = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.name != "secret.key"}
                # one future for the whole key set (a dict would be scattered item by item), shipped once
                (fut,) = await self.client.scatter([files], broadcast=True, hash=False)
                self._keys[key_set] = fut
        return fut

    def forget_keys(self, key_set: str) -> None:
        fut = self._keys.pop(key_set, None)
        if fut is not None:
            fut.release()

    async def run(self, job: dict, deadline: float) -> dict:
        from .engine import dask_run

        kf = await self._key_future(job["key_set"], job["keys_dir"])
        job = {k: v for k, v in job.items() if k != "keys_dir"}
        fut = self.client.submit(dask_run, self._hec, self.sha, kf, job, self.key_cache, self.plaintext_cache,
                                 pure=False)
        try:
            out = await asyncio.wait_for(fut, max(0.001, deadline - time.monotonic()))
        except (asyncio.TimeoutError, TimeoutError):
            fut.cancel()
            raise PoolError(504, f"the evaluation took longer than this server's per-request timeout of "
                                 f"{self.timeout:g} s (--timeout)") from None
        except Exception as e:  # a worker lost, a task failed to deserialize, ...
            raise PoolError(500, f"the Dask cluster could not run the evaluation: {type(e).__name__}: {e}") from None
        if job["op"] == "validate" and not out.get("ok"):
            self.forget_keys(job["key_set"])
        self.jobs += 1
        return out

    def info(self) -> dict:
        try:
            n = len(self.client.scheduler_info().get("workers", {}))
        except Exception:
            n = None
        return {"kind": self.kind, "scheduler": self.address, "dask_workers": n, "capacity": self.capacity,
                "jobs": self.jobs, "key_sets_shipped": len(self._keys)}

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.close()
            except Exception:
                pass
