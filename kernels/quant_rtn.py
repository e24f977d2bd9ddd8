"""Round-to-nearest (RTN) weight quantization, and the scale/zero math GPTQ shares.

All math is float64. Scales are rounded *up* to the weight dtype before the integers are chosen, so
the stored scale is the one the integers were computed with and |w - dequant| <= scale / 2 holds
exactly against what is stored (rounding the scale down could push max|w| / scale past the range).

Symmetric: s = max|w| / (2^(b-1) - 1/2), q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1). The whole
signed range is used (4 bits: max|w| maps to +-7.5, so -8 is reachable and +7.5 clamps to 7 with error
exactly s/2) — compressed-tensors' current symmetric rule.
Asymmetric: the range [min(w, 0), max(w, 0)] maps onto [qmin, qmax]; zero z = qmin - round(lo / s) is
an integer in the signed range, q = clamp(round(w / s) + z, qmin, qmax), w ~ (q - z) * s.

Clipping (`clip="mse"`): the range above shrunk by the factor p ∈ CLIP_GRID that minimizes the group's
squared rounding error Σ(w − ŵ)² (GPTQ's reference code and llm-compressor's MSE observer search the same
way): a few outliers clamp to the edge of the grid and every other weight gets a finer step. The bound
|w − ŵ| ≤ s/2 then holds for the weights inside the clipped range only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from spinfx.kernels.quant_pack import pack_int32, packed_width, rows_per_chunk
from spinfx.kernels.quant_weight import MixedQuantWeight, QuantWeight, dequantize


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a `bits`-bit code."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _round_up_to(s: Tensor, dtype: torch.dtype) -> Tensor:
    """Smallest value of `dtype` >= s, returned in float64."""
    sd = s.to(dtype)
    sd = torch.where(sd.double() < s, torch.nextafter(sd, torch.full_like(sd, float("inf"))), sd)
    return sd.double()


def scale_zero(wmin: Tensor, wmax: Tensor, bits: int, symmetric: bool,
               dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Per-group float64 min/max -> (scale, exactly representable in `dtype`, as float64;
    signed integer zero as float64, or None when symmetric)."""
    qmin, qmax = qrange(bits)
    if symmetric:
        s = torch.maximum(wmin.abs(), wmax.abs()) / (qmax + 0.5)
    else:
        lo, hi = wmin.clamp(max=0), wmax.clamp(min=0)
        s = (hi - lo) / (qmax - qmin)
    s = _round_up_to(s.clamp_min(torch.finfo(dtype).tiny), dtype)
    if symmetric:
        return s, None
    return s, (qmin - torch.round(lo / s)).clamp(qmin, qmax)


CLIPS = ("minmax", "mse")
CLIP_GRID = tuple(1 - i / 40 for i in range(21))  # 1.0, 0.975, …, 0.5


def group_scale_zero(wg: Tensor, bits: int, symmetric: bool, dtype: torch.dtype,
                     clip: str = "minmax") -> tuple[Tensor, Tensor | None]:
    """Scale and zero of each group of `wg` [..., members] (the last dimension is one group's weights),
    shaped [...]: from its min/max, or (`clip="mse"`) from the shrunk range with the least squared error."""
    wmin, wmax = wg.amin(-1), wg.amax(-1)
    if clip == "minmax":
        return scale_zero(wmin, wmax, bits, symmetric, dtype)
    if clip != "mse":
        raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")
    best = best_err = None
    qmin, qmax = qrange(bits)
    for p in CLIP_GRID:
        s, z = scale_zero(wmin * p, wmax * p, bits, symmetric, dtype)
        t = (wg / s[..., None]).round_()  # quantize_values, then (q − z)·s − w, in one temporary
        t = t.clamp_(qmin, qmax) if z is None else t.add_(z[..., None]).clamp_(qmin, qmax).sub_(z[..., None])
        err = t.mul_(s[..., None]).sub_(wg).square_().sum(-1)
        if best is None:
            best, best_err = (s, z), err
            continue
        better = err < best_err
        best = (torch.where(better, s, best[0]), None if z is None else torch.where(better, z, best[1]))
        best_err = torch.where(better, err, best_err)
    return best


