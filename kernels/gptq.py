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
from dataclasses import dataclass

import torch
from torch import Tensor

from spinfx.kernels.quant_rtn import build, group_scale_zero, quantize_values
from spinfx.kernels.quant_weight import QuantWeight


class HessianAccumulator:
    """H = (2 / n) Σ xᵀx over all n rows x ∈ R^K of the batches added; summed in float64.

    `dtype` is the dtype of the products: float32 is ≈ 1.8× faster than float64 on this CPU (62 vs 33
    GFLOP/s at K=1536), and the Hessians are most of GPTQ's cost (SmolLM2, 128×512 tokens: ≈ 13 TFLOP
    of Gram products), so calibration takes float32 products of ≥ `rows` rows at a time into float64
    sums. H is symmetric: only the block upper triangle is multiplied (blocks of ≤ `block` columns:
    x[:, I]ᵀ x[:, I:] per block row I, ≈ 62 % of the full product at K=1536), the rest is its mirror
    image — on this CPU each block equals the same entries of the full product bit for bit.
    (GPTQ's result does not depend on H's scale: the dampening is relative to mean(diag H).)"""

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64, rows: int = 4096, block: int = 384) -> None:
        self.in_features = in_features
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0
        self.dtype, self.rows, self._pending = dtype, rows, []
        nb = -(-in_features // block)
        self.block = -(-in_features // nb)  # equal blocks: 576 → 2 × 288, 1536 → 4 × 384

    def add(self, x: Tensor) -> None:
        """x: [*, K] activations (any leading dims), e.g. a linear layer's input during calibration."""
        self._pending.append(x.detach().reshape(-1, self.in_features).to(self.xtx.device, self.dtype))
        if sum(r.shape[0] for r in self._pending) >= self.rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        x = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending = []
        b = self.block
        for i in range(0, self.in_features, b):
            self.xtx[i:i + b, i:] += x[:, i:i + b].T @ x[:, i:]
        self.n += x.shape[0]

    def hessian(self) -> Tensor:
        self._flush()
        if self.n == 0:
            raise ValueError("no activations were added")
        h, b = self.xtx.clone(), self.block
        for i in range(0, self.in_features, b):  # the lower block triangle: the upper one's mirror image
            h[i + b:, i:i + b] = h[i:i + b, i + b:].T
        return h * (2.0 / self.n)


class CrossAccumulator:
    """C = (2 / n) Σ x_qᵀ x_f over the rows of paired batches (x_q, x_f ∈ R^K: one linear's input in the
    quantized and in the float model), float32 products summed in float64 — the H of HessianAccumulator
    when x_q = x_f."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.xty = 0.0  # a float64 tensor on the inputs' device from the first batch on
        self.n = 0

    def add(self, xq: Tensor, xf: Tensor) -> None:
        xq = xq.detach().reshape(-1, self.in_features).float()
        self.xty = self.xty + (xq.T @ xf.detach().reshape(-1, self.in_features).float()).double()
        self.n += xq.shape[0]

    def product(self) -> Tensor:
        return self.xty * (2.0 / self.n)


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


@dataclass(frozen=True, eq=False)
class HessianFactor:
    """What GPTQ needs of H, computed once for every weight that reads the same input (q/k/v share one
    H, gate/up another): the dead inputs, the processing order (act_order) and U, the upper Cholesky
    factor of the dampened H⁻¹ in that order (the K³ part of GPTQ)."""

    dead: Tensor            # [K] bool: H[j, j] == 0
    order: Tensor | None    # act_order: columns by descending diag(H); None: 0..K-1
    U: Tensor               # [K, K] float64, in processing order
    damp: float
    act_order: bool


def hessian_factor(H: Tensor, damp: float = 0.01, act_order: bool = False,
                   device: torch.device | str | None = None) -> HessianFactor:
    H = H.detach().to(device=device or H.device, dtype=torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    if order is not None:
        H = H[order][:, order]
    return HessianFactor(dead, order, _inverse_hessian_factor(H, damp), damp, act_order)


def gptq_quantize(w: Tensor, H: Tensor | HessianFactor, bits: int, group_size: int | None, symmetric: bool = True,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  bias: Tensor | None = None, scale_dtype: torch.dtype | None = None,
                  clip: str = "minmax") -> QuantWeight:
    """GPTQ-quantize W [N, K] given H [K, K] (e.g. `HessianAccumulator.hessian()`) or its `hessian_factor`.

    group_size None = per-channel. Scales are stored in `scale_dtype` (default: w's dtype) and, as in
    RTN, rounded up to it before any integer is chosen, so the error GPTQ compensates is the error of
    the stored weight."""
    return gptq_quantize_siblings([w], H, bits, group_size, symmetric, act_order, damp, block_size,
                                  [bias], scale_dtype, clip)[0]


def gptq_quantize_siblings(ws: list[Tensor], H: Tensor | HessianFactor, bits: int, group_size: int | None,
                           symmetric: bool = True, act_order: bool = False, damp: float = 0.01,
                           block_size: int = 128, biases: list[Tensor | None] | None = None,
                           scale_dtype: torch.dtype | None = None, clip: str = "minmax") -> list[QuantWeight]:
    """GPTQ of several weights [N_i, K] that read the same input (one H), in one pass of the column loop
    over their rows stacked: GPTQ treats rows independently (a row's codes and scales depend on that
    row and H only), so this is `gptq_quantize` of each, with one factorization and 1/len(ws) of the
    per-column Python steps. Scales are stored in `scale_dtype` (default: the first weight's dtype)."""
    k = ws[0].shape[1]
    if any(w.shape[1] != k for w in ws):
        raise ValueError(f"siblings must have the same in_features, got {[tuple(w.shape) for w in ws]}")
    if group_size is not None and k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    f = H if isinstance(H, HessianFactor) else hessian_factor(H, damp, act_order, ws[0].device)
    if (f.damp, f.act_order) != (damp, act_order):
        raise ValueError(f"the Hessian factor was made with damp={f.damp}, act_order={f.act_order}; "
                         f"asked for damp={damp}, act_order={act_order}")
    dtype = scale_dtype or ws[0].dtype
    # Work on Wᵀ [K, N] so that a column of W is a contiguous row and block updates are contiguous.
    WT = torch.cat([w.detach().to(torch.float64) for w in ws]).T.contiguous()
    QT, S, Z = _column_loop(WT, f, bits, group_size, symmetric, dtype, clip, block_size)
    g_idx = None
    if f.order is not None:
        inverse = torch.argsort(f.order)
        QT = QT[inverse]
        if group_size is not None:
            g_idx = (torch.arange(k, device=WT.device) // group_size)[inverse]
    out, r0 = [], 0
    for w, bias in zip(ws, biases or [None] * len(ws)):
        r1 = r0 + w.shape[0]
        out.append(build(QT[:, r0:r1].T, S[:, r0:r1].T, None if Z is None else Z[:, r0:r1].T, bits=bits,
                         group_size=group_size, g_idx=g_idx, dtype=dtype, bias=bias))
        r0 = r1
    return out


def _column_loop(WT: Tensor, f: HessianFactor, bits: int, group_size: int | None, symmetric: bool,
                 dtype: torch.dtype, clip: str, block_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """GPTQ proper on Wᵀ [K, N] (float64, updated in place): signed codes Qᵀ [K, N] in processing order,
    scales/zeros [groups, N]."""
    k, n = WT.shape
    WT[f.dead] = 0.0
    if f.order is not None:
        WT = WT[f.order]
    U = f.U

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
    return QT, S, Z
