"""The ``hecompile`` command line.  A thin layer over the library API."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import traceback
from typing import Sequence

from . import __version__
from .errors import HecError

_EMIT_BY_EXT = {".ir": "ir", ".txt": "ir", ".dot": "dot", ".gv": "dot", ".onnx": "onnx"}

_DESCRIPTION = """\
Compile an ONNX CNN for CKKS homomorphic encryption.

  hecompile MODEL.onnx -o OUT.ir       import, canonicalise, write textual IR
  hecompile MODEL.onnx -o OUT.dot      ... write a DOT picture of the graph
  hecompile MODEL.onnx -o OUT.onnx     ... write the rewritten graph as ONNX
  hecompile passes                     list the available rewrite passes

The output kind follows the extension of -o (or --emit).  Without -o, text
output (ir, dot) goes to standard output.  A pass report goes to standard
error.  A failed run exits non-zero and writes no output file.
"""


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


def _check_output_dir(path: str | None) -> None:
    """Fail before doing any work when the output cannot be written."""
    if path:
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise HecError(f"-o {path}: directory {d} does not exist")


def _compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hecompile", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the ONNX model to compile")
    p.add_argument("-o", "--output", help="output file (kind from its extension: .ir .dot .onnx)")
    p.add_argument("--emit", choices=["ir", "dot", "onnx"], help="output kind (overrides the extension)")
    p.add_argument("--passes", default=None, metavar="SPEC",
                   help="pipeline to run instead of the default, e.g. 'fold-bn,dce' or 'my-pass{k=1}'; "
                        "'' runs none. See 'hecompile passes'.")
    p.add_argument("--dump-after", action="append", default=[], metavar="PASS|all",
                   help="write text and DOT snapshots after PASS (repeatable) or after every pass")
    p.add_argument("--dump-dir", default="hecompile-dump", help="where snapshots go (default: %(default)s)")
    p.add_argument("--input-shape", action="append", type=_shape_arg, default=[], metavar="NAME=N,C,H,W",
                   help="fix the shape of an input whose dimensions are symbolic (batch defaults to 1)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE (dotted name or .py file) first, to register your own passes")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the pass report")
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
                               f"use .ir, .dot or .onnx, or give --emit")
            emit = _EMIT_BY_EXT[ext]
        else:
            emit = "ir"
    if emit == "onnx" and not args.output:
        raise HecError("--emit onnx needs -o FILE.onnx")
    _check_output_dir(args.output)

    graph = load_onnx(args.model, dict(args.input_shape))
    spec = DEFAULT_PIPELINE if args.passes is None else args.passes
    pm = PassManager(spec, dump_after=args.dump_after, dump_dir=args.dump_dir if args.dump_after else None)
    report = pm.run(graph)
    if not args.quiet:
        sys.stderr.write(f"{args.model}: {len(graph.nodes)} nodes, {len(graph.constants)} constants\n")
        sys.stderr.write(report.format())

    if emit == "onnx":
        atomic_write_bytes(args.output, to_onnx(graph).SerializeToString())
    else:
        text = print_graph(graph) if emit == "ir" else to_dot(graph)
        if args.output:
            atomic_write_text(args.output, text)
        else:
            sys.stdout.write(text)
    if args.output and not args.quiet:
        sys.stderr.write(f"wrote {args.output}\n")
    return 0


def cmd_passes(argv: Sequence[str]) -> int:
    from .passmanager import DEFAULT_PIPELINE, list_passes

    p = argparse.ArgumentParser(prog="hecompile passes", description="List the registered rewrite passes.")
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


COMMANDS = {"passes": cmd_passes}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
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
