"""Layout strategies: where the lowering puts each tensor's elements, as a choice the planner
searches.

A strategy answers two questions the lowering asks (everything else, conversions included, is
the lowering's):

* ``input_layout(shape, slots, batch)``: the layout of a graph input (what the client packs);
* ``output_layout(lin_in, out_shape, stride, partner)``: the layout a convolution or pooling
  writes, given its input's layout, its stride, and the layout of the tensor its result will be
  added to (``partner``, when an Add consumes it alone and the other operand is lowered: writing
  there saves a conversion).

Strategies (``STRATEGIES``; ``--layout`` picks one, else the planner tries them all at the chosen
parameters and keeps the cheapest):

* ``multiplexed`` (the default rule): channels row-major on the image's own grid; a strided op
  keeps the grid with gaps, filled with further channels (Lee et al.'s multiplexed packing, as
  dense as compact), so every convolution's diagonals are independent of (h, w);
* ``gapped``: the same without filling the gaps (fewer, emptier ciphertexts' worth of layouts);
* ``aligned``: as ``multiplexed`` on a grid whose sides are rounded up to powers of two, so a
  channel footprint is a power of two: footprints tile the ciphertexts exactly (none straddles
  two when it fits one; rows never straddle), and channel offsets in a ciphertext are multiples
  of the footprint, so the diagonals of different channel pairs coincide (a ciphertext's block
  of a convolution has as few diagonals as it has channel offsets, each full) at the price of
  the padding (for 28x28 images 784 of 1024 slots hold data);
* ``polyphase``: as ``aligned``, but a graph input is packed in k x k phases (``Layout.polyphase``),
  k the decimation its strided layers will apply (32 for a ResNet at 224x224: 224 = 7 * 32), each
  phase of a channel a virtual channel of the (H/k, W/k) grid, and a stride-s layer writes phase
  k/s.  Every tensor is then as dense as a compact one at its own resolution, with no gaps: the
  re-gridding after strided layers costs nothing, because the client did it when it packed the
  input.  Where a stride does not divide the phase (or the shape), the layer writes phase 1 and
  the rule of ``aligned`` takes over;
* ``polyphase:K`` (K a power of two below an input's decimation; the planner tries each, see
  :func:`phase_bounds`): as ``polyphase`` with at most K x K phases.  After the strided layers that
  use the phases up, tensors are compact (one phase) and the rule of ``aligned`` takes over.
  Fewer phases hold more of a channel per ciphertext, so a convolution's blocks have fewer
  diagonals and need fewer rotations; but a phase-major ciphertext's diagonals repeat across the
  phases (one plaintext serves every ciphertext pair with the same channel offset), and fewer
  phases encode more distinct plaintexts.  ResNet-18 at 224x224 in 4096 slots (client-aided SEAL,
  predicted): K=32 (``polyphase``) 14,437 rotations and 297,588 encodings, 460 s; K=8 7,942 and
  about 2x the encodings, 800 s, with every convolution within 1.2x of 2*sqrt(#diagonals).
  ResNet-20 (32x32, decimation 4) is faster with K=2 than with either 4 x 4 phases or none;
* ``replicated``: as ``multiplexed``, and a one-ciphertext tensor that fills half the slots or
  less is held several times over (:meth:`Layout.replicated`: period p, the least power of two
  holding it).  After ResNet-20's strided layers, 64x8x8 in 2^14 slots repeats every 4096: its
  convolutions' diagonals are taken mod 4096 (900 instead of 1575 for layer 3's; baby and giant
  steps within +-2048), and a layer that makes a more replicated result pays one rotation and
  one addition per halving (no level).  A bootstrap errs more on copies than on zero padding (the
  slots' mean is no longer divided by the padding; backends/sim.py models it).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

from .errors import HecError
from .layout import Layout, pow2_ceil

#: ops that divide the resolution by their stride, and ops after which the spatial structure is
#: gone (a polyphase layout flows through every other op: element-wise, activations, Add)
_SPATIAL_STRIDED = ("Conv", "AveragePool", "MaxPool")
_RESHAPING = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Pad", "Concat", "Gemm", "MatMul",
              "GlobalAveragePool", "ReduceSum", "ReduceMean")


def decimation(graph) -> dict[str, int]:
    """For every value of ``graph``, the product of the strides its strided consumers apply
    downstream (the largest over its paths) until the spatial structure ends (a global pool, a
    reshape, a Gemm): the polyphase factor that keeps every strided layer's output whole."""
    need: dict[str, int] = {}
    for node in reversed(list(graph.nodes)):
        for out in node.outputs:
            need.setdefault(out.name, 1)
        down = max((need.get(o.name, 1) for o in node.outputs), default=1)
        if node.op in _SPATIAL_STRIDED:
            st = tuple(node.attr("strides", (1, 1)) or (1, 1))
            f = st[0] * down if len(st) == 2 and st[0] == st[1] else 1
        elif node.op in _RESHAPING:
            f = 1
        else:
            f = down
        for v in node.inputs:
            if not v.is_constant:
                need[v.name] = max(need.get(v.name, 1), f)
    return need


