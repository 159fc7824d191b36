"""The client of ``hecompile serve``: keys once, then ``infer(x)`` returns the decrypted output.

::

    from hecompiler.client import Client

    c = Client("digits.client", "http://127.0.0.1:8000", "my-keys")   # a client file or the .hec
    c.ensure_keys()          # first time: a new key set in my-keys/, evaluation keys uploaded
    y = c.infer(x)           # encrypt, evaluate on the server (answering its refresh requests), decrypt
    ys = c.infer_many(xs, concurrency=4)

The client holds the secret key (``KEYS_DIR``, mode 0700 files 0600) and never sends it: it uploads
``KEYS_DIR/evaluation`` (the server key directory of its key set), checked to hold no secret key.
It needs no weights: a client file (``hecompile export-client``) is enough, and a ``.hec`` is
reduced to its client view on load.  Everything it sends and receives is a protocol bundle bound
to the program and the key set, checked on both sides.

Failures are one-line :class:`ServerError` (the server's status and reason) or
:class:`ConnectionLost` (the server stopped or restarted mid-request: a request that was being
evaluated then gets this error, not a hang; a step is retried ``retries`` times first, since a
session's steps can be resent safely: the server keeps its state on disk and replays answers).
Standard library only (``http.client``): the client side needs no web framework.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np

from .errors import HecError

EVALUATION_SUBDIR = "evaluation"


class ServerError(HecError):
    """The server refused a request; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ConnectionLost(HecError):
    """The server could not be reached, or the connection broke during a request."""


