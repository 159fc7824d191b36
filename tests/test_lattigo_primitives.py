"""The Lattigo backend's primitives (backends/lattigo), on small INSECURE parameters.

Every op is checked against numpy, with levels and scales exact.  Bounds are
measured on this machine (max abs error for |x| <= 1): fresh encryption ~5e-10,
rotation ~3e-9, mul+rescale ~4e-9, bootstrap at toy-n10 ~4e-8 (we assert 1e-6).
The whole file runs in about 10 s (toy-n10 bootstraps in ~0.15 s).
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

L = pytest.importorskip("hecompiler.backends.lattigo")

if not L.library_path().exists():  # pragma: no cover - `make test` builds it
    pytest.skip(f"{L.library_path()} not built (run make)", allow_module_level=True)

STEPS = (1, 2, 3, -1, 7)
FRESH = 1e-7  # fresh encryption / one op on |x| <= 1 (measured <= 5e-9)
BTP = 1e-6  # bootstrap of |x| <= 1 at toy-n10 (measured ~4e-8)


def close(got, want, tol):
    err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    assert err < tol, f"max error {err:.3g} >= {tol:.3g}"
    return err


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """Five-level ring 2^12 without bootstrapping: params, client, server, key dirs."""
    p = L.LattigoParams.insecure_set("toy-n12-nobtp")
    d = tmp_path_factory.mktemp("lattigo_n12")
    rep = L.keygen(p, d / "client", d / "server", rotations=STEPS, relin=True)
    cl, ev = L.Client(p, d / "client"), L.Evaluator(p, d / "server")
    rng = np.random.default_rng(7)
    yield {"p": p, "cl": cl, "ev": ev, "dir": d, "rep": rep, "rng": rng}
    cl.close()
    ev.close()


@pytest.fixture(scope="module")
def btp(tmp_path_factory):
    """Ring 2^10 with bootstrapping (residual levels 0..2)."""
    p = L.LattigoParams.insecure_set("toy-n10")
    d = tmp_path_factory.mktemp("lattigo_n10")
    rep = L.keygen(p, d / "client", d / "server", rotations=(1,))
    cl, ev = L.Client(p, d / "client"), L.Evaluator(p, d / "server")
    yield {"p": p, "cl": cl, "ev": ev, "rng": np.random.default_rng(3), "rep": rep}
    cl.close()
    ev.close()


def vec(r, amp=1.0):
    return r["rng"].uniform(-amp, amp, r["p"].slots)


# ---------------------------------------------------------------- parameters

def test_params_resolved_and_exposed(ring):
    p = ring["p"]
    assert (p.n, p.slots, p.max_level) == (4096, 2048, 5)
    assert len(p.q) == 6 and len(p.p) == 1
    for q in p.q + p.p:
        assert q % (2 * p.n) == 1
    assert [round(b) for b in p.bits()] == [60, 40, 40, 40, 40, 40]
    assert p.default_scale == 2.0**40
    assert abs(p.log_qp - (60 + 5 * 40 + 61)) < 0.01
    assert p.bootstrap is None
    # the resolved literal (explicit primes) gives the same parameter set
    again = L.LattigoParams(p.literal)
    assert again.fingerprint == p.fingerprint and again.q == p.q


def test_bootstrap_info(btp):
    p = btp["p"]
    b = p.bootstrap
    assert b.output_level == p.max_level == 2
    assert b.depth == b.cts_depth + b.evalmod_depth + b.stc_depth == 15
    assert b.q[: p.max_level + 1] == p.q and len(b.q) == p.max_level + 1 + b.depth
    assert b.message_ratio == 2.0**14 and b.max_abs_value == 64.0
    assert b.log_slots == p.log_slots == 9


@pytest.mark.parametrize("patch, msg", [
    ({"q": [12289], "log_q": None}, "not 1 mod 2N"),
    ({"q": [1152921504606830593 + 8192], "log_q": None}, "not prime"),
    ({"q": [1152921504606830593, 1152921504606830593], "log_q": None}, "repeats"),
    ({"q": [1]}, "exactly one of q"),
    ({"log_default_scale": 70}, "log_default_scale"),
    ({"secret": {}}, "secret"),
    ({"bogus": 1}, "unknown field"),
    ({"log_slots": 12}, "log_slots"),
])
def test_params_errors(patch, msg):
    lit = L.insecure_literal("toy-n12-nobtp")
    for k, v in patch.items():
        if v is None:
            lit.pop(k, None)
        else:
            lit[k] = v
    with pytest.raises(L.LattigoError, match=msg):
        L.LattigoParams(lit)


def test_reference_sets():
    """Lattigo's secure sets: literals and chains only (no keys: 13 GiB at 2^16)."""
    n16 = L.LattigoParams.reference("n16-sparse")
    assert n16.n == 2**16 and n16.literal["secret"] == {"h": 192}
    assert [round(b) for b in n16.bits()] == [60] + [40] * 9 and len(n16.p) == 5
    assert round(n16.bootstrap.log_qp) == 1546 and n16.bootstrap.output_level == 9
    n15 = L.LattigoParams.reference("n15-dense")
    assert n15.n == 2**15 and n15.literal["secret"] == {"h": 2**14}
    assert [round(b) for b in n15.bits()] == [40, 31, 31, 31, 31]
    assert round(n15.bootstrap.log_qp) == 880 <= 881
    with pytest.raises(L.LattigoError, match="unknown reference set"):
        L.reference_literal("n17")


