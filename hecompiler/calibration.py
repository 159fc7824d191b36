"""Calibration: the input ranges of the non-polynomial ops, measured on data.

:func:`calibrate` runs the *original* model in onnxruntime over N inputs,
with every input of a Relu / Clip / MaxPool (and anything else named)
exposed as an extra graph output, and records for each such tensor its min,
max, mean, standard deviation, a few quantiles and a histogram.  The result
is a plain JSON-able dict ``{value name: stats}`` that the approximating
passes read from ``ctx.options["calibration"]`` (value names in the graph IR
are the ONNX tensor names; every stats entry is also stored under
``"<op output name>@input"`` so a pass finds it even if an exact rewrite
renamed the op's input).  :func:`calibrate_graph` does the same with the
reference interpreter on a graph IR.

:func:`check_ranges` is the run-time guard: it runs an approximated graph in
the interpreter on one input and returns a warning for every approximated op
whose input left the interval its polynomial was fitted on (outside it a
polynomial diverges fast).  ``hecompile run --backend sim`` calls it when the
program's metadata records intervals.

:func:`evaluate` compares the original model with the approximated graph on
a set of inputs: top-1 agreement, accuracy when labels are given, and the
max/mean logit error (the fidelity report of the approximation).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import HecError
from .ir import Graph

#: ops that cannot run under HE as they are and need calibrated ranges
NON_POLY_OPS = ("Relu", "Clip", "MaxPool")
HIST_BINS = 64


class CalibrationError(HecError):
    pass


def as_batch(x: np.ndarray, input_shape: Sequence[int], what: str = "--calibration") -> np.ndarray:
    """``x`` as N inputs of ``input_shape`` (shape [N, ...] with the model's batch 1, or one input)."""
    x = np.asarray(x)
    shape = tuple(int(d) for d in input_shape)
    if not np.issubdtype(x.dtype, np.number):
        raise CalibrationError(f"{what}: expected a numeric array, got dtype {x.dtype}")
    # result: [N, *shape[1:]], so that x[i:i+1] is one input of the model's (batch-1) shape
    if shape and shape[0] == 1:
        if x.shape == shape or (x.ndim == len(shape) and x.shape[1:] == shape[1:]):
            return np.ascontiguousarray(x, np.float32)
        if x.shape[1:] == shape:
            return np.ascontiguousarray(x.reshape((x.shape[0],) + shape[1:]), np.float32)
    raise CalibrationError(f"{what}: shape {list(x.shape)} is not N inputs shaped like the model input "
                           f"{list(shape)} (give [N, {', '.join(str(d) for d in shape[1:])}])")


def stats_of(samples: Sequence[np.ndarray]) -> dict[str, Any]:
    a = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in samples])
    lo, hi = float(a.min()), float(a.max())
    q = np.quantile(a, [0.001, 0.01, 0.5, 0.99, 0.999])
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-9, HIST_BINS + 1)
    counts, _ = np.histogram(a, edges)
    return {"min": lo, "max": hi, "mean": float(a.mean()), "std": float(a.std()),
            "q001": float(q[0]), "q01": float(q[1]), "median": float(q[2]), "q99": float(q[3]),
            "q999": float(q[4]), "n": int(len(samples)),
            "hist": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}}


def _load_model(model):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(os.fspath(model))


