"""Programs compiled for Lattigo run non-interactively: bootstraps instead of client refreshes.

Fast tests use the INSECURE ring-2^12 set (toy-n12, three levels between bootstraps); the
128-bit test (n16-sparse) is marked slow and needs the memory its bootstrapping keys take.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

import hecompiler as hc
from hecompiler.backends import protocol as P
from hecompiler.cli import main
from hecompiler.lower import LoweringOptions
from hecompiler.planner import PlanOptions
from hecompiler.rotkeys import KeyGraph

from conftest import ROOT, ort_run

L = pytest.importorskip("hecompiler.backends.lattigo")
LS = pytest.importorskip("hecompiler.backends.lattigo.session")

TINY = ROOT / "models" / "tiny_resnet_poly.onnx"
TOY = "lattigo:toy-n12"


def _compile(model=TINY, **kw):
    return hc.compile_model(str(model) if not isinstance(model, onnx.ModelProto) else model,
                            hc.CompileOptions(target=TOY, plan=PlanOptions(security="none"), **kw))


@pytest.fixture(scope="module")
def tiny():
    res = _compile()
    x = np.load(ROOT / "models" / "tiny_resnet_poly.input.npy")
    return res, x


def test_tiny_runs_with_real_bootstraps_and_matches_onnxruntime(tiny):
    res, x = tiny
    prog = res.prog
    n_refresh = sum(i.op == "refresh" for i in prog.instrs)
    assert n_refresh > 0 and res.metadata["target"]["backend"] == "lattigo"
    outs, st = LS.run_encrypted(prog, {prog.inputs[0].name: x}, meta=res.metadata)
    y = outs[prog.outputs[0].name]
    ref = ort_run(onnx.load(TINY), x)[0]
    assert np.abs(y - ref).max() <= 1e-4 * np.ptp(ref)
    assert np.argmax(y) == np.argmax(ref)
    assert st.bootstraps == n_refresh and st.refresh_round_trips == 0
    # the simulator of the compile-time check agrees with the encrypted run
    assert res.fidelity["relative_to_range"] < 1e-4


def test_report_and_inspect_say_non_interactive(tiny, tmp_path, capsys):
    res, _ = tiny
    hec = tmp_path / "t.hec"
    hc.save_hec(hec, res.prog, res.metadata)
    assert main(["inspect", str(hec), "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["target"] == TOY and j["client_round_trips"] == 0
    assert j["ops"]["bootstraps"] == sum(i.op == "refresh" for i in res.prog.instrs) and j["ops"]["refreshes"] == 0
    assert "bootstrap (non-interactive)" in res.report_text and "SEES" not in res.report_text


def test_split_commands_run_to_the_end_without_a_request(tiny, tmp_path, capsys):
    res, x = tiny
    d = tmp_path
    hec = d / "t.hec"
    hc.save_hec(hec, res.prog, res.metadata)
    np.save(d / "x.npy", x)
    assert main(["keygen", str(hec), "--client-dir", str(d / "c"), "--server-dir", str(d / "s")]) == 0
    assert not (d / "s" / "secret.key").exists() and (d / "s" / "bootstrap.key").exists()
    assert oct((d / "c" / "secret.key").stat().st_mode & 0o777) == "0o600"
    assert main(["encrypt", str(hec), "--keys", str(d / "c"), "--input", str(d / "x.npy"), "-o", str(d / "x.b")]) == 0
    assert main(["eval", str(hec), "--keys", str(d / "s"), "--input", str(d / "x.b"), "--state", str(d / "st.b"),
                 "-o", str(d / "y.b")]) == 0
    assert not (d / "st.b.request").exists()
    capsys.readouterr()
    assert main(["decrypt", str(hec), "--keys", str(d / "c"), "--ciphertext", str(d / "y.b"), "-o",
                 str(d / "y.npy")]) == 0
    ref = ort_run(onnx.load(TINY), x)[0]
    assert np.abs(np.load(d / "y.npy") - ref).max() <= 1e-4 * np.ptp(ref)
    # the server refuses the client directory, and another key set's ciphertexts
    assert main(["eval", str(hec), "--keys", str(d / "c"), "--input", str(d / "x.b"), "--state", str(d / "s2.b"),
                 "-o", str(d / "y2.b")]) == 1
    assert "holds the secret key" in capsys.readouterr().err
    assert main(["keygen", str(hec), "--client-dir", str(d / "c2"), "--server-dir", str(d / "s2")]) == 0
    capsys.readouterr()
    assert main(["eval", str(hec), "--keys", str(d / "s2"), "--input", str(d / "x.b"), "--state", str(d / "s3.b"),
                 "-o", str(d / "y3.b")]) == 1
    err = capsys.readouterr().err
    assert "encrypted under key set" in err and "wrong keys" in err and not (d / "y3.b").exists()


def test_galois_keys_are_made_at_the_level_they_are_used(tiny, tmp_path):
    """Each Galois key has the primes of the highest level the program rotates by it: smaller
    than a key at the top by what the cost model predicts, and the run above (made with
    these keys by run_encrypted) matches onnxruntime."""
    res, _ = tiny
    prog = res.prog
    top = prog.params.top_level
    at = prog.galois_key_levels()
    assert min(at.values()) < top == max(at.values())
    rep = LS.client_keygen(prog, tmp_path / "c", tmp_path / "s", res.metadata)
    assert dict(zip(rep["steps"], rep["levels"])) == at
    srv = LS.open_server(prog, tmp_path / "s", res.metadata)
    assert srv.ev.key_levels == at
    srv.ev.close()
    # the same steps, every key at the top: the file is larger by the predicted ratio
    params = LS.params_for(prog, res.metadata)
    L.keygen(params, tmp_path / "c2", tmp_path / "s2", rotations=list(at), relin=False, bootstrap=False)
    got = (tmp_path / "s" / "galois.key").stat().st_size / (tmp_path / "s2" / "galois.key").stat().st_size
    cost = hc.target.get_target(TOY).cost_model()
    n = prog.params.poly_degree
    want = cost.galois_key_bytes(prog) / (len(at) * cost.ksk_bytes(n, top + 1))
    assert want < 0.95 and got == pytest.approx(want, rel=0.02)
    assert res.metadata["report"]["galois_key_bytes"] == cost.galois_key_bytes(prog)


def test_keys_of_composed_rotations_are_made_at_the_level_of_every_use(tmp_path):
    """Under a key budget a rotation is composed from keys: each key on its path is used at
    that rotation's level, so it is made there (a key made lower gives wrong slots in Lattigo)."""
    spec = "share-mod-switch,hoist-rotations,select-rotation-keys{max_keys=4}"
    res = hc.compile_model(str(TINY), hc.CompileOptions(target=TOY, plan=PlanOptions(
        security="none", lowering=LoweringOptions(he_passes=spec))))
    prog = res.prog
    S = prog.params.slots
    keys = prog.galois_steps
    graph = KeyGraph(keys, S)
    want = dict.fromkeys(keys, -1)
    composed = 0
    for ins in prog.instrs:
        if ins.op == "linear":
            lin = prog.linears[ins.plain.args[0]]
            for k in lin.needs:
                composed += k % S not in keys
                for h in graph.path(k):
                    want[h] = max(want[h], ins.level + 1)
        elif ins.op == "rotate" and ins.step % S:
            want[ins.step % S] = max(want[ins.step % S], ins.level)
    assert composed > 0 and len(keys) == 4
    assert prog.galois_key_levels() == {k: (prog.params.top_level if v < 0 else v) for k, v in want.items()}
    x = np.load(ROOT / "models" / "tiny_resnet_poly.input.npy")
    outs, _ = LS.run_encrypted(prog, {prog.inputs[0].name: x}, meta=res.metadata)
    ref = ort_run(onnx.load(TINY), x)[0]
    assert np.abs(outs[prog.outputs[0].name] - ref).max() <= 1e-4 * np.ptp(ref)


