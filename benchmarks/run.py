"""Benchmark table for the reference models: compile cost, HE op counts, keys,
depth, predicted and measured SEAL latency, memory, and error against onnxruntime.

    python benchmarks/run.py                 # tiny ResNet, ResNet-20 (poly); SEAL runs where they fit
    python benchmarks/run.py --big           # also the 224x224 ResNet-50-shaped model (compile only)
    python benchmarks/run.py --models resnet20_poly --no-seal

Each compile and each encrypted run happens in a child process, so the peak
memory printed is that step's own (VmHWM).  Models are built by
models/build_models.py (deterministic) into benchmarks/.cache/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
SMALL = ["tiny_resnet_poly", "resnet20_poly"]
BIG = ["resnet50_poly_224"]
#: models whose encrypted run fits in minutes on a 2-core machine
SEAL_OK = {"tiny_resnet_poly", "resnet20_poly"}


def _vmhwm() -> int:
    from hecompiler.costmodel import peak_rss_bytes

    return peak_rss_bytes()


def _ensure_model(name: str) -> tuple[Path, Path]:
    CACHE.mkdir(parents=True, exist_ok=True)
    onnx_path = CACHE / f"{name}.onnx"
    if not onnx_path.exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "build_models.py"), "--out", str(CACHE), name],
                       check=True, stdout=subprocess.DEVNULL)
    return onnx_path, CACHE / f"{name}.input.npy"


# --------------------------------------------------------------------------- child steps

def step_compile(name: str, check: bool) -> dict:
    import numpy as np

    from hecompiler.compiler import CompileOptions, compile_model
    from hecompiler.hecfile import save_hec

    onnx_path, x_path = _ensure_model(name)
    t0 = time.perf_counter()
    res = compile_model(str(onnx_path), CompileOptions(check=check, sample=np.load(x_path) if check else None))
    secs = time.perf_counter() - t0
    save_hec(CACHE / f"{name}.hec", res.prog, res.metadata)
    r = res.metadata["report"]
    convs = [L for L in r["layers"] if L["op"] in ("Conv", "AveragePool", "Gemm")]
    worst = max((L["rotations"] / max(L["bsgs_bound"], 1e-9) for L in convs if L["diagonals"]), default=0.0)
    c = res.chosen.cost
    return {"model": name, "compile_s": secs, "compile_peak": _vmhwm(), "params": res.chosen.label,
            "ops": r["ops"], "keys": r["galois_keys"], "key_bytes": r["key_bytes"], "depth": r["levels_used"],
            "refreshes": r["refreshes"], "pred_s": r["predicted_seconds"], "pred_mem": c.memory_bytes,
            "fidelity": r["fidelity"], "worst_rot_ratio": worst, "layers": r["layers"]}


def step_seal(name: str) -> dict:
    import numpy as np

    from hecompiler.backends.seal import run_encrypted
    from hecompiler.hecfile import load_hec

    onnx_path, x_path = _ensure_model(name)
    prog, _ = load_hec(CACHE / f"{name}.hec")
    x = np.load(x_path)
    outs, stats = run_encrypted(prog, {prog.inputs[0].name: x})
    y = outs[prog.outputs[0].name]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    err = float(np.abs(y - ref).max())
    return {"model": name, "seal_s": stats.phases.get("total", stats.eval_seconds), "phases": stats.phases,
            "seal_peak": _vmhwm(), "err_rel": err / (float(np.ptp(ref)) or 1.0),
            "argmax": bool(np.argmax(y) == np.argmax(ref))}


def _child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- table

def _mb(b) -> str:
    return "-" if b is None else (f"{b / 2**20:.0f}M" if b < 2**30 else f"{b / 2**30:.1f}G")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help=f"default: {' '.join(SMALL)} (+ {' '.join(BIG)} with --big)")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--no-seal", action="store_true", help="skip the real encrypted runs")
    ap.add_argument("--layers", action="store_true", help="also print per-layer rotations vs the BSGS bound")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results")
    ap.add_argument("--_step", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._step:
        kind, name = args._step
        out = step_compile(name, check=name not in BIG) if kind == "compile" else step_seal(name)
        print(json.dumps(out))
        return 0
    models = args.models or (SMALL + (BIG if args.big else []))
    rows = []
    for name in models:
        print(f"[{name}] compiling...", file=sys.stderr, flush=True)
        row = _child(["--_step", "compile", name])
        if "error" not in row and not args.no_seal and name in SEAL_OK:
            print(f"[{name}] running under SEAL...", file=sys.stderr, flush=True)
            row.update(_child(["--_step", "seal", name]))
        row.setdefault("model", name)
        rows.append(row)
    hdr = (f"{'model':<18} {'compile':>8} {'c.mem':>6} {'params':<24} {'rot':>6} {'ct-pt':>7} {'ct-ct':>5} "
           f"{'resc':>5} {'refr':>5} {'keys':>10} {'depth':>5} {'pred':>8} {'SEAL':>8} {'s.mem':>6} "
           f"{'err/range':>9} {'argmax':>6} {'rot/bnd':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r and "ops" not in r:
            print(f"{r['model']:<18} ERROR {r['error']}")
            continue
        o = r["ops"]
        fid = r.get("fidelity") or {}
        err = r.get("err_rel", fid.get("relative_to_range"))
        arg = r.get("argmax", fid.get("argmax_agrees"))
        seal = f"{r['seal_s']:.1f}s" if "seal_s" in r else "-"
        print(f"{r['model']:<18} {r['compile_s']:>7.1f}s {_mb(r['compile_peak']):>6} {r['params']:<24} "
              f"{o.get('rotate', 0):>6} {o.get('mul_plain', 0):>7} {o.get('mul', 0):>5} {o.get('rescale', 0):>5} "
              f"{r['refreshes']:>5} {str(r['keys']) + '/' + _mb(r['key_bytes']):>10} {r['depth']:>5} "
              f"{r['pred_s']:>7.1f}s {seal:>8} {_mb(r.get('seal_peak')):>6} "
              f"{'-' if err is None else f'{err:.1e}':>9} {'-' if arg is None else ('yes' if arg else 'NO'):>6} "
              f"{r['worst_rot_ratio']:>7.2f}")
        if "error" in r:
            print(f"{'':<18} SEAL run failed: {r['error']}")
    print("\ncompile/SEAL: wall time; c.mem/s.mem: peak resident memory of that step; pred: SEAL latency "
          "predicted from the measured cost table;\nerr/range: max abs logit error over the logit range vs "
          "onnxruntime (SEAL run if done, else the simulator); rot/bnd: worst conv rotations / 2*sqrt(#diagonals)")
    if args.layers:
        for r in rows:
            for L in r.get("layers", []):
                if L["diagonals"]:
                    print(f"{r['model']:<18} {L['node'][-40:]:<40} {L['op']:<8} rot {L['rotations']:>4}  "
                          f"bound {L['bsgs_bound']:>6}  ratio {L['rotations'] / L['bsgs_bound']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
