"""Property tests of the HE lowering (graph IR -> HE program), run on the slot simulator.

Every test builds a graph directly in the IR (float64 values, so the
reference interpreter is exact too), lowers it with
:func:`hecompiler.lower.lower`, checks the program with
:func:`~hecompiler.heprog.verify_program` (levels, exact scales, keys),
runs it on :class:`~hecompiler.backends.sim.Simulator` (exact up to float64
rounding) and compares every output with :func:`hecompiler.run_graph`:

    max |sim - ref| <= 1e-6 * max(1, max |ref|)

Parameters come from hypothesis, derandomized so CI runs are deterministic.
The simulator gets a zero cost table: these tests are about values, not
latency predictions.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hecompiler as hc
from hecompiler.backends.sim import Simulator
from hecompiler.errors import LoweringError
from hecompiler.heprog import Params, verify_program
from hecompiler.ir import Graph, TensorType
from hecompiler.lower import LoweringOptions, _poly_depth, lower

TOL = 1e-6

PROPS = settings(max_examples=30, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                        HealthCheck.data_too_large])
FEW = settings(max_examples=20, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                      HealthCheck.data_too_large])

F64 = "f64"


# --------------------------------------------------------------------------- compile and run

@functools.lru_cache(maxsize=None)
def _chain(n: int, levels: int, scale_bits: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    import tenseal.sealapi as sealapi

    bits = (60,) + (scale_bits,) * levels + (60,)
    primes = tuple(q.value() for q in sealapi.CoeffModulus.Create(n, list(bits)))[:-1]
    return bits, primes


def compile_sim(g: Graph, N: int = 8192, L: int = 6, scale_bits: int = 40, options=None):
    """Lower ``g`` (no 128-bit check: fine for the simulator) and verify the program."""
    bits, primes = _chain(N, L, scale_bits)
    prog, low = lower(g, Params(N, bits, scale_bits, security="none"), primes, options)
    verify_program(prog)
    return prog, low


class _ZeroCost:
    """A cost table that prices everything at 0 (decouples these tests from it)."""

    def op_seconds(self, *_a) -> float:
        return 0.0

    def encode_seconds(self, *_a) -> float:
        return 0.0

    def generation_seconds(self, *_a) -> float:
        return 0.0


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


def check(g: Graph, feeds, **kw):
    """Lower, verify, simulate and compare every output with the interpreter."""
    if isinstance(feeds, np.ndarray):
        feeds = {g.inputs[0].name: feeds}
    prog, low = compile_sim(g, **kw)
    outs, _ = Simulator(prog, cost=_ZeroCost()).run(feeds)
    refs = hc.run_graph(g, feeds)
    for v, ref in zip(g.outputs, refs):
        err = rel_err(outs[v.name], ref)
        assert err <= TOL, f"output %{v.name}: relative error {err:.3g} > {TOL}\n{g}"
    return prog, low


# --------------------------------------------------------------------------- graph building

class B:
    """A tiny graph builder with its own random weights."""

    def __init__(self, seed: int):
        self.g = Graph()
        self.rng = np.random.default_rng(seed)

    def input(self, shape, name="x"):
        return self.g.add_input(name, TensorType(tuple(shape), F64))

    def const(self, data, name="c"):
        return self.g.add_constant(np.asarray(data, np.float64), name)

    def node(self, op, inputs, attrs=None):
        return self.g.add_node(op, inputs, attrs).output

    def conv(self, x, m, k=3, s=1, pads=None, d=1, group=1, bias=True, w=None):
        c = x.shape[1]
        if pads is None:
            pads = (d * (k - 1) // 2,) * 4
        if w is None:
            w = self.rng.normal(size=(m, c // group, k, k)) / math.sqrt(c // group * k * k)
        ins = [x, self.const(w, "w")]
        if bias:
            ins.append(self.const(self.rng.normal(size=m) * 0.1, "b"))
        return self.node("Conv", ins, {"strides": (s, s), "pads": tuple(pads), "dilations": (d, d),
                                       "group": group})

    def poly(self, x, coeffs=(0.1, 0.5, 0.25)):
        return self.node("Poly", [x], {"coeffs": tuple(float(c) for c in coeffs)})

    def out(self, *vals):
        self.g.outputs = list(vals)
        return self.g

    def x(self, shape):
        return self.rng.normal(size=tuple(shape))


def _has_refresh(prog) -> bool:
    return any(i.op == "refresh" for i in prog.instrs)


def _fallback_muls(prog, node_name: str) -> int:
    """Scalar mul_plains an Add emitted to align its operands (the non-adjustable fallback)."""
    return sum(1 for i in prog.instrs if i.op == "mul_plain" and i.plain.kind == "scalar" and i.note == node_name)


def _valid_conv(h, w, k, d, pads) -> bool:
    eff = d * (k - 1) + 1
    return h + pads[0] + pads[2] >= eff and w + pads[1] + pads[3] >= eff


# --------------------------------------------------------------------------- strategies

@st.composite
def conv_params(draw, max_c=9, min_hw=3, max_hw=12):
    c = draw(st.integers(1, max_c))
    h = draw(st.integers(min_hw, max_hw))
    w = draw(st.one_of(st.just(h), st.integers(min_hw, max_hw)))
    k = draw(st.sampled_from([1, 3, 5]))
    s = draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([1, 2]))
    depthwise = draw(st.booleans()) if c > 1 else False
    m = c if depthwise else draw(st.integers(1, max_c))
    sym = draw(st.booleans())
    # the IR allows any pads >= 0; pads == k gives output rows that see only padding
    if sym:
        pads = (draw(st.integers(0, k)),) * 4
    else:
        pads = tuple(draw(st.lists(st.integers(0, k), min_size=4, max_size=4)))
    bias = draw(st.booleans())
    assume(_valid_conv(h, w, k, d, pads))
    return dict(c=c, h=h, w=w, k=k, s=s, d=d, m=m, group=c if depthwise else 1, pads=pads, bias=bias)


seeds = st.integers(0, 2 ** 31 - 1)


# =========================================================================== convolutions

@PROPS
@given(p=conv_params(), seed=seeds, n=st.sampled_from([2048, 8192]))
def test_conv_single(p, seed, n):
    b = B(seed)
    x = b.input((1, p["c"], p["h"], p["w"]))
    y = b.conv(x, p["m"], p["k"], p["s"], p["pads"], p["d"], p["group"], p["bias"])
    prog, low = check(b.out(y), b.x(x.shape), N=n, L=2)
    assert [ly.op for ly in low.stats.layers] == ["Conv"]
    _record_rotations(low, p | {"N": n})


@FEW
@given(seed=seeds, c=st.integers(1, 6), hw=st.integers(6, 12), w_extra=st.integers(0, 3),
       k1=st.sampled_from([1, 3]), k2=st.sampled_from([1, 3, 5]), s1=st.sampled_from([1, 2]),
       third=st.booleans(), dw=st.booleans(), n=st.sampled_from([2048, 8192]))
def test_conv_chain_with_poly(seed, c, hw, w_extra, k1, k2, s1, third, dw, n):
    """stride-s conv, Poly, stride-1 conv (multiplexed -> multiplexed), optional third conv."""
    b = B(seed)
    x = b.input((1, c, hw, hw + w_extra))
    m1 = 2 * c if not dw else c
    y = b.conv(x, m1, k1, s1, group=c if dw else 1)
    y = b.poly(y, (0.2, 0.5, 0.3))
    y = b.conv(y, m1, k2, 1)
    if third:
        y = b.conv(y, c + 1, 3, 2)
    prog, low = check(b.out(y), b.x(x.shape), N=n, L=4)
    assert len(low.stats.layers) == (3 if third else 2)
    _record_rotations(low, dict(c=c, hw=hw, k1=k1, k2=k2, s1=s1, third=third, dw=dw, N=n))


@FEW
@given(seed=seeds, c=st.integers(12, 32), hw=st.integers(10, 14), k=st.sampled_from([1, 3]),
       s=st.sampled_from([1, 2]), m=st.integers(8, 16), n=st.sampled_from([2048, 4096, 8192]))
def test_conv_multi_ciphertext(seed, c, hw, k, s, m, n):
    """Tensors larger than one ciphertext (1024 / 2048 / 4096 slots)."""
    assume(c * hw * hw > n // 2)
    b = B(seed)
    x = b.input((1, c, hw, hw))
    y = b.conv(x, m, k, s)
    y = b.poly(y, (0.0, 1.0, 0.5))
    y = b.conv(y, m, 3, 1)
    prog, low = check(b.out(y), b.x(x.shape), N=n, L=3)
    assert prog.layouts[prog.inputs[0].layout].n_ct > 1
    _record_rotations(low, dict(c=c, hw=hw, k=k, s=s, m=m, N=n))


@FEW
@given(seed=seeds, c=st.integers(1, 3), h=st.integers(20, 33), w=st.integers(20, 33), k=st.sampled_from([1, 3, 5]),
       s=st.sampled_from([1, 2]), head=st.sampled_from([None, "pool", "gap"]))
def test_conv_channel_straddles_ciphertexts(seed, c, h, w, k, s, head):
    """One channel footprint (H*W > 512) spans two ciphertexts at N=1024."""
    b = B(seed)
    x = b.input((1, c, h, w))
    y = b.conv(x, 2, k, s)
    y = b.poly(y, (0.0, 1.0, 0.5))
    y = b.conv(y, 2, 3, 1)
    if head == "pool":
        y = b.node("AveragePool", [y], {"kernel_shape": (2, 2), "strides": (2, 2)})
    elif head == "gap":
        y = b.node("Flatten", [b.node("GlobalAveragePool", [y])])
        y = b.node("Gemm", [y, b.const(b.rng.normal(size=(2, 3)))])
    check(b.out(y), b.x(x.shape), N=1024, L=3)


@FEW
@given(seed=seeds, c=st.integers(1, 5), h=st.integers(3, 10), w=st.integers(3, 10),
       kh=st.sampled_from([1, 2, 3, 5]), kw=st.sampled_from([1, 2, 3, 5]), sh=st.integers(1, 3), sw=st.integers(1, 3),
       dh=st.integers(1, 2), dw=st.integers(1, 2), pads=st.lists(st.integers(0, 3), min_size=4, max_size=4),
       m=st.integers(1, 6), n=st.sampled_from([1024, 8192]))
def test_conv_rectangular(seed, c, h, w, kh, kw, sh, sw, dh, dw, pads, m, n):
    """Non-square kernels, strides and dilations (strides differ: no strided layout)."""
    assume(h + pads[0] + pads[2] >= dh * (kh - 1) + 1 and w + pads[1] + pads[3] >= dw * (kw - 1) + 1)
    b = B(seed)
    x = b.input((1, c, h, w))
    y = b.node("Conv", [x, b.const(b.rng.normal(size=(m, c, kh, kw))), b.const(b.rng.normal(size=m))],
               {"strides": (sh, sw), "pads": tuple(pads), "dilations": (dh, dw)})
    y = b.poly(y, (0.0, 0.5, 0.5))
    y = b.conv(y, m, 3 if min(y.shape[2:]) >= 3 else 1, 1)
    check(b.out(y), b.x(x.shape), N=n, L=3)


def test_conv_zero_output_channels_multi_ciphertext():
    """Output channels whose weights are all zero (a whole output ciphertext
    receives nothing from the input: it is just the bias)."""
    b = B(3)
    x = b.input((1, 4, 12, 12))
    w = b.rng.normal(size=(16, 4, 3, 3))
    w[7:] = 0.0  # 7 channels of 12x12 per ciphertext at 1024 slots: output cts 1 and 2 get nothing
    y = b.conv(x, 16, 3, 1, w=w)
    prog, _ = check(b.out(y), b.x(x.shape), N=2048, L=2)
    lin = prog.linears[0]  # output cts 1 and 2 get no diagonal: the backends make encrypted zeros + bias
    assert prog.layouts[lin.out_layout].n_ct == 3 and lin.counts["rescale"] == 1


# =========================================================================== pooling, BN, Gemm

@PROPS
@given(seed=seeds, c=st.integers(1, 6), h=st.integers(3, 11), w=st.integers(3, 11),
       k=st.sampled_from([2, 3]), s=st.sampled_from([1, 2]), padsym=st.booleans(),
       pads=st.lists(st.integers(0, 2), min_size=4, max_size=4), cip=st.sampled_from([0, 1]),
       ceil=st.sampled_from([0, 1]), n=st.sampled_from([1024, 2048, 8192]))
def test_average_pool(seed, c, h, w, k, s, padsym, pads, cip, ceil, n):
    pads = tuple(min(p, k - 1) for p in ([pads[0]] * 4 if padsym else pads))
    assume(h + pads[0] + pads[2] >= k and w + pads[1] + pads[3] >= k)
    b = B(seed)
    x = b.input((1, c, h, w))
    y = b.node("AveragePool", [x], {"kernel_shape": (k, k), "strides": (s, s), "pads": pads,
                                    "count_include_pad": cip, "ceil_mode": ceil})
    check(b.out(y), b.x(x.shape), N=n, L=2)


@FEW
@given(seed=seeds, c=st.integers(1, 9), h=st.integers(1, 9), w=st.integers(1, 9), f=st.integers(1, 12),
       conv_first=st.booleans(), bias=st.booleans(), trans=st.booleans(), n=st.sampled_from([1024, 8192]))
def test_gap_then_gemm(seed, c, h, w, f, conv_first, bias, trans, n):
    b = B(seed)
    x = b.input((1, c, h, w))
    y = x
    if conv_first and h >= 3 and w >= 3:
        y = b.conv(y, c + 1, 3, 2 if h >= 4 else 1)
    y = b.node("GlobalAveragePool", [y])
    y = b.node("Flatten", [y], {"axis": 1})
    k = y.shape[1]
    wm = b.rng.normal(size=(f, k) if trans else (k, f))
    ins = [y, b.const(wm, "fc")]
    if bias:
        ins.append(b.const(b.rng.normal(size=f), "fcb"))
    y = b.node("Gemm", ins, {"transB": int(trans), "alpha": 0.7})
    check(b.out(y), b.x(x.shape), N=n, L=3)


@FEW
@given(seed=seeds, c=st.integers(1, 6), h=st.integers(2, 8), w=st.integers(2, 8), f=st.integers(1, 10),
       mul=st.booleans())
def test_flatten_gemm_spatial(seed, c, h, w, f, mul):
    b = B(seed)
    x = b.input((1, c, h, w))
    y = b.conv(x, c, 1, 1) if mul else x
    if mul:
        y = b.node("Mul", [y, b.const(0.5)])
    y = b.node("Flatten", [y], {"axis": 1})
    y = b.node("Gemm", [y, b.const(b.rng.normal(size=(f, c * h * w)), "fc"),
                        b.const(b.rng.normal(size=(1, f)), "fcb")], {"transB": 1})
    check(b.out(y), b.x(x.shape), N=8192, L=3)


@pytest.mark.parametrize("kind", ["gemm", "matmul", "conv1x1"])
def test_gap_then_channel_mul_then_poly(kind):
    """GAP leaves garbage outside its layout; a per-channel Mul masks it, so a
    polynomial may follow (regression: the tensor stayed marked dirty)."""
    b = B(4)
    x = b.input((1, 5, 6, 6))
    y = b.node("GlobalAveragePool", [b.conv(x, 5, 3, 2)])
    y = b.node("Mul", [y, b.const(b.rng.normal(size=(1, 5, 1, 1)))])
    y = b.poly(y, (0.1, 1.0, 0.5))
    if kind == "conv1x1":
        y = b.conv(y, 3, 1, 1)
    else:
        y = b.node("Flatten", [y])
        y = b.node("Gemm", [y, b.const(b.rng.normal(size=(5, 3)))]) if kind == "gemm" else \
            b.node("MatMul", [y, b.const(b.rng.normal(size=(5, 3)))])
    check(b.out(y), b.x(x.shape), N=8192, L=4)


def test_gap_then_poly_is_a_clear_error():
    b = B(4)
    x = b.input((1, 3, 4, 4))
    y = b.poly(b.node("GlobalAveragePool", [x]))
    with pytest.raises(LoweringError, match=r"%poly = Poly.*garbage slots"):
        compile_sim(b.out(y))


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub"])
def test_vector_ops_across_equal_layouts(op):
    """x (an input [1, K]) with Gemm(x): different layout objects, same slots
    (regression: Mul compared layout ids and refused)."""
    b = B(6)
    x = b.input((1, 7))
    y = b.node("Gemm", [x, b.const(b.rng.normal(size=(7, 7))), b.const(b.rng.normal(size=7))])
    z = b.node(op, [x, y])
    check(b.out(z), b.x(x.shape), N=8192, L=3)


@FEW
@given(seed=seeds, c=st.integers(1, 8), h=st.integers(1, 10), w=st.integers(1, 10), scalar=st.booleans())
def test_batchnorm_standalone(seed, c, h, w, scalar):
    b = B(seed)
    x = b.input((1, c, h, w))
    y = b.node("Mul", [x, b.const(1.5)]) if scalar else x
    r = b.rng
    y = b.node("BatchNormalization", [y, b.const(r.normal(size=c)), b.const(r.normal(size=c)),
                                      b.const(r.normal(size=c)), b.const(r.uniform(0.5, 2.0, size=c))],
               {"epsilon": 1e-3})
    check(b.out(y), b.x(x.shape), N=8192, L=2)


# =========================================================================== elementwise

@st.composite
def poly_coeffs(draw):
    deg = draw(st.integers(1, 7))
    coef = st.one_of(st.just(0.0), st.floats(0.1, 1.0), st.floats(-1.0, -0.1))
    cs = [draw(coef) for _ in range(deg)]
    cs.append(draw(st.one_of(st.floats(0.1, 1.0), st.floats(-1.0, -0.1))))
    return cs


@PROPS
@given(seed=seeds, coeffs=poly_coeffs(), pre=st.sampled_from([None, "mul", "div", "conv"]),
       c=st.integers(1, 4), hw=st.integers(2, 8))
def test_poly(seed, coeffs, pre, c, hw):
    b = B(seed)
    x = b.input((1, c, hw, hw))
    y = x
    if pre == "mul":
        y = b.node("Mul", [y, b.const(0.7)])
    elif pre == "div":
        y = b.node("Div", [y, b.const(-1.6)])
    elif pre == "conv":
        y = b.conv(y, c, 3, 1)
    y = b.poly(y, coeffs)
    prog, _ = check(b.out(y), b.x(x.shape) * 0.8, N=8192, L=6)
    deg = len(coeffs) - 1
    assert prog.levels_used() <= _poly_depth(deg) + (pre == "conv")
    assert not _has_refresh(prog)


@PROPS
@given(seed=seeds, kind=st.sampled_from(["add_scalar", "sub_scalar", "rsub_scalar", "add_channel",
                                         "sub_channel", "add_full", "mul_scalar", "div_scalar",
                                         "mul_channel", "mul_full", "mul_self", "mul_other_input",
                                         "mul_conv", "pow", "add_self"]),
       pre_alpha=st.sampled_from([1.0, 0.5, -3.0]), c=st.integers(1, 5), h=st.integers(1, 7),
       w=st.integers(1, 7), e=st.integers(2, 5), swap=st.booleans())
def test_elementwise(seed, kind, pre_alpha, c, h, w, e, swap):
    b = B(seed)
    r = b.rng
    x = b.input((1, c, h, w))
    feeds = {"x": b.x(x.shape)}
    y = x
    if pre_alpha != 1.0:
        y = b.node("Mul", [y, b.const(pre_alpha)])

    def bin_(op, k):
        ins = [y, b.const(k)]
        return b.node(op, ins[::-1] if swap and op in ("Add", "Mul") else ins)

    if kind == "add_scalar":
        z = bin_("Add", r.normal())
    elif kind == "sub_scalar":
        z = bin_("Sub", r.normal())
    elif kind == "rsub_scalar":
        z = b.node("Sub", [b.const(r.normal()), y])
    elif kind == "add_channel":
        z = bin_("Add", r.normal(size=(1, c, 1, 1)))
    elif kind == "sub_channel":
        z = b.node("Sub", [y, b.const(r.normal(size=(c, 1, 1)))])
    elif kind == "add_full":
        z = bin_("Add", r.normal(size=(1, c, h, w)))
    elif kind == "mul_scalar":
        z = bin_("Mul", r.normal())
    elif kind == "div_scalar":
        z = b.node("Div", [y, b.const(r.uniform(0.5, 3.0))])
    elif kind == "mul_channel":
        z = bin_("Mul", r.normal(size=(1, c, 1, 1)))
    elif kind == "mul_full":
        z = bin_("Mul", r.normal(size=(1, c, h, w)))
    elif kind == "mul_self":
        z = b.node("Mul", [y, y])
    elif kind == "mul_other_input":
        x2 = b.input((1, c, h, w), "x2")
        feeds["x2"] = b.x(x.shape)
        z = b.node("Mul", [y, x2] if not swap else [x2, y])
    elif kind == "mul_conv":
        if h < 3 or w < 3:
            z = b.node("Mul", [y, b.conv(y, c, 1, 1)])
        else:
            z = b.node("Mul", [y, b.conv(y, c, 3, 1)])
    elif kind == "pow":
        z = b.node("Pow", [y, b.const(float(e))])
    elif kind == "add_self":
        z = b.node("Add", [y, y])
    else:  # pragma: no cover
        raise AssertionError(kind)
    # one more op afterwards, so pending scalars and fills flow into a consumer
    z2 = b.node("Add", [z, b.const(0.25)])
    check(b.out(z2), feeds, N=8192, L=6)


# =========================================================================== residual structures

@PROPS
@given(seed=seeds, c=st.integers(1, 6), h=st.integers(3, 10), w=st.integers(3, 10), k=st.sampled_from([1, 3]),
       alpha=st.sampled_from([1.0, 0.5, 2.0]), swap=st.booleans(), n=st.sampled_from([2048, 8192]))
def test_identity_skip(seed, c, h, w, k, alpha, swap, n):
    """Add(conv2(poly(conv1(x))), x): conv2 adjusts to x (alpha, level, scale)."""
    b = B(seed)
    x = b.input((1, c, h, w))
    xs = b.node("Mul", [x, b.const(alpha)]) if alpha != 1.0 else x
    y = b.conv(xs, c, k, 1)
    y = b.poly(y, (0.0, 0.5, 0.2))
    y = b.conv(y, c, k, 1)
    add = b.node("Add", [y, xs] if not swap else [xs, y])
    z = b.poly(add, (0.1, 1.0, 0.1))
    prog, _ = check(b.out(z), b.x(x.shape), N=n, L=5)
    # conv2 absorbs the skip's alpha, level and scale: no multiplication at the Add, no refresh
    assert _fallback_muls(prog, add.name) == 0
    assert not _has_refresh(prog) and prog.levels_used() == 4


@PROPS
@given(seed=seeds, c=st.integers(1, 5), hw=st.integers(4, 12), w_extra=st.integers(0, 2),
       shortcut_first=st.booleans(), swap=st.booleans(), multiplex=st.booleans(), n=st.sampled_from([2048, 8192]))
def test_downsampling_block(seed, c, hw, w_extra, shortcut_first, swap, multiplex, n):
    """main: conv3x3/s2 -> poly -> conv3x3/s1; shortcut: conv1x1/s2; Add; poly."""
    b = B(seed)
    x = b.input((1, c, hw, hw + w_extra))
    m = 2 * c
    if shortcut_first:
        sc = b.conv(x, m, 1, 2, pads=(0, 0, 0, 0))
    y = b.conv(x, m, 3, 2)
    y = b.poly(y, (0.0, 0.5, 0.2))
    y = b.conv(y, m, 3, 1)
    if not shortcut_first:
        sc = b.conv(x, m, 1, 2, pads=(0, 0, 0, 0))
    add = b.node("Add", [y, sc] if not swap else [sc, y])
    z = b.poly(add, (0.1, 1.0, 0.1))
    g = b.out(z)
    bits, primes = _chain(n, 5, 40)
    prog, low = lower(g, Params(n, bits, 40, security="none"), primes, LoweringOptions(layout="multiplexed" if multiplex else "gapped"))
    verify_program(prog)
    xv = b.x(x.shape)
    outs, _ = Simulator(prog, cost=_ZeroCost()).run({"x": xv})
    assert rel_err(outs[z.name], hc.run_graph(g, xv)[0]) <= TOL
    assert _fallback_muls(prog, add.name) == 0
    assert not _has_refresh(prog)


@PROPS
@given(seed=seeds, c=st.integers(1, 5), hw=st.integers(3, 9), deg_a=st.integers(2, 4), deg_b=st.integers(1, 3),
       sub=st.booleans())
def test_add_two_polys(seed, c, hw, deg_a, deg_b, sub):
    """Neither operand comes from a linear op: the mul_plain fallback aligns alphas."""
    b = B(seed)
    x = b.input((1, c, hw, hw))
    a = b.poly(b.conv(x, c, 3, 1), [0.1] + [0.5] * (deg_a - 1) + [0.7])
    bb = b.poly(b.conv(x, c, 1, 1), [0.2] + [-0.3] * (deg_b - 1) + [1.3])
    z = b.node("Sub" if sub else "Add", [a, bb])
    prog, _ = check(b.out(z), b.x(x.shape), N=8192, L=6)
    assert _fallback_muls(prog, z.name) == 1


@FEW
@given(seed=seeds, c=st.integers(1, 5), h=st.integers(3, 8), scale=st.sampled_from([0.5, -2.0, 3.0]),
       k=st.sampled_from([1, 3]), order=st.booleans())
def test_scaled_input_plus_conv(seed, c, h, scale, k, order):
    """x*s + conv(x): the pending scalar on x and the conv's level/scale meet at the Add."""
    b = B(seed)
    x = b.input((1, c, h, h))
    xs = b.node("Mul", [x, b.const(scale)])
    y = b.conv(x, c, k, 1)
    z = b.node("Add", [xs, y] if order else [y, xs])
    prog, _ = check(b.out(z), b.x(x.shape), N=8192, L=3)
    assert _fallback_muls(prog, z.name) == 0


