"""hecompile serve / query / hecompiler.client: a real HTTP server (a `hecompile serve` process on a
free loopback port), real SEAL encryption, several clients at once, on the bundled tiny ResNet and
the trained digits model; bad inputs, limits, restarts, and what the store holds."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tenseal.sealapi")
pytest.importorskip("aiohttp")

from hecompiler.backends import protocol as P  # noqa: E402
from hecompiler.cli import main  # noqa: E402
from hecompiler.client import Client, ConnectionLost, ServerError  # noqa: E402
from hecompiler.clientfile import load_client_file  # noqa: E402
from hecompiler.hecfile import load_hec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# =========================================================================== helpers

@contextlib.contextmanager
def serving(hec, store, *flags, env=None):
    """A `hecompile serve` process on a free loopback port; yields (url, process, log path)."""
    log = Path(store).parent / f"serve-{Path(store).name}-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "hecompiler.cli", "serve", str(hec), "--port", "0", "--store", str(store), *flags]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        line = _readline(proc, 180)
        assert line.startswith("listening on http://127.0.0.1:"), (line, log.read_text())
        yield line.split()[-1], proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        proc.stdout.close()


def wait_running(url: str, seconds: float = 5.0) -> dict:
    """/health once a worker is evaluating a request (fails after ``seconds``)."""
    end = time.monotonic() + seconds
    while True:
        h = json.loads(request(url, "GET", "/health")[2])
        if h["queue"]["running"] or time.monotonic() > end:
            break
        time.sleep(0.005)
    assert h["queue"]["running"], "never saw the request running"
    return h


def _readline(proc, timeout: float) -> str:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline().decode()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0].strip() if out else f"(no line in {timeout} s; exit code {proc.poll()})"


def request(url: str, method: str, path: str, body: bytes | None = None, headers=None, timeout=120.0):
    """(status, headers, body) without the client's retries."""
    host, port = url.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def one_line_error(status: int, body: bytes, want_status: int, words: str) -> str:
    msg = json.loads(body)["error"]
    assert status == want_status, (status, msg)
    assert words in msg, msg
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def ort_outputs(model: Path, xs) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.stack([s.run(None, {name: np.asarray(x, np.float32)})[0] for x in xs])


def check_answers(prog, ys, refs):
    """Each answer agrees with onnxruntime in argmax and is within the compile report's error bound
    (hecompiler.errorbound, carried by the client file: ClientProgram.error_bound)."""
    bound = prog.error_bound()
    assert bound is not None and bound > 0
    worst = 0.0
    for y, ref in zip(ys, refs):
        y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
        assert y.shape == ref.shape
        assert np.argmax(y) == np.argmax(ref)
        err = float(np.abs(y - ref).max())
        assert err <= bound, (err, bound)
        worst = max(worst, err / bound)
    return worst


def secret_bytes(key_dirs) -> list[bytes]:
    out = []
    for d in key_dirs:
        s = (Path(d) / "secret.key").read_bytes()
        out.append(s)
    return out


