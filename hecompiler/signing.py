"""ed25519 signatures of ``.hec`` files, through the PyCA ``cryptography`` library.

A ``.hec`` manifest carries a ``digest`` (see :mod:`hecompiler.hecfile`) that every member and the
manifest header feed.  Anyone can recompute it, so on its own it detects accidents and files
assembled from two different saves, not deliberate edits.  A signature over it does detect edits:

* ``hecompile keygen-signing -o signer.pem`` writes an ed25519 private key (``signer.pem``,
  PKCS#8 PEM, mode 0600) and its public key (``signer.pub.pem``, SubjectPublicKeyInfo PEM).
  OpenSSL makes the same files: ``openssl genpkey -algorithm ed25519 -out signer.pem`` and
  ``openssl pkey -in signer.pem -pubout -out signer.pub.pem``.
* ``hecompile sign M.hec --key signer.pem`` stores the signature inside the ``.hec`` (manifest
  field ``signature``: algorithm, the signer's raw public key, the signature, base64).
* ``--verify-key signer.pub.pem`` (run, keygen, encrypt, eval, refresh, decrypt, inspect) refuses a
  file that is not signed, signed by another key, or changed in any member after signing.

The signed message is ``b"hecompiler.hec signature v1\\n" + digest`` (the digest as 64 lowercase
hex characters).  The public key stored in the file only names the signer in messages: verification
uses the key the user gives, never the one in the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat

from .errors import HecError

ALGORITHM = "ed25519"
SIGNED_PREFIX = b"hecompiler.hec signature v1\n"
#: a PEM ed25519 key is about 120 bytes; anything much larger is not one
MAX_KEY_FILE_BYTES = 64 * 1024


class SigningKeyError(HecError):
    """A signing or verification key file is missing, unreadable or not an ed25519 key."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # a dependency in pyproject.toml; only a broken install lacks it
        raise HecError("signatures need the 'cryptography' package (pip install cryptography)") from None
    return serialization, ed25519