def test_skip_source_is_also_output():
    """Both operands of the Add are also graph outputs: nothing is adjustable."""
    b = B(5)
    x = b.input((1, 3, 6, 6))
    y = b.conv(x, 3, 3, 1)
    z = b.node("Add", [y, b.node("Mul", [x, b.const(0.5)])])
    check(b.out(z, y), b.x(x.shape), N=8192, L=3)


@pytest.mark.parametrize("op", ["Div", "Mul", "Identity", "Flatten"])
def test_linear_output_shared_through_scalar(op):
    """Add(s(conv(x)), conv(x)) with s a scalar Mul/Div (or a no-op): the conv's
    result is used twice, so the Add must not retarget the conv (regression:
    the pending-scalar path kept the conv adjustable and changed both uses)."""
    b = B(11)
    shape = (1, 3, 6, 6) if op != "Flatten" else (1, 5, 1, 1)
    x = b.input(shape)
    y = b.conv(x, shape[1], 3 if shape[2] > 1 else 1, 1)
    if op == "Div":
        s = b.node("Div", [y, b.const(1.43)])
    elif op == "Mul":
        s = b.node("Mul", [b.const(-0.6), y])
    else:
        s = b.node(op, [y])
        if op == "Flatten":
            y = b.node("Flatten", [y])
    z = b.node("Add", [s, y])
    check(b.out(z, y), b.x(x.shape), N=8192, L=3)
    check(b.out(z), b.x(x.shape), N=8192, L=3)


