#!/usr/bin/env python3
"""Build the reference ONNX models hecompiler is developed and tested against.

Every model is written with ``onnx.helper`` and numpy only (no torch), from a
fixed seed, so the same command always produces byte-identical files. The
graphs are shaped like what ``torch.onnx.export`` emits for the equivalent
PyTorch module (node names such as ``/layer1/layer1.0/conv1/Conv``,
initializer names such as ``layer1.0.conv1.weight``, torch's attribute sets on
Conv/BatchNormalization/Gemm), because torch exports are what users feed the
compiler. BatchNormalization is kept as a separate node ("unfolded", as torch
emits with ``do_constant_folding=False`` or ``training=TrainingMode.PRESERVE``)
so the compiler's own BN folding is exercised.

Weights are random (He-normal, BN statistics random but sane), not trained:
the models exist to check that compiled HE programs compute the same function
as onnxruntime, and to measure cost; accuracy does not matter. Init is scaled
so activations stay O(1) through the network: on an N(0, 1) input the logits
are finite with a standard deviation between 0.1 and 10.

Models (``MODELS`` maps each name to its builder ``build_<name>``):

* ``tiny_resnet``        1x1x8x8, one basic block + one downsampling block.
* ``tiny_resnet_poly``   same, every ReLU replaced by ``a*x^2 + b*x + c``.
* ``resnet20``           CIFAR ResNet-20 (He et al. 2016), 1x3x32x32.
* ``resnet20_poly``      ResNet-20 with degree-2 polynomial activations.
* ``diracnet``           DiracNet-style (no residual Adds), each 3x3 kernel
                         computed in the graph as ``alpha*I + beta*W/||W||``.
* ``diracnet_poly``      diracnet with the degree-2 polynomial activation.
* ``shared_source_resnet_poly``  1x3x16x16 CIFAR-style ResNet, stages of 3
                         blocks (16, 32), polynomial activations, where every
                         later block of a stage takes its skip from one shared
                         source (the stage input, or the output of the
                         downsampling block); Drucker & Zimerman (2023).
* ``torchlike_cnn``      Clip (ReLU6), explicit Pad, MaxPool, 3-input Sum,
                         Dropout, Identity, Flatten + Gemm(transB=1).
* ``torchlike_shape_chains``  torch's Shape/Gather/Unsqueeze/Concat/Reshape,
                         ConstantOfShape/Cast/Slice/Transpose chains for
                         ``F.pad`` with computed amounts, ``x.view(n, -1)``
                         and ``x.flatten(1)``; MatMul + Add classifier.
* ``torchlike_stack_sum`` ``torch.stack([a, b, c]).sum(0)`` as a 3-way
                         residual; Sub/Div input normalisation; Pow(x, 2).
* ``dynamic_batch``      tiny_resnet with a symbolic ``batch_size`` dim.
* ``resnet18_poly_224``, ``resnet50_poly_224``  torchvision-shaped
                         ResNet-18/50 on 1x3x224x224 with polynomial
                         activations and AveragePool in place of the stem
                         MaxPool. Large (47 MB / 103 MB): built only on demand.
* ``resnet18_relu_224``, ``resnet50_relu_224``  the same networks as users
                         export them: ReLU, stem MaxPool, unfolded BN
                         (compiled with calibration). Built only on demand.

Every builder takes ``opset`` (13 or later; 13 and 17 are tested, and 18,
where ReduceL2 takes its axes as an input) and ``seed``; the poly builders
also take the coefficients ``a``, ``b``, ``c``. Opset differences are handled
by the GraphBuilder helpers. Graph metadata_props record the model name, seed
and (poly models) the activation polynomial.

Weight scaling (details at HE_GAIN below): conv weights compensate the random
BN scale per channel, filters are centred, residual branches are damped, and
polynomial models run at a smaller signal level, because a degree-2
activation iterated along identity skips diverges once values exceed ~3.4.
The poly models are therefore meant for inputs of about unit scale (checked
for N(0, 1) and N(0, 4)); like any polynomial network they blow up on inputs
far outside that range. Their logits depend only weakly on i.i.d. noise
inputs (about 2% of the logit spread for resnet20_poly, 0.5% for
resnet50_poly_224), because global average pooling averages the noise away.

Usage::

    python models/build_models.py --out models            # all but the 224 models
    python models/build_models.py --out models resnet20   # just one
    python models/build_models.py --list

Importable: ``sys.path.insert(0, "models"); import build_models;
build_models.MODELS["tiny_resnet"]()`` returns an ``onnx.ModelProto``.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_OPSET = 13
DEFAULT_OPSET = 17
PRODUCER_NAME = "hecompiler-models"
PRODUCER_VERSION = "1"

# Degree-2 ReLU approximation used by the *_poly models: a*x^2 + b*x + c.
POLY_A, POLY_B, POLY_C = 0.125, 0.5, 0.25

INT64_MAX = np.iinfo(np.int64).max

# Weight scaling (random weights, but activations must stay O(1) to depth 50).
# * BN statistics are random rather than measured, so a BN node rescales each
#   channel by a random gamma / sqrt(var) (0.4 .. 2.1); over many layers that
#   compounds. A conv followed by BN therefore has each output channel of its
#   weight multiplied by sqrt(var + eps) / gamma: conv+BN is He-scaled per
#   channel while the BN parameters stay random and the BN node stays.
# * Conv filters are centred (zero mean over in-channels and taps, as in weight
#   standardisation), so the positive mean of ReLU/polynomial outputs is not
#   passed on as a growing per-channel offset that random BN means never remove.
# * The classifier weight is centred per row too (so the common positive mean
#   of the pooled features, identical for every input, does not dominate the
#   logits) and drawn with second-moment gain FC_GAIN.
# * The last conv of every residual branch is scaled by RESIDUAL_SCALE (in
#   second moment, Fixup-style), so act(x + f(x)) keeps the scale of x.
# * Polynomial models use other gains; see _poly_setup.
HE_GAIN = 2.0
RESIDUAL_SCALE = 0.35
BN_EPS = 1e-5
CENTER_WEIGHTS = True
POLY_STEM_RMS = 0.3
POLY_RESIDUAL_SCALE = 0.2
FC_GAIN = 2.0


# ---------------------------------------------------------------------------
# Graph construction helpers
# ---------------------------------------------------------------------------

def _module_scope(modpath: str) -> str:
    """torch's node-name scope for a module path.

    ``"layer1.0.conv1"`` -> ``"/layer1/layer1.0/conv1"`` and
    ``"layer1.0.downsample.0"`` -> ``"/layer1/layer1.0/downsample/downsample.0"``
    (children of a Sequential are named after it, as torch does).
    """
    if not modpath:
        return ""
    comps: list[str] = []
    for part in modpath.split("."):
        if part.isdigit() and comps:
            comps.append(f"{comps[-1]}.{part}")
        else:
            comps.append(part)
    return "/" + "/".join(comps)


class GraphBuilder:
    """Collects nodes and initializers and names them the way torch does."""

    def __init__(self, name: str, opset: int, seed: int):
        if not isinstance(opset, int) or opset < MIN_OPSET:
            raise ValueError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
        self.name = name
        self.opset = opset
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.metadata: dict[str, str] = {}
        self.gain = HE_GAIN                   # conv(+BN) weight second-moment gain
        self.residual_scale = RESIDUAL_SCALE  # extra factor on residual branch ends
        self.center_weights = CENTER_WEIGHTS
        self.stem_gain = HE_GAIN              # gain of the first conv (input ~ N(0, 1))
        self.fc_gain = FC_GAIN
        self._init_names: set[str] = set()
        self._node_counts: dict[str, int] = {}
        self._call_counts: dict[str, int] = {}

    # -- names ---------------------------------------------------------------
    def call(self, modpath: str) -> str:
        """Scope for one call of module ``modpath``; a module called a second
        time gets the suffix ``_1`` on its last component (``relu_1``)."""
        base = _module_scope(modpath)
        n = self._call_counts.get(base, 0)
        self._call_counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    @staticmethod
    def path(modpath: str) -> str:
        """Scope of ops written in ``modpath``'s own forward (e.g. the Add)."""
        return _module_scope(modpath)

    def _node_name(self, scope: str, op_type: str) -> str:
        base = f"{scope}/{op_type}"
        n = self._node_counts.get(base, 0)
        self._node_counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    # -- graph I/O -------------------------------------------------------------
    def add_input(self, name: str, shape: Sequence, elem: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def add_output(self, name: str, shape: Sequence, elem: int = TensorProto.FLOAT) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    # -- tensors ---------------------------------------------------------------
    def param(self, name: str, array: np.ndarray) -> str:
        if name in self._init_names:
            raise ValueError(f"duplicate initializer {name!r}")
        self._init_names.add(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def has_param(self, name: str) -> bool:
        return name in self._init_names

    def op(self, op_type: str, inputs: Sequence[str], scope: str = "",
           n_out: int = 1, outputs: Sequence[str] | None = None, **attrs):
        """Append a node; returns its output name (or list if n_out > 1)."""
        name = self._node_name(scope, op_type)
        outs = list(outputs) if outputs is not None else [
            f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, scope: str = "", dtype=None) -> str:
        """A Constant node (torch emits these for Python scalars and lists)."""
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", [], scope, value=numpy_helper.from_array(arr))

    # -- opset-dependent forms -----------------------------------------------
    def unsqueeze(self, x: str, axes: Sequence[int], scope: str = "") -> str:
        # axes became an input in opset 13 (MIN_OPSET), so always an input here.
        return self.op("Unsqueeze", [x, self.const(list(axes), scope, np.int64)], scope)

    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: int, scope: str = "") -> str:
        # ReduceSum takes axes as an input from opset 13.
        return self.op("ReduceSum", [x, self.const(list(axes), scope, np.int64)], scope,
                       keepdims=keepdims)

    def reduce_l2(self, x: str, axes: Sequence[int], keepdims: int, scope: str = "") -> str:
        # ReduceL2 (like ReduceMean/Max/...) takes axes as an input only from opset 18.
        if self.opset >= 18:
            return self.op("ReduceL2", [x, self.const(list(axes), scope, np.int64)], scope,
                           keepdims=keepdims)
        return self.op("ReduceL2", [x], scope, axes=list(axes), keepdims=keepdims)

    # -- model -------------------------------------------------------------------
    def model(self, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  initializer=self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(
            graph, opset_imports=opsets, producer_name=PRODUCER_NAME,
            producer_version=PRODUCER_VERSION,
            ir_version=helper.find_min_ir_version_for(opsets), doc_string=doc)
        meta = {"hecompiler.model": self.name, "seed": str(self.seed), **self.metadata}
        helper.set_model_props(model, meta)
        return model


# ---------------------------------------------------------------------------
# Layers (each mirrors one torch module; ``mod`` is its dotted module path)
# ---------------------------------------------------------------------------

def _he_normal(rng: np.random.Generator, shape: Sequence[int], gain: float) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * math.sqrt(gain / fan_in)).astype(np.float32)


def _uniform(rng: np.random.Generator, lo: float, hi: float, shape) -> np.ndarray:
    return rng.uniform(lo, hi, shape).astype(np.float32)


def conv(g: GraphBuilder, mod: str, x: str, cin: int, cout: int, k: int,
         stride: int = 1, pad: int | None = None, bias: bool = False,
         gain: float = HE_GAIN, channel_scale: np.ndarray | None = None) -> str:
    """nn.Conv2d: He-normal weight with second-moment ``gain`` (times
    ``channel_scale`` per output channel), torch-default uniform bias."""
    scope = g.call(mod)
    pad = k // 2 if pad is None else pad
    w = _he_normal(g.rng, (cout, cin, k, k), gain)
    if g.center_weights:
        w = w - w.mean(axis=(1, 2, 3), keepdims=True)
    if channel_scale is not None:
        w = (w * channel_scale.reshape(cout, 1, 1, 1)).astype(np.float32)
    inputs = [x, g.param(f"{mod}.weight", w)]
    if bias:
        bound = 1.0 / math.sqrt(cin * k * k)
        inputs.append(g.param(f"{mod}.bias", _uniform(g.rng, -bound, bound, (cout,))))
    return g.op("Conv", inputs, scope, dilations=[1, 1], group=1,
                kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride])