def _read_key_file(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of a small regular file; FIFOs, devices and directories are refused before reading
    (opened non-blocking, so a FIFO cannot hang us)."""
    spath = os.fspath(path)
    try:
        fd = os.open(spath, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SigningKeyError(f"{what} {spath}: no such file") from None
    except OSError as e:
        raise SigningKeyError(f"{what} {spath}: cannot read: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_KEY_FILE_BYTES:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SigningKeyError(f"{what} {spath}: not a regular file")
        raise SigningKeyError(f"{what} {spath}: {st.st_size} bytes is too large for a key file")
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as e:
            raise SigningKeyError(f"{what} {spath}: cannot read: {e.strerror or e}") from None


def _kind(key) -> str:
    name = type(key).__name__.removeprefix("_")
    for k in ("RSA", "EllipticCurve", "DSA", "Ed448", "X25519", "X448", "DH"):
        if k in name:
            return {"EllipticCurve": "ECDSA"}.get(k, k)
    return name


def load_private_key(path: str | os.PathLike, what: str = "--key"):
    """An ``Ed25519PrivateKey`` from an unencrypted PEM (PKCS#8 or OpenSSH) file."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, what)
    spath = os.fspath(path)
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise SigningKeyError(f"{what} {spath}: holds a public key; signing needs the private key (signer.pem)")
    try:
        if b"BEGIN OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise SigningKeyError(f"{what} {spath}: the key is encrypted with a passphrase; hecompile signs with "
                              f"an unencrypted key (keep it 0600)") from None
    except (ValueError, binascii.Error) as e:
        raise SigningKeyError(f"{what} {spath}: not a PEM private key ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # noqa: BLE001 - cryptography raises UnsupportedAlgorithm and others
        raise SigningKeyError(f"{what} {spath}: not a usable private key ({type(e).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningKeyError(f"{what} {spath}: is a {_kind(key)} key, not an ed25519 key; make one with "
                              f"hecompile keygen-signing")
    return key


def load_public_key(path_or_key, what: str = "--verify-key"):
    """An ``Ed25519PublicKey`` from a PEM (SubjectPublicKeyInfo) or OpenSSH public key file, or
    the key object itself.  A private key file is refused: whoever verifies needs only the public one."""
    serialization, ed25519 = _crypto()
    if isinstance(path_or_key, ed25519.Ed25519PublicKey):
        return path_or_key
    data = _read_key_file(path_or_key, what)
    spath = os.fspath(path_or_key)
    if b"PRIVATE KEY-----" in data:
        raise SigningKeyError(f"{what} {spath}: holds a private key; give the public key (e.g. signer.pub.pem, "
                              f"written next to it by hecompile keygen-signing) and keep the private key secret")
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, binascii.Error) as e:
        raise SigningKeyError(f"{what} {spath}: not a PEM public key ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # noqa: BLE001 - UnsupportedAlgorithm and others
        raise SigningKeyError(f"{what} {spath}: not a usable public key ({type(e).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningKeyError(f"{what} {spath}: is a {_kind(key)} key, not an ed25519 key")
    return key


def public_key_raw(key) -> bytes:
    """The 32 raw bytes of a public key (or of a private key's public half)."""
    serialization, ed25519 = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(raw: bytes) -> str:
    """How a key is named to users: the first 16 hex digits of the sha256 of its raw bytes."""
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_digest(key, digest: str) -> dict:
    """The manifest's ``signature`` entry for ``digest`` (64 lowercase hex digits)."""
    sig = key.sign(SIGNED_PREFIX + digest.encode("ascii"))
    return {"algorithm": ALGORITHM, "public_key": base64.b64encode(public_key_raw(key)).decode("ascii"),
            "value": base64.b64encode(sig).decode("ascii")}


def check_entry(entry) -> str | None:
    """Why a manifest ``signature`` entry is malformed, or None."""
    if not isinstance(entry, dict):
        return "must be an object"
    extra = sorted(set(entry) - {"algorithm", "public_key", "value"})
    if extra:
        return f"has unexpected field {extra[0]!r}"
    if entry.get("algorithm") != ALGORITHM:
        return f"algorithm must be {ALGORITHM!r}, got {entry.get('algorithm')!r}"
    for field, n in (("public_key", 32), ("value", 64)):
        v = entry.get(field)
        if not isinstance(v, str):
            return f"{field} must be base64 text"
        try:
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            return f"{field} is not base64"
        if len(raw) != n:
            return f"{field} must be {n} bytes, got {len(raw)}"
    return None


def verify_entry(entry: dict, digest: str, key) -> str | None:
    """None when ``entry`` is a valid signature of ``digest`` by ``key``; otherwise why not (one
    phrase).  ``entry`` must have passed :func:`check_entry`."""
    from cryptography.exceptions import InvalidSignature

    want = public_key_raw(key)
    signer = base64.b64decode(entry["public_key"])
    if signer != want:
        return (f"signed by another key ({fingerprint(signer)}), not by the --verify-key key "
                f"({fingerprint(want)})")
    try:
        key.verify(base64.b64decode(entry["value"]), SIGNED_PREFIX + digest.encode("ascii"))
    except InvalidSignature:
        return "the signature does not match the contents: the file was modified after signing"
    return None


def generate_keypair(private_path: str | os.PathLike) -> tuple[str, str]:
    """Write a new ed25519 key pair: the private key at ``private_path`` (0600) and the public key
    beside it (``X.pem`` -> ``X.pub.pem``, else ``X.pub``).  Existing files are never replaced, and
    a failure leaves neither file."""
    from .fileio import atomic_write_bytes, check_outputs

    serialization, ed25519 = _crypto()
    priv = os.fspath(private_path)
    pub = priv[:-4] + ".pub.pem" if priv.endswith(".pem") else priv + ".pub"
    for p in (priv, pub):
        if os.path.lexists(p):
            raise SigningKeyError(f"-o {priv}: {p} already exists; hecompile never replaces a key (remove it "
                                  f"or choose another name)")
    check_outputs({"-o": priv, "public key": pub})
    key = ed25519.Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(priv, priv_pem, mode=0o600)
    try:
        atomic_write_bytes(pub, pub_pem)
    except BaseException:
        try:
            os.unlink(priv)
        except OSError:
            pass
        raise
    return priv, pub