def test_scalar_between_linear_and_add_keeps_adjustable():
    """Add(conv(t) * 0.5, t) with single uses: the conv still absorbs the alignment."""
    b = B(12)
    x = b.input((1, 3, 6, 6))
    t = b.poly(b.conv(x, 3, 3, 1), (0.0, 1.0, 0.3))
    y = b.node("Div", [b.node("Mul", [b.conv(t, 3, 3, 1), b.const(0.5)]), b.const(3.0)])
    z = b.node("Add", [y, t])
    prog, _ = check(b.out(z), b.x(x.shape), N=8192, L=4)
    assert _fallback_muls(prog, z.name) == 0


def test_add_fallback_when_both_sides_are_at_level_zero():
    """Neither side adjustable and both at level 0: one side is refreshed first."""
    b = B(8)
    x = b.input((1, 2, 5, 5))
    a = b.poly(b.poly(x))
    c = b.poly(b.poly(b.node("Mul", [x, b.const(0.5)])))
    z = b.node("Add", [a, c])
    prog, _ = check(b.out(z), b.x(x.shape), N=8192, L=2)
    assert _has_refresh(prog) and _fallback_muls(prog, z.name) >= 1  # more when an alpha is normalised too


@FEW
@given(seed=seeds, depth=st.integers(3, 6), L=st.integers(2, 3), c=st.integers(1, 4), hw=st.integers(4, 8),
       residual=st.booleans())
