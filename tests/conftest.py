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


@pytest.fixture(scope="session")
def models():
    import build_models

    return build_models
