"""Quantized weight layouts: `QuantWeight` (one uniform bit width) and `MixedQuantWeight` (per-group widths).

`QuantWeight` is a compressed-tensors `pack-quantized` matrix W [N, K] (N = out features, K = in features):

    W[n, k] = (u[n, k] - zu[n, g(k)]) * weight_scale[n, g(k)]

- u = unpack(weight_packed): unsigned stored values, u = q + 2^(bits-1) for signed q in
  [-2^(bits-1), 2^(bits-1) - 1] (the compressed-tensors offset, for symmetric and asymmetric alike);
- zu = 2^(bits-1) for symmetric weights (q = 0 <-> 0.0), else weight_zero_point + 2^(bits-1);
- g(k) = weight_g_idx[k] when present (act-order), else k // group_size (per-channel: g = 0).

`MixedQuantWeight` (EXL2-style) gives each K-group its own width: the input columns are permuted once
(`perm`) so that groups of equal width sit together, and each contiguous run of stored columns is a
`QuantWeight` segment. Compressed-tensors has no per-group widths, so it has no checkpoint form there.

Tensor parallelism: `slice_rows` (column-parallel, split N) and `slice_cols` (row-parallel, split K)
cut a `QuantWeight`; `QuantWeight.concat` puts shards back together bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from spinfx.kernels.quant_pack import pack_factor, pack_int32, unpack_int32


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """One `pack-quantized` matrix (see the module docstring); fields use compressed-tensors' names."""

    weight_packed: Tensor  # int32 [N, ceil(K / (32 // bits))], packed along K (see quant_pack)
    weight_scale: Tensor  # float [N, G] in the weight dtype; per-channel: [N, 1]
    weight_zero_point: Tensor | None  # int8 [N, G], signed q-domain zero (unpacked); None: symmetric
    weight_g_idx: Tensor | None  # int32 [K]: group of each input column (act-order); None: k // group_size
    bits: int
    group_size: int | None  # input columns per group; None: per-channel (one group per row)
    weight_shape: tuple[int, int]  # (N, K)
    bias: Tensor | None = None  # [N]

    def __post_init__(self) -> None:
        n, k = self.weight_shape
        pf = pack_factor(self.bits)
        if self.weight_packed.dtype != torch.int32 or tuple(self.weight_packed.shape) != (n, -(-k // pf)):
            raise ValueError(f"weight_packed must be int32 [{n}, {-(-k // pf)}], got "
                             f"{self.weight_packed.dtype} {tuple(self.weight_packed.shape)}")
        if not self.weight_scale.is_floating_point() or self.weight_scale.dim() != 2 or self.weight_scale.shape[0] != n:
            raise ValueError(f"weight_scale must be float [N={n}, G], got {self.weight_scale.dtype} "
                             f"{tuple(self.weight_scale.shape)}")
        g = self.weight_scale.shape[1]
        if self.group_size is None:
            if g != 1 or self.weight_g_idx is not None:
                raise ValueError("per-channel weights have one scale column and no g_idx")
        elif self.weight_g_idx is None and (k % self.group_size or g != k // self.group_size):
            raise ValueError(f"K={k} with group_size={self.group_size} needs K % group_size == 0 and "
                             f"{k // self.group_size} scale columns, got {g}")
        if self.weight_g_idx is not None:
            gi = self.weight_g_idx
            if gi.dtype != torch.int32 or tuple(gi.shape) != (k,) or (k and (int(gi.min()) < 0 or int(gi.max()) >= g)):
                raise ValueError(f"weight_g_idx must be int32 [{k}] with values in [0, {g})")
        if self.weight_zero_point is not None:
            zp = self.weight_zero_point
            lo, hi = -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
            if zp.dtype != torch.int8 or zp.shape != self.weight_scale.shape or (
                    zp.numel() and (int(zp.min()) < lo or int(zp.max()) > hi)):
                raise ValueError(f"weight_zero_point must be int8 {tuple(self.weight_scale.shape)} in [{lo}, {hi}]")
        if self.bias is not None and tuple(self.bias.shape) != (n,):
            raise ValueError(f"bias must be [{n}], got {tuple(self.bias.shape)}")

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def symmetric(self) -> bool:
        return self.weight_zero_point is None

    @property
    def num_groups(self) -> int:
        return self.weight_scale.shape[1]

    def unpack(self) -> Tensor:
        """int32 [N, K] stored unsigned values u = q + 2^(bits-1)."""
        return unpack_int32(self.weight_packed, self.bits, self.in_features)

    def group_index(self) -> Tensor:
        """int64 [K]: the scale column of each input column."""
        k = self.in_features
        if self.weight_g_idx is not None:
            return self.weight_g_idx.long()
        device = self.weight_packed.device
        return torch.arange(k, device=device) // (self.group_size or max(k, 1))

    def zero_unsigned(self) -> Tensor:
        """int32 [N, G]: the zero in the stored (unsigned) domain, zu."""
        mid = 1 << (self.bits - 1)
        if self.weight_zero_point is None:
            return torch.full(self.weight_scale.shape, mid, dtype=torch.int32, device=self.weight_scale.device)
        return self.weight_zero_point.to(torch.int32) + mid

    # --- compressed-tensors -------------------------------------------------------------------------
    def to_compressed_tensors(self) -> dict[str, Tensor]:
        """The tensors of a `pack-quantized` module, keyed as compressed-tensors names them (+ `bias`).

        `weight_zero_point` (asymmetric only) is packed along N (dim 0), as compressed-tensors does:
        int32 [ceil(N / pf), G] of zp + 2^(bits-1). `weight_shape` is int64 [2] (what
        `compress_weight` writes and vLLM loads).
        """
        out = {"weight_packed": self.weight_packed, "weight_scale": self.weight_scale,
               "weight_shape": torch.tensor(self.weight_shape, dtype=torch.int64)}
        if self.weight_zero_point is not None:
            out["weight_zero_point"] = pack_int32(self.zero_unsigned().T, self.bits).T.contiguous()
        if self.weight_g_idx is not None:
            out["weight_g_idx"] = self.weight_g_idx
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    @classmethod
    def from_compressed_tensors(cls, tensors: dict[str, Tensor], *, bits: int,
                                group_size: int | None) -> QuantWeight:
        """Inverse of `to_compressed_tensors`; `bits`/`group_size` come from the checkpoint's config
        (`num_bits`, `group_size`; strategy "channel" -> None). Symmetric iff no `weight_zero_point`."""
        n, k = (int(v) for v in tensors["weight_shape"])
        zp = tensors.get("weight_zero_point")
        if zp is not None:
            zp = (unpack_int32(zp.T.contiguous(), bits, n).T - (1 << (bits - 1))).to(torch.int8).contiguous()
        g_idx = tensors.get("weight_g_idx")
        return cls(weight_packed=tensors["weight_packed"], weight_scale=tensors["weight_scale"],
                   weight_zero_point=zp, weight_g_idx=None if g_idx is None else g_idx.to(torch.int32),
                   bits=bits, group_size=group_size, weight_shape=(n, k), bias=tensors.get("bias"))

    def bits_per_weight(self) -> float:
        """Stored bits (every compressed-tensors tensor except bias) per weight element."""
        stored = self.to_compressed_tensors()
        stored.pop("bias", None)
        return sum(t.numel() * t.element_size() * 8 for t in stored.values()) / (
            self.out_features * self.in_features)

    # --- tensor parallelism --------------------------------------------------------------------------
    def slice_rows(self, start: int, end: int) -> QuantWeight:
        """Output features [start, end) (column-parallel shard)."""
        zp, b = self.weight_zero_point, self.bias
        return replace(self, weight_packed=self.weight_packed[start:end], weight_scale=self.weight_scale[start:end],
                       weight_zero_point=None if zp is None else zp[start:end],
                       bias=None if b is None else b[start:end], weight_shape=(end - start, self.in_features))

    def slice_cols(self, start: int, end: int) -> QuantWeight:
        """Input features [start, end) (row-parallel shard); the bias stays with the shard at 0.

        Contiguous groups: the shard keeps its own scale columns, so start/end must be group
        boundaries. Act-order (g_idx) and per-channel: a shard's columns may use any group, so it keeps
        the full scales (as vLLM does for act-order row-parallel layers) and its slice of g_idx.
        """
        k = self.in_features
        if not 0 <= start < end <= k:
            raise ValueError(f"bad column range [{start}, {end}) for K={k}")
        packed = pack_int32(self.unpack()[:, start:end], self.bits)
        scale, zp, g_idx = self.weight_scale, self.weight_zero_point, self.weight_g_idx
        if self.group_size is not None and g_idx is None:
            gs = self.group_size
            if start % gs or end % gs:
                raise ValueError(f"column shard [{start}, {end}) must start and end on group_size={gs}")
            scale = scale[:, start // gs:end // gs]
            zp = None if zp is None else zp[:, start // gs:end // gs]
        elif g_idx is not None:
            g_idx = g_idx[start:end]
        return replace(self, weight_packed=packed, weight_scale=scale, weight_zero_point=zp, weight_g_idx=g_idx,
                       bias=self.bias if start == 0 else None, weight_shape=(self.out_features, end - start))

    @staticmethod
    def concat(parts: list[QuantWeight], dim: int) -> QuantWeight:
        """Inverse of slicing into consecutive shards along `dim` (0: rows/N, 1: columns/K); bit-exact."""
        first = parts[0]
        if any((p.bits, p.group_size, p.symmetric, p.weight_g_idx is None) !=
               (first.bits, first.group_size, first.symmetric, first.weight_g_idx is None) for p in parts):
            raise ValueError("shards differ in bits, group_size, symmetry or act-order")

        def cat(name: str, d: int) -> Tensor | None:
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts, d)

        def same(name: str) -> Tensor | None:
            t = getattr(first, name)
            if t is not None and not all(torch.equal(getattr(p, name), t) for p in parts):
                raise ValueError(f"shards disagree on {name}, which they must share")
            return t

        if dim == 0:
            return replace(first, weight_packed=cat("weight_packed", 0), weight_scale=cat("weight_scale", 0),
                           weight_zero_point=cat("weight_zero_point", 0), weight_g_idx=same("weight_g_idx"),
                           bias=cat("bias", 0), weight_shape=(sum(p.out_features for p in parts), first.in_features))
        if any(p.bias is not None for p in parts[1:]):
            raise ValueError("only the first column shard may carry the bias")
        k = sum(p.in_features for p in parts)
        packed = pack_int32(torch.cat([p.unpack() for p in parts], 1), first.bits)
        grouped = first.group_size is not None and first.weight_g_idx is None
        scale = cat("weight_scale", 1) if grouped else same("weight_scale")
        zp = cat("weight_zero_point", 1) if grouped else same("weight_zero_point")
        return replace(first, weight_packed=packed, weight_scale=scale, weight_zero_point=zp,
                       weight_g_idx=cat("weight_g_idx", 0), weight_shape=(first.out_features, k))


@dataclass(frozen=True, eq=False)
class MixedQuantWeight:
    """W[:, perm] = cat([dequantize(s) for s in segments], dim=1): stored column j is input column perm[j].

    Segments cover consecutive stored columns, each a contiguous-group `QuantWeight` with its own
    bits (and no bias of its own). Built by `quantize_rtn_mixed`.
    """

    perm: Tensor  # int64 [K], a permutation of range(K)
    segments: tuple[QuantWeight, ...]
    bias: Tensor | None = None  # [N]

    def __post_init__(self) -> None:
        k = sum(s.in_features for s in self.segments)
        n = self.segments[0].out_features
        if tuple(self.perm.shape) != (k,) or self.perm.dtype != torch.int64:
            raise ValueError(f"perm must be int64 [{k}]")
        if any(s.out_features != n or s.bias is not None or s.weight_g_idx is not None for s in self.segments):
            raise ValueError("segments must share N and carry neither bias nor g_idx")
        if self.bias is not None and tuple(self.bias.shape) != (n,):
            raise ValueError(f"bias must be [{n}]")

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.segments[0].out_features, int(self.perm.numel())

    def bits_per_weight(self) -> float:
        n, k = self.weight_shape
        return (sum(s.bits_per_weight() * s.out_features * s.in_features for s in self.segments)
                + self.perm.numel() * 64) / (n * k)

    def slice_rows(self, start: int, end: int) -> MixedQuantWeight:
        return MixedQuantWeight(self.perm, tuple(s.slice_rows(start, end) for s in self.segments),
                                None if self.bias is None else self.bias[start:end])


def dequantize(qw: QuantWeight | MixedQuantWeight, dtype: torch.dtype | None = None) -> Tensor:
    """Reference dequantization -> W [N, K], computed exactly in float64 ((u - zu) · s) and rounded once
    to `dtype` (default: the scale dtype; pass torch.float64 for the exact values)."""
    if isinstance(qw, MixedQuantWeight):
        stored = torch.cat([dequantize(s, dtype) for s in qw.segments], dim=1)
        return torch.empty_like(stored).index_copy_(1, qw.perm, stored)
    g = qw.group_index()
    w = (qw.unpack() - qw.zero_unsigned()[:, g]).double() * qw.weight_scale.double()[:, g]
    return w.to(dtype or qw.weight_scale.dtype)