def bn_params(rng: np.random.Generator, c: int) -> tuple[np.ndarray, ...]:
    """Random but sane eval-mode BN parameters: gamma, beta, running mean, var."""
    gamma = _uniform(rng, 0.5, 1.5, (c,))
    beta = (rng.standard_normal(c) * 0.1).astype(np.float32)
    mean = (rng.standard_normal(c) * 0.1).astype(np.float32)
    var = _uniform(rng, 0.5, 1.5, (c,))
    return gamma, beta, mean, var


def bn_compensation(params: tuple[np.ndarray, ...]) -> np.ndarray:
    """Per-channel factor sqrt(var + eps) / gamma that undoes BN's scaling."""
    gamma, _, _, var = params
    return (np.sqrt(var.astype(np.float64) + BN_EPS) / gamma.astype(np.float64))


def batchnorm(g: GraphBuilder, mod: str, x: str, c: int,
              params: tuple[np.ndarray, ...] | None = None) -> str:
    """nn.BatchNorm2d in eval mode, left unfolded."""
    scope = g.call(mod)
    gamma, beta, mean, var = params if params is not None else bn_params(g.rng, c)
    names = [g.param(f"{mod}.{k}", v) for k, v in
             zip(("weight", "bias", "running_mean", "running_var"), (gamma, beta, mean, var))]
    return g.op("BatchNormalization", [x, *names], scope, epsilon=BN_EPS, momentum=0.9)