def test_level_exhaustion_refreshes(seed, depth, L, c, hw, residual):
    """Conv+poly blocks beyond the modulus chain: refreshes are inserted and the output is right."""
    b = B(seed)
    x = b.input((1, c, hw, hw))
    y = x
    for _ in range(depth):
        t = b.conv(y, c, 3, 1)
        t = b.poly(t, (0.05, 0.6, 0.2))
        y = b.node("Add", [t, y]) if residual else t
    prog, low = check(b.out(y), b.x(x.shape) * 0.5, N=8192, L=L)
    assert _has_refresh(prog), "expected refresh ops with a short modulus chain"
    assert low.stats.refresh_points


def test_no_refresh_when_levels_suffice():
    b = B(9)
    x = b.input((1, 2, 6, 6))
    y = b.poly(b.conv(x, 2, 3, 1), (0.0, 1.0, 0.5))
    prog, _ = check(b.out(y), b.x(x.shape), N=8192, L=2)
    assert not _has_refresh(prog)


# =========================================================================== random networks

@st.composite
def networks(draw):
    """A random DAG of the ops the lowering supports, with skips between equal shapes."""
    seed = draw(seeds)
    r = np.random.default_rng(seed)
    b = B(seed)
    c, h, w = draw(st.integers(1, 6)), draw(st.integers(4, 12)), draw(st.integers(4, 12))
    x = b.input((1, c, h, w))
    vals = [x]
    ops = draw(st.lists(st.sampled_from(["conv", "conv_s2", "conv_s3", "dw", "poly", "pow", "mul", "div",
                                         "add_c", "mul_c", "add_full", "rsub", "add", "sub", "mul_xy",
                                         "pool", "bn", "identity"]), min_size=1, max_size=7))
    for op in ops:
        v = vals[-1] if draw(st.booleans()) else vals[draw(st.integers(0, len(vals) - 1))]
        vc, vh, vw = v.shape[1:]
        same = [u for u in vals if u.shape == v.shape and u is not v]
        if op.startswith("conv"):
            s = {"conv": 1, "conv_s2": 2, "conv_s3": 3}[op]
            k = 3 if min(vh, vw) >= 3 else 1
            pads = tuple(int(p) for p in r.integers(0, k, 4)) if s == 3 else None
            y = b.conv(v, int(r.integers(1, 7)), k, s, pads)
        elif op == "dw" and min(vh, vw) >= 3:
            y = b.conv(v, vc, 3, int(r.integers(1, 3)), group=vc)
        elif op == "poly":
            y = b.poly(v, list(r.uniform(-1, 1, int(r.integers(2, 5)))))
        elif op == "pow":
            y = b.node("Pow", [v, b.const(float(r.integers(1, 4)))])
        elif op == "mul":
            y = b.node("Mul", [v, b.const(r.uniform(-2, 2))])
        elif op == "div":
            y = b.node("Div", [v, b.const(r.uniform(0.5, 2))])
        elif op == "add_c":
            y = b.node("Add", [v, b.const(r.normal(size=(1, vc, 1, 1)))])
        elif op == "mul_c":
            y = b.node("Mul", [b.const(r.normal(size=(1, vc, 1, 1))), v])
        elif op == "add_full":
            y = b.node("Add", [b.const(r.normal(size=v.shape)), v])
        elif op == "rsub":
            y = b.node("Sub", [b.const(r.normal()), v])
        elif op in ("add", "sub") and same:
            u = same[int(r.integers(len(same)))]
            y = b.node(op.capitalize(), [v, u] if r.random() < 0.5 else [u, v])
        elif op == "mul_xy" and same:
            y = b.node("Mul", [v, same[int(r.integers(len(same)))]])
        elif op == "pool" and min(vh, vw) >= 2:
            y = b.node("AveragePool", [v], {"kernel_shape": (2, 2), "strides": (2, 2)})
        elif op == "bn":
            y = b.node("BatchNormalization", [v, b.const(r.normal(size=vc)), b.const(r.normal(size=vc)),
                                              b.const(r.normal(size=vc)), b.const(r.uniform(0.5, 2, size=vc))])
        elif op == "identity":
            y = b.node("Identity", [v])
        else:
            continue
        vals.append(y)
    outs = [vals[-1]]
    if draw(st.booleans()):
        y = vals[-1]
        if draw(st.booleans()):
            y = b.node("GlobalAveragePool", [y])
        y = b.node("Flatten", [y])
        y = b.node("Gemm", [y, b.const(r.normal(size=(3, y.shape[1]))), b.const(r.normal(size=3))], {"transB": 1})
        outs = [y]
    if len(vals) > 2 and draw(st.booleans()):
        outs.append(vals[draw(st.integers(1, len(vals) - 2))])
    g = b.out(*dict.fromkeys(outs))
    return g, b.x(x.shape) * 0.7


