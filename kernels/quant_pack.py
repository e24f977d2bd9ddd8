"""Bit packing of quantized integers into int32 words (compressed-tensors `pack-quantized` scheme).

A row of K unsigned b-bit values is packed along K into ceil(K / pf) int32 words, pf = 32 // b values
per word, low bits first: value k lives in word k // pf at bit offset (k % pf) * b. The last word is
zero-padded. For b = 3 this is 10 values per word (30 bits used, the top 2 bits are 0): the same
layout compressed-tensors' `pack_to_int32` writes, chosen over a denser 32-values-in-3-words scheme
so that every width shares one formula (and one Triton/CPU unpack) and checkpoints stay loadable by
compressed-tensors/vLLM. Unsigned values are what is stored; signed q is recovered as u - 2^(b-1).
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)
LITTLE = sys.byteorder == "little"
ROW_CHUNK = 1 << 21  # weights per chunk when a [N, K] matrix is (de)quantized a few rows at a time


def rows_per_chunk(k: int) -> int:
    """Rows of a K-wide matrix per chunk: temporaries of ≤ 16 MB (float64), never full-size ones (an 8B
    layer's 14336×4096 matrix dequantized in float64 in one piece is ≈ 1.5 GB of them). Not smaller: each
    torch op is a parallel region, and on a loaded machine every region waits for all its threads to be
    scheduled — at 2^18 weights per chunk, SmolLM2's RTN took 4–10× longer than in one piece (load 7)."""
    return max(1, ROW_CHUNK // max(k, 1))


def pack_factor(bits: int) -> int:
    """Values per int32 word."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 32 // bits


def packed_width(cols: int, bits: int) -> int:
    """Number of int32 words that hold `cols` values."""
    return -(-cols // pack_factor(bits))


def pack_int32(u: Tensor, bits: int) -> Tensor:
    """[R, C] unsigned values in [0, 2^bits) -> int32 [R, ceil(C / pf)], packed along C, low bits first.

    In int32: OR-ing the pf shifted fields of a word is exact, and a field shifted into the sign bit
    wraps (two's complement), which is the int32 reading of the unsigned word."""
    pf = pack_factor(bits)
    rows, cols = u.shape
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 1 << bits):
        raise ValueError(f"values out of range for {bits}-bit packing")
    words = packed_width(cols, bits)
    if 8 % bits == 0 and cols == words * pf and LITTLE:  # whole bytes: value k is bits (k % per)·b of byte k // per
        per = 8 // bits                       # of the row (little-endian words), so pack bytes and view
        v = u.to(torch.uint8).contiguous().view(rows, cols // per, per)
        packed = v[..., 0].clone(memory_format=torch.contiguous_format)
        for i in range(1, per):
            packed |= v[..., i] << (i * bits)
        return packed.view(torch.int32)
    v = u.to(torch.int32).contiguous()
    if cols != words * pf:  # zero-pad the last word
        v = torch.cat([v, v.new_zeros(rows, words * pf - cols)], 1)
    v = v.view(rows, words, pf)
    packed = v[..., 0].clone(memory_format=torch.contiguous_format)
    for i in range(1, pf):
        packed |= v[..., i] << (i * bits)
    return packed


def unpack_int32(packed: Tensor, bits: int, cols: int) -> Tensor:
    """int32 [R, W] -> int32 [R, cols] unsigned values; inverse of `pack_int32` (bit-exact).

    Plain functional torch ops (shift, and, reshape, slice) so Inductor can fuse it into the consumer.
    """
    pf = pack_factor(bits)
    shifts = torch.arange(pf, dtype=torch.int32, device=packed.device) * bits
    # arithmetic >> sign-extends negative words; the mask drops those bits
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return u.reshape(packed.shape[0], -1)[:, :cols]


def unpack_bytes(packed: Tensor, bits: int, cols: int) -> Tensor:
    """The same values as `unpack_int32`, as uint8, for eager callers: where codes fill whole bytes
    (2/4/8 bits, little-endian words) the words are read as bytes, a quarter of the int32 path's traffic."""
    if 8 % bits or not LITTLE:
        return unpack_int32(packed, bits, cols)
    b = packed.contiguous().view(torch.uint8)
    per = 8 // bits
    if per > 1:
        mask = (1 << bits) - 1
        b = torch.stack([(b >> (i * bits)) & mask for i in range(per)], -1).view(packed.shape[0], -1)
    return b[:, :cols]
