"""GPTQ core: Hessian accumulation, error compensation beats RTN, act-order, dead columns, siblings.
(Speed: bench/README.md "Quality", GPTQ time vs calibration tokens; no timed assertions here.)"""
from __future__ import annotations

import pytest
import torch

from spinfx.kernels.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_siblings, hessian_factor
from spinfx.kernels import qlinear_cpu
from spinfx.kernels.qlinear import plan_qlinear
from spinfx.kernels.quant_rtn import quantize_rtn
from spinfx.kernels.quant_weight import dequantize


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations with a decaying spectrum, correlated channels and a few outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) * torch.logspace(0, -2, k)[:, None]
    x = torch.randn(n, k, generator=gen) @ mix + 0.05 * torch.randn(n, k, generator=gen)
    x[:, :4] *= 10
    return x


def output_error(x: torch.Tensor, w: torch.Tensor, qw) -> float:
    """‖X Wᵀ − X Ŵᵀ‖²_F in float64."""
    return float(((x.double() @ (w.double() - dequantize(qw, torch.float64)).T) ** 2).sum())


@pytest.fixture(scope="module")
def layer():
    x = correlated_inputs(1024, 256)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    acc = HessianAccumulator(256)
    for chunk in x.split(300):
        acc.add(chunk.view(-1, 4, 256) if len(chunk) % 4 == 0 else chunk)
    return x, w, acc.hessian()


def test_hessian_accumulator_matches_definition(layer):
    x, _, h = layer
    assert h.dtype == torch.float64
    torch.testing.assert_close(h, 2 * x.double().T @ x.double() / len(x))


def test_float32_accumulator_is_the_full_float32_product_summed_in_float64():
    """Calibration's accumulator (float32 products of ≥ 4096 rows, only the block upper triangle
    multiplied, the rest mirrored) gives the full float32 product xᵀx of each 4096-row chunk summed in
    float64, bit for bit (what GPTQ calibration computed before the triangle): the same Hessians."""
    for k in (96, 800):  # one block; three blocks of 267, the last one short
        x = correlated_inputs(6144, k)
        acc = HessianAccumulator(k, dtype=torch.float32)
        for chunk in x.split(2048):
            acc.add(chunk.view(2, -1, k))
        ref = sum((c.T @ c).double() for c in x.split(4096)) * (2.0 / len(x))
        assert acc.block <= 384 and torch.equal(acc.hessian(), ref)


@pytest.mark.parametrize("symmetric, act_order, clip, group_size", [
    (True, False, "minmax", 64), (True, True, "mse", 64), (False, True, "minmax", None)])
def test_siblings_in_one_column_loop_equal_one_by_one(layer, symmetric, act_order, clip, group_size):
    """q/k/v (gate/up) read one input: quantized together (rows stacked, one factorization of H) they
    get exactly the codes and scales each gets alone."""
    _, w, h = layer
    ws = [w, w[:40] * 3, torch.randn(24, 256, generator=torch.Generator().manual_seed(5)) * 0.02]
    f = hessian_factor(h, 0.01, act_order)
    together = gptq_quantize_siblings(ws, f, 4, group_size, symmetric, act_order=act_order, clip=clip)
    for wi, qt in zip(ws, together):
        alone = gptq_quantize(wi, h, 4, group_size, symmetric, act_order=act_order, clip=clip)
        for role, t in alone.to_compressed_tensors().items():
            assert torch.equal(t, qt.to_compressed_tensors()[role]), role
    with pytest.raises(ValueError, match="act_order"):
        gptq_quantize(w, f, 4, 64, act_order=not act_order)


@pytest.mark.parametrize("bits, group_size, symmetric, act_order", [
    (4, 64, True, False), (4, 64, True, True), (3, None, True, False), (4, 32, False, True), (2, 64, False, False),
    (8, None, True, True)])
def test_gptq_beats_rtn(layer, bits, group_size, symmetric, act_order):
    x, w, h = layer
    qg = gptq_quantize(w, h, bits, group_size, symmetric, act_order=act_order)
    qr = quantize_rtn(w, bits, group_size, symmetric)
    assert output_error(x, w, qg) < 0.8 * output_error(x, w, qr)
    assert qg.weight_scale.dtype == w.dtype and qg.symmetric == symmetric