@settings(PROPS, max_examples=60)
@given(net=networks(), n=st.sampled_from([1024, 2048, 8192]), L=st.sampled_from([3, 4, 8]))
def test_random_networks(net, n, L):
    g, xv = net
    check(g, xv, N=n, L=L)


# =========================================================================== errors

@pytest.mark.parametrize("op,attrs,hint", [
    ("Relu", {}, "polynomial"),
    ("Clip", {"min": 0.0, "max": 6.0}, "polynomial"),
    ("MaxPool", {"kernel_shape": (2, 2), "strides": (2, 2)}, "AveragePool"),
])
def test_unsupported_ops_name_node(op, attrs, hint):
    b = B(0)
    x = b.input((1, 2, 4, 4))
    y = b.conv(x, 2, 3, 1)
    node = b.g.add_node(op, [y], attrs, name="act7")
    g = b.out(node.output)
    with pytest.raises(LoweringError) as ei:
        compile_sim(g)
    msg = str(ei.value)
    assert node.label in msg and op in msg and hint in msg and "replace" in msg.lower()
    assert "\n" not in msg


def test_conv_weight_not_constant():
    g = Graph()
    x = g.add_input("x", TensorType((1, 2, 5, 5), F64))
    w = g.add_input("w", TensorType((3, 2, 3, 3), F64))
    node = g.add_node("Conv", [x, w], {"pads": (1, 1, 1, 1)}, name="convw")
    g.outputs = [node.output]
    with pytest.raises(LoweringError) as ei:
        compile_sim(g)
    msg = str(ei.value)
    assert node.label in msg and "constant" in msg