def phase_bounds(graph) -> list[int]:
    """The phase bounds K worth trying as ``polyphase:K`` for ``graph``: the powers of two from 2
    below the largest decimation of a graph input (``polyphase`` itself takes all of it)."""
    dec = decimation(graph)
    top = max((dec.get(v.name, 1) for v in graph.inputs), default=1)
    return [1 << e for e in range(1, max(top.bit_length() - 1, 1)) if (1 << e) < top]


@dataclass(frozen=True)
class LayoutStrategy:
    name: str = "multiplexed"
    multiplex: bool = True  # fill the gaps of strided layouts with channels
    pow2_grid: bool = False  # round the grid's sides up to powers of two
    polyphase: bool = False  # pack inputs in phases of their decimation (Layout.polyphase)
    replicate: bool = False  # hold small one-ciphertext tensors several times (Layout.replicated)
    max_phase: int = 0  # with polyphase: at most this many phases per side (0: the decimation's)

    def _rep(self, lay: Layout) -> Layout:
        return lay.replicated() if self.replicate else lay

    def grid(self, h: int, w: int) -> tuple[int, int]:
        if not self.pow2_grid:
            return (h, w)
        return (pow2_ceil(h), pow2_ceil(w))

    def input_layout(self, shape, slots: int, batch: int = 1, decimation: int = 1) -> Layout:
        c, h, w = shape
        if self.polyphase and batch == 1:
            k = gcd(decimation, gcd(h, w))
            if self.max_phase:
                k = gcd(k, self.max_phase)
            if k > 1:
                return Layout.polyphase(shape, slots, k, self.pow2_grid)
        g = self.grid(h, w)
        return self._rep(Layout.from_grid(shape, slots, g, 1, 1, "compact" if g == (h, w) else "padded", batch))

    def output_layout(self, lin_in: Layout, out_shape, stride: int, partner: Layout | None = None) -> Layout:
        if partner is not None and partner.shape == out_shape:
            return partner
        if lin_in.grid == (0, 0):  # a vector or a flattened tensor: no grid to derive from
            return self.input_layout(out_shape, lin_in.slots, lin_in.batch)
        if lin_in.phase > 1:
            c, h, w = out_shape
            k = lin_in.phase // stride if lin_in.phase % stride == 0 else 1
            if h % k or w % k:
                k = 1
            return Layout.polyphase(out_shape, lin_in.slots, k, self.pow2_grid)
        return self._rep(lin_in.strided(out_shape, stride, self.multiplex))


STRATEGIES: dict[str, LayoutStrategy] = {
    "multiplexed": LayoutStrategy("multiplexed"),
    "gapped": LayoutStrategy("gapped", multiplex=False),
    "aligned": LayoutStrategy("aligned", pow2_grid=True),
    "polyphase": LayoutStrategy("polyphase", pow2_grid=True, polyphase=True),
    "replicated": LayoutStrategy("replicated", replicate=True),
}


def get_strategy(name: str | LayoutStrategy | None) -> LayoutStrategy:
    """The strategy called ``name``: one of :data:`STRATEGIES`, or ``polyphase:K`` (at most K x K
    phases, K a power of two >= 2)."""
    if isinstance(name, LayoutStrategy):
        return name
    if name is None:
        return STRATEGIES["multiplexed"]
    if name in STRATEGIES:
        return STRATEGIES[name]
    base, sep, arg = name.partition(":")
    if base == "polyphase" and sep:
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if k < 2 or k & (k - 1):
            raise HecError(f"--layout {name!r}: the phase bound K of polyphase:K must be a power of two >= 2")
        return LayoutStrategy(f"polyphase:{k}", pow2_grid=True, polyphase=True, max_phase=k)
    raise HecError(f"--layout {name!r}: expected one of {', '.join(STRATEGIES)}, or polyphase:K "
                   f"(K a power of two)") from None
