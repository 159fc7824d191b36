"""Skip connections under HE: the same networks with and without each skip feature.

    python benchmarks/skips.py                     # ResNet-20 (poly): variants, SEAL runs for two of them
    python benchmarks/skips.py --big               # + ResNet-18 / ResNet-50 shaped 224x224 models (compile only)
    python benchmarks/skips.py --models resnet20_poly --no-seal

Variants (rows):
  baseline       the compiler without its skip machinery: no dirac-merge, greedy refresh
                 placement, every Add re-aligns its skip source on its own
  exact          the default pipeline: dirac-merge, optimal refresh placement (DP), shared-source
                 alignment (all exact: outputs unchanged)
  dirac          architectural rewrite: residual skips removed, identity folded into the convs,
                 weights re-fitted by least squares on calibration data (approximating)
  shared-source  architectural rewrite: each stage's skips from one shared source, re-fitted

Columns: graph Adds, skip edges and their mean live range (graph nodes between the skip source and
its Add), peak live ciphertexts (memory), refreshed ciphertexts, rotations, depth, predicted SEAL latency, measured SEAL latency
(where it fits), and fidelity: for exact variants the simulated error against onnxruntime on the
original model; for rewrites the held-out top-1 agreement and mean logit error of the re-fitted
network against the original.
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
SMALL = ["resnet20_poly"]
BIG = ["resnet18_poly_224", "resnet50_poly_224"]
VARIANTS = ["baseline", "exact", "dirac", "shared-source"]


def _model(name: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / f"{name}.onnx"
    if not p.exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "build_models.py"), "--out", str(CACHE), name],
                       check=True, stdout=subprocess.DEVNULL)
    return p


def _skip_stats(graph) -> tuple[int, int, float]:
    from hecompiler.dot import skip_edges

    index = {id(n): i for i, n in enumerate(graph.nodes)}
    edges = skip_edges(graph)
    ranges = []
    for vid, nid in edges:
        v = next(v for n in graph.nodes if id(n) == nid for v in n.inputs if id(v) == vid)
        start = index[id(v.producer)] if v.producer is not None else -1
        ranges.append(index[nid] - start)
    adds = sum(1 for n in graph.nodes if n.op in ("Add", "Sub") and not any(v.is_constant for v in n.inputs))
    return adds, len(edges), (sum(ranges) / len(ranges) if ranges else 0.0)


def step(name: str, variant: str, seal: bool) -> dict:
    import numpy as np
    import onnx

    import hecompiler as hc
    from hecompiler.compiler import CompileOptions, compile_model
    from hecompiler.planner import PlanOptions
    from hecompiler.lower import LoweringOptions
    from hecompiler.passmanager import DEFAULT_PIPELINE

    path = _model(name)
    model = onnx.load(path)
    row: dict = {"model": name, "variant": variant}
    big = name in BIG
    rng = np.random.default_rng(0)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    if variant in ("dirac", "shared-source"):
        from hecompiler.arch_rewrite import rewrite_model

        n_cal, n_held = (16, 8) if big else (64, 32)
        cal = rng.standard_normal([n_cal] + shape[1:]).astype(np.float32)
        held = rng.standard_normal([n_held] + shape[1:]).astype(np.float32)
        g, rep, _ = rewrite_model(model, kinds=(variant,), calibration=cal, heldout=held)
        h = rep["fidelity"]["heldout"]
        row["rewrite"] = {"top1_before": h["before_refit"]["top1_agree"], "top1_after": h["after_refit"]["top1_agree"],
                          "mean_before": h["before_refit"]["mean_abs"], "mean_after": h["after_refit"]["mean_abs"]}
        model = hc.to_onnx(g)
    passes = DEFAULT_PIPELINE if variant != "baseline" else DEFAULT_PIPELINE.replace("dirac-merge,", "")
    lowering = LoweringOptions(share_alignment=variant != "baseline")
    popts = PlanOptions(lowering=lowering, optimal_refresh=variant != "baseline")
    t0 = time.perf_counter()
    res = compile_model(model, CompileOptions(passes=passes, plan=popts, check=not big))
    row["compile_s"] = time.perf_counter() - t0
    r = res.metadata["report"]
    row["adds"], row["skips"], row["skip_range"] = _skip_stats(res.graph)
    row.update(params=res.chosen.label, rotations=r["ops"].get("rotate", 0), refreshes=r["refreshes"],
               depth=r["levels_used"], pred_s=r["predicted_seconds"], fidelity=r.get("fidelity"),
               live=r["peak_live_ciphertexts"], mem=r["predicted_memory_bytes"])
    if seal:
        from hecompiler.backends.seal import run_encrypted

        x = rng.standard_normal(shape).astype(np.float32)
        outs, stats = run_encrypted(res.prog, {res.prog.inputs[0].name: x})
        row["seal_s"] = stats.phases.get("total", stats.eval_seconds)
    return row


def _child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--no-seal", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--_step", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._step:
        name, variant, seal = args._step
        print(json.dumps(step(name, variant, seal == "1")))
        return 0
    models = args.models or (SMALL + (BIG if args.big else []))
    rows = []
    for name in models:
        for v in args.variants:
            seal = not args.no_seal and name not in BIG and v in ("baseline", "exact")
            print(f"[{name} / {v}] ...", file=sys.stderr, flush=True)
            row = _child(["--_step", name, v, "1" if seal else "0"])
            row.setdefault("model", name)
            row.setdefault("variant", v)
            rows.append(row)
    hdr = (f"{'model':<18} {'variant':<14} {'adds':>4} {'skips':>5} {'range':>5} {'live':>5} {'refr':>5} {'rot':>7} "
           f"{'depth':>5} {'pred':>9} {'SEAL':>7}  fidelity")
    print(hdr)
    print("-" * (len(hdr) + 30))
    base = {}
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<18} {r['variant']:<14} ERROR {r['error']}")
            continue
        if r["variant"] == "baseline":
            base[r["model"]] = r["pred_s"]
        f = r.get("fidelity") or {}
        if "rewrite" in r:
            h = r["rewrite"]
            fid = (f"held-out vs original: top-1 {100 * h['top1_after']:.0f}%, mean logit err {h['mean_after']:.1e} "
                   f"(before re-fit {100 * h['top1_before']:.0f}%, {h['mean_before']:.1e})")
        elif "relative_to_range" in f:
            fid = f"err {f['relative_to_range']:.1e} of range vs onnxruntime"
        else:
            fid = f.get("skipped", "-")[:40]
        speed = f" ({base[r['model']] / r['pred_s']:.2f}x)" if r["model"] in base and r["variant"] != "baseline" else ""
        seal = f"{r['seal_s']:.1f}s" if "seal_s" in r else "-"
        print(f"{r['model']:<18} {r['variant']:<14} {r['adds']:>4} {r['skips']:>5} {r['skip_range']:>5.1f} "
              f"{r['live']:>5} {r['refreshes']:>5} {r['rotations']:>7} {r['depth']:>5} {r['pred_s']:>8.1f}s {seal:>7}  {fid}{speed}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
