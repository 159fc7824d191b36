"""Benchmark table for the reference models: compile cost, HE op counts, keys,
depth, predicted and measured SEAL latency, memory, and error against onnxruntime.

    python benchmarks/run.py                 # tiny ResNet, ResNet-20 (poly); SEAL runs where they fit
    python benchmarks/run.py --big           # also the 224x224 ResNet-50-shaped model (compile only)
    python benchmarks/run.py --models resnet20_poly --no-seal
    python benchmarks/run.py --models resnet18_poly_224 --no-seal --layout polyphase polyphase:8   # a row per strategy
    python benchmarks/run.py --models resnet20_poly --processes 1 2       # a row per process count (hecompiler.parallel)
    python benchmarks/run.py --models resnet18_poly_224 --layout polyphase:8 --processes 1 2 --seal-all
    python benchmarks/run.py --digits        # trained digits models: plaintext / simulator / SEAL accuracy
    python benchmarks/run.py --relu224       # torchvision-style ResNet-18 (ReLU, MaxPool, BN): compile + simulator

Each compile and each encrypted run happens in a child process, so the peak
memory printed is that step's own (VmHWM); with helper processes (``--processes``)
the largest helper's is printed beside it.  Models are built by
models/build_models.py (deterministic) into benchmarks/.cache/.
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

def step_compile(name: str, check: bool, layout: str | None = None) -> dict:
    import numpy as np

    from hecompiler.compiler import CompileOptions, compile_model
    from hecompiler.hecfile import save_hec
    from hecompiler.lower import LoweringOptions
    from hecompiler.planner import PlanOptions

    onnx_path, x_path = _ensure_model(name)
    t0 = time.perf_counter()
    res = compile_model(str(onnx_path), CompileOptions(check=check, sample=np.load(x_path) if check else None,
                                                       plan=PlanOptions(lowering=LoweringOptions(layout=layout))))
    secs = time.perf_counter() - t0
    save_hec(CACHE / f"{name}.hec", res.prog, res.metadata)
    r = res.metadata["report"]
    convs = [L for L in r["layers"] if L["op"] in ("Conv", "AveragePool", "Gemm")]
    worst = max((L["rotations"] / max(L["bsgs_bound"], 1e-9) for L in convs if L["diagonals"]), default=0.0)
    c = res.chosen.cost
    return {"model": name, "compile_s": secs, "compile_peak": _vmhwm(), "params": res.chosen.label,
            "ops": r["ops"], "encoded": r["plaintexts"]["encoded"], "keys": r["galois_keys"], "key_bytes": r["key_bytes"], "depth": r["levels_used"],
            "refreshes": r["refreshes"], "pred_s": r["predicted_seconds"], "pred_mem": c.memory_bytes,
            "processes_priced": r.get("processes", 1),
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
            "seal_peak": _vmhwm(), "helper_peak": stats.helper_peak_rss_bytes, "split_linears": stats.split_linears,
            "err_rel": err / (float(np.ptp(ref)) or 1.0),
            "argmax": bool(np.argmax(y) == np.argmax(ref))}


# --------------------------------------------------------------------------- approximation rows (issue 5)

MODELS = ROOT / "models"
DIGITS = ["digits_relu", "digits_poly"]
RELU_224 = ["resnet18_relu_224", "resnet50_relu_224"]
#: run in the simulator after compiling (the others are compiled only, to keep the benchmark short)
RELU_224_SIM = {"resnet18_relu_224"}


def _ort_logits(path, xs):
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.stack([sess.run(None, {name: xs[i:i + 1]})[0].reshape(-1) for i in range(len(xs))])


def step_digits(name: str, seal_n: int) -> dict:
    """Plaintext accuracy, accuracy after approximation in the simulator over the whole test split,
    accuracy under real SEAL encryption on the first ``seal_n`` test images (keys made once)."""
    import numpy as np

    from hecompiler.backends.seal import SealClient, SealServer
    from hecompiler.backends.sim import Simulator
    from hecompiler.compiler import CompileOptions, compile_model

    x, y = np.load(MODELS / "digits_test_x.npy"), np.load(MODELS / "digits_test_y.npy")
    xc, yc = np.load(MODELS / "digits_calib_x.npy"), np.load(MODELS / "digits_calib_y.npy")
    path = MODELS / f"{name}.onnx"
    plain = _ort_logits(path, x)
    t0 = time.perf_counter()
    opts = CompileOptions(calibration=xc, labels=yc, heldout=x, heldout_labels=y) if "relu" in name else \
        CompileOptions(sample=x[:1])
    res = compile_model(str(path), opts)
    compile_s = time.perf_counter() - t0
    prog = res.prog
    iname, oname = prog.inputs[0].name, prog.outputs[0].name
    sim = Simulator(prog)
    t0 = time.perf_counter()
    simy = np.stack([sim.run({iname: x[i:i + 1]})[0][oname].reshape(-1) for i in range(len(x))])
    sim_s = (time.perf_counter() - t0) / len(x)
    row = {"model": name, "n_test": int(len(x)), "params": res.chosen.label, "depth": prog.levels_used(),
           "refreshes": res.chosen.cost.refreshes, "compile_s": compile_s, "pred_s": res.chosen.cost.seconds,
           "acc_plain": float(np.mean(plain.argmax(1) == y)), "acc_sim": float(np.mean(simy.argmax(1) == y)),
           "sim_agree": float(np.mean(simy.argmax(1) == plain.argmax(1))), "sim_s_per_image": sim_s,
           "passes": res.metadata["passes"]}
    approx = res.metadata["report"].get("approximation")
    if approx:
        row["approx_graph"] = approx["fidelity"].get("heldout")
    if seal_n:
        t0 = time.perf_counter()
        client = SealClient.create(prog)
        server = SealServer(prog, client.public_keys())
        keygen = time.perf_counter() - t0
        seal_y, per = [], []
        for i in range(seal_n):
            t1 = time.perf_counter()
            cts = client.encrypt_inputs({iname: x[i:i + 1]})
            out, _ = server.run(cts, client.refresh)
            seal_y.append(client.decrypt_outputs(out)[oname].reshape(-1))
            per.append(time.perf_counter() - t1)
        seal_y = np.stack(seal_y)
        row.update({"seal_n": seal_n, "acc_plain_subset": float(np.mean(plain[:seal_n].argmax(1) == y[:seal_n])),
                    "acc_seal": float(np.mean(seal_y.argmax(1) == y[:seal_n])),
                    "seal_agree": float(np.mean(seal_y.argmax(1) == plain[:seal_n].argmax(1))),
                    "seal_vs_sim_max_err": float(np.abs(seal_y - simy[:seal_n]).max()),
                    "seal_keygen_s": keygen, "seal_s_per_image": float(np.mean(per)), "seal_peak": _vmhwm()})
    return row


def step_relu224(name: str, n_calib: int) -> dict:
    """A torchvision-style ResNet with ReLU + MaxPool + BN: compile with calibration on a handful of
    N(0,1) inputs, then run the program once in the slot simulator."""
    import numpy as np

    from hecompiler.backends.sim import Simulator
    from hecompiler.compiler import CompileOptions, compile_model
    from hecompiler.interp import run

    onnx_path, _ = _ensure_model(name)
    rng = np.random.default_rng(0)
    xc = rng.standard_normal((n_calib, 3, 224, 224)).astype(np.float32)
    xh = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    t0 = time.perf_counter()
    from hecompiler.planner import PlanOptions

    # degree-15 ReLUs need N >= 16384 (N=8192 has 3 levels at most), whose SEAL run is predicted at
    # ~14 GiB for this network: allow up to 20 GiB (the simulator itself needs far less)
    res = compile_model(str(onnx_path), CompileOptions(calibration=xc, heldout=xh, check=False,
                                                       plan=PlanOptions(max_memory_bytes=20 * 2**30)))
    compile_s = time.perf_counter() - t0
    compile_peak = _vmhwm()
    r = res.metadata["report"]
    prog = res.prog
    out = {"model": name, "compile_s": compile_s, "compile_peak": compile_peak, "params": res.chosen.label,
           "ops": r["ops"], "depth": r["levels_used"], "refreshes": r["refreshes"], "pred_s": r["predicted_seconds"],
           "passes": [p for p in res.metadata["passes"] if "-to-" in p], "approx": r["approximation"]["fidelity"]}
    # which approximation costs what (approximated graph vs the original, same inputs; no HE)
    import hecompiler as hc
    from hecompiler.calibration import calibrate, evaluate

    stats = calibrate(str(onnx_path), xc)
    variants = {}
    for spec in ("relu-to-poly", "maxpool-to-avgpool", "relu-to-poly,maxpool-to-avgpool",
                 "relu-to-poly,maxpool-to-poly", "relu-to-poly{composite=7x7x7x7},maxpool-to-poly{composite=7x7x7x7}"):
        g = hc.load_onnx(str(onnx_path))
        hc.run_pipeline(g)
        hc.PassManager(spec + ",dce", options={"calibration": dict(stats)}).run(g)
        variants[spec] = evaluate(str(onnx_path), g, xh)
    out["variants"] = variants
    if name not in RELU_224_SIM:
        return out
    t0 = time.perf_counter()
    y = Simulator(prog).run({prog.inputs[0].name: xh[:1]})[0][prog.outputs[0].name]
    sim_s = time.perf_counter() - t0
    ref_approx = run(res.graph, xh[:1])[0]
    ref = _ort_logits(onnx_path, xh[:1])[0]
    rng_ = float(np.ptp(ref)) or 1.0
    out.update({"sim_s": sim_s, "sim_peak": _vmhwm(),
                "sim_vs_approx_graph": float(np.abs(y - ref_approx).max()) / rng_,
                "sim_vs_original": float(np.abs(y - ref).max()) / rng_,
                "argmax_vs_original": bool(np.argmax(y) == np.argmax(ref))})
    return out


def print_approx_rows(rows: list[dict]) -> None:
    """The accuracy table of the digits models and the ReLU 224 rows."""
    digits = [r for r in rows if r.get("kind") == "digits"]
    if digits:
        print(f"\n{'model':<12} {'plaintext':>9} {'approx(sim)':>11} {'agree':>6} {'SEAL subset':>16} "
              f"{'plain subset':>12} {'params':<24} {'depth':>5} {'refr':>4} {'sim/img':>8} {'SEAL/img':>8}")
        for r in digits:
            if "error" in r:
                print(f"{r['model']:<12} ERROR {r['error']}")
                continue
            seal = f"{r['acc_seal']:.2%} of {r['seal_n']}" if "acc_seal" in r else "-"
            ps = f"{r['acc_plain_subset']:.2%}" if "acc_plain_subset" in r else "-"
            sp = f"{r['seal_s_per_image']:.1f}s" if "seal_s_per_image" in r else "-"
            print(f"{r['model']:<12} {r['acc_plain']:>9.2%} {r['acc_sim']:>11.2%} {r['sim_agree']:>6.1%} {seal:>16} "
                  f"{ps:>12} {r['params']:<24} {r['depth']:>5} {r['refreshes']:>4} {r['sim_s_per_image']:>7.2f}s "
                  f"{sp:>8}")
        print(f"accuracy over the {digits[0].get('n_test', '?')}-image digits test split: plaintext = onnxruntime on "
              f"the ONNX file; approx(sim) = the compiled program in the slot simulator; agree = its top-1 agreement "
              f"with plaintext; SEAL subset = real encryption on the first images (plain subset: plaintext accuracy "
              f"on the same images)")
    for r in (r for r in rows if r.get("kind") == "relu224"):
        if "error" in r:
            print(f"\n{r['model']}: ERROR {r['error']}")
            continue
        o = r["ops"]
        h = r["approx"].get("heldout", {})
        print(f"\n{r['model']}: compiled (no manual edits) with {', '.join(r['passes'])} in {r['compile_s']:.0f} s "
              f"({_mb(r['compile_peak'])} peak): {r['params']}, depth {r['depth']}, {r['refreshes']} refreshes, "
              f"{o.get('rotate', 0)} rotations, {o.get('mul_plain', 0)} ct-pt, {o.get('mul', 0)} ct-ct; predicted "
              f"SEAL {r['pred_s']:.0f} s")
        if "sim_s" in r:
            print(f"  simulator run: {r['sim_s']:.0f} s, {_mb(r['sim_peak'])} peak; max logit error / range vs the "
                  f"approximated graph {r['sim_vs_approx_graph']:.1e}, vs the original model "
                  f"{r['sim_vs_original']:.2f} (argmax {'agrees' if r['argmax_vs_original'] else 'differs'})")
        else:
            print("  (compiled only: not run in the simulator by this benchmark)")
        print(f"  approximated graph vs original on 2 held-out N(0,1) inputs: top-1 agreement "
              f"{h.get('top1_agreement', float('nan')):.0%}, max logit error {h.get('max_logit_error', float('nan')):.3g}"
              f" ({h.get('max_error_over_range', float('nan')):.2f} of the logit range; random weights)")
        for spec, v in r.get("variants", {}).items():
            print(f"    {spec:<80} max logit error / range {v['max_error_over_range']:.3f}, top-1 agreement "
                  f"{v['top1_agreement']:.0%}")


def _child(args: list[str], env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
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
    ap.add_argument("--layout", nargs="+", default=[None], metavar="STRATEGY",
                    help="compile with these layout strategies (a row each; default: the planner's choice)")
    ap.add_argument("--processes", nargs="+", type=int, default=[None], metavar="P",
                    help="SEAL evaluations on P processes (HECOMPILER_PROCESSES for the compile's prediction and the "
                         "run; a row each; default: one per core)")
    ap.add_argument("--seal-all", action="store_true",
                    help=f"run every model under SEAL (default: only {' '.join(sorted(SEAL_OK))})")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results")
    ap.add_argument("--digits", action="store_true",
                    help="accuracy rows of the trained digits models: plaintext, simulator, SEAL subset")
    ap.add_argument("--seal-n", type=int, default=10, metavar="N", help="test images run under SEAL (--digits)")
    ap.add_argument("--relu224", action="store_true",
                    help="compile resnet18_relu_224 (ReLU, MaxPool, BN) with calibration and run it in the simulator")
    ap.add_argument("--_step", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._step:
        kind, name = args._step
        if kind == "digits":
            out = step_digits(name, 0 if args.no_seal else args.seal_n)
        elif kind == "relu224":
            out = step_relu224(name, 4)
        else:
            lay = None if args.layout == [None] else args.layout[0]
            out = step_compile(name, check=name not in BIG, layout=lay) if kind == "compile" else step_seal(name)
        print(json.dumps(out))
        return 0
    extra_only = (args.digits or args.relu224) and not args.models and not args.big
    models = [] if extra_only else (args.models or (SMALL + (BIG if args.big else [])))
    approx_rows = []
    for name in (DIGITS if args.digits else []):
        print(f"[{name}] accuracy: plaintext, simulator over the test split, SEAL subset...", file=sys.stderr, flush=True)
        r = _child(["--_step", "digits", name, "--seal-n", str(args.seal_n)] + (["--no-seal"] if args.no_seal else []))
        approx_rows.append({"model": name, "kind": "digits", **r})
    for name in (RELU_224 if args.relu224 else []):
        print(f"[{name}] compiling with calibration, running in the simulator...", file=sys.stderr, flush=True)
        approx_rows.append({"model": name, "kind": "relu224", **_child(["--_step", "relu224", name])})
    if not models:
        print_approx_rows(approx_rows)
        if args.json:
            Path(args.json).write_text(json.dumps(approx_rows, indent=1))
        return 0
    rows = []
    for name in models:
        for lay in args.layout:
            for procs in args.processes:
                env = None if procs is None else {**os.environ, "HECOMPILER_PROCESSES": str(procs)}
                print(f"[{name}] compiling{'' if lay is None else ' with --layout ' + lay}"
                      f"{'' if procs is None else f' for {procs} processes'}...", file=sys.stderr, flush=True)
                row = _child(["--_step", "compile", name] + ([] if lay is None else ["--layout", lay]), env)
                if "error" not in row and not args.no_seal and (name in SEAL_OK or args.seal_all):
                    print(f"[{name}] running under SEAL...", file=sys.stderr, flush=True)
                    row.update(_child(["--_step", "seal", name], env))
                row.setdefault("model", name)
                row["processes"] = procs
                rows.append(row)
    hdr = (f"{'model':<18} {'compile':>8} {'c.mem':>6} {'params':<24} {'rot':>6} {'ct-pt':>7} {'enc':>7} {'ct-ct':>5} "
           f"{'resc':>5} {'refr':>5} {'keys':>10} {'depth':>5} {'proc':>4} {'pred':>8} {'SEAL':>8} {'s.mem':>6} {'h.mem':>6} "
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
              f"{o.get('rotate', 0):>6} {o.get('mul_plain', 0):>7} {r.get('encoded', 0):>7} {o.get('mul', 0):>5} {o.get('rescale', 0):>5} "
              f"{r['refreshes']:>5} {str(r['keys']) + '/' + _mb(r['key_bytes']):>10} {r['depth']:>5} "
              f"{r.get('processes_priced', '-'):>4} {r['pred_s']:>7.1f}s {seal:>8} {_mb(r.get('seal_peak')):>6} "
              f"{_mb(r.get('helper_peak') or None):>6} "
              f"{'-' if err is None else f'{err:.1e}':>9} {'-' if arg is None else ('yes' if arg else 'NO'):>6} "
              f"{r['worst_rot_ratio']:>7.2f}")
        if "error" in r:
            print(f"{'':<18} SEAL run failed: {r['error']}")
    print("\ncompile/SEAL: wall time; c.mem/s.mem: peak resident memory of that step (h.mem: of its largest helper "
          "process); proc: processes the prediction prices; pred: SEAL latency "
          "predicted from the measured cost table; enc: plaintexts encoded per inference;\nerr/range: max abs logit error over the logit range vs "
          "onnxruntime (SEAL run if done, else the simulator); rot/bnd: worst conv rotations / 2*sqrt(#diagonals)")
    if args.layers:
        for r in rows:
            for L in r.get("layers", []):
                if L["diagonals"]:
                    print(f"{r['model']:<18} {L['node'][-40:]:<40} {L['op']:<8} rot {L['rotations']:>4}  "
                          f"bound {L['bsgs_bound']:>6}  ratio {L['rotations'] / L['bsgs_bound']:.2f}")
    print_approx_rows(approx_rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows + approx_rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
