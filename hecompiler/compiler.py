"""The compile driver: ONNX -> graph IR -> passes -> planning/lowering -> HE program,
plus the cost report and a fidelity check in the simulator.

This is the one entry point the CLI and the API share::

    result = hecompiler.compile_model("model.onnx")
    print(result.report_text)
    hecompiler.save_hec("model.hec", result.prog, result.metadata)
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from .costmodel import CostModel
from .errors import HecError, LoweringInvariantError, NoPlanError
from .lower import lower
from .target import Target, get_target
from .frontend import load_onnx
from .heprog import HEProgram, verify_program
from .ir import Graph
from .passmanager import DEFAULT_PIPELINE, PassManager, PipelineReport
from .planner import Candidate, PlanOptions, plan, ranked, realize


@dataclass
class CompileOptions:
    passes: str = DEFAULT_PIPELINE
    plan: PlanOptions = field(default_factory=PlanOptions)
    input_shapes: Mapping[str, Sequence[int]] | None = None
    dump_after: Sequence[str] = ()
    dump_weights: bool = False  # dumped .ir with every weight (parses back); else large constants elided
    dump_constants: bool = True  # draw constants in dumped DOT (--no-constants: leave them out)
    dump_dir: str | None = None
    #: run the program in the simulator on a sample input and compare with the original model
    check: bool = True
    sample: np.ndarray | None = None
    seed: int = 0
    #: skip the compile-time simulator check above this many ct-pt multiplications
    check_limit: int = 200_000
    #: largest acceptable estimated error under encryption, relative to the output range
    tolerance: float = 1e-3
    max_precision_attempts: int = 4
    # ---- approximation of ReLU / Clip / MaxPool (hecompiler.calibration, passes relu-to-poly, maxpool-to-*)
    #: N inputs ([N, ...] shaped like the model input) to calibrate ranges and measure fidelity on
    calibration: np.ndarray | None = None
    labels: np.ndarray | None = None  # labels of the calibration inputs (accuracy in the report)
    heldout: np.ndarray | None = None  # a held-out set for the fidelity report
    heldout_labels: np.ndarray | None = None
    calibration_stats: dict | None = None  # precomputed {value name: stats} (instead of calibration)
    approximate: bool = True  # insert the approximating passes when the graph has Relu/Clip/MaxPool
    relu_degree: int = 15
    relu_composite: str = ""  # e.g. "7x7x7": composite sign approximation instead of one polynomial
    relu_margin: float = 0.2
    relu_fit: str = "minimax"  # minimax | lsq | data
    relu_layers: str = ""  # per-layer "GLOB=SPEC;..." (SPEC: a degree or a composite)
    approx_range: str = ""  # "LO:HI" for every approximated op when there is no calibration data
    maxpool: str = "avg"  # avg | poly | none
    maxpool_degree: int = 15
    maxpool_composite: str = ""
    #: where the program will run: "seal" (default), "lattigo" / "lattigo:SET", or a Target
    target: Any = "seal"
    #: price of one CPU core for an hour: the report then gives the cost of 1000 inferences
    price_per_core_hour: float | None = None


@dataclass
class CompileResult:
    graph: Graph
    prog: HEProgram
    chosen: Candidate
    candidates: list[Candidate]
    pipeline: PipelineReport
    fidelity: dict[str, Any] | None
    metadata: dict[str, Any]
    report_text: str
    seconds: float


def _sha256_of(model) -> tuple[str, str]:
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            data = f.read()
        return hashlib.sha256(data).hexdigest(), os.path.basename(os.fspath(model))
    return hashlib.sha256(model.SerializeToString()).hexdigest(), "<model>"


def compile_model(model, options: CompileOptions | None = None, cost: CostModel | None = None,
                  progress=None) -> CompileResult:
    """Compile an ONNX model (path or ModelProto) to an HE program for ``options.target``."""
    opts = options or CompileOptions()
    target = opts.target if isinstance(opts.target, Target) else \
        get_target(opts.target, cost.refresh.kind if cost is not None else "client")
    if cost is None or (target.backend != "seal" and not cost.lattigo):
        cost = target.cost_model(cost.refresh if cost is not None and target.backend == "seal" else None)
    t0 = time.perf_counter()
    graph = load_onnx(model, opts.input_shapes)
    original = graph.clone()
    from .calibration import approximation_report, approximation_setup, as_batch

    spec, pass_options = approximation_setup(model, graph, opts)
    from .passes.batch_to_channels import batch_size

    if batch_size(graph) > 1 and "batch-to-channels" not in spec:
        spec = f"{spec},batch-to-channels" if spec.strip() else "batch-to-channels"  # last: the images stacked
    pm = PassManager(spec, dump_after=opts.dump_after, dump_dir=opts.dump_dir, options=pass_options,
                     dump_weights=opts.dump_weights, dump_constants=opts.dump_constants)
    pipeline = pm.run(graph)
    approx = approximation_report(model, graph, pipeline, pm.ctx.options, opts)
    if opts.sample is None and opts.calibration is not None:  # check precision on real data
        opts = replace(opts, sample=as_batch(opts.calibration, graph.inputs[0].type.shape)[:1])
    best, cands, costs = plan_targets(graph, opts.plan, target, cost, progress)
    probes = _probes(graph, opts)
    fidelity = None
    tried = []  # (error, candidate, fidelity) of the plans rejected for precision
    # precision: the fastest plan whose estimated error under encryption (simulator with the CKKS
    # noise model) stays within tolerance; each rejected plan says why in the report
    for attempt, cand in enumerate(ranked(cands)):
        target = cand.target or target
        cost = costs.get(target.name, cost)
        realize(graph, cand, opts.plan)
        fit_refresh_ranges(graph, cand, opts.plan, target, probes)
        prog = cand.prog
        verify_program(prog)
        n_pm = prog.op_counts().get("mul_plain", 0)
        if not opts.check:
            fidelity = None
        elif n_pm > opts.check_limit:
            fidelity = {"skipped": f"program too large for the compile-time check ({n_pm} ct-pt mults); run: "
                                   f"hecompile run OUT.hec --backend sim --input X.npy --reference MODEL.onnx"}
        else:
            fidelity = check_fidelity(original, graph, prog, opts.sample, opts.seed, model,
                                      approximated=not pipeline.exact, cost=cost, target=target)
            if "skipped" not in fidelity and fidelity["relative_to_range"] > opts.tolerance \
                    and attempt + 1 < opts.max_precision_attempts:
                cand.reason = (f"estimated error {fidelity['relative_to_range']:.1e} of the output range > "
                               f"tolerance {opts.tolerance:g}")
                cand.prog = cand.lowering = None
                tried.append((fidelity["relative_to_range"], cand, fidelity))
                continue
        best = cand
        break
    else:
        if tried:  # every plan missed the tolerance: keep the most precise one, and say so
            _, best, fidelity = min(tried, key=lambda t: t[0])
            best.reason = ""
            target = best.target or target
            cost = costs.get(target.name, cost)
            realize(graph, best, opts.plan)
            fit_refresh_ranges(graph, best, opts.plan, target, probes)
            fidelity = dict(fidelity, note=f"no plan met the tolerance {opts.tolerance:g}: kept the most precise")
    prog = best.prog
    if fidelity is not None and "skipped" not in fidelity and len(graph.inputs) == 1:
        fidelity = dict(fidelity, error_bound=report_error_bound(original, graph, prog, model, opts, cost, target))
    if opts.dump_dir and opts.dump_after:
        from .dot import to_dot
        from .fileio import atomic_write_text, makedirs

        makedirs(opts.dump_dir, "--dump-dir")
        atomic_write_text(os.path.join(opts.dump_dir, f"{len(pipeline.records) + 1:02d}-lowered.dot"),
                          to_dot(graph, title=f"{graph.name} lowered: {best.label}", annotate=best.lowering.annotate,
                                 show_constants=opts.dump_constants))
    seconds = time.perf_counter() - t0
    sha, fname = _sha256_of(model)
    report = build_report(fname, graph, best, cands, pipeline, fidelity, seconds, cost, opts.price_per_core_hour,
                          target)
    if approx is not None:
        report["approximation"] = approx
    if opts.check and len(graph.inputs) == 1 and fidelity is not None and "skipped" not in fidelity:
        report["input_limits"] = planned_input_limits(graph, prog, opts, target=target)
    metadata = {
        "source_model": fname,
        "source_sha256": sha,
        "passes": [r.spec for r in pipeline.records],
        "exact": pipeline.exact,
        "report": report,
        "report_text": format_report(report),
        "insecure_ok": best.params.security != "tc128",
        "target": target.metadata(best.params, best.primes),
    }
    if "input_limits" in report:
        metadata["input_limits"] = report["input_limits"]
    return CompileResult(graph, prog, best, cands, pipeline, fidelity, metadata, metadata["report_text"], seconds)


def plan_targets(graph: Graph, popts, target: Target, cost: CostModel, progress=None):
    """:func:`~hecompiler.planner.plan` for ``target`` and for each of its
    :attr:`~hecompiler.target.Target.alternatives` (each with its own cost table): every
    candidate of every target (those of a choice among several carry their target and show its
    set in their label), the fastest plan within the budgets, and the cost model of each target
    by name."""
    if not target.alternatives:
        best, cands = plan(graph, popts, cost, progress=progress, target=target)
        return best, cands, {target.name: cost}
    cands, costs, found, refused = [], {}, [], []
    for t in (target, *(get_target(a) for a in target.alternatives)):
        c = cost if t is target else t.cost_model()
        costs[t.name] = c
        try:
            b, cs = plan(graph, popts, c, progress=progress, target=t)
        except NoPlanError as e:
            refused.append(f"{t.name}: {e}")
            continue
        for cd in cs:
            cd.target = t
        cands += cs
        found.append(b)
    if not found:
        raise NoPlanError("; ".join(refused))
    best = min(found, key=lambda c: (c.cost.seconds, c.cost.memory_bytes))
    for b in found:
        if b is not best:  # only the chosen plan keeps its program in memory
            b.prog = b.lowering = None
    return best, cands, costs


def check_fidelity(original: Graph, graph: Graph, prog: HEProgram, sample, seed: int, model,
                   approximated: bool = False, cost: CostModel | None = None, target=None) -> dict[str, Any]:
    """Run the program in the slot simulator on a sample input, exactly and with the measured
    CKKS noise model.  The encryption error (``relative_to_range``, what the planner's tolerance
    applies to) is measured against the graph the passes produced (reference interpreter), so a
    pass's own approximation never makes the planner reject plans; when the passes changed the
    function, their effect is measured separately (``rewrite_relative_to_range``: the rewritten
    graph against the original model).  ``end_to_end_relative_to_range`` compares the program
    with the original model.  Each reference is named as what actually ran."""
    from .backends.sim import Simulator
    from .interp import run

    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        return {"skipped": "fidelity check needs one input and one output"}
    x = _check_input(graph, sample, seed)
    name = graph.inputs[0].name
    outs, stats = Simulator(prog, cost=cost, strict=False, target=target).run({name: x})
    y_exact = outs[graph.outputs[0].name]
    outs, _ = Simulator(prog, cost=cost, noise=True, seed=seed, strict=False, target=target).run({name: x})
    y = outs[graph.outputs[0].name]
    ref = np.asarray(run(graph, x)[0], np.float64)
    orig, orig_label = _original_output(model, original, x)
    rng = float(np.ptp(ref)) or 1.0
    orng = float(np.ptp(orig)) or 1.0
    err = float(np.abs(y - ref).max())
    out = {
        "input": "sample" if sample is not None else f"N(0,1) seed {seed}",
        "reference": "the rewritten graph (reference interpreter)",
        "max_abs_error": err,
        "relative_to_range": err / rng,
        "exact_relative_to_range": float(np.abs(y_exact - ref).max()) / rng,
        "argmax_agrees": bool(np.argmax(y) == np.argmax(ref)),
        "original_reference": orig_label,
        "end_to_end_relative_to_range": float(np.abs(y - orig).max()) / orng,
        "end_to_end_argmax_agrees": bool(np.argmax(y) == np.argmax(orig)),
        "simulated_seconds": stats.wall_seconds,
        "modulus_use": stats.modulus_use,
        "modulus_use_at": stats.modulus_use_at,
        "bootstrap_use": stats.bootstrap_use,
    }
    if approximated:
        out["rewrite_relative_to_range"] = float(np.abs(ref - orig).max()) / orng
    return out


def report_error_bound(original: Graph, graph: Graph, prog: HEProgram, model, opts: CompileOptions,
                       cost: CostModel | None, target) -> dict[str, Any]:
    """The report's error bound against the original model (:mod:`hecompiler.errorbound`)."""
    from .backends.sim import Simulator
    from .errorbound import PROBES, error_bound, probe_inputs

    name, out = graph.inputs[0].name, graph.outputs[0].name
    shape = graph.inputs[0].type.shape
    planning, largest, planned_on = _probes(graph, opts, PROBES // 2)
    inputs = probe_inputs(planning, largest, planned_on, shape, opts.seed)
    label = []

    def original_out(x):
        y, what = _original_output(model, original, x)
        label.append(what)
        return y

    def run_noisy(batch):
        sim = Simulator(prog, cost=cost, noise=True, seed=opts.seed, strict=False, target=target)
        return sim.run_batch({name: batch})[0][out]

    b = error_bound(inputs, run_noisy, original_out, planned_on, "")
    b["reference"] = label[0] if label else ""
    return b


def _original_output(model, original: Graph, x: np.ndarray) -> tuple[np.ndarray, str]:
    """The original model's output on ``x`` and what computed it: onnxruntime, or, when it
    cannot run the model (or was given a graph), the reference interpreter, with the reason."""
    from .interp import run

    if isinstance(model, Graph):
        return np.asarray(run(original, x)[0], np.float64), "the original graph (reference interpreter)"
    try:
        y = _onnxruntime(model, x)
        return np.asarray(y, np.float64), "onnxruntime (original model)"
    except Exception as e:  # onnxruntime refuses some models the frontend accepts: say so, then use the interpreter
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return (np.asarray(run(original, x)[0], np.float64),
                f"the original model in the reference interpreter (onnxruntime failed: {why})")


def _check_input(graph: Graph, sample, seed: int) -> np.ndarray:
    """The input the compile-time check runs: the sample, or seeded N(0,1)."""
    x_shape = graph.inputs[0].type.shape
    if sample is None:
        return np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)
    return np.asarray(sample, np.float32).reshape(x_shape)


