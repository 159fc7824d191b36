"""Built-in rewrite passes, one module each; importing this package registers them.

Exact canonical passes (run by default, see ``DEFAULT_PIPELINE``):

- ``fold-constants``  evaluate nodes whose operands are all constants
- ``remove-identity`` drop Identity, Dropout and no-op Reshape/Pad
- ``stack-sum``       torch's sum(stack([...])) export -> a chain of Adds
- ``fold-pad``        a zero Pad before a Conv/AveragePool -> the op's own pads
- ``fold-bn``         BatchNormalization after Conv/Gemm -> new weights and bias
- ``fuse-gemm``       (Flatten ->) MatMul by a constant (+ Add bias) -> Gemm
- ``fuse-poly``       Mul/Add/Pow polynomials in one tensor -> one Poly node
- ``dce``             remove nodes and constants nothing uses
"""

from . import dce, fold_bn, fold_constants, fold_pad, fuse_gemm, fuse_poly, remove_identity, stack_sum  # noqa: F401
