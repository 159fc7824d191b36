"""Security of the files hecompiler reads: ``.hec`` integrity and signatures, and the ONNX frontend
on hostile or degenerate models.

* ``.hec``: one digest binds every member (program, weights, metadata with the report, io.json) and
  the manifest's header; every manifest field is checked; sizes are checked against the manifest and
  the zip directory before anything is decompressed, and members are read in bounded chunks; an
  ed25519 signature over the digest (``hecompile sign``) makes any later edit detectable with
  ``--verify-key``.
* frontend: FIFOs and devices are refused, model and external-data sizes are capped before reading,
  opsets 22-25 are supported, zero dimensions and oversized tensors are refused with one line,
  Cast errors name the type, a kernel larger than its padded input is a one-line error.

Tests that could hang or exhaust memory on a broken implementation run in a subprocess with a
timeout and an address-space limit (``resource.setrlimit``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import resource
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hecompiler as hc
from hecompiler import hecfile
from hecompiler.cli import main
from hecompiler.errors import FrontendError, HecError, UnsupportedError
from hecompiler.hecfile import load_hec, save_hec
from hecompiler.heprog import HEProgram, Params, print_program

ROOT = Path(__file__).resolve().parents[1]

METADATA_A = {"source_model": "a.onnx", "source_sha256": "aa" * 32, "passes": ["canonicalize"],
              "report": {"rotations": 106, "max_abs_error": 1e-7}, "report_text": "model A: error 1e-7"}
METADATA_B = {"source_model": "b.onnx", "source_sha256": "bb" * 32, "passes": ["canonicalize", "dirac-merge"],
              "report": {"rotations": 12, "max_abs_error": 3e-2}, "report_text": "model B: error 3e-2"}


# =========================================================================== helpers

def _primes(n: int, bits) -> tuple[int, ...]:
    import tenseal.sealapi as sealapi

    return tuple(q.value() for q in sealapi.CoeffModulus.Create(n, list(bits)))[:-1]


@pytest.fixture(scope="module")
def prog() -> HEProgram:
    import build_models as bm

    from hecompiler.lower import lower

    g = hc.load_onnx(bm.MODELS["tiny_resnet_poly"]())
    hc.run_pipeline(g)
    N, bits = 16384, [60] + [40] * 7 + [60]
    p, _ = lower(g, Params(N, tuple(bits), 40), _primes(N, bits))
    return p


@pytest.fixture(scope="module")
def saved(prog, tmp_path_factory) -> dict[str, bytes]:
    """Bytes of two good .hec files of the same program with different metadata (models A and B)."""
    d = tmp_path_factory.mktemp("hec")
    save_hec(d / "a.hec", prog, METADATA_A)
    save_hec(d / "b.hec", prog, METADATA_B)
    return {"a": (d / "a.hec").read_bytes(), "b": (d / "b.hec").read_bytes()}


@pytest.fixture
def good(saved, tmp_path) -> Path:
    path = tmp_path / "model.hec"
    path.write_bytes(saved["a"])
    return path


@pytest.fixture
def other(saved, tmp_path) -> Path:
    path = tmp_path / "other.hec"
    path.write_bytes(saved["b"])
    return path


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_members(path, ms: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in ms.items():
            z.writestr(name, data)
    Path(path).write_bytes(buf.getvalue())


def rehash(ms: dict[str, bytes], names) -> None:
    """What an editor does to get past per-member checksums: recompute their sha256 and size."""
    man = json.loads(ms["manifest.json"])
    for name in names:
        man["members"][name] = {"sha256": hashlib.sha256(ms[name]).hexdigest(), "size": len(ms[name])}
    ms["manifest.json"] = json.dumps(man).encode()


def digest_recipe(ms: dict[str, bytes]) -> str:
    """The digest exactly as documented (hecfile module docstring and README), computed here
    independently of hecfile: sha256 over a fixed prefix, the manifest's header fields as canonical
    JSON, then each member's name, size and bytes in the fixed order."""
    man = json.loads(ms["manifest.json"])
    header = {k: man[k] for k in ("format", "format_version", "compiler", "compiler_version", "created")}
    h = hashlib.sha256(b"hecompiler.hec digest\n")
    h.update(json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n")
    for name in ("program.txt", "weights.npz", "metadata.json", "io.json"):
        h.update(f"{name}\n{len(ms[name])}\n".encode())
        h.update(ms[name])
    return h.hexdigest()


def reforge(path, **edits) -> None:
    """The strongest edit without the signing key: change members, then recompute every member
    checksum and the digest (so only a signature can tell)."""
    ms = members(path)
    for name, fn in edits.items():
        name = {"program": "program.txt", "weights": "weights.npz", "metadata": "metadata.json",
                "io": "io.json"}[name]
        ms[name] = fn(ms[name])
    rehash(ms, ("program.txt", "weights.npz", "metadata.json", "io.json"))
    man = json.loads(ms["manifest.json"])
    man["digest"] = digest_recipe(ms)
    ms["manifest.json"] = json.dumps(man).encode()
    write_members(path, ms)


def npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for k, a in arrays.items():
            with z.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def weight_times_3(name: str):
    def f(b: bytes) -> bytes:
        with np.load(io.BytesIO(b), allow_pickle=False) as w:
            arrays = {k: w[k] for k in w.files}
        arrays[name] = arrays[name] * 3
        return npz(arrays)
    return f


def add_plain_constant(b: bytes) -> bytes:
    """The first add_plain's constant 2.0 -> 6.0 (same text length)."""
    text = b.decode()
    new, n = re.subn(r"(= add_plain %\d+, fill\(\d+, \d+, )2\.0\)", r"\g<1>6.0)", text, count=1)
    assert n == 1
    return new.encode()


def linear_multiplier(b: bytes) -> bytes:
    """A linear op's output multiplier 0.125 -> 0.375."""
    new, n = re.subn(r'"mult":0\.125,', '"mult":0.375,', b.decode(), count=1)
    assert n == 1
    return new.encode()


def swap_metadata(path_from):
    return lambda b: members(path_from)["metadata.json"]


def load_error(path, **kw) -> str:
    with pytest.raises(HecError) as ei:
        load_hec(path, **kw) if kw else load_hec(path)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


def run_cli(*args, limit_bytes: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``hecompile ARGS`` in a fresh process, optionally under an address-space limit."""
    def preexec():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "hecompiler.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec, env=env, cwd=ROOT)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("hecompile: error: ")]
    assert len(errs) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return errs[0]


# --------------------------------------------------------------------------- a hand-made zip writer

def _zip(entries: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A zip archive from (name, method, stored bytes, uncompressed size, crc32) entries; the bytes
    are written as given (already deflated for method 8), so sizes can be whatever we want."""
    out, central = io.BytesIO(), []
    for name, method, data, usize, crc in entries:
        off = out.tell()
        fn = name.encode()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), usize, len(fn), 0))
        out.write(fn)
        out.write(data)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data),
                                   usize, len(fn), 0, 0, 0, 0, 0o644 << 16, off) + fn)
    cd_off = out.tell()
    for c in central:
        out.write(c)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), out.tell() - cd_off, cd_off, 0))
    return out.getvalue()


