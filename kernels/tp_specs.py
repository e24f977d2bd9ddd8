"""Tensor-parallel layouts as declarative specs: one `Layout` per linear shards its tensors for rank r
and consolidates the rank tensors back into the original, bit for bit (the optimum-neuron idea).

A layout is data (it round-trips through JSON, so a sharded checkpoint carries its own specs):

  column     split the output features N. `rows[r]` lists the global row ranges rank r holds, one per
             logical part, concatenated in that order: q/k/v heads (GQA: kv heads of rank r, replicated
             across ranks when T > KV), merged gate/up [gate_r; up_r], fused Phi-3 qkv [q_r; k_r; v_r].
             Ranges of different ranks may overlap (replicated kv heads); consolidation checks the
             copies agree and writes each row once.
  row        split the input features K evenly (K/T per rank). The bias stays with rank 0 only.
             Quantized: contiguous groups aligned with K/T → each rank keeps its scale columns;
             not aligned (K/T % group ≠ 0, e.g. 11008/4 with group 128) → every rank keeps all scales
             and gets its slice of the global group index `weight_g_idx` (`synth_g_idx`; exact for any
             split, dropped again on consolidation); act-order and per-channel → scales replicated.
  replicate  every rank holds the whole tensor.

Tensor kinds, by their compressed-tensors names: `weight` (float [N, K]), `bias` [N],
`weight_packed` int32 [N, ceil(K/pf)] (packed along K: row splits unpack, slice and repack),
`weight_scale` [N, G], `weight_zero_point` (checkpoint form: packed along N, [ceil(N/pf), G];
graph form: int8 [N, G] — `zp_packed` says which), `weight_g_idx` int32 [K], `weight_shape` int64 [2],
`input_perm` int64 [K] (an act-order input permutation: replicated for column layouts, refused for
row layouts where it would cross ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spinfx.kernels.quant_pack import pack_int32, unpack_int32

Ranges = tuple[tuple[int, int], ...]


class LayoutError(ValueError):
    """A dimension that cannot be split across T ranks; the message names it and T."""


@dataclass(frozen=True)
class Layout:
    kind: str                       # "column" | "row" | "replicate"
    tp: int
    n: int = 0                      # global output features
    k: int = 0                      # global input features
    rows: tuple[Ranges, ...] = ()   # column: per rank, the global row ranges it holds (one per part)
    parts: tuple[int, ...] = ()     # column: global length of each logical part, back to back
    names: tuple[str, ...] = ()     # column: the parts' names (q, k, v / gate, up / ...)
    bits: int | None = None         # quantized: bit width (zero-point unpacking, weight repacking)
    group_size: int | None = None   # quantized: contiguous group size (None: per channel or act-order)
    synth_g_idx: bool = False       # row: scales replicated + per-rank slice of the global group index

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tp": self.tp, "n": self.n, "k": self.k,
                "rows": [[list(r) for r in rr] for rr in self.rows], "parts": list(self.parts),
                "names": list(self.names), "bits": self.bits, "group_size": self.group_size,
                "synth_g_idx": self.synth_g_idx}

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        return cls(d["kind"], d["tp"], d.get("n", 0), d.get("k", 0),
                   tuple(tuple(tuple(r) for r in rr) for rr in d.get("rows", ())), tuple(d.get("parts", ())),
                   tuple(d.get("names", ())), d.get("bits"), d.get("group_size"), d.get("synth_g_idx", False))

    def local_n(self) -> int:
        return sum(b - a for a, b in self.rows[0]) if self.kind == "column" else self.n

    def local_k(self) -> int:
        return self.k // self.tp if self.kind == "row" else self.k

    def segments(self) -> tuple[tuple[int, int], ...]:
        """column: (global, local) length of each logical part of the output features."""
        return tuple((g, b - a) for g, (a, b) in zip(self.parts, self.rows[0]))

    def with_quant(self, bits: int | None, group_size: int | None, act_order: bool = False) -> Layout:
        """The same split for a quantized weight: decides how a row split treats the scales."""
        from dataclasses import replace

        synth = (self.kind == "row" and bits is not None and group_size is not None and not act_order
                 and (self.k // self.tp) % group_size != 0)
        return replace(self, bits=bits, group_size=None if act_order else group_size, synth_g_idx=synth)


# ---- constructors ----------------------------------------------------------------------------------


def split_even(n: int, tp: int, what: str) -> int:
    if tp < 1 or n % tp:
        raise LayoutError(f"{what} = {n} is not divisible by T = {tp}")
    return n // tp


def heads(h: int, kv: int, tp: int, where: str = "") -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Per rank: (query heads [a, b), kv heads [a, b)) with vLLM's GQA semantics. T ≤ KV: KV/T kv heads
    per rank; T > KV: rank r holds kv head r // (T/KV) (replicated) and exactly the query heads using it."""
    at = f" at {where}" if where else ""
    if h % tp:
        raise LayoutError(f"attention heads = {h} is not divisible by T = {tp}{at}")
    if kv <= 0 or h % kv:
        raise LayoutError(f"attention heads = {h} is not a multiple of kv heads = {kv}{at}")
    hq = h // tp
    q = [(r * hq, (r + 1) * hq) for r in range(tp)]
    if tp <= kv:
        if kv % tp:
            raise LayoutError(f"kv heads = {kv} is not divisible by T = {tp}{at} (T must divide KV or be a multiple of it)")
        per = kv // tp
        return q, [(r * per, (r + 1) * per) for r in range(tp)]
    if tp % kv:
        raise LayoutError(f"T = {tp} is neither a divisor nor a multiple of kv heads = {kv}{at}")
    rep = tp // kv
    return q, [(r // rep, r // rep + 1) for r in range(tp)]


def column(parts: list[tuple[str, int, list[tuple[int, int]]]], tp: int, k: int) -> Layout:
    """A column-parallel layout from logical parts (name, global length, per-rank [a, b) within the part)."""
    offs, rows = [], [[] for _ in range(tp)]
    off = 0
    for name, length, ranges in parts:
        for r, (a, b) in enumerate(ranges):
            rows[r].append((off + a, off + b))
        offs.append(length)
        off += length
    return Layout("column", tp, n=off, k=k, rows=tuple(tuple(rr) for rr in rows), parts=tuple(offs),
                  names=tuple(p[0] for p in parts))


def even_column(n: int, tp: int, k: int, what: str, name: str = "out") -> Layout:
    per = split_even(n, tp, what)
    return column([(name, n, [(r * per, (r + 1) * per) for r in range(tp)])], tp, k)


def row(n: int, k: int, tp: int, what: str) -> Layout:
    split_even(k, tp, what)
    return Layout("row", tp, n=n, k=k)


def replicate(tp: int) -> Layout:
    return Layout("replicate", tp)


# ---- shard -----------------------------------------------------------------------------------------


def _rows_of(t: Tensor, ranges: Ranges) -> Tensor:
    return torch.cat([t[a:b] for a, b in ranges], 0)


def _zp_unpack(zp: Tensor, bits: int, n: int) -> Tensor:
    return unpack_int32(zp.T.contiguous(), bits, n).T.contiguous()


def _zp_pack(u: Tensor, bits: int) -> Tensor:
    return pack_int32(u.T.contiguous(), bits).T.contiguous()


def shard_tensors(lay: Layout, tensors: dict[str, Tensor], rank: int, zp_packed: bool = True) -> dict[str, Tensor]:
    """Rank `rank`'s tensors of one linear (kinds as in the module docstring)."""
    if lay.kind == "replicate":
        return dict(tensors)
    out: dict[str, Tensor] = {}
    if lay.kind == "column":
        rr = lay.rows[rank]
        for kind, t in tensors.items():
            if kind in ("weight", "bias", "weight_packed", "weight_scale"):
                out[kind] = _rows_of(t, rr).contiguous()
            elif kind == "weight_zero_point":
                out[kind] = (_zp_pack(_rows_of(_zp_unpack(t, lay.bits, lay.n), rr), lay.bits) if zp_packed
                             else _rows_of(t, rr).contiguous())
            elif kind in ("weight_g_idx", "input_perm"):
                out[kind] = t
            elif kind == "weight_shape":
                out[kind] = torch.tensor([lay.local_n(), int(t[1])], dtype=t.dtype)
            else:
                raise LayoutError(f"no column rule for tensor kind {kind!r}")
        return out
    if lay.kind != "row":
        raise LayoutError(f"unknown layout kind {lay.kind!r}")
    kl = lay.local_k()
    k0, k1 = rank * kl, (rank + 1) * kl
    grouped = lay.group_size is not None and not lay.synth_g_idx and "weight_g_idx" not in tensors
    for kind, t in tensors.items():
        if kind == "weight":
            out[kind] = t[:, k0:k1].contiguous()
        elif kind == "bias":
            if rank == 0:
                out[kind] = t
        elif kind == "weight_packed":
            out[kind] = pack_int32(unpack_int32(t, lay.bits, lay.k)[:, k0:k1], lay.bits)
        elif kind in ("weight_scale", "weight_zero_point"):
            if grouped:
                gs = lay.group_size
                out[kind] = t[:, k0 // gs:k1 // gs].contiguous()
            else:
                out[kind] = t
        elif kind == "weight_g_idx":
            out[kind] = t[k0:k1].contiguous()
        elif kind == "weight_shape":
            out[kind] = torch.tensor([int(t[0]), kl], dtype=t.dtype)
        elif kind == "input_perm":
            raise LayoutError("an act-order input permutation cannot be split by input features")
        else:
            raise LayoutError(f"no row rule for tensor kind {kind!r}")
    if lay.synth_g_idx:
        out["weight_g_idx"] = (torch.arange(k0, k1, dtype=torch.int32) // lay.group_size).to(torch.int32)
    return out


# ---- consolidate -----------------------------------------------------------------------------------


def _same(ts: list[Tensor], what: str) -> Tensor:
    for t in ts[1:]:
        if t.dtype != ts[0].dtype or t.shape != ts[0].shape or not torch.equal(t, ts[0]):
            raise LayoutError(f"rank copies of {what} disagree; they must be replicas")
    return ts[0]


def _place_rows(parts: list[Tensor], lay: Layout, what: str) -> Tensor:
    first = parts[0]
    out = first.new_zeros((lay.n, *first.shape[1:]))
    filled = torch.zeros(lay.n, dtype=torch.bool)
    for r, t in enumerate(parts):
        off = 0
        for a, b in lay.rows[r]:
            piece = t[off:off + b - a]
            if bool(filled[a:b].any()):
                if not torch.equal(out[a:b][filled[a:b]], piece[filled[a:b]]):
                    raise LayoutError(f"replicated rows {a}:{b} of {what} differ between ranks")
            out[a:b] = piece
            filled[a:b] = True
            off += b - a
    if not bool(filled.all()):
        raise LayoutError(f"the rank files do not cover every row of {what}")
    return out


def consolidate_tensors(lay: Layout, ranks: list[dict[str, Tensor]], zp_packed: bool = True,
                        what: str = "") -> dict[str, Tensor]:
    """Inverse of `shard_tensors` over all ranks: the original tensors, bit for bit."""
    if len(ranks) != lay.tp:
        raise LayoutError(f"{what}: {len(ranks)} rank files for T = {lay.tp}")
    if lay.kind == "replicate":
        return {kind: _same([r[kind] for r in ranks], f"{what}.{kind}") for kind in ranks[0]}
    out: dict[str, Tensor] = {}
    if lay.kind == "column":
        for kind in ranks[0]:
            ts = [r[kind] for r in ranks]
            if kind in ("weight", "bias", "weight_packed", "weight_scale"):
                out[kind] = _place_rows(ts, lay, f"{what}.{kind}")
            elif kind == "weight_zero_point":
                if zp_packed:
                    un = [_zp_unpack(t, lay.bits, int(r["weight_shape"][0])) for t, r in zip(ts, ranks)]
                    out[kind] = _zp_pack(_place_rows(un, lay, f"{what}.{kind}"), lay.bits)
                else:
                    out[kind] = _place_rows(ts, lay, f"{what}.{kind}")
            elif kind in ("weight_g_idx", "input_perm"):
                out[kind] = _same(ts, f"{what}.{kind}")
            elif kind == "weight_shape":
                out[kind] = torch.tensor([lay.n, int(ts[0][1])], dtype=ts[0].dtype)
        return out
    grouped = lay.group_size is not None and not lay.synth_g_idx and "weight_g_idx" not in ranks[0]
    kl = lay.local_k()
    for kind in ranks[0]:
        ts = [r[kind] for r in ranks if kind in r]
        if kind == "weight":
            out[kind] = torch.cat(ts, 1)
        elif kind == "bias":
            out[kind] = ts[0]
        elif kind == "weight_packed":
            out[kind] = pack_int32(torch.cat([unpack_int32(t, lay.bits, kl) for t in ts], 1), lay.bits)
        elif kind in ("weight_scale", "weight_zero_point"):
            out[kind] = torch.cat(ts, 1) if grouped else _same(ts, f"{what}.{kind}")
        elif kind == "weight_g_idx":
            if not lay.synth_g_idx:
                out[kind] = torch.cat(ts, 0)
        elif kind == "weight_shape":
            out[kind] = torch.tensor([int(ts[0][0]), lay.k], dtype=ts[0].dtype)
    if any("bias" in r for r in ranks[1:]):
        raise LayoutError(f"{what}: only rank 0 may hold a row-parallel bias")
    return out
