"""The client file (``hecompile export-client M.hec -o M.client``): what a key holder needs, no weights.

A client encrypts inputs, answers refresh requests and decrypts outputs.  For that it needs the
encryption parameters and primes, the slot layouts of the inputs and outputs, the rotation steps
and relinearisation the server's evaluation keys must cover, the range the program was planned
for, and the ids every file of the protocol is bound to (program sha256, parameter fingerprint).
It does not need the program's instructions or its weights, and a model owner who serves the
model must not hand those over.  :class:`ClientProgram` carries exactly that and is what the
client side of every encrypted backend accepts in place of an :class:`~hecompiler.heprog.HEProgram`
(``params``, ``primes``, ``layouts``, ``inputs``, ``outputs``, ``galois_steps``, ``needs_relin``,
and ``program_digest``, which :func:`hecompiler.backends.protocol.program_sha256` returns instead
of hashing instructions and weights it does not have).

File format (JSON, UTF-8; small: the digits model's is ~3 KiB against its 79 KiB ``.hec``)::

    {"format": "hecompiler.client", "format_version": 1,
     "body": {...},                   # below
     "digest": "<sha256 hex>",        # of b"hecompiler.client digest\\n" + canonical JSON of body
     "signature": {...}}              # optional: ed25519 over the digest (hecompile export-client --sign-key)

``body``: ``program_sha256`` (the full program's, weights included: keys and ciphertexts made
from the client file are accepted by the server holding the ``.hec``), ``hec_digest``,
``backend``, ``target``, ``params``, ``primes``, ``params_fingerprint``, ``galois_steps``,
``galois_levels`` (per step, the highest level the program rotates by it: a backend that makes
keys per level makes that step's key there), ``relin``, ``layouts`` (only the input and output
layouts, by id), ``inputs`` / ``outputs``
(name, shape, layout id, ciphertext value ids, output ``alpha``), ``input_limits``,
``fidelity`` (the compile report's error estimate), ``refresh`` (``client`` or ``bootstrap``),
``refreshes`` (how many refresh points the program has: a bootstrapping target's key holder makes
bootstrapping keys only when there is one) and ``client_round_trips``, ``source_model``,
``insecure_ok``.

Loading checks everything a server could lie about: the digest (and the signature with
``verify_key``), that the parameters are 128-bit secure by the HE standard table (or that the
model owner explicitly compiled insecure ones, which every step then says), that every layout is
consistent and covers its values, and the field types; any problem is a one-line
:class:`~hecompiler.errors.HecFileError` naming the file and the field.

What the file reveals about the model: its input/output shapes and layouts, the rotation steps of
its convolutions (the server's Galois keys must cover them), its depth through the parameters,
and, for client-aided refresh, the number of round trips; never a weight.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import HecError, HecFileError
from .fileio import atomic_write_bytes
from .heprog import IOSpec, Params
from .layout import Layout
from .security import HE_STANDARD_MAX_BITS, source

FORMAT = "hecompiler.client"
FORMAT_VERSION = 1
DIGEST_PREFIX = b"hecompiler.client digest\n"
#: a client file is a few KiB; anything much larger is not one
MAX_CLIENT_FILE_BYTES = 16 << 20
#: shapes beyond this many elements are not inputs of a CNN we run encrypted
_MAX_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class RefreshPoint:
    """One refresh of the program, as the client sees it: where the program refreshes, with no
    operand, level or weight.  :attr:`ClientProgram.instrs` is a list of these."""

    op: str = "refresh"


@dataclass
class ClientProgram:
    """The client's view of a compiled program (see the module doc): what ``SealClient`` and the
    protocol's client steps read from a program, and nothing else."""

    params: Params
    primes: tuple[int, ...]
    layouts: dict[int, Layout]
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    galois_steps: list[int]
    needs_relin: bool
    program_digest: str  # the full program's sha256 (protocol.program_sha256 returns it)
    meta: dict = field(default_factory=dict)  # input_limits, fidelity, target, report summary
    source: str = ""  # where it was read from, for messages
    refreshes: int = 0  # refresh points of the program (client round trips, or bootstraps)
    #: step -> the highest level the program rotates by it (what a key must reach); a client file
    #: written before the field: every key at the top
    key_levels: dict[int, int] = field(default_factory=dict)

    def galois_key_levels(self) -> dict[int, int]:
        """As :meth:`hecompiler.heprog.HEProgram.galois_key_levels`: the level each Galois key is made at."""
        top = self.params.top_level
        return {k: self.key_levels.get(k, top) for k in self.galois_steps}

    @property
    def instrs(self) -> list[RefreshPoint]:
        """The program's refresh points only, one :class:`RefreshPoint` each, in place of its
        instructions: what a key holder's keygen may ask of the program (``any(i.op == "refresh"
        ...)``: whether the server needs bootstrapping keys).  No operand, level or weight."""
        return [RefreshPoint()] * self.refreshes

    @property
    def backend(self) -> str:
        from .backends import for_program

        return for_program(self.meta)

    @property
    def refresh(self) -> str:
        return str(self.meta.get("refresh", "client"))

    def error_bound(self) -> float | None:
        """The compile report's bound on the largest absolute error of an output against the
        original model, for inputs like the planning inputs (:mod:`hecompiler.errorbound`); None
        when the report has none (the fidelity check was skipped)."""
        b = (self.meta.get("fidelity") or {}).get("error_bound") or {}
        v = b.get("max_abs_error")
        return float(v) if v is not None else None


