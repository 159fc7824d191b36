"""``shared-source``: every residual Add of a stage takes its skip from one tensor (approximating).

A stage is a run of residual blocks at the same resolution and width, each
feeding the next (:func:`hecompiler.arch_rewrite.find_stages`).  In a
standard ResNet block ``i`` adds its own input ``y_{i-1}`` back; after this
rewrite every identity-skip block of the stage adds the stage's one shared
source ``S`` instead::

    y_i = act(F_i(y_{i-1}) + y_{i-1})   ->   y_i = act(F_i(y_{i-1}) + S)

so the Adds fan out from ``S`` and, under HE, aligning ``S`` (level, scale,
layout) and refreshing it is paid once for the whole stage instead of once
per block (Drucker & Zimerman 2023, long skips from a shared source).

``source`` chooses ``S``: ``input`` (default) is the stage input when it has
the stage's shape, else (a stage opened by a downsampling projection block)
the output of the stage's first block; ``first`` is always the output of the
stage's first block.  Blocks that already add ``S`` and projection blocks are
left alone; a stage of one block has nothing to share.

This changes the function: re-fit the weights on calibration data afterwards
(``hecompile rewrite``, :func:`hecompiler.arch_rewrite.rewrite_model`).
Each change is recorded in ``ctx.options["arch_rewrite"]`` for the report.
"""

from __future__ import annotations

from dataclasses import dataclass

from hecompiler.arch_rewrite import RECORD_KEY, find_blocks, find_stages, stage_source
from hecompiler.errors import PassError
from hecompiler.passmanager import Pass, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class SharedSourceRewrite(Pass):
    name = "shared-source"
    summary = "residual Adds of a stage take their skip from one shared tensor (changes the function: re-fit)"
    exact = False
    source: str = "input"

    def run(self, graph, ctx):
        if self.source not in ("input", "first"):
            raise PassError(f"pass shared-source: option source must be 'input' or 'first', got {self.source!r}")
        record = ctx.options.setdefault(RECORD_KEY, [])
        blocks = find_blocks(graph)
        notes = []
        n = 0
        for stage in find_stages(blocks):
            src = stage_source(stage, self.source)
            names = [b.name for b in stage]
            moved = []
            for b in stage:
                if b.kind != "identity" or b.skip is src or b.output is src or b.add.output is src:
                    continue
                b.add.set_input(b.skip_index, src)
                moved.append(b.name)
            span = f"stage {names[0]}" + (f"..{names[-1]}" if len(names) > 1 else "")
            if moved:
                fan = sum(1 for u, _ in src.uses if u.op == "Add")
                note = f"{span}: skips of {', '.join(moved)} now from %{src.name} ({fan} Adds fan out from it)"
                n += len(moved)
            elif len(stage) == 1:
                note = f"{span}: one block, nothing to share"
            else:
                note = f"{span}: every skip already comes from %{src.name}"
            notes.append(note)
            record.append({"pass": self.name, "block": names, "kind": "stage", "changed": bool(moved),
                           "note": note})
        if not blocks:
            note = "no residual blocks found"
            notes.append(note)
            record.append({"pass": self.name, "block": None, "kind": None, "changed": False, "note": note})
        return PassResult(n > 0, notes)