def conv_bn(g: GraphBuilder, conv_mod: str, bn_mod: str, x: str, cin: int, cout: int,
            k: int, stride: int = 1, pad: int | None = None, bias: bool = False,
            gain: float | None = None) -> str:
    """Conv followed by an unfolded BN whose random per-channel scale the conv
    weight compensates (see the note at HE_GAIN). ``gain`` defaults to g.gain."""
    gain = g.gain if gain is None else gain
    params = bn_params(g.rng, cout)
    y = conv(g, conv_mod, x, cin, cout, k, stride, pad, bias=bias, gain=gain,
             channel_scale=bn_compensation(params))
    return batchnorm(g, bn_mod, y, cout, params)


def relu(g: GraphBuilder, mod: str, x: str) -> str:
    return g.op("Relu", [x], g.call(mod))


def poly_act(g: GraphBuilder, mod: str, x: str, a: float, b: float, c: float) -> str:
    """a*x^2 + b*x + c as Mul/Add nodes; a, b, c are scalar initializers owned
    by the module (shared between calls of the same module, as torch buffers)."""
    scope = g.call(mod)
    names = [f"{mod}.{k}" for k in ("a", "b", "c")]
    if not g.has_param(names[0]):
        for n, v in zip(names, (a, b, c)):
            g.param(n, np.array(v, dtype=np.float32))
    pa, pb, pc = names
    xx = g.op("Mul", [x, x], scope)
    axx = g.op("Mul", [pa, xx], scope)
    bx = g.op("Mul", [pb, x], scope)
    s = g.op("Add", [axx, bx], scope)
    return g.op("Add", [s, pc], scope)


def activation(g: GraphBuilder, mod: str, x: str, poly: tuple | None) -> str:
    return relu(g, mod, x) if poly is None else poly_act(g, mod, x, *poly)


def global_avgpool(g: GraphBuilder, mod: str, x: str) -> str:
    return g.op("GlobalAveragePool", [x], g.call(mod))


def flatten(g: GraphBuilder, x: str, scope: str = "") -> str:
    return g.op("Flatten", [x], scope, axis=1)


def linear_gemm(g: GraphBuilder, mod: str, x: str, fin: int, fout: int,
                outputs: Sequence[str] | None = None) -> str:
    """nn.Linear as torch exports it: Gemm(x, W[out,in], b, transB=1)."""
    scope = g.call(mod)
    w, b = linear_params(g, mod, fin, fout)
    return g.op("Gemm", [x, w, b], scope, outputs=outputs, alpha=1.0, beta=1.0, transB=1)


def linear_params(g: GraphBuilder, mod: str, fin: int, fout: int) -> tuple[str, str]:
    """nn.Linear weight [out, in] (centred per row, gain g.fc_gain) and bias
    (torch-default uniform)."""
    w = _he_normal(g.rng, (fout, fin), g.fc_gain)
    if g.center_weights:
        w = (w - w.mean(axis=1, keepdims=True)).astype(np.float32)
    w = g.param(f"{mod}.weight", w)
    bound = 1.0 / math.sqrt(fin)
    b = g.param(f"{mod}.bias", _uniform(g.rng, -bound, bound, (fout,)))
    return w, b


# ---------------------------------------------------------------------------
# ResNets
# ---------------------------------------------------------------------------

def _basic_branch(g, mod, x, cin, cout, stride, poly):
    """The residual branch of a BasicBlock: conv-bn-act-conv-bn, the last conv damped."""
    out = conv_bn(g, f"{mod}.conv1", f"{mod}.bn1", x, cin, cout, 3, stride)
    out = activation(g, f"{mod}.relu", out, poly)
    return conv_bn(g, f"{mod}.conv2", f"{mod}.bn2", out, cout, cout, 3, gain=g.gain * g.residual_scale)


def _residual_join(g, mod, branch, skip, poly):
    """``act(branch + skip)``: the Add in the block's own scope, then its second act call."""
    out = g.op("Add", [branch, skip], g.path(mod))
    return activation(g, f"{mod}.relu", out, poly)


def _basic_block(g, mod, x, cin, cout, stride, poly):
    """torchvision BasicBlock: conv-bn-act-conv-bn, (+ 1x1 conv/bn projection), add, act."""
    out = _basic_branch(g, mod, x, cin, cout, stride, poly)
    if stride != 1 or cin != cout:
        idt = conv_bn(g, f"{mod}.downsample.0", f"{mod}.downsample.1", x, cin, cout, 1, stride, pad=0)
    else:
        idt = x
    return _residual_join(g, mod, out, idt, poly)


def _shared_source_block(g, mod, x, source, c, poly):
    """A width-``c`` BasicBlock whose skip operand is ``source`` (the stage's
    shared skip source) instead of its own input ``x``: ``act(branch(x) + source)``."""
    return _residual_join(g, mod, _basic_branch(g, mod, x, c, c, 1, poly), source, poly)


def _bottleneck(g, mod, x, cin, planes, stride, poly, expansion=4):
    """torchvision Bottleneck (v1.5: stride on the 3x3 conv)."""
    cout = planes * expansion
    out = conv_bn(g, f"{mod}.conv1", f"{mod}.bn1", x, cin, planes, 1, pad=0)
    out = activation(g, f"{mod}.relu", out, poly)
    out = conv_bn(g, f"{mod}.conv2", f"{mod}.bn2", out, planes, planes, 3, stride)
    out = activation(g, f"{mod}.relu", out, poly)
    out = conv_bn(g, f"{mod}.conv3", f"{mod}.bn3", out, planes, cout, 1, pad=0,
               gain=g.gain * g.residual_scale)
    if stride != 1 or cin != cout:
        idt = conv_bn(g, f"{mod}.downsample.0", f"{mod}.downsample.1", x, cin, cout, 1, stride, pad=0)
    else:
        idt = x
    out = g.op("Add", [out, idt], g.path(mod))
    return activation(g, f"{mod}.relu", out, poly)


