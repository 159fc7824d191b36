"""Pictures of where an encrypted inference spends its time (``hecompile inspect M.hec --plot cost.png``).

:func:`layer_costs` prices every instruction with the cost model the planner used
(:func:`hecompiler.costmodel.instr_cost`: measured op latencies at the level each op runs) and
groups them by the graph node they implement, in program order.  :func:`plot_cost` draws:

1. per layer, the predicted seconds stacked by kind: rotations (key switching), ct-pt
   multiplications, plaintext encoding (generating diagonals from the compact weights and
   encoding them), refresh (client-aided round trip or bootstrap, as the target does it) and the
   rest (additions, rescales, ct-ct multiplications, mod switches);
2. the level of the ciphertexts along the network, instruction by instruction inside each layer,
   with every refresh marked;
3. given a ``hecompile run --json`` result (``--plot-run``): predicted against measured seconds
   by instruction kind, the plaintext-encoding share, and the whole evaluation.  A run's JSON
   has no per-layer times, so the measured side is by kind; a ``per_node`` field, when present,
   is drawn per layer on panel 1.

matplotlib (Agg, no display) is an optional dependency: ``pip install 'hecompiler[plot]'``.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping

from .errors import HecError

KINDS = [("rotate", "rotations", "#1f77b4"), ("mul_plain", "ct-pt mults", "#ff7f0e"),
         ("encode", "encoding plaintexts", "#2ca02c"), ("refresh", "refresh / bootstrap", "#d62728"),
         ("other", "other (add, rescale, ct-ct mult, ...)", "#9467bd")]


_QUIET_OPS = ("Conv", "Gemm", "MatMul", "GlobalAveragePool", "AveragePool", "Add_1", "Mul", "BatchNormalization")


def short_name(note: str) -> str:
    """A layer's label: ``/layer1/layer1.0/conv1/Conv_output_0`` -> ``layer1.0/conv1``,
    ``/layer1/layer1.0/Add_output_0`` -> ``layer1.0/Add``, ``/relu/Add_1_output_0`` -> ``relu``."""
    parts = [q for q in note.replace("_output_0", "").split("/") if q]
    if not parts:
        return note or "?"
    parts = [q for i, q in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(q))]
    if len(parts) >= 2 and parts[-1][:1].isupper():
        op, rest = parts[-1], parts[:-1]
        return "/".join(rest[-2:] if op.startswith(_QUIET_OPS) else rest[-1:] + [op])
    return "/".join(parts[-2:])


def layer_costs(prog, model=None) -> list[dict[str, Any]]:
    """One entry per graph node in program order: ``node``, ``label``, seconds by kind (``rotate``,
    ``mul_plain``, ``encode``, ``refresh``, ``other``, ``total``), ``levels`` (the level after each of
    its instructions), ``refreshes`` (indices into ``levels``), ``instructions``."""
    from .costmodel import CostModel, instr_cost

    model = model or CostModel()
    groups: dict[str, dict[str, Any]] = {}
    order: list[dict[str, Any]] = []
    rc = model.refresh
    par = rc.bootstrap_parallel_s if rc.bootstraps and rc.bootstrap_s is not None else None
    instrs = prog.instrs
    for k, ins in enumerate(instrs):
        g = groups.get(ins.note)
        if g is None:
            g = {"node": ins.note, "label": short_name(ins.note), "rotate": 0.0, "mul_plain": 0.0, "encode": 0.0,
                 "refresh": 0.0, "other": 0.0, "levels": [], "refreshes": [], "instructions": 0, "ops": {}}
            groups[ins.note] = g
            order.append(g)
        by, enc, _ = instr_cost(ins, prog, model)
        for op, t in by.items():
            g[op if op in ("rotate", "mul_plain", "refresh") else "other"] += t
        g["encode"] += enc
        if ins.op == "refresh":
            g["refreshes"].append(len(g["levels"]))
            first = k == 0 or instrs[k - 1].op != "refresh"
            if not rc.bootstraps and first:  # one round trip per batch, as program_cost prices it
                g["refresh"] += rc.round_trip_s
            batch = (not first) or (k + 1 < len(instrs) and instrs[k + 1].op == "refresh")
            if par is not None and batch:  # a batch of bootstraps runs on every core at once
                g["refresh"] -= rc.bootstrap_s - par
        g["levels"].append(ins.level)
        g["instructions"] += 1
        g["ops"][ins.op] = g["ops"].get(ins.op, 0) + 1
    for g in order:
        g["total"] = sum(g[k] for k, _, _ in KINDS)
    return order


def _by_instruction_kind(prog, model) -> tuple[dict[str, float], float]:
    """Predicted seconds by instruction op (a linear macro under ``linear``, encoding included) and
    the predicted encoding share."""
    from .costmodel import instr_cost

    out: dict[str, float] = {}
    enc_total = 0.0
    for ins in prog.instrs:
        by, enc, _ = instr_cost(ins, prog, model)
        out[ins.op] = out.get(ins.op, 0.0) + sum(by.values()) + enc
        enc_total += enc
    refresh = sum(g["refresh"] for g in layer_costs(prog, model))
    if refresh:
        out["refresh"] = refresh
    return out, enc_total


def cost_model_of(meta: Mapping[str, Any] | None):
    """The cost model of the target the program was compiled for (SEAL's table by default)."""
    from .costmodel import CostModel

    try:
        from .target import target_of

        t = target_of(dict(meta or {}))
        if t.backend != "seal":
            return t.cost_model()
    except (ImportError, HecError, KeyError, ValueError):
        pass
    return CostModel()


def _load_run(path: str) -> dict:
    import json

    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise HecError(f"--plot-run {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise HecError(f"--plot-run {path}: not a JSON file ({type(e).__name__}); give what "
                       f"'hecompile run ... --json' prints") from None
    if not isinstance(d, dict) or not isinstance(d.get("seconds_by_op"), dict):
        raise HecError(f"--plot-run {path}: no 'seconds_by_op' field; give what 'hecompile run ... --json' prints")
    return d


def plot_cost(prog, meta: Mapping[str, Any] | None, run: Mapping[str, Any] | str | None = None,
              title: str | None = None, model=None) -> bytes:
    """The PNG (bytes) described in the module doc."""
    try:
        import matplotlib
    except ImportError:
        raise HecError("--plot needs matplotlib: pip install 'hecompiler[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    model = model or cost_model_of(meta)
    if isinstance(run, str):
        run = _load_run(run)
    layers = layer_costs(prog, model)
    n = len(layers)
    p = prog.params
    meta = meta or {}
    total = sum(g["total"] for g in layers)
    panels = 3 if run else 2
    width = min(40.0, max(12.0, 0.32 * n + 4.0))
    heights = [3.2, 1.6, 2.6][:panels]
    fig, axes = plt.subplots(panels, 1, figsize=(width, sum(heights) + 2.6), layout="constrained",
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes = axes[:, 0]
    ax = axes[0]
    x = np.arange(n)
    bottom = np.zeros(n)
    for key, label, color in KINDS:
        vals = np.array([g[key] for g in layers])
        if not vals.any():
            continue
        ax.bar(x, vals, 0.8, bottom=bottom, label=f"{label} ({vals.sum():.2f} s)", color=color)
        bottom += vals
    measured_nodes = (run or {}).get("per_node") or (run or {}).get("seconds_per_node")
    if isinstance(measured_nodes, dict) and measured_nodes:
        mv = [float(measured_nodes.get(g["node"], np.nan)) for g in layers]
        ax.plot(x, mv, "kD", markersize=4, label="measured (run --json)")
    ax.set_ylabel("predicted seconds")
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xticks(x)
    ax.set_xticklabels([])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    src = model.describe_source() if hasattr(model, "describe_source") else ""
    name = os.path.basename(str(meta.get("source_model") or "")) or "program"
    fig.suptitle(title or (f"{name}: predicted encrypted inference {total:.2f} s on one core "
                           f"(N={p.poly_degree}, {p.top_level} levels, {sum(len(g['refreshes']) for g in layers)} "
                           f"refreshes)"), fontsize=12)

    # ---- level along the network
    lx = axes[1]
    xs, ys, rx, ry = [-0.5], [p.top_level], [], []  # the inputs arrive fresh, at the top level
    for i, g in enumerate(layers):
        k = len(g["levels"])
        pos = [i - 0.4 + 0.8 * (j + 0.5) / k for j in range(k)]
        xs += pos
        ys += g["levels"]
        for j in g["refreshes"]:
            rx.append(pos[j])
            ry.append(g["levels"][j])
    lx.step(xs, ys, where="post", color="0.2", linewidth=1.2, label="level after each instruction")
    if rx:
        lx.plot(rx, ry, "v", color="#d62728", markersize=7,
                label="refresh (" + ("bootstrap" if (meta.get("report") or {}).get("refresh_model", {}).get("kind")
                                     == "bootstrap" else "client-aided") + ")")
    lx.set_ylim(-0.5, p.top_level + 0.7)
    lx.set_yticks(range(p.top_level + 1))
    lx.set_ylabel("level")
    lx.set_xlim(-0.6, n - 0.4)
    lx.set_xticks(x)
    lx.set_xticklabels([g["label"] for g in layers], rotation=60, ha="right", fontsize=7 if n > 30 else 8)
    lx.grid(axis="y", alpha=0.3)
    lx.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)

    # ---- predicted vs measured
    if run:
        rax = axes[2]
        pred, pred_enc = _by_instruction_kind(prog, model)
        meas = {k: float(v) for k, v in (run.get("seconds_by_op") or {}).items()}
        kinds = sorted(set(pred) | set(meas), key=lambda k: -max(pred.get(k, 0.0), meas.get(k, 0.0)))
        names = {"linear": "linear ops\n(conv, pool,\ndense)", "mul": "ct-ct\nmult", "refresh": "refresh",
                 "rescale": "rescale", "add_plain": "add\nplain", "add": "add", "rotate": "rotate",
                 "mod_switch": "mod\nswitch", "mul_plain": "ct-pt\nmult", "sub": "sub", "negate": "negate"}
        labels = [names.get(k, k) for k in kinds] + ["(of which)\nencoding", "whole\nevaluation"]
        pv = [pred.get(k, 0.0) for k in kinds] + [pred_enc, sum(pred.values())]
        secs = run.get("seconds") or {}
        mtotal = secs.get("eval") if secs.get("eval") is not None else sum(meas.values())
        mv = [meas.get(k, 0.0) for k in kinds] + [float(run.get("encode_seconds") or 0.0), float(mtotal or 0.0)]
        xx = np.arange(len(labels))
        rax.bar(xx - 0.2, pv, 0.4, label="predicted", color="#7f7f7f")
        rax.bar(xx + 0.2, mv, 0.4, label=f"measured ({run.get('backend', 'run')})", color="#17becf")
        for xi, a, b in zip(xx, pv, mv):
            if a > 0 and b > 0:
                rax.text(xi, max(a, b), f"{b / a:.2f}x", ha="center", va="bottom", fontsize=7)
        rax.set_xticks(xx)
        rax.set_xticklabels(labels, fontsize=8)
        rax.set_ylabel("seconds")
        rax.set_yscale("symlog", linthresh=1e-3)
        rax.set_ylim(0, max(pv + mv + [1e-3]) * 4)
        rax.grid(axis="y", alpha=0.3)
        rax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        rax.set_title("predicted vs measured by instruction kind (ratio = measured / predicted); client refresh time "
                      "is measured in one process", fontsize=9)
    if src:
        fig.get_layout_engine().set(h_pad=0.08)
        fig.supxlabel(f"cost table: {src}", fontsize=7, color="0.4", x=0.005, ha="left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