def _entries_of(ms: dict[str, bytes], skip: str) -> list:
    res = []
    for name, data in ms.items():
        if name != skip:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            res.append((name, 8, c.compress(data) + c.flush(), len(data), zlib.crc32(data)))
    return res


def _zeros_deflated(n_chunks: int, chunk: int = 1 << 24) -> tuple[bytes, int]:
    """A raw deflate stream of n_chunks * chunk zero bytes (about 1000:1) and its crc32, fast: each
    chunk is compressed once after a full flush, so its compressed form repeats."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    z = bytes(chunk)
    part = c.compress(z) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush()
    crc = 0
    for _ in range(n_chunks):
        crc = zlib.crc32(z, crc)
    return part * n_chunks + tail, crc


# =========================================================================== A1: one digest binds every member

def test_digest_is_written_and_documented(good):
    ms = members(good)
    man = json.loads(ms["manifest.json"])
    assert man["format_version"] == hecfile.FORMAT_VERSION >= 2
    assert man["digest"] == digest_recipe(ms)
    assert "signature" not in man
    assert hecfile.compute_digest(man, ms) == man["digest"]


@pytest.mark.parametrize("what", ["weight x3", "add_plain constant", "linear multiplier", "metadata of model B"])
def test_edit_with_recomputed_checksums_is_refused(good, other, what):
    """Before: each of these edits, with the member checksums recomputed, loaded and ran (another
    answer, or another model's report).  Now the digest ties all members together."""
    ms = members(good)
    if what == "weight x3":
        ms["weights.npz"] = weight_times_3("conv1.weight.bn")(ms["weights.npz"])
        name = "weights.npz"
    elif what == "add_plain constant":
        ms["program.txt"] = add_plain_constant(ms["program.txt"])
        name = "program.txt"
    elif what == "linear multiplier":
        ms["program.txt"] = linear_multiplier(ms["program.txt"])
        name = "program.txt"
    else:
        ms["metadata.json"] = members(other)["metadata.json"]
        name = "metadata.json"
    rehash(ms, (name,))
    write_members(good, ms)
    msg = load_error(good)
    assert "digest" in msg and "modified" in msg, msg


def test_manifest_swapped_between_models(good, other):
    """Model A's members under model B's manifest: refused (B's checksums and digest)."""
    ma, mb = members(good), members(other)
    write_members(good, dict(ma, **{"manifest.json": mb["manifest.json"]}))
    msg = load_error(good)
    assert "metadata.json checksum mismatch" in msg


@pytest.mark.parametrize("change, want", [
    (lambda m: m.update(extra="x"), "unexpected field 'extra'"),
    (lambda m: m.pop("digest"), "digest is missing"),
    (lambda m: m.update(digest="00" * 16), "digest must be"),
    (lambda m: m.update(digest=123), "digest must be"),
    (lambda m: m.update(compiler=["hecompiler"]), "compiler must be"),
    (lambda m: m.update(compiler_version=7), "compiler_version must be"),
    (lambda m: m.update(created="yesterday"), "created must be"),
    (lambda m: m["members"]["program.txt"].update(size="12"), "members.program.txt.size must be"),
    (lambda m: m["members"]["program.txt"].update(size=-1), "members.program.txt.size must be"),
    (lambda m: m["members"]["program.txt"].pop("size"), "members.program.txt.size is missing"),
    (lambda m: m["members"]["io.json"].update(sha256="XYZ"), "members.io.json.sha256 must be"),
    (lambda m: m["members"]["io.json"].update(mode=7), "unexpected field 'members.io.json.mode'"),
    (lambda m: m["members"].update({"evil.py": {"sha256": "0" * 64, "size": 1}}), "lists unexpected member"),
    (lambda m: m.update(signature="yes"), "signature must be"),
    (lambda m: m.update(format_version=1), "format version 1"),
])
def test_every_manifest_field_is_checked(good, change, want):
    ms = members(good)
    man = json.loads(ms["manifest.json"])
    change(man)
    ms["manifest.json"] = json.dumps(man).encode()
    write_members(good, ms)
    msg = load_error(good)
    assert want in msg, msg


# =========================================================================== A2: sizes before decompressing

def spy_open(monkeypatch) -> list[str]:
    """The names of the zip members decompressed from now on."""
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *a, **kw):
        opened.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *a, **kw)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return opened


