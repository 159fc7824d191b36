#!/usr/bin/env python3
"""Measure CKKS op costs, bootstrapping, keys and errors with the Lattigo backend.

Usage:
    python benchmarks/measure_lattigo_costs.py                      # toy-n12 (INSECURE, ~1 min)
    python benchmarks/measure_lattigo_costs.py --set n15-dense -o out/cost_lattigo_n15.json
    python benchmarks/measure_lattigo_costs.py --set n16-sparse -o out/cost_lattigo_n16.json
    python benchmarks/measure_lattigo_costs.py --set toy-n12 --btp-log-slots 11,9,7

``--set`` is one of Lattigo's secure bootstrapping sets (n16-sparse = N16QP1546H192H32,
n15-dense = N15QP880H16384H32; their bootstrapping keys take GBs: n16-sparse about
9 GiB of keys and ~13 GiB peak, so run those deliberately) or an insecure toy set
(toy-n10, toy-n12).  Every op goes through backends/lattigo (the ctypes wrapper the
executor uses), so times include the ctypes boundary (measured separately as
``call_overhead_s``).  Go uses GOMAXPROCS = all cores; single ops are single-threaded.

Key generation runs in a child process (``--keygen-child``) so its peak RSS is its
own; a second child (``--baseline-child``) loads the server keys as ``hecompile eval`` does
and gives the server's memory besides its keys (``memory.baseline_rss_bytes``, what the cost
model adds to keys, bootstrapper, ciphertexts and plaintexts); the parent then loads the
server keys (peak RSS reported too).  ``--add-to TABLE --baseline`` measures only that
baseline and writes it into an existing table.  A ciphertext of fewer slots (sparse packing,
``--btp-log-slots``) is also encoded at every level (``by_slots``: a smaller DFT before the same
NTTs; at N=2^16, 2^14 slots took about 0.57x of 2^15), timed interleaved with the full packing;
``--add-to TABLE --encode --btp-log-slots 14`` measures only that.

Output JSON (``schema`` = "hecompiler.cost_lattigo/1"), shaped like
``hecompiler.cost_seal/1`` so hecompiler/costmodel.py can read either: a list of
``rings``, each with ``levels`` rows ``{"level", "primes", "ops_s", "ops_min_s",
"ciphertext_bytes"}`` and ``by_primes`` / ``fits`` per op.  Level convention here
is Lattigo's: level l keeps primes q_0..q_l, so ``primes = level + 1`` (the SEAL
table counts rescales instead); ``by_primes`` is the same in both.  Extra keys:
``bootstrap`` (per slot count: wall and CPU seconds of one bootstrap and of
``bootstrap_many`` on all cores, input level, output level/scale, errors),
``keygen`` (seconds per key kind, peak RSS), ``key_bytes`` (per kind, and per
Galois key), ``errors`` (max abs error on |x| <= 1 for fresh encryption,
rescale, key switching, multiplication, bootstrap), ``call_overhead_s``.

Ops (seconds per call, median of ``--reps`` interleaved rounds):
rotate, rotate_hoisted_extra (each extra rotation of a hoisted batch of 8), mul_plain
(ct x pre-encoded pt), mul_plain_encode (encoding + product, from a float64 vector),
encode (full slot vector at the level), add, add_plain (pre-encoded), mul_relin
(ct x ct + relinearisation), rescale (level -> level-1), mod_switch (drop one level),
encrypt (public key, incl. encoding), decrypt (incl. decoding).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from hecompiler.backends.seal_costs import measure_plaintext_generation

ROOT = pathlib.Path(__file__).resolve().parents[1]
from hecompiler.target import LATTIGO_SETS  # noqa: E402

SCHEMA = "hecompiler.cost_lattigo/1"

try:
    from hecompiler.backends import lattigo as L
except ImportError:  # source tree without `pip install -e .`
    sys.path.insert(0, str(ROOT))
    import importlib.util

    _spec = importlib.util.spec_from_file_location("hecompiler_lattigo", ROOT / "backends" / "lattigo" / "__init__.py")
    L = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(L)

OPS = {
    "rotate": "left rotation by one slot (Galois key switch)",
    "rotate_hoisted_extra": "cost of each extra rotation in a hoisted batch of 8 ((t8 - t1) / 7)",
    "mul_plain": "ct x pre-encoded plaintext at the same level (no rescale)",
    "mul_plain_encode": "encode a float64 slot vector at the level + ct x pt",
    "mul_plain_acc": "acc += ct x pre-encoded plaintext, in place (a linear op's accumulation; replaces a mul_plain and an add)",
    "encode": "CKKS encoding of a full float64 slot vector at the level",
    "add": "ct + ct",
    "add_plain": "ct + pre-encoded plaintext",
    "mul_relin": "ct x ct + relinearisation",
    "rescale": "divide by q_level: level -> level-1 (null at level 0)",
    "mod_switch": "drop one prime without dividing (null at level 0)",
    "encrypt": "public-key encryption of a float64 slot vector (incl. encoding)",
    "decrypt": "decryption + decoding to float64",
}
KEY_SWITCH_OPS = ("rotate", "rotate_hoisted_extra", "mul_relin")
HOIST = 8


def literal_for(name: str, log_slots: int | None = None) -> dict[str, Any]:
    """The literal of a set: one of Lattigo's, a target set derived from one (hecompiler/target.py
    LATTIGO_SETS with a ``base``: its residual levels and bootstrapping circuit over the base's
    primes), or an insecure toy set."""
    variant = LATTIGO_SETS.get(name, {})
    if variant.get("base") in L.REFERENCE_SETS:
        lit = L.reference_literal(variant["base"])
        lit["name"] = name
        lit["q"] = lit["q"][: variant["max_levels"] + 1]
        lit["bootstrap"] = {**(lit.get("bootstrap") or {}), **variant["bootstrap"]}
    else:
        lit = L.reference_literal(name) if name in L.REFERENCE_SETS else L.insecure_literal(name)
    if log_slots is not None:
        lit["log_slots"] = int(log_slots)
    return lit


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def keygen_child(args: argparse.Namespace) -> int:
    """Generate keys (in a child process) and print a JSON report with the peak RSS."""
    params = L.LattigoParams(json.loads(args.literal))
    t0, c0 = time.perf_counter(), os.times()
    rep = L.keygen(params, pathlib.Path(args.keys) / "client", pathlib.Path(args.keys) / "server",
                   rotations=range(1, HOIST + 1), relin=True)
    c1 = os.times()
    rep["wall_s"] = time.perf_counter() - t0
    rep["cpu_s"] = (c1.user + c1.system) - (c0.user + c0.system)
    rep["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(rep))
    return 0


def run_keygen(literal: dict[str, Any], keys: pathlib.Path, log: Callable[[str], None]) -> dict[str, Any]:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--keygen-child", "--keys", str(keys),
           "--literal", json.dumps(literal)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"keygen child failed:\n{proc.stderr.strip()}")
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"  keygen {rep['wall_s']:.1f}s wall, {rep['cpu_s']:.1f}s CPU, peak RSS "
        f"{rep['peak_rss_bytes'] / 2**20:.0f} MiB (child process, {time.perf_counter() - t0:.1f}s incl. start)")
    return rep


def baseline_child(args: argparse.Namespace) -> int:
    """Load the server keys of ``--keys`` the way ``hecompile eval`` does (its modules imported,
    Go at the server's GC percent) and print a JSON report: the resident set after the imports,
    after loading, and after a collection (what stays: the keys, Go's and Python's runtimes, the
    evaluator's buffers)."""
    import hecompiler.backends.protocol  # noqa: F401  (what the eval command imports)
    import hecompiler.cli  # noqa: F401
    import hecompiler.executor  # noqa: F401
    import hecompiler.hecfile  # noqa: F401
    from hecompiler.target import LATTIGO_SERVER_GC_PERCENT

    L.set_gc_percent(LATTIGO_SERVER_GC_PERCENT)
    params = L.LattigoParams(json.loads(args.literal))
    rss_imports = rss_bytes()
    server = pathlib.Path(args.keys) / "server"
    ev = L.Evaluator(params, server)
    rss_loaded = rss_bytes()
    L.free_os_memory()
    rss_live = rss_bytes()
    key_bytes = sum(f.stat().st_size for f in server.iterdir())
    ev.close()
    print(json.dumps({"rss_imports": rss_imports, "rss_loaded": rss_loaded, "rss_live": rss_live,
                      "server_key_bytes": key_bytes, "gc_percent": LATTIGO_SERVER_GC_PERCENT}))
    return 0


def measure_baseline(literal: dict[str, Any], keys: pathlib.Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The server process's memory besides its keys (``baseline_rss_bytes``: resident after loading
    the keys and a collection, minus the key files' bytes), measured in a child process that does
    what ``hecompile eval`` does before evaluating.  The cost model adds it to keys, bootstrapper,
    ciphertexts, plaintexts and Go's garbage (hecompiler.costmodel.program_cost)."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--baseline-child", "--keys", str(keys),
           "--literal", json.dumps(literal)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"baseline child failed:\n{proc.stderr.strip()}")
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    rep["baseline_rss_bytes"] = max(0, rep["rss_live"] - rep["server_key_bytes"])
    log(f"  server baseline: {rep['rss_imports'] / 2**20:.0f} MiB after imports, "
        f"{rep['rss_loaded'] / 2**20:.0f} MiB with the keys loaded, {rep['rss_live'] / 2**20:.0f} MiB after a "
        f"collection, {rep['server_key_bytes'] / 2**20:.0f} MiB of key files: "
        f"{rep['baseline_rss_bytes'] / 2**20:.0f} MiB besides the keys")
    return rep


def time_interleaved(cases: dict[int, dict[str, Callable[[], Any] | None]], reps: int) -> tuple[dict, dict]:
    """Median and minimum seconds per (level, op); one warm-up round, then ``reps`` rounds
    that each run every op of every level once (a load burst spoils one sample, not one op)."""
    samples = {c: {k: [] for k, f in ops.items() if f is not None} for c, ops in cases.items()}
    for rnd in range(reps + 1):
        for c, ops in cases.items():
            for k, f in ops.items():
                if f is None:
                    continue
                t0 = time.perf_counter()
                f()
                if rnd:
                    samples[c][k].append(time.perf_counter() - t0)
    med = {c: {k: (statistics.median(v) if v else None) for k, v in s.items()} for c, s in samples.items()}
    mn = {c: {k: (min(v) if v else None) for k, v in s.items()} for c, s in samples.items()}
    for c, ops in cases.items():
        for k in ops:
            med[c].setdefault(k, None)
            mn[c].setdefault(k, None)
    return med, mn


def make_cases(p: Any, cl: Any, ev: Any, x: np.ndarray, level: int) -> dict[str, Callable[[], Any] | None]:
    s = p.default_scale
    a = cl.encrypt(x, level=level)
    b = cl.encrypt(x[::-1].copy(), level=level)
    pt = ev.encode(x, level=level, scale=float(p.q[level]))
    pt_add = ev.encode(x, level=level, scale=s)
    prod = ev.mul_plain(a, pt)  # scale s * q_level: rescales back to s
    acc = ev.mul_plain(a, pt)  # the accumulator of mul_plain_acc (grows harmlessly: timing only)
    hoist = list(range(1, HOIST + 1))

    def hoisted_extra() -> None:  # timed as a whole, converted below
        ev.rotate_hoisted(a, hoist)

    return {
        "rotate": lambda: ev.rotate(a, 1),
        "rotate_hoisted_extra": hoisted_extra,
        "mul_plain": lambda: ev.mul_plain(a, pt),
        "mul_plain_acc": lambda: ev.mul_plain_acc(acc, b, pt),
        "mul_plain_encode": lambda: ev.mul_plain(a, x, scale=float(p.q[level])),
        "encode": lambda: ev.encode(x, level=level, scale=s),
        "add": lambda: ev.add(a, b),
        "add_plain": lambda: ev.add_plain(a, pt_add),
        "mul_relin": lambda: ev.mul(a, b),
        "rescale": None if level == 0 else (lambda: ev.rescale(prod)),
        "mod_switch": None if level == 0 else (lambda: ev.drop_level(a, level - 1)),
        "encrypt": lambda: ev.encrypt(x, level=level),
        "decrypt": lambda: cl.decrypt(a),
    }


def max_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(got) - np.asarray(want))))