def _probes(graph: Graph, opts: CompileOptions, n_probes: int = 4) -> tuple[np.ndarray, list[np.ndarray], str]:
    """The planning inputs (all of them), the ``n_probes`` of largest magnitude, and what they are."""
    shape = graph.inputs[0].type.shape
    if len(graph.inputs) != 1:
        return np.zeros((0,)), [], "none"
    if opts.calibration is not None:
        from .calibration import as_batch

        x, planned_on = np.asarray(as_batch(opts.calibration, shape), np.float64), "calibration set"
    elif opts.sample is not None:
        x, planned_on = _check_input(graph, opts.sample, opts.seed)[None], "sample"
    else:
        x, planned_on = _check_input(graph, None, opts.seed)[None], f"N(0,1) sample (seed {opts.seed})"
    peaks = np.abs(x.reshape(len(x), -1)).max(axis=1)
    probes = [x[i].reshape(shape) for i in np.argsort(-peaks, kind="stable")[:n_probes]]
    return x, probes, planned_on


#: a bootstrap input may reach this multiple of the largest value the planning inputs gave there
REFRESH_MARGIN = 2.0


def fit_refresh_ranges(graph: Graph, cand, popts, target, probes) -> None:
    """On a target whose bootstrap accepts a bounded range: measure, in the simulator on the
    planning inputs, the largest |slot value| entering each refresh of ``cand``'s program, and
    lower it again with refresh factors that bring ``REFRESH_MARGIN`` times that within range
    (the lowering keeps the inverse pending; no level, no error)."""
    from bisect import bisect_right

    from .backends.sim import Simulator

    prog = cand.prog
    if getattr(target, "bootstrap_range", None) is None or not any(i.op == "refresh" for i in prog.instrs):
        return
    groups = list(cand.lowering.refresh_groups)
    peaks = [0.0] * len(groups)
    name = graph.inputs[0].name
    sim = Simulator(prog, strict=False, target=target)  # the probes in one batch: peaks are the largest of the rows
    sim.run_batch({name: np.stack([np.asarray(x, np.float32) for x in probes[1]])})
    for k, v in sim.prim.refresh_peaks.items():
        g = bisect_right(groups, k) - 1
        peaks[g] = max(peaks[g], v if np.isfinite(v) else np.inf)
    if not all(np.isfinite(p) for p in peaks):
        raise HecError(f"{graph.name}: the planning inputs overflow before a refresh (infinite values); check the "
                       f"model and its --calibration/--sample inputs")
    bounds = tuple(REFRESH_MARGIN * p for p in peaks)
    lowering = replace(getattr(cand, "lowering_options", None) or popts.lowering, refresh_factor=target.refresh_factor,
                       refresh_bounds=bounds)
    prog2, low2 = lower(graph, cand.params, cand.primes, lowering, cand.refresh_plan)
    if len(low2.refresh_groups) != len(groups):
        raise LoweringInvariantError(f"{graph.name}: scaling the refresh inputs changed the refreshes "
                                     f"({len(groups)} -> {len(low2.refresh_groups)})")
    cand.prog, cand.lowering = prog2, low2
    cand.refresh_bounds = bounds


