"""GPTQ (Frantar et al. 2022): quantize W column by column, pushing each column's rounding error onto
the not-yet-quantized columns through the inverse Hessian of the layer's reconstruction loss
||X Wᵀ - X Ŵᵀ||², H = 2 XᵀX.

Math (float64 throughout):
- Dead inputs (H[j, j] == 0, never excited by calibration data): H[j, j] := 1 and W[:, j] := 0.
- Dampening: H += damp * mean(diag H) * I.
- U = upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU). Quantizing column j with error e = (w_j - ŵ_j) / U[j, j]
  is compensated exactly by W[:, j+1:] -= e ⊗ U[j, j+1:] (the OBS update restricted to the remaining
  columns; row j of U is the Cholesky form of the successive inverse Hessians).
- Lazy batch updates: inside a block of `block_size` columns the updates touch only the block; the
  block's errors E reach the rest of W once per block as W[:, end:] -= E @ U[block, end:].
- Groups: the scale/zero of a group is chosen when its first column is reached, from the current
  (error-updated) weights of its columns. The block size is rounded to a multiple of group_size so a
  group never straddles two blocks.
- act_order: columns are processed by descending diag(H) (most excited inputs first). Groups are
  consecutive runs of group_size columns *in that processing order* (GPTQ's static_groups=False), so
  the weight is stored in the original column order with g_idx[j] = (position of j in the order) //
  group_size — the compressed-tensors act-order ("group") layout.
"""
from __future__ import annotations

import torch
from torch import Tensor

from spinfx.kernels.quant_rtn import build, quantize_values, scale_zero
from spinfx.kernels.quant_weight import QuantWeight


class HessianAccumulator:
    """H = (2 / n) Σ xᵀx over all n rows x ∈ R^K of the batches added; accumulated in float64."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        """x: [*, K] activations (any leading dims), e.g. a linear layer's input during calibration."""
        x = x.detach().reshape(-1, self.in_features).to(self.xtx.device, torch.float64)
        self.xtx.addmm_(x.T, x)
        self.n += x.shape[0]

    def hessian(self) -> Tensor:
        if self.n == 0:
            raise ValueError("no activations were added")
        return self.xtx * (2.0 / self.n)


def _inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)⁻¹."""
    h = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise ValueError(f"Hessian is not positive definite after dampening (damp={damp}); raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def gptq_quantize(w: Tensor, H: Tensor, bits: int, group_size: int | None, symmetric: bool = True,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  bias: Tensor | None = None, scale_dtype: torch.dtype | None = None) -> QuantWeight:
    """GPTQ-quantize W [N, K] given H [K, K] (e.g. `HessianAccumulator.hessian()`).

    group_size None = per-channel. Scales are stored in `scale_dtype` (default: w's dtype) and, as in
    RTN, rounded up to it before any integer is chosen, so the error GPTQ compensates is the error of
    the stored weight."""
    n, k = w.shape
    if group_size is not None and k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    dtype = scale_dtype or w.dtype
    W = w.detach().to(torch.float64).clone()
    H = H.detach().to(device=W.device, dtype=torch.float64).clone()

    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    if order is not None:
        W, H = W[:, order], H[order][:, order]
    U = _inverse_hessian_factor(H, damp)

    gs = group_size or k
    groups = k // gs
    S = W.new_empty(n, groups)
    Z = None if symmetric else W.new_empty(n, groups)
    if group_size is None:
        s, z = scale_zero(W.amin(1), W.amax(1), bits, symmetric, dtype)
        S[:, 0] = s
        if Z is not None:
            Z[:, 0] = z
    bs = block_size if group_size is None else max(1, block_size // gs) * gs

    Q = torch.empty_like(W)  # signed codes, in processing order
    for b0 in range(0, k, bs):
        b1 = min(b0 + bs, k)
        W1, U1 = W[:, b0:b1], U[b0:b1, b0:b1]  # W1 is a view: updates land in W
        E1 = W.new_empty(n, b1 - b0)
        for i in range(b1 - b0):
            col = b0 + i
            g = col // gs
            if group_size is not None and col % gs == 0:
                s, z = scale_zero(W1[:, i:i + gs].amin(1), W1[:, i:i + gs].amax(1), bits, symmetric, dtype)
                S[:, g] = s
                if Z is not None:
                    Z[:, g] = z
            s, z = S[:, g], None if Z is None else Z[:, g]
            q = quantize_values(W1[:, i], s, z, bits)
            Q[:, col] = q
            err = (W1[:, i] - (q if z is None else q - z) * s) / U1[i, i]
            W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1.0)
            E1[:, i] = err
        W[:, b1:].addmm_(E1, U[b0:b1, b1:], alpha=-1.0)

    g_idx = None
    if order is not None:
        inverse = torch.argsort(order)
        Q = Q[:, inverse]
        if group_size is not None:
            g_idx = (torch.arange(k, device=W.device) // gs)[inverse]
    return build(Q, S, Z, bits=bits, group_size=group_size, g_idx=g_idx, dtype=dtype, bias=bias)