def measure_errors(p: Any, cl: Any, ev: Any, rng: np.random.Generator) -> dict[str, float]:
    x = rng.uniform(-1, 1, p.slots)
    top = p.max_level
    e: dict[str, float] = {}
    e["fresh_secret_key"] = max_err(cl.decrypt(cl.encrypt(x, secret=True)), x)
    e["fresh_public_key"] = max_err(cl.decrypt(cl.encrypt(x, secret=False)), x)
    ct = cl.encrypt(x, secret=False)
    e["rotate_key_switch"] = max_err(cl.decrypt(ev.rotate(ct, 1)), np.roll(x, -1))
    e["rotate_hoisted"] = max(max_err(cl.decrypt(r), np.roll(x, -k))
                              for k, r in zip(range(1, HOIST + 1), ev.rotate_hoisted(ct, range(1, HOIST + 1))))
    if top >= 1:
        one = ev.rescale(ev.mul_plain(ct, np.ones(p.slots), scale=float(p.q[top])))
        e["mul_plain_rescale"] = max_err(cl.decrypt(one), x)
        y = rng.uniform(-1, 1, p.slots)
        m = ev.rescale(ev.mul(ct, cl.encrypt(y, secret=False)))
        e["mul_relin_rescale"] = max_err(cl.decrypt(m), x * y)
    return e


