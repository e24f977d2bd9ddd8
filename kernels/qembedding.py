"""Quantized embedding: rows of a packed `QuantWeight` gathered by index, then dequantized.

  spinfx::qembedding(Tensor indices, Tensor weight_packed, Tensor weight_scale, Tensor? weight_zero_point,
                     int bits, int group_size) -> Tensor
      out[..., :] = dequantize(W)[indices[...], :]  for a table W [V, D] stored as a compressed-tensors
      `pack-quantized` matrix (rows = tokens, packed along D; per-row scales are group_size = D).
      D = group_size · (scale columns); no act-order (an embedding has no input columns to reorder).
      The result has the scale's dtype (the table's dtype: there is no float input to follow).

Only the gathered rows are unpacked and scaled, so a lookup reads ≈ bits/8 bytes per table entry it
touches instead of 4. CPU (and any device): plain torch ops (`dequant_embedding`), which are also its
Inductor decomposition (`qembedding_decompositions()`), so a compiled model fuses gather + unpack +
scale into one loop. `QEmbedding` is the nn.Embedding replacement holding the packed tensors as buffers.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from spinfx.kernels.quant_pack import unpack_int32
from spinfx.kernels.quant_weight import QuantWeight


def dequant_embedding(indices: Tensor, weight_packed: Tensor, weight_scale: Tensor,
                      weight_zero_point: Tensor | None, bits: int, group_size: int) -> Tensor:
    """`spinfx::qembedding` in plain functional torch ops: gather packed rows, unpack, (u - zu) · s.

    (u - zu) is an integer below 2^8, exact in every float dtype, so each value is rounded once."""
    groups = weight_scale.shape[1]
    d = groups * group_size
    flat = indices.reshape(-1)
    u = unpack_int32(weight_packed.index_select(0, flat), bits, d)          # [T, D] unsigned
    s = weight_scale.index_select(0, flat)                                   # [T, G]
    mid = 1 << (bits - 1)
    zu = mid if weight_zero_point is None else weight_zero_point.index_select(0, flat).to(torch.int32).unsqueeze(-1) + mid
    dt = weight_scale.dtype
    w = (u.view(-1, groups, group_size) - zu).to(dt) * s.unsqueeze(-1)
    return w.reshape(*indices.shape, d)


@torch.library.custom_op(
    "spinfx::qembedding", mutates_args=(),
    schema="(Tensor indices, Tensor weight_packed, Tensor weight_scale, Tensor? weight_zero_point, "
           "int bits, int group_size) -> Tensor")
def qembedding(indices, weight_packed, weight_scale, weight_zero_point, bits, group_size):
    return dequant_embedding(indices, weight_packed, weight_scale, weight_zero_point, bits, group_size)


@qembedding.register_fake
def _qembedding_fake(indices, weight_packed, weight_scale, weight_zero_point, bits, group_size):
    return weight_scale.new_empty(*indices.shape, weight_scale.shape[1] * group_size)


def qembedding_decompositions() -> dict:
    """Inductor decomposition: `spinfx::qembedding` becomes its gather/unpack/scale ops, which fuse."""
    return {torch.ops.spinfx.qembedding.default: dequant_embedding}


def embedding_args(qw: QuantWeight) -> dict:
    """The arguments of `spinfx::qembedding` (after indices) for a table `qw` [V, D]."""
    if qw.weight_g_idx is not None:
        raise ValueError("an embedding table has no act-order (g_idx) layout")
    return {"weight_packed": qw.weight_packed, "weight_scale": qw.weight_scale,
            "weight_zero_point": qw.weight_zero_point, "bits": qw.bits,
            "group_size": qw.group_size or qw.in_features}


class QEmbedding(nn.Module):
    """nn.Embedding replacement over a quantized table; the packed tensors are buffers (state_dict, .to).
    `scale`: a number the lookup is multiplied by, for an embedding module that scales what it looks up
    (Gemma's √d)."""

    def __init__(self, qw: QuantWeight, scale: float = 1.0) -> None:
        super().__init__()
        args = embedding_args(qw)
        self.num_embeddings, self.embedding_dim = qw.weight_shape
        self.bits, self.group_size = args["bits"], args["group_size"]
        self.scale = float(scale)
        self.register_buffer("weight_packed", args["weight_packed"])
        self.register_buffer("weight_scale", args["weight_scale"])
        self.register_buffer("weight_zero_point", args["weight_zero_point"])

    def quant_weight(self) -> QuantWeight:
        """The table as a `QuantWeight` [V, D] (what a tied lm_head's QLinear runs on)."""
        gs = None if self.group_size == self.embedding_dim else self.group_size
        return QuantWeight(weight_packed=self.weight_packed, weight_scale=self.weight_scale,
                           weight_zero_point=self.weight_zero_point, weight_g_idx=None, bits=self.bits,
                           group_size=gs, weight_shape=(self.num_embeddings, self.embedding_dim))

    def forward(self, indices: Tensor) -> Tensor:
        rows = torch.ops.spinfx.qembedding(indices, self.weight_packed, self.weight_scale, self.weight_zero_point,
                                           self.bits, self.group_size)
        return rows if self.scale == 1.0 else rows * self.scale

    def extra_repr(self) -> str:
        scale = "" if self.scale == 1.0 else f", scale={self.scale:g}"
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}{scale}"
