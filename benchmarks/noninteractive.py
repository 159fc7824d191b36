"""Non-interactive encrypted inference with real bootstraps (Lattigo), measured.

    python benchmarks/noninteractive.py                          # 128-bit n16-sparse: tiny, ResNet-8, ResNet-20
    python benchmarks/noninteractive.py --target lattigo         # the planner picks the set per model
    python benchmarks/noninteractive.py --target lattigo:toy-n12 --models tiny_resnet_poly   # INSECURE, quick

Every row is one model run through the client/server commands, each step a fresh process so
its peak memory and CPU time are its own (os.wait4):

    hecompile M.onnx -o M.hec --target T          (compile: predicted seconds, bootstraps, keys)
    hecompile keygen M.hec --client-dir C --server-dir S     (client)
    hecompile encrypt M.hec --keys C --input X -o X.b        (client)
    hecompile eval M.hec --keys S --input X.b --state ST -o Y.b   (server: loads keys, evaluates alone)
    hecompile decrypt M.hec --keys C --ciphertext Y.b -o Y.npy    (client)

Columns: keygen wall/CPU seconds and peak RSS (client), server eval wall and CPU seconds
(the whole `eval` process: start, loading its keys, preparing the bootstrapper, evaluating)
and, as "run s", the executor's own evaluation time (what the prediction predicts), its peak RSS, key bytes on the server, bootstraps, rotations,
predicted eval seconds, max error against onnxruntime relative to the output range, argmax.
Only one multi-GiB process runs at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
MODELS = ["tiny_resnet_poly", "resnet8_poly", "resnet20_poly"]


def ensure_model(name: str) -> tuple[Path, Path]:
    if (ROOT / "models" / f"{name}.onnx").exists():
        return ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}.input.npy"
    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / f"{name}.onnx"
    if not p.exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "build_models.py"), "--out", str(CACHE), name],
                       check=True, stdout=subprocess.DEVNULL)
    return p, CACHE / f"{name}.input.npy"


def measured(args: list[str], env=None) -> dict:
    """Like :func:`step`, with the child's CPU seconds and peak RSS from wait4."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "hecompiler.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    # read the pipes fully before reaping (a full pipe would block the child)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"hecompile {' '.join(args)} failed:\n{err[-3000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "peak": ru.ru_maxrss * 1024, "out": out, "err": err}


def row(name: str, target: str, extra: list[str], work: Path) -> dict:
    onnx_path, x_path = ensure_model(name)
    hec = work / f"{name}.hec"
    flags = ["--security", "none"] if "toy" in target else []
    comp = measured([str(onnx_path), "-o", str(hec), "--target", target, "-q", *flags, *extra])
    pred = json.loads(measured(["inspect", str(hec), "--json"])["out"])
    c, s = work / "client", work / "server"
    for d in (c, s):
        shutil.rmtree(d, ignore_errors=True)
    env = dict(os.environ)  # the server sets its own GC policy (hecompiler.target.LATTIGO_SERVER_GC_PERCENT) unless GOGC is set
    kg = measured(["keygen", str(hec), "--client-dir", str(c), "--server-dir", str(s)], env)
    enc = measured(["encrypt", str(hec), "--keys", str(c), "--input", str(x_path), "-o", str(work / "x.b")], env)
    ev = measured(["eval", str(hec), "--keys", str(s), "--input", str(work / "x.b"), "--state", str(work / "st.b"),
                   "-o", str(work / "y.b")], env)
    dec = measured(["decrypt", str(hec), "--keys", str(c), "--ciphertext", str(work / "y.b"), "-o",
                    str(work / "y.npy")], env)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.load(x_path)
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    y = np.load(work / "y.npy")
    key_bytes = sum(f.stat().st_size for f in s.iterdir())
    from hecompiler.backends.protocol import Bundle

    stats = Bundle.load(work / "y.b").meta.get("stats", {})
    return {"model": name, "target": pred["target"], "params": f"N={pred['params']['ring_degree']} L={pred['params']['top_level']}",
            "compile_s": comp["wall"], "keygen_s": kg["wall"], "keygen_cpu": kg["cpu"], "keygen_peak": kg["peak"],
            "encrypt_s": enc["wall"], "eval_s": ev["wall"], "eval_cpu": ev["cpu"], "server_peak": ev["peak"],
            "eval_exec_s": float(stats.get("eval_seconds", float("nan"))),
            "decrypt_s": dec["wall"], "server_key_bytes": key_bytes, "bootstraps": pred["ops"]["bootstraps"],
            "rotations": pred["ops"]["rotations"], "pred_s": pred["predicted_seconds"],
            "pred_peak": pred["predicted_peak_bytes"], "rel_err": float(np.abs(y - ref).max() / np.ptp(ref)),
            "argmax": bool(np.argmax(y) == np.argmax(ref))}


def table(rows: list[dict]) -> str:
    head = (f"{'model':<17} {'set':<15} {'params':<10} {'compile s':>9} {'keygen s':>8} {'(CPU)':>6} {'keygen GiB':>10} {'eval s':>7} {'(CPU)':>7} "
            f"{'run s':>6} "
            f"{'pred s':>7} {'server GiB':>10} {'pred GiB':>8} {'keys GiB':>8} {'boots':>5} {'rots':>5} "
            f"{'err/range':>9} {'argmax':>6}")
    lines = [head, "-" * len(head)]
    g = 2.0 ** 30
    for r in rows:
        lines.append(f"{r['model']:<17} {r['target'].partition(':')[2]:<15} {r['params']:<10} {r['compile_s']:9.1f} "
                     f"{r['keygen_s']:8.1f} {r['keygen_cpu']:6.0f} "
                     f"{r['keygen_peak'] / g:10.2f} {r['eval_s']:7.1f} {r['eval_cpu']:7.1f} {r['eval_exec_s']:6.1f} "
                     f"{r['pred_s']:7.1f} "
                     f"{r['server_peak'] / g:10.2f} {r['pred_peak'] / g:8.2f} {r['server_key_bytes'] / g:8.2f} "
                     f"{r['bootstraps']:5d} {r['rotations']:5d} {r['rel_err']:9.1e} {str(r['argmax']):>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--target", default="lattigo:n16-sparse")
    ap.add_argument("--extra-flags", action="append", default=[], help="passed to the compile (repeat)")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hec-noninteractive-") as tmp:
        for name in args.models:
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(row(name, args.target, args.extra_flags, Path(tmp)))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"target {args.target} (set: the one the program was compiled for); every step a fresh process (peak RSS "
          f"and CPU from wait4)")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
