"""How a Lattigo bootstrap's error depends on what it bootstraps: the slots' mean, their spread,
and copies (a replicated layout, hecompiler/layout.py), at amplitudes up to the bootstrap's range.

    python benchmarks/bootstrap_error.py                    # toy-n12 (insecure, seconds)
    python benchmarks/bootstrap_error.py --set n16-sparse-stc4 --amplitudes 1,8 --trials 1

Prints, per amplitude A, the largest error over ``--trials`` bootstraps (each a fresh encryption
at level 1) of: a constant vector A; uniform [-A, A]; uniform [0, A]; and 8 copies of each
uniform vector (a period of 1/8 of the slots).  The bootstrap's sine approximation errs by about
the cube of each coefficient of the message polynomial: the constant coefficient is the slots'
mean, and copies put the rest on every 8th coefficient, each sqrt(8) times larger.  The simulator
models both (backends/sim.py, from the rates ``--refresh-growth`` of measure_lattigo_costs.py
adds to a cost table).  Makes a throwaway key set (the secret key included) in a temporary
directory: a measuring harness, not a product path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure_lattigo_costs import literal_for  # noqa: E402

from hecompiler.backends import lattigo as L  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--set", default="toy-n12", help="Lattigo parameter set (default toy-n12)")
    ap.add_argument("--amplitudes", default=None, help="comma-separated A (default 1, 4, 7 and the range)")
    ap.add_argument("--trials", type=int, default=2, help="bootstraps per cell (the largest error is shown)")
    args = ap.parse_args(argv)
    p = L.LattigoParams(literal_for(args.set))
    if p.bootstrap is None:
        raise SystemExit(f"--set {args.set}: no bootstrapping")
    top = p.bootstrap.max_abs_value
    amps = [float(a) for a in args.amplitudes.split(",")] if args.amplitudes else [1.0, 4.0, 7.0, top]
    rng = np.random.default_rng(0)
    S = p.slots
    with tempfile.TemporaryDirectory(prefix="bootstrap_error_") as d:
        L.keygen(p, f"{d}/c", f"{d}/s", bootstrap=True)
        cl, ev = L.Client(p, f"{d}/c"), L.Evaluator(p, f"{d}/s")

        def err(x: np.ndarray) -> float:
            return max(float(np.abs(cl.decrypt(ev.bootstrap(cl.encrypt(x, level=1))) - x).max())
                       for _ in range(args.trials))

        print(f"{p.describe()}\nlargest error of {args.trials} bootstrap(s) per cell; copies: 8 (period {S // 8})")
        print(f"{'A':>6} {'constant':>10} {'U[-A,A]':>10} {'U[0,A]':>10} {'8x U[-A,A]':>11} {'8x U[0,A]':>10}")
        for a in amps:
            row = [err(np.full(S, a)), err(rng.uniform(-a, a, S)), err(rng.uniform(0, a, S)),
                   err(np.tile(rng.uniform(-a, a, S // 8), 8)), err(np.tile(rng.uniform(0, a, S // 8), 8))]
            print(f"{a:6g} " + " ".join(f"{e:10.2e}" for e in row))
        cl.close()
        ev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