def test_key_budget_counts_each_key_at_its_level():
    """A byte budget for Galois keys admits more keys than fit at the top when some are used
    lower, and the keys chosen, priced at their levels, stay within it."""
    cost = hc.target.get_target(TOY).cost_model()
    spec = "share-mod-switch,hoist-rotations,select-rotation-keys{max_key_bytes=%d}"
    full = _compile().prog
    kb = cost.ksk_bytes(full.params.poly_degree, full.params.top_level + 1)
    limit = int(12.5 * kb)
    prog = hc.compile_model(str(TINY), hc.CompileOptions(target=TOY, plan=PlanOptions(
        security="none", lowering=LoweringOptions(he_passes=spec % limit)))).prog
    assert 12 < len(prog.galois_steps) < len(full.galois_steps)
    assert cost.galois_key_bytes(prog) <= limit


def test_server_refuses_galois_keys_below_their_level_of_use(tiny, tmp_path, monkeypatch):
    """A key made for a lower level than a rotation's ciphertext gives a wrong result in Lattigo,
    not an error: the server refuses such a key set before it evaluates."""
    res, _ = tiny
    prog = res.prog
    with monkeypatch.context() as m:
        m.setattr(type(prog), "galois_key_levels", lambda self: dict.fromkeys(self.galois_steps, 0))
        LS.client_keygen(prog, tmp_path / "c", tmp_path / "s", res.metadata)
    low = sum(1 for lv in prog.galois_key_levels().values() if lv > 0)
    with pytest.raises(LS.LattigoBackendError, match=rf"made for level 0, the program rotates by it at level "
                                                      rf"\d \({low} key\(s\) too low\): make the keys"):
        LS.open_server(prog, tmp_path / "s", res.metadata)