def measure_noise(p: Any, cl: Any, ev: Any, rng: np.random.Generator, samples: int = 4) -> dict[str, float]:
    """Standard deviation of the error each op adds, times the scale (the simulator's noise model,
    the same units as the SEAL table): fresh public-key encryption, a rotation's key switch, a
    rescale's rounding, and a bootstrap (refresh), on |x| <= 1."""
    top, d = p.max_level, p.default_scale
    acc: dict[str, list[float]] = {"fresh": [], "keyswitch": [], "rescale": [], "refresh": []}
    for _ in range(samples):
        x = rng.uniform(-1, 1, p.slots)
        ct = cl.encrypt(x, secret=False)
        e0 = cl.decrypt(ct) - x
        acc["fresh"].append(float(np.std(e0)) * d)
        e1 = cl.decrypt(ev.rotate(ct, 1)) - np.roll(x, -1)
        acc["keyswitch"].append(float(np.sqrt(max(np.var(e1) - np.var(e0), 0.0))) * d)
        if top >= 1:
            q = float(p.q[top])
            prod = ev.mul_plain(ct, np.ones(p.slots), scale=q)
            eb = cl.decrypt(prod) - x
            r = ev.rescale(prod)
            ea = cl.decrypt(r) - x
            acc["rescale"].append(float(np.sqrt(max(np.var(ea) - np.var(eb), 0.0))) * r.scale)
        if p.bootstrap is not None and ev.has_bootstrap:
            lv = min(1, top)
            b = cl.encrypt(x, level=lv, secret=False)
            eb = cl.decrypt(b) - x
            eo = cl.decrypt(ev.bootstrap(b)) - x
            acc["refresh"].append(float(np.sqrt(max(np.var(eo) - np.var(eb), 0.0))) * d)
    out = {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in acc.items() if v}
    out["samples"] = samples
    return out


