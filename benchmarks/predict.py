"""Predicted against measured: what the compile report promises and what an encrypted run takes.

    python benchmarks/predict.py                         # tiny ResNet and ResNet-20 (poly), SEAL
    python benchmarks/predict.py --models tiny_resnet_poly --extra-flags=--max-refreshes=0 --extra-flags=--max-memory=20G

For each model: ``hecompile M.onnx -o M.hec`` (the planner's prediction, read with
``hecompile inspect --json``), then ``hecompile run M.hec --input X --reference M.onnx --json``
in a fresh process (so its peak RSS is its own).  Prints one row per model, predicted beside
measured, and the ratio measured/predicted.  The predictions use the cost table the compiler
finds (``hecompile calibrate`` measures this machine's; the table says which in ``cost_table``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
HEC = [sys.executable, "-m", "hecompiler.cli"]


def ensure_model(name: str) -> tuple[Path, Path]:
    if (ROOT / "models" / f"{name}.onnx").exists():
        return ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}.input.npy"
    CACHE.mkdir(parents=True, exist_ok=True)
    onnx_path = CACHE / f"{name}.onnx"
    if not onnx_path.exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "build_models.py"), "--out", str(CACHE), name],
                       check=True, stdout=subprocess.DEVNULL)
    return onnx_path, CACHE / f"{name}.input.npy"


def run_json(args: list[str]) -> dict:
    out = subprocess.run(HEC + args, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"hecompile {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def measure(name: str, extra: list[str]) -> dict:
    onnx_path, x_path = ensure_model(name)
    hec = CACHE / f"{name}.predict.hec"
    CACHE.mkdir(parents=True, exist_ok=True)
    comp = subprocess.run(HEC + [str(onnx_path), "-o", str(hec), "-q", *extra], capture_output=True, text=True)
    if comp.returncode:
        raise SystemExit(f"compiling {name} failed:\n{comp.stderr[-2000:]}")
    pred = run_json(["inspect", str(hec), "--json"])
    got = run_json(["run", str(hec), "--input", str(x_path), "--reference", str(onnx_path), "--json", "-q"])
    return {"model": name, "pred": pred, "got": got}


def ratio(a, b) -> str:
    return f"{a / b:5.2f}" if a and b else "    -"


def table(rows: list[dict]) -> str:
    head = (f"{'model':<18} {'params':<22} {'eval s pred*':>12} {'meas':>7} {'m/p':>5}  {'peak MiB pred':>13} "
            f"{'meas':>7} {'m/p':>5}  {'keygen s pred':>13} {'meas':>6} {'m/p':>5}  {'keys':>4} {'err/range':>9} "
            f"{'argmax':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        p, g = r["pred"], r["got"]
        pp = p["params"]
        params = f"N={pp['ring_degree']} L={pp['top_level']} 2^{pp['scale_bits']}"
        # hecompile run is one local process: the prediction without its network part (transfers and
        # round trips to a remote key holder) is what it should take
        es, ms = p["predicted_seconds"] - (p.get("predicted_network_seconds") or 0.0), g["seconds"]["eval"]
        # with helper processes: the evaluating process's peak plus each helper's (pages they share
        # from the fork counted in each: an upper bound)
        helpers = (p.get("processes") or 1) - 1 if g.get("split_linears") else 0
        pm, mm = p["predicted_peak_bytes"], g["peak_rss_bytes"] + helpers * (g.get("helper_peak_rss_bytes") or 0)
        pk, mk = p["predicted_keygen_seconds"], g["seconds"]["keygen"]
        lines.append(f"{r['model']:<18} {params:<22} {es:12.2f} {ms:7.2f} {ratio(ms, es)}  {pm / 2**20:13.0f} "
                     f"{mm / 2**20:7.0f} {ratio(mm, pm)}  {pk:13.2f} {mk:6.2f} {ratio(mk, pk)}  {p['galois_keys']:>4} "
                     f"{g.get('relative_to_range', float('nan')):9.1e} {str(g.get('argmax_agrees', '-')):>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--models", nargs="+", default=["tiny_resnet_poly", "resnet20_poly"])
    ap.add_argument("--extra-flags", action="append", default=[], help="passed to the compile (repeat)")
    ap.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.append(measure(name, args.extra_flags))
    print(table(rows))
    print("* eval s pred: the compile report's prediction without its network part (client-aided refresh transfers "
          "and round trips), since hecompile run is one local process; m/p: measured / predicted; peak meas: the "
          "evaluating process's plus its helpers' (pages shared from the fork counted in each)")
    print(f"cost table: {rows[0]['pred'].get('cost_table')}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
