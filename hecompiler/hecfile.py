"""The ``.hec`` file: a compiled HE program, ready for a backend.

A ``.hec`` file is a zip archive (deflate) with five members::

    manifest.json   format name and version, the compiler version that wrote it,
                    creation time (UTC), the sha256 and size of every other member,
                    the ``digest`` that binds them all, and optionally a ``signature``
    program.txt     the HE program in its text form (:func:`heprog.print_program`):
                    parameters, primes, layouts, linear ops, inputs, instructions, outputs
    weights.npz     the compact weights (numpy ``.npz``, arrays only, float/int dtypes,
                    never pickled); plaintext diagonals are regenerated from them at run time
    metadata.json   the compiler's metadata: source model hash and file name, passes run,
                    the cost report (``report`` as data, ``report_text`` as text),
                    ``insecure_ok`` when the user explicitly asked for insecure parameters
    io.json         the client's view: inputs and outputs (name, shape, slot layout, alpha)
                    and the keys the program needs (Galois steps, relinearisation);
                    redundant with program.txt, readable without parsing it, and checked
                    against it on load

Integrity.  ``digest`` is the sha256 of::

    b"hecompiler.hec digest\n"
    + canonical JSON of the manifest header {format, format_version, compiler,
      compiler_version, created} (sorted keys, separators "," and ":", ASCII) + b"\n"
    + for each member in the order program.txt, weights.npz, metadata.json, io.json:
      b"<name>\n<size in bytes>\n" + the member's bytes

so one value covers the program, the weights, the metadata (with the report) and io.json:
a file whose members come from different saves (another model's metadata or report), or
that was damaged, is refused.  Anyone can recompute it, so it does not detect a deliberate
edit; :mod:`hecompiler.signing` adds an ed25519 signature over it (``hecompile sign``,
checked with ``--verify-key``), which does.

Safety of reading.  Nothing is decompressed before the member sizes in the zip directory and
in the manifest agree, stay under :data:`MAX_MEMBER_BYTES` / :data:`MAX_TOTAL_BYTES`, and
have a plausible compression ratio (:data:`MAX_RATIO`: a zip bomb is refused from its
directory alone); members are then read in chunks of :data:`CHUNK_BYTES` into a buffer of
the declared size, so memory never exceeds what was declared and accepted, and running out
of memory is a one-line error.  The file itself is opened without blocking and must be a
regular file (a FIFO or device is refused before any read).

:func:`save_hec` builds the whole archive in memory, checks that it would load, and
writes it atomically: a failed save leaves no file.  :func:`load_hec` validates
everything before returning (container, sizes, checksums, digest, signature when asked,
version, program text, weights and every reference to them, io.json,
:func:`verify_program`, security), and any problem becomes a one-line
:class:`~hecompiler.errors.HecFileError` that names the file and what is wrong, never a
crash and never a silently different program.  :func:`sign_hec` adds a signature;
:func:`inspect_hec` prints a human summary.

Nothing here uses pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .errors import HecError, HecFileError, ParseError
from .fileio import atomic_write_bytes
from .heprog import OPS, HEProgram, LinearOp, PlainRef, ProgramError, parse_program, print_program, verify_program
from .security import HE_STANDARD_MAX_BITS, source

FORMAT = "hecompiler.hec"
#: 2: the manifest's ``digest`` binds all members (and may carry a ``signature``); version 1
#: files had per-member checksums only and are refused with a request to compile again
FORMAT_VERSION = 2

MANIFEST = "manifest.json"
PROGRAM = "program.txt"
WEIGHTS = "weights.npz"
METADATA = "metadata.json"
IOSPEC = "io.json"
MEMBERS = (MANIFEST, PROGRAM, WEIGHTS, METADATA, IOSPEC)
HASHED_MEMBERS = (PROGRAM, WEIGHTS, METADATA, IOSPEC)

#: zip-bomb guards: refuse members (or archives) that declare more uncompressed bytes
MAX_MEMBER_BYTES = 4 * 2**30
MAX_TOTAL_BYTES = 8 * 2**30
MAX_MANIFEST_BYTES = 1 * 2**20
#: refuse a member that declares more than MAX_RATIO times its compressed size (deflate reaches
#: about 1030:1 on constant data; real members compress 1.1:1 (weights) to 10:1 (program text)),
#: once it declares at least MIN_RATIO_CHECK_BYTES (small members cannot hurt)
MAX_RATIO = 200
MIN_RATIO_CHECK_BYTES = 16 * 2**20
#: members are decompressed this many bytes at a time
CHUNK_BYTES = 1 << 20

_HEADER_FIELDS = ("format", "format_version", "compiler", "compiler_version", "created")
_MANIFEST_FIELDS = _HEADER_FIELDS + ("members", "digest", "signature")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")

#: HomomorphicEncryption.org standard: max total coefficient-modulus bits (including the
#: special prime) per ring degree, ternary secret, classical attacks (SEAL's MaxBitCount)

_WEIGHT_KINDS = "fiu"  # float, signed int, unsigned int
_ARITY = {"rotate": 1, "add": 2, "sub": 2, "negate": 1, "add_plain": 1, "mul_plain": 1, "mul": 2,
          "rescale": 1, "mod_switch": 1, "refresh": 1}


# =========================================================================== helpers

def _compiler_version() -> str:
    import hecompiler  # lazy: hecompiler/__init__ may import this module

    return str(getattr(hecompiler, "__version__", "unknown"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file (e.g. the source ONNX model, for ``metadata["source_sha256"]``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_metadata(source_model: str | os.PathLike | None = None, passes=None, report: dict | None = None,
                  report_text: str | None = None, insecure_ok: bool = False, **extra: Any) -> dict:
    """The conventional metadata dict: ``source_model`` (file name) and ``source_sha256``
    (when ``source_model`` is a path), ``passes`` (names run, in order), ``report``
    (JSON data), ``report_text`` (what :func:`inspect_hec` shows), ``insecure_ok``
    (set only when the user explicitly asked for parameters below 128-bit security),
    plus any ``extra`` JSON-serialisable keys."""
    md: dict[str, Any] = {}
    if source_model is not None:
        md["source_model"] = os.path.basename(os.fspath(source_model))
        md["source_sha256"] = sha256_file(source_model)
    if passes is not None:
        md["passes"] = [str(p) for p in passes]
    if report is not None:
        md["report"] = report
    if report_text is not None:
        md["report_text"] = str(report_text)
    if insecure_ok:
        md["insecure_ok"] = True
    md.update(extra)
    return md


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return lines[0] if lines else str(msg)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_num(x) -> bool:
    return _is_int(x) or isinstance(x, (float, np.floating))


def _finite(x) -> bool:
    return _is_num(x) and math.isfinite(float(x))


def _io_entry(prog: HEProgram, spec, output: bool) -> dict:
    lay = prog.layouts[spec.layout]
    d = {"name": spec.name, "shape": [int(s) for s in spec.shape], "layout_id": int(spec.layout),
         "layout_description": lay.describe(), "n_ct": int(lay.n_ct), "layout": lay.to_dict()}
    if output:
        d["alpha"] = float(spec.alpha)
    return d


def _io_json(prog: HEProgram) -> dict:
    """The client's view of the program (inputs, outputs, keys)."""
    return {
        "slots": int(prog.params.slots),
        "inputs": [_io_entry(prog, s, False) for s in prog.inputs],
        "outputs": [_io_entry(prog, s, True) for s in prog.outputs],
        "galois_steps": [int(k) for k in prog.galois_steps],
        "relin_keys": bool(prog.needs_relin),
    }