def measure_refresh_growth(p: Any, cl: Any, ev: Any, rng: np.random.Generator, base: float,
                           samples: int = 2) -> dict[str, float]:
    """How a bootstrap's error grows with its input (the simulator's model, backends/sim.py): its
    sine approximation errs by about the cube of each coefficient of the message polynomial, so
    the error beyond ``base`` (the ``refresh`` std times the scale, on |x| <= 1) is measured on a
    constant vector (all of it in the constant coefficient, the slots' mean) and on a zero-mean
    uniform one of half the bootstrap's range: ``refresh_dc_cubic`` and ``refresh_ac_cubic``, the
    extra std times the scale per cubed mean / cubed standard deviation of the slots."""
    a = p.bootstrap.max_abs_value / 2
    d = p.default_scale
    lv = min(1, p.max_level)
    dc, ac = [], []
    for _ in range(samples):
        for x, out, m in ((np.full(p.slots, a), dc, a), (rng.uniform(-a, a, p.slots), ac, a / math.sqrt(3))):
            b = cl.encrypt(x, level=lv, secret=False)
            e = cl.decrypt(ev.bootstrap(b)) - x
            extra = max(float(np.mean(np.square(e - e.mean() if out is ac else e))) - (base / d) ** 2, 0.0)
            out.append(math.sqrt(extra) * d / m ** 3)
    return {"refresh_dc_cubic": float(np.mean(dc)), "refresh_ac_cubic": float(np.mean(ac)),
            "refresh_growth_at": a, "refresh_growth_samples": samples}


def measure_bootstrap(p: Any, cl: Any, ev: Any, rng: np.random.Generator, reps: int,
                      log: Callable[[str], None]) -> dict[str, Any]:
    b = p.bootstrap
    x = rng.uniform(-1, 1, p.slots)
    # the first bootstrapping evaluator is built when the keys load (its matrices are in the
    # server's load figures); each further worker is a copy with its own matrices, measured below
    t0 = time.perf_counter()
    ev.prepare_bootstrap(1)
    prep = time.perf_counter() - t0
    level_in = min(1, p.max_level)  # level >= 1: exact scale conversion, no bias
    ct = cl.encrypt(x, level=level_in)
    walls, cpus, errs = [], [], []
    for _ in range(max(1, reps)):
        c0, t0 = os.times(), time.perf_counter()
        out = ev.bootstrap(ct)
        walls.append(time.perf_counter() - t0)
        c1 = os.times()
        cpus.append((c1.user + c1.system) - (c0.user + c0.system))
        errs.append(max_err(cl.decrypt(out), x))
    res: dict[str, Any] = {
        "log_slots": p.log_slots, "slots": p.slots, "depth": b.depth, "output_level": out.level,
        "output_scale": out.scale, "input_level": level_in, "prepare_s": prep,
        "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "wall_min_s": min(walls),
        "error_max_abs_le_1": max(errs),
    }
    big = rng.uniform(-b.max_abs_value, b.max_abs_value, p.slots)
    res["max_abs_value"] = b.max_abs_value
    res["error_at_max_abs_value"] = max_err(cl.decrypt(ev.bootstrap(cl.encrypt(big, level=level_in))), big)
    ct0 = cl.encrypt(x, level=0, scale=p.default_scale)
    res["error_level0_input"] = max_err(cl.decrypt(ev.bootstrap(ct0)), x)
    workers = os.cpu_count() or 1
    if workers > 1:
        L.free_os_memory()
        heap0 = L.go_memory().get("heap_inuse", 0)
        ev.prepare_bootstrap(workers)
        L.free_os_memory()
        # what one more concurrent bootstrap costs in memory: a worker's own copy of the matrices
        res["worker_heap_bytes"] = max(0, L.go_memory().get("heap_inuse", 0) - heap0) // (workers - 1)
        cts = [cl.encrypt(rng.uniform(-1, 1, p.slots), level=level_in) for _ in range(workers)]
        c0, t0 = os.times(), time.perf_counter()
        ev.bootstrap_many(cts, workers=workers)
        wall = time.perf_counter() - t0
        c1 = os.times()
        res["many"] = {"ciphertexts": workers, "workers": workers, "wall_s": wall,
                       "cpu_s": (c1.user + c1.system) - (c0.user + c0.system)}
    log(f"  bootstrap 2^{p.log_slots} slots: {res['wall_s']:.2f}s wall, {res['cpu_s']:.2f}s CPU "
        f"(prepare {prep:.1f}s), max error {res['error_max_abs_le_1']:.2e} for |x|<=1, "
        f"{res['error_at_max_abs_value']:.2e} for |x|<={b.max_abs_value:g}"
        + (f"; {workers} at once on {workers} workers: {res['many']['wall_s']:.2f}s wall" if 'many' in res else ""))
    return res


def fit(rows: list[dict[str, Any]]) -> tuple[dict[str, list[list[float]]], dict[str, dict[str, list[float]]]]:
    by_primes: dict[str, list[list[float]]] = {}
    fits: dict[str, dict[str, list[float]]] = {}
    for op in OPS:
        pts = sorted((r["primes"], r["ops_s"][op]) for r in rows if r["ops_s"].get(op) is not None)
        by_primes[op] = [[pp, t] for pp, t in pts]
        xs = np.array([pp for pp, _ in pts], float)
        ys = np.array([t for _, t in pts], float)
        f: dict[str, list[float]] = {}
        if len(pts) >= 2:
            f["linear"] = [float(c) for c in np.polyfit(xs, ys, 1)[::-1]]
        if len(pts) >= 3:
            f["quadratic"] = [float(c) for c in np.polyfit(xs, ys, 2)[::-1]]
        fits[op] = f
    return by_primes, fits


