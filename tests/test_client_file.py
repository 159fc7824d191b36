"""hecompile export-client: the client file holds no weights, is small, and every client step
(keygen, encrypt, refresh, decrypt) works from it against a server holding the full program."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tenseal.sealapi")

from hecompiler.backends import protocol as P  # noqa: E402
from hecompiler.backends import seal as SB  # noqa: E402
from hecompiler.cli import main  # noqa: E402
from hecompiler.clientfile import (ClientProgram, load_client_file, load_for_client,  # noqa: E402
                                   parse_client_file)
from hecompiler.errors import HecError, HecFileError  # noqa: E402
from hecompiler.hecfile import load_hec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("clientfile")
    hec = d / "digits.hec"
    assert main([str(ROOT / "models/digits_poly.onnx"), "-o", str(hec), "--ring", "8192", "-q"]) == 0
    out = d / "digits.client"
    assert main(["export-client", str(hec), "-o", str(out)]) == 0
    prog, meta = load_hec(hec)
    return d, hec, out, prog, meta


def _numbers(x, out):
    if isinstance(x, bool):
        return out
    if isinstance(x, (int, float)):
        out.append(float(x))
    elif isinstance(x, dict):
        for v in x.values():
            _numbers(v, out)
    elif isinstance(x, list):
        for v in x:
            _numbers(v, out)
    return out


def test_client_file_is_small_and_holds_no_weight(digits):
    d, hec, out, prog, _ = digits
    data = out.read_bytes()
    assert len(data) < 16 * 1024 < os.path.getsize(hec)  # 3.4 KiB against the program's ~80 KiB
    doc = json.loads(data)
    assert "weights" not in json.dumps(doc["body"]).lower()
    weights = np.concatenate([np.asarray(w, np.float64).ravel() for w in prog.weights.values()])
    assert weights.size > 10000
    # no weight in any binary form (float32/float64 bytes, base64 of them) ...
    for w in prog.weights.values():
        w = np.asarray(w)
        if w.size < 4:
            continue
        for dt in (np.float32, np.float64):
            raw = np.ascontiguousarray(w.astype(dt)).tobytes()[:64]
            assert raw not in data
            assert base64.b64encode(raw)[:40] not in data
    # ... and no weight value written as a number (integers and 0/±1 aside: layout positions, primes)
    nums = np.array([v for v in _numbers(doc["body"], []) if v != int(v)])
    interesting = weights[(weights != np.round(weights))]
    assert not np.isin(nums, interesting).any()


def test_every_client_step_works_from_the_client_file(digits, tmp_path):
    _, hec, out, prog, meta = digits
    cp = load_client_file(out)
    assert isinstance(cp, ClientProgram) and not hasattr(cp, "weights") and not hasattr(cp, "linears")
    # in place of instructions, only where the program refreshes (no operand, level or weight)
    assert [vars(i) for i in cp.instrs] == [{"op": "refresh"}] * sum(i.op == "refresh" for i in prog.instrs)
    assert P.program_sha256(cp) == P.program_sha256(prog)  # bound to the full program, weights included
    assert P.params_fingerprint(cp) == P.params_fingerprint(prog)
    # keygen from the client file; the server side loads the evaluation keys with the full program
    SB.client_keygen(cp, tmp_path / "c", tmp_path / "s", cp.meta)
    client = SB.open_client(cp, tmp_path / "c", cp.meta)
    server = SB.open_server(prog, tmp_path / "s", meta)
    assert client.key_set == server.key_set
    x = np.load(ROOT / "models/digits_test_x.npy")[:1].astype(np.float64)
    st = P.server_start(prog, server, P.client_encrypt(cp, client, {cp.inputs[0].name: x}))
    resp, rounds = None, 0
    while True:
        st, req, outs = P.server_step(prog, server, st, resp)
        if outs is not None:
            break
        resp = P.client_refresh(cp, client, req)
        rounds += 1
    assert rounds == cp.meta["client_round_trips"] == 5
    y = P.client_decrypt(cp, client, outs)["logits"]
    import onnxruntime as ort

    s = ort.InferenceSession(str(ROOT / "models/digits_poly.onnx"), providers=["CPUExecutionProvider"])
    ref = s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0]
    assert np.argmax(y) == np.argmax(ref)
    assert np.abs(y - ref).max() < 1e-4 * np.ptp(ref)


def test_hec_reduces_to_the_same_client_view(digits):
    _, hec, out, prog, _ = digits
    a, b = load_for_client(hec), load_for_client(out)
    assert (a.program_digest, a.params, a.primes, a.galois_steps, a.needs_relin) == \
           (b.program_digest, b.params, b.primes, b.galois_steps, b.needs_relin)
    # the level each key is made for (a backend that makes keys per level): the program's
    assert a.galois_key_levels() == b.galois_key_levels() == prog.galois_key_levels()
    assert [io.name for io in a.inputs] == [io.name for io in b.inputs] and a.layouts == b.layouts


def _edit(data: bytes, fn) -> bytes:
    doc = json.loads(data)
    fn(doc)
    return json.dumps(doc).encode()


def _redigest(doc):
    from hecompiler.clientfile import _digest

    doc["digest"] = _digest(doc["body"])


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["body"].update(galois_steps=[1, 2]), "does not match its digest"),
    (lambda d: (d["body"]["params"].update(coeff_bits=[60, 60, 60, 60, 60]), _redigest(d)),
     "not by the HE standard"),
    (lambda d: (d["body"]["params"].update(security="none"), _redigest(d)), "insecure_ok"),
    (lambda d: (d["body"]["inputs"][0].update(shape=[1, 1, 9, 9]), _redigest(d)), "body.inputs[0]"),
    (lambda d: (d["body"].update(primes=d["body"]["primes"][:-1]), _redigest(d)), "body.primes"),
    (lambda d: (d["body"].update(params_fingerprint="0" * 64), _redigest(d)), "params_fingerprint"),
    (lambda d: (d["body"].update(galois_levels=d["body"]["galois_levels"][:-1]), _redigest(d)),
     "body.galois_levels: must be one level in 0.."),
    (lambda d: (d["body"].update(galois_levels=[99] * len(d["body"]["galois_steps"])), _redigest(d)),
     "body.galois_levels"),
    (lambda d: d.update(format_version=99), "format version 99"),
    (lambda d: d.update(format="something else"), "not a client file"),
])
def test_tampered_client_files_are_refused_in_one_line(digits, edit, message):
    _, _, out, _, _ = digits
    bad = _edit(out.read_bytes(), edit)
    with pytest.raises(HecFileError) as e:
        parse_client_file(bad, "m.client")
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("m.client: ")


def test_garbage_and_missing_client_files(tmp_path):
    p = tmp_path / "x.client"
    p.write_bytes(b"\x00garbage")
    with pytest.raises(HecFileError, match="not a client file"):
        load_client_file(p)
    with pytest.raises(HecFileError, match="no such file"):
        load_client_file(tmp_path / "missing.client")


def test_signed_client_file(digits, tmp_path, capsys):
    _, hec, _, _, _ = digits
    assert main(["keygen-signing", "-o", str(tmp_path / "signer.pem")]) == 0
    assert main(["keygen-signing", "-o", str(tmp_path / "other.pem")]) == 0
    signed = tmp_path / "signed.client"
    assert main(["export-client", str(hec), "-o", str(signed), "--sign-key", str(tmp_path / "signer.pem")]) == 0
    assert load_client_file(signed, verify_key=tmp_path / "signer.pub.pem").meta["signed"]
    with pytest.raises(HecError, match="signed by another key"):
        load_client_file(signed, verify_key=tmp_path / "other.pub.pem")
    unsigned = tmp_path / "unsigned.client"
    assert main(["export-client", str(hec), "-o", str(unsigned)]) == 0
    with pytest.raises(HecError, match="not signed"):
        load_client_file(unsigned, verify_key=tmp_path / "signer.pub.pem")
    doc = json.loads(signed.read_bytes())
    doc["body"]["galois_steps"] = doc["body"]["galois_steps"][:-1]
    _redigest(doc)  # a consistent digest, but not the signed one
    with pytest.raises(HecError, match="modified after signing"):
        parse_client_file(json.dumps(doc).encode(), "s.client", verify_key=tmp_path / "signer.pub.pem")


def test_export_client_cli_errors(digits, tmp_path, capsys):
    _, hec, _, _, _ = digits
    assert main(["export-client", str(hec), "-o", str(hec)]) == 1
    err = capsys.readouterr().err
    assert "same file" in err and err.count("\n") == 1
    assert main(["export-client", str(tmp_path / "nope.hec"), "-o", str(tmp_path / "o.client")]) == 1
    assert "file not found" in capsys.readouterr().err
    assert not (tmp_path / "o.client").exists()


def test_the_client_commands_work_from_the_client_file(digits, tmp_path, capsys):
    """keygen, encrypt, refresh and decrypt take the client file in place of the .hec (only the
    server's eval needs the program); the answer is the .hec's."""
    _, hec, cfile, prog, _ = digits
    d = tmp_path
    x = np.load(ROOT / "models/digits_test_x.npy")[:1]
    np.save(d / "x.npy", x)
    assert main(["keygen", str(cfile), "--client-dir", str(d / "c"), "--server-dir", str(d / "s")]) == 0
    assert main(["encrypt", str(cfile), "--keys", str(d / "c"), "--input", str(d / "x.npy"), "-o", str(d / "x.b")]) == 0
    args = ["--input", str(d / "x.b")]
    for rounds in range(20):
        assert main(["eval", str(hec), "--keys", str(d / "s"), "--state", str(d / "st.b"), "-o", str(d / "y.b"),
                     *args]) == 0
        if (d / "y.b").exists():
            break
        assert main(["refresh", str(cfile), "--keys", str(d / "c"), "--request", str(d / "st.b.request"), "-o",
                     str(d / f"r{rounds}.b")]) == 0
        args = ["--response", str(d / f"r{rounds}.b")]
    assert rounds == 5
    assert main(["decrypt", str(cfile), "--keys", str(d / "c"), "--ciphertext", str(d / "y.b"), "-o",
                 str(d / "y.npy")]) == 0
    import onnxruntime as ort

    s = ort.InferenceSession(str(ROOT / "models/digits_poly.onnx"), providers=["CPUExecutionProvider"])
    ref = s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0]
    y = np.load(d / "y.npy")
    assert y.shape == ref.shape and np.argmax(y) == np.argmax(ref) and np.abs(y - ref).max() < 1e-4 * np.ptp(ref)
    # the server's step needs the program: a client file there is refused in one line
    capsys.readouterr()
    assert main(["eval", str(cfile), "--keys", str(d / "s"), "--state", str(d / "st2.b"), "-o", str(d / "y2.b"),
                 "--input", str(d / "x.b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (d / "y2.b").exists()


def test_a_client_file_without_key_levels_makes_every_key_at_the_top(digits):
    """Client files written before ``galois_levels`` still load: every key at the top level."""
    _, _, out, _, _ = digits
    doc = json.loads(out.read_bytes())
    del doc["body"]["galois_levels"]
    _redigest(doc)
    cp = parse_client_file(json.dumps(doc).encode(), "old.client")
    assert set(cp.galois_key_levels().values()) == {cp.params.top_level}
    assert list(cp.galois_key_levels()) == cp.galois_steps
