"""The ``hecompile`` command line.  A thin layer over the library API."""

from __future__ import annotations

import argparse
from dataclasses import replace
import importlib
import importlib.util
import os
import sys
import traceback
from typing import Sequence

from . import __version__
from .errors import HecError

_EMIT_BY_EXT = {".hec": "hec", ".ir": "ir", ".txt": "ir", ".dot": "dot", ".gv": "dot", ".onnx": "onnx"}

_DESCRIPTION = """\
Compile an ONNX CNN for CKKS homomorphic encryption.

  hecompile MODEL.onnx -o OUT.hec      compile to an HE program (+ cost report)
  hecompile run OUT.hec --input X.npy  encrypt, run, decrypt (--backend sim|seal)
  hecompile inspect OUT.hec            what is in a compiled program
  hecompile MODEL.onnx -o OUT.ir       import, canonicalise, write textual IR
  hecompile MODEL.onnx -o OUT.dot      ... write a DOT picture of the graph
  hecompile MODEL.onnx -o OUT.onnx     ... write the rewritten graph as ONNX
  hecompile rewrite MODEL.onnx -o OUT.onnx --kind dirac --calibration X.npy
                                       architecture rewrite for cheap skips, re-fitted
  hecompile passes                     list the available rewrite passes
  hecompile calibrate                  measure this machine's op costs and noise (< 1 min)
  hecompile keygen|encrypt|eval|refresh|decrypt ...
                                       client and server steps as separate commands
  hecompile keygen-signing -o signer.pem
                                       make an ed25519 signing key (+ signer.pub.pem)
  hecompile sign OUT.hec --key signer.pem
                                       sign a program; run, keygen, ... --verify-key
                                       signer.pub.pem then refuse unsigned or edited ones

The output kind follows the extension of -o (or --emit).  Without -o, text
output (ir, dot) goes to standard output.  Reports go to standard error.
A failed run exits non-zero and writes no output file.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for mistyped flags."""

    def error(self, message: str):
        import difflib
        import re

        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            flags = [o for a in self._actions for o in a.option_strings]
            hints = []
            for arg in m.group(1).split():
                if arg.startswith("-"):
                    close = difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.6)
                    if close:
                        hints.append(f"{arg}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def _layout_arg(text: str) -> str:
    """A layout strategy's name, checked here so a bad one fails before any work."""
    from .layout_strategy import get_strategy

    try:
        return get_strategy(text).name
    except HecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--input-shape wants NAME=D0,D1,..., got {text!r}")
    name, dims = text.split("=", 1)
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: dimensions must be integers") from None
    if any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: dimensions must be positive")
    return name, shape


def _load_plugin(spec: str) -> None:
    """Import a user module (dotted name or .py path) that registers passes."""
    try:
        if spec.endswith(".py") or os.sep in spec:
            if not os.path.exists(spec):
                raise HecError(f"--plugin {spec}: no such file")
            mod_name = "hecompile_plugin_" + os.path.splitext(os.path.basename(spec))[0]
            s = importlib.util.spec_from_file_location(mod_name, spec)
            mod = importlib.util.module_from_spec(s)
            sys.modules[mod_name] = mod
            s.loader.exec_module(mod)
        else:
            importlib.import_module(spec)
    except HecError:
        raise
    except Exception as e:
        raise HecError(f"--plugin {spec}: failed to import: {type(e).__name__}: {e}") from None


def _check_outputs(outputs: dict, inputs: dict | None = None) -> None:
    """Fail before doing any work when an output cannot be written or would replace an input."""
    from .fileio import check_outputs

    check_outputs(outputs, inputs)


def _warn_insecure(prog) -> None:
    """Every step of an insecure program says so (the compile report is not the only place)."""
    if prog.params.security != "tc128":
        sys.stderr.write(f"hecompile: warning: this program is NOT 128-bit secure (compiled with --security none, "
                         f"N={prog.params.poly_degree}, {sum(prog.params.coeff_bits)} modulus bits): for tests "
                         f"only, never for real data\n")


def _compile_parser() -> argparse.ArgumentParser:
    from .layout_strategy import STRATEGIES

    p = _Parser(prog="hecompile", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the ONNX model to compile")
    p.add_argument("-o", "--output", help="output file (kind from its extension: .hec .ir .dot .onnx)")
    p.add_argument("--emit", choices=["hec", "ir", "dot", "onnx"], help="output kind (overrides the extension)")
    p.add_argument("--passes", default=None, metavar="SPEC",
                   help="pipeline to run instead of the default, e.g. 'fold-bn,dce' or 'my-pass{k=1}'; "
                        "'' runs none. See 'hecompile passes'.")
    p.add_argument("--dump-after", action="append", default=[], metavar="PASS|all",
                   help="write text and DOT snapshots after PASS (repeatable) or after every pass")
    p.add_argument("--dump-dir", default="hecompile-dump", help="where snapshots go (default: %(default)s)")
    p.add_argument("--select", metavar="GLOB",
                   help="with -o OUT.dot: draw only the nodes whose name matches GLOB, e.g. '/layer1/*'")
    p.add_argument("--no-constants", action="store_true",
                   help="DOT pictures (-o OUT.dot, --dump-after): leave weights and constants out")
    p.add_argument("--dump-weights", action="store_true",
                   help="--dump-after .ir files spell out every weight (they parse back); by default large "
                        "constants are abbreviated")
    p.add_argument("--input-shape", action="append", type=_shape_arg, default=[], metavar="NAME=N,C,H,W",
                   help="fix the shape of an input whose dimensions are symbolic (batch defaults to 1)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE (dotted name or .py file) first, to register your own passes")
    g = p.add_argument_group("HE compilation (.hec output)")
    g.add_argument("--ring", default=None, metavar="N[,N...]",
                   help="ring degrees the planner may choose from (default: 8192,16384,32768; "
                        "65536 with --refresh bootstrap)")
    g.add_argument("--levels", type=int, default=None, metavar="L",
                   help="data levels (primes) in the modulus chain (default: planner tries several)")
    g.add_argument("--scale-bits", type=int, default=None, metavar="B", help="bits of the CKKS scale / data primes")
    g.add_argument("--slots", type=int, default=None, metavar="S",
                   help="slots per ciphertext: N/2, or (bootstrapping targets) a sparse packing whose cheaper "
                        "bootstrap the target measured (default: the planner weighs them)")
    g.add_argument("--layout", default=None, type=_layout_arg, metavar="{" + ",".join(STRATEGIES) + ",polyphase:K}",
                   help="layout strategy (hecompiler/layout_strategy.py; default: the planner tries each at the "
                        "chosen parameters and keeps the cheapest; polyphase:K is polyphase with at most K x K "
                        "phases)")
    g.add_argument("--max-memory", default="8G", metavar="SIZE",
                   help="memory budget for running the program, e.g. 4G or 512M (default: %(default)s)")
    g.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="refuse plans whose predicted inference takes longer (bounded from shapes before lowering)")
    g.add_argument("--max-compile-seconds", type=float, default=600.0, metavar="S",
                   help="stop planning after this long with a clear error (default: %(default)s)")
    g.add_argument("--price-per-core-hour", type=float, default=None, metavar="P",
                   help="price of one CPU core-hour (any currency): the report gives the cost per 1000 inferences")
    g.add_argument("--max-refreshes", type=int, default=None, metavar="N",
                   help="refuse plans that refresh more ciphertexts than N (0: non-interactive)")
    g.add_argument("--target", default="seal", metavar="seal|lattigo[:SET]",
                   help="where the program will run: seal (client-aided refresh; default) or lattigo (bootstrapping, "
                        "non-interactive: the server runs the whole network alone). Lattigo sets: n16-sparse "
                        "and n16-sparse-stc4 (128-bit; lattigo alone plans for both and keeps the faster plan "
                        "within the budgets), n15-dense (128-bit), toy-n12 and toy-n10 (INSECURE, tests)")
    g.add_argument("--refresh", default="client", metavar="client|bootstrap[:SECONDS]",
                   help="what a refresh is on the target: 'client' (client-aided re-encryption, what the SEAL "
                        "backend runs; default) or 'bootstrap' (plan for a bootstrapping backend: the chain keeps "
                        "room for the bootstrap circuit and a refresh costs SECONDS per ciphertext, estimated "
                        "from the cost table when not given)")
    g.add_argument("--refresh-rtt-ms", type=float, default=20.0, metavar="MS",
                   help="client round trip assumed for one refresh, in the cost model (default: %(default)s)")
    g.add_argument("--security", choices=["128", "none"], default="128",
                   help="'none' lifts the 128-bit limit on the modulus (INSECURE; the report says so)")
    g.add_argument("--sample", metavar="X.npy", help="input for the fidelity check (default: seeded N(0,1))")
    g.add_argument("--no-check", action="store_true", help="skip the simulator fidelity check")
    a = p.add_argument_group("approximation of ReLU / Clip / MaxPool (changes the function; the report measures it)")
    a.add_argument("--calibration", metavar="X.npy",
                   help="N inputs [N, ...] shaped like the model input: the input range of every ReLU/Clip/MaxPool "
                        "is measured on them (original model, onnxruntime), and the fidelity report uses them")
    a.add_argument("--labels", metavar="Y.npy", help="labels of the --calibration inputs (accuracy in the report)")
    a.add_argument("--heldout", metavar="H.npy", help="held-out inputs for the fidelity report")
    a.add_argument("--heldout-labels", metavar="Y.npy", help="labels of the --heldout inputs")
    a.add_argument("--relu-degree", type=int, default=15, metavar="D",
                   help="degree of the minimax polynomial replacing each ReLU/Clip (default: %(default)s; "
                        "ceil(log2 D)+1 levels)")
    a.add_argument("--relu-composite", default="", metavar="D1xD2x...",
                   help="composite sign approximation instead, e.g. 7x7x7 (Lee et al.; more precise, deeper)")
    a.add_argument("--relu-margin", type=float, default=0.2, metavar="F",
                   help="widen each calibrated range by this fraction (default: %(default)s)")
    a.add_argument("--relu-fit", choices=["minimax", "lsq", "data"], default="minimax",
                   help="minimax; lsq (Chebyshev least squares); data (weighted by the calibrated distribution)")
    a.add_argument("--relu-layers", default="", metavar="GLOB=SPEC;...",
                   help="per-layer degree or composite, e.g. '/layer4/*=27;*relu_1*=7x7x7'")
    a.add_argument("--relu-range", default="", metavar="LO:HI",
                   help="input range of every approximated op, without calibration data (write --relu-range=-8:8)")
    a.add_argument("--maxpool", choices=["avg", "poly"], default="avg",
                   help="MaxPool -> AveragePool (default, no levels) or a polynomial max tree (needs ranges)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the reports")
    p.add_argument("--version", action="version", version=f"hecompile {__version__}")
    return p


def cmd_compile(argv: Sequence[str]) -> int:
    from .dot import to_dot
    from .fileio import atomic_write_text, atomic_write_bytes
    from .frontend import load_onnx
    from .onnx_export import to_onnx
    from .passmanager import DEFAULT_PIPELINE, PassManager
    from .text import print_graph

    args = _compile_parser().parse_args(argv)
    for plug in args.plugin:
        _load_plugin(plug)
    emit = args.emit
    if emit is None:
        if args.output:
            ext = os.path.splitext(args.output)[1].lower()
            if ext not in _EMIT_BY_EXT:
                raise HecError(f"-o {args.output}: cannot tell the output kind from {ext or 'no extension'!r}; "
                               f"use .hec (compiled program), .ir, .dot or .onnx, or give --emit")
            emit = _EMIT_BY_EXT[ext]
        else:
            emit = "ir"
    if emit == "onnx" and not args.output:
        raise HecError("--emit onnx needs -o FILE.onnx")
    _check_outputs({"-o": args.output}, {"model": args.model, "--calibration": args.calibration,
                                         "--sample": args.sample, "--labels": args.labels,
                                         "--heldout": args.heldout, "--heldout-labels": args.heldout_labels})

    if emit == "hec":
        return _compile_hec(args)
    graph = load_onnx(args.model, dict(args.input_shape))
    spec = DEFAULT_PIPELINE if args.passes is None else args.passes
    options = {}
    if args.calibration or args.relu_range:  # approximate ReLU/Clip/MaxPool here too (e.g. -o approx.onnx)
        from .calibration import approximation_setup
        from .compiler import CompileOptions

        spec, options = approximation_setup(args.model, graph, CompileOptions(passes=spec, **_approx_kwargs(args)))
    pm = PassManager(spec, dump_after=args.dump_after, dump_dir=args.dump_dir if args.dump_after else None,
                     dump_weights=args.dump_weights, dump_constants=not args.no_constants,
                     options=options)
    report = pm.run(graph)
    if not args.quiet:
        sys.stderr.write(f"{args.model}: {len(graph.nodes)} nodes, {len(graph.constants)} constants\n")
        sys.stderr.write(report.format())

    if emit == "onnx":
        atomic_write_bytes(args.output, to_onnx(graph).SerializeToString())
    else:
        if (args.select or args.no_constants and not args.dump_after) and emit != "dot":
            raise HecError(f"{'--select' if args.select else '--no-constants'} shapes a picture: it needs a .dot "
                           f"output or --dump-after")
        text = print_graph(graph) if emit == "ir" else to_dot(graph, select=args.select,
                                                               show_constants=not args.no_constants)
        if args.output:
            atomic_write_text(args.output, text)
        else:
            sys.stdout.write(text)
    if args.output and not args.quiet:
        sys.stderr.write(f"wrote {args.output}\n")
    return 0


def _size_arg(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().rstrip("IB")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise HecError(f"--max-memory {text!r}: give a size like 4G, 512M or a byte count") from None


def _compile_hec(args) -> int:
    from tqdm import tqdm

    from .compiler import CompileOptions, compile_model
    from .costmodel import CostModel
    from .hecfile import save_hec
    from .passmanager import DEFAULT_PIPELINE
    from .lower import LoweringOptions
    from .planner import PlanOptions

    if not args.output:
        raise HecError("compiling to .hec needs -o FILE.hec")
    try:
        rings = tuple(int(r) for r in args.ring.split(",")) if args.ring else None
    except ValueError:
        raise HecError(f"--ring {args.ring!r}: give ring degrees like 8192,16384") from None
    refresh = _refresh_arg(args.refresh, args.refresh_rtt_ms)
    sample = None
    if args.sample:
        sample = _load_npy(args.sample, "--sample")
    popts = PlanOptions(ring_degrees=rings, security="tc128" if args.security == "128" else "none",
                        max_memory_bytes=_size_arg(args.max_memory), max_refreshes=args.max_refreshes,
                        scale_bits=args.scale_bits, levels=args.levels, max_seconds=args.max_seconds,
                        max_compile_seconds=args.max_compile_seconds, slots=args.slots,
                        lowering=LoweringOptions(layout=args.layout))
    opts = CompileOptions(passes=DEFAULT_PIPELINE if args.passes is None else args.passes, plan=popts,
                          input_shapes=dict(args.input_shape), dump_after=args.dump_after,
                          dump_weights=args.dump_weights, dump_constants=not args.no_constants,
                          dump_dir=args.dump_dir if args.dump_after else None, check=not args.no_check,
                          sample=sample, price_per_core_hour=args.price_per_core_hour, target=args.target,
                          **_approx_kwargs(args))
    if args.price_per_core_hour is not None and not args.price_per_core_hour >= 0:
        raise HecError(f"--price-per-core-hour {args.price_per_core_hour}: must be a non-negative number")
    from .target import get_target

    target = get_target(args.target, refresh.kind)
    if target.backend != "seal" and args.refresh != "client":
        raise HecError(f"--refresh {args.refresh}: target {target.name} bootstraps (measured); --refresh is for the "
                       f"seal target")
    opts = replace(opts, target=target)
    cost = target.cost_model(refresh if target.backend == "seal" else None)
    bar = tqdm(desc="planning", unit=" candidates", disable=args.quiet or not sys.stderr.isatty(), leave=False)
    try:
        result = compile_model(args.model, opts, cost, progress=lambda c: bar.update(1))
    finally:
        bar.close()
    save_hec(args.output, result.prog, result.metadata)
    if not args.quiet:
        sys.stderr.write(result.pipeline.format())
        sys.stderr.write(result.report_text)
        sys.stderr.write(f"wrote {args.output}\n")
    return 0


def _refresh_arg(text: str, rtt_ms: float):
    from .costmodel import RefreshCost

    kind, _, price = text.partition(":")
    if kind == "client" and not price:
        return RefreshCost(round_trip_s=rtt_ms / 1000.0)
    if kind == "bootstrap":
        try:
            seconds = float(price) if price else None
        except ValueError:
            seconds = -1.0
        if seconds is not None and not seconds >= 0:
            raise HecError(f"--refresh {text!r}: the bootstrap price must be seconds per ciphertext, e.g. "
                           f"bootstrap:20")
        return RefreshCost(kind="bootstrap", bootstrap_s=seconds)
    raise HecError(f"--refresh {text!r}: expected 'client', 'bootstrap' or 'bootstrap:SECONDS'")


def _approx_kwargs(args) -> dict:
    """CompileOptions fields for the approximation flags."""
    load = lambda path, what: None if not path else _load_npy(path, what)  # noqa: E731
    return {"calibration": load(args.calibration, "--calibration"), "labels": load(args.labels, "--labels"),
            "heldout": load(args.heldout, "--heldout"), "heldout_labels": load(args.heldout_labels, "--heldout-labels"),
            "relu_degree": args.relu_degree, "relu_composite": args.relu_composite, "relu_margin": args.relu_margin,
            "relu_fit": args.relu_fit, "relu_layers": args.relu_layers, "approx_range": args.relu_range,
            "maxpool": args.maxpool}


def _load_npy(path: str, what: str):
    from .inputs import load_array

    return load_array(path, what)


def _load_input(prog, meta, path: str, precheck: bool = True):
    """The ``--input`` of a one-input program: shape, dtype and finiteness checked, and its range
    against what the program was planned for (refused beyond what the chain holds, warned
    outside the planned interval).  With ``precheck`` the program first runs on it in the slot
    simulator, which refuses an input that makes any intermediate value overflow the modulus
    chain (a polynomial activation far outside its fitted interval diverges): encrypted, such a
    run would decrypt to garbage with no error."""
    from .inputs import check_input

    if len(prog.inputs) != 1:
        raise HecError(f"the program has {len(prog.inputs)} inputs; use the Python API")
    io = prog.inputs[0]
    x = _load_npy(path, "--input")
    for line in check_input(prog, meta, io.name, x, f"--input {path}"):
        sys.stderr.write(line + "\n")
    if precheck:
        from .backends.sim import ModulusOverflow, Simulator
        from .target import target_of

        try:
            Simulator(prog, target=target_of(meta)).run({io.name: x})
        except ModulusOverflow as e:
            raise HecError(f"--input {path}: refused before encryption: {e}") from None
    return io, x


def _add_processes(p) -> None:
    p.add_argument("--processes", type=_processes_arg, default=None, metavar="N",
                   help="processes that share the large linear ops under SEAL: this one and N-1 forked helpers "
                        "(default: $HECOMPILER_PROCESSES, else one per core up to 4; 1: no helpers)")


def _processes_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of processes") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: at least 1 process")
    return n


def _use_processes(args) -> None:
    """--processes for the executor (hecompiler.parallel reads it from the environment)."""
    if getattr(args, "processes", None) is not None:
        os.environ["HECOMPILER_PROCESSES"] = str(args.processes)


def cmd_run(argv: Sequence[str]) -> int:
    import numpy as np
    from tqdm import tqdm

    from .hecfile import load_hec

    p = _Parser(prog="hecompile run",
                                description="Encrypt an input, run a compiled program on it, decrypt, and "
                                            "optionally compare with the original model.")
    p.add_argument("program", help="the compiled .hec file")
    p.add_argument("--input", required=True, metavar="X.npy", help="the input tensor (shape as the model's input)")
    p.add_argument("--backend", choices=["sim", "seal", "lattigo"], default=None,
                   help="real encryption on the program's target (default: seal, or lattigo for a program compiled "
                        "with --target lattigo); sim: the slot simulator")
    p.add_argument("--reference", metavar="MODEL.onnx", help="compare with this model in onnxruntime")
    p.add_argument("-o", "--output", metavar="Y.npy|Y.npz",
                   help="write the decrypted output (.npy), or every output of a multi-output model (.npz)")
    p.add_argument("--no-precheck", action="store_true",
                   help="do not run the input through the slot simulator first (it refuses inputs that would "
                        "overflow the modulus chain and decrypt to garbage)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (phase seconds, peak RSS, op counts, error vs --reference) on stdout")
    p.add_argument("-q", "--quiet", action="store_true")
    _add_processes(p)
    _add_verify_key(p)
    args = p.parse_args(argv)
    _use_processes(args)
    _check_outputs({"-o": args.output}, {"program": args.program, "--input": args.input,
                                         "--reference": args.reference})
    prog, meta = load_hec(args.program, verify_key=args.verify_key)
    _check_output_kind(prog, args.output)
    _warn_insecure(prog)
    from . import backends
    from .executor import total_work
    from .target import target_of

    planned = backends.for_program(meta)
    args.backend = args.backend or planned
    if args.backend not in ("sim", planned):
        raise HecError(f"--backend {args.backend}: the program was compiled for {planned} (its primes, scales and "
                       f"refreshes are planned for it); compile again with --target {args.backend} or use "
                       f"--backend {planned} or sim")
    io, x = _load_input(prog, meta, args.input, precheck=args.backend != "sim" and not args.no_precheck)

    n = len(prog.instrs)
    bar = tqdm(total=total_work(prog), desc=f"{args.backend}", unit=" ops", disable=args.quiet or not sys.stderr.isatty(),
               leave=False)
    try:
        if args.backend == "sim":
            from .backends.sim import Simulator

            target = target_of(meta)
            outs, stats = Simulator(prog, target=target).run({io.name: x}, progress=bar.update)
            summary = (f"simulated {n} instructions in {stats.wall_seconds:.2f} s; predicted {target.backend} time "
                       f"{stats.predicted_seconds:.2f} s; {stats.op_counts}")
        else:
            outs, stats = backends.get(args.backend).run_encrypted(prog, {io.name: x}, progress=bar.update, meta=meta)
            summary = f"{args.backend} run (real encryption):\n" + stats.format()
    finally:
        bar.close()
    name = prog.outputs[0].name
    y = outs[name]
    if not args.quiet and not args.json:
        sys.stderr.write(summary + "\n")
    ref_err = None
    if args.reference:
        ref = _reference(args.reference, x)
        rng = float(np.ptp(ref)) or 1.0
        err = float(np.abs(y - ref).max())
        batch = len(ref) if np.ndim(ref) >= 2 and len(ref) > 1 else 1
        if batch > 1:  # a batch: the argmax of every input's output
            same = np.argmax(np.reshape(y, (batch, -1)), 1) == np.argmax(np.reshape(ref, (batch, -1)), 1)
            agree, how = bool(same.all()), f"for {int(same.sum())} of the {batch} inputs"
        else:
            agree = bool(np.argmax(y) == np.argmax(ref))
            how = f"({int(np.argmax(y))} vs {int(np.argmax(ref))})"
        ref_err = {"max_abs_error": err, "relative_to_range": err / rng, "argmax_agrees": agree,
                   "reference": os.path.basename(args.reference)}
        if not args.json:
            print(f"max abs error vs {os.path.basename(args.reference)}: {err:.3e} ({err / rng:.2e} of the output "
                  f"range); argmax {'agrees' if agree else 'DIFFERS'} {how}")
    if args.json:
        import json

        from .report import run_json

        print(json.dumps(run_json(args.backend, stats, outs, ref_err), indent=1, sort_keys=True))
    if ((meta.get("report") or {}).get("approximation") or {}).get("intervals"):
        # approximated ReLU/MaxPool: warn when this input drives one outside its fitted interval
        from .calibration import run_time_range_check

        for line in run_time_range_check(meta, x, args.reference, io.name):
            sys.stderr.write(line + "\n")
    if args.output or not args.json:  # with --json the outputs are in the JSON
        _emit_outputs(prog, outs, args.output)
    return 0


def _check_output_kind(prog, path: str | None) -> None:
    """A multi-output program writes all its outputs (.npz) or refuses: never only the first."""
    if not path:
        return
    names = [o.name for o in prog.outputs]
    if len(names) > 1 and not path.endswith(".npz"):
        raise HecError(f"-o {path}: the program has {len(names)} outputs ({', '.join(names)}); give -o Y.npz "
                       f"to write them all")


def _emit_outputs(prog, outs, path: str | None) -> None:
    """Write the outputs atomically (.npy: the one output; .npz: every output by name), or print them."""
    import io as _io

    import numpy as np

    from .fileio import atomic_write_bytes

    names = [o.name for o in prog.outputs]
    if not path:
        for name in names:
            if len(names) > 1:
                print(f"{name}:")
            print(np.array2string(np.asarray(outs[name]), precision=5, max_line_width=120))
        return
    buf = _io.BytesIO()
    if path.endswith(".npz"):
        np.savez(buf, **{name: np.asarray(outs[name]) for name in names})
    else:
        np.save(buf, np.asarray(outs[names[0]]))
    atomic_write_bytes(path, buf.getvalue())


def _reference(path: str, x):
    import onnxruntime as ort

    if not os.path.exists(path):
        raise HecError(f"--reference {path}: no such file")
    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise HecError(f"--reference {path}: onnxruntime cannot load it: {str(e)[:200]}") from None
    inp = sess.get_inputs()[0]
    return sess.run(None, {inp.name: x.astype("float32")})[0]


def cmd_inspect(argv: Sequence[str]) -> int:
    from .hecfile import inspect_hec, load_hec
    from .heprog import print_program

    p = _Parser(prog="hecompile inspect", description="Describe a compiled .hec program.")
    p.add_argument("program")
    p.add_argument("--program-text", action="store_true", help="print the whole HE program as text")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: params, target, ops, keys, predicted time/memory/keygen, layers")
    p.add_argument("--plot", metavar="COST.png",
                   help="draw per-layer predicted time (rotations, ct-pt mults, encoding, refresh/bootstrap) and the "
                        "level along the network (needs matplotlib: pip install 'hecompiler[plot]')")
    p.add_argument("--plot-run", metavar="RUN.json",
                   help="with --plot: also draw what 'hecompile run ... --json > RUN.json' measured beside the "
                        "prediction")
    _add_verify_key(p)
    args = p.parse_args(argv)
    if args.plot_run and not args.plot:
        raise HecError("--plot-run RUN.json draws beside the prediction: give --plot COST.png too")
    if args.plot:
        from .fileio import atomic_write_bytes
        from .plot import plot_cost

        if not args.plot.lower().endswith(".png"):
            raise HecError(f"--plot {args.plot}: give a .png file name")
        _check_outputs({"--plot": args.plot}, {"program": args.program, "--plot-run": args.plot_run})
        prog, meta = load_hec(args.program, verify_key=args.verify_key)
        atomic_write_bytes(args.plot, plot_cost(prog, meta, run=args.plot_run))
        sys.stderr.write(f"wrote {args.plot}\n")
        if not (args.json or args.program_text):
            return 0
    if args.json:
        import json

        from .report import inspect_json

        prog, meta = load_hec(args.program, verify_key=args.verify_key)
        print(json.dumps(inspect_json(prog, meta), indent=1, sort_keys=True))
    elif args.program_text:
        prog, _ = load_hec(args.program, verify_key=args.verify_key)
        sys.stdout.write(print_program(prog))
    else:
        sys.stdout.write(inspect_hec(args.program, verify_key=args.verify_key))
    return 0


# --------------------------------------------------------------------------- client / server steps

_STEPS_HELP = """\
Run the client and the server as separate commands (files in between):

  hecompile keygen  M.hec --client-dir client --server-dir server     (client)
  hecompile encrypt M.hec --keys client --input x.npy -o x.bundle      (client)
  hecompile eval    M.hec --keys server --input x.bundle --state st.bundle -o y.bundle   (server)
      if the program refreshes, eval stops and writes a request:
  hecompile refresh M.hec --keys client --request st.bundle.request -o st.bundle.response  (client)
  hecompile eval    M.hec --keys server --state st.bundle --response st.bundle.response -o y.bundle
      ... repeat until eval writes y.bundle
  hecompile decrypt M.hec --keys client --ciphertext y.bundle -o y.npy  (client)

The server directory never holds the secret key.
"""


def _step_parser(name: str, desc: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"hecompile {name}", description=desc + "\n\n" + _STEPS_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("program", help="the compiled .hec file" + (
        "" if name == "eval" else ", or its client file (hecompile export-client: no weights)"))
    _add_verify_key(p)
    return p


def _add_verify_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify-key", metavar="SIGNER.pub.pem",
                   help="refuse the program unless it is signed by this ed25519 public key and unchanged since "
                        "(see 'hecompile sign')")


def _backend(meta):
    """The encrypted backend a program runs on (its target) and the program's metadata."""
    from . import backends

    return backends.get(backends.for_program(meta))


def cmd_keygen(argv: Sequence[str]) -> int:
    from .backends.protocol import short
    from .clientfile import load_program_or_client

    p = _step_parser("keygen", "Generate keys: secret+public for the client, evaluation keys for the server.")
    p.add_argument("--client-dir", required=True)
    p.add_argument("--server-dir", required=True)
    args = p.parse_args(argv)
    prog, meta = load_program_or_client(args.program, verify_key=args.verify_key)
    _warn_insecure(prog)
    be = _backend(meta)
    be.client_keygen(prog, args.client_dir, args.server_dir, meta=meta)
    fp = be.open_client(prog, args.client_dir, meta=meta).key_set
    boots = "; bootstrapping keys too (the server runs alone)" if be.__name__.endswith("lattigo.session") else ""
    print(f"key set {short(fp)}: {args.client_dir} (secret, keep it), {args.server_dir} "
          f"(evaluation keys, {len(prog.galois_steps)} rotation steps{boots})")
    return 0


def cmd_encrypt(argv: Sequence[str]) -> int:
    from .backends.protocol import client_encrypt
    from .clientfile import load_program_or_client

    p = _step_parser("encrypt", "Encrypt an input with the client's keys.")
    p.add_argument("--keys", required=True, help="the client key directory")
    p.add_argument("--input", required=True, metavar="X.npy")
    p.add_argument("-o", "--output", required=True, metavar="X.bundle")
    args = p.parse_args(argv)
    _check_outputs({"-o": args.output}, {"program": args.program, "--input": args.input})
    prog, meta = load_program_or_client(args.program, verify_key=args.verify_key)
    _warn_insecure(prog)
    io, x = _load_input(prog, meta, args.input, precheck=hasattr(prog, "weights"))
    client = _backend(meta).open_client(prog, args.keys, meta=meta)
    client_encrypt(prog, client, {io.name: x}).save(args.output)
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    from .backends.protocol import server_reemit, server_start, server_step
    from .hecfile import load_hec

    p = _step_parser("eval", "Server: evaluate the program on encrypted inputs (stops at each refresh). The "
                             "state file is written first and holds everything: if eval is interrupted after "
                             "writing it, run eval with --state alone to write its request (or outputs) again.")
    p.add_argument("--keys", required=True, help="the server key directory (no secret key)")
    p.add_argument("--state", required=True, metavar="ST.bundle", help="server state file (written, then resumed)")
    p.add_argument("--input", metavar="X.bundle", help="encrypted inputs (first call)")
    p.add_argument("--response", metavar="R.bundle", help="the client's refresh response (later calls)")
    p.add_argument("--request", metavar="Q.bundle", help="where to write a refresh request (default: STATE.request)")
    p.add_argument("-o", "--output", required=True, metavar="Y.bundle", help="encrypted outputs, when done")
    _add_processes(p)
    args = p.parse_args(argv)
    _use_processes(args)
    if args.input and args.response:
        raise HecError("give --input for the first call, or --response to resume after a refresh, not both")
    req_path = args.request or args.state + ".request"
    _check_outputs({"--state": args.state, "--request": req_path, "-o": args.output},
                   {"program": args.program, "--input": args.input, "--response": args.response})
    prog, meta = load_hec(args.program, verify_key=args.verify_key)
    _warn_insecure(prog)
    server = _backend(meta).open_server(prog, args.keys, meta=meta)  # the keys are loaded once
    if args.input or args.response:
        state = server_start(prog, server, args.input, args.keys) if args.input else args.state
        st, req, outs = server_step(prog, server, state, args.response, args.keys)
        st.save(args.state)  # the commit point: request and outputs can be rebuilt from it
    else:
        req, outs = server_reemit(prog, server, args.state, args.keys)
    if req is not None:
        req.save(req_path)
        print(f"refresh needed: hecompile refresh {args.program} --keys CLIENT --request {req_path} -o "
              f"{args.state}.response, then hecompile eval ... --response {args.state}.response")
        return 0
    outs.save(args.output)
    print(f"done: encrypted outputs in {args.output}")
    return 0


def cmd_refresh(argv: Sequence[str]) -> int:
    from .backends.protocol import client_refresh
    from .clientfile import load_program_or_client

    p = _step_parser("refresh", "Client: answer a refresh request (decrypt and re-encrypt the ciphertexts; "
                                "the key holder sees these intermediate values).")
    p.add_argument("--keys", required=True, help="the client key directory")
    p.add_argument("--request", required=True)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    _check_outputs({"-o": args.output}, {"program": args.program, "--request": args.request})
    prog, meta = load_program_or_client(args.program, verify_key=args.verify_key)
    _warn_insecure(prog)
    client = _backend(meta).open_client(prog, args.keys, meta=meta)
    client_refresh(prog, client, args.request, args.keys).save(args.output)
    return 0


def cmd_decrypt(argv: Sequence[str]) -> int:
    from .backends.protocol import client_decrypt
    from .clientfile import load_program_or_client

    p = _step_parser("decrypt", "Client: decrypt the encrypted outputs.")
    p.add_argument("--keys", required=True, help="the client key directory")
    p.add_argument("--ciphertext", required=True, metavar="Y.bundle")
    p.add_argument("-o", "--output", metavar="Y.npy|Y.npz")
    args = p.parse_args(argv)
    _check_outputs({"-o": args.output}, {"program": args.program, "--ciphertext": args.ciphertext})
    prog, meta = load_program_or_client(args.program, verify_key=args.verify_key)
    _check_output_kind(prog, args.output)
    _warn_insecure(prog)
    client = _backend(meta).open_client(prog, args.keys, meta=meta)
    _emit_outputs(prog, client_decrypt(prog, client, args.ciphertext, args.keys), args.output)
    return 0


def cmd_passes(argv: Sequence[str]) -> int:
    from .passmanager import DEFAULT_PIPELINE, list_passes

    p = _Parser(prog="hecompile passes", description="List the registered rewrite passes.")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first, to list your own passes too")
    args = p.parse_args(argv)
    for plug in args.plugin:
        _load_plugin(plug)
    passes = list_passes()
    w = max(len(c.name) for c in passes)
    for c in passes:
        kind = "exact " if c.exact else "approx"
        opts = ", ".join(f"{f}" for f in getattr(c, "__dataclass_fields__", {}))
        print(f"{c.name:<{w}}  {kind}  {c.summary}" + (f"  [options: {opts}]" if opts else ""))
    print(f"\ndefault pipeline: {DEFAULT_PIPELINE}")
    return 0


def cmd_rewrite(argv: Sequence[str]) -> int:
    from .arch_rewrite import KINDS, report_json, rewrite_model, save

    p = _Parser(
        prog="hecompile rewrite",
        description="Approximating architecture rewrites of a ResNet for cheap skips under HE (dirac: residual "
                    "blocks -> plain chains of Dirac convs W+I; shared-source: the Adds of a stage take their skip "
                    "from one shared tensor), re-fitted on calibration data by least squares per layer. Prints "
                    "the fidelity against the original model (before and after the re-fit) and writes the "
                    "rewritten model as ONNX, to fine-tune or to compile with hecompile.")
    p.add_argument("model", help="the ONNX model (a ResNet with residual blocks)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the rewritten model")
    p.add_argument("--kind", action="append", choices=list(KINDS), required=True,
                   help="rewrite to apply (repeatable; shared-source is applied before dirac)")
    p.add_argument("--calibration", metavar="X.npy",
                   help="calibration inputs [N, ...model input shape without batch] (required)")
    p.add_argument("--heldout", metavar="H.npy", help="held-out inputs, same layout, for the fidelity report")
    p.add_argument("--ridge", type=float, default=1e-3, metavar="R",
                   help="ridge of the least-squares re-fit, relative to the mean squared column norm "
                        "(default: %(default)s)")
    p.add_argument("--source", choices=["input", "first"], default="input",
                   help="shared-source: share the stage input (default) or the first block's output")
    p.add_argument("--report", metavar="R.json", help="also write the report as JSON")
    args = p.parse_args(argv)
    if not args.calibration:
        raise HecError("--calibration X.npy is required (N inputs, same shape as the model input)")
    if not os.path.exists(args.model):
        raise HecError(f"{args.model}: no such file")
    _check_outputs({"-o": args.output, "--report": args.report},
                   {"model": args.model, "--calibration": args.calibration, "--heldout": args.heldout})
    cal = _load_npy(args.calibration, "--calibration")
    held = _load_npy(args.heldout, "--heldout") if args.heldout else None
    try:
        graph, report, text = rewrite_model(args.model, args.kind, cal, held, ridge=args.ridge, source=args.source)
    except HecError as e:
        msg = str(e)
        for field, path in (("calibration", args.calibration), ("heldout", args.heldout), ("ridge", args.ridge)):
            if msg.startswith(field + ":"):
                msg = f"--{field} {path}" + msg[len(field):]
        raise HecError(msg) from None
    save(graph, args.output)
    if args.report:
        from .fileio import atomic_write_text

        atomic_write_text(args.report, report_json(report))
    sys.stdout.write(text)
    sys.stderr.write(f"wrote {args.output}\n")
    return 0


def cmd_calibrate(argv: Sequence[str]) -> int:
    from .backends.seal_costs import main as measure
    from .costmodel import machine_table_path

    if not any(a in ("--full",) for a in argv) and "--quick" not in argv:
        argv = ["--quick", *argv]
    argv = [a for a in argv if a != "--full"]
    from pathlib import Path

    return measure(list(argv), default_out=Path(machine_table_path()), prog="hecompile calibrate")


def cmd_keygen_signing(argv: Sequence[str]) -> int:
    from .signing import fingerprint, generate_keypair, load_private_key, public_key_raw

    p = _Parser(prog="hecompile keygen-signing",
                description="Make an ed25519 key pair for signing .hec programs: -o signer.pem (the private "
                            "key, mode 0600: keep it secret) and signer.pub.pem beside it (give it to whoever "
                            "runs the program: --verify-key). Existing files are never replaced.")
    p.add_argument("-o", "--output", required=True, metavar="SIGNER.pem", help="where to write the private key")
    args = p.parse_args(argv)
    priv, pub = generate_keypair(args.output)
    fp = fingerprint(public_key_raw(load_private_key(priv)))
    print(f"signing key {fp}: {priv} (private, keep it), {pub} (public: --verify-key {pub})")
    return 0


def cmd_sign(argv: Sequence[str]) -> int:
    from .hecfile import sign_hec
    from .signing import fingerprint, load_private_key, public_key_raw

    p = _Parser(prog="hecompile sign",
                description="Sign a compiled program with an ed25519 key (hecompile keygen-signing). The program is "
                            "validated first; the signature, over the digest that binds every member of the .hec, "
                            "is stored in its manifest (an earlier signature is replaced). run, keygen, encrypt, "
                            "eval, refresh, decrypt and inspect then check it with --verify-key SIGNER.pub.pem.")
    p.add_argument("program", help="the compiled .hec file")
    p.add_argument("--key", required=True, metavar="SIGNER.pem", help="the ed25519 private key (PEM)")
    p.add_argument("-o", "--output", metavar="SIGNED.hec", help="write the signed program here (default: in place)")
    args = p.parse_args(argv)
    if args.output:
        _check_outputs({"-o": args.output}, {"--key": args.key})
    key = load_private_key(args.key)
    digest = sign_hec(args.program, key, args.output)
    print(f"signed {args.output or args.program} (digest {digest[:16]}...) with key {fingerprint(public_key_raw(key))}")
    return 0


# --------------------------------------------------------------------------- serving

def cmd_export_client(argv: Sequence[str]) -> int:
    from .clientfile import export_client

    p = _Parser(prog="hecompile export-client",
                description="Write what a client needs to use a served program, without its weights: parameters, "
                            "primes, input/output layouts, the rotation steps its evaluation keys must cover, the "
                            "planned input range, and the program and parameter ids every key and ciphertext is "
                            "bound to. keygen, query (and the hecompiler.client API) work from it.")
    p.add_argument("program", help="the compiled .hec file")
    p.add_argument("-o", "--output", required=True, metavar="M.client")
    p.add_argument("--sign-key", metavar="SIGNER.pem",
                   help="sign the client file with this ed25519 key (hecompile keygen-signing); clients check it "
                        "with --verify-key")
    _add_verify_key(p)
    args = p.parse_args(argv)
    _check_outputs({"-o": args.output}, {"program": args.program, "--sign-key": args.sign_key})
    key = None
    if args.sign_key:
        from .signing import load_private_key

        key = load_private_key(args.sign_key)
    cp = export_client(args.program, args.output, verify_key=args.verify_key, sign_key=key)
    size = os.path.getsize(args.output)
    pr = cp.params
    print(f"wrote {args.output} ({size} bytes, no weights): program {cp.program_digest[:16]}, {cp.backend}, "
          f"N={pr.poly_degree}, {len(cp.galois_steps)} rotation steps, refresh {cp.refresh}"
          + (", signed" if key is not None else ""))
    return 0


def cmd_serve(argv: Sequence[str]) -> int:
    from .serving.app import ServeConfig, run_server

    p = _Parser(prog="hecompile serve",
                description="Serve a compiled program over HTTP: clients upload their evaluation keys once (never a "
                            "secret key), then send encrypted inputs and get encrypted outputs, answering client-aided "
                            "refreshes as steps of a session. Key sets and sessions live under --store and survive a "
                            "restart. Prints 'listening on URL' on stdout when ready; logs go to stderr. "
                            "API: see hecompiler/serving/wire.py.")
    p.add_argument("program", help="the compiled .hec file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="key sets and sessions (default: $XDG_STATE_HOME/hecompiler/serve or "
                        "~/.local/state/hecompiler/serve)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes evaluating at once (default: 1; with --scheduler: the cluster's threads)")
    p.add_argument("--queue", type=int, default=16, metavar="N",
                   help="requests that may wait for a worker; more get 503 (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="per-request limit, waiting included; past it 504 and the worker is stopped "
                        "(default: %(default)s)")
    p.add_argument("--worker-memory", default=None, metavar="SIZE",
                   help="memory budget of each worker process, e.g. 2G; a worker above it is stopped and the request "
                        "gets 503 (default: 1.5x what one key set needs, the compile report's prediction or its "
                        "plaintexts and keys if more, + 512M)")
    p.add_argument("--plaintext-cache", default=None, metavar="SIZE",
                   help="encoded plaintexts each worker keeps across requests, e.g. 2G; 0 keeps none (default: "
                        "$HECOMPILER_PLAINTEXT_CACHE, else all of an inference's if 80%% of what the memory budget "
                        "leaves holds them, else that 80%%: --worker-memory, or the compile's --max-memory)")
    p.add_argument("--no-warm", action="store_true",
                   help="do not encode the program's plaintexts into each worker's cache at start (by default a "
                        "worker does, before it takes requests, so a first query is as fast as a later one)")
    p.add_argument("--max-request-bytes", default=None, metavar="SIZE",
                   help="largest ciphertext body (default: twice what the program's inputs or refreshes need)")
    p.add_argument("--max-key-bytes", default=None, metavar="SIZE",
                   help="largest key upload (default: 1.5x the program's evaluation keys)")
    p.add_argument("--max-key-sets", type=int, default=64, metavar="N", help="key sets kept (default: %(default)s)")
    p.add_argument("--max-sessions", type=int, default=256, metavar="N",
                   help="sessions at once (default: %(default)s)")
    p.add_argument("--session-ttl", type=float, default=600.0, metavar="S",
                   help="a session waiting for its client longer than this is dropped (default: %(default)s)")
    p.add_argument("--key-sets-per-worker", type=int, default=None, metavar="N",
                   help="key sets a worker keeps loaded (default: as many as its memory budget allows, up to 8)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="evaluate on a Dask distributed cluster (tcp://HOST:PORT) instead of local workers "
                        "(pip install 'hecompiler[distributed]')")
    p.add_argument("--log-interval", type=float, default=10.0, metavar="S",
                   help="progress lines of long evaluations every S seconds (default: %(default)s)")
    p.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, new requests get 503 and evaluations already running get up to S seconds "
                        "to finish before the workers stop (default: %(default)s)")
    _add_verify_key(p)
    args = p.parse_args(argv)
    if not os.path.exists(args.program):
        raise HecError(f"{args.program}: no such file")
    for flag, v in (("--queue", args.queue), ("--max-key-sets", args.max_key_sets),
                    ("--max-sessions", args.max_sessions)):
        if v < 0 or (flag != "--queue" and v == 0):
            raise HecError(f"{flag} {v}: must be positive")
    if args.workers is not None and args.workers < 1:
        raise HecError(f"--workers {args.workers}: must be at least 1")
    if not args.timeout > 0 or not args.session_ttl > 0 or not args.log_interval > 0:
        raise HecError("--timeout, --session-ttl and --log-interval must be positive seconds")
    if not args.grace >= 0:
        raise HecError(f"--grace {args.grace}: must be 0 or more seconds")
    if not 0 <= args.port <= 65535:
        raise HecError(f"--port {args.port}: not a port number")
    store = args.store or os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"),
                                       "hecompiler", "serve")

    def size(flag, v):
        if v is None:
            return None
        try:
            return _size_arg(v)
        except HecError:
            raise HecError(f"{flag} {v!r}: give a size like 2G, 512M or a byte count") from None

    cfg = ServeConfig(program=args.program, host=args.host, port=args.port, store=store,
                      workers=args.workers or (0 if args.scheduler else 1), queue=args.queue, timeout=args.timeout,
                      worker_memory=size("--worker-memory", args.worker_memory),
                      plaintext_cache=size("--plaintext-cache", args.plaintext_cache), warm=not args.no_warm,
                      max_request_bytes=size("--max-request-bytes", args.max_request_bytes),
                      max_key_bytes=size("--max-key-bytes", args.max_key_bytes), session_ttl=args.session_ttl,
                      max_sessions=args.max_sessions, max_key_sets=args.max_key_sets,
                      key_sets_per_worker=args.key_sets_per_worker, scheduler=args.scheduler,
                      verify_key=args.verify_key, log_interval=args.log_interval, grace=args.grace)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise HecError("hecompile serve needs aiohttp: pip install 'hecompiler[serve]'") from None
    return run_server(cfg)


def cmd_query(argv: Sequence[str]) -> int:
    import time

    from .client import Client, join_batch, split_batch
    from .executor import ProgressLog

    p = _Parser(prog="hecompile query",
                description="Run encrypted inferences on a 'hecompile serve' server: encrypt each input with your "
                            "keys, send it, answer the server's refresh requests, decrypt the outputs. When --keys "
                            "does not exist, a new key set is made there and its evaluation keys uploaded (the secret "
                            "key never leaves it); later queries reuse it. Needs no weights: PROGRAM may be the "
                            "client file (hecompile export-client) or the .hec.")
    p.add_argument("program", help="the client file (M.client) or the compiled .hec")
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--keys", required=True, metavar="CLIENT_DIR", help="your key directory (created if missing)")
    p.add_argument("--input", required=True, metavar="X.npy",
                   help="one input shaped like the model's, or N of them stacked on a first axis (N queries)")
    p.add_argument("-o", "--output", metavar="Y.npy|Y.npz", help="the decrypted outputs (stacked like the inputs)")
    p.add_argument("--concurrency", type=int, default=1, metavar="K", help="queries in flight at once (default: 1)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="give up on an answer after S seconds (default: the server's timeout + 30 s)")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="retries of a step after a lost connection or a busy server (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary")
    _add_verify_key(p)
    args = p.parse_args(argv)
    if args.concurrency < 1:
        raise HecError(f"--concurrency {args.concurrency}: must be at least 1")
    _check_outputs({"-o": args.output}, {"program": args.program, "--input": args.input})
    say = (lambda m: None) if args.quiet else (lambda m: sys.stderr.write(m.rstrip() + "\n"))
    client = Client(args.program, args.url, args.keys, timeout=args.timeout, retries=args.retries,
                    verify_key=args.verify_key, log=say)
    prog = client.prog
    if prog.params.security != "tc128":
        sys.stderr.write("hecompile: warning: this program is NOT 128-bit secure: for tests only, never for real data\n")
    if args.output and len(prog.outputs) > 1 and not args.output.endswith(".npz"):
        raise HecError(f"-o {args.output}: the program has {len(prog.outputs)} outputs; give -o Y.npz")
    xs, how = split_batch(prog, _load_npy(args.input, "--input"))
    t0 = time.perf_counter()
    ks = client.ensure_keys()
    t1 = time.perf_counter()
    with ProgressLog(len(xs), "query", unit="queries", enabled=not args.quiet and len(xs) > 1) as bar:
        ys = client.infer_many(xs, concurrency=args.concurrency, progress=bar)
    t2 = time.perf_counter()
    y = join_batch([{o.name: v for o, v in zip(prog.outputs, [yy] if not isinstance(yy, dict) else
                                                 [yy[o.name] for o in prog.outputs])} for yy in ys], how)
    say(f"{len(xs)} quer{'y' if len(xs) == 1 else 'ies'} answered by {client.url} in {t2 - t1:.2f} s "
        f"({len(xs) / max(t2 - t1, 1e-9):.2f}/s, concurrency {args.concurrency}); key set {ks[:16]}"
        + (f" (made and uploaded in {t1 - t0:.2f} s)" if client.created else
           " (uploaded again)" if client.uploaded else ""))
    _emit_outputs(prog, y, args.output)
    return 0


COMMANDS = {"passes": cmd_passes, "run": cmd_run, "inspect": cmd_inspect, "keygen": cmd_keygen,
            "encrypt": cmd_encrypt, "eval": cmd_eval, "refresh": cmd_refresh, "decrypt": cmd_decrypt,
            "rewrite": cmd_rewrite, "calibrate": cmd_calibrate,
            "sign": cmd_sign, "keygen-signing": cmd_keygen_signing,
            "serve": cmd_serve, "query": cmd_query, "export-client": cmd_export_client}


def _unknown_command(word: str) -> None:
    """``hecompile inpsect m.hec``: a word that is neither a command nor a file."""
    import difflib

    if word.startswith("-") or os.path.exists(word) or "." in os.path.basename(word):
        return
    close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.6)
    if close:
        raise HecError(f"unknown command {word!r}: did you mean 'hecompile {close[0]}'?")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        if argv:
            _unknown_command(argv[0])
        return cmd_compile(argv)
    except HecError as e:
        msg = str(e)
        sys.stderr.write(f"hecompile: error: {msg}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("hecompile: interrupted\n")
        return 130
    except Exception:
        sys.stderr.write("hecompile: internal error (please report with this trace):\n")
        traceback.print_exc()
        return 2


if __name__ == "__main__":
    sys.exit(main())
