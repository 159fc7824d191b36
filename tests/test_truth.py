"""What the compiler says must be what happened: references, precision decisions, noise, checks.

Each test here failed before the change it guards (issue "Truth").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest

import hecompiler as hc
import hecompiler.compiler as C
from hecompiler.backends.sim import Simulator
from hecompiler.costmodel import CostModel
from hecompiler.executor import ExecutionError

from conftest import ROOT

TINY = str(ROOT / "models" / "tiny_resnet_poly.onnx")


@hc.register_pass
@dataclass(frozen=True)
class PerturbWeights(hc.Pass):
    """A user's approximating pass: scales every conv weight (changes the function by a lot)."""

    name = "test-perturb-weights"
    summary = "multiply every conv weight by a factor (a stand-in for a user's approximation)"
    exact = False
    factor: float = 1.3

    def run(self, graph, ctx):
        for n in graph.nodes:
            if n.op == "Conv":
                w = n.inputs[1]
                k = graph.add_constant(np.asarray(w.data) * np.float32(self.factor), w.name + ".perturbed")
                n.set_input(1, k)
        return hc.PassResult(True)


def test_a_users_approximating_pass_does_not_cost_plans():
    """The planner's tolerance applies to the encryption error, measured against the graph the
    passes produced; the pass's own effect is reported separately, and the plan is the one an
    exact pipeline gets."""
    exact = hc.compile_model(TINY)
    res = hc.compile_model(TINY, hc.CompileOptions(passes=hc.DEFAULT_PIPELINE + ",test-perturb-weights"))
    f = res.fidelity
    assert not res.pipeline.exact
    assert f["reference"] == "the rewritten graph (reference interpreter)"
    assert f["relative_to_range"] < 1e-3
    assert f["rewrite_relative_to_range"] > 1e-2  # the pass changed the function: measured and reported
    assert not any(c.reason.startswith("estimated error") for c in res.candidates)
    assert res.chosen.label == exact.chosen.label
    assert "the passes alone change it by" in res.report_text


def test_fidelity_names_the_reference_that_ran(monkeypatch):
    def broken(model, x):
        raise RuntimeError("NOT_IMPLEMENTED: no kernel for this op")

    monkeypatch.setattr(C, "_onnxruntime", broken)
    res = hc.compile_model(TINY)
    ref = res.fidelity["original_reference"]
    assert ref.startswith("the original model in the reference interpreter (onnxruntime failed: RuntimeError")
    assert "onnxruntime (original model)" not in res.report_text
    assert "onnxruntime failed" in res.report_text


def test_rejected_plans_are_announced():
    res = hc.compile_model(TINY, hc.CompileOptions(tolerance=1e-12, max_precision_attempts=2))
    assert any(c.reason.startswith("estimated error") for c in res.candidates)
    assert "faster plan(s) rejected for their estimated error" in res.report_text


# --------------------------------------------------------------------------- the simulator checks like SEAL

@pytest.fixture(scope="module")
def tiny():
    res = hc.compile_model(TINY)
    x = np.load(ROOT / "models" / "tiny_resnet_poly.input.npy")
    return res.prog, {res.prog.inputs[0].name: x}


@pytest.mark.parametrize("tamper, message", [
    # the planned scale of a rescale edited: the op table gives another value
    (lambda p, k: setattr(p.instrs[k], "scale", p.instrs[k].scale * (1 + 1e-6)), "the plan says"),
    # a rescale turned into a mod-switch with the same planned result: the scale cannot match
    (lambda p, k: (setattr(p.instrs[k], "op", "mod_switch"), setattr(p.instrs[k], "to_level", p.instrs[k].level)),
     "the program plans level"),
])
def test_simulator_refuses_a_tampered_program_as_seal_does(tiny, tamper, message):
    prog, feeds = tiny
    bad = copy.deepcopy(prog)
    k = next(i for i, ins in enumerate(bad.instrs) if ins.op == "rescale")
    tamper(bad, k)
    with pytest.raises(ExecutionError, match=message):
        Simulator(bad).run(feeds)


def test_simulator_noise_comes_from_the_cost_table(tiny):
    prog, feeds = tiny
    cost = CostModel()
    nz = cost.noise(prog.params.poly_degree)
    assert set(nz) >= {"fresh", "rescale", "keyswitch"} and all(nz[k] > 0 for k in ("fresh", "rescale", "keyswitch"))
    assert len(nz["keyswitch_head"]) == 16 and nz["keyswitch_head"][0] > 10 * nz["keyswitch"]
    exact, _ = Simulator(prog).run(feeds)
    noisy, _ = Simulator(prog, noise=True, seed=1).run(feeds)
    table = copy.deepcopy(cost.table)
    for r in table["rings"]:
        r["noise"] = {k: (v * 100 if isinstance(v, float) else [x * 100 for x in v] if k == "keyswitch_head" else v)
                      for k, v in r["noise"].items()}
    louder, _ = Simulator(prog, cost=CostModel(table), noise=True, seed=1).run(feeds)
    name = prog.outputs[0].name
    e1 = np.abs(noisy[name] - exact[name]).max()
    e100 = np.abs(louder[name] - exact[name]).max()
    assert 0 < e1 and 30 < e100 / e1 < 300  # the error follows the measured constants (linear in them)


