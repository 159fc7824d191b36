"""Architecture rewrites of a standard ResNet for cheap skips under HE, with re-fit and fidelity report.

Skip connections are what makes a ResNet expensive under CKKS (DESIGN.md, "The
idea").  Two approximating rewrites (opt-in: they change the function) take
them out of the way, following Drucker & Zimerman (CSCML 2023):

* ``dirac`` (:mod:`hecompiler.passes.dirac_rewrite`): a residual block
  ``act(conv2(act(conv1(x))) + x)`` becomes the plain chain
  ``act(conv2'(act(conv1'(x))))`` with ``convK' = convK + I`` (the identity
  at the centre tap, DiracNet): the short skip lives inside the convs and
  costs nothing.
* ``shared-source`` (:mod:`hecompiler.passes.shared_source_rewrite`): within a
  stage every block's skip operand is one shared tensor (the stage input),
  so aligning and refreshing it is paid once and fanned out.

Both together give "Dirac convs plus shared-source long skips": the
shared-source rewrite runs first, then each block whose skip is still its own
input becomes a Dirac chain, and each block whose skip now comes from the
shared source keeps that long skip and gets Dirac convs for the short one.

:func:`rewrite_model` is the driver: ONNX -> canonical graph (the exact
default passes) -> the rewrite passes -> :func:`hecompiler.refit.refit` on
calibration data -> fidelity report (before and after the re-fit, on the
calibration and a held-out set).  :func:`save` writes the result as ONNX so
it can be fine-tuned elsewhere and compiled again.

Block detection (:func:`find_blocks`) works on canonical graphs (BatchNorm
folded into the convs, activations as single ``Relu``/``Clip``/``Poly``
nodes): an ``Add(main, skip)`` whose ``main`` operand is a chain
``conv(act(conv(... x)))`` of two or three convs (basic block or bottleneck)
used nowhere else, and whose ``skip`` is ``x`` (identity), a conv of ``x``
used only there (projection), or, for two-conv chains, another earlier tensor
of the same shape (a long skip, as ``shared-source`` leaves them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import HecError
from .ir import Graph, Node, Value

#: single-node activations a residual block may use
ACTIVATION_OPS = frozenset({"Relu", "Clip", "Poly"})

#: the rewrite kinds, in the order they are applied when several are asked for
KINDS = ("shared-source", "dirac")

#: where the passes record what they changed (``PassContext.options``)
RECORD_KEY = "arch_rewrite"


# --------------------------------------------------------------------------- residual blocks

@dataclass(eq=False)
class ResidualBlock:
    """One residual block: ``add(main, skip)`` with ``main = convs[-1](acts[-1](...convs[0](input)))``."""

    add: Node
    convs: tuple[Node, ...]
    acts: tuple[Node, ...]
    skip_index: int
    kind: str                    # "identity" | "projection" | "long"
    projection: Node | None      # the conv producing the skip (projection blocks)
    out_act: Node | None         # the activation applied to the Add's result, if any

    @property
    def input(self) -> Value:
        return self.convs[0].inputs[0]

    @property
    def skip(self) -> Value:
        return self.add.inputs[self.skip_index]

    @property
    def output(self) -> Value:
        return (self.out_act or self.add).outputs[0]

    @property
    def name(self) -> str:
        """The block's module scope from the Add's source name (``/layer1/layer1.0``),
        else the Add's output value."""
        n = self.add.name
        if n and "/" in n.strip("/"):
            return n.rsplit("/", 1)[0]
        return n or "%" + self.add.output.name

    def channels_match(self) -> bool:
        """Every conv of the chain (and the projection) maps C channels to C."""
        convs = self.convs + ((self.projection,) if self.projection is not None else ())
        return all(c.inputs[1].shape[0] == c.inputs[0].shape[1] for c in convs)

    def describe(self) -> str:
        c0, c1 = self.input.shape[1], self.output.shape[1]
        s = self.convs[0].attrs["strides"]
        extra = f", {c0}->{c1} channels, stride {s[0]}" if self.kind == "projection" else ""
        return f"{self.name}: {len(self.convs)} convs, {self.kind} skip{extra}"


def _sole(v: Value, graph: Graph) -> bool:
    return len(v.uses) == 1 and v not in graph.outputs


def _const_conv(node: Node | None) -> bool:
    return node is not None and node.op == "Conv" and all(v.is_constant for v in node.inputs[1:])


