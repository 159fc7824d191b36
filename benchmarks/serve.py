"""Load benchmark of `hecompile serve`: K concurrent clients on loopback, real SEAL encryption.

    python benchmarks/serve.py                       # tiny ResNet and digits, K = 1, 2, 4
    python benchmarks/serve.py --models digits --clients 1,2 --queries 4 --workers 2
    python benchmarks/serve.py --models tiny --target lattigo:toy-n12   # non-interactive (bootstraps)
    python benchmarks/serve.py --models resnet20 --clients 1 --queries 4 --workers 1 --serve-flags=--plaintext-cache=256M

For each model: compile it (``--ring 8192``, or ``--target T``; toy targets with ``--security none``,
INSECURE, for speed; cached in benchmarks/.cache/serve), export its client
file, start ``hecompile serve`` (``--workers W``, a fresh store), give each of the K clients its own
key set (made and uploaded before timing), then for each K run K client threads, each sending
``--queries`` inferences one after the other (stopping early past ``--max-seconds``).  A query's
latency is the client's whole ``infer``: encrypt, every round trip of the session (the
client-aided refreshes), decrypt.  Server peak memory is the largest sum of the resident sets of
the server process and its workers, sampled every 50 ms during the round.  Every answer is
compared with onnxruntime on the original model: ``!=ort`` counts answers whose argmax differs
(must be 0), ``err/bound`` is the largest error over the compile report's error bound (must be <= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "serve"
MODELS = {"tiny": "tiny_resnet_poly", "digits": "digits_poly", "resnet20": "resnet20_poly"}


def onnx_path(name: str) -> Path:
    """A bundled model (models/), or one models/build_models.py builds into benchmarks/.cache."""
    bundled = ROOT / "models" / f"{name}.onnx"
    if bundled.exists():
        return bundled
    built = ROOT / "benchmarks" / ".cache" / f"{name}.onnx"
    if not built.exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "build_models.py"), "--out", str(built.parent), name],
                       check=True, stdout=subprocess.DEVNULL)
    return built


def compile_model(name: str, target: str | None = None) -> tuple[Path, Path]:
    CACHE.mkdir(parents=True, exist_ok=True)
    onnx = onnx_path(name)
    tag = f"{name}.{target.replace(':', '-')}" if target else name
    hec, cf = CACHE / f"{tag}.hec", CACHE / f"{tag}.client"
    flags = ["--ring", "8192"] if not target else ["--target", target] + (
        ["--security", "none"] if ":toy" in target else [])
    if not hec.exists() or hec.stat().st_mtime < onnx.stat().st_mtime:
        subprocess.run([sys.executable, "-m", "hecompiler.cli", str(onnx), "-o", str(hec), *flags, "-q"],
                       check=True)
    subprocess.run([sys.executable, "-m", "hecompiler.cli", "export-client", str(hec), "-o", str(cf)], check=True,
                   stdout=subprocess.DEVNULL)
    return hec, cf


def inputs(name: str, n: int) -> list[np.ndarray]:
    if name == "digits_poly":
        x = np.load(ROOT / "models" / "digits_test_x.npy")
        return [x[i % len(x): i % len(x) + 1] for i in range(n)]
    import onnxruntime as ort

    shape = [d if isinstance(d, int) else 1 for d in
             ort.InferenceSession(str(onnx_path(name)), providers=["CPUExecutionProvider"]).get_inputs()[0].shape]
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(n)]


def reference(name: str, xs) -> list[np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(onnx_path(name)), providers=["CPUExecutionProvider"])
    iname = s.get_inputs()[0].name
    return [s.run(None, {iname: np.asarray(x, np.float32)})[0] for x in xs]


def tree_rss(pid: int) -> int:
    """Resident set size of ``pid`` and all its descendants, bytes."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(0.05)


def start_server(hec: Path, store: Path, workers: int, log: Path, flags: list[str] = ()):
    err = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "hecompiler.cli", "serve", str(hec), "--port", "0", "--store",
                             str(store), "--workers", str(workers), "--queue", "64", *flags],
                            stdout=subprocess.PIPE, stderr=err)
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}; see {log}")
    return proc, line.split()[-1]