def test_sizes_checked_against_manifest_before_decompressing(good, monkeypatch):
    """The zip directory and the manifest disagree on a member's size: refused without ever
    decompressing that member."""
    ms = members(good)
    man = json.loads(ms["manifest.json"])
    man["members"]["weights.npz"]["size"] += 1000
    ms["manifest.json"] = json.dumps(man).encode()
    write_members(good, ms)
    opened = spy_open(monkeypatch)
    msg = load_error(good)
    assert "weights.npz" in msg and "checksum mismatch" in msg
    assert "weights.npz" not in opened, opened


def test_compression_ratio_refused_before_decompressing(good, monkeypatch):
    """A member that declares far more bytes than its compressed size allows for real data (a zip
    bomb) is refused from the directory alone."""
    ms = members(good)
    data, crc = _zeros_deflated(4, chunk=1 << 22)  # 16 MiB of zeros in about 16 KB
    usize = 4 << 22
    man = json.loads(ms["manifest.json"])
    man["members"]["weights.npz"]["size"] = usize
    ms["manifest.json"] = json.dumps(man).encode()
    Path(good).write_bytes(_zip(_entries_of(ms, "weights.npz") + [("weights.npz", 8, data, usize, crc)]))
    monkeypatch.setattr(hecfile, "MIN_RATIO_CHECK_BYTES", 1 << 20)
    opened = spy_open(monkeypatch)
    msg = load_error(good)
    assert "zip bomb" in msg and "weights.npz" in msg and "compression ratio" in msg, msg
    assert "weights.npz" not in opened


