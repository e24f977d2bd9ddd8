"""Quantized weight layouts, RTN, and the spinfx::qlinear op family.

Kernel tolerance (every path, every layout): with y_ref = x·Wᵀ + b in float64, W = dequantize(qw, float64),
    |y - y_ref| <= rtol · (|x|·Mᵀ + |b|)   elementwise,   M = (|q| + |z|)·s
(M = |W| for symmetric weights; asymmetric ones may be dequantized as q·s - z·s, and the int4 kernel does
exactly that with z·s rounded to bf16, so rounding scales with both terms),
rtol = 1e-5 when the kernel computes in float32 (generic op and Triton with fp32 activations), 1e-2 when
it computes in bfloat16 (bf16 activations; the CPU int4/int8 fast paths always: x, W and y are rounded
to bf16, 2^-9 relative each).
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spinfx.kernels import qlinear_cpu
from spinfx.kernels.qlinear import QLinear, generic_attrs, generic_tensors, plan_qlinear, qlinear_decompositions
from spinfx.kernels.quant_pack import pack_int32, packed_width, unpack_int32
from spinfx.kernels.quant_rtn import quantize_rtn, quantize_rtn_mixed
from spinfx.kernels.quant_weight import MixedQuantWeight, QuantWeight, dequantize

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
aten_plan = functools.partial(plan_qlinear, cpp=False)  # the aten CPU paths, without the C++ kernel
FAST_PATHS = ("spinfx::qlinear_int4pack", "spinfx::qlinear_int8pack")
OPS = torch.ops.spinfx
SETTINGS = settings(max_examples=40, deadline=None)


def term_magnitude(qw: QuantWeight | MixedQuantWeight) -> torch.Tensor:
    """M = (|q| + |z|)·s in float64, [N, K]."""
    if isinstance(qw, MixedQuantWeight):
        stored = torch.cat([term_magnitude(s) for s in qw.segments], 1)
        return torch.empty_like(stored).index_copy_(1, qw.perm, stored)
    mid, g = 1 << (qw.bits - 1), qw.group_index()
    z = qw.zero_unsigned()[:, g] - mid
    return ((qw.unpack() - mid - z).abs() + z.abs()).double() * qw.weight_scale.double()[:, g]


def assert_kernel_close(y: torch.Tensor, x: torch.Tensor, qw: QuantWeight | MixedQuantWeight,
                        compute_dtype: torch.dtype | None = None) -> None:
    w = dequantize(qw, torch.float64)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if qw.bias is None else qw.bias.double()
    ref = x.double() @ w.T + b
    bound = RTOL[compute_dtype or x.dtype] * (x.double().abs() @ term_magnitude(qw).T + b.abs())
    assert y.dtype == x.dtype and y.shape == ref.shape
    excess = (y.double() - ref).abs() - bound
    assert excess.max() <= 0, f"max excess over tolerance {excess.max():.3g}"


def op_names(plan) -> list[str]:
    return [c.op.name() for c in plan.calls]


def compute_dtype(plan, x: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if set(op_names(plan)) & set(FAST_PATHS) else x.dtype


@st.composite
def layouts(draw, mixed_ok: bool = False):
    """A random QuantWeight (or MixedQuantWeight) with its source float weight."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    n = draw(st.sampled_from([1, 5, 16, 48]))
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    group_size = draw(st.sampled_from([None, 32, 64, 128]))
    k = draw(st.integers(1, 150)) if group_size is None else group_size * draw(st.integers(1, 3))
    w = torch.randn(n, k, generator=gen) * draw(st.sampled_from([1e-3, 1.0]))
    w[:, : k // 7] *= 20  # some outlier input channels
    bias = torch.randn(n, generator=gen) if draw(st.booleans()) else None
    symmetric = draw(st.booleans())
    if mixed_ok and group_size is not None and draw(st.booleans()):
        widths = draw(st.lists(st.sampled_from([2, 3, 4, 8]), min_size=k // group_size, max_size=k // group_size))
        order = torch.randperm(k, generator=gen) if draw(st.booleans()) else None
        return w, quantize_rtn_mixed(w, widths, group_size, symmetric, order=order, bias=bias)
    g_idx = None
    if group_size is not None and draw(st.booleans()):  # act-order: groups of columns in a random order
        g_idx = (torch.randperm(k, generator=gen) // group_size).to(torch.int32)
    scale_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return w, quantize_rtn(w, bits, group_size, symmetric, g_idx=g_idx, bias=bias, scale_dtype=scale_dtype)


# --- packing -----------------------------------------------------------------------------------------
@SETTINGS
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 9), cols=st.integers(1, 70), seed=st.integers(0, 99))
def test_pack_unpack_bit_exact(bits, rows, cols, seed):
    u = torch.randint(0, 1 << bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    packed = pack_int32(u, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, packed_width(cols, bits))
    assert torch.equal(unpack_int32(packed, bits, cols), u.to(torch.int32))
    # the layout itself: value k in word k // pf at bit (k % pf) * bits, padding bits zero
    pf = 32 // bits
    words = [sum(int(u[0, j]) << ((j % pf) * bits) for j in range(w * pf, min(cols, (w + 1) * pf)))
             for w in range(packed.shape[1])]
    assert [v & 0xFFFFFFFF for v in packed[0].tolist()] == words


def test_pack_matches_compressed_tensors_example():
    # compressed-tensors' pack_to_int32 docstring: 8-bit signed [1, 2] -> stored [129, 130] -> 33409
    assert pack_int32(torch.tensor([[1, 2]]) + 128, 8).item() == 33409
    assert packed_width(576, 3) == 58  # 3 bits: 10 values per word


# --- layouts, RTN, the ops ---------------------------------------------------------------------------
@SETTINGS
@given(layouts(mixed_ok=True), st.sampled_from([(1,), (3,), (2, 3)]))
def test_plan_matches_reference(layout, lead):
    w, qw = layout
    x = torch.randn(*lead, qw.weight_shape[1], generator=torch.Generator().manual_seed(0))
    plan = plan_qlinear(qw)
    assert_kernel_close(plan(x), x, qw, compute_dtype(plan, x))
    assert torch.equal(QLinear(qw)(x), plan(x))
    # without the bf16 fast paths every call is exact in fp32; in float64 too
    assert_kernel_close(plan_qlinear(qw, cpu_compute_dtype=None)(x), x, qw)
    exact = plan_qlinear(qw, cpu_compute_dtype=torch.float32)
    assert_kernel_close(exact(x), x, qw)
    ref64 = x.double() @ dequantize(qw, torch.float64).T + (0 if qw.bias is None else qw.bias.double())
    torch.testing.assert_close(plan_qlinear(qw, cpu_compute_dtype=None)(x.double()), ref64, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(layouts())
def test_generic_op_matches_reference_every_layout(layout):
    _, qw = layout
    x = torch.randn(4, qw.in_features, generator=torch.Generator().manual_seed(0))
    assert_kernel_close(OPS.qlinear(x, **generic_tensors(qw, qw.bias), **generic_attrs(qw)), x, qw)


@SETTINGS
@given(layouts())
def test_rtn_in_row_chunks_is_rtn_and_returns_the_dequantized_weight(layout):
    # RTN goes through W a few rows at a time (bounded temporaries on an 8B layer): the same codes and
    # scales as in one piece, and the Ŵ it returns is exactly what the stored tensors dequantize to
    import spinfx.kernels.quant_pack as pack

    w, qw = layout
    kw = dict(g_idx=qw.weight_g_idx, bias=qw.bias, scale_dtype=qw.weight_scale.dtype)
    whole = pack.ROW_CHUNK
    try:
        pack.ROW_CHUNK = 1  # one row per chunk
        chunked, w_hat = quantize_rtn(w, qw.bits, qw.group_size, qw.symmetric, dequantized=True, **kw)
    finally:
        pack.ROW_CHUNK = whole
    for name in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"):
        a, b = getattr(qw, name), getattr(chunked, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
    assert w_hat.dtype == torch.float64 and torch.equal(w_hat, dequantize(qw, torch.float64))


@SETTINGS
@given(layouts())
def test_generic_op_in_row_chunks_matches_one_piece(layout):
    import spinfx.kernels.qlinear as ql
    import spinfx.kernels.quant_pack as pack

    _, qw = layout
    x = torch.randn(3, qw.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    args = (x, *generic_tensors(qw, qw.bias).values(), *generic_attrs(qw).values())
    whole = pack.ROW_CHUNK
    try:
        pack.ROW_CHUNK = 2 * qw.in_features  # two output rows per chunk
        got = ql.dequant_linear_chunked(*args)
    finally:
        pack.ROW_CHUNK = whole
    # the same dequantized W; only the mm's blocking may differ: float64 rounding of K-term dot products
    w_abs = dequantize(qw, torch.float64).abs()
    assert ((got - ql.dequant_linear(*args)).abs() <= 1e-14 * qw.in_features * (x.abs() @ w_abs.T)).all()


@SETTINGS
@given(layouts())
def test_rtn_error_bound_and_dtypes(layout):
    w, qw = layout
    s = qw.weight_scale.double()[:, qw.group_index()]
    assert ((w.double() - dequantize(qw, torch.float64)).abs() <= s / 2).all()
    assert qw.weight_packed.dtype == torch.int32 and qw.weight_scale.dtype in (
        torch.float32, torch.bfloat16, torch.float16)
    if not qw.symmetric:
        assert qw.weight_zero_point.dtype == torch.int8


@SETTINGS
@given(layouts())
def test_compressed_tensors_round_trip(layout):
    _, qw = layout
    ct = qw.to_compressed_tensors()
    n, k = qw.weight_shape
    pf = 32 // qw.bits
    assert set(ct) <= {"weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "bias"}
    assert ct["weight_packed"].shape == (n, -(-k // pf)) and ct["weight_shape"].tolist() == [n, k]
    assert ("weight_zero_point" in ct) == (not qw.symmetric)
    if not qw.symmetric:  # packed along N, like compressed-tensors
        assert ct["weight_zero_point"].dtype == torch.int32
        assert ct["weight_zero_point"].shape == (-(-n // pf), qw.num_groups)
    back = QuantWeight.from_compressed_tensors(ct, bits=qw.bits, group_size=qw.group_size)
    for name in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "bias"):
        a, b = getattr(qw, name), getattr(back, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
    assert back.weight_shape == qw.weight_shape


def test_symmetric_values_stored_with_offset():
    w = torch.tensor([[-7.5, -1.0, 0.0, 1.0, 7.5, 3.0, -3.0, 2.0]])  # max|w| = 7.5 -> scale 1 at 4 bits
    qw = quantize_rtn(w, 4, None)
    assert qw.weight_scale.item() == 1.0
    # q = round(w) clamped to [-8, 7]: 7.5 -> 7; stored u = q + 8
    assert qw.unpack().tolist() == [[0, 7, 8, 9, 15, 11, 5, 10]]


@pytest.mark.parametrize("scale_dtype, expected", [(torch.bfloat16, 4.25), (torch.float32, 4.5)])
def test_bits_per_weight_w4_g64(scale_dtype, expected):
    qw = quantize_rtn(torch.randn(576, 1536), 4, 64, scale_dtype=scale_dtype)
    assert qw.bits_per_weight() == pytest.approx(expected, abs=1e-3)  # weight_shape adds 16 bytes


@pytest.mark.parametrize("act_order", [False, True])
def test_layout_to_op_choice(act_order):
    # the aten paths (cpp=False); where the C++ kernel builds it takes <= 4 bits first: test_qlinear_cpu.py
    w = torch.randn(64, 256)
    g_idx = (torch.randperm(256) // 64).to(torch.int32) if act_order else None
    for bits, symmetric in ((4, True), (4, False), (3, False), (2, True)):
        plan = aten_plan(quantize_rtn(w, bits, 64, symmetric, g_idx=g_idx))
        assert op_names(plan) == ["spinfx::qlinear_int4pack"] and (plan.perm is not None) == act_order
    per_channel = aten_plan(quantize_rtn(w, 3, None))
    assert op_names(per_channel) == ["spinfx::qlinear_int4pack"] and per_channel.calls[0].attrs["group_size"] == 256
    assert op_names(aten_plan(quantize_rtn(w, 8, None))) == ["spinfx::qlinear_int8pack"]
    for qw in (quantize_rtn(w[:40], 4, 64),  # N % 16 != 0
               quantize_rtn(w[:, :200], 4, None),  # per-channel, K = 200 has no group size 32..256
               quantize_rtn(w, 4, 64, g_idx=torch.randint(0, 4, (256,), dtype=torch.int32)),  # unequal groups
               quantize_rtn(w, 8, 64), quantize_rtn(w, 8, None, symmetric=False), quantize_rtn(w[:, :200], 8, None)):
        assert op_names(aten_plan(qw)) == ["spinfx::qlinear"]
    assert op_names(aten_plan(quantize_rtn(w, 4, 64), cpu_compute_dtype=None)) == ["spinfx::qlinear"]
    mixed = aten_plan(quantize_rtn_mixed(w, [2, 4, 3, 8], 64))  # stored widest first: 8, 4, 3, 2
    assert op_names(mixed) == ["spinfx::qlinear"] + ["spinfx::qlinear_int4pack"] * 3


def test_int4pack_runs_low_bit_codes_exactly():
    # 2/3-bit and symmetric 4-bit codes are re-based into [0, 15] with zero 0: exact in fp32 compute
    w = torch.randn(32, 128)
    for qw in (quantize_rtn(w, 3, 32, symmetric=False), quantize_rtn(w, 2, None), quantize_rtn(w, 4, 64)):
        plan = aten_plan(qw, cpu_compute_dtype=torch.float32)
        assert not plan.calls[0].tensors["scale_and_zeros"][..., 1].any()
        x = torch.randn(3, 128)
        assert_kernel_close(plan(x), x, qw)
    # asymmetric 4-bit codes may span [-15, 15]: stored u with a float zero (8 - zu)·s
    w[:, 0] = 5.0  # a row range that is all positive pushes zu to qmin
    qw = quantize_rtn(w.abs(), 4, 64, symmetric=False)
    assert aten_plan(qw).calls[0].tensors["scale_and_zeros"][..., 1].any()


def test_int4_int8_fast_paths_bf16():
    w, b = torch.randn(48, 256), torch.randn(48)
    for qw in (quantize_rtn(w, 4, 128, bias=b), quantize_rtn(w, 4, 64, symmetric=False),
               quantize_rtn(w, 4, 32, g_idx=(torch.randperm(256) // 32).to(torch.int32)), quantize_rtn(w, 8, None)):
        plan = aten_plan(qw)
        assert op_names(plan)[0] in FAST_PATHS
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(2, 5, 256, dtype=dtype)
            assert_kernel_close(plan(x), x, qw, torch.bfloat16)


def test_mixed_layout_structure():
    w = torch.randn(16, 256)
    order = torch.randperm(256)
    mq = quantize_rtn_mixed(w, [3, 8, 3, 4], 64, order=order)
    assert [s.bits for s in mq.segments] == [8, 4, 3] and [s.in_features for s in mq.segments] == [64, 64, 128]
    # widest group first: group 1 = columns order[64:128]
    assert torch.equal(mq.perm[:64], order[64:128])
    assert torch.equal(torch.sort(mq.perm).values, torch.arange(256))
    # 8/4/3.2 bits (3-bit: 10 per word) + fp32 scale per 64 + an int64 perm entry per column over N=16 rows,
    # + padding of the last 3-bit word (13 words for 128 values) + three 16-byte weight_shape tensors
    expected = (8 * 64 + 4 * 64 + 13 * 32) / 256 + 32 / 64 + 64 / 16 + 3 * 128 / (16 * 256)
    assert mq.bits_per_weight() == pytest.approx(expected)


# --- tensor parallelism ------------------------------------------------------------------------------
@SETTINGS
@given(layouts(), st.integers(1, 3))
def test_shards_consolidate_bit_exactly(layout, parts):
    _, qw = layout
    n, k = qw.weight_shape
    unit = qw.group_size if qw.group_size and qw.weight_g_idx is None else 1
    row_cuts = sorted({0, n, *[n * i // parts for i in range(1, parts)]})
    col_cuts = sorted({0, k, *[(k // unit) * i // parts * unit for i in range(1, parts)]})
    for dim, cuts, cut in ((0, row_cuts, qw.slice_rows), (1, col_cuts, qw.slice_cols)):
        shards = [cut(a, b) for a, b in zip(cuts, cuts[1:])]
        whole = QuantWeight.concat(shards, dim)
        for name in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "bias"):
            a, b = getattr(qw, name), getattr(whole, name)
            assert (a is None and b is None) or torch.equal(a, b), (dim, name)
        deq = dequantize(qw)
        for (a, b), s in zip(zip(cuts, cuts[1:]), shards):
            assert torch.equal(dequantize(s), deq[a:b] if dim == 0 else deq[:, a:b])
    # row-parallel: partial outputs of the K shards sum to the full output (bias added once)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    ranges = list(zip(col_cuts, col_cuts[1:]))
    shards = [qw.slice_cols(a, b) for a, b in ranges]
    y = sum(plan_qlinear(s, cpu_compute_dtype=None)(x[:, a:b]) for (a, b), s in zip(ranges, shards))
    assert_kernel_close(y, x, qw)


def test_mixed_row_shards():
    mq = quantize_rtn_mixed(torch.randn(32, 128), [4, 2], 64, bias=torch.randn(32))
    assert torch.equal(torch.cat([dequantize(mq.slice_rows(0, 16)), dequantize(mq.slice_rows(16, 32))]),
                       dequantize(mq))


def test_invalid_layouts_are_refused():
    qw = quantize_rtn(torch.randn(8, 64), 4, 32)
    with pytest.raises(ValueError):
        quantize_rtn(torch.randn(8, 48), 4, 32)  # K % group_size
    with pytest.raises(ValueError):
        QuantWeight(qw.weight_packed, qw.weight_scale[:, :1], None, None, 4, 32, (8, 64))
    with pytest.raises(ValueError):
        qw.slice_cols(16, 64)  # not on a group boundary
    with pytest.raises(ValueError):
        pack_int32(torch.tensor([[16]]), 4)


# --- torch.library / torch.compile ---------------------------------------------------------------------
def _op_cases():
    w, b = torch.randn(32, 128), torch.randn(32)
    x = torch.randn(2, 3, 128)
    act_order = (torch.randperm(128) // 32).to(torch.int32)
    for qw, fast in ((quantize_rtn(w, 3, 64, symmetric=False, bias=b), False),
                     (quantize_rtn(w, 2, 32, g_idx=act_order), False),
                     (quantize_rtn(w, 4, 64, symmetric=False, bias=b), True), (quantize_rtn(w, 8, None), True)):
        c = plan_qlinear(qw, cpu_compute_dtype=torch.bfloat16 if fast else None, cpp=False).calls[0]
        yield c.op, (x, *c.tensors.values(), *c.attrs.values())


@pytest.mark.parametrize("op, args", list(_op_cases()), ids=lambda v: getattr(v, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_torch_compile_inductor_keeps_ops_visible():
    torch._dynamo.reset()
    w = torch.randn(64, 192)
    mods = [QLinear(quantize_rtn(w, 4, 64)), QLinear(quantize_rtn(w.T.contiguous(), 8, 32, symmetric=False))]

    def f(x):
        return mods[1](torch.relu(mods[0](x))) * 2

    seen = []

    def spy(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x = torch.randn(3, 192)
    torch.compile(f, backend=spy, fullgraph=True)(x)
    int4 = "spinfx.qlinear_cpu.default" if qlinear_cpu.available() else "spinfx.qlinear_int4pack.default"
    assert int4 in seen and "spinfx.qlinear.default" in seen
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=1e-5, atol=1e-5)


def test_inductor_decomposition_of_generic_op():
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    torch._dynamo.reset()
    qw = quantize_rtn(torch.randn(32, 128), 3, 64, g_idx=(torch.randperm(128) // 64).to(torch.int32),
                      bias=torch.randn(32))
    mod = QLinear(qw, cpu_compute_dtype=None)  # the generic op
    x = torch.randn(2, 128)
    traced = make_fx(mod, decomposition_table=qlinear_decompositions())(x)
    assert not any("spinfx" in str(n.target) for n in traced.graph.nodes)

    def backend(gm, example_inputs):
        return compile_fx(gm, example_inputs, decompositions={**select_decomp_table(), **qlinear_decompositions()})

    assert_kernel_close(torch.compile(mod, backend=backend, fullgraph=True)(x), x, qw)


# --- Triton (interpreter on CPU) -----------------------------------------------------------------------
TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from spinfx.kernels.qlinear import dequant_weight, generic_attrs, generic_tensors
    from spinfx.kernels.qlinear_triton import dequant_triton, plan, qlinear_triton
    from spinfx.kernels.quant_rtn import quantize_rtn
    from spinfx.kernels.quant_weight import dequantize
    torch.manual_seed(0)
    RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

    def layout(n, k, bits, group, symmetric, act_order, bias=True):
        g_idx = (torch.randperm(k) // group).to(torch.int32) if act_order else None
        return quantize_rtn(torch.randn(n, k), bits, group, symmetric=symmetric, g_idx=g_idx,
                            bias=torch.randn(n) if bias else None)

    def check(qw, x, p=None, what=None):
        y = qlinear_triton(x, **generic_tensors(qw, qw.bias), **generic_attrs(qw), plan_=p)
        wd = dequantize(qw, torch.float64)
        b = torch.zeros(wd.shape[0], dtype=torch.float64) if qw.bias is None else qw.bias.double()
        ref = x.double() @ wd.T + b
        bound = RTOL[x.dtype] * (x.double().abs() @ wd.abs().T + b.abs())
        assert y.dtype == x.dtype and y.shape == ref.shape, what
        assert ((y.double() - ref).abs() <= bound).all(), (what, ((y.double() - ref).abs() / bound).max())

    # every width, act-order or not, default plans: GEMV at M = 3, dequantize + mm at M = 64
    n, k = 32, 128
    for bits in (2, 3, 4, 8):
        for act_order in (False, True):
            qw = layout(n, k, bits, 64, not act_order, act_order)
            for shape in ((1, 3, k), (2, 32, k)):
                check(qw, torch.randn(*shape), what=(bits, act_order, shape))
    # GEMV, forced splits: N = 40 (a partial 16-row tile), K tails (partial steps and words), x rows
    # masked and in several row blocks, each way of loading scales, bias in the split-K reduction or
    # in the GEMV (split = 1), fp32 and bf16 x.
    #   bits group sym   act    K  M  dtype           split step_groups m_blocks
    GEMV = [(4, 64, True, False, 192, 1, torch.float32, 3, 1, 1),     # one group per step, no bias
            (4, None, False, False, 150, 3, torch.bfloat16, 2, 1, 1),  # per-channel zeros, K tail
            (2, 32, False, False, 192, 1, torch.float32, 2, 4, 1),    # 4 groups per step, partial step
            (4, 32, True, False, 160, 6, torch.float32, 2, 2, 2),     # 2 groups per step, 2 row blocks
            (3, 64, False, True, 192, 2, torch.bfloat16, 3, 0, 1),    # per code: act-order g_idx
            (3, 64, True, False, 192, 1, torch.float32, 2, 0, 1),     # per code: groups split words
            (8, 64, False, False, 192, 16, torch.bfloat16, 1, 1, 4)]  # split 1: bias in the GEMV
    for bits, group, sym, act, k, m, dt, split, groups, mb in GEMV:
        qw = layout(40, k, bits, group, sym, act, bias=(bits, group) != (4, 64))
        p = plan(m, 40, k, bits, group or k, act, 8, "gemv", split)
        assert (p.split, p.step_groups, p.m_blocks) == (split, groups, mb) and 40 % p.block_n, p
        check(qw, torch.randn(m, k).to(dt), p, what=(bits, group, p))
    # dequantize + mm (M = 5 forced; M = 17, 20 by default), and the dequantized W itself: bit-equal
    # to the CPU's in fp32
    for bits, group, sym, act, k, m, dt in ((4, 64, False, True, 192, 20, torch.float32),
                                            (3, 64, True, False, 192, 5, torch.bfloat16),
                                            (8, None, True, False, 150, 17, torch.float32),
                                            (2, 32, False, False, 96, 20, torch.bfloat16)):
        qw = layout(40, k, bits, group, sym, act, bias=bits != 8)
        check(qw, torch.randn(m, k).to(dt), plan(m, 40, k, bits, group or k, act, 8, "dequant_mm"),
              what=(bits, group, m))
        t, a = generic_tensors(qw, None), generic_attrs(qw)
        args = (t["weight_packed"], t["weight_scale"], t["weight_zero_point"], t["weight_g_idx"], bits,
                a["group_size"], k, torch.float32)
        assert torch.equal(dequant_triton(*args), dequant_weight(*args)), (bits, group)
    print("TRITON-OK")
""")


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "TRITON-OK" in out.stdout, out.stderr[-3000:]
