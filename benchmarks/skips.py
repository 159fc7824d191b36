"""Skip connections under HE: the same networks with and without each skip feature.

    python benchmarks/skips.py                     # ResNet-20 (poly) and the two paper-architecture models
    python benchmarks/skips.py --big               # + ResNet-18 / ResNet-50 shaped 224x224 models (compile only)
    python benchmarks/skips.py --models resnet20_poly --no-seal
    python benchmarks/skips.py --refresh bootstrap --max-memory 64G   # priced for a bootstrapping target

Variants (rows):
  baseline       the compiler without its skip machinery: no dirac-merge, greedy refresh
                 placement, every Add re-aligns its skip source on its own
  exact          the default pipeline: dirac-merge, optimal refresh placement (DP), shared-source
                 alignment (all exact: outputs unchanged)
  dirac          architectural rewrite: residual skips removed, identity folded into the convs,
                 weights re-fitted by least squares on calibration data (approximating)
  shared-source  architectural rewrite: each stage's skips from one shared source, re-fitted
  no-id-skips    a cost reference, not a model: the identity skips dropped (their Adds, branch
                 kept), projection shortcuts kept: about what removing the identity skips (as
                 `dirac` does) could reach; a different function, so no fidelity
  no-skips       the same with every residual Add dropped, projection convs included: about what
                 any realisation of the skips could reach (the planner may land a few percent
                 either side of it)

diracnet_poly and shared_source_resnet_poly (models/build_models.py) are already in the paper's
architectures; they get the baseline and exact rows (and no-skips for the shared-source one).

--refresh client (default) prices a refresh as the SEAL backend runs it (client-aided); --refresh
bootstrap[:SECONDS] prices it as a bootstrap on a bootstrapping target (planned at N=2^16 with room
for the bootstrap circuit; SEAL cannot run those programs, so no SEAL column).

Columns: graph Adds, skip edges and their mean live range (graph nodes between the skip source and
its Add), peak live ciphertexts (memory), refreshed ciphertexts, rotations, depth, predicted latency
and its speed-up over baseline ("x base"), measured latency of the encrypted run ("run": SEAL where
it fits, or with --target lattigo every model variant with real bootstraps) and its measured
speed-up over baseline ("run x"), and fidelity: for exact variants the simulated error against onnxruntime on the
original model; for rewrites the held-out top-1 agreement and mean logit error of the re-fitted
network against the original.
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
SMALL = ["resnet20_poly", "diracnet_poly", "shared_source_resnet_poly"]
#: models already in the paper's architectures: compiled exactly (the rewrites have nothing to do)
PAPER = {"diracnet_poly": ["baseline", "exact"], "shared_source_resnet_poly": ["baseline", "exact", "no-skips"]}
BIG = ["resnet18_poly_224", "resnet50_poly_224"]
VARIANTS = ["baseline", "exact", "dirac", "shared-source", "no-id-skips", "no-skips"]


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


def drop_skips(graph, identity_only: bool = False) -> int:
    """Replace every two-input Add of encrypted values by its deeper operand (the
    residual branch), so the skip and any projection on it disappear (after DCE);
    with ``identity_only``, only Adds whose skip is not a projection (a Conv).
    Returns the number of Adds dropped."""
    depth: dict[int, int] = {id(v): 0 for v in graph.inputs}
    dropped = 0
    for n in list(graph.nodes):
        d = 1 + max((depth.get(id(v), 0) for v in n.inputs if not v.is_constant), default=0)
        if n.op == "Add" and len(n.inputs) == 2 and not any(v.is_constant for v in n.inputs):
            keep = max(n.inputs, key=lambda v: depth.get(id(v), 0))
            skip = n.inputs[1] if keep is n.inputs[0] else n.inputs[0]
            if not (identity_only and skip.producer is not None and skip.producer.op == "Conv"):
                graph.replace_all_uses(n.outputs[0], keep)
                graph.remove_node(n)
                dropped += 1
                continue
        for o in n.outputs:
            depth[id(o)] = d
    return dropped


def step(name: str, variant: str, seal: bool, refresh: str = "client", max_memory: str = "8G",
         target: str = "seal") -> dict:
    import numpy as np
    import onnx

    import hecompiler as hc
    from hecompiler.cli import _refresh_arg, _size_arg
    from hecompiler.compiler import CompileOptions, compile_model
    from hecompiler.costmodel import CostModel
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
    elif variant in ("no-skips", "no-id-skips"):
        from hecompiler.passmanager import PassManager

        g = hc.load_onnx(model)
        PassManager(DEFAULT_PIPELINE).run(g)  # activations fused into Poly nodes first: their Adds stay
        row["dropped_adds"] = drop_skips(g, identity_only=variant == "no-id-skips")
        model = hc.to_onnx(g)
    passes = DEFAULT_PIPELINE if variant != "baseline" else DEFAULT_PIPELINE.replace("dirac-merge,", "")
    lowering = LoweringOptions(share_alignment=variant != "baseline")
    popts = PlanOptions(lowering=lowering, optimal_refresh=variant != "baseline", max_memory_bytes=_size_arg(max_memory))
    if target == "seal":
        cost = CostModel(refresh=_refresh_arg(refresh, 20.0))
    else:  # a bootstrapping backend: the target's measured table prices everything
        cost = None
        popts.security = "none" if "toy" in target else "tc128"
    t0 = time.perf_counter()
    res = compile_model(model, CompileOptions(passes=passes, plan=popts, check=not big, target=target), cost)
    row["compile_s"] = time.perf_counter() - t0
    r = res.metadata["report"]
    row["adds"], row["skips"], row["skip_range"] = _skip_stats(res.graph)
    row.update(params=res.chosen.label, rotations=r["ops"].get("rotate", 0), refreshes=r["refreshes"],
               depth=r["levels_used"], pred_s=r["predicted_seconds"], fidelity=r.get("fidelity"),
               live=r["peak_live_ciphertexts"], mem=r["predicted_memory_bytes"],
               refresh_s=res.chosen.cost.by_op.get("refresh", 0.0))
    if seal:  # run it encrypted on the target's backend (SEAL client-aided, or Lattigo with real bootstraps)
        from hecompiler import backends

        x = rng.standard_normal(shape).astype(np.float32)
        be = backends.get(backends.for_program(res.metadata))
        c0 = os.times()
        outs, stats = be.run_encrypted(res.prog, {res.prog.inputs[0].name: x}, meta=res.metadata)
        c1 = os.times()
        y = outs[res.prog.outputs[0].name]
        row["seal_s"] = stats.phases.get("eval", stats.eval_seconds)
        row["run_cpu_s"] = (c1.user + c1.system) - (c0.user + c0.system)
        row["bootstraps_run"] = stats.bootstraps
        import onnxruntime as ort

        sess = ort.InferenceSession(path.as_posix(), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        row["run_err_vs_original"] = float(np.abs(y - ref).max() / np.ptp(ref))
        row["run_argmax_vs_original"] = bool(np.argmax(y) == np.argmax(ref))
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
    ap.add_argument("--refresh", default="client", metavar="client|bootstrap[:SECONDS]")
    ap.add_argument("--max-memory", default="8G", metavar="SIZE", help="planner memory budget (default: %(default)s)")
    ap.add_argument("--target", default="seal", metavar="seal|lattigo[:SET]",
                    help="lattigo: plan and run with real bootstraps (every variant that is a model runs encrypted)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--_step", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._step:
        name, variant, seal = args._step
        print(json.dumps(step(name, variant, seal == "1", args.refresh, args.max_memory, args.target)))
        return 0
    models = args.models or (SMALL + (BIG if args.big else []))
    rows = []
    for name in models:
        for v in args.variants:
            if name in PAPER and v not in PAPER[name]:
                continue
            if args.target == "seal":
                seal = (not args.no_seal and name not in BIG and v in ("baseline", "exact")
                        and args.refresh == "client")
            else:  # real bootstraps: every variant that is a model (not the cost references) runs
                seal = not args.no_seal and name not in BIG and v not in ("no-skips", "no-id-skips")
            print(f"[{name} / {v}] ...", file=sys.stderr, flush=True)
            row = _child(["--_step", name, v, "1" if seal else "0", "--refresh", args.refresh,
                          "--max-memory", args.max_memory, "--target", args.target])
            row.setdefault("model", name)
            row.setdefault("variant", v)
            rows.append(row)
    print(f"target {args.target}; refresh priced as: "
          + (args.refresh if args.target == "seal" else "a bootstrap, measured on the target (real bootstraps run)"))
    hdr = (f"{'model':<25} {'variant':<14} {'adds':>4} {'skips':>5} {'range':>5} {'live':>5} {'params':<22} "
           f"{'refr':>5} {'refr s':>7} {'rot':>7} {'depth':>5} {'pred':>9} {'x base':>6} {'run':>7} {'run x':>6}  fidelity")
    print(hdr)
    print("-" * (len(hdr) + 30))
    base, base_run = {}, {}
    for r in rows:
        if "error" in r:
            err = r["error"] if len(r["error"]) <= 160 else r["error"][:157] + "..."
            print(f"{r['model']:<25} {r['variant']:<14} ERROR {err}")
            continue
        if r["variant"] == "baseline":
            base[r["model"]] = r["pred_s"]
            if "seal_s" in r:
                base_run[r["model"]] = r["seal_s"]
        f = r.get("fidelity") or {}
        if "rewrite" in r:
            h = r["rewrite"]
            fid = (f"held-out vs original: top-1 {100 * h['top1_after']:.0f}%, mean logit err {h['mean_after']:.1e} "
                   f"(before re-fit {100 * h['top1_before']:.0f}%, {h['mean_before']:.1e})")
        elif r["variant"] in ("no-skips", "no-id-skips"):
            fid = f"cost reference only: {r['dropped_adds']} residual Adds dropped (a different function)"
        elif "relative_to_range" in f:
            fid = f"err {f['relative_to_range']:.1e} of range vs onnxruntime"
        else:
            fid = f.get("skipped", "-")[:40]
        speed = f"{base[r['model']] / r['pred_s']:.2f}x" if r["model"] in base else "-"
        seal = f"{r['seal_s']:.1f}s" if "seal_s" in r else "-"
        run_x = f"{base_run[r['model']] / r['seal_s']:.2f}x" if "seal_s" in r and r["model"] in base_run else "-"
        if "run_err_vs_original" in r:
            fid += (f"; encrypted run: {r['bootstraps_run']} bootstraps, err {r['run_err_vs_original']:.1e} of range vs "
                    f"the original, argmax {'agrees' if r['run_argmax_vs_original'] else 'DIFFERS'}")
        print(f"{r['model']:<25} {r['variant']:<14} {r['adds']:>4} {r['skips']:>5} {r['skip_range']:>5.1f} "
              f"{r['live']:>5} {r['params']:<22} {r['refreshes']:>5} {r['refresh_s']:>6.1f}s {r['rotations']:>7} "
              f"{r['depth']:>5} {r['pred_s']:>8.1f}s {speed:>6} {seal:>7} {run_x:>6}  {fid}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
