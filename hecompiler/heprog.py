"""The HE program: the second, lower IR, executed by the backends.

Values are ciphertexts in SSA form (``%12``), each with a planned *level*
(number of rescales it can still take; fresh ciphertexts are at the top
level ``L``, 0 is the last) and an exact planned *scale* (a float that the
backends reproduce bit for bit).  Instructions:

==============  ==========================================  ==================
op              meaning                                     level / scale
==============  ==========================================  ==================
rotate x, k     slots move left by k (cyclic)                unchanged
add x, y        x + y (same level and scale)                 unchanged
sub x, y        x - y                                        unchanged
negate x        -x                                           unchanged
add_plain x, p  x + p (p encoded at x's level and scale)     unchanged
mul_plain x, p  x * p (p encoded at x's level, scale sp)     scale * sp
mul x, y        x * y, then relinearise                      scale_x * scale_y
rescale x       divide by the level's last prime q_l         level-1, scale/q_l
mod_switch x, l drop primes down to level l                  level l
refresh x       client-aided re-encryption (see backends)    top level, scale D
linear xs, p    a linear op on a whole tensor (macro, below) level-1, planned
==============  ==========================================  ==================

``linear`` is the one macro instruction: ``%y0, %y1 = linear %x0, %x1, diag(k) @ sp``
applies linear op ``k`` to the tensor held in ``%x*`` with the baby-step/giant-step
plan the op records (baby-step size ``n1``, rotation steps, op counts); the
backends expand it into rotate / mul_plain (plaintexts at scale ``sp``) / add /
rescale / add_plain (bias) exactly as :mod:`hecompiler.runtime` describes.  A
ResNet-50 program stays a few thousand instructions instead of millions, and
the expansion is deterministic: the plan is re-derived from the compact
weights at load time and checked against the recorded steps.

Plaintext operands are never stored expanded: a :class:`PlainRef` names how
the backend generates the slot vector when it needs it (a diagonal of a
linear op, a linear op's bias, a constant filled into a layout, or a scalar)
and the scale to encode it at.  Linear ops keep their compact weights.

The program prints as text and parses back (:func:`print_program`,
:func:`parse_program`, grammar ``heprog.lark``); :func:`verify_program`
checks levels, scales, key coverage and definitions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping, Sequence

import numpy as np
from lark import Lark, Token, Tree, UnexpectedInput

from .errors import HecError, LoweringError, ParseError
from .layout import Layout
from .opsem import OpSemanticsError, instr_meta

FORMAT_VERSION = 1

OPS = ("rotate", "add", "sub", "negate", "add_plain", "mul_plain", "mul", "rescale", "mod_switch", "refresh",
       "linear")


#: primitive ops a ``linear`` macro expands to (keys of LinearOp.counts; other keys are statistics)
LINEAR_PRIMITIVES = ("rotate", "mul_plain", "add", "rescale", "add_plain")


class ProgramError(HecError):
    """An HE program violates an invariant (levels, scales, keys, definitions)."""


@dataclass(frozen=True)
class PlainRef:
    """How to make a plaintext: ``kind`` and its arguments, and the encode scale.

    kinds:
      ``diag``   args (lin, j, i, d, rot): diagonal d of block (out ct j, in ct i)
                 of linear op ``lin``, rotated right by ``rot`` slots
      ``bias``   args (lin, j): the bias of linear op ``lin`` packed in its output
                 layout, ciphertext j
      ``fill``   args (layout, j, const): weight ``const`` (a scalar or a
                 per-channel vector) placed on the real slots of ``layout``,
                 ciphertext j; zeros elsewhere
      ``scalar`` args (value,): the same value in every slot
    """

    kind: str
    args: tuple
    scale: float


@dataclass
class Instr:
    op: str
    out: int
    args: tuple[int, ...]
    step: int = 0  # rotate
    to_level: int = -1  # mod_switch
    plain: PlainRef | None = None  # add_plain / mul_plain
    # planned result metadata
    level: int = 0
    scale: float = 0.0
    note: str = ""  # which graph node this implements
    outs: tuple[int, ...] = ()  # all results of a ``linear`` macro (``out`` is the first)

    @property
    def results(self) -> tuple[int, ...]:
        return self.outs if self.outs else (self.out,)


@dataclass
class LinearOp:
    """A linear map on tensors, with compact parameters, between two layouts.

    kind ``conv``: weight, bias names; strides, pads, dilations, group.
    kind ``pool``: avg pooling: kernel, strides, pads, count_include_pad.
    kind ``matrix``: weight name of a dense [out, in] matrix over flattened
    tensors (Gemm, GAP, anything small), bias name.
    kind ``affine``: per-channel scale (weight) and bias (standalone BN).
    kind ``identity``: moves each element from ``in_layout`` to ``out_layout``
    (a layout conversion, or a mask when both are the same).
    The op computes ``mult * (M x) + bias_mult * bias``: ``mult`` absorbs
    pending scalars of the input, both absorb later output rescaling.
    """

    kind: str
    in_layout: int
    out_layout: int
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    params: dict[str, Any] = field(default_factory=dict)
    mult: float = 1.0
    bias_mult: float = 1.0
    note: str = ""
    # the BSGS plan chosen at compile time: baby-step size, rotation steps used, primitive op counts
    n1: int = 0
    steps: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    #: how the rotations run (hecompiler.rotkeys): "" every BSGS step with its own key, each
    #: baby step from the input and each giant step from its accumulator; "tree" baby steps
    #: each from the nearest one made (a tree), giant steps accumulated Horner-style, every
    #: rotation composed from the program's ``rotation_keys``; "star" as "tree" but every baby
    #: step from the input (hoisted by backends that can)
    schedule: str = ""
    #: "tree"/"star": the distinct rotations (steps mod slots) the schedule composes from the keys
    needs: list[int] = field(default_factory=list)
    #: the order its output ciphertexts are computed in (empty: 0, 1, ...): those that share
    #: diagonals one after another, so that the executor's op-local plaintext tier (least recently
    #: used first out) encodes a shared diagonal once (hecompiler.linear.sharing_order)
    order: list[int] = field(default_factory=list)


@dataclass
class IOSpec:
    name: str
    shape: tuple[int, ...]  # graph tensor shape
    layout: int
    values: list[int]  # ciphertext value ids
    alpha: float = 1.0  # outputs: the client multiplies decrypted values by this


@dataclass
class Params:
    poly_degree: int
    coeff_bits: tuple[int, ...]  # SEAL order: q_0 .. q_L, then the special prime
    scale_bits: int
    security: str = "tc128"  # or "none" (explicitly asked for)
    #: sparse packing: ciphertexts use 2^log_slots < N/2 slots (None: all N/2).  A sparse
    #: ciphertext's slot vector repeats with that period, rotations act on one period, and a
    #: bootstrap of fewer slots is cheaper (a backend that cannot pack sparsely refuses it)
    log_slots: int | None = None

    @property
    def slots(self) -> int:
        return 1 << self.log_slots if self.log_slots is not None else self.poly_degree // 2

    @property
    def top_level(self) -> int:
        """Level of a fresh ciphertext: number of rescales it can take."""
        return len(self.coeff_bits) - 2

    @property
    def scale(self) -> float:
        return float(2 ** self.scale_bits)

    def to_dict(self) -> dict:
        d = {"poly_degree": self.poly_degree, "coeff_bits": list(self.coeff_bits),
             "scale_bits": self.scale_bits, "security": self.security}
        if self.log_slots is not None:
            d["log_slots"] = self.log_slots
        return d

    @staticmethod
    def from_dict(d: dict) -> "Params":
        ls = d.get("log_slots")
        return Params(int(d["poly_degree"]), tuple(int(b) for b in d["coeff_bits"]), int(d["scale_bits"]),
                      str(d.get("security", "tc128")), None if ls is None else int(ls))


@dataclass
class HEProgram:
    params: Params
    primes: tuple[int, ...]  # the actual primes q_0..q_L (without the special prime)
    layouts: list[Layout] = field(default_factory=list)
    linears: list[LinearOp] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: list[IOSpec] = field(default_factory=list)
    outputs: list[IOSpec] = field(default_factory=list)
    instrs: list[Instr] = field(default_factory=list)
    n_values: int = 0
    #: the Galois keys the program gets (steps mod slots); None: one for every step it uses
    rotation_keys: list[int] | None = None

    def new_value(self) -> int:
        self.n_values += 1
        return self.n_values - 1

    @property
    def galois_steps(self) -> list[int]:
        """The rotation steps that get a Galois key."""
        s = self.params.slots
        if self.rotation_keys is not None:
            return sorted({k % s for k in self.rotation_keys if k % s})
        return self.used_steps

    @property
    def used_steps(self) -> list[int]:
        """Every rotation step the program's ops name (a ``tree`` linear op's BSGS steps and the
        rotations its schedule composes)."""
        s = self.params.slots
        steps = {i.step % s for i in self.instrs if i.op == "rotate" and i.step % s}
        for i in self.instrs:
            if i.op == "linear":
                lin = self.linears[i.plain.args[0]]
                steps.update(k % s for k in (lin.needs if lin.schedule else lin.steps) if k % s)
        return sorted(steps)

    def galois_key_levels(self, graph: Any = None,
                          needs: Mapping[int, Sequence[int]] | None = None) -> dict[int, int]:
        """Galois key step -> the highest level the program rotates by it (a ``linear`` op rotates
        its inputs at their level, one above its result's; a ``rotate`` at its own; a rotation
        composed from keys, as :func:`hecompiler.rotkeys.KeyGraph.path` composes it at run time,
        uses every key on its path).  A key made with the primes of that level only serves
        every use (the gadget product of a ciphertext at a lower level takes the key's first
        primes): backends that can make keys per level (Lattigo) make them so, smaller and
        quicker to make.  A key no op uses gets the top.

        ``graph`` (a :class:`hecompiler.rotkeys.KeyGraph`) and ``needs`` (linear op id -> the
        rotations its schedule composes) price a key set before the program takes it
        (:mod:`hecompiler.hepasses.select_rotation_keys`)."""
        s = self.params.slots
        steps = self.galois_steps if graph is None else list(graph.keys)
        at = dict.fromkeys(steps, -1)

        def use(step: int, level: int) -> None:
            nonlocal graph
            k = step % s
            if k in at:
                at[k] = max(at[k], level)
                return
            if graph is None:  # a rotation composed from keys uses every key on its path
                from .runtime import key_graph

                graph = key_graph(self)
            if graph.reaches(k):
                for h in graph.path(k):
                    at[h % s] = max(at[h % s], level)

        for i in self.instrs:
            if i.op == "rotate" and i.step % s:
                use(i.step, i.level)
            elif i.op == "linear":
                lid = i.plain.args[0]
                lin = self.linears[lid]
                for k in (needs[lid] if needs is not None and lid in needs else
                          lin.needs if lin.schedule else lin.steps):
                    if k % s:
                        use(k, i.level + 1)
        top = self.params.top_level
        return {k: (top if lv < 0 else lv) for k, lv in at.items()}

    @property
    def needs_relin(self) -> bool:
        return any(i.op == "mul" for i in self.instrs)

    def op_counts(self, expand: bool = True) -> dict[str, int]:
        """Instruction counts; with ``expand`` a ``linear`` macro counts as the
        primitive ops it runs."""
        c: dict[str, int] = {}
        for i in self.instrs:
            if i.op == "linear" and expand:
                for op, n in self.linears[i.plain.args[0]].counts.items():
                    if op in LINEAR_PRIMITIVES:
                        c[op] = c.get(op, 0) + n
            else:
                c[i.op] = c.get(i.op, 0) + 1
        return dict(sorted(c.items()))

    def last_uses(self) -> dict[int, int]:
        """Value id -> index of the last instruction reading it (outputs: len)."""
        last: dict[int, int] = {}
        for k, ins in enumerate(self.instrs):
            for a in ins.args:
                last[a] = k
        for o in self.outputs:
            for v in o.values:
                last[v] = len(self.instrs)
        return last

    def levels_used(self) -> int:
        """Rescales on the longest path (counting refreshed segments together)."""
        depth: dict[int, int] = {v: 0 for io in self.inputs for v in io.values}
        for ins in self.instrs:
            d = max((depth[a] for a in ins.args), default=0)
            for o in ins.results:
                depth[o] = d + (1 if ins.op in ("rescale", "linear") else 0)
        return max(depth.values(), default=0)


# --------------------------------------------------------------------------- verifier

def verify_program(prog: HEProgram, galois_steps: set[int] | None = None) -> None:
    """Check definitions, levels, exact scales and rotation keys; raise ProgramError."""
    p = prog.params
    top = p.top_level
    if len(prog.primes) != top + 1:
        raise ProgramError(f"program has {len(prog.primes)} primes for top level {top}")
    meta: dict[int, tuple[int, float]] = {}
    delta = p.scale
    for io in prog.inputs:
        if not 0 <= io.layout < len(prog.layouts):
            raise ProgramError(f"input {io.name}: unknown layout #{io.layout}")
        if len(io.values) != prog.layouts[io.layout].n_ct:
            raise ProgramError(f"input {io.name}: {len(io.values)} ciphertexts for layout with "
                               f"{prog.layouts[io.layout].n_ct}")
        for v in io.values:
            meta[v] = (top, delta)
    keys = set(prog.galois_steps) if galois_steps is None else {k % p.slots for k in galois_steps}
    graph: list = []  # the key graph, made when a "tree" linear op needs it
    for k, ins in enumerate(prog.instrs):
        where = f"instruction {k} ({ins.op} -> %{ins.out}{', ' + ins.note if ins.note else ''})"
        for a in ins.args:
            if a not in meta:
                raise ProgramError(f"{where}: operand %{a} is not defined before use")
        for o in ins.results:
            if o in meta:
                raise ProgramError(f"{where}: %{o} is defined twice")
        if ins.op == "rotate" and ins.step % p.slots and ins.step % p.slots not in keys:
            raise ProgramError(f"{where}: no Galois key for rotation by {ins.step}")
        if ins.op == "add_plain" and ins.plain is None or ins.op == "mul_plain" and ins.plain is None:
            raise ProgramError(f"{where}: {ins.op} needs a plaintext operand")
        if ins.op == "linear":
            _check_linear(prog, ins, keys, where, graph)
        try:
            level, scale = instr_meta(prog, ins, [meta[a] for a in ins.args])
        except OpSemanticsError as e:
            raise ProgramError(f"{where}: {e}") from None
        if ins.level != level or ins.scale != scale:
            raise ProgramError(f"{where}: planned level/scale {ins.level}/{ins.scale!r} but the op gives "
                               f"{level}/{scale!r}")
        for o in ins.results:
            meta[o] = (level, scale)
    for io in prog.outputs:
        for v in io.values:
            if v not in meta:
                raise ProgramError(f"output {io.name}: %{v} is not defined")
        if len({meta[v] for v in io.values}) > 1:
            raise ProgramError(f"output {io.name}: its ciphertexts differ in level or scale")


def _check_linear(prog: HEProgram, ins: Instr, keys, where: str, graph: list) -> None:
    """The structure of a ``linear`` macro (its level and scale come from :mod:`hecompiler.opsem`)."""
    p = ins.plain
    if p is None or p.kind != "diag" or len(p.args) != 1 or not 0 <= p.args[0] < len(prog.linears):
        raise ProgramError(f"{where}: linear needs a diag(<linear op>) operand")
    lin = prog.linears[p.args[0]]
    lin_in, lout = prog.layouts[lin.in_layout], prog.layouts[lin.out_layout]
    if len(ins.args) != lin_in.n_ct or len(ins.results) != lout.n_ct:
        raise ProgramError(f"{where}: linear op #{p.args[0]} maps {lin_in.n_ct} ciphertext(s) to {lout.n_ct}, "
                           f"got {len(ins.args)} -> {len(ins.results)}")
    if lin.order and sorted(lin.order) != list(range(lout.n_ct)):
        raise ProgramError(f"{where}: linear op #{p.args[0]}'s order is not a permutation of its "
                           f"{lout.n_ct} output ciphertexts")
    S = prog.params.slots
    if lin.schedule in ("tree", "star"):
        if not graph:
            from .rotkeys import KeyGraph

            graph.append(KeyGraph(keys, S))
        missing = [k for k in lin.needs if not graph[0].reaches(k)]
        if missing:
            signed = sorted((k - S if k % S > S // 2 else k % S for k in missing), key=lambda k: (abs(k), k))
            raise ProgramError(f"{where}: rotation(s) {signed[:5]} of linear op #{p.args[0]} cannot be composed "
                               f"from the program's Galois keys {sorted(k - S if k > S // 2 else k for k in keys)[:12]}")
        return
    if lin.schedule:
        raise ProgramError(f"{where}: linear op #{p.args[0]} has an unknown schedule {lin.schedule!r}")
    missing = [k for k in lin.steps if k % S and k % S not in keys]
    if missing:
        raise ProgramError(f"{where}: no Galois key for rotation(s) {missing[:5]} of linear op #{p.args[0]}")


# --------------------------------------------------------------------------- text form

def _fmt_num(x: float) -> str:
    return repr(float(x))


def _fmt_plain(p: PlainRef) -> str:
    args = ", ".join(_fmt_num(a) if isinstance(a, float) else json.dumps(a) if isinstance(a, str) else str(a)
                     for a in p.args)
    return f"{p.kind}({args}) @ {_fmt_num(p.scale)}"


def _fmt_params(d: dict) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def print_program(prog: HEProgram) -> str:
    p = prog.params
    out = [f"heprogram v{FORMAT_VERSION} {{",
           f"  params {_fmt_params(p.to_dict())}",
           f"  primes [{', '.join(str(q) for q in prog.primes)}]"]
    if prog.rotation_keys is not None:
        out.append(f"  keys [{', '.join(str(k) for k in sorted(prog.rotation_keys))}]")
    for k, lay in enumerate(prog.layouts):
        out.append(f"  layout #{k} {_fmt_params(lay.to_dict())}")
    for k, lin in enumerate(prog.linears):
        d = {"kind": lin.kind, "in": lin.in_layout, "out": lin.out_layout, "in_shape": list(lin.in_shape),
             "out_shape": list(lin.out_shape), "params": lin.params, "mult": lin.mult,
             "bias_mult": lin.bias_mult, "note": lin.note, "n1": lin.n1, "steps": list(lin.steps),
             "counts": lin.counts}
        if lin.schedule:
            d["schedule"] = lin.schedule
            d["needs"] = list(lin.needs)
        if lin.order:
            d["order"] = list(lin.order)
        out.append(f"  linear #{k} {_fmt_params(d)}")
    for io in prog.inputs:
        vals = ", ".join(f"%{v}" for v in io.values)
        out.append(f"  input {json.dumps(io.name)} {list(io.shape)} layout #{io.layout} = {vals}")
    for ins in prog.instrs:
        args = ", ".join(f"%{a}" for a in ins.args)
        extra = ""
        if ins.op == "rotate":
            extra = f", {ins.step}"
        elif ins.op == "mod_switch":
            extra = f", {ins.to_level}"
        elif ins.plain is not None:
            extra = ", " + _fmt_plain(ins.plain)
        note = f"  # {ins.note}" if ins.note else ""
        res = ", ".join(f"%{o}" for o in ins.results)
        out.append(f"  {res} = {ins.op} {args}{extra} : L{ins.level} S{_fmt_num(ins.scale)}{note}")
    for io in prog.outputs:
        vals = ", ".join(f"%{v}" for v in io.values)
        out.append(f"  output {json.dumps(io.name)} {list(io.shape)} layout #{io.layout} alpha "
                   f"{_fmt_num(io.alpha)} = {vals}")
    out.append("}")
    return "\n".join(out) + "\n"


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("hecompiler").joinpath("heprog.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True)


def _num(tok) -> float | int:
    s = str(tok)
    return float(s) if any(c in s for c in ".eEn") else int(s)


def parse_program(text: str, weights: dict[str, np.ndarray] | None = None, source: str = "<heprog>") -> HEProgram:
    """Parse the text form (weights are not part of the text; pass them in)."""
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        ctx = e.get_context(text, span=60).rstrip("\n")
        raise ParseError(f"{source}:{e.line}:{e.column}: unexpected input\n{ctx}") from None
    prog: HEProgram | None = None
    params = primes = None
    maxval = -1
    try:
        for st in tree.children:
            kind = st.data
            c = st.children
            if kind == "params":
                params = Params.from_dict(json.loads(str(c[0])))
            elif kind == "primes":
                primes = tuple(int(t) for t in c)
                prog = HEProgram(params, primes, weights=dict(weights or {}))
            elif kind == "keys":
                prog.rotation_keys = sorted(int(t) for t in c if t is not None)
            elif kind == "layout":
                prog.layouts.append(Layout.from_dict(json.loads(str(c[1]))))
            elif kind == "linear":
                d = json.loads(str(c[1]))
                prog.linears.append(LinearOp(d["kind"], d["in"], d["out"], tuple(d["in_shape"]),
                                             tuple(d["out_shape"]), d["params"], float(d["mult"]),
                                             float(d["bias_mult"]), d["note"], int(d.get("n1", 0)),
                                             [int(k) for k in d.get("steps", [])],
                                             {str(k): int(v) for k, v in d.get("counts", {}).items()},
                                             str(d.get("schedule", "")), [int(k) for k in d.get("needs", [])],
                                             [int(k) for k in d.get("order", [])]))
            elif kind in ("input", "output"):
                name = json.loads(str(c[0]))
                shape = tuple(int(t) for t in c[1].children)
                lay = int(str(c[2])[1:])
                rest = c[3:]
                alpha = 1.0
                if kind == "output":
                    alpha = float(_num(rest[0]))
                    rest = rest[1:]
                vals = [int(str(t)[1:]) for t in rest]
                maxval = max([maxval] + vals)
                (prog.inputs if kind == "input" else prog.outputs).append(IOSpec(name, shape, lay, vals, alpha))
            elif kind == "instr":
                outs = [int(str(t)[1:]) for t in c[0].children]
                out = outs[0]
                op = str(c[1])
                args, step, to_level, plain = [], 0, -1, None
                level = scale = None
                for x in c[2:]:
                    if isinstance(x, Token) and x.type == "VAL":
                        args.append(int(str(x)[1:]))
                    elif isinstance(x, Token) and x.type == "INTNUM":
                        if op == "rotate":
                            step = int(x)
                        else:
                            to_level = int(x)
                    elif isinstance(x, Tree) and x.data == "plain":
                        pk = str(x.children[0])
                        pargs = tuple(json.loads(str(a)) if str(a).startswith('"') else _num(a)
                                      for a in x.children[1:-1])
                        plain = PlainRef(pk, pargs, float(_num(x.children[-1])))
                    elif isinstance(x, Tree) and x.data == "meta":
                        level = int(str(x.children[0])[1:])
                        scale = float(str(x.children[1])[1:])
                note = ""
                if isinstance(c[-1], Token) and c[-1].type == "COMMENT_NOTE":
                    note = str(c[-1])[1:].strip()
                maxval = max([maxval] + outs + args)
                prog.instrs.append(Instr(op, out, tuple(args), step, to_level, plain, level, scale, note,
                                         tuple(outs) if op == "linear" else ()))
    except (KeyError, ValueError, TypeError, AttributeError, LoweringError) as e:
        raise ParseError(f"{source}: malformed program: {type(e).__name__}: {e}") from None
    if prog is None:
        raise ParseError(f"{source}: no params/primes header")
    prog.n_values = maxval + 1
    return prog