def measure_set(name: str, reps: int, btp_log_slots: list[int | None], work: pathlib.Path,
                log: Callable[[str], None]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    lit = literal_for(name)
    p = L.LattigoParams(lit)
    log(p.describe())
    keys = work / "keys_full"
    kg = run_keygen(p.literal, keys, log)
    baseline = measure_baseline(p.literal, keys, log)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    cl, ev = L.Client(p, keys / "client"), L.Evaluator(p, keys / "server")
    load_s = time.perf_counter() - t0
    log(f"  server keys loaded in {load_s:.1f}s (+{(rss_bytes() - rss0) / 2**20:.0f} MiB RSS)")
    bootstrapper = None
    if p.bootstrap is not None and ev.has_bootstrap:
        bootstrapper = measure_bootstrapper(ev, "", log)
    server = keys / "server"
    key_bytes = {f.name: f.stat().st_size for f in sorted(server.iterdir())}
    key_bytes["secret.key"] = (keys / "client" / "secret.key").stat().st_size
    n_gk = len(kg["steps"])
    key_bytes["galois_key_one_step"] = int(key_bytes["galois.key"] / max(1, n_gk))
    if "bootstrap_galois_keys" in kg and kg.get("bootstrap_galois_keys"):
        key_bytes["bootstrap_galois_keys"] = kg["bootstrap_galois_keys"]

    # call overhead: a trivial call and a rotate at level 0
    n = 20000
    t0 = time.perf_counter()
    for i in range(n):
        L.noop(i)
    noop_s = (time.perf_counter() - t0) / n

    x = rng.uniform(-1, 1, p.slots)
    cases = {lv: make_cases(p, cl, ev, x, lv) for lv in range(p.max_level + 1)}
    t0 = time.perf_counter()
    med, mn = time_interleaved(cases, reps)
    log(f"  timed {len(cases)} levels x {len(OPS)} ops x {reps} rounds in {time.perf_counter() - t0:.1f}s")
    rows = []
    for lv in range(p.max_level + 1):
        for tab in (med[lv], mn[lv]):  # the hoisted batch of 8 -> per extra rotation
            if tab.get("rotate_hoisted_extra") is not None:
                tab["rotate_hoisted_extra"] = max(0.0, (tab["rotate_hoisted_extra"] - tab["rotate"]) / (HOIST - 1))
        ct = cl.encrypt(x, level=lv)
        rows.append({"level": lv, "primes": lv + 1, "ops_s": med[lv], "ops_min_s": mn[lv],
                     "ciphertext_bytes": {"serialized": len(ct.to_bytes()), "raw": 2 * (lv + 1) * p.n * 8}})
    by_primes, fits = fit(rows)
    errors = measure_errors(p, cl, ev, rng)
    log("  errors (max abs, |x|<=1): " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    noise = measure_noise(p, cl, ev, rng)
    if p.bootstrap is not None and ev.has_bootstrap:
        noise.update(measure_refresh_growth(p, cl, ev, rng, noise["refresh"]))
    log("  noise (std x scale): " + ", ".join(f"{k} {v:.3g}" for k, v in noise.items() if isinstance(v, float)))

    boots = []
    sparse = [ls for ls in btp_log_slots if ls is not None and ls != p.log_slots]
    if p.bootstrap is not None and ev.has_bootstrap:
        boots.append(measure_bootstrap(p, cl, ev, rng, reps=3, log=log))
        errors["bootstrap"] = boots[0]["error_max_abs_le_1"]
    server_peak = peak_rss_bytes()
    go_mem = L.go_memory()
    if sparse:  # one bootstrapping key set in memory at a time: the full set's goes first
        cl.close()
        ev.close()
        L.free_os_memory()
        for ls in sparse:
            boots.append(measure_sparse_bootstrap(name, ls, work, rng, log))

    by_slots = measure_encode_slots(name, sparse, reps, work, log) if sparse else {}
    rot0 = rows[0]["ops_s"]["rotate"]
    b = p.bootstrap
    return {
        "set": name, "description": L.REFERENCE_SETS.get(name) or LATTIGO_SETS.get(name, {}).get("security_source")
        or "INSECURE toy set",
        "security": "insecure" if p.insecure else "128 (Lattigo default bootstrapping set)" if name in L.REFERENCE_SETS
        else f"128 (Lattigo's {LATTIGO_SETS[name]['base']} with another bootstrapping circuit, Q*P within its bound)",
        "poly_degree": p.n, "slot_count": p.slots, "log_slots": p.log_slots,
        "coeff_bits": [round(v, 3) for v in p.bits()], "q": [str(q) for q in p.q], "p": [str(q) for q in p.p],
        "log_qp": p.log_qp, "chain_length": p.max_level + 1, "default_scale": p.default_scale,
        "bootstrap_params": None if b is None else {
            "depth": b.depth, "cts_depth": b.cts_depth, "evalmod_depth": b.evalmod_depth, "stc_depth": b.stc_depth,
            "log_qp": b.log_qp, "output_level": b.output_level, "message_ratio": b.message_ratio,
            "max_abs_value": b.max_abs_value, "ephemeral_h": b.ephemeral_h,
            "q_bits": [round(math.log2(q), 2) for q in b.q], "p_bits": [round(math.log2(q), 2) for q in b.p]},
        "keygen": {"seconds": kg["seconds"], "wall_s": kg["wall_s"], "cpu_s": kg["cpu_s"],
                   "peak_rss_bytes": kg["peak_rss_bytes"], "galois_steps": kg["steps"]},
        "server_load_s": load_s, "server_peak_rss_bytes": server_peak, "server_baseline": baseline,
        "bootstrapper": bootstrapper,
        "key_bytes": key_bytes,
        "call_overhead_s": {"noop": noop_s, "rotate_level0": rot0},
        "levels": rows, "by_primes": by_primes, "fits": fits, "by_slots": by_slots,
        "errors": errors, "noise": noise, "bootstrap": boots,
        **dict(zip(("plaintext_generation_s", "plaintext_lookup_s"), measure_plaintext_generation(p.n, log))),
        "go_memory": go_mem,
    }


def measure_bootstrapper(ev: Any, label: str, log: Callable[[str], None]) -> dict[str, Any]:
    """What the bootstrapping evaluator (its CoeffsToSlots/SlotsToCoeffs matrices, encoded at the
    bootstrap's primes, built on first use) adds to a server beside its keys: build seconds, Go
    heap and RSS."""
    L.free_os_memory()
    heap0, rss1 = L.go_memory().get("heap_inuse", 0), rss_bytes()
    t0 = time.perf_counter()
    ev.prepare_bootstrap(1)
    build_s = time.perf_counter() - t0
    L.free_os_memory()
    out = {"build_s": build_s, "heap_bytes": max(0, L.go_memory().get("heap_inuse", 0) - heap0),
           "rss_bytes": max(0, rss_bytes() - rss1)}
    log(f"  {label}bootstrapper built in {build_s:.1f}s (+{out['heap_bytes'] / 2**20:.0f} MiB Go heap, "
        f"+{out['rss_bytes'] / 2**20:.0f} MiB RSS)")
    return out


def measure_sparse_bootstrap(name: str, log_slots: int, work: pathlib.Path, rng: np.random.Generator,
                             log: Callable[[str], None]) -> dict[str, Any]:
    """The set bootstrapping ``2^log_slots`` slots (a program whose ciphertexts use that many):
    its own keys (generated in a child, then loaded), what its bootstrapping evaluator adds to
    the server, and its bootstrap (:func:`measure_bootstrap`).  The entry carries its own
    ``key_bytes`` and ``bootstrapper``: fewer slots need other CoeffsToSlots/SlotsToCoeffs
    rotations and smaller matrices."""
    p = L.LattigoParams(literal_for(name, log_slots))
    keys = work / f"keys_{log_slots}"
    kg = run_keygen(p.literal, keys, log)
    L.free_os_memory()
    cl, ev = L.Client(p, keys / "client"), L.Evaluator(p, keys / "server")
    try:
        bootstrapper = measure_bootstrapper(ev, f"2^{log_slots} slots: ", log)
        res = measure_bootstrap(p, cl, ev, rng, reps=3, log=log)
    finally:
        cl.close()
        ev.close()
        L.free_os_memory()
    res["key_bytes"] = {f.name: f.stat().st_size for f in sorted((keys / "server").iterdir())}
    res["bootstrapper"] = bootstrapper
    res["keygen_seconds"] = kg["seconds"]
    return res


def measure_encode_slots(name: str, log_slots: list[int], reps: int, work: pathlib.Path,
                         log: Callable[[str], None]) -> dict[str, Any]:
    """Encoding a slot vector at every level when ciphertexts use ``2^ls`` slots (sparse
    packing: a DFT half or a quarter the size before the same NTTs), timed interleaved with the
    set's full-slot encoding (``full_same_run``, for comparison with the table's): {slots: entry}.
    Only a public key is made (encoding needs no other)."""
    sessions = {}
    try:
        for ls in [None, *log_slots]:
            p = L.LattigoParams(literal_for(name, ls))
            d = work / f"enc_{p.log_slots}"
            L.keygen(p, d / "client", d / "server", relin=False, bootstrap=False)
            sessions[p.log_slots] = (p, L.Evaluator(p, d / "server"))
        rng = np.random.default_rng(2)
        cases = {}
        for ls, (p, ev) in sessions.items():
            x = rng.uniform(-1, 1, p.slots)
            for lv in range(p.max_level + 1):
                cases[(ls, lv)] = {"encode": (lambda ev=ev, x=x, lv=lv, s=p.default_scale:
                                              ev.encode(x, level=lv, scale=s))}
        med, _ = time_interleaved(cases, reps)
    finally:
        for _, ev in sessions.values():
            ev.close()
    full = max(sessions)  # the set's own slot count
    same_run = [[lv + 1, med[(full, lv)]["encode"]] for lv in range(sessions[full][0].max_level + 1)]
    out = {}
    for ls in log_slots:
        p = sessions[ls][0]
        pts = [[lv + 1, med[(ls, lv)]["encode"]] for lv in range(p.max_level + 1)]
        out[str(p.slots)] = {"log_slots": ls, "by_primes": {"encode": pts}, "full_same_run": {"encode": same_run}}
        ratio = statistics.median(a[1] / b[1] for a, b in zip(pts, same_run))
        log(f"  encode at 2^{ls} slots: {pts[-1][1] * 1e3:.2f} ms at the top level, {ratio:.2f}x the full "
            f"packing's ({same_run[-1][1] * 1e3:.2f} ms), timed interleaved")
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **L.version()}


def print_tables(ring: dict[str, Any]) -> None:
    cols = list(OPS)
    print(f"\n{ring['set']}: N={ring['poly_degree']} slots={ring['slot_count']} q bits {ring['coeff_bits']} "
          f"({ring['security']}); ms per op (median)")
    print(f"{'level':>5} {'primes':>6} " + " ".join(f"{c[:12]:>12}" for c in cols))
    for r in ring["levels"]:
        cells = " ".join(f"{'-':>12}" if r["ops_s"][c] is None else f"{r['ops_s'][c] * 1e3:12.3f}" for c in cols)
        print(f"{r['level']:>5} {r['primes']:>6} {cells}")
    kb = ring["key_bytes"]
    print("key bytes: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" if k.endswith(".key") or k == "galois_key_one_step"
                                    else f"{k} {v}" for k, v in kb.items()))
    kg = ring["keygen"]
    print(f"keygen: {kg['wall_s']:.2f}s wall, {kg['cpu_s']:.2f}s CPU, "
          f"peak RSS {kg['peak_rss_bytes'] / 2**20:.0f} MiB; "
          + ", ".join(f"{k} {v:.3f}s" for k, v in kg["seconds"].items()))
    print(f"server: keys loaded in {ring['server_load_s']:.2f}s, "
          f"peak RSS {ring['server_peak_rss_bytes'] / 2**20:.0f} MiB")
    co = ring["call_overhead_s"]
    print(f"ctypes call overhead: trivial call {co['noop'] * 1e6:.2f} us, "
          f"rotate at level 0 {co['rotate_level0'] * 1e3:.3f} ms")
    print("errors (max abs, |x|<=1): " + ", ".join(f"{k} {v:.2e}" for k, v in ring["errors"].items()))
    for b in ring["bootstrap"]:
        many = b.get("many")
        print(f"bootstrap 2^{b['log_slots']} slots: {b['wall_s']:.3f}s wall, {b['cpu_s']:.3f}s CPU, "
              f"depth {b['depth']}, out level {b['output_level']} scale 2^{math.log2(b['output_scale']):g}, "
              f"error {b['error_max_abs_le_1']:.2e} (|x|<=1), {b['error_at_max_abs_value']:.2e} "
              f"(|x|<={b['max_abs_value']:g}), level-0 input "
              f"{b['error_level0_input']:.2e}"
              + (f"; bootstrap_many {many['ciphertexts']} cts: {many['wall_s']:.3f}s wall, {many['cpu_s']:.3f}s CPU"
                 if many else ""))


