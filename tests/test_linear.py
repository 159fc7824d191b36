"""Linear ops on packed slots: diagonal keys (structured == enumerated), diagonal
values and the BSGS schedule reproduce the tensor-space matrix exactly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hecompiler import linear as L
from hecompiler.errors import HecError
from hecompiler.heprog import LinearOp
from hecompiler.layout import Layout
from hecompiler.plaintexts import rot


def _random_conv(rng, small_slots=True, polyphase=False):
    """A random conv and its layouts: compact in, strided out (gapped or multiplexed); with
    ``polyphase``, the input in phases k_in of 2 or 4 and the output in phase k_in / stride when
    that divides it (else phase 1, whose diagonals depend on the position)."""
    while True:
        C, M = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        kin = int(rng.choice([2, 4])) if polyphase else 1
        H, W = (int(rng.integers(1, 5)) * kin, int(rng.integers(1, 5)) * kin) if polyphase else \
            (int(rng.integers(3, 16)), int(rng.integers(3, 16)))
        k = int(rng.choice([1, 3, 5]))
        s = int(rng.choice([1, 2, 3]))
        pd = int(rng.integers(0, k))
        dil = int(rng.choice([1, 2]))
        group = C if (C == M and rng.random() < 0.3) else 1
        OH = (H + 2 * pd - dil * (k - 1) - 1) // s + 1
        OW = (W + 2 * pd - dil * (k - 1) - 1) // s + 1
        if OH >= 1 and OW >= 1:
            break
    S = int(rng.choice([8, 16, 64, 256] if small_slots else [1024, 4096]))
    if polyphase:
        kout = kin // s if kin % s == 0 else 1
        kout = kout if OH % kout == 0 and OW % kout == 0 else 1
        pow2 = bool(rng.random() < 0.5)
        lin_in, lout = Layout.polyphase((C, H, W), S, kin, pow2), Layout.polyphase((M, OH, OW), S, kout, pow2)
    else:
        lin_in = Layout.compact((C, H, W), S)
        lout = lin_in.strided((M, OH, OW), s, bool(rng.random() < 0.7))
    w = rng.standard_normal((M, C // group, k, k))
    w[rng.random(w.shape) < 0.2] = 0
    lin = LinearOp("conv", 0, 1, (C, H, W), (M, OH, OW),
                   {"weight": "w", "strides": [s, s], "pads": [pd] * 4, "dilations": [dil, dil], "group": group})
    return lin, {"w": w}, lin_in, lout


def _enumerated_keys(lin, ws, lin_in, lout):
    j, i, d, _, _ = L._slot_entries(lin, ws, lin_in, lout)
    out = {}
    for jj, ii, dd in set(zip(j.tolist(), i.tolist(), d.tolist())):
        out.setdefault((jj, ii), set()).add(dd)
    return out


@pytest.mark.parametrize("seed,polyphase", [(s, False) for s in range(6)] + [(s, True) for s in range(4)])
def test_structured_keys_equal_enumerated_keys(seed, polyphase):
    """Including layouts whose channels span several ciphertexts (tiny slot counts), and
    polyphase layouts (a stride-s conv from phase k to phase k/s is a stride-1 conv of the
    virtual channels)."""
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(60):
        lin, ws, lin_in, lout = _random_conv(rng, polyphase=polyphase)
        if not L._structured_ok(lin, lin_in, lout):
            continue  # e.g. a stride that does not fit the grid: the lowering enumerates instead
        got = {k: set(v.tolist()) for k, v in L._structured_keys(lin, ws, lin_in, lout).items()}
        assert got == _enumerated_keys(lin, ws, lin_in, lout), (lin.params, lin.in_shape, lin.out_shape, lin_in.slots)
        checked += 1
    assert checked >= 20


def _apply_plan(plan, diags, x_cts, n_out, S):
    """Evaluate the BSGS schedule on plain slot vectors, as the backends do."""
    baby = {(i, b): rot(x_cts[i], b) for i, bs in plan.baby.items() for b in bs}
    out = np.zeros((n_out, S))
    for j, gs in plan.giant.items():
        for g, terms in gs.items():
            acc = sum(rot(diags[(j, i, d)], -g) * baby[(i, b)] for (i, b, d) in terms)
            out[j] += rot(acc, g)
    return out


@pytest.mark.parametrize("seed,polyphase", [(s, False) for s in range(4)] + [(s, True) for s in range(3)])
def test_bsgs_schedule_computes_the_matrix(seed, polyphase):
    rng = np.random.default_rng(100 + seed)
    for _ in range(15):
        lin, ws, lin_in, lout = _random_conv(rng, polyphase=polyphase)
        x = rng.standard_normal(lin.in_shape)
        keys = L.diag_keys(lin, ws, lin_in, lout)
        plan = L.plan_bsgs(keys, lin_in.slots)
        diags = L.diagonals(lin, ws, lin_in, lout)
        assert set(diags) == {(j, i, int(d)) for (j, i), ds in keys.items() for d in ds}
        y = _apply_plan(plan, diags, lin_in.pack(x), lout.n_ct, lin_in.slots)
        ref = (L.tensor_matrix(lin, ws) @ x.reshape(-1)).reshape(lin.out_shape)
        np.testing.assert_allclose(lout.unpack(y), ref, atol=1e-9)
        # slots outside the output layout stay exactly zero
        mask = np.ones(lout.n_ct * lout.slots, bool)
        mask[lout.positions] = False
        assert not np.any(y.reshape(-1)[mask])


@pytest.mark.parametrize("seed", range(4))
def test_one_output_ciphertext_at_a_time_equals_the_whole(seed):
    """The backends build one output ciphertext's diagonals at a time (rows_subset): the same
    values as the whole op's, for convs and pools whose channels straddle ciphertexts."""
    rng = np.random.default_rng(200 + seed)
    for n in range(12):
        lin, ws, lin_in, lout = _random_conv(rng)
        if n % 3 == 2:  # an average pool of the same kernel, stride and padding
            C, H, W = lin.in_shape
            k, s, pd = ws["w"].shape[-1], lin.params["strides"][0], lin.params["pads"][0]
            out = (C, (H + 2 * pd - k) // s + 1, (W + 2 * pd - k) // s + 1)
            if min(out[1:]) < 1:
                continue
            lin = LinearOp("pool", 0, 1, lin.in_shape, out, {"kernel": [k, k], "strides": [s, s], "pads": [pd] * 4,
                                                             "count_include_pad": int(rng.integers(0, 2))})
            lout = lin_in.strided(out, s, False)
        whole = L.diagonals(lin, ws, lin_in, lout)
        full = L.tensor_matrix(lin, ws).toarray()
        for j in range(lout.n_ct):
            rows = np.flatnonzero(lout.positions // lin_in.slots == j)
            part = L.tensor_matrix(lin, ws, rows).toarray()
            np.testing.assert_array_equal(part[rows], full[rows])
            assert not np.any(np.delete(part, rows, axis=0))
            got = L.diagonals(lin, ws, lin_in, lout, j)
            assert got.keys() == {k for k in whole if k[0] == j}
            for key, v in got.items():
                np.testing.assert_allclose(v, whole[key], atol=1e-12)


def test_bsgs_rotations_near_the_bound_for_dense_convs():
    """A 16->16 3x3 conv on 32x32 in 4096-slot ciphertexts: rotations within
    1.5x of 2*sqrt(#diagonals)."""
    rng = np.random.default_rng(0)
    lin_in = Layout.compact((16, 32, 32), 4096)
    w = rng.standard_normal((16, 16, 3, 3))
    lin = LinearOp("conv", 0, 0, (16, 32, 32), (16, 32, 32),
                   {"weight": "w", "strides": [1, 1], "pads": [1] * 4, "dilations": [1, 1], "group": 1})
    keys = L.diag_keys(lin, {"w": w}, lin_in, lin_in)
    plan = L.plan_bsgs(keys, 4096)
    assert plan.n_diagonals == 4 * 4 * 36  # 16 blocks, 4 channel offsets x 9 taps each... dense packing
    assert plan.rotations <= 1.5 * 2 * np.sqrt(plan.n_diagonals)


def test_layout_pack_unpack_and_multiplexing():
    lay = Layout.compact((16, 32, 32), 8192)
    b = lay.strided((32, 16, 16), 2)
    assert b.kind == "multiplexed" and b.n_ct == 1 and b.density == 1.0
    x = np.random.default_rng(1).standard_normal((32, 16, 16))
    np.testing.assert_array_equal(b.unpack(b.pack(x)), x)
    assert Layout.from_dict(b.to_dict()) == b


@pytest.mark.parametrize("polyphase", [False, True])
def test_diagonal_signatures_find_the_identical_plaintexts(polyphase):
    """Equal signatures are equal diagonals, and the encodings a plan needs when identical
    plaintexts share one (plaintext_encodings) are never fewer than the distinct slot vectors its
    products use (more only where a diagonal repeats within its ciphertext, so that two giant
    steps turn two diagonals into one vector: the count is then an upper bound)."""
    rng = np.random.default_rng(5)
    checked = exact = shared = 0
    for _ in range(80):
        lin, ws, lin_in, lout = _random_conv(rng, polyphase=polyphase)
        sigs = L.diag_signatures(lin, ws, lin_in, lout)
        if sigs is None:  # not structured, or a channel spans ciphertexts: every product its own
            continue
        diags = L.diagonals(lin, ws, lin_in, lout)
        assert set(sigs) == set(diags)
        first: dict[int, np.ndarray] = {}
        for k, v in diags.items():
            np.testing.assert_array_equal(first.setdefault(sigs[k], v), v)
        plan = L.plan_bsgs(L.diag_keys(lin, ws, lin_in, lout), lin_in.slots)
        S = lin_in.slots
        vectors = {(rot(diags[(j, i, d)], -g % S) + 0.0).tobytes()
                   for j, gs in plan.giant.items() for g, terms in gs.items() for (i, _b, d) in terms}
        order = L.sharing_order(plan, sigs, lout)
        assert not order or sorted(order) == list(range(lout.n_ct))
        enc, got, made = L.plaintext_encodings(plan, sigs, order, 10**9)
        assert enc == got and len(vectors) <= got <= plan.n_diagonals
        # an output ciphertext not made uses only plaintexts an earlier one made
        seen: set = set()
        for j in order or sorted(plan.giant):
            uses = {(rot(diags[(j, i, d)], -g % S) + 0.0).tobytes() for g, terms in plan.giant[j].items()
                    for (i, _b, d) in terms}
            assert j in made or uses <= seen
            seen |= uses
        # a smaller op-local tier (least recently used out first) encodes some again
        small = L.plaintext_encodings(plan, sigs, order, 2)[0]
        assert got <= small <= plan.n_diagonals and L.plaintext_encodings(plan, sigs, order, 0)[0] == plan.n_diagonals
        checked += 1
        exact += got == len(vectors)
        shared += got < plan.n_diagonals
    if polyphase:  # a phase whose taps stay inside the virtual grid repeats another's diagonals
        assert checked >= 25 and exact >= 0.8 * checked and shared >= 5, (checked, exact, shared)
    else:  # every output ciphertext holds other channels: nothing to share
        assert checked >= 15 and exact == checked and shared == 0, (checked, exact, shared)


@pytest.mark.parametrize("polyphase", [False, True])
def test_matrix_entries_are_the_multiply_accumulates(polyphase):
    """The entries counted from a structured op's terms are its matrix's non-zeros (what making
    its diagonals costs)."""
    rng = np.random.default_rng(9)
    checked = 0
    for _ in range(40):
        lin, ws, lin_in, lout = _random_conv(rng, polyphase=polyphase)
        got = L.matrix_entries(lin, ws, lin_in, lout)
        if got is None:
            continue
        m = L.tensor_matrix(lin, ws).tocoo()
        assert got.sum() == m.nnz
        if not (lin_in.channel_straddles or lout.channel_straddles):  # per output ciphertext
            per_ct = np.bincount(lout.positions[m.row] // lin_in.slots, minlength=lout.n_ct)
            np.testing.assert_array_equal(got, per_ct)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("group", [1, 2])
def test_a_convs_gain_from_its_weights_is_its_matrix_row_sum(group):
    """op_gain reads a conv's gain off its weights; with outputs that see every tap it equals
    the largest absolute row sum of the op's matrix."""
    w = np.random.default_rng(1).normal(0, 1, (4, 4 // group, 3, 3))
    lin = LinearOp("conv", 0, 1, (4, 8, 8), (4, 8, 8),
                   {"weight": "w", "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": group},
                   mult=-0.5)
    exact = float(abs(L.tensor_matrix(lin, {"w": w})).sum(axis=1).max())
    assert L.op_gain(lin, {"w": w}) == pytest.approx(exact, rel=1e-12)


def test_distinct_is_np_unique():
    from hecompiler.arrays import distinct

    rng = np.random.default_rng(3)
    for a in (rng.integers(0, 50, 1000), rng.integers(-(1 << 40), 1 << 40, 5000), np.array([], np.int64),
              np.array([7]), rng.integers(0, 9, (30, 4)), rng.normal(size=100).round(1)):
        got = distinct(a)
        assert got.dtype == np.unique(a).dtype and np.array_equal(got, np.unique(a))


def _replicated_conv(rng):
    """A random conv between replicated layouts (:meth:`Layout.replicated`): the input and the
    output each in one ciphertext, repeated every power of two that holds it, the output's period
    at least the input's (a more replicated output is a copy after the op: hecompiler.lower)."""
    while True:
        lin, ws, lin_in, lout = _random_conv(rng, small_slots=False)
        ri, ro = lin_in.replicated(), lout.replicated()
        if ri.period and ro.n_ct == 1 and ro.cyc >= ri.cyc:
            return lin, ws, ri, ro


@pytest.mark.parametrize("seed", range(4))
def test_replicated_layouts_take_diagonals_mod_their_period(seed):
    """Every slot of the result, the copies included, is the tensor packed in the output layout;
    the diagonals are those of the period (structured == enumerated), their steps signed within
    half the period, and never more than without replication."""
    rng = np.random.default_rng(300 + seed)
    for _ in range(12):
        lin, ws, ri, ro = _replicated_conv(rng)
        keys = L.diag_keys(lin, ws, ri, ro)
        if L._structured_ok(lin, ri, ro):
            got = {k: set(v.tolist()) for k, v in keys.items()}
            assert got == _enumerated_keys(lin, ws, ri, ro)
        S, C = ri.slots, ro.cyc
        signed = [d - S if d > S // 2 else d for ds in keys.values() for d in ds.tolist()]
        assert all(-C // 2 < d <= C // 2 for d in signed), (C, signed)
        plain = L.diag_keys(lin, ws, replace(ri, period=0), replace(ro, period=0))
        assert sum(map(len, keys.values())) <= sum(map(len, plain.values()))
        x = rng.standard_normal(lin.in_shape)
        diags = L.diagonals(lin, ws, ri, ro)
        assert set(diags) == {(j, i, int(d)) for (j, i), ds in keys.items() for d in ds}
        y = _apply_plan(L.plan_bsgs(keys, S), diags, ri.pack(x), ro.n_ct, S)
        ref = (L.tensor_matrix(lin, ws) @ x.reshape(-1)).reshape(lin.out_shape)
        np.testing.assert_allclose(y, ro.pack(ref), atol=1e-9)


def test_a_full_period_folds_the_channel_offsets():
    """4 channels of 8x8 fill a period of 256 in 1024 slots: a 3x3 conv's channel offsets -3..3
    fold to 4 residues mod 256, so 4 x 9 diagonals instead of 7 x 9, and the BSGS plan rotates less."""
    lay = Layout.compact((4, 8, 8), 1024)
    rep = lay.replicated()
    assert rep.period == 256
    lin = LinearOp("conv", 0, 1, (4, 8, 8), (4, 8, 8), {"weight": "w", "strides": [1, 1], "pads": [1] * 4})
    ws = {"w": np.random.default_rng(7).standard_normal((4, 4, 3, 3))}
    full, folded = L.diag_keys(lin, ws, lay, lay), L.diag_keys(lin, ws, rep, rep)
    assert (sum(map(len, full.values())), sum(map(len, folded.values()))) == (63, 36)
    assert L.plan_bsgs(folded, 1024).rotations < L.plan_bsgs(full, 1024).rotations


def test_replicated_layout_packs_copies_and_refuses_a_bad_period():
    lay = Layout.compact((3, 5, 5), 256).replicated()
    assert (lay.period, lay.cyc) == (128, 128) and "2x replicated" in lay.describe()
    x = np.arange(75, dtype=np.float64).reshape(3, 5, 5) + 1
    v = lay.pack(x)[0]
    np.testing.assert_array_equal(v[:128], v[128:])
    np.testing.assert_array_equal(lay.unpack(lay.pack(x)), x)
    assert Layout.from_dict(lay.to_dict()) == lay
    assert Layout.compact((4, 8, 8), 256).replicated().period == 0  # fills its ciphertext
    assert Layout.compact((4, 8, 8), 128).replicated().period == 0  # two ciphertexts
    for period, msg in ((96, "must be a power of two"), (64, "reach past its period 64")):
        with pytest.raises(HecError, match=msg):
            replace(lay, period=period).check()
    with pytest.raises(HecError, match="the output repeats every 128 slots, the input every 256"):
        lin = LinearOp("conv", 0, 1, (3, 5, 5), (3, 5, 5), {"weight": "w", "strides": [1, 1], "pads": [1] * 4})
        L.diag_keys(lin, {"w": np.ones((3, 3, 3, 3))}, replace(lay, period=0), lay)