def planned_input_limits(graph: Graph, prog: HEProgram, opts: CompileOptions, n_probes: int = 4,
                         target=None) -> dict[str, Any]:
    """``metadata["input_limits"]``: the range the program was planned on and the largest input
    magnitude its modulus chain (and, on a bootstrapping target, its bootstraps) holds (see
    :mod:`hecompiler.inputs`), measured on the ``n_probes`` planning inputs of largest magnitude."""
    from .backends.sim import Simulator
    from .inputs import input_limits

    name = graph.inputs[0].name
    x, probes, planned_on = _probes(graph, opts, n_probes)

    def headroom(factors) -> list[float]:  # every factor's probes in one batch, its rows' statistics
        st = Simulator(prog, strict=False, target=target).run_batch(
            {name: np.stack([(p * s).astype(np.float32) for s in factors for p in probes])})[1]
        shape = (len(factors), len(probes))
        mod = np.zeros(shape) if st.modulus_use_rows is None else np.reshape(st.modulus_use_rows, shape)
        boot = np.zeros(shape) if st.bootstrap_use_rows is None else np.reshape(st.bootstrap_use_rows, shape)
        # the bootstrap's range counts like the modulus: past it, the output is garbage
        return [float(u) for u in np.maximum(mod, boot * 0.5).max(axis=1)]

    lim = input_limits(probes, planned_on, headroom)
    lim["planned_range"] = [float(np.min(x)), float(np.max(x))]
    return {name: lim}


