"""Triton body of `spinfx::qlinear` for CUDA tensors: a split-K GEMV for decode-shaped M, a dequantize +
cuBLAS path for prefill-shaped M, for every packed layout.

y[m, n] = Σ_k x[m, k] · (u[n, k] - zu[n, g(k)]) · s[n, g(k)]  (+ bias[n])

Code k of row n is in int32 word k // pf of weight_packed [N, ceil(K / pf)] at bit (k % pf) · bits
(pf = 32 // bits: 16, 10, 8, 4 codes per word for 2, 3, 4, 8 bits); its group is g(k) = g_idx[k]
(act-order, any map) or k // group_size (per-channel: group_size = K, one group).

`plan(M, N, K, ...)` picks the path and tiles (one definition: the op, tests/test_qlinear.py and
bench/bench_gpu.py use it):

- "gemv", M <= GEMV_MAX_M (16): no tl.dot. A program owns BLOCK_N (64) weight rows, up to BLOCK_M (4) x
  rows and a range of K (split-K: ≈ PROGRAMS_PER_SM programs per SM in all). Each step loads a
  [BLOCK_N, BLOCK_KW] tile of int32 words (16-byte loads along K) and, for each of the pf code
  positions j of a word (unrolled), shifts/masks the codes out and takes u - zu in fp32 —
  (u | 0x4B000000) read as fp32 is 2^23 + u, so (2^23 + u) - (2^23 + zu) is exact with no int→float
  conversion — times the x column of code j (x loaded once per step, j and row), summed in fp32. The
  scale multiplies once per step and word where groups are whole words (step_groups >= 1: the
  per-row scale/zero of each group is loaded once per step), else each code (step_groups = 0:
  act-order g_idx, or 3-bit groups that split words). The K reduction of the [BLOCK_M, BLOCK_N,
  BLOCK_KW] accumulator happens once, at the end. With split > 1 the programs write fp32 partials
  [split, M, N] and a second kernel sums them in a fixed order (deterministic: no atomics), adds the
  bias and casts; with split = 1 the GEMV writes y itself.
- "dequant_mm", M > GEMV_MAX_M: one Triton kernel writes W = (u - zu) · s as an [N, K] matrix in x's
  dtype (rounded once: the fp32 product of an integer below 2^9 and an fp16/bf16 scale is exact), then
  torch.mm / torch.addmm (cuBLAS). fp32 x runs an IEEE fp32 GEMM as long as
  torch.backends.cuda.matmul.allow_tf32 keeps its default (False); this module never changes it.
  The crossover at 16 is an estimate (the GEMV's fp32 FMAs grow with M; the dequantized matrix costs
  ≈ 4.5 bytes per weight, once per call), not a measurement.

Both accumulate in fp32 and round y once: within the kernel tolerance of tests/test_qlinear.py.
Tiles were chosen without a GPU by compiling for sm_90 with Triton 3.6 and 3.9 and reading the
TTGIR and register counts: no layout conversion inside the GEMV loop, no spills on the 4-bit paths.

Imports triton at module level: import this module lazily (the op's CUDA kernel in kernels/qlinear.py
does). On CPU tensors it runs when TRITON_INTERPRET=1 was set before triton was first imported (the
interpreter costs ≈ 1 ms per program and step: use small shapes).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

GEMV_MAX_M = 16  # GEMV up to here, dequantize + cuBLAS above
PROGRAMS_PER_SM = 4  # GEMV grid target: enough resident programs per SM to keep loads in flight
GEMV_BLOCK_KW = 8  # int32 words of K per GEMV step and row (32 bytes: one sector)
GEMV_BLOCK_N = 64  # weight rows per GEMV program
GEMV_WARPS = 4
DEQUANT_BLOCK = (32, 64)  # (rows, columns) of W per dequantize program (16 per thread: ≤ 64 registers)
REDUCE_BLOCK = 1024


@dataclass(frozen=True)
class Plan:
    """How one call runs. GEMV: grid (n_blocks · m_blocks, split); program (i, s) computes rows
    [(i % m_blocks) · block_m, +block_m) of x against weight rows [(i // m_blocks) · block_n, +block_n)
    over words [s · w_split, +w_split) of K, in steps of block_kw words."""

    path: str  # "gemv" | "dequant_mm"
    block_m: int = 0
    block_n: int = 0
    block_kw: int = 0
    split: int = 1
    w_split: int = 0
    step_groups: int = 1  # scale groups per step (each a whole number of words); 0: per code
    n_blocks: int = 0
    m_blocks: int = 0
    num_warps: int = 4

    @property
    def programs(self) -> int:
        return self.n_blocks * self.m_blocks * self.split


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=4096)
def plan(m: int, n: int, k: int, bits: int, group_size: int, has_g_idx: bool, sms: int = 132,
         path: str | None = None, split: int | None = None) -> Plan:
    """The path and tiles for x [m, k] · W [n, k]ᵀ on a device with `sms` SMs. `path` forces a path
    ("gemv" needs 1 <= m <= GEMV_MAX_M); `split` forces the GEMV's split-K count (clamped to 1..steps).

    GEMV tiles: block_n = GEMV_BLOCK_N weight rows × block_kw words per step (4 warps: one 16-byte
    load per thread), block_m = next_pow2(m) up to 4 x rows (2 for 2/3 bits or per-code scales; more
    rows: m_blocks > 1 — more rows per program spill registers). The split brings the grid to
    ≈ PROGRAMS_PER_SM · sms programs. Per-row scales [1, block_n, 1] and x slices [block_m, 1, block_kw]
    hold fewer elements than the 128 threads, so Triton (3.6 and 3.9) lays them out like the words:
    no layout conversion in the loop (a larger block_n or block_m gets one per code position).
    """
    path = path or ("gemv" if m <= GEMV_MAX_M else "dequant_mm")
    if path == "dequant_mm":
        return Plan("dequant_mm")
    if path != "gemv" or not 1 <= m <= GEMV_MAX_M:
        raise ValueError(f"no path {path!r} for M={m}")
    pf = 32 // bits
    bkw = GEMV_BLOCK_KW
    if not has_g_idx and (group_size >= k or group_size % (bkw * pf) == 0):
        groups = 1
    elif not has_g_idx and group_size % pf == 0 and (bkw * pf) % group_size == 0:
        groups = bkw * pf // group_size
    else:
        groups = 0
    bm = min(4 if pf <= 8 and groups else 2, 1 << (m - 1).bit_length())
    mb = _cdiv(m, bm)
    nb = _cdiv(n, GEMV_BLOCK_N)
    steps = _cdiv(_cdiv(k, pf), bkw)
    split = max(1, min(steps, split if split is not None else _cdiv(PROGRAMS_PER_SM * sms, nb * mb)))
    per = _cdiv(steps, split)
    return Plan("gemv", bm, GEMV_BLOCK_N, bkw, _cdiv(steps, per), per * bkw, groups, nb, mb, GEMV_WARPS)


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter on CPU: any small machine


@triton.jit
def _zero_f(z_ptrs, mask, HAS_ZP: tl.constexpr, BITS: tl.constexpr):
    """2^23 + zu in fp32 (zu = zero point + 2^(bits-1), the unsigned zero): the subtrahend of dequant."""
    if HAS_ZP:
        zu = tl.load(z_ptrs, mask=mask, other=0).to(tl.int32) + (1 << (BITS - 1))
    else:
        zu = tl.full(mask.shape, 1 << (BITS - 1), tl.int32)
    return zu.to(tl.float32) + 8388608.0


@triton.jit
def _codes_minus_zero(words, shift, zf, BITS: tl.constexpr):
    """u - zu in fp32, exactly, for the codes at bit `shift` of `words` (zf = 2^23 + zu): (u | 0x4B000000)
    read as fp32 is 2^23 + u — no int→float conversion. >> is arithmetic: the mask drops the sign fill."""
    u = (words >> shift) & ((1 << BITS) - 1)
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - zf


@triton.jit(do_not_specialize=["M", "M_BLOCKS", "STEPS"])
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr, M, M_BLOCKS, N, K, KW, STEPS,
                 stride_xm, stride_wn, stride_sn, stride_os, stride_om, group_size,
                 BITS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
                 STEP_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_KW: tl.constexpr):
    """out[pid_s, m, n] (or y[m, n] + bias when split = 1) = Σ over this split's words of K; see `Plan`.

    Tensors are [BLOCK_M, BLOCK_N, BLOCK_KW]-shaped (x rows, weight rows, words). Layouts: the words
    load is the only anchor Triton lays out by itself — per-row scales are [1, BLOCK_N, 1] and x
    slices [BLOCK_M, 1, BLOCK_KW], both smaller than the CTA (see `plan`) — so everything in the loop
    takes the words' layout and the loop has no layout conversion (checked by compiling for sm_90)."""
    PF: tl.constexpr = 32 // BITS
    GW: tl.constexpr = BLOCK_KW // max(STEP_GROUPS, 1)
    pid_n = tl.program_id(0) // M_BLOCKS  # consecutive programs: the row blocks of one weight tile
    pid_s = tl.program_id(1)
    m0 = (tl.program_id(0) % M_BLOCKS) * BLOCK_M
    rm = m0 + tl.arange(0, BLOCK_M)[:, None, None]
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :, None]
    kw = tl.arange(0, BLOCK_KW)[None, None, :]
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.float32)
    w_lo = pid_s * STEPS * BLOCK_KW  # a multiple of BLOCK_KW the compiler can see: aligned word loads
    w_hi = tl.minimum(w_lo + STEPS * BLOCK_KW, KW)
    for w0 in range(w_lo, w_hi, BLOCK_KW):
        rw = w0 + kw
        mask_w = rw < w_hi
        if STEP_GROUPS > 0:
            words = tl.load(w_ptr + rn * stride_wn + rw, mask=mask_n & mask_w, other=0)
            # per-row scale and zero of each group of the step (group i: words [i · GW, (i + 1) · GW))
            sg = rn * stride_sn + (w0 * PF) // group_size
            s = tl.load(s_ptr + sg, mask=mask_n, other=0.0).to(tl.float32)
            zf = _zero_f(z_ptr + sg, mask_n, HAS_ZP, BITS)
            for i in tl.static_range(1, STEP_GROUPS):
                mask_i = mask_n & (rn * 0 + w0 + i * GW < w_hi)  # tensor & tensor (the interpreter's
                #                                                     tensor & scalar bool is int32)
                sel = kw >= i * GW
                s = tl.where(sel, tl.load(s_ptr + sg + i, mask=mask_i, other=0.0).to(tl.float32), s)
                zf = tl.where(sel, _zero_f(z_ptr + sg + i, mask_i, HAS_ZP, BITS), zf)
            part = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.float32)  # Σ_j (u - zu) · x, scaled once
            for j in tl.static_range(PF):
                k = rw * PF + j
                mask_k = mask_w & (k < K)
                xj = tl.load(x_ptr + rm * stride_xm + k, mask=mask_m & mask_k, other=0.0).to(tl.float32)
                part += _codes_minus_zero(words, j * BITS, zf, BITS) * xj
            acc += part * s
        else:  # per-code scales (act-order g_idx, or groups that split words): gathered, and so are
            # the words (an index Triton cannot see as contiguous: both loads get one layout)
            words = tl.load(w_ptr + rn * stride_wn + (rw * PF) // PF, mask=mask_n & mask_w, other=0)
            for j in tl.static_range(PF):
                k = rw * PF + j
                mask_k = mask_w & (k < K)
                if HAS_GIDX:
                    g = tl.load(g_ptr + k, mask=mask_k, other=0)
                else:
                    g = k // group_size
                sg = rn * stride_sn + g
                s = tl.load(s_ptr + sg, mask=mask_n & mask_k, other=0.0).to(tl.float32)
                w = _codes_minus_zero(words, j * BITS, _zero_f(z_ptr + sg, mask_n & mask_k, HAS_ZP, BITS), BITS) * s
                xj = tl.load(x_ptr + rm * stride_xm + k, mask=mask_m & mask_k, other=0.0).to(tl.float32)
                acc += w * xj
    y = tl.sum(acc, axis=2)
    rm2 = m0 + tl.arange(0, BLOCK_M)[:, None]
    rn2 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    if HAS_BIAS:  # split == 1 only: then out is y
        y += tl.load(b_ptr + rn2, mask=rn2 < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_s * stride_os + rm2 * stride_om + rn2, y.to(out_ptr.dtype.element_ty),
             mask=(rm2 < M) & (rn2 < N))


@triton.jit(do_not_specialize=["MN", "SPLIT"])
def _splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = Σ_s partials[s] (+ bias), s in order; partials [SPLIT, M, N] and y [M, N] contiguous."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, g_ptr, out_ptr, N, K, stride_wn, stride_sn, group_size,
                   BITS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [N, K] (contiguous, out's dtype) = (u - zu) · s, one [BLOCK_N, BLOCK_K] tile per program."""
    PF: tl.constexpr = 32 // BITS
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
    rk = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K))[None, :]
    mask_k = rk < K
    mask = (rn < N) & mask_k
    words = tl.load(w_ptr + rn * stride_wn + rk // PF, mask=mask, other=0)
    if HAS_GIDX:
        g = tl.load(g_ptr + rk, mask=mask_k, other=0)
    else:
        g = rk // group_size
    sg = rn * stride_sn + g
    s = tl.load(s_ptr + sg, mask=mask, other=0.0).to(tl.float32)
    w = _codes_minus_zero(words, (rk % PF) * BITS, _zero_f(z_ptr + sg, mask, HAS_ZP, BITS), BITS) * s
    tl.store(out_ptr + rn.to(tl.int64) * K + rk, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequant_triton(weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None,
                   weight_g_idx: Tensor | None, bits: int, group_size: int, k: int, dtype: torch.dtype) -> Tensor:
    """W [N, K] in `dtype`: the Triton counterpart of `qlinear.dequant_weight` (bit-equal in fp32)."""
    n = weight_packed.shape[0]
    packed, scale = weight_packed.contiguous(), weight_scale.contiguous()
    zp = scale if weight_zero_point is None else weight_zero_point.contiguous()  # absent: never read
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    bn, bk = DEQUANT_BLOCK
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        packed, scale, zp, scale if weight_g_idx is None else weight_g_idx, out, n, k, packed.stride(0),
        scale.stride(0), group_size, BITS=bits, HAS_ZP=weight_zero_point is not None,
        HAS_GIDX=weight_g_idx is not None, BLOCK_N=bn, BLOCK_K=bk)
    return out


def qlinear_triton(x: Tensor, weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None,
                   weight_g_idx: Tensor | None, bias: Tensor | None, bits: int, group_size: int,
                   plan_: Plan | None = None) -> Tensor:
    """Same arguments and result as `spinfx::qlinear` (one `QuantWeight`); `plan_` overrides `plan(...)`."""
    k, n = x.shape[-1], weight_packed.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0 or k == 0:
        y = x2.new_zeros(m, n) if bias is None else bias.to(x.dtype).expand(m, n).clone()
        return y.reshape(*x.shape[:-1], n)
    p = plan_ or plan(m, n, k, bits, group_size, weight_g_idx is not None, sm_count(x.device))
    if p.path == "dequant_mm":
        w = dequant_triton(weight_packed, weight_scale, weight_zero_point, weight_g_idx, bits, group_size, k,
                           x.dtype)
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(x.dtype), x2, w.t())
        return y.reshape(*x.shape[:-1], n)
    if weight_g_idx is not None and p.step_groups:
        raise ValueError(f"{p} reads contiguous groups, but the weight has a g_idx (use plan(...))")
    packed, scale = weight_packed.contiguous(), weight_scale.contiguous()
    zp = scale if weight_zero_point is None else weight_zero_point.contiguous()  # absent pointers: never read
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    out = y if p.split == 1 else torch.empty(p.split, m, n, dtype=torch.float32, device=x.device)
    _gemv_kernel[(p.n_blocks * p.m_blocks, p.split)](
        x2, packed, scale, zp, scale if weight_g_idx is None else weight_g_idx,
        scale if bias is None else bias, out, m, p.m_blocks, n, k, packed.shape[1], p.w_split // p.block_kw,
        x2.stride(0), packed.stride(0), scale.stride(0), 0 if p.split == 1 else out.stride(0), n, group_size,
        BITS=bits, HAS_ZP=weight_zero_point is not None, HAS_GIDX=weight_g_idx is not None,
        HAS_BIAS=bias is not None and p.split == 1, STEP_GROUPS=p.step_groups, BLOCK_M=p.block_m,
        BLOCK_N=p.block_n, BLOCK_KW=p.block_kw, num_warps=p.num_warps)
    if p.split > 1:
        _splitk_reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)](
            out, scale if bias is None else bias, y, m * n, n, p.split, HAS_BIAS=bias is not None,
            BLOCK=REDUCE_BLOCK)
    return y.reshape(*x.shape[:-1], n)
