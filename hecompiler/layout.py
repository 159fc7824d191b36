"""Slot layouts: which tensor element sits in which slot of which ciphertext.

A tensor of shape (C, H, W) (batch 1; a vector of F features is (F, 1, 1)) is
packed into ``n_ct`` ciphertexts of ``slots`` slots each.  Think of the
ciphertexts laid end to end as one long *virtual slot space*; element
(c, h, w) sits at virtual position::

    P(c, h, w) = pos[c] + h * hs + w * ws,   ciphertext P // slots, slot P % slots

All other slots hold exact zeros.  This family covers the layouts the planner
chooses between (HElayers calls them tile tensors; Lee et al. call the dense
strided case multiplexed packing):

* ``compact``: channels one after another, each a row-major H x W block
  (``hs = W, ws = 1``);
* ``gapped``: after a stride-s convolution the output keeps the input's grid,
  so ``hs`` and ``ws`` grow by s and the holes stay empty;
* ``multiplexed``: like gapped, but the holes are filled with other channels,
  s*s channels sharing one footprint, so density stays as high as compact;
* ``polyphase`` (``phase`` k > 1): the image is split into its k*k phases, element
  (c, h, w) belonging to *virtual channel* (c, h % k, w % k) of a (C k^2, H/k, W/k)
  tensor, and ``pos`` is indexed by virtual channel::

      P(c, h, w) = pos[(c*k + h%k)*k + w%k] + (h//k) * hs + (w//k) * ws

  A stride-s convolution from phase k to phase k/s is then a stride-1 convolution of
  the virtual tensors (its diagonals independent of the position), and its output is as
  dense as its input: no gaps to fill and no compaction after a strided layer.

Gapped and multiplexed layouts keep every convolution a matrix whose
diagonals do not depend on (h, w), which is what makes it cheap in
rotations.  A channel footprint never straddles two ciphertexts when it fits
in one (footprints are placed per ciphertext), so most ops see a block
matrix with few non-zero blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from .arrays import distinct
from .errors import LoweringError


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, int, int]  # C, H, W
    slots: int
    n_ct: int
    pos: tuple[int, ...]  # virtual position of element (c, 0, 0)
    hs: int
    ws: int
    kind: str = "compact"  # compact | gapped | multiplexed | padded | polyphase | vector | spread | ...
    gap: int = 1  # spatial interleave factor (1 for compact)
    grid: tuple[int, int] = (0, 0)  # footprint (H0, W0) of one channel group, for derived layouts
    per_fp: int = 1  # channels sharing one footprint
    #: a batch of B images stacked along the channels (batch-to-channels: channel b*C + c is
    #: image b's channel c) is placed channel-major: the footprints (each holding ``per_fp``
    #: channels of one image) go in the order (channel group, image), so every image's channel c
    #: sits at the same offset from its channel c' and a per-image op's diagonals are shared by
    #: the images (the rotations do not grow with B)
    batch: int = 1
    #: polyphase factor k (see the module docstring): ``pos`` has C*k*k entries, one per virtual
    #: channel (c, p, q) in that (c-major) order, and ``hs``/``ws`` step the virtual grid
    phase: int = 1
    #: replicated packing (see :attr:`cyc`): 0, or a power of two below ``slots`` with every
    #: position under it (one ciphertext); the ciphertext then holds its first ``period`` slots
    #: again and again, ``slots / period`` times
    period: int = 0

    # ------------------------------------------------------------------ builders
    @staticmethod
    def compact(shape, slots: int, batch: int = 1) -> "Layout":
        c, h, w = shape
        return Layout.from_grid(shape, slots, grid=(h, w), gap=1, per_footprint=1, kind="compact", batch=batch)

    @staticmethod
    def from_grid(shape, slots: int, grid: tuple[int, int], gap: int, per_footprint: int,
                  kind: str, batch: int = 1) -> "Layout":
        """Channels on footprints of ``grid`` = (H0, W0) base positions with
        interleave ``gap``: channel c uses footprint c // per_footprint and
        sub-position c % per_footprint of the gap x gap cell (with a ``batch``, channel-major:
        see :attr:`batch`)."""
        c, h, w = shape
        if batch < 1 or c % batch:
            batch = 1
        h0, w0 = grid
        if h * gap > h0 or w * gap > w0:
            raise LoweringError(f"layout: {h}x{w} with gap {gap} does not fit grid {h0}x{w0}")
        if not 1 <= per_footprint <= gap * gap:
            raise LoweringError(f"layout: {per_footprint} channels per footprint with gap {gap}")
        n_fp = -(-(c // batch) // per_footprint) * batch
        fp_base = _footprint_bases(n_fp, h0 * w0, slots)
        pos = []
        per_image = c // batch
        for ch in range(c):
            if batch > 1:  # footprint groups of one image's channels, ordered (group, image)
                img, ci = divmod(ch, per_image)
                grp, k = divmod(ci, per_footprint)
                f = grp * batch + img
            else:
                f, k = divmod(ch, per_footprint)
            a, b = divmod(k, gap)
            pos.append(fp_base[f] + a * w0 + b)
        last = max(pos) + (h - 1) * gap * w0 + (w - 1) * gap
        n_ct = last // slots + 1
        return Layout((c, h, w), slots, n_ct, tuple(pos), gap * w0, gap, kind, gap, (h0, w0), per_footprint, batch)

    def strided(self, shape, stride: int, multiplex: bool = True) -> "Layout":
        """The layout a stride-``stride`` conv/pool from this layout writes to
        when its diagonals must not depend on (h, w): same grid, gap times
        ``stride``; holes filled with further channels when ``multiplex``."""
        if self.grid == (0, 0) or self.phase > 1:
            raise LoweringError(f"layout {self.describe()} has no grid to derive a strided layout from")
        gap = self.gap * stride
        c, h, w = shape
        h0, w0 = self.grid
        if h * gap > h0 or w * gap > w0:
            gap = self.gap  # output larger than the grid allows: keep spacing (e.g. pads grow it)
        per_fp = min(gap * gap, c) if multiplex else 1
        kind = "compact" if gap == 1 else ("multiplexed" if per_fp > 1 else "gapped")
        return Layout.from_grid(shape, self.slots, (max(h0, h * gap), max(w0, w * gap)), gap, per_fp, kind,
                                self.batch)

    @staticmethod
    def polyphase(shape, slots: int, k: int, pow2: bool = True) -> "Layout":
        """The k x k phases of every channel as virtual channels of a (C k^2, H/k, W/k) tensor,
        each on its own footprint (the virtual grid, sides rounded up to powers of two when
        ``pow2``), placed phase-major: one ciphertext holds one phase of consecutive channels,
        so a convolution's ciphertext blocks pair a phase with a phase and their diagonals are
        full (every channel offset pairs each output channel with an input channel)."""
        c, h, w = shape
        if k < 1 or h % k or w % k:
            raise LoweringError(f"layout: polyphase factor {k} does not divide {h}x{w}")
        vh, vw = (pow2_ceil(h // k), pow2_ceil(w // k)) if pow2 else (h // k, w // k)
        base = _footprint_bases(c * k * k, vh * vw, slots)  # in phase-major order (p, q, channel)
        pos = [0] * (c * k * k)
        for f, (p, q, ch) in enumerate((p, q, ch) for p in range(k) for q in range(k) for ch in range(c)):
            pos[(ch * k + p) * k + q] = base[f]
        last = max(pos) + (h // k - 1) * vw + (w // k - 1)
        n_ct = last // slots + 1
        kind = "polyphase" if k > 1 else ("compact" if (vh, vw) == (h, w) else "padded")
        return Layout((c, h, w), slots, n_ct, tuple(pos), vw, 1, kind, 1, (vh, vw), 1, 1, k)

    @staticmethod
    def vector(n: int, slots: int) -> "Layout":
        """A flat vector of n features in consecutive slots."""
        return Layout((n, 1, 1), slots, -(-n // slots), tuple(range(n)), 0, 0, "vector", 1, (1, 1), 1)

    @staticmethod
    def spread(n: int, slots: int, stride: int) -> "Layout":
        """A flat vector of ``n <= slots`` features in ``slots / stride`` columns ``stride`` slots
        apart: feature j at slot ``stride * (j mod cols) + j div cols``.  A dense matrix reading
        inputs that lie ``stride`` apart (the sums a global pooling leaves) into it has about
        ``stride`` times fewer distinct diagonals per input ciphertext than into consecutive
        slots (all differences of output and input slots hit every residue there)."""
        cols = slots // stride
        pos = tuple(stride * (j % cols) + j // cols for j in range(n))
        return Layout((n, 1, 1), slots, 1, pos, 0, 0, "spread", 1, (1, 1), 1)

    @staticmethod
    def placed(positions, slots: int) -> "Layout":
        """A flat vector whose feature j sits at virtual position ``positions[j]`` (distinct): a
        dense matrix's outputs put where its inputs were (``hecompiler.lower.matrix_out_layout``)."""
        pos = tuple(int(q) for q in positions)
        lay = Layout((len(pos), 1, 1), slots, max(pos) // slots + 1, pos, 0, 0, "placed", 1, (1, 1), 1)
        lay.check()
        return lay

    def replicated(self) -> "Layout":
        """This layout with the least period its positions allow (a power of two), when that is
        below the slots: a one-ciphertext tensor in 1/2, 1/4... of the slots, held that many times
        over.  Rotations then act modulo the period, so a linear op between two such layouts has
        its diagonals modulo the period (fewer, whose rotations are shorter: ``hecompiler.linear``),
        and the copies cost nothing to keep (element-wise ops apply to them alike)."""
        if self.n_ct != 1 or self.phase > 1 or self.batch > 1:
            return self
        p = pow2_ceil(int(self.positions.max()) + 1)
        return replace(self, period=p if p < self.slots else 0)

    # ------------------------------------------------------------------ derived
    @property
    def cyc(self) -> int:
        """The cyclic length of the slot vector: ``period`` when replicated, else ``slots``.  A
        rotation by k moves slot i to slot (i - k) mod ``cyc`` as far as the data can tell."""
        return self.period or self.slots

    @property
    def size(self) -> int:
        c, h, w = self.shape
        return c * h * w

    @property
    def vshape(self) -> tuple[int, int, int]:
        """The virtual tensor's shape (C k^2, H/k, W/k); the shape itself when k = 1."""
        c, h, w = self.shape
        k = self.phase
        return (c * k * k, h // k, w // k)

    @cached_property
    def positions(self) -> np.ndarray:
        """Virtual position of every element, in (c, h, w) row-major order."""
        c, h, w = self.shape
        k = self.phase
        pos = np.asarray(self.pos, dtype=np.int64)
        if k == 1:
            hh = (np.arange(h, dtype=np.int64) * self.hs)[None, :, None]
            ww = (np.arange(w, dtype=np.int64) * self.ws)[None, None, :]
            return (pos[:, None, None] + hh + ww).reshape(-1)
        hi, wi = np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64)
        v = (np.arange(c, dtype=np.int64)[:, None, None] * k + (hi % k)[None, :, None]) * k + (wi % k)[None, None, :]
        return (pos[v] + ((hi // k) * self.hs)[None, :, None] + ((wi // k) * self.ws)[None, None, :]).reshape(-1)

    def check(self) -> None:
        if self.period and (self.period & (self.period - 1) or not 1 <= self.period < self.slots
                            or self.slots % self.period or self.n_ct != 1):
            raise LoweringError(f"layout {self.describe()}: period {self.period} must be a power of two below "
                                f"{self.slots} slots, in one ciphertext")
        p = self.positions
        if self.period and p.max() >= self.period:
            raise LoweringError(f"layout {self.describe()}: positions reach past its period {self.period}")
        if len(distinct(p)) != len(p):
            raise LoweringError(f"layout {self.describe()}: two elements share a slot")
        if p.min() < 0 or p.max() >= self.n_ct * self.slots:
            raise LoweringError(f"layout {self.describe()}: positions out of range")

    @property
    def density(self) -> float:
        return self.size / (self.n_ct * self.slots)

    @property
    def channel_straddles(self) -> bool:
        """Whether some (virtual) channel's elements span two ciphertexts."""
        c, h, w = self.vshape
        first = np.asarray(self.pos) // self.slots
        last = (np.asarray(self.pos) + (h - 1) * self.hs + (w - 1) * self.ws) // self.slots
        return bool(np.any(first != last))

    def describe(self) -> str:
        c, h, w = self.shape
        g = f" gap {self.gap}" if self.gap > 1 else ""
        b = f" ({self.batch} images channel-major)" if self.batch > 1 else ""
        g += f" k={self.phase}" if self.phase > 1 else ""
        if self.period:
            return (f"{self.kind}{g} {c}x{h}x{w}{b} in {self.n_ct} ct, {self.slots // self.period}x replicated "
                    f"({100 * self.size / self.period:.0f}% of its period {self.period})")
        return f"{self.kind}{g} {c}x{h}x{w}{b} in {self.n_ct} ct ({100 * self.density:.0f}% full)"

    # ------------------------------------------------------------------ packing
    def pack(self, tensor: np.ndarray) -> np.ndarray:
        """(C, H, W)-shaped data (any shape with that many elements) to an
        ``[n_ct, slots]`` array of slot values."""
        flat = np.asarray(tensor, dtype=np.float64).reshape(-1)
        if flat.size != self.size:
            raise LoweringError(f"layout {self.describe()}: cannot pack {flat.size} values")
        out = np.zeros(self.n_ct * self.slots)
        out[self.positions] = flat
        if self.period:
            out = np.tile(out[: self.period], self.slots // self.period)
        return out.reshape(self.n_ct, self.slots)

    def unpack(self, cts: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`pack`: ``[n_ct, slots]`` to a (C, H, W) array."""
        return np.asarray(cts).reshape(-1)[self.positions].reshape(self.shape)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = {"shape": list(self.shape), "slots": self.slots, "n_ct": self.n_ct, "pos": list(self.pos),
             "hs": self.hs, "ws": self.ws, "kind": self.kind, "gap": self.gap, "grid": list(self.grid),
             "per_fp": self.per_fp}
        if self.batch > 1:
            d["batch"] = self.batch
        if self.phase > 1:
            d["phase"] = self.phase
        if self.period:
            d["period"] = self.period
        return d

    @staticmethod
    def from_dict(d: dict) -> "Layout":
        lay = Layout(tuple(int(x) for x in d["shape"]), int(d["slots"]), int(d["n_ct"]),
                     tuple(int(x) for x in d["pos"]), int(d["hs"]), int(d["ws"]), str(d["kind"]), int(d["gap"]),
                     tuple(int(x) for x in d["grid"]), int(d["per_fp"]), int(d.get("batch", 1)),
                     int(d.get("phase", 1)), int(d.get("period", 0)))
        c, h, w = lay.shape
        k = lay.phase
        if k < 1 or h % k or w % k or len(lay.pos) != c * k * k:
            raise LoweringError(f"layout {lay.describe()}: polyphase factor {k} does not fit its shape "
                                f"and {len(lay.pos)} channel positions")
        lay.check()
        return lay


def pow2_ceil(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def _footprint_bases(n_fp: int, fsize: int, slots: int) -> list[int]:
    """Virtual positions of ``n_fp`` footprints of ``fsize`` slots: as many per ciphertext as fit,
    none straddling two; a footprint larger than a ciphertext spans several, end to end."""
    if fsize <= slots:
        per_ct = slots // fsize
        return [(f // per_ct) * slots + (f % per_ct) * fsize for f in range(n_fp)]
    return [f * fsize for f in range(n_fp)]


def chw(shape: tuple[int, ...], fold_batch: bool = False) -> tuple[int, int, int]:
    """The (C, H, W) view of a batch-1 tensor shape.  With ``fold_batch`` a batch of B is the
    same elements as one tensor of B times the channels (the graph's inputs and outputs after
    the ``batch-to-channels`` pass, which stacks every value in between)."""
    if fold_batch and len(shape) >= 2 and shape[0] > 1:
        shape = (1, shape[0] * shape[1], *shape[2:])
    if not shape or shape[0] != 1:
        raise LoweringError(f"tensor shape {list(shape)}: HE lowering needs batch size 1")
    rest = shape[1:]
    if len(rest) == 3:
        return tuple(rest)
    if len(rest) == 1:
        return (rest[0], 1, 1)
    if len(rest) == 2:
        return (rest[0], rest[1], 1)
    if len(rest) == 0:
        return (1, 1, 1)
    raise LoweringError(f"tensor shape {list(shape)}: rank {len(shape)} is not supported by HE lowering")
