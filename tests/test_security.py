"""Security and robustness of the encrypted path: keys bound to their key set, no secret key on
disk outside the client key directory, bad inputs refused, outputs never clobbered, insecure
programs named at every step.  Each test reproduces a case that once ran silently or crashed."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tenseal.sealapi")

from conftest import ort_run  # noqa: E402
from hecompiler import fileio  # noqa: E402
from hecompiler.backends import seal as SB  # noqa: E402
from hecompiler.backends.sim import ModulusOverflow, Simulator  # noqa: E402
from hecompiler.cli import main  # noqa: E402
from hecompiler.errors import HecError  # noqa: E402
from hecompiler.hecfile import load_hec  # noqa: E402
from hecompiler.inputs import input_limits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hec(models, tmp_path_factory):
    """The tiny ResNet compiled at N=8192 (fast, 128-bit), with its input."""
    d = tmp_path_factory.mktemp("sec")
    path = d / "tiny.onnx"
    onnx.save(models.MODELS["tiny_resnet_poly"](), path)
    x = np.random.default_rng(5).standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.save(d / "x.npy", x)
    assert main([str(path), "-o", str(d / "m.hec"), "--ring", "8192", "-q"]) == 0
    return d


@pytest.fixture(scope="module")
def two_key_sets(hec):
    """Two clients' key sets for the same program."""
    m = str(hec / "m.hec")
    for who in ("a", "b"):
        assert main(["keygen", m, "--client-dir", str(hec / f"{who}_client"),
                     "--server-dir", str(hec / f"{who}_server")]) == 0
    return m


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("hecompile: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _fp(keys_dir: Path) -> str:
    return json.loads((keys_dir / "keys.json").read_text())["key_set"][:16]


# ----------------------------------------------------------------------------- 1: key-set binding

def test_every_step_refuses_another_key_set(hec, two_key_sets, tmp_path, capsys):
    m, d = two_key_sets, hec
    fa, fb = _fp(d / "a_client"), _fp(d / "b_client")
    assert fa != fb and fa == _fp(d / "a_server")
    xa = tmp_path / "xa.b"
    assert main(["encrypt", m, "--keys", str(d / "a_client"), "--input", str(d / "x.npy"), "-o", str(xa)]) == 0
    capsys.readouterr()
    st, out = tmp_path / "st.b", tmp_path / "y.b"
    # A's ciphertexts evaluated with B's evaluation keys
    assert main(["eval", m, "--keys", str(d / "b_server"), "--input", str(xa), "--state", str(st),
                 "-o", str(out)]) == 1
    _one_line_error(capsys, str(xa), fa, fb)
    assert not st.exists() and not out.exists() and not Path(str(st) + ".request").exists()
    # with A's keys it runs to its first refresh; B cannot answer it, A can
    assert main(["eval", m, "--keys", str(d / "a_server"), "--input", str(xa), "--state", str(st),
                 "-o", str(out)]) == 0
    req, resp = Path(str(st) + ".request"), tmp_path / "resp.b"
    assert req.exists()
    capsys.readouterr()
    assert main(["refresh", m, "--keys", str(d / "b_client"), "--request", str(req), "-o", str(resp)]) == 1
    _one_line_error(capsys, str(req), fa, fb)
    assert not resp.exists()
    # a response made by B (to its own request) is refused by A's server
    xb, stb = tmp_path / "xb.b", tmp_path / "stb.b"
    assert main(["encrypt", m, "--keys", str(d / "b_client"), "--input", str(d / "x.npy"), "-o", str(xb)]) == 0
    assert main(["eval", m, "--keys", str(d / "b_server"), "--input", str(xb), "--state", str(stb),
                 "-o", str(tmp_path / "yb.b")]) == 0
    assert main(["refresh", m, "--keys", str(d / "b_client"), "--request", str(stb) + ".request",
                 "-o", str(resp)]) == 0
    before = st.read_bytes()
    capsys.readouterr()
    assert main(["eval", m, "--keys", str(d / "a_server"), "--state", str(st), "--response", str(resp),
                 "-o", str(out)]) == 1
    _one_line_error(capsys, str(resp), fa, fb)
    assert st.read_bytes() == before and not out.exists()
    # A's server state under B's keys
    assert main(["eval", m, "--keys", str(d / "b_server"), "--state", str(st), "--response", str(resp),
                 "-o", str(out)]) == 1
    _one_line_error(capsys, str(st), fa, fb)


def test_decrypt_with_another_secret_key_is_refused(hec, two_key_sets, tmp_path, capsys):
    m, d = two_key_sets, hec
    fa, fb = _fp(d / "a_client"), _fp(d / "b_client")
    outs = SB.Bundle("outputs", "", "", "", {})
    prog, _ = load_hec(m)
    # a finished run under A (one process, files in between)
    x = np.load(d / "x.npy")
    b = SB.client_encrypt(prog, d / "a_client", {prog.inputs[0].name: x})
    state = SB.server_start(prog, d / "a_server", b)
    resp = None
    while True:
        state, req, outs = SB.server_step(prog, d / "a_server", state, resp)
        if req is None:
            break
        resp = SB.client_refresh(prog, d / "a_client", req)
    outs.save(tmp_path / "y.b")
    capsys.readouterr()
    assert main(["decrypt", m, "--keys", str(d / "b_client"), "--ciphertext", str(tmp_path / "y.b"),
                 "-o", str(tmp_path / "y.npy")]) == 1
    _one_line_error(capsys, str(tmp_path / "y.b"), fa, fb)
    assert not (tmp_path / "y.npy").exists()
    assert main(["decrypt", m, "--keys", str(d / "a_client"), "--ciphertext", str(tmp_path / "y.b"),
                 "-o", str(tmp_path / "y.npy")]) == 0
    ref = ort_run(onnx.load(d / "tiny.onnx"), x)[0]
    assert np.abs(np.load(tmp_path / "y.npy") - ref).max() <= 1e-3 * np.ptp(ref)


def test_mixed_key_directory_is_refused(hec, two_key_sets, tmp_path):
    """B's secret key copied into A's client directory (keys.json edited to match) is caught."""
    prog, _ = load_hec(two_key_sets)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in ("keys.json", "public.key"):
        (mixed / f).write_bytes((hec / "a_client" / f).read_bytes())
    sk = (hec / "b_client" / "secret.key").read_bytes()
    (mixed / "secret.key").write_bytes(sk)
    meta = json.loads((mixed / "keys.json").read_text())
    import hashlib

    meta["files"]["secret.key"] = hashlib.sha256(sk).hexdigest()
    (mixed / "keys.json").write_text(json.dumps(meta))
    with pytest.raises(SB.BackendError, match="does not belong to public.key"):
        SB.read_keys(prog, mixed, secret=True, evaluation=False)


def test_server_refuses_the_client_directory(hec, two_key_sets):
    prog, _ = load_hec(two_key_sets)
    with pytest.raises(SB.BackendError, match="holds the secret key"):
        SB.read_keys(prog, hec / "a_client", secret=False)


# ----------------------------------------------------------------------------- 3: no secret on disk

def test_serialization_never_uses_temporary_files(hec, two_key_sets, monkeypatch):
    prog, _ = load_hec(two_key_sets)
    keys = SB.read_keys(prog, hec / "a_client", secret=True, evaluation=False)

    def no_temp(*a, **k):
        raise AssertionError("a temporary file was created while serializing keys")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_temp)
    blob = keys.ctx.to_bytes(keys.secret_key)
    again = keys.ctx.from_bytes("secret_key", blob)
    assert keys.ctx.to_bytes(again) == blob