def _nonpoly_inputs(model, ops: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    names, alias = [], {}
    ops = set(ops)
    for n in model.graph.node:
        if n.op_type in ops and n.input and n.input[0]:
            if n.input[0] not in names:
                names.append(n.input[0])
            alias[n.output[0] + "@input"] = n.input[0]
    return names, alias


def calibrate(model, x: np.ndarray, ops: Iterable[str] = NON_POLY_OPS,
              extra: Iterable[str] = ()) -> dict[str, dict]:
    """Stats of the input of every ``ops`` node of the ONNX ``model`` over the inputs ``x``
    ([N, ...], each shaped like the model input), from onnxruntime."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    m = _load_model(model)
    if len(m.graph.input) - len({i.name for i in m.graph.initializer} & {i.name for i in m.graph.input}) != 1:
        raise CalibrationError("calibration supports models with one input")
    inp = next(i for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer})
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in inp.type.tensor_type.shape.dim]
    xs = as_batch(x, dims)
    names, alias = _nonpoly_inputs(m, ops)
    names += [n for n in extra if n not in names]
    from_input = [n for n in names if n == inp.name]
    exposed = [n for n in names if n != inp.name]
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    have = {o.name for o in m2.graph.output}
    for n in exposed:
        if n not in have:
            m2.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    try:
        sess = ort.InferenceSession(m2.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # e.g. a model with external data given as a proto: retry from its path
        raise CalibrationError(f"onnxruntime cannot load the model for calibration: {str(e)[:200]}") from None
    outs = [o.name for o in sess.get_outputs()]
    want = [n for n in exposed if n in outs]
    samples: dict[str, list[np.ndarray]] = {n: [] for n in want}
    for n in from_input:
        samples[n] = [xs]
    for i in range(len(xs)):
        res = sess.run(want, {inp.name: xs[i:i + 1]})
        for n, r in zip(want, res):
            samples[n].append(r)
    out = {n: stats_of(s) for n, s in samples.items()}
    for a, n in alias.items():
        if n in out:
            out[a] = out[n]
    return out


def calibrate_graph(graph, x: np.ndarray, values: Iterable[str] | None = None) -> dict[str, dict]:
    """Like :func:`calibrate`, on a graph IR with the reference interpreter."""
    from .interp import Interpreter

    xs = as_batch(x, graph.inputs[0].type.shape)
    if values is None:
        values = []
        for n in graph.nodes:
            if n.op in NON_POLY_OPS and n.inputs[0].name not in values:
                values.append(n.inputs[0].name)
    values = list(values)
    samples: dict[str, list[np.ndarray]] = {v: [] for v in values}
    it = Interpreter(graph)
    for i in range(len(xs)):
        env = it.run(xs[i:i + 1], keep=True)
        for v in values:
            if v in env:
                samples[v].append(env[v])
    return {v: stats_of(s) for v, s in samples.items() if s}


def lookup(calibration: Mapping[str, dict] | None, node) -> dict | None:
    """The calibrated stats of ``node``'s first input, if any."""
    if not calibration:
        return None
    return calibration.get(node.inputs[0].name) or calibration.get(node.output.name + "@input")


# --------------------------------------------------------------------------- run-time range check

def check_ranges(graph, x: np.ndarray, intervals: Mapping[str, Sequence[float]]) -> list[str]:
    """Run ``graph`` (the approximated graph) on input ``x``; one warning line for every
    value in ``intervals`` ({value name: [lo, hi]}, the fitted intervals) that leaves its interval."""
    from .interp import run

    with np.errstate(all="ignore"):
        env = run(graph, np.asarray(x, np.float32).reshape(graph.inputs[0].type.shape), keep=True)
    return out_of_range(env, intervals)


def out_of_range(env: Mapping[str, np.ndarray], intervals: Mapping[str, Sequence[float]]) -> list[str]:
    """One warning line per value of ``env`` named in ``intervals`` that leaves its interval."""
    warns = []
    for name, iv in intervals.items():
        if name not in env:
            continue
        lo, hi = float(iv[0]), float(iv[1])
        v = np.asarray(env[name], np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(v)
            below, above = v < lo, v > hi
        n = int((below | above | bad).sum())
        if not n:
            continue
        if bad.any():
            how = f"{int(bad.sum())} not finite: the approximation diverged upstream"
        else:
            worst = max(float(lo - v.min()), float(v.max() - hi))
            half = (hi - lo) / 2 or 1.0
            how = f"up to {worst:.3g} beyond, {worst / half:.0%} of the half-width"
        warns.append(f"warning: %{name}: {n} of {v.size} values outside the fitted interval [{lo:.4g}, {hi:.4g}] "
                     f"({how}); the polynomial approximation is unreliable there")
    return warns


# --------------------------------------------------------------------------- fidelity

def _session(data):
    import onnxruntime as ort

    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _runner(model_or_graph, probes: Sequence[str] = ()):
    """A function x[1,...] -> (logits, {probe: array}) for an ONNX model (onnxruntime) or a graph IR
    (exported to ONNX for onnxruntime; the reference interpreter if the export does not load)."""
    if isinstance(model_or_graph, Graph):
        try:
            import onnx
            from onnx import helper

            from .onnx_export import to_onnx

            m = to_onnx(model_or_graph)
            have = {o.name for o in m.graph.output}
            for p in probes:
                if p not in have:
                    m.graph.output.append(helper.make_tensor_value_info(p, onnx.TensorProto.FLOAT, None))
            sess = _session(m.SerializeToString())
        except Exception:
            from .interp import Interpreter

            it = Interpreter(model_or_graph)
            out_name = model_or_graph.outputs[0].name

            def run_interp(x):
                env = it.run(x, keep=True)
                return np.asarray(env[out_name]), {p: env[p] for p in probes if p in env}
            return run_interp
    else:
        m = model_or_graph
        sess = _session(m.SerializeToString() if hasattr(m, "SerializeToString") else os.fspath(m))
        probes = ()
    name = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    probes = [p for p in probes if p in outs]

    def run(x):
        res = sess.run([outs[0]] + probes, {name: x})
        return res[0], dict(zip(probes, res[1:]))
    return run


def evaluate(original, approximated, x: np.ndarray, labels: np.ndarray | None = None,
             input_shape: Sequence[int] | None = None, limit: int | None = None,
             intervals: Mapping[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """Fidelity of ``approximated`` (graph IR) against ``original`` (ONNX model) on inputs ``x``;
    with ``intervals``, also how many inputs drive an approximated op outside its fitted interval."""
    shape = input_shape or approximated.inputs[0].type.shape
    xs = as_batch(x, shape)
    if limit is not None:
        xs = xs[:limit]
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) < len(xs):
            raise CalibrationError(f"labels: {len(labels)} labels for {len(xs)} inputs")
        labels = labels[: len(xs)]
    intervals = dict(intervals or {})
    f_ref, f_app = _runner(original), _runner(approximated, list(intervals))
    ref, app, bad = [], [], 0
    for i in range(len(xs)):
        ref.append(np.asarray(f_ref(xs[i:i + 1])[0], np.float64).reshape(-1))
        y, probes = f_app(xs[i:i + 1])
        app.append(np.asarray(y, np.float64).reshape(-1))
        if probes and out_of_range(probes, intervals):
            bad += 1
    out = compare_logits(np.stack(ref), np.stack(app), labels)
    if intervals:
        out["out_of_range_inputs"] = bad
    return out


def compare_logits(ref: np.ndarray, app: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    ref, app = np.asarray(ref, np.float64), np.asarray(app, np.float64)
    err = np.abs(app - ref)
    rng = float(np.ptp(ref)) or 1.0
    out = {"n": int(len(ref)),
           "top1_agreement": float(np.mean(ref.argmax(1) == app.argmax(1))),
           "max_logit_error": float(err.max()),
           "mean_logit_error": float(err.mean()),
           "max_error_over_range": float(err.max()) / rng}
    if labels is not None:
        y = np.asarray(labels).reshape(-1).astype(np.int64)
        if len(y) != len(ref):
            raise CalibrationError(f"labels: {len(y)} labels for {len(ref)} inputs")
        out["accuracy_original"] = float(np.mean(ref.argmax(1) == y))
        out["accuracy_approximated"] = float(np.mean(app.argmax(1) == y))
    return out


# --------------------------------------------------------------------------- compile-driver glue

def stats_for(options: dict, graph, node) -> dict | None:
    """Calibrated stats of ``node``'s input for a pass: from ``options["calibration"]``, else (names
    an exact rewrite changed) measured on the current graph with the interpreter over
    ``options["calibration_inputs"]``."""
    s = lookup(options.get("calibration"), node)
    if s is None and options.get("calibration_inputs") is not None:
        calib = options.get("calibration")
        if calib is None:
            calib = options["calibration"] = {}
        missing = [n.inputs[0].name for n in graph.nodes if n.op in NON_POLY_OPS and lookup(calib, n) is None]
        calib.update(calibrate_graph(graph, options["calibration_inputs"], missing))
        s = lookup(calib, node)
    return s


def approximation_passes(graph, opts) -> str:
    """The approximating passes the graph needs (after the canonical ones), from the compile options;
    "" when it has no Relu/Clip/MaxPool or the user's pipeline already approximates them."""
    if not getattr(opts, "approximate", True):
        return ""
    ops = {n.op for n in graph.nodes}
    user = opts.passes or ""
    parts = []
    rng = f",ranges={opts.approx_range}" if opts.approx_range else ""
    if ops & {"Relu", "Clip"} and "relu-to-poly" not in user:
        o = [f"degree={opts.relu_degree}", f"margin={opts.relu_margin:g}", f"fit={opts.relu_fit}"]
        if opts.relu_composite:
            o.append(f"composite={opts.relu_composite}")
        if opts.relu_layers:
            o.append(f"layers={opts.relu_layers}")
        parts.append("relu-to-poly{" + ",".join(o) + rng + "}")
    if "MaxPool" in ops and "maxpool-to-" not in user:
        if opts.maxpool == "avg":
            parts.append("maxpool-to-avgpool")
        elif opts.maxpool == "poly":
            o = [f"degree={opts.maxpool_degree}", f"margin={opts.relu_margin:g}"]
            if opts.maxpool_composite:
                o.append(f"composite={opts.maxpool_composite}")
            parts.append("maxpool-to-poly{" + ",".join(o) + rng + "}")
        elif opts.maxpool != "none":
            raise CalibrationError(f"--maxpool {opts.maxpool!r}: use avg or poly")
    return ",".join(parts + ["dce"]) if parts else ""


def _user_passes_calibrate(spec: str | None) -> bool:
    """Whether a pass of the user's pipeline reads calibration statistics."""
    from .passmanager import parse_pipeline

    return bool(spec and spec.strip()) and any(p.uses_calibration for p in parse_pipeline(spec))


def approximation_setup(model, graph, opts) -> tuple[str, dict]:
    """(pipeline spec, pass options) for compiling ``graph`` (the imported model) with ``opts``."""
    spec = opts.passes
    extra = approximation_passes(graph, opts)
    if extra:
        spec = f"{spec},{extra}" if spec.strip() else extra
    options: dict[str, Any] = {}
    if getattr(opts, "calibration_stats", None) is not None:
        options["calibration"] = dict(opts.calibration_stats)
    elif opts.calibration is not None and (extra or _user_passes_calibrate(opts.passes)):
        xs = as_batch(opts.calibration, graph.inputs[0].type.shape)
        try:
            options["calibration"] = calibrate(model, xs)
        except CalibrationError:
            raise
        except Exception as e:  # a model onnxruntime cannot run: the interpreter measures instead
            options["calibration_note"] = f"onnxruntime could not run the model ({type(e).__name__}); " \
                                          f"ranges measured with the reference interpreter"
        options["calibration_inputs"] = xs
    return spec, options


def _compact(stats: dict, hist: bool) -> dict:
    out = {k: stats[k] for k in ("min", "max", "mean", "std", "q999") if k in stats}
    if hist and "hist" in stats:
        out["hist"] = stats["hist"]
    return out


def approximation_report(model, graph, pipeline, options: dict, opts) -> dict | None:
    """The approximation section of the compile report (and .hec metadata): what each approximating
    pass did, the fitted intervals, the calibration ranges used (so the graph can be rebuilt), and the
    fidelity against the original model on the calibration and held-out sets."""
    rec = options.get("approximation")
    if not rec or not rec.get("activations"):
        return None
    calib = options.get("calibration") or {}
    uses_data = any("fit=data" in r.spec for r in pipeline.records)
    out: dict[str, Any] = {
        "passes": [r.spec for r in pipeline.records if not r.exact],
        "activations": rec["activations"],
        "intervals": rec.get("intervals", {}),
        "ranges": {k: _compact(v, uses_data) for k, v in calib.items()},
        "calibration_inputs": int(len(options["calibration_inputs"])) if options.get("calibration_inputs")
        is not None else 0,
        "fidelity": {},
    }
    if options.get("calibration_note"):
        out["calibration_note"] = options["calibration_note"]
    if isinstance(model, Graph):
        out["fidelity_skipped"] = "the original is a graph IR, not an ONNX model"
        return out
    sets = [("calibration", opts.calibration, opts.labels), ("heldout", opts.heldout, opts.heldout_labels)]
    for name, x, y in sets:
        if x is None:
            continue
        out["fidelity"][name] = evaluate(model, graph, x, y, intervals=out["intervals"])
    return out


def format_approximation(a: dict) -> list[str]:
    lines = [f"approximation (changes the function; passes: {', '.join(a['passes'])}):"]
    lines.append(f"  {'node':<40} {'op':<8} {'calibrated':>17} {'interval':>17}  {'approximation':<28} "
                 f"{'depth':>5} {'fit err':>8}")
    for r in a["activations"]:
        cal = r.get("calibrated")
        iv = r.get("interval")
        cal_s = f"[{cal[0]:.3g}, {cal[1]:.3g}]" if cal else "-"
        iv_s = f"[{iv[0]:.3g}, {iv[1]:.3g}]" if iv else "-"
        err = r.get("fit_max_error")
        lines.append(f"  {str(r['node'])[-40:]:<40} {r['op']:<8} {cal_s:>17} {iv_s:>17}  "
                     f"{r['approximation'][:28]:<28} {r.get('depth', 0):>5} "
                     f"{'-' if err is None else f'{err:.2e}':>8}")
    if a.get("calibration_note"):
        lines.append(f"  note: {a['calibration_note']}")
    for name, f in a.get("fidelity", {}).items():
        s = (f"  fidelity on the {name} set ({f['n']} inputs, original model in onnxruntime vs approximated "
             f"graph): top-1 agreement {f['top1_agreement']:.2%}, max logit error {f['max_logit_error']:.3g}, "
             f"mean {f['mean_logit_error']:.3g}")
        if "accuracy_original" in f:
            s += f"; accuracy {f['accuracy_original']:.2%} -> {f['accuracy_approximated']:.2%}"
        if "out_of_range_inputs" in f:
            s += f"; inputs leaving a fitted interval: {f['out_of_range_inputs']}"
        lines.append(s)
    fid = a.get("fidelity", {}).values()
    if any(f["top1_agreement"] < 0.99 or f.get("out_of_range_inputs") or not np.isfinite(f["max_logit_error"])
           for f in fid):
        lines.append("  the approximation changes the model's predictions: try a composite (--relu-composite 7x7x7x7), "
                     "--maxpool poly, or a larger --relu-margin when inputs leave their intervals")
    if not a.get("fidelity") and "fidelity_skipped" not in a:
        lines.append("  fidelity: give --calibration X.npy (and --heldout H.npy, --labels Y.npy) to measure it")
    return lines


def run_time_range_check(meta: dict, x: np.ndarray, reference: str | None, input_name: str = "") -> list[str]:
    """``hecompile run``: rebuild the approximated graph from the original model (``reference``,
    checked against the program's metadata) and the recorded passes and ranges, run it on ``x`` in
    the interpreter, and return one warning per approximated op whose input leaves its interval."""
    approx = meta["report"]["approximation"]
    intervals = approx["intervals"]
    if not reference:
        return [f"note: the program approximates {len(approx['activations'])} non-polynomial op(s); give "
                f"--reference MODEL.onnx to check that this input keeps their inputs inside the fitted intervals"]
    import hashlib

    from .frontend import load_onnx
    from .passmanager import PassManager

    with open(reference, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    if meta.get("source_sha256") and sha != meta["source_sha256"]:
        return [f"note: {os.path.basename(reference)} is not the model this program was compiled from "
                f"(sha256 differs); activation range check skipped"]
    try:
        g = load_onnx(reference, {input_name: list(np.shape(x))} if input_name else None)
        PassManager(",".join(meta["passes"]), verify_each=False,
                    options={"calibration": approx.get("ranges") or {}}).run(g)
        warns = check_ranges(g, x, intervals)
    except HecError as e:
        return [f"note: activation range check skipped: {str(e).splitlines()[0]}"]
    return warns or [f"activation ranges: all {len(intervals)} approximated op inputs inside their fitted intervals"]