def test_conv_weight_computed_from_encrypted_data():
    g = Graph()
    x = g.add_input("x", TensorType((1, 1, 3, 3), F64))
    w = g.add_node("Mul", [x, x]).output
    node = g.add_node("Conv", [x, w], {"pads": (1, 1, 1, 1)}, name="convx")
    g.outputs = [node.output]
    with pytest.raises(LoweringError) as ei:
        compile_sim(g)
    msg = str(ei.value)
    assert node.label in msg and "constant" in msg


# =========================================================================== rotation counts

def _rot_violations(low, slack: float = 1.0) -> list[str]:
    """Conv layers with more than ``slack * (1.5 * 2 * sqrt(#diagonals) + 2)`` rotations."""
    out = []
    for ly in low.stats.layers:
        if ly.op != "Conv":
            continue
        bound = slack * (1.5 * 2 * math.sqrt(ly.diagonals) + 2)
        if ly.rotations > bound:
            out.append(f"{ly.node}: {ly.rotations} rotations > {bound:.1f} for {ly.diagonals} diagonals "
                       f"({ly.layout_in} -> {ly.layout_out})")
    return out


#: the property tests' random convolutions (odd grids, strides and paddings) stay within this
#: multiple of the bound; CNN-shaped layers meet the bound itself (test_rotation_bound_typical)
_ROT_SLACK_RANDOM = 2.0


