"""The compile report's error bound: how far an encrypted answer may be from the original model.

The fidelity check (:func:`hecompiler.compiler.check_fidelity`) runs the program once, on one
sample input, with one draw of the CKKS noise model: an *estimate*, which a real run on another
input exceeds (measured: 2.6x on the tiny ResNet's uniform inputs under SEAL).  A serving client
needs a figure to check answers against, so the report also gives a bound, measured the same way
but over more: ``probes`` inputs like the planning inputs (the planning inputs of largest
magnitude, then further draws from the planning distribution: other calibration inputs, or
further N(0,1) draws when the program was planned on N(0,1)), each run in the simulator with the
noise model under ``seeds`` noise draws (one batched simulator run for all of them), against the original model (onnxruntime); the bound is
``margin`` times the largest error seen.  It holds for inputs like the planning inputs (the report
says which); inputs outside the planned range void it (run/encrypt warn about those).

``margin`` covers the noise draws and inputs not probed.  Its value is checked, not assumed:
tests run real SEAL and Lattigo inferences on inputs the bound never saw and require every error
below it (``tests/test_error_bound.py``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

#: the bound is this multiple of the largest error over the probes and noise draws
MARGIN = 2.0
#: inputs run (the planning inputs of largest magnitude first), each under ``SEEDS`` noise draws
PROBES = 6
SEEDS = 2


def probe_inputs(planning: np.ndarray, largest: list[np.ndarray], planned_on: str, shape, seed: int,
                 n: int = PROBES) -> list[np.ndarray]:
    """``n`` inputs like the planning inputs: the ``largest`` ones first, then other planning
    inputs at random, then (planned on a seeded N(0,1) sample) further N(0,1) draws."""
    out = [np.asarray(x, np.float32).reshape(shape) for x in largest[:n]]
    rng = np.random.default_rng(seed + 7919)
    if len(out) < n and len(planning) > len(out):
        rest = [i for i in rng.permutation(len(planning))]
        taken = {np.asarray(x).tobytes() for x in out}
        for i in rest:
            x = np.asarray(planning[i], np.float32).reshape(shape)
            if x.tobytes() not in taken:
                out.append(x)
                taken.add(x.tobytes())
            if len(out) >= n:
                break
    if planned_on.startswith("N(0,1)"):
        while len(out) < n:
            out.append(rng.standard_normal(shape).astype(np.float32))
    return out


def error_bound(inputs: list[np.ndarray], run_noisy: Callable[[np.ndarray], np.ndarray],
                original: Callable[[np.ndarray], np.ndarray], planned_on: str, reference: str,
                seeds: int = SEEDS, margin: float = MARGIN) -> dict[str, Any]:
    """The bound (see the module doc): ``run_noisy(batch)`` is the program's output in the
    simulator with the noise model on a batch of inputs (each row an independent noise draw;
    each input appears ``seeds`` times in a row), ``original(x)`` the original model's."""
    worst = worst_rel = 0.0
    batch = np.stack([np.asarray(x) for x in inputs for _ in range(seeds)]) if inputs else None
    ys = np.asarray(run_noisy(batch), np.float64) if inputs else []
    for k, x in enumerate(inputs):
        ref = np.asarray(original(x), np.float64)
        rng = float(np.ptp(ref)) or 1.0
        for y in ys[k * seeds:(k + 1) * seeds]:
            err = float(np.abs(y - ref).max()) if np.all(np.isfinite(y)) else float("inf")
            worst, worst_rel = max(worst, err), max(worst_rel, err / rng)
    return {"max_abs_error": margin * worst, "relative_to_range": margin * worst_rel, "margin": margin,
            "largest_seen": worst, "inputs": len(inputs), "noise_draws": seeds, "runs": len(ys),
            "inputs_like": planned_on, "reference": reference}