# ---------------------------------------------------------------- keys

def test_key_files(ring):
    d, p = ring["dir"], ring["p"]
    client, server = d / "client", d / "server"
    assert sorted(os.listdir(client)) == ["public.key", "secret.key"]
    assert sorted(os.listdir(server)) == ["galois.key", "public.key", "relin.key"]
    assert stat.S_IMODE(os.stat(client / "secret.key").st_mode) == 0o600
    assert (client / "public.key").read_bytes() == (server / "public.key").read_bytes()
    assert L.keyset_fingerprint(client) == L.keyset_fingerprint(server)
    assert len(L.keyset_fingerprint(server)) == 64
    # steps are normalised mod slots; elements are 5^k mod 2N
    rep = ring["rep"]
    assert rep["steps"] == sorted({k % p.slots for k in STEPS})
    assert rep["galois_elements"] == [pow(5, k, 2 * p.n) for k in rep["steps"]]
    assert ring["ev"].steps == tuple(rep["steps"]) and ring["ev"].has_relin
    # the server needs no secret key; a client cannot load from the server dir
    with pytest.raises(L.LattigoError, match="secret.key"):
        L.Client(p, server)


def test_keys_bound_to_params_and_keyset(ring, tmp_path):
    p = ring["p"]
    other = L.LattigoParams(dict(L.insecure_literal("toy-n12-nobtp"), log_default_scale=30))
    with pytest.raises(L.LattigoError, match="another parameter set"):
        L.Evaluator(other, ring["dir"] / "server")
    # a second key set: mixing its galois.key with the first public.key is refused
    L.keygen(p, tmp_path / "c2", tmp_path / "s2", rotations=(1,))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "public.key").write_bytes((ring["dir"] / "server" / "public.key").read_bytes())
    (mixed / "galois.key").write_bytes((tmp_path / "s2" / "galois.key").read_bytes())
    with pytest.raises(L.LattigoError, match="another key set"):
        L.Evaluator(p, mixed)
    with pytest.raises(L.LattigoError, match="must differ"):
        L.keygen(p, tmp_path / "same", tmp_path / "same")


# ---------------------------------------------------------------- encryption

@pytest.mark.parametrize("secret", [True, False])
def test_encrypt_decrypt_levels_scales(ring, secret):
    p, cl = ring["p"], ring["cl"]
    x = vec(ring)
    for level in (p.max_level, 2, 0):
        for scale in (2.0**40, 2.0**33 + 12345.678):
            ct = cl.encrypt(x, level=level, scale=scale, secret=secret)
            assert ct.level == level and ct.scale == scale
            close(cl.decrypt(ct), x, FRESH * (2**40 / scale))
    # the server encrypts with the public key
    ct = ring["ev"].encrypt(x, level=1)
    assert (ct.level, ct.scale) == (1, p.default_scale)
    close(cl.decrypt(ct), x, FRESH)
    # short vectors are zero padded
    out = cl.decrypt(cl.encrypt([0.5, -0.25]))
    close(out[:2], [0.5, -0.25], FRESH)
    close(out[2:], 0, FRESH)


