"""Plaintext slot vectors, generated on demand from compact weights.

Both backends ask a :class:`PlaintextFactory` for the slot vector of a
:class:`~hecompiler.heprog.PlainRef` just before they encode it.  Diagonals
of a linear op are computed one output ciphertext at a time, when the first
of them is needed, and dropped when the program moves on, so at most one
block row of one op is in memory, never the whole network's.
"""

from __future__ import annotations

import numpy as np

from .errors import HecError
from .heprog import HEProgram, PlainRef
from .linear import bias_vector, diag_keys, diagonals


def rot(v: np.ndarray, k: int) -> np.ndarray:
    """Slots move left by k: ``rot(v, k)[i] == v[(i + k) % len(v)]``."""
    return np.roll(v, -k)


class PlaintextFactory:
    def __init__(self, prog: HEProgram):
        self.prog = prog
        self.S = prog.params.slots
        self._diag_lin = -1
        self._diags: dict = {}
        self._bias: dict[int, np.ndarray] = {}
        self._fill: dict = {}

    def _linear_diagonals(self, lin_id: int, j: int) -> dict:
        """Diagonals of one output ciphertext of one linear op (the only ones kept)."""
        if (lin_id, j) != self._diag_lin:
            lin = self.prog.linears[lin_id]
            lays = self.prog.layouts
            self._diags = {}  # free the previous block before building the next
            self._diags = diagonals(lin, self.prog.weights, lays[lin.in_layout], lays[lin.out_layout], j)
            self._diag_lin = (lin_id, j)
        return self._diags

    def diagonal_keys(self, lin_id: int) -> dict[tuple[int, int], np.ndarray]:
        """{(j, i): sorted d} of the non-zero diagonals of linear op ``lin_id``."""
        lin = self.prog.linears[lin_id]
        lays = self.prog.layouts
        return diag_keys(lin, self.prog.weights, lays[lin.in_layout], lays[lin.out_layout])

    def vector(self, ref: PlainRef) -> np.ndarray:
        k = ref.kind
        if k == "diag":
            lin, j, i, d, r = ref.args
            v = self._linear_diagonals(lin, j).get((j, i, d))
            if v is None:
                raise HecError(f"plaintext {ref}: linear op #{lin} has no diagonal ({j}, {i}, {d})")
            return rot(v, r) if r else v
        if k == "bias":
            lin_id, j = ref.args
            if lin_id not in self._bias:
                lin = self.prog.linears[lin_id]
                b = bias_vector(lin, self.prog.weights)
                self._bias = {lin_id: self.prog.layouts[lin.out_layout].pack(b)}
            return self._bias[lin_id][j]
        if k == "fill":
            lay_id, j, value = ref.args
            key = (lay_id, value)
            if key not in self._fill:
                lay = self.prog.layouts[lay_id]
                C, H, W = lay.shape
                if isinstance(value, str):
                    w = np.asarray(self.prog.weights[value], np.float64).reshape(-1)
                    full = np.repeat(w, H * W) if w.size == C else w
                else:
                    full = np.full(lay.size, float(value))
                if len(self._fill) > 64:
                    self._fill.clear()
                self._fill[key] = lay.pack(full)
            return self._fill[key][j]
        if k == "scalar":
            return np.full(self.S, float(ref.args[0]))
        raise HecError(f"unknown plaintext kind {k!r}")
