"""Files in and out: atomic writes that never clobber what the user gave us.

* :func:`atomic_write_bytes` writes to a temporary file next to the target and
  renames it into place: readers see the old file or the whole new one, and a
  failed run (full disk, read-only directory, kill -9) leaves no half-written
  output.  A symlink is written through (its target is replaced, the link stays,
  as ``cp`` and editors do); a directory, FIFO or device is refused.
* :func:`check_outputs` runs before any work: every output can be written and
  none of them is one of the command's inputs or another output (``-o`` equal
  to ``--input`` would otherwise replace the user's model or data).
* :func:`makedirs` and every write turn ``OSError`` into a one-line
  :class:`~hecompiler.errors.HecError` naming the file.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from typing import Mapping

from .errors import HecError


def _resolved(path: str | os.PathLike) -> str:
    """The path a write lands on: symlinks followed (a dangling link's target too)."""
    return os.path.realpath(os.fspath(path))


def _oserror(path: str, e: OSError, what: str = "cannot write") -> HecError:
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason = "no space left on the device"
    elif e.errno == errno.EROFS:
        reason = "read-only file system"
    return HecError(f"{path}: {what}: {reason}")


def _check_target(path: str, target: str) -> None:
    """``target`` (resolved ``path``) may be replaced by a regular file."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _oserror(path, e) from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO, device or socket)"
        raise HecError(f"{path}: is {kind}; give a file name to write")
    d = os.path.dirname(target)
    if not os.path.isdir(d):
        raise HecError(f"{path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise HecError(f"{path}: cannot write: directory {d} is not writable")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see the module doc).  ``mode``
    defaults to what the umask allows (0600 for secrets: pass it)."""
    path = os.fspath(path)
    target = _resolved(path)
    _check_target(path, target)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix="." + os.path.basename(target) + ".",
                                   suffix=".tmp")
    except OSError as e:
        raise _oserror(path, e) from None
    try:
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp makes 0600; give ordinary files ordinary permissions
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _oserror(path, e) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def makedirs(path: str | os.PathLike, what: str = "") -> None:
    """``os.makedirs(path, exist_ok=True)`` with a one-line error."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _oserror(f"{what} {path}".strip(), e, "cannot create the directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise HecError(f"{what} {path}".strip() + ": directory is not writable")


def _same_file(a: str, b: str) -> bool:
    ra, rb = _resolved(a), _resolved(b)
    if ra == rb:
        return True
    try:
        return os.path.samefile(ra, rb)  # hard links
    except OSError:
        return False


def check_outputs(outputs: Mapping[str, str | None], inputs: Mapping[str, str | None] | None = None) -> None:
    """Refuse, before any work, outputs that cannot be written or that would replace an input or
    each other.  Keys are the flags (``"-o"``, ``"--state"``), values the paths (``None``: not given)."""
    outs = [(flag, os.fspath(p)) for flag, p in outputs.items() if p]
    ins = [(flag, os.fspath(p)) for flag, p in (inputs or {}).items() if p]
    for flag, p in outs:
        _check_target(f"{flag} {p}", _resolved(p))
        for iflag, ip in ins:
            if _same_file(p, ip):
                raise HecError(f"{flag} {p}: is the same file as {iflag} {ip}; writing it would destroy the "
                               f"input: choose another output")
    for i, (flag, p) in enumerate(outs):
        for flag2, p2 in outs[i + 1:]:
            if _same_file(p, p2):
                raise HecError(f"{flag} {p} and {flag2} {p2} are the same file: give them different names")

