"""hecompiler: compile ONNX CNNs to CKKS homomorphic-encryption programs.

The library API (the CLI is a thin layer over it)::

    import hecompiler as hc

    g = hc.load_onnx("model.onnx")          # graph IR, verified
    report = hc.run_pipeline(g)             # default exact canonical passes
    print(report.format())
    print(hc.print_graph(g))                # textual IR (parses back with hc.parse_graph)
    open("g.dot", "w").write(hc.to_dot(g))  # DOT picture
    hc.save_onnx(g, "rewritten.onnx")       # back to ONNX
    y = hc.run_graph(g, x)                  # reference interpreter (numpy)

User passes: subclass :class:`Pass`, decorate with :func:`register_pass`; they
are then usable by name in pipeline specs, from the API and from the CLI
(``hecompile --plugin mymodule --passes my-pass,...``).
"""

from .errors import (FrontendError, HecError, ParseError, PassError, UnsupportedError,  # noqa: F401
                     VerificationError)
from .ir import Graph, Node, TensorType, Value  # noqa: F401
from .frontend import load_onnx  # noqa: F401
from .interp import Interpreter  # noqa: F401
from .interp import run as run_graph  # noqa: F401
from .onnx_export import save_onnx, to_onnx  # noqa: F401
from .passmanager import (DEFAULT_PIPELINE, Pass, PassContext, PassManager, PassResult,  # noqa: F401
                          get_pass, list_passes, parse_pipeline, register_pass, run_pipeline)
from .rewrite import RewritePattern, apply_patterns  # noqa: F401
from .text import parse_graph, print_graph  # noqa: F401
from .dot import to_dot  # noqa: F401
from .verify import verify  # noqa: F401
from .compiler import CompileOptions, compile_model  # noqa: F401
from .hecfile import inspect_hec, load_hec, save_hec  # noqa: F401
from .heprog import parse_program, print_program, verify_program  # noqa: F401

__version__ = "0.1.0"