class Client:
    def __init__(self, program, url: str, keys_dir: str | os.PathLike, *, timeout: float | None = None,
                 retries: int = 2, verify_key=None, log: Callable[[str], Any] | None = None):
        from . import backends
        from .clientfile import ClientProgram, load_for_client

        self.prog: ClientProgram = program if isinstance(program, ClientProgram) else load_for_client(program,
                                                                                                        verify_key)
        self.backend = backends.get(self.prog.backend)
        u = urlsplit(url if "://" in url else "http://" + url)
        if u.scheme != "http" or not u.hostname:
            raise HecError(f"--url {url}: expected http://HOST:PORT (put TLS in front with a proxy)")
        self.url = f"http://{u.netloc}"
        self.host, self.port = u.hostname, u.port or 80
        self.base = u.path.rstrip("/")
        self.keys_dir = Path(keys_dir)
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.log = log or (lambda msg: None)
        self._side = None
        self._lock = threading.Lock()  # the key holder's SEAL objects, one call at a time
        self.uploaded = False
        self.created = False
        self.server_info: dict | None = None

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body=None, headers: Mapping[str, str] | None = None,
                 what: str = "", timeout: float | None = None) -> tuple[int, dict, bytes]:
        hdrs = {"User-Agent": "hecompiler-client", **(headers or {})}
        if callable(body):  # a stream made afresh for every attempt
            body = body()
        if body is not None and "Content-Length" not in hdrs:
            hdrs["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout or 600.0)
        try:
            conn.request(method, self.base + path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        except (ConnectionError, socket.timeout, TimeoutError, OSError, http.client.HTTPException) as e:
            reason = type(e).__name__ if not str(e) else f"{type(e).__name__}: {e}"
            if isinstance(e, ConnectionRefusedError):
                raise ConnectionLost(f"{self.url}: no server is listening ({what or path}): it is not running, or "
                                     "it stopped or restarted") from None
            if isinstance(e, (socket.timeout, TimeoutError)):
                raise ConnectionLost(f"{self.url}: no answer within {timeout or self.timeout or 600.0:g} s during "
                                     f"{what or path}; the server is stuck or gone") from None
            raise ConnectionLost(f"{self.url}: the connection broke during {what or path} ({reason}): the server "
                                 "stopped or restarted") from None
        finally:
            conn.close()

    @staticmethod
    def _error(status: int, data: bytes) -> ServerError:
        try:
            msg = json.loads(data.decode("utf-8"))["error"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            msg = data[:200].decode("utf-8", "replace") or http.client.responses.get(status, "error")
        return ServerError(status, f"server answered {status}: {' '.join(str(msg).split())}")

    def _call(self, method: str, path: str, body=None, headers=None, what: str = "", ok=(200,),
              retry: bool = True, timeout: float | None = None) -> tuple[dict, bytes]:
        """A request with retries on a lost connection and on 503 (busy), bounded."""
        attempt = 0
        while True:
            try:
                status, h, data = self._request(method, path, body, headers, what, timeout)
            except ConnectionLost as e:
                if not retry or attempt >= self.retries:
                    raise
                attempt += 1
                self.log(f"hecompile query: {e}; retrying ({attempt}/{self.retries})")
                time.sleep(min(8.0, 0.5 * 2 ** attempt))
                continue
            if status in ok:
                return h, data
            if status == 503 and "retry-after" in h and retry and attempt < self.retries + 3:
                attempt += 1  # busy or restarting (a 503 without Retry-After, e.g. a memory budget, is final)
                wait = min(30.0, float(h.get("retry-after", "1") or 1))
                self.log(f"hecompile query: server busy, retrying in {wait:g} s")
                time.sleep(wait)
                continue
            raise self._error(status, data)

    def health(self) -> dict:
        """The server's /health, checked: it must serve this program."""
        from .backends.protocol import program_sha256

        _, data = self._call("GET", "/v1/health", what="GET /v1/health", timeout=30.0)
        info = json.loads(data.decode("utf-8"))
        if info.get("program_sha256") != program_sha256(self.prog):
            raise HecError(f"{self.url} serves program {str(info.get('program_sha256'))[:16]} "
                           f"({info.get('source_model')}), not this one ({program_sha256(self.prog)[:16]}): wrong "
                           "server or wrong program file")
        if self.timeout is None:  # wait as long as the server may take, and a little more
            self.timeout = float((info.get("limits") or {}).get("timeout_seconds") or 600.0) + 30.0
        self.server_info = info
        return info

    # ------------------------------------------------------------------ keys
    @property
    def evaluation_dir(self) -> Path:
        return self.keys_dir / EVALUATION_SUBDIR

    def _open(self):
        if self._side is None:
            self._side = self.backend.open_client(self.prog, self.keys_dir, self.prog.meta)
        return self._side

    @property
    def key_set(self) -> str:
        return self._open().key_set

    def keygen(self) -> str:
        """A new key set: the secret and public key in ``keys_dir``, the evaluation keys in
        ``keys_dir/evaluation`` (what is uploaded)."""
        self._side = self.backend.client_keygen(self.prog, self.keys_dir, self.evaluation_dir, self.prog.meta)
        self._side = None  # reopen from disk: what later runs will use
        self.created = True
        return self.key_set

    def upload_keys(self) -> None:
        from .serving.wire import KeyUpload

        up = KeyUpload(self.evaluation_dir, self.keys_dir / "secret.key")
        if up.key_set != self.key_set:
            raise HecError(f"{self.evaluation_dir}: holds key set {up.key_set[:16]}, but {self.keys_dir} is key set "
                           f"{self.key_set[:16]}")
        self._call("POST", "/v1/keys", body=lambda: iter(up), what="the key upload", ok=(200, 201),
                   headers={"Content-Length": str(len(up)), "Content-Type": "application/octet-stream"})
        self.uploaded = True

    def ensure_keys(self) -> str:
        """The key set to use: created in ``keys_dir`` when it does not exist (or is empty), and its
        evaluation keys uploaded when the server does not hold them.  Returns the key-set id."""
        if self.server_info is None:
            self.health()
        d = self.keys_dir
        if not d.exists() or (d.is_dir() and not any(d.iterdir())):
            self.keygen()
            self.log(f"hecompile query: new key set {self.key_set[:16]} in {d} (secret: keep it)")
        ks = self.key_set
        try:
            self._call("GET", f"/v1/keys/{ks}", what="the key-set check", retry=True, timeout=30.0)
        except ServerError as e:
            if e.status != 404:
                raise
            if not (self.evaluation_dir / "keys.json").exists():
                raise HecError(f"the server does not hold key set {ks[:16]} and {self.evaluation_dir} has no "
                               "evaluation keys to upload; use a new --keys directory") from None
            self.upload_keys()
            self.log(f"hecompile query: uploaded the evaluation keys of key set {ks[:16]}")
        return ks

    # ------------------------------------------------------------------ inference
    def _feeds(self, x) -> dict[str, np.ndarray]:
        from .inputs import check_input

        if isinstance(x, Mapping):
            feeds = dict(x)
        else:
            if len(self.prog.inputs) != 1:
                raise HecError(f"the program has {len(self.prog.inputs)} inputs; pass a dict name -> array")
            feeds = {self.prog.inputs[0].name: x}
        out = {}
        for name, arr in feeds.items():
            for line in check_input(self.prog, self.prog.meta, name, arr, f"input {name!r}"):
                self.log(line)
            out[name] = np.asarray(arr, dtype=np.float64)
        return out

    def infer_all(self, x) -> dict[str, np.ndarray]:
        """Every output of one inference, by name."""
        from .backends import protocol as P

        feeds = self._feeds(x)
        side = self._open()
        with self._lock:
            body = P.client_encrypt(self.prog, side, feeds).to_bytes()
        ks = side.key_set
        reuploaded = False
        while True:
            try:
                h, data = self._call("POST", "/v1/infer", body=body, what="the encrypted inputs",
                                     headers={"X-Hec-Key-Set": ks, "X-Hec-Program": P.program_sha256(self.prog),
                                              "Content-Type": "application/octet-stream"})
                break
            except ServerError as e:
                if e.status == 404 and "unknown key set" in str(e) and not reuploaded:
                    self.log(f"hecompile query: the server lost key set {ks[:16]}; uploading it again")
                    self.upload_keys()
                    reuploaded = True
                    continue
                raise
        sid = h.get("x-hec-session", "")
        steps = 0
        while True:
            step = h.get("x-hec-step")
            ans = P.Bundle.from_bytes(data, f"the server's answer (session {sid[:8]})")
            if step == "done":
                with self._lock:
                    outs = P.client_decrypt(self.prog, side, ans)
                try:
                    self._request("DELETE", f"/v1/sessions/{sid}", what="the session cleanup", timeout=10.0)
                except HecError:
                    pass
                return outs
            if step != "refresh":
                raise HecError(f"{self.url}: unexpected answer step {step!r}")
            steps += 1
            if steps > 100000:
                raise HecError(f"{self.url}: session {sid[:8]} does not end")
            with self._lock:
                resp = P.client_refresh(self.prog, side, ans).to_bytes()
            h, data = self._call("POST", f"/v1/sessions/{sid}/refresh", body=resp,
                                 what=f"refresh {steps} of session {sid[:8]}",
                                 headers={"Content-Type": "application/octet-stream"})

    def infer(self, x):
        """The decrypted output of one inference (a dict by name when the program has several)."""
        outs = self.infer_all(x)
        return outs[self.prog.outputs[0].name] if len(self.prog.outputs) == 1 else outs

    def infer_many(self, xs: Sequence[Any], concurrency: int = 1,
                   progress: Callable[[int], Any] | None = None) -> list:
        """``infer`` on each input, ``concurrency`` at once; the first failure is raised (the
        others still running finish first, none is started after it)."""
        xs = list(xs)
        results: list = [None] * len(xs)
        failed: list[BaseException] = []
        stop = threading.Event()

        def one(i):
            if stop.is_set():
                return
            try:
                results[i] = self.infer(xs[i])
            except BaseException as e:  # noqa: BLE001  (re-raised below)
                failed.append(e)
                stop.set()
                return
            if progress is not None:
                progress(1)

        if concurrency <= 1:
            for i in range(len(xs)):
                one(i)
                if failed:
                    break
        else:
            with ThreadPoolExecutor(max(1, int(concurrency)), thread_name_prefix="hec-query") as ex:
                list(ex.map(one, range(len(xs))))
        if failed:
            raise failed[0]
        return results


def split_batch(prog, x: np.ndarray) -> tuple[list[np.ndarray], str]:
    """The queries in an input array: ``x`` shaped like the program's input is one query; ``[N,
    *input shape]`` is N queries (``"stack"``); with an input batch of 1, ``[N, *input shape[1:]]``
    is N queries (``"concat"``)."""
    if len(prog.inputs) != 1:
        raise HecError(f"the program has {len(prog.inputs)} inputs; use the Python API (hecompiler.client)")
    shape = tuple(prog.inputs[0].shape)
    x = np.asarray(x)
    if x.shape == shape:
        return [x], "one"
    if x.ndim == len(shape) + 1 and x.shape[1:] == shape:
        return [x[i] for i in range(x.shape[0])], "stack"
    if shape and shape[0] == 1 and x.ndim == len(shape) and x.shape[1:] == shape[1:]:
        return [x[i:i + 1] for i in range(x.shape[0])], "concat"
    raise HecError(f"input shape {list(x.shape)}: the program takes {list(shape)}; give one input of that shape or "
                   f"N of them as [N, {', '.join(map(str, shape[1:] if shape and shape[0] == 1 else shape))}]")


def join_batch(ys: list, how: str):
    if how == "one":
        return ys[0]
    if isinstance(ys[0], dict):
        return {k: join_batch([y[k] for y in ys], how) for k in ys[0]}
    return np.stack(ys) if how == "stack" else np.concatenate(ys, axis=0)