def test_act_order_layout(layer):
    x, w, h = layer
    qw = gptq_quantize(w, h, 4, 64, act_order=True)
    # groups follow the processing order (descending diag H): the 64 most excited inputs form group 0
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    assert torch.equal(qw.weight_g_idx[order].long(), torch.arange(256) // 64)
    assert torch.equal(torch.bincount(qw.weight_g_idx.long()), torch.full((4,), 64))
    # the CPU int4 kernels take it through an input permutation (computing in fp32 here, to check exactly)
    for cpp in (True, False):  # spinfx::qlinear_cpu where it builds, aten's int4 kernel
        plan = plan_qlinear(qw, cpu_compute_dtype=torch.float32, cpp=cpp)
        op = "spinfx::qlinear_cpu" if cpp and qlinear_cpu.usable() else "spinfx::qlinear_int4pack"
        assert plan.perm is not None and plan.calls[0].op.name() == op
        torch.testing.assert_close(plan(x[:8]), x[:8] @ dequantize(qw).T, rtol=1e-5, atol=1e-4)


def test_dead_columns(layer):
    x, w, _ = layer
    x = x.clone()
    x[:, 10:20] = 0
    h = 2 * x.double().T @ x.double() / len(x)
    qw = gptq_quantize(w, h, 4, 64, act_order=True)
    deq = dequantize(qw)
    assert torch.isfinite(deq).all() and (deq[:, 10:20] == 0).all()
    assert output_error(x, w, qw) < 0.8 * output_error(x, w, quantize_rtn(w, 4, 64))


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 64, True), (3, 32, False), (4, None, True)])
def test_mse_clip_never_worse_per_group_and_better_on_heavy_tails(bits, group_size, symmetric):
    """clip='mse': each group's squared rounding error is at most min/max's (the full range is one of the
    candidates), and on heavy-tailed weights (Student-t, ν = 3) clearly smaller in total."""
    torch.manual_seed(2)
    w = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02
    g = group_size or 256
    err = {}
    for clip in ("minmax", "mse"):
        qw = quantize_rtn(w, bits, group_size, symmetric, clip=clip)
        err[clip] = (dequantize(qw, torch.float64) - w.double()).square().view(64, -1, g).sum(-1)
    assert (err["mse"] <= err["minmax"]).all()
    assert err["mse"].sum() < 0.9 * err["minmax"].sum(), (err["mse"].sum() / err["minmax"].sum()).item()


def test_gptq_with_mse_clip_still_beats_rtn(layer):
    x, w, h = layer
    qg = gptq_quantize(w, h, 4, 64, clip="mse")
    assert output_error(x, w, qg) < 0.8 * output_error(x, w, quantize_rtn(w, 4, 64, clip="mse"))
    with pytest.raises(ValueError, match="clip"):
        quantize_rtn(w, 4, 64, clip="bogus")


# ---- target: float (GPTQ toward the float model's outputs) ---------------------------------------------


def test_float_target_is_the_least_squares_weight_and_w_itself_when_inputs_agree():
    """W* = W + W(Cᵀ − H)(H + λI)⁻¹ minimizes ‖W*·X_q − W·X_f‖ (λ → 0: the normal equations hold), and is
    W exactly where the quantized and the float inputs agree (C = H)."""
    from spinfx.kernels.gptq import CrossAccumulator
    from spinfx.passes.quantize import _float_target

    g = torch.Generator().manual_seed(0)
    xf = torch.randn(512, 24, generator=g, dtype=torch.float64)
    # what earlier quantized layers give: a distortion of the float inputs that a linear map can undo, plus noise
    xq = xf @ (torch.eye(24, dtype=torch.float64) + 0.1 * torch.randn(24, 24, generator=g, dtype=torch.float64)) \
        + 0.01 * torch.randn(512, 24, generator=g, dtype=torch.float64)
    w = torch.randn(8, 24, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(24)
    acc.add(xq)
    cross = CrossAccumulator(24)
    cross.add(xq, xf)
    h, c = acc.hessian(), cross.product()
    assert torch.allclose(c, (2 / 512) * xq.T @ xf, rtol=0, atol=1e-5)  # float32 products, float64 sums
    ws = _float_target(w, h, c, damp=0.0)
    assert torch.allclose(ws @ h, w @ c.T, rtol=0, atol=1e-10 * (w @ c.T).abs().max())  # the normal equations
    assert (ws @ xq.T - w @ xf.T).norm() < 0.2 * (w @ xq.T - w @ xf.T).norm()
    assert torch.equal(_float_target(w, h, h, damp=0.01), w)
    # siblings (q/k/v, gate/up) get theirs from one solve on the rows stacked: W* row by row (bit for bit at
    # SmolLM2's shapes on this CPU; BLAS may block other shapes differently)
    w2 = torch.randn(5, 24, generator=g, dtype=torch.float64)
    stacked = _float_target(torch.cat([w, w2]), h, c, damp=0.1)
    one_by_one = torch.cat([_float_target(w, h, c, damp=0.1), _float_target(w2, h, c, damp=0.1)])
    assert torch.allclose(stacked, one_by_one, rtol=0, atol=1e-13 * w.abs().max())


def test_target_option_is_checked():
    from spinfx.engine.errors import BadInput
    from spinfx.passes import Quantize

    with pytest.raises(BadInput, match="target must be one of quantized, float"):
        Quantize(weights={"bits": 4, "method": "gptq", "target": "fp"})
    with pytest.raises(BadInput, match="target_damp must be a positive number, got 0"):
        Quantize(weights={"bits": 4, "method": "gptq", "target": "float", "target_damp": 0})