# --------------------------------------------------------------------------- DOT: skips from the structure

def test_skip_edges_follow_the_graph_structure(models):
    """In a downsampling block the projection shortcut is the skip and the main branch (conv2 -> Add)
    is not, although the shortcut conv comes later in node order."""
    from hecompiler.dot import skip_edges

    g = hc.load_onnx(models.MODELS["resnet20_poly"]())
    hc.run_pipeline(g, hc.DEFAULT_PIPELINE)
    edges = skip_edges(g)
    adds = [n for n in g.nodes if n.op == "Add" and not any(v.is_constant for v in n.inputs)]
    assert len(adds) == 9 and len(edges) == 9
    by_add = {a: v for v, a in edges}
    downs = [n for n in adds if any(v.producer is not None and "downsample" in v.producer.name for v in n.inputs)]
    assert len(downs) == 2
    for n in downs:
        skip = next(v for v in n.inputs if id(v) == by_add[id(n)])
        main = next(v for v in n.inputs if v is not skip)
        assert "downsample" in skip.producer.name and "downsample" not in main.producer.name
    for n in adds:
        if n not in downs:  # identity blocks: the skip is the block's input, not made inside the block
            skip = next(v for v in n.inputs if id(v) == by_add[id(n)])
            block = n.name.rsplit("/", 1)[0]
            assert skip.producer is None or not skip.producer.name.startswith(block + "/")


# --------------------------------------------------------------------------- primes without SEAL

@pytest.mark.parametrize("n, bits", [
    (8192, (60, 40, 40, 60)), (16384, (60,) + (40,) * 7 + (60,)), (32768, (60,) + (40,) * 19 + (60,)),
    (65536, (60,) + (40,) * 40 + (60,)), (8192, (50, 30, 30, 50)), (4096, (40, 20, 20, 40)), (2048, (27, 27)),
])
def test_chain_primes_are_seals(n, bits):
    sealapi = pytest.importorskip("tenseal.sealapi")
    from hecompiler.primes import chain_primes

    assert chain_primes(n, bits) == tuple(m.value() for m in sealapi.CoeffModulus.Create(n, list(bits)))


def test_too_many_primes_of_one_size_is_our_error():
    from hecompiler.primes import chain_primes

    with pytest.raises(hc.HecError, match="primes of 20 bits that are 1 mod 2N for N=8192"):
        chain_primes(8192, (40,) + (20,) * 60 + (40,))


_POOL_PROGRAM = '''heprogram v1 {
  params {"coeff_bits":[60,40,40,40,60],"poly_degree":8192,"scale_bits":40,"security":"tc128"}
  primes [1152921504606748673, 1099510824961, 1099510890497, 1099511480321]
  layout #0 {"gap":1,"grid":[6,6],"hs":6,"kind":"compact","n_ct":1,"per_fp":1,"pos":[0,36],"shape":[2,6,6],"slots":4096,"ws":1}
  input "x" [1, 2, 6, 6] layout #0 = %0
  input "z" [1, 2, 6, 6] layout #0 = %1
  %2 = add %0, %1 : L3 S1099511627776.0
  %3 = mod_switch %2, 2 : L2 S1099511627776.0
  %4 = add %3, %3 : L2 S1099511627776.0
  %5 = mod_switch %4, 1 : L1 S1099511627776.0
  output "y" [1, 2, 6, 6] layout #0 alpha 1.0 = %5
}'''


def test_seal_memory_counts_the_most_ciphertexts_of_each_level():
    """SEAL's memory pool keeps freed ciphertexts by size, reused only for the same size: a program
    holds, per level, the most ciphertexts of that level alive at once (here 3 at 4 primes, 2 at
    3, 1 at 2), not the most alive at once (3).  A Go heap (Lattigo) frees them."""
    from hecompiler.costmodel import ct_bytes, program_cost
    from hecompiler.heprog import parse_program, verify_program

    prog = parse_program(_POOL_PROGRAM, {})
    verify_program(prog)
    n = 8192
    c = program_cost(prog, CostModel())
    assert c.peak_live_ciphertexts == 3
    assert c.peak_ciphertext_bytes == 3 * ct_bytes(n, 4) + 2 * ct_bytes(n, 3) + ct_bytes(n, 2)

    class Collected(CostModel):
        pools_by_size = False

    assert program_cost(prog, Collected()).peak_ciphertext_bytes == 3 * ct_bytes(n, 4)
