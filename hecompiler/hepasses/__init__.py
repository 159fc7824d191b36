"""Passes over the HE program (the second IR), one module each; importing this package
registers them.  They use the graph passes' machinery (:mod:`hecompiler.passmanager`: one
registry, one pipeline syntax, the program verified between passes by
:func:`hecompiler.heprog.verify_program`, snapshots as program text) on an
:class:`~hecompiler.heprog.HEProgram` instead of a graph.

- ``share-mod-switch``      one mod-switch per (value, level); lower levels switched from the nearest
- ``select-rotation-keys``  the Galois key set under a key budget, every rotation composed from it
- ``hoist-rotations``       baby steps of hoisting backends made straight from their input

:data:`DEFAULT_HE_PIPELINE` runs after every lowering (:func:`hecompiler.lower.lower`).  Pass
options come from the pipeline spec; what the planner knows (the cost model, the memory
budget, the lowering's BSGS plans) comes in ``ctx.options``:

``cost``            a :class:`~hecompiler.costmodel.CostModel` (rotation prices by level, key sizes)
``max_memory_bytes`` the memory budget; ``select-rotation-keys`` keeps the keys inside what is left
``bsgs_plans``      linear op id -> :class:`~hecompiler.linear.BsgsPlan` (recomputed when missing)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..passmanager import Pass

#: run after every lowering
DEFAULT_HE_PIPELINE = "share-mod-switch,hoist-rotations,select-rotation-keys"


class HEPass(Pass):
    """Base class of HE-program passes: ``run(prog, ctx)`` on an HEProgram."""

    ir: ClassVar[str] = "heprogram"


from . import hoist_rotations, select_rotation_keys, share_mod_switch  # noqa: E402,F401
