"""Built-in rewrite passes, one module each; importing this package registers them.

Exact canonical passes (run by default, see ``DEFAULT_PIPELINE``):

- ``fold-constants``  evaluate nodes whose operands are all constants
- ``remove-identity`` drop Identity, Dropout and no-op Reshape/Pad
- ``stack-sum``       torch's sum(stack([...])) export -> a chain of Adds
- ``fold-pad``        a zero Pad before a Conv/AveragePool -> the op's own pads
- ``fold-bn``         BatchNormalization after Conv/Gemm -> new weights and bias
- ``fuse-gemm``       (Flatten ->) MatMul by a constant (+ Add bias) -> Gemm
- ``dirac-merge``     residual Add(x, Conv(x)) -> one Conv with kernel W + I (Dirac skip)
- ``fuse-poly``       Mul/Add/Pow polynomials in one tensor -> one Poly node
- ``dce``             remove nodes and constants nothing uses

Approximating architecture rewrites (opt-in; re-fit with ``hecompile rewrite``):

- ``dirac``           residual blocks -> plain chains of Dirac convs W + I (skip Add removed)
- ``shared-source``   the residual Adds of a stage take their skip from one shared tensor

Approximating activation rewrites (inserted by the compile driver when the model has them; they read
calibrated ranges from ``ctx.options["calibration"]``, see ``hecompiler.calibration``):

- ``relu-to-poly``        ReLU / Clip -> minimax (or composite) polynomial on the calibrated range
- ``maxpool-to-avgpool``  MaxPool -> AveragePool with the same window
- ``maxpool-to-poly``     MaxPool -> tree of polynomial maxima on the calibrated range

Added last by the compile driver when the model's input has a batch B > 1 (exact):

- ``batch-to-channels``   the B images stacked along the channels, every op acting per image
"""

from . import dce, dirac_merge, fold_bn, fold_constants, fold_pad, fuse_gemm, fuse_poly, remove_identity, stack_sum  # noqa: F401
from . import dirac_rewrite, shared_source_rewrite  # noqa: F401  (approximating, opt-in)
from . import batch_to_channels  # noqa: F401  (added by the compiler for a batched input)
from . import maxpool_to_avgpool, maxpool_to_poly, relu_to_poly  # noqa: F401  (approximating)