def assert_store_holds_no_secret(store: Path, secrets: list[bytes]):
    """No file named secret.key, no file equal to a client's secret.key, and no file containing the
    SEAL payload of one (a 256-byte window from its middle)."""
    files = [p for p in Path(store).rglob("*") if p.is_file()]
    assert files
    windows = [s[len(s) // 2: len(s) // 2 + 256] for s in secrets]
    for p in files:
        assert p.name != "secret.key", p
        data = p.read_bytes()
        for s, w in zip(secrets, windows):
            assert data != s, p
            assert w not in data, p


# =========================================================================== fixtures

@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    out = {}
    for name in ("tiny_resnet_poly", "digits_poly"):
        hec = d / f"{name}.hec"
        assert main([str(ROOT / f"models/{name}.onnx"), "-o", str(hec), "--ring", "8192", "-q"]) == 0
        cf = d / f"{name}.client"
        assert main(["export-client", str(hec), "-o", str(cf)]) == 0
        out[name] = (hec, cf, load_client_file(cf))
    return d, out


def tiny_inputs(n, seed):
    return [np.random.default_rng(seed + i).uniform(-1, 1, (1, 1, 8, 8)).astype(np.float32) for i in range(n)]


# =========================================================================== tests

def test_concurrent_clients_on_the_tiny_resnet_with_bad_requests_beside(programs, tmp_path):
    d, progs = programs
    hec, cfile, cp = progs["tiny_resnet_poly"]
    store = tmp_path / "store"
    with serving(hec, store, "--workers", "2") as (url, proc, log):
        h = json.loads(request(url, "GET", "/health")[2])
        assert h["status"] == "ok" and h["program_sha256"] == cp.program_digest and h["refresh"] == "client"
        assert h["capacity"] == 2 and h["key_sets"] == 0
        # every plaintext of an inference stays cached across requests (the budget leaves room)
        report = load_hec(hec)[1]["report"]
        want = report["plaintexts"]["bytes_all"]
        assert h["limits"]["plaintext_cache_bytes"] == want and "plaintext cache" in log.read_text()
        # the time of a request with that cache, as the compile report predicts it for a server
        assert h["predicted_served_seconds"] == pytest.approx(report["predicted_served_seconds"], abs=2e-3)
        assert h["predicted_served_seconds"] < h["predicted_seconds"]
        # ... encoded by each worker before it took requests
        assert log.read_text().count("plaintexts encoded ahead in") == 2
        status, _, data = request(url, "GET", "/v1/client")
        assert status == 200 and load_client_file(cfile).program_digest == json.loads(data)["body"]["program_sha256"]

        n_clients, per_client = 3, 2
        results, errors = {}, []
        stop_bad = threading.Event()
        bad_statuses, bad_key_statuses = [], []

        def client_thread(i):
            try:
                c = Client(cfile, url, tmp_path / f"keys{i}")
                c.ensure_keys()
                xs = tiny_inputs(per_client, 100 * i)
                results[i] = (xs, c.infer_many(xs, concurrency=2), c)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        def bad_thread():  # garbage while the good clients run: each refused, nobody else affected
            while not stop_bad.is_set():
                bad_statuses.append(request(url, "POST", "/v1/infer", b"garbage" * 100)[0])
                bad_key_statuses.append(request(url, "POST", "/v1/keys", b"HECKEYS1" + b"\xff" * 40)[0])
                time.sleep(0.05)

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(n_clients)]
        bad = threading.Thread(target=bad_thread)
        bad.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        stop_bad.set()
        bad.join(60)
        assert not errors, errors
        assert bad_statuses and set(bad_statuses) == {400}
        assert 400 in bad_key_statuses and set(bad_key_statuses) <= {400, 503}  # 503: two uploads in progress
        xs = [x for i in range(n_clients) for x in results[i][0]]
        ys = [y for i in range(n_clients) for y in results[i][1]]
        check_answers(cp, ys, ort_outputs(ROOT / "models/tiny_resnet_poly.onnx", xs))
        assert len({results[i][2].key_set for i in range(n_clients)}) == n_clients  # one key set each
        h = json.loads(request(url, "GET", "/health")[2])
        assert h["key_sets"] == n_clients and sum(w["jobs"] for w in h["pool"]["workers"]) > 0
        assert all(w["jobs"] > 0 for w in h["pool"]["workers"])  # both workers evaluated
        # the evaluation keys are loaded once per worker and key set, not once per request or step
        loads, jobs = (sum(w[k] for w in h["pool"]["workers"]) for k in ("key_loads", "jobs"))
        assert n_clients <= loads <= 2 * n_clients and jobs >= n_clients * per_client * (1 + cp.refreshes)
        assert_store_holds_no_secret(store, secret_bytes(tmp_path / f"keys{i}" for i in range(n_clients)))
        text = log.read_text()
        assert "key set" in text and "POST /v1/infer 200" in text


PROGRESS_LINE = re.compile(r"^hecompile serve: session [0-9a-f]{8} eval: (\d+)% \((\d+)/(\d+) work units\), "
                           r"[\d.]+ s(, ETA [\d.]+ s)?$", re.M)


def test_query_cli_and_a_second_client_at_once_on_the_digits_model(programs, tmp_path, capsys):
    """The trained digits model: `hecompile query` (3 queries in flight, from the client file, a new key
    set) and a second client (the Python API, its own key set) at the same time; every answer agrees
    with onnxruntime; the server's log shows progress lines of its evaluations."""
    d, progs = programs
    hec, cfile, cp = progs["digits_poly"]
    allx = np.load(ROOT / "models/digits_test_x.npy")
    labels = np.load(ROOT / "models/digits_test_y.npy")[:6]
    xs, xs2 = allx[:6], allx[6:8]
    np.save(tmp_path / "x.npy", xs)
    store = tmp_path / "store"
    with serving(hec, store, "--workers", "2", "--log-interval", "0.01") as (url, proc, log):
        keys = tmp_path / "client-keys"
        assert not keys.exists()
        second = {}

        def other_client():
            try:
                c2 = Client(cfile, url, tmp_path / "second-keys")
                c2.ensure_keys()
                second["ys"] = c2.infer_many([xs2[i:i + 1] for i in range(len(xs2))], concurrency=2)
                second["key_set"] = c2.key_set
            except BaseException as e:  # noqa: BLE001
                second["error"] = e

        t = threading.Thread(target=other_client)
        t.start()
        argv = ["query", str(cfile), "--url", url, "--keys", str(keys), "--input", str(tmp_path / "x.npy"),
                "--concurrency", "3", "-o", str(tmp_path / "y.npy")]
        rc = main(argv)
        t.join(600)
        assert rc == 0, capsys.readouterr().err
        assert "error" not in second, second.get("error")
        err = capsys.readouterr().err
        assert "new key set" in err and "6 queries answered" in err
        assert (keys / "secret.key").exists() and (keys / "evaluation" / "galois.key").exists()
        y = np.load(tmp_path / "y.npy")
        assert y.shape == (6, 10)
        refs = ort_outputs(ROOT / "models/digits_poly.onnx", [xs[i:i + 1] for i in range(6)])[:, 0]
        check_answers(cp, list(y), list(refs))
        assert (np.argmax(y, 1) == labels).mean() >= 5 / 6
        refs2 = ort_outputs(ROOT / "models/digits_poly.onnx", [xs2[i:i + 1] for i in range(len(xs2))])
        check_answers(cp, second["ys"], list(refs2))
        # a second query reuses the key set: nothing uploaded again
        np.save(tmp_path / "x1.npy", xs[:1])
        argv2 = ["query", str(hec), "--url", url, "--keys", str(keys), "--input", str(tmp_path / "x1.npy"),
                 "-o", str(tmp_path / "y1.npy")]
        assert main(argv2) == 0
        err = capsys.readouterr().err
        assert "new key set" not in err and "uploaded" not in err
        assert np.load(tmp_path / "y1.npy").shape == (1, 10)
        assert np.argmax(np.load(tmp_path / "y1.npy")) == np.argmax(y[0])
        h = json.loads(request(url, "GET", "/health")[2])
        assert h["key_sets"] == 2 and second["key_set"] in os.listdir(store / cp.program_digest[:16] / "keysets")
        assert_store_holds_no_secret(store, secret_bytes([keys, tmp_path / "second-keys"]))
        # progress of long work shows in the log (not a terminal): percentage and ETA, in work units
        lines = PROGRESS_LINE.findall(log.read_text())
        assert lines, log.read_text()[-2000:]
        assert all(int(done) <= int(total) for _, done, total, _ in lines)
        assert any(eta for *_, eta in lines)


@pytest.fixture(scope="module")
def tiny_server(programs, tmp_path_factory):
    d, progs = programs
    hec, cfile, cp = progs["tiny_resnet_poly"]
    base = tmp_path_factory.mktemp("tinyserver")
    with serving(hec, base / "store", "--workers", "1") as (url, proc, log):
        a = Client(cfile, url, base / "a")
        b = Client(cfile, url, base / "b")
        a.ensure_keys()
        b.ensure_keys()
        yield url, a, b, cp, base, proc, log


def _inputs_bundle(client, x) -> bytes:
    return P.client_encrypt(client.prog, client._open(), {client.prog.inputs[0].name: x}).to_bytes()


def _bad_requests(url, a, b, cp, base, programs):
    """(name, status, headers, body, want status, words) for each bad input of issue 13 item 4."""
    x = tiny_inputs(1, 5)[0]
    good = _inputs_bundle(a, x)
    out = []
    out.append(("garbage body", *request(url, "POST", "/v1/infer", b"\x00garbage\xff" * 30), 400, "bad magic"))
    out.append(("empty body", *request(url, "POST", "/v1/infer", b""), 400, "empty body"))
    out.append(("truncated bundle", *request(url, "POST", "/v1/infer", good[: len(good) // 2]), 400,
                "corrupt or truncated"))
    # a ciphertext cut short inside a well-formed bundle (the bundle's own checksum recomputed)
    bd = P.Bundle.from_bytes(good)
    name = next(iter(bd.items))
    bd.items[name] = bd.items[name][:-1000]
    out.append(("truncated ciphertext", *request(url, "POST", "/v1/infer", bd.to_bytes()), 400, "truncated"))
    # the keys of another program: the digits client's key upload to the tiny server
    d, progs = programs
    other = Client(progs["digits_poly"][1], url, base / "other-program-keys")
    other.keygen()
    from hecompiler.serving.wire import KeyUpload

    up = KeyUpload(other.evaluation_dir, other.keys_dir / "secret.key")
    out.append(("keys of another program", *request(url, "POST", "/v1/keys", b"".join(up),
                                                    {"Content-Length": str(len(up))}), 409, "another program"))
    # inputs encrypted for another program
    ob = P.client_encrypt(other.prog, other._open(), {other.prog.inputs[0].name: np.zeros((1, 1, 8, 8))})
    out.append(("inputs of another program", *request(url, "POST", "/v1/infer", ob.to_bytes()), 409,
                "another program"))
    # an unknown key set: a key set the server never got
    c = Client(cp, url, base / "never-uploaded")
    c.keygen()
    out.append(("unknown key set", *request(url, "POST", "/v1/infer", _inputs_bundle(c, x)), 404,
                "unknown key set"))
    # a ciphertext for another key set: a's inputs sent as b's
    out.append(("ciphertext for another key set", *request(url, "POST", "/v1/infer", good,
                                                           {"X-Hec-Key-Set": b.key_set}), 409, "wrong keys"))
    # a request too large for the program's ciphertexts
    out.append(("oversized body", *request(url, "POST", "/v1/infer", b"x" * (4 << 20)), 413, "limit"))
    # a key upload holding a secret key is refused, by name, before anything is stored
    import hashlib
    import struct

    sk = (a.keys_dir / "secret.key").read_bytes()
    head = json.dumps({"key_set": a.key_set, "program_sha256": cp.program_digest,
                       "params_fingerprint": P.params_fingerprint(cp), "backend": "seal",
                       "files": [["secret.key", len(sk), hashlib.sha256(sk).hexdigest()]]}).encode()
    body = b"HECKEYS1" + struct.pack("<Q", len(head)) + head + sk
    body += hashlib.sha256(body).digest()
    out.append(("key upload with a secret key", *request(url, "POST", "/v1/keys", body), 400, "secret"))
    out.append(("unknown session", *request(url, "POST", "/v1/sessions/" + "ab" * 16 + "/refresh", good), 404,
                "unknown session"))
    return out


def test_bad_inputs_get_a_4xx_with_one_line_and_the_server_keeps_serving(tiny_server, programs):
    url, a, b, cp, base, proc, log = tiny_server
    for name, status, headers, body, want, words in _bad_requests(url, a, b, cp, base, programs):
        one_line_error(status, body, want, words)
    # a refresh response that answers a request the session is not waiting for
    x = tiny_inputs(1, 9)[0]
    st, h, req = request(url, "POST", "/v1/infer", _inputs_bundle(a, x), {"X-Hec-Key-Set": a.key_set})
    assert st == 200 and h["x-hec-step"] == "refresh"
    sid = h["x-hec-session"]
    resp = P.client_refresh(a.prog, a._open(), P.Bundle.from_bytes(req))
    stale = P.Bundle("response", resp.program_sha256, resp.params_fingerprint, resp.key_set,
                     dict(resp.meta, request_id="0" * 32), resp.items)
    one_line_error(*request(url, "POST", f"/v1/sessions/{sid}/refresh", stale.to_bytes())[::2], 409, "stale")
    # the same response labelled with the other client's key set
    foreign = P.Bundle("response", resp.program_sha256, resp.params_fingerprint, b.key_set, resp.meta, resp.items)
    one_line_error(*request(url, "POST", f"/v1/sessions/{sid}/refresh", foreign.to_bytes())[::2], 409,
                   "wrong keys")
    # the right response still continues the session
    st, h, _ = request(url, "POST", f"/v1/sessions/{sid}/refresh", resp.to_bytes())
    assert st == 200 and h["x-hec-session"] == sid
    # and the good clients are still served, with the right answers
    xs = tiny_inputs(2, 40)
    ys = [a.infer(xs[0]), b.infer(xs[1])]
    check_answers(cp, ys, ort_outputs(ROOT / "models/tiny_resnet_poly.onnx", xs))
    assert proc.poll() is None
    assert_store_holds_no_secret(base / "store", secret_bytes([a.keys_dir, b.keys_dir]))


def test_retried_refresh_is_replayed_and_sessions_are_bound_to_their_key_set(tiny_server):
    url, a, b, cp, base, proc, log = tiny_server
    x = tiny_inputs(1, 77)[0]
    st, h, req = request(url, "POST", "/v1/infer", _inputs_bundle(a, x))
    sid = h["x-hec-session"]
    resp = P.client_refresh(a.prog, a._open(), P.Bundle.from_bytes(req)).to_bytes()
    s1, h1, ans1 = request(url, "POST", f"/v1/sessions/{sid}/refresh", resp)
    s2, h2, ans2 = request(url, "POST", f"/v1/sessions/{sid}/refresh", resp)  # the same post again (a retry)
    assert s1 == s2 == 200 and ans1 == ans2 and h1["x-hec-request-id"] == h2["x-hec-request-id"]
    info = json.loads(request(url, "GET", f"/v1/sessions/{sid}")[2])
    assert info["key_set"] == a.key_set and info["step"] == 2 and not info["done"]
    assert request(url, "DELETE", f"/v1/sessions/{sid}")[0] == 200
    assert request(url, "GET", f"/v1/sessions/{sid}")[0] == 404


def test_state_survives_a_restart_and_an_in_flight_request_gets_a_clear_error(programs, tmp_path):
    d, progs = programs
    hec, cfile, cp = progs["digits_poly"]
    store = tmp_path / "store"
    keys = tmp_path / "keys"
    x = np.load(ROOT / "models/digits_test_x.npy")[:2]
    with serving(hec, store, "--workers", "1") as (url, proc, log):
        c = Client(cfile, url, keys, retries=0)
        c.ensure_keys()
        y0 = c.infer(x[:1])
        # a session waiting for its client (a refresh request sent), to resume after the restart
        st, h, req = request(url, "POST", "/v1/infer", _inputs_bundle(c, x[1:2]))
        assert st == 200 and h["x-hec-step"] == "refresh"
        sid = h["x-hec-session"]
        # an inference in flight when the server is killed
        box = {}

        def run():
            t = time.monotonic()
            try:
                c.infer(x[:1])
            except BaseException as e:  # noqa: BLE001
                box["error"] = e
            box["seconds"] = time.monotonic() - t

        t = threading.Thread(target=run)
        t.start()
        h2 = wait_running(url)
        worker_pids = [w["pid"] for w in h2["pool"]["workers"] if w["pid"]]
        assert worker_pids
        proc.kill()  # SIGKILL: no goodbye
        proc.wait(30)
        t.join(60)
        assert not t.is_alive(), "the client hung after the server died"
        assert isinstance(box.get("error"), ConnectionLost), box
        assert "stopped or restarted" in str(box["error"]) and "\n" not in str(box["error"])
        assert box["seconds"] < 30
    for pid in worker_pids:  # the workers die with the server (PR_SET_PDEATHSIG), none is orphaned
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text().lower():
                break
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    with serving(hec, store, "--workers", "1") as (url2, proc2, log2):
        h = json.loads(request(url2, "GET", "/health")[2])
        assert h["key_sets"] == 1  # the key set is still there
        # the waiting session resumes where it stopped
        resp = P.client_refresh(c.prog, c._open(), P.Bundle.from_bytes(req)).to_bytes()
        st, h, _ = request(url2, "POST", f"/v1/sessions/{sid}/refresh", resp)
        assert st == 200 and h["x-hec-session"] == sid
        # and the client goes on without uploading its keys again
        c2 = Client(cfile, url2, keys)
        c2.ensure_keys()
        assert not c2.uploaded and not c2.created
        y1 = c2.infer(x[:1])
        assert np.argmax(y1) == np.argmax(y0) and np.abs(y1 - y0).max() < 1e-4
        assert "0 key set(s) on disk" not in log2.read_text()


def test_sigterm_lets_a_running_evaluation_finish_and_refuses_new_ones(programs, tmp_path):
    """SIGTERM while an inference runs: it still gets its answer, its client-aided refresh steps
    included (--grace), a new inference arriving meanwhile gets a one-line 503, and the server
    exits 0 soon after; with --grace 0 the inference gets a one-line error instead of a hang."""
    d, progs = programs
    hec, cfile, cp = progs["digits_poly"]
    x = np.load(ROOT / "models/digits_test_x.npy")[:1]
    ref = ort_outputs(ROOT / "models/digits_poly.onnx", [x])
    for grace in ("30", "0"):
        store = tmp_path / f"store{grace}"
        with serving(hec, store, "--workers", "1", "--grace", grace) as (url, proc, log):
            c = Client(cfile, url, tmp_path / f"keys{grace}", retries=0)
            c.ensure_keys()
            box = {}

            def run():
                try:
                    box["y"] = c.infer(x)
                except BaseException as e:  # noqa: BLE001
                    box["error"] = e

            t = threading.Thread(target=run)
            t.start()
            wait_running(url)
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            for _ in range(200):
                h = json.loads(request(url, "GET", "/health")[2])
                if h["status"] == "shutting down":
                    break
                time.sleep(0.01)
            if grace != "0":
                assert h["status"] == "shutting down"
                st, _, body = request(url, "POST", "/v1/infer", _inputs_bundle(c, x))
                assert st == 503 and b"shutting down" in body and body.count(b"\n") <= 1
            t.join(120)
            assert not t.is_alive()
            assert proc.wait(60) == 0 and time.monotonic() - t_term < 60
            if grace == "0":
                msg = str(box.get("error"))
                assert ("shutting down" in msg or "stopped or restarted" in msg) and "\n" not in msg, box
            else:
                assert "error" not in box, box
                check_answers(cp, [box["y"]], list(ref))
                assert "waiting up to 30 s for 1 inference(s) in flight" in log.read_text()


def test_limits_queue_timeout_memory(programs, tmp_path):
    d, progs = programs
    hec, cfile, cp = progs["tiny_resnet_poly"]
    # a full queue: 1 worker, no waiting place; bursts of 8 requests at once until one finds the worker
    # busy (the first step of the tiny model is short: on a loaded machine a burst may not overlap)
    with serving(hec, tmp_path / "s1", "--workers", "1", "--queue", "0") as (url, proc, log):
        c = Client(cfile, url, tmp_path / "k1")
        c.ensure_keys()
        bodies = [_inputs_bundle(c, x) for x in tiny_inputs(8, 3)]
        for burst in range(5):
            got = [None] * 8
            barrier = threading.Barrier(8)

            def post(i):
                barrier.wait()
                got[i] = request(url, "POST", "/v1/infer", bodies[i])

            ts = [threading.Thread(target=post, args=(i,)) for i in range(8)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(120)
            statuses = [g[0] for g in got]
            assert set(statuses) <= {200, 503} and 200 in statuses, statuses
            if 503 in statuses:
                break
        assert 503 in statuses, statuses
        busy = next(g for g in got if g[0] == 503)
        one_line_error(busy[0], busy[2], 503, "--queue 0")
        assert int(busy[1]["retry-after"]) >= 1
        assert c.infer(tiny_inputs(1, 8)[0]).shape == (1, 10)  # still serving
    # a per-request timeout shorter than any evaluation: 504, the worker is replaced, health still answers
    with serving(hec, tmp_path / "s2", "--workers", "1", "--timeout", "0.01") as (url, proc, log):
        c = Client(cfile, url, tmp_path / "k2", retries=0)
        c.ensure_keys()  # loading keys is not an evaluation: it has its own, longer limit
        with pytest.raises(ServerError) as e:
            c.infer(tiny_inputs(1, 1)[0])
        assert e.value.status == 504 and "--timeout" in str(e.value) and "\n" not in str(e.value)
        h = json.loads(request(url, "GET", "/health")[2])
        assert h["status"] == "ok"
    # a memory budget below what a worker holds: the worker is stopped, 503 naming the budget
    with serving(hec, tmp_path / "s3", "--workers", "1", "--worker-memory", "40M") as (url, proc, log):
        c = Client(cfile, url, tmp_path / "k3", retries=0)
        with pytest.raises(ServerError) as e:
            c.ensure_keys()
        assert e.value.status == 503 and "memory budget of 40 MiB" in str(e.value)
        assert "below the" in log.read_text()  # the operator was warned at start
        assert json.loads(request(url, "GET", "/health")[2])["status"] == "ok"


def test_serve_and_query_refuse_bad_flags_in_one_line(programs, tmp_path, capsys):
    d, progs = programs
    hec, cfile, cp = progs["tiny_resnet_poly"]
    for argv, words in [(["serve", str(hec), "--workers", "0"], "--workers 0"),
                        (["serve", str(hec), "--log-interval", "0"], "--log-interval must be positive"),
                        (["serve", str(tmp_path / "nope.hec")], "no such file"),
                        (["serve", str(hec), "--worker-memory", "lots"], "--worker-memory"),
                        (["serve", str(hec), "--plaintext-cache", "lots"], "--plaintext-cache 'lots'"),
                        (["query", str(cfile), "--url", "ftp://x", "--keys", str(tmp_path / "k"), "--input",
                          str(ROOT / "models/tiny_resnet_poly.input.npy")], "expected http://HOST:PORT"),
                        (["query", str(cfile), "--url", "http://127.0.0.1:9", "--keys", str(tmp_path / "k"),
                          "--input", str(ROOT / "models/tiny_resnet_poly.input.npy"), "--retries", "0"],
                         "no server is listening")]:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert words in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "k").exists()  # no key set made for a server that is not there


def _dask_cluster():
    distributed = pytest.importorskip("distributed")
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address=None, silence_logs=40)


@pytest.mark.slow
def test_scale_out_on_a_dask_cluster(programs, tmp_path):
    """The same front end with --scheduler: each evaluation step is a Dask task on a LocalCluster's
    worker processes (loopback), the program and the key set shipped to the workers once."""
    d, progs = programs
    hec, cfile, cp = progs["tiny_resnet_poly"]
    cluster = _dask_cluster()
    try:
        with serving(hec, tmp_path / "store", "--scheduler", cluster.scheduler_address) as (url, proc, log):
            h = json.loads(request(url, "GET", "/health")[2])
            assert h["pool"]["kind"] == "dask" and h["capacity"] == 2
            clients = [Client(cfile, url, tmp_path / f"k{i}") for i in range(2)]
            for c in clients:
                c.ensure_keys()
            xs = tiny_inputs(4, 60)
            out = {}

            def go(i):
                out[i] = clients[i].infer_many(xs[2 * i: 2 * i + 2], concurrency=2)

            ts = [threading.Thread(target=go, args=(i,)) for i in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(600)
            ys = out[0] + out[1]
            check_answers(cp, ys, ort_outputs(ROOT / "models/tiny_resnet_poly.onnx", xs))
            h = json.loads(request(url, "GET", "/health")[2])
            assert h["pool"]["key_sets_shipped"] == 2 and h["pool"]["jobs"] >= 4 * 6
            assert_store_holds_no_secret(tmp_path / "store", secret_bytes([c.keys_dir for c in clients]))
            assert "Dask scheduler" in log.read_text()
    finally:
        cluster.close()


def test_a_bootstrapping_program_is_served_in_one_request_per_inference(tmp_path, capsys):
    """A non-interactive program (Lattigo, the INSECURE toy-n12 ring: fast) behind the same server:
    the client file says so, the client's key set carries bootstrapping keys (uploaded, never the
    secret key), and every inference is answered in one request, with no refresh step; two
    clients at once, `hecompile query` and the Python API; answers agree with onnxruntime."""
    pytest.importorskip("hecompiler.backends.lattigo.session")
    hec, cfile = tmp_path / "toy.hec", tmp_path / "toy.client"
    assert main([str(ROOT / "models/tiny_resnet_poly.onnx"), "-o", str(hec), "--target", "lattigo:toy-n12",
                 "--security", "none", "-q"]) == 0
    assert main(["export-client", str(hec), "-o", str(cfile)]) == 0
    cp = load_client_file(cfile)
    assert cp.refresh == "bootstrap" and cp.meta["client_round_trips"] == 0 and cp.refreshes > 0
    assert [i.op for i in cp.instrs] == ["refresh"] * cp.refreshes  # markers only: no operand, no weight
    xs = tiny_inputs(3, 500)
    np.save(tmp_path / "x.npy", np.concatenate(xs[:2]))
    store = tmp_path / "store"
    with serving(hec, store, "--workers", "1") as (url, proc, log):
        h = json.loads(request(url, "GET", "/health")[2])
        assert h["backend"] == "lattigo" and h["refresh"] == "bootstrap"
        box = {}

        def api_client():
            try:
                c = Client(cfile, url, tmp_path / "api-keys")
                c.ensure_keys()
                st, hd, body = request(url, "POST", "/v1/infer", _inputs_bundle(c, xs[2]),
                                       {"X-Hec-Key-Set": c.key_set})
                assert st == 200, body[:300]
                box["step"] = hd["x-hec-step"]
                box["y"] = P.client_decrypt(c.prog, c._open(), P.Bundle.from_bytes(body))[cp.outputs[0].name]
            except BaseException as e:  # noqa: BLE001
                box["error"] = e

        t = threading.Thread(target=api_client)
        t.start()
        keys = tmp_path / "cli-keys"
        rc = main(["query", str(cfile), "--url", url, "--keys", str(keys), "--input", str(tmp_path / "x.npy"),
                   "--concurrency", "2", "-o", str(tmp_path / "y.npy")])
        t.join(300)
        err = capsys.readouterr().err
        assert rc == 0, err
        assert "error" not in box, box.get("error")
        assert "NOT 128-bit secure" in err and "new key set" in err
        assert box["step"] == "done"  # the first answer holds the outputs: no refresh request
        assert (keys / "evaluation" / "bootstrap.key").exists() and not (keys / "evaluation" / "secret.key").exists()
        ys = [row[None] for row in np.load(tmp_path / "y.npy")] + [box["y"]]
        check_answers(cp, ys, ort_outputs(ROOT / "models/tiny_resnet_poly.onnx", xs))
        text = log.read_text()
        assert "/refresh" not in text and text.count("-> done") == 3
        # bad inputs get the same one-line 4xx as on SEAL: a truncated ciphertext, another key set's
        c = Client(cfile, url, keys)
        bd = P.Bundle.from_bytes(_inputs_bundle(c, xs[0]))
        good = bd.to_bytes()
        name = next(iter(bd.items))
        bd.items[name] = bd.items[name][:-1000]
        st, _, body = request(url, "POST", "/v1/infer", bd.to_bytes())
        assert st == 400 and "\n" not in json.loads(body)["error"], body
        other = Client(cfile, url, tmp_path / "api-keys")
        one_line_error(*request(url, "POST", "/v1/infer", good, {"X-Hec-Key-Set": other.key_set})[::2], 409,
                       "wrong keys")
        assert json.loads(request(url, "GET", "/health")[2])["key_sets"] == 2
        stored = list((store / cp.program_digest[:16] / "keysets").glob("*/bootstrap.key"))
        assert len(stored) == 2
        assert_store_holds_no_secret(store, secret_bytes([keys, tmp_path / "api-keys"]))