def _json_diff(want, got, where: str = "") -> str | None:
    """Path and values of the first difference between two JSON values, or None."""
    if isinstance(want, dict) and isinstance(got, dict):
        for k in want:
            if k not in got:
                return f"{where}.{k} is missing" if where else f"{k} is missing"
            d = _json_diff(want[k], got[k], f"{where}.{k}" if where else str(k))
            if d:
                return d
        for k in got:
            if k not in want:
                return f"unexpected field {where + '.' if where else ''}{k}"
        return None
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return f"{where or 'value'} has {len(got)} entries, the program has {len(want)}"
        for i, (a, b) in enumerate(zip(want, got)):
            d = _json_diff(a, b, f"{where}[{i}]")
            if d:
                return d
        return None
    if type(want) is not type(got) and not (_is_num(want) and _is_num(got)
                                            and not isinstance(got, bool)):
        return f"{where} is {json.dumps(got)[:80]}, the program has {json.dumps(want)[:80]}"
    if want != got:
        return f"{where} is {json.dumps(got)[:80]}, the program has {json.dumps(want)[:80]}"
    return None


# =========================================================================== digest and manifest

class _Digest:
    """The streaming form of :func:`compute_digest`: feed the members in the fixed order."""

    def __init__(self, manifest: dict):
        header = {k: manifest[k] for k in _HEADER_FIELDS}
        self.h = hashlib.sha256(b"hecompiler.hec digest\n")
        self.h.update(json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii"))
        self.h.update(b"\n")

    def member(self, name: str, size: int) -> None:
        self.h.update(f"{name}\n{int(size)}\n".encode("ascii"))

    def update(self, data) -> None:
        self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def compute_digest(manifest: dict, members: dict[str, bytes]) -> str:
    """The ``digest`` of a ``.hec`` (module docstring): sha256 over the manifest header fields and
    every member's name, size and bytes, in the fixed order of :data:`HASHED_MEMBERS`."""
    d = _Digest(manifest)
    for name in HASHED_MEMBERS:
        d.member(name, len(members[name]))
        d.update(members[name])
    return d.hexdigest()


def _check_manifest(manifest, fail) -> None:
    """Every field of a manifest: known keys only, types, formats and size limits.  The format and
    version come first (a newer version may have other fields)."""
    if not isinstance(manifest, dict):
        fail(f"{MANIFEST} is not a JSON object")
    if manifest.get("format") != FORMAT:
        fail(f"not a .hec file: {MANIFEST} format is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    writer = manifest.get("compiler_version", "an unknown version")
    writer = writer if isinstance(writer, str) else repr(writer)
    if not _is_int(version) or version < 1:
        fail(f"{MANIFEST}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        fail(f"format version {version} was written by hecompiler {writer[:40]}; this hecompiler "
             f"{_compiler_version()} reads format version {FORMAT_VERSION} only (upgrade hecompiler)")
    if version < FORMAT_VERSION:
        fail(f"format version {version} (written by hecompiler {writer[:40]}) has no digest binding its members; "
             f"this hecompiler reads format version {FORMAT_VERSION}: compile the model again")

    def bad(field: str, want: str):
        got = json.dumps(manifest.get(field) if "." not in field else None)
        fail(f"{MANIFEST}: {field} must be {want}" + (f", got {got[:60]}" if "." not in field else ""))

    for k in manifest:
        if k not in _MANIFEST_FIELDS:
            fail(f"{MANIFEST}: unexpected field {k[:60]!r}")
    for k in _MANIFEST_FIELDS:
        if k != "signature" and k not in manifest:
            fail(f"{MANIFEST}: {k} is missing")
    if manifest["compiler"] != "hecompiler":
        bad("compiler", '"hecompiler"')
    cv = manifest["compiler_version"]
    if not isinstance(cv, str) or not 0 < len(cv) <= 64 or not cv.isprintable():
        bad("compiler_version", "a version string")
    if not isinstance(manifest["created"], str) or not _CREATED.fullmatch(manifest["created"]):
        bad("created", "a UTC time like 2024-01-31T12:00:00Z")
    if not isinstance(manifest["digest"], str) or not _HEX64.fullmatch(manifest["digest"]):
        bad("digest", "64 lowercase hex digits (sha256)")
    listed = manifest["members"]
    if not isinstance(listed, dict):
        bad("members", "an object")
    for m in listed:
        if m not in HASHED_MEMBERS:
            fail(f"{MANIFEST} lists unexpected member {m[:60]!r}")
    for m in HASHED_MEMBERS:
        entry = listed.get(m)
        if not isinstance(entry, dict):
            fail(f"{MANIFEST} has no checksum for {m}")
        for k in entry:
            if k not in ("sha256", "size"):
                fail(f"{MANIFEST}: unexpected field 'members.{m}.{k[:40]}'")
        for k in ("sha256", "size"):
            if k not in entry:
                fail(f"{MANIFEST}: members.{m}.{k} is missing")
        if not isinstance(entry["sha256"], str) or not _HEX64.fullmatch(entry["sha256"]):
            fail(f"{MANIFEST}: members.{m}.sha256 must be 64 lowercase hex digits (sha256)")
        if not _is_int(entry["size"]) or not 0 <= entry["size"] <= MAX_MEMBER_BYTES:
            fail(f"{MANIFEST}: members.{m}.size must be a byte count in 0..{MAX_MEMBER_BYTES}, "
                 f"got {json.dumps(entry['size'])[:40]}")
    if "signature" in manifest:
        from .signing import check_entry

        why = check_entry(manifest["signature"])
        if why:
            fail(f"{MANIFEST}: signature must be an ed25519 signature entry: it {why}")


# =========================================================================== weights (npz)

def _weights_npz(weights: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (what ``np.savez`` writes: one stored ``<name>.npy`` per array), built
    member by member so any weight name works and nothing is ever pickled."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, arr in weights.items():
            with z.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    return buf.getvalue()


def _read_weights(data: bytes, fail) -> dict[str, np.ndarray]:
    """Parse weights.npz without pickle; every header is checked before any allocation."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        fail(f"{WEIGHTS} is not a readable .npz archive ({e})")
    out: dict[str, np.ndarray] = {}
    with z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            fail(f"{WEIGHTS} has duplicate arrays")
        if sum(i.file_size for i in infos) > len(data):
            fail(f"{WEIGHTS} declares more data than it holds (compressed or corrupt .npz)")
        for info in infos:
            if not info.filename.endswith(".npy"):
                fail(f"{WEIGHTS}: member {info.filename!r} is not a .npy array")
            name = info.filename[:-4]
            try:
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        fail(f"{WEIGHTS}: array {name!r} has unsupported .npy version {version}")
                    if dtype.hasobject:
                        fail(f"{WEIGHTS}: array {name!r} holds Python objects (dtype {dtype}) and would "
                             f"need pickle (allow_pickle) to load; refusing")
                    if dtype.kind not in _WEIGHT_KINDS or dtype.fields is not None or dtype.subdtype is not None:
                        fail(f"{WEIGHTS}: array {name!r} has dtype {dtype}; weights must be float or int")
                    count = int(np.prod(shape, dtype=object)) if shape else 1
                    if count * dtype.itemsize > info.file_size:
                        fail(f"{WEIGHTS}: array {name!r} header claims shape {list(shape)} ({dtype}) "
                             f"but holds only {info.file_size} bytes")
                with z.open(info) as f:
                    arr = np.lib.format.read_array(f, allow_pickle=False)
            except HecFileError:
                raise
            except Exception as e:  # numpy raises ValueError/OSError/EOFError on bad headers and data
                fail(f"{WEIGHTS}: array {name!r} is unreadable ({type(e).__name__}: {_one_line(e)})")
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                fail(f"{WEIGHTS}: array {name!r} contains NaN or infinity")
            out[name] = arr
    return out


# =========================================================================== program checks

#: a ``sparse`` linear op (data movement) has at most this many entries per element of its larger side
SPARSE_MAX_PER_ELEMENT = 64


def _check_weight(prog: HEProgram, name, who: str, sizes: tuple[int, ...] | None = None,
                  shape_ok=None, what: str = "") -> np.ndarray:
    if not isinstance(name, str):
        raise ProgramError(f"{who}: weight reference {name!r} is not a name")
    w = prog.weights.get(name)
    if w is None:
        raise ProgramError(f"{who}: weight {name!r} is missing from {WEIGHTS}")
    if sizes is not None and w.size not in sizes:
        want = " or ".join(str(s) for s in sorted(set(sizes)))
        raise ProgramError(f"{who}: weight {name!r} has {w.size} values, the op needs {want}{what}")
    if shape_ok is not None:
        err = shape_ok(w)
        if err:
            raise ProgramError(f"{who}: weight {name!r} has shape {list(w.shape)}, {err}")
    return w


def _ints(x, n: int) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == n and all(_is_int(v) for v in x)


def _check_linear(prog: HEProgram, k: int, lin: LinearOp) -> None:
    who = f"linear #{k} ({lin.kind}{', ' + lin.note if lin.note else ''})"
    nl = len(prog.layouts)
    for side, lid, shape in (("input", lin.in_layout, lin.in_shape), ("output", lin.out_layout, lin.out_shape)):
        if not _is_int(lid) or not 0 <= lid < nl:
            raise ProgramError(f"{who}: unknown {side} layout #{lid}")
        if not _ints(shape, 3) or min(shape) < 1:
            raise ProgramError(f"{who}: bad {side} shape {list(shape)}")
        if prog.layouts[lid].size != int(np.prod(shape)):
            raise ProgramError(f"{who}: {side} shape {list(shape)} does not match layout #{lid} "
                               f"({prog.layouts[lid].describe()})")
    lin_in, lout = prog.layouts[lin.in_layout], prog.layouts[lin.out_layout]
    if lin_in.cyc > lout.cyc:
        raise ProgramError(f"{who}: its output repeats every {lout.cyc} slots and its input every {lin_in.cyc}; "
                           f"a linear op cannot make copies (rotations after it do)")
    if not _finite(lin.mult) or not _finite(lin.bias_mult):
        raise ProgramError(f"{who}: multipliers must be finite numbers")
    p = lin.params
    if not isinstance(p, dict):
        raise ProgramError(f"{who}: params must be an object")
    C, H, W = lin.in_shape
    M, OH, OW = lin.out_shape
    out_size = M * OH * OW
    if lin.kind == "conv":
        group = p.get("group", 1)
        strides, pads, dil = p.get("strides"), p.get("pads"), p.get("dilations", [1, 1])
        if not (_is_int(group) and group >= 1 and _ints(strides, 2) and min(strides) >= 1 and _ints(pads, 4)
                and min(pads) >= 0 and _ints(dil, 2) and min(dil) >= 1):
            raise ProgramError(f"{who}: bad conv attributes {json.dumps(p, default=str)[:120]}")
        if C % group or M % group:
            raise ProgramError(f"{who}: group {group} does not divide {C} input / {M} output channels")

        def conv_shape(w):
            if w.ndim != 4 or w.shape[0] != M or w.shape[1] != C // group or min(w.shape) < 1:
                return f"expected [{M}, {C // group}, kh, kw]"
            kh, kw = w.shape[2], w.shape[3]
            oh = (H + pads[0] + pads[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
            ow = (W + pads[1] + pads[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
            if (oh, ow) != (OH, OW):
                return f"which gives a {oh}x{ow} output, not {OH}x{OW}"
            return None

        _check_weight(prog, p.get("weight"), who, shape_ok=conv_shape)
    elif lin.kind == "pool":
        if not (_ints(p.get("kernel"), 2) and min(p["kernel"]) >= 1 and _ints(p.get("strides"), 2)
                and min(p["strides"]) >= 1 and _ints(p.get("pads"), 4) and min(p["pads"]) >= 0):
            raise ProgramError(f"{who}: bad pooling attributes {json.dumps(p, default=str)[:120]}")
        if M != C:
            raise ProgramError(f"{who}: pooling maps {C} channels to {M}")
    elif lin.kind == "matrix":
        in_size = C * H * W
        _check_weight(prog, p.get("weight"), who, shape_ok=lambda w: None if w.shape == (out_size, in_size)
                      else f"expected [{out_size}, {in_size}]")
    elif lin.kind == "affine":
        if lin.in_shape != lin.out_shape:
            raise ProgramError(f"{who}: affine op changes shape {list(lin.in_shape)} -> {list(lin.out_shape)}")
        _check_weight(prog, p.get("weight"), who, sizes=(C,), what=" (one per channel)")
    elif lin.kind == "identity":
        if C * H * W != out_size:
            raise ProgramError(f"{who}: identity op maps {C * H * W} elements to {out_size}")
    elif lin.kind == "sparse":
        in_size = C * H * W

        def triples(w) -> str | None:
            if w.ndim != 2 or w.shape[0] != 3 or w.shape[1] > SPARSE_MAX_PER_ELEMENT * max(in_size, out_size):
                return f"expected [3, nnz] (row, col, value) with nnz <= {SPARSE_MAX_PER_ELEMENT} x the larger size"
            r, c = w[0], w[1]
            if w.shape[1] and (np.any(r != np.round(r)) or np.any(c != np.round(c)) or r.min() < 0
                               or c.min() < 0 or r.max() >= out_size or c.max() >= in_size):
                return f"rows must be integers in [0, {out_size}) and columns in [0, {in_size})"
            return None

        _check_weight(prog, p.get("weight"), who, shape_ok=triples)
    elif lin.kind == "gap":
        if lin.out_shape != (C, 1, 1):
            raise ProgramError(f"{who}: global average pool of {list(lin.in_shape)} must give [{C}, 1, 1]")
    else:
        raise ProgramError(f"{who}: unknown linear op kind {lin.kind!r}")
    if p.get("bias"):
        _check_weight(prog, p["bias"], who, sizes=(M, out_size), what=f" (bias of a {M}x{OH}x{OW} output)")


def _check_plain(prog: HEProgram, where: str, ref: PlainRef) -> None:
    a = ref.args
    S = prog.params.slots
    nlin, nlay = len(prog.linears), len(prog.layouts)
    if not _finite(ref.scale) or ref.scale <= 0:
        raise ProgramError(f"{where}: plaintext scale {ref.scale!r} is not a positive number")
    if ref.kind == "diag":
        if len(a) != 5 or not all(_is_int(x) for x in a):
            raise ProgramError(f"{where}: diag plaintext needs 5 integer arguments, got {list(a)}")
        lin, j, i, d, r = a
        if not 0 <= lin < nlin:
            raise ProgramError(f"{where}: diag plaintext refers to unknown linear op #{lin}")
        op = prog.linears[lin]
        if not (0 <= j < prog.layouts[op.out_layout].n_ct and 0 <= i < prog.layouts[op.in_layout].n_ct
                and 0 <= d < S and 0 <= r < S):
            raise ProgramError(f"{where}: diag plaintext block ({j}, {i}) diagonal {d} rotation {r} is out of "
                               f"range for linear #{lin}")
    elif ref.kind == "bias":
        if len(a) != 2 or not all(_is_int(x) for x in a):
            raise ProgramError(f"{where}: bias plaintext needs 2 integer arguments, got {list(a)}")
        lin, j = a
        if not 0 <= lin < nlin:
            raise ProgramError(f"{where}: bias plaintext refers to unknown linear op #{lin}")
        op = prog.linears[lin]
        if not op.params.get("bias"):
            raise ProgramError(f"{where}: bias plaintext refers to linear #{lin}, which has no bias")
        if not 0 <= j < prog.layouts[op.out_layout].n_ct:
            raise ProgramError(f"{where}: bias plaintext ciphertext {j} is out of range for linear #{lin}")
    elif ref.kind == "fill":
        if len(a) != 3 or not _is_int(a[0]) or not _is_int(a[1]):
            raise ProgramError(f"{where}: fill plaintext needs (layout, ciphertext, value), got {list(a)}")
        lay_id, j, value = a
        if not 0 <= lay_id < nlay:
            raise ProgramError(f"{where}: fill plaintext refers to unknown layout #{lay_id}")
        lay = prog.layouts[lay_id]
        if not 0 <= j < lay.n_ct:
            raise ProgramError(f"{where}: fill plaintext ciphertext {j} is out of range for layout #{lay_id}")
        if isinstance(value, str):
            _check_weight(prog, value, where, sizes=(lay.shape[0], lay.size),
                          what=f" (per channel or per element of {'x'.join(map(str, lay.shape))})")
        elif not _finite(value):
            raise ProgramError(f"{where}: fill value {value!r} is not a finite number or a weight name")
    elif ref.kind == "scalar":
        if len(a) != 1 or not _finite(a[0]):
            raise ProgramError(f"{where}: scalar plaintext needs one finite number, got {list(a)}")
    else:
        raise ProgramError(f"{where}: unknown plaintext kind {ref.kind!r}")


def _check_structure(prog: HEProgram) -> None:
    """What :func:`verify_program` assumes: parameters, layouts, linear ops and their
    weights, plaintext references, operand counts, inputs and outputs."""
    p = prog.params
    N = p.poly_degree
    if not _is_int(N) or N < 1024 or N > 1 << 17 or N & (N - 1):
        raise ProgramError(f"params: poly_degree {N} is not a power of two in [1024, 131072]")
    if len(p.coeff_bits) < 2 or not all(_is_int(b) and 1 <= b <= 60 for b in p.coeff_bits):
        raise ProgramError(f"params: coeff_bits {list(p.coeff_bits)} must be at least two sizes in 1..60")
    if not _is_int(p.scale_bits) or not 10 <= p.scale_bits <= 60:
        raise ProgramError(f"params: scale_bits {p.scale_bits} is outside 10..60")
    if p.log_slots is not None and (not _is_int(p.log_slots) or not 1 <= p.log_slots < N.bit_length() - 2):
        raise ProgramError(f"params: log_slots {p.log_slots} must be in 1..{N.bit_length() - 3} (sparse packing "
                           f"below the {N // 2} slots of N={N}; leave it out for all of them)")
    if len(prog.primes) != p.top_level + 1:
        raise ProgramError(f"params: {len(prog.primes)} primes for {len(p.coeff_bits) - 1} coefficient moduli")
    if len(set(prog.primes)) != len(prog.primes):
        raise ProgramError("params: primes are not distinct")
    for k, (q, b) in enumerate(zip(prog.primes, p.coeff_bits)):
        if q.bit_length() != b or q % (2 * N) != 1:
            raise ProgramError(f"params: prime q_{k} = {q} is not a {b}-bit prime = 1 mod {2 * N}")
    for k, lay in enumerate(prog.layouts):
        if lay.slots != p.slots:
            raise ProgramError(f"layout #{k} has {lay.slots} slots, the ring has {p.slots}")
    for k, lin in enumerate(prog.linears):
        _check_linear(prog, k, lin)
    for kind, specs in (("input", prog.inputs), ("output", prog.outputs)):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ProgramError(f"duplicate {kind} names {names}")
        for s in specs:
            if not 0 <= s.layout < len(prog.layouts):
                raise ProgramError(f"{kind} {s.name}: unknown layout #{s.layout}")
            lay = prog.layouts[s.layout]
            if int(np.prod(s.shape, dtype=object)) != lay.size:
                raise ProgramError(f"{kind} {s.name}: shape {list(s.shape)} does not match layout #{s.layout} "
                                   f"({lay.describe()})")
            if len(s.values) != lay.n_ct:
                raise ProgramError(f"{kind} {s.name}: {len(s.values)} ciphertexts for layout #{s.layout} "
                                   f"with {lay.n_ct}")
            if not _finite(s.alpha) or s.alpha == 0:
                raise ProgramError(f"{kind} {s.name}: alpha {s.alpha!r} is not a finite non-zero number")
    for k, ins in enumerate(prog.instrs):
        where = f"instruction {k} ({ins.op} -> %{ins.out})"
        if ins.op not in OPS:
            raise ProgramError(f"{where}: unknown op {ins.op!r}")
        if ins.op == "linear":
            p = ins.plain
            if p is None or p.kind != "diag" or len(p.args) != 1 or not isinstance(p.args[0], int) \
                    or not 0 <= p.args[0] < len(prog.linears):
                raise ProgramError(f"{where}: linear needs a diag(<linear op>) operand")
            lin = prog.linears[p.args[0]]
            if len(ins.args) != prog.layouts[lin.in_layout].n_ct or \
                    len(ins.results) != prog.layouts[lin.out_layout].n_ct:
                raise ProgramError(f"{where}: operand/result counts do not match linear op #{p.args[0]}")
            if lin.n1 < 1 or any(not isinstance(c, int) or c < 0 for c in lin.counts.values()):
                raise ProgramError(f"{where}: linear op #{p.args[0]} has no valid BSGS plan")
        elif len(ins.args) != _ARITY[ins.op]:
            raise ProgramError(f"{where}: takes {_ARITY[ins.op]} operand(s), got {len(ins.args)}")
        if ins.op == "linear":
            pass
        elif ins.op in ("add_plain", "mul_plain"):
            if ins.plain is None:
                raise ProgramError(f"{where}: missing plaintext operand")
            _check_plain(prog, where, ins.plain)
        elif ins.op == "refresh" and ins.plain is not None:
            # a bootstrapping target's refresh scales its input into the bootstrap's range first
            p = ins.plain
            if p.kind != "scalar" or len(p.args) != 1 or not (isinstance(p.args[0], (int, float))
                                                              and math.isfinite(p.args[0]) and 0 < p.args[0] <= 1):
                raise ProgramError(f"{where}: a refresh's factor must be a scalar in (0, 1], got {p}")
        elif ins.plain is not None:
            raise ProgramError(f"{where}: {ins.op} takes no plaintext operand")
        if ins.op == "mod_switch" and ins.to_level < 0:
            raise ProgramError(f"{where}: missing target level")
        if ins.level is None or ins.scale is None or not _finite(ins.scale):
            raise ProgramError(f"{where}: missing or non-finite planned level/scale")


def _check_security(prog: HEProgram, metadata: dict) -> None:
    p = prog.params
    total = sum(p.coeff_bits)
    sec = p.security
    if sec in HE_STANDARD_MAX_BITS:
        limit = HE_STANDARD_MAX_BITS[sec].get(p.poly_degree)
        if limit is None or total > limit:
            have = f"at most {limit}" if limit is not None else "no standard entry"
            raise _Insecure(f"params claim {sec} security but N={p.poly_degree} with a {total}-bit modulus "
                               f"is not {sec}-secure by the {source(p.poly_degree)} ({have})")
        return
    if metadata.get("insecure_ok") is not True:
        raise _Insecure(f"params are not 128-bit secure (security {sec!r}, N={p.poly_degree}, {total}-bit "
                           f"modulus) and the metadata does not record that the user asked for this "
                           f"(insecure_ok)")


def _validate(prog: HEProgram, metadata: dict, io_doc: dict | None) -> None:
    """Every semantic check of a program (on save with ``io_doc=None``, and on load);
    raises ProgramError (``_IoMismatch`` / ``_Insecure`` for io.json and security)."""
    _check_structure(prog)
    if io_doc is not None:
        want = _io_json(prog)
        keys = {k: want.pop(k) for k in ("galois_steps", "relin_keys")}
        got = dict(io_doc)
        got_keys = {k: got.pop(k, None) for k in ("galois_steps", "relin_keys")}
        diff = _json_diff(want, got)
        if diff:
            raise _IoMismatch(f"{IOSPEC} disagrees with {PROGRAM}: {diff}")
        steps = got_keys["galois_steps"]
        if not isinstance(steps, list) or not all(_is_int(s) and 0 < s < prog.params.slots for s in steps):
            raise _IoMismatch(f"{IOSPEC}: galois_steps must be a list of rotation steps in 1..{prog.params.slots - 1}")
        if not isinstance(got_keys["relin_keys"], bool):
            raise _IoMismatch(f"{IOSPEC}: relin_keys must be true or false")
        verify_program(prog, galois_steps=set(steps))
        if sorted(set(steps)) != keys["galois_steps"]:
            extra = sorted(set(steps) - set(keys["galois_steps"]))
            raise _IoMismatch(f"{IOSPEC} lists Galois keys the program does not use: {extra[:8]}")
        if got_keys["relin_keys"] != keys["relin_keys"]:
            raise _IoMismatch(f"{IOSPEC} says relin_keys={got_keys['relin_keys']}, the program "
                              f"{'multiplies' if keys['relin_keys'] else 'has no'} ciphertexts")
    else:
        verify_program(prog)
    _check_security(prog, metadata)


class _IoMismatch(ProgramError):
    pass


class _Insecure(ProgramError):
    pass


# =========================================================================== save

def save_hec(path: str | os.PathLike, prog: HEProgram, metadata: dict) -> None:
    """Write ``prog`` and ``metadata`` to ``path`` as a ``.hec`` file, atomically.

    Everything is checked before anything is written (metadata JSON-serialisable,
    weights numeric, the program valid and, unless ``metadata["insecure_ok"]``, secure);
    on any error a :class:`HecFileError` is raised and no file is created or changed."""
    spath = os.fspath(path)

    def fail(msg: str):
        raise HecFileError(f"{spath}: cannot save: {msg}")

    if not isinstance(metadata, dict):
        fail(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        md_text = json.dumps(metadata, indent=2, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as e:
        fail(f"metadata is not JSON-serialisable: {_one_line(e)}")
    if not isinstance(prog, HEProgram):
        fail(f"expected an HEProgram, got {type(prog).__name__}")
    weights: dict[str, np.ndarray] = {}
    for name, w in prog.weights.items():
        if not isinstance(name, str) or not name:
            fail(f"weight name {name!r} is not a non-empty string")
        arr = np.asarray(w)
        if arr.dtype.kind not in _WEIGHT_KINDS or arr.dtype.fields is not None:
            fail(f"weight {name!r} has dtype {arr.dtype}; weights must be float or int arrays")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            fail(f"weight {name!r} contains NaN or infinity")
        weights[name] = arr
    prog = dataclasses.replace(prog, weights=weights)
    try:
        _validate(prog, metadata, None)
    except _Insecure as e:
        fail(f"insecure parameters: {_one_line(e)}")
    except ProgramError as e:
        fail(f"the program is invalid: {_one_line(e)}")
    except (HecError, KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        fail(f"the program is invalid: {type(e).__name__}: {_one_line(e)}")
    program_text = print_program(prog)
    try:
        # the text form must read back to the same program (e.g. no newlines in notes)
        if print_program(parse_program(program_text, weights, source=PROGRAM)) != program_text:
            fail(f"the program does not survive its text form ({PROGRAM})")
    except ParseError as e:
        fail(f"the program's text form does not parse back: {_one_line(e)}")
    members = {
        PROGRAM: program_text.encode("utf-8"),
        WEIGHTS: _weights_npz(weights),
        METADATA: md_text.encode("utf-8"),
        IOSPEC: json.dumps(_io_json(prog), indent=1).encode("utf-8"),
    }
    for name, data in members.items():
        if len(data) > MAX_MEMBER_BYTES:
            fail(f"{name} would be {len(data)} bytes, over the {MAX_MEMBER_BYTES}-byte limit")
    if sum(len(d) for d in members.values()) > MAX_TOTAL_BYTES:
        fail(f"the file would exceed the {MAX_TOTAL_BYTES}-byte limit")
    now = datetime.now(timezone.utc).replace(microsecond=0)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "compiler": "hecompiler",
        "compiler_version": _compiler_version(),
        "created": now.isoformat().replace("+00:00", "Z"),
        "members": {name: {"sha256": _sha256(data), "size": len(data)} for name, data in members.items()},
    }
    manifest["digest"] = compute_digest(manifest, members)
    _write_archive(spath, manifest, members, fail)


def _write_archive(spath: str, manifest: dict, members: dict[str, bytes], fail) -> None:
    """Write the zip (manifest first, then the members in the fixed order) atomically."""
    when = datetime.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%SZ").timetuple()[:6]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as z:
        for name, data in [(MANIFEST, json.dumps(manifest, indent=2).encode("utf-8")),
                           *((m, members[m]) for m in HASHED_MEMBERS)]:
            info = zipfile.ZipInfo(name, date_time=when)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    try:
        atomic_write_bytes(spath, buf.getvalue())
    except HecError as e:
        raise HecFileError(f"{spath}: cannot save: {_one_line(str(e).removeprefix(spath + ': '))}") from None
    except OSError as e:
        fail(e.strerror or str(e))


def sign_hec(path: str | os.PathLike, key, output: str | os.PathLike | None = None) -> str:
    """Sign a ``.hec`` file: validate it completely, then store an ed25519 signature over its digest
    in the manifest (replacing an earlier signature), writing ``output`` (default: ``path`` itself)
    atomically.  ``key`` is an ``Ed25519PrivateKey`` or the path of one
    (:func:`hecompiler.signing.load_private_key`).  The members are written back byte for byte, so
    the digest is unchanged.  Returns the digest."""
    from . import signing

    if not hasattr(key, "sign"):
        key = signing.load_private_key(key)
    ld = _load(path, keep_members=True)
    out = os.fspath(output if output is not None else path)
    manifest = dict(ld.manifest)
    manifest["signature"] = signing.sign_digest(key, manifest["digest"])

    def fail(msg: str):
        raise HecFileError(f"{out}: cannot save: {msg}")

    _write_archive(out, manifest, ld.members, fail)
    return manifest["digest"]


# =========================================================================== load

@dataclass
class _Loaded:
    prog: HEProgram
    metadata: dict
    manifest: dict
    io: dict
    file_bytes: int
    member_bytes: dict[str, int]
    verified_with: str | None = None  # fingerprint of the --verify-key key that verified the signature
    members: dict[str, bytes] | None = None  # the raw members, when asked for (sign_hec)


def _open_regular(spath: str, fail):
    """Open ``spath`` for reading without blocking (a FIFO would otherwise wait for a writer) and
    check it is a non-empty regular file within the size limit; returns (file, size)."""
    try:
        fd = os.open(spath, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        fail("file not found")
    except IsADirectoryError:
        fail("is a directory, not a .hec file")
    except OSError as e:
        fail(f"cannot access: {e.strerror or e}")
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            fail("is a directory, not a .hec file")
        if not stat.S_ISREG(st.st_mode):
            fail("is not a regular file (FIFO, device or socket)")
        if st.st_size == 0:
            fail("file is empty (not a .hec file, or truncated)")
        if st.st_size > MAX_TOTAL_BYTES:
            fail(f"file is {st.st_size} bytes, over the {MAX_TOTAL_BYTES}-byte limit")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), st.st_size


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, fail, feed=None) -> bytearray:
    """A member's bytes, decompressed CHUNK_BYTES at a time into a buffer of its declared ``size``
    (never more), each chunk also given to ``feed``; a member that holds more or fewer bytes is
    refused."""
    name = info.filename
    try:
        buf = bytearray(size)
    except MemoryError:
        fail(f"not enough memory to read {name} ({size} bytes uncompressed)")
    view = memoryview(buf)
    pos = 0
    try:
        with z.open(info) as f:
            while True:
                chunk = f.read(min(CHUNK_BYTES, size - pos + 1))
                if not chunk:
                    break
                if pos + len(chunk) > size:
                    fail(f"file was modified or corrupted: {name} holds more than the {size} bytes the archive "
                         f"declares")
                view[pos:pos + len(chunk)] = chunk
                if feed is not None:
                    feed(chunk)
                pos += len(chunk)
    except HecFileError:
        raise
    except MemoryError:
        fail(f"not enough memory to read {name} ({size} bytes uncompressed)")
    except zipfile.BadZipFile as e:
        fail(f"file was modified or corrupted: {name}: {e}")
    except (zlib.error, EOFError, ValueError, OSError, NotImplementedError, RuntimeError) as e:
        fail(f"file was modified or corrupted: {name} cannot be decompressed ({type(e).__name__}: {_one_line(e)})")
    finally:
        view.release()
    if pos != size:
        fail(f"file was modified or corrupted: {name} has {pos} bytes, the archive declares {size}")
    return buf


def _load(path: str | os.PathLike, verify_key=None, keep_members: bool = False) -> _Loaded:
    spath = os.fspath(path)

    def fail(msg: str):
        raise HecFileError(f"{spath}: {msg}")

    pub = None
    if verify_key is not None:  # the key first: a bad --verify-key is the user's error, whatever the file
        from .signing import load_public_key

        pub = load_public_key(verify_key)

    # ---- the file itself, then the zip directory: everything is checked before decompressing
    f, file_bytes = _open_regular(spath, fail)
    data: dict[str, bytearray] = {}
    with f:
        try:
            z = zipfile.ZipFile(f)
        except zipfile.BadZipFile as e:
            fail(f"not a .hec file, or truncated: not a valid zip archive ({e})")
        except (zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError, MemoryError) as e:
            fail(f"not a .hec file, or truncated: unreadable zip archive ({type(e).__name__}: {_one_line(e)})")
        with z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                dups = sorted({n for n in names if names.count(n) > 1}) if len(names) < 100 else ["(many)"]
                fail(f"file was modified or corrupted: duplicate member {dups[0]}")
            for m in MEMBERS:
                if m not in names:
                    fail(f"missing member {m} (not a .hec file, or damaged)")
            extra = [n for n in names if n not in MEMBERS]
            if extra:
                fail(f"unexpected member {extra[0][:80]} (file was modified)")
            info_of = {i.filename: i for i in infos}
            total = 0
            for info in infos:
                limit = MAX_MANIFEST_BYTES if info.filename == MANIFEST else MAX_MEMBER_BYTES
                if info.file_size > limit:
                    fail(f"member {info.filename} declares {info.file_size} bytes uncompressed, over the "
                         f"{limit}-byte limit (refusing a possible zip bomb)")
                if info.file_size >= MIN_RATIO_CHECK_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                    fail(f"member {info.filename} declares {info.file_size} bytes uncompressed from "
                         f"{info.compress_size} compressed, a compression ratio over {MAX_RATIO}:1 (refusing a "
                         f"possible zip bomb)")
                total += info.file_size
            if total > MAX_TOTAL_BYTES:
                fail(f"members declare {total} bytes uncompressed in total, over the {MAX_TOTAL_BYTES}-byte limit "
                     f"(refusing a possible zip bomb)")

            # ---- the manifest (small): every field, and the sizes it declares against the directory
            raw_manifest = _read_member(z, info_of[MANIFEST], info_of[MANIFEST].file_size, fail)
            try:
                manifest = json.loads(raw_manifest.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                fail(f"{MANIFEST} is not valid JSON ({_one_line(e)})")
            _check_manifest(manifest, fail)
            listed = manifest["members"]
            for m in HASHED_MEMBERS:
                if info_of[m].file_size != listed[m]["size"]:
                    fail(f"file was modified or corrupted: {m} checksum mismatch (the archive holds "
                         f"{info_of[m].file_size} bytes, {MANIFEST} says {listed[m]['size']})")

            # ---- the members, streamed in the fixed order: checksums and the digest
            digest = _Digest(manifest)
            for m in HASHED_MEMBERS:
                h = hashlib.sha256()
                digest.member(m, listed[m]["size"])

                def feed(chunk, h=h):  # one pass feeds the member's checksum and the digest
                    h.update(chunk)
                    digest.update(chunk)

                data[m] = _read_member(z, info_of[m], listed[m]["size"], fail, feed)
                if h.hexdigest() != listed[m]["sha256"]:
                    fail(f"file was modified or corrupted: {m} checksum mismatch")
    digest_ok = digest.hexdigest() == manifest["digest"]

    # ---- the signature, when asked: before any member is parsed
    verified_with = None
    if pub is not None:
        from .signing import fingerprint, public_key_raw, verify_entry

        if "signature" not in manifest:
            fail("not signed, and --verify-key requires a signed program (sign it with: hecompile sign "
                 f"{spath} --key SIGNER.pem)")
        why = verify_entry(manifest["signature"], manifest["digest"], pub)
        if why:
            fail(why)
        if not digest_ok:
            fail("the signature does not match the contents: the file was modified after signing (its members "
                 "no longer match the signed digest)")
        verified_with = fingerprint(public_key_raw(pub))

    # ---- members
    try:
        text = data[PROGRAM].decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"{PROGRAM} is not UTF-8 text ({e})")
    weights = _read_weights(data[WEIGHTS], fail)
    try:
        prog = parse_program(text, weights, source=PROGRAM)
    except ParseError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        near = f" near {lines[1][:80]!r}" if len(lines) > 1 else ""
        fail(f"program does not parse: {lines[0] if lines else e}{near}")
    except (HecError, IndexError, KeyError, TypeError, ValueError, AttributeError, MemoryError, RecursionError,
            OverflowError) as e:
        fail(f"program does not parse: {PROGRAM}: {type(e).__name__}: {_one_line(e)}")
    del text
    jsons = {}
    for m in (METADATA, IOSPEC):
        try:
            jsons[m] = json.loads(data[m].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            fail(f"{m} is not valid JSON ({_one_line(e)})")
        if not isinstance(jsons[m], dict):
            fail(f"{m} is not a JSON object")
    metadata, io_doc = jsons[METADATA], jsons[IOSPEC]

    # ---- semantics: weights, references, io.json, levels/scales/keys, security
    try:
        _validate(prog, metadata, io_doc)
    except _IoMismatch as e:
        fail(_one_line(e))
    except _Insecure as e:
        fail(f"insecure parameters: {_one_line(e)}")
    except ProgramError as e:
        fail(f"invalid program: {_one_line(e)}")
    except (HecError, KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError,
            OverflowError, MemoryError) as e:
        # a check tripped over malformed content it did not anticipate: still a clear error
        fail(f"invalid program: {type(e).__name__}: {_one_line(e)}")
    # without a key the digest is checked last, so a member edited with its checksum updated gets the
    # specific complaint about its content first (the digest detects accidents, not edits: see signing)
    if not digest_ok:
        fail("file was modified or corrupted: the members do not match the manifest's digest (they come from "
             "different saves, or were modified; the digest binds program, weights, metadata and io.json)")
    return _Loaded(prog, metadata, manifest, io_doc, file_bytes, {m: len(b) for m, b in data.items()},
                   verified_with, {m: bytes(b) for m, b in data.items()} if keep_members else None)


def load_hec(path: str | os.PathLike, verify_key=None) -> tuple[HEProgram, dict]:
    """Load and fully validate a ``.hec`` file; returns ``(program, metadata)``.

    Raises :class:`HecFileError` (one line, naming the file) if the file is missing,
    not a regular file, not a .hec zip, truncated, declares oversized or implausibly
    compressed members, is corrupted or assembled from different saves (checksums and
    digest), from another format version, or holds a program that is malformed,
    references missing or mis-sized weights, disagrees with its io.json, fails
    :func:`verify_program`, or uses parameters below 128-bit security without
    ``metadata["insecure_ok"]``.

    With ``verify_key`` (the path of an ed25519 public key PEM, or an ``Ed25519PublicKey``)
    the file must also carry a signature by that key over its digest, and the members must
    match the signed digest; this is checked before any member is parsed."""
    ld = _load(path, verify_key)
    return ld.prog, ld.metadata


# =========================================================================== inspect

def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _bits_summary(bits: tuple[int, ...]) -> str:
    parts, k = [], 0
    while k < len(bits):
        j = k
        while j < len(bits) and bits[j] == bits[k]:
            j += 1
        parts.append(f"{bits[k]}" if j - k == 1 else f"{bits[k]}x{j - k}")
        k = j
    return "+".join(parts)


def inspect_hec(path: str | os.PathLike, verify_key=None) -> str:
    """A human summary of a (validated) ``.hec`` file; with ``verify_key`` (see :func:`load_hec`)
    the signature is verified first."""
    ld = _load(path, verify_key)
    prog, md, man = ld.prog, ld.metadata, ld.manifest
    p = prog.params
    lines = [f"{os.fspath(path)}: {FORMAT} format v{man['format_version']}, written by hecompiler "
             f"{man.get('compiler_version', '?')} at {man.get('created', '?')}, {_fmt_bytes(ld.file_bytes)}"]
    lines.append(f"digest: sha256 {man['digest']} (binds program, weights, metadata and io.json)")
    sig = man.get("signature")
    if sig is None:
        lines.append("signature: none (unsigned: hecompile sign adds one)")
    else:
        import base64

        from .signing import fingerprint

        who = fingerprint(base64.b64decode(sig["public_key"]))
        lines.append(f"signature: ed25519 by key {who}, " + (
            "verified with --verify-key" if ld.verified_with else "not verified (give --verify-key SIGNER.pub.pem)"))
    src = md.get("source_model", md.get("source_model_file"))
    sha = md.get("source_sha256", md.get("source_model_sha256"))
    if src or sha:
        lines.append(f"source model: {src or '?'} sha256 {sha or '?'}")
    if md.get("passes"):
        passes = md["passes"]
        lines.append("passes run: " + (", ".join(map(str, passes)) if isinstance(passes, list) else str(passes)))
    total = sum(p.coeff_bits)
    if p.security in HE_STANDARD_MAX_BITS:
        sec = (f"{p.security} ({source(p.poly_degree)}, {total} <= "
               f"{HE_STANDARD_MAX_BITS[p.security][p.poly_degree]} bits)")
    else:
        sec = f"{p.security} (NOT 128-bit secure; explicitly requested)"
    lines += [
        "params:",
        f"  ring degree N = {p.poly_degree} ({p.slots} slots)",
        f"  coefficient modulus {_bits_summary(p.coeff_bits[:-1])} bits + {p.coeff_bits[-1]}-bit special prime "
        f"= {total} bits",
        f"  scale 2^{p.scale_bits}, top level {p.top_level}",
        f"  security {sec}",
        "inputs:",
    ]
    for s in prog.inputs:
        lines.append(f"  {s.name} {list(s.shape)}  layout #{s.layout} {prog.layouts[s.layout].describe()}")
    lines.append("outputs:")
    for s in prog.outputs:
        a = f", alpha {s.alpha!r}" if s.alpha != 1.0 else ""
        lines.append(f"  {s.name} {list(s.shape)}  layout #{s.layout} {prog.layouts[s.layout].describe()}{a}")
    counts = prog.op_counts()
    lines.append(f"instructions: {len(prog.instrs)} ("
                 + ", ".join(f"{op} {n}" for op, n in counts.items()) + ")")
    lines.append(f"depth: {prog.levels_used()} rescales on the longest path, {counts.get('refresh', 0)} refreshes "
                 f"(top level {p.top_level})")
    lines.append(f"keys: {len(prog.galois_steps)} Galois (rotation) steps, relinearization "
                 f"{'yes' if prog.needs_relin else 'no'}")
    kinds: dict[str, int] = {}
    for lin in prog.linears:
        kinds[lin.kind] = kinds.get(lin.kind, 0) + 1
    lines.append(f"layouts: {len(prog.layouts)}, linear ops: {len(prog.linears)}"
                 + (" (" + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")" if kinds else ""))
    wbytes = sum(int(w.nbytes) for w in prog.weights.values())
    lines.append(f"weights: {len(prog.weights)} arrays, {sum(int(w.size) for w in prog.weights.values())} values, "
                 f"{_fmt_bytes(wbytes)}")
    rt = md.get("report_text")
    if isinstance(rt, str) and rt.strip():
        lines.append("report:")
        lines += ["  " + ln for ln in rt.rstrip("\n").splitlines()]
    return "\n".join(lines) + "\n"