def _onnxruntime(model, x):
    import onnxruntime as ort

    data = model.SerializeToString() if hasattr(model, "SerializeToString") else open(model, "rb").read()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# --------------------------------------------------------------------------- report

def build_report(fname: str, graph: Graph, best: Candidate, cands: list[Candidate], pipeline: PipelineReport,
                 fidelity, seconds: float, cost: CostModel | None = None,
                 price_per_core_hour: float | None = None, target: Target | None = None) -> dict[str, Any]:
    cost = cost or CostModel()
    target = target or get_target("seal", cost.refresh.kind)
    p = best.params
    rc = cost.refresh
    reserved = rc.reserved_bits(p.scale_bits)
    c = best.cost
    low = best.lowering
    live = _live_ciphertexts(graph, low)
    batch = max(1, int(graph.inputs[0].type.shape[0])) if graph.inputs and graph.inputs[0].type.rank >= 2 else 1
    layers = []
    for st in low.stats.layers:
        layers.append({"node": st.node, "op": st.op, "layout_in": st.layout_in, "layout_out": st.layout_out,
                       "rotations": st.rotations, "diagonals": st.diagonals, "bsgs_bound": round(st.bound, 1),
                       "level_in": st.level_in, "level_out": st.level_out, "live_cts": live.get(st.node, 0)})
    r = {
        "model": fname,
        "compile_seconds": round(seconds, 3),
        "params": {"poly_degree": p.poly_degree, "slots": p.slots, "coeff_bits": list(p.coeff_bits),
                   "total_bits": sum(p.coeff_bits), "scale_bits": p.scale_bits, "top_level": p.top_level,
                   "security": p.security,
                   "bootstrap_reserved_bits": reserved,
                   "security_note": (_security_note(p, reserved) if target.backend == "seal"
                                     else target.security_note(p))},
        "refresh_model": {"kind": rc.kind,
                          "seconds_per_ciphertext": round(cost.refresh_seconds(p.poly_degree, p.top_level + 1,
                                                                               p.slots), 4),
                          "description": rc.describe(p.poly_degree, p.top_level + 1, cost, p.slots)},
        "candidates": [{"params": cd.label, "predicted_seconds": round(cd.cost.seconds, 3) if cd.cost else None,
                        "memory_gib": round(cd.cost.memory_bytes / 2**30, 2) if cd.cost else None,
                        "refreshes": cd.cost.refreshes if cd.cost else None,
                        "chosen": cd is best, "rejected": cd.reason} for cd in cands],
        "ops": c.op_counts,
        "levels_used": best.prog.levels_used(),
        "refreshes": c.refreshes,
        "refresh_points": list(low.stats.refresh_points),
        "refresh_placement": {"method": "optimal (DP over the level model)" if best.refresh_plan else
                              ("none needed" if not c.refreshes else "greedy"),
                              "greedy_refreshed_ciphertexts": best.greedy_refreshed,
                              "refreshed_ciphertexts": c.refreshes,
                              "unplanned": low.stats.unplanned_refreshes},
        "shared_alignments": low.stats.shared_alignments,
        "target": target.name,
        # the targets the planner chose among (--target lattigo names no set), each with its own table
        "target_choices": list(dict.fromkeys(cd.target.name for cd in cands if cd.target is not None)) or None,
        "layout": best.layout,
        "bootstraps": c.refreshes if target.backend != "seal" else 0,
        "refresh_scaling": ([round(float(b), 6) for b in getattr(best, "refresh_bounds", ())]
                            if getattr(best, "refresh_bounds", None) else None),
        "cost_table": cost.describe_source(),
        "galois_keys": c.galois_keys,
        "galois_key_bytes": c.galois_key_bytes,
        "bootstrap_key_bytes": cost.bootstrap_key_bytes(p.poly_degree, p.slots),
        "key_bytes": c.key_bytes,
        "key_upload_bytes": c.key_upload_bytes,
        "peak_live_ciphertexts": c.peak_live_ciphertexts,
        "predicted_seconds": round(c.seconds, 3),
        # inputs per inference (batch-to-channels stacks a batch in the slots): the amortised cost
        "batch": batch,
        "predicted_seconds_per_input": round(c.seconds / batch, 4),
        "predicted_encode_seconds": round(c.encode_seconds, 3),
        # encoding done ahead on other cores while the evaluation runs (inside the encode seconds, not the total)
        "predicted_encode_hidden_seconds": round(c.overlapped_seconds, 3),
        "encode_cores": cost.encode_cores,
        # processes sharing the large linear ops (hecompiler.parallel): the work the helpers take off
        # the evaluating process (less passing ciphertexts), and the encoding inside it
        "processes": c.processes,
        "predicted_shared_seconds": round(c.shared_seconds, 3),
        "predicted_encode_shared_seconds": round(c.shared_encode_seconds, 3),
        "predicted_helper_bytes": c.helper_bytes,  # inside predicted_memory_bytes
        "predicted_network_seconds": round(c.network_seconds, 3),
        "predicted_keygen_seconds": round(c.keygen_seconds, 3),
        "predicted_memory_bytes": c.memory_bytes,
        "predicted_garbage_bytes": c.garbage_bytes,  # inside the memory: Go's garbage on a Lattigo server
        # the executor runs one instruction at a time: CPU seconds = wall seconds of the server plus
        # the encoding done ahead on other cores (the key holder's refresh work is in the refresh
        # time); Lattigo's batched bootstraps may use more cores, which this does not count
        "predicted_cpu_seconds": round(c.seconds + c.overlapped_seconds + c.shared_seconds, 3),
        "cost_per_1000_inferences": (round((c.seconds + c.overlapped_seconds + c.shared_seconds) * 1000 / 3600
                                           * price_per_core_hour, 4)
                                     if price_per_core_hour else None),
        "price_per_core_hour": price_per_core_hour,
        "client_round_trips": c.round_trips,
        "rotation_keys": (getattr(low, "he_notes", None) or {}).get("rotation_keys"),
        "plaintexts": {"encoded": c.plaintexts, "bytes_all": c.plaintext_bytes_all,
                       "encode_seconds": round(c.encode_seconds, 3), "cache_bytes": c.plaintext_cache_bytes,
                       "cache_headroom_bytes": max(0, best.lowering_options.max_memory_bytes - c.memory_bytes)
                       if getattr(best, "lowering_options", None) and best.lowering_options.max_memory_bytes else None},
        "layers": layers,
        "passes": [{"pass": rec.spec, "exact": rec.exact, "nodes": [rec.nodes_before, rec.nodes_after]}
                   for rec in pipeline.records],
        "fidelity": fidelity,
    }
    # a server ('hecompile serve') keeps the plaintexts its budget leaves room for: every inference
    # after its first encodes only the rest
    from .plaintexts import serving_cache_bytes

    served = serving_cache_bytes(r, env=False)
    r["plaintexts"]["served_cache_bytes"] = served
    r["predicted_served_seconds"] = round(c.served_seconds(served), 3)
    return r


