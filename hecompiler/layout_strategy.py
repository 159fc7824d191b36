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
  the padding (for 28x28 images 784 of 1024 slots hold data).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import HecError
from .layout import Layout


@dataclass(frozen=True)
class LayoutStrategy:
    name: str = "multiplexed"
    multiplex: bool = True  # fill the gaps of strided layouts with channels
    pow2_grid: bool = False  # round the grid's sides up to powers of two

    def grid(self, h: int, w: int) -> tuple[int, int]:
        if not self.pow2_grid:
            return (h, w)
        return (1 << max(0, (h - 1).bit_length()), 1 << max(0, (w - 1).bit_length()))

    def input_layout(self, shape, slots: int, batch: int = 1) -> Layout:
        c, h, w = shape
        g = self.grid(h, w)
        return Layout.from_grid(shape, slots, g, 1, 1, "compact" if g == (h, w) else "padded", batch)

    def output_layout(self, lin_in: Layout, out_shape, stride: int, partner: Layout | None = None) -> Layout:
        if partner is not None and partner.shape == out_shape:
            return partner
        if lin_in.grid == (0, 0):  # a vector or a flattened tensor: no grid to derive from
            return self.input_layout(out_shape, lin_in.slots, lin_in.batch)
        return lin_in.strided(out_shape, stride, self.multiplex)


STRATEGIES: dict[str, LayoutStrategy] = {
    "multiplexed": LayoutStrategy("multiplexed"),
    "gapped": LayoutStrategy("gapped", multiplex=False),
    "aligned": LayoutStrategy("aligned", pow2_grid=True),
}


def get_strategy(name: str | LayoutStrategy | None) -> LayoutStrategy:
    if isinstance(name, LayoutStrategy):
        return name
    if name is None:
        return STRATEGIES["multiplexed"]
    try:
        return STRATEGIES[name]
    except KeyError:
        raise HecError(f"--layout {name!r}: expected one of {', '.join(STRATEGIES)}") from None