def run_round(clients, xs_per_client, max_seconds: float):
    lat, answers, errors = [], [], []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def one(c, xs):
        for x in xs:
            if time.monotonic() > deadline:
                return
            t = time.perf_counter()
            try:
                y = c.infer(x)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                return
            dt = time.perf_counter() - t
            with lock:
                lat.append(dt)
                answers.append((x, y))

    ts = [threading.Thread(target=one, args=(c, xs)) for c, xs in zip(clients, xs_per_client)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, lat, answers, errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,digits", help="tiny,digits,resnet20 (default: tiny,digits)")
    ap.add_argument("--clients", default="1,2,4", help="values of K (default: %(default)s)")
    ap.add_argument("--queries", type=int, default=6, help="queries per client per round (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="server worker processes (default: %(default)s)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="time bound of one round (default: %(default)s)")
    ap.add_argument("--target", default=None, metavar="T",
                    help="compile for this target (e.g. lattigo:toy-n12: bootstrapping, no client round trip; toy "
                         "targets are compiled with --security none, INSECURE); default: SEAL, --ring 8192")
    ap.add_argument("--serve-flags", default="", metavar="FLAGS",
                    help="more flags for hecompile serve, e.g. --serve-flags=--plaintext-cache=256M")
    ap.add_argument("--json", metavar="OUT.json", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    from hecompiler.client import Client

    ks = [int(k) for k in args.clients.split(",")]
    rows = []
    head = (f"{'model':<17} {'K':>2} {'queries':>7} {'wall':>7} {'q/s':>6} {'p50':>7} {'p99':>7} {'server peak':>11} "
            f"{'key sets':>8} {'!=ort':>5} {'err/bound':>9}")
    print(f"hecompile serve load benchmark: {args.workers} worker process(es), {os.cpu_count()} cores, loopback; "
          f"{args.queries} queries per client per round; target {args.target or 'seal (--ring 8192)'}"
          + (f"; serve {args.serve_flags}" if args.serve_flags else ""))
    print(head)
    for short in args.models.split(","):
        name = MODELS.get(short, short)
        hec, cf = compile_model(name, args.target)
        work = Path(tempfile.mkdtemp(prefix=f"hec-serve-bench-{name}-"))
        proc, url = start_server(hec, work / "store", args.workers, work / "serve.log", args.serve_flags.split())
        try:
            clients = [Client(cf, url, work / f"keys{i}") for i in range(max(ks))]
            for c in clients:
                c.ensure_keys()  # key sets made and uploaded before timing
            n_all = max(ks) * args.queries
            pool = inputs(name, n_all)
            for k in ks:
                xs_per_client = [pool[i * args.queries:(i + 1) * args.queries] for i in range(k)]
                sampler = Sampler(proc.pid)
                sampler.start()
                wall, lat, answers, errors = run_round(clients[:k], xs_per_client, args.max_seconds)
                sampler.stop.set()
                sampler.join()
                refs = reference(name, [x for x, _ in answers])
                differ = sum(int(np.argmax(y) != np.argmax(r)) for (_, y), r in zip(answers, refs))
                cp = clients[0].prog
                bound = cp.error_bound() or float("nan")
                ratio = max((float(np.abs(np.asarray(y) - r).max()) / bound
                             for (_, y), r in zip(answers, refs)), default=float("nan"))
                lat_a = np.array(lat) if lat else np.array([np.nan])
                row = {"model": name, "clients": k, "queries": len(answers), "failed": len(errors), "wall_s": wall,
                       "throughput_qps": len(answers) / wall, "p50_s": float(np.percentile(lat_a, 50)),
                       "p99_s": float(np.percentile(lat_a, 99)), "server_peak_bytes": sampler.peak,
                       "key_sets": k, "argmax_differs": differ, "max_err_over_bound": ratio}
                rows.append(row)
                print(f"{name:<17} {k:>2} {len(answers):>7} {wall:>6.1f}s {row['throughput_qps']:>6.2f} "
                      f"{row['p50_s']:>6.2f}s {row['p99_s']:>6.2f}s {sampler.peak / 2**20:>7.0f} MiB {k:>8} "
                      f"{differ:>5} {ratio:>9.2f}" + (f"  ({len(errors)} failed: {errors[0]})" if errors else ""),
                      flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = sum(r["argmax_differs"] + r["failed"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