def _match(add: Node, graph: Graph) -> ResidualBlock | None:
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    a, b = add.inputs
    if a.is_constant or b.is_constant or a.type != b.type or a.type != add.output.type or a.type.rank != 4:
        return None
    for mi in (0, 1):
        main, skip = add.inputs[mi], add.inputs[1 - mi]
        c = main.producer
        if not (_const_conv(c) and _sole(main, graph)):
            continue
        convs, acts = [c], []
        kind, proj = None, None
        while True:
            x = convs[0].inputs[0]
            if len(convs) >= 2:
                if x is skip:
                    kind = "identity"
                    break
                p = skip.producer
                if _const_conv(p) and p.inputs[0] is x and _sole(skip, graph):
                    kind, proj = "projection", p
                    break
            if len(convs) >= 3:
                break
            act = x.producer
            if act is None or act.op not in ACTIVATION_OPS or not _sole(x, graph):
                break
            c = act.inputs[0].producer
            if not (_const_conv(c) and _sole(act.inputs[0], graph)):
                break
            acts.insert(0, act)
            convs.insert(0, c)
        if kind is None:
            # a long skip: a basic (two-conv) block whose skip is an earlier tensor
            if len(convs) < 2:
                continue
            convs, acts = convs[-2:], acts[-1:]
            if skip.producer in convs or skip.producer in acts or skip is convs[0].inputs[0]:
                continue
            kind = "long"
        users = add.output.users
        out_act = users[0] if len(users) == 1 and users[0].op in ACTIVATION_OPS and \
            add.output not in graph.outputs else None
        return ResidualBlock(add, tuple(convs), tuple(acts), 1 - mi, kind, proj, out_act)
    return None


def find_blocks(graph: Graph) -> list[ResidualBlock]:
    """The residual blocks of a canonical graph, in graph order."""
    return [blk for blk in (_match(n, graph) for n in graph.nodes) if blk is not None]


def find_stages(blocks: Sequence[ResidualBlock]) -> list[list[ResidualBlock]]:
    """Group blocks into stages: maximal runs of consecutive blocks (each
    feeding the next) with the same output shape (resolution and width)."""
    stages: list[list[ResidualBlock]] = []
    for b in blocks:
        prev = stages[-1][-1] if stages else None
        if prev is not None and b.input is prev.output and b.output.type == prev.output.type:
            stages[-1].append(b)
        else:
            stages.append([b])
    return stages


def stage_source(stage: Sequence[ResidualBlock], source: str = "input") -> Value:
    """The shared skip source of a stage: its input when that has the stage's
    shape (``source="input"``), else the output of its first block."""
    first = stage[0]
    if source == "input" and first.input.type == first.output.type:
        return first.input
    return first.output


def summarize_blocks(graph: Graph) -> dict[str, Any]:
    blocks = find_blocks(graph)
    stages = find_stages(blocks)
    kinds: dict[str, int] = {}
    for b in blocks:
        kinds[b.kind] = kinds.get(b.kind, 0) + 1
    return {"blocks": len(blocks), "kinds": kinds, "stages": [[b.name for b in st] for st in stages],
            "list": [b.describe() for b in blocks]}


# --------------------------------------------------------------------------- driver

def _load_canonical(model) -> Graph:
    from .frontend import load_onnx
    from .passmanager import DEFAULT_PIPELINE, run_pipeline

    if isinstance(model, Graph):
        g = model.clone()
    else:
        g = load_onnx(model)
    run_pipeline(g, DEFAULT_PIPELINE)
    return g


def _as_samples(arr, graph: Graph, what: str) -> np.ndarray:
    """[N, ...input shape without batch] float32 from [N, C, H, W] or [N, 1, C, H, W]."""
    inp = graph.inputs[0]
    per = tuple(inp.type.shape[1:])
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise HecError(f"{what}: expected a float array, got dtype {a.dtype}")
    if a.ndim == len(per) + 2 and a.shape[1] == 1 and tuple(a.shape[2:]) == per:
        a = a.reshape((a.shape[0],) + per)
    if a.ndim != len(per) + 1 or tuple(a.shape[1:]) != per or a.shape[0] < 1:
        raise HecError(f"{what}: shape {list(a.shape)} but the model input %{inp.name} is {list(inp.type.shape)}; "
                       f"give N samples as [N, {', '.join(map(str, per))}]")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise HecError(f"{what}: contains NaN or infinite values")
    return a


