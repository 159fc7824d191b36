"""Could a second process encode a SEAL program's plaintexts and hand them over?

    python benchmarks/seal_plaintext_transfer.py            # N=8192 and 16384, the chains ResNets use

tenseal's SEAL binding holds the interpreter lock while it encodes, so threads cannot encode beside
the evaluation; a worker process could, if handing a plaintext over cost much less than encoding
it.  tenseal serializes only through ``save(path)``, which always compresses (zstd).  This prints,
per ring and level, the milliseconds to encode one full slot vector, to save the plaintext (what the
worker would add), and to load it (what the evaluating process would pay instead of encoding).
The hand-over pays when save + encode (the worker) stays under what the evaluation spends per
plaintext, and load is well under encode.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.seal_ckks import CkksContext, CkksParams, _seal_load, _seal_save  # noqa: E402


def _ms(f, reps: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    import tenseal.sealapi as seal

    print(f"{'N':>6s} {'primes':>6s} {'bytes':>8s} {'encode ms':>10s} {'save ms':>8s} {'load ms':>8s}")
    for n, depth in ((8192, 1), (8192, 2), (16384, 4)):
        ctx = CkksContext(CkksParams.for_depth(n, depth))
        v = np.random.default_rng(0).normal(size=n // 2)
        for level in range(ctx.max_level + 1):
            pt = ctx.encode(v, 2.0**40, level)
            blob = _seal_save(pt)

            def load(blob=blob):
                _seal_load(seal.Plaintext(), ctx.seal, blob)

            enc = _ms(lambda: ctx.encode(v, 2.0**40, level), 300)
            save = _ms(lambda: _seal_save(pt), 300)
            print(f"{n:6d} {ctx.num_primes(level):6d} {len(blob):8d} {enc:10.3f} {save:8.3f} {_ms(load, 300):8.3f}")


if __name__ == "__main__":
    main()
