"""Tests of backends/seal_ckks.py against real SEAL (tenseal.sealapi) at N=8192."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("tenseal")

try:
    from hecompiler.backends import seal_ckks as S
except ImportError:  # running from a source tree without `pip install -e .`
    _path = pathlib.Path(__file__).resolve().parents[1] / "backends" / "seal_ckks.py"
    _spec = importlib.util.spec_from_file_location("_seal_ckks_under_test", _path)
    S = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = S
    _spec.loader.exec_module(S)

N = 8192
SCALE = 2.0**40
CHAIN = (60, 40, 40, 60)  # 200 bits <= 218; 3 data levels, depth 2
STEPS = (1, -1, 5, -7, 64, 1000)


@pytest.fixture(scope="module")
def env():
    ctx = S.CkksContext(S.CkksParams(N, CHAIN))
    keys = S.KeySet.generate(ctx, galois_steps=STEPS, relin=True)
    client = S.CkksClient(ctx, keys)
    server = S.CkksServer(ctx, keys)
    rng = np.random.default_rng(1234)
    x = rng.uniform(-10, 10, ctx.slot_count)
    ct = client.encrypt(x, SCALE)
    return ctx, keys, client, server, x, ct


def test_chain_and_levels(env):
    ctx, _, _, _, _, ct = env
    assert ctx.slot_count == N // 2
    assert ctx.chain_length == 3 and ctx.max_level == 2 and ctx.depth == 2
    assert [ctx.num_primes(lvl) for lvl in range(3)] == [3, 2, 1]
    assert ctx.level_of(ct) == 0
    # the special prime is last; rescale drops data primes from the back
    assert ctx.all_primes[-1].bit_length() == 60
    assert ctx.prime_at(0) == ctx.primes_at(0)[-1] and ctx.prime_at(0).bit_length() == 40
    assert ctx.prime_at(1) == ctx.primes_at(1)[-1] and ctx.prime_at(1) != ctx.prime_at(0)
    with pytest.raises(ValueError, match="last level"):
        ctx.prime_at(2)
    with pytest.raises(ValueError, match="level=3"):
        ctx.parms_id_at(3)


def test_max_bits_table_matches_seal():
    for bits, table in S.HE_STANDARD_MAX_BITS.items():
        for n, limit in table.items():
            assert S.max_coeff_modulus_bits(n, bits) == limit
    assert S.max_coeff_modulus_bits(8192) == 218
    with pytest.raises(ValueError, match="poly_degree=65536"):
        S.max_coeff_modulus_bits(65536)


def test_round_trip(env):
    _, _, client, _, x, ct = env
    assert np.max(np.abs(client.decrypt(ct) - x)) < 1e-5
    short = client.encrypt([1.5, -2.0, 3.25], SCALE, level=1)
    out = client.decrypt(short)
    assert np.max(np.abs(out[:3] - [1.5, -2.0, 3.25])) < 1e-5
    assert np.max(np.abs(out[3:])) < 1e-5


@pytest.mark.parametrize("k", [1, -1, 5, -7, 64, 1000, 4096 - 1, 0])
def test_rotation_matches_roll(env, k):
    ctx, keys, client, server, x, ct = env
    assert keys.has_rotation(k)
    out = client.decrypt(server.rotate(ct, k))
    assert np.max(np.abs(out - np.roll(x, -k))) < 1e-5


def test_galois_element_formula(env):
    ctx, keys, *_ = env
    for k in STEPS:
        assert keys.galois_keys.has_key(pow(3, k % (N // 2), 2 * N))
        assert S.galois_element(k, N) == pow(3, k % (N // 2), 2 * N)
    assert keys.rotation_steps() == sorted({k % (N // 2) for k in STEPS})


def test_missing_rotation_key(env):
    _, _, _, server, _, ct = env
    with pytest.raises(ValueError, match=r"no Galois key for rotation step 2\b"):
        server.rotate(ct, 2)
    bare = S.CkksServer(env[0], S.KeySet(env[0]))
    with pytest.raises(ValueError, match="no Galois key"):
        bare.rotate(ct, 1)


def test_multiply_plain_rescale_keeps_scale_exactly(env):
    ctx, _, client, server, x, ct = env
    w = np.linspace(-1, 1, ctx.slot_count)
    cur, expect = ct, x
    for level in range(ctx.max_level):
        pt = server.encode(w, ctx.exact_plain_scale(level), level)
        cur = server.rescale(server.multiply_plain(cur, pt))
        expect = expect * w
        assert cur.scale == SCALE  # bit-identical, not approximately
        assert ctx.level_of(cur) == level + 1
        assert np.max(np.abs(client.decrypt(cur) - expect)) < 1e-4
    with pytest.raises(ValueError, match="last level"):
        server.rescale(cur)


def test_multiply_plain_accumulate_adds_in_place(env):
    """acc += ct * pt in place equals the product added to acc, and an accumulator at another
    scale or level is refused by name."""
    ctx, _, client, server, x, ct = env
    w = np.linspace(-1, 1, ctx.slot_count)
    pt = server.encode(w, SCALE, 0)
    acc = server.multiply_plain(ct, pt)
    again = server.multiply_plain_accumulate(acc, ct, pt)
    assert again is acc and ctx.level_of(acc) == 0
    np.testing.assert_allclose(client.decrypt(server.rescale(acc)), 2 * x * w, atol=1e-4)
    with pytest.raises(ValueError, match="accumulator vs product scale"):
        server.multiply_plain_accumulate(client.encrypt(x, SCALE), ct, pt)
    low = server.mod_switch(server.multiply_plain(ct, pt), 1)
    with pytest.raises(ValueError, match="accumulator is at level 1, the product at level 0"):
        server.multiply_plain_accumulate(low, ct, pt)


def test_rescaled_scale_predicts_seal(env):
    ctx, _, _, server, _, ct = env
    pt = server.encode_constant(0.5, SCALE, 0)
    out = server.rescale(server.multiply_plain(ct, pt))
    assert out.scale == ctx.rescaled_scale(SCALE * SCALE, 0)
    assert out.scale != SCALE


def test_ct_ct_multiply(env):
    ctx, _, client, server, x, ct = env
    sq = server.multiply(ct, ct)
    assert sq.size() == 3
    with pytest.raises(ValueError, match="relinearize"):
        server.rotate(sq, 1)
    out = server.rescale(server.relinearize(sq))
    assert out.size() == 2 and ctx.level_of(out) == 1
    assert out.scale == ctx.rescaled_scale(SCALE * SCALE, 0)
    assert np.max(np.abs(client.decrypt(out) - x * x)) < 1e-3
    # re-labelling the scale to exactly 2^40 costs only ~|2^40/q - 1| relative error
    server.set_scale(out, SCALE)
    assert out.scale == SCALE
    assert np.max(np.abs(client.decrypt(out) - x * x)) < 1e-3 + 100 * abs(SCALE / ctx.prime_at(0) - 1)


def test_add_sub_negate_plain_ops(env):
    ctx, _, client, server, x, ct = env
    assert np.max(np.abs(client.decrypt(server.add(ct, ct)) - 2 * x)) < 1e-5
    assert np.max(np.abs(client.decrypt(server.negate(ct)) + x)) < 1e-5
    y = np.arange(ctx.slot_count) / ctx.slot_count
    pt = server.encode(y, SCALE, 0)
    assert np.max(np.abs(client.decrypt(server.add_plain(ct, pt)) - (x + y))) < 1e-5
    assert np.max(np.abs(client.decrypt(server.sub_plain(ct, pt)) - (x - y))) < 1e-5
    c2 = client.encrypt(y, SCALE)
    assert np.max(np.abs(client.decrypt(server.sub(ct, c2)) - (x - y))) < 1e-5


def test_mod_switch(env):
    ctx, _, client, server, x, ct = env
    low = server.mod_switch(ct, 2)
    assert ctx.level_of(low) == 2 and low.scale == ct.scale
    assert np.max(np.abs(client.decrypt(low) - x)) < 1e-5
    assert ctx.level_of(server.mod_switch(ct, 0)) == 0
    with pytest.raises(ValueError, match="cannot go up"):
        server.mod_switch(low, 1)
    pt = server.mod_switch_plain(server.encode(x, SCALE, 0), 1)
    assert ctx.level_of(pt) == 1


def test_misuse_raises_clear_errors(env):
    ctx, _, client, server, x, ct = env
    low = server.mod_switch(ct, 1)
    with pytest.raises(ValueError, match="different levels"):
        server.add(ct, low)
    other = ctx.copy(ct)
    server.set_scale(other, 2.0**30)
    with pytest.raises(ValueError, match="scale mismatch"):
        server.add(ct, other)
    with pytest.raises(ValueError, match="level 0 but plaintext at level 1"):
        server.multiply_plain(ct, server.encode(x, SCALE, 1))
    with pytest.raises(ValueError, match="all zeros"):
        server.multiply_plain(ct, server.encode(np.zeros(4), SCALE, 0))
    with pytest.raises(ValueError, match="does not fit"):
        server.multiply_plain(ct, server.encode(x, 2.0**120, 0))
    with pytest.raises(ValueError, match="does not fit"):
        server.encode(x, 2.0**200, 0)
    with pytest.raises(ValueError, match="do not fit 4096 slots"):
        server.encode(np.zeros(4097), SCALE)
    with pytest.raises(ValueError, match="not finite"):
        server.encode([1.0, float("nan")], SCALE)
    with pytest.raises(ValueError, match="must be finite"):
        server.set_scale(other, -1.0)
    with pytest.raises(ValueError, match="no relinearization keys"):
        S.CkksServer(ctx, S.KeySet(ctx)).relinearize(server.multiply(ct, ct))
    assert ct.scale == SCALE  # nothing above touched the operand


def test_serialization_round_trips(env):
    ctx, keys, client, server, x, ct = env
    ct2 = ctx.ciphertext_from_bytes(ctx.to_bytes(ct))
    assert ct2.scale == ct.scale and ctx.level_of(ct2) == 0
    assert np.max(np.abs(client.decrypt(ct2) - x)) < 1e-5
    low = server.rescale(server.multiply_plain(ct, server.encode_constant(1.0, ctx.exact_plain_scale(0), 0)))
    low2 = ctx.ciphertext_from_bytes(ctx.to_bytes(low))
    assert ctx.level_of(low2) == 1 and low2.scale == SCALE
    pt = server.encode(x, SCALE, 1)
    pt2 = ctx.plaintext_from_bytes(ctx.to_bytes(pt))
    assert ctx.level_of(pt2) == 1 and np.max(np.abs(ctx.decode(pt2) - x)) < 1e-6

    blob = keys.to_bytes_dict(include_secret=True)
    assert set(blob) == {"secret_key", "public_key", "relin_keys", "galois_keys"}
    assert "secret_key" not in keys.to_bytes_dict()
    keys2 = S.KeySet.from_bytes_dict(ctx, blob)
    assert keys2.rotation_steps() == keys.rotation_steps()
    client2 = S.CkksClient(ctx, keys2)
    server2 = S.CkksServer(ctx, keys2)
    assert server2.keys.secret_key is None
    # loaded keys interoperate with the originals in both directions
    assert np.max(np.abs(client2.decrypt(server2.rotate(ct, 5)) - np.roll(x, -5))) < 1e-5
    sq = server2.rescale(server2.relinearize(server2.multiply(ct, ct)))
    assert np.max(np.abs(client.decrypt(sq) - x * x)) < 1e-3
    assert np.max(np.abs(client.decrypt(client2.encrypt(x, SCALE)) - x)) < 1e-5


def test_serialization_errors(env):
    ctx, keys, client, server, x, ct = env
    data = ctx.to_bytes(ct)
    for cut in (len(data) - 1, len(data) // 2, 50, 41, 10, 0):
        with pytest.raises(ValueError, match="truncated|bad magic"):
            ctx.ciphertext_from_bytes(data[:cut])
    with pytest.raises(ValueError, match="trailing"):
        ctx.ciphertext_from_bytes(data + b"\0")
    corrupt = bytearray(data)
    corrupt[200:260] = bytes(60)
    corrupt[5000:5100] = b"\xff" * 100
    with pytest.raises(ValueError, match="corrupt|invalid"):
        ctx.ciphertext_from_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="hold a ciphertext, not a galois_keys"):
        ctx.from_bytes("galois_keys", data)
    with pytest.raises(ValueError, match="bad magic"):
        ctx.ciphertext_from_bytes(b"not a SEAL object at all")

    other = S.CkksContext(S.CkksParams(N, (60, 40, 60)))
    with pytest.raises(ValueError, match="different encryption parameters"):
        other.ciphertext_from_bytes(data)
    with pytest.raises(ValueError, match="different encryption parameters"):
        other.from_bytes("galois_keys", ctx.to_bytes(keys.galois_keys))
    # raw SEAL bytes (no envelope) are still checked by SEAL against the parameters
    raw = data[44:]
    assert ctx.level_of(ctx.ciphertext_from_bytes(raw)) == 0
    with pytest.raises(ValueError, match="different encryption parameters"):
        other.ciphertext_from_bytes(raw)
    # in-memory objects from another context are rejected before SEAL sees them
    okeys = S.KeySet.generate(other, [1])
    oct_ = S.CkksClient(other, okeys).encrypt(x, SCALE)
    with pytest.raises(ValueError, match="different encryption parameters"):
        server.add(ct, oct_)
    with pytest.raises(ValueError, match="different encryption parameters"):
        client.decrypt(oct_)
    with pytest.raises(ValueError, match="different encryption parameters"):
        S.CkksServer(ctx, okeys)
    with pytest.raises(ValueError, match="KeySet.galois_keys"):
        S.KeySet(ctx, galois_keys=okeys.galois_keys)


def test_params_validation_and_dict():
    with pytest.raises(ValueError, match="coeff_bits") as exc:
        S.CkksParams(N, (60, 40, 40, 40, 60)).validate()  # 240 > 218
    assert "218" in str(exc.value)
    with pytest.raises(ValueError, match="coeff_bits"):
        S.CkksContext(S.CkksParams(N, (60, 50, 50, 60)))
    S.CkksParams(N, (60, 40, 40, 40, 60), security="none").validate()  # explicitly insecure
    with pytest.raises(ValueError, match="poly_degree"):
        S.CkksParams(6000, (60, 40, 60)).validate()
    with pytest.raises(ValueError, match="poly_degree"):
        S.CkksParams(2048, (27,)).validate()
    with pytest.raises(ValueError, match="poly_degree=65536"):
        S.CkksParams(65536, (60, 40, 60)).validate()
    with pytest.raises(ValueError, match=r"coeff_bits\[1\]=61"):
        S.CkksParams(N, (60, 61, 60)).validate()
    with pytest.raises(ValueError, match="security"):
        S.CkksParams(N, (60, 40, 60), security="tc100").validate()
    p = S.CkksParams(N, [60, 40, 40, 60])
    assert p.coeff_bits == CHAIN and hash(p)
    d = p.to_dict()
    import json

    assert S.CkksParams.from_dict(json.loads(json.dumps(d))) == p
    with pytest.raises(ValueError, match="unknown field"):
        S.CkksParams.from_dict({**d, "scale": 40})
    with pytest.raises(ValueError, match="coeff_bits: missing"):
        S.CkksParams.from_dict({"poly_degree": N})
    assert S.CkksParams.for_depth(N, 2) == p


def test_lazy_rotation_keys_and_reencrypt(env):
    ctx, keys, client, server, x, ct = env
    more = keys.with_rotations([2, -3])
    assert more.rotation_steps() == sorted(set(keys.rotation_steps()) | {2, ctx.slot_count - 3})
    server2 = S.CkksServer(ctx, more)
    assert np.max(np.abs(client.decrypt(server2.rotate(ct, -3)) - np.roll(x, 3))) < 1e-5
    with pytest.raises(ValueError, match="secret key"):
        keys.without_secret().with_rotations([4])
    # client-aided refresh: a level-2 ciphertext comes back fresh at level 0, same scale
    low = server.mod_switch(ct, 2)
    fresh = client.reencrypt(low)
    assert ctx.level_of(fresh) == 0 and fresh.scale == low.scale
    assert np.max(np.abs(client.decrypt(fresh) - x)) < 1e-5