def _cifar_resnet(g: GraphBuilder, x: str, in_ch: int, widths: Sequence[int],
                  blocks: Sequence[int], num_classes: int, poly,
                  logits_shape: Sequence) -> None:
    """CIFAR-style ResNet (3x3 stem, no pooling), projection shortcuts."""
    x = conv_bn(g, "conv1", "bn1", x, in_ch, widths[0], 3, gain=g.stem_gain)
    x = activation(g, "relu", x, poly)
    cin = widths[0]
    for s, (w, n) in enumerate(zip(widths, blocks)):
        for i in range(n):
            stride = 2 if (s > 0 and i == 0) else 1
            x = _basic_block(g, f"layer{s + 1}.{i}", x, cin, w, stride, poly)
            cin = w
    x = global_avgpool(g, "avgpool", x)
    x = flatten(g, x)
    linear_gemm(g, "fc", x, cin, num_classes, outputs=["logits"])
    g.add_output("logits", logits_shape)


def _imagenet_resnet(g: GraphBuilder, x: str, block: str, layers: Sequence[int],
                     num_classes: int, poly, stem_pool: str = "avg") -> None:
    """torchvision ResNet; the stem MaxPool is replaced by AveragePool(3, 2, 1)
    (module still called ``maxpool``, as after ``model.maxpool = nn.AvgPool2d(...)``),
    unless ``stem_pool="max"`` (torchvision's own MaxPool(3, 2, 1))."""
    x = conv_bn(g, "conv1", "bn1", x, 3, 64, 7, stride=2, pad=3, gain=g.stem_gain)
    x = activation(g, "relu", x, poly)
    if stem_pool == "max":
        x = g.op("MaxPool", [x], g.call("maxpool"), ceil_mode=0, dilations=[1, 1],
                 kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    else:
        x = g.op("AveragePool", [x], g.call("maxpool"), ceil_mode=0, count_include_pad=1,
                 kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    cin = 64
    for s, n in enumerate(layers):
        planes = 64 * 2 ** s
        for i in range(n):
            stride = 2 if (s > 0 and i == 0) else 1
            mod = f"layer{s + 1}.{i}"
            if block == "basic":
                x = _basic_block(g, mod, x, cin, planes, stride, poly)
                cin = planes
            else:
                x = _bottleneck(g, mod, x, cin, planes, stride, poly)
                cin = planes * 4
    x = global_avgpool(g, "avgpool", x)
    x = flatten(g, x)
    linear_gemm(g, "fc", x, cin, num_classes, outputs=["logits"])
    g.add_output("logits", [1, num_classes])


def _poly_setup(g: GraphBuilder, a: float, b: float, c: float) -> tuple:
    """Record the activation and set the weight gains for polynomial activations.

    A polynomial ResNet is stable only while pre-activations stay where a*x^2
    is small next to b*x: for the default coefficients, iterating the
    activation along an identity skip diverges from x ~ 3.4 up (the unstable
    fixed point of p(x) = x). So the stem scales its output to rms
    POLY_STEM_RMS, later convs use the linear-activation He gain 1/b^2 (ReLU's
    2 would let the input-dependent signal decay to the constant c), and
    residual branches are scaled by POLY_RESIDUAL_SCALE. Measured with seeds
    0-3: pre-activations stay below ~3.4 in absolute value for N(0, 1) and
    N(0, 4) inputs, for ResNet-20 and the ResNet-18/50 224 models alike.
    """
    g.metadata["activation"] = f"poly2: {a!r}*x^2 + {b!r}*x + {c!r}"
    g.gain = 1.0 / max(b * b, 0.125)
    g.stem_gain = POLY_STEM_RMS ** 2
    g.residual_scale = POLY_RESIDUAL_SCALE
    return (a, b, c)


def _tiny_resnet(name: str, opset: int, seed: int, poly, batch) -> GraphBuilder:
    g = GraphBuilder(name, opset, seed)
    if poly is not None:
        poly = _poly_setup(g, *poly)
    x = g.add_input("input", [batch, 1, 8, 8])
    _cifar_resnet(g, x, 1, widths=[4, 8], blocks=[1, 1], num_classes=10, poly=poly,
                  logits_shape=[batch, 10])
    return g


def build_tiny_resnet(opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """1x1x8x8 -> conv3x3(1->4)+BN+ReLU, basic block (4), downsampling block
    (4->8, stride 2, 1x1 conv+BN shortcut), GAP, Flatten, Gemm(8->10)."""
    g = _tiny_resnet("tiny_resnet", opset, seed, None, 1)
    return g.model("Tiny residual CNN (1x8x8 input, ReLU, unfolded BatchNormalization).")


def build_tiny_resnet_poly(opset: int = DEFAULT_OPSET, seed: int = 0, a: float = POLY_A,
                           b: float = POLY_B, c: float = POLY_C) -> onnx.ModelProto:
    """tiny_resnet with every ReLU replaced by a*x^2 + b*x + c (Mul/Add nodes)."""
    g = _tiny_resnet("tiny_resnet_poly", opset, seed, (a, b, c), 1)
    return g.model("tiny_resnet with degree-2 polynomial activations a*x^2+b*x+c.")


def build_dynamic_batch(opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """tiny_resnet (same weights for the same seed) with a symbolic batch
    dimension "batch_size" on input and logits, as torch exports with dynamic_axes."""
    g = _tiny_resnet("dynamic_batch", opset, seed, None, "batch_size")
    return g.model("tiny_resnet with a dynamic batch dimension 'batch_size'.")


def _resnet20(name, opset, seed, poly):
    g = GraphBuilder(name, opset, seed)
    if poly is not None:
        poly = _poly_setup(g, *poly)
    x = g.add_input("input", [1, 3, 32, 32])
    _cifar_resnet(g, x, 3, widths=[16, 32, 64], blocks=[3, 3, 3], num_classes=10,
                  poly=poly, logits_shape=[1, 10])
    return g


def build_resnet20(opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """CIFAR ResNet-20 (He et al. 2016): 3x3 stem 3->16, 3 stages x 3 basic
    blocks (16/32/64), 1x1 conv+BN projection where the stage downsamples."""
    g = _resnet20("resnet20", opset, seed, None)
    return g.model("CIFAR ResNet-20, ReLU, unfolded BatchNormalization, random weights.")


def build_resnet20_poly(opset: int = DEFAULT_OPSET, seed: int = 0, a: float = POLY_A,
                        b: float = POLY_B, c: float = POLY_C) -> onnx.ModelProto:
    """resnet20 with degree-2 polynomial activations (Mul/Add nodes)."""
    g = _resnet20("resnet20_poly", opset, seed, (a, b, c))
    return g.model("CIFAR ResNet-20 with degree-2 polynomial activations a*x^2+b*x+c.")


def build_resnet8_poly(opset: int = DEFAULT_OPSET, seed: int = 0, a: float = POLY_A,
                      b: float = POLY_B, c: float = POLY_C) -> onnx.ModelProto:
    """CIFAR ResNet-8 (3 stages x 1 basic block, 16/32/64 channels, 1x3x32x32) with degree-2
    polynomial activations: the shape of IBM HElayers' ResNet-8 benchmark."""
    g = GraphBuilder("resnet8_poly", opset, seed)
    poly = _poly_setup(g, a, b, c)
    x = g.add_input("input", [1, 3, 32, 32])
    _cifar_resnet(g, x, 3, widths=[16, 32, 64], blocks=[1, 1, 1], num_classes=10, poly=poly, logits_shape=[1, 10])
    return g.model("CIFAR ResNet-8 with degree-2 polynomial activations a*x^2+b*x+c (HElayers' ResNet-8 shape).")


def build_shared_source_resnet_poly(opset: int = DEFAULT_OPSET, seed: int = 0, a: float = POLY_A,
                                    b: float = POLY_B, c: float = POLY_C) -> onnx.ModelProto:
    """CIFAR-style ResNet on 1x3x16x16 whose skips within a stage all come from
    one shared source (Drucker & Zimerman 2023), polynomial activations.

    stem conv3x3 3->16 + BN + act -> s1; layer1 (width 16): block 0 is a
    plain basic block (its skip is its input, s1), blocks 1 and 2 compute
    ``act(branch(x_i) + s1)``; layer2: block 0 downsamples 16->32 (stride 2,
    1x1 conv + BN projection) -> s2, blocks 1 and 2 compute
    ``act(branch(x_i) + s2)``; GAP, Flatten, Gemm 32->10. So s1 is read by
    the 3 Adds of layer1 (and layer1.0.conv1), s2 by the Adds of layer2.1
    and layer2.2 (and layer2.1.conv1).
    """
    g = GraphBuilder("shared_source_resnet_poly", opset, seed)
    poly = _poly_setup(g, a, b, c)
    x = g.add_input("input", [1, 3, 16, 16])
    x = conv_bn(g, "conv1", "bn1", x, 3, 16, 3, gain=g.stem_gain)
    x = activation(g, "relu", x, poly)
    cin = 16
    for s, width in enumerate((16, 32)):
        stride = 1 if s == 0 else 2
        mod = f"layer{s + 1}"
        first = _basic_block(g, f"{mod}.0", x, cin, width, stride, poly)
        # the shared source: the stage input when the first block keeps the shape, else its output
        source = x if (stride == 1 and cin == width) else first
        x = first
        for i in (1, 2):
            x = _shared_source_block(g, f"{mod}.{i}", x, source, width, poly)
        cin = width
    x = global_avgpool(g, "avgpool", x)
    x = flatten(g, x)
    linear_gemm(g, "fc", x, cin, 10, outputs=["logits"])
    g.add_output("logits", [1, 10])
    return g.model("CIFAR-style ResNet (1x3x16x16) with shared-source skips: within a stage every "
                   "later block adds the stage's shared source, degree-2 polynomial activations.")


def _resnet_224(name, block, layers, opset, seed, a, b, c, image_size):
    g = GraphBuilder(name, opset, seed)
    poly = _poly_setup(g, a, b, c)
    x = g.add_input("input", [1, 3, image_size, image_size])
    _imagenet_resnet(g, x, block, layers, 1000, poly)
    return g


def build_resnet18_poly_224(opset: int = DEFAULT_OPSET, seed: int = 0, a: float = POLY_A,
                            b: float = POLY_B, c: float = POLY_C,
                            image_size: int = 224) -> onnx.ModelProto:
    """torchvision ResNet-18 ([2,2,2,2] basic blocks), polynomial activations,
    AveragePool(3,2,1) stem pool, 1000 logits. ~11.7M parameters (~47 MB).
    ``image_size`` only exists so tests can check the graph on a small input."""
    g = _resnet_224("resnet18_poly_224", "basic", [2, 2, 2, 2], opset, seed, a, b, c, image_size)
    return g.model("torchvision ResNet-18 with degree-2 polynomial activations and "
                   "AveragePool stem, 1x3x224x224.")


def build_resnet50_poly_224(opset: int = DEFAULT_OPSET, seed: int = 0, a: float = POLY_A,
                            b: float = POLY_B, c: float = POLY_C,
                            image_size: int = 224) -> onnx.ModelProto:
    """torchvision ResNet-50 ([3,4,6,3] bottlenecks, expansion 4), polynomial
    activations, AveragePool(3,2,1) stem pool, 1000 logits. ~25.6M parameters (~102 MB)."""
    g = _resnet_224("resnet50_poly_224", "bottleneck", [3, 4, 6, 3], opset, seed, a, b, c,
                    image_size)
    return g.model("torchvision ResNet-50 with degree-2 polynomial activations and "
                   "AveragePool stem, 1x3x224x224.")


def _resnet_relu_224(name, block, layers, opset, seed, image_size):
    g = GraphBuilder(name, opset, seed)
    x = g.add_input("input", [1, 3, image_size, image_size])
    _imagenet_resnet(g, x, block, layers, 1000, None, stem_pool="max")
    return g


def build_resnet18_relu_224(opset: int = DEFAULT_OPSET, seed: int = 0,
                            image_size: int = 224) -> onnx.ModelProto:
    """torchvision ResNet-18 as users export it: ReLU, stem MaxPool(3, 2, 1),
    unfolded BatchNormalization, 1000 logits (random weights). Compiling it
    needs calibration data (ReLU and MaxPool are approximated)."""
    g = _resnet_relu_224("resnet18_relu_224", "basic", [2, 2, 2, 2], opset, seed, image_size)
    return g.model("torchvision ResNet-18 (ReLU, MaxPool, BatchNormalization), 1x3x224x224.")


def build_resnet50_relu_224(opset: int = DEFAULT_OPSET, seed: int = 0,
                            image_size: int = 224) -> onnx.ModelProto:
    """torchvision ResNet-50 as users export it: ReLU, stem MaxPool(3, 2, 1),
    bottlenecks [3,4,6,3], unfolded BatchNormalization, 1000 logits (random weights)."""
    g = _resnet_relu_224("resnet50_relu_224", "bottleneck", [3, 4, 6, 3], opset, seed, image_size)
    return g.model("torchvision ResNet-50 (ReLU, MaxPool, BatchNormalization), 1x3x224x224.")


# ---------------------------------------------------------------------------
# DiracNet
# ---------------------------------------------------------------------------

def _dirac_delta(c: int, k: int = 3) -> np.ndarray:
    """torch.nn.init.dirac_: ones at the centre tap of kernel (o, o)."""
    d = np.zeros((c, c, k, k), dtype=np.float32)
    d[np.arange(c), np.arange(c), k // 2, k // 2] = 1.0
    return d


def dirac_conv(g: GraphBuilder, mod: str, x: str, c: int, norm: str,
               channel_scale: np.ndarray | None = None) -> str:
    """DiracConv2d: kernel = alpha * delta + beta * W / ||W||, computed in the graph.

    ||W|| is the per-output-channel L2 norm over axes [1, 2, 3] with
    keepdims=1, either as one ReduceL2 (``norm="reduce_l2"``) or as
    Sqrt(ReduceSum(Mul(W, W))) (``norm="reduce_sum"``). alpha and beta are
    per-output-channel [C, 1, 1, 1] initializers (times ``channel_scale``).
    """
    scope = g.call(mod)
    rng = g.rng
    cs = np.ones(c) if channel_scale is None else channel_scale
    cs = cs.reshape(c, 1, 1, 1)
    w = g.param(f"{mod}.weight", (rng.standard_normal((c, c, 3, 3)) * 0.05).astype(np.float32))
    alpha = g.param(f"{mod}.alpha", (rng.uniform(0.7, 1.0, (c, 1, 1, 1)) * cs).astype(np.float32))
    beta = g.param(f"{mod}.beta", (rng.uniform(0.5, 0.8, (c, 1, 1, 1)) * cs).astype(np.float32))
    delta = g.param(f"{mod}.delta", _dirac_delta(c))
    if norm == "reduce_l2":
        n = g.reduce_l2(w, [1, 2, 3], 1, scope)
    elif norm == "reduce_sum":
        n = g.op("Sqrt", [g.reduce_sum(g.op("Mul", [w, w], scope), [1, 2, 3], 1, scope)], scope)
    else:
        raise ValueError(f"unknown norm {norm!r}")
    wn = g.op("Div", [w, n], scope)
    ad = g.op("Mul", [alpha, delta], scope)
    bw = g.op("Mul", [beta, wn], scope)
    kernel = g.op("Add", [ad, bw], scope)
    return g.op("Conv", [x, kernel], scope, dilations=[1, 1], group=1,
                kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])


def dirac_conv_bn(g: GraphBuilder, conv_mod: str, bn_mod: str, x: str, c: int,
                  norm: str) -> str:
    params = bn_params(g.rng, c)
    y = dirac_conv(g, conv_mod, x, c, norm, channel_scale=bn_compensation(params))
    return batchnorm(g, bn_mod, y, c, params)


def _diracnet(name: str, opset: int, seed: int, poly) -> GraphBuilder:
    """diracnet with ReLU (``poly=None``) or the polynomial activation. With
    ReLU the stem gain is HE_GAIN (= g.gain, the original model byte for byte);
    with the polynomial the stem scales to POLY_STEM_RMS and the transition conv
    uses the linear He gain (_poly_setup), while the Dirac kernels keep their
    alpha/beta ranges (their second-moment gain is ~1): pre-activations stay
    below ~2 for N(0, 1) inputs (checked in tests/test_models_build.py)."""
    g = GraphBuilder(name, opset, seed)
    if poly is not None:
        poly = _poly_setup(g, *poly)
    x = g.add_input("input", [1, 3, 16, 16])
    x = conv_bn(g, "conv0", "bn0", x, 3, 16, 3, gain=g.stem_gain)
    x = activation(g, "relu0", x, poly)
    for i in range(2):
        x = dirac_conv_bn(g, f"stage1.{i}.conv", f"stage1.{i}.bn", x, 16, "reduce_l2")
        x = activation(g, f"stage1.{i}.relu", x, poly)
    x = conv_bn(g, "transition.conv", "transition.bn", x, 16, 32, 3, stride=2)
    x = activation(g, "transition.relu", x, poly)
    for i in range(2):
        x = dirac_conv_bn(g, f"stage2.{i}.conv", f"stage2.{i}.bn", x, 32, "reduce_sum")
        x = activation(g, f"stage2.{i}.relu", x, poly)
    x = global_avgpool(g, "avgpool", x)
    x = flatten(g, x)
    linear_gemm(g, "fc", x, 32, 10, outputs=["logits"])
    g.add_output("logits", [1, 10])
    return g


def build_diracnet(opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """DiracNet-style CNN (Zagoruyko & Komodakis 2017) on 1x3x16x16, no residual Adds.

    stem conv3x3 3->16 + BN + ReLU; stage1: 2 x (DiracConv 16 + BN + ReLU),
    kernel norm via ReduceL2; transition: conv3x3 stride 2 16->32 + BN + ReLU;
    stage2: 2 x (DiracConv 32 + BN + ReLU), kernel norm via
    Mul/ReduceSum/Sqrt; GAP, Flatten, Gemm 32->10.
    """
    g = _diracnet("diracnet", opset, seed, None)
    return g.model("DiracNet-style CNN: each 3x3 kernel is alpha*I + beta*W/||W||, "
                   "computed in the graph from initializers; no residual Adds.")


def build_diracnet_poly(opset: int = DEFAULT_OPSET, seed: int = 0, a: float = POLY_A,
                        b: float = POLY_B, c: float = POLY_C) -> onnx.ModelProto:
    """diracnet with every ReLU replaced by a*x^2 + b*x + c (Mul/Add nodes).

    The DiracNet baseline of Drucker & Zimerman (2023): no skip connections
    at all, the identity lives in the kernels. Compiles without calibration.
    """
    g = _diracnet("diracnet_poly", opset, seed, (a, b, c))
    return g.model("DiracNet-style CNN with degree-2 polynomial activations a*x^2+b*x+c: each "
                   "3x3 kernel is alpha*I + beta*W/||W||, computed in the graph; no residual Adds.")


# ---------------------------------------------------------------------------
# torch-export-shaped test models
# ---------------------------------------------------------------------------

def build_torchlike_cnn(opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """1x3x16x16: conv+BN+ReLU6 (Clip with Constant min/max inputs), explicit
    Pad (pads initializer, asymmetric) + pad-0 conv with bias + BN + ReLU6,
    MaxPool 2x2, Sum(x, Relu(x), conv(x)), Identity, Dropout, Flatten,
    Gemm(transB=1)."""
    g = GraphBuilder("torchlike_cnn", opset, seed)
    x = g.add_input("input", [1, 3, 16, 16])

    def relu6(mod, t):
        scope = g.call(mod)
        lo = g.const(np.float32(0.0), scope)
        hi = g.const(np.float32(6.0), scope)
        return g.op("Clip", [t, lo, hi], scope)

    x = conv_bn(g, "conv1", "bn1", x, 3, 8, 3)
    x = relu6("relu6", x)
    # F.pad(x, (1, 1, 2, 0)) -> ONNX pads [N,C,H,W begins, N,C,H,W ends]
    pads = g.param("pad.pads", np.array([0, 0, 2, 1, 0, 0, 0, 1], dtype=np.int64))
    value = g.param("pad.value", np.array(0.0, dtype=np.float32))
    x = g.op("Pad", [x, pads, value], g.call("pad"), mode="constant")   # 1x8x18x18
    x = conv_bn(g, "conv2", "bn2", x, 8, 8, 3, pad=0, bias=True)       # 1x8x16x16
    x = relu6("relu6", x)
    x = g.op("MaxPool", [x], g.call("pool"), ceil_mode=0, dilations=[1, 1],
             kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[2, 2])   # 1x8x8x8
    r = relu(g, "branch_relu", x)
    cx = conv(g, "branch_conv", x, 8, 8, 3, bias=True, gain=1.0)
    x = g.op("Sum", [x, r, cx], "")
    x = g.op("Identity", [x], g.call("identity"))
    x = g.op("Dropout", [x], g.call("dropout"))
    x = flatten(g, x)                                                    # 1x512
    linear_gemm(g, "fc", x, 512, 10, outputs=["logits"])
    g.add_output("logits", [1, 10])
    return g.model("torch-export-shaped CNN: Clip (ReLU6), explicit Pad, MaxPool, "
                   "3-input Sum, Identity, Dropout, Flatten + Gemm.")


def _torch_pad_amounts(g: GraphBuilder, pad: list[str], rank: int) -> str:
    """torch.onnx's ``_prepare_onnx_paddings`` for a non-constant ``pad`` list:
    torch order (last dim first, begin/end pairs) -> ONNX order."""
    pad_t = g.op("Concat", [g.unsqueeze(p, [0]) for p in pad], "", axis=0)
    pad_len = g.op("Gather", [g.op("Shape", [pad_t]), g.const([0], "", np.int64)], "", axis=0)
    ext = g.op("Sub", [g.op("Mul", [g.const(rank, "", np.int64), g.const(2, "", np.int64)]),
                       pad_len])
    pad_t = g.op("Cast", [pad_t], "", to=TensorProto.INT64)
    zeros = g.op("ConstantOfShape", [ext], "",
                 value=numpy_helper.from_array(np.array([0], dtype=np.int64)))
    p = g.op("Concat", [pad_t, zeros], "", axis=0)
    p = g.op("Reshape", [p, g.const([-1, 2], "", np.int64)], "")
    p = g.op("Slice", [p, g.const([-1], "", np.int64), g.const([-INT64_MAX], "", np.int64),
                       g.const([0], "", np.int64), g.const([-1], "", np.int64)], "")   # flip dim 0
    p = g.op("Transpose", [p], "", perm=[1, 0])
    p = g.op("Reshape", [p, g.const([-1], "", np.int64)], "")
    return g.op("Cast", [p], "", to=TensorProto.INT64)


def build_torchlike_shape_chains(opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """1x3x16x16, reproducing torch.onnx shape-computation chains:

    * ``s = x.size(3) // 16; F.pad(x, (s, s, 2*s, 0))``: Shape, Gather, Div,
      Mul, Unsqueeze, Concat, ConstantOfShape, Cast, Reshape, Slice (flip),
      Transpose, Reshape, Cast, then Pad; followed by a pad-0 conv.
    * ``p.view(p.size(0), -1)`` of a 4x4 AveragePool: Shape, Gather,
      Unsqueeze, Concat with Constant [-1], Reshape.
    * ``q.flatten(1)`` of the GAP output via Shape, Slice, Concat, Reshape.
    * classifier ``cat([f1, f2], 1) @ fc.weight.t() + fc.bias``: Transpose of
      an initializer, MatMul, Add (not Gemm).
    """
    g = GraphBuilder("torchlike_shape_chains", opset, seed)
    x = g.add_input("input", [1, 3, 16, 16])
    x = conv_bn(g, "conv1", "bn1", x, 3, 8, 3)
    x = relu(g, "relu", x)
    # s = x.size(3) // 16 ; pad = (s, s, 2*s, 0)
    w_dim = g.op("Gather", [g.op("Shape", [x]), g.const(3, "", np.int64)], "", axis=0)
    s = g.op("Div", [w_dim, g.const(16, "", np.int64)])
    s2 = g.op("Mul", [s, g.const(2, "", np.int64)])
    zero = g.const(0, "", np.int64)
    pads = _torch_pad_amounts(g, [s, s, s2, zero], rank=4)
    x = g.op("Pad", [x, pads, g.const(np.float32(0.0))], "", mode="constant")  # 1x8x18x18
    x = conv_bn(g, "conv2", "bn2", x, 8, 8, 3, pad=0)                  # 1x8x16x16
    x = relu(g, "relu", x)
    # branch 1: p = avg_pool2d(x, 4); f1 = p.view(p.size(0), -1)
    p = g.op("AveragePool", [x], g.call("pool"), ceil_mode=0, count_include_pad=1,
             kernel_shape=[4, 4], pads=[0, 0, 0, 0], strides=[4, 4])          # 1x8x4x4
    n = g.op("Gather", [g.op("Shape", [p]), g.const(0, "", np.int64)], "", axis=0)
    shape1 = g.op("Concat", [g.unsqueeze(n, [0]), g.const([-1], "", np.int64)], "", axis=0)
    f1 = g.op("Reshape", [p, shape1])                                          # 1x128
    # branch 2: q = gap(x); f2 = q.flatten(1) with a computed target shape
    q = global_avgpool(g, "avgpool", x)                                        # 1x8x1x1
    lead = g.op("Slice", [g.op("Shape", [q]), g.const([0], "", np.int64),
                          g.const([1], "", np.int64), g.const([0], "", np.int64)])
    shape2 = g.op("Concat", [lead, g.const([-1], "", np.int64)], "", axis=0)
    f2 = g.op("Reshape", [q, shape2])                                          # 1x8
    feats = g.op("Concat", [f1, f2], "", axis=1)                               # 1x136
    scope = g.call("fc")
    w, b = linear_params(g, "fc", 136, 10)
    wt = g.op("Transpose", [w], scope, perm=[1, 0])
    y = g.op("MatMul", [feats, wt], scope)
    g.op("Add", [y, b], scope, outputs=["logits"])
    g.add_output("logits", [1, 10])
    return g.model("torch-export-shaped shape-computation chains: computed F.pad, "
                   "view(n, -1), flatten(1), MatMul + Add classifier.")


def build_torchlike_stack_sum(opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """1x3x16x16 small residual CNN:

    * input normalisation ``(x - mean) / std`` (Sub, Div by initializers);
    * stem conv+BN+ReLU -> x0;
    * 3-way residual ``torch.stack([a, b, x0]).sum(0) / 3.0`` with a = basic
      branch (conv-BN-ReLU-conv-BN), b = 1x1 conv + BN: Unsqueeze(axis 0) x3,
      Concat(axis 0), ReduceSum(axes [0], keepdims=0), Div by a Constant; ReLU;
    * head conv+BN, square activation ``Pow(x, 2.0)``; GAP, Flatten, Gemm.
    """
    g = GraphBuilder("torchlike_stack_sum", opset, seed)
    x = g.add_input("input", [1, 3, 16, 16])
    mean = g.param("norm.mean", np.array([0.1, 0.0, -0.1], np.float32).reshape(1, 3, 1, 1))
    std = g.param("norm.std", np.array([0.9, 1.0, 1.1], np.float32).reshape(1, 3, 1, 1))
    x = g.op("Sub", [x, mean])
    x = g.op("Div", [x, std])
    x = conv_bn(g, "conv1", "bn1", x, 3, 8, 3)
    x0 = relu(g, "relu", x)
    mod = "layer1"
    a = conv_bn(g, f"{mod}.conv1", f"{mod}.bn1", x0, 8, 8, 3)
    a = relu(g, f"{mod}.relu", a)
    a = conv_bn(g, f"{mod}.conv2", f"{mod}.bn2", a, 8, 8, 3, gain=g.gain * g.residual_scale)
    b = conv_bn(g, f"{mod}.shortcut.0", f"{mod}.shortcut.1", x0, 8, 8, 1, pad=0)
    scope = g.path(mod)
    stacked = g.op("Concat", [g.unsqueeze(t, [0], scope) for t in (a, b, x0)], scope, axis=0)
    s = g.reduce_sum(stacked, [0], 0, scope)
    s = g.op("Div", [s, g.const(np.float32(3.0), scope)], scope)
    x = relu(g, f"{mod}.relu", s)
    x = conv_bn(g, "head.conv", "head.bn", x, 8, 16, 3, stride=2)
    scope = g.call("head.square")
    x = g.op("Pow", [x, g.const(np.float32(2.0), scope)], scope)
    x = global_avgpool(g, "avgpool", x)
    x = flatten(g, x)
    linear_gemm(g, "fc", x, 16, 10, outputs=["logits"])
    g.add_output("logits", [1, 10])
    return g.model("torch-export-shaped sum(stack([a, b, c])) residual CNN with Sub/Div "
                   "normalisation and a Pow(x, 2) activation.")


# ---------------------------------------------------------------------------
# Registry and CLI
# ---------------------------------------------------------------------------

MODELS: dict[str, Callable[..., onnx.ModelProto]] = {
    "tiny_resnet": build_tiny_resnet,
    "tiny_resnet_poly": build_tiny_resnet_poly,
    "resnet20": build_resnet20,
    "resnet20_poly": build_resnet20_poly,
    "resnet8_poly": build_resnet8_poly,
    "diracnet": build_diracnet,
    "diracnet_poly": build_diracnet_poly,
    "shared_source_resnet_poly": build_shared_source_resnet_poly,
    "torchlike_cnn": build_torchlike_cnn,
    "torchlike_shape_chains": build_torchlike_shape_chains,
    "torchlike_stack_sum": build_torchlike_stack_sum,
    "dynamic_batch": build_dynamic_batch,
    "resnet18_poly_224": build_resnet18_poly_224,
    "resnet50_poly_224": build_resnet50_poly_224,
    "resnet18_relu_224": build_resnet18_relu_224,
    "resnet50_relu_224": build_resnet50_relu_224,
}

#: Built only when named explicitly (large).
ON_DEMAND = ("resnet18_poly_224", "resnet50_poly_224", "resnet18_relu_224", "resnet50_relu_224")
#: What ``main()`` writes when no names are given.
DEFAULT_MODELS = tuple(n for n in MODELS if n not in ON_DEMAND)


def build(name: str, **kwargs) -> onnx.ModelProto:
    """Build model ``name``; raises ValueError (not KeyError) on an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def _write_atomic(data: bytes, path: Path) -> None:
    """Write via a temporary file in the same directory, so a crash never
    leaves a half-written model behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Build hecompiler's reference ONNX models (deterministic).")
    ap.add_argument("names", nargs="*",
                    help=f"models to build (default: all except {', '.join(ON_DEMAND)})")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent),
                    help="output directory (default: the models/ directory)")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                    help=f"ONNX opset (>= {MIN_OPSET}; default {DEFAULT_OPSET})")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    ap.add_argument("--list", action="store_true", help="list model names and exit")
    args = ap.parse_args(argv)

    if args.list:
        for n in MODELS:
            print(n + ("  (on demand)" if n in ON_DEMAND else ""))
        return 0
    names = args.names or list(DEFAULT_MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}",
              file=sys.stderr)
        return 2
    if args.opset < MIN_OPSET:
        print(f"error: --opset must be >= {MIN_OPSET}, got {args.opset}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'model':<24} {'bytes':>12} {'nodes':>6}")
    for n in names:
        model = MODELS[n](opset=args.opset, seed=args.seed)
        onnx.checker.check_model(model, full_check=True)
        data = model.SerializeToString()
        _write_atomic(data, out / f"{n}.onnx")
        print(f"{n:<24} {len(data):>12} {len(model.graph.node):>6}")
        # a sample input next to each model (N(0,1), fixed seed), for demos and benchmarks
        buf = io.BytesIO()
        np.save(buf, sample_input(model))
        _write_atomic(buf.getvalue(), out / f"{n}.input.npy")
    return 0


def sample_input(model: onnx.ModelProto, seed: int = 0) -> np.ndarray:
    """A deterministic N(0,1) input of the model's input shape (symbolic dims -> 1)."""
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


if __name__ == "__main__":
    sys.exit(main())