def _security_note(p, reserved_bits: int) -> str:
    if p.security != "tc128":
        return "NOT 128-bit secure: explicitly requested"
    if reserved_bits:
        return (f"128-bit with the bootstrap circuit's {reserved_bits} bits included "
                f"({sum(p.coeff_bits) + reserved_bits} bits in all; "
                + ("HE security guidelines ia.cr/2024/463 for N=2^16)" if p.poly_degree > 32768 else "HE standard)"))
    if p.poly_degree > 32768:
        return "128-bit (HE security guidelines ia.cr/2024/463 for N=2^16; SEAL cannot certify it, run it in the simulator)"
    return "128-bit (HE standard, SEAL CoeffModulus limits)"


def _live_ciphertexts(graph: Graph, low) -> dict[str, int]:
    """Ciphertexts alive while each node runs (values produced earlier and read
    later, skip sources included): the memory profile along the network."""
    index = {id(n): k for k, n in enumerate(graph.nodes)}
    last = {}
    for k, n in enumerate(graph.nodes):
        for v in n.inputs:
            last[id(v)] = k
    for v in graph.outputs:
        last[id(v)] = len(graph.nodes)
    born = {id(v): -1 for v in graph.inputs}
    for k, n in enumerate(graph.nodes):
        for v in n.outputs:
            born[id(v)] = k
    n_ct = {vid: len(t.cts) for vid, t in low.t.items()}
    out = {}
    for k, n in enumerate(graph.nodes):
        out[n.outputs[0].name] = sum(c for vid, c in n_ct.items()
                                     if born.get(vid, k) < k <= last.get(vid, -1) or born.get(vid) == k)
    return out


