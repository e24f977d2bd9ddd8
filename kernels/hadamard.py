"""Online Hadamard rotation: the `spinfx::hadamard` op, its plain-torch body, and a dense reference.

`spinfx::hadamard(Tensor x, int[] ks, int block, bool transpose=False) -> Tensor` applies the
normalized (orthonormal) Hadamard transform of a `HadamardPlan` over the last dim of x:
y = x @ M, M = plan.matrix() (block-diagonal with `block`-sized blocks, each
H_{ks[0]} ⊗ … ⊗ H_{ks[-1]} ⊗ H_{2^m} / √block); `transpose=True` gives x @ Mᵀ = the inverse.
Leading dims are free; the output has x's shape and dtype (half types compute in float32).
Never a dense n×n matmul: each K factor is a K×K matmul over its axis, the 2^m part a butterfly,
so the cost is O(n·(Σ K + m)) per row.

The op is the plain transform; the random-sign ("random Hadamard") variant lives on the weight
side: random_hadamard(n, seed) = diag(s)·M, and x @ diag(s)·M = hadamard(x ⊙ s), so the signs fold
into the preceding weights. Offline, weights rotate through the same transform without building M:
W' = W @ M is hadamard_transform(W, plan) row by row.
"""

from __future__ import annotations

import functools

import torch

from spinfx.kernels.quant_pack import rows_per_chunk
from spinfx.kernels.hadamard_matrices import (
    FACTORS,
    MAX_FACTOR,
    HadamardPlan,
    compute_dtype,
    constructible_orders,
    factor_tensor,
    hadamard_matrix,
    plan,
    random_hadamard,
    random_orthogonal,
    random_signs,
)

__all__ = [
    "FACTORS",
    "HadamardRotation",
    "MAX_FACTOR",
    "HadamardPlan",
    "constructible_orders",
    "hadamard",
    "hadamard_by_gemm",
    "hadamard_decompositions",
    "hadamard_dense_reference",
    "hadamard_matrix",
    "hadamard_transform",
    "hadamard_triton",
    "plan",
    "random_hadamard",
    "random_orthogonal",
]


