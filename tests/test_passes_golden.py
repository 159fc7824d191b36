"""Golden tests for each pass: tests/golden/passes/*.ir hold an input graph, the
pipeline to run, and the expected printed graph.  Each case also checks that
the exact passes did not change the function (reference interpreter).

Regenerate expectations after a deliberate change with
``UPDATE_GOLDEN=1 python -m pytest tests/test_passes_golden.py`` and review the diff.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import hecompiler as hc

GOLDEN = Path(__file__).parent / "golden" / "passes"
CASES = sorted(GOLDEN.glob("*.ir"))
MARK = "# expect:\n"
# a decimal number in printed IR (coefficients, attributes): approximating passes are compared by value
_NUMBER = re.compile(r"-?\d+\.\d*(?:e[-+]?\d+)?|-?\d+e[-+]?\d+")


def _same_up_to_rounding(got: str, expected: str, rtol: float = 1e-9) -> bool:
    """The texts are equal except for the last digits of their decimal numbers.

    Minimax and least-squares fits run through LAPACK/BLAS, whose kernels differ
    by CPU (the last digits of a coefficient change); their printed numbers are
    compared with a relative tolerance, everything else exactly."""
    if _NUMBER.split(got) != _NUMBER.split(expected):
        return False
    a = np.array([float(t) for t in _NUMBER.findall(got)])
    b = np.array([float(t) for t in _NUMBER.findall(expected)])
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=rtol))


def _split(path: Path):
    text = path.read_text()
    head, _, expected = text.partition(MARK)
    pipeline = next(line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith("# pipeline:"))
    return head, pipeline, expected


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden(path):
    head, pipeline, expected = _split(path)
    g = hc.parse_graph(head, source=str(path))
    hc.verify(g)
    before = g.clone()
    hc.run_pipeline(g, pipeline)
    got = hc.print_graph(g)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(head + MARK + got)
        expected = got
    exact = all(p.exact for p in hc.parse_pipeline(pipeline))
    # the printed result parses back to the same text
    assert hc.print_graph(hc.parse_graph(got)) == got
    rng = np.random.default_rng(0)
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(np.float32) for v in g.inputs}
    if not exact:
        # approximating passes fit numbers with LAPACK: same text up to the last digits, same function
        assert _same_up_to_rounding(got, expected), \
            f"{path.name}: output differs from golden beyond rounding (UPDATE_GOLDEN=1 to regenerate)"
        want = hc.parse_graph(expected)
        for a, b in zip(hc.run_graph(want, feeds), hc.run_graph(g, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
        return
    assert got == expected, f"{path.name}: output differs from golden (UPDATE_GOLDEN=1 to regenerate)"
    # exact passes keep the function
    for a, b in zip(hc.run_graph(before, feeds), hc.run_graph(g, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_every_builtin_pass_has_a_golden_case():
    covered = set()
    for p in CASES:
        covered.update(s.split("{")[0].strip() for s in _split(p)[1].split(","))
    missing = {c.name for c in hc.list_passes() if c.__module__.startswith("hecompiler.passes")} - covered
    assert not missing, f"passes without a golden test: {sorted(missing)}"
