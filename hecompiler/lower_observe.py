"""Observers of a lowering: what it did, recorded from its events, apart from what it emits.

The lowering (:mod:`hecompiler.lower`) tells each observer in ``Lowering.observers`` when a node
starts and ends, a linear op is emitted, ciphertexts are refreshed, a skip source's level
alignment is reused and a layout conversion is inserted.  Two observers are built in:

* :class:`LoweringStats`: per-layer statistics and refresh points (the compile report, the planner);
* :class:`LevelObserver`: levels dropped per node and the DOT view of each lowered node, the
  level model the refresh planner (:mod:`hecompiler.refresh`) plans from.

A user's observer implements any of the ``on_*`` methods of :class:`Observer`
(``LoweringOptions.observers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .refresh import LevelModel, NodeInfo

if TYPE_CHECKING:
    from .ir import Graph, Node


@dataclass
class LayerStat:
    node: str
    op: str
    layout_in: str
    layout_out: str
    rotations: int = 0
    diagonals: int = 0
    bound: float = 0.0  # 2 * sqrt(#diagonals)
    level_in: int = 0
    level_out: int = 0
    refreshes: int = 0

    @classmethod
    def of(cls, node: str, op: str, layout_in: str, layout_out: str, rotations: int, diagonals: int,
           level_in: int) -> "LayerStat":
        return cls(node, op, layout_in, layout_out, rotations, diagonals, 2 * math.sqrt(diagonals), level_in,
                   level_in - 1)


class Observer:
    """The events of a lowering; every method is optional (these do nothing)."""

    def on_node_start(self, node: "Node") -> None: ...

    def on_node_end(self, node: "Node", level: int, n_ct: int, layout: str, alpha: float,
                    input_names: tuple[str, ...], input_level: int) -> None: ...

    def on_linear(self, stat: LayerStat) -> None: ...

    def on_refresh(self, where: str, n_ct: int, planned: bool) -> None: ...

    def on_shared_alignment(self) -> None: ...

    def on_conversion(self) -> None: ...


class LoweringStats(Observer):
    """Per-layer statistics (rotations, diagonals, layouts, levels of every linear op) and where
    the refreshes went: what the compile report prints and the planner compares."""

    def __init__(self, planned: bool):
        self.layers: list[LayerStat] = []
        self.refresh_points: list[str] = []  # the node output before which each refresh happened
        self.refreshed_before: dict[str, int] = {}  # node output name -> ciphertexts refreshed for it
        self.refreshed_cts = 0
        self._planned = planned  # the lowering follows a refresh plan
        self.unplanned_refreshes = 0  # refreshes the plan did not foresee (greedy fallback)
        self.shared_alignments = 0  # skip-source level alignments reused (shared-source lowering)
        self.conversions = 0  # layout conversions (identity linear ops) inserted

    def on_linear(self, stat: LayerStat) -> None:
        self.layers.append(stat)

    def on_refresh(self, where: str, n_ct: int, planned: bool) -> None:
        self.refresh_points.append(where)
        self.refreshed_before[where] = self.refreshed_before.get(where, 0) + n_ct
        self.refreshed_cts += n_ct
        if self._planned and not planned:
            self.unplanned_refreshes += 1

    def on_shared_alignment(self) -> None:
        self.shared_alignments += 1

    def on_conversion(self) -> None:
        self.conversions += 1


class LevelObserver(Observer):
    """Levels each node drops (and a rotation-based weight), for the refresh planner's level
    model, and each node as lowered (level, ciphertexts, layout, pending scalar) for DOT."""

    def __init__(self):
        self.nodes: list[NodeInfo] = []
        self.view: dict[int, tuple] = {}  # id(node) -> (level, #ct, layout, alpha) when it was lowered
        self._rotations = 0

    def on_node_start(self, node: "Node") -> None:
        self._rotations = 0

    def on_linear(self, stat: LayerStat) -> None:
        self._rotations += stat.rotations

    def on_node_end(self, node, level, n_ct, layout, alpha, input_names, input_level) -> None:
        self.view[id(node)] = (level, n_ct, layout, alpha)
        name = node.outputs[0].name
        self.nodes.append(NodeInfo(name, input_names, name, max(0, input_level - level),
                                   1e-3 * (self._rotations + 1)))

    def level_model(self, graph: "Graph", n_ct: dict[str, int], top: int) -> LevelModel:
        return LevelModel(self.nodes, n_ct, [v.name for v in graph.inputs], [v.name for v in graph.outputs], top)

    def annotate(self, node: "Node", refreshed_before: dict[str, int]) -> dict[str, Any]:
        """DOT annotations of a lowered node: levels, layout, refreshes before it."""
        view = self.view.get(id(node))  # as lowered (a later refresh of its output does not change it)
        if view is None:
            return {}
        level, n_ct, layout, alpha = view
        lines = [f"level {level}, {n_ct} ct", layout]
        if abs(alpha - 1.0) > 1e-12:
            lines.append(f"pending x{alpha:.3g}")
        extra: dict = {"lines": lines}
        k = refreshed_before.get(node.outputs[0].name, 0)
        if k:
            lines.append(f"REFRESH before: {k} ciphertext{'s' if k > 1 else ''}")
            extra.update(color="#d00000", penwidth="3")
        return extra
