"""How long `hecompile` takes to plan and check a model, and its peak memory.

    python benchmarks/compile_time.py                      # the rows below, this tree
    python benchmarks/compile_time.py --rows r20_ni r8_ni  # some of them

Every row is one `hecompile MODEL -o M.hec ...` in a fresh process (wall seconds, and CPU
seconds and peak RSS from wait4), the same command a user runs: frontend and passes, the
planner lowering every candidate (and, for `--target lattigo`, both 2^16 sets), the HE-program
passes, the precision check, the error bound and the input limits in the simulator. The
compiled program's digest is printed so two trees can be checked to compile the same program
(`hecompile inspect --program-text`, hashed). To compare with an older commit, run this script
from a worktree of it (`git worktree add /tmp/old COMMIT`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"

#: name -> (model, flags); ResNet-8/20 are built into benchmarks/.cache by models/build_models.py
ROWS = {
    "tiny_ca": ("models/tiny_resnet_poly.onnx", []),
    "digits_relu_ca": ("models/digits_relu.onnx", ["--calibration", "models/digits_calib_x.npy"]),
    "tiny_ni": ("models/tiny_resnet_poly.onnx", ["--target", "lattigo:n16-sparse", "--max-memory", "16G"]),
    "r8_ni": ("resnet8_poly", ["--target", "lattigo:n16-sparse", "--max-memory", "16G"]),
    "r20_ca": ("resnet20_poly", []),
    "r20_ni": ("resnet20_poly", ["--target", "lattigo:n16-sparse", "--max-memory", "16G"]),
    "r20_ni_both": ("resnet20_poly", ["--target", "lattigo", "--max-memory", "12G"]),
}


def model_path(spec: str) -> Path:
    if spec.endswith(".onnx"):
        return ROOT / spec
    p = CACHE / f"{spec}.onnx"
    if not p.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "models" / "build_models.py"), "--out", str(CACHE), spec],
                       check=True, stdout=subprocess.DEVNULL)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = ap.parse_args(argv)
    print(f"{'row':<15} {'compile s':>9} {'CPU s':>7} {'peak GiB':>8}  {'program (sha256 of its text)':<16}  flags")
    with tempfile.TemporaryDirectory(prefix="hec-compile-time-") as tmp:
        for name in args.rows:
            spec, flags = ROWS[name]
            hec = Path(tmp) / f"{name}.hec"
            t0 = time.perf_counter()
            p = subprocess.Popen([sys.executable, "-m", "hecompiler.cli", str(model_path(spec)), "-o", str(hec), "-q",
                                  *flags], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            err = p.stderr.read().decode()
            if os.waitstatus_to_exitcode(status):
                raise SystemExit(f"{name}: hecompile failed:\n{err[-2000:]}")
            text = subprocess.run([sys.executable, "-m", "hecompiler.cli", "inspect", "--program-text", str(hec)],
                                  cwd=ROOT, capture_output=True, check=True).stdout
            digest = hashlib.sha256(text).hexdigest()[:16]
            print(f"{name:<15} {wall:9.1f} {ru.ru_utime + ru.ru_stime:7.1f} {ru.ru_maxrss / 2**20:8.2f}  {digest:<16}  "
                  f"{' '.join(flags)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