def _record_rotations(low, params) -> None:
    bad = _rot_violations(low, _ROT_SLACK_RANDOM)
    assert not bad, f"{bad[0]} params={params}"


def _conv_layers(case):
    c, h, w, m, k, s, pads, d, group, n = case
    b = B(0)
    x = b.input((1, c, h, w))
    y = b.conv(x, m, k, s, pads, d, group)
    _, low = check(b.out(y), b.x(x.shape), N=n, L=2)
    return low


# CNN-shaped layers (power-of-two grids, as in CIFAR/ImageNet ResNets): the bound must hold
_ROT_TYPICAL = [
    # (C, H, W, M, k, stride, pads, dilation, group, N)
    (3, 8, 8, 8, 3, 1, (1, 1, 1, 1), 1, 1, 8192),
    (8, 8, 8, 8, 3, 1, (1, 1, 1, 1), 1, 1, 8192),
    (8, 8, 8, 16, 3, 2, (1, 1, 1, 1), 1, 1, 8192),
    (8, 8, 8, 16, 1, 2, (0, 0, 0, 0), 1, 1, 8192),
    (16, 16, 16, 16, 3, 1, (1, 1, 1, 1), 1, 1, 8192),
    (16, 16, 16, 32, 3, 2, (1, 1, 1, 1), 1, 1, 8192),
    (16, 16, 16, 32, 1, 2, (0, 0, 0, 0), 1, 1, 8192),
    (8, 8, 8, 8, 3, 1, (1, 1, 1, 1), 1, 8, 8192),
    (16, 16, 16, 16, 3, 1, (1, 1, 1, 1), 1, 1, 2048),
    (32, 16, 16, 32, 3, 1, (1, 1, 1, 1), 1, 1, 4096),
]