@pytest.fixture(scope="module")
def bomb(saved, tmp_path_factory) -> Path:
    """A 3 MB .hec whose weights.npz really inflates to 3 GiB of zeros, manifest and zip directory
    agreeing on that size."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.hec"
    good = path.with_name("good.hec")
    good.write_bytes(saved["a"])
    ms = members(good)
    data, crc = _zeros_deflated(192)
    usize = 192 << 24
    man = json.loads(ms["manifest.json"])
    man["members"]["weights.npz"]["size"] = usize
    ms["manifest.json"] = json.dumps(man).encode()
    path.write_bytes(_zip(_entries_of(ms, "weights.npz") + [("weights.npz", 8, data, usize, crc)]))
    assert path.stat().st_size < 4 << 20
    return path


def test_compression_bomb_under_ulimit_is_one_line(bomb):
    """Before: the loader inflated all 3 GiB (6.4 GB peak without a limit; under ``ulimit -v`` a
    MemoryError traceback).  Now: one line, before decompressing."""
    r = run_cli("inspect", bomb, limit_bytes=3 << 29)
    err = one_line_error(r)
    assert str(bomb) in err and "weights.npz" in err and "zip bomb" in err, err


def test_huge_member_under_ulimit_is_one_line(saved, tmp_path):
    """A member that is really 3 GiB (stored, ratio 1: no bomb heuristics apply, and the file is
    sparse so it costs no disk) under an address-space limit: a one-line out-of-memory error, not a
    MemoryError traceback."""
    good = tmp_path / "g.hec"
    good.write_bytes(saved["a"])
    ms = members(good)
    usize = 3 << 30
    man = json.loads(ms["manifest.json"])
    man["members"]["weights.npz"]["size"] = usize
    ms["manifest.json"] = json.dumps(man).encode()
    crc = 0
    z = bytes(1 << 24)
    for _ in range(usize >> 24):
        crc = zlib.crc32(z, crc)
    head = _zip(_entries_of(ms, "weights.npz"))
    cd = head.index(struct.pack("<I", 0x02014B50))
    local = head[:cd]
    fn = b"weights.npz"
    lh = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc, usize, usize, len(fn), 0) + fn
    off = len(local)
    path = tmp_path / "huge.hec"
    with open(path, "wb") as f:
        f.write(local)
        f.write(lh)
        f.seek(usize, os.SEEK_CUR)  # a hole of zeros
        cd_off = f.tell()
        n = 0
        for entry in head[cd:head.index(struct.pack("<I", 0x06054B50))].split(struct.pack("<I", 0x02014B50))[1:]:
            f.write(struct.pack("<I", 0x02014B50) + entry)
            n += 1
        f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, crc, usize, usize, len(fn),
                            0, 0, 0, 0, 0o644 << 16, off) + fn)
        n += 1
        end = f.tell()
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, end - cd_off, cd_off, 0))
    with zipfile.ZipFile(path) as zf:  # the archive is well formed
        assert zf.getinfo("weights.npz").file_size == usize
    r = run_cli("inspect", path, limit_bytes=3 << 29)
    err = one_line_error(r)
    assert str(path) in err and "weights.npz" in err and "memory" in err, err


# =========================================================================== A3: signatures

@pytest.fixture(scope="module")
def signer(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    assert main(["keygen-signing", "-o", str(d / "signer.pem")]) == 0
    return d / "signer.pem", d / "signer.pub.pem"


@pytest.fixture(scope="module")
def intruder(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys2")
    assert main(["keygen-signing", "-o", str(d / "intruder.pem")]) == 0
    return d / "intruder.pem", d / "intruder.pub.pem"


@pytest.fixture
def signed(good, signer) -> Path:
    assert main(["sign", str(good), "--key", str(signer[0])]) == 0
    return good


def test_keygen_signing_files(signer, tmp_path, capsys):
    priv, pub = signer
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    capsys.readouterr()
    assert main(["keygen-signing", "-o", str(priv)]) == 1  # never overwrites a key
    assert "already exists" in capsys.readouterr().err
    assert main(["keygen-signing", "-o", str(tmp_path / "nodir" / "k.pem")]) == 1
    assert os.listdir(tmp_path) == []


def test_sign_and_verify(signed, signer, prog, capsys):
    p2, md = load_hec(signed, verify_key=signer[1])
    assert print_program(p2) == print_program(prog) and md == METADATA_A
    load_hec(signed)  # a signed file loads without a key too
    man = json.loads(members(signed)["manifest.json"])
    assert man["signature"]["algorithm"] == "ed25519" and man["digest"] == digest_recipe(members(signed))
    assert main(["inspect", str(signed), "--verify-key", str(signer[1])]) == 0
    out = capsys.readouterr().out
    assert "signature: ed25519" in out and "verified" in out
    assert main(["inspect", str(signed)]) == 0
    assert "not verified" in capsys.readouterr().out


def test_sign_to_another_file(good, signer, tmp_path):
    out = tmp_path / "signed.hec"
    before = good.read_bytes()
    assert main(["sign", str(good), "--key", str(signer[0]), "-o", str(out)]) == 0
    assert good.read_bytes() == before
    load_hec(out, verify_key=signer[1])
    assert "not signed" in load_error(good, verify_key=signer[1])


def test_sign_refuses_a_damaged_file_and_writes_nothing(good, signer, tmp_path, capsys):
    ms = members(good)
    ms["weights.npz"] = weight_times_3("conv1.weight.bn")(ms["weights.npz"])
    write_members(good, ms)  # stale checksum
    before = good.read_bytes()
    out = tmp_path / "s.hec"
    assert main(["sign", str(good), "--key", str(signer[0]), "-o", str(out)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert not out.exists() and good.read_bytes() == before


def test_unsigned_and_wrong_key_refused(good, signed, signer, intruder):
    msg = load_error(signed, verify_key=intruder[1])
    assert "signed by another key" in msg
    fresh = good.with_name("unsigned.hec")
    save_hec(fresh, load_hec(signed)[0], METADATA_A)
    assert "not signed" in load_error(fresh, verify_key=signer[1])


@pytest.mark.parametrize("what", ["weight x3", "add_plain constant", "linear multiplier", "metadata of model B",
                                  "io.json"])
def test_any_edit_after_signing_fails_verification(signed, other, signer, what):
    """Edits with every checksum and the digest recomputed (what anyone can do without the key):
    only the signature tells, and it does."""
    edit = {"weight x3": {"weights": weight_times_3("conv1.weight.bn")},
            "add_plain constant": {"program": add_plain_constant},
            "linear multiplier": {"program": linear_multiplier},
            "metadata of model B": {"metadata": swap_metadata(other)},
            "io.json": {"io": lambda b: b + b" "}}[what]
    reforge(signed, **edit)
    load_hec(signed)  # consistent: loads without a key (the digest only detects accidents)
    msg = load_error(signed, verify_key=signer[1])
    assert "signature does not match" in msg and "modified after signing" in msg, msg


def test_edit_after_signing_with_stale_digest_fails(signed, signer):
    ms = members(signed)
    ms["weights.npz"] = weight_times_3("conv1.weight.bn")(ms["weights.npz"])
    rehash(ms, ("weights.npz",))
    write_members(signed, ms)
    msg = load_error(signed, verify_key=signer[1])
    assert "modified" in msg


def test_resigned_by_intruder_fails(signed, signer, intruder):
    reforge(signed, weights=weight_times_3("conv1.weight.bn"))
    assert main(["sign", str(signed), "--key", str(intruder[0])]) == 0
    msg = load_error(signed, verify_key=signer[1])
    assert "signed by another key" in msg


def test_signature_value_tampered(signed, signer):
    ms = members(signed)
    man = json.loads(ms["manifest.json"])
    import base64

    sig = bytearray(base64.b64decode(man["signature"]["value"]))
    sig[5] ^= 1
    man["signature"]["value"] = base64.b64encode(bytes(sig)).decode()
    ms["manifest.json"] = json.dumps(man).encode()
    write_members(signed, ms)
    assert "signature does not match" in load_error(signed, verify_key=signer[1])


def test_cli_keygen_and_run_verify(signed, good, signer, intruder, tmp_path, capsys):
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32))
    # run: signed and verified
    assert main(["run", str(signed), "--input", str(x), "--backend", "sim", "-q", "-o", str(tmp_path / "y.npy"),
                 "--verify-key", str(signer[1])]) == 0
    # run and keygen: wrong key, or edited after signing: one line, nothing written
    capsys.readouterr()
    assert main(["run", str(signed), "--input", str(x), "--backend", "sim", "-q", "-o", str(tmp_path / "y2.npy"),
                 "--verify-key", str(intruder[1])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hecompile: error: " in err and "signed by another key" in err
    assert not (tmp_path / "y2.npy").exists()
    reforge(signed, weights=weight_times_3("conv1.weight.bn"))
    assert main(["keygen", str(signed), "--client-dir", str(tmp_path / "c"), "--server-dir", str(tmp_path / "s"),
                 "--verify-key", str(signer[1])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "signature does not match" in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()


def test_cli_unsigned_refused(good, signer, tmp_path, capsys):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 1, 8, 8), np.float32))
    assert main(["run", str(good), "--input", str(x), "--backend", "sim", "--verify-key", str(signer[1])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not signed" in err and "hecompile sign" in err


def test_bad_key_files(good, signer, tmp_path, capsys):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    rsa_pub = tmp_path / "rsa.pub.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
    for key, want in ((junk, "not a PEM public key"), (rsa_pub, "not an ed25519 key"),
                      (signer[0], "holds a private key"), (tmp_path / "none.pem", "no such file"),
                      (tmp_path, "not a regular file")):
        with pytest.raises(HecError, match=re.escape(want)) as ei:
            load_hec(good, verify_key=key)
        assert str(key) in str(ei.value) and "\n" not in str(ei.value)
    for key, want in ((junk, "not a PEM private key"), (signer[1], "holds a public key")):
        assert main(["sign", str(good), "--key", str(key)]) == 1
        assert want in capsys.readouterr().err


def test_key_fifo_does_not_hang(good, tmp_path):
    fifo = tmp_path / "key.pem"
    os.mkfifo(fifo)
    r = run_cli("inspect", good, "--verify-key", fifo, timeout=60)
    assert "not a regular file" in one_line_error(r)


# =========================================================================== B1: model files

def _relu_model(shape=(1, 1, 8, 8), opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_fifo_model_does_not_hang(tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    r = run_cli(fifo, "-o", tmp_path / "m.ir", timeout=60)
    err = one_line_error(r)
    assert str(fifo) in err and "not a regular file" in err
    assert not (tmp_path / "m.ir").exists()


def test_dev_zero_model_is_refused_before_reading(tmp_path):
    r = run_cli("/dev/zero", "-o", tmp_path / "m.ir", limit_bytes=2 << 30, timeout=60)
    err = one_line_error(r)
    assert "/dev/zero" in err and "not a regular file" in err


def test_model_size_cap(tmp_path, monkeypatch):
    from hecompiler import frontend

    path = tmp_path / "m.onnx"
    onnx.save(_relu_model(), path)
    assert frontend.MAX_MODEL_BYTES == 2**31
    monkeypatch.setattr(frontend, "MAX_MODEL_BYTES", 50)
    with pytest.raises(FrontendError, match=r"m\.onnx: the file is \d+ bytes, over the 50-byte limit") as ei:
        hc.load_onnx(path)
    assert "\n" not in str(ei.value)
    with pytest.raises(FrontendError, match="directory"):
        hc.load_onnx(tmp_path)


def _external_model(tmp_path) -> Path:
    w = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"], name="mul")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "ext.onnx"
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    return path


def test_external_data_loads_and_is_checked(tmp_path, monkeypatch):
    from hecompiler import frontend

    path = _external_model(tmp_path)
    g = hc.load_onnx(path)
    y = hc.run_graph(g, {"x": np.ones((1, 1, 4, 4), np.float32)})[0]
    assert np.array_equal(y.reshape(-1), np.arange(16))
    monkeypatch.setattr(frontend, "MAX_EXTERNAL_BYTES", 32)
    with pytest.raises(FrontendError, match=r"external data .*ext\.data.* over the 32-byte limit") as ei:
        hc.load_onnx(path)
    assert "\n" not in str(ei.value)


def test_external_data_fifo_does_not_hang(tmp_path):
    path = _external_model(tmp_path)
    (tmp_path / "ext.data").unlink()
    os.mkfifo(tmp_path / "ext.data")
    r = run_cli(path, "-o", tmp_path / "m.ir", timeout=60)
    err = one_line_error(r)
    assert "ext.data" in err and "not a regular file" in err


# =========================================================================== B2: opsets 22-25

def _cnn(opset: int) -> onnx.ModelProto:
    """Conv, BatchNormalization, Pad, MaxPool, AveragePool, Identity, Mul/Add, GlobalAveragePool,
    Reshape, Flatten, Gemm: the ops whose schemas opsets 22-25 re-versioned, and the usual rest."""
    rng = np.random.default_rng(opset)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w1", f(4, 1, 3, 3)), ("b1", f(4)), ("sc", f(4) ** 2 + 0.5), ("bb", f(4)), ("mu", f(4)),
        ("var", f(4) ** 2 + 0.5), ("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
        ("w2", f(4, 4, 3, 3)), ("k", np.array([0.5], np.float32)), ("shape", np.array([1, 4, 1, 1], np.int64)),
        ("wg", f(10, 4)), ("bg", f(10))]]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "sc", "bb", "mu", "var"], ["n1"], name="bn1"),
        helper.make_node("Mul", ["n1", "n1"], ["sq"], name="sq"),
        helper.make_node("Pad", ["sq", "pads"], ["p1"], name="pad1"),
        helper.make_node("MaxPool", ["p1"], ["m1"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Identity", ["m1"], ["i1"], name="ident"),
        helper.make_node("Conv", ["i1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c2", "k"], ["s2"], name="scale"),
        helper.make_node("Add", ["s2", "i1"], ["r2"], name="skip"),
        helper.make_node("AveragePool", ["r2"], ["a2"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g2"], name="gap"),
        helper.make_node("Reshape", ["g2", "shape"], ["rs"], name="reshape"),
        helper.make_node("Flatten", ["rs"], ["fl"], name="flatten"),
        helper.make_node("Gemm", ["fl", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    m.ir_version = 10 if opset >= 22 else 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _ort_session(model: onnx.ModelProto, opset: int):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - the installed onnxruntime's own refusal, quoted in the skip
        if "opset" in str(e).lower():
            pytest.skip(f"onnxruntime {ort.__version__} does not support ai.onnx opset {opset}: "
                        f"{str(e).strip().splitlines()[0][:200]}")
        raise


@pytest.mark.parametrize("opset", [13, 17, 21, 22, 23, 24, 25])
def test_supported_opsets(opset):
    assert [n.op for n in hc.load_onnx(_relu_model(opset=opset)).nodes] == ["Relu"]


@pytest.mark.parametrize("opset, hint", [(12, 13), (26, 25), (7, 13)])
def test_unsupported_opset(opset, hint):
    with pytest.raises(UnsupportedError, match=rf"opset {opset} is not supported \(supported: 13 to 25\); "
                                               rf"re-export with opset_version={hint}"):
        hc.load_onnx(_relu_model(opset=opset))


@pytest.mark.parametrize("opset", [13, 17, 21, 22, 23, 24, 25])
def test_opset_cnn_matches_onnxruntime(opset):
    """The same CNN written at each opset: the interpreter of the imported graph (after the default
    passes) agrees with onnxruntime on the original model."""
    m = _cnn(opset)
    sess = _ort_session(m, opset)
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    ref = sess.run(None, {"x": x})[0]
    g = hc.load_onnx(m)
    got = np.asarray(hc.run_graph(g, {"x": x})[0], np.float64)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    hc.run_pipeline(g)
    got2 = np.asarray(hc.run_graph(g, {"x": x})[0], np.float64)
    assert np.abs(got2 - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_lifted_op_schemas_unchanged_up_to_max_opset():
    """Direct support of opsets 22-25 rests on this: every op the frontend lifts has the same
    attributes and inputs at MAX_OPSET as at opset 21 (Cast-24 only adds round_mode, which applies to
    FLOAT8E8M0 and which our identity-only Cast never uses)."""
    import onnx.defs as defs

    from hecompiler import frontend

    assert frontend.MAX_OPSET == 25
    for op in frontend.LIFTERS:
        a, b = defs.get_schema(op, 21), defs.get_schema(op, frontend.MAX_OPSET)
        sig = lambda s: ({k: (v.type, v.required) for k, v in s.attributes.items()},  # noqa: E731
                         [(i.name, i.option) for i in s.inputs], [o.name for o in s.outputs])
        sa, sb = sig(a), sig(b)
        if op == "Cast":
            sb[0].pop("round_mode", None)
        assert sa == sb, (op, sa, sb)


# =========================================================================== B3-B6: shapes, Cast, kernels

def _model(nodes, x_shape, y_shape, inits=(), opset=17, x_name="x", elem_out=TensorProto.FLOAT):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", elem_out, y_shape)], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("shape, dim", [([0, 1, 4, 4], 0), ([1, 0, 4, 4], 1), ([1, 1, 4, 0], 3)])
def test_zero_input_dim_refused(shape, dim):
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], shape, shape)
    with pytest.raises(FrontendError, match=rf"input 'x' dim {dim} is 0") as ei:
        hc.load_onnx(m)
    assert "\n" not in str(ei.value)


def test_zero_input_shape_given_refused():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [1, 1, "H", "W"], [1, 1, "H", "W"])
    with pytest.raises(FrontendError, match=r"input 'x'.* dim 2 is 0"):
        hc.load_onnx(m, {"x": (1, 1, 0, 4)})


def test_zero_dim_initializer_refused():
    w = numpy_helper.from_array(np.ones((0, 1, 3, 3), np.float32), "w")
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv0", pads=[1, 1, 1, 1])],
               [1, 1, 4, 4], [1, 0, 4, 4], [w])
    with pytest.raises(FrontendError, match=r"node 'conv0' \(Conv, opset 17\): .*'w'.*zero dimension.*\[0, 1, 3, 3\]"):
        hc.load_onnx(m)
    b = numpy_helper.from_array(np.ones((1, 0, 1, 1), np.float32), "b")
    m = _model([helper.make_node("Add", ["x", "b"], ["y"], name="add0")], [1, 1, 4, 4], [1, 0, 4, 4], [b])
    with pytest.raises(FrontendError, match=r"node 'add0' \(Add, opset 17\): .*'b'.*zero dimension"):
        hc.load_onnx(m)


def test_zero_dim_intermediate_refused():
    """An empty tensor made at compile time (Slice to nothing) and then used with the input."""
    inits = [numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32), "c"),
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([0], np.int64), "e0"),
             numpy_helper.from_array(np.array([1], np.int64), "ax")]
    nodes = [helper.make_node("Slice", ["c", "s0", "e0", "ax"], ["empty"], name="slice0"),
             helper.make_node("Mul", ["x", "empty"], ["y"], name="mul0")]
    m = _model(nodes, [1, 1, 4, 4], [1, 0, 4, 4], inits)
    with pytest.raises(FrontendError, match=r"node 'mul0' \(Mul, opset 17\): .*zero dimension") as ei:
        hc.load_onnx(m)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("to, name", [(TensorProto.BFLOAT16, "BFLOAT16"), (TensorProto.UINT16, "UINT16"),
                                      (TensorProto.UINT64, "UINT64"), (TensorProto.FLOAT16, "f16")])
def test_cast_error_names_the_type(to, name):
    """Before: "to 16" / "to 17" (raw enum numbers) for the types the IR lacks; types the IR has are
    named as the IR names the tensor (f32, f16, i64)."""
    m = _model([helper.make_node("Cast", ["x"], ["y"], name="cast0", to=to)], [1, 1, 4, 4], [1, 1, 4, 4],
               elem_out=to)
    with pytest.raises(UnsupportedError, match=rf"node 'cast0' \(Cast, opset 17\): casting a run-time tensor "
                                               rf"f32\[1,1,4,4\] to {name} is not supported") as ei:
        hc.load_onnx(m)
    assert not re.search(r"to \d", str(ei.value))


@pytest.mark.parametrize("op, attrs, inits, hw", [
    ("Conv", {}, [("w", (1, 1, 3, 3))], 1),
    ("Conv", {}, [("w", (1, 1, 3, 3))], 2),
    ("Conv", {"dilations": [2, 2], "pads": [1, 1, 1, 1]}, [("w", (1, 1, 3, 3))], 1),
    ("Conv", {"auto_pad": "VALID"}, [("w", (1, 1, 5, 5))], 2),
    ("Conv", {"group": 2}, [("w", (2, 1, 4, 4))], 2),
    ("MaxPool", {"kernel_shape": [3, 3]}, [], 1),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2]}, [], 1),
])
def test_kernel_larger_than_padded_input(tmp_path, op, attrs, inits, hw):
    """Before: ONNX shape inference's negative output size crashed the frontend (TypeError)."""
    x_shape = [1, 2 if attrs.get("group") else 1, hw, hw]
    ins = ["x"] + [n for n, _ in inits]
    m = _model([helper.make_node(op, ins, ["y"], name="big", **attrs)], x_shape, [1, 1, 1, 1],
               [numpy_helper.from_array(np.ones(s, np.float32), n) for n, s in inits])
    with pytest.raises(FrontendError, match=rf"node 'big' \({op}, opset 17\): .*kernel") as ei:
        hc.load_onnx(m)
    assert "\n" not in str(ei.value)
    path = tmp_path / "big.onnx"
    onnx.save(m, path)
    r = run_cli(path, "-o", tmp_path / "big.ir")
    assert "node 'big'" in one_line_error(r)


