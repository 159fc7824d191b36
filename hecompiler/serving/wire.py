"""What travels between ``hecompile query`` (or :mod:`hecompiler.client`) and ``hecompile serve``.

Ciphertexts travel as the protocol's bundles (:class:`hecompiler.backends.protocol.Bundle`:
inputs, refresh requests and responses, outputs), each bound to the program, the parameters and
the key set.  Evaluation keys travel once per key set as a *key upload*::

    b"HECKEYS1"                  magic + version
    uint64 LE  header length H   (at most 1 MiB)
    H bytes    UTF-8 JSON: {"key_set", "program_sha256", "params_fingerprint", "backend",
                            "files": [[name, size, sha256], ...]}
    payloads   the files' bytes, in header order
    32 bytes   sha256 of everything above

The files are those of a *server* key directory (:mod:`hecompiler.backends.protocol`):
``keys.json`` and the evaluation keys it lists.  The uploader refuses to send a directory that
holds a secret key (by name, by ``keys.json`` and by content: no file equal to the client's
``secret.key``); the server refuses the name ``secret.key``, a ``keys.json`` saying it holds one,
and then loads every file as the kind of key it claims to be.

HTTP API (``/v1``; every error is a JSON object ``{"error": "<one line>"}`` with a 4xx/5xx status):

=========================================  ====================================================
GET    /health, /v1/health                 program id, backend, workers, queue, limits
GET    /v1/client                          the client file (hecompile export-client) of the program
POST   /v1/keys                            a key upload; 201 (stored) or 200 (already there)
GET    /v1/keys/{key_set}                  200 if the server holds that key set, else 404
POST   /v1/infer                           an ``inputs`` bundle; answers a step (below)
POST   /v1/sessions/{id}/refresh           a ``response`` bundle; answers the next step
GET    /v1/sessions/{id}                   where a session stands
DELETE /v1/sessions/{id}                   forget a session
=========================================  ====================================================

A step's answer is a bundle with headers ``X-Hec-Session`` (the session id), ``X-Hec-Step``
(``refresh``: the body is a refresh request for the key holder; ``done``: the body holds the
encrypted outputs) and ``X-Hec-Request-Id``.  Posting the same response twice (a retry after a
lost connection) returns the same answer.

Key sets are not deleted over HTTP (a key-set id is a public-key hash, not a secret, and there is
no authentication): an operator removes ``STORE/<program>/keysets/<id>``.  A session id is 128
random bits known only to its client.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Iterator

from ..errors import HecError

KEYS_MAGIC = b"HECKEYS1"
MAX_HEADER = 1 << 20
CHUNK = 1 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SECRET_NAMES = ("secret.key",)

H_SESSION = "X-Hec-Session"
H_STEP = "X-Hec-Step"
H_REQUEST_ID = "X-Hec-Request-Id"
H_KEY_SET = "X-Hec-Key-Set"
H_PROGRAM = "X-Hec-Program"
H_SECONDS = "X-Hec-Step-Seconds"


class WireError(HecError):
    """A key upload or an answer is malformed."""


def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class KeyUpload:
    """The key upload of a server key directory ``server_dir`` (checked: no secret key), streamed
    from the files (never all in memory): ``len(upload)`` bytes from ``iter(upload)``."""

    def __init__(self, server_dir: str | os.PathLike, secret_key_file: str | os.PathLike | None = None):
        d = Path(server_dir)
        try:
            meta = json.loads((d / "keys.json").read_text())
        except (OSError, ValueError) as e:
            raise WireError(f"{d}: not a server key directory ({e})") from None
        if meta.get("has_secret") or any((d / n).exists() for n in SECRET_NAMES):
            raise WireError(f"{d}: holds a secret key; refusing to upload it (the server must never get it)")
        names = sorted((meta.get("files") or {}))
        secret_sha = _sha_file(Path(secret_key_file)) if secret_key_file and Path(secret_key_file).exists() else None
        files = []
        for name in ["keys.json", *names]:
            if not NAME_RE.match(name) or name in SECRET_NAMES:
                raise WireError(f"{d}: refusing to upload a file named {name!r}")
            p = d / name
            try:
                size = p.stat().st_size
            except OSError as e:
                raise WireError(f"{p}: {e.strerror or e}") from None
            sha = _sha_file(p)
            if name != "keys.json" and sha != meta["files"][name]:
                raise WireError(f"{p}: corrupt or replaced (sha256 does not match keys.json)")
            if secret_sha is not None and sha == secret_sha:
                raise WireError(f"{p}: is the client's secret key; refusing to upload it")
            files.append((name, size, sha, p))
        self.key_set = str(meta.get("key_set", ""))
        head = {"key_set": self.key_set, "program_sha256": meta.get("program_sha256"),
                "params_fingerprint": meta.get("params_fingerprint"), "backend": meta.get("backend"),
                "files": [[n, s, h] for n, s, h, _ in files]}
        self.header = json.dumps(head, sort_keys=True).encode("utf-8")
        self.files = files

    def __len__(self) -> int:
        return 16 + len(self.header) + sum(s for _, s, _, _ in self.files) + 32

    def __iter__(self) -> Iterator[bytes]:
        h = hashlib.sha256()
        first = KEYS_MAGIC + struct.pack("<Q", len(self.header)) + self.header
        h.update(first)
        yield first
        for name, size, _, p in self.files:
            sent = 0
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    sent += len(chunk)
                    h.update(chunk)
                    yield chunk
            if sent != size:
                raise WireError(f"{p}: changed while it was being uploaded")
        yield h.digest()


def check_upload_header(head) -> list[tuple[str, int, str]]:
    """The file list of a key upload's header, checked (names, sizes, hashes); raises WireError."""
    if not isinstance(head, dict):
        raise WireError("key upload: the header is not a JSON object")
    files = head.get("files")
    if not isinstance(files, list) or not files:
        raise WireError("key upload: the header lists no files")
    out, seen = [], set()
    for e in files:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], int)
                and not isinstance(e[1], bool) and isinstance(e[2], str)):
            raise WireError(f"key upload: malformed file entry {str(e)[:80]}")
        name, size, sha = e
        if name in SECRET_NAMES:
            raise WireError("key upload: holds a secret.key; the server never takes the secret key")
        if not NAME_RE.match(name):
            raise WireError(f"key upload: file name {name[:80]!r} is not allowed")
        if name in seen:
            raise WireError(f"key upload: file {name!r} twice")
        if size < 0 or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise WireError(f"key upload: file {name!r}: bad size or sha256")
        seen.add(name)
        out.append((name, size, sha))
    if "keys.json" not in seen:
        raise WireError("key upload: no keys.json")
    for k in ("key_set", "program_sha256", "params_fingerprint"):
        if not isinstance(head.get(k), str):
            raise WireError(f"key upload: header field {k!r} missing")
    return out


def error_json(message: str) -> bytes:
    return json.dumps({"error": " ".join(str(message).split())}).encode("utf-8")
