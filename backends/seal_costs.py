"""Measure per-operation CKKS costs, noise and memory with real SEAL (tenseal.sealapi) for the cost model.

Usage (``hecompile calibrate`` runs :func:`main` too, in its quick form, and writes the table of
the machine that will run the programs to the user's cache, where the compiler looks first):
    hecompile calibrate                                    # quick: < 1 minute, user cache
    python benchmarks/measure_seal_costs.py                # ring degrees 2^13, 2^14, 2^15
    python benchmarks/measure_seal_costs.py --big          # ... and 2^16 (security 'none', see below)
    python benchmarks/measure_seal_costs.py --degrees 8192 --reps 3 --out /tmp/c.json

Noise (per ring, ``"noise"``): the standard deviation of the error each operation adds, in slot
units times the scale (so ``std / scale`` is the error of a value at that scale): ``fresh``
(public-key encryption, with encoding and decryption), ``rescale`` (the rounding of a rescale,
measured at the result's scale), ``keyswitch`` (a rotation's key switch; relinearisation is the
same operation) and ``encode`` (encoding a plaintext multiplier).  Key switching puts far more
error in the first slots (slot 0 about 100 times the rest, falling over a few slots; the
same for every key and step), so ``keyswitch_head`` gives its level in each of the first 16
slots and ``keyswitch`` the level elsewhere.  Each is measured on
``noise_samples`` ciphertexts of random slot values at the top level and at the last level with
two primes.  The slot simulator's noise model uses exactly these numbers.

Memory (``"memory"``): the resident size of a fresh process that has imported the compiler and
SEAL (``baseline_rss_bytes``), which the planner's memory prediction adds to keys, ciphertexts
and plaintexts.

Every op goes through backends/seal_ckks.py (the wrapper the executor uses), so the
times include its Python-side checks.  SEAL runs single-threaded here.

Modulus chains: one per ring degree, ``(60, 40 x m, 60)`` with the largest ``m`` inside the
128-bit HE-standard budget (8192: m=2, 200 of 218 bits; 16384: m=7, 400/438;
32768: m=19, 880/881).  SEAL has no 128-bit table entry above 32768, so 2^16 (``--big``)
runs with security ``"none"`` and m=40 (1720 bits, twice the 2^15 data primes); it is
recorded as ``"security": "none"``.

Levels: level = number of rescales consumed (0 = fresh, all data primes active);
``primes`` = active RNS primes = chain_length - level.  Each op is timed at many levels so a
cost model can interpolate in the number of active primes (piecewise-linearly between
the measured points; key-switching ops -- rotate, relinearize, mul_relin -- grow roughly
quadratically in ``primes``, the rest linearly).  Times do not depend on slot values, the
rotation step or the scale; the inputs use scale 2^25 so that every op fits every level.

Output JSON schema (``schema`` = "hecompiler.cost_seal/1"); times in seconds (median of
``reps`` runs after one warm-up; each run sweeps every op at every level, so load bursts
from other processes spoil single samples, not whole ops),
sizes in bytes:

{
  "schema": "hecompiler.cost_seal/1",
  "generated_by": "benchmarks/measure_seal_costs.py",
  "command": str,                                 # the command line that produced the file
  "created_utc": ISO-8601 string,
  "machine": {"cpu": str, "cores": int, "python": str, "tenseal": str, "seal": "4.x"},
  "reps": int, "wall_s": float,              # total measuring time
  "ops": {op_name: description},                  # the op names used below
  "rings": [
    {
      "poly_degree": int, "slot_count": int,
      "coeff_bits": [int, ...],                   # SEAL order, last = special prime
      "security": "tc128" | "none", "total_bits": int, "max_bits_128": int | null,
      "chain_length": int,                        # data levels: 0 .. chain_length-1
      "setup_s": {"context": s, "keygen_secret_public": s,
                  "relin_keys": s, "galois_key_one_step": s},
      "key_bytes": {                              # one object each
        "public_key" | "relin_keys" | "galois_key_one_step" | "secret_key":
            {"serialized": int,                   # SEAL bytes (zstd) + 44-byte envelope
             "raw": int}                          # uncompressed in-memory size, 8 bytes/coeff
      },
      "levels": [
        {"level": int, "primes": int,
         "ops_s": {op_name: seconds | null},      # median; null: op impossible at this level
         "ops_min_s": {op_name: seconds | null},  # fastest sample (least disturbed by load)
         "ciphertext_bytes": {"serialized": int, "raw": int},   # size-2 ciphertext
         "plaintext_bytes":  {"serialized": int, "raw": int}},  # NTT-form plaintext
        ...                                       # ordered by level
      ],
      "by_primes": {op_name: [[primes, seconds], ...]},       # ascending primes
      "fits": {op_name: {"linear": [a, b],        # seconds ~= a + b*primes (least squares)
                         "quadratic": [a, b, c]}} # seconds ~= a + b*p + c*p^2
    }, ...
  ]
}

Op names follow the HE program: rotate, mul_plain, rescale (input at ``level``, output at
level+1), add, add_plain, sub, negate, mul (ct x ct, no relin), relinearize (size 3 -> 2),
mul_relin (mul + relinearize), mod_switch (to level+1), encode (full slot vector at the
level), encode_constant, encrypt (of a pre-encoded plaintext, public key), decrypt
(including decoding).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUNDLED_OUT = ROOT / "hecompiler" / "data" / "cost_seal.json"
SCHEMA = "hecompiler.cost_seal/2"

from . import seal_ckks as S

OPS = {
    "rotate": "rotate_vector by one slot (Galois key switch); cost independent of the step",
    "mul_plain": "multiply_plain ct x pt at the same level",
    "mul_plain_acc": "acc += ct x pt in place (a linear op's accumulation; replaces a mul_plain and an add)",
    "rescale": "rescale_to_next: level -> level+1 (null at the last level)",
    "add": "ct + ct",
    "add_plain": "ct + pt",
    "sub": "ct - ct",
    "negate": "-ct",
    "mul": "ct x ct without relinearization (size 3 result)",
    "relinearize": "size-3 -> size-2 (relin key switch)",
    "mul_relin": "mul followed by relinearize",
    "mod_switch": "mod_switch_to_next without rescaling: level -> level+1 (null at the last level)",
    "encode": "CKKS encode of a full slot vector (float64) at the level",
    "encode_constant": "CKKS encode of one scalar broadcast to all slots",
    "encrypt": "public-key encryption of a pre-encoded plaintext at the level",
    "decrypt": "decryption plus decoding to a float64 vector",
    "ct_save": "a ciphertext serialized to bytes (SEAL's zstd format in the wrapper's envelope: what a helper process gets)",
    "ct_load": "a ciphertext loaded from those bytes, with SEAL's validity check",
}
KEY_SWITCH_OPS = ("rotate", "relinearize", "mul_relin")
SCALE = 2.0**25  # fits even the last (60-bit) level after one product


def chain_for(poly_degree: int) -> tuple[tuple[int, ...], str]:
    """(coeff_bits, security) measured for a ring degree (see module docstring)."""
    if poly_degree <= 32768:
        budget = S.max_coeff_modulus_bits(poly_degree, 128)
        m = (budget - 120) // 40
        return (60,) + (40,) * m + (60,), "tc128"
    m = 40 * (poly_degree // 65536)
    return (60,) + (40,) * m + (60,), "none"


def levels_to_measure(chain_length: int, max_points: int) -> list[int]:
    """All levels if few, else ``max_points`` spread out, always including both ends and the
    last level where rescale/mod_switch are possible."""
    last = chain_length - 1
    if chain_length <= max_points:
        return list(range(chain_length))
    pts = {int(round(x)) for x in np.linspace(0, last, max_points - 1)}
    pts |= {0, max(last - 1, 0), last}
    return sorted(pts)


def time_interleaved(cases: dict[Any, dict[str, Callable[[], Any] | None]], reps: int) -> tuple[dict, dict]:
    """Median and minimum seconds of every (case, op).  One warm-up round, then ``reps``
    rounds that each run every op of every case once, so a burst of load from other
    processes spoils one sample of many ops instead of every sample of one op."""
    samples: dict[Any, dict[str, list[float]]] = {c: {k: [] for k, f in ops.items() if f is not None}
                                                 for c, ops in cases.items()}
    for rnd in range(reps + 1):
        for c, ops in cases.items():
            for k, f in ops.items():
                if f is None:
                    continue
                t0 = time.perf_counter()
                f()
                if rnd:
                    samples[c][k].append(time.perf_counter() - t0)
    med = {c: {k: (statistics.median(samples[c][k]) if k in samples[c] else None) for k in ops}
           for c, ops in cases.items()}
    mn = {c: {k: (min(samples[c][k]) if k in samples[c] else None) for k in ops}
          for c, ops in cases.items()}
    return med, mn


def raw_sizes(n: int, k_total: int, primes: int) -> dict[str, int]:
    w = 8 * n  # one RNS limb of one polynomial
    return {
        "ciphertext": 2 * primes * w,
        "plaintext": primes * w,
        "public_key": 2 * k_total * w,
        "secret_key": k_total * w,
        "ksk": (k_total - 1) * 2 * k_total * w,  # one key-switching key (relin or one Galois)
    }


def make_cases(ctx: Any, client: Any, server: Any, vec: np.ndarray, level: int) -> dict[str, Any]:
    """The op closures timed at ``level`` (None = impossible there) plus their inputs."""
    pt = ctx.encode(vec, SCALE, level)
    a = client.encrypt_plain(pt)
    b = client.encrypt(vec[::-1].copy(), SCALE, level)
    a3 = server.multiply(a, b)
    prod = server.multiply_plain(a, pt)  # scale 2^50: rescalable at levels with >= 2 primes
    acc = server.multiply_plain(b, pt)  # an accumulator at the product's scale
    saved = ctx.to_bytes(a)
    last = level == ctx.max_level
    return {
        "rotate": lambda: server.rotate(a, 1),
        "mul_plain": lambda: server.multiply_plain(a, pt),
        "mul_plain_acc": lambda: server.multiply_plain_accumulate(acc, a, pt),
        "rescale": None if last else (lambda: server.rescale(prod)),
        "add": lambda: server.add(a, b),
        "add_plain": lambda: server.add_plain(a, pt),
        "sub": lambda: server.sub(a, b),
        "negate": lambda: server.negate(a),
        "mul": lambda: server.multiply(a, b),
        "relinearize": lambda: server.relinearize(a3),
        "mul_relin": lambda: server.relinearize(server.multiply(a, b)),
        "mod_switch": None if last else (lambda: server.mod_switch(a, level + 1)),
        "encode": lambda: ctx.encode(vec, SCALE, level),
        "encode_constant": lambda: ctx.encode_constant(0.5, SCALE, level),
        "encrypt": lambda: client.encrypt_plain(pt),
        "decrypt": lambda: client.decrypt(a),
        "ct_save": lambda: ctx.to_bytes(a),
        "ct_load": lambda: ctx.from_bytes("ciphertext", saved),
        "_fixtures": {"a": a, "pt": pt},
    }


def measure_ring(poly_degree: int, reps: int, max_points: int, log: Callable[[str], None]) -> dict[str, Any]:
    coeff_bits, security = chain_for(poly_degree)
    params = S.CkksParams(poly_degree, coeff_bits, security)
    t0 = time.perf_counter()
    ctx = S.CkksContext(params)
    t_ctx = time.perf_counter() - t0
    seal = S._require_seal()

    t0 = time.perf_counter()
    keys = S.KeySet.generate(ctx, galois_steps=(), relin=False)
    t_sk_pk = time.perf_counter() - t0
    kg = seal.KeyGenerator(ctx.seal, keys.secret_key)
    t0 = time.perf_counter()
    rk = seal.RelinKeys()
    kg.create_relin_keys(rk)
    t_rk = time.perf_counter() - t0
    t0 = time.perf_counter()
    gk = seal.GaloisKeys()
    kg.create_galois_keys([S.galois_element(1, poly_degree)], gk)
    t_gk = time.perf_counter() - t0
    keys = S.KeySet(ctx, keys.secret_key, keys.public_key, rk, gk)
    client = S.CkksClient(ctx, keys)
    server = S.CkksServer(ctx, keys)
    log(f"N={poly_degree}: chain {list(coeff_bits)} ({params.total_bits} bits, {security}), "
        f"context {t_ctx:.2f}s, relin key {t_rk:.2f}s, one Galois key {t_gk:.2f}s")

    k_total = len(coeff_bits)
    raw = raw_sizes(poly_degree, k_total, 0)
    key_bytes = {}
    for name, obj, rsize in (("public_key", keys.public_key, raw["public_key"]),
                             ("relin_keys", rk, raw["ksk"]),
                             ("galois_key_one_step", gk, raw["ksk"]),
                             ("secret_key", keys.secret_key, raw["secret_key"])):
        key_bytes[name] = {"serialized": len(ctx.to_bytes(obj)), "raw": rsize}

    rng = np.random.default_rng(0)
    vec = rng.uniform(-1, 1, ctx.slot_count)
    levels = levels_to_measure(ctx.chain_length, max_points)
    cases: dict[int, dict[str, Callable[[], Any] | None]] = {}
    rows = []
    for level in levels:
        cases[level] = make_cases(ctx, client, server, vec, level)
        fx = cases[level]["_fixtures"]  # type: ignore[index]
        sizes = raw_sizes(poly_degree, k_total, ctx.num_primes(level))
        rows.append({
            "level": level,
            "primes": ctx.num_primes(level),
            "ciphertext_bytes": {"serialized": len(ctx.to_bytes(fx["a"])), "raw": sizes["ciphertext"]},
            "plaintext_bytes": {"serialized": len(ctx.to_bytes(fx["pt"])), "raw": sizes["plaintext"]},
        })
        del cases[level]["_fixtures"]
    t0 = time.perf_counter()
    med, mn = time_interleaved(cases, reps)
    log(f"  timed {len(levels)} levels x {len(OPS)} ops x {reps} rounds in {time.perf_counter() - t0:.1f}s")
    for row in rows:
        row["ops_s"] = med[row["level"]]
        row["ops_min_s"] = mn[row["level"]]
        log(f"  level {row['level']:2d} ({row['primes']:2d} primes): rotate {row['ops_s']['rotate'] * 1e3:8.2f} ms, "
            f"mul_plain {row['ops_s']['mul_plain'] * 1e3:7.2f} ms")
    del cases

    by_primes: dict[str, list[list[float]]] = {}
    fits: dict[str, dict[str, list[float]]] = {}
    for op in OPS:
        pts = sorted((r["primes"], r["ops_s"][op]) for r in rows if r["ops_s"][op] is not None)
        by_primes[op] = [[p, t] for p, t in pts]
        x = np.array([p for p, _ in pts], dtype=float)
        y = np.array([t for _, t in pts], dtype=float)
        fit: dict[str, list[float]] = {}
        if len(pts) >= 2:
            fit["linear"] = [float(c) for c in np.polyfit(x, y, 1)[::-1]]
        if len(pts) >= 3:
            fit["quadratic"] = [float(c) for c in np.polyfit(x, y, 2)[::-1]]
        fits[op] = fit

    return {
        "poly_degree": poly_degree,
        "slot_count": ctx.slot_count,
        "coeff_bits": list(coeff_bits),
        "security": security,
        "total_bits": params.total_bits,
        "max_bits_128": S.HE_STANDARD_MAX_BITS[128].get(poly_degree),
        "chain_length": ctx.chain_length,
        "setup_s": {"context": t_ctx, "keygen_secret_public": t_sk_pk,
                    "relin_keys": t_rk, "galois_key_one_step": t_gk},
        "key_bytes": key_bytes,
        "noise": measure_noise(ctx, client, server, keys, log),
        **dict(zip(("plaintext_generation_s", "plaintext_lookup_s"), measure_plaintext_generation(poly_degree, log))),
        "levels": rows,
        "by_primes": by_primes,
        "fits": fits,
    }


NOISE_SAMPLES = 4
NOISE_SCALE = 2.0**40


#: key switching adds much more noise to the first slots (slot 0 about 100x the rest, decaying over a
#: few slots; measured with SEAL 4 through tenseal): those are recorded one by one
NOISE_HEAD_SLOTS = 16
NOISE_KS_REPEAT = 4


def measure_noise(ctx: Any, client: Any, server: Any, keys: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """The error each op adds (standard deviation times the scale; see the module doc).  Key
    switching's error is not the same in every slot: ``keyswitch`` is its level over slots
    ``NOISE_HEAD_SLOTS`` and beyond, ``keyswitch_head`` the first slots one by one."""
    rng = np.random.default_rng(1)
    S_ = ctx.slot_count
    acc: dict[str, list[float]] = {"fresh": [], "rescale": [], "encode": []}
    ks_sq = np.zeros(S_)
    n_ks = 0
    levels = sorted({0, max(ctx.max_level - 1, 0)})
    for level in levels:
        for _ in range(NOISE_SAMPLES):
            m = rng.uniform(-1, 1, S_)
            ct = client.encrypt(m, NOISE_SCALE, level)
            e0 = client.decrypt(ct) - m
            acc["fresh"].append(float(np.std(e0)) * NOISE_SCALE)
            for _ in range(NOISE_KS_REPEAT):  # key switching's per-slot profile needs more samples
                ct_k = client.encrypt(m, NOISE_SCALE, level)
                e0k = client.decrypt(ct_k) - m
                e1 = client.decrypt(server.rotate(ct_k, 1)) - np.roll(m, -1)
                ks_sq += np.maximum(e1 ** 2 - np.roll(e0k, -1) ** 2, 0.0)
                n_ks += 1
            if level < ctx.max_level:
                q = float(ctx.prime_at(level))  # the prime the next rescale drops
                w = rng.uniform(-1, 1, S_)
                prod = server.multiply_plain(ct, ctx.encode(w, q, level))
                exact = m * w
                e_before = client.decrypt(prod) - exact
                res = server.rescale(prod)
                e_after = client.decrypt(res) - exact
                scale_after = float(res.scale)
                acc["rescale"].append(float(np.sqrt(max(np.var(e_after) - np.var(e_before), 0.0))) * scale_after)
                # encoding w at scale q rounds it to 1/q: its share of the product's error is |m|/q
                acc["encode"].append(float(np.std(e_before - e0 * w)) * NOISE_SCALE)
    out: dict[str, Any] = {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in acc.items() if v}
    ks = np.sqrt(ks_sq / n_ks) * NOISE_SCALE
    h = NOISE_HEAD_SLOTS
    out["keyswitch"] = float(np.sqrt(np.mean(ks[h:] ** 2)))
    out["keyswitch_head"] = [float(f"{v:.4g}") for v in ks[:h]]
    out["samples"] = NOISE_SAMPLES * len(levels)
    out["levels"] = levels
    out["scale_bits"] = int(np.log2(NOISE_SCALE))
    log("  noise (std x scale): " + ", ".join(f"{k} {v:.3g}" for k, v in out.items() if isinstance(v, float))
        + f"; key switching in slots 0-3: {', '.join(f'{v:.3g}' for v in ks[:4])}")
    return out


def _time_generation(poly_degree: int, chans: int, hw: tuple[int, int], reps: int) -> tuple[float, float, int]:
    """(seconds, full diagonals' worth of matrix entries, diagonals) to make every plaintext diagonal of a ``chans`` ->
    ``chans`` 3x3 conv on ``hw`` images and look each up by content, as the executor does before
    each ct-pt multiplication whose plaintext it does not hold by reference: the block's matrix
    entries, its diagonals, the giant-step rotation, the all-zero and constant checks, the
    content key.  The op's plan is made before the clock starts (once per op, not per diagonal)."""
    from hecompiler.heprog import Params, PlainRef
    from hecompiler.ir import Graph, TensorType
    from hecompiler.lower import lower
    from hecompiler.plaintexts import PlaintextCache, PlaintextFactory
    from hecompiler.primes import chain_primes
    from hecompiler.runtime import LinearPlans

    g = Graph("gen")
    x = g.add_input("x", TensorType((1, chans, *hw)))
    w = g.add_constant(np.random.default_rng(0).normal(0, 0.1, (chans, chans, 3, 3)).astype(np.float32), "w")
    g.outputs = [g.add_node("Conv", [x, w], {"pads": [1, 1, 1, 1]}).output]
    bits = (60, 40, 40, 60)
    prog, _ = lower(g, Params(poly_degree, bits, 40), chain_primes(poly_degree, bits)[:-1])
    S = prog.params.slots
    best = float("inf")
    n = 0
    for _ in range(reps):
        pf = PlaintextFactory(prog)
        plans = LinearPlans(prog, pf)
        lids = [ins.plain.args[0] for ins in prog.instrs if ins.op == "linear"]
        for lid in lids:
            plans.plan(lid)
        n = 0
        t0 = time.perf_counter()
        for lid in lids:
            for j, gs in plans.plan(lid).giant.items():
                for gstep, terms in gs.items():
                    for (i, _b, d) in terms:
                        vec = pf.vector(PlainRef("diag", (lid, j, i, d, -gstep % S), 1.0))
                        if np.any(vec) and not np.all(vec == vec[0]):
                            PlaintextCache.content_key(vec, 1, 1.0)
                        n += 1
        best = min(best, time.perf_counter() - t0)
    entries = sum(lin.counts.get("entries", 0) for lin in prog.linears)
    return best, entries / S, n


def measure_plaintext_generation(poly_degree: int, log: Callable[[str], None], reps: int = 2) -> tuple[float, float]:
    """(seconds per full diagonal's worth of matrix entries, seconds per product) of making
    plaintext diagonals from compact weights (see :func:`_time_generation`): making a block's
    diagonals costs about its matrix entries (a diagonal of ``slots`` entries, the first figure,
    on a 16->16 conv filling the slots), and each product's plaintext is then checked and looked
    up by content (the second figure, timed on its own)."""
    from hecompiler.plaintexts import PlaintextCache

    slots = poly_degree // 2
    side = int(np.sqrt(slots // 16))
    t, full_diagonals, n = _time_generation(poly_degree, 16, (side, slots // 16 // side), reps)
    vec = np.random.default_rng(1).normal(size=slots)
    k = 200
    t0 = time.perf_counter()
    for _ in range(k):
        if np.any(vec) and not np.all(vec == vec[0]):
            PlaintextCache.content_key(vec, 1, 1.0)
    lookup = (time.perf_counter() - t0) / k
    full = max(0.0, t - n * lookup) / full_diagonals
    log(f"  plaintext generation: {full * 1e3:.3f} ms per full diagonal of entries, {lookup * 1e3:.3f} ms "
        f"per product's content lookup ({n} diagonals of a 16-channel {side}x{slots // 16 // side} conv)")
    return full, lookup


def baseline_rss_bytes() -> int:
    """Peak resident size of a fresh Python process that imported the compiler, SEAL (tenseal)
    and onnxruntime: what a run costs before any key or ciphertext exists."""
    import subprocess

    code = ("import hecompiler, hecompiler.backends.seal, hecompiler.backends.sim, onnxruntime\n"
            "from hecompiler.costmodel import peak_rss_bytes\nprint(peak_rss_bytes())")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return 0


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import tenseal
        tver = tenseal.__version__
    except Exception:  # pragma: no cover
        tver = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "tenseal": tver, "seal": "4.x (bundled with tenseal)"}


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def print_tables(result: dict[str, Any]) -> None:
    cols = ["rotate", "mul_plain", "rescale", "add", "add_plain", "mul_relin", "mod_switch",
            "encode", "encrypt", "decrypt"]
    for ring in result["rings"]:
        print(f"\nN={ring['poly_degree']} chain={ring['coeff_bits']} ({ring['total_bits']} bits, "
              f"{ring['security']}); times in ms (median of {result['reps']})")
        head = f"{'level':>5} {'primes':>6} " + " ".join(f"{c:>10}" for c in cols) + f" {'ct MB':>7} {'pt MB':>7}"
        print(head)
        for r in ring["levels"]:
            cells = " ".join(f"{'-':>10}" if r['ops_s'][c] is None else f"{r['ops_s'][c] * 1e3:10.3f}" for c in cols)
            print(f"{r['level']:>5} {r['primes']:>6} {cells} {_mb(r['ciphertext_bytes']['serialized']):>7} "
                  f"{_mb(r['plaintext_bytes']['serialized']):>7}")
        kb = ring["key_bytes"]
        print("keys (MB serialized / raw): " + ", ".join(
            f"{k} {_mb(v['serialized'])}/{_mb(v['raw'])}" for k, v in kb.items()))
        st = ring["setup_s"]
        print("setup (s): " + ", ".join(f"{k} {v:.3f}" for k, v in st.items()))


def write_json_atomic(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a data file should be readable
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def main(argv: list[str] | None = None, default_out: pathlib.Path = BUNDLED_OUT, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", "-o", type=pathlib.Path, default=default_out, help=f"output JSON (default {default_out})")
    ap.add_argument("--quick", action="store_true",
                    help="3 repetitions at 5 levels per ring: under a minute, a few percent less precise")
    ap.add_argument("--big", action="store_true", help="also measure N=2^16 (security 'none'; several GB of keys)")
    ap.add_argument("--degrees", type=str, default=None,
                    help="comma-separated ring degrees, overrides the default set")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per op (median; default 7)")
    ap.add_argument("--max-levels", type=int, default=24,
                    help="at most this many levels measured per ring (default 24)")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.max_levels = min(args.reps, 3), min(args.max_levels, 5)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.degrees:
        try:
            degrees = [int(x) for x in args.degrees.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--degrees {args.degrees!r}: expected comma-separated integers")
    else:
        degrees = [8192, 16384, 32768] + ([65536] if args.big else [])
    for n in degrees:
        if n < 8192 or n > 65536 or n & (n - 1):
            ap.error(f"--degrees: {n} is not a power of two in [8192, 65536]")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    rings = []
    for n in degrees:
        t0 = time.perf_counter()
        rings.append(measure_ring(n, args.reps, args.max_levels if n < 65536 else min(args.max_levels, 10), log))
        log(f"N={n} done in {time.perf_counter() - t0:.1f}s")
    result = {
        "schema": SCHEMA,
        "generated_by": "hecompiler.backends.seal_costs",
        "command": " ".join([prog or "benchmarks/measure_seal_costs.py"] + list(sys.argv[1:] if argv is None else argv)),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": machine_info(),
        "reps": args.reps,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "ops": OPS,
        "memory": {"baseline_rss_bytes": baseline_rss_bytes()},
        "rings": rings,
    }
    print_tables(result)
    write_json_atomic(args.out, result)
    print(f"\nwrote {args.out} ({result['wall_s']} s)")
    return 0