def _metrics(y: np.ndarray, y0: np.ndarray) -> dict[str, float]:
    """Logit error of ``y`` against the original ``y0`` ([N, K]); a non-finite
    output counts as an infinite error and a top-1 disagreement."""
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    y0 = np.asarray(y0, np.float64).reshape(len(y0), -1)
    err = np.abs(y - y0)
    ok = np.isfinite(err).all(axis=1)
    err = np.where(np.isfinite(err), err, np.inf)
    agree = (np.argmax(np.where(np.isfinite(y), y, -np.inf), axis=1) == np.argmax(y0, axis=1)) & ok
    return {"max_abs": float(err.max()), "mean_abs": float(err.mean()), "top1_agree": float(agree.mean()),
            "n": int(len(y)), "nonfinite": int((~ok).sum())}


def fidelity(original: Graph, graphs: dict[str, Graph], sets: dict[str, np.ndarray]) -> dict[str, Any]:
    """Logit errors of each graph in ``graphs`` against ``original`` on each input set."""
    from .refit import run_batch

    out: dict[str, Any] = {}
    for sname, x in sets.items():
        y0 = run_batch(original, x)[0]
        row = {"n": int(len(x)), "logit_std": float(np.std(y0))}
        for gname, g in graphs.items():
            row[gname] = _metrics(run_batch(g, x)[0], y0)
        out[sname] = row
    return out


def rewrite_model(model, kinds: Sequence[str] = ("dirac",), calibration: np.ndarray | None = None,
                  heldout: np.ndarray | None = None, ridge: float = 1e-3, *, source: str = "input",
                  scope: str = "affected", head: bool = False) -> tuple[Graph, dict[str, Any], str]:
    """Rewrite a ResNet (ONNX path, ModelProto or graph IR) for cheap skips and re-fit it.

    ``kinds``: any of ``"dirac"``, ``"shared-source"`` (applied shared-source
    first).  ``calibration``: N inputs ``[N, ...input shape without batch]``
    (or ``[N, 1, ...]``), required: the re-fit and the report run on it;
    ``heldout``: optional inputs to report fidelity on data the re-fit did not
    see.  ``ridge``: the least-squares ridge, relative to the mean squared
    column norm.  ``source`` (shared-source): ``"input"`` or ``"first"``.
    ``scope``/``head``: see :func:`hecompiler.refit.refit`.

    Returns ``(graph, report, report_text)``: the rewritten, re-fitted
    canonical graph (save it with :func:`save`), the report as a dict and
    formatted.
    """
    from .passmanager import PassManager, get_pass
    from .refit import refit
    from .verify import verify

    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise HecError(f"rewrite kind(s) {', '.join(map(repr, unknown)) or 'none given'}: choose from "
                       f"{', '.join(KINDS)}")
    order = [k for k in KINDS if k in kinds]
    if calibration is None:
        raise HecError("calibration data is required: --calibration X.npy (N inputs, same shape as the model input)")
    name = os.path.basename(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else \
        getattr(model, "name", None) or getattr(getattr(model, "graph", None), "name", "<model>")
    graph = _load_canonical(model)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise HecError(f"{name}: the rewrite needs a model with one input and one output, got "
                       f"{len(graph.inputs)} and {len(graph.outputs)}")
    if graph.inputs[0].type.rank < 1 or graph.inputs[0].type.shape[0] != 1:
        raise HecError(f"{name}: input %{graph.inputs[0].name} {list(graph.inputs[0].type.shape)}: the rewrite "
                       f"needs a batch dimension of 1")
    x_cal = _as_samples(calibration, graph, "calibration")
    x_held = _as_samples(heldout, graph, "heldout") if heldout is not None else None
    if not (ridge >= 0 and np.isfinite(ridge)):
        raise HecError(f"ridge: must be a non-negative number, got {ridge}")
    blocks_before = summarize_blocks(graph)
    if not blocks_before["blocks"]:
        raise HecError(f"{name}: no residual blocks found (looked for Add(conv(act(conv(x))), x or conv(x)) "
                       f"after the canonical passes)")
    original = graph.clone()
    passes = [get_pass(k, source=source) if k == "shared-source" else get_pass(k) for k in order]
    pm = PassManager(passes)
    pipeline = pm.run(graph)
    changes = list(pm.ctx.options.get(RECORD_KEY, []))
    if not any(c["changed"] for c in changes):
        notes = "; ".join(c["note"] for c in changes)
        raise HecError(f"{name}: {', '.join(order)} changed nothing ({notes})")
    verify(graph, "after the architecture rewrite")
    unrefit = graph.clone()
    sets = {"calibration": x_cal}
    if x_held is not None:
        sets["heldout"] = x_held
    fits = refit(original, graph, x_cal, ridge=ridge, scope=scope, head=head)
    verify(graph, "after the re-fit")
    fid = fidelity(original, {"before_refit": unrefit, "after_refit": graph}, sets)
    report = {
        "model": name,
        "kinds": order,
        "options": {"ridge": ridge, "source": source, "scope": scope, "head": head},
        "blocks": blocks_before,
        "blocks_after": summarize_blocks(graph),
        "changes": changes,
        "ops_before": original.op_counts(),
        "ops_after": graph.op_counts(),
        "passes": [{"pass": r.spec, "exact": r.exact, "notes": list(r.notes)} for r in pipeline.records],
        "refit": [f.as_dict() for f in fits],
        "fidelity": fid,
    }
    return graph, report, format_report(report)


def report_json(report: dict[str, Any]) -> str:
    """The report as strict JSON (infinite errors become the string "inf")."""
    import json

    def clean(v):
        if isinstance(v, float) and not np.isfinite(v):
            return "nan" if np.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(report), indent=2, allow_nan=False) + "\n"