def test_large_values_are_scaled_into_the_bootstrap_range():
    """Activations beyond the bootstrap's |v| <= 16 (toy-n12) enter it scaled by a power of two
    (a relabel of the scale, pending afterwards); the result stays exact."""
    x = 4.0 * np.load(ROOT / "models" / "tiny_resnet_poly.input.npy")
    res = _compile(sample=x)
    scale_of = {o: i.scale for i in res.prog.instrs for o in i.results}
    scaled = [(scale_of[i.args[0]], i.plain.args[0]) for i in res.prog.instrs if i.op == "refresh" and i.plain]
    assert scaled and all(0 < f < 1 for _, f in scaled)
    # the relabelled scale (input scale / factor) is a power of two: exact for Lattigo at level 0
    assert all(np.log2(s / f) == round(np.log2(s / f)) for s, f in scaled)
    outs, st = LS.run_encrypted(res.prog, {res.prog.inputs[0].name: x}, meta=res.metadata)
    ref = ort_run(onnx.load(TINY), x.astype(np.float32))[0]
    y = outs[res.prog.outputs[0].name]
    assert np.abs(y - ref).max() <= 1e-3 * np.ptp(ref) and np.argmax(y) == np.argmax(ref)


def test_simulator_refuses_bootstrap_inputs_beyond_the_range(tiny, tmp_path, capsys):
    res, x = tiny
    hec = tmp_path / "t.hec"
    hc.save_hec(hec, res.prog, res.metadata)
    big = tmp_path / "big.npy"
    lim = res.metadata["input_limits"][res.prog.inputs[0].name]["max_abs"]
    np.save(big, (x * 1.5 * lim / np.abs(x).max()).astype(np.float32))
    assert main(["run", str(hec), "--input", str(big), "-o", str(tmp_path / "y.npy")]) == 1
    assert "beyond" in capsys.readouterr().err and not (tmp_path / "y.npy").exists()


