"""Would HElayers-style tile shapes over (C, H, W) make a convolution cheaper than the layouts the
planner already searches?  (Issue 12 asks for tile shapes chosen per tensor; this measures whether
any would ever be chosen by the diagonal method.)

    python benchmarks/tiles.py

For each convolution below (random weights: only the sparsity matters), the ct-pt products (the
distinct slot differences of the matrix's entries per pair of input and output ciphertexts: its
diagonals) and the baby-step/giant-step rotations (``hecompiler.linear.plan_bsgs``, as the lowering
plans them) under:

* the layouts of hecompiler's strategies (``hecompiler.layout_strategy.STRATEGIES``: a channel's
  footprint whole in one ciphertext when it fits, else rows end to end; ``polyphase`` where the
  network's strides give a decimation);
* every tile shape (tc, th, tw) of powers of two with tc * th * tw = slots over the tensor padded
  to multiples of the tile: element (c, h, w) in tile (c // tc, h // th, w // tw), at slot
  (c % tc) * th * tw + (h % th) * tw + w % tw (HElayers' tile tensors, without duplication).

``full`` is the product count if every diagonal were full: multiply-accumulates / slots.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hecompiler.heprog import LinearOp  # noqa: E402
from hecompiler.layout_strategy import STRATEGIES  # noqa: E402
from hecompiler.linear import plan_bsgs, tensor_matrix  # noqa: E402

#: (name, channels, height/width, slots, polyphase factor the network's strides would give)
CASES = [
    ("CIFAR ResNet layer1 (16x32x32)", 16, 32, 4096, 4),
    ("CIFAR ResNet layer3 (64x8x8)", 64, 8, 4096, 1),
    ("ResNet-18 layer1 shape, 16 channels (16x56x56)", 16, 56, 4096, 8),
    ("large image, stride 1 (8x128x128)", 8, 128, 4096, 1),
]


def conv(c: int, hw: int) -> tuple[LinearOp, dict]:
    w = np.random.default_rng(0).normal(size=(c, c, 3, 3))
    lin = LinearOp("conv", 0, 0, (c, hw, hw), (c, hw, hw),
                   {"weight": "w", "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1})
    return lin, {"w": w}


def tile_positions(c: int, hw: int, tile: tuple[int, int, int]) -> np.ndarray:
    tc, th, tw = tile
    nc, nh, nw = -(-c // tc), -(-hw // th), -(-hw // tw)
    ci, hi, wi = np.meshgrid(np.arange(c), np.arange(hw), np.arange(hw), indexing="ij")
    ct = ((ci // tc) * nh + hi // th) * nw + wi // tw
    slot = (ci % tc) * th * tw + (hi % th) * tw + wi % tw
    return (ct * (tc * th * tw) + slot).reshape(-1)


def cost(m, pos: np.ndarray, slots: int) -> tuple[int, int, int]:
    """(ciphertexts, products, rotations) of matrix ``m`` with inputs and outputs at ``pos``."""
    coo = m.tocoo()
    o, i = pos[coo.row], pos[coo.col]
    n_ct = int(pos.max()) // slots + 1
    key = np.unique(((o // slots) * n_ct + i // slots) * slots + (o - i) % slots)
    blk, d = np.divmod(key, slots)
    keys = {}
    for b in np.unique(blk):
        keys[divmod(int(b), n_ct)] = d[blk == b]
    return len(np.unique(pos // slots)), len(key), plan_bsgs(keys, slots).rotations


def pow2_tiles(c: int, hw: int, slots: int):
    p2 = lambda n: 1 << max(0, (n - 1).bit_length())  # noqa: E731
    for tc in (1 << k for k in range(slots.bit_length())):
        for th in (1 << k for k in range(slots.bit_length())):
            if slots % (tc * th) or tc > p2(c) or th > p2(hw):
                continue
            tw = slots // (tc * th)
            if tw <= p2(hw):
                yield (tc, th, tw)


def main() -> None:
    print(f"{'convolution (3x3, stride 1)':48s} {'layout':34s} {'cts':>4s} {'products':>9s} {'full':>6s} {'rotations':>9s}")
    print("-" * 116)
    for name, c, hw, slots, k in CASES:
        lin, weights = conv(c, hw)
        m = tensor_matrix(lin, weights)
        full = -(-m.nnz // slots)
        rows = []
        for sname, strat in STRATEGIES.items():
            lay = strat.input_layout((c, hw, hw), slots, 1, k)
            rows.append((f"{sname}: {lay.kind}" + (f" k={lay.phase}" if lay.phase > 1 else ""),
                         cost(m, lay.positions, slots)))
        for tile in pow2_tiles(c, hw, slots):
            rows.append((f"tile {tile[0]}x{tile[1]}x{tile[2]}", cost(m, tile_positions(c, hw, tile), slots)))
        best = min(r[1][1] for r in rows)
        for label, (n_ct, prods, rots) in rows:
            mark = " *" if prods == best else ""
            print(f"{name:48s} {label:34s} {n_ct:4d} {prods:9d} {full:6d} {rots:9d}{mark}")
            name = ""
        print()
    print("* fewest products")


if __name__ == "__main__":
    main()