def _butterfly(y: torch.Tensor, log2: int) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform (Sylvester order) of each row of y (rows, 2^log2).

    H_{2^m} = H_2^{⊗m} acts on each bit of the column index independently, so a pass may take
    the bits in any order. Radix-4 passes (two bits each, one read and one write of y) from the
    top bits down, then one radix-2 pass on bit 0 when log2 is odd. Views, adds and stack only,
    so Inductor fuses the passes when this is traced.
    """
    rows, span = y.shape[0], 1 << log2
    while span >= 4:
        span //= 4
        # q = 2·hi + lo over the two bits just above `span`: H_2 on lo, then H_2 on hi.
        a, b, c, d = y.reshape(-1, 4, span).unbind(1)
        s, t, u, v = a + b, a - b, c + d, c - d
        y = torch.stack((s + u, t + v, s - u, t - v), 1)
    if span == 2:
        a, b = y.reshape(-1, 2, 1).unbind(1)
        y = torch.stack((a + b, a - b), 1)
    return y.reshape(rows, -1)


def hadamard_transform(x: torch.Tensor, plan: HadamardPlan, transpose: bool = False) -> torch.Tensor:
    """x @ M (or x @ Mᵀ) over the last dim, in plain torch (reshapes, matmuls with the small
    K factors, adds), traceable by Dynamo. The CPU body of the op."""
    if x.shape[-1] != plan.n:
        raise ValueError(f"last dim {x.shape[-1]} != plan n={plan.n}")
    cdtype = compute_dtype(x.dtype)
    scale = plan.block**-0.5
    y = x.reshape(-1, plan.block).to(cdtype)
    outer, inner = y.shape[0], plan.block
    for i, k in enumerate(plan.ks):
        inner //= k
        s = scale if i == 0 else 1.0  # the normalization rides on the first factor: no extra pass
        if torch.compiler.is_compiling():
            # Dynamo: read the factor off the plan (a tensor attribute; Inductor folds the prep)
            # rather than a cache keyed by ints that a recompile may have made symbolic.
            h = plan.factors[i].to(device=x.device, dtype=cdtype)
            h = (h.T if transpose else h) * s
        else:
            h = factor_tensor(k, cdtype, x.device, transpose, s)
        y3 = y.reshape(outer, k, inner)
        # out[o, j, s] = Σ_k y[o, k, s]·h[k, j]. A broadcast matmul hᵀ @ y3 is fastest when the
        # trailing run s is long; einsum (k moved last, one mm) when it is short.
        y = torch.matmul(h.T, y3) if inner >= 16 else torch.einsum("oks,kj->ojs", y3, h)
        outer *= k
    if not plan.ks:
        y = y * scale
    y = _butterfly(y.reshape(-1, 1 << plan.log2), plan.log2)
    return y.reshape(x.shape).to(x.dtype)


class HadamardRotation:
    """R = diag(s)·M (M = plan.matrix(), s = ±1 signs or none) applied to weights through the transform:
    `X @ R` and `R.T @ X` read as in the algebra and cost one small GEMM per Kronecker factor (≈ 2·Σ k
    flops per element, e.g. 320 for n = 4096, instead of the n×n matmul's 2n = 8192: an 8B model's W·R1
    over all its linears takes seconds, not minutes), with the same result up to rounding.
    X @ R = hadamard(X ⊙ s) over the last dim; Rᵀ @ X = Mᵀ·(s ⊙ X) over dim -2, i.e. hadamard((s ⊙ X)ᵀ)ᵀ.
    `dense()` is R as a matrix (for an online matmul)."""

    def __init__(self, p: HadamardPlan, signs: torch.Tensor | None = None):
        self.plan, self.signs = p, signs
        self.shape = (p.n, p.n)

    @classmethod
    def randomized(cls, n: int, seed: int, block: int | None = None) -> "HadamardRotation":
        """random_hadamard(n, seed, block) as an operator."""
        return cls(plan(n, block), random_signs(n, seed))

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        def rows(xs: torch.Tensor) -> torch.Tensor:
            if self.signs is not None:
                xs = xs * self.signs.to(xs.dtype)
            return hadamard_by_gemm(xs, list(self.plan.ks), self.plan.block)

        if x.dim() != 2:
            return rows(x)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)  # a few rows at a time: bounded temporaries
        step = rows_per_chunk(x.shape[1])
        for r in range(0, x.shape[0], step):
            out[r:r + step] = rows(x[r:r + step])
        return out

    @property
    def T(self) -> "_TransposedRotation":
        return _TransposedRotation(self)

    def dense(self) -> torch.Tensor:
        m = self.plan.matrix()
        return m if self.signs is None else self.signs[:, None] * m


class _TransposedRotation:
    def __init__(self, r: HadamardRotation):
        self.r = r

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """Rᵀ @ X over dim -2; a 2-D X a few columns at a time (bounded temporaries on an 8B layer's matrices)."""
        def cols(xs: torch.Tensor) -> torch.Tensor:
            if self.r.signs is not None:
                xs = xs * self.r.signs.to(xs.dtype)[:, None]
            # contiguous both ways: a transposed view would reach the GEMMs with stride n (≈ 50× slower)
            xt = xs.transpose(-1, -2).contiguous()
            return hadamard_by_gemm(xt, list(self.r.plan.ks), self.r.plan.block).transpose(-1, -2)

        if x.dim() != 2:
            return cols(x).contiguous()
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        step = rows_per_chunk(x.shape[0])
        for c in range(0, x.shape[1], step):
            out[:, c:c + step] = cols(x[:, c:c + step])
        return out


def hadamard_dense_reference(x: torch.Tensor, plan: HadamardPlan, transpose: bool = False) -> torch.Tensor:
    """x @ M with the dense float64 M = plan.matrix(), for tests (n² memory and flops)."""
    m = plan.matrix(torch.float64).to(x.device)
    return (x.to(torch.float64) @ (m.T if transpose else m)).to(x.dtype)


def hadamard_triton(x: torch.Tensor, plan: HadamardPlan, transpose: bool = False) -> torch.Tensor:
    """The Triton body: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (set before triton
    is first imported). Triton is imported here, on first use."""
    from spinfx.kernels.hadamard_triton import triton_transform

    return triton_transform(x, plan, transpose)


@torch.library.custom_op("spinfx::hadamard", mutates_args=())
def hadamard_op(x: torch.Tensor, ks: list[int], block: int, transpose: bool = False) -> torch.Tensor:
    """Normalized Hadamard transform over the last dim of x, plan given as (ks, block): the
    plain-torch transform (CPU and any non-CUDA device); CUDA runs the Triton kernel."""
    p = HadamardPlan.from_op_args(x.shape[-1], ks, block)
    return hadamard_transform(x, p, transpose).contiguous()  # match the fake impl (contiguous)


@hadamard_op.register_kernel("cuda")
def _hadamard_cuda(x, ks, block, transpose=False):
    return hadamard_triton(x, HadamardPlan.from_op_args(x.shape[-1], ks, block), transpose)


@hadamard_op.register_fake
def _hadamard_fake(x, ks, block, transpose=False):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _, ctx.ks, ctx.block, ctx.transpose = inputs


def _backward(ctx, grad):
    # y = x @ M  =>  dL/dx = dL/dy @ Mᵀ: the same op with transpose flipped.
    return hadamard_op(grad, ctx.ks, ctx.block, not ctx.transpose), None, None, None


hadamard_op.register_autograd(_backward, setup_context=_setup_context)


def hadamard(x: torch.Tensor, plan: HadamardPlan, transpose: bool = False) -> torch.Tensor:
    """torch.ops.spinfx.hadamard for a plan."""
    return torch.ops.spinfx.hadamard(x, list(plan.ks), plan.block, transpose)


def _decompose_hadamard(x, ks, block, transpose=False):
    if x.device.type == "cuda":  # keep the Triton kernel
        return NotImplemented
    return hadamard_by_gemm(x, ks, block, transpose, constants=True)


def hadamard_decompositions() -> dict:
    """Extra decompositions for Inductor (`compile_fx(..., decompositions={**select_decomp_table(), **this})`):
    off CUDA, `spinfx::hadamard` becomes one matmul per Kronecker factor (`hadamard_by_gemm`: n = 1536 =
    12·128 two, n = 64 one), the factors graph constants. The radix-4 butterfly it replaced was ≈ 50
    nodes per call: SmolLM2 spinquant-w4a16's 90 online Hadamards made the first compile 160 s instead
    of 75 s at the same decode step (bench/README.md "Decode"). Without a decomposition the op stays
    one opaque node running its eager body."""
    return {torch.ops.spinfx.hadamard.default: _decompose_hadamard}


@functools.lru_cache(maxsize=None)
def _kron_factors(ks: tuple[int, ...], log2: int, dtype: torch.dtype, transpose: bool, scale: float,
                  chunk: int = 7) -> tuple[torch.Tensor, ...]:
    """The dense Kronecker factors of scale·H_{ks[0]} ⊗ … ⊗ H_{ks[-1]} ⊗ H_{2^log2} (a `HadamardPlan`
    block; transposed factors for `transpose`), the Sylvester part cut into H_{2^chunk} ⊗ … pieces."""
    mats = [factor_tensor(k, torch.float64, torch.device("cpu"), transpose) for k in ks]
    rest = log2
    while rest:
        m = min(rest, chunk)
        mats.append(hadamard_matrix(1 << m, torch.float64))  # Sylvester: symmetric
        rest -= m
    if not mats:
        mats.append(torch.ones(1, 1, dtype=torch.float64))
    mats[0] = mats[0] * scale
    return tuple(m.to(dtype).contiguous() for m in mats)


@functools.lru_cache(maxsize=None)
def _kron_factor_lists(ks: tuple[int, ...], log2: int, transpose: bool, scale: float) -> tuple[list, ...]:
    """`_kron_factors` in float64 as nested Python lists (made outside any fake-tensor mode)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return tuple(h.tolist() for h in _kron_factors(ks, log2, torch.float64, transpose, scale))


def hadamard_by_gemm(x: torch.Tensor, ks: list[int], block: int, transpose: bool = False,
                     constants: bool = False) -> torch.Tensor:
    """`spinfx::hadamard` for GPTQ's calibration forward: the same x @ M, each Kronecker factor of a block
    (the power-of-two part as dense Sylvester pieces of order ≤ 128) one matmul over its axis.

    The op's body runs the power-of-two part as an eager radix-4 butterfly, ≈ 10 full-size memory passes
    per radix step; uncompiled, that was half of GPTQ's wall time on spinquant SmolLM2 (R3 at every
    q/k, R4 at every down_proj input, 128×512 tokens). A 128×128 matmul costs 256 flops per element
    and one pass: the forward stays compute-bound. Same arithmetic dtype as the op (float32 for float32)."""
    p = HadamardPlan.from_op_args(x.shape[-1], ks, block)
    dt = compute_dtype(x.dtype)
    y = x.reshape(-1, p.block).to(dt)
    outer, inner = y.shape[0], p.block
    if constants:  # Inductor's decomposition, on fake tensors: each factor a graph constant made from numbers,
        # directly in the compute dtype (the same one rounding of the float64 values as `.to(dt)`): a float64
        # constant converted in the graph was a conversion kernel reading twice the bytes at every call. (The
        # graph still copies each factor once per call: `torch.tensor` traces as aten.lift_fresh_copy.)
        factors = [torch.tensor(h, dtype=dt, device=x.device)
                   for h in _kron_factor_lists(tuple(p.ks), p.log2, transpose, p.block ** -0.5)]
    else:
        factors = _kron_factors(tuple(p.ks), p.log2, dt, transpose, p.block ** -0.5)
    for h in factors:
        k = h.shape[0]
        inner //= k
        if inner == 1:  # the last factor: one GEMM over rows
            y = y.reshape(outer, k) @ h
        else:  # out[o, j, s] = Σ_k y[o, k, s]·h[k, j]
            y = torch.matmul(h.T, y.reshape(outer, k, inner))
        outer *= k
    return y.reshape(x.shape).to(x.dtype)