def quantize_values(w: Tensor, s: Tensor, z: Tensor | None, bits: int) -> Tensor:
    """Signed integer codes (float64) of w given broadcastable scale/zero."""
    qmin, qmax = qrange(bits)
    q = torch.round(w / s)
    return (q if z is None else q + z).clamp(qmin, qmax)


def build(q: Tensor, s: Tensor, z: Tensor | None, *, bits: int, group_size: int | None, g_idx: Tensor | None,
          dtype: torch.dtype, bias: Tensor | None) -> QuantWeight:
    """Signed codes q [N, K] + float64 scale/zero [N, G] -> packed `QuantWeight`."""
    u = (q + (1 << (bits - 1))).to(torch.int64)
    return QuantWeight(weight_packed=pack_int32(u, bits), weight_scale=s.to(dtype),
                       weight_zero_point=None if z is None else z.to(torch.int8),
                       weight_g_idx=None if g_idx is None else g_idx.to(torch.int32),
                       bits=bits, group_size=group_size, weight_shape=tuple(q.shape), bias=bias)


def quantize_rtn(w: Tensor, bits: int, group_size: int | None, symmetric: bool = True,
                 g_idx: Tensor | None = None, bias: Tensor | None = None,
                 scale_dtype: torch.dtype | None = None, clip: str = "minmax",
                 dequantized: bool = False) -> QuantWeight | tuple[QuantWeight, Tensor]:
    """RTN-quantize W [N, K]. group_size None = per-channel. `g_idx` [K] (optional) assigns columns to
    groups explicitly (act-order layouts); scales then cover the columns of each group wherever they
    are. Scales are stored in `scale_dtype` (default: w's dtype). `clip`: see the module docstring
    (contiguous groups only). `dequantized`: also return Ŵ = (q − z)·s in float64, the exact values
    `dequantize(qw, torch.float64)` reads back (integers times the stored scale).

    Contiguous groups go through W in chunks of rows (every group lies in one row): the float64
    temporaries are a chunk's, not the matrix's (`rows_per_chunk`)."""
    n, k = w.shape
    dtype = scale_dtype or w.dtype
    if g_idx is not None:
        qw = _quantize_rtn_g_idx(w.detach().double(), bits, group_size, symmetric, g_idx, bias, dtype, clip)
        return (qw, dequantize(qw, torch.float64)) if dequantized else qw
    groups = 1 if group_size is None else k // group_size
    if group_size is not None and k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    mid = 1 << (bits - 1)
    packed = torch.empty(n, packed_width(k, bits), dtype=torch.int32, device=w.device)
    scales = torch.empty(n, groups, dtype=dtype, device=w.device)
    zeros = None if symmetric else torch.empty(n, groups, dtype=torch.int8, device=w.device)
    hat = torch.empty(n, k, dtype=torch.float64, device=w.device) if dequantized else None
    step = rows_per_chunk(k)
    for r in range(0, n, step):
        e = min(n, r + step)
        wg = w[r:e].detach().double().view(e - r, groups, k // groups)
        s, z = group_scale_zero(wg, bits, symmetric, dtype, clip)
        q = quantize_values(wg, s[..., None], None if z is None else z[..., None], bits)
        packed[r:e] = pack_int32((q + mid).view(e - r, k).to(torch.int32), bits)
        scales[r:e] = s.to(dtype)
        if zeros is not None:
            zeros[r:e] = z.to(torch.int8)
        if hat is not None:
            hat[r:e] = (q if z is None else q.sub_(z[..., None])).mul_(s[..., None]).view(e - r, k)
    qw = QuantWeight(weight_packed=packed, weight_scale=scales, weight_zero_point=zeros, weight_g_idx=None,
                     bits=bits, group_size=group_size, weight_shape=(n, k), bias=bias)
    return (qw, hat) if dequantized else qw


def _quantize_rtn_g_idx(w64: Tensor, bits: int, group_size: int | None, symmetric: bool, g_idx: Tensor,
                        bias: Tensor | None, dtype: torch.dtype, clip: str) -> QuantWeight:
    """RTN with explicit column groups (act-order layouts): scales from each group's columns wherever they are."""
    if group_size is None:
        raise ValueError("g_idx needs a group_size")
    if clip != "minmax":
        raise ValueError("clip='mse' needs contiguous groups (no g_idx)")
    n, k = w64.shape
    gi = g_idx.long().expand(n, k)
    groups = int(g_idx.max()) + 1
    empty = w64.new_zeros(n, groups)
    wmin = empty.scatter_reduce(1, gi, w64, "amin", include_self=False)
    wmax = empty.scatter_reduce(1, gi, w64, "amax", include_self=False)
    s, z = scale_zero(wmin, wmax, bits, symmetric, dtype)
    q = quantize_values(w64, s.gather(1, gi), None if z is None else z.gather(1, gi), bits)
    return build(q, s, z, bits=bits, group_size=group_size, g_idx=g_idx, dtype=dtype, bias=bias)


FALLBACK_GROUPS = (128, 64, 32)


def group_for(k: int, group: int | None) -> int | None:
    """The configured group if it divides K, else the largest smaller one of 128, 64, 32 that does
    (group 128: 64, then 32), else None (per channel)."""
    if group is None or k % group == 0:
        return group
    return next((g for g in FALLBACK_GROUPS if g < group and k % g == 0), None)


def _round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(w: Tensor, bits: int, group_size: int | None, symmetric: bool = True,
                  scale_dtype: torch.dtype | None = None) -> Tensor:
    """dequantize(quantize_rtn(W)) of W [N, K] (min/max rule, scales rounded up to `scale_dtype`, default
    w's dtype: the same values, computed the same way in float64), differentiable for learning what is
    quantized later: rounding passes its gradient straight through (STE), and the scales are
    differentiable functions of each group's range."""
    n, k = w.shape
    g = k if group_size is None else group_size
    dtype = scale_dtype or w.dtype
    wg = w.double().reshape(n, k // g, g)
    qmin, qmax = qrange(bits)
    if symmetric:
        lo = hi = None
        s = wg.abs().amax(-1, keepdim=True) / (qmax + 0.5)
    else:
        lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
        s = (hi - lo) / (qmax - qmin)
    s = s.clamp_min(torch.finfo(dtype).tiny)
    s = s + (_round_up_to(s.detach(), dtype) - s).detach()  # the stored scale's value, s's gradient
    if symmetric:
        return (_round_ste(wg / s).clamp(qmin, qmax) * s).reshape(n, k).to(w.dtype)
    z = (qmin - torch.round(lo / s)).clamp(qmin, qmax).detach()
    return ((_round_ste(wg / s) + z).clamp(qmin, qmax) - z).mul(s).reshape(n, k).to(w.dtype)


def quantize_rtn_mixed(w: Tensor, group_bits: Sequence[int], group_size: int, symmetric: bool = True,
                       order: Tensor | None = None, bias: Tensor | None = None) -> MixedQuantWeight:
    """RTN with a bit width per K-group. Group j is input columns order[j*gs:(j+1)*gs] (order defaults
    to range(K); pass an act-order permutation to group salient columns together). Groups are sorted
    by width, widest first (stable), into one column permutation; each run of equal width is a segment."""
    n, k = w.shape
    if k % group_size or len(group_bits) != k // group_size:
        raise ValueError(f"need K % group_size == 0 and one width per group ({k // group_size}), "
                         f"got K={k}, {len(group_bits)} widths")
    order = torch.arange(k) if order is None else order.long().cpu()
    ranked = sorted(range(len(group_bits)), key=lambda j: -group_bits[j])
    perm = torch.cat([order[j * group_size:(j + 1) * group_size] for j in ranked]).to(w.device)
    segments, start = [], 0
    for bits in sorted(set(group_bits), reverse=True):
        cols = group_size * sum(b == bits for b in group_bits)
        segments.append(quantize_rtn(w[:, perm[start:start + cols]], bits, group_size, symmetric))
        start += cols
    return MixedQuantWeight(perm=perm, segments=tuple(segments), bias=bias)
