"""``dirac``: residual blocks -> plain chains of Dirac convs (approximating architecture rewrite).

In each residual block ``act(conv2(act(conv1(x))) + x)`` with an identity
skip, the skip Add is removed and an identity is folded into every conv of
the block (``W -> W + I``: 1 at the centre tap of kernel ``(o, o)``, as
``torch.nn.init.dirac_``); run after ``fold-bn``, so the convs carry their
BatchNorm.  The block becomes ``act(conv2'(act(conv1'(x))))``: the DiracNet
parameterisation (Zagoruyko & Komodakis 2017), where the short skip lives in
the kernels and costs nothing under HE.  The last conv takes over the name of
the removed Add's result (it stands where the pre-activation ``conv2 + x``
was), which is what the re-fit (:mod:`hecompiler.refit`) uses as its target.

This changes the function (``act`` is not linear): re-fit the weights on
calibration data afterwards (``hecompile rewrite``,
:func:`hecompiler.arch_rewrite.rewrite_model`).

Other blocks:

* projection (downsampling) blocks whose convs all keep the channel count
  (e.g. a stride-2 block of constant width): the 1x1 shortcut conv is
  removed and replaced by the Dirac identity in the convs (in a stride-s
  conv it picks every s-th pixel, the samples a 1x1 stride-s shortcut reads);
* projection blocks that change the channel count (every ResNet stage
  transition, 16->32 and 32->64 in ResNet-20) are left as they are: an
  identity cannot map C channels to 2C; their Add and shortcut stay;
* long-skip blocks (skip from an earlier tensor, as ``shared-source`` leaves
  them): the Dirac identity is folded into the convs (the short skip) and the
  Add with the long skip stays;
* blocks with a grouped conv or an even kernel are left unchanged.

Each change is recorded in ``ctx.options["arch_rewrite"]`` for the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hecompiler.arch_rewrite import RECORD_KEY, ResidualBlock, find_blocks
from hecompiler.ir import Graph, Node
from hecompiler.passmanager import Pass, PassResult, register_pass


def dirac_delta(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """The identity kernel of a ``[C, C, kh, kw]`` conv weight (1 at the centre tap of (o, o))."""
    c, ci, kh, kw = shape
    d = np.zeros(shape, dtype)
    n = min(c, ci)
    d[np.arange(n), np.arange(n), kh // 2, kw // 2] = 1
    return d


def fold_identity(graph: Graph, conv: Node) -> None:
    """``conv``'s weight W -> W + I (a new constant ``<name>.dirac``)."""
    w = conv.inputs[1]
    data = w.data.astype(np.float64) + dirac_delta(w.shape, np.float64)
    new = graph.add_constant(data.astype(w.data.dtype), w.name + ".dirac")
    conv.set_input(1, new)
    if not w.uses and w.name in graph.constants:
        graph.remove_constant(w)


def _why_not(b: ResidualBlock) -> str | None:
    for c in b.convs:
        kh, kw = c.inputs[1].shape[2:]
        if c.attrs["group"] != 1:
            return f"{c.label} is grouped"
        if kh % 2 == 0 or kw % 2 == 0:
            return f"{c.label} has an even kernel {kh}x{kw}"
    if not b.channels_match():
        cin, cout = b.input.shape[1], b.output.shape[1]
        if cin != cout:
            return f"channels change {cin}->{cout}: an identity cannot realise the projection shortcut"
        chain = "->".join(str(c.inputs[0].shape[1]) for c in b.convs) + f"->{cout}"
        return f"its convs change channels ({chain}): an identity fits only a conv from C to C channels"
    return None


def rewrite_block(graph: Graph, b: ResidualBlock) -> str:
    """Apply the Dirac rewrite to one block; returns what was done."""
    for c in b.convs:
        fold_identity(graph, c)
    convs = "+".join(c.name.rsplit("/", 2)[-2] if "/" in c.name else c.output.name for c in b.convs)
    if b.kind == "long":
        return f"identity folded into {convs}; long skip from %{b.skip.name} kept"
    last, add = b.convs[-1], b.add
    name = add.output.name
    graph.replace_all_uses(add.output, last.output)
    graph.remove_node(add)
    if b.projection is not None:
        w = [v for v in b.projection.inputs[1:] if v.is_constant]
        graph.remove_node(b.projection)
        for v in w:
            if not v.uses and v.name in graph.constants:
                graph.remove_constant(v)
    graph.rename(last.output, name)
    what = "projection shortcut removed" if b.kind == "projection" else "skip Add removed"
    return f"{what}, identity folded into {convs} (plain chain)"


@register_pass
@dataclass(frozen=True)
class DiracRewrite(Pass):
    name = "dirac"
    summary = "residual blocks -> plain chains of Dirac convs W+I (changes the function: re-fit afterwards)"
    exact = False

    def run(self, graph, ctx):
        blocks = find_blocks(graph)  # all detected before any change
        record = ctx.options.setdefault(RECORD_KEY, [])
        notes = []
        n = 0
        for b in blocks:
            why = _why_not(b)
            label = b.name
            if why is not None:
                note = f"{label}: {b.kind} block kept ({why})"
                changed = False
            else:
                note = f"{label}: {rewrite_block(graph, b)}"
                changed = True
                n += 1
            notes.append(note)
            record.append({"pass": self.name, "block": label, "kind": b.kind, "changed": changed, "note": note})
        if not blocks:
            note = "no residual blocks found"
            notes.append(note)
            record.append({"pass": self.name, "block": None, "kind": None, "changed": False, "note": note})
        return PassResult(n > 0, notes)
