"""Golden tests of the HE-program passes (hecompiler/hepasses): tests/golden/hepasses/*.heprog
hold a pipeline, an input program (hand-written, or ``# builder: NAME`` for one lowered here
from a small ONNX model) and the expected program text after the pipeline.  Text is compared
with every floating-point number replaced by ``~`` (scales and weights are compared as numbers,
to 1e-12 relative), never as exact text.  The program before and after must compute the same
thing in the simulator (the passes are exact).  Regenerate with
``UPDATE_GOLDEN=1 python -m pytest tests/test_hepasses.py`` and review the diff."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import hecompiler as hc
from hecompiler.backends.sim import Simulator
from hecompiler.heprog import Params, parse_program, print_program, verify_program
from hecompiler.lower import LoweringOptions, lower
from hecompiler.passmanager import PassManager, list_passes

GOLDEN = Path(__file__).parent / "golden" / "hepasses"
CASES = sorted(GOLDEN.glob("*.heprog"))
MARK = "# ---- after ----\n"
_FLOAT = re.compile(r"(?<![\w.#%])[+-]?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|inf|nan)(?![\w.])")


def normalize(text: str) -> str:
    return _FLOAT.sub("~", text)


def floats(text: str) -> np.ndarray:
    return np.asarray([float(m.group(0)) for m in _FLOAT.finditer(text)], np.float64)


def same_program_text(got: str, want: str) -> bool:
    if normalize(got) != normalize(want):
        return False
    a, b = floats(got), floats(want)
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- builders

def _conv_model():
    """1x2x6x6 -> Conv 3x3 (3 channels) -> x*x -> Conv 1x1 (2 channels): small, deterministic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((3, 2, 3, 3)) * 0.3).round(3).astype(np.float32)
    b1 = (rng.standard_normal(3) * 0.1).round(3).astype(np.float32)
    w2 = (rng.standard_normal((2, 3, 1, 1)) * 0.5).round(3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c1", "c1"], ["sq"]),
             helper.make_node("Conv", ["sq", "w2"], ["y"])]
    g = helper.make_graph(nodes, "conv2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                           numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def build_conv2():
    import tenseal.sealapi as sealapi

    g = hc.load_onnx(_conv_model())
    hc.run_pipeline(g)
    bits = (60, 40, 40, 40, 60)
    primes = tuple(q.value() for q in sealapi.CoeffModulus.Create(8192, list(bits)))[:-1]
    prog, _ = lower(g, Params(8192, bits, 40), primes, LoweringOptions(he_passes=""))
    return prog


BUILDERS = {"conv2": build_conv2}


def _split(path: Path):
    text = path.read_text()
    head, _, expected = text.partition(MARK)
    lines = head.splitlines(keepends=True)
    meta = {}
    for line in lines:
        if line.startswith("# ") and ":" in line:
            k, v = line[2:].split(":", 1)
            meta[k.strip()] = v.strip()
    body = "".join(line for line in lines if not line.startswith("#"))
    header = "".join(line for line in lines if line.startswith("#"))
    return header, meta, body, expected


def _feeds(prog):
    rng = np.random.default_rng(1)
    return {io.name: rng.uniform(-1, 1, io.shape).astype(np.float32) for io in prog.inputs}


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden(path):
    header, meta, body, expected = _split(path)
    if "builder" in meta:
        prog = BUILDERS[meta["builder"]]()
        before_text = print_program(prog)
        if not os.environ.get("UPDATE_GOLDEN"):
            assert same_program_text(before_text, body), \
                f"{path.name}: the built input program changed (UPDATE_GOLDEN=1 to regenerate)"
        body = before_text
    else:
        prog = parse_program(body, source=str(path))
    verify_program(prog)
    before = parse_program(print_program(prog), weights=prog.weights)
    pm = PassManager(meta["pipeline"], options={})
    report = pm.run(prog)
    got = print_program(prog)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(header + body + MARK + got)
        expected = got
    assert same_program_text(got, expected), \
        f"{path.name}: output differs from golden (UPDATE_GOLDEN=1 to regenerate)"
    # the printed program parses back to the same text and verifies (the pass manager verified too)
    back = parse_program(got, weights=prog.weights)
    assert print_program(back) == got
    verify_program(back)
    assert all(r.exact for r in report.records)
    # exact: the same outputs in the simulator (no noise)
    feeds = _feeds(prog)
    a, _ = Simulator(before).run(feeds)
    b, _ = Simulator(back).run(feeds)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-9)


def test_every_he_pass_has_a_golden_case():
    covered = set()
    for p in CASES:
        covered.update(s.split("{")[0].strip() for s in _split(p)[1]["pipeline"].split(","))
    he = {c.name for c in list_passes() if getattr(c, "ir", "graph") == "heprogram"}
    assert he == {"share-mod-switch", "hoist-rotations", "select-rotation-keys"}
    assert not he - covered, f"HE passes without a golden test: {sorted(he - covered)}"


def test_share_mod_switch_never_adds_live_ciphertexts():
    from hecompiler.costmodel import program_cost

    path = GOLDEN / "share_mod_switch.heprog"
    _, _, body, _ = _split(path)
    prog = parse_program(body)
    c0 = program_cost(prog)
    PassManager("share-mod-switch").run(prog)
    c1 = program_cost(prog)
    assert c1.op_counts["mod_switch"] == c0.op_counts["mod_switch"] - 1
    assert c1.peak_live_ciphertexts <= c0.peak_live_ciphertexts
    assert c1.peak_ciphertext_bytes < c0.peak_ciphertext_bytes


def test_graph_and_program_passes_do_not_mix():
    from hecompiler.passmanager import PassError

    with pytest.raises(PassError, match="a pipeline runs on one IR"):
        PassManager("canonicalize,share-mod-switch" if "canonicalize" in {c.name for c in list_passes()}
                    else f"{[c.name for c in list_passes() if getattr(c, 'ir', 'graph') == 'graph'][0]},share-mod-switch")


def test_hoist_rotations_is_a_noop_without_a_hoisting_backend():
    prog = build_conv2()
    text = print_program(prog)
    rep = PassManager("hoist-rotations").run(prog)
    assert print_program(prog) == text and not rep.records[0].modified


def test_dump_writes_program_text(tmp_path):
    prog = build_conv2()
    PassManager("share-mod-switch,select-rotation-keys", dump_after=["all"], dump_dir=str(tmp_path)).run(prog)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-input.heprog", "01-share-mod-switch.heprog", "02-select-rotation-keys.heprog"]
    last = (tmp_path / names[-1]).read_text()
    assert last == print_program(prog) and "  keys [" in last
