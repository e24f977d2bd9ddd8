"""The residual stream: embedding → chain of adds → final norm, with its writers and readers.

A whole-graph question, not a local pattern: starting from the token embedding (an `aten.embedding`
of a constant table indexed by a graph input), follow the stream value through shape-only views and
scalar scalings (Gemma's √d) to the single `add` that extends it; the other operand of each add is a
*writer* (a linear — o_proj, down_proj —, or a positional embedding; possibly scaled by a number, as
Granite's residual_multiplier: a scalar commutes with every rotation; or by one number per token, as a
mixture of experts' routing weight; or a sum of writers, as a parallel block's attention + MLP in
GPT-NeoX, Phi, Falcon, or the experts of a mixture). *Readers* are the norms whose
input is a stream value. The walk stops where no add extends the stream; anything ambiguous (two adds,
an add whose other side is not a writer) ends the walk with the reason recorded. Beyond the stream's
ends: `token_embedding` (the table it starts from) and `output_linear` (the lm_head: the linear whose
result is the logits).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from spinfx.engine.match import Match, describe, match_at

from spinfx.patterns.common import CASTS, VIEWS, is_linear
from spinfx.patterns.norms import NORM, RMSNORM_PLAIN

aten = torch.ops.aten


@dataclass
class Writer:
    kind: str                 # "linear" | "linear_t" (Conv1D) | "embedding"
    node: fx.Node             # the linear / embedding node
    add: fx.Node | None       # the add that writes it into the stream (None for the token embedding)


@dataclass
class Stream:
    embedding: fx.Node | None
    values: list[fx.Node] = field(default_factory=list)   # every node that carries the stream
    writers: list[Writer] = field(default_factory=list)   # positional embedding and linears (not the token embedding)
    readers: list[fx.Node] = field(default_factory=list)  # nodes (outside the stream) that read a stream value
    scales: list[fx.Node] = field(default_factory=list)   # scalar scalings on the stream (Gemma's √d)
    end: fx.Node | None = None
    stop_reason: str = ""

    def summary(self) -> dict:
        return {"embedding": self.embedding.args[0].target if self.embedding is not None else None,
                "writers": len(self.writers), "readers": len(self.readers),
                "writer_kinds": sorted({w.kind for w in self.writers}), "stop": self.stop_reason}


def _through(n: fx.Node, ops) -> fx.Node:
    while n.op == "call_function" and n.target in ops:
        n = n.args[0]
    return n


def _writer(v: fx.Node) -> Writer | None:
    src = _through(v, VIEWS + CASTS)
    if src.op != "call_function":
        return None
    if is_linear(src):
        return Writer("linear" if src.target is aten.linear.default else "linear_t", src, None)
    if src.target is aten.embedding.default and src.args[0].op == "get_attr":
        return Writer("embedding", src, None)
    return None


def _writers(v: fx.Node) -> list[Writer] | None:
    """What `v` writes into the stream: a linear or embedding, possibly scaled by a number (Granite's
    residual_multiplier), or a sum of such (a parallel block's attention + MLP: GPT-NeoX, Phi, Falcon).
    None when anything else is in it."""
    u = _unscaled(v)
    if u.op == "call_function" and u.target is aten.add.Tensor and all(isinstance(a, fx.Node) for a in u.args[:2]):
        parts = [_writers(a) for a in u.args[:2]]
        return None if None in parts else parts[0] + parts[1]
    if u.op == "call_function" and u.target is aten.mul.Tensor:  # a per-token weight: a routed expert
        scaled = [a for a, s in (u.args[:2], u.args[1::-1]) if _is_row_scale(s, a)]
        if scaled:
            return _writers(scaled[0])
    w = _writer(u)
    return [w] if w is not None else None


def _is_row_scale(s, x) -> bool:
    """Is `s` one number per row of `x` (shape [..., 1] against x's [..., d]): a mixture-of-experts
    routing weight? It scales whole feature vectors, so it commutes with every map of the feature dim
    (a rotation, a centering) like a number does."""
    vs, vx = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in (s, x))
    return (isinstance(vs, torch.Tensor) and isinstance(vx, torch.Tensor) and vs.dim() >= 1
            and vs.shape[-1] == 1 and vx.shape[-1] > 1 and vs.dim() <= vx.dim()
            and tuple(vs.shape[:-1]) == tuple(vx.shape[vx.dim() - vs.dim():-1]))


def _is_float(n) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def token_embedding(graph: fx.Graph) -> fx.Node | None:
    for n in graph.nodes:
        if (n.op == "call_function" and n.target is aten.embedding.default and n.args[0].op == "get_attr"
                and _through(n.args[1], VIEWS).op == "placeholder"):
            return n
    return None


_SCALINGS = (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar)


def _unscaled(v: fx.Node) -> fx.Node:
    """`v` through views, casts and scalings by a number (Granite's logits / logits_scaling)."""
    while True:
        v = _through(v, VIEWS + CASTS)
        if not (v.op == "call_function" and v.target in _SCALINGS):
            return v
        a, b = v.args[0], v.args[1]
        if isinstance(b, (int, float)):
            v = a
        elif isinstance(a, (int, float)) and v.target is aten.mul.Tensor:
            v = b
        else:
            return v


def _uncapped(v: fx.Node) -> fx.Node:
    """`v` through views, casts, scalings by a number and soft-capping c·tanh(x/c) (Gemma-2's logits)."""
    v = _unscaled(v)
    while v.op == "call_function" and v.target is aten.tanh.default:
        v = _unscaled(v.args[0])
    return v


def output_linear(graph: fx.Graph) -> fx.Node | None:
    """The lm_head: the one linear (constant weight) whose result is a graph output, through
    views, casts, scalings by a number and soft-capping only (the logits). None when no output is such
    a linear, or more than one is."""
    out = next((n for n in graph.nodes if n.op == "output"), None)
    found = []
    for a in out.all_input_nodes if out is not None else ():
        w = _writer(_uncapped(a))
        if w is not None and w.kind in ("linear", "linear_t") and w.node not in found:
            found.append(w.node)
    return found[0] if len(found) == 1 else None


def residual_stream(graph: fx.Graph) -> Stream:
    emb = token_embedding(graph)
    st = Stream(emb)
    if emb is None:
        st.stop_reason = "no token embedding (aten.embedding of a constant indexed by an input)"
        return st
    cur = emb
    on_stream: set[fx.Node] = set()

    def carry(n: fx.Node) -> None:
        st.values.append(n)
        on_stream.add(n)

    while True:
        carry(cur)
        frontier = [cur]
        users: list[fx.Node] = []
        while frontier:  # views/casts of the stream are the stream
            n = frontier.pop()
            for u in n.users:
                if u.op == "call_function" and u.target in VIEWS + CASTS and u not in on_stream:
                    carry(u)
                    frontier.append(u)
                else:
                    users.append(u)
        adds = [u for u in users if u.op == "call_function" and u.target is aten.add.Tensor
                and all(_is_float(a) for a in u.args[:2]) and _same_shape(u, cur)]
        scales = [u for u in users if u.op == "call_function" and u.target is aten.mul.Tensor
                  and all(_is_scalar(a) for a in u.args[:2] if a not in on_stream)]
        for u in users:
            if u not in adds and u not in scales and u.op != "output":
                st.readers.append(u)
        if len(adds) + len(scales) > 1:
            st.stop_reason = f"the stream at {describe(cur)} is extended twice: " + \
                ", ".join(describe(a) for a in adds + scales)
            break
        if scales:
            st.scales.append(scales[0])
            cur = scales[0]
            continue
        if not adds:
            st.end = cur
            st.stop_reason = "end (no add extends the stream)"
            break
        add = adds[0]
        other = [a for a in add.args[:2] if a not in on_stream]
        ws = _writers(other[0]) if len(other) == 1 else None
        if ws is None:
            st.stop_reason = f"{describe(add)} adds {describe(other[0]) if other else '?'}, which is " + (
                "a norm's output: a post-norm writes the stream (its nonlinearity sits between the "
                "writer and the stream)" if other and _is_norm(_through(other[0], VIEWS + CASTS))
                else "not a linear or an embedding")
            break
        for w in ws:
            w.add = add
            st.writers.append(w)
        cur = add
    return st


def _is_norm(n: fx.Node) -> bool:
    return any(isinstance(match_at(p, n), Match) for p in (NORM, RMSNORM_PLAIN))


def _is_scalar(a) -> bool:
    """A number, a 0-dim tensor or a one-element constant — not a computed one-element tensor: with one
    token, a norm's rsqrt(mean(x²)) has numel 1 too, and it must stay a reader, not a stream scaling."""
    if isinstance(a, (int, float)):
        return True
    v = a.meta.get("val") if isinstance(a, fx.Node) else None
    return isinstance(v, torch.Tensor) and (v.dim() == 0 or (a.op == "get_attr" and v.numel() == 1))


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.numel() == vb.numel()
