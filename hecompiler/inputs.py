"""What an input must be before it is encrypted, and the range a program was planned for.

* :func:`check_array`: a real, finite array of a numeric dtype that converts to float64
  without loss.  NaN and Inf would run and decrypt to garbage with exit 0; strings,
  complex numbers, booleans and objects mean the wrong file.
* :func:`input_limits` (compile time): the largest input magnitude for which the modulus
  chain was shown to hold every intermediate value: the planning inputs with the largest
  magnitudes are scaled up by factors of 2 until the simulator reports a value whose
  magnitude times its scale reaches half the ciphertext modulus at its level (where a
  real CKKS decryption wraps around), then bisected.  The result, with the range of the
  planning inputs, is recorded in the ``.hec`` metadata (``input_limits``).  It is
  evidence, not a proof: an input of another shape can overflow earlier (a polynomial
  activation diverges outside its fitted interval), which is why inputs outside the
  planned range are warned about.
* :func:`check_input` (run time, ``run`` and ``encrypt``): refuses inputs beyond that
  magnitude and warns, saying by how much, when an input leaves the planned range.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import HecError

#: an .npy larger than this is not an input of a CNN we can run encrypted
MAX_INPUT_BYTES = 1 << 30
#: integers convert to float64 exactly up to this magnitude
_EXACT_INT = 2 ** 53
#: the headroom kept under the modulus for the recorded maximum magnitude (one bit)
SAFETY = 0.5


def load_array(path: str, what: str) -> np.ndarray:
    """An ``.npy`` array from ``path``, or a one-line error naming ``what`` and the file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise HecError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise HecError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise HecError(f"{what} {path}: not a regular file")
    if st.st_size > MAX_INPUT_BYTES:
        raise HecError(f"{what} {path}: {st.st_size} bytes, more than the {MAX_INPUT_BYTES >> 20} MiB an input may have")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError, ... for a bad file
        raise HecError(f"{what} {path}: not a readable .npy array ({type(e).__name__})") from None
    if not isinstance(x, np.ndarray):
        if hasattr(x, "close"):
            x.close()
        raise HecError(f"{what} {path}: an .npz archive; give one array as .npy (numpy.save)")
    return x


def check_array(x: Any, what: str) -> np.ndarray:
    """``x`` as float64, refused if it is not a finite real numeric array."""
    a = np.asarray(x)
    if a.dtype.kind == "f":
        pass
    elif a.dtype.kind in "iu":
        if a.size and int(np.abs(a.astype(np.float64)).max()) > _EXACT_INT:
            raise HecError(f"{what}: integers beyond 2^53 do not convert to floating point exactly")
    else:
        raise HecError(f"{what}: dtype {a.dtype} cannot be an input (give a float or integer array)")
    a = a.astype(np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise HecError(f"{what}: {int(bad.sum())} value(s) are NaN or infinite (first at index {list(idx)}); "
                       "encrypted they would decrypt to garbage")
    return a


# --------------------------------------------------------------------------- planned range

#: doubling factors tried in one simulator batch (most programs settle within the first group)
DOUBLINGS_PER_BATCH = 4
#: the search's resolution between the last doubling that fits and the first that does not
STEPS_PER_OCTAVE = 8


def input_limits(probes: list[np.ndarray], planned_on: str, headroom: Callable[[Sequence[float]], Sequence[float]],
                 max_factor: float = 2.0 ** 16) -> dict:
    """The ``input_limits`` entry of one input.  ``probes`` are the planning inputs with the
    largest magnitudes; ``headroom(ss)`` gives, for each factor ``s`` of ``ss``, the largest
    ratio of ``|value| * scale`` to half the modulus over the program run on every probe times
    ``s`` (the simulator's :attr:`RunStats.modulus_use`, one batch run for all of ``ss``).
    ``max_abs`` is the peak magnitude of the probes times the largest ``s >= 1`` that keeps the
    ratio under :data:`SAFETY`, it and every smaller factor tried: doubling (a few factors per
    batch), then the steps of 2^(1/8) between the last doubling that fits and the first that
    does not, all in one batch; ``None`` when even ``s = 1`` overflows."""
    peak = max((float(np.abs(p).max()) for p in probes if p.size), default=0.0)
    ladder = [2.0 ** k for k in range(int(np.log2(max_factor)) + 1)]
    lo, hi, use = None, None, None
    for at in range(0, len(ladder), DOUBLINGS_PER_BATCH):
        group = ladder[at:at + DOUBLINGS_PER_BATCH]
        for s, u in zip(group, headroom(group)):
            if use is None:
                use = float(u)
            if u >= SAFETY:
                hi = s
                break
            lo = s
        if hi is not None or peak == 0.0:
            break
    entry = {"planned_on": planned_on, "max_abs": None, "modulus_use": use}
    if peak == 0.0 or use >= SAFETY:
        entry["max_abs"] = peak if use < 1.0 else None
        return entry
    if hi is not None:
        steps = [lo * 2.0 ** (k / STEPS_PER_OCTAVE) for k in range(1, STEPS_PER_OCTAVE)]
        for s, u in zip(steps, headroom(steps)):
            if u >= SAFETY:
                break
            lo = s
    entry["max_abs"] = peak * lo
    return entry


def check_input(prog, meta: Mapping | None, name: str, x: Any, what: str) -> list[str]:
    """Check an input of ``prog`` (shape, dtype, finite, range); returns the warnings to print."""
    io = next((i for i in prog.inputs if i.name == name), None)
    if io is None:
        raise HecError(f"{what}: the program has no input {name!r}")
    a = check_array(x, what)
    if tuple(a.shape) != tuple(io.shape):
        raise HecError(f"{what}: shape {list(a.shape)} but the program's input {name!r} is {list(io.shape)}")
    lim = ((meta or {}).get("input_limits") or {}).get(name)
    if not lim or not a.size:
        return []
    peak = float(np.abs(a).max())
    if lim.get("max_abs") is not None and peak > lim["max_abs"]:
        raise HecError(f"{what}: largest |value| {peak:.4g} is beyond {lim['max_abs']:.4g}, the most this program's "
                       f"modulus chain was shown to hold (its {lim['planned_on']} scaled up until an intermediate "
                       f"value overflowed); encrypted, the output would be garbage: scale the input down or "
                       f"compile with a --sample like it")
    lo, hi = lim["planned_range"]
    below, above = float(a.min()), float(a.max())
    if below < lo or above > hi:
        width = max(hi - lo, 1e-30)
        by = max(lo - below, above - hi)
        return [f"hecompile: warning: {what}: values in [{below:.4g}, {above:.4g}] leave the range [{lo:.4g}, "
                f"{hi:.4g}] of the {lim['planned_on']} the program was planned and checked on, by {by:.3g} "
                f"({by / width:.0%} of that range); precision was estimated only inside it"]
    return []