# =========================================================================== export

def _digest(body: Mapping[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(DIGEST_PREFIX + canon.encode("ascii")).hexdigest()


def _io(spec: IOSpec, output: bool) -> dict:
    d = {"name": spec.name, "shape": [int(s) for s in spec.shape], "layout": int(spec.layout),
         "values": [int(v) for v in spec.values]}
    if output:
        d["alpha"] = float(spec.alpha)
    return d


def client_body(prog, meta: Mapping[str, Any] | None, hec_digest: str = "") -> dict:
    """The ``body`` of the client file of a full program ``prog`` (an HEProgram) and its metadata."""
    from .backends import for_program
    from .backends.protocol import params_fingerprint, program_sha256

    meta = dict(meta or {})
    report = dict(meta.get("report") or {})
    ids = sorted({io.layout for io in [*prog.inputs, *prog.outputs]})
    refresh = (report.get("refresh_model") or {}).get("kind", "client")
    return {
        "program_sha256": program_sha256(prog),
        "hec_digest": hec_digest,
        "backend": for_program(meta),
        "target": meta.get("target"),
        "params": prog.params.to_dict(),
        "primes": [int(q) for q in prog.primes],
        "params_fingerprint": params_fingerprint(prog),
        "galois_steps": [int(k) for k in prog.galois_steps],
        "galois_levels": [int(lv) for lv in prog.galois_key_levels().values()],
        "relin": bool(prog.needs_relin),
        "layouts": {str(i): prog.layouts[i].to_dict() for i in ids},
        "inputs": [_io(s, False) for s in prog.inputs],
        "outputs": [_io(s, True) for s in prog.outputs],
        "input_limits": meta.get("input_limits") or {},
        "fidelity": report.get("fidelity"),
        "refresh": refresh,
        "refreshes": sum(1 for ins in prog.instrs if ins.op == "refresh"),
        "client_round_trips": int(report.get("client_round_trips") or 0) if refresh == "client" else 0,
        "predicted": {k: report.get(k) for k in ("predicted_seconds", "predicted_keygen_seconds",
                                                 "key_upload_bytes", "predicted_network_seconds")},
        "source_model": str(meta.get("source_model") or ""),
        "insecure_ok": bool(meta.get("insecure_ok")),
    }


def client_file_bytes(prog, meta: Mapping[str, Any] | None, hec_digest: str = "", sign_key=None) -> bytes:
    """The client file of ``prog`` as bytes; ``sign_key`` (an ed25519 private key) signs its digest."""
    body = client_body(prog, meta, hec_digest)
    doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "body": body,
                           "digest": _digest(body)}
    if sign_key is not None:
        from .signing import sign_digest

        doc["signature"] = sign_digest(sign_key, doc["digest"])
    text = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n"
    return text.encode("utf-8")


def export_client(hec_path: str | os.PathLike, out_path: str | os.PathLike, verify_key=None,
                  sign_key=None) -> ClientProgram:
    """Write the client file of the ``.hec`` at ``hec_path`` to ``out_path`` (atomically); returns
    it as loaded back (so what was written is known to load)."""
    from .hecfile import _load

    ld = _load(hec_path, verify_key)
    data = client_file_bytes(ld.prog, ld.metadata, str(ld.manifest.get("digest", "")), sign_key)
    cp = parse_client_file(data, os.fspath(out_path))
    atomic_write_bytes(out_path, data)
    return cp


# =========================================================================== load

def _fail(src: str, msg: str):
    raise HecFileError(f"{src}: {msg}")


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_params(src: str, body: dict) -> Params:
    try:
        params = Params.from_dict(body["params"])
    except (KeyError, TypeError, ValueError) as e:
        _fail(src, f"body.params: malformed ({type(e).__name__}: {e})")
    if params.poly_degree not in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
        _fail(src, f"body.params.poly_degree: {params.poly_degree} is not a supported ring degree")
    if not 2 <= len(params.coeff_bits) <= 64 or not all(1 <= b <= 61 for b in params.coeff_bits):
        _fail(src, f"body.params.coeff_bits: {list(params.coeff_bits)} is not a modulus chain")
    if not 10 <= params.scale_bits <= 60:
        _fail(src, f"body.params.scale_bits: {params.scale_bits} out of range")
    if params.log_slots is not None and not 1 <= params.log_slots < params.poly_degree.bit_length() - 2:
        _fail(src, f"body.params.log_slots: {params.log_slots} out of range for N={params.poly_degree}")
    total = sum(params.coeff_bits)
    if params.security in HE_STANDARD_MAX_BITS:
        limit = HE_STANDARD_MAX_BITS[params.security].get(params.poly_degree)
        if limit is None or total > limit:
            _fail(src, f"body.params: claims {params.security} security but N={params.poly_degree} with a "
                       f"{total}-bit modulus is not by the {source(params.poly_degree)} (at most {limit}): "
                       "refusing to encrypt under it")
    elif params.security == "none":
        if body.get("insecure_ok") is not True:
            _fail(src, "body.params: not 128-bit secure and the file does not record that the model owner asked "
                       "for that (insecure_ok)")
    else:
        _fail(src, f"body.params.security: unknown level {params.security!r}")
    primes = body.get("primes")
    if not isinstance(primes, list) or len(primes) != params.top_level + 1 or not all(_int(q) and q > 2
                                                                                      for q in primes):
        _fail(src, f"body.primes: expected {params.top_level + 1} primes")
    return params


def _check_io(src: str, entries, layouts: dict[int, Layout], output: bool) -> list[IOSpec]:
    what = "outputs" if output else "inputs"
    if not isinstance(entries, list) or not entries:
        _fail(src, f"body.{what}: must be a non-empty list")
    out = []
    for k, e in enumerate(entries):
        where = f"body.{what}[{k}]"
        if not isinstance(e, dict):
            _fail(src, f"{where}: must be an object")
        name, shape, lay, values = e.get("name"), e.get("shape"), e.get("layout"), e.get("values")
        if not isinstance(name, str) or not name:
            _fail(src, f"{where}.name: must be a non-empty string")
        if (not isinstance(shape, list) or not shape or not all(_int(s) and s > 0 for s in shape)
                or math.prod(shape) > _MAX_ELEMENTS):
            _fail(src, f"{where}.shape: {shape!r} is not a tensor shape")
        if not _int(lay) or lay not in layouts:
            _fail(src, f"{where}.layout: {lay!r} is not one of the file's layouts {sorted(layouts)}")
        L = layouts[lay]
        if math.prod(shape) != L.size:
            _fail(src, f"{where}: shape {shape} has {math.prod(shape)} elements, its layout holds {L.size}")
        if not isinstance(values, list) or len(values) != L.n_ct or not all(_int(v) and v >= 0 for v in values):
            _fail(src, f"{where}.values: expected {L.n_ct} ciphertext ids (the layout's ciphertexts)")
        alpha = 1.0
        if output:
            alpha = e.get("alpha")
            if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
                _fail(src, f"{where}.alpha: must be a finite number")
        out.append(IOSpec(name, tuple(shape), lay, list(values), float(alpha)))
    return out


def parse_client_file(data: bytes, src: str = "<client file>", verify_key=None) -> ClientProgram:
    """A :class:`ClientProgram` from client-file bytes, every field checked (see the module doc)."""
    try:
        doc = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        _fail(src, f"not a client file (not JSON: {type(e).__name__})")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        _fail(src, f"not a client file (format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                   f"expected {FORMAT!r}; export one with hecompile export-client M.hec -o M.client)")
    if doc.get("format_version") != FORMAT_VERSION:
        _fail(src, f"client file format version {doc.get('format_version')!r}, this hecompiler reads "
                   f"{FORMAT_VERSION}: export it again")
    body = doc.get("body")
    if not isinstance(body, dict):
        _fail(src, "body: must be an object")
    try:
        digest = _digest(body)
    except (TypeError, ValueError) as e:
        _fail(src, f"body: not canonical JSON ({e})")
    if doc.get("digest") != digest:
        _fail(src, "modified or corrupted: the body does not match its digest")
    if verify_key is not None:
        from .signing import check_entry, load_public_key, verify_entry

        key = load_public_key(verify_key)
        entry = doc.get("signature")
        if entry is None:
            _fail(src, "not signed (--verify-key needs a client file exported with --sign-key)")
        why = check_entry(entry) or verify_entry(entry, digest, key)
        if why:
            _fail(src, f"signature: {why}")
    params = _check_params(src, body)
    psha = body.get("program_sha256")
    if not isinstance(psha, str) or len(psha) != 64:
        _fail(src, "body.program_sha256: must be 64 hex digits")
    raw = body.get("layouts")
    if not isinstance(raw, dict) or not raw:
        _fail(src, "body.layouts: must be a non-empty object")
    layouts: dict[int, Layout] = {}
    for k, d in raw.items():
        try:
            lay = Layout.from_dict(d)
            kid = int(k)
        except (HecError, KeyError, TypeError, ValueError) as e:
            _fail(src, f"body.layouts[{k}]: malformed ({type(e).__name__}: {e})")
        if lay.slots != params.slots:
            _fail(src, f"body.layouts[{k}]: {lay.slots} slots, the parameters give {params.slots}")
        layouts[kid] = lay
    inputs = _check_io(src, body.get("inputs"), layouts, False)
    outputs = _check_io(src, body.get("outputs"), layouts, True)
    steps = body.get("galois_steps")
    if not isinstance(steps, list) or not all(_int(s) and 0 < s < params.slots for s in steps):
        _fail(src, f"body.galois_steps: must be rotation steps in 1..{params.slots - 1}")
    levels = body.get("galois_levels")
    if levels is None:  # written before the field: keys at the top level
        levels = [params.top_level] * len(steps)
    if not isinstance(levels, list) or len(levels) != len(steps) \
            or not all(_int(lv) and 0 <= lv <= params.top_level for lv in levels):
        _fail(src, f"body.galois_levels: must be one level in 0..{params.top_level} per rotation step")
    if not isinstance(body.get("relin"), bool):
        _fail(src, "body.relin: must be true or false")
    backend = body.get("backend")
    if not isinstance(backend, str):
        _fail(src, "body.backend: must be a backend name")
    target = body.get("target")
    meta = {"target": dict(target) if isinstance(target, dict) else {"backend": backend},
            "input_limits": body.get("input_limits") if isinstance(body.get("input_limits"), dict) else {},
            "fidelity": body.get("fidelity") if isinstance(body.get("fidelity"), dict) else None,
            "refresh": body.get("refresh", "client"), "client_round_trips": body.get("client_round_trips", 0),
            "predicted": body.get("predicted") if isinstance(body.get("predicted"), dict) else {},
            "source_model": body.get("source_model", ""), "insecure_ok": body.get("insecure_ok") is True,
            "hec_digest": body.get("hec_digest", ""), "params_fingerprint": body.get("params_fingerprint"),
            "signed": "signature" in doc}
    meta["target"].setdefault("backend", backend)
    refreshes = body.get("refreshes")
    if refreshes is None:  # a client file written before the field: one if the program refreshes at all
        refreshes = 1 if (meta["refresh"] == "bootstrap" or _int(meta["client_round_trips"])
                          and meta["client_round_trips"] > 0) else 0
    if not _int(refreshes) or refreshes < 0:
        _fail(src, "body.refreshes: must be a count")
    cp = ClientProgram(params, tuple(int(q) for q in body["primes"]), layouts, inputs, outputs,
                       sorted(set(int(s) for s in steps)), bool(body["relin"]), psha, meta, src, int(refreshes),
                       {int(k): int(lv) for k, lv in zip(steps, levels)})
    from .backends.protocol import params_fingerprint

    if body.get("params_fingerprint") != params_fingerprint(cp):
        _fail(src, "body.params_fingerprint: does not match the parameters and primes")
    return cp


def load_client_file(path: str | os.PathLike, verify_key=None) -> ClientProgram:
    spath = os.fspath(path)
    try:
        with open(spath, "rb") as f:
            data = f.read(MAX_CLIENT_FILE_BYTES + 1)
    except FileNotFoundError:
        raise HecFileError(f"{spath}: no such file") from None
    except OSError as e:
        raise HecFileError(f"{spath}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_CLIENT_FILE_BYTES:
        _fail(spath, f"larger than {MAX_CLIENT_FILE_BYTES >> 20} MiB: not a client file")
    return parse_client_file(data, spath, verify_key)


def client_program_of(prog, meta: Mapping[str, Any] | None, src: str = "") -> ClientProgram:
    """The client's view of a full program already loaded (no file round trip)."""
    return parse_client_file(client_file_bytes(prog, meta), src or "<program>")


def _is_zip(spath: str) -> bool:
    """Whether ``spath`` starts like a zip (a ``.hec``) rather than a client file."""
    try:
        with open(spath, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except FileNotFoundError:
        raise HecFileError(f"{spath}: no such file") from None
    except OSError as e:
        raise HecFileError(f"{spath}: cannot read: {e.strerror or e}") from None


def load_for_client(path: str | os.PathLike, verify_key=None) -> ClientProgram:
    """What a client step needs from ``path``: a client file, or a ``.hec`` (of which only the client's
    view is kept; the weights are dropped after hashing).  ``verify_key`` checks the signature of
    whichever it is."""
    spath = os.fspath(path)
    if _is_zip(spath):  # a zip: a .hec
        from .hecfile import _load

        ld = _load(spath, verify_key)
        return parse_client_file(client_file_bytes(ld.prog, ld.metadata, str(ld.manifest.get("digest", ""))), spath)
    return load_client_file(spath, verify_key)


def load_program_or_client(path: str | os.PathLike, verify_key=None):
    """``(program, meta)`` for a client step given either file: a ``.hec`` gives the full program and
    its metadata (as :func:`hecompiler.hecfile.load_hec`), a client file its :class:`ClientProgram`
    and that program's ``meta`` (which :func:`hecompiler.backends.for_program` and
    :func:`hecompiler.inputs.check_input` read the same way).  A client step that needs the
    instructions (the simulator pre-check of ``encrypt``) must skip them for a ClientProgram."""
    spath = os.fspath(path)
    if _is_zip(spath):
        from .hecfile import load_hec

        return load_hec(spath, verify_key=verify_key)
    cp = load_client_file(spath, verify_key)
    return cp, cp.meta
