"""The .hec file format: round trip, and a clear HecFileError for every kind of damage."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import re

import numpy as np
import pytest

import hecompiler as hc
from hecompiler import hecfile
from hecompiler.errors import HecFileError
from hecompiler.hecfile import FORMAT, FORMAT_VERSION, inspect_hec, load_hec, save_hec
from hecompiler.heprog import HEProgram, Instr, IOSpec, Params, PlainRef, print_program
from hecompiler.layout import Layout

METADATA = {
    "source_model": "tiny_resnet_poly.onnx",
    "source_sha256": "0123456789abcdef" * 4,
    "passes": ["canonicalize", "fuse-poly"],
    "report": {"rotations": 106, "levels": 7, "nested": {"x": [1, 2.5, None, True]}},
    "report_text": "ops: 1037\nrotations: 106",
}


# --------------------------------------------------------------------------- fixtures and helpers

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
def saved(prog, tmp_path_factory) -> bytes:
    """The bytes of a good .hec file of ``prog``."""
    path = tmp_path_factory.mktemp("hec") / "good.hec"
    save_hec(path, prog, METADATA)
    return path.read_bytes()


@pytest.fixture
def good(saved, tmp_path):
    path = tmp_path / "model.hec"
    path.write_bytes(saved)
    return path


def tiny_prog(security: str = "tc128", n: int = 16384, bits=(60, 40, 40, 60), fill="w") -> HEProgram:
    """input * fill(w), rescaled: a hand-built program with a weight referenced by a fill plaintext."""
    params = Params(n, tuple(bits), 40, security)
    primes = _primes(n, bits)
    lay = Layout.compact((1, 8, 8), params.slots)
    p = HEProgram(params, primes, layouts=[lay], weights={"w": np.arange(1.0, 2.0, 1 / 64)})
    p.inputs.append(IOSpec("x", (1, 1, 8, 8), 0, [0]))
    top, q = params.top_level, float(primes[-1])
    s1 = params.scale * q
    p.instrs.append(Instr("mul_plain", 1, (0,), plain=PlainRef("fill", (0, 0, fill), q), level=top, scale=s1))
    p.instrs.append(Instr("rescale", 2, (1,), level=top - 1, scale=s1 / primes[top]))
    p.instrs.append(Instr("rotate", 3, (2,), step=1, level=top - 1, scale=s1 / primes[top]))
    p.outputs.append(IOSpec("y", (1, 1, 8, 8), 0, [3], 1.0))
    p.n_values = 4
    return p


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_members(path, ms: dict[str, bytes], rehash=()) -> None:
    """Write an archive of ``ms``; members in ``rehash`` get fresh manifest checksums."""
    ms = dict(ms)
    if rehash:
        man = json.loads(ms["manifest.json"])
        for name in rehash:
            man["members"][name] = {"sha256": hashlib.sha256(ms[name]).hexdigest(), "size": len(ms[name])}
        ms["manifest.json"] = json.dumps(man).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in ms.items():
            z.writestr(name, data)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def edit(path, name: str, fn, rehash: bool = True) -> None:
    ms = members(path)
    ms[name] = fn(ms[name])
    write_members(path, ms, rehash=(name,) if rehash else ())


def edit_json(path, name: str, fn, rehash: bool = True) -> None:
    def f(b):
        d = json.loads(b)
        fn(d)
        return json.dumps(d).encode()

    edit(path, name, f, rehash)


def npz(arrays: dict, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for k, a in arrays.items():
            with z.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(a), allow_pickle=allow_pickle)
    return buf.getvalue()


def load_error(path) -> str:
    with pytest.raises(HecFileError) as ei:
        load_hec(path)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


def same_program(a: HEProgram, b: HEProgram) -> bool:
    return (print_program(a) == print_program(b) and a.weights.keys() == b.weights.keys()
            and all(a.weights[k].dtype == b.weights[k].dtype and a.weights[k].shape == b.weights[k].shape
                    and a.weights[k].tobytes() == b.weights[k].tobytes() for k in a.weights))


# --------------------------------------------------------------------------- round trip

def test_round_trip(prog, good):
    from hecompiler.backends.sim import Simulator

    p2, md = load_hec(good)
    assert print_program(p2) == print_program(prog)
    assert same_program(prog, p2)
    assert md == METADATA
    x = np.random.default_rng(0).normal(size=prog.inputs[0].shape)
    want, _ = Simulator(prog).run({"input": x})
    got, _ = Simulator(p2).run({"input": x})
    assert want.keys() == got.keys()
    for k in want:
        assert np.array_equal(want[k], got[k])


def test_layout_of_file(prog, good):
    ms = members(good)
    assert set(ms) == {"manifest.json", "program.txt", "weights.npz", "metadata.json", "io.json"}
    with zipfile.ZipFile(good) as z:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    man = json.loads(ms["manifest.json"])
    assert man["format"] == FORMAT and man["format_version"] == FORMAT_VERSION
    assert man["compiler_version"] == hc.__version__
    assert man["created"].endswith("Z")
    for name in ("program.txt", "weights.npz", "metadata.json", "io.json"):
        assert man["members"][name] == {"sha256": hashlib.sha256(ms[name]).hexdigest(), "size": len(ms[name])}
    assert ms["program.txt"].decode() == print_program(prog)
    with np.load(io.BytesIO(ms["weights.npz"]), allow_pickle=False) as w:  # a plain npz
        assert sorted(w.files) == sorted(prog.weights)
    iod = json.loads(ms["io.json"])
    assert [i["name"] for i in iod["inputs"]] == ["input"] and iod["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert iod["outputs"][0]["alpha"] == prog.outputs[0].alpha
    assert "compact" in iod["inputs"][0]["layout_description"]
    assert iod["galois_steps"] == prog.galois_steps
    assert json.loads(ms["metadata.json"]) == METADATA


def test_inspect(prog, good):
    s = inspect_hec(good)
    for want in (f"format v{FORMAT_VERSION}", hc.__version__, "N = 16384", "8192 slots", "60+40x7", "top level 7",
                 "tc128", "input [1, 1, 8, 8]", "logits [1, 10]", "compact 1x8x8", f"instructions: {len(prog.instrs)}",
                 f"{len(prog.galois_steps)} Galois", f"weights: {len(prog.weights)} arrays", "rotations: 106",
                 "tiny_resnet_poly.onnx", METADATA["source_sha256"], "fuse-poly"):
        assert want in s, (want, s)


def test_make_metadata(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx bytes")
    md = hecfile.make_metadata(model, passes=("a", "b"), report={"k": 1}, report_text="r")
    assert md == {"source_model": "m.onnx", "source_sha256": hashlib.sha256(b"onnx bytes").hexdigest(),
                  "passes": ["a", "b"], "report": {"k": 1}, "report_text": "r"}
    assert hecfile.make_metadata(insecure_ok=True) == {"insecure_ok": True}


def test_tiny_program_fill_weight_round_trip(tmp_path):
    from hecompiler.backends.sim import Simulator

    p = tiny_prog()
    path = tmp_path / "tiny.hec"
    save_hec(path, p, {})
    p2, md = load_hec(path)
    assert md == {} and same_program(p, p2)
    x = np.random.default_rng(1).normal(size=(1, 1, 8, 8))
    y, _ = Simulator(p2).run({"x": x})
    lay = p.layouts[0]  # slots move left by one; the last element's slot receives an empty (zero) slot
    ref = lay.unpack(np.roll(lay.pack(x.reshape(-1) * p.weights["w"]), -1, axis=1)).reshape(1, 1, 8, 8)
    assert np.allclose(y["y"], ref)


# --------------------------------------------------------------------------- the file is not a .hec file

def test_not_found(tmp_path):
    assert "not found" in load_error(tmp_path / "nope.hec")


def test_directory(tmp_path):
    assert "directory" in load_error(tmp_path)


def test_empty(tmp_path):
    p = tmp_path / "e.hec"
    p.write_bytes(b"")
    assert "empty" in load_error(p)


def test_random_bytes(tmp_path):
    p = tmp_path / "r.hec"
    p.write_bytes(np.random.default_rng(2).bytes(5000))
    assert "not a .hec file" in load_error(p)


@pytest.mark.parametrize("frac", [0.0001, 0.1, 0.5, 0.9, 0.999, -1])
def test_truncated(good, frac):
    raw = good.read_bytes()
    n = len(raw) - 1 if frac == -1 else max(1, int(len(raw) * frac))
    good.write_bytes(raw[:n])
    assert "truncated" in load_error(good)


def test_other_zip(tmp_path):
    p = tmp_path / "o.hec"
    write_members(p, {"readme.txt": b"hi"})
    assert "missing member manifest.json" in load_error(p)


# --------------------------------------------------------------------------- damaged members

def test_flip_byte_inside_member(good):
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("program.txt")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF
    good.write_bytes(bytes(raw))
    assert "modified or corrupted" in load_error(good)


def test_flip_bytes_anywhere(prog, good):
    """Every flipped byte gives a HecFileError naming the file, or (timestamps and other
    fields nothing depends on) the very same program."""
    raw = good.read_bytes()
    rng = np.random.default_rng(3)
    positions = sorted(set(rng.integers(0, len(raw), 60).tolist()) | set(range(len(raw) - 60, len(raw), 3)))
    for pos in positions:
        b = bytearray(raw)
        b[pos] ^= 1 << int(rng.integers(8))
        good.write_bytes(bytes(b))
        try:
            p2, md = load_hec(good)
        except HecFileError as e:
            assert str(good) in str(e) and "\n" not in str(e)
        else:
            assert same_program(prog, p2) and md == METADATA, pos


@pytest.mark.parametrize("name", ["program.txt", "weights.npz", "metadata.json", "io.json"])
def test_stale_checksum(good, name):
    edit(good, name, lambda b: b + b" ", rehash=False)
    assert f"file was modified or corrupted: {name} checksum mismatch" in load_error(good)


def test_stale_checksum_same_size(good):
    edit(good, "program.txt", lambda b: re.sub(rb"(= rotate %\d+, )(\d)", lambda m: m.group(1) + str(
        (int(m.group(2)) + 1) % 10).encode(), b, count=1), rehash=False)
    assert "program.txt checksum mismatch" in load_error(good)


@pytest.mark.parametrize("name", ["manifest.json", "program.txt", "weights.npz", "metadata.json", "io.json"])
def test_missing_member(good, name):
    ms = members(good)
    del ms[name]
    write_members(good, ms)
    assert f"missing member {name}" in load_error(good)


def test_unexpected_member(good):
    ms = members(good)
    ms["evil.py"] = b"import os"
    write_members(good, ms)
    assert "unexpected member evil.py" in load_error(good)


def test_manifest_not_json(good):
    edit(good, "manifest.json", lambda b: b[:-5], rehash=False)
    assert "manifest.json is not valid JSON" in load_error(good)


def test_manifest_wrong_format(good):
    edit_json(good, "manifest.json", lambda d: d.update(format="something.else"), rehash=False)
    assert "format is 'something.else'" in load_error(good)


def test_newer_format_version(good):
    edit_json(good, "manifest.json", lambda d: d.update(format_version=FORMAT_VERSION + 1, compiler_version="9.9.9"),
              rehash=False)
    msg = load_error(good)
    assert f"format version {FORMAT_VERSION + 1}" in msg and "hecompiler 9.9.9" in msg
    assert f"reads format version {FORMAT_VERSION} only" in msg


def test_zip_bomb_guard(good, monkeypatch):
    monkeypatch.setattr(hecfile, "MAX_MEMBER_BYTES", 5_000)  # program.txt is bigger
    assert "zip bomb" in load_error(good)
    monkeypatch.setattr(hecfile, "MAX_MEMBER_BYTES", 4 * 2**30)
    monkeypatch.setattr(hecfile, "MAX_TOTAL_BYTES", 10_000)
    assert "zip bomb" in load_error(good)


# --------------------------------------------------------------------------- edited content, checksums updated

def test_program_does_not_parse(good):
    edit(good, "program.txt", lambda b: b.replace(b"= rotate", b"= rotato", 1))
    msg = load_error(good)
    assert "program does not parse" in msg and "program.txt:" in msg


def test_rotation_without_key(good):
    # a step that is not among the program's rotations, so io.json's key set lacks it
    edit(good, "program.txt", lambda b: re.sub(rb"(= rotate %\d+, )\d+ ", rb"\g<1>4000 ", b, count=1))
    msg = load_error(good)
    assert "invalid program" in msg and "no Galois key for rotation by 4000" in msg


def test_level_edited(good):
    def f(b):
        lines = b.decode().splitlines(keepends=True)
        k = next(i for i, ln in enumerate(lines) if " = add %" in ln and ": L6 " in ln)
        lines[k] = lines[k].replace(": L6 ", ": L5 ")
        return "".join(lines).encode()

    edit(good, "program.txt", f)
    msg = load_error(good)
    assert "invalid program" in msg and "planned level/scale 5/" in msg


def test_rescale_removed_breaks_scales(good):
    def f(b):
        lines = b.decode().splitlines(keepends=True)
        k = next(i for i, ln in enumerate(lines) if " = linear %" in ln)
        lines[k] = lines[k].replace("@ 1", "@ 2", 1)  # a different plaintext scale
        return "".join(lines).encode()

    edit(good, "program.txt", f)
    assert "invalid program" in load_error(good)


@pytest.mark.parametrize("name", ["conv1.weight.bn", "logits.bias"])
def test_weight_deleted(prog, good, name):
    w = {k: v for k, v in prog.weights.items() if k != name}
    edit(good, "weights.npz", lambda b: npz(w))
    msg = load_error(good)
    assert f"weight {name!r} is missing from weights.npz" in msg and "linear #" in msg


def test_weight_wrong_size(prog, good):
    w = dict(prog.weights)
    w["conv1.weight.bn"] = np.zeros((4, 1, 3, 2), np.float32)
    edit(good, "weights.npz", lambda b: npz(w))
    msg = load_error(good)
    assert "'conv1.weight.bn' has shape [4, 1, 3, 2]" in msg


def test_matrix_weight_wrong_shape(prog, good):
    w = dict(prog.weights)
    w["logits.matrix"] = np.zeros((10, 9))
    edit(good, "weights.npz", lambda b: npz(w))
    assert "'logits.matrix' has shape [10, 9], expected [10, 8]" in load_error(good)


def test_weight_needs_pickle(prog, good):
    w = dict(prog.weights)
    w["evil"] = np.array([{"a": 1}], dtype=object)
    edit(good, "weights.npz", lambda b: npz(w, allow_pickle=True))
    assert "would need pickle" in load_error(good)


def test_weight_bad_dtype(prog, good):
    w = dict(prog.weights)
    w["conv1.weight.bn"] = np.zeros((4, 1, 3, 3), np.complex128)
    edit(good, "weights.npz", lambda b: npz(w))
    assert "must be float or int" in load_error(good)


def test_weight_nan(prog, good):
    w = dict(prog.weights)
    w["logits.bias"] = np.full(10, np.nan)
    edit(good, "weights.npz", lambda b: npz(w))
    assert "NaN" in load_error(good)


def test_weights_not_npz(good):
    edit(good, "weights.npz", lambda b: b"not a zip at all")
    assert "weights.npz is not a readable .npz" in load_error(good)


def test_weights_npz_header_lies(prog, good):
    def f(b):
        ms = members(io.BytesIO(b))
        name = "logits.bias.npy"
        assert b"(10,)" in ms[name]
        ms[name] = ms[name].replace(b"(10,)", b"(99,)", 1)  # same length: claims more data than it holds
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for k, v in ms.items():
                z.writestr(k, v)
        return buf.getvalue()

    edit(good, "weights.npz", f)
    assert "weights.npz: array 'logits.bias'" in load_error(good)


def test_fill_weight_missing_or_wrong_size(tmp_path):
    path = tmp_path / "tiny.hec"
    save_hec(path, tiny_prog(), {})
    edit(path, "weights.npz", lambda b: npz({}))
    assert "weight 'w' is missing" in load_error(path)
    edit(path, "weights.npz", lambda b: npz({"w": np.ones(5)}))
    assert "weight 'w' has 5 values" in load_error(path)


@pytest.mark.parametrize("change,what", [
    (lambda d: d["outputs"][0].update(alpha=2.0), "outputs[0].alpha"),
    (lambda d: d["inputs"][0].update(shape=[1, 1, 4, 16]), "inputs[0].shape"),
    (lambda d: d["inputs"][0].update(name="image"), "inputs[0].name"),
    (lambda d: d["outputs"].append(d["outputs"][0]), "outputs has 2 entries"),
    (lambda d: d["inputs"][0]["layout"].update(hs=9), "inputs[0].layout.hs"),
])
def test_io_json_inconsistent(good, change, what):
    edit_json(good, "io.json", change)
    msg = load_error(good)
    assert "io.json disagrees with program.txt" in msg and what in msg


def test_io_json_extra_keys(good):
    edit_json(good, "io.json", lambda d: d["galois_steps"].append(4000))
    assert "io.json lists Galois keys the program does not use: [4000]" in load_error(good)


def test_metadata_not_json(good):
    edit(good, "metadata.json", lambda b: b"{oops")
    assert "metadata.json is not valid JSON" in load_error(good)


# --------------------------------------------------------------------------- security

def test_insecure_params_need_explicit_request(tmp_path):
    path = tmp_path / "insecure.hec"
    p = tiny_prog(security="none")
    with pytest.raises(HecFileError, match="not 128-bit secure"):
        save_hec(path, p, {})
    assert not path.exists()
    save_hec(path, p, {"insecure_ok": True})
    p2, md = load_hec(path)
    assert md["insecure_ok"] is True and p2.params.security == "none"
    assert "NOT 128-bit secure" in inspect_hec(path)
    edit_json(path, "metadata.json", lambda d: d.pop("insecure_ok"))
    assert "not 128-bit secure" in load_error(path)


def test_false_security_claim(tmp_path):
    # N=4096 allows 109 bits at 128-bit security; this chain has 200
    p = tiny_prog(n=4096)
    with pytest.raises(HecFileError, match="claim tc128"):
        save_hec(tmp_path / "x.hec", p, {"insecure_ok": True})
    assert not (tmp_path / "x.hec").exists()


def test_edited_security_field(good):
    edit(good, "program.txt", lambda b: b.replace(b'"security":"tc128"', b'"security":"none"', 1))
    assert "not 128-bit secure" in load_error(good)


# --------------------------------------------------------------------------- failed saves leave no file

def _no_stray_files(d, allowed=()):
    assert sorted(os.listdir(d)) == sorted(allowed)


def test_save_non_serialisable_metadata(prog, tmp_path):
    path = tmp_path / "m.hec"
    with pytest.raises(HecFileError, match="not JSON-serialisable") as ei:
        save_hec(path, prog, {"report": object()})
    assert str(path) in str(ei.value)
    _no_stray_files(tmp_path)
    with pytest.raises(HecFileError, match="metadata must be a dict"):
        save_hec(path, prog, ["x"])
    _no_stray_files(tmp_path)


def test_save_missing_directory(prog, tmp_path):
    path = tmp_path / "no" / "such" / "m.hec"
    with pytest.raises(HecFileError, match="does not exist") as ei:
        save_hec(path, prog, {})
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    _no_stray_files(tmp_path)


def test_save_onto_directory(prog, tmp_path):
    (tmp_path / "d.hec").mkdir()
    with pytest.raises(HecFileError):
        save_hec(tmp_path / "d.hec", prog, {})
    _no_stray_files(tmp_path, ["d.hec"])


def test_failed_save_keeps_old_file(good, prog):
    before = good.read_bytes()
    with pytest.raises(HecFileError):
        save_hec(good, prog, {"x": {1, 2}})
    assert good.read_bytes() == before
    _no_stray_files(good.parent, [good.name])


def test_save_rejects_invalid_program(prog, tmp_path):
    bad = HEProgram(prog.params, prog.primes, prog.layouts, prog.linears,
                    {k: v for k, v in prog.weights.items() if k != "logits.matrix"}, prog.inputs, prog.outputs,
                    prog.instrs, prog.n_values)
    with pytest.raises(HecFileError, match="'logits.matrix' is missing"):
        save_hec(tmp_path / "bad.hec", bad, {})
    bad.weights = dict(prog.weights, extra=np.array(["a"]))
    with pytest.raises(HecFileError, match="float or int"):
        save_hec(tmp_path / "bad.hec", bad, {})
    _no_stray_files(tmp_path)


def test_a_linear_op_cannot_make_copies(prog, tmp_path):
    """A linear op whose output layout repeats more often than its input (replicated layouts,
    Layout.replicated): the lowering never emits one (rotations make the copies), and a file
    that has one is refused, naming the op, with no file left behind."""
    import copy

    p = copy.deepcopy(prog)
    lin = next(lin for lin in p.linears
               if p.layouts[lin.out_layout].replicated().period and not p.layouts[lin.in_layout].period)
    p.layouts[lin.out_layout] = p.layouts[lin.out_layout].replicated()
    path = tmp_path / "copies.hec"
    with pytest.raises(HecFileError, match=r"linear #\d+ \(.*\): its output repeats every \d+ slots and its input "
                                           r"every 8192; a linear op cannot make copies"):
        save_hec(path, p, {})
    assert not path.exists()