def save(graph: Graph, path: str | os.PathLike) -> None:
    """Write the rewritten graph as ONNX (atomically), for fine-tuning or ``hecompile``."""
    from .onnx_export import save_onnx

    save_onnx(graph, path)


def _fmt(v: float) -> str:
    return f"{v:.3e}" if np.isfinite(v) else "inf"


def format_report(r: dict[str, Any]) -> str:
    b = r["blocks"]
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(b["kinds"].items()))
    lines = [f"architecture rewrite of {r['model']}: {' then '.join(r['kinds'])} (approximating)"]
    lines.append(f"residual blocks: {b['blocks']} ({kinds}) in {len(b['stages'])} stage(s) of "
                 f"{', '.join(str(len(s)) for s in b['stages'])}")
    for c in r["changes"]:
        lines.append(f"  {c['pass']}: {c['note']}")
    adds0, adds1 = r["ops_before"].get("Add", 0), r["ops_after"].get("Add", 0)
    convs0, convs1 = r["ops_before"].get("Conv", 0), r["ops_after"].get("Conv", 0)
    lines.append(f"graph: Add {adds0} -> {adds1}, Conv {convs0} -> {convs1}")
    o = r["options"]
    fits = r["refit"]
    lines.append(f"re-fit: {len(fits)} layer(s) by ridge least squares (ridge {o['ridge']:g} relative to the "
                 f"mean squared column norm, towards the rewritten weights; scope {o['scope']}), in graph order "
                 f"on the rewritten network's activations")
    if fits:
        w = min(90, max(len(f["layer"]) for f in fits))
        lines.append(f"  {'layer':<{w}} {'rows':>7} {'cols':>5}  {'rel.err before':>14}  {'after':>9}  fitted to")
        for f in fits:
            lines.append(f"  {f['layer'][-w:]:<{w}} {f['rows']:>7} {f['cols']:>5}  {f['rel_error_before']:>14.3e}  "
                         f"{f['rel_error_after']:>9.3e}  {f['target_kind']}")
        lines.append("  (rel.err: layer residual / spread of its target, with the rewritten weights and after the "
                     "re-fit, on the rewritten network's inputs)")
    lines.append("fidelity of the logits vs the original model:")
    lines.append(f"  {'set':<12} {'n':>4}  {'':<14} {'max abs':>10} {'mean abs':>10} {'top-1 agree':>12}")
    for sname, row in r["fidelity"].items():
        for when, label in (("before_refit", "before re-fit"), ("after_refit", "after re-fit")):
            m = row[when]
            bad = f"  ({m['nonfinite']} sample(s) with non-finite logits)" if m.get("nonfinite") else ""
            set_name = sname.replace("heldout", "held-out")
            lines.append(f"  {set_name:<12} {row['n']:>4}  {label:<14} {_fmt(m['max_abs']):>10} "
                         f"{_fmt(m['mean_abs']):>10} {m['top1_agree'] * 100:>11.1f}%{bad}")
    std = next(iter(r["fidelity"].values()))["logit_std"]
    lines.append(f"  (logit standard deviation of the original model on the calibration set: {std:.3e})")
    return "\n".join(lines) + "\n"
