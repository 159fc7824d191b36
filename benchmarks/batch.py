"""Batches in the slots: one inference over B inputs (batch-to-channels), amortised per input.

    python benchmarks/batch.py                       # tiny_resnet_poly and digits_poly, B = 1, 4, 16, 64
    python benchmarks/batch.py --models tiny_resnet_poly --batches 1 32

Each model gets a symbolic batch axis and is compiled with ``--input-shape input=B,...`` (default
target: SEAL, client-aided refreshes, 128-bit), then run under real SEAL encryption by
``hecompile run --json`` (keygen, encrypt, evaluate, decrypt in one child process) on B inputs
drawn from N(0, 1), compared with onnxruntime on the original model.

Columns: parameters; Galois keys; rotations and ct-pt multiplications per inference; predicted
seconds per inference and per input; measured evaluation seconds per inference and per input
(SEAL, wall); peak RSS of the run; max error against onnxruntime relative to its output range;
inputs whose argmax agrees.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["tiny_resnet_poly", "digits_poly"]


def dynamic_model(name: str, out: Path) -> tuple[Path, list[int]]:
    """The bundled model with its batch axis made symbolic; (path, per-input shape)."""
    m = onnx.load(ROOT / "models" / f"{name}.onnx")
    for io in list(m.graph.input) + list(m.graph.output):
        io.type.tensor_type.shape.dim[0].dim_param = "batch"
    del m.graph.value_info[:]
    p = out / f"{name}.dyn.onnx"
    onnx.save(m, p)
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]]
    return p, shape


def hecompile(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "hecompiler.cli", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"hecompile {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def row(name: str, batch: int, work: Path) -> dict:
    onnx_path, shape = dynamic_model(name, work)
    hec = work / f"{name}.b{batch}.hec"
    iname = onnx.load(onnx_path).graph.input[0].name
    hecompile(str(onnx_path), "-o", str(hec), "-q", "--input-shape", f"{iname}={','.join(map(str, [batch, *shape]))}")
    pred = json.loads(hecompile("inspect", str(hec), "--json"))
    x = np.random.default_rng(batch).normal(size=(batch, *shape)).astype(np.float32)
    xp = work / "x.npy"
    np.save(xp, x)
    run = json.loads(hecompile("run", str(hec), "--input", str(xp), "--reference", str(onnx_path), "--json"))
    out = np.asarray(next(iter(run["outputs"].values()))["values"])
    ref = _reference(onnx_path, x)
    agree = int((np.argmax(out.reshape(batch, -1), 1) == np.argmax(ref.reshape(batch, -1), 1)).sum())
    ev = run["seconds"]["eval"]
    ops = pred["ops"]
    return {"model": name, "batch": batch, "params": f"N={pred['params']['ring_degree']} L={pred['params']['top_level']}",
            "keys": pred["galois_keys"], "rot": ops["rotations"], "ctpt": ops["ct_pt_mults"],
            "pred_s": pred["predicted_seconds"], "pred_per_input": pred["predicted_seconds_per_input"],
            "eval_s": ev, "eval_per_input": ev / batch, "rss": run["peak_rss_bytes"],
            "err": run["relative_to_range"], "agree": agree}


def _reference(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def table(rows: list[dict]) -> str:
    head = (f"{'model':18} {'batch':>5} {'params':12} {'keys':>4} {'rot':>6} {'ct-pt':>7} {'pred s':>7} "
            f"{'pred/in':>8} {'eval s':>7} {'eval/in':>8} {'rss':>6} {'err/range':>9} {'argmax':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:18} {r['batch']:>5} {r['params']:12} {r['keys']:>4} {r['rot']:>6} {r['ctpt']:>7} "
                     f"{r['pred_s']:>7.2f} {r['pred_per_input']:>8.4f} {r['eval_s']:>7.2f} {r['eval_per_input']:>8.4f} "
                     f"{r['rss'] / 2**20:>5.0f}M {r['err']:>9.1e} {r['agree']:>3}/{r['batch']:<3}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hec-batch-") as tmp:
        for name in args.models:
            for b in args.batches:
                print(f"{name} batch {b} ...", file=sys.stderr, flush=True)
                rows.append(row(name, b, Path(tmp)))
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print("SEAL, client-aided refreshes, 128-bit; every step a fresh process")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