def write_json_atomic(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    derived = [k for k, v in LATTIGO_SETS.items() if v.get("base") in L.REFERENCE_SETS]
    sets = list(L.REFERENCE_SETS) + derived + [k for k in L.INSECURE_SETS if "nobtp" not in k]
    ap.add_argument("--set", default="toy-n12", help=f"parameter set: {', '.join(sets)}")
    ap.add_argument("-o", "--out", type=pathlib.Path, default=None,
                    help="output JSON (default: hecompiler/data/cost_lattigo-<set>.json, the table bundled with the compiler)")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per op (median; default 5)")
    ap.add_argument("--btp-log-slots", default=None,
                    help="comma-separated log2 slot counts to bootstrap at besides the set's own, each with its own "
                         "keys (default: 2 and 4 below full for the insecure sets, none for the secure ones)")
    ap.add_argument("--workdir", type=pathlib.Path, default=None, help="where keys go (default: a temp dir, removed)")
    ap.add_argument("--gogc", type=int, default=None,
                    help="Go GC percent (default: 20 for the secure sets, whose keys take GBs, else Go's 100)")
    ap.add_argument("--add-to", type=pathlib.Path, default=None, metavar="TABLE",
                    help="measure only the --btp-log-slots bootstraps (each with its own keys) and add them to the "
                         "bootstrap list of this existing table of the same set (replacing entries of those slot counts)")
    ap.add_argument("--baseline", action="store_true",
                    help="with --add-to: measure only the server's memory besides its keys (keygen, then a "
                         "child process loads the keys as `hecompile eval` does) and write it to the table")
    ap.add_argument("--refresh-growth", action="store_true",
                    help="with --add-to: measure only how the bootstrap's error grows with its input's mean and "
                         "spread (keygen with the bootstrapping keys, a few bootstraps) and add it to the noise")
    ap.add_argument("--encode", action="store_true",
                    help="with --add-to: measure only the encoding at the --btp-log-slots slot counts (sparse "
                         "packing) at every level, and write it to the table's by_slots")
    ap.add_argument("--keygen-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--keys", help=argparse.SUPPRESS)
    ap.add_argument("--literal", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    secure = args.set in L.REFERENCE_SETS or args.set in derived
    if args.gogc is None and secure:
        args.gogc = 20
    if args.gogc is not None:
        os.environ["GOGC"] = str(args.gogc)  # inherited by the keygen child
        L.set_gc_percent(args.gogc)
    if args.keygen_child:
        return keygen_child(args)
    if args.baseline_child:
        return baseline_child(args)
    if args.set not in sets:
        ap.error(f"--set {args.set!r}: unknown (sets: {', '.join(sets)})")
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.btp_log_slots is None:
        full = L.LattigoParams(literal_for(args.set)).log_slots
        extra = [] if secure else [full - 2, full - 4]
    else:
        try:
            extra = [int(v) for v in args.btp_log_slots.split(",") if v.strip()]
        except ValueError:
            ap.error(f"--btp-log-slots {args.btp_log_slots!r}: expected comma-separated integers")
    out = args.out or ROOT / "hecompiler" / "data" / f"cost_lattigo-{args.set}.json"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    if (args.baseline or args.encode or args.refresh_growth) and args.add_to is None:
        ap.error("--baseline, --encode and --refresh-growth go with --add-to TABLE (a full measurement "
                 "includes them)")
    if args.add_to is not None:
        return add_bootstraps(args, extra, log, t_start)
    with tempfile.TemporaryDirectory(prefix="lattigo_costs_") as tmp:
        work = args.workdir or pathlib.Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ring = measure_set(args.set, args.reps, [None] + extra, work, log)
    result = {
        "schema": SCHEMA,
        "generated_by": "benchmarks/measure_lattigo_costs.py",
        "command": " ".join(["benchmarks/measure_lattigo_costs.py"] + list(sys.argv[1:] if argv is None else argv)),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": machine_info(),
        "reps": args.reps,
        "gogc": args.gogc if args.gogc is not None else int(os.environ.get("GOGC", "100")),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "level_convention": "lattigo: level l keeps primes q_0..q_l (primes = level + 1)",
        "ops": OPS,
        "rings": [ring],
        "memory": {"baseline_rss_bytes": ring["server_baseline"]["baseline_rss_bytes"]},
    }
    print_tables(ring)
    write_json_atomic(out, result)
    print(f"\nwrote {out} ({result['wall_s']} s)")
    return 0


@contextlib.contextmanager
def _workdir(args):
    """Where ``--add-to`` puts its keys: ``--workdir``, else a temporary directory, removed after."""
    with tempfile.TemporaryDirectory(prefix="lattigo_costs_") as tmp:
        work = args.workdir or pathlib.Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        yield work


def _table_literal(args, ring: dict[str, Any]) -> dict[str, Any]:
    """The parameter literal of the table's own packing (its slot count)."""
    lit = literal_for(args.set)
    if ring.get("log_slots") is not None:
        lit["log_slots"] = int(ring["log_slots"])
    return lit


def add_bootstraps(args, extra: list[int], log: Callable[[str], None], t_start: float) -> int:
    """``--add-to TABLE``: the sparse bootstraps measured and merged into an existing table, or
    only the server's memory besides its keys (``--baseline``), the bootstrap's error growth
    (``--refresh-growth``) or the encoding at the sparse slot counts (``--encode``)."""
    try:
        data = json.loads(args.add_to.read_text())
        ring = data["rings"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise SystemExit(f"--add-to {args.add_to}: not a cost table ({type(e).__name__}: {e})")
    if ring.get("set") != args.set:
        raise SystemExit(f"--add-to {args.add_to}: a table of set {ring.get('set')!r}, not {args.set!r}")
    if args.baseline:
        lit = _table_literal(args, ring)
        with _workdir(args) as work:
            run_keygen(lit, work / "keys_full", log)
            ring["server_baseline"] = measure_baseline(lit, work / "keys_full", log)
        data["memory"] = {"baseline_rss_bytes": ring["server_baseline"]["baseline_rss_bytes"]}
        _record_addition(args, data, {"memory": ["baseline_rss_bytes"]}, t_start)
        return 0
    if args.refresh_growth:
        p = L.LattigoParams(_table_literal(args, ring))
        with _workdir(args) as work:
            run_keygen(p.literal, work / "keys_full", log)
            cl, ev = L.Client(p, work / "keys_full" / "client"), L.Evaluator(p, work / "keys_full" / "server")
            try:
                got = measure_refresh_growth(p, cl, ev, np.random.default_rng(3), float(ring["noise"]["refresh"]))
            finally:
                cl.close()
                ev.close()
        ring["noise"].update(got)
        log("  refresh growth (std x scale per cubed unit): " + ", ".join(f"{k} {v:.3g}" for k, v in got.items()))
        _record_addition(args, data, {"noise": sorted(got)}, t_start)
        return 0
    full = ring.get("log_slots")
    extra = [ls for ls in extra if ls != full]
    if not extra:
        raise SystemExit("--add-to needs --btp-log-slots with slot counts below the set's own")
    if args.encode:
        with _workdir(args) as work:
            ring.setdefault("by_slots", {}).update(measure_encode_slots(args.set, extra, args.reps, work, log))
        _record_addition(args, data, {"by_slots": sorted(str(1 << ls) for ls in extra)}, t_start)
        return 0
    rng = np.random.default_rng(1)
    with _workdir(args) as work:
        new = [measure_sparse_bootstrap(args.set, ls, work, rng, log) for ls in extra]
    keep = [b for b in ring.get("bootstrap", []) if b.get("log_slots") not in set(extra)]
    ring["bootstrap"] = sorted(keep + new, key=lambda b: -b["log_slots"])
    for b in new:
        log(f"bootstrap 2^{b['log_slots']} slots: {b['wall_s']:.2f}s wall; keys "
            f"{b['key_bytes'].get('bootstrap.key', 0) / 2**30:.2f} GiB; bootstrapper "
            f"{b['bootstrapper']['heap_bytes'] / 2**30:.2f} GiB")
    _record_addition(args, data, {"log_slots": extra}, t_start)
    return 0


def _record_addition(args, data: dict[str, Any], what: dict[str, Any], t_start: float) -> None:
    """Note what ``--add-to`` measured (command, when, where) in the table, and write it."""
    cmd = " ".join(["benchmarks/measure_lattigo_costs.py"] + sys.argv[1:])
    data.setdefault("added", []).append({
        "command": cmd, **what, "wall_s": round(time.perf_counter() - t_start, 1),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": machine_info()})
    write_json_atomic(args.add_to, data)
    print(f"added to {args.add_to} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