def test_lattigo_targets_are_data_matching_lattigo():
    """The target's copy of Lattigo's reference sets agrees with what Lattigo builds."""
    from hecompiler.target import LATTIGO_SETS

    for name in ("n16-sparse", "n15-dense"):
        ref = L.reference_literal(name)
        s = LATTIGO_SETS[name]
        assert ref["log_n"] == s["log_n"] and ref["log_default_scale"] == s["log_default_scale"]
        assert len(ref["q"]) - 1 == s["max_levels"] and ref["secret"] == s["secret"]
        assert [int(p).bit_length() for p in ref["p"]] == s["log_p"]
        p = L.LattigoParams(ref)
        assert p.bootstrap.message_ratio == s["message_ratio"]
        if "max_log_qp" in s:
            assert p.bootstrap.log_qp <= s["max_log_qp"] + 0.5


def test_the_stc4_set_is_its_base_with_a_finer_slots_to_coeffs():
    """n16-sparse-stc4 keeps N16QP1546H192H32's ring, secrets, key-switching primes and Q*P bound;
    SlotsToCoeffs takes four levels instead of three (one residual level fewer), for fewer
    bootstrapping Galois keys."""
    from hecompiler.target import LATTIGO_SETS, get_target

    s, base = LATTIGO_SETS["n16-sparse-stc4"], LATTIGO_SETS["n16-sparse"]
    for k in ("log_n", "secret", "log_p", "log_default_scale", "q0_bits", "message_ratio", "max_log_qp"):
        assert s[k] == base[k], k
    assert s["max_levels"] == base["max_levels"] - 1

    def at_top(name):
        t = get_target(f"lattigo:{name}")
        params = t.candidates(None, None, t.lattigo["max_levels"], "tc128", None)[-1]  # a sparse packing
        return L.LattigoParams(t.metadata(params, t.primes(params))["lattigo"]).bootstrap

    b, b0 = at_top("n16-sparse-stc4"), at_top("n16-sparse")
    assert (b.stc_depth, b0.stc_depth) == (4, 3) and b.cts_depth == b0.cts_depth == 4
    assert b.ephemeral_h == b0.ephemeral_h == 32 and b.log_qp <= 1546 + 1e-9
    assert b.galois_elements < b0.galois_elements - 10  # 34 and 49 at 2^14 slots


def test_secure_chains_fit_their_budget():
    """Every chain the planner can pick for a 128-bit Lattigo set stays within the set's Q*P."""
    from hecompiler.target import get_target

    for name in ("lattigo:n16-sparse", "lattigo:n16-sparse-stc4", "lattigo:n15-dense"):
        t = get_target(name)
        for lv in range(1, t.lattigo["max_levels"] + 1):
            cands = t.candidates(None, None, lv, "tc128", None)  # every packing (full, measured sparse ones)
            assert cands and cands[0].log_slots is None
            for params in cands:
                meta = {"target": t.metadata(params, t.primes(params))}
                p = L.LattigoParams(meta["target"]["lattigo"])
                assert p.slots == params.slots and p.bootstrap.log_qp <= meta["target"]["max_log_qp"] + 1e-9, \
                    (name, params)


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


@pytest.mark.slow
@pytest.mark.skipif(_available_gib() < 16, reason="128-bit bootstrapping keys need ~14 GiB free")
def test_one_128_bit_bootstrap(tmp_path):
    """Lattigo's N16QP1546H192H32 set: keys, one bootstrap at 2^15 slots, precision."""
    os.environ.setdefault("GOGC", "20")
    L.set_gc_percent(20)
    p = L.LattigoParams(L.reference_literal("n16-sparse"))
    L.keygen(p, tmp_path / "c", tmp_path / "s", rotations=(), relin=True, bootstrap=True)
    cl, ev = L.Client(p, tmp_path / "c"), L.Evaluator(p, tmp_path / "s")
    x = np.random.default_rng(0).uniform(-1, 1, p.slots)
    out = ev.bootstrap(cl.encrypt(x, level=1))
    assert out.level == p.max_level and out.scale == p.default_scale
    assert np.abs(cl.decrypt(out) - x).max() < 1e-5  # ~2^-20 or better