_LOOP = textwrap.dedent("""
    import sys, numpy as np
    from hecompiler.hecfile import load_hec
    from hecompiler.backends import seal as SB
    prog, _ = load_hec(sys.argv[1])
    x = np.load(sys.argv[3])
    print("ready", flush=True)
    while True:  # encrypt + decrypt-side reads of the secret key, until killed
        SB.client_encrypt(prog, sys.argv[2], {prog.inputs[0].name: x})
""")


def test_secret_key_never_reaches_a_file_outside_the_client_dir_even_under_kill(hec, two_key_sets, tmp_path):
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), HEC_SEAL_TMPDIR=str(tmp))
    script = tmp_path / "loop.py"
    script.write_text(_LOOP)
    p = subprocess.Popen([sys.executable, str(script), two_key_sets, str(hec / "a_client"), str(hec / "x.npy")],
                         env=env, stdout=subprocess.PIPE, cwd=tmp_path)
    try:
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(1.5)  # several encryptions, each serializing keys and ciphertexts
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert list(tmp.iterdir()) == []
    secret = (hec / "a_client" / "secret.key").read_bytes()[44:]  # SEAL bytes inside the envelope
    chunk = secret[len(secret) // 2: len(secret) // 2 + 64]
    client = (hec / "a_client").resolve()
    for root in (tmp_path, hec):
        for f in Path(root).rglob("*"):
            if f.is_file() and client not in f.resolve().parents:
                assert chunk not in f.read_bytes(), f


# ----------------------------------------------------------------------------- 2, 4: inputs

@pytest.mark.parametrize("make, message", [
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x), "NaN or infinite"),
    (lambda x: np.full_like(x, np.inf), "NaN or infinite"),
    (lambda x: x.astype(np.complex64), "dtype complex64 cannot be an input"),
    (lambda x: np.array([["a"] * 8] * 8).reshape(1, 1, 8, 8), "dtype <U1 cannot be an input"),
    (lambda x: x > 0, "dtype bool cannot be an input"),
])
def test_bad_input_values_are_refused(hec, tmp_path, capsys, make, message):
    bad = tmp_path / "bad.npy"
    np.save(bad, make(np.load(hec / "x.npy")))
    for cmd in (["run", str(hec / "m.hec"), "--input", str(bad), "-o", str(tmp_path / "y.npy")],
                ["run", str(hec / "m.hec"), "--backend", "sim", "--input", str(bad), "-o", str(tmp_path / "y.npy")]):
        assert main(cmd) == 1
        _one_line_error(capsys, str(bad), message)
    assert not (tmp_path / "y.npy").exists()


