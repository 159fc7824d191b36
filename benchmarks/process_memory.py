"""Peak memory of a command and every process it starts (helper processes included), by sampling.

    python benchmarks/process_memory.py -- hecompile run M.hec --input X.npy --processes 2

Resident sets double-count the pages that forked processes share (a helper shares its parent's
program and keys until either writes them).  This samples, every ``--interval`` seconds, the
proportional set size (PSS: a shared page divided among its sharers) and the private dirty
memory of the command's process tree from ``/proc/PID/smaps_rollup`` (Linux), and prints the peak
of each sum and of each process.  Peaks between samples are missed: the figures are lower bounds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _rollup(pid: int) -> tuple[int, int]:
    """(PSS, private dirty) of ``pid`` in bytes, (0, 0) once it is gone."""
    pss = priv = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Private_Dirty:"):
                priv = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, priv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=0.5, metavar="S", help="seconds between samples")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to measure after --")
    proc = subprocess.Popen(cmd)
    peak_pss = peak_priv = 0
    per_proc: dict[int, int] = {}
    while proc.poll() is None:
        pss = priv = 0
        for pid in _tree(proc.pid):
            a, b = _rollup(pid)
            pss, priv = pss + a, priv + b
            per_proc[pid] = max(per_proc.get(pid, 0), a)
        peak_pss, peak_priv = max(peak_pss, pss), max(peak_priv, priv)
        time.sleep(args.interval)
    big = sorted(per_proc.values(), reverse=True)[:4]
    print(f"exit {proc.returncode}; peak summed PSS {peak_pss / 2**20:.0f} MiB, of it private dirty "
          f"{peak_priv / 2**20:.0f} MiB; largest processes' PSS peaks: "
          + ", ".join(f"{b / 2**20:.0f} MiB" for b in big), file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
