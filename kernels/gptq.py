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

import contextlib

import torch
from torch import Tensor

from spinfx.kernels.quant_rtn import build, group_scale_zero, quantize_values
from spinfx.kernels.quant_weight import QuantWeight


class HessianAccumulator:
    """H = (2 / n) Σ xᵀx over all n rows x ∈ R^K of the batches added; accumulated in float64.
    (GPTQ's result does not depend on H's scale: the dampening is relative to mean(diag H).)"""

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


@contextlib.contextmanager
def _one_thread():
    """Run the column loop single-threaded. Its ops are small (a few N-vectors, one [block, N] update),
    and intra-op threads cost more than they save: on this shared 2-core machine a parallel region that
    waits for a descheduled thread turned a 30 µs update into 10 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)⁻¹, with one Cholesky and one triangular solve.

    With J the reversal permutation and J H J = L Lᵀ: H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J) = Uᵀ U for U = J L⁻¹ J,
    which is upper triangular with a positive diagonal, hence the Cholesky factor.
    """
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    h = h + damp * h.diagonal().mean() * eye
    chol, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info):
        raise ValueError(f"Hessian is not positive definite after dampening (damp={damp}); raise damp")
    return torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)


def gptq_quantize(w: Tensor, H: Tensor, bits: int, group_size: int | None, symmetric: bool = True,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  bias: Tensor | None = None, scale_dtype: torch.dtype | None = None,
                  clip: str = "minmax") -> QuantWeight:
    """GPTQ-quantize W [N, K] given H [K, K] (e.g. `HessianAccumulator.hessian()`).

    group_size None = per-channel. Scales are stored in `scale_dtype` (default: w's dtype) and, as in
    RTN, rounded up to it before any integer is chosen, so the error GPTQ compensates is the error of
    the stored weight."""
    n, k = w.shape
    if group_size is not None and k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    dtype = scale_dtype or w.dtype
    # Work on Wᵀ [K, N] so that a column of W is a contiguous row and block updates are contiguous.
    WT = w.detach().to(torch.float64).T.contiguous()
    H = H.detach().to(device=WT.device, dtype=torch.float64).clone()

    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    WT[dead] = 0.0
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    if order is not None:
        WT, H = WT[order], H[order][:, order]
    U = _inverse_hessian_factor(H, damp)

    gs = group_size or k
    groups = k // gs
    S = WT.new_empty(groups, n)
    Z = None if symmetric else WT.new_empty(groups, n)
    if group_size is None:
        S[0], z = group_scale_zero(WT.T, bits, symmetric, dtype, clip)
        if Z is not None:
            Z[0] = z
    bs = block_size if group_size is None else max(1, block_size // gs) * gs

    QT = torch.empty_like(WT)  # signed codes, in processing order
    for b0 in range(0, k, bs):
        b1 = min(b0 + bs, k)
        W1, U1 = WT[b0:b1], U[b0:b1, b0:b1]  # W1 is a view: updates land in WT
        E1 = WT.new_empty(b1 - b0, n)
        with _one_thread():
            for i in range(b1 - b0):
                col = b0 + i
                g = col // gs
                if group_size is not None and col % gs == 0:
                    S[g], z = group_scale_zero(W1[i:i + gs].T, bits, symmetric, dtype, clip)
                    if Z is not None:
                        Z[g] = z
                s, z = S[g], None if Z is None else Z[g]
                q = quantize_values(W1[i], s, z, bits)
                QT[col] = q
                err = (W1[i] - (q if z is None else q - z) * s) / U1[i, i]
                W1[i + 1:] -= U1[i, i + 1:, None] * err
                E1[i] = err
        WT[b1:].addmm_(U[b0:b1, b1:].T, E1, alpha=-1.0)

    g_idx = None
    if order is not None:
        inverse = torch.argsort(order)
        QT = QT[inverse]
        if group_size is not None:
            g_idx = (torch.arange(k, device=WT.device) // gs)[inverse]
    return build(QT.T, S.T, None if Z is None else Z.T, bits=bits, group_size=group_size, g_idx=g_idx,
                 dtype=dtype, bias=bias)
