"""The server's state on disk (``--store DIR``), so it survives a restart.

::

    DIR/<program sha256, 16 hex>/       one program's state (one store can serve several programs)
        keysets/<key set id>/           a server key directory (keys.json, public.key, relin.key,
                                        galois.key): evaluation keys only, never a secret key
        sessions/<id>.json              a session: key set, step, the request it waits for, expiry
        sessions/<id>.state             its server state (a protocol ``state`` bundle: the commit point)
        sessions/<id>.answer            the last answer sent (a retried post gets it again)
        staging/                        key uploads being received and checked (emptied at start)

Everything is written atomically (a temporary file renamed into place; a key set is staged in
its own directory and renamed into ``keysets/`` only after the backend loaded it).  Directories
are created 0700.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import HecError
from ..fileio import atomic_write_bytes

_ID = re.compile(r"^[0-9a-f]{16,64}$")


def valid_id(x: str) -> bool:
    return bool(_ID.match(x or ""))


def _write(path: Path, data: bytes) -> None:
    """Atomic (temporary file renamed into place) but not synced: a session file has to survive
    the server process dying, which the page cache gives, not a power cut (the client then sends
    its inputs again); a sync per step would cost more than small steps take."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@dataclass
class Session:
    sid: str
    key_set: str
    created: float
    expires: float
    step: int = 0
    request_id: str = ""  # the refresh request it waits for ("" when done)
    done: bool = False
    last_body_sha: str = ""  # the body whose answer is in <id>.answer
    last_kind: str = ""  # "refresh" or "done"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


class Store:
    def __init__(self, root: str | os.PathLike, program_sha256: str):
        self.root = Path(root)
        self.base = self.root / program_sha256[:16]
        self.keysets = self.base / "keysets"
        self.sessions = self.base / "sessions"
        self.staging = self.base / "staging"
        try:
            for d in (self.root, self.base, self.keysets, self.sessions, self.staging):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            for child in self.staging.iterdir():  # uploads a previous run did not finish
                shutil.rmtree(child, ignore_errors=True)
            for tmp in self.sessions.glob(".*.tmp"):  # writes a killed server did not finish
                tmp.unlink()
        except OSError as e:
            raise HecError(f"--store {root}: cannot use it: {e.strerror or e}") from None
        meta = self.base / "program.json"
        if not meta.exists():
            atomic_write_bytes(meta, json.dumps({"program_sha256": program_sha256}).encode())

    # ------------------------------------------------------------------ key sets
    def keyset_dir(self, key_set: str) -> Path:
        if not valid_id(key_set):
            raise HecError(f"malformed key set id {key_set[:80]!r}")
        return self.keysets / key_set

    def has_keyset(self, key_set: str) -> bool:
        return valid_id(key_set) and (self.keysets / key_set / "keys.json").is_file()

    def keyset_ids(self) -> list[str]:
        return sorted(p.name for p in self.keysets.iterdir() if (p / "keys.json").is_file())

    def new_staging(self) -> Path:
        d = self.staging / secrets.token_hex(8)
        d.mkdir(mode=0o700)
        return d

    def commit_keyset(self, staged: Path, key_set: str) -> bool:
        """Move a checked staging directory into place; False when the key set was already there."""
        target = self.keyset_dir(key_set)
        try:
            os.rename(staged, target)
            return True
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
            if self.has_keyset(key_set):
                return False
            raise

    def delete_keyset(self, key_set: str) -> bool:
        d = self.keyset_dir(key_set)
        if not d.exists():
            return False
        trash = self.staging / ("deleted-" + secrets.token_hex(8))
        os.rename(d, trash)  # atomic: no half-deleted key set is ever visible
        shutil.rmtree(trash, ignore_errors=True)
        return True

    # ------------------------------------------------------------------ sessions
    def _spath(self, sid: str, ext: str) -> Path:
        if not valid_id(sid):
            raise HecError(f"malformed session id {sid[:80]!r}")
        return self.sessions / f"{sid}.{ext}"

    def save_session(self, s: Session, state: bytes | None, answer: bytes | None) -> None:
        """Write a step's outcome: the state first (the commit point), the answer, then the record."""
        if state is not None:
            _write(self._spath(s.sid, "state"), state)
        elif s.done:
            with contextlib.suppress(OSError):
                self._spath(s.sid, "state").unlink()
        if answer is not None:
            _write(self._spath(s.sid, "answer"), answer)
        _write(self._spath(s.sid, "json"), s.to_json())

    def load_session(self, sid: str) -> Session | None:
        if not valid_id(sid):
            return None
        try:
            d = json.loads(self._spath(sid, "json").read_text())
            return Session(**d)
        except (OSError, ValueError, TypeError):
            return None

    def read_state(self, sid: str) -> bytes:
        return self._spath(sid, "state").read_bytes()

    def read_answer(self, sid: str) -> bytes:
        return self._spath(sid, "answer").read_bytes()

    def delete_session(self, sid: str) -> None:
        for ext in ("json", "state", "answer"):
            with contextlib.suppress(OSError):
                self._spath(sid, ext).unlink()

    def session_ids(self) -> list[str]:
        return sorted(p.stem for p in self.sessions.glob("*.json"))

    def expire_sessions(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        n = 0
        for sid in self.session_ids():
            s = self.load_session(sid)
            if s is None or s.expires <= now:
                self.delete_session(sid)
                n += 1
        return n


def body_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
