"""Error types a user can act on.

Every error raised on bad input derives from :class:`HecError`; the CLI prints its
message on one line and exits non-zero.  Messages name the node, field or file.
"""

from __future__ import annotations


class HecError(Exception):
    """Base class of all user-facing hecompiler errors."""


class FrontendError(HecError):
    """The ONNX model cannot be imported (malformed, unsupported, dynamic)."""


class UnsupportedError(FrontendError):
    """An op, attribute or opset the compiler does not support."""


class VerificationError(HecError):
    """The IR violates an invariant (types, shapes, definitions, order)."""


class ParseError(HecError):
    """Textual IR or a pipeline spec could not be parsed."""


class PassError(HecError):
    """A pass failed or was given bad options."""


class InterpreterError(HecError):
    """The reference interpreter was given bad inputs."""


class HecFileError(HecError):
    """A .hec file is corrupt, truncated, or from an incompatible version."""


class LoweringError(HecError):
    """A graph cannot be lowered to an HE program."""


class OutOfLevelsError(LoweringError):
    """A node needs more levels than the modulus chain has (the planner tries a longer chain)."""


class LoweringInvariantError(LoweringError):
    """An internal invariant of the lowering broke: a compiler bug, reported with the node."""


class CompileBudgetError(HecError):
    """Compiling would exceed its time budget (``--max-compile-seconds``)."""


class NoPlanError(HecError):
    """No candidate parameter set of a target fits the budgets (memory, time, refreshes)."""
