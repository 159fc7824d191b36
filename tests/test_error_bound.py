"""The compile report's error bound (hecompiler/errorbound.py) holds for real encrypted runs on
inputs it never saw: SEAL (client-aided) on the tiny ResNet and the trained digits model, Lattigo
with real bootstraps (insecure toy ring), each answer's largest error against onnxruntime within
the bound the report (and the client file) states."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import hecompiler as hc
from hecompiler.errorbound import error_bound, probe_inputs
from hecompiler.planner import PlanOptions

from conftest import ROOT, ort_run

TINY = ROOT / "models" / "tiny_resnet_poly.onnx"
DIGITS = ROOT / "models" / "digits_poly.onnx"


def _bound(res):
    b = res.fidelity["error_bound"]
    assert b["runs"] == b["inputs"] * b["noise_draws"] >= 8 and b["max_abs_error"] > 0
    assert b["max_abs_error"] == pytest.approx(b["margin"] * b["largest_seen"])
    assert "error bound: |output - original model| <=" in res.report_text
    return b["max_abs_error"]


def _errors(model, run, xs):
    m = onnx.load(model)
    errs = []
    for x in xs:
        y = run(x)
        ref = ort_run(m, x)[0]
        assert np.argmax(y) == np.argmax(ref)
        errs.append(float(np.abs(y - ref).max()))
    return errs


def _seal_runner(prog):
    from hecompiler.backends.seal import SealClient, SealServer

    client = SealClient.create(prog)
    server = SealServer(prog, client.public_keys())
    io, out = prog.inputs[0], prog.outputs[0].name

    def run(x):
        cts, _ = server.run(client.encrypt_inputs({io.name: x}), client.refresh, None)
        return client.decrypt_outputs(cts)[out]
    return run


@pytest.mark.parametrize("model, inputs", [
    (TINY, lambda rng, shape: [rng.uniform(-1, 1, shape) for _ in range(4)] +
     [rng.standard_normal(shape) for _ in range(4)]),
    (DIGITS, lambda rng, shape: list(np.load(ROOT / "models" / "digits_test_x.npy")[:8].reshape((8,) + shape))),
])
def test_seal_answers_are_within_the_report_bound(model, inputs):
    res = hc.compile_model(str(model), hc.CompileOptions(plan=PlanOptions(ring_degrees=(8192,))))
    bound = _bound(res)
    prog = res.prog
    shape = tuple(prog.inputs[0].shape)
    xs = [np.asarray(x, np.float32).reshape(shape) for x in inputs(np.random.default_rng(4242), shape)]
    errs = _errors(model, _seal_runner(prog), xs)
    assert max(errs) <= bound, (max(errs), bound)


def test_lattigo_bootstrapped_answers_are_within_the_report_bound():
    LS = pytest.importorskip("hecompiler.backends.lattigo.session")
    res = hc.compile_model(str(TINY), hc.CompileOptions(target="lattigo:toy-n12",
                                                        plan=PlanOptions(security="none")))
    assert any(i.op == "refresh" for i in res.prog.instrs)
    bound = _bound(res)
    prog = res.prog
    io, out = prog.inputs[0], prog.outputs[0].name
    rng = np.random.default_rng(77)
    xs = [rng.uniform(-1, 1, io.shape).astype(np.float32) for _ in range(3)]

    def run(x):
        return LS.run_encrypted(prog, {io.name: x}, meta=res.metadata)[0][out]
    errs = _errors(TINY, run, xs)
    assert max(errs) <= bound, (max(errs), bound)


def test_probe_inputs_take_the_largest_then_others_then_fresh_draws():
    shape = (1, 2)
    planning = np.array([[[0.1, 0.2]], [[5.0, 1.0]], [[0.3, 0.3]], [[2.0, 0.0]]], np.float32)
    largest = [planning[1], planning[3]]
    got = probe_inputs(planning, largest, "calibration set", shape, seed=0, n=3)
    assert [tuple(x.ravel()) for x in got[:2]] == [(5.0, 1.0), (2.0, 0.0)]
    assert len(got) == 3 and any(np.array_equal(got[2], planning[i]) for i in (0, 2))
    # a calibration set of two inputs gives two probes (no invented data)
    assert len(probe_inputs(planning[:2], [planning[1]], "calibration set", shape, seed=0, n=6)) == 2
    # planned on N(0,1): further N(0,1) draws
    got = probe_inputs(planning[:1], [planning[0]], "N(0,1) sample (seed 0)", shape, seed=0, n=4)
    assert len(got) == 4 and len({x.tobytes() for x in got}) == 4


def test_bound_is_the_margin_times_the_largest_error():
    xs = [np.zeros(2), np.ones(2)]
    # the batch holds each input twice in a row (two noise draws): rows alternate 0.3 and 0.1 noise
    b = error_bound(xs, lambda b: b + np.where(np.arange(len(b)) % 2, 0.1, 0.3)[:, None] * (1 + b), lambda x: x,
                    "calibration set", "model", seeds=2, margin=2.0)
    assert b["largest_seen"] == pytest.approx(0.6) and b["max_abs_error"] == pytest.approx(1.2)
    assert b["runs"] == 4 and b["inputs"] == 2
    nan = error_bound(xs, lambda b: b * np.nan, lambda x: x, "c", "m")
    assert nan["max_abs_error"] == float("inf")
