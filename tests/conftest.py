"""Shared test helpers: the model builders in models/, onnxruntime runs, tolerances."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# plans must not depend on the machine: tests use the cost table bundled with the compiler, not a
# table `hecompile calibrate` wrote for this machine (the planner picks the cheapest plan by it)
os.environ.setdefault("HECOMPILER_COST_TABLE", "bundled")
sys.path.insert(0, str(ROOT / "models"))


def ort_run(model, feeds):
    """Run an onnx.ModelProto in onnxruntime; ``feeds`` is an array (single
    input) or a dict.  Returns the list of outputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    if isinstance(feeds, np.ndarray):
        feeds = {sess.get_inputs()[0].name: feeds}
    return sess.run(None, feeds)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


def seal_tiny(seed: int, n: int = 8192, bits=(60, 40, 40, 60)):
    """The tiny ResNet lowered for a small insecure SEAL ring (several client-aided refreshes),
    a uniform input of ``seed`` and the graph's own output for it."""
    from types import SimpleNamespace

    import build_models as bm
    import tenseal.sealapi as sealapi

    import hecompiler as hc
    from hecompiler.heprog import Params
    from hecompiler.lower import lower

    g = hc.load_onnx(bm.MODELS["tiny_resnet_poly"]())
    hc.run_pipeline(g)
    primes = tuple(q.value() for q in sealapi.CoeffModulus.Create(n, list(bits)))[:-1]
    prog, _ = lower(g, Params(n, bits, 40), primes)
    x = np.random.default_rng(seed).uniform(-1, 1, prog.inputs[0].shape).astype(np.float32)
    ref = np.asarray(hc.run_graph(g, x)[0], np.float64)
    return SimpleNamespace(g=g, prog=prog, primes=primes, x=x, ref=ref, feeds={prog.inputs[0].name: x})


@pytest.fixture(scope="session")
def models():
    import build_models

    return build_models
