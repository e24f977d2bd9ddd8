"""spinfx::qlinear_cpu, the C++ AVX2 / AVX-512 kernel (kernels/qlinear_cpu.cpp), against the float64 reference.

Tolerance, derived from the kernel's float32 arithmetic (not fitted): per output row it sums each group
with FMAs (group_size roundings along any one chain, fewer when split into interleaved chains), adds
the zero term (one FMA), scales and accumulates the G group sums (one FMA each) and adds the bias (one
rounding); the codes and zeros are exact integers and every FMA rounds once. With u = 2^-24 and
n = group_size + G + 2, the textbook bound for recursive sums gives, elementwise,
    |y - y_ref| <= γ_n · (|x|·Mᵀ + |b|),   γ_n = n·u / (1 - n·u),   M = (|c| + |z|)·s
(M = |W| without zeros). bf16 x is widened exactly and y rounded once more to bf16: + 2^-8·|y32|.
fp64 x runs dequantize + mm in fp64: n = K + 2 with u = 2^-53.
On a CPU without AVX-512 the 512-bit cases are skipped (and AVX-512 was only testable where the fleet
machine had it).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from spinfx.kernels import qlinear_cpu
from spinfx.kernels.qlinear import QLinear, plan_qlinear
from spinfx.kernels.quant_rtn import quantize_rtn
from spinfx.kernels.quant_weight import QuantWeight, dequantize

needs_kernel = pytest.mark.skipif(not qlinear_cpu.available(), reason="the C++ kernel did not build here")
WIDTHS = [256, pytest.param(512, marks=pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512", reason="this CPU has no AVX-512"))]
OP = torch.ops.spinfx.qlinear_cpu


def gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def magnitude(qw: QuantWeight) -> torch.Tensor:
    """M = (|c| + |z|)·s in float64 for the codes/zeros the kernel runs: c = u - zu when that fits a
    signed nibble, else c = u - 8, z = 8 - zu (kernels/qlinear_cpu.py `repack`)."""
    g = qw.group_index()
    u, zu, s = qw.unpack(), qw.zero_unsigned()[:, g], qw.weight_scale.double()[:, g]
    c = u - zu
    if int(c.min()) >= -8 and int(c.max()) <= 7:
        return c.abs().double() * s
    return ((u - 8).abs() + (8 - zu).abs()).double() * s


def assert_within_bound(y: torch.Tensor, x: torch.Tensor, qw: QuantWeight) -> None:
    w = dequantize(qw, torch.float64)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if qw.bias is None else qw.bias.double()
    ref = x.double() @ w.T + b
    k, g = qw.in_features, qw.num_groups
    if x.dtype == torch.float64:
        bound = gamma(k + 2, 2.0 ** -53) * (x.abs() @ w.abs().T + b.abs())
    else:
        bound = gamma((qw.group_size or k) + g + 2, 2.0 ** -24) * (x.double().abs() @ magnitude(qw).T + b.abs())
        if x.dtype == torch.bfloat16:
            bound = bound + 2.0 ** -8 * (ref.abs() + bound)
    assert y.dtype == x.dtype and y.shape == ref.shape
    excess = (y.double() - ref).abs() - bound
    assert excess.max() <= 0, f"max excess over the derived bound {excess.max():.3g}"


# (N, K, bits, group_size, symmetric, act_order, bias): odd N (not a multiple of 16), groups 32/64/128 and
# per-channel, 2/3/4 bits, asymmetric 4 bits whose codes leave [-8, 7] (the zeros tensor)
CASES = [(37, 256, 4, 64, True, False, True), (5, 384, 4, 128, False, False, False),
         (48, 96, 3, 32, False, True, True), (1, 200, 2, None, True, False, False),
         (20, 128, 4, 32, False, True, False), (100, 512, 4, 64, True, False, False)]  # 7 blocks: chunk tails


def _weight(n, k, bits, group_size, symmetric, act_order, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w[:, : k // 7] *= 20  # outlier input channels
    if not symmetric:
        w = w.abs() + 0.5 * torch.rand(n, 1, generator=gen)  # one-signed rows: zeros at the grid's edge
    g_idx = (torch.randperm(k, generator=gen) // group_size).to(torch.int32) if act_order else None
    b = torch.randn(n, generator=gen) if bias else None
    return quantize_rtn(w, bits, group_size, symmetric, g_idx=g_idx, bias=b)


@needs_kernel
@pytest.mark.parametrize("vector_bits", WIDTHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:2])) + f"-w{c[2]}g{c[3]}" +
                         ("" if c[4] else "-asym") + ("-actorder" if c[5] else "") + ("-bias" if c[6] else ""))
def test_matches_reference(case, vector_bits):
    qw = _weight(*case)
    perm, tensors, attrs = qlinear_cpu.repack(qw)
    attrs = {**attrs, "vector_bits": vector_bits}
    gen = torch.Generator().manual_seed(1)
    # M = 1 (decode), 3 (a partial tile), 2×9 (more rows than one tile of 4 / 8, leading dims kept)
    for shape in ((1, qw.in_features), (3, qw.in_features), (2, 9, qw.in_features)):
        x = torch.randn(*shape, generator=gen)
        for dt in (torch.float32, torch.bfloat16, torch.float64):
            xd = x.to(dt)
            xp = xd if perm is None else xd.index_select(-1, perm)
            assert_within_bound(OP(xp, **tensors, bias=qw.bias, **attrs), xd, qw)
        assert_within_bound(plan_qlinear(qw)(x), x, qw)  # the plan's own wrapper (permutation included)


@needs_kernel
def test_rows_are_independent_of_batch_and_vector_width():
    # every output lane runs the same FMA sequence whatever the tile (M), N or body: a row of x gives the
    # same bits alone or in a batch (decode == prefill), and the AVX2 body the AVX-512 body's bits
    qw = _weight(40, 128, 4, 32, False, False, True)
    _, tensors, attrs = qlinear_cpu.repack(qw)
    x = torch.randn(19, 128, generator=torch.Generator().manual_seed(2))
    y = OP(x, **tensors, bias=qw.bias, **attrs)
    assert all(torch.equal(y[i:i + 1], OP(x[i:i + 1], **tensors, bias=qw.bias, **attrs)) for i in range(19))
    if qlinear_cpu.vector_bits() == 512:
        assert torch.equal(y, OP(x, **tensors, bias=qw.bias, **{**attrs, "vector_bits": 256}))


@needs_kernel
def test_layout_details():
    # asymmetric 4-bit codes beyond [-8, 7] run as c = u - 8 with integer zeros; the rest without zeros
    assert qlinear_cpu.repack(_weight(*CASES[1]))[1]["q4_zeros"] is not None
    for case in (CASES[0], CASES[2]):
        assert qlinear_cpu.repack(_weight(*case))[1]["q4_zeros"] is None
    # the identity recovers the weight exactly, w = fl((c + z)·s), also on the padded last block
    qw = _weight(37, 256, 4, 64, False, False, False)
    eye = torch.eye(256)
    assert torch.equal(QLinear(qw)(eye).T, dequantize(qw, torch.float32))


@needs_kernel
def test_plan_prefers_the_kernel():
    w = torch.randn(40, 200)
    for qw in (quantize_rtn(w, 4, None), quantize_rtn(w[:, :192], 3, 64, symmetric=False),
               quantize_rtn(w[:, :192], 4, 32, g_idx=(torch.randperm(192) // 32).to(torch.int32))):
        assert [c.op for c in plan_qlinear(qw).calls] == [OP.default]
    assert plan_qlinear(quantize_rtn(w, 4, None), cpu_compute_dtype=None).calls[0].op is torch.ops.spinfx.qlinear.default
    assert plan_qlinear(quantize_rtn(w[:, :192], 8, None)).calls[0].op is torch.ops.spinfx.qlinear_int8pack.default
    assert not qlinear_cpu.eligible(quantize_rtn(w[:, :196], 4, None))  # K % 8
    qw = quantize_rtn(w[:32, :192], 4, 64)  # N % 16 == 0: aten's int4 path takes it too
    with qlinear_cpu.disabled():  # what SPINFX_CPP_KERNELS=0 does for a whole process
        assert plan_qlinear(qw).calls[0].op is torch.ops.spinfx.qlinear_int4pack.default
    assert plan_qlinear(qw).calls[0].op is OP.default


@needs_kernel
def test_opcheck():  # Inductor runs it as an extern call: test_qlinear.py::test_torch_compile_inductor_keeps_ops_visible
    qw = _weight(20, 128, 4, 32, False, False, True)
    _, tensors, attrs = qlinear_cpu.repack(qw)
    torch.library.opcheck(OP.default, (torch.randn(2, 3, 128), *tensors.values(), qw.bias, *attrs.values()),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif(qlinear_cpu.vector_bits() is None, reason="no AVX2: the kernel is never tried")
def test_fallback_when_the_build_fails(monkeypatch):
    def broken():
        raise OSError("no compiler here\nsecond line")

    monkeypatch.setattr(qlinear_cpu, "_build", broken)
    qlinear_cpu.available.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            plan = plan_qlinear(quantize_rtn(torch.randn(32, 128), 4, 64))
            plan_qlinear(quantize_rtn(torch.randn(32, 128), 4, 64))  # warned once: the answer is cached
        assert [c.op for c in plan.calls] == [torch.ops.spinfx.qlinear_int4pack.default]
        lines = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
        assert len(lines) == 1 and "no compiler here" in lines[0] and "\n" not in lines[0]
    finally:
        qlinear_cpu.available.cache_clear()
