"""The trained digits ResNets (models/train_digits.py): plaintext accuracy, the
ReLU model after approximation and the polynomial model in the slot simulator,
on a subset of the test split.  The whole split and real SEAL runs are in
benchmarks/run.py --digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from hecompiler.backends.sim import Simulator
from hecompiler.compiler import CompileOptions, compile_model

MODELS = Path(__file__).resolve().parents[1] / "models"
N = 100


def _plain(name, x):
    sess = ort.InferenceSession(str(MODELS / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    return np.stack([sess.run(None, {"input": x[i:i + 1]})[0].reshape(-1) for i in range(len(x))])


def _sim(prog, x):
    sim = Simulator(prog)
    name = prog.inputs[0].name
    return np.stack([sim.run({name: x[i:i + 1]})[0][prog.outputs[0].name].reshape(-1) for i in range(len(x))])


@pytest.fixture(scope="module")
def data():
    return {k: np.load(MODELS / f"digits_{k}.npy") for k in ("test_x", "test_y", "calib_x", "calib_y")}


def test_files_are_small_and_consistent(data):
    for p in MODELS.glob("digits_*"):
        assert p.stat().st_size < 200_000, p
    assert data["test_x"].shape == (360, 1, 8, 8) and data["test_y"].shape == (360,)
    assert data["calib_x"].shape == (200, 1, 8, 8) and data["calib_y"].shape == (200,)
    assert data["test_x"].dtype == np.float32 and set(np.unique(data["test_y"])) == set(range(10))


def test_relu_model_approximated_in_simulator(data):
    x, y = data["test_x"][:N], data["test_y"][:N]
    plain = _plain("digits_relu", x).argmax(1)
    res = compile_model(str(MODELS / "digits_relu.onnx"),
                        CompileOptions(calibration=data["calib_x"], labels=data["calib_y"]))
    acts = res.metadata["report"]["approximation"]["activations"]
    assert [a["op"] for a in acts] == ["Relu"] * 5
    pred = _sim(res.prog, x).argmax(1)
    acc_plain, acc_sim = np.mean(plain == y), np.mean(pred == y)
    assert acc_plain >= 0.97
    assert acc_sim >= acc_plain - 0.02, (acc_plain, acc_sim)


def test_poly_model_matches_plaintext_in_simulator(data):
    x = data["test_x"][:N]
    plain = _plain("digits_poly", x)
    res = compile_model(str(MODELS / "digits_poly.onnx"), CompileOptions(sample=x[:1]))
    assert res.metadata["exact"] and "approximation" not in res.metadata["report"]
    sim = _sim(res.prog, x)
    assert (sim.argmax(1) == plain.argmax(1)).all()
    assert np.abs(sim - plain).max() < 1e-3 * np.ptp(plain)
