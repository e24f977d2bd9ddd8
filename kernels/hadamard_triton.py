"""Triton body of `spinfx::hadamard`. Imports triton at module level: import this module lazily
(spinfx.kernels.hadamard.hadamard_triton does). Runs on CUDA tensors, and on CPU tensors when
TRITON_INTERPRET=1 was set before triton was first imported.

One launch per K factor of the plan. The data are viewed as (P, K, S) (S = the factors after K
times 2^m); a program owns one p and a tile of BLOCK_S columns s and accumulates
out[:, s] = Σ_k M[k, :]ᵀ · x[k, s] over a loop on k (no tl.dot: K is rarely a power of two, and the
loop keeps the tile shapes free). The last launch takes the whole 2^m run (BLOCK_S = S = 2^m) and
finishes with the butterfly in registers; its factor carries the 1/√block scale. A pure
power-of-two plan is one launch with K = 1. The last tile holds next_pow2(K)·2^m values
(16k for 11008 = 172×2^6): fine for the dims of current models, not tuned for 2^15-wide runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spinfx.kernels.hadamard_matrices import HadamardPlan, compute_dtype, factor_tensor


@triton.jit
def _hadamard_kernel(
    x_ptr, h_ptr, y_ptr, K, S,
    KP: tl.constexpr, BLOCK_S: tl.constexpr, LOG2: tl.constexpr,
):
    p = tl.program_id(0)
    offs_k = tl.arange(0, KP)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_k = offs_k < K
    mask_s = offs_s < S
    base = p.to(tl.int64) * K * S
    acc = tl.zeros((KP, BLOCK_S), dtype=h_ptr.dtype.element_ty)
    for j in range(K):
        xj = tl.load(x_ptr + base + j * S + offs_s, mask=mask_s, other=0.0).to(acc.dtype)
        hj = tl.load(h_ptr + j * K + offs_k, mask=mask_k, other=0.0)
        acc += hj[:, None] * xj[None, :]
    # Walsh–Hadamard over the BLOCK_S = 2^LOG2 axis, constant-geometry (Pease) form: every stage
    # maps (x[i], x[i + S/2]) to (y[2i], y[2i+1]) = (x[i] + x[i + S/2], x[i] − x[i + S/2]);
    # LOG2 identical stages give H_{2^LOG2} in Sylvester order, with one fixed tile shape.
    for _ in tl.static_range(LOG2):
        a, b = tl.split(tl.permute(tl.reshape(acc, (KP, 2, BLOCK_S // 2)), (0, 2, 1)))
        acc = tl.reshape(tl.join(a + b, a - b), (KP, BLOCK_S))
    out = y_ptr + base + offs_k[:, None] * S + offs_s[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_s[None, :])


def triton_transform(x: torch.Tensor, plan: HadamardPlan, transpose: bool = False) -> torch.Tensor:
    """x @ M (or x @ Mᵀ) over the last dim with the Triton kernel; same contract as the op."""
    if x.shape[-1] != plan.n:
        raise ValueError(f"last dim {x.shape[-1]} != plan n={plan.n}")
    cdtype = compute_dtype(x.dtype)
    y = x.reshape(-1, plan.block).contiguous()
    outer, inner = y.shape[0], plan.block
    ks = plan.ks or (1,)
    for i, k in enumerate(ks):
        inner //= k
        last = i == len(ks) - 1
        out = torch.empty(outer * k * inner, dtype=x.dtype if last else cdtype, device=x.device)
        # The 1/√block scale rides on the last factor (a float64 tensor, not an fp32 scalar arg).
        h = factor_tensor(k, cdtype, x.device, transpose, plan.block**-0.5 if last else 1.0)
        kp = triton.next_power_of_2(k)
        block_s = inner if last else min(triton.next_power_of_2(inner), max(16, 4096 // kp))
        _hadamard_kernel[(outer, triton.cdiv(inner, block_s))](
            y, h, out, k, inner,
            KP=kp, BLOCK_S=block_s, LOG2=plan.log2 if last else 0,
            num_warps=8 if kp * block_s >= 8192 else 4,
        )
        y, outer = out, outer * k
    return y.reshape(x.shape)