# other shapes: known to exceed the bound (see test_rotation_bound_general)
_ROT_GENERAL = [
    (4, 12, 12, 4, 5, 1, (2, 2, 2, 2), 1, 1, 8192),
    (4, 11, 11, 7, 5, 1, (3, 0, 4, 3), 2, 1, 8192),
    (2, 5, 6, 7, 1, 2, (0, 0, 0, 0), 1, 1, 8192),
    (9, 12, 10, 1, 5, 3, (3, 4, 0, 0), 1, 1, 2048),
    (9, 10, 10, 9, 3, 3, (0, 0, 2, 0), 2, 9, 2048),
    (8, 12, 12, 9, 3, 1, (1, 2, 1, 0), 1, 1, 2048),
    (3, 32, 32, 16, 3, 1, (1, 1, 1, 1), 1, 1, 8192),
    (8, 7, 7, 8, 3, 1, (1, 1, 1, 1), 1, 1, 8192),
    (8, 7, 7, 16, 3, 2, (1, 1, 1, 1), 1, 1, 8192),
]


@pytest.mark.parametrize("case", _ROT_TYPICAL, ids=[str(c[:6]) for c in _ROT_TYPICAL])
def test_rotation_bound_typical(case):
    """rotations <= 1.5 * 2 * sqrt(#diagonals) + 2 for every conv layer."""
    assert _rot_violations(_conv_layers(case)) == []


#: odd shapes (input grids that are not powers of two, stride 3, asymmetric padding) that exceed the
#: bound today, by at most 31%: the known limitation the layout-strategy work is to remove
_ROT_KNOWN_OVER = {(9, 12, 10, 1, 5, 3), (9, 10, 10, 9, 3, 3), (8, 12, 12, 9, 3, 1)}


@pytest.mark.parametrize("case", _ROT_GENERAL, ids=[str(c[:6]) for c in _ROT_GENERAL])
def test_rotation_bound_general(case):
    """The bound on other shapes; the known exceptions stay within 1.35 times it, and a case that
    starts to meet the bound must leave the list (so the list stays the truth)."""
    low = _conv_layers(case)
    if case[:6] in _ROT_KNOWN_OVER:
        assert _rot_violations(low), f"{case[:6]} now meets the bound: remove it from _ROT_KNOWN_OVER"
        assert _rot_violations(low, 1.35) == []
    else:
        assert _rot_violations(low) == []