def _dynamic_model() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array([2.0], np.float32), "k")]
    return _model([helper.make_node("Mul", ["x", "k"], ["y"], name="mul")], [1, 1, "H", "W"], [1, 1, "H", "W"],
                  inits)


def test_input_shape_too_large_refused_before_allocating():
    with pytest.raises(FrontendError) as ei:
        hc.load_onnx(_dynamic_model(), {"x": (1, 1, 100000, 100000)})
    msg = str(ei.value)
    assert "\n" not in msg and "input 'x'" in msg and "[1, 1, 100000, 100000]" in msg
    assert "10000000000 elements" in msg and "limit" in msg
    assert hc.load_onnx(_dynamic_model(), {"x": (1, 1, 64, 64)}).inputs[0].type.shape == (1, 1, 64, 64)


def test_intermediate_too_large_refused():
    """A small input that a compile-time shape blows up (Expand to a huge shape)."""
    inits = [numpy_helper.from_array(np.array([1, 64, 100000, 100000], np.int64), "shape")]
    m = _model([helper.make_node("Expand", ["x", "shape"], ["y"], name="blowup")], [1, 1, 1, 1],
               [1, 64, 100000, 100000], inits)
    with pytest.raises(FrontendError, match=r"blowup.*elements.*limit") as ei:
        hc.load_onnx(m)
    assert "\n" not in str(ei.value)


def test_input_shape_too_large_cli(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(_dynamic_model(), path)
    out = tmp_path / "d.hec"
    r = run_cli(path, "-o", out, "--input-shape", "x=1,1,100000,100000", limit_bytes=3 << 30, timeout=300)
    err = one_line_error(r)
    assert "input 'x'" in err and "100000" in err and "elements" in err
    assert not out.exists()