@pytest.mark.parametrize("amp", [1.0, 1e-6, 3e4])
def test_encoding_is_lattigos_bit_for_bit(ring, amp):
    """The library's encoder (no per-coefficient allocations) gives Lattigo's plaintexts exactly,
    at every level, for small, ordinary and large values, zeros, short vectors and other scales;
    and it decodes back."""
    p, ev = ring["p"], ring["ev"]
    rng = np.random.default_rng(11)
    for level in range(p.max_level + 1):
        v = rng.uniform(-amp, amp, p.slots)
        v[::7] = 0.0
        assert ev.encode_matches_lattigo(v, level)
        assert ev.encode_matches_lattigo(v[: p.slots // 3], level, 2.0 ** 30 * 1.5)
    assert ev.encode_matches_lattigo(np.zeros(p.slots), 0)
    # values whose scaled size needs the big-integer path (>= 2^64)
    assert ev.encode_matches_lattigo(np.full(p.slots, 2.0 ** 30), p.max_level, 2.0 ** 40)


def test_encoding_from_threads_while_evaluating(ring):
    """hl_encode runs beside evaluator calls on other threads (what the executor's prefetch does):
    every product is right."""
    from concurrent.futures import ThreadPoolExecutor

    p, cl, ev = ring["p"], ring["cl"], ring["ev"]
    x = vec(ring)
    ct = cl.encrypt(x)
    ws = [vec(ring) for _ in range(24)]
    with ThreadPoolExecutor(3) as pool:
        pts = list(pool.map(lambda w: ev.encode(w, p.max_level), ws))
        rots = list(pool.map(lambda k: ev.rotate(ct, 1 + k % 3), range(6)))
    for w, pt in zip(ws, pts):
        close(cl.decrypt(ev.mul_plain(ct, pt)), x * w, 1e-5)
    close(cl.decrypt(rots[0]), np.roll(x, -1), FRESH)


def test_set_scale_relabels(ring):
    cl = ring["cl"]
    x = vec(ring)
    ct = cl.encrypt(x, scale=2.0**40)
    ct.set_scale(2.0**41)
    assert ct.scale == 2.0**41
    close(cl.decrypt(ct), x / 2, FRESH)


# ---------------------------------------------------------------- rotations

def test_rotation_is_left(ring):
    cl, ev, S = ring["cl"], ring["ev"], ring["p"].slots
    x = np.arange(S, dtype=float) / S
    ct = cl.encrypt(x, level=3)
    for k in STEPS + (S + 1, 0):
        r = ev.rotate(ct, k)
        assert (r.level, r.scale) == (3, ct.scale)
        close(cl.decrypt(r), np.roll(x, -k), FRESH)  # slot i <- slot i+k


def test_hoisted_equals_plain(ring):
    cl, ev = ring["cl"], ring["ev"]
    x = vec(ring)
    ct = cl.encrypt(x, level=4)
    steps = [1, 2, 3, -1, 0, 1, 7]
    hs = ev.rotate_hoisted(ct, steps)
    assert len(hs) == len(steps)
    for k, h in zip(steps, hs):
        assert (h.level, h.scale) == (4, ct.scale)
        got = cl.decrypt(h)
        close(got, np.roll(x, -k), FRESH)
        close(got, cl.decrypt(ev.rotate(ct, k)), 1e-8)


# ---------------------------------------------------------------- arithmetic

def test_add_sub_negate(ring):
    cl, ev = ring["cl"], ring["ev"]
    x, y = vec(ring), vec(ring)
    a, b = cl.encrypt(x, level=2), cl.encrypt(y, level=2)
    for r, want in ((ev.add(a, b), x + y), (ev.sub(a, b), x - y), (ev.negate(a), -x)):
        assert (r.level, r.scale) == (2, a.scale)
        close(cl.decrypt(r), want, FRESH)


def test_plain_and_const_ops(ring):
    p, cl, ev = ring["p"], ring["cl"], ring["ev"]
    x, w = vec(ring), vec(ring)
    ct = cl.encrypt(x, level=3)
    r = ev.add_plain(ct, w)
    assert (r.level, r.scale) == (3, ct.scale)
    close(cl.decrypt(r), x + w, FRESH)
    q3 = float(p.q[3])
    r = ev.mul_plain(ct, w, scale=q3)
    assert (r.level, r.scale) == (3, ct.scale * q3)
    close(cl.decrypt(r), x * w, FRESH)
    pt = ev.encode(w, level=3, scale=2.0**30)
    assert (pt.level, pt.scale) == (3, 2.0**30)
    r = ev.mul_plain(ct, pt)
    assert r.scale == ct.scale * 2.0**30
    close(cl.decrypt(r), x * w, 1e-6)
    r = ev.add_const(ct, 0.75)
    assert r.scale == ct.scale
    close(cl.decrypt(r), x + 0.75, FRESH)
    r = ev.mul_const(ct, -1.5, 2.0**20)
    assert (r.level, r.scale) == (3, ct.scale * 2.0**20)
    close(cl.decrypt(r), -1.5 * x, FRESH)
    with pytest.raises(L.LattigoError, match="scale mismatch"):
        ev.add_plain(ct, w, scale=2.0**39)
    with pytest.raises(L.LattigoError, match="give the plaintext scale"):
        ev.mul_plain(ct, w)


def test_mul_rescale_exact_scales(ring):
    p, cl, ev = ring["p"], ring["cl"], ring["ev"]
    x, y = vec(ring), vec(ring)
    s1, s2 = 2.0**40, float(p.q[5])
    a, b = cl.encrypt(x, level=5, scale=s1), cl.encrypt(y, level=5, scale=s2)
    m = ev.mul(a, b)
    assert (m.level, m.scale) == (5, s1 * s2)
    close(cl.decrypt(m), x * y, FRESH)
    r = ev.rescale(m)
    assert r.level == 4 and r.scale == (s1 * s2) / float(p.q[5])  # exactly one prime, float64 division
    close(cl.decrypt(r), x * y, FRESH)
    # down the chain: scale = s * q_l / q_l after each mul_plain + rescale
    ct, want = a, s1
    for level in range(5, 0, -1):
        q = float(p.q[level])
        ct = ev.rescale(ev.mul_plain(ct, np.ones(p.slots), scale=q))
        want = (want * q) / q
        assert (ct.level, ct.scale) == (level - 1, want)
    close(cl.decrypt(ct), x, 1e-6)


def test_drop_level_and_zero(ring):
    cl, ev = ring["cl"], ring["ev"]
    x = vec(ring)
    ct = cl.encrypt(x, level=4, scale=2.0**35)
    d = ev.drop_level(ct, 1)
    assert (d.level, d.scale) == (1, 2.0**35)
    close(cl.decrypt(d), x, 1e-6)
    for enc in (False, True):
        z = ev.zero(1, 2.0**35, encrypted=enc)
        assert (z.level, z.scale) == (1, 2.0**35)
        close(cl.decrypt(z), 0, 1e-6)
        close(cl.decrypt(ev.add(d, z)), x, 1e-6)


# ---------------------------------------------------------------- serialization

def test_serialization_round_trips(ring, tmp_path):
    p, cl = ring["p"], ring["cl"]
    x = vec(ring)
    ct = cl.encrypt(x, level=2, scale=2.0**37 + 0.5)
    want = cl.decrypt(ct)
    data = ct.to_bytes()
    back = L.Ciphertext.from_bytes(p, data)
    assert (back.level, back.scale) == (2, 2.0**37 + 0.5)
    assert np.array_equal(cl.decrypt(back), want)
    path = tmp_path / "ct.bin"
    ct.save(path)
    assert path.read_bytes() == data
    loaded = L.Ciphertext.load(p, path)
    assert (loaded.level, loaded.scale) == (2, ct.scale)
    assert np.array_equal(cl.decrypt(loaded), want)
    with pytest.raises(L.LattigoError):
        L.Ciphertext.from_bytes(p, data[: len(data) // 2])
    with pytest.raises(L.LattigoError, match="bad magic"):
        L.Ciphertext.from_bytes(p, b"x" * 200)
    other = L.LattigoParams(dict(L.insecure_literal("toy-n12-nobtp"), log_default_scale=30))
    with pytest.raises(L.LattigoError, match="another parameter set"):
        L.Ciphertext.from_bytes(other, data)
    with pytest.raises(L.LattigoError):
        L.Ciphertext.load(p, tmp_path / "missing.bin")


# ---------------------------------------------------------------- misuse

def test_misuse_raises_and_process_survives(ring, tmp_path):
    p, cl, ev = ring["p"], ring["cl"], ring["ev"]
    x = vec(ring)
    a = cl.encrypt(x, level=3)
    with pytest.raises(L.LattigoError, match="no ciphertext with handle"):
        ev.rotate(L.Ciphertext(p, 10**12), 1)
    pt = ev.encode(x, level=3)
    with pytest.raises(L.LattigoError, match="is a plaintext, not a ciphertext"):
        ev.rotate(L.Ciphertext(p, pt.handle), 1)
    with pytest.raises(L.LattigoError, match="no Galois key for a left rotation by 5"):
        ev.rotate(a, 5)
    with pytest.raises(L.LattigoError, match="no Galois key"):
        ev.rotate_hoisted(a, [1, 4])
    with pytest.raises(L.LattigoError, match="level 0"):
        ev.rescale(cl.encrypt(x, level=0))
    with pytest.raises(L.LattigoError, match="level mismatch"):
        ev.add(a, cl.encrypt(x, level=2))
    with pytest.raises(L.LattigoError, match="level mismatch"):
        ev.mul(a, cl.encrypt(x, level=2))
    with pytest.raises(L.LattigoError, match="scale mismatch"):
        ev.sub(a, cl.encrypt(x, level=3, scale=2.0**39))
    with pytest.raises(L.LattigoError, match="cannot go from level 3 to level 4"):
        ev.drop_level(a, 4)
    with pytest.raises(L.LattigoError, match="out of range"):
        cl.encrypt(x, level=9)
    with pytest.raises(L.LattigoError, match="slots"):
        cl.encrypt(np.zeros(p.slots + 1))
    with pytest.raises(L.LattigoError, match="NaN"):
        cl.encrypt(np.full(4, np.nan))
    with pytest.raises(L.LattigoError, match="no bootstrap"):
        ev.bootstrap(a)
    with pytest.raises(L.LattigoError, match="client session"):
        L.Evaluator.rotate(cl, a, 1)  # a client session has no evaluation keys
    # a ciphertext of another parameter set
    other = L.LattigoParams(L.insecure_literal("toy-n10"))
    L.keygen(other, tmp_path / "c", tmp_path / "s", rotations=(1,), bootstrap=False)
    foreign = L.Client(other, tmp_path / "c").encrypt(np.zeros(other.slots))
    with pytest.raises(L.LattigoError, match="another parameter set"):
        ev.add(a, foreign)
    # no relinearisation key
    L.keygen(p, tmp_path / "c2", tmp_path / "s2", rotations=(), relin=False)
    ev2 = L.Evaluator(p, tmp_path / "s2")
    assert not ev2.has_relin and not (tmp_path / "s2" / "relin.key").exists()
    with pytest.raises(L.LattigoError, match="relinearization"):
        ev2.mul(a, a)
    # closed handles
    c = cl.encrypt(x)
    c.close()
    with pytest.raises(L.LattigoError, match="after close"):
        ev.negate(c)
    # a Go panic comes back as an error
    with pytest.raises(L.LattigoError, match="debug_panic: internal error"):
        L.debug_panic()
    # ... and everything still works
    close(cl.decrypt(ev.add(a, a)), 2 * x, FRESH)


def test_handles_are_freed(ring):
    cl, ev = ring["cl"], ring["ev"]
    x = vec(ring)
    before = L.live_handles()
    cts = [ev.rotate(cl.encrypt(x), 1) for _ in range(5)]
    assert L.live_handles() == before + 5
    del cts
    assert L.live_handles() == before
    m = L.go_memory()
    assert m["heap_inuse"] > 0 and m["sys"] >= m["heap_sys"]
    L.free_os_memory()
    old = L.set_gc_percent(50)
    assert L.set_gc_percent(old) == 50
    assert L.set_memory_limit(-1) > 0


def test_missing_library_message(monkeypatch, tmp_path):
    monkeypatch.setattr(L, "_lib", None)
    monkeypatch.setattr(L, "library_path", lambda: tmp_path / L.LIB_NAME)
    with pytest.raises(L.LattigoError, match=r"missing; run `make"):
        L.LattigoParams(L.insecure_literal("toy-n10"))


# ---------------------------------------------------------------- bootstrapping

def test_bootstrap_restores_top_level(btp):
    p, cl, ev = btp["p"], btp["cl"], btp["ev"]
    x = vec(btp)
    for level, scale in ((0, 2.0**40), (1, 2.0**40), (1, float(p.q[1])), (2, float(p.q[2]) * 0.75)):
        ct = cl.encrypt(x, level=level, scale=scale)
        out = ev.bootstrap(ct)
        assert (out.level, out.scale) == (p.bootstrap.output_level, p.default_scale)
        close(cl.decrypt(out), x, BTP)
        assert (ct.level, ct.scale) == (level, scale)  # input untouched
        close(cl.decrypt(ct), x, FRESH)
    # values up to max_abs_value (64 here; measured error 1.2e-5)
    big = vec(btp, p.bootstrap.max_abs_value)
    close(cl.decrypt(ev.bootstrap(cl.encrypt(big, level=1))), big, 1e-4)


def test_slots_to_coeffs_keys_are_made_at_its_level(btp):
    """Galois keys only SlotsToCoeffs uses (it runs at the bottom of the bootstrapping chain) have
    no primes above its starting level: fewer bytes, and the bootstraps above stay exact."""
    p, rep = btp["p"], btp["rep"]
    b = p.bootstrap
    assert 0 < rep["bootstrap_low_keys"] < rep["bootstrap_galois_keys"]
    assert rep["bootstrap_low_level"] == b.output_level + b.stc_depth


def test_bootstrap_level0_bias_is_predicted(btp):
    """At level 0 Lattigo multiplies by an integer and leaves the rounding as a bias."""
    p, cl, ev = btp["p"], btp["cl"], btp["ev"]
    x = btp["rng"].uniform(0.5, 1.0, p.slots)
    s = float(p.q[1])  # not a power of two
    bias = p.bootstrap_bias(0, s)
    assert bias != 0 and abs(bias) < 1e-6 and p.bootstrap_bias(1, s) == 0
    y = cl.decrypt(ev.bootstrap(cl.encrypt(x, level=0, scale=s)))
    assert abs(float(np.median(y / x)) - 1 - bias) < 2e-8
    s0 = p.bootstrap.level0_exact_scale
    assert abs(p.bootstrap_bias(0, s0)) < 1e-15
    y = cl.decrypt(ev.bootstrap(cl.encrypt(x, level=0, scale=s0)))
    assert abs(float(np.median(y / x)) - 1) < 2e-8
    with pytest.raises(L.LattigoError, match="too large"):
        ev.bootstrap(cl.encrypt(x, level=0, scale=2.0**58))


def test_bootstrap_many_agrees(btp):
    p, cl, ev = btp["p"], btp["cl"], btp["ev"]
    xs = [vec(btp) for _ in range(3)]
    cts = [cl.encrypt(x, level=i % 2) for i, x in enumerate(xs)]
    many = ev.bootstrap_many(cts, workers=2)
    assert [(c.level, c.scale) for c in many] == [(p.max_level, p.default_scale)] * 3
    for ct, out, x in zip(cts, many, xs):
        single = cl.decrypt(ev.bootstrap(ct))
        got = cl.decrypt(out)
        close(got, x, BTP)
        close(got, single, 1e-9)  # bootstrapping is deterministic given its input
    assert ev.bootstrap_many([]) == []


def test_sparse_slots_rotate_and_bootstrap(tmp_path):
    """2^7 slots in a ring 2^10 (Lattigo v6.1.1's own Bootstrap gets this wrong; we call Evaluate)."""
    p = L.LattigoParams(dict(L.insecure_literal("toy-n10"), log_slots=7))
    assert (p.slots, p.bootstrap.log_slots) == (128, 7)
    L.keygen(p, tmp_path / "c", tmp_path / "s", rotations=(1, -3))
    cl, ev = L.Client(p, tmp_path / "c"), L.Evaluator(p, tmp_path / "s")
    x = np.random.default_rng(5).uniform(-1, 1, p.slots)
    ct = cl.encrypt(x, level=1)
    for k in (1, -3, 125, 128):
        close(cl.decrypt(ev.rotate(ct, k)), np.roll(x, -k), FRESH)
    for out in (ev.bootstrap(ct), *ev.bootstrap_many([ct, ev.drop_level(ct, 0)], workers=2)):
        assert (out.level, out.scale) == (p.max_level, p.default_scale)
        close(cl.decrypt(out), x, BTP)


def test_mul_plain_acc_adds_products_in_place(ring):
    """acc += ct * pt in place (MulThenAdd) equals the product-then-add path, at every level;
    a wrong scale or level, or acc == ct, raises and leaves acc usable."""
    p, cl, ev = ring["p"], ring["cl"], ring["ev"]
    for level in (p.max_level, 1):
        x, y = vec(ring), vec(ring)
        cx = ev.drop_level(cl.encrypt(x), level)
        cy = ev.drop_level(cl.encrypt(y), level)
        w1, w2 = vec(ring), vec(ring)
        p1, p2 = ev.encode(w1, level), ev.encode(w2, level)
        acc = ev.mul_plain(cx, p1)
        same = ev.mul_plain_acc(acc, cy, p2)
        assert same is acc and acc.level == level and acc.scale == cx.scale * p.default_scale
        close(cl.decrypt(acc), x * w1 + y * w2, 1e-5)
    with pytest.raises(L.LattigoError, match="differ"):
        ev.mul_plain_acc(acc, acc, p2)
    with pytest.raises(L.LattigoError, match="scale mismatch"):
        ev.mul_plain_acc(cx, cy, p2)
    close(cl.decrypt(acc), x * w1 + y * w2, 1e-5)


def test_galois_keys_made_for_a_level_serve_it_and_below_only(ring, tmp_path):
    """A key made for level l (fewer primes, a smaller file) rotates ciphertexts at l and below
    exactly; above l, plain and hoisted rotations raise instead of returning a wrong result."""
    p = ring["p"]
    rep = L.keygen(p, tmp_path / "c", tmp_path / "s", rotations=(1, -3, 4), levels=(1, 1, p.max_level), relin=False)
    assert dict(zip(rep["steps"], rep["levels"])) == {1: 1, p.slots - 3: 1, 4: p.max_level}
    with L.Client(p, tmp_path / "c") as cl, L.Evaluator(p, tmp_path / "s") as ev:
        assert ev.key_levels == {1: 1, p.slots - 3: 1, 4: p.max_level}
        x = vec(ring)
        for level in (0, 1):
            ct = cl.encrypt(x, level=level)
            close(cl.decrypt(ev.rotate(ct, 1)), np.roll(x, -1), FRESH)
            for k, r in zip((1, -3, 4), ev.rotate_hoisted(ct, (1, -3, 4))):
                close(cl.decrypt(r), np.roll(x, -k), FRESH)
        top = cl.encrypt(x)
        close(cl.decrypt(ev.rotate(top, 4)), np.roll(x, -4), FRESH)
        for op in (lambda: ev.rotate(top, 1), lambda: ev.rotate_hoisted(top, (4, -3))):
            with pytest.raises(L.LattigoError, match=f"is made for level 1, the ciphertext is at level {p.max_level}"):
                op()
    # all at the top (the default) against two of three at level 1: a smaller file
    L.keygen(p, tmp_path / "c2", tmp_path / "s2", rotations=(1, -3, 4), relin=False)
    assert (tmp_path / "s" / "galois.key").stat().st_size < (tmp_path / "s2" / "galois.key").stat().st_size
    with pytest.raises(L.LattigoError, match="2 levels for 3 rotations"):
        L.keygen(p, tmp_path / "c3", tmp_path / "s3", rotations=(1, -3, 4), levels=(1, 1))
