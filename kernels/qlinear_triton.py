"""Triton body of `spinfx::qlinear` for CUDA tensors: one fused dequant-GEMM for every packed layout.

y[m, n] = Σ_k x[m, k] · (u[n, k] - zu[n, g(k)]) · s[n, g(k)]  (+ bias[n])

Each program computes a BLOCK_M × BLOCK_N tile of y, stepping through K in BLOCK_K slices: it loads
the int32 words holding the slice (word k // pf, bit offset (k % pf) · bits; pf = 32 // bits, so 2, 3,
4 and 8 bits share the code), unpacks, gathers scale/zero of each column's group — g(k) = g_idx[k]
(act-order, any permutation) or k // group_size — dequantizes in registers and accumulates with
tl.dot in float32. Tiles: decode-shaped M <= 16 uses a 16-row tile with wide N/K slices (the weight
stream is the cost); prefill-shaped M >= 64 uses 64×128 tiles to reuse each dequantized slice across
many rows.

Triton is imported on first call. On CPU, run with TRITON_INTERPRET=1 set before triton is imported
(the interpreter costs ≈ 5 ms per program × K-step: use small shapes and large `block`).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def qlinear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                       stride_ym, group_size, BITS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
                       HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        PF: tl.constexpr = 32 // BITS
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            mask_kn = mask_k[:, None] & mask_n[None, :]
            # [BLOCK_K, BLOCK_N] tile of Wᵀ; >> is arithmetic on int32, the mask drops the sign fill
            words = tl.load(w_ptr + rn[None, :] * stride_wn + (rk // PF)[:, None], mask=mask_kn, other=0)
            u = (words >> ((rk % PF) * BITS)[:, None]) & ((1 << BITS) - 1)
            if HAS_GIDX:
                g = tl.load(g_ptr + rk, mask=mask_k, other=0)
            else:
                g = rk // group_size
            sg = rn[None, :] * stride_sn + g[:, None]
            s = tl.load(s_ptr + sg, mask=mask_kn, other=0.0).to(tl.float32)
            if HAS_ZP:
                zu = tl.load(z_ptr + sg, mask=mask_kn, other=0).to(tl.int32) + (1 << (BITS - 1))
            else:
                zu = 1 << (BITS - 1)
            w = ((u - zu).to(tl.float32) * s).to(x.dtype)
            if IEEE_FP32:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    return triton, qlinear_kernel


def tiles(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for M rows: decode-shaped for M <= 16, prefill-shaped for M >= 64."""
    if m <= 16:
        return 16, 64, 128
    if m < 64:
        return 32, 64, 64
    return 64, 128, 64


def qlinear_triton(x: Tensor, weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None,
                   weight_g_idx: Tensor | None, bias: Tensor | None, bits: int, group_size: int,
                   block: tuple[int, int, int] | None = None) -> Tensor:
    """Same arguments and result as `spinfx::qlinear` (one `QuantWeight`); `block` overrides `tiles(M)`."""
    triton, kernel = _kernel()
    k, n = x.shape[-1], weight_packed.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    scale = weight_scale.contiguous()
    zp = None if weight_zero_point is None else weight_zero_point.contiguous()
    bm, bn, bk = block or tiles(m)
    packed = weight_packed.contiguous()
    kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x2, packed, scale, scale if zp is None else zp,  # absent pointers: any tensor, never read
        scale if weight_g_idx is None else weight_g_idx, scale if bias is None else bias, y,
        m, n, k, x2.stride(0), packed.stride(0), scale.stride(0), y.stride(0), group_size,
        BITS=bits, HAS_ZP=zp is not None, HAS_GIDX=weight_g_idx is not None, HAS_BIAS=bias is not None,
        IEEE_FP32=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y.reshape(*x.shape[:-1], n)
