"""backends/seal.py: the HE program under real CKKS encryption (SEAL), in one process and as
separate client/server steps through files.  Tiny ring (N=8192, 2 levels) so the tiny
ResNet needs several client-aided refreshes."""

from __future__ import annotations

import copy
import dataclasses
import struct

import numpy as np

from hecompiler.executor import total_work
import pytest

sealapi = pytest.importorskip("tenseal.sealapi")

from hecompiler.backends import seal as SB  # noqa: E402
from hecompiler.backends.sim import Simulator  # noqa: E402
from hecompiler.heprog import Params  # noqa: E402
from hecompiler.lower import LoweringOptions, lower  # noqa: E402

from conftest import seal_tiny  # noqa: E402

N, BITS = 8192, (60, 40, 40, 60)  # small ring: fast; forces refreshes (the network needs ~11 levels)


@pytest.fixture(scope="module")
def tiny():
    return seal_tiny(7, N, BITS)


@pytest.fixture(scope="module")
def encrypted(tiny):
    ticks = []
    outs, st = SB.run_encrypted(tiny.prog, tiny.feeds, progress=ticks.append)
    st.progress_ticks = sum(ticks)
    return outs, st


@pytest.fixture(scope="module")
def keydirs(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    client = SB.client_keygen(tiny.prog, d / "client", d / "server")
    return client, d / "client", d / "server"


def _close(got, ref, tol=1e-3):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err <= tol * np.ptp(ref), (err, np.ptp(ref))
    assert np.argmax(got) == np.argmax(ref)


def test_program_needs_refreshes(tiny):
    counts = tiny.prog.op_counts()
    assert counts.get("refresh", 0) >= 2 and tiny.prog.needs_relin and tiny.prog.galois_steps


def test_encrypted_matches_reference_and_simulator(tiny, encrypted):
    outs, _ = encrypted
    (name,) = [o.name for o in tiny.prog.outputs]
    _close(outs[name], tiny.ref)
    sim, _ = Simulator(tiny.prog).run(tiny.feeds)
    _close(outs[name], sim[name])


def test_stats(tiny, encrypted):
    _, st = encrypted
    prog = tiny.prog
    assert st.op_counts == prog.op_counts()
    assert st.refreshes == prog.op_counts()["refresh"] == st.refresh_round_trips
    assert set(st.phases) == {"keygen", "encrypt", "eval", "decrypt", "total"}
    assert st.phases["total"] >= st.phases["eval"] > 0
    assert st.galois_keys == len(prog.galois_steps) and st.galois_key_bytes > 0
    assert st.peak_live_ciphertexts >= 2
    # the process held the keys (their in-memory size is a formula) and the interpreter with SEAL
    assert st.peak_rss_bytes > st.galois_key_bytes + st.relin_key_bytes + 100 * 2**20
    # every plaintext operand is encoded once or served by the executor's cache (identical vectors)
    assert st.plaintexts + st.plaintexts_reused == prog.op_counts()["mul_plain"] + prog.op_counts()["add_plain"]
    assert st.plaintexts_reused < st.plaintexts
    assert "rotate" in st.format()
    assert st.progress_ticks == total_work(prog)  # progress counts primitive ops, not instructions


def test_server_never_holds_the_secret_key(tiny, keydirs):
    client, cdir, sdir = keydirs
    with pytest.raises(SB.BackendError, match="secret key"):
        SB.SealServer(tiny.prog, client.keys)
    server = SB.SealServer(tiny.prog, client.public_keys())
    assert not server.has_secret_key
    assert not (sdir / "secret.key").exists() and (cdir / "secret.key").exists()
    assert {p.name for p in sdir.iterdir()} == {"keys.json", "public.key", "relin.key", "galois.key"}
    assert {p.name for p in cdir.iterdir()} == {"keys.json", "public.key", "secret.key"}
    assert SB.read_keys(tiny.prog, sdir, secret=False).secret_key is None
    with pytest.raises(SB.BackendError, match="no secret.key"):
        SB.read_keys(tiny.prog, sdir, secret=True)
    with pytest.raises(SB.BackendError, match="holds a secret.key"):
        SB.write_keys(tiny.prog, client.public_keys(), cdir, include_secret=False)


def test_keys_for_another_program_are_refused(tiny, keydirs):
    _, cdir, sdir = keydirs
    other, _ = lower(tiny.g, Params(N, BITS, 40), tiny.primes, LoweringOptions(layout="gapped"))
    assert SB.program_sha256(other) != SB.program_sha256(tiny.prog)
    with pytest.raises(SB.BackendError, match="another program"):
        SB.read_keys(other, sdir, secret=False)
    with pytest.raises(SB.BackendError, match="another program"):
        SB.client_encrypt(other, cdir, tiny.feeds)
    inputs = SB.client_encrypt(tiny.prog, cdir, tiny.feeds)
    with pytest.raises(SB.BackendError, match="another program"):
        SB.server_start(other, sdir, inputs)


def test_primes_must_match_the_context(tiny):
    bad = dataclasses.replace(tiny.prog, primes=tiny.prog.primes[:-1] + (tiny.prog.primes[-1] + 2 * N,))
    with pytest.raises(SB.BackendError, match="primes differ"):
        SB.make_context(bad)


def test_corrupt_bundles_are_refused(tiny, keydirs, tmp_path):
    _, cdir, sdir = keydirs
    b = SB.client_encrypt(tiny.prog, cdir, tiny.feeds)
    path = tmp_path / "in.bundle"
    b.save(path)
    data = bytearray(path.read_bytes())
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    (tmp_path / "flip.bundle").write_bytes(bytes(flipped))
    with pytest.raises(SB.BackendError, match="sha256 mismatch"):
        SB.server_start(tiny.prog, sdir, tmp_path / "flip.bundle")
    (tmp_path / "trunc.bundle").write_bytes(bytes(data[:-1000]))
    with pytest.raises(SB.BackendError, match="corrupt or truncated"):
        SB.Bundle.load(tmp_path / "trunc.bundle")
    # a damaged ciphertext inside a well-formed bundle: the wrapper's checksum catches it
    name = next(iter(b.items))
    ct = bytearray(b.items[name])
    ct[len(ct) // 2] ^= 0x01
    bad = SB.Bundle(b.kind, b.program_sha256, b.params_fingerprint, b.key_set, b.meta, {name: bytes(ct)})
    bad = SB.Bundle.from_bytes(bad.to_bytes())
    with pytest.raises(SB.BackendError, match="checksum"):
        SB.server_start(tiny.prog, sdir, bad)
    with pytest.raises(SB.BackendError, match="expected a state bundle"):
        SB.server_step(tiny.prog, sdir, b)
    assert struct.unpack_from("<Q", data, 8)[0] < len(data)  # header length field sanity


def test_plan_mismatch_fails_loudly(tiny, keydirs):
    client, _, _ = keydirs
    prog = copy.deepcopy(tiny.prog)
    k = next(i for i, ins in enumerate(prog.instrs) if ins.op == "rescale")
    prog.instrs[k].scale *= 1 + 1e-6
    server = SB.SealServer(prog, client.public_keys())
    cts = SB.SealClient(prog, client.keys).encrypt_inputs(tiny.feeds)
    with pytest.raises(SB.BackendError, match=rf"instruction {k} \(rescale.*the plan says"):
        server.run(cts, client.refresh)
    prog = copy.deepcopy(tiny.prog)
    j = next(i for i, ins in enumerate(prog.instrs) if ins.op == "rotate")
    prog.instrs[j].level -= 1
    with pytest.raises(SB.BackendError, match=rf"instruction {j} \(rotate.*plans level"):
        SB.SealServer(prog, client.public_keys()).run(cts, client.refresh)


def test_separate_steps_flow_through_files(tiny, keydirs, encrypted, tmp_path):
    _, cdir, sdir = keydirs
    prog = tiny.prog
    SB.client_encrypt(prog, cdir, tiny.feeds).save(tmp_path / "inputs.bundle")
    SB.server_start(prog, sdir, tmp_path / "inputs.bundle").save(tmp_path / "state.bundle")
    response, trips, first_response = None, 0, None
    while True:
        state, request, outputs = SB.server_step(prog, sdir, tmp_path / "state.bundle", response)
        state.save(tmp_path / "state.bundle")
        if request is None:
            break
        trips += 1
        assert any(n.startswith("req:") for n in state.items)  # the state holds its pending request
        assert request.items and all(n.startswith("ct:") for n in request.items)
        assert request.key_set == state.key_set == SB.read_keys(prog, sdir, secret=False).fingerprint()
        request.save(tmp_path / "request.bundle")
        SB.client_refresh(prog, cdir, tmp_path / "request.bundle").save(tmp_path / "response.bundle")
        if first_response is None:
            with pytest.raises(SB.BackendError, match="a response is needed"):
                SB.server_step(prog, sdir, tmp_path / "state.bundle")
            first_response = tmp_path / "first_response.bundle"
            (tmp_path / "response.bundle").replace(first_response)
            response = first_response
        else:
            if trips == 2:  # a stale response (answer to another request) is refused
                with pytest.raises(SB.BackendError, match="stale or foreign"):
                    SB.server_step(prog, sdir, tmp_path / "state.bundle", first_response)
            response = tmp_path / "response.bundle"
    assert trips == prog.op_counts()["refresh"]
    outputs.save(tmp_path / "outputs.bundle")
    outs = SB.client_decrypt(prog, cdir, tmp_path / "outputs.bundle")
    name = prog.outputs[0].name
    _close(outs[name], encrypted[0][name])
    _close(outs[name], tiny.ref)
    assert outputs.meta["stats"]["refreshes"] == trips
    with pytest.raises(SB.BackendError, match="not waiting"):
        SB.server_step(prog, sdir, tmp_path / "state.bundle", tmp_path / "response.bundle")


def test_noise_model_predicts_seals_error(tiny, encrypted):
    """The simulator's CKKS noise model (constants measured on SEAL by hecompile calibrate /
    benchmarks/measure_seal_costs.py) estimates the error SEAL really gives within 4x.  Key
    switching's error depends on the key (its first slots vary several-fold between key sets),
    so SEAL's error is the geometric mean over three key sets."""
    outs, _ = encrypted
    name = tiny.prog.outputs[0].name
    exact = Simulator(tiny.prog).run(tiny.feeds)[0][name]

    def rms(y):
        return float(np.sqrt(np.mean((y - exact) ** 2)))

    seal = [rms(outs[name])] + [rms(SB.run_encrypted(tiny.prog, tiny.feeds)[0][name]) for _ in range(2)]
    seal_err = float(np.exp(np.mean(np.log(seal))))
    sim_err = float(np.exp(np.mean([np.log(rms(Simulator(tiny.prog, noise=True, seed=s).run(tiny.feeds)[0][name]))
                                    for s in range(4)])))
    assert seal_err > 0 and sim_err > 0
    assert seal_err / 4 <= sim_err <= 4 * seal_err, (sim_err, seal)
