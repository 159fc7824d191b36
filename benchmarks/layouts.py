"""Before/after rows of issue 12 (HE-program passes, rotation keys as a budget, plaintexts), one run.

    python benchmarks/layouts.py                 # every row below (about 15 minutes on 2 cores)
    python benchmarks/layouts.py --no-big        # without ResNet-18/50 at 224x224
    python benchmarks/layouts.py --models tiny_resnet_poly:ni
    python benchmarks/layouts.py --models resnet18_poly_224:ca --variants after

``before`` lowers with no HE-program passes (``LoweringOptions(he_passes="")``: one Galois key
per rotation step the program names, every mod-switch where the lowering put it); ``after`` is
the default pipeline (``share-mod-switch,hoist-rotations,select-rotation-keys``: keys chosen
under the memory budget, every rotation composed from them).  Everything else (planner, layouts,
parameters search) is the same code, so the planner may pick other parameters for the two when
the key memory changes what fits.  Both search the layout strategies (hecompiler/layout_strategy.py)
at the chosen parameters: ``params`` ends with ``layout=aligned`` when the power-of-two grid won.

Rows (model:mode): ``ca`` client-aided refreshes under SEAL (the default plan), ``ni``
non-interactive under SEAL at 128-bit (``--max-refreshes 0``, budget ``--ni-memory``, 22 GiB
by default as in the issue).  A row is run under real SEAL encryption (keygen, encrypt,
evaluate, decrypt in one child process) when it is in RUN and its predicted peak is under
``--run-limit`` (6 GiB); the others are compiled and predicted only.

Columns: chosen parameters; Galois keys and their bytes; predicted peak memory; ct-pt mults and
rotations per inference; predicted seconds (one core, the bundled SEAL cost table); measured
seconds (keygen + encrypt + eval + decrypt, wall), CPU seconds of the same, peak RSS of the run
process (wait4), max error against onnxruntime relative to its output range.  Each compile and
each run is its own child process, so memory is per step.  Timings are contended when other
jobs share the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
MODELS_DIR = ROOT / "models"

#: (model, mode) rows; RUN: rows run under SEAL when they fit --run-limit
ROWS = [("tiny_resnet_poly", "ca"), ("tiny_resnet_poly", "ni"), ("digits_poly", "ca"), ("digits_relu", "ca"),
        ("resnet20_poly", "ca"), ("resnet8_poly", "ni"), ("resnet18_poly_224", "ca"), ("resnet50_poly_224", "ca")]
RUN = {("tiny_resnet_poly", "ca"), ("tiny_resnet_poly", "ni"), ("digits_poly", "ca"), ("digits_relu", "ca"),
       ("resnet20_poly", "ca"), ("resnet8_poly", "ni")}
BIG = {"resnet18_poly_224", "resnet50_poly_224"}
VARIANTS = {"before": "", "after": None}


def model_paths(name: str) -> tuple[Path, Path]:
    if (MODELS_DIR / f"{name}.onnx").exists():
        if name.startswith("digits"):
            return MODELS_DIR / f"{name}.onnx", MODELS_DIR / "digits_test_x.npy"
        return MODELS_DIR / f"{name}.onnx", MODELS_DIR / f"{name}.input.npy"
    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / f"{name}.onnx"
    if not p.exists():
        subprocess.run([sys.executable, str(MODELS_DIR / "build_models.py"), "--out", str(CACHE), name],
                       check=True, stdout=subprocess.DEVNULL)
    return p, CACHE / f"{name}.input.npy"


def _input(name: str):
    import numpy as np

    _, xp = model_paths(name)
    x = np.load(xp)
    return x[:1] if name.startswith("digits") else x


# --------------------------------------------------------------------------- child steps

def child_compile(name: str, mode: str, variant: str, ni_memory: int, out: str) -> dict:
    import numpy as np

    from hecompiler.compiler import CompileOptions, compile_model
    from hecompiler.hecfile import save_hec
    from hecompiler.lower import LoweringOptions
    from hecompiler.planner import PlanOptions

    path, _ = model_paths(name)
    big = name in BIG
    plan = PlanOptions(lowering=LoweringOptions(he_passes=VARIANTS[variant]))
    if mode == "ni":
        plan = PlanOptions(max_refreshes=0, max_memory_bytes=ni_memory, lowering=plan.lowering)
    kw = {}
    if name == "digits_relu":
        kw = dict(calibration=np.load(MODELS_DIR / "digits_calib_x.npy"),
                  labels=np.load(MODELS_DIR / "digits_calib_y.npy"))
    elif not big:
        kw = dict(sample=_input(name))
    t0 = time.perf_counter()
    try:
        res = compile_model(str(path), CompileOptions(plan=plan, check=not big, **kw))
    except Exception as e:  # noqa: BLE001  (a row that cannot be planned is a result)
        return {"error": str(e).splitlines()[0][:140], "compile_s": time.perf_counter() - t0}
    secs = time.perf_counter() - t0
    r = res.metadata["report"]
    c = res.chosen.cost
    save_hec(out, res.prog, res.metadata)
    rk = r.get("rotation_keys") or {}
    return {"params": res.chosen.label, "keys": c.galois_keys, "galois_key_bytes": r["galois_key_bytes"],
            "pred_mem": c.memory_bytes, "mul_plain": r["ops"].get("mul_plain", 0), "rotate": r["ops"].get("rotate", 0),
            "refreshes": r["refreshes"], "pred_s": r["predicted_seconds"], "pred_encode_s": r["predicted_encode_seconds"],
            "compile_s": secs, "fidelity": (r.get("fidelity") or {}).get("relative_to_range"),
            "keys_direct": rk.get("keys_before"), "rotations_direct": rk.get("rotations_direct")}


def child_run(name: str, hec: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    from hecompiler.backends.seal import run_encrypted
    from hecompiler.hecfile import load_hec

    path, _ = model_paths(name)
    prog, _ = load_hec(hec)
    x = _input(name).astype(np.float32)
    c0 = time.process_time()
    outs, st = run_encrypted(prog, {prog.inputs[0].name: x})
    cpu = time.process_time() - c0
    y = np.asarray(outs[prog.outputs[0].name], np.float64).reshape(-1)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0], np.float64).reshape(-1)
    return {"seal_s": st.phases["total"], "keygen_s": st.phases["keygen"], "eval_s": st.phases["eval"], "cpu_s": cpu,
            "err": float(np.abs(y - ref).max() / (np.ptp(ref) or 1.0)), "argmax": bool(np.argmax(y) == np.argmax(ref)),
            "seal_rotations": st.op_counts.get("rotate", 0), "seal_keys": st.galois_keys,
            "plaintexts": st.plaintexts, "plaintexts_reused": st.plaintexts_reused}


def _child(args: list[str]) -> tuple[dict, float, int]:
    """Run this script as a child step; returns its JSON, CPU seconds and peak RSS (wait4)."""
    p = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.stdout.read(), p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status):
        return {"error": (err.strip().splitlines() or ["?"])[-1][:140]}, 0.0, 0
    return json.loads(out.strip().splitlines()[-1]), ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024


# --------------------------------------------------------------------------- table

def _g(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f}G" if b >= 2**30 else f"{b / 2**20:.0f}M"


def _s(v, fmt="{:.1f}s") -> str:
    return "-" if v is None else fmt.format(v)


HEAD = (f"{'model':<18} {'mode':<4} {'variant':<7} {'params':<23} {'keys':>5} {'key B':>7} {'p.peak':>7} "
        f"{'ct-pt':>8} {'rot':>7} {'pred':>8} {'SEAL':>7} {'CPU':>7} {'s.peak':>7} {'err/range':>9}")


def fmt_row(name, mode, variant, c, r) -> str:
    if "error" in c:
        return f"{name:<18} {mode:<4} {variant:<7} no plan: {c['error']}"
    r = r or {}
    err = "-" if "err" not in r else f"{r['err']:.1e}"
    return (f"{name:<18} {mode:<4} {variant:<7} {c['params']:<23} {c['keys']:>5} {_g(c['galois_key_bytes']):>7} "
            f"{_g(c['pred_mem']):>7} {c['mul_plain']:>8} {c['rotate']:>7} {_s(c['pred_s']):>8} "
            f"{_s(r.get('seal_s')):>7} {_s(r.get('cpu_s')):>7} {_g(r.get('peak')):>7} {err:>9}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="*", help="rows as MODEL:MODE (ca or ni); default: all")
    ap.add_argument("--no-big", action="store_true", help="leave out ResNet-18/50 at 224x224")
    ap.add_argument("--no-run", action="store_true", help="compile and predict only")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--ni-memory", default=str(22 * 2**30), help="memory budget of the non-interactive plans (bytes)")
    ap.add_argument("--run-limit", default=str(6 * 2**30), help="run a row under SEAL only below this predicted peak")
    a = ap.parse_args(argv)
    if a.child:
        kind, *rest = a.child
        if kind == "compile":
            name, mode, variant, mem, out = rest
            print(json.dumps(child_compile(name, mode, variant, int(mem), out)))
        else:
            print(json.dumps(child_run(*rest)))
        return 0
    rows = [tuple(m.split(":")) for m in a.models] if a.models else [r for r in ROWS if not (a.no_big and r[0] in BIG)]
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} cores; other jobs may share the machine "
          f"(timings contended)")
    print(HEAD)
    print("-" * len(HEAD))
    for name, mode in rows:
        model_paths(name)
        for variant in a.variants:
            hec = CACHE / f"layouts.{name}.{mode}.{variant}.hec"
            c, _, cpeak = _child(["compile", name, mode, variant, a.ni_memory, str(hec)])
            r = None
            if "error" not in c and not a.no_run and (name, mode) in RUN and c["pred_mem"] < int(a.run_limit):
                r, _, peak = _child(["run", name, str(hec)])
                if "error" in r:
                    r = {"seal_error": r["error"]}
                else:
                    r["peak"] = peak
            print(fmt_row(name, mode, variant, c, r), flush=True)
            if r and "seal_error" in r:
                print(f"    SEAL run failed: {r['seal_error']}", flush=True)
            if r and "keygen_s" in r:
                print(f"    keygen {r['keygen_s']:.2f}s, eval {r['eval_s']:.2f}s; {r['seal_keys']} keys, "
                      f"{r['seal_rotations']} rotations run; plaintexts {r['plaintexts']} encoded, "
                      f"{r['plaintexts_reused']} shared by content; argmax {'agrees' if r['argmax'] else 'DIFFERS'}",
                      flush=True)
            hec.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