def test_npz_as_input_is_refused(hec, tmp_path, capsys):
    np.savez(tmp_path / "x.npz", x=np.load(hec / "x.npy"))
    assert main(["run", str(hec / "m.hec"), "--input", str(tmp_path / "x.npz")]) == 1
    _one_line_error(capsys, "an .npz archive")


def test_integer_inputs_are_cast(hec, tmp_path, capsys):
    np.save(tmp_path / "xi.npy", np.ones((1, 1, 8, 8), np.int32))
    assert main(["run", str(hec / "m.hec"), "--backend", "sim", "--input", str(tmp_path / "xi.npy"), "-q"]) == 0


def test_inputs_beyond_the_chain_are_refused_and_outside_the_plan_warned(hec, tmp_path, capsys):
    """The tiny model's input times 30 overflowed the modulus under SEAL with exit 0."""
    _, meta = load_hec(hec / "m.hec")
    lim = meta["input_limits"]["input"]
    x = np.load(hec / "x.npy")
    assert lim["max_abs"] is not None and lim["max_abs"] < 30 * np.abs(x).max()
    np.save(tmp_path / "x30.npy", 30 * x)
    for cmd in ("run", "encrypt"):
        extra = ["--keys", str(tmp_path)] if cmd == "encrypt" else []
        assert main([cmd, str(hec / "m.hec"), "--input", str(tmp_path / "x30.npy"), "-o",
                     str(tmp_path / "y.out"), *extra]) == 1
        _one_line_error(capsys, "beyond", "modulus chain")
        assert not (tmp_path / "y.out").exists()
    # inside what the chain holds but outside the planned range: runs, warns by how much, and is right
    scale = 0.9 * lim["max_abs"] / np.abs(x).max()
    np.save(tmp_path / "xbig.npy", scale * x)
    assert main(["run", str(hec / "m.hec"), "--input", str(tmp_path / "xbig.npy"), "-o", str(tmp_path / "y.npy"),
                 "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "leave the range" in err and "planned" in err
    ref = ort_run(onnx.load(hec / "tiny.onnx"), (scale * x).astype(np.float32))[0]
    assert np.abs(np.load(tmp_path / "y.npy") - ref).max() <= 1e-3 * np.ptp(ref)


def test_batch_run_reports_each_rows_modulus_use(hec):
    """run_batch keeps each row's modulus use: the input-limit search runs every factor it tries
    in one batch and reads them apart."""
    prog, _ = load_hec(hec / "m.hec")
    name = prog.inputs[0].name
    x = np.load(hec / "x.npy")
    rows = [x, 3 * x, 0 * x]
    st = Simulator(prog, strict=False).run_batch({name: np.stack(rows)})[1]
    assert st.modulus_use_rows.shape == (3,)
    for got, r in zip(st.modulus_use_rows, rows):
        alone = Simulator(prog, strict=False).run({name: r})[1].modulus_use
        assert got == pytest.approx(alone, rel=1e-9, abs=1e-300)
    assert st.modulus_use == pytest.approx(st.modulus_use_rows.max(), rel=1e-12)
    assert st.modulus_use_rows[1] > 1.5 * st.modulus_use_rows[0]  # the rows are told apart


def test_input_limit_search_batches_the_factors_it_tries():
    """The doubling goes a few factors per batch, then the eighth-octave steps in one batch; the
    limit is the largest factor that fits with every smaller one tried."""
    calls = []

    def headroom(ss):  # modulus use growing as s^2: fits (< SAFETY = 0.5) up to s = sqrt(5)
        calls.append(list(ss))
        return [0.1 * s * s for s in ss]

    probes = [np.array([2.0, -1.0])]
    lim = input_limits(probes, "sample", headroom)
    assert calls[0] == [1.0, 2.0, 4.0, 8.0] and len(calls) == 2 and len(calls[1]) == 7
    assert calls[1][0] == pytest.approx(2 * 2 ** 0.125)
    assert lim["max_abs"] == pytest.approx(2.0 * 2 ** 1.125)  # 2^1.125 < sqrt(5) < 2^1.25
    assert lim["modulus_use"] == pytest.approx(0.1)
    # nothing overflows: the largest factor; the sample itself overflows: no limit
    assert input_limits(probes, "sample", lambda ss: [0.0] * len(ss))["max_abs"] == pytest.approx(2.0 * 2 ** 16)
    assert input_limits(probes, "sample", lambda ss: [1.5] * len(ss))["max_abs"] is None


def test_simulator_reports_modulus_overflow(hec):
    prog, _ = load_hec(hec / "m.hec")
    x = 30 * np.load(hec / "x.npy")
    with pytest.raises(ModulusOverflow, match="exceeds half the ciphertext modulus"):
        Simulator(prog).run({prog.inputs[0].name: x})
    _, st = Simulator(prog, strict=False).run({prog.inputs[0].name: x})
    assert st.modulus_use > 1
    _, st = Simulator(prog).run({prog.inputs[0].name: x / 30})
    assert 0 < st.modulus_use < 1e-2


# ----------------------------------------------------------------------------- 5, 7: outputs

def test_output_equal_to_an_input_is_refused(hec, tmp_path, capsys):
    d = hec
    m = tmp_path / "m.hec"
    m.write_bytes((d / "m.hec").read_bytes())
    model = tmp_path / "tiny.onnx"
    model.write_bytes((d / "tiny.onnx").read_bytes())
    x = tmp_path / "x.npy"
    x.write_bytes((d / "x.npy").read_bytes())
    link = tmp_path / "link.onnx"
    link.symlink_to(model)
    snapshot = {p: p.read_bytes() for p in (m, model, x)}
    cases = [
        [str(model), "-o", str(link)],
        [str(model), "-o", str(tmp_path / "m.hec"), "--sample", str(tmp_path / "m.hec")],
        ["run", str(m), "--input", str(x), "-o", str(x)],
        ["run", str(m), "--input", str(x), "-o", str(m)],
        ["encrypt", str(m), "--keys", str(tmp_path), "--input", str(x), "-o", str(x)],
        ["decrypt", str(m), "--keys", str(tmp_path), "--ciphertext", str(x), "-o", str(x)],
        ["eval", str(m), "--keys", str(tmp_path), "--input", str(x), "--state", str(x), "-o", str(tmp_path / "y")],
        ["eval", str(m), "--keys", str(tmp_path), "--response", str(x), "--state", str(tmp_path / "s"),
         "--request", str(tmp_path / "s"), "-o", str(tmp_path / "y")],
    ]
    for args in cases:
        assert main(args) == 1, args
        _one_line_error(capsys, "same file")
    assert {p: p.read_bytes() for p in snapshot} == snapshot and link.is_symlink()


def test_outputs_through_links_fifos_and_directories(hec, tmp_path, capsys):
    target = tmp_path / "real.npy"
    target.write_bytes(b"old")
    link = tmp_path / "y.npy"
    link.symlink_to(target)
    args = ["run", str(hec / "m.hec"), "--backend", "sim", "--input", str(hec / "x.npy"), "-q"]
    assert main(args + ["-o", str(link)]) == 0
    assert link.is_symlink() and np.load(target).shape == (1, 10)  # written through the link
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    assert main(args + ["-o", str(fifo)]) == 1
    _one_line_error(capsys, "not a regular file")
    assert main(args + ["-o", str(tmp_path)]) == 1
    _one_line_error(capsys, "is a directory")
    capsys.readouterr()


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only file system")])
def test_full_or_read_only_filesystem_is_one_line(hec, tmp_path, capsys, monkeypatch, code, words):
    real_replace = os.replace

    def failing(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", failing)
    outs = {"ir": [str(hec / "tiny.onnx"), "-o", str(tmp_path / "t.ir"), "-q"],
            "dot": [str(hec / "tiny.onnx"), "-o", str(tmp_path / "t.dot"), "-q"],
            "run": ["run", str(hec / "m.hec"), "--backend", "sim", "--input", str(hec / "x.npy"), "-q",
                    "-o", str(tmp_path / "y.npy")],
            "dump": [str(hec / "tiny.onnx"), "-o", str(tmp_path / "t2.ir"), "-q", "--dump-after", "all",
                     "--dump-dir", str(tmp_path / "dump")]}
    for name, args in outs.items():
        assert main(args) == 1, name
        _one_line_error(capsys, words)
    monkeypatch.setattr(os, "replace", real_replace)
    left = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert left == [], left  # no output, no temporary file
    # a directory that does not exist / cannot be created
    assert main([str(hec / "tiny.onnx"), "-o", "/proc/hec-nope/t.ir", "-q"]) == 1
    _one_line_error(capsys, "does not exist")


def test_keygen_is_all_or_nothing(hec, tmp_path, monkeypatch):
    prog, _ = load_hec(hec / "m.hec")
    real = fileio.atomic_write_bytes

    def fail_on_galois(path, data, mode=None):
        if str(path).endswith("galois.key"):
            raise HecError(f"{path}: cannot write: no space left on the device")
        return real(path, data, mode)

    from hecompiler.backends import protocol

    monkeypatch.setattr(protocol, "atomic_write_bytes", fail_on_galois)
    with pytest.raises(HecError, match="no space left"):
        SB.client_keygen(prog, tmp_path / "c", tmp_path / "s")
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()
    monkeypatch.setattr(protocol, "atomic_write_bytes", real)
    # existing key sets are never replaced
    SB.client_keygen(prog, tmp_path / "c", tmp_path / "s")
    fp = _fp(tmp_path / "c")
    with pytest.raises(SB.BackendError, match=f"already holds key set {fp}"):
        SB.client_keygen(prog, tmp_path / "c", tmp_path / "s2")
    assert not (tmp_path / "s2").exists()


def test_concurrent_keygens_never_mix_key_sets(hec, tmp_path):
    m = str(hec / "m.hec")
    cmd = [sys.executable, "-m", "hecompiler.cli", "keygen", m, "--client-dir", str(tmp_path / "c"),
           "--server-dir", str(tmp_path / "s")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    results = [(p.wait(), p.stderr.read().decode()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    assert len(ok) == 1, results
    for rc, err in results:
        if rc:
            assert ("another keygen" in err or "already holds key set" in err) and "Traceback" not in err, err
    assert _fp(tmp_path / "c") == _fp(tmp_path / "s")
    prog, _ = load_hec(m)
    SB.read_keys(prog, tmp_path / "c", secret=True, evaluation=False)
    SB.read_keys(prog, tmp_path / "s", secret=False)


def test_eval_interrupted_after_its_state_can_write_its_request_again(hec, tmp_path, capsys):
    m = str(hec / "m.hec")
    c, s = tmp_path / "c", tmp_path / "s"
    assert main(["keygen", m, "--client-dir", str(c), "--server-dir", str(s)]) == 0
    assert main(["encrypt", m, "--keys", str(c), "--input", str(hec / "x.npy"), "-o", str(tmp_path / "x.b")]) == 0
    st = tmp_path / "st.b"
    args = ["eval", m, "--keys", str(s), "--state", str(st), "-o", str(tmp_path / "y.b")]
    assert main(args + ["--input", str(tmp_path / "x.b")]) == 0
    req = Path(str(st) + ".request")
    first = req.read_bytes()
    req.unlink()  # as if eval had been killed between writing the state and the request
    assert main(args) == 0  # --state alone: write the request again
    assert req.read_bytes() == first
    while not (tmp_path / "y.b").exists():
        assert main(["refresh", m, "--keys", str(c), "--request", str(req), "-o", str(st) + ".resp"]) == 0
        assert main(args + ["--response", str(st) + ".resp"]) == 0
    (tmp_path / "y.b").unlink()
    assert main(args) == 0 and (tmp_path / "y.b").exists()  # the outputs too
    assert main(["decrypt", m, "--keys", str(c), "--ciphertext", str(tmp_path / "y.b"), "-o",
                 str(tmp_path / "y.npy")]) == 0
    ref = ort_run(onnx.load(hec / "tiny.onnx"), np.load(hec / "x.npy"))[0]
    assert np.abs(np.load(tmp_path / "y.npy") - ref).max() <= 1e-3 * np.ptp(ref)


# ----------------------------------------------------------------------------- 9: insecure programs, flags

def test_insecure_programs_say_so_at_every_step(hec, tmp_path, capsys):
    m = tmp_path / "insecure.hec"
    assert main([str(hec / "tiny.onnx"), "-o", str(m), "--ring", "8192", "--security", "none", "-q"]) == 0
    assert main(["keygen", str(m), "--client-dir", str(tmp_path / "c"), "--server-dir", str(tmp_path / "s")]) == 0
    assert "NOT 128-bit secure" in capsys.readouterr().err
    assert main(["encrypt", str(m), "--keys", str(tmp_path / "c"), "--input", str(hec / "x.npy"),
                 "-o", str(tmp_path / "x.b")]) == 0
    assert "NOT 128-bit secure" in capsys.readouterr().err
    assert main(["run", str(m), "--input", str(hec / "x.npy"), "-q"]) == 0
    assert "NOT 128-bit secure" in capsys.readouterr().err
    assert main(["run", str(hec / "m.hec"), "--input", str(hec / "x.npy"), "-q"]) == 0
    assert "NOT 128-bit" not in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--levels", "0"], "--levels 0: a program needs at least 1 data level"),
    (["--scale-bits", "0"], "--scale-bits 0"),
    (["--refresh-rtt-ms", "-5"], "must be a non-negative number"),
    (["--max-refreshes", "-1"], "--max-refreshes -1"),
    (["--levels", "40", "--ring", "8192", "--security", "none"], "at these settings"),
])
def test_planning_flags_are_validated(hec, tmp_path, capsys, flags, message):
    assert main([str(hec / "tiny.onnx"), "-o", str(tmp_path / "m.hec"), "-q", *flags]) == 1
    line = _one_line_error(capsys, message)
    assert "128-bit" not in line or "--security" not in flags
    assert not (tmp_path / "m.hec").exists()


# ----------------------------------------------------------------------------- 10: refresh privacy

def test_refresh_sends_no_fake_mask_and_the_report_says_what_the_key_holder_sees(hec, capsys):
    _, meta = load_hec(hec / "m.hec")
    assert "SEES those intermediate activations" in meta["report_text"]
    assert "mask" not in " ".join(SB.EvalState.__dataclass_fields__)


# ----------------------------------------------------------------------------- 11: several outputs

@pytest.fixture(scope="module")
def two_outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    rng = np.random.default_rng(1)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3, 3], rng.standard_normal(18).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Mul", ["c", "c"], ["sq"], name="square"),
             helper.make_node("GlobalAveragePool", ["sq"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["a"], name="flat"),
             helper.make_node("GlobalAveragePool", ["c"], ["q"], name="gap2"),
             helper.make_node("Flatten", ["q"], ["b"], name="flat2")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, d / "two.onnx")
    x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.save(d / "x.npy", x)
    assert main([str(d / "two.onnx"), "-o", str(d / "two.hec"), "--ring", "8192", "-q"]) == 0
    return d, model, x


def test_several_outputs_are_all_written_or_refused(two_outputs, tmp_path, capsys):
    d, model, x = two_outputs
    args = ["run", str(d / "two.hec"), "--input", str(d / "x.npy"), "-q"]
    assert main(args + ["-o", str(tmp_path / "y.npy")]) == 1
    _one_line_error(capsys, "2 outputs (a, b)", ".npz")
    assert not (tmp_path / "y.npy").exists()
    assert main(args + ["-o", str(tmp_path / "y.npz")]) == 0
    got = np.load(tmp_path / "y.npz")
    for name, ref in zip(("a", "b"), ort_run(model, x)):
        assert np.abs(got[name] - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


# ----------------------------------------------------------------------------- 6: budgets before building

def _dynamic_hw_model(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, .3, (4, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.float32(0.1), "a"),
             numpy_helper.from_array(rng.normal(0, .3, (10, 4)).astype(np.float32), "wg")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Mul", ["c", "c"], ["s"]),
             helper.make_node("Mul", ["s", "a"], ["t"]), helper.make_node("GlobalAveragePool", ["t"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "wg"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("flags, message", [
    (["--max-seconds", "10"], "per inference > --max-seconds 10 (bound from shapes, not lowered)"),
    (["--max-memory", "512M"], "GiB > budget (bound from shapes, not lowered)"),
])
def test_huge_inputs_are_refused_from_shapes_before_lowering(tmp_path, capsys, flags, message):
    """A 4096x4096 image: every candidate is refused from its shapes at once (lowering one would take
    many minutes), with a one-line error and no output."""
    import time

    _dynamic_hw_model(tmp_path / "dyn.onnx")
    t0 = time.perf_counter()
    rc = main([str(tmp_path / "dyn.onnx"), "-o", str(tmp_path / "d.hec"), "--input-shape", "x=1,1,4096,4096",
               "--no-check", *flags])
    assert rc == 1 and time.perf_counter() - t0 < 60
    err = capsys.readouterr().err
    assert "no parameter set fits" in err and message in err
    assert not (tmp_path / "d.hec").exists()


def test_planning_stops_at_its_compile_budget(tmp_path, capsys):
    _dynamic_hw_model(tmp_path / "dyn.onnx")
    rc = main([str(tmp_path / "dyn.onnx"), "-o", str(tmp_path / "d.hec"), "--input-shape", "x=1,1,512,512",
               "--no-check", "--max-compile-seconds", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "ran out of its compile time budget" in err and "--max-compile-seconds" in err
    assert not (tmp_path / "d.hec").exists()