def _mb(b: float) -> str:
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def _elide(name: str, width: int) -> str:
    """``name`` in ``width`` characters, its middle elided: both the stage (start) and the op (end)
    stay readable, so two downsample layers of different stages never read the same."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "~" + name[-(width - 1 - head):]


def format_report(r: dict[str, Any]) -> str:
    p = r["params"]
    lines = [f"hecompiler report for {r['model']} (compiled in {r['compile_seconds']:.1f} s)"]
    lines.append(f"parameters: N={p['poly_degree']} ({p['slots']} slots), primes "
                 f"{'+'.join(str(b) for b in p['coeff_bits'])} = {p['total_bits']} bits, scale 2^{p['scale_bits']}, "
                 f"{p['top_level']} levels; {p['security_note']}")
    target = r.get("target", "seal")
    boots = not target.startswith("seal")
    word = "bootstraps" if boots else "refreshes"
    lines.append(f"target: {target}" + (" (non-interactive: the server runs the whole network alone; the key holder "
                                         "only encrypts the input and decrypts the output)" if boots else ""))
    if r.get("target_choices"):
        lines.append(f"  chosen among {', '.join(r['target_choices'])}: the model planned for each, with its own "
                     f"measured cost table (the candidates' set=); --target {target} fixes it")
    if r.get("layout"):
        lines.append(f"layout strategy: {r['layout']} (hecompiler/layout_strategy.py; --layout to fix it)")
    lines.append(f"candidates (predicted {target.split(':')[0]} latency with the cost table below):")
    for cd in r["candidates"]:
        mark = "*" if cd["chosen"] else " "
        if cd["predicted_seconds"] is None:
            lines.append(f"  {mark} {cd['params']:<24} {cd['rejected']}")
        else:
            lines.append(f"  {mark} {cd['params']:<24} {cd['predicted_seconds']:8.2f} s  {cd['memory_gib']:6.2f} GiB  "
                         f"{cd['refreshes']:3d} {word}  {cd['rejected']}")
    ops = r["ops"]
    lines.append(f"ops: {ops.get('rotate', 0)} rotations, {ops.get('mul_plain', 0)} ct-pt mults, "
                 f"{ops.get('mul', 0)} ct-ct mults, {ops.get('rescale', 0)} rescales, "
                 f"{ops.get('add', 0) + ops.get('add_plain', 0)} adds, {ops.get('mod_switch', 0)} mod-switches, "
                 f"{r['refreshes']} {word}")
    rm = r.get("refresh_model")
    if rm:
        lines.append(f"refresh: {rm['description']}")
    rp = r["refresh_placement"]
    lines.append(f"depth: {r['levels_used']} levels on the longest path; {word} before: "
                 f"{', '.join(r['refresh_points']) or 'none'}")
    if r["refreshes"]:
        lines.append(f"refresh placement: {rp['method']}: {rp['refreshed_ciphertexts']} ciphertexts refreshed "
                     f"(greedy placement: {rp['greedy_refreshed_ciphertexts']})"
                     + (f", {rp['unplanned']} beyond the plan" if rp["unplanned"] else ""))
    if r.get("shared_alignments"):
        lines.append(f"shared-source: {r['shared_alignments']} level alignment(s) of skip sources reused "
                     f"instead of recomputed")
    bk = r.get("bootstrap_key_bytes") or 0
    from .report import key_trade_lines

    lines.extend(key_trade_lines(r))
    lines.append(f"keys: {r['galois_keys']} Galois keys + relin + public"
                 + (f" + bootstrapping keys ({_mb(bk)})" if bk else "") + f" = {_mb(r['key_bytes'])}")
    hidden = r.get("predicted_encode_hidden_seconds") or 0.0
    enc = (f"encoding plaintexts {r['predicted_encode_seconds']:.2f} s, {hidden:.2f} s of it hidden behind the "
           f"evaluation: encoded ahead on {r.get('encode_cores')} cores" if hidden else
           f"of which encoding plaintexts {r['predicted_encode_seconds']:.2f} s")
    shared = r.get("predicted_shared_seconds") or 0.0
    where = (f"on {r.get('processes')} processes (helpers take {shared:.2f} s of linear-op work, "
             f"{r.get('predicted_encode_shared_seconds') or 0.0:.2f} s of it encoding, and hold "
             f"{_mb(r.get('predicted_helper_bytes') or 0)} of the peak) " if shared else
             "" if hidden else "on one core ")
    lines.append(f"predicted per inference: {r['predicted_seconds']:.2f} s {where}"
                 f"({enc}), peak memory {_mb(r['predicted_memory_bytes'])}, "
                 f"{r['peak_live_ciphertexts']} live ciphertexts at peak"
                 + (f", {r['client_round_trips']} round trips to the key holder ({r['predicted_network_seconds']:.2f} s "
                    f"of network in the total)" if r.get("client_round_trips") else ""))
    pt = r.get("plaintexts") or {}
    if r.get("predicted_served_seconds") is not None and pt.get("bytes_all"):
        kept = min(1.0, pt.get("served_cache_bytes", 0) / pt["bytes_all"])
        lines.append(f"served ('hecompile serve'): {r['predicted_served_seconds']:.2f} s per inference after the "
                     f"first, {kept:.0%} of its plaintexts kept across requests "
                     f"({_mb(pt.get('served_cache_bytes', 0))} of {_mb(pt['bytes_all'])}, what the memory budget leaves)")
    if r.get("batch", 1) > 1:
        lines.append(f"batch: {r['batch']} inputs per inference in the same ciphertexts: "
                     f"{r['predicted_seconds_per_input']:.3f} s per input (amortised)")
    if "predicted_keygen_seconds" in r:
        lines.append(f"predicted once per key set: keygen {r['predicted_keygen_seconds']:.2f} s (client), "
                     f"{_mb(r['key_upload_bytes'])} of evaluation keys to upload to the server")
    if r.get("cost_per_1000_inferences") is not None:
        lines.append(f"cost: {r['predicted_cpu_seconds']:.2f} CPU-s per inference = "
                     f"{r['cost_per_1000_inferences']:.4g} per 1000 inferences at {r['price_per_core_hour']:g} per "
                     f"core-hour (keys once per client: {r['predicted_keygen_seconds']:.1f} CPU-s)")
    if r.get("cost_table"):
        lines.append(f"cost table: {r['cost_table']}")
    lines.append("layers:")
    w = min(64, max([len(L["node"]) for L in r["layers"]] + [4]))
    lines.append(f"  {'node':<{w}} {'op':<17} {'rot':>4} {'diag':>5} {'2sqrt':>6} {'lvl':>7} {'live':>4}  layout out")
    for L in r["layers"]:
        lines.append(f"  {_elide(L['node'], w):<{w}} {L['op']:<17} {L['rotations']:>4} {L['diagonals']:>5} "
                     f"{L['bsgs_bound']:>6} {L['level_in']:>3}>{L['level_out']:<3} {L.get('live_cts', 0):>4}  "
                     f"{L['layout_out']}")
    lines.append("  (rot: rotations; diag: plaintext diagonals = ct-pt mults; 2sqrt: the BSGS bound 2*sqrt(diag); "
                 "lvl: level in > out; live: ciphertexts alive meanwhile, skip sources included)")
    f = r.get("fidelity")
    if f and "skipped" not in f:
        lines.append(f"fidelity (simulator with the CKKS noise model vs {f['reference']}, input {f['input']}): "
                     f"estimated max abs error {f['max_abs_error']:.2e} ({f['relative_to_range']:.2e} of the output "
                     f"range; {f['exact_relative_to_range']:.1e} without noise), argmax "
                     f"{'agrees' if f['argmax_agrees'] else 'DIFFERS'}")
        if "original_reference" in f:
            rw = (f"; the passes alone change it by {f['rewrite_relative_to_range']:.2e} of the range"
                  if "rewrite_relative_to_range" in f else "")
            lines.append(f"  end to end vs {f['original_reference']}: {f['end_to_end_relative_to_range']:.2e} of the "
                         f"output range, argmax {'agrees' if f['end_to_end_argmax_agrees'] else 'DIFFERS'}{rw}")
        b = f.get("error_bound")
        if b:
            lines.append(f"error bound: |output - original model| <= {b['max_abs_error']:.2e} "
                         f"({b['relative_to_range']:.2e} of the output range): {b['margin']:g}x the largest error of "
                         f"{b['runs']} simulated runs ({b['inputs']} inputs like the {b['inputs_like']}, "
                         f"{b['noise_draws']} noise draws each) against {b['reference']}; for inputs like those")
    elif f:
        lines.append(f"fidelity: {f['skipped']}")
    rejected = [cd for cd in r["candidates"] if cd["rejected"].startswith("estimated error")]
    if rejected:
        lines.append(f"precision: {len(rejected)} faster plan(s) rejected for their estimated error under encryption "
                     f"(see candidates); the chosen plan is slower than the fastest")
    if f and f.get("note"):
        lines.append(f"  note: {f['note']}")
    for name, lim in (r.get("input_limits") or {}).items():
        lo, hi = lim["planned_range"]
        held = (f"the modulus chain holds inputs up to |{name}| <= {lim['max_abs']:.4g} (run/encrypt refuse larger)"
                if lim["max_abs"] is not None else "the chain OVERFLOWS on the planning input itself")
        lines.append(f"inputs: planned on the {lim['planned_on']}, {name} in [{lo:.4g}, {hi:.4g}] (run/encrypt warn "
                     f"outside it); {held}; modulus use on the sample {lim['modulus_use']:.1e} of the wrap-around point")
    if r["refreshes"] and (rm or {}).get("kind", "client") == "client" and not boots:
        lines.append("privacy: client-aided refresh: the key holder decrypts the refreshed ciphertexts and SEES those "
                     "intermediate activations in the clear (no masking); use it only when the key holder may see them, "
                     "e.g. when it also owns the model. A bootstrapping target has no such exposure.")
    if r.get("approximation"):
        from .calibration import format_approximation

        lines.extend(format_approximation(r["approximation"]))
    return "\n".join(lines) + "\n"
