"""Passes: the contract, the registry, pipeline specs and the pass manager.

A pass is a frozen dataclass subclassing :class:`Pass`, registered with
:func:`register_pass`.  Its fields are its options, written in a pipeline spec
as ``name{opt=value,...}``::

    from dataclasses import dataclass
    from hecompiler import Pass, PassResult, register_pass

    @register_pass
    @dataclass(frozen=True)
    class CountConvs(Pass):
        name = "count-convs"
        summary = "report how many convolutions there are"
        exact = True
        verbose: bool = False

        def run(self, graph, ctx):
            n = sum(node.op == "Conv" for node in graph.nodes)
            return PassResult(modified=False, notes=[f"{n} convolutions"])

``exact`` declares whether the pass preserves the function the graph computes
(up to float rounding).  The default pipeline runs exact passes only; an
approximating pass must be asked for and its effect is measured and reported.

The same registry and spec syntax serve the CLI (``--passes``) and the API
(:func:`parse_pipeline`, :class:`PassManager`).  The manager verifies the
graph after every pass and can dump text and DOT snapshots.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

from .errors import HecError, ParseError, PassError, VerificationError
from .ir import Graph
from .verify import verify

#: the exact canonicalisation pipeline run by default
DEFAULT_PIPELINE = "fold-constants,remove-identity,stack-sum,fold-pad,fold-bn,fuse-gemm,dirac-merge,fuse-poly,fold-constants,dce"


@dataclass(frozen=True)
class PassResult:
    """What a pass reports: whether it changed the graph, and notes for the report."""

    modified: bool
    notes: Sequence[str] = ()


@dataclass
class PassContext:
    """Shared state a pass may read: the options of the whole run."""

    options: dict[str, Any] = field(default_factory=dict)


#: dumps abbreviate constants with more elements than this (unless asked for the weights)
DUMP_ELIDE = 16


class Pass:
    """Base class of all passes (see the module docstring)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    #: the IR the pass rewrites: "graph" (the graph IR) or "heprogram" (hecompiler.hepasses)
    ir: ClassVar[str] = "graph"
    #: reads calibration statistics (``ctx.options["calibration"]``): the driver measures them first
    uses_calibration: ClassVar[bool] = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """This pass with its non-default options, in pipeline syntax."""
        opts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and v == f.default:
                continue
            opts.append(f"{f.name}={str(v).lower() if isinstance(v, bool) else v}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Pass]] = {}
_BUILTINS_LOADED = False
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry (built-in or user pass)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PassError(f"{cls!r} must subclass hecompiler.Pass")
    if not dataclasses.is_dataclass(cls):
        cls = dataclass(frozen=True)(cls)
    if not _NAME_RE.match(cls.name or ""):
        raise PassError(f"pass {cls.__name__}: name {cls.name!r} must be kebab-case, e.g. 'fold-bn'")
    if not cls.summary:
        raise PassError(f"pass {cls.name}: give it a one-line summary")
    if not isinstance(cls.__dict__.get("exact", getattr(cls, "exact", None)), bool):
        raise PassError(f"pass {cls.name}: declare exact = True or False")
    old = _REGISTRY.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise PassError(f"pass name {cls.name!r} is already registered by {old.__module__}.{old.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from . import passes  # noqa: F401  (registers the built-in passes)
        from . import hepasses  # noqa: F401  (and the HE-program passes)


def list_passes() -> list[type[Pass]]:
    _load_builtins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_pass(name: str, **options: Any) -> Pass:
    """An instance of the registered pass ``name`` with ``options``."""
    _load_builtins()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise PassError(f"unknown pass {name!r}; known passes: {', '.join(sorted(_REGISTRY))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    conv = {}
    for k, v in options.items():
        if k not in fields:
            raise PassError(f"pass {name} has no option {k!r}; options: {', '.join(fields) or 'none'}")
        conv[k] = _convert_option(name, fields[k], v)
    return cls(**conv)


def _convert_option(pname: str, f: dataclasses.Field, v: Any) -> Any:
    if not isinstance(v, str):
        return v
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if typ == "bool":
            if v.lower() in ("true", "1", "yes", "on"):
                return True
            if v.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(v)
        if typ == "int":
            return int(v)
        if typ == "float":
            return float(v)
    except ValueError:
        raise PassError(f"pass {pname}: option {f.name} must be {typ}, got {v!r}") from None
    return v


_SPEC_RE = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(\{([^{}]*)\})?\s*")


def parse_pipeline(spec: str) -> list[Pass]:
    """Parse ``"a,b{k=v,k2=v2}"`` into pass instances ("" is the empty pipeline)."""
    passes: list[Pass] = []
    pos = 0

    def fail(at: int, what: str) -> ParseError:
        return ParseError(f"pipeline spec: {what} at column {at + 1}\n  {spec}\n  {' ' * at}^")

    if not spec.strip():
        return passes
    while True:
        m = _SPEC_RE.match(spec, pos)
        if not m:
            raise fail(pos + len(spec[pos:]) - len(spec[pos:].lstrip()), "expected a pass name")
        opts = {}
        if m.group(3) is not None and m.group(3).strip():
            for item in m.group(3).split(","):
                if "=" not in item:
                    raise ParseError(f"pipeline spec: option {item.strip()!r} of pass {m.group(1)} needs key=value")
                k, v = item.split("=", 1)
                opts[k.strip()] = v.strip()
        passes.append(get_pass(m.group(1), **opts))
        pos = m.end()
        if pos == len(spec):
            return passes
        if spec[pos] != ",":
            raise fail(pos, f"cannot parse {spec[pos]!r} (passes are separated by ',')")
        pos += 1


# --------------------------------------------------------------------------- running

@dataclass
class PassRecord:
    spec: str
    exact: bool
    modified: bool
    nodes_before: int
    nodes_after: int
    op_delta: dict[str, int]
    notes: list[str]
    seconds: float


@dataclass
class PipelineReport:
    records: list[PassRecord] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return all(r.exact for r in self.records)

    def format(self) -> str:
        if not self.records:
            return "no passes run\n"
        w = max(len(r.spec) for r in self.records)
        lines = [f"{'pass':<{w}}  {'kind':<7} {'nodes':>11}  changes"]
        for r in self.records:
            kind = "exact" if r.exact else "approx"
            delta = ", ".join(f"{op} {d:+d}" for op, d in sorted(r.op_delta.items())) or \
                ("modified" if r.modified else "-")
            lines.append(f"{r.spec:<{w}}  {kind:<7} {r.nodes_before:>5}->{r.nodes_after:<5}  {delta}")
            for note in r.notes:
                lines.append(f"{'':<{w}}  {'':<7} {'':>11}  {note}")
        return "\n".join(lines) + "\n"


class _GraphIR:
    """What the pass manager needs of an IR: verify, count ops, size, dump."""

    name = "graph"

    @staticmethod
    def verify(g: Graph, where: str) -> None:
        verify(g, where)

    @staticmethod
    def counts(g: Graph) -> dict[str, int]:
        return g.op_counts()

    @staticmethod
    def size(g: Graph) -> int:
        return len(g.nodes)


class _ProgramIR:
    name = "heprogram"

    @staticmethod
    def verify(prog, where: str) -> None:
        from .heprog import ProgramError, verify_program

        try:
            verify_program(prog)
        except ProgramError as e:
            raise VerificationError(f"{where}: {e}") from None

    @staticmethod
    def counts(prog) -> dict[str, int]:
        return prog.op_counts(expand=False)

    @staticmethod
    def size(prog) -> int:
        return len(prog.instrs)


_IRS = {"graph": _GraphIR, "heprogram": _ProgramIR}


class PassManager:
    """Runs a list of passes, verifying after each and optionally dumping snapshots.

    ``dump_after`` is a set of pass names, or ``{"all"}``; snapshots go to
    ``dump_dir`` as ``NN-<pass>.ir`` and ``NN-<pass>.dot`` (``00-input`` is the
    graph before any pass).
    """

    def __init__(self, passes: Iterable[Pass] | str, *, verify_each: bool = True,
                 dump_after: Iterable[str] = (), dump_dir: str | os.PathLike | None = None,
                 options: dict[str, Any] | None = None, dump_weights: bool = False,
                 dump_constants: bool = True):
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        kinds = {getattr(p, "ir", "graph") for p in self.passes}
        if len(kinds) > 1:
            raise PassError(f"a pipeline runs on one IR: {', '.join(p.spec + ' (' + p.ir + ')' for p in self.passes)}")
        self.ir = _IRS[kinds.pop() if kinds else "graph"]
        #: dumped .ir spells out every weight (parses back) only when asked; else large
        #: constants are elided (a ResNet-20 would write 17 MB per pass)
        self.dump_weights = dump_weights
        self.dump_constants = dump_constants  # draw constants in dumped DOT
        self.verify_each = verify_each
        self.dump_after = set(dump_after)
        self.dump_dir = os.fspath(dump_dir) if dump_dir is not None else None
        self.ctx = PassContext(dict(options or {}))
        if self.dump_after:
            if self.dump_dir is None:
                raise PassError("dump_after needs a dump_dir")
            known = {p.name for p in self.passes} | {"all"}
            bad = self.dump_after - known
            if bad:
                raise PassError(f"--dump-after names pass(es) not in the pipeline: {', '.join(sorted(bad))}; "
                                f"pipeline: {', '.join(p.name for p in self.passes)}")
            from .fileio import makedirs

            makedirs(self.dump_dir, "--dump-dir")  # fail before the work, not after it

    def _dump(self, graph: Graph, index: int, tag: str) -> None:
        from .dot import to_dot
        from .fileio import atomic_write_text
        from .text import print_graph

        base = os.path.join(self.dump_dir, f"{index:02d}-{tag}")
        if self.ir is _ProgramIR:
            from .heprog import print_program

            atomic_write_text(base + ".heprog", print_program(graph))
            return
        atomic_write_text(base + ".ir", print_graph(graph, None if self.dump_weights else DUMP_ELIDE))
        atomic_write_text(base + ".dot", to_dot(graph, title=f"{graph.name} after {tag}",
                                                show_constants=self.dump_constants))

    def run(self, graph: Graph) -> PipelineReport:
        report = PipelineReport()
        if self.dump_after:
            self._dump(graph, 0, "input")
        ran: list[str] = []
        ir = self.ir
        for i, p in enumerate(self.passes, start=1):
            before = ir.counts(graph)
            n_before = ir.size(graph)
            t0 = time.perf_counter()
            try:
                res = p.run(graph, self.ctx)
            except HecError:
                raise
            except Exception as e:
                after = f" (after {', '.join(ran)})" if ran else ""
                raise PassError(f"pass {p.spec} failed{after}: {type(e).__name__}: {e}") from e
            dt = time.perf_counter() - t0
            if res is None or isinstance(res, bool):
                res = PassResult(modified=bool(res))
            if self.verify_each:
                try:
                    ir.verify(graph, f"after pass {p.spec}")
                except VerificationError as e:
                    raise VerificationError(f"{e}\n  (passes run: {', '.join(ran + [p.spec])})") from None
            after_counts = ir.counts(graph)
            delta = {op: after_counts.get(op, 0) - before.get(op, 0)
                     for op in set(before) | set(after_counts)
                     if after_counts.get(op, 0) != before.get(op, 0)}
            report.records.append(PassRecord(p.spec, p.exact, res.modified, n_before, ir.size(graph), delta,
                                             list(res.notes), dt))
            ran.append(p.spec)
            if "all" in self.dump_after or p.name in self.dump_after:
                self._dump(graph, i, p.name)
        return report


def run_pipeline(graph: Graph, spec: str | Sequence[Pass] = DEFAULT_PIPELINE, **kw) -> PipelineReport:
    """Run a pipeline (spec string or pass list) on ``graph`` in place."""
    return PassManager(spec, **kw).run(graph)
