"""Where a Lattigo server's memory goes over time, against the cost model's terms.

    python benchmarks/lattigo_memory.py r8.hec --input benchmarks/.cache/resnet8_poly.input.npy

(``r8.hec`` from ``hecompile benchmarks/.cache/resnet8_poly.onnx -o r8.hec --target lattigo
--max-memory 12G``.)  Key generation and encryption run first, each in its own process; then
``hecompile eval`` runs alone while this script samples its resident set (``/proc/PID/status``,
every 0.2 s).  It prints the resident set over time (each second of the first minute, then every
five) with the evaluation's progress lines, the peak, and the terms the cost model adds up to its
predicted peak (keys, bootstrapper, ciphertexts, plaintexts, plaintext cache, Go garbage,
baseline), so a gap between the two can be placed in time: loading keys, building the
bootstrapper (on the first bootstrap) or evaluating.  Multi-GiB: run it alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

G = 2.0 ** 30


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def hec(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hecompiler.cli", *args], check=True, stdout=subprocess.DEVNULL)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("program")
    ap.add_argument("--input", required=True)
    args = ap.parse_args(argv)
    from hecompiler.costmodel import program_cost
    from hecompiler.hecfile import load_hec
    from hecompiler.target import target_of

    prog, meta = load_hec(args.program)
    cost = target_of(meta).cost_model()
    c = program_cost(prog, cost)
    with tempfile.TemporaryDirectory(prefix="hec-lattigo-memory-") as tmp:
        t = Path(tmp)
        hec("keygen", args.program, "--client-dir", str(t / "c"), "--server-dir", str(t / "s"))
        hec("encrypt", args.program, "--keys", str(t / "c"), "--input", args.input, "-o", str(t / "x.b"))
        key_bytes = sum(f.stat().st_size for f in (t / "s").iterdir())
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "hecompiler.cli", "eval", args.program, "--keys", str(t / "s"),
                              "--input", str(t / "x.b"), "--state", str(t / "st.b"), "-o", str(t / "y.b")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        samples: list[tuple[float, int]] = []
        lines: list[tuple[float, str]] = []

        def read():
            for line in p.stdout:
                lines.append((time.perf_counter() - t0, line.rstrip()))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while p.poll() is None:
            samples.append((time.perf_counter() - t0, rss(p.pid)))
            time.sleep(0.2)
        reader.join(5)
    if p.returncode:
        print("\n".join(x for _, x in lines[-20:]))
        raise SystemExit(f"eval failed ({p.returncode})")
    print(f"{args.program}: server eval {samples[-1][0]:.1f} s; keys on disk {key_bytes / G:.2f} GiB")
    print(f"{'t s':>6} {'RSS GiB':>8}")
    shown = [s for s in samples if (s[0] < 60 and abs(s[0] - round(s[0])) < 0.11)
             or (s[0] >= 60 and abs(s[0] / 5 - round(s[0] / 5)) < 0.03)]
    for t_s, r in shown:
        print(f"{t_s:6.1f} {r / G:8.2f}")
    for t_s, line in lines:
        print(f"{t_s:6.1f}  | {line[:120]}")
    peak_t, peak = max(samples, key=lambda s: s[1])
    print(f"measured peak {peak / G:.2f} GiB at {peak_t:.1f} s")
    boot = max(0, c.memory_bytes - c.key_bytes - c.peak_ciphertext_bytes - c.plaintext_bytes
               - c.plaintext_cache_bytes - c.garbage_bytes - cost.baseline_bytes)
    terms = [("keys (evaluation + bootstrapping)", c.key_bytes), ("bootstrapper matrices (and workers)", boot),
             ("ciphertexts alive at once", c.peak_ciphertext_bytes), ("one op's plaintexts", c.plaintext_bytes),
             ("plaintext cache", c.plaintext_cache_bytes), ("Go garbage", c.garbage_bytes),
             ("baseline (process)", cost.baseline_bytes)]
    for name, b in terms:
        print(f"  predicted {name:<38} {b / G:6.2f} GiB")
    print(f"  predicted peak {'':<38} {c.memory_bytes / G:6.2f} GiB ({(peak - c.memory_bytes) / G:+.2f} GiB measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
